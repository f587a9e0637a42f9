#!/usr/bin/env python3
"""An intranode dispatch / combine test written the way a DeepEP V1 user writes one (issue #6).

Run it by hand (tests/run_tests.sh does not pick it up: its name does not start with test_):

    PYTHONPATH=python EP_LIBRARY_PATH=build/lib/libep.so NVSHMEM_REMOTE_TRANSPORT=none \
        python3 tests/python/deepep_style_intranode.py [--num-processes N]

The one ep-specific line is `import ep as deep_ep` below; replace it with `import deep_ep` and the same
script runs on DeepEP. Every other line uses only DeepEP V1's public API (deep_ep.Buffer, Config,
EventOverlap, topk_idx_t) with DeepEP's signatures, positional order and keyword names.

One rank per visible GPU (at least 2; see note 3 for 3, 5, 6, 7 GPUs), torch.multiprocessing.spawn, NCCL
process group on 127.0.0.1 with a free MASTER_PORT. Prints one PASS / FAIL line per check per rank.
Exit 0: every check passed; 1: a check failed, a rank raised, or the run passed --timeout; 77: no PyTorch,
no CUDA, or fewer than 2 GPUs.

Checks: get_dispatch_layout vs plain torch; dispatch received rows (x carries its source rank in some
columns and its token index in others) in source-rank-then-token order, local top-k ids and weights,
per-expert counts (with and without expert_alignment); cached dispatch along the handle; num_worst_tokens
== the synced run, with recv_topk_idx padded with -1; combine of the received x == x * (ranks the token
went to), combined top-k weights, combine along the num_worst_tokens handle; FP8 (x, scales) dispatch;
then a small bandwidth print (not asserted).

Where ep differs from DeepEP, and what this script does about it (no call below differs between the two):
  1. `import ep as deep_ep` is the only differing line.
  2. Buffer sizing. DeepEP sizes its NVLink buffer from num_nvl_bytes; ep ignores num_nvl_bytes and
     num_rdma_bytes and sizes its buffers from keyword-only shape hints that this script does not pass, so
     ep's defaults apply: num_experts=256, hidden=7168, max_tokens_per_rank=4096, max_topk=8. The script's
     default shape (4096 tokens, hidden 7168, top-8, 256 experts rounded down to a multiple of the rank
     count) stays within them; a larger --num-tokens / --hidden / --num-topk / --num-experts makes ep raise
     ValueError naming the hint. num_nvl_bytes is computed the DeepEP way, from
     Config.get_nvl_buffer_size_hint of the dispatch and combine configs: DeepEP gets its real size, ep's
     hint methods return 0 (accepted and ignored).
  3. Rank counts. DeepEP's get_dispatch_config / get_combine_config (and its intranode kernels) support 2, 4
     and 8 ranks only. ep's configs take any count, but its Buffer's default num_experts hint (256) must be a
     multiple of the rank count, so `deep_ep.Buffer(group, num_nvl_bytes, 0, ...)` unchanged also works on
     2, 4 and 8 ranks only (ep would need Buffer(..., num_experts=<multiple of R>) otherwise, which DeepEP
     rejects as an unknown keyword). So the script uses every visible GPU when that is 2, 4 or 8, and
     otherwise the largest of 2, 4, 8 below it (--num-processes overrides).
  4. Streams: no difference. ep follows DeepEP's rule (kernels on the Buffer's comm stream, which waits for
     previous_event or the current stream; async_finish returns its event; allocate_on_comm_stream only with
     both), and the script waits on every returned event with current_stream_wait() before reading results, as
     DeepEP code must.
  5. dispatch routing. ep derives the routing from topk_idx and the expert count from
     num_tokens_per_expert.numel(); num_tokens_per_rank / is_token_in_rank are accepted and unused. DeepEP
     needs the layout tensors. The script passes all of them (the usual DeepEP form), so both work.
  6. Handle. ep's handle is an opaque object, DeepEP's a tuple of tensors; the script only passes it back
     (cached dispatch, combine) and never indexes it. recv order is checked from the documented contract
     (source rank, then token index) with gathered routing, not from handle internals.
  7. FP8. ep takes float32 scales only (no packed UE8M0 int32) and copies strided scales to rows; the
     script passes contiguous float32 [num_tokens, hidden / 128] scales, which both accept.
  8. num_worst_tokens padding. ep also zeroes recv_topk_weights past the received count; DeepEP documents
     only recv_topk_idx = -1 there, so only that is checked.
  9. Tokens routed to no expert. ep combines them to zeros (or the bias); DeepEP does not document it. The
     routing here gives every token at least one expert, so combine's expected value is defined for both.
 10. Buffer.set_num_sms: DeepEP needs an even count; the script sets 24 (ep's default; DeepEP's is 20).
 11. One Buffer per process at a time on ep (the library holds one group per process): the script makes one,
     with explicitly_destroy=True, and calls destroy() on every rank at the end.
 12. Environment, not code: ep on a single node wants NVSHMEM_REMOTE_TRANSPORT=none (in the command above);
     DeepEP's intranode path does not use NVSHMEM.
"""

import argparse
import os
import socket
import sys
import time
import traceback

try:
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
except ImportError as e:
    print(f"SKIP: PyTorch is needed ({e})")
    sys.exit(77)

import ep as deep_ep  # the only ep-specific line: `import deep_ep` runs this script on DeepEP

NUM_SMS = 24


# ---- inputs whose provenance can be read back ------------------------------------------------------------
def pattern_x(src, tok, hidden, salt=0):
    """bf16 [len(src), hidden]: even columns hold the source rank (+ 10 * salt), columns 1 mod 4 hold
    token % 256 and columns 3 mod 4 hold token // 256. Every value is an integer below 256, exact in bf16,
    and so is its sum over up to 8 ranks."""
    x = (src.float() + 10 * salt).unsqueeze(1).repeat(1, hidden)
    x[:, 1::4] = (tok % 256).float().unsqueeze(1)
    x[:, 3::4] = (tok // 256).float().unsqueeze(1)
    return x.to(torch.bfloat16)


def pattern_scales(src, tok, num_tokens, num_blocks):
    """float32 [len(src), num_blocks]: a distinct integer per (source rank, token, block), exact in fp32."""
    base = (src * num_tokens + tok) * num_blocks
    blocks = torch.arange(num_blocks, device=src.device)
    return (base.unsqueeze(1) + blocks.unsqueeze(0)).float()


def make_routing(num_tokens, num_experts, num_topk, seed, rank):
    """topk_idx [num_tokens, num_topk] (distinct experts, about 10% -1 but never in column 0, so that every
    token goes somewhere) and topk_weights float32 [num_tokens, num_topk]."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed * 1009 + rank)
    scores = torch.rand((num_tokens, num_experts), generator=gen, device="cuda")
    topk_idx = scores.topk(num_topk, dim=1).indices
    drop = torch.rand((num_tokens, num_topk), generator=gen, device="cuda") < 0.1
    drop[:, 0] = False
    topk_idx = topk_idx.masked_fill(drop, -1).to(deep_ep.topk_idx_t).contiguous()
    topk_weights = (torch.rand((num_tokens, num_topk), generator=gen, device="cuda") + 0.5).contiguous()
    return topk_idx, topk_weights


# ---- checks ----------------------------------------------------------------------------------------------
class Checks:
    def __init__(self, rank):
        self.rank = rank
        self.failed = 0
        self.passed = 0

    def __call__(self, name, ok, detail=""):
        ok = bool(ok)
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        tail = f": {detail}" if (detail and not ok) else ""
        print(f"{'PASS' if ok else 'FAIL'} [rank {self.rank}] {name}{tail}", flush=True)
        return ok


def same(a, b):
    """Exact equality of shape, dtype and values (fp8 compared as bytes)."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def describe(a, b):
    if a is None or b is None:
        return f"got {type(a).__name__}, expected {type(b).__name__}"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"got {a.dtype} {list(a.shape)}, expected {b.dtype} {list(b.shape)}"
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    bad = (a != b)
    while bad.dim() > 1:
        bad = bad.any(-1)
    rows = bad.nonzero().flatten()
    return f"{rows.numel()} of {a.shape[0]} rows differ, first at row {rows[0].item() if rows.numel() else '-'}"


def all_gather(t, num_ranks, group):
    out = [torch.empty_like(t) for _ in range(num_ranks)]
    dist.all_gather(out, t, group=group)
    return out


def timed_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


# ---- one rank ----------------------------------------------------------------------------------------------
def run_rank(rank, num_ranks, group, args, check):
    num_tokens, hidden, num_topk = args.num_tokens, args.hidden, args.num_topk
    num_experts = (args.num_experts // num_ranks) * num_ranks
    num_local_experts = num_experts // num_ranks
    if rank == 0:
        print(f"ranks {num_ranks}, tokens {num_tokens}, hidden {hidden}, top-{num_topk}, experts {num_experts}, "
              f"seed {args.seed}", flush=True)

    # Buffer, sized the DeepEP way (see note 2 at the top for what ep does with these bytes).
    deep_ep.Buffer.set_num_sms(NUM_SMS)
    dispatch_config = deep_ep.Buffer.get_dispatch_config(num_ranks)
    combine_config = deep_ep.Buffer.get_combine_config(num_ranks)
    hidden_bytes = hidden * 2
    num_nvl_bytes = 0
    for config in (dispatch_config, combine_config):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks), num_nvl_bytes)
    buffer = deep_ep.Buffer(group, num_nvl_bytes, 0, explicitly_destroy=True)

    # Inputs.
    my_src = torch.full((num_tokens,), rank, dtype=torch.int64, device="cuda")
    my_tok = torch.arange(num_tokens, dtype=torch.int64, device="cuda")
    x = pattern_x(my_src, my_tok, hidden)
    topk_idx, topk_weights = make_routing(num_tokens, num_experts, num_topk, args.seed, rank)

    # What plain torch says the layout is.
    dest_rank = torch.where(topk_idx >= 0, topk_idx // num_local_experts, torch.full_like(topk_idx, -1))
    ref_is_token_in_rank = torch.stack([(dest_rank == r).any(1) for r in range(num_ranks)], dim=1)
    ref_num_tokens_per_rank = ref_is_token_in_rank.sum(0).to(torch.int32)
    ref_num_tokens_per_expert = torch.bincount(topk_idx[topk_idx >= 0].long(), minlength=num_experts).to(torch.int32)

    # What this rank must receive, in source-rank-then-token order, from everyone's routing.
    all_idx = all_gather(topk_idx, num_ranks, group)
    all_w = all_gather(topk_weights, num_ranks, group)
    lo = rank * num_local_experts
    exp_src, exp_tok, exp_idx, exp_w = [], [], [], []
    per_expert = torch.zeros(num_local_experts, dtype=torch.int64, device="cuda")
    for s in range(num_ranks):
        mine = (all_idx[s] >= lo) & (all_idx[s] < lo + num_local_experts)
        toks = mine.any(1).nonzero().flatten()
        exp_src.append(torch.full_like(toks, s))
        exp_tok.append(toks)
        exp_idx.append(torch.where(mine, all_idx[s] - lo, torch.full_like(all_idx[s], -1))[toks])
        exp_w.append(torch.where(mine, all_w[s], torch.zeros_like(all_w[s]))[toks])
        per_expert += torch.bincount(all_idx[s][mine].long() - lo, minlength=num_local_experts)
    exp_src, exp_tok = torch.cat(exp_src), torch.cat(exp_tok)
    exp_idx, exp_w = torch.cat(exp_idx), torch.cat(exp_w)
    exp_counts = per_expert.tolist()
    exp_recv_x = pattern_x(exp_src, exp_tok, hidden)
    num_recv = exp_src.numel()

    # ---- layout ----
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=buffer.capture(), async_finish=True,
                                   allocate_on_comm_stream=True)
    event.current_stream_wait()
    check("layout num_tokens_per_rank", same(num_tokens_per_rank, ref_num_tokens_per_rank),
          f"{num_tokens_per_rank.tolist()} vs {ref_num_tokens_per_rank.tolist()}")
    check("layout num_tokens_per_rdma_rank is None (one node)", num_tokens_per_rdma_rank is None,
          f"got {num_tokens_per_rdma_rank}")
    check("layout num_tokens_per_expert", same(num_tokens_per_expert, ref_num_tokens_per_expert),
          describe(num_tokens_per_expert.view(-1, 1), ref_num_tokens_per_expert.view(-1, 1)))
    check("layout is_token_in_rank", same(is_token_in_rank, ref_is_token_in_rank),
          describe(is_token_in_rank, ref_is_token_in_rank))

    # ---- dispatch (synced, async_finish) ----
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
        config=dispatch_config, previous_event=buffer.capture(), async_finish=True, allocate_on_comm_stream=True)
    event.current_stream_wait()
    check(f"dispatch recv_x rows: {num_recv} in (source rank, token) order with their provenance",
          same(recv_x, exp_recv_x), describe(recv_x, exp_recv_x))
    check("dispatch recv_topk_idx (local ids, -1 for other ranks' experts)",
          same(recv_topk_idx, exp_idx.to(recv_topk_idx.dtype)), describe(recv_topk_idx, exp_idx))
    check("dispatch recv_topk_weights (0.0 where the id is -1)", same(recv_topk_weights, exp_w),
          describe(recv_topk_weights, exp_w))
    check("dispatch num_recv_tokens_per_expert_list", num_recv_tokens_per_expert_list == exp_counts,
          f"{num_recv_tokens_per_expert_list} vs {exp_counts}")

    # ---- dispatch (synced, plain, expert_alignment) ----
    align = 128
    recv_x_a, recv_topk_idx_a, _, counts_a, _, event = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
        expert_alignment=align, config=dispatch_config)
    exp_aligned = [(c + align - 1) // align * align for c in exp_counts]
    check(f"dispatch expert_alignment={align} counts", counts_a == exp_aligned, f"{counts_a} vs {exp_aligned}")
    check("dispatch (no event) recv_x and recv_topk_idx == the async run",
          same(recv_x_a, recv_x) and same(recv_topk_idx_a, recv_topk_idx), describe(recv_x_a, recv_x))

    # ---- cached dispatch along the handle ----
    x2 = pattern_x(my_src, my_tok, hidden, salt=1)
    recv_x2, r_idx2, r_w2, r_counts2, r_handle2, event = buffer.dispatch(
        x2, handle=handle, config=dispatch_config, previous_event=buffer.capture(), async_finish=True)
    event.current_stream_wait()
    exp_recv_x2 = pattern_x(exp_src, exp_tok, hidden, salt=1)
    check("cached dispatch recv_x (new x, same routing)", same(recv_x2, exp_recv_x2), describe(recv_x2, exp_recv_x2))
    check("cached dispatch returns None for topk / counts / handle",
          r_idx2 is None and r_w2 is None and r_counts2 is None and r_handle2 is None,
          f"got {type(r_idx2).__name__}, {type(r_w2).__name__}, {type(r_counts2).__name__}, "
          f"{type(r_handle2).__name__}")

    # ---- num_worst_tokens: no host wait, padded outputs ----
    num_worst_tokens = num_tokens * num_ranks
    w_recv_x, w_recv_topk_idx, w_recv_topk_weights, w_counts, w_handle, event = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
        num_worst_tokens=num_worst_tokens, config=dispatch_config)
    check(f"num_worst_tokens={num_worst_tokens}: outputs have that many rows",
          w_recv_x.shape[0] == num_worst_tokens and w_recv_topk_idx.shape[0] == num_worst_tokens,
          f"recv_x {list(w_recv_x.shape)}, recv_topk_idx {list(w_recv_topk_idx.shape)}")
    check("num_worst_tokens: first rows == the synced run (x, topk ids, weights)",
          same(w_recv_x[:num_recv], recv_x) and same(w_recv_topk_idx[:num_recv], recv_topk_idx)
          and same(w_recv_topk_weights[:num_recv], recv_topk_weights),
          describe(w_recv_x[:num_recv], recv_x))
    pad = w_recv_topk_idx[num_recv:]
    check("num_worst_tokens: recv_topk_idx rows past the count are -1", bool((pad == -1).all()),
          f"{int((pad != -1).any(1).sum())} padding rows hold other ids")
    check("num_worst_tokens: num_recv_tokens_per_expert_list is []", w_counts == [], f"got {w_counts}")

    # ---- combine ----
    ref_combined = (x.float() * ref_is_token_in_rank.sum(1, keepdim=True).float()).to(torch.bfloat16)
    ref_combined_w = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))
    combined_x, combined_topk_weights, event = buffer.combine(
        recv_x, handle, topk_weights=recv_topk_weights, config=combine_config, previous_event=buffer.capture(),
        async_finish=True, allocate_on_comm_stream=True)
    event.current_stream_wait()
    check("combine x == x * number of ranks the token went to", same(combined_x, ref_combined),
          describe(combined_x, ref_combined))
    check("combine topk_weights == the token's weights (0.0 for -1 ids)",
          same(combined_topk_weights, ref_combined_w), describe(combined_topk_weights, ref_combined_w))
    combined_x_plain, combined_w_plain, _ = buffer.combine(recv_x, handle, config=combine_config)
    check("combine without topk_weights (no event): same x, weights None",
          same(combined_x_plain, ref_combined) and combined_w_plain is None, describe(combined_x_plain, ref_combined))
    w_combined_x, w_combined_w, _ = buffer.combine(w_recv_x, w_handle, topk_weights=w_recv_topk_weights,
                                                   config=combine_config)
    check("combine along the num_worst_tokens handle == along the synced one",
          same(w_combined_x, ref_combined) and same(w_combined_w, ref_combined_w),
          describe(w_combined_x, ref_combined))

    # ---- FP8 (x, scales) tuple dispatch ----
    num_blocks = hidden // 128
    x_fp8 = pattern_x(my_src, my_tok, hidden, salt=2).float().to(torch.float8_e4m3fn)
    x_scales = pattern_scales(my_src, my_tok, num_tokens, num_blocks)
    (f_recv_x, f_recv_scales), f_recv_topk_idx, f_recv_topk_weights, f_counts, f_handle, event = buffer.dispatch(
        (x_fp8, x_scales), num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
        config=dispatch_config, previous_event=buffer.capture(), async_finish=True)
    event.current_stream_wait()
    exp_fp8 = pattern_x(exp_src, exp_tok, hidden, salt=2).float().to(torch.float8_e4m3fn)
    exp_scales = pattern_scales(exp_src, exp_tok, num_tokens, num_blocks)
    check("fp8 dispatch recv_x bytes", same(f_recv_x, exp_fp8), describe(f_recv_x, exp_fp8))
    check("fp8 dispatch recv scales", same(f_recv_scales, exp_scales), describe(f_recv_scales, exp_scales))
    check("fp8 dispatch recv_topk_idx / weights / counts",
          same(f_recv_topk_idx, recv_topk_idx) and same(f_recv_topk_weights, recv_topk_weights)
          and f_counts == exp_counts, describe(f_recv_topk_idx, recv_topk_idx))

    # ---- bandwidth (printed, not asserted) ----
    dist.barrier(group=group)

    def do_dispatch():
        buffer.dispatch(x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
                        config=dispatch_config)

    def do_cached():
        buffer.dispatch(x, handle=handle, config=dispatch_config)

    def do_combine():
        buffer.combine(recv_x, handle, config=combine_config)

    recv_bytes = num_recv * hidden_bytes
    for name, fn in (("dispatch", do_dispatch), ("cached dispatch", do_cached), ("combine", do_combine)):
        dist.barrier(group=group)
        ms = timed_ms(fn, args.iters)
        print(f"[rank {rank}] {name:16s} {ms * 1000:9.1f} us  {recv_bytes / 1e9 / (ms / 1e3):7.1f} GB/s "
              f"({num_recv} rows of {hidden_bytes} bytes received / sent back)", flush=True)

    torch.cuda.synchronize()
    dist.barrier(group=group)
    buffer.destroy()


def worker(local_rank, num_ranks, args, results):
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", rank=local_rank, world_size=num_ranks)
    group = dist.new_group(list(range(num_ranks)))
    check = Checks(local_rank)
    try:
        run_rank(local_rank, num_ranks, group, args, check)
    except Exception:
        print(f"FAIL [rank {local_rank}] raised:\n{traceback.format_exc()}", flush=True)
        raise  # the spawn wrapper exits this rank with 1; the parent stops the others
    results[local_rank] = check.failed
    print(f"[rank {local_rank}] {check.passed} passed, {check.failed} failed", flush=True)
    dist.barrier(group=group)
    dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-processes", type=int, default=0,
                        help="ranks (default: every visible GPU, or the largest of 2, 4, 8 below that count)")
    parser.add_argument("--num-tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--num-topk", type=int, default=8)
    parser.add_argument("--num-experts", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20, help="timed iterations of the bandwidth print")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SEED", "0")) or int(time.time()) % 100000)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    args = parser.parse_args()

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print(f"SKIP: needs at least 2 GPUs, PyTorch sees "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        sys.exit(77)
    visible = torch.cuda.device_count()
    num_ranks = args.num_processes or max(n for n in (2, 4, 8) if n <= visible)
    if not args.num_processes and num_ranks != visible:
        print(f"{visible} GPUs visible; using {num_ranks} (intranode kernels serve 2, 4 or 8 ranks; see note 3)")
    if not 2 <= num_ranks <= torch.cuda.device_count():
        print(f"FAIL: --num-processes {num_ranks} must be in [2, {torch.cuda.device_count()}]")
        sys.exit(1)
    if args.num_experts < num_ranks or args.hidden % 128:
        print("FAIL: --num-experts must be >= the rank count and --hidden a multiple of 128")
        sys.exit(1)

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    results = mp.get_context("spawn").Array("i", [-1] * num_ranks)
    ok = True
    ctx = mp.spawn(worker, args=(num_ranks, args, results), nprocs=num_ranks, join=False)
    deadline = time.time() + args.timeout
    try:
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                print(f"FAIL: the run took longer than --timeout {args.timeout:.0f} s; stopping the ranks")
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                ok = False
                break
    except Exception as e:  # a rank raised or exited non-zero; spawn has stopped the others
        print(f"FAIL: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        ok = False
    failed_ranks = [r for r in range(num_ranks) if results[r] != 0]
    if failed_ranks:
        ok = False
    print(f"{'PASS' if ok else 'FAIL'}: deepep_style_intranode on {num_ranks} ranks"
          + (f" (ranks with failures or no result: {failed_ranks})" if failed_ranks else ""))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
