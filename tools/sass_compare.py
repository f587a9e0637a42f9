#!/usr/bin/env python3
"""Compare the SASS of two builds function by function, for changes that must leave the kernels as they are.

    cuobjdump -sass old/lib/libep.so > old.sass; cuobjdump -sass build/lib/libep.so > new.sass
    tools/sass_compare.py old.sass new.sass [--rename 16ep_normal_launch=19ep_intranode_launch]
                          [--fieldmap KERNEL_SUBSTRING:FILE ...] [-v]

Function names are normalised (the per-build hashes in internal symbols; --rename for a type renamed inside mangled
names) and each instruction is reduced to its text (addresses and encodings dropped). Per function the verdict is:
identical; "cbank only" when every difference is a constant-bank operand c[0x0][...] (a kernel parameter's offset,
after a launch struct changed); or DIFFERENT. A --fieldmap file lists a launch struct's fields as lines
"old_offset new_offset size name" (offsets from the parameter base, 0x210 on sm_90); every parameter operand of the
kernels whose name contains KERNEL_SUBSTRING is then checked to read the same field, moved as the map says. The exit
status is 1 when a difference is not so explained."""

import argparse
import collections
import re
import sys

# Per-build parts of internal symbol names.
HASHES = [(re.compile(r"_INTERNAL_[0-9a-f]{8}_"), "_INTERNAL_H_"),
          (re.compile(r"__nv_static_(\d+)__[0-9a-f]{8}_"), r"__nv_static_\1__H_"),
          (re.compile(r"_GLOBAL__N__[0-9a-f]{8}_"), "_GLOBAL__N__H_"),
          (re.compile(r"_cu_[0-9a-f]{8}"), "_cu_H")]
CBANK = re.compile(r"c\[0x0\]\[(0x[0-9a-f]+)\]")
INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")


def normalise(name, renames):
    for pattern, replacement in HASHES:
        name = pattern.sub(replacement, name)
    for old, new in renames:
        name = name.replace(old, new)
    return name


def functions(path, renames):
    """{function name: [instruction text]} of a cuobjdump -sass listing."""
    funcs = collections.OrderedDict()
    current = None
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*Function : (\S+)", line)
            if m:
                name = key = normalise(m.group(1), renames)
                n = 1
                while key in funcs:
                    key, n = f"{name}#{n}", n + 1
                current = funcs.setdefault(key, [])
                continue
            if line.startswith("\t\t....") or line.strip().startswith(".section"):
                current = None
                continue
            m = INSTRUCTION.match(line)
            if m and current is not None:
                current.append(re.sub(r"\s+", " ", normalise(m.group(1), renames)))
    return funcs


def read_fieldmap(path):
    with open(path) as f:
        return [(int(o), int(n), int(s), name) for o, n, s, name in (line.split() for line in f if line.strip())]


def unexplained_moves(old, new, fields, base):
    """Parameter operands of matching instructions that do not read the same field, moved as `fields` says."""
    wrong = set()
    for x, y in zip(old, new):
        for p, q in zip(CBANK.findall(x), CBANK.findall(y)):
            p, q = int(p, 16), int(q, 16)
            if p < base:  # not a kernel parameter: must not move
                if p != q:
                    wrong.add((hex(p), hex(q), "?"))
                continue
            hit = [f for f in fields if f[0] <= p - base < f[0] + f[2]]
            if not hit or hit[0][1] + (p - base - hit[0][0]) != q - base:
                wrong.add((hex(p), hex(q), hit[0][3] if hit else "?"))
    return sorted(wrong)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rename", action="append", default=[], help="OLD=NEW inside the old build's mangled names")
    ap.add_argument("--fieldmap", action="append", default=[], help="KERNEL_SUBSTRING:FILE")
    ap.add_argument("--param-base", type=lambda v: int(v, 0), default=0x210)
    ap.add_argument("-v", action="store_true", help="list identical functions too")
    args = ap.parse_args()
    renames = [tuple(r.split("=", 1)) for r in args.rename]
    fieldmaps = [(key, read_fieldmap(path)) for key, path in (fm.split(":", 1) for fm in args.fieldmap)]
    old, new = functions(args.old, renames), functions(args.new, [])
    counts, problems = collections.Counter(), 0
    for name in sorted(set(old) | set(new)):
        if name not in old or name not in new:
            print(f"ONLY IN {'old' if name in old else 'new'}: {name}")
            problems += 1
            continue
        o, n = old[name], new[name]
        if o == n:
            counts["identical"] += 1
            if args.v:
                print(f"identical  {len(o):6d} instructions: {name}")
            continue
        beyond = sum(CBANK.sub("C", x) != CBANK.sub("C", y) for x, y in zip(o, n)) + abs(len(o) - len(n))
        if beyond:
            print(f"DIFFERENT  {len(o)} -> {len(n)} instructions, {beyond} differ beyond c[0x0][...]: {name}")
            counts["different"] += 1
            problems += 1
            continue
        counts["cbank only"] += 1
        moved = sum(x != y for x, y in zip(o, n))
        verdict = "no field map"
        fields = next((f for key, f in fieldmaps if key in name), None)
        if fields is not None:
            wrong = unexplained_moves(o, n, fields, args.param_base)
            verdict = f"UNEXPLAINED {wrong}" if wrong else "every parameter operand = its field, moved"
            problems += bool(wrong)
        print(f"cbank only {len(o):6d} instructions, {moved} with moved parameter offsets: {verdict}: {name}")
    print("summary:", dict(counts), "problems:", problems)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
