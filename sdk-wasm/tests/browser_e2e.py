#!/usr/bin/env python3
"""Real-browser end-to-end test of the browser SDK (run by scripts/test-browser.sh).

Starts `adclick dev --no-traffic` on free ports, serves sdk-wasm/ with a static server,
drives headless Chromium through chromedriver (plain WebDriver over HTTP, stdlib only), and
checks through the query API that exactly the clicks made were counted once:
  1. links:   trackLinks on the example page; two ad links clicked (each navigates)
  2. beacon:  click() then leave the page at once: delivered by sendBeacon on page hide
  3. offline: click while the collector is unreachable, leave, come back: the click kept in
              localStorage is sent on the next page load, with nothing counted twice
Exit status 0 and a final "3 passed, 0 failed" line when all hold.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "browser"))
from webdriver import Browser, Scenarios, free_port, stop, wait_http  # noqa: E402

ADCLICK = os.environ.get("ADCLICK_BIN", os.path.join(ROOT, "target", "debug", "adclick"))


def main():
    tmp = tempfile.mkdtemp(prefix="adclick-browser-")
    procs = []
    browser = None
    try:
        col, grpc, qport, site_port = (free_port() for _ in range(4))
        dev_dir = os.path.join(tmp, "dev")
        procs.append(subprocess.Popen(
            [ADCLICK, "dev", "--no-traffic", "--data-dir", dev_dir, "--collector-port", str(col),
             "--grpc-port", str(grpc), "--query-port", str(qport)],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "dev.log"), "w")))
        wait_http(f"http://127.0.0.1:{col}/healthz")
        collector = f"http://127.0.0.1:{col}"
        admin = open(os.path.join(dev_dir, "admin.key")).read().strip()

        def mint(ad):
            out = subprocess.run(
                [ADCLICK, "impression", "mint", "--keys", os.path.join(dev_dir, "keys.toml"), "--ad", str(ad),
                 "--advertiser", "7", "--campaign", "1", "--landing-url", "https://example.com/x"],
                capture_output=True, text=True, check=True)
            return out.stdout.strip()

        def count(ad):
            out = subprocess.run(
                [ADCLICK, "query", "clicks", "--ad", str(ad), "--last", "30m", "--json",
                 "--endpoint", f"http://127.0.0.1:{grpc}", "--api-key", admin],
                capture_output=True, text=True, check=True)
            return json.loads(out.stdout)["total_clicks"]

        # The site: the example page, the package, and two small pages of our own.
        site = os.path.join(tmp, "site")
        os.makedirs(site)
        os.symlink(os.path.join(ROOT, "sdk-wasm", "pkg"), os.path.join(site, "pkg"))
        os.symlink(os.path.join(ROOT, "sdk-wasm", "example"), os.path.join(site, "example"))
        with open(os.path.join(site, "blank.html"), "w") as f:
            f.write("<!doctype html><title>blank</title><p>no tracker here</p>")
        with open(os.path.join(site, "probe.html"), "w") as f:
            f.write("""<!doctype html><title>probe</title><script type="module">
import init, { Tracker } from "/pkg/adclick_sdk_wasm.js";
const p = new URLSearchParams(location.search);
await init();
window.tracker = new Tracker({ endpoint: p.get("endpoint"), batchSize: 100,
  flushIntervalMs: Number(p.get("interval") || 600000) });
window.ready = true;
</script>""")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "http.server", str(site_port), "--bind", "127.0.0.1", "--directory", site],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        site_url = f"http://127.0.0.1:{site_port}"
        wait_http(site_url + "/blank.html")

        browser = Browser(os.path.join(tmp, "profile"))
        go, js, wait = browser.go, browser.js, browser.wait

        def expect_count(ad, want, t=20):
            end = time.time() + t
            got = None
            while time.time() < end:
                got = count(ad)
                if got == want:
                    break
                time.sleep(0.3)
            time.sleep(1.0)  # nothing more may arrive
            got = count(ad)
            assert got == want, f"ad {ad}: counted {got}, expected {want}"

        scenarios = Scenarios()
        scenario = scenarios.run

        def links():
            t1, t2 = mint(777001), mint(777002)
            go(f"{site_url}/example/?endpoint={collector}&tokens={t1},{t2}")
            wait("document.querySelectorAll('a[data-adclick-token]').length == 2")
            for i in (0, 1):
                browser.click(browser.elements("a[data-adclick-token]")[i])
                wait(f"location.search.includes('clicked={i + 1}') && "
                     "document.querySelectorAll('a[data-adclick-token]').length == 2")
            go(f"{site_url}/blank.html")
            expect_count(777001, 1)
            expect_count(777002, 1)

        def beacon():
            t = mint(777003)
            go(f"{site_url}/probe.html?endpoint={collector}")
            wait("window.ready === true")
            js("tracker.click(arguments[0], {country: 'US'}); return tracker.queued;", t)
            go(f"{site_url}/blank.html")  # page hide: only the beacon can deliver it
            expect_count(777003, 1)

        def offline():
            t = mint(777004)
            dead = f"http://127.0.0.1:{free_port()}"
            go(f"{site_url}/probe.html?endpoint={dead}")
            wait("window.ready === true")
            js("tracker.click(arguments[0]); return 1;", t)
            go(f"{site_url}/blank.html")
            assert count(777004) == 0, "nothing can have arrived yet"
            go(f"{site_url}/probe.html?endpoint={collector}&interval=500")
            wait("window.ready === true")
            wait("tracker.stats().sent >= 1", 30)
            expect_count(777004, 1)
            # Earlier pages' copies (e.g. the beacon's) are resent too and deduplicated.
            expect_count(777003, 1)

        scenario("trackLinks: two ad links clicked, each counted once", links)
        scenario("beacon on page hide delivers a click counted once", beacon)
        scenario("offline click kept in localStorage is sent on the next load, counted once", offline)
        failed = scenarios.failed()
        print(scenarios.summary())
        return 1 if failed else 0
    finally:
        stop(browser, procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
