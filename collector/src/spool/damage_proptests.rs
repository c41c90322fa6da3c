//! Randomised damage to synced spool files: byte flips, zeroed pages and
//! mid-segment truncations at random places, with synced records after
//! them. After reopen, every record the damage did not touch must come back
//! in order and exactly once, the touched ones must be reported as lost by
//! seq (and read back as empty tombstones), `verify` must report the same before the repair, and a second
//! reopen must find nothing more. The expected sets are computed here from
//! the byte positions of the records, independently of the scan.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

use proptest::prelude::*;

use super::*;

const OPTS: SpoolOptions = SpoolOptions {
    segment_bytes: 300,
    max_bytes: u64::MAX,
    min_free_bytes: 0,
};

#[derive(Debug, Clone)]
enum Harm {
    /// Flip bit `bit` of the byte at `pos` (a fraction of the file).
    Flip { pos: f64, bit: u8 },
    /// Zero `len` bytes from `pos`.
    Zero { pos: f64, len: u64 },
    /// Cut the file at `pos`.
    Truncate { pos: f64 },
}

fn harm() -> impl Strategy<Value = Harm> {
    prop_oneof![
        3 => (0.0..1.0f64, 0..8u8).prop_map(|(pos, bit)| Harm::Flip { pos, bit }),
        2 => (0.0..1.0f64, prop_oneof![1..64u64, Just(4096u64)])
            .prop_map(|(pos, len)| Harm::Zero { pos, len }),
        1 => (0.0..1.0f64).prop_map(|pos| Harm::Truncate { pos }),
    ]
}

/// Where each record lives: (seq, file, start, end).
fn layout(spool: &Spool, sizes: &[(u64, u64)]) -> Vec<(u64, PathBuf, u64, u64)> {
    let mut out = Vec::new();
    for (path, first, last, _, _) in spool.segment_files() {
        let mut off = 0;
        for &(seq, size) in sizes.iter().filter(|(s, _)| (first..=last).contains(s)) {
            out.push((seq, path.clone(), off, off + size));
            off += size;
        }
    }
    out
}

/// Collapses a set of seqs into inclusive ranges.
fn ranges(seqs: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &s in seqs {
        match out.last_mut() {
            Some((_, b)) if *b + 1 == s => *b = s,
            _ => out.push((s, s)),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn damage_costs_only_the_records_it_touches(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 6..30),
        acked_frac in 0.0..0.5f64,
        harms in prop::collection::vec((any::<prop::sample::Index>(), harm()), 1..3),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), OPTS).unwrap();
        let mut sizes = Vec::new();
        for p in &payloads {
            // One sync per record: each is vouched for by the next.
            let seq = spool.append(p).unwrap();
            spool.sync().unwrap();
            sizes.push((seq, (record::HEADER_LEN + p.len()) as u64));
        }
        let n = payloads.len() as u64;
        let acked = (acked_frac * n as f64) as u64;
        spool.ack(acked).unwrap();
        let records = layout(&spool, &sizes);
        drop(spool);

        // Harm only bytes before the last record: nothing vouches for it.
        let last_file = records.last().map(|r| r.1.clone()).unwrap();
        let last_start = records.last().map(|r| r.2).unwrap();
        let mut touched = BTreeSet::new();
        for (which, h) in &harms {
            let files: Vec<&PathBuf> = {
                let mut v: Vec<&PathBuf> = records.iter().map(|r| &r.1).collect();
                v.dedup();
                v
            };
            let file = files[which.index(files.len())];
            let len = fs::metadata(file).unwrap().len();
            let limit = if *file == last_file { last_start } else { len };
            if limit == 0 {
                continue;
            }
            let at = |f: f64| ((f * limit as f64) as u64).min(limit - 1);
            let (start, end) = match *h {
                Harm::Flip { pos, bit } => {
                    let p = at(pos);
                    let mut bytes = fs::read(file).unwrap();
                    bytes[p as usize] ^= 1 << bit;
                    fs::write(file, &bytes).unwrap();
                    (p, p + 1)
                }
                Harm::Zero { pos, len: z } => {
                    let p = at(pos);
                    let e = (p + z).min(limit);
                    let mut f = OpenOptions::new().write(true).open(file).unwrap();
                    f.seek(SeekFrom::Start(p)).unwrap();
                    f.write_all(&vec![0u8; (e - p) as usize]).unwrap();
                    // Zeroing bytes that are already zero changes nothing.
                    (p, e)
                }
                Harm::Truncate { pos } => {
                    if *file == last_file {
                        continue;
                    }
                    let p = at(pos);
                    OpenOptions::new().write(true).open(file).unwrap().set_len(p).unwrap();
                    (p, len)
                }
            };
            for (seq, path, s, e) in &records {
                if path == file && *s < end && start < *e {
                    touched.insert(*seq);
                }
            }
        }
        // A zeroed range may leave a record's bytes as they were (zeros in
        // a zero payload): recompute "touched" as "bytes changed".
        let touched: BTreeSet<u64> = touched
            .into_iter()
            .filter(|&seq| {
                let (_, path, s, e) = records.iter().find(|r| r.0 == seq).unwrap();
                let now = fs::read(path).unwrap();
                let p = &payloads[(seq - 1) as usize];
                let mut want = Vec::new();
                let synced = seq - 1;
                record::encode(&mut want, seq, synced, p.len() as u32, p);
                now.get(*s as usize..*e as usize) != Some(&want[..])
            })
            .collect();
        let lost: BTreeSet<u64> = touched.iter().copied().filter(|&s| s > acked).collect();
        // Lost records come back as tombstones (empty payloads): the log
        // stays gap-free and the forwarder sends nothing for them.
        let expected: Vec<(u64, Vec<u8>)> = (acked + 1..=n)
            .map(|s| {
                let p = if lost.contains(&s) { Vec::new() } else { payloads[(s - 1) as usize].clone() };
                (s, p)
            })
            .collect();

        let report = verify(dir.path()).unwrap();
        prop_assert_eq!(&report.lost_seqs, &ranges(&lost));
        prop_assert_eq!(report.is_damaged(), !lost.is_empty());

        let (spool, rec) = Spool::open(dir.path(), OPTS).unwrap();
        prop_assert_eq!(&rec.lost_seqs, &ranges(&lost));
        prop_assert_eq!(rec.lost_records, lost.len() as u64);
        prop_assert_eq!(spool.read(0, usize::MAX, usize::MAX).unwrap(), expected.clone());
        prop_assert_eq!(spool.pending_records(), expected.len() as u64);
        // (A cut exactly at a record boundary loses records but no bytes.)
        prop_assert!(rec.damage.is_empty() || !lost.is_empty());
        for d in &rec.damage {
            let saved = d.saved_to.as_ref().unwrap();
            prop_assert_eq!(fs::metadata(saved).unwrap().len(), d.bytes);
        }
        drop(spool);

        // Not confirmed as reported (a crash before the caller logged it): the next open
        // reports the same losses again, and changes nothing else.
        let (spool, again) = Spool::open(dir.path(), OPTS).unwrap();
        prop_assert_eq!(&again.lost_seqs, &rec.lost_seqs);
        prop_assert_eq!(again.damage.len(), rec.damage.len());
        prop_assert_eq!(spool.read(0, usize::MAX, usize::MAX).unwrap(), expected.clone());
        spool.damage_reported().unwrap();
        drop(spool);

        // Reported and repaired: a second open finds nothing and loses nothing.
        let (mut spool, rec) = Spool::open(dir.path(), OPTS).unwrap();
        prop_assert!(rec.damage.is_empty() && rec.lost_seqs.is_empty(), "{:?}", rec);
        prop_assert_eq!(spool.read(0, usize::MAX, usize::MAX).unwrap(), expected.clone());
        prop_assert!(!verify(dir.path()).unwrap().is_damaged());
        // Seqs go on after the highest one ever written, never reusing one.
        prop_assert_eq!(spool.append(b"next").unwrap(), n + 1);
    }
}
