//! The browser's offline queue: an [`OfflineQueue`] over `localStorage` (or any
//! [`KeyValue`] store), plus an in-memory mirror of the unsent clicks that the page-hide
//! beacon reads.
//!
//! Layout: one `localStorage` key per unsent click,
//! `{storageKey}:v1:{instance}:{seq}` = URL-safe base64 (no padding) of the protobuf
//! `Click` (with its original `occurred_at_ms`, `sent_at_ms` 0). `instance` is random per
//! page load, so two tabs of one site never write the same key. On load a tracker adopts
//! every key under its prefix (other tabs' and earlier pages' clicks), oldest first, keeps
//! the newest `maxQueue` and deletes the rest; a click two live tabs both hold may be sent
//! twice, which the collector's dedup by impression id absorbs.
//!
//! Must not decide anything about sending: the `Outbox` (sdk core) journals appends and
//! removals here. Must never lose the in-memory copy because storage failed (quota,
//! disabled storage): a failed write is an `Err` the outbox counts, the mirror keeps it.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use adclick_proto::v1;
use adclick_sdk::core::{OfflineQueue, QueueError, StoredClick};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message as _;

/// A string key-value store (`localStorage`, or a map in tests). Errors are messages.
pub trait KeyValue {
    /// Every key currently stored (all prefixes).
    fn keys(&self) -> Result<Vec<String>, String>;
    /// The value under `key`.
    fn get(&self, key: &str) -> Result<Option<String>, String>;
    /// Stores `value` under `key` (may fail on quota).
    fn set(&mut self, key: &str, value: &str) -> Result<(), String>;
    /// Deletes `key` (absent keys are fine).
    fn remove(&mut self, key: &str) -> Result<(), String>;
}

/// `window.localStorage`.
#[derive(Debug, Clone)]
pub struct LocalStorage(pub web_sys::Storage);

impl KeyValue for LocalStorage {
    fn keys(&self) -> Result<Vec<String>, String> {
        let n = self.0.length().map_err(|e| crate::js::message(&e))?;
        let mut keys = Vec::with_capacity(n as usize);
        for i in 0..n {
            if let Some(k) = self.0.key(i).map_err(|e| crate::js::message(&e))? {
                keys.push(k);
            }
        }
        Ok(keys)
    }
    fn get(&self, key: &str) -> Result<Option<String>, String> {
        self.0.get_item(key).map_err(|e| crate::js::message(&e))
    }
    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        self.0
            .set_item(key, value)
            .map_err(|e| crate::js::message(&e))
    }
    fn remove(&mut self, key: &str) -> Result<(), String> {
        self.0.remove_item(key).map_err(|e| crate::js::message(&e))
    }
}

/// A `BTreeMap` store, for tests and for environments without `localStorage`.
#[derive(Debug, Clone, Default)]
pub struct MemoryKv(pub BTreeMap<String, String>);

impl KeyValue for MemoryKv {
    fn keys(&self) -> Result<Vec<String>, String> {
        Ok(self.0.keys().cloned().collect())
    }
    fn get(&self, key: &str) -> Result<Option<String>, String> {
        Ok(self.0.get(key).cloned())
    }
    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        self.0.insert(key.to_string(), value.to_string());
        Ok(())
    }
    fn remove(&mut self, key: &str) -> Result<(), String> {
        self.0.remove(key);
        Ok(())
    }
}

/// The stored form of one click (see the module doc).
pub fn encode_click(click: &v1::Click) -> String {
    URL_SAFE_NO_PAD.encode(click.encode_to_vec())
}

/// Parses [`encode_click`]'s output; `None` for anything else.
pub fn decode_click(value: &str) -> Option<v1::Click> {
    let bytes = URL_SAFE_NO_PAD.decode(value.trim()).ok()?;
    let click = v1::Click::decode(bytes.as_slice()).ok()?;
    (!click.token.is_empty()).then_some(click)
}

/// The key prefix of a queue named `storage_key`.
pub fn key_prefix(storage_key: &str) -> String {
    format!("{storage_key}:v1:")
}

/// Splits `{prefix}{instance}:{seq}` into `(instance, seq)`.
pub fn parse_key<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, u64)> {
    let rest = key.strip_prefix(prefix)?;
    let (instance, seq) = rest.rsplit_once(':')?;
    if instance.is_empty() || instance.contains(':') {
        return None;
    }
    Some((instance, seq.parse().ok()?))
}

struct State {
    backend: Option<Box<dyn KeyValue>>,
    prefix: String,
    instance: String,
    max_load: usize,
    /// The unsent clicks in queue order as (seq, click, storage key unless its write
    /// failed): always the same clicks as the outbox's queue. A `Vec`, not a map: seqs
    /// arrive in increasing order, removals are few and near the front, and a map costs
    /// kilobytes of wasm.
    mirror: Vec<(u64, v1::Click, Option<String>)>,
    /// Stored clicks deleted at load because more than `max_load` were found.
    dropped_at_load: usize,
}

/// The browser offline queue (cheap-to-clone handle; clones share the state). See the
/// module doc for the storage layout.
#[derive(Clone)]
pub struct BrowserQueue {
    state: Rc<RefCell<State>>,
}

impl std::fmt::Debug for BrowserQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.borrow();
        f.debug_struct("BrowserQueue")
            .field("prefix", &s.prefix)
            .field("instance", &s.instance)
            .field("persistent", &s.backend.is_some())
            .field("held", &s.mirror.len())
            .finish()
    }
}

impl BrowserQueue {
    /// A queue persisting under `{storage_key}:v1:{instance}:...` in `backend` (`None`:
    /// memory only), loading at most `max_load` stored clicks.
    pub fn new(
        backend: Option<Box<dyn KeyValue>>,
        storage_key: &str,
        instance: &str,
        max_load: usize,
    ) -> Self {
        BrowserQueue {
            state: Rc::new(RefCell::new(State {
                backend,
                prefix: key_prefix(storage_key),
                instance: instance.to_string(),
                max_load: max_load.max(1),
                mirror: Vec::new(),
                dropped_at_load: 0,
            })),
        }
    }

    /// True when clicks are written to a store.
    pub fn is_persistent(&self) -> bool {
        self.state.borrow().backend.is_some()
    }

    /// The unsent clicks, oldest first, with their queue seqs.
    pub fn pending(&self) -> Vec<(u64, v1::Click)> {
        let s = self.state.borrow();
        s.mirror.iter().map(|(k, v, _)| (*k, v.clone())).collect()
    }

    /// Stored clicks deleted by the last `load` because more than `max_load` were found.
    pub fn dropped_at_load(&self) -> usize {
        self.state.borrow().dropped_at_load
    }
}

/// Deletes every click stored under `storage_key` (all pages and tabs of this origin):
/// what withdrawing consent does. Returns how many entries were deleted.
pub fn purge(backend: &mut dyn KeyValue, storage_key: &str) -> Result<usize, String> {
    let prefix = key_prefix(storage_key);
    let mut n = 0;
    for key in backend.keys()? {
        if parse_key(&prefix, &key).is_some() {
            backend.remove(&key)?;
            n += 1;
        }
    }
    Ok(n)
}

impl OfflineQueue for BrowserQueue {
    fn load(&mut self) -> Result<Vec<StoredClick>, QueueError> {
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        s.mirror.clear();
        s.dropped_at_load = 0;
        let Some(backend) = s.backend.as_mut() else {
            return Ok(Vec::new());
        };
        let all = backend.keys().map_err(QueueError::Io)?;
        // (occurred_at, instance, seq, key, click): restore in click order.
        let mut found = Vec::new();
        for key in all {
            let Some((instance, seq)) = parse_key(&s.prefix, &key) else {
                continue;
            };
            let click = match backend.get(&key) {
                Ok(Some(v)) => decode_click(&v),
                Ok(None) => continue,
                Err(_) => None,
            };
            match click {
                Some(c) => found.push((c.occurred_at_ms, instance.to_string(), seq, key, c)),
                // Unreadable entry (corrupt, foreign writer): nothing to restore.
                None => {
                    let _ = backend.remove(&key);
                }
            }
        }
        found.sort_unstable_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
        if found.len() > s.max_load {
            let excess = found.len() - s.max_load;
            for (_, _, _, key, _) in found.drain(..excess) {
                let _ = backend.remove(&key);
            }
            s.dropped_at_load = excess;
        }
        let mut restored = Vec::with_capacity(found.len());
        for (seq, (_, _, _, key, click)) in (0u64..).zip(found) {
            s.mirror.push((seq, click.clone(), Some(key)));
            restored.push(StoredClick { seq, click });
        }
        Ok(restored)
    }

    fn append(&mut self, stored: &StoredClick) -> Result<(), QueueError> {
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        // The mirror keeps the click even when the write fails: storage trouble must not
        // lose it from this page.
        let mut result = Ok(());
        let mut key = None;
        if let Some(backend) = s.backend.as_mut() {
            let k = format!("{}{}:{}", s.prefix, s.instance, stored.seq);
            match backend.set(&k, &encode_click(&stored.click)) {
                Ok(()) => key = Some(k),
                Err(e) => result = Err(QueueError::Io(e)),
            }
        }
        s.mirror.push((stored.seq, stored.click.clone(), key));
        result
    }

    fn remove(&mut self, seqs: &[u64]) -> Result<(), QueueError> {
        let mut guard = self.state.borrow_mut();
        let s = &mut *guard;
        let mut gone = Vec::new();
        s.mirror.retain_mut(|(seq, _, key)| {
            let keep = !seqs.contains(seq);
            if !keep && let Some(k) = key.take() {
                gone.push(k);
            }
            keep
        });
        let mut first_err = None;
        if let Some(backend) = s.backend.as_mut() {
            for key in gone {
                if let Err(e) = backend.remove(&key)
                    && first_err.is_none()
                {
                    first_err = Some(QueueError::Io(e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store shared between "page loads" of a test.
    #[derive(Clone, Default)]
    struct Shared(Rc<RefCell<MemoryKv>>);

    impl KeyValue for Shared {
        fn keys(&self) -> Result<Vec<String>, String> {
            self.0.borrow().keys()
        }
        fn get(&self, key: &str) -> Result<Option<String>, String> {
            self.0.borrow().get(key)
        }
        fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
            self.0.borrow_mut().set(key, value)
        }
        fn remove(&mut self, key: &str) -> Result<(), String> {
            self.0.borrow_mut().remove(key)
        }
    }

    /// Refuses writes, like a full `localStorage`.
    struct Full;

    impl KeyValue for Full {
        fn keys(&self) -> Result<Vec<String>, String> {
            Ok(Vec::new())
        }
        fn get(&self, _: &str) -> Result<Option<String>, String> {
            Ok(None)
        }
        fn set(&mut self, _: &str, _: &str) -> Result<(), String> {
            Err("QuotaExceededError: full".into())
        }
        fn remove(&mut self, _: &str) -> Result<(), String> {
            Ok(())
        }
    }

    fn click(token: &str, at: i64) -> v1::Click {
        v1::Click {
            token: token.into(),
            occurred_at_ms: at,
            country: "DE".into(),
            user_id: "u1".into(),
            ..Default::default()
        }
    }

    fn stored(seq: u64, token: &str, at: i64) -> StoredClick {
        StoredClick {
            seq,
            click: click(token, at),
        }
    }

    #[test]
    fn click_codec_round_trip_and_rejects_garbage() {
        let c = click("tok_-1", 1_700_000_000_123);
        let text = encode_click(&c);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(decode_click(&text), Some(c));
        assert_eq!(decode_click("not base64!"), None);
        assert_eq!(decode_click(""), None, "a click needs a token");
        assert_eq!(decode_click(&URL_SAFE_NO_PAD.encode([0xff, 0xff])), None);
    }

    #[test]
    fn keys_parse() {
        let p = key_prefix("adclick");
        assert_eq!(p, "adclick:v1:");
        assert_eq!(parse_key(&p, "adclick:v1:ab12:7"), Some(("ab12", 7)));
        assert_eq!(parse_key(&p, "adclick:v1:ab12:x"), None);
        assert_eq!(parse_key(&p, "adclick:v1::7"), None);
        assert_eq!(parse_key(&p, "adclick:v1:a:b:7"), None);
        assert_eq!(parse_key(&p, "other:v1:ab12:7"), None);
    }

    #[test]
    fn survives_reload_with_original_occurred_at() {
        let store = Shared::default();
        let mut q1 = BrowserQueue::new(Some(Box::new(store.clone())), "adclick", "aaaa", 100);
        assert!(q1.load().unwrap().is_empty());
        for (i, at) in [10, 20, 30].into_iter().enumerate() {
            q1.append(&stored(i as u64, &format!("t{i}"), at)).unwrap();
        }
        q1.remove(&[1]).unwrap();
        assert_eq!(store.0.borrow().0.len(), 2);
        let held: Vec<_> = q1.pending().into_iter().map(|(s, _)| s).collect();
        assert_eq!(held, vec![0, 2]);

        // Next page load: a new instance adopts them, oldest first, renumbered from 0.
        let mut q2 = BrowserQueue::new(Some(Box::new(store.clone())), "adclick", "bbbb", 100);
        let got = q2.load().unwrap();
        let got: Vec<_> = got
            .iter()
            .map(|s| (s.seq, s.click.token.as_str(), s.click.occurred_at_ms))
            .collect();
        assert_eq!(got, vec![(0, "t0", 10), (1, "t2", 30)]);
        // New clicks get this instance's keys; removing adopted ones deletes the old keys.
        q2.append(&stored(2, "t3", 40)).unwrap();
        q2.remove(&[0, 1]).unwrap();
        let keys: Vec<_> = store.0.borrow().0.keys().cloned().collect();
        assert_eq!(keys, vec!["adclick:v1:bbbb:2".to_string()]);
    }

    #[test]
    fn load_is_bounded_keeps_newest_and_skips_foreign_or_corrupt_keys() {
        let store = Shared::default();
        {
            let mut kv = store.0.borrow_mut();
            for i in 0..5u64 {
                let c = click(&format!("t{i}"), 100 + i as i64);
                kv.set(&format!("adclick:v1:x:{i}"), &encode_click(&c))
                    .unwrap();
            }
            kv.set("adclick:v1:x:9", "garbage").unwrap();
            kv.set("unrelated", "keep me").unwrap();
            kv.set("other:v1:x:1", &encode_click(&click("o", 1)))
                .unwrap();
        }
        let mut q = BrowserQueue::new(Some(Box::new(store.clone())), "adclick", "y", 3);
        let got: Vec<_> = q
            .load()
            .unwrap()
            .into_iter()
            .map(|s| s.click.token)
            .collect();
        assert_eq!(got, vec!["t2", "t3", "t4"]);
        assert_eq!(q.dropped_at_load(), 2);
        let keys: Vec<_> = store.0.borrow().0.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![
                "adclick:v1:x:2",
                "adclick:v1:x:3",
                "adclick:v1:x:4",
                "other:v1:x:1",
                "unrelated"
            ]
        );
    }

    #[test]
    fn failed_write_keeps_the_click_in_memory() {
        let mut q = BrowserQueue::new(Some(Box::new(Full)), "adclick", "z", 10);
        q.load().unwrap();
        assert!(matches!(
            q.append(&stored(0, "t", 1)),
            Err(QueueError::Io(m)) if m.contains("Quota")
        ));
        assert_eq!(q.pending().len(), 1);
        q.remove(&[0]).unwrap();
        assert!(q.pending().is_empty());

        let mut mem = BrowserQueue::new(None, "adclick", "z", 10);
        assert!(!mem.is_persistent());
        mem.append(&stored(0, "t", 1)).unwrap();
        assert_eq!(mem.pending().len(), 1);
    }
}
