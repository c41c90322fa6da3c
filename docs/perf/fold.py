#!/usr/bin/env python3
"""Share of the aggregator apply bench's timed loop per phase: reads `perf script -F
comm,ip,sym --no-inline` output of `perf record --call-graph dwarf ... adclick bench
aggregator`, keeps the samples under `StatePath::push_batch`, groups them by the outermost
phase function they are under and prints the top self symbols of each.

Usage: python3 docs/perf/fold.py PERF_SCRIPT_OUTPUT
"""
import sys, collections
phases=["decode_clicks","ClickWindows::warm","Dedup::check_insert","ClickWindows::process","ShardState::apply","TopWriter::push","TopWriter::publish","ShardState::seal","end_batch","StatePath::push"]
samples=[];cur=None
for line in open(sys.argv[1]):
    if not line.strip():
        if cur: samples.append(cur)
        cur=None;continue
    if not line.startswith((' ','\t')):
        cur=[line.split()[0]];continue
    parts=line.split(None,1)
    cur.append(parts[1].strip() if len(parts)>1 else '?')
if cur: samples.append(cur)
tot=0;ph=collections.Counter();selfc=collections.Counter();phself=collections.defaultdict(collections.Counter)
for s in samples:
    frames=s[1:]
    if not any('push_batch' in f for f in frames): continue
    tot+=1
    # frames: innermost first
    p='other'
    for f in reversed(frames):  # outermost first
        for k in phases:
            if k in f: p=k
    ph[p]+=1; selfc[frames[0]]+=1; phself[p][frames[0][:90]]+=1
print("push_batch samples",tot)
for k,v in ph.most_common(): 
    print(f"{100*v/tot:5.1f}% {k}")
    for s,c in phself[k].most_common(6): print(f"        {100*c/tot:5.1f}% {s}")
