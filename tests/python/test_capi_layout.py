#!/usr/bin/env python3
"""test_capi_layout (CPU): the ctypes mirrors in python/ep/_capi.py match include/ep.h.

  * field names, in order, as parsed from the header's struct bodies;
  * sizeof of every struct and offsetof / sizeof of every field, from a small C program compiled with gcc
    against include/ep.h at test time;
  * the _INIT macros' values (what GroupConfig.init() etc. fill in), the magics, the status and dtype codes;
  * the library's limits as Python reads them (_capi.limits(), through ep_get_limits) == the header's EP_MAX_*
    constants, field by field (needs the built library; that check is skipped with a line without it).
Skips (77) when gcc or cuda_runtime_api.h (which ep.h includes) is missing."""

import ctypes
import os
import re
import shutil
import subprocess
import tempfile

import eptest

eptest.use_package()
from ep import _capi  # noqa: E402

HEADER = os.path.join(eptest.REPO, "include", "ep.h")

# C type name -> its _INIT macro (None: the struct has none).
INIT_MACROS = {
    "ep_unique_id_t": None,
    "ep_group_config_t": "EP_GROUP_CONFIG_INIT",
    "ep_group_info_t": None,
    "ep_layout_args_t": "EP_LAYOUT_ARGS_INIT",
    "ep_dispatch_prepare_args_t": "EP_DISPATCH_PREPARE_ARGS_INIT",
    "ep_dispatch_args_t": "EP_DISPATCH_ARGS_INIT",
    "ep_combine_args_t": "EP_COMBINE_ARGS_INIT",
    "ep_ll_dispatch_args_t": "EP_LL_DISPATCH_ARGS_INIT",
    "ep_ll_combine_args_t": "EP_LL_COMBINE_ARGS_INIT",
    "ep_limits_t": "EP_LIMITS_INIT",
    "ep_ll_handle_state_t": "EP_LL_HANDLE_STATE_INIT",
    "ep_expert_map_t": "EP_EXPERT_MAP_INIT",
}
CONSTANTS = ["EP_VERSION_MAJOR", "EP_VERSION_MINOR", "EP_VERSION_PATCH", "EP_VERSION_CODE", "EP_UNIQUE_ID_BYTES",
             "EP_GROUP_CONFIG_MAGIC", "EP_LAYOUT_ARGS_MAGIC", "EP_DISPATCH_PREPARE_ARGS_MAGIC",
             "EP_DISPATCH_ARGS_MAGIC", "EP_COMBINE_ARGS_MAGIC", "EP_LL_DISPATCH_ARGS_MAGIC",
             "EP_LL_COMBINE_ARGS_MAGIC", "EP_EXPERT_MAP_MAGIC", "EP_STATUS_COUNT", "EP_DTYPE_INVALID", "EP_BF16",
             "EP_FP8_E4M3", "EP_FP32", "EP_INT32", "EP_INT64"] + list(_capi.STATUS_NAMES)
# The header's limit constants, by the ep_limits_t field that carries each.
LIMIT_CONSTANTS = {
    "max_ranks": "EP_MAX_RANKS",
    "max_topk": "EP_MAX_TOPK",
    "max_hidden": "EP_MAX_HIDDEN",
    "ll_max_tokens_per_rank": "EP_LL_MAX_TOKENS_PER_RANK",
    "max_expert_alignment": "EP_MAX_EXPERT_ALIGNMENT",
    "max_sms": "EP_MAX_SMS",
    "default_num_sms": "EP_DEFAULT_NUM_SMS",
    "max_timeout_seconds": "EP_MAX_TIMEOUT_SECONDS",
}


def cuda_include():
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    cands.append("/usr/local/cuda/include")
    for c in cands:
        if os.path.exists(os.path.join(c, "cuda_runtime_api.h")):
            return c
    return None


def header_fields():
    """{C type name: [field names in order]} parsed from the typedef'd struct bodies of ep.h."""
    text = open(HEADER).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    out = {}
    for m in re.finditer(r"typedef\s+struct\s+\w+\s*\{(.*?)\}\s*(\w+)\s*;", text, flags=re.S):
        body, name = m.group(1), m.group(2)
        names = []
        for decl in body.split(";"):
            decl = decl.strip()
            if not decl:
                continue
            decl = re.sub(r"\[[^\]]*\]", "", decl)
            names.append(re.findall(r"\w+", decl)[-1])
        out[name] = names
    return out


def fmt_expr(ctype, expr):
    """printf format and C expression printing a field of the given ctypes type."""
    if ctype is ctypes.c_double:
        return "%.17g", expr
    if ctype is ctypes.c_void_p:
        return "%llu", f"(unsigned long long)(uintptr_t)({expr})"
    if ctype in (ctypes.c_uint32, ctypes.c_size_t):
        return "%llu", f"(unsigned long long)({expr})"
    return "%lld", f"(long long)({expr})"


def c_program():
    lines = ["#include <stddef.h>", "#include <stdint.h>", "#include <stdio.h>", '#include "ep.h"',
             "int main(void) {"]
    for cname, cls in _capi.STRUCTS.items():
        lines.append(f'  printf("S {cname} %zu %zu\\n", sizeof({cname}), _Alignof({cname}));')
        for fname, _ in cls._fields_:
            lines.append(f'  printf("F {cname} {fname} %zu %zu\\n", offsetof({cname}, {fname}), '
                         f'sizeof((({cname}*)0)->{fname}));')
        macro = INIT_MACROS[cname]
        if macro:
            var = f"v_{cname}"
            lines.append(f"  {{ {cname} {var} = {macro};")
            for fname, ftype in cls._fields_:
                f, e = fmt_expr(ftype, f"{var}.{fname}")
                lines.append(f'    printf("D {cname} {fname} {f}\\n", {e});')
            lines.append("  }")
    for c in CONSTANTS + list(LIMIT_CONSTANTS.values()):
        lines.append(f'  printf("C {c} %lld\\n", (long long)({c}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def main():
    ck = eptest.Checker()
    gcc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("gcc")
    if not gcc:
        eptest.skip("gcc not found: cannot compile the layout probe")
    cinc = cuda_include()
    if not cinc:
        eptest.skip("cuda_runtime_api.h not found (set CUDA_HOME): ep.h includes it")

    # 1. Field names and order, from the header text.
    parsed = header_fields()
    for cname, cls in _capi.STRUCTS.items():
        mine = [f for f, _ in cls._fields_]
        ck.check(f"fields of {cname} match ep.h in order", parsed.get(cname) == mine,
                 f"ep.h: {parsed.get(cname)}, _capi: {mine}")

    # 2. Compile and run the probe.
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "probe.c"), os.path.join(tmp, "probe")
        open(src, "w").write(c_program())
        cmd = [gcc, "-std=c11", "-Wall", "-Werror", "-I" + os.path.join(eptest.REPO, "include"), "-I" + cinc, src,
               "-o", exe]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if not ck.check("layout probe compiles against include/ep.h", r.returncode == 0, r.stderr[-2000:]):
            ck.exit()
        r = subprocess.run([exe], capture_output=True, text=True)
        ck.check("layout probe runs", r.returncode == 0, r.stderr)
    sizes, fields, defaults, consts = {}, {}, {}, {}
    for line in r.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "S":
            sizes[rest[0]] = (int(rest[1]), int(rest[2]))
        elif kind == "F":
            fields[(rest[0], rest[1])] = (int(rest[2]), int(rest[3]))
        elif kind == "D":
            defaults[(rest[0], rest[1])] = rest[2]
        elif kind == "C":
            consts[rest[0]] = int(rest[1])

    # 3. Sizes, alignments, offsets.
    for cname, cls in _capi.STRUCTS.items():
        want = sizes.get(cname)
        got = (ctypes.sizeof(cls), ctypes.alignment(cls))
        ck.check(f"sizeof/alignof {cname} = {want}", got == want, f"ctypes gives {got}")
        bad = []
        for fname, ftype in cls._fields_:
            c = fields.get((cname, fname))
            p = (getattr(cls, fname).offset, getattr(cls, fname).size)
            if c != p:
                bad.append(f"{fname}: C (offset, size) {c}, ctypes {p}")
        ck.check(f"offsets of {cname} ({len(cls._fields_)} fields)", not bad, "; ".join(bad))

    # 4. _INIT macros == init().
    for cname, macro in INIT_MACROS.items():
        if not macro:
            continue
        s = _capi.STRUCTS[cname].init()
        bad = []
        for fname, ftype in s._fields_:
            v = getattr(s, fname)
            if ftype is ctypes.c_double:
                same = float(defaults[(cname, fname)]) == v
            else:
                same = int(defaults[(cname, fname)]) == (v or 0)
            if not same:
                bad.append(f"{fname}: C {defaults[(cname, fname)]}, python {v}")
        ck.check(f"{cname}.init() == {macro}", not bad, "; ".join(bad))

    # 5. Constants.
    bad = [f"{c}: C {consts.get(c)}, python {getattr(_capi, c, None)}" for c in CONSTANTS
           if consts.get(c) != getattr(_capi, c, None)]
    ck.check(f"{len(CONSTANTS)} constants (magics, statuses, dtypes, version) match", not bad, "; ".join(bad))

    # 6. The limits Python reads from the library == the header's constants.
    ck.check("every ep_limits_t field has its header constant",
             sorted(LIMIT_CONSTANTS) == sorted(_capi.LimitValues._fields), str(_capi.LimitValues._fields))
    try:
        limits = _capi.limits()
    except _capi.EpLibraryError as e:
        print(f"SKIP limits against the header: {e}")
    else:
        bad = [f"{field}: {macro} = {consts.get(macro)}, _capi.limits() {getattr(limits, field)}"
               for field, macro in LIMIT_CONSTANTS.items() if consts.get(macro) != getattr(limits, field)]
        ck.check(f"_capi.limits() == the header's {len(LIMIT_CONSTANTS)} limit constants", not bad, "; ".join(bad))
    ck.exit()


if __name__ == "__main__":
    main()
