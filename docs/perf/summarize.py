#!/usr/bin/env python3
"""Text summary of a `perf record -g` profile: self and inclusive time per symbol, time
per innermost inlined function, and the hottest call paths (folded).

Why not just `perf report`: Debian's perf 6.1 cannot read the symbol tables of binaries
linked by current rustc (lld layout): it prints bare file offsets for every Rust frame.
This script takes `perf script` output and symbolizes those frames itself with binutils
(`nm` for symbols, `addr2line -i` for inlining), converting file offsets to addresses
through the ELF program headers. Frames perf did resolve (libc, kernel) are kept as is.

Usage: summarize.py PERF_DATA [--comm NAME] [--top 40] [--paths 25]
"""

import argparse
import bisect
import collections
import os
import re
import subprocess
import sys


def load_segments(path):
    """(file_offset, vaddr, filesz) of each LOAD segment."""
    out = subprocess.run(["readelf", "-lW", path], capture_output=True, text=True).stdout
    segs = []
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            segs.append((int(f[1], 16), int(f[2], 16), int(f[4], 16)))
    return segs


def load_symbols(path):
    out = subprocess.run(
        ["nm", "-C", "-n", "--defined-only", path], capture_output=True, text=True
    ).stdout
    addrs, names = [], []
    for line in out.splitlines():
        m = re.match(r"^([0-9a-f]+) [tTwW] (.*)$", line)
        if m:
            addrs.append(int(m.group(1), 16))
            names.append(m.group(2))
    return addrs, names


class Binary:
    def __init__(self, path):
        self.path = path
        self.segs = load_segments(path)
        self.addrs, self.names = load_symbols(path)
        self.inline = {}

    def vaddr(self, off):
        for fo, va, sz in self.segs:
            if fo <= off < fo + sz:
                return off - fo + va
        return off

    def symbol(self, va):
        i = bisect.bisect_right(self.addrs, va) - 1
        return self.names[i] if i >= 0 else "[unknown]"

    def resolve_inline(self, vas):
        """Innermost inlined function of each address (one addr2line call)."""
        todo = sorted(set(vas) - set(self.inline))
        if not todo:
            return
        p = subprocess.run(
            ["addr2line", "-f", "-C", "-i", "-a", "-e", self.path],
            input="\n".join(hex(a) for a in todo),
            capture_output=True,
            text=True,
        )
        cur = None
        for line in p.stdout.splitlines():
            if line.startswith("0x"):
                cur = int(line, 16)
                continue
            if cur is not None and cur not in self.inline and not line.startswith(("/", "?")):
                self.inline[cur] = line
        for a in todo:
            self.inline.setdefault(a, "[unknown]")


def short(name, width=110):
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--comm", help="only samples of this command (as perf shows it)")
    ap.add_argument(
        "--pid",
        help="only samples of these processes (comma-separated pids; for a `perf record -a` "
        "of several processes of one binary, e.g. `adclick bench pipeline`)",
    )
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--paths", type=int, default=25)
    ap.add_argument("--depth", type=int, default=6, help="frames per folded path")
    a = ap.parse_args()

    script = subprocess.run(
        ["perf", "script", "-i", a.data, "-F", "comm,pid,ip,sym,dso"],
        capture_output=True,
        text=True,
    ).stdout
    binaries = {}
    samples = []  # [(leaf..root frames as (dso, key, sym))]
    comm = None
    frames = []
    frame_re = re.compile(r"^\s+([0-9a-f]+) (.*) \((.*)\)$")

    pids = set(a.pid.split(",")) if a.pid else None
    pid = None

    def flush():
        if (
            comm is not None
            and frames
            and (a.comm is None or comm == a.comm)
            and (pids is None or pid in pids)
        ):
            samples.append(list(frames))

    for line in script.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            flush()
            # "comm pid" (comm may contain spaces).
            comm, _, pid = line.strip().rpartition(" ")
            comm = comm.strip()
            frames = []
            continue
        m = frame_re.match(line)
        if not m:
            continue
        ip, sym, dso = int(m.group(1), 16), m.group(2), m.group(3)
        if (sym.startswith("[unknown]") or sym == "") and dso.startswith("/") and os.path.exists(dso):
            if dso not in binaries:
                binaries[dso] = Binary(dso)
            b = binaries[dso]
            va = b.vaddr(ip)
            frames.append((dso, va, b.symbol(va)))
        else:
            frames.append((dso, None, sym.split("+0x")[0]))
    flush()

    total = len(samples)
    if total == 0:
        print("no samples")
        return 1
    for dso, b in binaries.items():
        b.resolve_inline([f[1] for s in samples for f in s[:1] if f[0] == dso])

    self_sym = collections.Counter(s[0][2] for s in samples)
    incl = collections.Counter()
    for s in samples:
        for name in {f[2] for f in s}:
            incl[name] += 1
    inl = collections.Counter()
    for s in samples:
        dso, va, sym = s[0]
        if va is not None and dso in binaries:
            inl[binaries[dso].inline.get(va, sym)] += 1
        else:
            inl[sym] += 1
    dsos = collections.Counter(os.path.basename(s[0][0]) for s in samples)
    runtime = ("std::rt::", "std::sys::backtrace", "__libc_start", "_start")
    app = lambda s: [f for f in s if not (f[2].startswith(runtime) or f[2] == "main")]
    paths = collections.Counter(
        ";".join(short(f[2], 70) for f in reversed(app(s)[: a.depth])) for s in samples
    )

    pct = lambda n: 100.0 * n / total
    print(
        f"samples: {total}"
        + (f" (comm {a.comm})" if a.comm else "")
        + (f" (pids {a.pid})" if a.pid else "")
    )
    print()
    print("== by object (self) ==")
    for name, n in dsos.most_common(8):
        print(f"{pct(n):6.2f}%  {name}")
    print()
    print(f"== self time by symbol (perf report --no-children), top {a.top} ==")
    for name, n in self_sym.most_common(a.top):
        print(f"{pct(n):6.2f}%  {short(name)}")
    print()
    print(f"== self time by innermost inlined function, top {a.top} ==")
    for name, n in inl.most_common(a.top):
        print(f"{pct(n):6.2f}%  {short(name)}")
    print()
    print(f"== inclusive time (children), top {a.top} ==")
    for name, n in [(k, v) for k, v in incl.most_common() if not k.startswith(runtime) and k != "main"][: a.top]:
        print(f"{pct(n):6.2f}%  {short(name)}")
    print()
    print(f"== hottest call paths (folded, root;...;leaf, last {a.depth} frames), top {a.paths} ==")
    for path, n in paths.most_common(a.paths):
        print(f"{pct(n):6.2f}%  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
