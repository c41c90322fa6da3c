//! The offline-queue trait: where a tracker persists unsent clicks so they survive a
//! restart. The [`super::Outbox`] keeps the working copy in memory and tells the store
//! what was appended and what was removed (a journal), so stores stay simple: a file
//! (native), `localStorage` (browser), or nothing ([`MemoryQueue`]).

use adclick_proto::v1;

/// A queued click with its queue sequence number (unique, increasing per queue).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredClick {
    /// Position in the queue; survives restarts.
    pub seq: u64,
    /// The click, with its original `occurred_at_ms` (and `sent_at_ms` unset).
    pub click: v1::Click,
}

/// A persistence failure. The outbox keeps the click in memory and counts the failure:
/// a broken disk costs durability across restarts, never the clicks of this run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The store could not be read or written.
    #[error("offline queue I/O error: {0}")]
    Io(String),
    /// Another process holds the store.
    #[error("offline queue is locked by another process: {0}")]
    Locked(String),
}

/// Durable storage for unsent clicks.
pub trait OfflineQueue {
    /// Everything stored, oldest first. Called once when the tracker starts.
    fn load(&mut self) -> Result<Vec<StoredClick>, QueueError>;
    /// Persists a newly queued click.
    fn append(&mut self, click: &StoredClick) -> Result<(), QueueError>;
    /// Forgets clicks that were delivered, rejected for good, or evicted.
    fn remove(&mut self, seqs: &[u64]) -> Result<(), QueueError>;
}

impl<T: OfflineQueue + ?Sized> OfflineQueue for Box<T> {
    fn load(&mut self) -> Result<Vec<StoredClick>, QueueError> {
        (**self).load()
    }
    fn append(&mut self, click: &StoredClick) -> Result<(), QueueError> {
        (**self).append(click)
    }
    fn remove(&mut self, seqs: &[u64]) -> Result<(), QueueError> {
        (**self).remove(seqs)
    }
}

/// No persistence: unsent clicks live only in memory.
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryQueue;

impl OfflineQueue for MemoryQueue {
    fn load(&mut self) -> Result<Vec<StoredClick>, QueueError> {
        Ok(Vec::new())
    }
    fn append(&mut self, _: &StoredClick) -> Result<(), QueueError> {
        Ok(())
    }
    fn remove(&mut self, _: &[u64]) -> Result<(), QueueError> {
        Ok(())
    }
}
