//! Generates `docs/token-vectors.json`, the impression-token test vectors of `docs/token.md`:
//!
//! ```sh
//! cargo run -q -p adclick-proto --example token_vectors > docs/token-vectors.json
//! ```
//!
//! Every expected outcome written here comes from the real verifier (`Keyring::verify`)
//! followed by the collector's token-lifetime rule (`countable::check_token_lifetime`), and
//! the generator panics if that outcome is not the one the vector was built to show. Valid
//! vectors marked `mint: true` are signed by the real signer (`Keyring::sign`); the others
//! are crafted bytes (a hand-written payload, or a tag over something else), tagged with
//! HMAC-SHA256 directly. `proto/tests/token_vectors.rs` re-verifies the file and fails when
//! it differs from this program's output. This program must not read clocks, randomness or
//! files: the output is a pure function of the code.
// A generator run by developers and tests: a broken invariant must stop it loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use adclick_proto::countable::{self, MAX_TOKEN_LIFETIME_MS};
use adclick_proto::token::{
    Impression, Keyring, MAX_LANDING_URL_LEN, MAX_TOKEN_TEXT_LEN, SigningKey, TAG_LEN,
    TOKEN_VERSION, TokenError,
};
use adclick_proto::v1::ImpressionTokenPayload;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use prost::Message;
use serde::Serialize;
use sha2::Sha256;

/// Verifier clock of most vectors (2027-01-15T08:00:00Z).
pub const NOW: i64 = 1_800_000_000_000;
/// Skew allowance of most vectors (the collector's default `tokens.skew_ms`).
pub const SKEW: i64 = 30_000;
const HOUR: i64 = 3_600_000;

/// The whole file.
#[derive(Debug, Serialize)]
pub struct Vectors {
    about: &'static str,
    spec: &'static str,
    generator: &'static str,
    notes: Vec<&'static str>,
    valid: Vec<Valid>,
    invalid: Vec<Invalid>,
}

/// A key of a verifier's keyring.
#[derive(Debug, Serialize, Clone)]
pub struct KeyJson {
    id: u32,
    secret_hex: String,
}

/// The payload fields; 64-bit integers as decimal strings.
#[derive(Debug, Serialize)]
pub struct PayloadJson {
    impression_id_hex: String,
    ad_id: String,
    advertiser_id: String,
    campaign_id: String,
    landing_url: String,
    issued_at_ms: String,
    expires_at_ms: String,
    key_id: u32,
}

/// A token that verifies, with what it decodes to.
#[derive(Debug, Serialize)]
pub struct Valid {
    name: &'static str,
    description: &'static str,
    /// true: signing `payload` with `signing_key_id` must give exactly `token`.
    mint: bool,
    keys: Vec<KeyJson>,
    signing_key_id: u32,
    now_ms: String,
    skew_ms: String,
    payload: PayloadJson,
    payload_hex: String,
    tag_hex: String,
    token: String,
}

/// A token that is rejected, and why.
#[derive(Debug, Serialize)]
pub struct Invalid {
    name: &'static str,
    description: &'static str,
    keys: Vec<KeyJson>,
    now_ms: String,
    skew_ms: String,
    token: String,
    /// The reason the collector reports.
    reason: &'static str,
    /// For `malformed`: which rule (`Malformed::kind`); otherwise null.
    malformed: Option<&'static str>,
}

/// The collector's verdict on a token: the verifier, then the token-lifetime rule.
pub fn verdict(
    ring: &Keyring,
    token: &str,
    now_ms: i64,
    skew_ms: i64,
) -> Result<Impression, (&'static str, Option<&'static str>)> {
    let imp = ring.verify(token, now_ms, skew_ms).map_err(|e| {
        let kind = match &e {
            TokenError::Malformed(m) => Some(m.kind()),
            _ => None,
        };
        (e.reason(), kind)
    })?;
    countable::check_token_lifetime(imp.issued_at_ms, imp.expires_at_ms)
        .map_err(|e| (e.reason(), None))?;
    Ok(imp)
}

/// A keyring from vector keys (the first is current).
pub fn keyring(keys: &[(u32, Vec<u8>)]) -> Keyring {
    let signing: Vec<SigningKey> = keys
        .iter()
        .map(|(id, s)| SigningKey::new(*id, s).expect("vector secrets are 16..=64 bytes"))
        .collect();
    Keyring::from_keys(keys[0].0, signing).expect("vector keyrings are well formed")
}

fn key1() -> (u32, Vec<u8>) {
    (1, (0u8..32).collect())
}
fn key2() -> (u32, Vec<u8>) {
    (
        2,
        (0u8..32)
            .map(|i| i.wrapping_mul(37).wrapping_add(101))
            .collect(),
    )
}
fn key_min() -> (u32, Vec<u8>) {
    (7, (0u8..16).map(|i| 0xf0 ^ i).collect())
}
fn key_max() -> (u32, Vec<u8>) {
    (u32::MAX, (0u8..64).map(|i| 255 - i).collect())
}
fn key0() -> (u32, Vec<u8>) {
    (0, vec![0x5a; 32])
}
/// Key 1's id with another secret: what a forger without the secret would use.
fn key1_forged() -> (u32, Vec<u8>) {
    (1, (0u8..32).map(|i| i ^ 0x80).collect())
}
fn key9() -> (u32, Vec<u8>) {
    (9, vec![9; 32])
}

fn keys_json(keys: &[(u32, Vec<u8>)]) -> Vec<KeyJson> {
    keys.iter()
        .map(|(id, s)| KeyJson {
            id: *id,
            secret_hex: hex(s),
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn impression(ad_id: u64, landing_url: &str) -> Impression {
    Impression {
        impression_id: [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ],
        ad_id,
        advertiser_id: 7,
        campaign_id: 1,
        landing_url: landing_url.to_string(),
        issued_at_ms: NOW - 60_000,
        expires_at_ms: NOW - 60_000 + HOUR,
        key_id: 0,
    }
}

fn payload_of(imp: &Impression, key_id: u32) -> ImpressionTokenPayload {
    ImpressionTokenPayload {
        impression_id: imp.impression_id.to_vec(),
        ad_id: imp.ad_id,
        advertiser_id: imp.advertiser_id,
        campaign_id: imp.campaign_id,
        landing_url: imp.landing_url.clone(),
        issued_at_ms: imp.issued_at_ms,
        expires_at_ms: imp.expires_at_ms,
        key_id,
    }
}

/// `HMAC-SHA256(secret, body)`.
fn tag(secret: &[u8], body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// Token text of `version || payload || HMAC(secret, version || payload)`.
fn frame(version: u8, payload: &[u8], secret: &[u8]) -> String {
    let mut bytes = vec![version];
    bytes.extend_from_slice(payload);
    let t = tag(secret, &bytes);
    bytes.extend_from_slice(&t);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Token text of raw bytes.
fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn decode(token: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(token)
        .expect("a generated token is base64")
}

/// Hand-written protobuf fields, for payloads no prost struct encodes.
fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}
fn field_varint(field: u32, v: u64, out: &mut Vec<u8>) {
    varint(u64::from(field) << 3, out);
    varint(v, out);
}
fn field_bytes(field: u32, b: &[u8], out: &mut Vec<u8>) {
    varint((u64::from(field) << 3) | 2, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

#[derive(Debug)]
struct Gen {
    valid: Vec<Valid>,
    invalid: Vec<Invalid>,
}

impl Gen {
    /// A valid vector signed by the real signer with the first key of `keys` (or, with
    /// `signer`, another key in `keys`).
    #[allow(clippy::too_many_arguments)]
    fn minted(
        &mut self,
        name: &'static str,
        description: &'static str,
        keys: &[(u32, Vec<u8>)],
        signer: &(u32, Vec<u8>),
        imp: &Impression,
        now_ms: i64,
        skew_ms: i64,
    ) -> String {
        let token = keyring(std::slice::from_ref(signer))
            .sign(imp)
            .expect("valid vectors sign");
        self.valid_token(
            name,
            description,
            true,
            keys,
            signer.0,
            token.clone(),
            now_ms,
            skew_ms,
        );
        token
    }

    #[allow(clippy::too_many_arguments)]
    fn valid_token(
        &mut self,
        name: &'static str,
        description: &'static str,
        mint: bool,
        keys: &[(u32, Vec<u8>)],
        signing_key_id: u32,
        token: String,
        now_ms: i64,
        skew_ms: i64,
    ) {
        let imp = verdict(&keyring(keys), &token, now_ms, skew_ms)
            .unwrap_or_else(|e| panic!("valid vector {name} rejected: {e:?}"));
        assert_eq!(imp.key_id, signing_key_id, "{name}");
        let bytes = decode(&token);
        let (body, t) = bytes.split_at(bytes.len() - TAG_LEN);
        self.valid.push(Valid {
            name,
            description,
            mint,
            keys: keys_json(keys),
            signing_key_id,
            now_ms: now_ms.to_string(),
            skew_ms: skew_ms.to_string(),
            payload: PayloadJson {
                impression_id_hex: hex(&imp.impression_id),
                ad_id: imp.ad_id.to_string(),
                advertiser_id: imp.advertiser_id.to_string(),
                campaign_id: imp.campaign_id.to_string(),
                landing_url: imp.landing_url.clone(),
                issued_at_ms: imp.issued_at_ms.to_string(),
                expires_at_ms: imp.expires_at_ms.to_string(),
                key_id: imp.key_id,
            },
            payload_hex: hex(&body[1..]),
            tag_hex: hex(t),
            token,
        });
    }

    /// An invalid vector: the verdict must be `want` (reason, malformed kind).
    #[allow(clippy::too_many_arguments)]
    fn invalid(
        &mut self,
        name: &'static str,
        description: &'static str,
        keys: &[(u32, Vec<u8>)],
        token: String,
        now_ms: i64,
        skew_ms: i64,
        want: (&'static str, Option<&'static str>),
    ) {
        let got = verdict(&keyring(keys), &token, now_ms, skew_ms)
            .err()
            .unwrap_or_else(|| panic!("invalid vector {name} was accepted"));
        assert_eq!(got, want, "invalid vector {name}");
        self.invalid.push(Invalid {
            name,
            description,
            keys: keys_json(keys),
            now_ms: now_ms.to_string(),
            skew_ms: skew_ms.to_string(),
            token,
            reason: got.0,
            malformed: got.1,
        });
    }

    /// An invalid vector at the usual clock, keyring `[key 1]`.
    fn bad(
        &mut self,
        name: &'static str,
        description: &'static str,
        token: String,
        want: (&'static str, Option<&'static str>),
    ) {
        self.invalid(name, description, &[key1()], token, NOW, SKEW, want);
    }
}

const MALFORMED: &str = "malformed";
fn malformed(kind: &'static str) -> (&'static str, Option<&'static str>) {
    (MALFORMED, Some(kind))
}

/// Builds every vector.
pub fn generate() -> Vectors {
    let mut g = Gen {
        valid: Vec::new(),
        invalid: Vec::new(),
    };
    let k1 = key1();
    let ring1 = [key1()];

    // ---- valid, minted by the real signer ------------------------------------------------
    let basic = g.minted(
        "basic",
        "A typical token: key 1 (32-byte secret), https landing URL with a query.",
        &ring1,
        &k1,
        &impression(42, "https://example.com/landing?utm_source=adclick&x=1"),
        NOW,
        SKEW,
    );
    g.minted(
        "http_shortest_url_min_secret",
        "The shortest landing URL allowed (http:// plus one byte), a 16-byte secret (the minimum), key id 7.",
        &[key_min()],
        &key_min(),
        &Impression {
            advertiser_id: 300,
            campaign_id: 128,
            ..impression(1, "http://a")
        },
        NOW,
        SKEW,
    );
    g.minted(
        "zero_fields_are_omitted",
        "Key id 0, ad/advertiser/campaign 0 and issued_at 0: proto3 leaves zero-valued fields out of the payload entirely.",
        &[key0()],
        &key0(),
        &Impression {
            ad_id: 0,
            advertiser_id: 0,
            campaign_id: 0,
            issued_at_ms: 0,
            expires_at_ms: 1000,
            ..impression(0, "https://example.com/")
        },
        500,
        0,
    );
    g.minted(
        "largest_values",
        "u64::MAX ids, key id u32::MAX, a 64-byte secret (the maximum), a landing URL of exactly 1024 bytes, a lifetime of exactly 30 days.",
        &[key_max()],
        &key_max(),
        &Impression {
            impression_id: [0xff; 16],
            ad_id: u64::MAX,
            advertiser_id: u64::MAX,
            campaign_id: u64::MAX,
            issued_at_ms: NOW - 1000,
            expires_at_ms: NOW - 1000 + MAX_TOKEN_LIFETIME_MS,
            ..impression(
                0,
                &format!(
                    "https://example.com/{}",
                    "p".repeat(MAX_LANDING_URL_LEN - "https://example.com/".len())
                ),
            )
        },
        NOW,
        SKEW,
    );
    g.minted(
        "previous_key_during_rotation",
        "The verifier's current key is 2; a token signed with the previous key 1 is still accepted.",
        &[key2(), key1()],
        &k1,
        &impression(43, "https://example.com/a"),
        NOW,
        SKEW,
    );
    g.minted(
        "current_key_after_rotation",
        "Signed with key 2, the current key of a keyring that also holds key 1.",
        &[key2(), key1()],
        &key2(),
        &impression(44, "https://example.com/b"),
        NOW,
        SKEW,
    );
    g.minted(
        "non_ascii_landing_url",
        "Landing URLs are UTF-8; bytes >= 0x80 are allowed (only ASCII controls and space are refused). The 1024-byte limit counts UTF-8 bytes.",
        &ring1,
        &k1,
        &impression(45, "https://例え.example/ü?q=ä"),
        NOW,
        SKEW,
    );
    let edge = impression(46, "https://example.com/edge");
    g.minted(
        "clock_at_expiry_plus_skew",
        "now_ms = expires_at_ms + skew_ms: the last instant the token is accepted.",
        &ring1,
        &k1,
        &edge,
        edge.expires_at_ms + SKEW,
        SKEW,
    );
    g.minted(
        "clock_at_issue_minus_skew",
        "now_ms = issued_at_ms - skew_ms: the first instant the token is accepted.",
        &ring1,
        &k1,
        &edge,
        edge.issued_at_ms - SKEW,
        SKEW,
    );
    g.minted(
        "negative_times",
        "int64 times before 1970 encode as 10-byte varints (two's complement). Valid, though no collector counts such a click.",
        &ring1,
        &k1,
        &Impression {
            issued_at_ms: -5000,
            expires_at_ms: 5000,
            ..impression(47, "https://example.com/old")
        },
        0,
        SKEW,
    );

    // ---- valid, crafted payloads: any conforming protobuf decoder reads them -------------
    let mut reordered = Vec::new();
    field_varint(8, 1, &mut reordered); // key_id
    field_varint(99, 12345, &mut reordered); // unknown varint field
    field_bytes(5, b"https://example.com/reordered", &mut reordered);
    field_varint(7, (NOW + HOUR) as u64, &mut reordered);
    field_bytes(100, b"a future field", &mut reordered); // unknown length-delimited field
    field_varint(6, (NOW - 1000) as u64, &mut reordered);
    field_varint(4, 3, &mut reordered);
    varint((101 << 3) | 5, &mut reordered);
    reordered.extend_from_slice(&[1, 2, 3, 4]); // unknown fixed32 field 101
    varint((102 << 3) | 1, &mut reordered);
    reordered.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]); // unknown fixed64 field 102
    field_varint(3, 7, &mut reordered);
    field_varint(2, 48, &mut reordered);
    field_bytes(1, &[0x42; 16], &mut reordered);
    g.valid_token(
        "fields_out_of_order_and_unknown_fields",
        "A crafted payload: fields in reverse order, plus unknown fields 99 (varint), 100 (length-delimited), 101 (fixed32) and 102 (fixed64), which a verifier must skip (fields may be added to the payload later).",
        false,
        &ring1,
        1,
        frame(TOKEN_VERSION, &reordered, &k1.1),
        NOW,
        SKEW,
    );
    let mut repeated = payload_of(&impression(1, "https://example.com/first"), 1).encode_to_vec();
    field_varint(2, 49, &mut repeated);
    field_bytes(5, b"https://example.com/last", &mut repeated);
    g.valid_token(
        "repeated_fields_last_wins",
        "A crafted payload where ad_id and landing_url appear twice: as in every protobuf decoder, the last occurrence wins (ad 49, .../last).",
        false,
        &ring1,
        1,
        frame(TOKEN_VERSION, &repeated, &k1.1),
        NOW,
        SKEW,
    );

    // ---- invalid: text and base64 --------------------------------------------------------
    g.bad("empty", "Empty text.", String::new(), malformed("empty"));
    g.bad(
        "oversize",
        "2049 characters: longer than the 2048 allowed, rejected before any decoding.",
        "A".repeat(MAX_TOKEN_TEXT_LEN + 1),
        malformed("too_long"),
    );
    g.bad(
        "oversize_valid_prefix",
        "A valid token followed by 'A's up to 2049 characters: the size bound comes first.",
        format!(
            "{basic}{}",
            "A".repeat(MAX_TOKEN_TEXT_LEN + 1 - basic.len())
        ),
        malformed("too_long"),
    );
    // A valid token whose byte length is not a multiple of 3 (its text has a partial last
    // quantum), for the padding and trailing-bit vectors.
    let mut ragged = String::new();
    let mut ragged_len = 0;
    for n in 0..3 {
        let t = keyring(&ring1)
            .sign(&impression(
                50,
                &format!("https://example.com/{}", "r".repeat(n)),
            ))
            .expect("signs");
        if t.len() % 4 == 3 {
            ragged_len = t.len();
            ragged = t;
            break;
        }
    }
    assert_eq!(
        ragged_len % 4,
        3,
        "one of three lengths leaves 2 spare bytes"
    );
    g.bad(
        "base64_padding",
        "A valid token with '=' padding added: tokens are unpadded and '=' is not in the alphabet.",
        format!("{ragged}="),
        malformed("base64"),
    );
    let std_alphabet: String = basic
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    assert_ne!(std_alphabet, basic, "the basic token has a '-' or '_'");
    g.bad(
        "base64_standard_alphabet",
        "The basic token in the standard alphabet ('+' and '/' for '-' and '_'): not URL-safe base64.",
        std_alphabet,
        malformed("base64"),
    );
    g.bad(
        "base64_trailing_newline",
        "The basic token followed by a newline: no whitespace is skipped.",
        format!("{basic}\n"),
        malformed("base64"),
    );
    g.bad(
        "base64_non_ascii",
        "A non-ASCII character inside the text.",
        format!("{}é{}", &basic[..10], &basic[10..]),
        malformed("base64"),
    );
    let mut bad_len = basic.clone();
    while bad_len.len() % 4 != 1 {
        bad_len.pop();
    }
    g.bad(
        "base64_impossible_length",
        "The basic token cut to a length of 4n+1 characters, which no byte string encodes to.",
        bad_len,
        malformed("base64"),
    );
    // Last character of a 4n+3 text carries 6 bits of which the low 2 are padding bits.
    let mut chars: Vec<u8> = ragged.clone().into_bytes();
    let last = chars.len() - 1;
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let pos = alphabet
        .iter()
        .position(|&c| c == chars[last])
        .expect("base64 char");
    chars[last] = alphabet[pos ^ 1];
    g.bad(
        "base64_non_canonical_trailing_bits",
        "A valid token whose last character has a nonzero unused low bit: decoders must refuse non-canonical base64 (strict decoding), or two texts would carry one token.",
        String::from_utf8(chars).expect("ascii"),
        malformed("base64"),
    );

    // ---- invalid: framing ----------------------------------------------------------------
    g.bad(
        "too_short",
        "3 bytes (\"AQID\" = 01 02 03): shorter than version + 1 payload byte + 32-byte tag.",
        "AQID".to_string(),
        malformed("too_short"),
    );
    let mut only_tag = vec![TOKEN_VERSION];
    only_tag.extend_from_slice(&tag(&k1.1, &[TOKEN_VERSION]));
    g.bad(
        "too_short_empty_payload",
        "33 bytes: version + a correct tag over the version alone, no payload. The shortest token is 34 bytes.",
        b64(&only_tag),
        malformed("too_short"),
    );
    let basic_bytes = decode(&basic);
    let basic_payload = &basic_bytes[1..basic_bytes.len() - TAG_LEN];
    g.bad(
        "version_2",
        "The basic token's payload framed with version byte 2 (and a correct tag over it): only version 1 exists.",
        frame(2, basic_payload, &k1.1),
        malformed("version"),
    );
    g.bad(
        "version_0",
        "Version byte 0.",
        frame(0, basic_payload, &k1.1),
        malformed("version"),
    );
    g.bad(
        "truncated",
        "The basic token cut 4 characters (3 bytes) before its last full 4-character group: the last 32 bytes are read as the tag, so the payload ends in the middle of a field.",
        basic[..(basic.len() & !3) - 4].to_string(),
        malformed("payload"),
    );
    g.bad(
        "truncated_to_half",
        "The first half of the basic token (cut at a 4-character boundary).",
        basic[..(basic.len() / 2) & !3].to_string(),
        malformed("payload"),
    );

    // ---- invalid: payload decoding (correctly tagged with key 1) ------------------------
    let signed = |payload: &[u8]| frame(TOKEN_VERSION, payload, &k1.1);
    let mut p = Vec::new();
    field_bytes(1, &[0x11; 16], &mut p);
    varint((5 << 3) | 2, &mut p);
    varint(200, &mut p);
    p.extend_from_slice(b"https://example.com/");
    g.bad(
        "payload_length_past_end",
        "landing_url's length prefix (200) runs past the end of the payload.",
        signed(&p),
        malformed("payload"),
    );
    let mut p = payload_of(&impression(51, "https://example.com/"), 1).encode_to_vec();
    field_bytes(5, b"https://example.com/\xff\xfe", &mut p);
    g.bad(
        "payload_invalid_utf8",
        "landing_url (a proto3 string) is not valid UTF-8.",
        signed(&p),
        malformed("payload"),
    );
    let mut p = payload_of(&impression(52, "https://example.com/"), 1).encode_to_vec();
    field_bytes(2, b"42", &mut p);
    g.bad(
        "payload_wrong_wire_type",
        "ad_id (a varint field) sent as length-delimited.",
        signed(&p),
        malformed("payload"),
    );
    let mut p = vec![0x00, 0x01];
    p.extend_from_slice(&payload_of(&impression(53, "https://example.com/"), 1).encode_to_vec());
    g.bad(
        "payload_field_number_zero",
        "A field key with field number 0 (key byte 0x00).",
        signed(&p),
        malformed("payload"),
    );
    let mut p = payload_of(&impression(54, "https://example.com/"), 1).encode_to_vec();
    p.extend_from_slice(&[
        0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
    ]);
    g.bad(
        "payload_varint_overflow",
        "ad_id as a 10-byte varint whose last byte is 0x02: more than 64 bits.",
        signed(&p),
        malformed("payload"),
    );
    let mut p = payload_of(&impression(55, "https://example.com/"), 1).encode_to_vec();
    p.extend_from_slice(&[0x10, 0x80, 0x80]);
    g.bad(
        "payload_varint_unterminated",
        "The payload ends inside a varint.",
        signed(&p),
        malformed("payload"),
    );
    let mut p = payload_of(&impression(56, "https://example.com/"), 1).encode_to_vec();
    p.push((9 << 3) | 4);
    g.bad(
        "payload_unmatched_end_group",
        "An end-group key (wire type 4) with no group open.",
        signed(&p),
        malformed("payload"),
    );
    let mut p = payload_of(&impression(57, "https://example.com/"), 1).encode_to_vec();
    p.push((9 << 3) | 6);
    g.bad(
        "payload_wire_type_6",
        "Wire type 6 does not exist.",
        signed(&p),
        malformed("payload"),
    );

    // ---- invalid: keys and signatures ----------------------------------------------------
    let k9 = key9();
    let by_k9 = keyring(std::slice::from_ref(&k9))
        .sign(&impression(60, "https://example.com/"))
        .expect("signs");
    g.bad(
        "unknown_key_id",
        "Signed with key 9; the verifier holds only key 1.",
        by_k9,
        ("unknown_key", None),
    );
    let by_k1 = keyring(&ring1)
        .sign(&impression(61, "https://example.com/"))
        .expect("signs");
    g.invalid(
        "unknown_key_after_rotation",
        "Signed with key 1, which the verifier has rotated out (it holds key 2 only).",
        &[key2()],
        by_k1,
        NOW,
        SKEW,
        ("unknown_key", None),
    );
    let mut flipped = basic_bytes.clone();
    let n = flipped.len();
    flipped[n - 1] ^= 0x01;
    g.bad(
        "bad_tag_bit_flip",
        "The basic token with the lowest bit of the tag's last byte flipped.",
        b64(&flipped),
        ("bad_signature", None),
    );
    let forged = keyring(&[key1_forged()])
        .sign(&impression(62, "https://example.com/"))
        .expect("signs");
    g.bad(
        "bad_tag_wrong_secret",
        "Key id 1 but another secret: a forgery.",
        forged.clone(),
        ("bad_signature", None),
    );
    let mut changed = basic_bytes.clone();
    let mut body = payload_of(&impression(42, ""), 1);
    body.landing_url = "https://example.com/landing?utm_source=adclick&x=1".into();
    body.ad_id = 43;
    let new_payload = body.encode_to_vec();
    assert_eq!(new_payload.len(), basic_payload.len(), "same-size edit");
    changed[1..n - TAG_LEN].copy_from_slice(&new_payload);
    g.bad(
        "bad_tag_payload_edited",
        "The basic token with ad_id changed from 42 to 43 and the original tag kept.",
        b64(&changed),
        ("bad_signature", None),
    );
    let mut no_version = vec![TOKEN_VERSION];
    no_version.extend_from_slice(basic_payload);
    no_version.extend_from_slice(&tag(&k1.1, basic_payload));
    g.bad(
        "bad_tag_without_version_byte",
        "Tag computed over the payload alone: the HMAC input must start with the version byte.",
        b64(&no_version),
        ("bad_signature", None),
    );
    let mut over_all = Vec::from(&basic_bytes[..n - TAG_LEN]);
    let hex_tag = tag(&k1.1, basic.as_bytes());
    over_all.extend_from_slice(&hex_tag);
    g.bad(
        "bad_tag_over_text",
        "Tag computed over some other text (here the basic token's own text): the HMAC input is the raw bytes version || payload.",
        b64(&over_all),
        ("bad_signature", None),
    );
    let mut expired_forged = impression(63, "https://example.com/");
    expired_forged.expires_at_ms = NOW - HOUR;
    expired_forged.issued_at_ms = NOW - 2 * HOUR;
    g.bad(
        "bad_signature_before_expiry",
        "A forged token that is also expired: the signature is checked before the clock.",
        keyring(&[key1_forged()])
            .sign(&expired_forged)
            .expect("signs"),
        ("bad_signature", None),
    );
    let js = payload_of(&impression(64, "javascript:alert(1)"), 9).encode_to_vec();
    g.bad(
        "unknown_key_before_payload_rules",
        "Key id 9 (unknown) and a javascript: landing URL: the key is looked up before the payload rules are checked.",
        frame(TOKEN_VERSION, &js, &k9.1),
        ("unknown_key", None),
    );

    // ---- invalid: payload rules (correctly tagged with key 1) ---------------------------
    let rule = |imp: &Impression| signed(&payload_of(imp, 1).encode_to_vec());
    let mut short_id = payload_of(&impression(70, "https://example.com/"), 1);
    short_id.impression_id = vec![0x11; 15];
    g.bad(
        "impression_id_15_bytes",
        "A 15-byte impression id.",
        signed(&short_id.encode_to_vec()),
        malformed("impression_id"),
    );
    short_id.impression_id = Vec::new();
    g.bad(
        "impression_id_missing",
        "No impression id (field 1 absent).",
        signed(&short_id.encode_to_vec()),
        malformed("impression_id"),
    );
    for (name, description, url) in [
        (
            "landing_url_javascript",
            "A javascript: landing URL: only http:// and https:// may redirect.",
            "javascript:alert(1)".to_string(),
        ),
        (
            "landing_url_ftp",
            "An ftp:// landing URL.",
            "ftp://example.com/file".to_string(),
        ),
        (
            "landing_url_data",
            "A data: landing URL.",
            "data:text/html,<script>alert(1)</script>".to_string(),
        ),
        (
            "landing_url_uppercase_scheme",
            "HTTPS:// in upper case: the scheme prefix is compared byte for byte, lower case only.",
            "HTTPS://example.com/".to_string(),
        ),
        (
            "landing_url_scheme_only",
            "https:// with nothing after it.",
            "https://".to_string(),
        ),
        (
            "landing_url_empty",
            "No landing URL (field 5 absent).",
            String::new(),
        ),
        (
            "landing_url_space",
            "A space inside the URL.",
            "https://example.com/a b".to_string(),
        ),
        (
            "landing_url_control_character",
            "A newline inside the URL (header injection).",
            "https://example.com/\r\nSet-Cookie: x=1".to_string(),
        ),
        (
            "landing_url_delete_character",
            "A DEL (0x7f) inside the URL: an ASCII control character.",
            "https://example.com/\u{7f}".to_string(),
        ),
        (
            "landing_url_too_long",
            "A landing URL of 1025 bytes.",
            format!(
                "https://example.com/{}",
                "p".repeat(MAX_LANDING_URL_LEN + 1 - "https://example.com/".len())
            ),
        ),
    ] {
        g.bad(
            name,
            description,
            rule(&impression(71, &url)),
            malformed("landing_url"),
        );
    }
    let mut zero_life = impression(72, "https://example.com/");
    zero_life.expires_at_ms = zero_life.issued_at_ms;
    g.bad(
        "lifetime_zero",
        "expires_at_ms equal to issued_at_ms: expiry must be after issue.",
        rule(&zero_life),
        malformed("lifetime"),
    );
    let mut backwards = impression(73, "https://example.com/");
    backwards.expires_at_ms = backwards.issued_at_ms - 1;
    g.bad(
        "lifetime_negative",
        "expires_at_ms before issued_at_ms.",
        rule(&backwards),
        malformed("lifetime"),
    );

    // ---- invalid: clock and lifetime -----------------------------------------------------
    let clock = impression(80, "https://example.com/clock");
    let clock_token = keyring(&ring1).sign(&clock).expect("signs");
    g.invalid(
        "expired",
        "now_ms = expires_at_ms + skew_ms + 1: one millisecond too late.",
        &ring1,
        clock_token.clone(),
        clock.expires_at_ms + SKEW + 1,
        SKEW,
        ("expired", None),
    );
    g.invalid(
        "expired_without_skew",
        "skew_ms 0 and now_ms = expires_at_ms + 1.",
        &ring1,
        clock_token.clone(),
        clock.expires_at_ms + 1,
        0,
        ("expired", None),
    );
    g.invalid(
        "not_yet_valid",
        "now_ms = issued_at_ms - skew_ms - 1: issued one millisecond too far in the future.",
        &ring1,
        clock_token,
        clock.issued_at_ms - SKEW - 1,
        SKEW,
        ("not_yet_valid", None),
    );
    let mut long = impression(81, "https://example.com/long");
    long.issued_at_ms = NOW - 1000;
    long.expires_at_ms = long.issued_at_ms + MAX_TOKEN_LIFETIME_MS + 1;
    g.bad(
        "lifetime_over_30_days",
        "A correctly signed token living 30 days + 1 ms: the verifier accepts it, the collector rejects the click (it would never be counted).",
        rule(&long),
        ("token_lifetime_too_long", None),
    );
    let mut long_expired = long.clone();
    long_expired.issued_at_ms = NOW - MAX_TOKEN_LIFETIME_MS - 2 * HOUR;
    long_expired.expires_at_ms = NOW - HOUR;
    g.bad(
        "expired_before_lifetime",
        "Expired and living more than 30 days: the clock is checked before the lifetime rule.",
        rule(&long_expired),
        ("expired", None),
    );

    Vectors {
        about: "Test vectors for adclick impression tokens (version 1). Every implementation that mints must reproduce each `valid` token marked `mint: true` from its payload and key; every implementation that verifies must accept each `valid` token (decoding exactly `payload`) and reject each `invalid` token with `reason` (and, for `malformed`, the rule named in `malformed`).",
        spec: "docs/token.md",
        generator: "cargo run -q -p adclick-proto --example token_vectors > docs/token-vectors.json",
        notes: vec![
            "64-bit integers (ids, times) are decimal strings, so JSON parsers with 53-bit numbers read them exactly; key ids (uint32) are numbers.",
            "keys: the verifier's keyring, current key first; secret_hex is the raw HMAC key.",
            "now_ms and skew_ms: the verifier's clock and skew allowance for this vector.",
            "payload_hex: the protobuf payload bytes between the version byte and the tag; tag_hex: HMAC-SHA256(secret, 0x01 || payload).",
            "reason `token_lifetime_too_long` is the collector's rule applied after a successful verification (docs/token.md, step 9).",
        ],
        valid: g.valid,
        invalid: g.invalid,
    }
}

/// The file's text: pretty JSON with a final newline.
pub fn render() -> String {
    let mut s = serde_json::to_string_pretty(&generate()).expect("vectors serialize");
    s.push('\n');
    s
}

#[allow(dead_code)] // the test includes this file for `render` and `verdict`
fn main() {
    print!("{}", render());
}
