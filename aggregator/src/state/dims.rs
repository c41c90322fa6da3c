//! Dimension keys: a click's (country, device, os, site) packed into a small, hashable
//! key, with strings interned to u32 ids. The interner is owned by the single-threaded
//! ingest stage, so ids are assigned in WAL order and a replay assigns the same ids.

/// A dimension combination. `site` is the click's site, or its app when site is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DimKey {
    /// ISO-3166 alpha-2 as two ASCII bytes (0 = unknown).
    pub country: [u8; 2],
    /// `adclick.v1.Device` value.
    pub device: u8,
    /// Interned os (0 = unknown).
    pub os: u32,
    /// Interned site/app (0 = unknown).
    pub site: u32,
}

/// String <-> id table (id 0 is the empty string).
#[derive(Debug, Clone, Default)]
pub struct Interner {
    ids: super::FastMap<String, u32>,
    names: Vec<String>,
}

impl Interner {
    /// The id of `s`, assigning the next one if new. Empty strings are 0.
    pub fn intern(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        self.names.push(s.to_string());
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.ids.insert(s.to_string(), id);
        id
    }

    /// The id of `s` if known (queries never assign ids).
    pub fn lookup(&self, s: &str) -> Option<u32> {
        if s.is_empty() {
            return Some(0);
        }
        self.ids.get(s).copied()
    }

    /// All names in id order (id = index + 1), for checkpoints.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Rebuilds from checkpointed names.
    pub fn from_names(names: Vec<String>) -> Self {
        let ids: super::FastMap<String, u32> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), u32::try_from(i + 1).unwrap_or(u32::MAX)))
            .collect();
        Interner { ids, names }
    }
}

/// Packs an ISO country code ("" -> [0, 0]).
pub fn country_code(s: &str) -> [u8; 2] {
    let b = s.as_bytes();
    if b.len() == 2 {
        [b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()]
    } else {
        [0, 0]
    }
}
