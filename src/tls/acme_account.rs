//! The ACME account: one per directory URL in `<state>/tls/acme/account.json`
//! (0600), cached for the process, restored from the file, or created and stored
//! before anything else happens; forgotten when the CA no longer knows it.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context};
use chrono::Utc;
use instant_acme::{Account, AccountBuilder, AccountCredentials, NewAccount};
use serde::{Deserialize, Serialize};

use super::acme::Runtime;
use super::certinfo::parse_chain;
use super::{Tls, TlsPaths};
use crate::config::Config;
use crate::fsutil::{ensure_dir, write_atomic};

/// The stored accounts, keyed by directory URL.
#[derive(Serialize, Deserialize, Default)]
pub(super) struct AccountBook {
    pub(super) accounts: BTreeMap<String, serde_json::Value>,
}

/// The account for the configured directory: cached, else restored from
/// account.json, else created there and stored before anything else happens.
pub(super) async fn account(tls: &Tls, rt: &mut Runtime) -> anyhow::Result<Account> {
    if let Some(a) = &rt.account {
        return Ok(a.clone());
    }
    let cfg = &tls.cfg;
    let directory = cfg.tls.acme_directory.clone();
    let mut book = read_book(&tls.paths);
    let stored = book
        .accounts
        .get(&directory)
        .and_then(|v| serde_json::from_value::<AccountCredentials>(v.clone()).ok());
    let account = match stored {
        Some(creds) => builder(cfg)?
            .from_credentials(creds)
            .await
            .context("contacting the directory")?,
        None => {
            let email = cfg.tls.acme_email.clone().unwrap_or_default();
            let contact = format!("mailto:{email}");
            let contacts = [contact.as_str()];
            let new = NewAccount {
                contact: if email.is_empty() { &[] } else { &contacts },
                terms_of_service_agreed: true,
                only_return_existing: false,
            };
            let (account, creds) = builder(cfg)?
                .create(&new, directory.clone(), None)
                .await
                .context("creating the account")?;
            book.accounts
                .insert(directory.clone(), serde_json::to_value(&creds)?);
            write_book(&tls.paths, &book)?;
            tracing::info!(
                account = account.id(),
                "ACME account created at {directory}"
            );
            account
        }
    };
    rt.account = Some(account.clone());
    Ok(account)
}

pub(super) fn builder(cfg: &Config) -> anyhow::Result<AccountBuilder> {
    // instant-acme's client takes the process-wide provider: make sure it is ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match &cfg.tls.acme_ca_root {
        Some(root) => {
            let pem = std::fs::read(root)
                .with_context(|| format!("tls.acme_ca_root {}: cannot read", root.display()))?;
            let certs = parse_chain(&pem)
                .with_context(|| format!("tls.acme_ca_root {}", root.display()))?;
            if certs.len() > 1 {
                tracing::warn!(
                    "tls.acme_ca_root {}: only the first of its {} certificates is trusted",
                    root.display(),
                    certs.len()
                );
            }
            Account::builder_with_root(root)
                .map_err(|e| anyhow!("tls.acme_ca_root {}: {e}", root.display()))
        }
        None => Account::builder().map_err(|e| anyhow!("loading the system's trusted roots: {e}")),
    }
}

pub(super) fn read_book(paths: &TlsPaths) -> AccountBook {
    match std::fs::read(&paths.account) {
        Ok(text) => match serde_json::from_slice(&text) {
            Ok(book) => book,
            Err(e) => {
                let aside = paths
                    .account
                    .with_extension(format!("json.bad-{}", Utc::now().timestamp()));
                tracing::warn!(
                    "{} unreadable ({e}); moved to {} and a new account will be created",
                    paths.account.display(),
                    aside.display()
                );
                let _ = std::fs::rename(&paths.account, &aside);
                AccountBook::default()
            }
        },
        Err(_) => AccountBook::default(),
    }
}

pub(super) fn write_book(paths: &TlsPaths, book: &AccountBook) -> anyhow::Result<()> {
    ensure_dir(&paths.acme_dir, 0o700)
        .with_context(|| format!("creating {}", paths.acme_dir.display()))?;
    let json = serde_json::to_vec_pretty(book)?;
    write_atomic(&paths.account, &json, 0o600)
        .with_context(|| format!("writing {}", paths.account.display()))
}

pub(super) fn forget_account(tls: &Tls) {
    let mut book = read_book(&tls.paths);
    if book.accounts.remove(&tls.cfg.tls.acme_directory).is_some() {
        if let Err(e) = write_book(&tls.paths, &book) {
            tracing::warn!("{e:#}");
        }
    }
}
