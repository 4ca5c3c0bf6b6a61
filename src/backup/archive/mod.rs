//! The backup file: a plain tar that any `tar` can list, laid out so that every byte
//! is checked before anything is restored.
//!
//! ```text
//! KOPROGO-BACKUP      "koprogo backup\nformat 2\n"   (first: identifies the file)
//! db.dump             pg_dump -Fc of database koprogo
//! secrets.env         <state>/secrets.env
//! uploads/…           the uploads directory (directories and regular files)
//! manifest.json       versions, row counts, and per member: name, size, sha256;
//!                     plus archive_sha256 = sha256 of every byte before its header.
//!                     Padded with spaces to a multiple of 512 bytes (no tar padding).
//! manifest.sha256     sha256 of manifest.json, hex + "\n", spaces up to 512 bytes
//! manifest.auth       "hmac-sha256 <key id> <hex>\n", spaces up to 512 bytes: who
//!                     made it (see [`super::auth`]); format 2 on, absent in format 1
//! (two or more zero blocks)
//! ```
//!
//! So a flipped byte anywhere is caught: before the manifest by `archive_sha256`,
//! in the manifest by `manifest.sha256`, in a tar header by its own checksum, and
//! after the last member by the zero check. A truncated file has no manifest.
//!
//! Tar extension headers are read by us, not by the tar crate (which reads each one
//! whole into memory): a GNU long name (`L`, what the tar crate writes for a name
//! over 100 bytes) up to [`MAX_EXTENSION`] bytes names the next member; a larger one,
//! and any other kind (PAX `x`/`g`, GNU long link `K`: we write none), is refused
//! from its header, before its data is read.
//!
//! [`format`] holds the names, limits and manifest types, [`write`] the
//! [`Writer`] that makes a backup, [`read`] the [`check`] that verifies (and
//! extracts) one.

mod format;
mod read;
mod write;

pub use format::{
    Manifest, Member, PgInfo, UploadsInfo, DUMP, FORMAT, MAGIC_NAME, MANIFEST, MANIFEST_AUTH,
    MANIFEST_SUM, MAX_EXTENSION, SECRETS, UPLOADS,
};
pub use read::{check, is_age, Checked, Extract, Refused};
pub use write::{Sink, Writer};

#[cfg(test)]
mod tests;
