//! The collector's view of the signing keys: the parsed `keys.toml`, swapped atomically
//! when the file changes or on SIGHUP, so keys rotate without a restart. A key file that
//! fails to parse never replaces a good one (the error is logged and counted).
//!
//! This is the one place outside `cli` that reads a file named in the configuration: a
//! long-running server must re-read its keys by itself.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use adclick_proto::keyfile::KeyFile;
use adclick_proto::token::Keyring;

/// Why the key file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    /// Unreadable.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Unparseable.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parse error.
        source: adclick_proto::keyfile::KeyFileError,
    },
}

/// Current keyring plus where it came from.
#[derive(Debug)]
pub struct KeySource {
    path: PathBuf,
    current: RwLock<Arc<Keyring>>,
    stamp: Mutex<Option<(SystemTime, u64)>>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn load(path: &Path) -> Result<Keyring, KeyLoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyLoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    KeyFile::parse(&text)
        .map(|f| f.keyring)
        .map_err(|source| KeyLoadError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

impl KeySource {
    /// Loads the key file; fails if it cannot be read or parsed.
    pub fn open(path: &Path) -> Result<Self, KeyLoadError> {
        let s = stamp(path);
        let ring = load(path)?;
        Ok(KeySource {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(ring)),
            stamp: Mutex::new(s),
        })
    }

    /// The keyring in force.
    pub fn get(&self) -> Arc<Keyring> {
        self.current
            .read()
            .map_or_else(|e| e.into_inner().clone(), |g| g.clone())
    }

    /// Re-reads the file if `force` or if its modification time or size changed. Returns
    /// whether the keyring was replaced.
    pub fn reload(&self, force: bool) -> Result<bool, KeyLoadError> {
        let now = stamp(&self.path);
        {
            let last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *last == now {
                return Ok(false);
            }
        }
        let ring = load(&self.path)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = now;
        Ok(true)
    }
}
