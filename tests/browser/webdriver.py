"""Headless Chromium over plain WebDriver (HTTP + JSON, stdlib only), shared by the
real-browser tests (sdk-wasm/tests/browser_e2e.py, tests/browser/dashboard_e2e.py).

Needs Debian's `chromium` and `chromium-driver` (scripts/test-browser.sh installs them).
"""
import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

CHROMIUM = os.environ.get("CHROMIUM_BIN", shutil.which("chromium") or "/usr/bin/chromium")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(url, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


class Browser:
    """One chromedriver process and one headless Chromium session."""

    def __init__(self, profile_dir, window=(1280, 900)):
        self.port = free_port()
        self.proc = subprocess.Popen(["chromedriver", f"--port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        self.sid = None
        wait_http(self.url + "/status")
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run", "--disable-sync",
                     f"--window-size={window[0]},{window[1]}",
                     # A person's browser, not a crawler: headless Chromium's own User-Agent
                     # ("HeadlessChrome") is on the crawler list, and adclick's invalid-traffic
                     # rules would rightly count its clicks apart from the billed ones.
                     "--user-agent=Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
                     "(KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36",
                     f"--user-data-dir={profile_dir}"]}}}}
        self.sid = self.req("POST", "/session", caps)["sessionId"]
        self.s = f"/session/{self.sid}"

    def req(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        r = urllib.request.Request(self.url + path, data=data, method=method,
                                   headers={"content-type": "application/json"})
        with urllib.request.urlopen(r, timeout=60) as resp:
            return json.loads(resp.read())["value"]

    def go(self, url):
        return self.req("POST", self.s + "/url", {"url": url})

    def js(self, script, *args):
        return self.req("POST", self.s + "/execute/sync", {"script": script, "args": list(args)})

    def elements(self, css):
        return [list(e.values())[0] for e in self.req("POST", self.s + "/elements", {"using": "css selector", "value": css})]

    def click(self, element_id):
        return self.req("POST", self.s + f"/element/{element_id}/click", {})

    def wait(self, cond, t=20):
        """Polls the JavaScript expression `cond` until it is truthy."""
        end = time.time() + t
        while time.time() < end:
            if self.js(f"return {cond}"):
                return
            time.sleep(0.1)
        raise AssertionError(f"timeout waiting for {cond}")

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.req("GET", self.s + "/screenshot")))

    def close(self):
        if self.sid:
            try:
                urllib.request.urlopen(urllib.request.Request(self.url + self.s, method="DELETE"), timeout=10)
            except Exception:
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except Exception:
            self.proc.kill()


class Scenarios:
    """Runs named scenarios one after another, reporting each, going on after a failure."""

    def __init__(self):
        self.results = []

    def run(self, name, f):
        try:
            f()
            self.results.append((name, None))
            print(f"ok   {name}")
        except Exception as e:  # report and go on with the next scenario
            self.results.append((name, e))
            print(f"FAIL {name}: {e}")

    def failed(self):
        return sum(1 for _, e in self.results if e is not None)

    def summary(self):
        return f"{len(self.results) - self.failed()} passed, {self.failed()} failed"


def stop(browser, procs):
    """Closes the browser and terminates `procs` (killed after 15 s)."""
    if browser:
        browser.close()
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except Exception:
            p.kill()
