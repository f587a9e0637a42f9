#!/usr/bin/env python3
"""test_low_latency_gpu (EP_TEST_WORLD GPUs, default 2; PyTorch): the low-latency methods of ep.Buffer against a
plain PyTorch computation of the same result, on EP_TEST_WORLD ranks (torch.multiprocessing spawn, NCCL process
group through a file rendezvous; gloo when ranks share a GPU).

Each rank draws its own inputs from the printed seed (EP_TEST_SEED replays); the ranks all_gather x and topk_idx,
and each rank computes with torch what each of its local experts must receive: the rows of the tokens that
select it, ordered by source rank, then token (ep's LL order is deterministic).
  bf16        recv_x rows, recv_count, handle src_info / layout_range (and DeepEP's tuple indexing), exact
  fp8         dequantised with the returned scales == x within e4m3 rounding; bytes and scales == a torch
              re-quantisation (scale = max(amax over 128 channels, 1e-4) / 448, q = e4m3(x * (1 / scale)));
              scales are a column-major view [E_loc, R*T, H/128]; round_scale (powers of two); use_ue8m0 (packed
              int32 [E_loc, R*T, H/512])
  combine     y = received rows * (local expert + 1) in bf16; out == sum_k w * y in fp32, rounded to bf16;
              out= preallocated; zero-copy (get_next_low_latency_combine_buffer) == the copying combine
  sums        dispatch with topk_weights, combine with sum_on_expert_ranks (with and without hooks; repeated
              experts) == each rank's bf16 sum of its experts' weighted rows, summed; the refusals (weights given
              to that combine, a dispatch without weights)
  hooks       return_recv_hook for dispatch and combine == the plain calls; two micro-batches in flight; a hook
              runs once; a stale handle (dispatch after next) is refused
  events      async_finish -> EventOverlap with an event
  stats       cumulative_local_expert_recv_stats accumulates recv_count (with and without the hook);
              dispatch_ / combine_wait_recv_cost_stats only grow, in every entry (with and without the hook, and
              in the graph's replays)
  errors      wrong dtype / shape / sizes raise naming the argument; unsupported options raise
              NotImplementedError naming the argument and "NOT YET SUPPORTED"; use_logfmt with zero_copy raises
  logfmt      use_logfmt=True (plain and hook) within DeepEP-style calc_diff 1e-4 of sum_k w * y
  graph       dispatch + an expert op + combine captured in a CUDA graph, replayed with new data == eager
  clean       clean_low_latency_buffer, then another dispatch + combine; handles from before are stale
  empty rank  a rank with no tokens
  shrink      Buffer(enable_shrink=True): the mask reads zeros; map_experts spreads a two-copy map by token;
              every rank masks the last rank by hand (low_latency_update_mask_buffer), the query says so, and
              map_experts (in place) serves the last rank's experts from rank 0's copies; a dispatch + combine ==
              torch with the last rank's experts removed from the others' tokens and the last rank keeping only
              its own; renormalize_masked=True rescales the kept weights; after the unmask a dispatch raises
              until clean_low_latency_buffer, then full results again
  bytes       Buffer(group, 0, num_rdma_bytes, low_latency_mode=True) with no ll hint, sized as DeepEP's
              test_low_latency.py sizes it (T 128, hidden 7168, 288 experts, rounded to the rank count): dispatch and
              combine == torch above the Buffer's num_experts hint; a shape the bytes do not hold raises EpError
              naming the bytes it needs
Skips (77) without PyTorch, CUDA or enough GPUs. Fails at once without NumPy: handle.src_info / layout_range and the
zero-copy buffer (NVSHMEM memory) are views made by torch.as_tensor over __cuda_array_interface__, which PyTorch
implements with NumPy. That wrapping is the fragile part of this path (never run yet): if the zero-copy checks
fail with "gave ... at 0x..." or a pointer-attribute error, PyTorch did not accept the NVSHMEM pointer as
device memory of this GPU."""

import traceback

import eptest

eptest.use_package()

# Buffer shape hints (ll_max_tokens_per_rank = T_HINT). 24 experts leave 3 or more a rank at every rank count up
# to 8, which sum_on_expert_ranks needs (2 a rank leave no room for the sums; the library refuses them by name).
E_HINT, H_HINT, K_HINT, T_HINT = 24, 2048, 8, 64
TIMEOUT_S = 600

torch = dist = ep = None


# ---- helpers ------------------------------------------------------------------------------------------------
def all_gather_rows(t, ns):
    """Every rank's t (first dim ns[r]) as a list; rows padded for the collective."""
    m = max(max(ns), 1)
    pad = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[: t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in ns]
    dist.all_gather(out, pad)
    return [o[:n] for o, n in zip(out, ns)]


def make_inputs(gen, n, H, E, K, dev, dup=False):
    """x bf16 [n, H] with a different magnitude per 128-channel group (some groups all zero: the amax floor),
    topk_idx [n, K] (distinct experts, ~10% -1; with dup some tokens list an expert twice), weights [n, K]."""
    G = H // 128
    mag = torch.exp2(torch.randint(-6, 6, (n, G, 1), generator=gen, device=dev).float())
    mag = mag.masked_fill(torch.rand((n, G, 1), generator=gen, device=dev) < 0.05, 0.0)
    x = ((torch.rand((n, G, 128), generator=gen, device=dev) * 2 - 1) * mag).reshape(n, H).to(torch.bfloat16)
    scores = torch.rand((n, E), generator=gen, device=dev)
    idx = scores.topk(K, dim=1).indices if n else torch.empty((0, K), dtype=torch.int64, device=dev)
    if dup and n and K > 1:
        d = torch.rand((n,), generator=gen, device=dev) < 0.2
        idx[:, 1] = torch.where(d, idx[:, 0], idx[:, 1])
    idx = idx.masked_fill(torch.rand((n, K), generator=gen, device=dev) < 0.1, -1).contiguous()
    w = (torch.rand((n, K), generator=gen, device=dev) + 0.1).contiguous()
    return x.contiguous(), idx, w


class World:
    """Every rank's inputs (gathered) and, for this rank, what each local expert must receive."""

    def __init__(self, c, x, idx, ns):
        self.ns, self.x, self.idx = ns, x, idx
        self.xs, self.idxs = all_gather_rows(x, ns), all_gather_rows(idx, ns)
        R, E, me = c.R, c.E, c.rank
        e_loc = E // R
        self.tok, self.rows, self.range = [], [], []
        for e in range(e_loc):
            gid = me * e_loc + e
            toks, rows, rng, begin = [], [], [], 0
            for s in range(R):
                t = (self.idxs[s] == gid).any(1).nonzero().flatten()
                toks.append(t)
                rows.append(self.xs[s][t])
                rng.append((begin << 32) | t.numel())
                begin += t.numel()
            self.tok.append(torch.cat(toks))
            self.rows.append(torch.cat(rows))
            self.range.append(rng)
        self.count = [t.numel() for t in self.tok]


def quantise(rows, round_scale):
    """torch re-quantisation of bf16 rows [n, H]: (fp8 bytes [n, H] uint8, scales [n, H/128] fp32), the kernel's
    operations one for one in fp32: scale = max(amax, 1e-4f) / 448.0f, inv = 1.0f / scale, q = e4m3 satfinite
    (x * inv). Both divisions are tensor / tensor on purpose: on CUDA, `t / 448.0` (a Python scalar) computes
    t * fl(1 / 448), which differs from the IEEE quotient in the last bit for some amax, and `1.0 / t` goes
    through reciprocal(). The clamp to +-448 is the kernel's __NV_SATFINITE (torch's cast gives NaN from 464 up;
    x * inv stays within a few ulp of 448 here, so it only documents the rule)."""
    n, H = rows.shape
    xf = rows.float().view(n, H // 128, 128)
    amax = xf.abs().amax(-1).clamp_min(1e-4)
    scale = amax / torch.full_like(amax, 448.0)
    if round_scale:  # the next power of two at or above (bit manipulation: exact)
        bits = scale.view(torch.int32)
        exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).int()
        scale = (exp << 23).view(torch.float32)
    inv = torch.ones_like(scale) / scale
    q = (xf * inv.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(n, H)
    return q.view(torch.uint8), scale


def expected_combine(x, idx, w, E_loc):
    """out[t] = bf16(sum over k, idx != -1, of w[t][k] * bf16(x[t] * (local expert + 1))) in fp32."""
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(idx.shape[1]):
        e = idx[:, k]
        mult = torch.where(e >= 0, e % E_loc + 1, torch.zeros_like(e)).float().unsqueeze(1)
        y = (x.float() * mult).to(torch.bfloat16).float()
        acc = acc + torch.where((e >= 0).unsqueeze(1), w[:, k:k + 1] * y, torch.zeros((), device=x.device))
    return acc.to(torch.bfloat16)


def expected_combine_sums(x, idx, w, E_loc):
    """The combine with sums on the experts' ranks: per rank d of the token's experts (in the order of its first
    slot), s_d = bf16(sum over its distinct experts e, first-slot order, of W_e * bf16(x * (e_loc + 1))), W_e = the
    sum of the weights of e's slots; out = bf16(sum of the s_d) in fp32."""
    n, K = idx.shape
    out = torch.zeros(x.shape, dtype=torch.bfloat16, device=x.device)
    ids, wts = idx.tolist(), w.tolist()
    for t in range(n):
        acc = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        ranks = []
        for e in ids[t]:
            if e >= 0 and e // E_loc not in ranks:
                ranks.append(e // E_loc)
        for d in ranks:
            part = torch.zeros_like(acc)
            seen = []
            for e in ids[t]:
                if e < 0 or e // E_loc != d or e in seen:
                    continue
                seen.append(e)
                W = 0.0
                for k in range(K):
                    if ids[t][k] == e:
                        W = float(torch.tensor(W, dtype=torch.float32) + torch.tensor(wts[t][k], dtype=torch.float32))
                part = part + W * (x[t].float() * (e % E_loc + 1)).to(torch.bfloat16).float()
            acc = acc + part.to(torch.bfloat16).float()
        out[t] = acc.to(torch.bfloat16)
    return out


def expert_op(recv_x, E_loc):
    """The experts: y = received rows * (local expert + 1), as bf16 (recv_x bf16 [E_loc, R*T, H])."""
    mult = torch.arange(1, E_loc + 1, device=recv_x.device, dtype=torch.float32).view(E_loc, 1, 1)
    return (recv_x.float() * mult).to(torch.bfloat16)


def close_bf16(a, b):
    d = (a.float() - b.float()).abs()
    ok = bool((d <= b.float().abs() * 2 ** -7 + 1e-6).all().item()) if d.numel() else True
    return ok, (d.max().item() if d.numel() else 0.0)


class Ctx:
    pass


# ---- the checks (every rank, same order) ---------------------------------------------------------------------
def dispatch(c, w, **kw):
    return c.buf.low_latency_dispatch(w.x, w.idx, c.T, c.E, **kw)


def check_routing(ck, c, w, recv_count, handle, tag):
    E_loc, R = c.E // c.R, c.R
    ck.check(f"{tag}: recv_count == torch", recv_count.tolist() == w.count, f"{recv_count.tolist()} vs {w.count}")
    src_info, layout_range = handle.src_info, handle.layout_range
    ok_src = all(torch.equal(src_info[e, :w.count[e]].long(), w.tok[e]) for e in range(E_loc))
    ck.check(f"{tag}: handle.src_info == source token index", ok_src)
    ck.check(f"{tag}: handle.layout_range == (begin << 32) | count per source rank",
             layout_range.tolist() == w.range, f"{layout_range.tolist()} vs {w.range}")
    ck.check(f"{tag}: handle shapes and dtypes (int32 [E_loc, R*T], int64 [E_loc, R])",
             tuple(src_info.shape) == (E_loc, R * c.T) and src_info.dtype == torch.int32
             and tuple(layout_range.shape) == (E_loc, R) and layout_range.dtype == torch.int64)


def check_bf16_dispatch(ck, c, w, hook=False):
    tag = "bf16 dispatch" + (" (hook)" if hook else "")
    E_loc = c.E // c.R
    recv_x, recv_count, handle, ev, hk = dispatch(c, w, use_fp8=False, return_recv_hook=hook)
    if hook:
        ck.check(f"{tag}: a callable hook", callable(hk))
        hk()
        ck.raises(f"{tag}: the hook runs once", RuntimeError, hk, "already called")
    else:
        ck.check(f"{tag}: hook is None, event an EventOverlap without an event",
                 hk is None and isinstance(ev, ep.EventOverlap) and ev.event is None)
    ck.check(f"{tag}: recv_x bf16 [E_loc, R*T, H]", recv_x.dtype == torch.bfloat16
             and tuple(recv_x.shape) == (E_loc, c.R * c.T, c.H))
    ok = all(torch.equal(recv_x[e, :w.count[e]], w.rows[e]) for e in range(E_loc))
    ck.check(f"{tag}: recv_x rows == gathered rows in (source rank, token) order", ok)
    check_routing(ck, c, w, recv_count, handle, tag)
    t = tuple(handle)
    ck.check(f"{tag}: handle indexes as DeepEP's (src_info, layout_range, T, H, E)",
             len(handle) == 5 and torch.equal(t[0], handle.src_info) and torch.equal(handle[1], handle.layout_range)
             and t[2:] == (c.T, c.H, c.E))
    return recv_x, recv_count, handle


def check_fp8_dispatch(ck, c, w, round_scale=False, ue8m0=False, hook=False):
    tag = "fp8 dispatch" + (" round_scale" if round_scale else "") + (" ue8m0" if ue8m0 else "") + \
        (" (hook)" if hook else "")
    E_loc, RT, H, G = c.E // c.R, c.R * c.T, c.H, c.H // 128
    (q, s), recv_count, handle, _, hk = dispatch(c, w, use_fp8=True, round_scale=round_scale, use_ue8m0=ue8m0,
                                                 return_recv_hook=hook)
    if hook:
        hk()
    ck.check(f"{tag}: recv_x float8_e4m3fn [E_loc, R*T, H]", q.dtype == torch.float8_e4m3fn
             and tuple(q.shape) == (E_loc, RT, H))
    if ue8m0:
        ck.check(f"{tag}: scales int32 [E_loc, R*T, H/512], column-major in the last two dims",
                 s.dtype == torch.int32 and tuple(s.shape) == (E_loc, RT, H // 512)
                 and s.stride() == (H // 512 * RT, 1, RT))
    else:
        ck.check(f"{tag}: scales float32 [E_loc, R*T, H/128], column-major in the last two dims",
                 s.dtype == torch.float32 and tuple(s.shape) == (E_loc, RT, G) and s.stride() == (G * RT, 1, RT))
    check_routing(ck, c, w, recv_count, handle, tag)
    bad_bytes = bad_scales = 0
    worst = 0.0
    for e in range(E_loc):
        n = w.count[e]
        if n == 0:
            continue
        want_q, want_s = quantise(w.rows[e], round_scale or ue8m0)
        got_q = q[e, :n].contiguous().view(torch.uint8)
        if ue8m0:
            b = s[e, :n].contiguous().view(torch.uint8).view(n, G).int()  # group 4j in the low byte
            got_s = (b << 23).view(torch.float32)
        else:
            got_s = s[e, :n].contiguous()
        bad_bytes += int((got_q != want_q).sum().item())
        bad_scales += int((got_s != want_s).sum().item())
        deq = got_q.view(torch.float8_e4m3fn).float() * got_s.repeat_interleave(128, dim=1)
        ref = w.rows[e].float()
        # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormals below 2^-6 * scale (absolute 2^-10 * scale).
        tol = ref.abs() * 2 ** -4 + got_s.repeat_interleave(128, dim=1) * 2 ** -9
        worst = max(worst, float(((deq - ref).abs() / tol.clamp_min(1e-30)).max().item()))
    ck.check(f"{tag}: dequantised (fp8 * scale) == x within e4m3 rounding (worst {worst:.3f} of tolerance)",
             worst <= 1.0)
    ck.check(f"{tag}: fp8 bytes == torch re-quantisation", bad_bytes == 0, f"{bad_bytes} bytes differ")
    ck.check(f"{tag}: scales == torch (max(amax, 1e-4) / 448" + (", power of two)" if round_scale else ")"),
             bad_scales == 0, f"{bad_scales} scales differ")


def check_combine(ck, c, w, recv_x, handle, tag, **kw):
    E_loc = c.E // c.R
    y = expert_op(recv_x, E_loc)
    out, ev, hk = c.buf.low_latency_combine(y, w.idx, w.w, handle, **kw)
    if hk is not None:
        hk()
    if ev.event is not None:
        ev.current_stream_wait()
    ok, d = close_bf16(out, expected_combine(w.x, w.idx, w.w, E_loc))
    ck.check(f"{tag}: == sum_k w * y in fp32 (max diff {d:g})", ok and tuple(out.shape) == (len(w.x), c.H))
    return out, y


def run_checks(ck, c):
    buf, E_loc = c.buf, c.E // c.R
    w = c.world

    recv_x, recv_count, handle = check_bf16_dispatch(ck, c, w)
    out, y = check_combine(ck, c, w, recv_x, handle, "combine")

    # out= and zero-copy, on fresh dispatches.
    recv_x, _, handle = check_bf16_dispatch(ck, c, w, hook=True)
    pre = torch.empty((len(w.x), c.H), dtype=torch.bfloat16, device=c.dev)
    got, _, _ = buf.low_latency_combine(expert_op(recv_x, E_loc), w.idx, w.w, handle, out=pre)
    ck.check("combine out=: writes and returns the given tensor", got is pre and torch.equal(pre, out))
    recv_x, _, handle, _, _ = dispatch(c, w, use_fp8=False)
    zc = buf.get_next_low_latency_combine_buffer(handle)
    ck.check("zero-copy buffer: bf16 [E_loc, R*T, H] contiguous", zc.dtype == torch.bfloat16
             and tuple(zc.shape) == (E_loc, c.R * c.T, c.H) and zc.is_contiguous())
    zc.copy_(expert_op(recv_x, E_loc))
    got, _, _ = buf.low_latency_combine(zc, w.idx, w.w, handle, zero_copy=True)
    ck.check("zero-copy combine == the copying combine", torch.equal(got, out))
    recv_x, _, handle, _, _ = dispatch(c, w, use_fp8=False)
    buf.get_next_low_latency_combine_buffer(handle).copy_(expert_op(recv_x, E_loc))
    got, _, hk = buf.low_latency_combine(None, w.idx, w.w, handle, zero_copy=True, return_recv_hook=True)
    hk()
    ck.check("zero-copy combine with x=None and the hook == the copying combine", torch.equal(got, out))

    # Sums on the experts' ranks: the dispatch carries the weights (tokens with repeated experts), the hook once.
    xs, idxs, ws = make_inputs(c.gen, c.n, c.H, c.E, c.K, c.dev, dup=True)
    wS = World(c, xs, idxs, c.ns)
    for hook in (False, True):
        recv_x, _, handle, _, hk = dispatch(c, wS, use_fp8=False, topk_weights=ws, return_recv_hook=hook)
        if hk is not None:
            hk()
        got, _, hk = buf.low_latency_combine(expert_op(recv_x, E_loc), idxs, None, handle, sum_on_expert_ranks=True,
                                             return_recv_hook=hook)
        if hk is not None:
            hk()
        ok, d = close_bf16(got, expected_combine_sums(xs, idxs, ws, E_loc))
        ck.check(f"sum_on_expert_ranks{' (hooks)' if hook else ''}: == each rank's bf16 sum, summed (max diff {d:g})",
                 ok)
    recv_x, _, handle, _, _ = dispatch(c, wS, use_fp8=False, topk_weights=ws)
    ck.raises("sum_on_expert_ranks with topk_weights given -> ValueError", ValueError,
              lambda: buf.low_latency_combine(expert_op(recv_x, E_loc), idxs, ws, handle, sum_on_expert_ranks=True),
              "topk_weights=None")
    if min(c.ns) > 0:  # every rank refuses (a rank without tokens has no weights to miss, and would go on)
        recv_x, _, handle, _, _ = dispatch(c, wS, use_fp8=False)
        ck.raises("sum_on_expert_ranks after a dispatch without topk_weights -> EpError naming it", RuntimeError,
                  lambda: buf.low_latency_combine(expert_op(recv_x, E_loc), idxs, None, handle,
                                                  sum_on_expert_ranks=True), "topk_weights")
        buf.low_latency_combine(expert_op(recv_x, E_loc), idxs, ws, handle)  # every rank combines it

    # FP8 modes.
    check_fp8_dispatch(ck, c, w)
    check_fp8_dispatch(ck, c, w, hook=True)
    check_fp8_dispatch(ck, c, w, round_scale=True)
    check_fp8_dispatch(ck, c, w, round_scale=True, ue8m0=True)

    # Two micro-batches in flight, hooks everywhere: D(A) D(B) recv A, B; C(A) C(B) recv A, B.
    xb, idxb, wb = make_inputs(c.gen, c.n, c.H, c.E, c.K, c.dev, dup=True)
    wB = World(c, xb, idxb, c.ns)
    wB.w = wb
    ra, ca, ha, _, hka = dispatch(c, w, use_fp8=False, return_recv_hook=True)
    rb, cb, hb, _, hkb = dispatch(c, wB, use_fp8=False, return_recv_hook=True)
    ck.raises("combine before the dispatch hook ran -> RuntimeError", RuntimeError,
              lambda: buf.low_latency_combine(expert_op(ra, E_loc), w.idx, w.w, ha), "hook")
    hka()
    hkb()
    ok = all(torch.equal(ra[e, :w.count[e]], w.rows[e]) and torch.equal(rb[e, :wB.count[e]], wB.rows[e])
             for e in range(E_loc))
    ck.check("two micro-batches in flight: both dispatches == torch", ok and ca.tolist() == w.count
             and cb.tolist() == wB.count)
    oa, _, hca = buf.low_latency_combine(expert_op(ra, E_loc), w.idx, w.w, ha, return_recv_hook=True)
    ob, _, hcb = buf.low_latency_combine(expert_op(rb, E_loc), wB.idx, wB.w, hb, return_recv_hook=True)
    hca()
    hcb()
    ok_b, d = close_bf16(ob, expected_combine(wB.x, wB.idx, wB.w, E_loc))
    ck.check(f"two micro-batches in flight: both combines == torch (B has repeated experts; max diff {d:g})",
             torch.equal(oa, out) and ok_b)
    dispatch(c, w, use_fp8=False)  # takes A's half: A is now stale
    ck.check("a handle becomes stale at the dispatch after next (is_current)", not ha.is_current() and hb.is_current())
    ck.raises("combine of a stale handle -> RuntimeError naming the two-buffer rule", RuntimeError,
              lambda: buf.low_latency_combine(expert_op(ra, E_loc), w.idx, w.w, ha), "stale", "two-buffer")

    # async_finish and stats.
    recv_x, _, handle, ev, hk = dispatch(c, w, use_fp8=False, async_finish=True)
    ck.check("async_finish: EventOverlap with a torch.cuda.Event, no hook",
             isinstance(ev.event, torch.cuda.Event) and hk is None)
    ev.current_stream_wait()
    check_combine(ck, c, w, recv_x, handle, "async_finish combine", async_finish=True)
    stats = torch.zeros(E_loc, dtype=torch.int32, device=c.dev)
    dispatch(c, w, use_fp8=False, cumulative_local_expert_recv_stats=stats)
    _, _, _, _, hk = dispatch(c, w, cumulative_local_expert_recv_stats=stats, return_recv_hook=True)
    hk()
    ck.check("cumulative_local_expert_recv_stats += recv_count (plain and hook)",
             stats.tolist() == [2 * n for n in w.count], f"{stats.tolist()} vs 2 * {w.count}")
    dwait = torch.zeros(c.R, dtype=torch.int64, device=c.dev)
    cwait = torch.zeros(c.R, dtype=torch.int64, device=c.dev)
    seen = [[0] * c.R, [0] * c.R]
    for hook in (False, True):
        recv_x, _, handle, _, hk = dispatch(c, w, use_fp8=False, dispatch_wait_recv_cost_stats=dwait,
                                            return_recv_hook=hook)
        if hook:
            hk()
        out, _, hk = buf.low_latency_combine(expert_op(recv_x, E_loc), w.idx, w.w, handle,
                                             combine_wait_recv_cost_stats=cwait, return_recv_hook=hook)
        if hook:
            hk()
        ok, d = close_bf16(out, expected_combine(w.x, w.idx, w.w, E_loc))
        now = [dwait.tolist(), cwait.tolist()]
        grew = all(a <= b for old, new in zip(seen, now) for a, b in zip(old, new))
        ck.check(f"wait_recv_cost_stats (hook={hook}): every entry grows, the combine is right (max diff {d:g})",
                 ok and grew and sum(now[0]) > sum(seen[0]) and sum(now[1]) > sum(seen[1]), f"{seen} -> {now}")
        seen = now

    for hook in (False, True):
        recv_x, _, handle, _, hk = dispatch(c, w, use_fp8=False, return_recv_hook=hook)
        if hook:
            hk()
        out, _, hk = buf.low_latency_combine(expert_op(recv_x, E_loc), w.idx, w.w, handle, use_logfmt=True,
                                             return_recv_hook=hook)
        if hook:
            hk()
        want = expected_combine(w.x, w.idx, w.w, E_loc).double() + 1
        got = out.double() + 1
        diff = (1 - 2 * (want * got).sum() / (want * want + got * got).sum()).item() if len(w.x) else 0.0
        ck.check(f"use_logfmt (hook={hook}): calc_diff {diff:.3g} < 1e-4", diff < 1e-4)

    check_errors(ck, c, w)
    check_graph(ck, c)
    check_clean(ck, c, w)
    check_empty_rank(ck, c)


def check_errors(ck, c, w):
    buf, E_loc, dev = c.buf, c.E // c.R, c.dev
    x, idx, wt, T, E = w.x, w.idx, w.w, c.T, c.E
    ck.raises("dispatch_wait_recv_cost_stats int32 -> TypeError naming it", TypeError,
              lambda: buf.low_latency_dispatch(x, idx, T, E, dispatch_wait_recv_cost_stats=torch.zeros(
                  c.R, dtype=torch.int32, device=dev)), "dispatch_wait_recv_cost_stats")
    ck.raises("dispatch x float32 -> TypeError naming x", TypeError,
              lambda: buf.low_latency_dispatch(x.float(), idx, T, E), "x must be torch.bfloat16")
    ck.raises("dispatch T above ll_max_tokens_per_rank -> ValueError naming the hint", ValueError,
              lambda: buf.low_latency_dispatch(x, idx, T_HINT + 1, E), "ll_max_tokens_per_rank")
    xl = torch.zeros((T + 1, c.H), dtype=torch.bfloat16, device=dev)
    il = torch.zeros((T + 1, c.K), dtype=torch.int64, device=dev)
    ck.raises("dispatch more tokens than T -> ValueError", ValueError,
              lambda: buf.low_latency_dispatch(xl, il, T, E), "num_max_dispatch_tokens_per_rank")
    ck.raises("dispatch topk_idx int32 -> TypeError naming topk_idx", TypeError,
              lambda: buf.low_latency_dispatch(x, idx.int(), T, E), "topk_idx")
    ck.raises("dispatch num_experts not a multiple of ranks -> ValueError", ValueError,
              lambda: buf.low_latency_dispatch(x, idx, T, E + 1), "num_experts")
    xh = torch.zeros((len(x), 384), dtype=torch.bfloat16, device=dev)
    ck.raises("dispatch use_ue8m0 with hidden 384 -> ValueError naming hidden and 512", ValueError,
              lambda: buf.low_latency_dispatch(xh, idx, T, E, round_scale=True, use_ue8m0=True), "hidden", "512")
    ck.raises("dispatch use_ue8m0 without round_scale -> ValueError", ValueError,
              lambda: buf.low_latency_dispatch(x, idx, T, E, use_ue8m0=True), "round_scale")
    ck.raises("dispatch async_finish with return_recv_hook -> ValueError", ValueError,
              lambda: buf.low_latency_dispatch(x, idx, T, E, async_finish=True, return_recv_hook=True), "exclusive")
    ck.raises("dispatch stats of the wrong shape -> ValueError naming them", ValueError,
              lambda: buf.low_latency_dispatch(x, idx, T, E, cumulative_local_expert_recv_stats=torch.zeros(
                  E_loc + 1, dtype=torch.int32, device=dev)), "cumulative_local_expert_recv_stats")
    recv_x, _, handle, _, _ = dispatch(c, w, use_fp8=False)
    y = expert_op(recv_x, E_loc)
    ck.raises("combine use_logfmt with zero_copy -> EpError naming both", ep.EpError,
              lambda: buf.low_latency_combine(y, idx, wt, handle, use_logfmt=True, zero_copy=True), "use_logfmt",
              "zero_copy")
    ck.raises("combine_wait_recv_cost_stats of the wrong shape -> ValueError naming it", ValueError,
              lambda: buf.low_latency_combine(y, idx, wt, handle, combine_wait_recv_cost_stats=torch.zeros(
                  c.R + 1, dtype=torch.int64, device=dev)), "combine_wait_recv_cost_stats")
    ck.raises("combine x of the wrong shape -> ValueError naming x", ValueError,
              lambda: buf.low_latency_combine(y[:, :-1], idx, wt, handle), "low_latency_combine: x must be")
    ck.raises("combine topk_weights bf16 -> TypeError naming topk_weights", TypeError,
              lambda: buf.low_latency_combine(y, idx, wt.bfloat16(), handle), "topk_weights")
    ck.raises("combine out of the wrong shape -> ValueError naming out", ValueError,
              lambda: buf.low_latency_combine(y, idx, wt, handle, out=torch.empty(
                  (len(x) + 1, c.H), dtype=torch.bfloat16, device=dev)), "out")
    ck.raises("combine with a normal-path handle -> TypeError", TypeError,
              lambda: buf.low_latency_combine(y, idx, wt, (1, 2, 3, 4, 5)), "LowLatencyHandle")
    ck.raises("clean with T above the hint -> ValueError", ValueError,
              lambda: buf.clean_low_latency_buffer(T_HINT + 1, c.H, E), "num_max_dispatch_tokens_per_rank")
    got, _, _ = buf.low_latency_combine(y, idx, wt, handle)  # the group still works after the refusals
    ok, d = close_bf16(got, expected_combine(x, idx, wt, E_loc))
    ck.check(f"errors: the path works after the refused calls (max diff {d:g})", ok)


def check_graph(ck, c):
    """dispatch + expert op + combine captured in one CUDA graph, replayed with new data == eager."""
    buf, E_loc, dev = c.buf, c.E // c.R, c.dev
    sx, sidx, sw = c.world.x.clone(), c.world.idx.clone(), c.world.w.clone()
    gwait = torch.zeros(c.R, dtype=torch.int64, device=dev)  # wait-cost stats inside the graph (bf16 only)
    for fp8 in (False, True):
        tag = f"graph ({'fp8' if fp8 else 'bf16'})"
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            grx, gcount, gh, _, _ = buf.low_latency_dispatch(sx, sidx, c.T, c.E, use_fp8=fp8,
                                                             dispatch_wait_recv_cost_stats=None if fp8 else gwait)
            if fp8:
                q, s = grx
                deq = (q.float() * s.repeat_interleave(128, dim=2)).to(torch.bfloat16)
                gy = expert_op(deq, E_loc)
            else:
                gy = expert_op(grx, E_loc)
            gout, _, _ = buf.low_latency_combine(gy, sidx, sw, gh)
        for trial in range(2):
            nx, nidx, nw = make_inputs(c.gen, c.n, c.H, c.E, c.K, dev)
            sx.copy_(nx)
            sidx.copy_(nidx)
            sw.copy_(nw)
            before = gwait.tolist()
            graph.replay()
            torch.cuda.synchronize()
            if not fp8:
                after = gwait.tolist()
                grew = all(a <= b for a, b in zip(before, after)) and sum(after) > sum(before)
                ck.check(f"{tag} replay {trial}: the captured wait_recv_cost_stats grow", grew, f"{before} -> {after}")
            got_count, got_out = gcount.clone(), gout.clone()
            got_rx = tuple(t.clone() for t in grx) if fp8 else grx.clone()
            erx, ecount, eh, _, _ = buf.low_latency_dispatch(nx, nidx, c.T, c.E, use_fp8=fp8)
            ey = expert_op((erx[0].float() * erx[1].repeat_interleave(128, dim=2)).to(torch.bfloat16)
                           if fp8 else erx, E_loc)
            eout, _, _ = buf.low_latency_combine(ey, nidx, nw, eh)
            cnt = ecount.tolist()
            if fp8:
                same_rx = all(torch.equal(got_rx[0][e, :cnt[e]].view(torch.uint8), erx[0][e, :cnt[e]].view(torch.uint8))
                              and torch.equal(got_rx[1][e, :cnt[e]], erx[1][e, :cnt[e]]) for e in range(E_loc))
            else:
                same_rx = all(torch.equal(got_rx[e, :cnt[e]], erx[e, :cnt[e]]) for e in range(E_loc))
            ck.check(f"{tag} replay {trial}: recv_count and received rows == eager",
                     got_count.tolist() == cnt and same_rx)
            ck.check(f"{tag} replay {trial}: combined == eager", torch.equal(got_out, eout))
            if not fp8:
                ok, d = close_bf16(got_out, expected_combine(nx, nidx, nw, E_loc))
                ck.check(f"{tag} replay {trial}: combined == torch (max diff {d:g})", ok)
        torch.cuda.synchronize()
        del graph


def check_clean(ck, c, w):
    buf, E_loc = c.buf, c.E // c.R
    recv_x, _, old, _, _ = dispatch(c, w, use_fp8=False)
    torch.cuda.synchronize()
    buf.clean_low_latency_buffer(c.T, c.H, c.E)
    ck.check("clean: handles from before are stale", not old.is_current())
    ck.raises("clean: combine of a handle from before -> RuntimeError", RuntimeError,
              lambda: buf.low_latency_combine(expert_op(recv_x, E_loc), w.idx, w.w, old), "stale")
    recv_x, _, handle = check_bf16_dispatch(ck, c, w)
    check_combine(ck, c, w, recv_x, handle, "clean: combine after the clean")
    T2 = c.T // 2  # a smaller T after the clean (any T up to the hint works)
    n2 = min(len(w.x), T2)
    recv_x, count, h2, _, _ = buf.low_latency_dispatch(w.x[:n2], w.idx[:n2], T2, c.E, use_fp8=False)
    ck.check("clean: a dispatch with a smaller T has shape [E_loc, R*T/2, H]",
             tuple(recv_x.shape) == (E_loc, c.R * T2, c.H) and tuple(h2.src_info.shape) == (E_loc, c.R * T2))
    out, _, _ = buf.low_latency_combine(expert_op(recv_x, E_loc), w.idx[:n2], w.w[:n2], h2)
    ok, d = close_bf16(out, expected_combine(w.x[:n2], w.idx[:n2], w.w[:n2], E_loc))
    ck.check(f"clean: combine with the smaller T == torch (max diff {d:g})", ok)


def check_empty_rank(ck, c):
    ns = [c.T] * (c.R - 1) + [0]
    n = ns[c.rank]
    x, idx, wt = make_inputs(c.gen, n, c.H, c.E, c.K, c.dev)
    w = World(c, x, idx, ns)
    w.w = wt
    recv_x, _, handle = check_bf16_dispatch(ck, c, w)
    out, _ = check_combine(ck, c, w, recv_x, handle, f"empty rank (tokens per rank {ns}): combine")
    ck.check("empty rank: combined shape [n, H]", tuple(out.shape) == (n, c.H))


def check_bytes(ck, c, share_kwargs):
    """A Buffer sized in bytes, as DeepEP's test sizes it; returns it (the caller destroys it)."""
    R, T, H, K = c.R, 128, 7168, 8
    E = 288 // R * R
    nbytes = ep.Buffer.get_low_latency_rdma_size_hint(T, H, R, E)
    kw = {} if 256 % R == 0 else {"num_experts": R}  # the normal path's hint must divide by R
    buf = ep.Buffer(dist.group.WORLD, 0, nbytes, low_latency_mode=True, explicitly_destroy=True, **kw,
                    **share_kwargs)
    ck.check(f"bytes: Buffer(group, 0, {nbytes}, low_latency_mode=True) takes the bytes",
             buf.ll_region_bytes == nbytes)
    d = Ctx()
    d.buf, d.R, d.rank, d.dev, d.gen = buf, R, c.rank, c.dev, c.gen
    d.E, d.H, d.K, d.T = E, H, K, T
    d.ns = [T - 3 * r for r in range(R)]
    x, idx, wt = make_inputs(d.gen, d.ns[c.rank], H, E, K, d.dev)
    w = World(d, x, idx, d.ns)
    w.w = wt
    recv_x, _, handle = check_bf16_dispatch(ck, d, w)
    check_combine(ck, d, w, recv_x, handle, f"bytes ({E} experts, hint {buf.num_experts}): combine")
    big = torch.zeros((4, 8192), dtype=torch.bfloat16, device=d.dev)
    ck.raises("bytes: hidden 8192 does not fit -> EpError naming the bytes", ep.EpError,
              lambda: buf.low_latency_dispatch(big, idx[:4], T, E, use_fp8=False), "need", "ll_region_bytes")
    return buf


def check_shrink(ck, c, share_kwargs):
    """Shrink mode with the last rank masked by hand on every rank; returns the Buffer (the caller destroys it)."""
    R, me, last = c.R, c.rank, c.R - 1
    buf = ep.Buffer(dist.group.WORLD, low_latency_mode=True, num_experts=c.E, hidden=c.H, max_tokens_per_rank=16,
                    max_topk=K_HINT, ll_max_tokens_per_rank=c.T, explicitly_destroy=True, enable_shrink=True,
                    **share_kwargs)
    d = Ctx()
    d.buf, d.R, d.rank, d.dev, d.gen, d.E, d.H, d.K, d.T = buf, R, me, c.dev, c.gen, c.E, c.H, c.K, c.T
    E_loc = c.E // R
    mask = torch.full((R,), 7, dtype=torch.int32, device=c.dev)
    buf.low_latency_query_mask_buffer(mask)
    ck.check("shrink: the mask starts clear", mask.tolist() == [0] * R, str(mask.tolist()))
    # map_experts: logical expert l has a copy at slot l (rank 0) and one at slot last * E_loc + l (the last rank).
    logical = torch.randint(-1, E_loc, (c.n, c.K), generator=c.gen, device=c.dev)
    copies = torch.arange(E_loc, dtype=torch.int32, device=c.dev)
    emap = torch.stack([copies, copies + last * E_loc], 1).contiguous()
    on_last = torch.where(logical >= 0, logical + last * E_loc, logical)
    token = torch.arange(c.n, device=c.dev).unsqueeze(1)
    want = torch.where((token + me) % 2 == 0, logical, on_last)  # no mask: copy (token + rank) % 2
    ck.check("shrink: map_experts with no rank masked spreads tokens over both copies",
             torch.equal(buf.map_experts(logical, emap), want))
    buf.low_latency_update_mask_buffer(last, True)
    buf.low_latency_query_mask_buffer(mask)
    ck.check(f"shrink: the query says rank {last} is masked", mask.tolist() == [0] * last + [1], str(mask.tolist()))
    want = on_last if me == last else logical  # the last rank keeps its own copies, the others rank 0's
    in_place = logical.clone()
    ck.check(f"shrink: map_experts with rank {last} masked serves its experts from rank 0's copies",
             torch.equal(buf.map_experts(in_place, emap, out=in_place), want) and torch.equal(in_place, want))
    x, idx, wt = make_inputs(c.gen, c.n, c.H, c.E, c.K, c.dev)
    owner = torch.where(idx >= 0, idx // E_loc, torch.full_like(idx, -1))
    drop = (owner != me) if me == last else (owner == last)
    kept_idx = idx.masked_fill(drop & (idx >= 0), -1)
    for renorm in (False, True):
        w = World(d, x, kept_idx, c.ns)  # what arrives: the kept entries only
        w.w, w.idx = wt, idx  # what the calls are given: the whole routing
        recv_x, _, handle = check_bf16_dispatch(ck, d, w)
        y = expert_op(recv_x, E_loc)
        out, _, _ = buf.low_latency_combine(y, idx, wt, handle, renormalize_masked=renorm)
        want_w = wt
        if renorm:
            valid = (idx >= 0).float()
            kept = (kept_idx >= 0).float()
            all_sum, kept_sum = (wt * valid).sum(1, keepdim=True), (wt * kept).sum(1, keepdim=True)
            want_w = torch.where(kept_sum > 0, wt * (all_sum / kept_sum.clamp_min(1e-30)), torch.zeros_like(wt))
        ok, diff = close_bf16(out, expected_combine(x, kept_idx, want_w, E_loc))
        ck.check(f"shrink: combine (renormalize_masked={renorm}) == torch over the kept entries (max diff {diff:g})",
                 ok)
    buf.low_latency_update_mask_buffer(last, False)
    w = World(d, x, idx, c.ns)
    w.w = wt
    ck.raises("shrink: after the unmask, a dispatch before clean_low_latency_buffer -> EpError", ep.EpError,
              lambda: dispatch(d, w, use_fp8=False), "ep_ll_clean")
    torch.cuda.synchronize()
    dist.barrier()
    buf.clean_low_latency_buffer(c.T, c.H, c.E)
    buf.low_latency_query_mask_buffer(mask)
    ck.check("shrink: the mask is clear after the unmask", mask.tolist() == [0] * R, str(mask.tolist()))
    recv_x, _, handle = check_bf16_dispatch(ck, d, w)
    check_combine(ck, d, w, recv_x, handle, "shrink: after the unmask and the clean, combine")
    return buf


# ---- per-rank process ---------------------------------------------------------------------------------------
def worker(rank, world, init_method, seed):
    global torch, dist, ep
    import torch as _torch
    import torch.distributed as _dist
    import ep as _ep
    torch, dist, ep = _torch, _dist, _ep
    ck = eptest.Checker(prefix=f"[rank {rank}] ")
    dev, share_kwargs = eptest.start_rank(rank, world, init_method)
    eptest.poison_new_tensors(torch)  # the package's outputs (torch.empty) start as NaN / 0xA5: unwritten fails
    buf = None
    try:
        eptest.check_poison(ck, torch, dev)
        experts = eptest.experts_for(world, E_HINT)  # a multiple of the rank count
        buf = ep.Buffer(dist.group.WORLD, low_latency_mode=True, num_experts=experts, hidden=H_HINT,
                        max_tokens_per_rank=16, max_topk=K_HINT, ll_max_tokens_per_rank=T_HINT,
                        explicitly_destroy=True, **share_kwargs)
        ck.check("Buffer(low_latency_mode=True): created", buf.low_latency_mode and
                 buf.ll_max_tokens_per_rank == T_HINT)
        c = Ctx()
        c.buf, c.R, c.rank, c.dev = buf, world, rank, dev
        c.E, c.H, c.K, c.T = experts, H_HINT, 6, T_HINT
        c.ns = [max(0, c.T - 13 * r) for r in range(world)]  # different token counts per rank (0 from 5 ranks on)
        c.n = c.ns[rank]
        c.gen = torch.Generator(device=c.dev)
        c.gen.manual_seed(seed * 1000003 + rank)
        x, idx, wt = make_inputs(c.gen, c.n, c.H, c.E, c.K, c.dev)
        c.world = World(c, x, idx, c.ns)
        c.world.w = wt
        run_checks(ck, c)
        torch.cuda.synchronize()
        buf.get_async_error()
        ck.check("no pending device error at the end", True)
        dist.barrier()
        buf.destroy()  # one Buffer per process at a time
        buf = None
        buf = check_bytes(ck, c, share_kwargs)
        torch.cuda.synchronize()
        dist.barrier()
        buf.destroy()
        buf = None
        buf = check_shrink(ck, c, share_kwargs)
    except Exception:
        ck.check("ran every check without an exception", False, traceback.format_exc())
    eptest.finish_rank(ck, buf)


def main():
    eptest.run_ranks(worker, TIMEOUT_S, needs_numpy=True)


if __name__ == "__main__":
    main()
