//! The quarantine log: every rejected click, with its reason, appended as a JSON line to
//! `<data_dir>/quarantine.jsonl` (rotated to `.1` at the size bound). Written by its own
//! thread so a slow disk never stalls ingest; when the writer falls behind, records are
//! counted as `quarantine_dropped` (the click is still counted by reason in the metrics).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// One rejected click.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// Stable reason label (as in the metrics).
    pub reason: &'static str,
    /// Human-readable detail.
    pub detail: String,
    /// The token text, truncated to 256 characters.
    pub token: String,
    /// Device timestamps as sent.
    pub occurred_at_ms: i64,
    /// Device send time as sent.
    pub sent_at_ms: i64,
}

struct Entry {
    at_ms: i64,
    ip: Option<IpAddr>,
    rejected: Vec<Rejected>,
}

/// Handle to the quarantine writer.
#[derive(Debug, Clone)]
pub struct Quarantine {
    tx: mpsc::Sender<Entry>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("n", &self.rejected.len())
            .finish()
    }
}

impl Quarantine {
    /// Starts the writer thread on `<dir>/quarantine.jsonl`.
    pub fn start(dir: &Path, max_bytes: u64, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let path = dir.join("quarantine.jsonl");
        let (tx, mut rx) = mpsc::channel::<Entry>(4096);
        let mut sink = Sink::open(path, max_bytes)?;
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("adclick-quarantine".into())
            .spawn(move || {
                while let Some(entry) = rx.blocking_recv() {
                    let n = entry.rejected.len() as u64;
                    match sink.write(&entry) {
                        Ok(()) => {
                            m.quarantined.inc_by(n);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "quarantine log write failed");
                            m.quarantine_dropped.inc_by(n);
                        }
                    }
                }
                let _ = sink.out.flush();
            })?;
        Ok(Quarantine { tx, metrics })
    }

    /// Queues rejected clicks for the log; never blocks.
    pub fn record(&self, at_ms: i64, ip: Option<IpAddr>, rejected: Vec<Rejected>) {
        if rejected.is_empty() {
            return;
        }
        let n = rejected.len() as u64;
        if self
            .tx
            .try_send(Entry {
                at_ms,
                ip,
                rejected,
            })
            .is_err()
        {
            self.metrics.quarantine_dropped.inc_by(n);
        }
    }
}

struct Sink {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    max: u64,
}

impl Sink {
    fn open(path: PathBuf, max: u64) -> std::io::Result<Self> {
        let f = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = f.metadata()?.len();
        Ok(Sink {
            path,
            out: BufWriter::new(f),
            size,
            max: max.max(4096),
        })
    }

    fn write(&mut self, e: &Entry) -> std::io::Result<()> {
        for r in &e.rejected {
            let line = serde_json::json!({
                "at_ms": e.at_ms,
                "ip": e.ip.map(|i| i.to_string()),
                "reason": r.reason,
                "detail": r.detail,
                "token": r.token,
                "occurred_at_ms": r.occurred_at_ms,
                "sent_at_ms": r.sent_at_ms,
            })
            .to_string();
            if self.size + line.len() as u64 + 1 > self.max {
                self.rotate()?;
            }
            self.out.write_all(line.as_bytes())?;
            self.out.write_all(b"\n")?;
            self.size += line.len() as u64 + 1;
        }
        self.out.flush()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        std::fs::rename(&self.path, self.path.with_extension("jsonl.1"))?;
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.out = BufWriter::new(f);
        self.size = 0;
        Ok(())
    }
}
