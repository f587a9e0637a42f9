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


def experts_for(world, most):
    """An expert count for `world` ranks: `most` rounded down to a multiple of world, at least one per rank (the
    tests run at any rank count, 3, 5, 6 and 7 included)."""
    return max(world, most // world * world)


def virtual_ranks_per_node(world):
    """ranks_per_node of a test's virtual-node Buffer: two nodes where world is even, one rank per node where it
    is odd; None with one rank (no second node)."""
    if world < 2:
        return None
    return world // 2 if world % 2 == 0 else 1


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


# ---- poisoned outputs -----------------------------------------------------------------------------------------
# The package allocates its outputs with torch.empty, and PyTorch's caching allocator hands back freed blocks: a
# second call with the same inputs can get the memory of the first call's (correct) outputs, so an output it left
# unwritten would still pass. poison_new_tensors() makes every CUDA tensor torch.empty / torch.empty_like return
# (the package's and the test's) hold poison, written and finished before the call returns: the package only
# launches its kernels after its torch.empty returned, so whatever a kernel leaves unwritten stays poison.
POISON_BYTE = 0xA5  # integers and bools: 0xA5A5... is no valid id, count or index, and not True / False
_poison = {"on": False, "filled": 0}


def _fill_poison(torch, t):
    if not t.is_cuda or t.numel() == 0 or torch.cuda.is_current_stream_capturing():
        return  # in a capture the fill would not be ordered before the package's comm-stream kernels
    byte = 0xFF if t.is_floating_point() else POISON_BYTE  # 0xFF...: NaN in fp32, bf16, fp16 and both FP8 formats
    if t.is_contiguous():
        t.view(-1).view(torch.uint8).fill_(byte)
    else:  # empty_like of a strided (e.g. column-major) tensor: the same values element by element
        try:
            t.fill_(float("nan") if t.is_floating_point() else
                    int.from_bytes(bytes([byte]) * t.element_size(), "little", signed=t.dtype != torch.bool))
        except (RuntimeError, OverflowError):
            return
    torch.cuda.current_stream(t.device).synchronize()  # finished before any kernel the caller launches next
    _poison["filled"] += 1


def poison_new_tensors(torch):
    """From now on in this process, every CUDA tensor that torch.empty / torch.empty_like returns is filled with
    poison (floats NaN: 0xFF bytes; other dtypes 0xA5 bytes) before it is returned; poisoning(False) pauses it.
    Outside a stream capture only (there the graph's replays are checked against eager calls instead)."""
    if getattr(torch.empty, "_eptest_poison", False):
        _poison["on"] = True
        return
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        if _poison["on"]:
            _fill_poison(torch, t)
        return t

    def poisoned_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        if _poison["on"]:
            _fill_poison(torch, t)
        return t

    poisoned_empty._eptest_poison = poisoned_empty_like._eptest_poison = True
    torch.empty, torch.empty_like = poisoned_empty, poisoned_empty_like
    _poison["on"] = True


class poisoning:
    """`with eptest.poisoning(False):` pauses poison_new_tensors (e.g. where a check needs the current stream
    left running during a call: the fill's synchronize would wait for it); restores the previous state after."""

    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.before = _poison["on"]
        _poison["on"] = self.on

    def __exit__(self, *exc):
        _poison["on"] = self.before
        return False


def check_poison(ck, torch, device):
    """A check that poison_new_tensors is in force: fresh bf16 / fp32 tensors are all NaN, int64 all 0xA5 bytes."""
    b = torch.empty((3, 1000), dtype=torch.bfloat16, device=device)
    f = torch.empty_like(b, dtype=torch.float32)
    i = torch.empty(77, dtype=torch.int64, device=device)
    ok = bool(b.isnan().all()) and bool(f.isnan().all()) and bool((i.view(torch.uint8) == POISON_BYTE).all())
    return ck.check("poison: torch.empty / torch.empty_like return NaN and 0xA5 bytes (outputs left unwritten "
                    "fail)", ok)


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
