//! Paced writes for the large files written behind the apply path (checkpoint files, dedup
//! runs, click index segments: 25-50 MB each at 200k clicks/s): a `sync_data` after every
//! [`PACE_BYTES`] written, so that the final `sync_all` finds little left to write.
//!
//! Written whole and synced once, such a file put tens of MB in the disk's queue at once,
//! and the small fsyncs the ack path waits for (the aggregator's WAL group commits, the
//! collectors' spool commits on the same disk) waited behind it: 100-230 ms, the
//! click -> queryable tail around each checkpoint in `adclick bench pipeline`. In steps of
//! a few MB they wait behind one step at most. The files' contents and their crash safety
//! are unchanged (runs and segments are written to a temporary name, synced and renamed;
//! a checkpoint file becomes current only once the store commits its name, length and
//! hash).
//!
//! Deleting such a file does the same on a file system mounted with `discard` (these
//! machines' ext4): the blocks freed at once are trimmed in the next journal commit, which
//! a small fsync then waits for (12-16 ms for 64 MB here, 1.3-1.6 ms when shrunk a step at
//! a time first). [`remove_file`] shrinks a file a step at a time before unlinking it:
//! only for files nothing reads any more (an open reader would see it shrink).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Bytes written between two `sync_data` calls.
pub const PACE_BYTES: u64 = 4 << 20;

/// Counts the bytes written to a file and syncs its data every [`PACE_BYTES`] (callers
/// write at most [`Pacer::room`] bytes at a time, so that no step is larger).
#[derive(Debug, Default)]
pub struct Pacer {
    unsynced: u64,
    /// `sync_data` calls so far.
    syncs: u64,
}

impl Pacer {
    /// Bytes that may be written before the next sync.
    pub fn room(&self) -> usize {
        usize::try_from(PACE_BYTES.saturating_sub(self.unsynced)).unwrap_or(usize::MAX)
    }

    /// `n` more bytes were written to `file`.
    pub fn wrote(&mut self, file: &File, n: usize) -> io::Result<()> {
        self.unsynced += n as u64;
        if self.unsynced >= PACE_BYTES {
            self.unsynced = 0;
            self.syncs += 1;
            file.sync_data()?;
        }
        Ok(())
    }

    /// Writes all of `buf` to `file` in steps of at most [`Pacer::room`].
    pub fn write_all(&mut self, file: &File, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let step = buf.len().min(self.room());
            (&*file).write_all(&buf[..step])?;
            self.wrote(file, step)?;
            buf = &buf[step..];
        }
        Ok(())
    }
}

/// A [`Write`] to a file with a [`Pacer`] (put a `BufWriter` in front of it).
#[derive(Debug)]
pub struct Paced<'a> {
    file: &'a File,
    pacer: Pacer,
}

impl<'a> Paced<'a> {
    /// Paced writes to `file`.
    pub fn new(file: &'a File) -> Self {
        Paced {
            file,
            pacer: Pacer::default(),
        }
    }
}

impl Write for Paced<'_> {
    /// At most the bytes left before the next sync: a `BufWriter` hands a write larger
    /// than its buffer (a checkpoint table of several MB) straight through.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let step = buf.len().min(self.pacer.room());
        let n = (&*self.file).write(&buf[..step])?;
        self.pacer.wrote(self.file, n)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.file).flush()
    }
}

/// Deletes `path`, shrinking it [`PACE_BYTES`] at a time first (synced after each step).
/// Only for a file no one has open for reading. A failed step leaves the rest to the
/// unlink.
pub fn remove_file(path: &Path) -> io::Result<()> {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
        let mut len = f.metadata().map_or(0, |m| m.len());
        while len > PACE_BYTES {
            len -= PACE_BYTES;
            if f.set_len(len).and_then(|()| f.sync_data()).is_err() {
                break;
            }
        }
    }
    std::fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes arrive whole and in order, whatever the write sizes (small ones through
    /// the buffer, ones larger than the buffer or a pace handed straight through), with a
    /// sync every [`PACE_BYTES`].
    #[test]
    fn paced_writes_keep_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let data: Vec<u8> = (0..(3 * PACE_BYTES as usize + 12_345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut w = io::BufWriter::with_capacity(1 << 20, Paced::new(&file));
        let (small, large) = data.split_at(777_777 * 3);
        for chunk in small.chunks(777_777) {
            w.write_all(chunk).unwrap();
        }
        // One write of over two paces (a checkpoint table).
        w.write_all(large).unwrap();
        w.flush().unwrap();
        assert_eq!(w.get_ref().pacer.syncs, data.len() as u64 / PACE_BYTES);
        drop(w);
        file.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        // The same through `Pacer::write_all` (the dedup runs' writer).
        let path2 = dir.path().join("g");
        let file2 = File::create(&path2).unwrap();
        let mut pacer = Pacer::default();
        pacer.write_all(&file2, &data).unwrap();
        assert_eq!(pacer.syncs, data.len() as u64 / PACE_BYTES);
        assert_eq!(std::fs::read(&path2).unwrap(), data);
        remove_file(&path).unwrap();
        assert!(!path.exists());
        let missing = remove_file(&path).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
