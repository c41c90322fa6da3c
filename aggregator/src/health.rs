//! Readiness: whether this node can accept writes right now, and why not. The writer
//! thread raises and clears reasons (a failed WAL commit, shutting down); `/readyz` (and
//! `/healthz`) and gRPC health read them. Liveness (`/livez`) is only "the process answers"
//! and never consults this. Holds no I/O of its own.

use tokio::sync::watch;

/// The WAL commit of the last batch group failed (disk full, I/O error): batches are not
/// acked until a later commit succeeds.
pub const WAL_WRITE_FAILED: &str = "wal_write_failed";
/// Reason: the exact-dedup disk tier failed; ingest is refused until a restart replays the
/// WAL.
pub const DEDUP_FAILED: &str = "dedup_failed";
/// The JetStream source cannot consume (no stream yet, a stream that is not adclick's, or
/// partitions the stream does not have).
pub const SOURCE_FAILED: &str = "source_failed";
/// A partition's stream no longer holds messages after this shard's committed position
/// (retention dropped clicks it never applied): the partition is not consumed, so no count
/// goes on silently missing them.
pub const STREAM_GAP: &str = "stream_retention_gap";
/// The aggregator is stopping.
pub const SHUTTING_DOWN: &str = "shutting_down";

/// The reasons this node is not ready (empty: ready).
#[derive(Debug)]
pub struct Readiness {
    reasons: watch::Sender<Vec<&'static str>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            reasons: watch::Sender::new(Vec::new()),
        }
    }
}

impl Readiness {
    /// Raises (`on`) or clears a reason; watchers are told only about changes. Callable from
    /// any thread, never blocks on I/O.
    pub fn set(&self, reason: &'static str, on: bool) {
        self.reasons.send_if_modified(|r| {
            let has = r.contains(&reason);
            if on && !has {
                r.push(reason);
                true
            } else if !on && has {
                r.retain(|x| *x != reason);
                true
            } else {
                false
            }
        });
    }

    /// Why the node is not ready (empty when it is).
    pub fn reasons(&self) -> Vec<&'static str> {
        self.reasons.borrow().clone()
    }

    /// Ready when no reason is raised.
    pub fn is_ready(&self) -> bool {
        self.reasons.borrow().is_empty()
    }

    /// Change notifications (for gRPC health).
    pub fn subscribe(&self) -> watch::Receiver<Vec<&'static str>> {
        self.reasons.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_raised_once_and_cleared() {
        let r = Readiness::default();
        assert!(r.is_ready());
        r.set(WAL_WRITE_FAILED, true);
        r.set(WAL_WRITE_FAILED, true);
        assert_eq!(r.reasons(), vec![WAL_WRITE_FAILED]);
        r.set(SHUTTING_DOWN, true);
        r.set(WAL_WRITE_FAILED, false);
        assert_eq!(r.reasons(), vec![SHUTTING_DOWN]);
        r.set(SHUTTING_DOWN, false);
        assert!(r.is_ready());
    }
}
