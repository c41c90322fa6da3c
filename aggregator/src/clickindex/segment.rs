//! One immutable click-index file: the clicks of WAL positions `(from, upto]`, aggregated
//! per key, in two sorted sections read with positioned reads and binary search (no file
//! is ever read whole, none is mapped: the crate forbids `unsafe`).
//!
//! Layout (little-endian), `<from:020>-<upto:020>.seg`:
//!
//! ```text
//! header   64 B: "ADCLIX01", from u64, upto u64, min_minute u32, max_minute u32,
//!                n_users u32, n_ip u32, n_user u32, blob_len u64, 0 u64, crc32(header[..60])
//! users    n_users x 16 B: xxh64(user) u64, offset u32, len u32 — sorted by (hash, bytes)
//! blob     the user ids' bytes
//! by ip    n_ip x 48 B: ip [16], minute u32, ad u64, combo u32, user u32 (index into users,
//!          u32::MAX: none), clicks u32, xxh64(user) u64 (0: none; unique users without a
//!          read of the user table) — sorted by (ip, minute, ad, combo, user)
//! by user  n_user x 24 B: user u32, minute u32, ad u64, combo u32, clicks u32 — sorted
//! ```
//!
//! Written to `<name>.tmp`, fsynced, renamed, and the directory fsynced: a file under its
//! final name is complete. Its header (CRC) and length are checked at open; a damaged one
//! stops the start with the file named (see `docs/operations.md`).

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Hit, Ip, Probe};
use crate::sketch::hll::hash_user_id;

const MAGIC: &[u8; 8] = b"ADCLIX01";
const HEADER: u64 = 64;
const USER_ENTRY: u64 = 16;
const IP_REC: u64 = 48;
const USER_REC: u64 = 24;
const NO_USER: u32 = u32::MAX;
/// Records read per positioned read while scanning a run.
const BLOCK: u64 = 128;

/// A click-index file that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// An I/O error on a file.
    #[error("click index {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A file whose header or length is wrong.
    #[error(
        "click index file {path} is damaged ({why}); refusing to start. Recovery: stop, move \
         the click_index directory aside and start again (ip/user filters then miss the \
         clicks counted before; see docs/operations.md, 'Click index damage')"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A probe the stored form cannot answer (the request is at fault, not the files).
    #[error("{0}")]
    Unsupported(String),
}

impl SegmentError {
    pub(super) fn io(path: &Path, source: std::io::Error) -> Self {
        SegmentError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// File name of the segment covering WAL positions `(from, upto]`.
pub fn name(from: u64, upto: u64) -> String {
    format!("{from:020}-{upto:020}.seg")
}

/// `(from, upto)` of a segment file name.
pub fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (a, b) = name.strip_suffix(".seg")?.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// One click to write.
#[derive(Debug, Clone, Copy)]
pub struct Click<'a> {
    /// Client IP key, if known.
    pub ip: Option<Ip>,
    /// User id (empty: none).
    pub user: &'a [u8],
    /// Minute since the epoch.
    pub minute: u32,
    /// Ad.
    pub ad: u64,
    /// Combination id.
    pub combo: u32,
}

/// A user id and its hash, keyed in a map by the hash alone (computed once per click).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UserKey<'a> {
    hash: u64,
    bytes: &'a [u8],
}

impl Hash for UserKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The hasher of [`UserKey`]s: the user id's xxh64 is the map's hash.
#[derive(Debug, Default)]
struct HashIsKey(u64);

impl Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for `UserKey`; a plain fold keeps it a hasher.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = x;
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Writes a segment durably and opens it.
///
/// `clicks` is read twice (the caller's clicks are not copied into one vector first: the
/// writer's scratch is ~70 bytes per click, every byte of it fresh pages the kernel
/// zeroes, which was a third of this thread's time); `n_clicks` sizes the buffers.
pub fn write<'a>(
    path: &Path,
    from: u64,
    upto: u64,
    clicks: impl Iterator<Item = Click<'a>> + Clone,
    n_clicks: usize,
) -> Result<Segment, SegmentError> {
    let io = |e| SegmentError::io(path, e);
    // Users: each click's user id hashed once and numbered in order of first sight (a map
    // keyed by that hash), then the distinct ones sorted by (hash, bytes) and renumbered.
    let mut seen: HashMap<UserKey<'_>, u32, BuildHasherDefault<HashIsKey>> = HashMap::default();
    let mut distinct: Vec<(u64, &[u8], u32)> = Vec::new();
    let mut first_seen: Vec<u32> = Vec::with_capacity(n_clicks);
    for c in clicks.clone() {
        if c.user.is_empty() {
            first_seen.push(NO_USER);
            continue;
        }
        let k = UserKey {
            hash: hash_user_id(c.user),
            bytes: c.user,
        };
        let next = u32::try_from(distinct.len()).unwrap_or(NO_USER);
        let n = *seen.entry(k).or_insert_with(|| {
            distinct.push((k.hash, k.bytes, next));
            next
        });
        first_seen.push(n);
    }
    drop(seen);
    distinct.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut rank = vec![NO_USER; distinct.len()];
    for (i, u) in distinct.iter().enumerate() {
        if let Some(r) = rank.get_mut(u.2 as usize) {
            *r = u32::try_from(i).unwrap_or(NO_USER);
        }
    }
    let users: Vec<(u64, &[u8])> = distinct.iter().map(|u| (u.0, u.1)).collect();
    drop(distinct);
    // The IP as two big-endian halves (the order of its bytes; 8-aligned, 40-byte items).
    let mut by_ip: Vec<(u64, u64, u32, u64, u32, u32)> = Vec::with_capacity(n_clicks);
    let mut by_user: Vec<(u32, u32, u64, u32)> = Vec::with_capacity(n_clicks);
    let (mut min_minute, mut max_minute) = (u32::MAX, 0u32);
    for (c, n) in clicks.zip(first_seen) {
        let u = rank.get(n as usize).copied().unwrap_or(NO_USER);
        min_minute = min_minute.min(c.minute);
        max_minute = max_minute.max(c.minute);
        if let Some(ip) = c.ip {
            let ip = u128::from_be_bytes(ip);
            by_ip.push(((ip >> 64) as u64, ip as u64, c.minute, c.ad, c.combo, u));
        }
        if u != NO_USER {
            by_user.push((u, c.minute, c.ad, c.combo));
        }
    }
    drop(rank);
    // Integer keys: no `memcmp` per comparison. (LSD radix sorts of these 40- and 24-byte
    // tuples were slower: a dozen passes that each move every tuple.)
    by_ip.sort_unstable();
    by_user.sort_unstable();
    // Equal tuples are one record with their count.
    let runs =
        |n: usize, same: &dyn Fn(usize) -> bool| (0..n).filter(|&i| i == 0 || !same(i)).count();
    let n_ip_runs = runs(by_ip.len(), &|i| by_ip[i - 1] == by_ip[i]);
    let n_user_runs = runs(by_user.len(), &|i| by_user[i - 1] == by_user[i]);
    let blob_len: u64 = users.iter().map(|(_, u)| u.len() as u64).sum();

    let mut header = [0u8; HEADER as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&from.to_le_bytes());
    header[16..24].copy_from_slice(&upto.to_le_bytes());
    header[24..28].copy_from_slice(&min_minute.to_le_bytes());
    header[28..32].copy_from_slice(&max_minute.to_le_bytes());
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    header[32..36].copy_from_slice(&count(users.len()).to_le_bytes());
    header[36..40].copy_from_slice(&count(n_ip_runs).to_le_bytes());
    header[40..44].copy_from_slice(&count(n_user_runs).to_le_bytes());
    header[44..52].copy_from_slice(&blob_len.to_le_bytes());
    let crc = crc32fast::hash(&header[..60]);
    header[60..64].copy_from_slice(&crc.to_le_bytes());

    let tmp = path.with_extension("seg.tmp");
    let file = File::create(&tmp).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, crate::store::paced::Paced::new(&file));
    w.write_all(&header).map_err(io)?;
    let mut off = 0u32;
    for (hash, u) in &users {
        w.write_all(&hash.to_le_bytes()).map_err(io)?;
        w.write_all(&off.to_le_bytes()).map_err(io)?;
        w.write_all(&count(u.len()).to_le_bytes()).map_err(io)?;
        off = off.saturating_add(count(u.len()));
    }
    for (_, u) in &users {
        w.write_all(u).map_err(io)?;
    }
    for run in by_ip.chunk_by(|a, b| a == b) {
        let (hi, lo, minute, ad, combo, user) = run[0];
        let n = count(run.len());
        let mut r = [0u8; IP_REC as usize];
        r[..8].copy_from_slice(&hi.to_be_bytes());
        r[8..16].copy_from_slice(&lo.to_be_bytes());
        r[16..20].copy_from_slice(&minute.to_le_bytes());
        r[20..28].copy_from_slice(&ad.to_le_bytes());
        r[28..32].copy_from_slice(&combo.to_le_bytes());
        r[32..36].copy_from_slice(&user.to_le_bytes());
        r[36..40].copy_from_slice(&n.to_le_bytes());
        let hash = users.get(user as usize).map_or(0, |(h, _)| *h);
        r[40..48].copy_from_slice(&hash.to_le_bytes());
        w.write_all(&r).map_err(io)?;
    }
    for run in by_user.chunk_by(|a, b| a == b) {
        let (user, minute, ad, combo) = run[0];
        let n = count(run.len());
        let mut r = [0u8; USER_REC as usize];
        r[..4].copy_from_slice(&user.to_le_bytes());
        r[4..8].copy_from_slice(&minute.to_le_bytes());
        r[8..16].copy_from_slice(&ad.to_le_bytes());
        r[16..20].copy_from_slice(&combo.to_le_bytes());
        r[20..24].copy_from_slice(&n.to_le_bytes());
        w.write_all(&r).map_err(io)?;
    }
    w.flush().map_err(io)?;
    drop(w);
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| SegmentError::io(dir, e))?;
    }
    Segment::open(path, from, upto)
}

/// An open segment.
#[derive(Debug)]
pub struct Segment {
    path: PathBuf,
    file: File,
    upto: u64,
    min_minute: u32,
    max_minute: u32,
    n_users: u64,
    n_ip: u64,
    n_user: u64,
    blob_off: u64,
    ip_off: u64,
    user_off: u64,
    len: u64,
}

impl Segment {
    /// Opens a segment, checking its header and length.
    pub fn open(path: &Path, from: u64, upto: u64) -> Result<Self, SegmentError> {
        let io = |e| SegmentError::io(path, e);
        let damaged = |why: String| SegmentError::Damaged {
            path: path.to_path_buf(),
            why,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut h = [0u8; HEADER as usize];
        if len < HEADER {
            return Err(damaged(format!("{len} bytes, shorter than its header")));
        }
        file.read_exact_at(&mut h, 0).map_err(io)?;
        if &h[..8] != MAGIC || crc32fast::hash(&h[..60]) != u32_at(&h, 60) {
            return Err(damaged("bad header".into()));
        }
        if u64_at(&h, 8) != from || u64_at(&h, 16) != upto {
            return Err(damaged("its positions differ from its name".into()));
        }
        let n_users = u64::from(u32_at(&h, 32));
        let n_ip = u64::from(u32_at(&h, 36));
        let n_user = u64::from(u32_at(&h, 40));
        let blob_len = u64_at(&h, 44);
        let blob_off = HEADER + n_users * USER_ENTRY;
        let ip_off = blob_off.saturating_add(blob_len);
        let user_off = ip_off + n_ip * IP_REC;
        let want = user_off + n_user * USER_REC;
        if want != len {
            return Err(damaged(format!("{len} bytes, its header says {want}")));
        }
        Ok(Segment {
            path: path.to_path_buf(),
            file,
            upto,
            min_minute: u32_at(&h, 24),
            max_minute: u32_at(&h, 28),
            n_users,
            n_ip,
            n_user,
            blob_off,
            ip_off,
            user_off,
            len,
        })
    }

    /// Last WAL position covered.
    pub fn upto(&self) -> u64 {
        self.upto
    }

    /// Newest minute held.
    pub fn max_minute(&self) -> u32 {
        self.max_minute
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no click.
    pub fn is_empty(&self) -> bool {
        self.n_ip == 0 && self.n_user == 0
    }

    fn read(&self, buf: &mut [u8], at: u64) -> Result<(), SegmentError> {
        self.file
            .read_exact_at(buf, at)
            .map_err(|e| SegmentError::io(&self.path, e))
    }

    /// (hash, bytes) of user `i`.
    fn user(&self, i: u64) -> Result<(u64, Vec<u8>), SegmentError> {
        let mut e = [0u8; USER_ENTRY as usize];
        self.read(&mut e, HEADER + i * USER_ENTRY)?;
        let (off, len) = (u64::from(u32_at(&e, 8)), u32_at(&e, 12) as usize);
        let mut b = vec![0u8; len];
        self.read(&mut b, self.blob_off + off)?;
        Ok((u64_at(&e, 0), b))
    }

    /// Index of `user` in this file's user table.
    fn find_user(&self, user: &[u8]) -> Result<Option<u32>, SegmentError> {
        let key = (hash_user_id(user), user);
        let (mut lo, mut hi) = (0u64, self.n_users);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (h, b) = self.user(mid)?;
            match (h, b.as_slice()).cmp(&key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(u32::try_from(mid).ok()),
            }
        }
        Ok(None)
    }

    /// First record index of a section whose key is not below `key` (`key_of` reads one).
    fn lower_bound<K: Ord>(
        &self,
        base: u64,
        size: u64,
        n: u64,
        key: &K,
        key_of: impl Fn(&[u8]) -> K,
    ) -> Result<u64, SegmentError> {
        let mut buf = vec![0u8; size as usize];
        let (mut lo, mut hi) = (0u64, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            self.read(&mut buf, base + mid * size)?;
            if key_of(&buf) < *key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Reads records `from..` of a section block by block, until `each` returns false.
    fn run(
        &self,
        base: u64,
        size: u64,
        n: u64,
        from: u64,
        each: &mut dyn FnMut(&[u8]) -> Result<bool, SegmentError>,
    ) -> Result<(), SegmentError> {
        let mut buf = Vec::new();
        let mut i = from;
        while i < n {
            let k = BLOCK.min(n - i);
            buf.resize((k * size) as usize, 0);
            self.read(&mut buf, base + i * size)?;
            for r in buf.chunks_exact(size as usize) {
                if !each(r)? {
                    return Ok(());
                }
            }
            i += k;
        }
        Ok(())
    }

    /// Calls `f` for every record matching `p`.
    pub fn scan(&self, p: &Probe<'_>, f: &mut dyn FnMut(Hit)) -> Result<(), SegmentError> {
        if self.max_minute < p.from_minute || self.min_minute >= p.to_minute {
            return Ok(());
        }
        let user = match p.user {
            Some(u) => match self.find_user(u)? {
                Some(i) => Some(i),
                None => return Ok(()),
            },
            None => None,
        };
        if let Some((lo, hi)) = p.ip {
            // One address: start at its first minute of the range; a prefix: at its start.
            let first = if lo == hi { p.from_minute } else { 0 };
            let key_of = |r: &[u8]| {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&r[..16]);
                (ip, u32_at(r, 16))
            };
            let start = self.lower_bound(self.ip_off, IP_REC, self.n_ip, &(lo, first), key_of)?;
            self.run(self.ip_off, IP_REC, self.n_ip, start, &mut |r| {
                let (ip, minute) = key_of(r);
                if ip > hi || (lo == hi && minute >= p.to_minute) {
                    return Ok(false);
                }
                let u = u32_at(r, 32);
                if minute < p.from_minute || minute >= p.to_minute || user.is_some_and(|x| x != u) {
                    return Ok(true);
                }
                let hash = u64_at(r, 40);
                f(Hit {
                    ad: u64_at(r, 20),
                    minute,
                    combo: u32_at(r, 28),
                    count: u64::from(u32_at(r, 36)),
                    user: hash,
                });
                Ok(true)
            })?;
        } else if let (Some(u), Some(name)) = (user, p.user) {
            let hash = hash_user_id(name);
            let key_of = |r: &[u8]| (u32_at(r, 0), u32_at(r, 4));
            let start = self.lower_bound(
                self.user_off,
                USER_REC,
                self.n_user,
                &(u, p.from_minute),
                key_of,
            )?;
            self.run(self.user_off, USER_REC, self.n_user, start, &mut |r| {
                let (x, minute) = key_of(r);
                if x != u || minute >= p.to_minute {
                    return Ok(false);
                }
                f(Hit {
                    ad: u64_at(r, 8),
                    minute,
                    combo: u32_at(r, 16),
                    count: u64::from(u32_at(r, 20)),
                    user: hash,
                });
                Ok(true)
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::clickindex::ip_key;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Against the clicks themselves: a written segment answers every IP, IP range and
        /// user probe with the matching clicks' count and user hashes, for batches large
        /// enough for the bucketed sorts (few distinct IPs and users: long equal runs).
        #[test]
        fn segment_answers_like_a_scan_of_its_clicks(
            raw in proptest::collection::vec(
                (0u8..40, 0u16..300, 0u32..4, 1u64..4, 1u32..3, any::<bool>()), 0..6000),
            spread in any::<bool>(),
        ) {
            let ip = |i: u8| {
                let b = if spread { i.wrapping_mul(97) } else { i };
                ip_key(&[b, 1, i % 3, b ^ 0x55]).unwrap()
            };
            let users: Vec<String> = (0..300).map(|u| format!("u{u}")).collect();
            let clicks: Vec<Click<'_>> = raw
                .iter()
                .map(|&(i, u, m, ad, combo, no_ip)| Click {
                    ip: (!no_ip || i == 0).then(|| ip(i)),
                    user: if u % 17 == 0 { b"" } else { users[u as usize].as_bytes() },
                    minute: 500 + m,
                    ad,
                    combo,
                })
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(name(0, 1));
            let seg = write(&path, 0, 1, clicks.iter().copied(), clicks.len()).unwrap();
            type IpRange = Option<(Ip, Ip)>;
            let mut probes: Vec<(IpRange, Option<&[u8]>)> = Vec::new();
            for i in [0u8, 1, 7, 39] {
                probes.push((Some((ip(i), ip(i))), None));
                probes.push((Some((ip(i), ip(i))), Some(users[1].as_bytes())));
            }
            let (a, b) = (ip(3), ip(30));
            probes.push((Some((a.min(b), a.max(b))), None));
            for u in [1usize, 2, 150, 299] {
                probes.push((None, Some(users[u].as_bytes())));
            }
            for (ips, user) in probes {
                for (from, to) in [(500, 504), (501, 503)] {
                    let p = Probe { ip: ips, user, from_minute: from, to_minute: to };
                    let mut got: Vec<(u64, u32, u32, u64)> = Vec::new();
                    let mut count = 0u64;
                    seg.scan(&p, &mut |h| {
                        count += h.count;
                        got.push((h.ad, h.minute, h.combo, h.user));
                    }).unwrap();
                    let want: Vec<&Click<'_>> = clicks
                        .iter()
                        .filter(|c| {
                            c.minute >= from && c.minute < to
                                && ips.is_none_or(|(lo, hi)| c.ip.is_some_and(|i| i >= lo && i <= hi))
                                && user.is_none_or(|u| u == c.user)
                        })
                        .collect();
                    prop_assert_eq!(count, want.len() as u64);
                    let mut w: Vec<(u64, u32, u32, u64)> = want
                        .iter()
                        .map(|c| {
                            let h = if c.user.is_empty() { 0 } else { hash_user_id(c.user) };
                            (c.ad, c.minute, c.combo, h)
                        })
                        .collect();
                    w.sort_unstable();
                    w.dedup();
                    got.sort_unstable();
                    got.dedup();
                    prop_assert_eq!(got, w);
                }
            }
        }
    }

    #[test]
    fn written_segments_answer_like_the_clicks_they_hold() {
        let dir = tempfile::tempdir().unwrap();
        let ips: Vec<Ip> = (0..7u8)
            .map(|i| ip_key(&[10, 0, i / 3, i]).unwrap())
            .collect();
        let users: Vec<String> = (0..5).map(|i| format!("user-{i}")).collect();
        let mut clicks = Vec::new();
        let mut x = 7u64;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = x >> 20;
            clicks.push(Click {
                ip: (!r.is_multiple_of(11)).then(|| ips[(r % 7) as usize]),
                user: if r.is_multiple_of(13) {
                    b""
                } else {
                    users[(r / 7 % 5) as usize].as_bytes()
                },
                minute: 1000 + (r / 35 % 6) as u32,
                ad: 1 + r / 210 % 4,
                combo: 1 + (r / 840 % 3) as u32,
            });
        }
        let path = dir.path().join(name(3, 9));
        let seg = write(&path, 3, 9, clicks.iter().copied(), clicks.len()).unwrap();
        let reopened = Segment::open(&path, 3, 9).unwrap();
        for s in [&seg, &reopened] {
            for (ip, user, from, to) in [
                (Some((ips[2], ips[2])), None, 1000, 1006),
                (Some((ips[0], ips[2])), None, 1001, 1004),
                (
                    Some((ips[3], ips[3])),
                    Some(users[1].as_bytes()),
                    1000,
                    1006,
                ),
                (None, Some(users[4].as_bytes()), 1002, 1003),
                (None, Some(b"nobody".as_slice()), 1000, 1006),
            ] {
                let p = Probe {
                    ip,
                    user,
                    from_minute: from,
                    to_minute: to,
                };
                let mut got = 0u64;
                s.scan(&p, &mut |h| got += h.count).unwrap();
                let want = clicks
                    .iter()
                    .filter(|c| {
                        c.minute >= from
                            && c.minute < to
                            && ip.is_none_or(|(lo, hi)| c.ip.is_some_and(|i| i >= lo && i <= hi))
                            && user.is_none_or(|u| u == c.user)
                    })
                    .count() as u64;
                assert_eq!(got, want, "{ip:?} {user:?} {from}..{to}");
            }
        }
        // Damage is refused with the file named.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = Segment::open(&path, 3, 9).unwrap_err().to_string();
        assert!(err.contains(&name(3, 9)), "{err}");
    }
}
