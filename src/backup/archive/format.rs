//! What a backup file is made of: the member names, the size limits, the manifest
//! and its parts, and the checks of what the members hold (secrets.env, the kinds of
//! tar extension header, the format number).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The format this koprogo writes and the newest it reads (1: before
/// `manifest.auth`; such files are read, but are not authenticated).
pub const FORMAT: u32 = 2;
pub const MAGIC_NAME: &str = "KOPROGO-BACKUP";
pub const DUMP: &str = "db.dump";
pub const SECRETS: &str = "secrets.env";
pub const UPLOADS: &str = "uploads";
pub const MANIFEST: &str = "manifest.json";
pub const MANIFEST_SUM: &str = "manifest.sha256";
pub const MANIFEST_AUTH: &str = "manifest.auth";
pub(super) const BLOCK: usize = 512;
pub(super) const MAX_MANIFEST: u64 = 256 << 20;
pub(super) const MAX_SECRETS: u64 = 1 << 20;
/// Largest tar extension header read (a member name is at most a few KiB).
pub const MAX_EXTENSION: u64 = 64 << 10;

/// What the backup holds, written last (see the module comment).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub kind: String,
    /// RFC 3339 UTC.
    pub created: String,
    pub created_unix: i64,
    /// "scheduled", "manual" or "pre-restore".
    pub reason: String,
    pub koprogo_version: String,
    pub domain: String,
    pub postgres: PgInfo,
    /// Schema versions of the application found in the database (e.g. the max
    /// version of `_sqlx_migrations`, or `demo_schema` for the demo backend).
    #[serde(default)]
    pub schema: BTreeMap<String, i64>,
    pub uploads: UploadsInfo,
    /// Names of the keys in secrets.env (not their values).
    pub secrets: Vec<String>,
    /// sha256 of every byte of the archive before manifest.json's header.
    pub archive_sha256: String,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PgInfo {
    pub major: u32,
    pub version: String,
    pub database: String,
    pub database_bytes: i64,
    /// Exact row count of every table, taken in the snapshot pg_dump used.
    pub tables: BTreeMap<String, i64>,
    pub rows: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UploadsInfo {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Entries not backed up (symbolic links, sockets…), with the reason.
    #[serde(default)]
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// "file" or "dir".
    pub kind: String,
    pub size: u64,
    /// Hex sha256 of the data ("" for directories).
    pub sha256: String,
}

/// The kind of a tar extension header (it describes the member after it), or None.
pub(super) fn extension(t: tar::EntryType) -> Option<&'static str> {
    if t.is_gnu_longname() {
        Some("GNU long name ('L')")
    } else if t.is_gnu_longlink() {
        Some("GNU long link name ('K')")
    } else if t.is_pax_local_extensions() {
        Some("PAX extended header ('x')")
    } else if t.is_pax_global_extensions() {
        Some("PAX global header ('g')")
    } else {
        None
    }
}

pub(super) fn newer_format(n: u32) -> String {
    format!(
        "made by a newer koprogo (backup format {n}; this koprogo reads format {FORMAT} and older): \
         upgrade koprogo first, nothing was changed"
    )
}
