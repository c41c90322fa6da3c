//! How client IPs are *stored* (`[privacy] ip_storage`, issue 16): in full, truncated to
//! their network (/24 for IPv4, /48 for IPv6), or replaced by a keyed hash under a salt
//! that rotates every UTC day. Applied where IPs reach disk: the raw archive's rows and the
//! click index (its `ip` filter then matches the stored form, see [`IpMasker::probe`]).
//! The rules stage and everything in memory still see the full address.
//!
//! A hashed address is written as an IPv6 address in the discard-only prefix `100::/64`
//! (RFC 6666) whose low 64 bits are HMAC-SHA256(day salt, address): the stored types
//! (`Option<IpAddr>`, 16-byte index keys) do not change, the same client on the same day
//! maps to the same value (so distinct counts per day still work), and no value can be
//! mistaken for a routable address. Salts live in `<data_dir>/privacy/ip-salt-<day>`
//! (32 random bytes, written temp + fsync + rename before first use, so a WAL replay after
//! a crash hashes the same way); a salt more than [`SALT_KEEP_DAYS`] days old is deleted,
//! after which its day's hashes cannot be linked to an address by anyone, operator included.
//!
//! The day is the click's *event* day, so the archive and the index (and a replay) agree
//! on it whatever the wall clock says when they run.
//!
//! Must not decide anything about a click, nor be applied before the rules have run.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Directory of the salts inside the data dir.
pub const DIR: &str = "privacy";

/// Days a salt is kept after its day (for replays and late clicks of that day).
pub const SALT_KEEP_DAYS: i64 = 2;

const DAY_MS: i64 = 86_400_000;

/// `[privacy] ip_storage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IpStorage {
    /// The address as received (the default: `ip` filters stay exact).
    #[default]
    Full,
    /// The /24 (IPv4) or /48 (IPv6) network, host bits zeroed.
    Truncated,
    /// A keyed hash under the day's salt, as an address in `100::/64`.
    Hashed,
}

/// Why the salt store failed.
#[derive(Debug, thiserror::Error)]
#[error("privacy salt {path}: {source}")]
pub struct SaltError {
    path: PathBuf,
    source: std::io::Error,
}

/// Applies `ip_storage` to addresses on their way to disk.
#[derive(Debug)]
pub struct IpMasker {
    mode: IpStorage,
    dir: PathBuf,
    salts: Mutex<HashMap<i64, [u8; 32]>>,
}

impl IpMasker {
    /// The masker for `mode`, keeping salts under `data_dir` (nothing is created unless
    /// `mode` is `Hashed`).
    pub fn new(data_dir: &Path, mode: IpStorage) -> Self {
        IpMasker {
            mode,
            dir: data_dir.join(DIR),
            salts: Mutex::new(HashMap::new()),
        }
    }

    /// The configured mode.
    pub fn mode(&self) -> IpStorage {
        self.mode
    }

    /// The stored form of `ip` for a click of event time `at_ms`.
    pub fn mask(&self, ip: IpAddr, at_ms: i64) -> Result<IpAddr, SaltError> {
        Ok(match self.mode {
            IpStorage::Full => ip,
            IpStorage::Truncated => truncate(ip),
            IpStorage::Hashed => {
                let salt = self.salt(at_ms.div_euclid(DAY_MS))?;
                hashed(&salt, ip)
            }
        })
    }

    /// The stored form of a wire address (4 or 16 bytes; anything else is returned as is:
    /// it is stored as "unknown" anyway).
    pub fn mask_wire(&self, wire: &[u8], at_ms: i64) -> Result<Option<IpAddr>, SaltError> {
        let ip = match wire.len() {
            4 => <[u8; 4]>::try_from(wire).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(wire).ok().map(IpAddr::from),
            _ => None,
        };
        ip.map(|ip| self.mask(ip, at_ms)).transpose()
    }

    /// What an `ip` filter for the range `lo..=hi` must look for in what was stored
    /// between `from_ms` and `to_ms`: the same range (full); the truncated ends (truncated:
    /// a filter on one address matches its whole /24 or /48, since that is all that was
    /// kept); for hashed, one exact value per day of the range when `lo == hi` (a range of
    /// addresses has no hashed form: `None`, which the caller answers with nothing).
    pub fn probe(
        &self,
        lo: IpAddr,
        hi: IpAddr,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Option<Vec<(IpAddr, IpAddr)>>, SaltError> {
        Ok(match self.mode {
            IpStorage::Full => Some(vec![(lo, hi)]),
            IpStorage::Truncated => Some(vec![(truncate(lo), truncate(hi))]),
            IpStorage::Hashed if lo != hi => None,
            IpStorage::Hashed => {
                let (first, last) = (from_ms.div_euclid(DAY_MS), to_ms.div_euclid(DAY_MS));
                let mut out = Vec::new();
                // Bounded: the index's retention is minutes to days.
                for day in first..=last.min(first + 366) {
                    if let Some(salt) = self.existing_salt(day) {
                        let h = hashed(&salt, lo);
                        out.push((h, h));
                    }
                }
                Some(out)
            }
        })
    }

    fn path(&self, day: i64) -> PathBuf {
        self.dir.join(format!("ip-salt-{day}"))
    }

    fn existing_salt(&self, day: i64) -> Option<[u8; 32]> {
        let mut salts = self.lock();
        Self::load(&mut salts, &self.path(day), day)
    }

    fn load(salts: &mut HashMap<i64, [u8; 32]>, path: &Path, day: i64) -> Option<[u8; 32]> {
        if let Some(s) = salts.get(&day) {
            return Some(*s);
        }
        let bytes = std::fs::read(path).ok()?;
        let salt = <[u8; 32]>::try_from(bytes.as_slice()).ok()?;
        salts.insert(day, salt);
        Some(salt)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, [u8; 32]>> {
        self.salts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The salt of `day`, created (durably, before it is used) when missing. Creating one
    /// deletes the salts more than `SALT_KEEP_DAYS` older than it. The whole lookup holds
    /// the lock, so two threads never create two salts for one day (file I/O under it
    /// happens once per day).
    fn salt(&self, day: i64) -> Result<[u8; 32], SaltError> {
        let path = self.path(day);
        let mut salts = self.lock();
        if let Some(s) = Self::load(&mut salts, &path, day) {
            return Ok(s);
        }
        let err = |source| SaltError {
            path: path.clone(),
            source,
        };
        let mut salt = [0u8; 32];
        getrandom::fill(&mut salt).map_err(|e| err(std::io::Error::other(e.to_string())))?;
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = self.dir.join(format!("ip-salt-{day}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(&salt).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &path).map_err(err)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        salts.insert(day, salt);
        // Forget the old ones: in memory, and on disk (then nobody can link them).
        let keep_from = day - SALT_KEEP_DAYS;
        salts.retain(|d, _| *d >= keep_from);
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let old = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("ip-salt-"))
                    .and_then(|d| d.parse::<i64>().ok())
                    .is_some_and(|d| d < keep_from);
                if old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(salt)
    }
}

/// The /24 or /48 network of `ip`.
pub fn truncate(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], 0))
        }
        IpAddr::V6(a) => {
            let mut o = a.octets();
            o[6..].fill(0);
            IpAddr::V6(Ipv6Addr::from(o))
        }
    }
}

fn hashed(salt: &[u8; 32], ip: IpAddr) -> IpAddr {
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(salt) {
        Ok(m) => m,
        // HMAC takes keys of any length; kept total rather than unwrapped.
        Err(_) => return IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    match ip {
        IpAddr::V4(a) => mac.update(&a.octets()),
        IpAddr::V6(a) => mac.update(&a.octets()),
    }
    let tag = mac.finalize().into_bytes();
    let mut o = [0u8; 16];
    o[0] = 0x01; // 100::/64
    o[8..].copy_from_slice(&tag[..8]);
    IpAddr::V6(Ipv6Addr::from(o))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn truncation_keeps_the_network() {
        assert_eq!(truncate(ip("203.0.113.77")), ip("203.0.113.0"));
        assert_eq!(
            truncate(ip("2001:db8:abcd:12:1:2:3:4")),
            ip("2001:db8:abcd::")
        );
    }

    #[test]
    fn hashes_are_stable_per_day_differ_across_days_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let day = 20_000 * DAY_MS;
        let m = IpMasker::new(dir.path(), IpStorage::Hashed);
        let a = m.mask(ip("198.51.100.7"), day + 5).unwrap();
        assert_eq!(a, m.mask(ip("198.51.100.7"), day + DAY_MS - 1).unwrap());
        assert_ne!(a, m.mask(ip("198.51.100.8"), day).unwrap());
        let next = m.mask(ip("198.51.100.7"), day + DAY_MS).unwrap();
        assert_ne!(a, next, "the salt rotates daily");
        match a {
            IpAddr::V6(v) => assert_eq!(v.segments()[..4], [0x100, 0, 0, 0]),
            IpAddr::V4(_) => panic!("{a}"),
        }
        // A new masker on the same data dir (a restart, a replay) hashes the same way.
        let again = IpMasker::new(dir.path(), IpStorage::Hashed);
        assert_eq!(again.mask(ip("198.51.100.7"), day).unwrap(), a);
        // The probe for that address over both days finds both stored values.
        let p = again
            .probe(ip("198.51.100.7"), ip("198.51.100.7"), day, day + DAY_MS)
            .unwrap()
            .unwrap();
        assert_eq!(p, vec![(a, a), (next, next)]);
        // Salts older than SALT_KEEP_DAYS are deleted once a newer day starts.
        m.mask(ip("198.51.100.7"), day + (SALT_KEEP_DAYS + 1) * DAY_MS)
            .unwrap();
        assert!(!dir.path().join(DIR).join("ip-salt-20000").exists());
        assert!(dir.path().join(DIR).join("ip-salt-20001").exists());
    }

    #[test]
    fn full_stores_the_address_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let m = IpMasker::new(dir.path(), IpStorage::Full);
        assert_eq!(m.mask(ip("10.1.2.3"), 0).unwrap(), ip("10.1.2.3"));
        assert!(!dir.path().join(DIR).exists());
    }
}
