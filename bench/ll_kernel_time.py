#!/usr/bin/env python3
"""Low-latency GPU kernel time, measured the way DeepEP measures its LL numbers (PyTorch's profiler: the GPU
duration of the kernels, from CUPTI), so that our LL rows can be set next to DeepEP's published and re-measured
figures on the same footing. ep_bench's `ll` rows time the same calls with CUDA events around them, which also
counts launch latency; both are reported in bench/RESULTS.md.

    python bench/ll_kernel_time.py               # every visible GPU, 128 tokens, hidden 7168, top-8, 256 experts
    python bench/ll_kernel_time.py --num-gpus 2 --tokens 64 --iters 100

Per rank and iteration: a 1-element all-reduce lines the ranks up, a 256 MiB zero-fill empties L2, then
low_latency_dispatch (FP8) and low_latency_combine (BF16) run without the hook, then again with the hook (send
phase and receive phase apart). From the profiler's kernel records:
  call    = first kernel's start to last kernel's end of one call (send + receive kernels and the gap between; the
            one fused kernel of a default build, where call = kernels)
  kernels = the sum of the call's kernel durations (what DeepEP's bench_kineto sums for its one kernel)
  send / recv = the hook-mode kernels alone.
Medians over iterations per rank; the table shows the median rank and the slowest rank. The last results are
checked: recv_count against the routing, combine against x * sum of weights (bf16 rounding).
"""

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    import ep
except ImportError:  # run from a checkout: use <repo>/python
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    import ep

KERNELS = ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")


def routing(gen, T, E, K, dev):
    """DeepEP's test routing: scores |randn| + 1, the top-k distinct experts."""
    scores = torch.randn((T, E), generator=gen, device=dev).abs() + 1
    return torch.topk(scores, K, dim=-1, sorted=False).indices.to(torch.int64)


# One kernel symbol per call, whichever phases a launch runs: ep::ll::dispatch_kernel and ep::ll::combine_kernel<...>
# (src/kernels/low_latency.cu). A call is one launch (fused) or two of its symbol, the send phase first.
LL_KERNEL = re.compile(r"ep::ll::(dispatch|combine)_kernel\b")


def kernel_records(prof):
    """[(call, start_us, end_us)] of this process's ep LL kernels ("dispatch" or "combine"), in start order."""
    out = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        m = LL_KERNEL.search(e.name)
        if m:
            out.append((m.group(1), e.time_range.start, e.time_range.end))
    return sorted(out, key=lambda r: r[1])


def label(records, fused):
    """[(name, start_us, end_us)]: "<call>_fused" where a call is one launch, else "<call>_send" and "<call>_recv"
    in turn (a call's two launches)."""
    out, sent = [], set()
    for call, s, e in records:
        if fused:
            out.append((call + "_fused", s, e))
            continue
        out.append((call + ("_recv" if call in sent else "_send"), s, e))
        sent ^= {call}
    return out


def spans(records, first, last, fused):
    """Per call: (first kernel start .. last kernel end, sum of durations) for calls made of kernels first..last, or
    of the one kernel `fused`."""
    calls, open_call = [], None
    for name, s, e in records:
        if name == fused:
            calls.append((e - s, e - s))
            open_call = None
        elif name == first:
            open_call = [s, e - s]
        elif open_call is not None and name == last:
            calls.append((e - open_call[0], open_call[1] + (e - s)))
            open_call = None
    return calls


def worker(rank, world, init_method, args, results):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world)
    dev = torch.device("cuda", rank)
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    buf = ep.Buffer(dist.group.WORLD, low_latency_mode=True, num_experts=E, hidden=H, max_tokens_per_rank=T,
                    max_topk=K, ll_max_tokens_per_rank=T, explicitly_destroy=True)
    try:
        gen = torch.Generator(device=dev)
        gen.manual_seed(args.seed * 1000003 + rank)
        x = torch.randn((T, H), generator=gen, device=dev).to(torch.bfloat16)
        idx = routing(gen, T, E, K, dev)
        w = torch.rand((T, K), generator=gen, device=dev)
        E_loc = E // world
        y = torch.empty((E_loc, world * T, H), dtype=torch.bfloat16, device=dev)
        y.copy_(x[0].expand_as(y))  # any bf16 data; combine's check below uses the dispatched rows instead
        flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        one = torch.zeros(1, device=dev)

        def line_up():
            dist.all_reduce(one)
            flush.zero_()

        def no_hook():
            line_up()
            recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=True)
            line_up()
            out, _, _ = buf.low_latency_combine(y, idx, w, handle)
            return recv, count, handle, out

        def hook():
            line_up()
            _, _, handle, _, recv_hook = buf.low_latency_dispatch(x, idx, T, E, use_fp8=True, return_recv_hook=True)
            line_up()
            recv_hook()
            line_up()
            _, _, combine_hook = buf.low_latency_combine(y, idx, w, handle, return_recv_hook=True)
            line_up()
            combine_hook()

        big = torch.randn((8192, 8192), device=dev)

        def head_start():
            """~50 ms of GPU work queued first, so that the CPU enqueues the loop ahead of the GPU: without it a
            rank whose Python runs late starts its send late and its peers' receive kernels count the wait (as
            DeepEP's barrier_comm_profiling does, a large matmul before the timed loop)."""
            for _ in range(3):
                big.copy_(big @ big / 8192)
            dist.all_reduce(one)

        for _ in range(args.warmup):
            no_hook()
            hook()
        torch.cuda.synchronize()
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            head_start()
            for _ in range(args.iters):
                no_hook()
            head_start()
            for _ in range(args.iters):
                hook()
            torch.cuda.synchronize()
        rec = kernel_records(prof)
        fused = len(rec) == 6 * args.iters  # no-hook calls: 1 kernel each (fused) or 2; hook calls: 2 each
        want = (6 if fused else 8) * args.iters
        if len(rec) != want:
            names = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
            print(f"rank {rank}: found {len(rec)} ep LL kernel records, expected {want}; GPU events seen: "
                  f"{names[:12]}", flush=True)
        split = max(0, len(rec) - 4 * args.iters)  # the no-hook calls first, then the hook calls' 4 kernels each
        rec = label(rec[:split], fused) + label(rec[split:], False)
        d_call = spans(rec[:split], "dispatch_send", "dispatch_recv", "dispatch_fused")
        c_call = spans(rec[:split], "combine_send", "combine_recv", "combine_fused")
        alone = {k: [e - s for n, s, e in rec[split:] if n == k] for k in KERNELS}
        med = statistics.median
        row = [med([c for c, _ in d_call]), med([k for _, k in d_call]), med([c for c, _ in c_call]),
               med([k for _, k in c_call])] + [med(alone[k]) for k in KERNELS]
        ok = len(d_call) == args.iters and len(c_call) == args.iters and all(len(alone[k]) == args.iters
                                                                              for k in KERNELS)

        # Checks of a final no-hook call: counts, and combine of the dispatched (dequantised) rows.
        recv, count, handle, _ = no_hook()
        torch.cuda.synchronize()
        all_idx = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(all_idx, idx)
        want = torch.stack([(torch.cat(all_idx) == rank * E_loc + e).sum() for e in range(E_loc)]).to(torch.int32)
        ok = ok and torch.equal(count, want)
        q, scales = recv
        deq = (q.float().view(E_loc, world * T, H // 128, 128) * scales.unsqueeze(-1)).view(E_loc, world * T, H)
        out, _, _ = buf.low_latency_combine(deq.to(torch.bfloat16), idx, w, handle)
        ref = x.float() * w.sum(dim=1, keepdim=True)
        rel = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        ok = ok and rel < 0.08  # FP8 e4m3 rounding of the rows (3 mantissa bits), then bf16
        results[rank * 9:(rank + 1) * 9] = row + [1.0 if ok else 0.0]
    finally:
        torch.cuda.synchronize()
        dist.barrier()
        buf.destroy()
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-gpus", type=int, default=0, help="ranks (default: every visible GPU)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    world = args.num_gpus or torch.cuda.device_count()
    if world < 1 or torch.cuda.device_count() < world:
        print(f"needs at least 1 GPU (asked {world}, visible {torch.cuda.device_count()})")
        return 77
    os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    rendezvous = tempfile.mkdtemp(prefix="ll-kernel-time-")
    results = mp.get_context("spawn").Array("d", [0.0] * (9 * world))
    try:
        mp.spawn(worker, args=(world, "file://" + os.path.join(rendezvous, "store"), args, results), nprocs=world)
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)
    rows = [results[r * 9:(r + 1) * 9] for r in range(world)]
    names = ["dispatch call", "dispatch kernels", "combine call", "combine kernels",
             "dispatch send", "dispatch recv", "combine send", "combine recv"]
    print(f"ll kernel time (us), {world} ranks, {args.tokens} tokens, hidden {args.hidden}, top-{args.topk}, "
          f"{args.experts} experts, FP8 dispatch, BF16 combine; {args.iters} iterations, L2 flushed before each call; "
          f"{torch.cuda.get_device_name(0)}")
    print(f"{'':18}{'median rank':>12}{'slowest rank':>14}")
    for i, name in enumerate(names):
        v = sorted(r[i] for r in rows)
        print(f"{name:18}{v[len(v) // 2]:12.1f}{v[-1]:14.1f}")
    good = all(r[8] == 1.0 for r in rows)
    print(f"check: {'ok' if good else 'FAIL'} (recv_count, combine vs x * sum(w), every call's kernels found)")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
