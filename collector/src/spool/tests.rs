//! Unit tests of the spool's public behaviour: round trips, rotation, acks,
//! recovery from torn or damaged files, limits and identity.
//!
//! These tests only use temp directories they create; they must not depend
//! on timing or on each other. The randomised crash model is in
//! `proptests.rs`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::*;

fn opts(segment_bytes: u64, max_bytes: u64) -> SpoolOptions {
    SpoolOptions {
        segment_bytes,
        max_bytes,
        min_free_bytes: 0,
    }
}

fn open(dir: &Path, o: SpoolOptions) -> (Spool, Recovery) {
    Spool::open(dir, o).unwrap()
}

/// Bytes on disk of one record with a [`payload`]: a 24-byte header and 20
/// bytes of payload.
const REC: u64 = 44;

/// 20-byte payloads, so each record is [`REC`] bytes on disk.
fn payload(i: u64) -> Vec<u8> {
    format!("payload-{i:012}").into_bytes()
}

fn read_all(s: &Spool) -> Vec<(u64, Vec<u8>)> {
    s.read(0, usize::MAX, usize::MAX).unwrap()
}

fn expected(seqs: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
    seqs.map(|i| (i, payload(i))).collect()
}

fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

fn append_n(s: &mut Spool, n: u64) {
    for _ in 0..n {
        let next = s.pending_records() + s.acked_seq() + 1;
        assert_eq!(s.append(&payload(next)).unwrap(), next);
    }
}

#[test]
fn append_sync_read_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, rec) = open(dir.path(), SpoolOptions::default());
    assert_eq!(rec, Recovery::default());
    assert_eq!(s.durable_seq(), 0);
    assert!(read_all(&s).is_empty());
    append_n(&mut s, 3);
    s.sync().unwrap();
    assert_eq!(s.durable_seq(), 3);
    assert_eq!(read_all(&s), expected(1..=3));
    assert_eq!(s.read(2, 10, usize::MAX).unwrap(), expected(2..=3));
    assert_eq!(s.read(4, 10, usize::MAX).unwrap(), vec![]);
    assert_eq!(s.pending_records(), 3);
    assert_eq!(s.segment_count(), 1);
    assert_eq!(s.used_bytes(), 3 * REC);
}

#[test]
fn read_respects_record_and_byte_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), SpoolOptions::default());
    append_n(&mut s, 5);
    s.sync().unwrap();
    assert_eq!(s.read(1, 2, usize::MAX).unwrap(), expected(1..=2));
    assert_eq!(s.read(1, 0, usize::MAX).unwrap(), vec![]);
    // 20-byte payloads: 45 bytes fit two.
    assert_eq!(s.read(1, 10, 45).unwrap(), expected(1..=2));
    // A budget below one record still yields one.
    assert_eq!(s.read(3, 10, 1).unwrap(), expected(3..=3));
    assert_eq!(s.read(3, 10, 0).unwrap(), expected(3..=3));
}

#[test]
fn rotation_creates_ordered_bounded_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), opts(100, u64::MAX));
    append_n(&mut s, 7);
    s.sync().unwrap();
    let files = seg_files(dir.path());
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [1, 3, 5, 7].map(|i| format!("{i:020}.seg")).to_vec(),
        "two 44-byte records per 100-byte segment"
    );
    for f in &files {
        assert!(fs::metadata(f).unwrap().len() <= 100);
    }
    assert_eq!(s.segment_count(), 4);
    assert_eq!(read_all(&s), expected(1..=7));
    assert_eq!(s.read(4, 3, usize::MAX).unwrap(), expected(4..=6));
    // A record bigger than a segment gets a segment of its own.
    let big = vec![7u8; 300];
    assert_eq!(s.append(&big).unwrap(), 8);
    assert_eq!(s.append(&payload(9)).unwrap(), 9);
    s.sync().unwrap();
    assert_eq!(s.segment_count(), 6);
    assert_eq!(s.read(8, 1, usize::MAX).unwrap(), vec![(8, big)]);
    assert_eq!(s.read(9, 1, usize::MAX).unwrap(), expected(9..=9));
}

#[test]
fn ack_deletes_segments_and_persists_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(100, u64::MAX);
    let (mut s, _) = open(dir.path(), o);
    append_n(&mut s, 7);
    s.sync().unwrap();
    s.ack(4).unwrap();
    assert_eq!(s.acked_seq(), 4);
    assert_eq!(
        seg_files(dir.path()).len(),
        2,
        "segments 1.. and 3.. deleted"
    );
    assert_eq!(s.segment_count(), 2);
    assert_eq!(s.pending_records(), 3);
    assert_eq!(read_all(&s), expected(5..=7));
    assert_eq!(s.read(1, 10, usize::MAX).unwrap(), expected(5..=7));
    // Acking inside a segment keeps it but hides the acked record.
    s.ack(5).unwrap();
    assert_eq!(s.segment_count(), 2);
    assert_eq!(read_all(&s), expected(6..=7));
    // Lower ack: no-op.
    s.ack(2).unwrap();
    assert_eq!(s.acked_seq(), 5);
    drop(s);

    let (mut s, rec) = open(dir.path(), o);
    assert_eq!(s.acked_seq(), 5);
    assert_eq!(
        rec,
        Recovery {
            records: 2,
            truncated_bytes: 0,
            segments: 2,
            ..Recovery::default()
        }
    );
    assert_eq!(read_all(&s), expected(6..=7));
    // Everything acked: every segment goes, seqs still continue.
    s.ack(7).unwrap();
    assert_eq!(s.segment_count(), 0);
    assert!(seg_files(dir.path()).is_empty());
    assert_eq!(s.used_bytes(), 0);
    drop(s);
    let (mut s, rec) = open(dir.path(), o);
    assert_eq!(rec.records, 0);
    assert_eq!(s.durable_seq(), 7);
    assert_eq!(s.append(&payload(8)).unwrap(), 8);
    s.sync().unwrap();
    assert_eq!(read_all(&s), expected(8..=8));
}

#[test]
fn ack_beyond_durable_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), SpoolOptions::default());
    append_n(&mut s, 2);
    s.sync().unwrap();
    append_n(&mut s, 1);
    assert!(matches!(
        s.ack(3),
        Err(SpoolError::AckBeyondDurable { seq: 3, durable: 2 })
    ));
    assert_eq!(s.acked_seq(), 0);
    s.ack(2).unwrap();
    assert_eq!(s.acked_seq(), 2);
}

#[test]
fn deletion_lost_in_crash_is_redone_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(100, u64::MAX);
    let (mut s, _) = open(dir.path(), o);
    append_n(&mut s, 5);
    s.sync().unwrap();
    let first = seg_files(dir.path())[0].clone();
    let saved = fs::read(&first).unwrap();
    s.ack(2).unwrap();
    drop(s);
    // The unlink did not reach the disk.
    fs::write(&first, saved).unwrap();
    let (s, rec) = open(dir.path(), o);
    assert_eq!(rec.records, 3);
    assert_eq!(rec.truncated_bytes, 0);
    assert!(!first.exists());
    assert_eq!(read_all(&s), expected(3..=5));
}

/// `ack_releasing` leaves the released segments' files for the caller: the spool no longer
/// has them (reads, counts) and a spool opened meanwhile does not list them (renamed), but
/// their bytes count until `remove` deletes them; a crash before `remove` leaves files the
/// next open deletes.
#[test]
fn released_segments_are_deleted_by_the_caller_or_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(100, u64::MAX);
    let (mut s, _) = open(dir.path(), o);
    append_n(&mut s, 7);
    s.sync().unwrap();
    let files = seg_files(dir.path()).len();
    let all_files = || fs::read_dir(dir.path()).unwrap().count();
    let on_disk = all_files();
    let used = s.used_bytes();
    let released = s.ack_releasing(4).unwrap();
    assert!(!released.is_empty() && released.error.is_none());
    assert_eq!(s.segment_count(), files - 2);
    assert_eq!(read_all(&s), expected(5..=7));
    assert_eq!(seg_files(dir.path()).len(), files - 2, "renamed away");
    assert_eq!(all_files(), on_disk, "not deleted yet");
    assert_eq!(s.used_bytes(), used, "still on disk: still counted");
    released.remove().unwrap();
    assert_eq!(all_files(), on_disk - 2);
    assert!(s.used_bytes() < used);
    assert_eq!(
        s.used_bytes(),
        s.segment_files().iter().map(|f| f.4).sum::<u64>()
    );
    // Nothing left to release below the ack.
    assert!(s.ack_releasing(4).unwrap().is_empty());

    // Released, then a crash before the files are deleted.
    let released = s.ack_releasing(7).unwrap();
    assert_eq!(s.segment_count(), 0);
    drop(released);
    drop(s);
    assert_eq!(
        all_files(),
        on_disk - 2,
        "the released files are still there"
    );
    let (s, rec) = open(dir.path(), o);
    assert_eq!(rec.records, 0);
    assert!(seg_files(dir.path()).is_empty());
    assert_eq!(all_files(), on_disk - files, "the open deleted them");
    assert_eq!(s.durable_seq(), 7);
}

#[test]
fn torn_tail_mid_record_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), SpoolOptions::default());
    append_n(&mut s, 5);
    s.sync().unwrap();
    drop(s);
    let seg = seg_files(dir.path())[0].clone();
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(5 * REC - 3).unwrap();
    drop(f);
    let (mut s, rec) = open(dir.path(), SpoolOptions::default());
    assert_eq!(
        rec,
        Recovery {
            records: 4,
            truncated_bytes: REC - 3,
            segments: 1,
            ..Recovery::default()
        }
    );
    assert_eq!(fs::metadata(&seg).unwrap().len(), 4 * REC);
    assert_eq!(read_all(&s), expected(1..=4));
    assert_eq!(s.append(&payload(5)).unwrap(), 5);
    s.sync().unwrap();
    assert_eq!(read_all(&s), expected(1..=5));
}

#[test]
fn garbage_tail_is_cut_and_complete_records_kept() {
    for garbage in [vec![0u8; 50], vec![0xAB; 7], (0..=255u8).collect()] {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = open(dir.path(), SpoolOptions::default());
        append_n(&mut s, 3);
        s.sync().unwrap();
        drop(s);
        let seg = seg_files(dir.path())[0].clone();
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(&garbage)
            .unwrap();
        let (mut s, rec) = open(dir.path(), SpoolOptions::default());
        assert_eq!(rec.records, 3);
        assert_eq!(rec.truncated_bytes, garbage.len() as u64);
        assert_eq!(fs::metadata(&seg).unwrap().len(), 3 * REC);
        assert_eq!(s.append(&payload(4)).unwrap(), 4);
        s.sync().unwrap();
        assert_eq!(read_all(&s), expected(1..=4));
    }
}

#[test]
fn segment_after_a_hole_is_dropped() {
    // (One sync for all six: nothing vouches for record 4.)
    // A later segment reaching the disk while an earlier unsynced tail did
    // not must not survive: records after a hole would not be a prefix.
    let dir = tempfile::tempdir().unwrap();
    let o = opts(100, u64::MAX);
    let (mut s, _) = open(dir.path(), o);
    append_n(&mut s, 6);
    s.sync().unwrap();
    drop(s);
    let files = seg_files(dir.path());
    let f = OpenOptions::new().write(true).open(&files[1]).unwrap();
    f.set_len(REC + 10).unwrap(); // keeps 3, tears 4
    drop(f);
    let (s, rec) = open(dir.path(), o);
    assert_eq!(read_all(&s), expected(1..=3));
    assert_eq!(rec.truncated_bytes, 10 + 2 * REC);
    assert_eq!(rec.segments, 2);
    assert!(!files[2].exists());
}

#[test]
fn segment_continuing_after_garbage_is_kept() {
    // Garbage after the last record of a segment (a failed write) does not
    // make the next segment, which continues the seqs, suspect.
    let dir = tempfile::tempdir().unwrap();
    let o = opts(100, u64::MAX);
    let (mut s, _) = open(dir.path(), o);
    append_n(&mut s, 4);
    s.sync().unwrap();
    drop(s);
    let files = seg_files(dir.path());
    OpenOptions::new()
        .append(true)
        .open(&files[0])
        .unwrap()
        .write_all(&[1, 2, 3])
        .unwrap();
    let (s, rec) = open(dir.path(), o);
    assert_eq!(rec.truncated_bytes, 3);
    assert_eq!(read_all(&s), expected(1..=4));
}

#[test]
fn bit_flip_in_durable_record_is_reported_on_read_and_cut_on_open() {
    // All three records went in one sync, so nothing vouches that record 2
    // was synced: at open it is indistinguishable from a torn write and is
    // cut with what follows (see `recover`).
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), SpoolOptions::default());
    append_n(&mut s, 3);
    s.sync().unwrap();
    let seg = seg_files(dir.path())[0].clone();
    let mut bytes = fs::read(&seg).unwrap();
    bytes[REC as usize + 30] ^= 1; // payload of record 2
    fs::write(&seg, &bytes).unwrap();
    assert_eq!(s.read(1, 1, usize::MAX).unwrap(), expected(1..=1));
    assert!(matches!(
        s.read(1, 10, usize::MAX),
        Err(SpoolError::Corrupt(_))
    ));
    drop(s);
    let (s, rec) = open(dir.path(), SpoolOptions::default());
    assert_eq!(rec.truncated_bytes, 2 * REC);
    assert_eq!(read_all(&s), expected(1..=1));
}

#[test]
fn full_is_refused_without_writing_and_clears_after_ack() {
    let dir = tempfile::tempdir().unwrap();
    let max = 4 * REC + 30; // room for a 2-byte record, not a 20-byte one
    let (mut s, _) = open(dir.path(), opts(100, max));
    append_n(&mut s, 4);
    let before = (s.used_bytes(), s.pending_records(), s.segment_count());
    match s.append(&payload(5)) {
        Err(SpoolError::Full { used, max: m }) if used == 4 * REC && m == max => {}
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(
        before,
        (s.used_bytes(), s.pending_records(), s.segment_count())
    );
    // A smaller record still fits.
    assert_eq!(s.append(&[1, 2]).unwrap(), 5);
    s.sync().unwrap();
    assert_eq!(s.read(5, 1, usize::MAX).unwrap(), vec![(5, vec![1, 2])]);
    s.ack(5).unwrap();
    assert_eq!(s.used_bytes(), 0);
    assert_eq!(s.append(&payload(6)).unwrap(), 6);
    s.sync().unwrap();
    assert_eq!(read_all(&s), expected(6..=6));
}

#[test]
fn read_never_returns_unsynced_records() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), opts(100, u64::MAX));
    append_n(&mut s, 2);
    s.sync().unwrap();
    append_n(&mut s, 3); // crosses into new segments
    assert_eq!(s.durable_seq(), 2);
    assert_eq!(read_all(&s), expected(1..=2));
    assert_eq!(s.read(3, 10, usize::MAX).unwrap(), vec![]);
    assert_eq!(s.pending_records(), 5);
    s.sync().unwrap();
    assert_eq!(s.durable_seq(), 5);
    assert_eq!(read_all(&s), expected(1..=5));
}

#[test]
fn seq_continues_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), SpoolOptions::default());
    append_n(&mut s, 3);
    s.sync().unwrap();
    // Not synced, but a clean drop leaves it in the OS: found and durable
    // after reopen.
    append_n(&mut s, 1);
    drop(s);
    let (mut s, rec) = open(dir.path(), SpoolOptions::default());
    assert_eq!(rec.records, 4);
    assert_eq!(s.durable_seq(), 4);
    assert_eq!(s.append(&payload(5)).unwrap(), 5);
    s.sync().unwrap();
    assert_eq!(read_all(&s), expected(1..=5));
}

#[test]
fn incarnation_is_stable_and_new_for_a_new_directory() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("nested/b");
    let (s, _) = open(&a, SpoolOptions::default());
    let inc_a = s.incarnation();
    drop(s);
    let (s, _) = open(&a, SpoolOptions::default());
    assert_eq!(s.incarnation(), inc_a);
    drop(s);
    let (s, _) = open(&b, SpoolOptions::default());
    assert_ne!(s.incarnation(), inc_a);
    drop(s);
    fs::remove_dir_all(&a).unwrap();
    let (s, _) = open(&a, SpoolOptions::default());
    assert_ne!(s.incarnation(), inc_a);
}

#[test]
fn segments_without_any_incarnation_copy_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), SpoolOptions::default());
    let inc = s.incarnation();
    append_n(&mut s, 1);
    s.sync().unwrap();
    drop(s);
    // The file alone: restored from the copy in the ack file.
    fs::remove_file(dir.path().join(meta::INCARNATION_FILE)).unwrap();
    let (s, rec) = open(dir.path(), SpoolOptions::default());
    assert_eq!(s.incarnation(), inc);
    assert_eq!(rec.repairs.len(), 1, "{:?}", rec.repairs);
    assert_eq!(read_all(&s), expected(1..=1));
    drop(s);
    // Both: a new id could double count the pending record; refuse.
    fs::remove_file(dir.path().join(meta::INCARNATION_FILE)).unwrap();
    let mut ack = fs::read(dir.path().join(meta::ACK_FILE)).unwrap();
    ack[1024] ^= 0xff;
    fs::write(dir.path().join(meta::ACK_FILE), &ack).unwrap();
    assert!(matches!(
        Spool::open(dir.path(), SpoolOptions::default()),
        Err(SpoolError::Corrupt(_))
    ));
}

#[test]
fn record_too_large_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), SpoolOptions::default());
    let big = vec![0u8; MAX_PAYLOAD_BYTES + 1];
    assert!(matches!(
        s.append(&big),
        Err(SpoolError::RecordTooLarge { len, max }) if len == MAX_PAYLOAD_BYTES + 1 && max == MAX_PAYLOAD_BYTES
    ));
    assert_eq!(s.used_bytes(), 0);
    assert_eq!(s.append(&big[1..]).unwrap(), 1);
    s.sync().unwrap();
    assert_eq!(s.read(1, 1, 0).unwrap()[0].1.len(), MAX_PAYLOAD_BYTES);
}

#[test]
fn second_open_of_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path(), SpoolOptions::default());
    assert!(matches!(
        Spool::open(dir.path(), SpoolOptions::default()),
        Err(SpoolError::Io { .. })
    ));
    drop(s);
    open(dir.path(), SpoolOptions::default());
}

#[test]
fn reads_from_the_middle_of_a_large_segment_use_the_index() {
    // 2 KiB records in one 4 MiB segment: the sparse index has several
    // entries, and reads starting anywhere must land on the right record,
    // before and after a reopen (which rebuilds the index).
    let dir = tempfile::tempdir().unwrap();
    let o = opts(4 << 20, u64::MAX);
    let big = |i: u64| -> Vec<u8> {
        let mut v = vec![(i % 251) as u8; 2048];
        v[..8].copy_from_slice(&i.to_le_bytes());
        v
    };
    let (mut s, _) = open(dir.path(), o);
    for i in 1..=300 {
        assert_eq!(s.append(&big(i)).unwrap(), i);
    }
    s.sync().unwrap();
    for _ in 0..2 {
        assert_eq!(s.segment_count(), 1);
        for from in [1u64, 31, 32, 33, 150, 299, 300] {
            let got = s.read(from, 3, usize::MAX).unwrap();
            let want: Vec<_> = (from..=(from + 2).min(300)).map(|i| (i, big(i))).collect();
            assert_eq!(got, want, "from {from}");
        }
        drop(s);
        s = open(dir.path(), o).0;
    }
}

#[test]
fn spool_can_be_shared_behind_a_mutex() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Spool>();
    assert_send_sync::<SpoolError>();
}

/// Appends `n` records with one sync each, as the collector's group commit
/// does: every record then vouches for the ones before it.
fn append_synced(s: &mut Spool, n: u64) {
    for _ in 0..n {
        append_n(s, 1);
        s.sync().unwrap();
    }
}

#[test]
fn bit_flip_in_a_vouched_record_costs_only_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), SpoolOptions::default());
    append_synced(&mut s, 40);
    drop(s);
    let seg = seg_files(dir.path())[0].clone();
    let mut bytes = fs::read(&seg).unwrap();
    let at = bytes.len() / 4; // inside record 11 (44 bytes each)
    bytes[at] ^= 0x10;
    fs::write(&seg, &bytes).unwrap();
    let hit = at as u64 / REC + 1;

    let report = verify(dir.path()).unwrap();
    assert!(report.is_damaged());
    assert_eq!(report.lost_seqs, vec![(hit, hit)]);

    let (s, rec) = open(dir.path(), SpoolOptions::default());
    assert_eq!(rec.lost_seqs, vec![(hit, hit)]);
    assert_eq!(rec.lost_records, 1);
    assert_eq!(rec.damage.len(), 1);
    assert_eq!(rec.damage[0].bytes, REC);
    let saved = rec.damage[0].saved_to.clone().unwrap();
    assert_eq!(
        fs::read(&saved).unwrap(),
        bytes[(hit - 1) as usize * REC as usize..][..REC as usize]
    );
    assert!(dir.path().join(CORRUPT_DIR).join("report.log").exists());
    // Every other record is back, in order; the lost one is a tombstone.
    let want: Vec<(u64, Vec<u8>)> = (1..=40)
        .map(|i| (i, if i == hit { Vec::new() } else { payload(i) }))
        .collect();
    assert_eq!(read_all(&s), want);
    s.damage_reported().unwrap();
    assert!(!dir.path().join(CORRUPT_DIR).join(PENDING_FILE).exists());
    drop(s);
    let (mut s, rec) = open(dir.path(), SpoolOptions::default());
    assert_eq!(rec.damage, vec![]);
    assert_eq!(rec.lost_seqs, vec![]);
    assert_eq!(read_all(&s), want);
    assert_eq!(s.append(&payload(41)).unwrap(), 41);
    assert!(!verify(dir.path()).unwrap().is_damaged());
}

#[test]
fn truncated_segment_keeps_the_segments_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(100, u64::MAX);
    let (mut s, _) = open(dir.path(), o);
    append_synced(&mut s, 6); // two records per segment
    drop(s);
    let files = seg_files(dir.path());
    let f = OpenOptions::new().write(true).open(&files[1]).unwrap();
    f.set_len(REC + 10).unwrap(); // keeps 3, tears 4
    drop(f);
    let (s, rec) = open(dir.path(), o);
    assert_eq!(rec.lost_seqs, vec![(4, 4)]);
    s.damage_reported().unwrap();
    let want: Vec<(u64, Vec<u8>)> = (1..=6)
        .map(|i| (i, if i == 4 { Vec::new() } else { payload(i) }))
        .collect();
    assert_eq!(read_all(&s), want);
}

#[test]
fn damaged_ack_slots_are_repaired_without_reusing_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(100, u64::MAX);
    let (mut s, _) = open(dir.path(), o);
    let inc = s.incarnation();
    append_synced(&mut s, 6);
    s.ack(3).unwrap(); // deletes the first segment (1, 2)
    drop(s);
    let ack_path = dir.path().join(meta::ACK_FILE);
    let mut ack = fs::read(&ack_path).unwrap();
    ack[2] ^= 1;
    ack[514] ^= 1;
    fs::write(&ack_path, &ack).unwrap();
    assert!(verify(dir.path()).unwrap().is_damaged());
    // Both slots gone, segments left: resend from the oldest segment (3 is
    // acked already; the aggregator drops it as a replay), same identity.
    let (mut s, rec) = open(dir.path(), o);
    assert_eq!(rec.repairs.len(), 1, "{:?}", rec.repairs);
    assert_eq!(s.incarnation(), inc);
    assert_eq!(s.acked_seq(), 2);
    assert_eq!(read_all(&s), expected(3..=6));
    s.ack(6).unwrap();
    drop(s);
    assert!(!verify(dir.path()).unwrap().is_damaged());
    // Both slots gone and nothing pending: the next seq is unknown, so a
    // new incarnation (collector id) makes any seq safe.
    let mut ack = fs::read(&ack_path).unwrap();
    ack[2] ^= 1;
    ack[514] ^= 1;
    fs::write(&ack_path, &ack).unwrap();
    let (s, rec) = open(dir.path(), o);
    assert_eq!(rec.repairs.len(), 1, "{:?}", rec.repairs);
    assert_ne!(s.incarnation(), inc);
    drop(s);
    let (s, rec) = open(dir.path(), o);
    assert!(rec.repairs.is_empty(), "{:?}", rec.repairs);
    assert_eq!(read_all(&s), vec![]);
}

#[test]
fn one_damaged_ack_slot_never_lets_a_seq_be_reused() {
    let ack_path = |d: &Path| d.join(meta::ACK_FILE);
    // Drained spool, the newer slot (holding 6) damaged: the other slot says 5, so
    // trusting it would hand out seq 6 again, which the aggregator has already acked.
    let dir = tempfile::tempdir().unwrap();
    let o = opts(100, u64::MAX);
    let (mut s, _) = open(dir.path(), o);
    let inc = s.incarnation();
    append_synced(&mut s, 6);
    s.ack(5).unwrap();
    s.ack(6).unwrap(); // slot 1 holds 6 (slots alternate from slot 1 after init)
    assert_eq!(s.segment_count(), 0);
    drop(s);
    let mut ack = fs::read(ack_path(dir.path())).unwrap();
    let (a, b) = (
        meta::tests_decode_slot(&ack, 0),
        meta::tests_decode_slot(&ack, 512),
    );
    let newer = if a > b { 0 } else { 512 };
    ack[newer + 3] ^= 1;
    fs::write(ack_path(dir.path()), &ack).unwrap();
    let (mut s, rec) = open(dir.path(), o);
    assert_eq!(rec.repairs.len(), 1, "{:?}", rec.repairs);
    assert_ne!(
        s.incarnation(),
        inc,
        "a new identity, so no seq can collide"
    );
    assert_eq!(s.append(&payload(1)).unwrap(), 1);
    drop(s);

    // With segments left, the damaged newer slot costs only resends from the oldest
    // segment, never a false loss report.
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), o);
    let inc = s.incarnation();
    append_synced(&mut s, 6); // segments (1,2) (3,4) (5,6)
    s.ack(2).unwrap();
    s.ack(3).unwrap(); // deletes (1,2); (3,4) stays
    drop(s);
    let mut ack = fs::read(ack_path(dir.path())).unwrap();
    let (a, b) = (
        meta::tests_decode_slot(&ack, 0),
        meta::tests_decode_slot(&ack, 512),
    );
    let newer = if a > b { 0 } else { 512 };
    ack[newer + 3] ^= 1;
    fs::write(ack_path(dir.path()), &ack).unwrap();
    let (s, rec) = open(dir.path(), o);
    assert_eq!(s.incarnation(), inc);
    assert_eq!(rec.lost_seqs, vec![], "no false loss");
    assert_eq!(
        s.acked_seq(),
        2,
        "max(readable slot 2, oldest segment 3 - 1)"
    );
    assert_eq!(read_all(&s), expected(3..=6));
}

#[test]
fn a_format_1_spool_is_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), SpoolOptions::default());
    append_synced(&mut s, 2);
    drop(s);
    // Format 1's ack file was 524 bytes (two slots, no incarnation copy).
    let ack = dir.path().join(meta::ACK_FILE);
    let old = fs::read(&ack).unwrap()[..524].to_vec();
    fs::write(&ack, old).unwrap();
    let err = Spool::open(dir.path(), SpoolOptions::default()).unwrap_err();
    assert!(err.to_string().contains("format 1"), "{err}");
    assert!(verify(dir.path()).is_err());
}

#[test]
fn appends_stop_at_the_free_disk_floor_and_go_on_below_it() {
    let dir = tempfile::tempdir().unwrap();
    let free = free_bytes(dir.path()).expect("statvfs works on this platform");
    assert!(free > 0);
    // A floor above what the disk has: refused, nothing written, seq not consumed.
    let (mut s, _) = open(
        dir.path(),
        SpoolOptions {
            min_free_bytes: free.saturating_mul(2),
            ..SpoolOptions::default()
        },
    );
    match s.append(&payload(1)) {
        Err(SpoolError::DiskLow { free: f, min, need }) => {
            assert!(f < min && min < need);
        }
        other => panic!("expected DiskLow, got {other:?}"),
    }
    assert_eq!(s.used_bytes(), 0);
    drop(s);
    // A floor the disk clears: the same append goes through as seq 1.
    let (mut s, _) = open(
        dir.path(),
        SpoolOptions {
            min_free_bytes: 1,
            ..SpoolOptions::default()
        },
    );
    assert_eq!(s.append(&payload(1)).unwrap(), 1);
    s.sync().unwrap();
    assert_eq!(read_all(&s), expected(1..=1));
}

#[test]
fn a_complete_but_damaged_last_record_is_trimmed_and_its_seq_never_reused() {
    // Nothing vouches for the last record, so damage there looks like a torn write; but
    // its length is complete, so it may have been synced and forwarded: trim it, warn,
    // and take its seq with a tombstone.
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), SpoolOptions::default());
    append_synced(&mut s, 3);
    drop(s);
    let seg = seg_files(dir.path())[0].clone();
    let mut bytes = fs::read(&seg).unwrap();
    let last = bytes.len() - 5; // inside record 3's payload
    bytes[last] ^= 0x01;
    fs::write(&seg, &bytes).unwrap();
    let (mut s, rec) = open(dir.path(), SpoolOptions::default());
    assert!(rec.suspicious_tail.is_some(), "{rec:?}");
    assert_eq!(rec.lost_seqs, vec![]);
    assert_eq!(
        read_all(&s),
        vec![(1, payload(1)), (2, payload(2)), (3, Vec::new())]
    );
    assert_eq!(s.append(&payload(4)).unwrap(), 4);
    s.sync().unwrap();
    drop(s);
    let (_, rec) = open(dir.path(), SpoolOptions::default());
    assert_eq!(rec.suspicious_tail, None, "the tombstone settled it");
}

#[test]
fn a_torn_short_tail_is_trimmed_silently_and_its_seq_reused() {
    // What kill -9 in the middle of a write leaves: a short record. It was never synced,
    // so nothing saw its seq.
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path(), SpoolOptions::default());
    append_synced(&mut s, 2);
    drop(s);
    let seg = seg_files(dir.path())[0].clone();
    let mut torn = Vec::new();
    record::encode(&mut torn, 3, 2, 20, &payload(3));
    torn.truncate(30);
    OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&torn)
        .unwrap();
    let (mut s, rec) = open(dir.path(), SpoolOptions::default());
    assert_eq!(rec.suspicious_tail, None);
    assert_eq!(rec.truncated_bytes, 30);
    assert_eq!(s.append(&payload(3)).unwrap(), 3);
}
