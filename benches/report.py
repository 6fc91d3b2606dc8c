#!/usr/bin/env python3
"""Prints medians (and differences from the first variant of each group) from criterion's
target/criterion/<group>/<bench>/new/estimates.json, for the groups named on the command
line (default: all)."""
import json, os, sys

root = os.path.join(os.path.dirname(__file__), "..", "target", "criterion")
groups = sys.argv[1:] or sorted(d for d in os.listdir(root) if d != "report")
for group in groups:
    gdir = os.path.join(root, group)
    rows = []
    for dirpath, _, files in os.walk(gdir):
        if "estimates.json" in files and dirpath.endswith(os.sep + "new"):
            bench = os.path.relpath(os.path.dirname(dirpath), gdir)
            est = json.load(open(os.path.join(dirpath, "estimates.json")))
            rows.append((bench, est["median"]["point_estimate"]))
    rows.sort()
    if not rows:
        continue
    base = rows[0][1]
    print(f"{group}")
    for bench, median in rows:
        print(f"  {bench:<20} median {median / 1000:8.3f} µs   +{(median - base) / 1000:7.3f} µs vs {rows[0][0]}   throughput ratio {base / median:5.2f}")
