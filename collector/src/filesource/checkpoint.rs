//! A file source's positions on disk: `<name>.pos.0` and `<name>.pos.1`, written in turn,
//! each `generation (u64 LE) | crc32 (u32 LE) of the rest | JSON`. A write goes to the
//! slot not holding the newest copy and is fsynced, so a crash mid-write leaves the other
//! slot intact; a load takes the valid slot with the higher generation. Slots present but
//! both damaged are refused (naming the files) rather than read as "no positions", which
//! would read every file again from its start.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where one file stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePos {
    /// Offset after the last line whose clicks are durable.
    pub offset: u64,
    /// Its path when last seen (for operators).
    pub path: String,
    /// When it was last seen (ms); positions unseen for a day are dropped.
    pub seen_ms: i64,
}

/// Every position of one source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Positions {
    /// Write generation.
    pub generation: u64,
    /// Highest spool seq committed with these positions (markers after it are newer).
    pub spool_seq: u64,
    /// By fingerprint.
    pub files: BTreeMap<u64, FilePos>,
}

/// The two slots of a position file.
#[derive(Debug, Clone)]
pub struct PositionsFile {
    base: PathBuf,
}

fn slot(base: &std::path::Path, i: u64) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

impl PositionsFile {
    /// The slots `<base>.0` and `<base>.1`.
    pub fn new(base: PathBuf) -> Self {
        PositionsFile { base }
    }

    /// The newest valid copy; empty when neither slot exists.
    pub fn load(&self) -> Result<Positions, String> {
        let mut best: Option<Positions> = None;
        let mut damaged = Vec::new();
        for i in 0..2 {
            let p = slot(&self.base, i);
            let bytes = match std::fs::read(&p) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {e}", p.display())),
            };
            match decode(&bytes) {
                Some(pos) => {
                    if best.as_ref().is_none_or(|b| pos.generation > b.generation) {
                        best = Some(pos);
                    }
                }
                None => damaged.push(p.display().to_string()),
            }
        }
        match best {
            Some(b) => {
                if !damaged.is_empty() {
                    tracing::warn!(files = ?damaged, "file source: a position slot is damaged (a write cut short); using the other");
                }
                Ok(b)
            }
            None if damaged.is_empty() => Ok(Positions::default()),
            None => Err(format!(
                "file source positions {damaged:?} are damaged: refusing to guess where the files \
                 were read up to. Move them aside to read every matching file from its start \
                 again (the aggregator's exact dedup drops the clicks already counted)"
            )),
        }
    }

    /// Writes `p` (with the next generation) to the older slot, durably.
    pub fn save(&self, p: &mut Positions) -> Result<(), String> {
        p.generation += 1;
        super::prune(&mut p.files, crate::http::now_ms());
        let json = serde_json::to_vec(p).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(json.len() + 12);
        out.extend_from_slice(&p.generation.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
        out.extend_from_slice(&json);
        let path = slot(&self.base, p.generation % 2);
        let mut f = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        f.write_all(&out)
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if p.generation <= 2 {
            // The slot's directory entry is new: make it durable too.
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
            }
        }
        Ok(())
    }
}

fn decode(b: &[u8]) -> Option<Positions> {
    if b.len() < 12 {
        return None;
    }
    let generation = u64::from_le_bytes(b[..8].try_into().ok()?);
    let crc = u32::from_le_bytes(b[8..12].try_into().ok()?);
    if crc32fast::hash(&b[12..]) != crc {
        return None;
    }
    let p: Positions = serde_json::from_slice(&b[12..]).ok()?;
    (p.generation == generation).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_valid_slot_wins_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = PositionsFile::new(dir.path().join("s.pos"));
        assert_eq!(f.load().unwrap(), Positions::default());
        let mut p = Positions::default();
        p.files.insert(
            7,
            FilePos {
                offset: 10,
                path: "a".into(),
                seen_ms: crate::http::now_ms(),
            },
        );
        f.save(&mut p).unwrap();
        p.files.get_mut(&7).unwrap().offset = 20;
        f.save(&mut p).unwrap();
        assert_eq!(f.load().unwrap().files[&7].offset, 20);
        // A torn write of the newest slot: the older one is used.
        let newest = slot(&f.base, p.generation % 2);
        let mut b = std::fs::read(&newest).unwrap();
        b.truncate(b.len() - 3);
        std::fs::write(&newest, &b).unwrap();
        assert_eq!(f.load().unwrap().files[&7].offset, 10);
        // Both damaged: refused.
        let other = slot(&f.base, (p.generation + 1) % 2);
        std::fs::write(&other, b"garbage-garbage").unwrap();
        assert!(f.load().unwrap_err().contains("damaged"));
    }
}
