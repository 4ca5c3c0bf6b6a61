//! The names the local root CA may vouch for: the Name Constraints extension
//! (RFC 5280 §4.2.1.10, critical) of the roots we make, and what an existing root
//! on disk covers. A root permits `domain`, each alias, `localhost` (DNS subtrees:
//! `example.org` also covers every name under it, `*.example.org`, `a.b.example.org`),
//! 127.0.0.0/8, ::1 and this machine's own addresses (one address each). A
//! certificate for any other name signed by the root's key is rejected by browsers
//! and TLS libraries that trust the root, so whoever reads the key cannot
//! impersonate other sites to the office PCs. A root made before the constraints
//! existed has none ([`Scope::Any`]): it is kept (office PCs trust it) and flagged.

use std::fmt;
use std::net::IpAddr;

use anyhow::anyhow;
use rcgen::{CidrSubnet, GeneralSubtree, NameConstraints};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// One permitted subtree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Permit {
    /// A DNS name and every name under it.
    Dns(String),
    /// An address block: address and prefix length.
    Net(IpAddr, u8),
}

impl Permit {
    /// The subtree for one configured name: an IP literal is its own address (/32,
    /// /128); a DNS name its subtree (a leading `*.` is dropped).
    pub(crate) fn for_name(name: &str) -> Permit {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match name.parse::<IpAddr>() {
            Ok(ip) => Permit::Net(ip, if ip.is_ipv4() { 32 } else { 128 }),
            Err(_) => Permit::Dns(name.trim_start_matches("*.").to_string()),
        }
    }

    /// Whether `name` (a DNS name or an IP literal) is inside this subtree.
    pub(crate) fn covers(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match (self, name.parse::<IpAddr>()) {
            (Permit::Net(net, len), Ok(ip)) => in_net(ip, *net, *len),
            (Permit::Dns(base), Err(_)) => {
                base.is_empty()
                    || name == *base
                    || name
                        .strip_suffix(base.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }
            _ => false,
        }
    }

    fn is_ip(&self) -> bool {
        matches!(self, Permit::Net(..))
    }
}

impl fmt::Display for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Permit::Dns(n) => write!(f, "{n}"),
            Permit::Net(ip, len) => write!(f, "{ip}/{len}"),
        }
    }
}

fn in_net(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// What a root may certify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// No Name Constraints: any name (roots made before they existed).
    Any,
    /// Only these subtrees (per name type, as RFC 5280 says: a type with no subtree
    /// listed is not constrained).
    Only(Vec<Permit>),
}

impl Scope {
    /// The subtrees of a new root for `names` (the leaf names of
    /// [`super::local_ca::leaf_names`]): loopback as whole blocks, then each name
    /// not already covered by an earlier subtree.
    pub(crate) fn for_names(names: &[String]) -> Scope {
        let mut permits = vec![
            Permit::Net(IpAddr::from([127, 0, 0, 0]), 8),
            Permit::Net(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]), 128),
        ];
        for n in names {
            if !permits.iter().any(|p| p.covers(n)) {
                permits.push(Permit::for_name(n));
            }
        }
        // DNS subtrees first, as people read them.
        permits.sort_by_key(Permit::is_ip);
        Scope::Only(permits)
    }

    /// Reads the Name Constraints of a certificate (DER).
    pub(crate) fn of_cert(der: &[u8]) -> anyhow::Result<Scope> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| anyhow!("not a valid X.509 certificate: {e}"))?;
        let nc = match cert.name_constraints() {
            Ok(Some(nc)) => nc.value,
            Ok(None) => return Ok(Scope::Any),
            Err(e) => return Err(anyhow!("unreadable Name Constraints: {e}")),
        };
        if nc.excluded_subtrees.as_ref().is_some_and(|x| !x.is_empty()) {
            return Err(anyhow!(
                "excluded subtrees in the Name Constraints (not made by koprogo)"
            ));
        }
        let mut permits = Vec::new();
        for s in nc.permitted_subtrees.iter().flatten() {
            match &s.base {
                GeneralName::DNSName(d) => permits.push(Permit::Dns(d.to_ascii_lowercase())),
                GeneralName::IPAddress(b) => permits.push(net_from_bytes(b)?),
                other => return Err(anyhow!("unexpected permitted subtree {other:?}")),
            }
        }
        Ok(Scope::Only(permits))
    }

    pub(crate) fn is_constrained(&self) -> bool {
        matches!(self, Scope::Only(_))
    }

    /// Whether a leaf for `name` signed by this root verifies.
    pub(crate) fn covers(&self, name: &str) -> bool {
        match self {
            Scope::Any => true,
            Scope::Only(permits) => {
                let ip = name.parse::<IpAddr>().is_ok();
                let of_type = permits.iter().filter(|p| p.is_ip() == ip);
                let mut of_type = of_type.peekable();
                of_type.peek().is_none() || of_type.any(|p| p.covers(name))
            }
        }
    }

    /// `names` split into (covered, not covered), order kept.
    pub(crate) fn split(&self, names: &[String]) -> (Vec<String>, Vec<String>) {
        names.iter().cloned().partition(|n| self.covers(n))
    }

    /// The subtrees as text (`example.org`, `127.0.0.0/8`); empty when unconstrained.
    pub(crate) fn describe(&self) -> Vec<String> {
        match self {
            Scope::Any => Vec::new(),
            Scope::Only(p) => p.iter().map(Permit::to_string).collect(),
        }
    }

    /// The extension for rcgen (None when unconstrained).
    pub(crate) fn to_rcgen(&self) -> Option<NameConstraints> {
        let Scope::Only(permits) = self else {
            return None;
        };
        let permitted_subtrees = permits
            .iter()
            .map(|p| match p {
                Permit::Dns(n) => GeneralSubtree::DnsName(n.clone()),
                Permit::Net(ip, len) => {
                    GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(*ip, *len))
                }
            })
            .collect();
        Some(NameConstraints {
            permitted_subtrees,
            excluded_subtrees: Vec::new(),
        })
    }
}

/// An iPAddress subtree: address then mask (8 or 32 bytes).
fn net_from_bytes(b: &[u8]) -> anyhow::Result<Permit> {
    let bad = || anyhow!("malformed iPAddress subtree ({} bytes)", b.len());
    let (ip, mask) = match b.len() {
        8 => {
            let (a, m) = b.split_at(4);
            let a: [u8; 4] = a.try_into().map_err(|_| bad())?;
            (IpAddr::from(a), m)
        }
        32 => {
            let (a, m) = b.split_at(16);
            let a: [u8; 16] = a.try_into().map_err(|_| bad())?;
            (IpAddr::from(a), m)
        }
        _ => return Err(bad()),
    };
    let len: u32 = mask.iter().map(|m| m.leading_ones()).sum();
    // A mask must be contiguous ones: `len` leading ones and nothing after.
    let contiguous = mask.iter().enumerate().all(|(i, m)| {
        let ones = len.saturating_sub(8 * i as u32).min(8);
        *m == (0xffu8.checked_shl(8 - ones).unwrap_or(0))
    });
    if !contiguous {
        return Err(bad());
    }
    Ok(Permit::Net(ip, len as u8))
}
