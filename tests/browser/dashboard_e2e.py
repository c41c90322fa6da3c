#!/usr/bin/env python3
"""The dashboard (/ui) in headless Chromium against `adclick dev --no-traffic` (run by
scripts/test-browser.sh).

Known clicks go in through the collector's HTTP JSON ingest (tokens minted with
`adclick impression mint`), then the page is driven like a user would:
  1. a wrong key is refused with the server's 401 shown, and the key form comes back;
  2. the admin key entered once: the live top-N table shows exactly the clicks sent (and
     the same as GET /v1/ads/top answers), the top-5 chart and the first ad's chart are
     drawn, the ad's total is shown;
  3. more clicks arrive: the table updates by itself (the watch's Server-Sent Events);
  4. a row clicked: that ad's chart and total;
  5. the key is kept in sessionStorage: a reload shows the dashboard without asking.
A screenshot is saved to target/ui-dashboard.png (or $ADCLICK_SCREENSHOT).
Exit status 0 and a final "N passed, 0 failed" line when all hold.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from webdriver import Browser, Scenarios, free_port, stop, wait_http  # noqa: E402

ADCLICK = os.environ.get("ADCLICK_BIN", os.path.join(ROOT, "target", "debug", "adclick"))
SCREENSHOT = os.environ.get("ADCLICK_SCREENSHOT", os.path.join(ROOT, "target", "ui-dashboard.png"))

# Clicks per ad sent at first, and the extra clicks of step 3 (ad 880003 overtakes).
# A browser's User-Agent: urllib's own is on the crawler list (bot_user_agent, invalid).
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
HONEYPOT_AD = 999999  # cli/src/traffic.rs HONEYPOT_AD, a trap in `adclick dev`
FIRST = {880001: 9, 880002: 6, 880003: 4, 880004: 2}
MORE = {880003: 7}


def main():
    tmp = tempfile.mkdtemp(prefix="adclick-dashboard-")
    procs = []
    browser = None
    try:
        col, grpc, http = (free_port() for _ in range(3))
        dev_dir = os.path.join(tmp, "dev")
        procs.append(subprocess.Popen(
            [ADCLICK, "dev", "--no-traffic", "--data-dir", dev_dir, "--collector-port", str(col),
             "--grpc-port", str(grpc), "--query-port", str(http)],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "dev.log"), "w")))
        wait_http(f"http://127.0.0.1:{col}/healthz")
        wait_http(f"http://127.0.0.1:{http}/livez")
        admin = open(os.path.join(dev_dir, "admin.key")).read().strip()
        api = f"http://127.0.0.1:{http}"

        def send(counts, client=None):
            clicks = []
            for ad, n in counts.items():
                out = subprocess.run(
                    [ADCLICK, "impression", "mint", "--keys", os.path.join(dev_dir, "keys.toml"),
                     "--ad", str(ad), "--advertiser", "7", "--campaign", "1",
                     "--landing-url", "https://example.com/x", "--count", str(n)],
                    capture_output=True, text=True, check=True)
                clicks += [{"token": t, "country": "US", "device": "mobile"} for t in out.stdout.split()]
            body = json.dumps({"clicks": clicks}).encode()
            headers = {"content-type": "application/json", "user-agent": BROWSER_UA}
            if client:
                # `adclick dev` trusts 127.0.0.1 as a proxy: the click is this client's.
                headers["x-forwarded-for"] = client
            r = urllib.request.Request(f"http://127.0.0.1:{col}/v1/clicks", data=body, method="POST",
                                       headers=headers)
            with urllib.request.urlopen(r, timeout=30) as resp:
                got = json.loads(resp.read())
            assert got["accepted"] == len(clicks), got

        def api_top():
            r = urllib.request.Request(f"{api}/v1/ads/top?n=10&last_minutes=60",
                                       headers={"authorization": f"Bearer {admin}"})
            with urllib.request.urlopen(r, timeout=10) as resp:
                return [(a["ad_id"], a["clicks"]) for a in json.loads(resp.read())["ads"]]

        def expect_api(want, t=30):
            end = time.time() + t
            while time.time() < end and api_top() != want:
                time.sleep(0.3)
            assert api_top() == want, f"API top {api_top()} != {want}"

        def ranked(counts):
            return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

        send(FIRST)
        want = ranked(FIRST)
        expect_api(want)

        browser = Browser(os.path.join(tmp, "profile"))
        go, js, wait = browser.go, browser.js, browser.wait
        table = """return Array.from(document.querySelectorAll('#top tbody tr'))
                   .map(tr => Array.from(tr.children).map(td => Number(td.textContent)))
                   .map(([rank, ad, clicks]) => [ad, clicks]);"""
        scenarios = Scenarios()
        scenario = scenarios.run

        def login(key):
            wait("!document.querySelector('#login').hidden")
            js("document.querySelector('#key').value = arguments[0];"
               "document.querySelector('#login').requestSubmit(); return 1;", key)

        def wrong_key():
            go(f"{api}/ui")
            login("not-a-key-at-all")
            wait("document.querySelector('#error').textContent.includes('401')")
            wait("!document.querySelector('#login').hidden")
            assert js("return sessionStorage.getItem('adclick.apiKey')") is None

        def live_table():
            login(admin)
            wait("document.querySelectorAll('#top tbody tr').length === 4")
            got = [tuple(r) for r in js(table)]
            assert got == want, f"table {got} != sent {want}"
            assert got == api_top(), "table != API"
            wait("document.querySelector('#chart-top canvas') !== null")
            wait("document.querySelector('#chart-top').dataset.ads === arguments[0]".replace(
                "arguments[0]", json.dumps(",".join(str(a) for a, _ in want[:5]))))
            # The first ad is charted with its total.
            wait(f"document.querySelector('#ad-total').textContent === '{want[0][1]}'")
            wait("document.querySelector('#chart-ad canvas') !== null")
            wm = js("return Number(document.querySelector('#watermark').dataset.ms)")
            assert wm > 0, "watermark shown"

        def updates_itself():
            before = js("return Number(document.body.dataset.topUpdates)")
            send(MORE)
            total = {ad: FIRST.get(ad, 0) + MORE.get(ad, 0) for ad in set(FIRST) | set(MORE)}
            now = ranked(total)
            wait(f"JSON.stringify(Array.from(document.querySelectorAll('#top tbody tr'))"
                 f".map(tr => [Number(tr.children[1].textContent), Number(tr.children[2].textContent)]))"
                 f" === '{json.dumps([list(x) for x in now], separators=(',', ':'))}'", 30)
            assert js("return Number(document.body.dataset.topUpdates)") > before
            expect_api(now)
            # The header's outcome counts (from /metrics, polled every 5 s): every click.
            sent = sum(FIRST.values()) + sum(MORE.values())
            wait(f"document.querySelector('#outcomes').dataset.counted === '{sent}'", 20)

        def select_row():
            row = browser.elements("#top tbody tr[data-ad='880002']")[0]
            browser.click(row)
            wait("document.querySelector('#ad-id').textContent === '880002'")
            wait("document.querySelector('#ad-total').textContent === '6'")
            browser.screenshot(SCREENSHOT)

        def kept_in_session():
            go(f"{api}/ui")
            wait("document.querySelectorAll('#top tbody tr').length === 4")
            assert js("return document.querySelector('#login').hidden") is True

        def invalid_traffic():
            # `adclick dev` runs the invalid-traffic rules with ad 999999 as a honeypot. A
            # client of its own (not the one that sent the clicks above) clicks 880002 twice,
            # then the trap, then 880002 once more: the trap reaches back to its two clicks
            # (honeypot look-back) and flags the later one, so all four are invalid (reason
            # honeypot), counted apart, not billed. Sent last: the flag sticks for the window.
            bot = "203.0.113.77"
            send({880002: 2}, bot)
            send({HONEYPOT_AD: 1}, bot)
            send({880002: 1}, bot)
            wait("document.querySelector('#outcomes').dataset.invalid === '4'", 20)
            browser.click(browser.elements("#top tbody tr[data-ad='880002']")[0])
            wait("document.querySelector('#ad-invalid').dataset.total === '3'", 20)
            assert "honeypot 3" in js("return document.querySelector('#ad-invalid').textContent")
            # Valid clicks (the table, the total) did not move.
            assert js("return document.querySelector('#ad-total').textContent") == "6"
            expect_api(ranked({ad: FIRST.get(ad, 0) + MORE.get(ad, 0) for ad in set(FIRST) | set(MORE)}))

        scenario("a wrong key: 401 shown, asked again, nothing kept", wrong_key)
        scenario("the live table shows the clicks sent, charts drawn", live_table)
        scenario("new clicks appear without a reload (SSE watch)", updates_itself)
        scenario("a row clicked charts that ad with its total (screenshot)", select_row)
        scenario("the key is kept for the tab: a reload shows the dashboard", kept_in_session)
        scenario("invalid traffic shown apart from valid clicks (honeypot)", invalid_traffic)
        failed = scenarios.failed()
        if failed:
            sys.stderr.write(open(os.path.join(tmp, "dev.log")).read()[-4000:])
        print(f"{scenarios.summary()}; screenshot: {SCREENSHOT}")
        return 1 if failed else 0
    finally:
        stop(browser, procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
