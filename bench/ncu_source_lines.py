#!/usr/bin/env python3
"""Warp-stall samples of one kernel per source line, from Nsight Compute's per-instruction export.

Nsight Compute's CSV source export (`ncu -i REPORT --page source --csv --print-source sass`) gives every SASS
instruction's stall samples but no source line; `nvdisasm --print-line-info` of a cubin of the same source built
with -lineinfo by the same nvcc gives the lines. This joins the two by instruction offset (checking that the opcodes
agree) and prints the lines with the most samples and their main stall reasons, then the reasons over the kernel.

Usage: python3 bench/ncu_source_lines.py SASS_CSV LINEINFO_SASS [TOP]
  SASS_CSV       the ncu export above (one kernel)
  LINEINFO_SASS  nvdisasm --print-line-info output of that kernel's function alone (from its .text. line to the next)
"""
import collections
import csv
import re
import sys


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    line_of, op_of, cur = {}, {}, None
    for text in open(sys.argv[2]):
        m = re.match(r'\s*//## File "([^"]+)", line (\d+)', text)
        if m:
            cur = f"{m.group(1).split('/')[-1]}:{m.group(2)}"
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;", text)
        if m:
            off = int(m.group(1), 16)
            line_of[off], op_of[off] = cur, m.group(2).split()[0]
    rows = list(csv.reader(open(sys.argv[1])))
    start = next((i + 1 for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if start is None:
        sys.exit(f"{sys.argv[1]}: no 'Address' header (not a --print-source sass export)")
    hdr = rows[start - 1]
    col = {k: j for j, k in enumerate(hdr)}
    reasons = [k for k in hdr if k.startswith("stall_") and "Not Issued" not in k]
    base = int(rows[start][0], 16)
    samples, by_reason, overall = collections.Counter(), collections.defaultdict(collections.Counter), collections.Counter()
    mismatches = 0
    for r in rows[start:]:
        if len(r) != len(hdr):
            continue
        off = int(r[0], 16) - base
        if op_of.get(off) != r[1].strip().rstrip(" ;").split()[0]:
            mismatches += 1
        line = line_of.get(off, "?")
        samples[line] += int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        for k in reasons:
            v = int(r[col[k]] or 0)
            by_reason[line][k] += v
            overall[k] += v
    total = sum(samples.values()) or 1
    print(f"{sum(1 for r in rows[start:] if len(r) == len(hdr))} instructions, {mismatches} opcode mismatches "
          f"(non-zero: the line info is from another build), {total} samples")
    print(f"{'line':<28} {'samples':>8} {'share':>6}  main reasons")
    for line, s in samples.most_common(top):
        main = ", ".join(f"{k[6:]} {100 * v // max(s, 1)}%" for k, v in by_reason[line].most_common(3) if v)
        print(f"{line:<28} {s:8d} {100 * s / total:5.1f}%  {main}")
    all_reasons = sum(overall.values()) or 1
    print("over the kernel: " + ", ".join(f"{k[6:]} {100 * v / all_reasons:.1f}%" for k, v in overall.most_common(8)))


if __name__ == "__main__":
    main()
