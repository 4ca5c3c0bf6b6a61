//! age encryption of backup files (X25519 recipients, "age1…"): the supervisor
//! encrypts to the public key(s) of `backup.encrypt_to`; the operator's command
//! line decrypts with an identity file (`--identity`), so the private key never
//! has to be readable by the service user.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};

/// `backup.encrypt_to` at config load (checked by the configuration).
pub use crate::config::check_recipient_setting;

/// The recipients of `backup.encrypt_to`: one "age1…" key, or a file with one per
/// line ('#' comments allowed).
pub fn recipients(setting: &str) -> Result<Vec<age::x25519::Recipient>> {
    if setting.starts_with("age1") {
        return age::x25519::Recipient::from_str(setting)
            .map(|r| vec![r])
            .map_err(|e| anyhow!("backup.encrypt_to: {e}"));
    }
    let text = std::fs::read_to_string(setting).with_context(|| {
        format!("backup.encrypt_to = {setting:?}: cannot read the recipients file (it must be readable by the service user)")
    })?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let r = age::x25519::Recipient::from_str(line).map_err(|e| {
            anyhow!(
                "{setting}:{}: {e} (only age X25519 recipients \"age1…\" are supported)",
                n + 1
            )
        })?;
        out.push(r);
    }
    if out.is_empty() {
        bail!("{setting}: no recipient in the file (one \"age1…\" public key per line)");
    }
    Ok(out)
}

/// Starts an age stream to `recipients` on `file`.
pub fn encrypt(
    recipients: &[age::x25519::Recipient],
    file: File,
) -> Result<age::stream::StreamWriter<BufWriter<File>>> {
    let enc = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| anyhow!("age: {e}"))?;
    Ok(enc.wrap_output(BufWriter::with_capacity(1 << 20, file))?)
}

/// Decrypts `src` with the identities in `identity` into the new file `dst` (0600).
pub fn decrypt(src: &Path, identity: &Path, dst: &Path) -> Result<()> {
    let id = std::fs::read(identity)
        .with_context(|| format!("cannot read the identity file {}", identity.display()))?;
    let input = File::open(src).with_context(|| format!("cannot read {}", src.display()))?;
    decrypt_opened(src, input, identity, &id, dst)
}

/// [`decrypt`] from a file and an identity already read (by root, for the
/// operator), named `src` and `identity` in messages.
pub fn decrypt_opened(
    src: &Path,
    input: File,
    identity: &Path,
    identity_text: &[u8],
    dst: &Path,
) -> Result<()> {
    let ids = age::IdentityFile::from_buffer(identity_text)
        .with_context(|| format!("cannot read the identity file {}", identity.display()))?
        .into_identities()
        .map_err(|e| anyhow!("{}: {e}", identity.display()))?;
    let dec = age::Decryptor::new_buffered(BufReader::with_capacity(1 << 20, input))
        .map_err(|e| anyhow!("{}: not a readable age file ({e})", src.display()))?;
    let mut reader = dec
        .decrypt(ids.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| {
            anyhow!(
                "{}: cannot decrypt with {} ({e}): pass the identity whose public key is in backup.encrypt_to",
                src.display(),
                identity.display()
            )
        })?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .with_context(|| format!("cannot create {}", dst.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, out);
    std::io::copy(&mut reader, &mut w).map_err(|e| {
        anyhow!(
            "{}: decryption failed ({e}): the file is damaged or truncated; use another backup",
            src.display()
        )
    })?;
    let f = w
        .into_inner()
        .map_err(|e| anyhow!("cannot write {}: {}", dst.display(), e.error()))?;
    f.sync_all()
        .with_context(|| format!("cannot write {}", dst.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;
    use std::io::Write;

    #[test]
    fn encrypt_then_decrypt() {
        let d = tempfile::tempdir().expect("tempdir");
        let id = age::x25519::Identity::generate();
        let idf = d.path().join("id.txt");
        std::fs::write(&idf, format!("{}\n", id.to_string().expose_secret())).expect("id");
        let recips = d.path().join("recipients");
        std::fs::write(&recips, format!("# ops\n{}\n", id.to_public())).expect("r");
        let r = recipients(&recips.display().to_string()).expect("recipients");
        let enc = d.path().join("x.age");
        let mut w = encrypt(&r, File::create(&enc).expect("create")).expect("encrypt");
        w.write_all(b"hello backup").expect("write");
        w.finish().expect("finish").flush().expect("flush");
        let out = d.path().join("x");
        decrypt(&enc, &idf, &out).expect("decrypt");
        assert_eq!(std::fs::read(&out).expect("read"), b"hello backup");
        assert!(check_recipient_setting("age1nope").is_err());
        assert!(check_recipient_setting(&id.to_public().to_string()).is_ok());
    }
}
