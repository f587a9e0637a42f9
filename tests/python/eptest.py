"""Shared vocabulary of the Python tests (the counterpart of tests/common/check.h).

A test is a standalone script: it prints one line per check ("PASS name" / "FAIL name: detail") and exits 0 (all
passed), 1 (a check failed) or 77 (skipped: it says why). tests/run_tests.sh counts each script as one test.
GPU tests run on EP_TEST_WORLD ranks (default 2; tests/run_tests.sh sets it to each rank count it tries), one GPU
each; with EP_TEST_SHARE_GPU=1 (scripts/shared_gpu.sh, under CUDA MPS) more ranks than GPUs share them."""

import os
import shutil
import sys
import tempfile
import time

TEST_PASS, TEST_FAIL, TEST_SKIP = 0, 1, 77
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON_DIR = os.path.join(REPO, "python")


class Checker:
    def __init__(self, prefix=""):
        self.prefix = prefix
        self.failures = 0
        self.count = 0

    def check(self, name, ok, detail=""):
        """Record one check; print its line. Returns ok."""
        self.count += 1
        if ok:
            print(f"{self.prefix}PASS {name}", flush=True)
        else:
            self.failures += 1
            print(f"{self.prefix}FAIL {name}" + (f": {detail}" if detail else ""), flush=True)
        return bool(ok)

    def raises(self, name, exc_types, fn, *words):
        """Check that fn() raises one of exc_types and that the message contains every word."""
        try:
            fn()
        except exc_types as e:
            msg = str(e)
            missing = [w for w in words if w not in msg]
            return self.check(name, not missing, f"message lacks {missing}: {msg!r}" if missing else "")
        except Exception as e:  # the wrong kind of error
            return self.check(name, False, f"raised {type(e).__name__}: {e}")
        return self.check(name, False, "did not raise")

    def result(self):
        return TEST_FAIL if self.failures else TEST_PASS

    def exit(self):
        print(f"{self.prefix}{self.count - self.failures} of {self.count} checks passed", flush=True)
        sys.exit(self.result())


def skip(reason):
    print(f"SKIP: {reason}", flush=True)
    sys.exit(TEST_SKIP)


def use_package():
    """Make `import ep` find python/ep whatever PYTHONPATH says."""
    if PYTHON_DIR not in sys.path:
        sys.path.insert(0, PYTHON_DIR)


def world_size():
    """Ranks a GPU test runs on: EP_TEST_WORLD, default 2."""
    return int(os.environ.get("EP_TEST_WORLD", "2"))


def sharing_gpus():
    """True when ranks may share GPUs (EP_TEST_SHARE_GPU=1: scripts/shared_gpu.sh started CUDA MPS)."""
    return os.environ.get("EP_TEST_SHARE_GPU", "0") not in ("", "0")


def start_rank(rank, world, init_method):
    """A GPU test rank's set-up: its GPU (rank, or rank % GPUs when ranks share them) made current, and
    torch.distributed over NCCL, or over gloo when ranks share a GPU (NCCL refuses two ranks on one device).
    Returns (device, buffer_kwargs): the rank's torch.device and the ep.Buffer keywords the sharing needs
    (max_sms: half the SMs the rank sees, the headroom tests/gpu/harness.c gives a shared rank too)."""
    import torch
    import torch.distributed as dist
    gpus = torch.cuda.device_count()
    shared = world > gpus
    device = torch.device("cuda", rank % gpus)
    torch.cuda.set_device(device)
    dist.init_process_group("gloo" if shared else "nccl", init_method=init_method, rank=rank, world_size=world)
    kwargs = {}
    if shared:
        kwargs["max_sms"] = max(1, torch.cuda.get_device_properties(device).multi_processor_count // 2)
    return device, kwargs


def finish_rank(ck, buf):
    """A GPU test rank's teardown, then its exit with the checker's result: wait for the device, meet the other
    ranks, destroy buf (an ep.Buffer or None) and the process group; a failure on the way is a failed check."""
    import traceback
    import torch
    import torch.distributed as dist
    try:
        if buf is not None:
            torch.cuda.synchronize()
            dist.barrier()
            buf.destroy()
        dist.destroy_process_group()
    except Exception:
        ck.check("teardown", False, traceback.format_exc())
    sys.stdout.flush()
    sys.exit(ck.result())


def run_ranks(worker, timeout_s, needs_numpy=False):
    """Run worker(rank, world, init_method, seed) in one spawned process per rank (world_size() ranks;
    init_method a file rendezvous for torch.distributed; the worker starts with start_rank) and exit 0 if every
    rank exited 0. Skips (77) without PyTorch, CUDA or enough GPUs (one per rank unless sharing_gpus()); a rank
    still alive after timeout_s is killed and counts as a failure. The seed is fresh unless EP_TEST_SEED
    replays one."""
    world = world_size()
    try:
        import torch
        import torch.multiprocessing as mp
    except ImportError:
        skip("PyTorch is not installed")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < 1 or (visible < world and not sharing_gpus()):
        skip(f"needs {world} GPUs, PyTorch sees {visible} (EP_TEST_SHARE_GPU=1 under MPS shares them)")
    if needs_numpy:
        import importlib.util
        if importlib.util.find_spec("numpy") is None:  # torch.as_tensor over __cuda_array_interface__ needs it
            print("FAIL numpy is not installed: ep's views of device memory (handle arrays, the zero-copy buffer) "
                  "are made by torch.as_tensor over __cuda_array_interface__, which needs NumPy; pip install numpy")
            sys.exit(TEST_FAIL)
    os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")  # one machine: NVLink only
    seed = int(os.environ.get("EP_TEST_SEED", "0"), 0) or (int(time.time() * 1e6) & 0xFFFFFFFF)
    print(f"{world} ranks, seed = {seed:#x} (replay with EP_TEST_SEED={seed:#x} EP_TEST_WORLD={world})", flush=True)
    # A file rendezvous, not a TCP port: a port found free here can be taken by another socket before rank 0 binds
    # it (seen once as EADDRINUSE on a busy machine).
    rendezvous_dir = tempfile.mkdtemp(prefix="eptest-")
    init_method = "file://" + os.path.join(rendezvous_dir, "store")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, init_method, seed)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    codes = []
    for r, p in enumerate(procs):
        if p.is_alive():
            print(f"FAIL rank {r} still running after {timeout_s} s: killed")
            p.kill()
            p.join()
            codes.append(TEST_FAIL)
        else:
            codes.append(p.exitcode)
    shutil.rmtree(rendezvous_dir, ignore_errors=True)
    print(f"rank exit codes: {codes}")
    sys.exit(TEST_PASS if all(code == 0 for code in codes) else TEST_FAIL)
