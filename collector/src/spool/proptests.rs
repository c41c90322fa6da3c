//! Randomised state-machine test of the spool against a simple model, with
//! simulated power loss.
//!
//! The model is the list of durable unacked records plus the list of
//! appended-but-unsynced ones. A crash drops the spool and cuts every
//! segment file back to what its last sync made durable, optionally keeping
//! (or zero-filling) a random part of the unsynced tail as a torn write
//! would. Recovery must then yield exactly the durable records followed by
//! some prefix of the unsynced ones. This file must stay fast (a few
//! seconds in debug): modest case count, tiny segments, tiny payloads.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::sample::Index;

use super::*;

/// Small enough that a run rotates often and crashes hit several segments;
/// `max_bytes` small enough that `Full` happens when acks lag.
const OPTS: SpoolOptions = SpoolOptions {
    segment_bytes: 256,
    max_bytes: 640,
    min_free_bytes: 0,
};

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<u8>),
    Sync,
    /// Ack the k-th durable unacked record.
    Ack(Index),
    /// Power loss; `seed` picks how much of each unsynced tail survives,
    /// `zero_tail` makes the surviving tail zeros (size reached the disk,
    /// data did not).
    Crash {
        seed: u64,
        zero_tail: bool,
    },
    /// Clean restart: unsynced records are still in the OS and survive.
    Reopen,
    Read {
        from: Index,
        max_records: usize,
        max_bytes: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => prop::collection::vec(any::<u8>(), 0..48).prop_map(Op::Append),
        3 => Just(Op::Sync),
        2 => any::<Index>().prop_map(Op::Ack),
        2 => (any::<u64>(), prop::bool::weighted(0.25))
            .prop_map(|(seed, zero_tail)| Op::Crash { seed, zero_tail }),
        1 => Just(Op::Reopen),
        2 => (any::<Index>(), 1..6usize, 0..120usize).prop_map(|(from, max_records, max_bytes)| {
            Op::Read { from, max_records, max_bytes }
        }),
    ]
}

#[derive(Debug)]
struct Model {
    durable: VecDeque<(u64, Vec<u8>)>,
    unsynced: Vec<(u64, Vec<u8>)>,
    acked: u64,
    durable_seq: u64,
    next_seq: u64,
}

/// splitmix64: a deterministic stream from the op's seed.
fn next_rand(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Cuts each segment to its synced length plus a random part of its
/// unsynced tail, as a power loss could.
fn simulate_power_loss(files: &[(PathBuf, u64, u64, u64, u64)], seed: u64, zero_tail: bool) {
    let mut rng = seed;
    for (path, _, _, synced, len) in files {
        let extra = if len > synced {
            next_rand(&mut rng) % (len - synced + 1)
        } else {
            0
        };
        let mut f = OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(synced + extra).unwrap();
        if zero_tail && extra > 0 {
            f.seek(SeekFrom::Start(*synced)).unwrap();
            f.write_all(&vec![0u8; extra as usize]).unwrap();
        }
    }
}

/// (.seg file count, total bytes) actually on disk.
fn disk_usage(dir: &Path) -> (usize, u64) {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .fold((0, 0), |(n, b), e| (n + 1, b + e.metadata().unwrap().len()))
}

fn expected_read(
    m: &Model,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Vec<(u64, Vec<u8>)> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut total = 0;
    for (seq, p) in m.durable.iter().filter(|(s, _)| *s >= from) {
        if out.len() == max_records || (!out.is_empty() && total + p.len() > max_bytes) {
            break;
        }
        total += p.len();
        out.push((*seq, p.clone()));
    }
    out
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (mut spool, _) = Spool::open(dir, OPTS).unwrap();
    let incarnation = spool.incarnation();
    let mut m = Model {
        durable: VecDeque::new(),
        unsynced: Vec::new(),
        acked: 0,
        durable_seq: 0,
        next_seq: 1,
    };
    for op in ops {
        match op {
            Op::Append(p) => {
                let used = spool.used_bytes();
                let need = record::HEADER_LEN as u64 + p.len() as u64;
                match spool.append(&p) {
                    Ok(seq) => {
                        prop_assert_eq!(seq, m.next_seq);
                        prop_assert!(used + need <= OPTS.max_bytes);
                        m.next_seq += 1;
                        m.unsynced.push((seq, p));
                    }
                    Err(SpoolError::Full { used: u, max }) => {
                        prop_assert_eq!(u, used);
                        prop_assert!(used + need > max);
                        prop_assert_eq!(spool.used_bytes(), used);
                    }
                    Err(e) => prop_assert!(false, "append failed: {e}"),
                }
            }
            Op::Sync => {
                spool.sync().unwrap();
                m.durable.extend(m.unsynced.drain(..));
                m.durable_seq = m.next_seq - 1;
            }
            Op::Ack(k) => {
                if m.durable.is_empty() {
                    // Nothing new to ack; acking the current value is a no-op.
                    spool.ack(m.acked).unwrap();
                    if let Some((seq, _)) = m.unsynced.first() {
                        let refused =
                            matches!(spool.ack(*seq), Err(SpoolError::AckBeyondDurable { .. }));
                        prop_assert!(refused);
                    }
                } else {
                    let seq = m.durable[k.index(m.durable.len())].0;
                    spool.ack(seq).unwrap();
                    m.acked = seq;
                    while m.durable.front().is_some_and(|(s, _)| *s <= seq) {
                        m.durable.pop_front();
                    }
                }
            }
            Op::Crash { seed, zero_tail } => {
                let files = spool.segment_files();
                drop(spool);
                simulate_power_loss(&files, seed, zero_tail);
                let (s, rec) = Spool::open(dir, OPTS).unwrap();
                spool = s;
                let got = spool.read(0, usize::MAX, usize::MAX).unwrap();
                let n = m.durable.len();
                prop_assert!(got.len() >= n, "lost durable records: {:?}", got);
                prop_assert_eq!(&got[..n], &m.durable.make_contiguous()[..]);
                let k = got.len() - n;
                prop_assert!(k <= m.unsynced.len());
                prop_assert_eq!(&got[n..], &m.unsynced[..k]);
                prop_assert_eq!(rec.records, got.len() as u64);
                m.durable = got.into();
                m.unsynced.clear();
                m.durable_seq = m.durable.back().map_or(m.acked, |(s, _)| *s);
                m.next_seq = m.durable_seq + 1;
            }
            Op::Reopen => {
                drop(spool);
                let (s, rec) = Spool::open(dir, OPTS).unwrap();
                spool = s;
                prop_assert_eq!(rec.truncated_bytes, 0);
                m.durable.extend(m.unsynced.drain(..));
                m.durable_seq = m.next_seq - 1;
                prop_assert_eq!(rec.records, m.durable.len() as u64);
            }
            Op::Read {
                from,
                max_records,
                max_bytes,
            } => {
                // Anything from 0 to just past the end, acked range included.
                let from = from.index(m.next_seq as usize + 2) as u64;
                let got = spool.read(from, max_records, max_bytes).unwrap();
                prop_assert_eq!(got, expected_read(&m, from, max_records, max_bytes));
            }
        }
        prop_assert_eq!(spool.incarnation(), incarnation);
        prop_assert_eq!(spool.acked_seq(), m.acked);
        prop_assert_eq!(spool.durable_seq(), m.durable_seq);
        prop_assert_eq!(
            spool.pending_records(),
            (m.durable.len() + m.unsynced.len()) as u64
        );
        let (files, bytes) = disk_usage(dir);
        prop_assert_eq!(spool.segment_count(), files);
        prop_assert_eq!(spool.used_bytes(), bytes);
        prop_assert!(bytes <= OPTS.max_bytes);
        for (path, first, last, _, len) in spool.segment_files() {
            // Fully acked segments must be gone; only a lone record may
            // exceed the segment size.
            prop_assert!(last > m.acked || len == 0, "acked segment {:?} kept", path);
            prop_assert!(len <= OPTS.segment_bytes || last == first);
        }
    }
    // Whatever happened, a clean sync + reopen shows exactly the model.
    spool.sync().unwrap();
    drop(spool);
    let (spool, _) = Spool::open(dir, OPTS).unwrap();
    m.durable.extend(m.unsynced.drain(..));
    let got = spool.read(0, usize::MAX, usize::MAX).unwrap();
    prop_assert_eq!(&got[..], &m.durable.make_contiguous()[..]);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        // Keep the source tree clean; a failure prints its minimal case.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn spool_matches_model_across_crashes(ops in prop::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
