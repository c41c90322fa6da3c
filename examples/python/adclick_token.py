"""adclick impression tokens (version 1) in plain Python: mint and verify.

A second, independent implementation of docs/token.md (the Rust one is
proto/src/token.rs), standard library only: hmac, hashlib, base64 and a small
hand-written protobuf encoder/decoder for the payload's eight fields. Checked
against every vector of docs/token-vectors.json by test_adclick_token.py.

Named adclick_token.py, not token.py: a module called `token` would shadow the
standard library's `token` module (used by tokenize, inspect, traceback, ...).

    from adclick_token import mint, verify
    tok = mint(secret, key_id=1, ad_id=42, advertiser_id=7, campaign_id=1,
               landing_url="https://example.com/x", ttl_ms=3_600_000)
    imp = verify(tok, {1: secret})        # raises TokenError(reason, malformed)
"""

import base64
import binascii
import hashlib
import hmac
import os
import time
from typing import Dict, NamedTuple, Optional

VERSION = 1
TAG_LEN = 32
IMPRESSION_ID_LEN = 16
MAX_TOKEN_TEXT_LEN = 2048
MAX_LANDING_URL_LEN = 1024
MIN_SECRET_LEN, MAX_SECRET_LEN = 16, 64
MAX_TOKEN_LIFETIME_MS = 30 * 86_400_000
DEFAULT_SKEW_MS = 30_000

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class TokenError(Exception):
    """A rejected token. `reason` is the collector's label (malformed, unknown_key,
    bad_signature, expired, not_yet_valid, token_lifetime_too_long); for
    `malformed`, `malformed` names the rule (empty, too_long, base64, too_short,
    version, payload, impression_id, landing_url, lifetime)."""

    def __init__(self, reason: str, malformed: Optional[str] = None, detail: str = ""):
        super().__init__(f"{reason}" + (f" ({malformed})" if malformed else "") + (f": {detail}" if detail else ""))
        self.reason = reason
        self.malformed = malformed


class Impression(NamedTuple):
    impression_id: bytes
    ad_id: int
    advertiser_id: int
    campaign_id: int
    landing_url: str
    issued_at_ms: int
    expires_at_ms: int
    key_id: int


def _malformed(kind: str, detail: str = "") -> TokenError:
    return TokenError("malformed", kind, detail)


# ---- protobuf: the payload's fields -------------------------------------------------

# field number -> (name, wire type, kind)
_FIELDS = {
    1: ("impression_id", 2, "bytes"),
    2: ("ad_id", 0, "uint64"),
    3: ("advertiser_id", 0, "uint64"),
    4: ("campaign_id", 0, "uint64"),
    5: ("landing_url", 2, "string"),
    6: ("issued_at_ms", 0, "int64"),
    7: ("expires_at_ms", 0, "int64"),
    8: ("key_id", 0, "uint32"),
}
_DEFAULTS = {"bytes": b"", "string": "", "uint64": 0, "int64": 0, "uint32": 0}


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def encode_payload(imp: Impression) -> bytes:
    """Canonical proto3 encoding: fields in number order, zero values left out."""
    out = bytearray()
    for num in sorted(_FIELDS):
        name, wire, kind = _FIELDS[num]
        v = getattr(imp, name)
        if v == _DEFAULTS[kind]:
            continue
        out += _varint(num << 3 | wire)
        if kind == "bytes":
            out += _varint(len(v)) + v
        elif kind == "string":
            b = v.encode("utf-8")
            out += _varint(len(b)) + b
        else:
            out += _varint(v & U64)  # int64: two's complement, 10 bytes when negative
    return bytes(out)


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def varint(self) -> int:
        v = 0
        for i in range(10):
            if self.pos >= len(self.buf):
                raise _malformed("payload", "buffer ends inside a varint")
            b = self.buf[self.pos]
            self.pos += 1
            v |= (b & 0x7F) << (7 * i)
            if b < 0x80:
                if i == 9 and b >= 0x02:
                    raise _malformed("payload", "varint over 64 bits")
                return v
        raise _malformed("payload", "varint longer than 10 bytes")

    def take(self, n: int) -> bytes:
        if n > len(self.buf) - self.pos:
            raise _malformed("payload", "length past the end")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def key(self):
        k = self.varint()
        if k > U32:
            raise _malformed("payload", "field key over 32 bits")
        wire, num = k & 7, k >> 3
        if wire > 5:
            raise _malformed("payload", f"wire type {wire}")
        if num == 0:
            raise _malformed("payload", "field number 0")
        return num, wire

    def skip(self, num: int, wire: int, depth: int) -> None:
        if depth <= 0:
            raise _malformed("payload", "groups nested too deeply")
        if wire == 0:
            self.varint()
        elif wire == 1:
            self.take(8)
        elif wire == 5:
            self.take(4)
        elif wire == 2:
            self.take(self.varint())
        elif wire == 3:
            while True:
                inner, iw = self.key()
                if iw == 4:
                    if inner != num:
                        raise _malformed("payload", "mismatched end group")
                    return
                self.skip(inner, iw, depth - 1)
        else:
            raise _malformed("payload", "end group without start")


def decode_payload(buf: bytes) -> dict:
    """Decodes like any proto3 decoder: any field order, the last occurrence of a
    field wins, unknown fields are skipped, strings must be UTF-8."""
    out = {name: _DEFAULTS[kind] for name, _, kind in _FIELDS.values()}
    r = _Reader(buf)
    while r.pos < len(buf):
        num, wire = r.key()
        known = _FIELDS.get(num)
        if known is None:
            r.skip(num, wire, 100)
            continue
        name, want_wire, kind = known
        if wire != want_wire:
            raise _malformed("payload", f"field {num} has wire type {wire}")
        if wire == 2:
            b = r.take(r.varint())
            if kind == "string":
                try:
                    out[name] = b.decode("utf-8")
                except UnicodeDecodeError:
                    raise _malformed("payload", f"field {num} is not UTF-8") from None
            else:
                out[name] = b
        else:
            v = r.varint()
            if kind == "int64":
                v = v - (1 << 64) if v >> 63 else v
            elif kind == "uint32":
                v &= U32  # protobuf truncates a uint32 read from a wider varint
            out[name] = v
    return out


# ---- base64: URL-safe alphabet, no padding, strict -------------------------------------


def b64encode(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")


def b64decode_strict(text: str) -> bytes:
    """Refuses anything outside the URL-safe alphabet ('=' and whitespace included),
    an impossible length (4n+1) and nonzero unused bits in the last character."""
    raw = text.encode("utf-8")
    if any(c not in _B64_ALPHABET for c in raw) or len(raw) % 4 == 1:
        raise _malformed("base64", "not unpadded URL-safe base64")
    try:
        b = base64.b64decode(raw + b"=" * (-len(raw) % 4), altchars=b"-_", validate=True)
    except binascii.Error as e:
        raise _malformed("base64", str(e)) from None
    if b64encode(b).encode("ascii") != raw:
        raise _malformed("base64", "non-canonical trailing bits")
    return b


# ---- the payload rules ---------------------------------------------------------------


def _check_rules(imp: Impression) -> None:
    if len(imp.impression_id) != IMPRESSION_ID_LEN:
        raise _malformed("impression_id", f"{len(imp.impression_id)} bytes")
    url = imp.landing_url.encode("utf-8")
    rest = None
    for scheme in (b"https://", b"http://"):
        if url.startswith(scheme):
            rest = url[len(scheme) :]
            break
    if not rest or len(url) > MAX_LANDING_URL_LEN or any(c < 0x20 or c == 0x7F or c == 0x20 for c in url):
        raise _malformed("landing_url", repr(imp.landing_url[:80]))
    if imp.expires_at_ms <= imp.issued_at_ms:
        raise _malformed("lifetime", "expires_at_ms is not after issued_at_ms")


# ---- mint and verify -----------------------------------------------------------------


def sign(secret: bytes, imp: Impression) -> str:
    """Token text for a complete impression (its key_id must be the secret's id)."""
    if not MIN_SECRET_LEN <= len(secret) <= MAX_SECRET_LEN:
        raise ValueError(f"secret is {len(secret)} bytes; it must be 16 to 64 (32 recommended)")
    for name in ("ad_id", "advertiser_id", "campaign_id"):
        if not 0 <= getattr(imp, name) <= U64:
            raise ValueError(f"{name} must be a uint64")
    if not 0 <= imp.key_id <= U32:
        raise ValueError("key_id must be a uint32")
    if not (I64_MIN <= imp.issued_at_ms <= I64_MAX and I64_MIN <= imp.expires_at_ms <= I64_MAX):
        raise ValueError("times must be int64 milliseconds")
    try:
        _check_rules(imp)
    except TokenError as e:
        raise ValueError(f"cannot sign: {e}") from None
    body = bytes([VERSION]) + encode_payload(imp)
    return b64encode(body + hmac.new(secret, body, hashlib.sha256).digest())


def mint(
    secret: bytes,
    key_id: int,
    ad_id: int,
    advertiser_id: int,
    campaign_id: int,
    landing_url: str,
    ttl_ms: int = 3_600_000,
    now_ms: Optional[int] = None,
    impression_id: Optional[bytes] = None,
) -> str:
    """What an ad server does when it places an ad: a fresh random impression id,
    issued now, expiring after ttl_ms (1 s to 30 days)."""
    if not 1000 <= ttl_ms <= MAX_TOKEN_LIFETIME_MS:
        raise ValueError("ttl_ms must be 1000 ms to 30 days")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    imp = Impression(
        impression_id=os.urandom(IMPRESSION_ID_LEN) if impression_id is None else impression_id,
        ad_id=ad_id,
        advertiser_id=advertiser_id,
        campaign_id=campaign_id,
        landing_url=landing_url,
        issued_at_ms=now,
        expires_at_ms=now + ttl_ms,
        key_id=key_id,
    )
    return sign(secret, imp)


def verify(token: str, keys: Dict[int, bytes], now_ms: Optional[int] = None, skew_ms: int = DEFAULT_SKEW_MS) -> Impression:
    """The collector's checks, in its order; raises TokenError with its reason."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if token == "":
        raise _malformed("empty")
    if len(token.encode("utf-8")) > MAX_TOKEN_TEXT_LEN:
        raise _malformed("too_long")
    raw = b64decode_strict(token)
    if len(raw) < 1 + 1 + TAG_LEN:
        raise _malformed("too_short", f"{len(raw)} bytes")
    if raw[0] != VERSION:
        raise _malformed("version", f"version {raw[0]}")
    body, tag = raw[:-TAG_LEN], raw[-TAG_LEN:]
    fields = decode_payload(body[1:])
    secret = keys.get(fields["key_id"])
    if secret is None:
        raise TokenError("unknown_key", None, f"key id {fields['key_id']}")
    if not hmac.compare_digest(hmac.new(secret, body, hashlib.sha256).digest(), tag):
        raise TokenError("bad_signature")
    imp = Impression(**fields)
    _check_rules(imp)
    if imp.issued_at_ms > now + skew_ms:
        raise TokenError("not_yet_valid")
    if now > imp.expires_at_ms + skew_ms:
        raise TokenError("expired")
    if imp.expires_at_ms - imp.issued_at_ms > MAX_TOKEN_LIFETIME_MS:
        raise TokenError("token_lifetime_too_long")
    return imp
