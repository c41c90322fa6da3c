//! Checkpoint files: a checkpoint's tables written to their own file in
//! `<data_dir>/checkpoints/`, off the writer thread, fsynced (file and directory) before the
//! store's commit that points at them. The redb transaction of a checkpoint then holds only
//! that pointer (file name, length, XXH64 of the bytes) with the WAL truncation, so the
//! writer's commit no longer copies tens of megabytes into the B-tree with ingest stopped.
//!
//! Crash safety is the store's: a file is written under a new name, never over a file a
//! committed pointer names; the pointer commits only after the file is durable; the file
//! of the previous checkpoint is deleted only after the new pointer committed; files no
//! committed pointer names (a crash between the file and the commit) are deleted at open.
//! A file that does not match its pointer (length, hash) is refused at load like a damaged
//! store, never trusted.
//!
//! Format: `MAGIC`, then per table `name_len u32 LE, name, blob_len u64 LE, blob`. Every
//! length read is bounded by what is left of the file. This module knows nothing about what
//! the tables hold.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh64::Xxh64;

use super::StoreError;

/// Directory of checkpoint files inside the data dir.
pub const DIR: &str = "checkpoints";
const MAGIC: &[u8; 8] = b"ADCKPT1\n";

/// A checkpoint's tables, durable in their file, not yet referenced by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// Last WAL position reflected in the tables.
    pub wal_pos: u64,
    /// The file's name inside [`DIR`].
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// XXH64 (seed 0) of its bytes.
    pub hash: u64,
}

impl Staged {
    /// The pointer row stored in the checkpoint table: `len u64 LE, hash u64 LE, name`.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.name.len());
        v.extend_from_slice(&self.len.to_le_bytes());
        v.extend_from_slice(&self.hash.to_le_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v
    }

    pub(super) fn decode(wal_pos: u64, b: &[u8]) -> Result<Self, StoreError> {
        let bad = || StoreError("corrupt checkpoint file pointer".into());
        if b.len() < 16 {
            return Err(bad());
        }
        let len = u64::from_le_bytes(b[..8].try_into().map_err(|_| bad())?);
        let hash = u64::from_le_bytes(b[8..16].try_into().map_err(|_| bad())?);
        let name = std::str::from_utf8(&b[16..]).map_err(|_| bad())?;
        // A name is ours (no path separators): a damaged pointer never reads elsewhere.
        if !name.starts_with("cp-") || name.contains(['/', '\\']) || name.contains("..") {
            return Err(bad());
        }
        Ok(Staged {
            wal_pos,
            name: name.to_string(),
            len,
            hash,
        })
    }
}

/// Writes checkpoint files (cheap to clone; used off the writer thread).
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    dir: PathBuf,
    /// Test hook (`RedbStore::fail_checkpoint_after_tables`): stop after this many tables,
    /// the file left unfinished and unreferenced, as a crash mid-checkpoint would.
    pub(super) fail_after_tables: Option<usize>,
}

/// Makes every file name of this process unique, with the time: a checkpoint written by an
/// engine being torn down never shares a name with one of its successor.
static SERIAL: AtomicU64 = AtomicU64::new(0);

impl CheckpointFiles {
    pub(super) fn new(data_dir: &Path) -> Self {
        CheckpointFiles {
            dir: data_dir.join(DIR),
            fail_after_tables: None,
        }
    }

    /// Writes the tables (produced one at a time, so only one encoded table need be in
    /// memory) to a new file, fsyncs it and the directory, and says where it is.
    pub fn write(
        &self,
        wal_pos: u64,
        tables: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Result<Staged, StoreError> {
        let io = |what: &str, p: &Path, err: std::io::Error| {
            StoreError(format!("checkpoint file {}: {what}: {err}", p.display()))
        };
        std::fs::create_dir_all(&self.dir).map_err(|err| io("cannot create", &self.dir, err))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!(
            "cp-{wal_pos:020}-{nanos}-{}.bin",
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.dir.join(&name);
        let file = std::fs::File::create(&path).map_err(|err| io("cannot create", &path, err))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, super::paced::Paced::new(&file));
        let mut hash = Xxh64::new(0);
        let mut len = 0u64;
        let mut put = |out: &mut std::io::BufWriter<super::paced::Paced<'_>>, b: &[u8]| {
            hash.update(b);
            len += b.len() as u64;
            out.write_all(b)
                .map_err(|err| io("cannot write", &path, err))
        };
        put(&mut out, MAGIC)?;
        for (i, (table, blob)) in tables.into_iter().enumerate() {
            if self.fail_after_tables == Some(i) {
                return Err(StoreError("injected crash mid-checkpoint".into()));
            }
            let n = u32::try_from(table.len())
                .map_err(|_| StoreError("checkpoint table name too long".into()))?;
            put(&mut out, &n.to_le_bytes())?;
            put(&mut out, table.as_bytes())?;
            put(&mut out, &(blob.len() as u64).to_le_bytes())?;
            put(&mut out, &blob)?;
        }
        out.flush().map_err(|err| io("cannot write", &path, err))?;
        drop(out);
        file.sync_all()
            .map_err(|err| io("cannot fsync", &path, err))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|err| io("cannot fsync", &self.dir, err))?;
        Ok(Staged {
            wal_pos,
            name,
            len,
            hash: hash.digest(),
        })
    }

    /// Reads the tables of the file `staged` names, refusing a file that does not match.
    pub(super) fn read(&self, staged: &Staged) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let path = self.dir.join(&staged.name);
        let damaged = |why: &str| {
            StoreError(format!(
                "checkpoint file {} {why}; refusing to start on damaged state. See \
                 docs/operations.md, 'Aggregator store damage'.",
                path.display()
            ))
        };
        let bytes =
            std::fs::read(&path).map_err(|err| damaged(&format!("cannot be read ({err})")))?;
        if bytes.len() as u64 != staged.len {
            return Err(damaged("has the wrong length"));
        }
        if xxhash_rust::xxh64::xxh64(&bytes, 0) != staged.hash {
            return Err(damaged("fails its checksum"));
        }
        parse(&bytes).ok_or_else(|| damaged("is malformed"))
    }

    /// Deletes every checkpoint file but `keep` (best effort: a file left behind is deleted
    /// by the next call).
    pub(super) fn delete_others(&self, keep: Option<&str>) {
        for path in self.others(keep) {
            // Read only at a start: nothing has it open.
            let _ = super::paced::remove_file(&path);
        }
    }

    /// [`CheckpointFiles::delete_others`] on a thread of its own: shrinking a file a few MB
    /// at a time (`paced::remove_file`) takes ~15 ms for 48 MB, which the writer, whose
    /// commit this follows, must not wait for. Only the files there now are deleted.
    pub(super) fn delete_others_later(&self, keep: Option<&str>) {
        let paths = self.others(keep);
        if paths.is_empty() {
            return;
        }
        let job = move || {
            for path in paths {
                let _ = super::paced::remove_file(&path);
            }
        };
        // No thread to be had: the next call (or start) deletes them.
        let _ = std::thread::Builder::new()
            .name("adclick-cp-delete".into())
            .spawn(job);
    }

    /// The checkpoint files but `keep`.
    fn others(&self, keep: Option<&str>) -> Vec<std::path::PathBuf> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        dir.flatten()
            .filter(|entry| {
                let name = entry.file_name();
                name.to_str()
                    .is_some_and(|n| n.starts_with("cp-") && Some(n) != keep)
            })
            .map(|entry| entry.path())
            .collect()
    }
}

fn parse(mut b: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    b = b.strip_prefix(MAGIC.as_slice())?;
    let mut out = Vec::new();
    while !b.is_empty() {
        let (n, rest) = b.split_first_chunk::<4>()?;
        let n = usize::try_from(u32::from_le_bytes(*n)).ok()?;
        let (name, rest) = rest.split_at_checked(n)?;
        let (len, rest) = rest.split_first_chunk::<8>()?;
        let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
        let (blob, rest) = rest.split_at_checked(len)?;
        out.push((std::str::from_utf8(name).ok()?.to_string(), blob.to_vec()));
        b = rest;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Vec<(String, Vec<u8>)> {
        vec![
            ("windows".into(), vec![1, 2, 3]),
            ("shard/0".into(), Vec::new()),
            ("shard/1".into(), vec![9; 5000]),
        ]
    }

    #[test]
    fn a_file_reads_back_and_a_changed_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = CheckpointFiles::new(dir.path());
        let staged = files.write(42, tables()).unwrap();
        assert_eq!(Staged::decode(42, &staged.encode()).unwrap(), staged);
        assert_eq!(files.read(&staged).unwrap(), tables());
        let path = dir.path().join(DIR).join(&staged.name);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(
            files
                .read(&staged)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        bytes.pop();
        std::fs::write(&path, &bytes).unwrap();
        assert!(files.read(&staged).is_err());
    }

    #[test]
    fn truncated_or_garbage_files_never_panic() {
        let mut good = MAGIC.to_vec();
        good.extend_from_slice(&3u32.to_le_bytes());
        good.extend_from_slice(b"abc");
        good.extend_from_slice(&2u64.to_le_bytes());
        good.extend_from_slice(&[7, 8]);
        assert_eq!(parse(&good), Some(vec![("abc".to_string(), vec![7, 8])]));
        for cut in 0..good.len() {
            if cut != MAGIC.len() {
                assert_eq!(parse(&good[..cut]), None, "cut at {cut}");
            }
        }
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&huge), None);
        assert!(Staged::decode(1, b"short").is_err());
        let mut p = vec![0u8; 16];
        p.extend_from_slice(b"../etc/passwd");
        assert!(Staged::decode(1, &p).is_err());
    }
}
