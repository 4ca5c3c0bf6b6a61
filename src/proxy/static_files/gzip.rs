//! On-the-fly gzip of compressible files and the bounded LRU that keeps the results.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::body::Bytes;

use super::Inner;
use crate::sync::LockExt;

/// Files larger than this are never gzipped on the fly (served identity instead).
pub(super) const GZIP_MAX: u64 = 8 * 1024 * 1024;
/// Total bytes of on-the-fly gzip results kept in memory.
pub(super) const GZ_CACHE_BUDGET: usize = 4 * 1024 * 1024;
/// Largest single gzip result kept in the cache.
pub(super) const GZ_CACHE_MAX_ENTRY: usize = 1024 * 1024;

impl Inner {
    /// The gzip of a file, from the cache or made now.
    pub(super) fn gzip(
        &self,
        canon: &Path,
        file: &mut File,
        meta: &Metadata,
    ) -> std::io::Result<Bytes> {
        let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
        if let Some(b) = self.cache().get(canon, mtime, meta.len()) {
            return Ok(b);
        }
        let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.read_to_end(&mut data)?;
        let mut enc = flate2::write::GzEncoder::new(
            Vec::with_capacity(data.len() / 3 + 64),
            flate2::Compression::new(self.gzip_level),
        );
        enc.write_all(&data)?;
        let gz = Bytes::from(enc.finish()?);
        self.cache()
            .insert(canon.to_path_buf(), mtime, meta.len(), gz.clone());
        Ok(gz)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, GzCache> {
        self.gz_cache.locked()
    }
}

/// Bounded LRU of on-the-fly gzip results.
#[derive(Default)]
pub(super) struct GzCache {
    map: HashMap<PathBuf, GzEntry>,
    pub(super) total: usize,
    tick: u64,
}

struct GzEntry {
    mtime: SystemTime,
    len: u64,
    data: Bytes,
    used: u64,
}

impl GzCache {
    pub(super) fn get(&mut self, path: &Path, mtime: SystemTime, len: u64) -> Option<Bytes> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.map.get_mut(path)?;
        if e.mtime != mtime || e.len != len {
            return None;
        }
        e.used = tick;
        Some(e.data.clone())
    }

    pub(super) fn insert(&mut self, path: PathBuf, mtime: SystemTime, len: u64, data: Bytes) {
        if data.len() > GZ_CACHE_MAX_ENTRY {
            return;
        }
        if let Some(old) = self.map.remove(&path) {
            self.total -= old.data.len();
        }
        while self.total + data.len() > GZ_CACHE_BUDGET {
            let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(old) = self.map.remove(&oldest) {
                self.total -= old.data.len();
            }
        }
        self.tick += 1;
        self.total += data.len();
        self.map.insert(
            path,
            GzEntry {
                mtime,
                len,
                data,
                used: self.tick,
            },
        );
    }
}
