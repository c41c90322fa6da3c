//! Dimension keys: a click's (country, device, os, site) packed into a small, hashable
//! key, with strings interned to u32 ids. The interner is owned by the single-threaded
//! ingest stage, so ids are assigned in WAL order and a replay assigns the same ids.

/// A dimension combination. `site` is the click's site, or its app when site is empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// Dimension combination <-> dense id (ids start at 1; 0 is never assigned). Cells store
/// the 4-byte id instead of the 12-byte key; queries map ids back through
/// [`ComboTable::keys`]. Owned by the single-threaded window stage like [`Interner`], so
/// ids are assigned in WAL order and checkpointed with it.
#[derive(Debug, Clone, Default)]
pub struct ComboTable {
    ids: super::FastMap<DimKey, u32>,
    keys: Vec<DimKey>,
}

impl ComboTable {
    /// The id of `k`, assigning the next one if new.
    pub fn intern(&mut self, k: DimKey) -> u32 {
        if let Some(id) = self.ids.get(&k) {
            return *id;
        }
        self.keys.push(k);
        let id = u32::try_from(self.keys.len()).unwrap_or(u32::MAX);
        self.ids.insert(k, id);
        id
    }

    /// Every key in id order (id = index + 1).
    pub fn keys(&self) -> &[DimKey] {
        &self.keys
    }

    /// The key of `id` (None for 0 or an unknown id).
    pub fn key(&self, id: u32) -> Option<&DimKey> {
        self.keys.get((id as usize).checked_sub(1)?)
    }

    /// Rebuilds from checkpointed keys.
    pub fn from_keys(keys: Vec<DimKey>) -> Self {
        let ids = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (*k, u32::try_from(i + 1).unwrap_or(u32::MAX)))
            .collect();
        ComboTable { ids, keys }
    }

    /// Packs keys for a checkpoint: `country(16) | device(8)` and os and site, three u32
    /// per key.
    pub fn pack(&self) -> Vec<u32> {
        self.keys
            .iter()
            .flat_map(|k| {
                [
                    u32::from(u16::from_le_bytes(k.country)) | u32::from(k.device) << 16,
                    k.os,
                    k.site,
                ]
            })
            .collect()
    }

    /// Inverse of [`ComboTable::pack`].
    pub fn unpack(packed: &[u32]) -> Result<Self, String> {
        if !packed.len().is_multiple_of(3) {
            return Err("combo table is inconsistent".into());
        }
        let keys = packed
            .chunks_exact(3)
            .map(|t| DimKey {
                country: u16::try_from(t[0] & 0xFFFF).unwrap_or(0).to_le_bytes(),
                device: u8::try_from(t[0] >> 16 & 0xFF).unwrap_or(0),
                os: t[1],
                site: t[2],
            })
            .collect();
        Ok(Self::from_keys(keys))
    }
}
