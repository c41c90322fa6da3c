//! The exact-dedup disk tier as append-only sorted runs (LSM-style): each spill of the RAM
//! tier (`state::dedup`) writes one immutable file of entries sorted by id, and a lookup
//! checks the runs newest first through a small in-memory fence index per run (the first
//! id of every [`BLOCK`] entries) and one positioned read of one block.
//!
//! Why not B-tree inserts (the redb tables this replaces): a spill is already sorted, so
//! writing it is one sequential file write plus one fsync, where ~2M random B-tree
//! inserts into a file larger than the page cache cost ~40% of the apply time. Lookups
//! are rare: the dedup set's Bloom filter sends only its "maybe" answers here (~1% of new
//! ids, plus the true duplicates, which are mostly in the newest runs).
//!
//! Layout: `<data_dir>/dedup-runs/run-<lo>-<hi>.dat` (16 hex digits each: the spill
//! numbers the run covers; a spill is `lo == hi`, a merge covers its inputs' range).
//! A file is `MAGIC`, count, min and max `keep_until`, `count` entries of [`REC_LEN`]
//! bytes (id, `Entry::encode`) in strictly increasing id order, then the xxh64 of all
//! that. One id may be in several runs (a replay after a crash re-spills ids whose
//! entries came from its own future, see `state::dedup`): the newest run's entry is the
//! one `get` returns, as the replaced row was in the B-tree.
//!
//! Crash safety: a run is written to `*.tmp`, fsynced, renamed, and the directory
//! fsynced before `put` returns, so a spill is as durable as the redb commit was (the
//! checkpoint that follows relies on it). A start deletes `*.tmp` (an unfinished write)
//! and refuses a run whose checksum fails. A merge writes its output the same way and
//! only then deletes its inputs; a crash between leaves runs whose range lies inside
//! another's, which the next start deletes (the merged run holds all their entries).
//!
//! Expiry drops whole runs, once the newest `keep_until` of a run is before the expiry
//! point: no id is forgotten before its retention ends; some are kept a little longer
//! (up to one spill interval). Merges keep the run count at most [`MAX_RUNS`], merging
//! the two adjacent runs with the fewest entries together (adjacent: runs stay ordered
//! by time, so expiry keeps dropping old ones whole, and the newest-first order stays
//! true).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use xxhash_rust::xxh64::Xxh64;

use crate::state::dedup::{DedupError, ENTRY_LEN, Entry, Id, SpillTable, id_key};

/// Directory of the runs inside the data dir.
pub const DIR: &str = "dedup-runs";
const MAGIC: &[u8; 8] = b"ADCDRUN1";
const HEADER_LEN: usize = 8 + 8 + 8 + 8;
/// Bytes per entry in a run: id + encoded entry.
pub const REC_LEN: usize = 16 + ENTRY_LEN;
/// Entries per fenced block: one 16-byte fence per block in RAM (0.25 byte per id on
/// disk), one read of `BLOCK * REC_LEN` = 2,304 bytes per lookup and run.
pub const BLOCK: usize = 64;
/// Buffer of a sequential read or write of a run: small, so a merge or a Bloom rebuild
/// (three buffers at most) adds little to the RSS that `dedup.memory_bytes` bounds.
const IO_BUF: usize = 64 << 10;
/// At most this many runs after a spill: a Bloom "maybe" costs up to one block read per
/// run.
pub const MAX_RUNS: usize = 8;

fn err(what: &str, path: &Path, e: impl std::fmt::Display) -> DedupError {
    DedupError(format!("{what} {}: {e}", path.display()))
}

/// One immutable run.
#[derive(Debug)]
struct Run {
    lo: u64,
    hi: u64,
    path: PathBuf,
    file: File,
    count: u64,
    max_keep_until: i64,
    /// First id of every block.
    fences: Vec<Id>,
}

impl Run {
    fn name(lo: u64, hi: u64) -> String {
        format!("run-{lo:016x}-{hi:016x}.dat")
    }

    /// Parses `run-<lo>-<hi>.dat`.
    fn parse_name(name: &str) -> Option<(u64, u64)> {
        let rest = name.strip_prefix("run-")?.strip_suffix(".dat")?;
        let (lo, hi) = rest.split_once('-')?;
        Some((
            u64::from_str_radix(lo, 16).ok()?,
            u64::from_str_radix(hi, 16).ok()?,
        ))
    }

    /// Opens a run: reads it once, checking its checksum and order, building the fences.
    fn open(path: PathBuf, lo: u64, hi: u64) -> Result<Run, DedupError> {
        let file = File::open(&path).map_err(|e| err("cannot open", &path, e))?;
        let damaged = |why: &str| {
            DedupError(format!(
                "dedup run {} is damaged ({why}); refusing to start on dedup state that \
                 cannot be vouched for. See docs/operations.md, 'Aggregator store damage'",
                path.display()
            ))
        };
        let mut r = BufReader::with_capacity(IO_BUF, &file);
        let mut hasher = Xxh64::new(0);
        let mut header = [0u8; HEADER_LEN];
        r.read_exact(&mut header)
            .map_err(|_| damaged("short header"))?;
        if &header[..8] != MAGIC {
            return Err(damaged("bad magic"));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let count = word(8);
        let max_keep_until = word(24) as i64;
        let len = file
            .metadata()
            .map_err(|e| err("cannot stat", &path, e))?
            .len();
        if Some(len)
            != count
                .checked_mul(REC_LEN as u64)
                .map(|b| b + HEADER_LEN as u64 + 8)
        {
            return Err(damaged("length does not match its entry count"));
        }
        let mut fences = Vec::with_capacity((count as usize).div_ceil(BLOCK));
        let mut rec = [0u8; REC_LEN];
        let mut prev: Option<Id> = None;
        for i in 0..count {
            r.read_exact(&mut rec).map_err(|_| damaged("short read"))?;
            hasher.update(&rec);
            let mut id = [0u8; 16];
            id.copy_from_slice(&rec[..16]);
            if prev.is_some_and(|p| p >= id) {
                return Err(damaged("ids out of order"));
            }
            prev = Some(id);
            if i.is_multiple_of(BLOCK as u64) {
                fences.push(id);
            }
        }
        let mut sum = [0u8; 8];
        r.read_exact(&mut sum).map_err(|_| damaged("no checksum"))?;
        if u64::from_le_bytes(sum) != checksum(&header, hasher.digest()) {
            return Err(damaged("checksum mismatch"));
        }
        drop(r);
        Ok(Run {
            lo,
            hi,
            path,
            file,
            count,
            max_keep_until,
            fences,
        })
    }

    fn get(&self, id: &Id) -> Result<Option<Entry>, DedupError> {
        let block = self.fences.partition_point(|f| f <= id);
        if block == 0 {
            return Ok(None);
        }
        let start = (block - 1) * BLOCK;
        let n = (self.count as usize - start).min(BLOCK);
        let mut buf = [0u8; BLOCK * REC_LEN];
        let buf = &mut buf[..n * REC_LEN];
        self.file
            .read_exact_at(buf, (HEADER_LEN + start * REC_LEN) as u64)
            .map_err(|e| err("cannot read", &self.path, e))?;
        let (mut a, mut b) = (0, n);
        while a < b {
            let m = (a + b) / 2;
            let rec = &buf[m * REC_LEN..(m + 1) * REC_LEN];
            match rec[..16].cmp(id.as_slice()) {
                std::cmp::Ordering::Less => a = m + 1,
                std::cmp::Ordering::Greater => b = m,
                std::cmp::Ordering::Equal => {
                    let mut e = [0u8; ENTRY_LEN];
                    e.copy_from_slice(&rec[16..]);
                    return Ok(Some(Entry::decode(&e)));
                }
            }
        }
        Ok(None)
    }

    /// Streams the run's records in id order.
    fn reader(&self) -> Result<RunReader<'_>, DedupError> {
        let mut r = BufReader::with_capacity(IO_BUF, &self.file);
        std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(HEADER_LEN as u64))
            .map_err(|e| err("cannot read", &self.path, e))?;
        Ok(RunReader {
            r,
            left: self.count,
            path: &self.path,
        })
    }
}

struct RunReader<'a> {
    r: BufReader<&'a File>,
    left: u64,
    path: &'a Path,
}

impl RunReader<'_> {
    fn next(&mut self) -> Result<Option<[u8; REC_LEN]>, DedupError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let mut rec = [0u8; REC_LEN];
        self.r
            .read_exact(&mut rec)
            .map_err(|e| err("cannot read", self.path, e))?;
        Ok(Some(rec))
    }
}

/// Writes one run from records in strictly increasing id order (durably, see the module
/// doc) and opens it.
struct RunWriter {
    tmp: PathBuf,
    file: File,
    /// Records not yet written: hashed and written [`IO_BUF`] bytes at a time (the
    /// checksum is the same whatever the chunking; per-record hashing cost more).
    buf: Vec<u8>,
    /// Syncs the file's data every few MB (see `store::paced`).
    pacer: super::paced::Pacer,
    hasher: Xxh64,
    count: u64,
    min_keep_until: i64,
    max_keep_until: i64,
    fences: Vec<Id>,
}

impl RunWriter {
    fn create(dir: &Path, lo: u64, hi: u64) -> Result<RunWriter, DedupError> {
        let tmp = dir.join(format!("{}.tmp", Run::name(lo, hi)));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| err("cannot create", &tmp, e))?;
        // The header is rewritten with the real figures at the end.
        file.write_all(&[0u8; HEADER_LEN])
            .map_err(|e| err("cannot write", &tmp, e))?;
        Ok(RunWriter {
            tmp,
            file,
            buf: Vec::with_capacity(IO_BUF),
            pacer: super::paced::Pacer::default(),
            hasher: Xxh64::new(0),
            count: 0,
            min_keep_until: i64::MAX,
            max_keep_until: i64::MIN,
            fences: Vec::new(),
        })
    }

    fn push(&mut self, rec: &[u8; REC_LEN]) -> Result<(), DedupError> {
        if self.count.is_multiple_of(BLOCK as u64) {
            let mut id = [0u8; 16];
            id.copy_from_slice(&rec[..16]);
            self.fences.push(id);
        }
        let mut k = [0u8; 8];
        k.copy_from_slice(&rec[16..24]);
        let keep_until = i64::from_le_bytes(k);
        self.min_keep_until = self.min_keep_until.min(keep_until);
        self.max_keep_until = self.max_keep_until.max(keep_until);
        self.count += 1;
        self.buf.extend_from_slice(rec);
        if self.buf.len() + REC_LEN > IO_BUF {
            self.drain()?;
        }
        Ok(())
    }

    /// Hashes and writes the buffered records.
    fn drain(&mut self) -> Result<(), DedupError> {
        self.hasher.update(&self.buf);
        self.pacer
            .write_all(&self.file, &self.buf)
            .map_err(|e| err("cannot write", &self.tmp, e))?;
        self.buf.clear();
        Ok(())
    }

    fn finish(mut self, dir: &Path, lo: u64, hi: u64) -> Result<Run, DedupError> {
        self.drain()?;
        let RunWriter {
            tmp,
            mut file,
            buf: _,
            pacer: _,
            hasher: body,
            count,
            min_keep_until,
            max_keep_until,
            fences,
        } = self;
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&count.to_le_bytes());
        header[16..24].copy_from_slice(&min_keep_until.to_le_bytes());
        header[24..].copy_from_slice(&max_keep_until.to_le_bytes());
        let sum = checksum(&header, body.digest());
        file.write_all(&sum.to_le_bytes())
            .map_err(|e| err("cannot write", &tmp, e))?;
        file.write_all_at(&header, 0)
            .map_err(|e| err("cannot write", &tmp, e))?;
        file.sync_all().map_err(|e| err("cannot fsync", &tmp, e))?;
        let path = dir.join(Run::name(lo, hi));
        std::fs::rename(&tmp, &path).map_err(|e| err("cannot rename", &tmp, e))?;
        sync_dir(dir)?;
        let file = File::open(&path).map_err(|e| err("cannot open", &path, e))?;
        Ok(Run {
            lo,
            hi,
            path,
            file,
            count,
            max_keep_until,
            fences,
        })
    }
}

/// The stored checksum: xxh64 of the header, seeded with the xxh64 of the records (so the
/// writer hashes the records as it streams them, before the header is known).
fn checksum(header: &[u8; HEADER_LEN], body: u64) -> u64 {
    xxhash_rust::xxh64::xxh64(header, body)
}

fn sync_dir(dir: &Path) -> Result<(), DedupError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err("cannot fsync", dir, e))
}

/// See the module doc.
#[derive(Debug)]
pub struct RunDedup {
    dir: PathBuf,
    /// Oldest first. Lookups read it (the writer thread); a write (the spill thread)
    /// builds its file outside the lock and takes the lock only to swap the list.
    runs: RwLock<Vec<Arc<Run>>>,
    /// Serialises writes (put with its merges, expiry); holds the next spill number.
    write: Mutex<u64>,
    /// Runs merged so far (a metric for tests and benches).
    merges: AtomicU64,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl RunDedup {
    /// Opens (or creates) the runs in `dir`: deletes unfinished writes and runs a finished
    /// merge made redundant, checks every run.
    pub fn open(dir: &Path) -> Result<RunDedup, DedupError> {
        std::fs::create_dir_all(dir).map_err(|e| err("cannot create", dir, e))?;
        let mut found: Vec<(u64, u64, PathBuf)> = Vec::new();
        for ent in std::fs::read_dir(dir).map_err(|e| err("cannot list", dir, e))? {
            let ent = ent.map_err(|e| err("cannot list", dir, e))?;
            let path = ent.path();
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                std::fs::remove_file(&path).map_err(|e| err("cannot remove", &path, e))?;
            } else if let Some((lo, hi)) = Run::parse_name(&name) {
                found.push((lo, hi, path));
            }
        }
        // Widest first within a start, so a merged run comes before the inputs it covers.
        found.sort_by_key(|&(lo, hi, _)| (lo, std::cmp::Reverse(hi)));
        let mut runs: Vec<Arc<Run>> = Vec::new();
        let mut covered_to: Option<u64> = None;
        for (lo, hi, path) in found {
            if covered_to.is_some_and(|c| hi <= c) {
                // The input of a merge whose output is durable: its entries are there.
                std::fs::remove_file(&path).map_err(|e| err("cannot remove", &path, e))?;
                continue;
            }
            covered_to = Some(hi);
            runs.push(Arc::new(Run::open(path, lo, hi)?));
        }
        let next = runs.last().map_or(0, |r| r.hi + 1);
        Ok(RunDedup {
            dir: dir.to_path_buf(),
            runs: RwLock::new(runs),
            write: Mutex::new(next),
            merges: AtomicU64::new(0),
        })
    }

    /// Runs held.
    pub fn runs(&self) -> usize {
        read(&self.runs).len()
    }

    /// Runs merged since open.
    pub fn merges(&self) -> u64 {
        self.merges.load(Ordering::Relaxed)
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, u64> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Merges runs `i` and `i + 1` (adjacent, `i` the older) into one. The caller holds
    /// the write lock, so the list changes under no one else.
    fn merge(&self, i: usize) -> Result<(), DedupError> {
        let (old, new) = {
            let runs = read(&self.runs);
            (runs[i].clone(), runs[i + 1].clone())
        };
        let (lo, hi) = (old.lo, new.hi);
        let merged = {
            let mut w = RunWriter::create(&self.dir, lo, hi)?;
            let (mut a, mut b) = (old.reader()?, new.reader()?);
            let (mut x, mut y) = (a.next()?, b.next()?);
            loop {
                match (x, y) {
                    (Some(ra), Some(rb)) => match id_key(&ra).cmp(&id_key(&rb)) {
                        std::cmp::Ordering::Less => {
                            w.push(&ra)?;
                            x = a.next()?;
                        }
                        std::cmp::Ordering::Greater => {
                            w.push(&rb)?;
                            y = b.next()?;
                        }
                        std::cmp::Ordering::Equal => {
                            // The newer run's entry replaces the older one.
                            w.push(&rb)?;
                            x = a.next()?;
                            y = b.next()?;
                        }
                    },
                    (Some(ra), None) => {
                        w.push(&ra)?;
                        x = a.next()?;
                    }
                    (None, Some(rb)) => {
                        w.push(&rb)?;
                        y = b.next()?;
                    }
                    (None, None) => break,
                }
            }
            w.finish(&self.dir, lo, hi)?
        };
        // The merged run is durable: its inputs can go (a crash before this is handled at
        // open, see the module doc). A lookup holding an input keeps reading its open file.
        {
            let mut runs = write(&self.runs);
            runs.remove(i + 1);
            runs[i] = Arc::new(merged);
        }
        for r in [old, new] {
            std::fs::remove_file(&r.path).map_err(|e| err("cannot remove", &r.path, e))?;
        }
        self.merges.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl SpillTable for RunDedup {
    fn get(&self, id: &Id) -> Result<Option<Entry>, DedupError> {
        for run in read(&self.runs).iter().rev() {
            if let Some(e) = run.get(id)? {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    fn put(&self, entries: &[(Id, Entry)]) -> Result<(), DedupError> {
        if entries.is_empty() {
            return Ok(());
        }
        let sorted = entries
            .windows(2)
            .all(|w| id_key(&w[0].0) < id_key(&w[1].0));
        let mut owned;
        let entries = if sorted {
            entries
        } else {
            // Later entries of one id replace earlier ones, as in the B-tree.
            owned = entries.to_vec();
            owned.reverse();
            owned.sort_by_key(|e| id_key(&e.0));
            owned.dedup_by_key(|e| e.0);
            &owned[..]
        };
        let mut next = self.lock_writes();
        let seq = *next;
        let mut w = RunWriter::create(&self.dir, seq, seq)?;
        let mut rec = [0u8; REC_LEN];
        for (id, e) in entries {
            rec[..16].copy_from_slice(id);
            rec[16..].copy_from_slice(&e.encode());
            w.push(&rec)?;
        }
        let run = Arc::new(w.finish(&self.dir, seq, seq)?);
        write(&self.runs).push(run);
        *next = seq + 1;
        loop {
            let i = {
                let runs = read(&self.runs);
                if runs.len() <= MAX_RUNS {
                    break;
                }
                (0..runs.len() - 1)
                    .min_by_key(|&i| runs[i].count + runs[i + 1].count)
                    .unwrap_or(0)
            };
            self.merge(i)?;
        }
        Ok(())
    }

    fn expire(&self, before: i64) -> Result<u64, DedupError> {
        let _w = self.lock_writes();
        let old: Vec<Arc<Run>> = read(&self.runs)
            .iter()
            .filter(|r| r.max_keep_until < before)
            .cloned()
            .collect();
        let mut gone = 0;
        for run in old {
            // Removed from the list only once the file is gone: on an error the run is
            // still on disk, still true, and still listed.
            std::fs::remove_file(&run.path).map_err(|e| err("cannot remove", &run.path, e))?;
            write(&self.runs).retain(|r| !Arc::ptr_eq(r, &run));
            gone += run.count;
        }
        Ok(gone)
    }

    fn for_each_id(&self, f: &mut dyn FnMut(&Id)) -> Result<(), DedupError> {
        let runs: Vec<Arc<Run>> = read(&self.runs).clone();
        for run in &runs {
            let mut r = run.reader()?;
            let mut id = [0u8; 16];
            while let Some(rec) = r.next()? {
                id.copy_from_slice(&rec[..16]);
                f(&id);
            }
        }
        Ok(())
    }

    fn len(&self) -> Result<u64, DedupError> {
        Ok(read(&self.runs).iter().map(|r| r.count).sum())
    }

    fn ram_bytes(&self) -> usize {
        read(&self.runs)
            .iter()
            .map(|r| r.fences.capacity() * 16 + std::mem::size_of::<Run>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::dedup::{MemTable, Ordinal};

    fn id(n: u64) -> Id {
        let mut x = [0u8; 16];
        x[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
        x[8..].copy_from_slice(&n.to_le_bytes());
        x
    }

    fn entry(keep_until: i64, pos: u64) -> Entry {
        Entry {
            keep_until,
            ordinal: Ordinal { pos, idx: 0 },
        }
    }

    fn sorted(mut v: Vec<(Id, Entry)>) -> Vec<(Id, Entry)> {
        v.sort_by_key(|e| e.0);
        v
    }

    /// Against the in-memory table (the B-tree's semantics) as oracle: spills of varying
    /// sizes, overwrites, merges past MAX_RUNS, expiry, and a reopen.
    #[test]
    fn matches_the_in_memory_table_through_merges_expiry_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let runs = RunDedup::open(dir.path()).unwrap();
        let oracle = MemTable::default();
        // splitmix64: deterministic, no dependency.
        let mut state = 7u64;
        let mut next = move |n: u64| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % n
        };
        for spill in 0..(3 * MAX_RUNS as u64) {
            let n = 1 + next(399);
            let batch: Vec<(Id, Entry)> = (0..n)
                .map(|_| {
                    let k = next(3000);
                    // keep_until grows with the spill: expiry by time drops old runs whole.
                    (id(k), entry(spill as i64 * 10 + next(10) as i64, spill))
                })
                .collect::<std::collections::HashMap<_, _>>()
                .into_iter()
                .collect();
            let batch = sorted(batch);
            runs.put(&batch).unwrap();
            oracle.put(&batch).unwrap();
            assert!(runs.runs() <= MAX_RUNS);
        }
        assert!(runs.merges() > 0);
        let check = |runs: &RunDedup, oracle: &MemTable| {
            for k in 0..3100 {
                assert_eq!(
                    runs.get(&id(k)).unwrap(),
                    oracle.get(&id(k)).unwrap(),
                    "id {k}"
                );
            }
        };
        check(&runs, &oracle);
        drop(runs);
        let runs = RunDedup::open(dir.path()).unwrap();
        check(&runs, &oracle);

        // Expiry drops whole runs: never an id whose keep_until is at or after `before`.
        let before = 100;
        runs.expire(before).unwrap();
        for k in 0..3000 {
            if let Some(e) = oracle.get(&id(k)).unwrap()
                && e.keep_until >= before
            {
                assert_eq!(runs.get(&id(k)).unwrap(), Some(e), "id {k} forgotten early");
            }
        }
        let mut ids = 0;
        runs.for_each_id(&mut |_| ids += 1).unwrap();
        assert_eq!(ids, runs.len().unwrap());
    }

    #[test]
    fn a_crash_mid_write_or_mid_merge_reopens_to_the_same_answers() {
        let dir = tempfile::tempdir().unwrap();
        let runs = RunDedup::open(dir.path()).unwrap();
        let a = sorted((0..100).map(|k| (id(k), entry(1, 1))).collect());
        let b = sorted((50..150).map(|k| (id(k), entry(2, 2))).collect());
        runs.put(&a).unwrap();
        runs.put(&b).unwrap();
        // A merge whose output is durable but whose inputs were not deleted yet (copied
        // back), and an unfinished write.
        let paths: Vec<PathBuf> = read(&runs.runs).iter().map(|r| r.path.clone()).collect();
        let saved: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
        runs.merge(0).unwrap();
        for (p, bytes) in paths.iter().zip(&saved) {
            std::fs::write(p, bytes).unwrap();
        }
        std::fs::write(
            dir.path()
                .join("run-0000000000000009-0000000000000009.dat.tmp"),
            b"x",
        )
        .unwrap();
        drop(runs);
        let runs = RunDedup::open(dir.path()).unwrap();
        assert_eq!(runs.runs(), 1, "the merge's inputs are gone");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        for k in 0..150 {
            let want = if k < 50 { entry(1, 1) } else { entry(2, 2) };
            assert_eq!(runs.get(&id(k)).unwrap(), Some(want));
        }
        assert_eq!(runs.get(&id(150)).unwrap(), None);
    }

    #[test]
    fn a_damaged_run_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let runs = RunDedup::open(dir.path()).unwrap();
        runs.put(&sorted((0..10).map(|k| (id(k), entry(1, 1))).collect()))
            .unwrap();
        let path = read(&runs.runs)[0].path.clone();
        drop(runs);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + 20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = RunDedup::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("run-"), "{e}");
    }
}
