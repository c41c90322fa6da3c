//! The `keys.toml` key-file format shared by `adclick keys`, ad servers and collectors.
//!
//! ```toml
//! # adclick signing keys: secret, keep mode 0600
//! current = 2
//!
//! [[keys]]
//! id = 2
//! secret = "64 hex digits"
//! created_at_ms = 1800000000000
//! ```
//!
//! This module parses and renders strings only; reading and writing the file (and its
//! permissions) is the caller's business.

use serde::{Deserialize, Serialize};

use crate::token::{KeyError, Keyring, SigningKey};

/// Errors reading a key file's text.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Not valid TOML, or missing/mistyped fields.
    #[error("invalid key file: {0}")]
    Toml(#[from] toml::de::Error),
    /// A secret is not hex.
    #[error("key {id}: secret is not hex: {source}")]
    Hex {
        /// Key id.
        id: u32,
        /// Decoder error.
        source: hex::FromHexError,
    },
    /// A key or the keyring is invalid.
    #[error("invalid key file: {0}")]
    Key(#[from] KeyError),
    /// Rendering failed.
    #[error("cannot render key file: {0}")]
    Render(#[from] toml::ser::Error),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    current: u32,
    keys: Vec<KeyRepr>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRepr {
    id: u32,
    secret: String,
    #[serde(default)]
    created_at_ms: i64,
}

/// A keyring plus the creation time of each key, as stored in `keys.toml`.
#[derive(Debug, Clone)]
pub struct KeyFile {
    /// The keys.
    pub keyring: Keyring,
    /// `(key id, created_at_ms)`, current first.
    pub created: Vec<(u32, i64)>,
}

impl KeyFile {
    /// Parses key-file text.
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        let repr: FileRepr = toml::from_str(text)?;
        let mut keys = Vec::with_capacity(repr.keys.len());
        let mut created = Vec::with_capacity(repr.keys.len());
        for k in &repr.keys {
            let secret = hex::decode(k.secret.trim())
                .map_err(|source| KeyFileError::Hex { id: k.id, source })?;
            keys.push(SigningKey::new(k.id, &secret)?);
            created.push((k.id, k.created_at_ms));
        }
        let keyring = Keyring::from_keys(repr.current, keys)?;
        Ok(KeyFile { keyring, created })
    }

    /// Renders key-file text (current key first).
    pub fn render(&self) -> Result<String, KeyFileError> {
        let keys = self
            .keyring
            .keys()
            .map(|k| KeyRepr {
                id: k.id(),
                secret: hex::encode(k.secret()),
                created_at_ms: self
                    .created
                    .iter()
                    .find(|(id, _)| *id == k.id())
                    .map_or(0, |(_, t)| *t),
            })
            .collect();
        let repr = FileRepr {
            current: self.keyring.current().id(),
            keys,
        };
        let body = toml::to_string(&repr)?;
        Ok(format!(
            "# adclick signing keys. SECRET: keep this file mode 0600 and off version control.\n\
             # `current` signs new tokens; the other keys are still accepted (rotation).\n{body}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_then_parse_round_trips() {
        let mut ring = Keyring::new(SigningKey::new(1, &[1; 32]).unwrap());
        ring.rotate(SigningKey::new(2, &[2; 32]).unwrap(), 2)
            .unwrap();
        let file = KeyFile {
            keyring: ring,
            created: vec![(1, 10), (2, 20)],
        };
        let text = file.render().unwrap();
        let back = KeyFile::parse(&text).unwrap();
        assert_eq!(back.keyring.current().id(), 2);
        assert_eq!(back.keyring.get(1).unwrap().secret(), &[1; 32]);
        assert_eq!(back.created, vec![(2, 20), (1, 10)]);
    }

    #[test]
    fn clear_errors_for_bad_files() {
        let e = KeyFile::parse("current = 1\n[[keys]]\nid = 1\nsecret = \"zz\"\n").unwrap_err();
        assert!(e.to_string().contains("key 1: secret is not hex"), "{e}");
        let e = KeyFile::parse("current = 1\n[[keys]]\nid = 1\nsecret = \"00ff\"\n").unwrap_err();
        assert!(e.to_string().contains("16 to 64 bytes"), "{e}");
        let e = KeyFile::parse("current = 5\nkeys = []\n").unwrap_err();
        assert!(e.to_string().contains("current key id 5"), "{e}");
        let e = KeyFile::parse("nonsense").unwrap_err();
        assert!(e.to_string().starts_with("invalid key file"), "{e}");
    }
}
