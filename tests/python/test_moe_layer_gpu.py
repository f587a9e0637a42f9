#!/usr/bin/env python3
"""test_moe_layer_gpu (EP_TEST_WORLD GPUs, default 2; PyTorch): examples/moe_layer.py's check -- an MoE layer on ep (dispatch, experts,
combine, backward) against the same layer computed densely on one GPU. Every reported difference (output, grad
of the input, the router, both expert weights), relative to the dense value's largest magnitude, must be below
1e-2 (bf16). Skips (77) without PyTorch, CUDA or enough GPUs."""

import os
import re
import subprocess
import sys

import eptest

TOLERANCE = 1e-2
NAMES = ("output", "grad input", "grad router", "grad w1", "grad w2")


def main():
    try:
        import torch
    except ImportError:
        eptest.skip("PyTorch is not installed")
    world = eptest.world_size()
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        eptest.skip(f"needs {world} GPUs, PyTorch sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    ck = eptest.Checker()
    env = dict(os.environ)
    env["PYTHONPATH"] = eptest.PYTHON_DIR + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    env.pop("MASTER_PORT", None)  # the example then uses a file rendezvous (no port to race for)
    script = os.path.join(eptest.REPO, "examples", "moe_layer.py")
    for extra in ([], ["--tokens", "300", "--hidden", "2048", "--experts", "8", "--topk", "2", "--seed", "7"]):
        label = " ".join(extra) or "defaults"
        try:
            r = subprocess.run([sys.executable, script, "--num-gpus", str(world), "--tolerance", str(TOLERANCE), *extra],
                               capture_output=True, text=True, env=env, timeout=480)
        except subprocess.TimeoutExpired as e:
            ck.check(f"moe_layer ({label}) finishes", False, f"timed out after {e.timeout} s")
            continue
        print(r.stdout, end="")
        ck.check(f"moe_layer ({label}) exits 0", r.returncode == 0, f"exit {r.returncode}: {r.stderr[-3000:]}")
        found = dict(re.findall(r"RESULT (.+?): max \|diff\| / max \|dense\| = ([0-9.eE+-]+)", r.stdout))
        for name in NAMES:
            v = float(found[name]) if name in found else None
            ck.check(f"moe_layer ({label}) {name}: relative difference {v} < {TOLERANCE}",
                     v is not None and v < TOLERANCE, "not reported" if v is None else "")
    ck.exit()


if __name__ == "__main__":
    main()
