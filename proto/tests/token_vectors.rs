//! `docs/token-vectors.json` against the real signer and verifier: the file must be exactly
//! what the generator (`examples/token_vectors.rs`) prints today, and every vector in it,
//! read back from the JSON, must get its stated outcome from `Keyring::verify` plus the
//! collector's lifetime rule. Tags are recomputed here with HMAC-SHA256 over the bytes the
//! spec names, not through the token module.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../examples/token_vectors.rs"]
mod generator;

use std::collections::BTreeSet;
use std::path::PathBuf;

use adclick_proto::token::{Impression, TAG_LEN, TOKEN_VERSION};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/token-vectors.json")
}

fn file() -> Value {
    serde_json::from_str(&std::fs::read_to_string(path()).unwrap()).unwrap()
}

fn int(v: &Value) -> i64 {
    v.as_str().unwrap().parse().unwrap()
}

fn uint(v: &Value) -> u64 {
    v.as_str().unwrap().parse().unwrap()
}

fn unhex(s: &Value) -> Vec<u8> {
    let s = s.as_str().unwrap();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn keys(v: &Value) -> Vec<(u32, Vec<u8>)> {
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                u32::try_from(k["id"].as_u64().unwrap()).unwrap(),
                unhex(&k["secret_hex"]),
            )
        })
        .collect()
}

fn impression_of(p: &Value) -> Impression {
    Impression {
        impression_id: unhex(&p["impression_id_hex"]).try_into().unwrap(),
        ad_id: uint(&p["ad_id"]),
        advertiser_id: uint(&p["advertiser_id"]),
        campaign_id: uint(&p["campaign_id"]),
        landing_url: p["landing_url"].as_str().unwrap().to_string(),
        issued_at_ms: int(&p["issued_at_ms"]),
        expires_at_ms: int(&p["expires_at_ms"]),
        key_id: u32::try_from(p["key_id"].as_u64().unwrap()).unwrap(),
    }
}

#[test]
fn file_is_what_the_generator_prints() {
    let on_disk = std::fs::read_to_string(path()).unwrap();
    // Not assert_eq!: a diff of two 40 KB strings helps nobody.
    assert!(
        on_disk == generator::render(),
        "docs/token-vectors.json is stale: regenerate it with\n  \
         cargo run -q -p adclick-proto --example token_vectors > docs/token-vectors.json\n\
         and review the diff (a changed valid token means the token format changed)"
    );
}

#[test]
fn every_valid_vector_verifies_and_mints_to_its_token() {
    let f = file();
    let valid = f["valid"].as_array().unwrap();
    assert!(valid.len() >= 10, "{} valid vectors", valid.len());
    for v in valid {
        let name = v["name"].as_str().unwrap();
        let keys = keys(v);
        let ring = generator::keyring(&keys);
        let token = v["token"].as_str().unwrap();
        let want = impression_of(&v["payload"]);
        let got = generator::verdict(&ring, token, int(&v["now_ms"]), int(&v["skew_ms"]))
            .unwrap_or_else(|e| panic!("{name}: rejected {e:?}"));
        assert_eq!(got, want, "{name}");

        // The framing, recomputed from the spec: 0x01 || payload || HMAC(secret, 0x01 || payload).
        let signing_id = u32::try_from(v["signing_key_id"].as_u64().unwrap()).unwrap();
        let secret = &keys.iter().find(|(id, _)| *id == signing_id).unwrap().1;
        let payload = unhex(&v["payload_hex"]);
        let mut body = vec![TOKEN_VERSION];
        body.extend_from_slice(&payload);
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(&body);
        let tag = mac.finalize().into_bytes().to_vec();
        assert_eq!(tag, unhex(&v["tag_hex"]), "{name}: tag_hex");
        body.extend_from_slice(&tag);
        assert_eq!(URL_SAFE_NO_PAD.encode(&body), token, "{name}: framing");
        assert_eq!(body.len(), 1 + payload.len() + TAG_LEN);

        if v["mint"].as_bool().unwrap() {
            let signer = generator::keyring(&[(signing_id, secret.clone())]);
            assert_eq!(signer.sign(&want).unwrap(), token, "{name}: minted token");
        }
    }
}

#[test]
fn every_invalid_vector_is_rejected_with_its_reason() {
    let f = file();
    let invalid = f["invalid"].as_array().unwrap();
    let mut reasons = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    for v in invalid {
        let name = v["name"].as_str().unwrap();
        let ring = generator::keyring(&keys(v));
        let token = v["token"].as_str().unwrap();
        let got = generator::verdict(&ring, token, int(&v["now_ms"]), int(&v["skew_ms"]))
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        let want_reason = v["reason"].as_str().unwrap();
        let want_kind = v["malformed"].as_str();
        assert_eq!((got.0, got.1), (want_reason, want_kind), "{name}");
        reasons.insert(want_reason);
        if let Some(k) = want_kind {
            kinds.insert(k);
        }
    }
    // Every reason the collector reports for a token, and every malformed rule, has a vector.
    let all_reasons = [
        "bad_signature",
        "expired",
        "malformed",
        "not_yet_valid",
        "token_lifetime_too_long",
        "unknown_key",
    ];
    assert_eq!(reasons, all_reasons.into_iter().collect());
    let all_kinds = [
        "base64",
        "empty",
        "impression_id",
        "landing_url",
        "lifetime",
        "payload",
        "too_long",
        "too_short",
        "version",
    ];
    assert_eq!(kinds, all_kinds.into_iter().collect());
}
