//! The aggregator's redb store under damage: bytes flipped and a 4 KiB page zeroed at many
//! places in a real store file. Every open must either refuse with an error naming the file
//! (never a panic, never a crash loop) or read back exactly what was written; the
//! aggregator itself refuses to start on a damaged store.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use adclick_aggregator::store::{RedbStore, STORE_FILE, Store, WalEntry};

/// What a reader must see: the WAL rows and the per-collector high-water marks.
type Contents = (Vec<(u64, Vec<u8>)>, HashMap<String, u64>);

/// Writes a store with `n` WAL batches from two collectors and returns what a reader must
/// see: the WAL rows and the high-water marks.
fn write_store(dir: &Path, n: u64) -> Contents {
    let mut store = RedbStore::open(dir).unwrap();
    let mut wal = Vec::new();
    let mut hwm = HashMap::new();
    for pos in 1..=n {
        let collector = format!("c{}", pos % 2);
        let batch: Vec<u8> = (0..200).map(|i| (pos * 31 + i) as u8).collect();
        store
            .append(&[WalEntry {
                pos,
                collector_id: collector.clone(),
                seq: pos,
                acked_floor: 0,
                batch: batch.clone(),
            }])
            .unwrap();
        wal.push((pos, batch));
        hwm.insert(collector, pos);
    }
    (wal, hwm)
}

/// Opens the store and reads everything; `Err` carries the open error's text.
fn read_back(dir: &Path) -> Result<Contents, String> {
    let store = RedbStore::open(dir).map_err(|e| e.to_string())?;
    let wal = store.wal_after(0).map_err(|e| e.to_string())?;
    let hwm = store.high_water_marks().map_err(|e| e.to_string())?;
    Ok((wal, hwm))
}

#[test]
fn damaged_store_is_refused_or_read_exactly_never_wrong() {
    let pristine_dir = tempfile::tempdir().unwrap();
    let expected = write_store(pristine_dir.path(), 300);
    let pristine = fs::read(pristine_dir.path().join(STORE_FILE)).unwrap();
    let len = pristine.len();
    let mut refused = 0;
    let mut intact = 0;
    // Positions spread over the whole file; both kinds of damage at each.
    for k in 0..48usize {
        let pos = (k * 7919 * 13) % len;
        for zero_page in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = pristine.clone();
            if zero_page {
                let start = pos / 4096 * 4096;
                let end = (start + 4096).min(len);
                bytes[start..end].fill(0);
            } else {
                bytes[pos] ^= 0x5a;
            }
            if bytes == pristine {
                continue;
            }
            fs::write(dir.path().join(STORE_FILE), &bytes).unwrap();
            match read_back(dir.path()) {
                Ok(got) => {
                    // Damage in free space: harmless, and it must read back exactly.
                    assert_eq!(
                        got, expected,
                        "damage at {pos} (page: {zero_page}) changed state"
                    );
                    intact += 1;
                }
                Err(msg) => {
                    assert!(msg.contains(STORE_FILE), "error must name the file: {msg}");
                    refused += 1;
                }
            }
        }
    }
    // Both outcomes happen: the check is not vacuous.
    assert!(refused > 10, "refused {refused}, intact {intact}");
}

#[test]
fn aggregator_refuses_to_start_on_a_damaged_store() {
    let dir = tempfile::tempdir().unwrap();
    let expected = write_store(dir.path(), 50);
    assert_eq!(read_back(dir.path()).unwrap(), expected);
    let path = dir.path().join(STORE_FILE);
    let mut bytes = fs::read(&path).unwrap();
    // Invert every byte after the first page: certainly damaged committed pages.
    for b in &mut bytes[4096..] {
        *b ^= 0xff;
    }
    fs::write(&path, &bytes).unwrap();
    let err = adclick_aggregator::store::check(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("integrity") && err.contains(STORE_FILE),
        "{err}"
    );
    // The same refusal from the server's own open, with the recovery steps.
    let err = RedbStore::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("Recovery"), "{err}");
}
