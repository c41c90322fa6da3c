//! Small metadata files in the spool directory: the incarnation id, the ack
//! file, the directory lock, and the fsync/atomic-write helpers they need.
//!
//! Everything here is tiny and CRC-protected so that a torn write or a
//! damaged sector is detected, and everything is kept twice: the ack in two
//! slots, the incarnation in its own file and as a copy in the ack file.
//! This module must not touch segment files, and it must never silently
//! replace a damaged value with a default: it reports what it found and
//! [`super::Spool::open`] decides the repair (a wrong ack could reuse seqs, a
//! wrong incarnation could double-count clicks).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::{SpoolError, io_err};

/// Name of the file holding the incarnation id.
pub(crate) const INCARNATION_FILE: &str = "incarnation";
/// Name of the file holding the acked seq.
pub(crate) const ACK_FILE: &str = "ack";
/// Name of the lock file guarding against two processes on one directory.
const LOCK_FILE: &str = "lock";
/// Suffix of files being written by [`atomic_write`]; leftovers are garbage.
const TMP_SUFFIX: &str = ".tmp";

/// The two ack slots sit in different 512-byte sectors so that a torn write
/// of one (the only slot being written) cannot damage the other.
const ACK_SLOT_OFFSETS: [u64; 2] = [0, 512];
/// One slot: seq u64 LE + crc32(seq) u32 LE.
const ACK_SLOT_LEN: usize = 12;
/// Copy of the incarnation id, in a third sector, written with the ack file
/// at initialisation (and on repair), never in place afterwards.
const INCARNATION_COPY_OFFSET: u64 = 1024;
const ACK_FILE_LEN: usize = INCARNATION_COPY_OFFSET as usize + ACK_SLOT_LEN;

/// fsyncs a directory so that creations, renames and deletions in it are
/// durable. Only meaningful (and only possible) on Unix.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", dir))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Writes `bytes` as `dir/name` so that readers see either nothing or the
/// whole file: temp file, fsync, rename, fsync the directory.
fn atomic_write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SpoolError> {
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, &dst).map_err(io_err("rename", &dst))?;
    sync_dir(dir)
}

/// Removes leftovers of interrupted [`atomic_write`]s. Only our own names
/// are touched, never foreign files someone put in the directory.
pub(crate) fn remove_tmp_files(dir: &Path) -> Result<(), SpoolError> {
    for name in [INCARNATION_FILE, ACK_FILE] {
        let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &tmp)(e)),
        }
    }
    Ok(())
}

/// Takes an exclusive advisory lock on the directory; the returned file must
/// be kept open for as long as the spool is. Two writers on one spool would
/// interleave seqs and corrupt it.
pub(crate) fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => {
            Err(io_err("lock (spool in use by another owner)", &path)(
                io::Error::from(io::ErrorKind::WouldBlock),
            ))
        }
        Err(fs::TryLockError::Error(e)) => Err(io_err("lock", &path)(e)),
    }
}

/// A fresh random id. Not cryptographic: it only has to differ between two
/// directories created on the same host, and `RandomState` is seeded from
/// the OS per process; time and pid are mixed in for good measure.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish()
}

/// Encodes a u64 followed by its CRC (the format of the incarnation file and
/// of one ack slot).
fn encode_u64_crc(v: u64) -> [u8; ACK_SLOT_LEN] {
    let mut out = [0u8; ACK_SLOT_LEN];
    let bytes = v.to_le_bytes();
    out[..8].copy_from_slice(&bytes);
    out[8..].copy_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    out
}

/// Decodes what [`encode_u64_crc`] wrote; `None` if short or the CRC fails.
fn decode_u64_crc(b: &[u8]) -> Option<u64> {
    let b = b.get(..ACK_SLOT_LEN)?;
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[..8]);
    let crc = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    (crc32fast::hash(&v) == crc).then_some(u64::from_le_bytes(v))
}

/// Reads a whole small metadata file; `None` if it does not exist.
fn read_small(path: &Path) -> Result<Option<Vec<u8>>, SpoolError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let mut buf = Vec::new();
    // Bounded: a huge file here is corrupt anyway, no need to read it all.
    f.take(4096)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    Ok(Some(buf))
}

/// Size of the ack file written by spool format 1 (16-byte record headers, no `synced`
/// watermark, no incarnation copy): such a directory must be drained by the adclick that
/// wrote it, since its records do not parse as format 2.
const FORMAT1_ACK_FILE_LEN: u64 = 512 + ACK_SLOT_LEN as u64;

/// Refuses a spool directory written by spool format 1 (see [`FORMAT1_ACK_FILE_LEN`]).
pub(crate) fn refuse_old_format(dir: &Path) -> Result<(), SpoolError> {
    let path = dir.join(ACK_FILE);
    match fs::metadata(&path) {
        Ok(m) if m.len() == FORMAT1_ACK_FILE_LEN => Err(SpoolError::Corrupt(format!(
            "{} was written by an older adclick (spool format 1): drain it with that version \
             (start it with the aggregator reachable until adclick_collector_forward_lag_records \
             is 0), then start this version",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// What the incarnation file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Incarnation {
    /// No file: the directory was never initialised (or the file was lost).
    Missing,
    /// A valid id.
    Valid(u64),
    /// A file whose checksum or size is wrong.
    Damaged,
}

/// Reads the incarnation file.
pub(crate) fn read_incarnation(dir: &Path) -> Result<Incarnation, SpoolError> {
    let path = dir.join(INCARNATION_FILE);
    Ok(match read_small(&path)? {
        None => Incarnation::Missing,
        Some(b) if b.len() == ACK_SLOT_LEN => {
            decode_u64_crc(&b).map_or(Incarnation::Damaged, Incarnation::Valid)
        }
        Some(_) => Incarnation::Damaged,
    })
}

/// Writes the incarnation file (atomically), e.g. to restore it from the
/// copy in the ack file.
pub(crate) fn write_incarnation(dir: &Path, incarnation: u64) -> Result<(), SpoolError> {
    atomic_write(dir, INCARNATION_FILE, &encode_u64_crc(incarnation))
}

/// The whole ack file for `acked` and `incarnation`.
fn ack_file_bytes(acked: u64, incarnation: u64) -> Vec<u8> {
    let mut ack = vec![0u8; ACK_FILE_LEN];
    for off in ACK_SLOT_OFFSETS {
        let off = off as usize;
        ack[off..off + ACK_SLOT_LEN].copy_from_slice(&encode_u64_crc(acked));
    }
    let off = INCARNATION_COPY_OFFSET as usize;
    ack[off..off + ACK_SLOT_LEN].copy_from_slice(&encode_u64_crc(incarnation));
    ack
}

/// Initialises a fresh directory: an ack file at 0 (with the incarnation
/// copy), then the incarnation. The incarnation's rename is the commit
/// point, so a crash in between just leaves a directory that is initialised
/// again on the next open.
pub(crate) fn initialise(dir: &Path) -> Result<u64, SpoolError> {
    let incarnation = random_u64();
    atomic_write(dir, ACK_FILE, &ack_file_bytes(0, incarnation))?;
    write_incarnation(dir, incarnation)?;
    Ok(incarnation)
}

/// A new random incarnation id, for the repairs that need one.
pub(crate) fn new_incarnation() -> u64 {
    random_u64()
}

/// What [`AckFile::open`] found in the ack file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckState {
    /// The acked seq, `None` if both slots are damaged (or the file is gone).
    pub(crate) value: Option<u64>,
    /// Slots that failed their checksum (0, 1 or 2).
    pub(crate) damaged_slots: u8,
    /// The incarnation copy, `None` if damaged or absent.
    pub(crate) incarnation: Option<u64>,
}

/// Decodes an ack file's bytes; also returns the slot to write next.
fn decode_ack_file(buf: &[u8]) -> (AckState, usize) {
    let slots = ACK_SLOT_OFFSETS.map(|off| buf.get(off as usize..).and_then(decode_u64_crc));
    let damaged_slots = slots.iter().filter(|s| s.is_none()).count() as u8;
    let (value, next_slot) = match slots {
        [Some(a), Some(b)] if b > a => (Some(b), 0),
        [Some(a), _] => (Some(a), 1),
        [None, Some(b)] => (Some(b), 0),
        [None, None] => (None, 0),
    };
    let incarnation = buf
        .get(INCARNATION_COPY_OFFSET as usize..)
        .and_then(decode_u64_crc);
    let state = AckState {
        value,
        damaged_slots,
        incarnation,
    };
    (state, next_slot)
}

/// Reads the ack file without opening it for writing (for `verify`);
/// `None` if it does not exist.
pub(crate) fn read_ack_state(dir: &Path) -> Result<Option<AckState>, SpoolError> {
    Ok(read_small(&dir.join(ACK_FILE))?.map(|b| decode_ack_file(&b).0))
}

/// The persisted acked seq, kept in two CRC'd slots written alternately in
/// place: an update is one write + one fdatasync (no rename, no directory
/// fsync), and a torn write only ever damages the slot being written while
/// the other still holds the previous value.
#[derive(Debug)]
pub(crate) struct AckFile {
    file: File,
    path: std::path::PathBuf,
    value: u64,
    /// Slot to write next: never the one holding the current value.
    next_slot: usize,
}

impl AckFile {
    /// Opens the ack file of an initialised directory and takes the highest
    /// valid slot. Damage is reported in [`AckState`], not refused: the
    /// caller repairs with [`AckFile::rewrite`]. A missing file is created
    /// empty (and reported as both slots damaged).
    pub(crate) fn open(dir: &Path) -> Result<(AckFile, AckState), SpoolError> {
        let path = dir.join(ACK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let mut buf = Vec::with_capacity(ACK_FILE_LEN);
        (&mut file)
            .take(ACK_FILE_LEN as u64)
            .read_to_end(&mut buf)
            .map_err(io_err("read", &path))?;
        let (state, next_slot) = decode_ack_file(&buf);
        let value = state.value;
        let ack = AckFile {
            file,
            path,
            value: value.unwrap_or(0),
            next_slot,
        };
        Ok((ack, state))
    }

    /// Rewrites the whole file (both slots and the incarnation copy) and
    /// fsyncs it: the repair for damaged slots or copy.
    pub(crate) fn rewrite(&mut self, acked: u64, incarnation: u64) -> Result<(), SpoolError> {
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(io_err("seek", &self.path))?;
        self.file
            .write_all(&ack_file_bytes(acked, incarnation))
            .map_err(io_err("write", &self.path))?;
        self.file.sync_all().map_err(io_err("fsync", &self.path))?;
        self.value = acked;
        self.next_slot = 0;
        Ok(())
    }

    /// The last durably stored acked seq.
    pub(crate) fn value(&self) -> u64 {
        self.value
    }

    /// Durably stores `seq`. On error the in-memory value is unchanged and
    /// the same slot is written next time, so the other slot keeps the last
    /// good value whatever state the failed write left behind.
    pub(crate) fn store(&mut self, seq: u64) -> Result<(), SpoolError> {
        self.file
            .seek(SeekFrom::Start(ACK_SLOT_OFFSETS[self.next_slot]))
            .map_err(io_err("seek", &self.path))?;
        self.file
            .write_all(&encode_u64_crc(seq))
            .map_err(io_err("write", &self.path))?;
        self.file.sync_data().map_err(io_err("fsync", &self.path))?;
        self.value = seq;
        self.next_slot ^= 1;
        Ok(())
    }
}

/// The value in the ack slot at `offset` of an ack file's bytes (0 if damaged); for tests
/// that damage the newer slot.
#[cfg(test)]
pub(crate) fn tests_decode_slot(ack_file: &[u8], offset: usize) -> u64 {
    ack_file.get(offset..).and_then(decode_u64_crc).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_ack_slot_keeps_previous_value() {
        let dir = tempfile::tempdir().unwrap();
        initialise(dir.path()).unwrap();
        let (mut ack, _) = AckFile::open(dir.path()).unwrap();
        ack.store(5).unwrap();
        ack.store(9).unwrap();
        let written = ack.next_slot ^ 1; // slot holding 9
        drop(ack);
        // Tear the newest slot: the older value must win.
        let mut bytes = fs::read(dir.path().join(ACK_FILE)).unwrap();
        bytes[ACK_SLOT_OFFSETS[written] as usize + 3] ^= 0xff;
        fs::write(dir.path().join(ACK_FILE), &bytes).unwrap();
        let (ack, state) = AckFile::open(dir.path()).unwrap();
        assert_eq!(ack.value(), 5);
        assert_eq!(state.damaged_slots, 1);
        // Both slots torn: reported as unknown, never guessed.
        bytes[ACK_SLOT_OFFSETS[written ^ 1] as usize] ^= 0xff;
        fs::write(dir.path().join(ACK_FILE), &bytes).unwrap();
        let (_, state) = AckFile::open(dir.path()).unwrap();
        assert_eq!(state.value, None);
        assert_eq!(state.damaged_slots, 2);
        assert!(state.incarnation.is_some());
    }

    #[test]
    fn ack_store_alternates_slots() {
        let dir = tempfile::tempdir().unwrap();
        initialise(dir.path()).unwrap();
        let (mut ack, _) = AckFile::open(dir.path()).unwrap();
        for v in 1..=5 {
            ack.store(v).unwrap();
            assert_eq!(AckFile::open(dir.path()).unwrap().0.value(), v);
        }
    }
}
