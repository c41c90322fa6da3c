"""Checks adclick_token.py against every vector of docs/token-vectors.json.

    python3 examples/python/test_adclick_token.py [docs/token-vectors.json]

Valid vectors: verify gives exactly the listed payload; the payload encodes to
payload_hex; the tag is tag_hex; and, for `mint: true`, signing the payload
gives the token text. Invalid vectors: verify raises with the listed reason
(and malformed rule). Prints one line per failure and a summary; exit status 1
on any failure. Run by tests/tests/token_python.rs under `cargo test`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import json  # noqa: E402

import adclick_token as t  # noqa: E402


def impression_of(p: dict) -> t.Impression:
    return t.Impression(
        impression_id=bytes.fromhex(p["impression_id_hex"]),
        ad_id=int(p["ad_id"]),
        advertiser_id=int(p["advertiser_id"]),
        campaign_id=int(p["campaign_id"]),
        landing_url=p["landing_url"],
        issued_at_ms=int(p["issued_at_ms"]),
        expires_at_ms=int(p["expires_at_ms"]),
        key_id=p["key_id"],
    )


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "..", "docs", "token-vectors.json")
    with open(path, encoding="utf-8") as f:
        vectors = json.load(f)
    failures = []
    minted = 0

    for v in vectors["valid"]:
        name = v["name"]
        keys = {k["id"]: bytes.fromhex(k["secret_hex"]) for k in v["keys"]}
        want = impression_of(v["payload"])
        try:
            got = t.verify(v["token"], keys, int(v["now_ms"]), int(v["skew_ms"]))
        except t.TokenError as e:
            failures.append(f"valid {name}: rejected: {e}")
            continue
        if got != want:
            failures.append(f"valid {name}: decoded {got}, want {want}")
        raw = t.b64decode_strict(v["token"])
        if raw[1 : -t.TAG_LEN].hex() != v["payload_hex"] or raw[-t.TAG_LEN :].hex() != v["tag_hex"]:
            failures.append(f"valid {name}: payload_hex/tag_hex differ from the token's bytes")
        if v["mint"]:
            minted += 1
            if t.encode_payload(want).hex() != v["payload_hex"]:
                failures.append(f"valid {name}: payload encodes to {t.encode_payload(want).hex()}, want {v['payload_hex']}")
            tok = t.sign(keys[v["signing_key_id"]], want)
            if tok != v["token"]:
                failures.append(f"valid {name}: minted {tok}, want {v['token']}")

    for v in vectors["invalid"]:
        name = v["name"]
        keys = {k["id"]: bytes.fromhex(k["secret_hex"]) for k in v["keys"]}
        try:
            got = t.verify(v["token"], keys, int(v["now_ms"]), int(v["skew_ms"]))
            failures.append(f"invalid {name}: accepted as {got}")
        except t.TokenError as e:
            if (e.reason, e.malformed) != (v["reason"], v["malformed"]):
                failures.append(f"invalid {name}: rejected as {e.reason}/{e.malformed}, want {v['reason']}/{v['malformed']} ({e})")

    # mint() end to end: fresh id and clock, verifies now and expires after its ttl.
    secret = bytes(range(32))
    tok = t.mint(secret, key_id=1, ad_id=42, advertiser_id=7, campaign_id=1, landing_url="https://example.com/x", ttl_ms=60_000)
    imp = t.verify(tok, {1: secret})
    if (imp.ad_id, imp.expires_at_ms - imp.issued_at_ms, len(imp.impression_id)) != (42, 60_000, 16):
        failures.append(f"mint: {imp}")
    try:
        t.verify(tok, {1: secret}, now_ms=imp.expires_at_ms + t.DEFAULT_SKEW_MS + 1)
        failures.append("mint: token still valid after expiry")
    except t.TokenError as e:
        if e.reason != "expired":
            failures.append(f"mint: after expiry {e.reason}")
    for bad_url in ("javascript:alert(1)", "HTTPS://x", "https://"):
        try:
            t.mint(secret, 1, 1, 1, 1, bad_url)
            failures.append(f"mint accepted landing URL {bad_url!r}")
        except ValueError:
            pass

    for f in failures:
        print("FAIL", f)
    print(
        f"adclick_token.py: {len(vectors['valid'])} valid vectors ({minted} minted), "
        f"{len(vectors['invalid'])} invalid vectors, {len(failures)} failures"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
