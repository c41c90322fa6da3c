//! The forwarding window: the spool records in flight and which destinations still owe an
//! ack for each. Pure bookkeeping (no I/O): it says up to where the spool may be truncated
//! (the contiguous prefix of records every owning destination acked) and each
//! destination's `acked_floor`.

use std::collections::VecDeque;

/// One record in flight.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) seq: u64,
    /// Destinations whose batch of this record is not acked yet.
    pub(super) waiting: Vec<usize>,
    /// Its payload size (for `MAX_IN_FLIGHT_BYTES`).
    pub(super) bytes: usize,
}

/// The records in flight, ascending: from the lowest one not acked by every owner up to
/// the last one read.
#[derive(Debug)]
pub(super) struct Window {
    pub(super) slots: VecDeque<Slot>,
    /// Next seq to read.
    pub(super) next: u64,
    /// Payload bytes of `slots`.
    pub(super) bytes: usize,
    /// Highest seq whose record and every record below it are complete (to ack).
    pub(super) complete_to: u64,
    /// Highest seq the spool has acked.
    pub(super) acked: u64,
}

impl Window {
    pub(super) fn new(acked: u64) -> Self {
        Window {
            slots: VecDeque::new(),
            next: acked.saturating_add(1),
            bytes: 0,
            complete_to: acked,
            acked,
        }
    }

    /// The `acked_floor` for `dest` of a batch of the next record: the lowest seq `dest`
    /// still owes an ack for, else the next record's (every record below it was acked by
    /// `dest` or had nothing for it).
    pub(super) fn floor(&self, dest: usize) -> u64 {
        self.slots
            .iter()
            .find(|s| s.waiting.contains(&dest))
            .map_or(self.next, |s| s.seq)
    }

    /// Appends the record `seq` (read in order), owed by `waiting`.
    pub(super) fn push(&mut self, seq: u64, waiting: Vec<usize>, bytes: usize) {
        self.slots.push_back(Slot {
            seq,
            waiting,
            bytes,
        });
        self.bytes += bytes;
        self.next = seq.saturating_add(1);
    }

    /// `dest` acked `seq`.
    pub(super) fn acked_by(&mut self, seq: u64, dest: usize) {
        if let Ok(i) = self.slots.binary_search_by_key(&seq, |s| s.seq) {
            self.slots[i].waiting.retain(|x| *x != dest);
        }
    }

    /// Drops complete records from the front; true if any went.
    pub(super) fn pop_complete(&mut self) -> bool {
        let mut popped = false;
        while let Some(front) = self.slots.front() {
            if !front.waiting.is_empty() {
                break;
            }
            self.complete_to = front.seq;
            self.bytes = self.bytes.saturating_sub(front.bytes);
            self.slots.pop_front();
            popped = true;
        }
        popped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_acks_only_the_contiguous_complete_prefix() {
        let mut w = Window::new(4);
        assert_eq!((w.next, w.floor(0)), (5, 5));
        for (seq, waiting) in [(5, &[0, 1][..]), (6, &[1]), (7, &[0]), (8, &[])] {
            w.push(seq, waiting.to_vec(), 10);
        }
        assert_eq!((w.floor(0), w.floor(1), w.floor(2)), (5, 5, 9));
        // Out of order: 7 and 6 complete first; nothing below 5 moves.
        w.acked_by(7, 0);
        w.acked_by(6, 1);
        assert!(!w.pop_complete());
        assert_eq!(w.complete_to, 4);
        w.acked_by(5, 0);
        assert_eq!((w.floor(0), w.floor(1)), (9, 5));
        assert!(!w.pop_complete());
        // A repeated or unknown ack changes nothing.
        w.acked_by(5, 0);
        w.acked_by(99, 1);
        w.acked_by(5, 1);
        assert!(w.pop_complete());
        assert_eq!((w.complete_to, w.slots.len(), w.bytes), (8, 0, 0));
        assert_eq!(w.floor(1), 9);
    }
}
