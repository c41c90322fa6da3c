//! `ImpressionSigner`: what an ad server uses to mint signed impression tokens when it
//! places an ad. Wraps the contract's [`Keyring`]; adds the random impression id and the
//! issue/expiry times. Needs the OS random source, so it is not part of the browser build.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use adclick_proto::keyfile::{KeyFile, KeyFileError};
use adclick_proto::token::{IMPRESSION_ID_LEN, Impression, KeyError, Keyring};

/// The ad being placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdPlacement {
    /// Ad id.
    pub ad_id: u64,
    /// Advertiser owning the ad.
    pub advertiser_id: u64,
    /// Campaign of the ad.
    pub campaign_id: u64,
    /// Where a click on the ad lands (http/https).
    pub landing_url: String,
}

/// A freshly minted token and what it says.
#[derive(Debug, Clone)]
pub struct MintedToken {
    /// Token text (URL-safe base64), to embed in the page or click URL.
    pub token: String,
    /// The signed impression.
    pub impression: Impression,
}

/// Why minting failed.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The placement breaks the token rules (e.g. non-http landing URL).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The OS random source failed.
    #[error("no randomness for the impression id: {0}")]
    Random(String),
    /// TTL out of range.
    #[error("ttl must be between 1 second and 30 days")]
    Ttl,
}

/// Mints impression tokens with the keyring's current key.
#[derive(Debug, Clone)]
pub struct ImpressionSigner {
    keyring: Keyring,
    ttl: Duration,
}

impl ImpressionSigner {
    /// A signer with a one-hour token lifetime.
    pub fn new(keyring: Keyring) -> Self {
        ImpressionSigner {
            keyring,
            ttl: Duration::from_secs(3600),
        }
    }

    /// Sets the token lifetime (1 s to 30 days). Collectors and aggregators keep dedup
    /// state for this long, so shorter is cheaper.
    pub fn with_ttl(mut self, ttl: Duration) -> Result<Self, SignerError> {
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(30 * 86_400) {
            return Err(SignerError::Ttl);
        }
        self.ttl = ttl;
        Ok(self)
    }

    /// The keyring in use.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Mints a token for `ad`, issued now.
    pub fn mint(&self, ad: &AdPlacement) -> Result<MintedToken, SignerError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        self.mint_at(ad, now)
    }

    /// Mints a token for `ad` issued at `now_ms` (for tests and replays).
    pub fn mint_at(&self, ad: &AdPlacement, now_ms: i64) -> Result<MintedToken, SignerError> {
        let mut impression_id = [0u8; IMPRESSION_ID_LEN];
        getrandom::fill(&mut impression_id).map_err(|e| SignerError::Random(e.to_string()))?;
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let mut impression = Impression {
            impression_id,
            ad_id: ad.ad_id,
            advertiser_id: ad.advertiser_id,
            campaign_id: ad.campaign_id,
            landing_url: ad.landing_url.clone(),
            issued_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
            key_id: self.keyring.current().id(),
        };
        let token = self.keyring.sign(&impression)?;
        impression.key_id = self.keyring.current().id();
        Ok(MintedToken { token, impression })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adclick_proto::token::SigningKey;

    #[test]
    fn minted_tokens_verify_and_are_unique() {
        let ring = Keyring::new(SigningKey::new(3, &[5; 32]).unwrap());
        let signer = ImpressionSigner::new(ring.clone())
            .with_ttl(Duration::from_secs(60))
            .unwrap();
        let ad = AdPlacement {
            ad_id: 42,
            advertiser_id: 7,
            campaign_id: 1,
            landing_url: "https://example.com/x".into(),
        };
        let a = signer.mint_at(&ad, 1_000_000).unwrap();
        let b = signer.mint_at(&ad, 1_000_000).unwrap();
        assert_ne!(a.impression.impression_id, b.impression.impression_id);
        let v = ring.verify(&a.token, 1_000_000 + 59_000, 0).unwrap();
        assert_eq!(v, a.impression);
        assert_eq!(
            (v.ad_id, v.advertiser_id, v.key_id, v.expires_at_ms),
            (42, 7, 3, 1_060_000)
        );
        assert!(signer.with_ttl(Duration::ZERO).is_err());
    }
}
