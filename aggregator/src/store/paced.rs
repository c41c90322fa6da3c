//! Paced writes for the large files written behind the apply path (checkpoint files, dedup
//! runs, click index segments: 25-50 MB each at 200k clicks/s): a `sync_data` after every
//! [`PACE_BYTES`] written, so that the final `sync_all` finds little left to write.
//!
//! Written whole and synced once, such a file put tens of MB in the disk's queue at once,
//! and the small fsyncs the ack path waits for (the aggregator's WAL group commits, the
//! collectors' spool commits on the same disk) waited behind it: 100-230 ms, the
//! click -> queryable tail around each checkpoint in `adclick bench pipeline`. In steps of
//! a few MB they wait behind one step at most. The files' contents and their crash safety
//! (written to a temporary name, synced, renamed, directory synced) are unchanged.
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

/// Counts the bytes written to a file and syncs its data every [`PACE_BYTES`].
#[derive(Debug, Default)]
pub struct Pacer {
    unsynced: u64,
}

impl Pacer {
    /// `n` more bytes were written to `file`.
    pub fn wrote(&mut self, file: &File, n: usize) -> io::Result<()> {
        self.unsynced += n as u64;
        if self.unsynced >= PACE_BYTES {
            self.unsynced = 0;
            file.sync_data()?;
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
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&*self.file).write(buf)?;
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

    /// The bytes arrive whole and in order, whatever the write sizes, across many paces.
    #[test]
    fn paced_writes_keep_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let data: Vec<u8> = (0..(3 * PACE_BYTES as usize + 12_345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut w = io::BufWriter::with_capacity(1 << 20, Paced::new(&file));
        for chunk in data.chunks(777_777) {
            w.write_all(chunk).unwrap();
        }
        w.flush().unwrap();
        drop(w);
        file.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        remove_file(&path).unwrap();
        assert!(!path.exists());
        let missing = remove_file(&path).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
