//! Signed impression tokens: the `Keyring`, `sign` and `verify`.
//!
//! Text form: URL-safe base64 without padding of
//! `version (1 byte, = 1) || payload || tag (32 bytes)`, where `payload` is the prost
//! encoding of [`crate::v1::ImpressionTokenPayload`] and
//! `tag = HMAC-SHA256(key, version || payload)`. The tag covers the version byte so a token
//! can never be re-read under another framing.
//!
//! Verification order: size bound, base64, version, payload decode, key lookup, tag
//! (constant-time, via `Mac::verify_slice`), then the payload's own rules and the clock.
//! This module must not read clocks or files: `now` is always supplied by the caller.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use prost::Message;
use sha2::Sha256;

use crate::v1::ImpressionTokenPayload;

type HmacSha256 = Hmac<Sha256>;

/// Framing version byte at the start of every token.
pub const TOKEN_VERSION: u8 = 1;
/// Length of the HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Length of an impression id.
pub const IMPRESSION_ID_LEN: usize = 16;
/// Longest token text accepted; anything longer is rejected before decoding.
pub const MAX_TOKEN_TEXT_LEN: usize = 2048;
/// Longest landing URL a token may carry.
pub const MAX_LANDING_URL_LEN: usize = 1024;
/// Shortest and longest accepted secret (bytes). `adclick keys new` makes 32-byte keys.
pub const SECRET_LEN_RANGE: std::ops::RangeInclusive<usize> = 16..=64;

/// Why a token was rejected. Each variant is something a caller counts or acts on
/// differently; [`TokenError::reason`] gives the stable counter label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token at all: bad size, bad base64, unknown version, undecodable or
    /// invalid payload.
    #[error("malformed token: {0}")]
    Malformed(Malformed),
    /// Well-formed, but signed with a key id this keyring does not hold.
    #[error("unknown signing key id {0}")]
    UnknownKey(u32),
    /// The tag does not match: forged or tampered.
    #[error("bad signature: token was forged or tampered with")]
    BadSignature,
    /// Valid signature, but past `expires_at` (plus the skew allowance).
    #[error(
        "token expired at {expires_at_ms} ms, now is {now_ms} ms (skew allowance {skew_ms} ms)"
    )]
    Expired {
        /// The token's expiry.
        expires_at_ms: i64,
        /// The verifier's clock.
        now_ms: i64,
        /// The allowance that was applied.
        skew_ms: i64,
    },
    /// Valid signature, but issued in the future (beyond the skew allowance).
    #[error(
        "token not yet valid: issued at {issued_at_ms} ms, now is {now_ms} ms (skew allowance {skew_ms} ms)"
    )]
    NotYetValid {
        /// The token's issue time.
        issued_at_ms: i64,
        /// The verifier's clock.
        now_ms: i64,
        /// The allowance that was applied.
        skew_ms: i64,
    },
}

impl TokenError {
    /// Stable, low-cardinality label for metrics and quarantine records.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "malformed",
            TokenError::UnknownKey(_) => "unknown_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired { .. } => "expired",
            TokenError::NotYetValid { .. } => "not_yet_valid",
        }
    }
}

/// The precise way a token is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Empty token text.
    #[error("empty")]
    Empty,
    /// Longer than [`MAX_TOKEN_TEXT_LEN`].
    #[error("token text is {0} characters, more than the {MAX_TOKEN_TEXT_LEN} allowed")]
    TooLong(usize),
    /// Not URL-safe base64 without padding.
    #[error("not URL-safe base64 (no padding): {0}")]
    Base64(String),
    /// Too short to hold a version byte, a payload and a tag.
    #[error("{0} bytes is too short for a token")]
    TooShort(usize),
    /// Unknown framing version.
    #[error("unsupported token version {0}")]
    Version(u8),
    /// The payload is not a valid protobuf `ImpressionTokenPayload`.
    #[error("payload does not decode: {0}")]
    Payload(String),
    /// The impression id is not 16 bytes.
    #[error("impression id is {0} bytes, expected {IMPRESSION_ID_LEN}")]
    ImpressionId(usize),
    /// The landing URL is empty, too long, or not http(s).
    #[error("landing URL is not an http(s) URL of at most {MAX_LANDING_URL_LEN} bytes")]
    LandingUrl,
    /// `expires_at` is not after `issued_at`.
    #[error("expires_at ({expires_at_ms}) is not after issued_at ({issued_at_ms})")]
    Lifetime {
        /// Issue time.
        issued_at_ms: i64,
        /// Expiry.
        expires_at_ms: i64,
    },
}

impl Malformed {
    /// Stable label of the way a token is malformed (`empty`, `too_long`, `base64`,
    /// `too_short`, `version`, `payload`, `impression_id`, `landing_url`, `lifetime`):
    /// the `malformed` field of `docs/token-vectors.json`. Collectors count all of them
    /// under the one reason `malformed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Malformed::Empty => "empty",
            Malformed::TooLong(_) => "too_long",
            Malformed::Base64(_) => "base64",
            Malformed::TooShort(_) => "too_short",
            Malformed::Version(_) => "version",
            Malformed::Payload(_) => "payload",
            Malformed::ImpressionId(_) => "impression_id",
            Malformed::LandingUrl => "landing_url",
            Malformed::Lifetime { .. } => "lifetime",
        }
    }
}

/// Errors building keys or signing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Secret length outside [`SECRET_LEN_RANGE`].
    #[error("secret is {0} bytes; signing keys must be 16 to 64 bytes (32 recommended)")]
    SecretLength(usize),
    /// Two keys with one id in a keyring.
    #[error("key id {0} appears twice in the keyring")]
    DuplicateId(u32),
    /// The keyring's current key id is not among its keys.
    #[error("current key id {0} is not in the keyring")]
    MissingCurrent(u32),
    /// The impression to sign breaks the payload rules.
    #[error("cannot sign: {0}")]
    InvalidImpression(Malformed),
}

/// A decoded, verified impression: the domain form of the token payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Impression {
    /// 16 random bytes, the dedup key.
    pub impression_id: [u8; IMPRESSION_ID_LEN],
    /// Ad placed.
    pub ad_id: u64,
    /// Owner of the ad.
    pub advertiser_id: u64,
    /// Campaign of the ad.
    pub campaign_id: u64,
    /// Where a click redirects (http/https only).
    pub landing_url: String,
    /// Mint time.
    pub issued_at_ms: i64,
    /// Expiry: clicks after this (plus skew) are rejected.
    pub expires_at_ms: i64,
    /// The key that signed it (filled in by [`Keyring::sign`]).
    pub key_id: u32,
}

impl fmt::Debug for Impression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Impression")
            .field("impression_id", &HexId(&self.impression_id))
            .field("ad_id", &self.ad_id)
            .field("advertiser_id", &self.advertiser_id)
            .field("campaign_id", &self.campaign_id)
            .field("landing_url", &self.landing_url)
            .field("issued_at_ms", &self.issued_at_ms)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("key_id", &self.key_id)
            .finish()
    }
}

struct HexId<'a>(&'a [u8]);
impl fmt::Debug for HexId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Impression {
    /// The impression id as 32 lower-case hex digits.
    pub fn impression_id_hex(&self) -> String {
        format!("{:?}", HexId(&self.impression_id))
    }

    fn check(&self) -> Result<(), Malformed> {
        if !landing_url_ok(&self.landing_url) {
            return Err(Malformed::LandingUrl);
        }
        if self.expires_at_ms <= self.issued_at_ms {
            return Err(Malformed::Lifetime {
                issued_at_ms: self.issued_at_ms,
                expires_at_ms: self.expires_at_ms,
            });
        }
        Ok(())
    }

    fn to_payload(&self) -> ImpressionTokenPayload {
        ImpressionTokenPayload {
            impression_id: self.impression_id.to_vec(),
            ad_id: self.ad_id,
            advertiser_id: self.advertiser_id,
            campaign_id: self.campaign_id,
            landing_url: self.landing_url.clone(),
            issued_at_ms: self.issued_at_ms,
            expires_at_ms: self.expires_at_ms,
            key_id: self.key_id,
        }
    }

    fn from_payload(p: ImpressionTokenPayload) -> Result<Self, Malformed> {
        let impression_id: [u8; IMPRESSION_ID_LEN] = p
            .impression_id
            .as_slice()
            .try_into()
            .map_err(|_| Malformed::ImpressionId(p.impression_id.len()))?;
        Ok(Impression {
            impression_id,
            ad_id: p.ad_id,
            advertiser_id: p.advertiser_id,
            campaign_id: p.campaign_id,
            landing_url: p.landing_url,
            issued_at_ms: p.issued_at_ms,
            expires_at_ms: p.expires_at_ms,
            key_id: p.key_id,
        })
    }
}

/// A verified token as the per-click path needs it: the impression without its landing URL
/// (only redirects read that, through [`Keyring::verify`]). `Copy`, so verifying a click
/// with [`Keyring::verify_click`] allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// 16 random bytes, the dedup key.
    pub impression_id: [u8; IMPRESSION_ID_LEN],
    /// Ad placed.
    pub ad_id: u64,
    /// Owner of the ad.
    pub advertiser_id: u64,
    /// Campaign of the ad.
    pub campaign_id: u64,
    /// Mint time.
    pub issued_at_ms: i64,
    /// Expiry.
    pub expires_at_ms: i64,
    /// The key that signed it.
    pub key_id: u32,
}

impl From<&Impression> for Verified {
    fn from(i: &Impression) -> Self {
        Verified {
            impression_id: i.impression_id,
            ad_id: i.ad_id,
            advertiser_id: i.advertiser_id,
            campaign_id: i.campaign_id,
            issued_at_ms: i.issued_at_ms,
            expires_at_ms: i.expires_at_ms,
            key_id: i.key_id,
        }
    }
}

/// The landing URL rule of [`Impression::check`], on a borrowed string.
fn landing_url_ok(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    // A bare scheme, control characters or spaces would make a broken or dangerous
    // Location header; anything but http(s) (javascript:, data:) is an open door.
    matches!(rest, Some(r) if !r.is_empty())
        && url.len() <= MAX_LANDING_URL_LEN
        && !url.bytes().any(|b| b.is_ascii_control() || b == b' ')
}

/// One HMAC key with its id. `Debug` never prints the secret.
#[derive(Clone)]
pub struct SigningKey {
    id: u32,
    secret: Vec<u8>,
    /// HMAC state after absorbing the key, cloned per token (saves re-keying).
    keyed: HmacSha256,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl SigningKey {
    /// A key from its id and secret bytes (16..=64 bytes).
    pub fn new(id: u32, secret: &[u8]) -> Result<Self, KeyError> {
        if !SECRET_LEN_RANGE.contains(&secret.len()) {
            return Err(KeyError::SecretLength(secret.len()));
        }
        let keyed =
            HmacSha256::new_from_slice(secret).map_err(|_| KeyError::SecretLength(secret.len()))?;
        Ok(SigningKey {
            id,
            secret: secret.to_vec(),
            keyed,
        })
    }

    /// The key id carried in tokens.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The raw secret (for writing key files; never log it).
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    fn mac(&self, body: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(body);
        mac
    }
}

/// The keys a signer or verifier holds: one current key (signs) and older keys that are
/// still accepted while tokens signed with them may be alive (rotation).
#[derive(Clone, Debug)]
pub struct Keyring {
    current: u32,
    /// Newest first; always contains `current`.
    keys: Vec<SigningKey>,
}

impl Keyring {
    /// A keyring with a single key, which is current.
    pub fn new(current: SigningKey) -> Self {
        Keyring {
            current: current.id,
            keys: vec![current],
        }
    }

    /// A keyring from a current key id and all keys (current and previous).
    pub fn from_keys(current: u32, keys: Vec<SigningKey>) -> Result<Self, KeyError> {
        let mut seen = std::collections::HashSet::new();
        for k in &keys {
            if !seen.insert(k.id) {
                return Err(KeyError::DuplicateId(k.id));
            }
        }
        if !seen.contains(&current) {
            return Err(KeyError::MissingCurrent(current));
        }
        Ok(Keyring { current, keys })
    }

    /// The key that signs new tokens.
    pub fn current(&self) -> &SigningKey {
        // `from_keys`/`new`/`rotate` keep `current` in `keys`; fall back to the first key
        // rather than panic if that invariant were ever broken.
        self.get(self.current).unwrap_or(&self.keys[0])
    }

    /// All keys, current first.
    pub fn keys(&self) -> impl Iterator<Item = &SigningKey> {
        let current = self.current;
        self.keys
            .iter()
            .filter(move |k| k.id == current)
            .chain(self.keys.iter().filter(move |k| k.id != current))
    }

    /// A key by id.
    pub fn get(&self, id: u32) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Makes `new` the current key and keeps at most `keep` keys in all (the new one plus
    /// the most recent previous ones). Returns the ids that were dropped.
    pub fn rotate(&mut self, new: SigningKey, keep: usize) -> Result<Vec<u32>, KeyError> {
        if self.get(new.id).is_some() {
            return Err(KeyError::DuplicateId(new.id));
        }
        let mut ordered: Vec<SigningKey> = self.keys().cloned().collect();
        ordered.insert(0, new);
        let keep = keep.max(1);
        let dropped = ordered.split_off(keep.min(ordered.len()));
        self.current = ordered[0].id;
        self.keys = ordered;
        Ok(dropped.into_iter().map(|k| k.id).collect())
    }

    /// The next unused key id (one more than the largest).
    pub fn next_id(&self) -> u32 {
        self.keys
            .iter()
            .map(|k| k.id)
            .max()
            .unwrap_or(0)
            .saturating_add(1)
    }

    /// Signs `impression` with the current key (its `key_id` is overwritten) and returns
    /// the token text.
    pub fn sign(&self, impression: &Impression) -> Result<String, KeyError> {
        impression.check().map_err(KeyError::InvalidImpression)?;
        let key = self.current();
        let mut payload = impression.to_payload();
        payload.key_id = key.id;
        let mut bytes = Vec::with_capacity(1 + payload.encoded_len() + TAG_LEN);
        bytes.push(TOKEN_VERSION);
        // Encoding into a Vec cannot run out of space.
        payload.encode_raw(&mut bytes);
        let tag = key.mac(&bytes).finalize().into_bytes();
        bytes.extend_from_slice(&tag);
        Ok(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Verifies a token text against this keyring at time `now_ms`, allowing `skew_ms` of
    /// clock difference on both the issue and the expiry time.
    pub fn verify(&self, token: &str, now_ms: i64, skew_ms: i64) -> Result<Impression, TokenError> {
        let malformed = TokenError::Malformed;
        if token.is_empty() {
            return Err(malformed(Malformed::Empty));
        }
        if token.len() > MAX_TOKEN_TEXT_LEN {
            return Err(malformed(Malformed::TooLong(token.len())));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|e| malformed(Malformed::Base64(e.to_string())))?;
        if bytes.len() < 1 + TAG_LEN + 1 {
            return Err(malformed(Malformed::TooShort(bytes.len())));
        }
        if bytes[0] != TOKEN_VERSION {
            return Err(malformed(Malformed::Version(bytes[0])));
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        let payload = ImpressionTokenPayload::decode(&body[1..])
            .map_err(|e| malformed(Malformed::Payload(e.to_string())))?;
        let key = self
            .get(payload.key_id)
            .ok_or(TokenError::UnknownKey(payload.key_id))?;
        key.mac(body)
            .verify_slice(tag)
            .map_err(|_| TokenError::BadSignature)?;
        let impression = Impression::from_payload(payload).map_err(malformed)?;
        impression.check().map_err(malformed)?;
        if impression.issued_at_ms > now_ms.saturating_add(skew_ms) {
            return Err(TokenError::NotYetValid {
                issued_at_ms: impression.issued_at_ms,
                now_ms,
                skew_ms,
            });
        }
        if now_ms > impression.expires_at_ms.saturating_add(skew_ms) {
            return Err(TokenError::Expired {
                expires_at_ms: impression.expires_at_ms,
                now_ms,
                skew_ms,
            });
        }
        Ok(impression)
    }

    /// [`Keyring::verify`] for the per-click path: the same answer (tested below), without
    /// the landing URL, and without allocating when the token is valid. A token the
    /// borrowed reader does not take (any error, or a framing it does not read) goes
    /// through [`Keyring::verify`], so errors are exactly its errors.
    pub fn verify_click(
        &self,
        token: &str,
        now_ms: i64,
        skew_ms: i64,
    ) -> Result<Verified, TokenError> {
        match self.verify_borrowed(token, now_ms, skew_ms) {
            Some(v) => Ok(v),
            None => self
                .verify(token, now_ms, skew_ms)
                .map(|i| Verified::from(&i)),
        }
    }

    /// The valid-token path of [`Keyring::verify`] over a stack buffer and borrowed
    /// fields; `None` for anything else (the caller asks `verify` for the exact error).
    fn verify_borrowed(&self, token: &str, now_ms: i64, skew_ms: i64) -> Option<Verified> {
        use crate::wire::{LEN, Reader, VARINT};
        if token.is_empty() || token.len() > MAX_TOKEN_TEXT_LEN {
            return None;
        }
        // Base64 of at most MAX_TOKEN_TEXT_LEN characters decodes to at most 3/4 of it.
        let mut buf = [0u8; MAX_TOKEN_TEXT_LEN / 4 * 3 + 3];
        let n = URL_SAFE_NO_PAD.decode_slice(token, &mut buf).ok()?;
        let bytes = buf.get(..n)?;
        if bytes.len() < 1 + TAG_LEN + 1 || bytes[0] != TOKEN_VERSION {
            return None;
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        let mut v = Verified {
            impression_id: [0; IMPRESSION_ID_LEN],
            ad_id: 0,
            advertiser_id: 0,
            campaign_id: 0,
            issued_at_ms: 0,
            expires_at_ms: 0,
            key_id: 0,
        };
        let mut id: &[u8] = &[];
        let mut url = "";
        let mut r = Reader(body.get(1..)?);
        while let Some((field, wire)) = r.key().ok()? {
            // Integer fields are two's complement varints truncated to their width, as
            // prost reads them; the last occurrence of a field wins, as in prost.
            match (field, wire) {
                (1, LEN) => id = r.len_delimited().ok()?,
                (2, VARINT) => v.ad_id = r.varint().ok()?,
                (3, VARINT) => v.advertiser_id = r.varint().ok()?,
                (4, VARINT) => v.campaign_id = r.varint().ok()?,
                (5, LEN) => url = r.str().ok()?,
                (6, VARINT) => v.issued_at_ms = r.varint().ok()? as i64,
                (7, VARINT) => v.expires_at_ms = r.varint().ok()? as i64,
                (8, VARINT) => v.key_id = r.varint().ok()? as u32,
                (1..=8, _) => return None,
                _ => r.skip(wire).ok()?,
            }
        }
        let key = self.get(v.key_id)?;
        key.mac(body).verify_slice(tag).ok()?;
        v.impression_id = id.try_into().ok()?;
        let valid = landing_url_ok(url)
            && v.expires_at_ms > v.issued_at_ms
            && v.issued_at_ms <= now_ms.saturating_add(skew_ms)
            && now_ms <= v.expires_at_ms.saturating_add(skew_ms);
        valid.then_some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000_000;

    fn key(id: u32, fill: u8) -> SigningKey {
        SigningKey::new(id, &[fill; 32]).unwrap()
    }

    fn impression(ad_id: u64, url: &str) -> Impression {
        Impression {
            impression_id: [7; 16],
            ad_id,
            advertiser_id: 3,
            campaign_id: 9,
            landing_url: url.to_string(),
            issued_at_ms: NOW - 1000,
            expires_at_ms: NOW + 3_600_000,
            key_id: 0,
        }
    }

    fn arb_impression() -> impl Strategy<Value = Impression> {
        (
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            "[a-z0-9./?=&-]{1,80}",
            0i64..1_000_000,
            1i64..10_000_000,
        )
            .prop_map(|(id, ad, adv, camp, path, back, ttl)| Impression {
                impression_id: id,
                ad_id: ad,
                advertiser_id: adv,
                campaign_id: camp,
                landing_url: format!("https://example.com/{path}"),
                issued_at_ms: NOW - back,
                expires_at_ms: NOW + ttl,
                key_id: 0,
            })
    }

    #[test]
    fn rejects_each_error_kind_precisely() {
        let ring = Keyring::new(key(1, 1));
        let tok = ring.sign(&impression(42, "https://example.com/x")).unwrap();

        assert_eq!(
            ring.verify("", NOW, 0),
            Err(TokenError::Malformed(Malformed::Empty))
        );
        assert!(matches!(
            ring.verify("not base64!", NOW, 0),
            Err(TokenError::Malformed(Malformed::Base64(_)))
        ));
        assert!(matches!(
            ring.verify(&"A".repeat(MAX_TOKEN_TEXT_LEN + 1), NOW, 0),
            Err(TokenError::Malformed(Malformed::TooLong(_)))
        ));
        assert!(matches!(
            ring.verify("AQID", NOW, 0),
            Err(TokenError::Malformed(Malformed::TooShort(3)))
        ));
        // Unknown key: a keyring that only has key 2.
        let other = Keyring::new(key(2, 1));
        assert_eq!(other.verify(&tok, NOW, 0), Err(TokenError::UnknownKey(1)));
        // Same id, different secret: forged.
        let forger = Keyring::new(key(1, 9));
        assert_eq!(forger.verify(&tok, NOW, 0), Err(TokenError::BadSignature));
        // Expiry and skew.
        let exp = NOW + 3_600_000;
        assert!(ring.verify(&tok, exp, 0).is_ok());
        assert!(matches!(
            ring.verify(&tok, exp + 1, 0),
            Err(TokenError::Expired { .. })
        ));
        assert!(ring.verify(&tok, exp + 500, 500).is_ok());
        assert!(matches!(
            ring.verify(&tok, NOW - 5000, 1000),
            Err(TokenError::NotYetValid { .. })
        ));
        assert!(ring.verify(&tok, NOW - 1500, 1000).is_ok());
    }

    #[test]
    fn sign_refuses_non_http_landing_urls() {
        let ring = Keyring::new(key(1, 1));
        for url in [
            "javascript:alert(1)",
            "ftp://x/y",
            "https://",
            "https://a b",
            "",
        ] {
            assert_eq!(
                ring.sign(&impression(1, url)),
                Err(KeyError::InvalidImpression(Malformed::LandingUrl)),
                "{url}"
            );
        }
        let mut bad = impression(1, "https://ok.example/");
        bad.expires_at_ms = bad.issued_at_ms;
        assert!(matches!(
            ring.sign(&bad),
            Err(KeyError::InvalidImpression(Malformed::Lifetime { .. }))
        ));
    }

    #[test]
    fn rotation_keeps_previous_key_valid_and_drops_older() {
        let mut ring = Keyring::new(key(1, 1));
        let old = ring.sign(&impression(5, "https://e.com/a")).unwrap();
        assert_eq!(ring.rotate(key(2, 2), 2).unwrap(), Vec::<u32>::new());
        assert_eq!(ring.current().id(), 2);
        let new = ring.sign(&impression(5, "https://e.com/a")).unwrap();
        assert_eq!(ring.verify(&old, NOW, 0).unwrap().key_id, 1);
        assert_eq!(ring.verify(&new, NOW, 0).unwrap().key_id, 2);
        assert_eq!(ring.rotate(key(3, 3), 2).unwrap(), vec![1]);
        assert_eq!(ring.verify(&old, NOW, 0), Err(TokenError::UnknownKey(1)));
        assert!(ring.verify(&new, NOW, 0).is_ok());
        assert_eq!(ring.rotate(key(3, 4), 2), Err(KeyError::DuplicateId(3)));
    }

    #[test]
    fn keyring_rejects_bad_construction() {
        assert_eq!(
            SigningKey::new(1, &[0; 8]).unwrap_err(),
            KeyError::SecretLength(8)
        );
        assert_eq!(
            Keyring::from_keys(1, vec![key(1, 1), key(1, 2)]).unwrap_err(),
            KeyError::DuplicateId(1)
        );
        assert_eq!(
            Keyring::from_keys(3, vec![key(1, 1)]).unwrap_err(),
            KeyError::MissingCurrent(3)
        );
        assert!(!format!("{:?}", key(1, 0xAB)).contains("171"));
    }

    proptest! {
        #[test]
        fn round_trip(imp in arb_impression()) {
            let ring = Keyring::new(key(4, 5));
            let tok = ring.sign(&imp).unwrap();
            let got = ring.verify(&tok, NOW, 0).unwrap();
            prop_assert_eq!(got, Impression { key_id: 4, ..imp });
            prop_assert!(tok.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }

        #[test]
        fn every_single_bit_flip_of_the_bytes_is_rejected(imp in arb_impression()) {
            let ring = Keyring::new(key(4, 5));
            let tok = ring.sign(&imp).unwrap();
            let bytes = URL_SAFE_NO_PAD.decode(&tok).unwrap();
            for i in 0..bytes.len() * 8 {
                let mut b = bytes.clone();
                b[i / 8] ^= 1 << (i % 8);
                let flipped = URL_SAFE_NO_PAD.encode(&b);
                prop_assert!(ring.verify(&flipped, NOW, 0).is_err(), "bit {} accepted", i);
            }
        }

        #[test]
        fn every_single_bit_flip_of_the_text_is_rejected(imp in arb_impression()) {
            let ring = Keyring::new(key(4, 5));
            let tok = ring.sign(&imp).unwrap();
            for i in 0..tok.len() * 8 {
                let mut b = tok.clone().into_bytes();
                b[i / 8] ^= 1 << (i % 8);
                // A flip may produce invalid UTF-8; such text cannot even reach verify.
                if let Ok(text) = String::from_utf8(b) {
                    prop_assert!(ring.verify(&text, NOW, 0).is_err(), "text bit {} accepted", i);
                }
            }
        }

        #[test]
        fn wrong_key_is_rejected(imp in arb_impression(), a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            prop_assume!(a != b);
            let signer = Keyring::new(SigningKey::new(1, &a).unwrap());
            let verifier = Keyring::new(SigningKey::new(1, &b).unwrap());
            let tok = signer.sign(&imp).unwrap();
            prop_assert_eq!(verifier.verify(&tok, NOW, 0), Err(TokenError::BadSignature));
        }

        /// Fuzz: any text at all, including non-ASCII and oversized, is rejected with an
        /// error (never a panic), and anything over the size bound is rejected before any
        /// decoding work.
        #[test]
        fn fuzz_arbitrary_text_is_rejected(s in any::<String>(), pad in 0usize..3 * MAX_TOKEN_TEXT_LEN) {
            let ring = Keyring::new(key(4, 5));
            prop_assert!(ring.verify(&s, NOW, 0).is_err());
            let long = format!("{s}{}", "A".repeat(pad));
            let got = ring.verify(&long, NOW, i64::MAX);
            if long.len() > MAX_TOKEN_TEXT_LEN {
                prop_assert_eq!(got, Err(TokenError::Malformed(Malformed::TooLong(long.len()))));
            } else {
                prop_assert!(got.is_err());
            }
        }

        /// Fuzz: arbitrary bytes in valid framing (base64 of version + anything + 32 bytes).
        #[test]
        fn fuzz_arbitrary_bytes_are_rejected(
            body in proptest::collection::vec(any::<u8>(), 0..1600),
            now in any::<i64>(),
            skew in any::<i64>(),
        ) {
            let ring = Keyring::new(key(4, 5));
            let mut framed = vec![TOKEN_VERSION];
            framed.extend_from_slice(&body);
            prop_assert!(ring.verify(&URL_SAFE_NO_PAD.encode(&body), now, skew).is_err());
            prop_assert!(ring.verify(&URL_SAFE_NO_PAD.encode(&framed), now, skew).is_err());
        }

        /// Fuzz past the signature: arbitrary payload bytes correctly tagged with a known key
        /// (what a holder of the secret could send). Decoding must never panic, and anything
        /// accepted satisfies every payload rule.
        #[test]
        fn fuzz_signed_arbitrary_payloads_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..1400),
            now in any::<i64>(),
            skew in 0i64..i64::MAX,
        ) {
            let k = key(0, 5);
            let ring = Keyring::new(k.clone());
            let mut bytes = vec![TOKEN_VERSION];
            bytes.extend_from_slice(&payload);
            let tag = k.mac(&bytes).finalize().into_bytes();
            bytes.extend_from_slice(&tag);
            let text = URL_SAFE_NO_PAD.encode(&bytes);
            if let Ok(imp) = ring.verify(&text, now, skew) {
                prop_assert!(imp.check().is_ok());
                prop_assert!(imp.expires_at_ms > imp.issued_at_ms);
                prop_assert!(imp.landing_url.len() <= MAX_LANDING_URL_LEN);
            }
        }

        /// Fuzz: valid tokens mutated by insertions, deletions, replacements and truncation
        /// are rejected unless the mutation left the text unchanged.
        #[test]
        fn fuzz_mutated_tokens_are_rejected(
            imp in arb_impression(),
            ops in proptest::collection::vec((0u8..4, any::<usize>(), any::<char>()), 1..8),
        ) {
            let ring = Keyring::new(key(4, 5));
            let tok = ring.sign(&imp).unwrap();
            let mut chars: Vec<char> = tok.chars().collect();
            for (op, at, c) in ops {
                let i = at % (chars.len() + 1);
                match op {
                    0 => chars.insert(i, c),
                    1 if i < chars.len() => { chars.remove(i); }
                    2 if i < chars.len() => chars[i] = c,
                    _ => chars.truncate(i),
                }
            }
            let mutated: String = chars.into_iter().collect();
            if mutated != tok {
                prop_assert!(ring.verify(&mutated, NOW, 0).is_err(), "{} accepted", mutated);
            }
        }

        /// `verify_click` answers as `verify` does, for valid tokens, tokens near their
        /// clock bounds, and mutated, re-signed or arbitrary ones.
        #[test]
        fn verify_click_agrees_with_verify(
            imp in arb_impression(),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            now_off in -20_000_000i64..20_000_000,
            skew in 0i64..100_000,
        ) {
            let k = key(4, 5);
            let ring = Keyring::new(k.clone());
            let tok = ring.sign(&imp).unwrap();
            // The signed token's bytes, damaged and re-tagged (what a key holder could
            // send): exercises the payload reader past the signature.
            let mut bytes = URL_SAFE_NO_PAD.decode(&tok).unwrap();
            bytes.truncate(bytes.len() - TAG_LEN);
            for (i, b) in &flips {
                let i = 1 + i.index(bytes.len() - 1);
                bytes[i] ^= *b;
            }
            let tag = k.mac(&bytes).finalize().into_bytes();
            bytes.extend_from_slice(&tag);
            let mut arbitrary = vec![TOKEN_VERSION];
            arbitrary.extend_from_slice(&payload);
            let tag = k.mac(&arbitrary).finalize().into_bytes();
            arbitrary.extend_from_slice(&tag);
            let now = NOW + now_off;
            for text in [tok.clone(), URL_SAFE_NO_PAD.encode(&bytes), URL_SAFE_NO_PAD.encode(&arbitrary), tok[1..].to_string()] {
                let want = ring.verify(&text, now, skew).map(|i| Verified::from(&i));
                prop_assert_eq!(ring.verify_click(&text, now, skew), want.clone());
                // The borrowed path alone never accepts what `verify` refuses.
                if let Some(v) = ring.verify_borrowed(&text, now, skew) {
                    prop_assert_eq!(Ok(v), want);
                }
            }
        }

        #[test]
        fn expired_is_rejected(imp in arb_impression(), late in 1i64..1_000_000, skew in 0i64..10_000) {
            let ring = Keyring::new(key(4, 5));
            let tok = ring.sign(&imp).unwrap();
            let now = imp.expires_at_ms + skew + late;
            let is_expired = matches!(ring.verify(&tok, now, skew), Err(TokenError::Expired { .. }));
            prop_assert!(is_expired);
            prop_assert!(ring.verify(&tok, imp.expires_at_ms + skew, skew).is_ok());
        }
    }
}
