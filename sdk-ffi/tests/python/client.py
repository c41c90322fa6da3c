#!/usr/bin/env python3
"""A small app on the generated Python bindings of adclick-ffi (run by
tests/tests/ffi_bindings.rs, with PYTHONPATH set to the directory holding adclick_ffi.py
and libadclick_ffi.so). The Kotlin twin is sdk-ffi/tests/kotlin/Main.kt: same modes, same
output, so one Rust test drives both.

Modes (each prints `key=value` lines the test checks, and exits non-zero on a surprise):
  send    ENDPOINT QUEUE_DIR TOKENS_FILE  track every token (the first one twice: the
                                          collector drops the copy), one invalid token
                                          (refused), flush; expects everything delivered
  offline ENDPOINT QUEUE_DIR TOKENS_FILE  ENDPOINT is down: track every token, flush (fails),
                                          exit with the clicks left in QUEUE_DIR
  resume  ENDPOINT QUEUE_DIR              a new process on the same QUEUE_DIR: the stored
                                          clicks go out; expects everything delivered
  consent ENDPOINT QUEUE_DIR TOKENS_FILE  consent not given: 2 clicks held, not sent; given:
                                          sent; withdrawn: a 3rd click is discarded
"""
import os
import sys
import threading

import adclick_ffi as sdk


def say(tag, **kv):
    print(tag, " ".join(f"{k}={v}" for k, v in kv.items()), flush=True)


def stats(t):
    s = t.stats()
    say("stats", sent=s.sent, queued=s.queued, pending=s.pending, restored=s.restored,
        invalid=s.invalid, held=s.held, dropped_consent=s.dropped_consent, rejected=s.rejected)
    return s


class Done(sdk.FlushCallback):
    def __init__(self):
        self.event = threading.Event()
        self.result = None

    def on_complete(self, result):
        self.result = result
        self.event.set()


def flush(t):
    """flush() returns at once; the callback says how it went."""
    cb = Done()
    t.flush(cb)
    if not cb.event.wait(60):
        raise SystemExit("flush callback not called within 60 s")
    r = cb.result
    say("flush", delivered=str(r.delivered).lower(), unsent=r.unsent)
    return r


def expect(cond, what):
    if not cond:
        raise SystemExit(f"unexpected: {what}")


def main(argv):
    mode, endpoint, queue_dir = argv[1], argv[2], argv[3]
    tokens = open(argv[4]).read().split() if len(argv) > 4 else []
    dims = sdk.ClickDimensions(country="US", device=sdk.Device.MOBILE, os="android",
                               app="com.example.news", user_id="u-1")
    if mode == "send":
        t = sdk.Tracker(sdk.TrackerConfig(endpoint=endpoint, queue_dir=queue_dir, batch_size=25))
        for tok in tokens + tokens[:1]:
            t.track_click(tok, dims)
        try:
            t.track_click("not a token!", dims)
            expect(False, "an invalid token was accepted")
        except sdk.TrackerError.InvalidToken:
            pass
        r = flush(t)
        expect(r.delivered and r.unsent == 0, "flush did not deliver everything")
        s = stats(t)
        expect(s.sent == len(tokens) + 1 and s.invalid == 1, "stats")
    elif mode == "offline":
        t = sdk.Tracker(sdk.TrackerConfig(endpoint=endpoint, queue_dir=queue_dir, max_attempts=1,
                                          flush_interval_ms=3_600_000))
        for tok in tokens:
            t.track_click(tok, dims)
        r = flush(t)
        expect(not r.delivered and r.unsent == len(tokens), "the collector was supposed to be down")
        stats(t)
        # The app is killed here (no shutdown, no interpreter exit): the clicks are in
        # QUEUE_DIR.
        say("ok", mode=mode)
        sys.stdout.flush()
        os._exit(0)
    elif mode == "resume":
        t = sdk.Tracker(sdk.TrackerConfig(endpoint=endpoint, queue_dir=queue_dir))
        r = flush(t)
        expect(r.delivered and r.unsent == 0, "stored clicks not delivered")
        stats(t)
    elif mode == "consent":
        t = sdk.Tracker(sdk.TrackerConfig(endpoint=endpoint, queue_dir=queue_dir, consent=False))
        expect(t.consent() == "pending", "consent at start")
        t.track_click(tokens[0], dims)
        t.track_click(tokens[1], dims)
        r = flush(t)
        expect(not r.delivered, "sent without consent")
        expect(t.stats().held == 2, "held")
        t.set_consent(True)
        r = flush(t)
        expect(r.delivered, "not delivered after consent")
        t.set_consent(False)
        t.track_click(tokens[2], dims)
        r = flush(t)
        expect(r.delivered and r.unsent == 0, "nothing may be left after withdrawal")
        s = stats(t)
        expect(s.sent == 2 and s.dropped_consent == 1, "consent stats")
    else:
        raise SystemExit(f"unknown mode {mode}")
    # Before the interpreter exits: close() waits until no callback of the tracker runs.
    r = t.close(10_000)
    expect(r.delivered and r.unsent == 0, "close")
    say("ok", mode=mode)


if __name__ == "__main__":
    main(sys.argv)
