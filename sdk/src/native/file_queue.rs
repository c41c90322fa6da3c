//! File-backed offline queue for mobile apps and servers: unsent clicks survive a process
//! restart and go out later with their original `occurred_at`.
//!
//! Layout: `<dir>/clicks.log`, an append-only log of records
//! `len: u32 LE | crc32(kind ++ body): u32 LE | kind: u8 | body`, where kind 1 is a click
//! (`seq: u64 LE` + protobuf `Click`) and kind 2 a removal (`seq: u64 LE` repeated).
//! Opening replays the log and keeps every complete, CRC-correct record: a torn or corrupt
//! tail is truncated, and damage in the middle (a bad sector, a flipped bit) is skipped by
//! resynchronising at the next valid record, so it costs only the records it touches; the
//! log is then rewritten without it and [`FileQueue::damaged_bytes`] says how much was lost. The log is rewritten (temp file, fsync, rename) when mostly dead, and emptied
//! when the queue drains. `<dir>/lock` is held with an OS file lock so two processes
//! never share a queue.
//!
//! Writes reach the OS on every append (they survive the app being killed); `fsync` on
//! every append is opt-in ([`FileQueue::with_fsync`]) for power-loss durability.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use adclick_proto::v1;
use prost::Message;

use crate::core::{OfflineQueue, QueueError, StoredClick};

const KIND_CLICK: u8 = 1;
const KIND_REMOVE: u8 = 2;
const HEADER: usize = 8;
/// Larger records cannot be ours: treat as corruption.
const MAX_RECORD: usize = 1 << 20;
/// Rewrite the log once this many records are dead and they outnumber the live ones.
const COMPACT_MIN_DEAD: usize = 4096;

/// See the module doc.
#[derive(Debug)]
pub struct FileQueue {
    dir: PathBuf,
    log: File,
    _lock: File,
    fsync: bool,
    /// Live click records, encoded, by seq (needed to rewrite the log).
    live: BTreeMap<u64, Vec<u8>>,
    dead: usize,
    loaded: Option<Vec<StoredClick>>,
    damaged_bytes: u64,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> QueueError {
    QueueError::Io(format!("{what} {}: {e}", path.display()))
}

fn record(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    crc.update(body);
    let len = u32::try_from(body.len() + 1).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER + 1 + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out
}

/// The valid record (kind, body) at `pos` with its total length, if there is one.
fn record_at(buf: &[u8], pos: usize) -> Option<((u8, &[u8]), usize)> {
    let head = buf.get(pos..pos.checked_add(HEADER)?)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let data = buf.get(pos + HEADER..(pos + HEADER).checked_add(len)?)?;
    (crc32fast::hash(data) == crc).then_some(((data[0], &data[1..]), HEADER + len))
}

/// What [`parse`] found in a log.
#[derive(Debug, Default)]
struct Parsed<'a> {
    /// Every valid record, in file order.
    records: Vec<(u8, &'a [u8])>,
    /// Byte ranges that failed their checks but have valid records after them: damage
    /// (a torn write only ever leaves a tail).
    damaged: Vec<(usize, usize)>,
    /// End of the last valid record; what follows is a torn or corrupt tail.
    end: usize,
}

/// Parses every valid record of `buf`. Where a record fails its checks, it resynchronises
/// at the next offset holding a valid record of a known kind, so that one damaged byte in
/// the middle costs only the record it is in, never every click queued after it.
fn parse(buf: &[u8]) -> Parsed<'_> {
    let mut out = Parsed::default();
    let mut pos = 0;
    while pos < buf.len() {
        if let Some((rec, len)) = record_at(buf, pos) {
            out.records.push(rec);
            pos += len;
            out.end = pos;
            continue;
        }
        // The kind byte is checked first: it rules out most offsets before any CRC.
        let next = (pos + 1..buf.len()).find_map(|p| {
            if !matches!(buf.get(p + HEADER), Some(&KIND_CLICK | &KIND_REMOVE)) {
                return None;
            }
            record_at(buf, p).map(|(rec, len)| (p, rec, len))
        });
        let Some((p, rec, len)) = next else {
            break;
        };
        out.damaged.push((pos, p));
        out.records.push(rec);
        pos = p + len;
        out.end = pos;
    }
    out
}

impl FileQueue {
    /// Opens (creating if needed) the queue in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, QueueError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| io("cannot create", &dir, e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("cannot open", &lock_path, e))?;
        lock.try_lock()
            .map_err(|_| QueueError::Locked(dir.display().to_string()))?;

        let path = dir.join("clicks.log");
        let mut log = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| io("cannot open", &path, e))?;
        let mut buf = Vec::new();
        log.read_to_end(&mut buf)
            .map_err(|e| io("cannot read", &path, e))?;
        let parsed = parse(&buf);
        let damaged_bytes: usize = parsed.damaged.iter().map(|(a, b)| b - a).sum();
        let valid = parsed.end;
        let records = parsed.records;

        let mut live = BTreeMap::new();
        let mut dead = 0;
        for (kind, body) in records {
            match kind {
                KIND_CLICK if body.len() >= 8 => {
                    let mut seq = [0u8; 8];
                    seq.copy_from_slice(&body[..8]);
                    live.insert(u64::from_le_bytes(seq), record(kind, body));
                }
                KIND_REMOVE => {
                    dead += 1;
                    for chunk in body.chunks_exact(8) {
                        let mut seq = [0u8; 8];
                        seq.copy_from_slice(chunk);
                        if live.remove(&u64::from_le_bytes(seq)).is_some() {
                            dead += 1;
                        }
                    }
                }
                // A record with a good CRC but an unknown kind comes from a newer SDK:
                // skip it rather than discard the rest.
                _ => dead += 1,
            }
        }
        // Damage in the middle is handled by rewriting the log from the valid records
        // (below), so the bad bytes are not met again. A removal lost to damage only makes
        // its clicks come back and be sent again: the collector deduplicates them.
        if damaged_bytes == 0 && valid < buf.len() {
            // Torn or corrupt tail: keep every complete record, drop the rest.
            log.set_len(valid as u64)
                .map_err(|e| io("cannot truncate", &path, e))?;
            log.sync_all().map_err(|e| io("cannot sync", &path, e))?;
        }
        let mut loaded = Vec::with_capacity(live.len());
        let mut undecodable = Vec::new();
        for (seq, rec) in &live {
            match v1::Click::decode(&rec[HEADER + 1 + 8..]) {
                Ok(click) => loaded.push(StoredClick { seq: *seq, click }),
                Err(_) => undecodable.push(*seq),
            }
        }
        for seq in undecodable {
            live.remove(&seq);
            dead += 1;
        }
        let mut q = FileQueue {
            dir,
            log,
            _lock: lock,
            fsync: false,
            live,
            dead,
            loaded: Some(loaded),
            damaged_bytes: damaged_bytes as u64,
        };
        if damaged_bytes > 0 {
            q.rewrite()?;
        } else {
            q.maybe_compact()?;
        }
        Ok(q)
    }

    /// Bytes of damage found in the middle of the log at open (skipped; the records after
    /// them were kept and the log rewritten). Non-zero means some queued clicks were lost
    /// to disk damage: worth reporting.
    pub fn damaged_bytes(&self) -> u64 {
        self.damaged_bytes
    }

    /// Also fsync after every append and removal (power-loss durability; slower).
    pub fn with_fsync(mut self, on: bool) -> Self {
        self.fsync = on;
        self
    }

    /// Clicks currently stored.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("clicks.log")
    }

    fn write(&mut self, rec: &[u8]) -> Result<(), QueueError> {
        let path = self.log_path();
        self.log
            .write_all(rec)
            .map_err(|e| io("cannot write", &path, e))?;
        if self.fsync {
            self.log
                .sync_data()
                .map_err(|e| io("cannot sync", &path, e))?;
        }
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), QueueError> {
        let path = self.log_path();
        if self.live.is_empty() && self.dead > 0 {
            self.log
                .set_len(0)
                .map_err(|e| io("cannot truncate", &path, e))?;
            self.dead = 0;
            return Ok(());
        }
        if self.dead < COMPACT_MIN_DEAD || self.dead <= self.live.len() {
            return Ok(());
        }
        self.rewrite()
    }

    /// Rewrites the log from the live records: temp file, fsync, rename.
    fn rewrite(&mut self) -> Result<(), QueueError> {
        let path = self.log_path();
        let tmp = self.dir.join("clicks.log.tmp");
        let mut out = File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
        for rec in self.live.values() {
            out.write_all(rec)
                .map_err(|e| io("cannot write", &tmp, e))?;
        }
        out.sync_all().map_err(|e| io("cannot sync", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| io("cannot rename", &tmp, e))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.log = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| io("cannot reopen", &path, e))?;
        self.dead = 0;
        Ok(())
    }
}

impl OfflineQueue for FileQueue {
    fn load(&mut self) -> Result<Vec<StoredClick>, QueueError> {
        Ok(self.loaded.take().unwrap_or_default())
    }

    fn append(&mut self, click: &StoredClick) -> Result<(), QueueError> {
        let mut body = Vec::with_capacity(8 + click.click.encoded_len());
        body.extend_from_slice(&click.seq.to_le_bytes());
        click.click.encode_raw(&mut body);
        let rec = record(KIND_CLICK, &body);
        self.write(&rec)?;
        self.live.insert(click.seq, rec);
        Ok(())
    }

    fn remove(&mut self, seqs: &[u64]) -> Result<(), QueueError> {
        let body: Vec<u8> = seqs.iter().flat_map(|s| s.to_le_bytes()).collect();
        self.write(&record(KIND_REMOVE, &body))?;
        for s in seqs {
            if self.live.remove(s).is_some() {
                self.dead += 1;
            }
        }
        self.dead += 1;
        self.maybe_compact()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn click(n: u64) -> StoredClick {
        StoredClick {
            seq: n,
            click: v1::Click {
                token: format!("tok{n}"),
                occurred_at_ms: n as i64 * 1000,
                ..Default::default()
            },
        }
    }

    #[test]
    fn damage_in_the_middle_costs_only_the_damaged_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut sizes = Vec::new();
        {
            let mut q = FileQueue::open(dir.path()).unwrap();
            for i in 0..20 {
                q.append(&click(i)).unwrap();
                sizes.push(fs::metadata(dir.path().join("clicks.log")).unwrap().len());
            }
            q.remove(&[0, 1]).unwrap();
        }
        // Flip a byte inside click 7's record (bytes sizes[6]..sizes[7]).
        let path = dir.path().join("clicks.log");
        let mut bytes = fs::read(&path).unwrap();
        bytes[(sizes[6] + 12) as usize] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let want: Vec<u64> = (2..20).filter(|&i| i != 7).collect();
        let mut q = FileQueue::open(dir.path()).unwrap();
        assert_eq!(q.damaged_bytes(), sizes[7] - sizes[6]);
        let got: Vec<u64> = q.load().unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(got, want);
        drop(q);
        // Rewritten: the damage is gone, nothing else changed.
        let mut q = FileQueue::open(dir.path()).unwrap();
        assert_eq!(q.damaged_bytes(), 0);
        let got: Vec<u64> = q.load().unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn torn_tail_is_truncated_and_complete_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut q = FileQueue::open(dir.path()).unwrap();
            for i in 0..3 {
                q.append(&click(i)).unwrap();
            }
        }
        let path = dir.path().join("clicks.log");
        let full = fs::read(&path).unwrap();
        // Cut the last record in half, as a crash mid-write would.
        fs::write(&path, &full[..full.len() - 5]).unwrap();
        let mut q = FileQueue::open(dir.path()).unwrap();
        let got: Vec<u64> = q.load().unwrap().iter().map(|s| s.seq).collect();
        assert_eq!(got, vec![0, 1]);
        q.append(&click(7)).unwrap();
        drop(q);
        let mut q = FileQueue::open(dir.path()).unwrap();
        let got: Vec<u64> = q.load().unwrap().iter().map(|s| s.seq).collect();
        assert_eq!(
            got,
            vec![0, 1, 7],
            "appends after recovery land after the cut"
        );
    }

    #[test]
    fn a_second_process_cannot_open_the_same_queue() {
        let dir = tempfile::tempdir().unwrap();
        let _q = FileQueue::open(dir.path()).unwrap();
        assert!(matches!(
            FileQueue::open(dir.path()),
            Err(QueueError::Locked(_))
        ));
    }

    #[test]
    fn drained_queue_empties_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = FileQueue::open(dir.path()).unwrap();
        q.append(&click(0)).unwrap();
        q.append(&click(1)).unwrap();
        q.remove(&[0, 1]).unwrap();
        assert_eq!(
            fs::metadata(dir.path().join("clicks.log")).unwrap().len(),
            0
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append,
        RemoveFront(usize),
        Reopen,
    }

    proptest! {
        /// Model: a VecDeque of seqs. Every acknowledged operation survives a reopen.
        #[test]
        fn matches_a_vecdeque_model(ops in proptest::collection::vec(
            prop_oneof![4 => Just(Op::Append), 2 => (1usize..5).prop_map(Op::RemoveFront), 1 => Just(Op::Reopen)],
            1..120,
        )) {
            let dir = tempfile::tempdir().unwrap();
            let mut q = FileQueue::open(dir.path()).unwrap();
            q.load().unwrap();
            let mut model: VecDeque<u64> = VecDeque::new();
            let mut next = 0;
            for op in ops {
                match op {
                    Op::Append => {
                        q.append(&click(next)).unwrap();
                        model.push_back(next);
                        next += 1;
                    }
                    Op::RemoveFront(n) => {
                        let seqs: Vec<u64> = model.drain(..n.min(model.len())).collect();
                        q.remove(&seqs).unwrap();
                    }
                    Op::Reopen => {
                        drop(q);
                        q = FileQueue::open(dir.path()).unwrap();
                        let got: Vec<StoredClick> = q.load().unwrap();
                        prop_assert_eq!(got.iter().map(|s| s.seq).collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
                        for s in &got {
                            prop_assert_eq!(s, &click(s.seq));
                        }
                    }
                }
                prop_assert_eq!(q.len(), model.len());
            }
        }
    }
}
