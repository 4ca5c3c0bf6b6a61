//! Who made a backup. A checksum proves a file is intact, not where it comes from;
//! anyone can build a correctly-checksummed archive. So each backup ends with
//! `manifest.auth`: an HMAC-SHA256 of its manifest (which holds the checksum of
//! every other byte) under the appliance's `BACKUP_AUTH_KEY` (secrets.env; never
//! inside a backup, so a copy of the backups cannot forge one). `restore` and
//! `backup verify` check it after reading the whole file and before replaying any
//! of it:
//! - made with this appliance's key: accepted;
//! - made with the key given by `--trust-key` (another appliance's, printed there
//!   by `koprogo backup key`): accepted — moving a site between machines;
//! - anything else (another appliance, a backup made before backups were
//!   authenticated, a crafted file): refused, unless `--trust-foreign`, which says
//!   what it trusts.
//!
//! Whatever the verdict, the dump is replayed as an unprivileged PostgreSQL role,
//! never as the superuser (see `verify::restore_into`).

use anyhow::{anyhow, bail, Result};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::archive::Checked;

pub const ALGORITHM: &str = "hmac-sha256";
/// Bound into every MAC, so the key authenticates nothing but backup manifests.
const CONTEXT: &[u8] = b"koprogo backup manifest\n";

/// A backup authentication key (32 bytes).
pub struct Key([u8; 32]);

impl Key {
    /// 64 hex characters (the form secrets.env and `koprogo backup key` use).
    pub fn from_hex(text: &str) -> Result<Key> {
        let t = text.trim();
        let mut k = [0u8; 32];
        if hex::decode_to_slice(t, &mut k).is_err() {
            bail!("a backup key is 64 hex characters (as `koprogo backup key` prints it)");
        }
        Ok(Key(k))
    }

    /// A public name for the key: the first 8 bytes of a hash of it, in hex.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"koprogo backup key id\n");
        h.update(self.0);
        hex::encode(&h.finalize()[..8])
    }

    fn mac(&self) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        m.update(CONTEXT);
        m
    }

    /// The text of `manifest.auth` for `manifest` (its exact bytes).
    pub fn seal(&self, manifest: &[u8]) -> String {
        let mut m = self.mac();
        m.update(manifest);
        format!(
            "{ALGORITHM} {} {}\n",
            self.id(),
            hex::encode(m.finalize().into_bytes())
        )
    }

    fn verifies(&self, manifest: &[u8], mac: &[u8]) -> bool {
        let mut m = self.mac();
        m.update(manifest);
        m.verify_slice(mac).is_ok()
    }
}

/// This appliance's key, from `<state>/secrets.env`.
pub fn own_key(state: &std::path::Path) -> Result<Key> {
    let file = crate::secrets::path(state);
    let Some(v) = crate::secrets::read_value(state, crate::secrets::BACKUP_KEY)? else {
        bail!(
            "{} has no {}: restart koprogo once (it generates the missing keys at boot)",
            file.display(),
            crate::secrets::BACKUP_KEY
        );
    };
    Key::from_hex(&v).map_err(|e| {
        anyhow!(
            "{}: {} is malformed ({e:#})",
            file.display(),
            crate::secrets::BACKUP_KEY
        )
    })
}

fn parse_secrets(text: &[u8], what: &str) -> Result<std::collections::BTreeMap<String, String>> {
    let text = std::str::from_utf8(text).map_err(|_| anyhow!("{what} is not UTF-8"))?;
    crate::secrets::parse(text).map_err(|n| anyhow!("{what}:{n}: not KEY=VALUE"))
}

/// secrets.env as a backup stores it (without the backup key), and the key.
pub fn split_secrets(live: &[u8]) -> Result<(Vec<u8>, Key)> {
    let mut values = parse_secrets(live, "secrets.env")?;
    let key = values
        .remove(crate::secrets::BACKUP_KEY)
        .ok_or_else(|| {
            anyhow!(
                "secrets.env has no {}: restart koprogo once (it generates the missing keys at boot)",
                crate::secrets::BACKUP_KEY
            )
        })
        .and_then(|k| Key::from_hex(&k))?;
    Ok((crate::secrets::render(&values).into_bytes(), key))
}

/// The secrets.env a restore writes: the backup's keys, with the live file's
/// backup key (a backup never brings one: this appliance keeps its own).
pub fn merge_secrets(from_backup: &[u8], live: &[u8]) -> Result<Vec<u8>> {
    let mut values = parse_secrets(from_backup, "the backup's secrets.env")?;
    values.remove(crate::secrets::BACKUP_KEY);
    let live = parse_secrets(live, "secrets.env")?;
    if let Some(k) = live.get(crate::secrets::BACKUP_KEY) {
        values.insert(crate::secrets::BACKUP_KEY.to_string(), k.clone());
    }
    Ok(crate::secrets::render(&values).into_bytes())
}

/// A parsed `manifest.auth` line: `hmac-sha256 <key id> <mac>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    pub key_id: String,
    pub mac: Vec<u8>,
}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses the member's bytes (one line, then spaces); `None` when malformed.
pub fn parse_seal(bytes: &[u8]) -> Option<Seal> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (line, rest) = text.split_once('\n')?;
    if rest.bytes().any(|b| b != b' ') {
        return None;
    }
    let mut parts = line.split(' ');
    let (alg, id, mac) = (parts.next()?, parts.next()?, parts.next()?);
    if alg != ALGORITHM || parts.next().is_some() || !lower_hex(id, 16) || !lower_hex(mac, 64) {
        return None;
    }
    let mac = (0..32)
        .map(|i| u8::from_str_radix(&mac[2 * i..2 * i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(Seal {
        key_id: id.to_string(),
        mac,
    })
}

/// What the operator allows beyond this appliance's own backups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trust {
    /// Only backups made with this appliance's key.
    #[default]
    Own,
    /// Also backups made with this key (64 hex: another appliance's, for a move).
    Key(String),
    /// Any intact backup (`--trust-foreign`).
    Foreign,
}

/// Where an accepted backup comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Own,
    /// Authenticated with the `--trust-key` key (its id).
    TrustedKey(String),
    /// Not authenticated, accepted with `--trust-foreign` (what it claims to be).
    Foreign(String),
}

impl Origin {
    /// A phrase for messages ("authenticated by …").
    pub fn describe(&self) -> String {
        match self {
            Origin::Own => "authenticated: made by this appliance".into(),
            Origin::TrustedKey(id) => format!("authenticated with the trusted key {id}"),
            Origin::Foreign(what) => {
                format!("NOT authenticated, trusted because of --trust-foreign: {what}")
            }
        }
    }
}

/// Decides whether `checked` (the file `shown`) may be replayed. The error says why
/// not and what to do; nothing has been replayed yet.
pub fn authenticate(checked: &Checked, own: &Key, trust: &Trust, shown: &str) -> Result<Origin> {
    let m = &checked.manifest;
    let claims = format!(
        "a backup of {} made {} by koprogo {}",
        m.domain, m.created, m.koprogo_version
    );
    let trusted = match trust {
        Trust::Key(k) => Some(Key::from_hex(k).map_err(|e| anyhow!("--trust-key: {e:#}"))?),
        _ => None,
    };
    let foreign = |why: String| -> Result<Origin> {
        if *trust == Trust::Foreign {
            let what = format!("{claims} ({why})");
            tracing::warn!("{shown}: accepted with --trust-foreign: {what}");
            return Ok(Origin::Foreign(what));
        }
        bail!(
            "{shown}: {why}: nothing was replayed from it. If it is yours (another of your \
             appliances, or one from before backups were authenticated), pass --trust-key FILE \
             with the key `koprogo backup key` prints on the machine that made it, or \
             --trust-foreign to accept it unauthenticated (it claims to be {claims})"
        )
    };
    let Some(seal) = &checked.seal else {
        return foreign(
            "not authenticated: it carries no backup signature (made by a koprogo older than \
             backup format 2, or not by koprogo)"
                .into(),
        );
    };
    for (key, origin) in [
        (Some(own), Origin::Own),
        (
            trusted.as_ref(),
            Origin::TrustedKey(trusted.as_ref().map(Key::id).unwrap_or_default()),
        ),
    ] {
        let Some(key) = key else { continue };
        if seal.key_id == key.id() {
            if key.verifies(&checked.manifest_raw, &seal.mac) {
                return Ok(origin);
            }
            return foreign(format!(
                "its signature does not match the key {} it names: the file was altered after \
                 it was made",
                seal.key_id
            ));
        }
    }
    foreign(format!(
        "made by another appliance (backup key {}; this appliance's is {})",
        seal.key_id,
        own.id()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::archive::Manifest;

    fn checked(seal_with: Option<&Key>, raw: &[u8]) -> Checked {
        let manifest = Manifest {
            format: 2,
            kind: "koprogo-backup".into(),
            created: "2026-01-01T00:00:00Z".into(),
            created_unix: 0,
            reason: "manual".into(),
            koprogo_version: "test".into(),
            domain: "example.org".into(),
            postgres: Default::default(),
            schema: Default::default(),
            uploads: Default::default(),
            secrets: Vec::new(),
            archive_sha256: String::new(),
            members: Vec::new(),
        };
        Checked {
            manifest,
            manifest_raw: raw.to_vec(),
            seal: seal_with.and_then(|k| parse_seal(k.seal(raw).as_bytes())),
            secrets: Vec::new(),
            size: 0,
        }
    }

    #[test]
    fn who_is_trusted() {
        let own = Key::from_hex(&"01".repeat(32)).expect("key");
        let other = Key::from_hex(&"02".repeat(32)).expect("key");
        let other_hex = "02".repeat(32);
        let raw = b"{}";
        let ok = |c: &Checked, t: &Trust| authenticate(c, &own, t, "f.kbk");
        assert_eq!(
            ok(&checked(Some(&own), raw), &Trust::Own).expect("own"),
            Origin::Own
        );
        let theirs = checked(Some(&other), raw);
        let e = ok(&theirs, &Trust::Own).expect_err("another appliance");
        assert!(format!("{e:#}").contains(&other.id()), "{e:#}");
        assert_eq!(
            ok(&theirs, &Trust::Key(other_hex.clone())).expect("trusted key"),
            Origin::TrustedKey(other.id())
        );
        assert!(matches!(
            ok(&theirs, &Trust::Foreign).expect("trusted anyway"),
            Origin::Foreign(w) if w.contains("example.org")
        ));
        let unsigned = checked(None, raw);
        let e = ok(&unsigned, &Trust::Key(other_hex)).expect_err("unsigned");
        assert!(format!("{e:#}").contains("not authenticated"), "{e:#}");
        // The manifest changed after sealing: the key id matches, the MAC does not.
        let mut altered = checked(Some(&own), raw);
        altered.manifest_raw = b"{ }".to_vec();
        let e = ok(&altered, &Trust::Own).expect_err("altered");
        assert!(format!("{e:#}").contains("altered"), "{e:#}");
    }

    #[test]
    fn seal_round_trip_and_strict_parsing() {
        let k = Key::from_hex(&"ab".repeat(32)).expect("key");
        let line = k.seal(b"{\"manifest\": 1}");
        let mut member = line.clone().into_bytes();
        member.resize(512, b' ');
        let s = parse_seal(&member).expect("parses");
        assert_eq!(s.key_id, k.id());
        assert!(k.verifies(b"{\"manifest\": 1}", &s.mac));
        assert!(!k.verifies(b"{\"manifest\": 2}", &s.mac));
        let other = Key::from_hex(&"cd".repeat(32)).expect("key");
        assert!(!other.verifies(b"{\"manifest\": 1}", &s.mac));
        assert_ne!(other.id(), k.id());
        for bad in [
            line.replace(ALGORITHM, "hmac-md5"),
            line.to_uppercase(),
            line.replace('\n', ""),
            format!("{line}x"),
            line.replace(' ', "  "),
        ] {
            assert!(parse_seal(bad.as_bytes()).is_none(), "{bad:?}");
        }
        assert!(Key::from_hex("abc").is_err());
        let live = format!("A=1\n{}={}\n", crate::secrets::BACKUP_KEY, "ab".repeat(32));
        let (stored, key) = split_secrets(live.as_bytes()).expect("split");
        assert_eq!(key.id(), k.id());
        let stored = String::from_utf8(stored).expect("utf8");
        assert!(
            stored.contains("A=1") && !stored.contains("BACKUP"),
            "{stored}"
        );
        let forged = format!(
            "{stored}{}={}\n",
            crate::secrets::BACKUP_KEY,
            "cd".repeat(32)
        );
        let merged = merge_secrets(forged.as_bytes(), live.as_bytes()).expect("merge");
        assert_eq!(
            String::from_utf8(merged).expect("utf8"),
            crate::secrets::render(&crate::secrets::parse(&live).expect("parse"))
        );
        assert!(Key::from_hex(&"zz".repeat(32)).is_err());
    }
}
