#!/usr/bin/env python3
"""test_buffer_gpu (EP_TEST_WORLD GPUs, default 2; PyTorch): every ep.Buffer method against a plain PyTorch
computation of the same result, on EP_TEST_WORLD ranks (torch.multiprocessing spawn, NCCL process group through a
file rendezvous; gloo when ranks share a GPU).

Each rank draws its own inputs from the printed seed (EP_TEST_SEED replays), the ranks all_gather them, and each
rank computes with torch what it must receive and what its tokens must combine to:
  layout      num_tokens_per_rank / _expert, is_token_in_rank vs torch reductions of topk_idx
  dispatch    recv_x == the gathered rows in the documented order (source rank, then token), recv_topk_idx
              (local ids, -1 elsewhere), recv_topk_weights (0.0 elsewhere), per-expert counts (aligned),
              handle.recv_src_idx; ranks with different token counts, and one with none
  cached      new x along the handle == the same gather of the new x
  worst       num_worst_tokens: no host wait; first rows == the eager ones, rows past the count -1 / 0.0, counts
              on the device, [] for the list
  fp8         (x_fp8, scales) tuple, scales given column-major (strided): bytes and scales as gathered
  combine     fp32 sum over ranks in ascending order, rounded once, vs torch; combined_topk_weights; one bias,
              two biases, (None, bias)
  streams     the comm stream waits for the current stream / previous_event (a stalled writer shows a missing
              wait as wrong rows); async_finish leaves the current stream free; a synchronous call makes it wait;
              allocate_on_comm_stream; EventOverlap, capture(), `with event:`
  autograd    loss.backward() through ep.dispatch + ep.combine (eager and num_worst_tokens) vs the same loss
              computed densely with torch, gradients of x and topk_weights
  errors      wrong dtype / shape / device / contiguity raise naming the argument; a bad expert id surfaces as
              EpError(EP_STATUS_DEVICE_ERROR) naming the token
  graph       dispatch(num_worst_tokens) + combine captured in a CUDA graph, replayed twice with new data and
              new routing, == eager calls on the same data
  regions     no tokens on rank 0, top-k 12 with an expert twice in a token, hidden 1000: dispatch, counts,
              combine and combined weights as torch computes them
  nodes       a Buffer without ranks_per_node finds its nodes from the ranks' hosts: one host -> one node; the
              virtual-node Buffer below is made the same way, each rank told a host of its virtual node
  internode   a second Buffer of virtual nodes (ranks_per_node world / 2, or 1 at an odd world; none at 1 rank):
              dispatch, cached, worst-case rows
              exactly as torch gathers them; combine with a bias within bf16 rounding of the partial sums
  rounds      a third Buffer of the same virtual nodes sized as DeepEP's users size it (num_nvl_bytes, no
              max_tokens_per_rank) with a third of the second one's symmetric bytes: calls of up to 256 tokens run
              in rounds of about 80, and the internode checks above hold unchanged
Skips (77) without PyTorch, CUDA or enough GPUs."""

import traceback

import eptest

eptest.use_package()

E_HINT, H_HINT, T_HINT, K_HINT = 64, 2048, 256, 16  # Buffer shape hints
TIMEOUT_S = 600  # the whole run, both ranks

torch = dist = ep = None


# ---- helpers ------------------------------------------------------------------------------------------------
def all_gather_rows(t, ns):
    """Every rank's t (first dim ns[r]) as a list; rows padded for the collective."""
    m = max(max(ns), 1)
    raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    pad = torch.zeros((m, *raw.shape[1:]), dtype=raw.dtype, device=raw.device)
    pad[: raw.shape[0]] = raw
    out = [torch.empty_like(pad) for _ in ns]
    dist.all_gather(out, pad)
    out = [o[:n] for o, n in zip(out, ns)]
    return [o.view(torch.float8_e4m3fn) for o in out] if t.dtype == torch.float8_e4m3fn else out


def make_routing(gen, n, E, K, dev):
    """topk_idx [n, K] int64 (distinct experts per token, ~10% -1), topk_weights [n, K] fp32 (random even where
    the id is -1: dispatch must send 0.0 there)."""
    scores = torch.rand((n, E), generator=gen, device=dev)
    idx = scores.topk(K, dim=1).indices if n else torch.empty((0, K), dtype=torch.int64, device=dev)
    drop = torch.rand((n, K), generator=gen, device=dev) < 0.1
    idx = idx.masked_fill(drop, -1).contiguous()
    w = torch.rand((n, K), generator=gen, device=dev) + 0.1
    return idx, w


def expected_rows(target, R, E, idxs):
    """What rank `target` receives, in the documented order: (source rank, token index on the source, local
    expert ids with -1 for experts elsewhere) per row."""
    e_loc = E // R
    lo = target * e_loc
    src, tok, local = [], [], []
    for s, idx in enumerate(idxs):
        mine = (idx >= lo) & (idx < lo + e_loc)
        t = mine.any(1).nonzero().flatten()
        src.append(torch.full_like(t, s))
        tok.append(t)
        local.append(torch.where(mine, idx - lo, torch.full_like(idx, -1))[t])
    K = idxs[0].shape[1]
    dev = idxs[0].device
    cat = lambda xs, shape: torch.cat(xs) if xs else torch.empty(shape, dtype=torch.int64, device=dev)  # noqa: E731
    return cat(src, (0,)), cat(tok, (0,)), cat(local, (0, K))


def expected_counts(local, e_loc, alignment):
    return [((int((local == e).any(1).sum().item()) + alignment - 1) // alignment) * alignment
            for e in range(e_loc)]


def expected_combine(me, R, ys, rows_of, n_me, H, biases=(), term=lambda v: v, rounded=True):
    """fp32: bias0 + bias1 + sum over ranks r ascending of ys[r][rows of my tokens on r]; rounded to bf16.
    term=torch.abs, rounded=False gives the sum of the terms' magnitudes (a bound for reordered sums)."""
    acc = torch.zeros((n_me, H), dtype=torch.float32, device="cuda")
    for b in biases:
        acc += term(b.float())
    for r in range(R):
        src, tok, _ = rows_of[r]
        sel = (src == me).nonzero().flatten()
        acc[tok[sel]] += term(ys[r][sel].float())
    return acc.to(torch.bfloat16) if rounded else acc


def close_bf16(a, b):
    """Within 2^-7 of |b| elementwise (bit-identical expected); returns (ok, max abs diff)."""
    d = (a.float() - b.float()).abs()
    ok = bool((d <= b.float().abs() * 2 ** -7 + 1e-6).all().item()) if d.numel() else True
    return ok, (d.max().item() if d.numel() else 0.0)


def rel(a, b):
    b = b.float()
    if b.numel() == 0:
        return 0.0
    return ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---- the checks (run on every rank, in the same order) ------------------------------------------------------
class Ctx:
    pass


def check_layout(ck, c):
    buf, R, E = c.buf, c.R, c.E
    per_rank, per_node, per_expert, in_rank, ev = buf.get_dispatch_layout(c.idx, E)
    valid = c.idx >= 0
    rank_of = torch.where(valid, c.idx // (E // R), torch.full_like(c.idx, -1))
    want_in = torch.stack([(rank_of == r).any(1) for r in range(R)], 1) if c.n else torch.zeros((0, R), dtype=torch.bool,
                                                                                              device="cuda")
    want_expert = torch.stack([(c.idx == e).any(1).sum() for e in range(E)]).int()
    ck.check("layout: is_token_in_rank == torch", torch.equal(in_rank, want_in))
    ck.check("layout: num_tokens_per_rank == torch", torch.equal(per_rank, want_in.sum(0).int()),
             f"{per_rank.tolist()} vs {want_in.sum(0).tolist()}")
    ck.check("layout: num_tokens_per_expert == torch", torch.equal(per_expert, want_expert))
    ck.check("layout: num_tokens_per_rdma_rank is None on one node", per_node is None)
    ck.check("layout: dtypes and shapes (int32 [R], int32 [E], bool [N, R])",
             per_rank.dtype == torch.int32 and per_expert.dtype == torch.int32 and in_rank.dtype == torch.bool
             and tuple(in_rank.shape) == (c.n, R) and isinstance(ev, ep.EventOverlap))
    c.layout = (per_rank, per_expert, in_rank)


def check_dispatch(ck, c, alignment=1, tag=""):
    buf, R, E, me = c.buf, c.R, c.E, c.rank
    per_rank, per_expert, in_rank = c.layout
    recv_x, recv_idx, recv_w, counts, handle, ev = buf.dispatch(
        c.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=c.idx, topk_weights=c.w, expert_alignment=alignment)
    src, tok, local = c.rows_of[me]
    want_x = torch.cat([c.xs[s][tok[src == s]] for s in range(R)]) if tok.numel() else recv_x[:0]
    want_w = torch.where(local >= 0, torch.cat([c.ws[s][tok[src == s]] for s in range(R)]) if tok.numel()
                         else local.float(), torch.zeros((), device="cuda"))
    sfx = f" (expert_alignment={alignment}){tag}"
    ck.check("dispatch: received count == torch" + sfx, recv_x.shape[0] == tok.numel() == handle.num_recv_tokens,
             f"{recv_x.shape[0]} vs {tok.numel()}")
    ck.check("dispatch: recv_x == gathered rows in (source rank, token) order" + sfx, torch.equal(recv_x, want_x))
    ck.check("dispatch: recv_topk_idx == local ids, -1 elsewhere" + sfx, torch.equal(recv_idx, local))
    ck.check("dispatch: recv_topk_weights == weights, 0.0 elsewhere" + sfx, torch.equal(recv_w, want_w))
    ck.check("dispatch: handle.recv_src_idx == source token index" + sfx,
             torch.equal(handle.recv_src_idx.long(), tok))
    want_counts = expected_counts(local, E // R, alignment)
    ck.check("dispatch: num_recv_tokens_per_expert_list == torch" + sfx, counts == want_counts,
             f"{counts} vs {want_counts}")
    ck.check("dispatch: event is an EventOverlap without an event (async_finish=False)",
             isinstance(ev, ep.EventOverlap) and ev.event is None)
    return recv_x, recv_idx, recv_w, handle


def run_checks(ck, c):
    buf, R, E, H, me, dev = c.buf, c.R, c.E, c.H, c.rank, c.dev

    check_layout(ck, c)
    recv_x, recv_idx, recv_w, handle = check_dispatch(ck, c)
    check_dispatch(ck, c, alignment=4)

    # Cached dispatch of new data along the handle.
    x2 = torch.randn((c.n, H), generator=c.gen, device=dev).to(torch.bfloat16)
    xs2 = all_gather_rows(x2, c.ns)
    out = buf.dispatch(x2, handle=handle)
    src, tok, local = c.rows_of[me]
    want2 = torch.cat([xs2[s][tok[src == s]] for s in range(R)])
    ck.check("cached dispatch: returns (recv_x, None, None, None, None, event)",
             all(v is None for v in out[1:5]) and isinstance(out[5], ep.EventOverlap))
    ck.check("cached dispatch: recv_x == gather of the new x", torch.equal(out[0], want2))

    # Graph-safe form (num_worst_tokens) == eager form.
    W = R * max(c.ns)
    wx, widx, ww, wcounts, wh, _ = buf.dispatch(c.x, topk_idx=c.idx, topk_weights=c.w, num_worst_tokens=W,
                                                num_experts=E)
    cnt = recv_x.shape[0]
    ck.check("num_worst_tokens: outputs have num_worst_tokens rows, list is []",
             wx.shape[0] == W and widx.shape[0] == W and ww.shape[0] == W and wcounts == [] and wh.is_graph_safe)
    ck.check("num_worst_tokens: received count on the device == eager count",
             int(wh.num_recv_tokens_dev.item()) == cnt, f"{wh.num_recv_tokens_dev.item()} vs {cnt}")
    ck.check("num_worst_tokens: per-expert counts on the device == eager list",
             wh.num_recv_tokens_per_expert.tolist() == handle.num_recv_tokens_per_expert)
    ck.check("num_worst_tokens: first rows == eager (x, idx, weights)",
             torch.equal(wx[:cnt], recv_x) and torch.equal(widx[:cnt], recv_idx) and torch.equal(ww[:cnt], recv_w))
    ck.check("num_worst_tokens: rows past the count: recv_topk_idx -1, weights 0, src -1",
             bool((widx[cnt:] == -1).all()) and bool((ww[cnt:] == 0).all())
             and bool((wh.recv_src_idx[cnt:] == -1).all()))

    # FP8 tuple input, scales column-major (a strided view, as DeepGEMM's casts return them).
    xf = (torch.randn((c.n, H), generator=c.gen, device=dev) * 4).to(torch.float8_e4m3fn)
    sc = torch.rand((H // 128, c.n), generator=c.gen, device=dev).t() + 0.5  # [n, H/128], non-contiguous
    xfs, scs = all_gather_rows(xf, c.ns), all_gather_rows(sc.contiguous(), c.ns)
    # num_experts=E: without it (and without num_tokens_per_expert) dispatch routes for the Buffer's hint
    # (E_HINT = 2 * E here), which would put every expert of this routing on rank 0.
    (fx, fs), fidx, fw, fcounts, fh, _ = buf.dispatch((xf, sc), topk_idx=c.idx, topk_weights=c.w, num_experts=E)
    ck.check("fp8: recv is a (float8_e4m3fn [rows, H], float32 [rows, H/128]) tuple",
             fx.dtype == torch.float8_e4m3fn and fs.dtype == torch.float32 and tuple(fs.shape) == (cnt, H // 128))
    want_f = torch.cat([xfs[s][tok[src == s]].view(torch.uint8) for s in range(R)])
    want_s = torch.cat([scs[s][tok[src == s]] for s in range(R)])
    ck.check("fp8: recv bytes == gathered rows", torch.equal(fx.view(torch.uint8), want_f))
    ck.check("fp8: recv scales == gathered scales", torch.equal(fs, want_s))
    ck.check("fp8: idx, weights, counts as the BF16 dispatch",
             torch.equal(fidx, recv_idx) and torch.equal(fw, recv_w) and fcounts == handle.num_recv_tokens_per_expert)
    fx2 = buf.dispatch((xf, sc), handle=handle)[0]
    ck.check("fp8: cached dispatch of the tuple", torch.equal(fx2[0].view(torch.uint8), want_f)
             and torch.equal(fx2[1], want_s))

    # Combine: every rank's y, gathered, summed in torch in ascending rank order.
    rows_all = [c.rows_of[r][0].numel() for r in range(R)]
    y = torch.randn((cnt, H), generator=c.gen, device=dev).to(torch.bfloat16)
    ys = all_gather_rows(y, rows_all)
    cx, cw, ev = buf.combine(y, handle, topk_weights=recv_w)
    ok, d = close_bf16(cx, expected_combine(me, R, ys, c.rows_of, c.n, H))
    ck.check(f"combine: == torch fp32 sum in rank order (max diff {d:g})", ok)
    want_cw = torch.where(c.idx >= 0, c.w, torch.zeros((), device=dev))
    ck.check("combine: combined_topk_weights == weights of valid ids (summed back)", torch.equal(cw, want_cw),
             f"max diff {(cw - want_cw).abs().max().item() if cw.numel() else 0}")
    cx0, cw0, _ = buf.combine(y, handle)
    ck.check("combine: without topk_weights -> (x, None, event), same x", cw0 is None and torch.equal(cx0, cx))
    b0 = torch.randn((c.n, H), generator=c.gen, device=dev).to(torch.bfloat16)
    b1 = torch.randn((c.n, H), generator=c.gen, device=dev).to(torch.bfloat16)
    for label, bias, bl in (("one bias", b0, (b0,)), ("two biases", (b0, b1), (b0, b1)), ("(None, bias)", (None, b1), (b1,))):
        got = buf.combine(y, handle, bias=bias)[0]
        ok, d = close_bf16(got, expected_combine(me, R, ys, c.rows_of, c.n, H, bl))
        ck.check(f"combine: {label} (max diff {d:g})", ok)
    yw = torch.randn((W, H), generator=c.gen, device=dev).to(torch.bfloat16)
    yw[:cnt] = y
    ck.check("combine: graph-safe handle, worst-case rows == eager",
             torch.equal(buf.combine(yw, wh, topk_weights=ww)[0], cx))

    with eptest.poisoning(False):  # the stalled current stream must stay stalled during the calls
        check_streams(ck, c, recv_x, y, cx0)
    check_autograd(ck, c, 0)
    check_autograd(ck, c, W)
    check_errors(ck, c, handle, y)
    check_graph(ck, c)
    check_empty_rank(ck, c)
    check_regions(ck, c)


SLEEP_CYCLES = 400_000_000  # torch.cuda._sleep: ~0.2 s at H100 / H200 clocks, far longer than any call here


def check_streams(ck, c, recv_x, y, cx0):
    """DeepEP's stream rule: kernels on the Buffer's comm stream, which waits for the current stream (or for
    previous_event); async_finish leaves the current stream free until the event is waited on; otherwise the
    current stream waits for the comm stream. A stalled stream (torch.cuda._sleep) makes each missing wait show
    as wrong data or as an event that completed too early."""
    buf, E = c.buf, c.E
    comm = buf.get_comm_stream()
    ck.check("get_comm_stream(): a torch.cuda.Stream other than the current one",
             isinstance(comm, torch.cuda.Stream) and comm != torch.cuda.current_stream())

    # The comm stream waits for the current stream: x is written there after a stall, then dispatched.
    x_late = torch.zeros_like(c.x)
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    x_late.copy_(c.x)
    out = buf.dispatch(x_late, topk_idx=c.idx, topk_weights=c.w, async_finish=True, num_experts=E)
    ev = out[5]
    ck.check("async_finish: EventOverlap holding a torch.cuda.Event",
             isinstance(ev, ep.EventOverlap) and isinstance(ev.event, torch.cuda.Event))
    ev.current_stream_wait()
    ck.check("the comm stream waits for the current stream (x written there late)", torch.equal(out[0], recv_x))

    # The eager form's host wait (for the received count) waits for the comm stream only, never for the current
    # stream's work: the comm stream is ordered after an event from before a stall on the current stream.
    torch.cuda.synchronize()
    before = buf.capture()
    torch.cuda._sleep(SLEEP_CYCLES)
    busy = buf.capture()
    out = buf.dispatch(c.x, topk_idx=c.idx, topk_weights=c.w, previous_event=before, async_finish=True,
                       num_experts=E)
    ck.check("eager dispatch: its host wait leaves the current stream's work running", not busy.event.query())
    out[5].current_stream_wait()
    ck.check("eager dispatch ordered by previous_event: rows == the synchronous call's", torch.equal(out[0], recv_x))

    # previous_event orders the comm stream the same way; allocate_on_comm_stream with it.
    torch.cuda.synchronize()
    x_late.zero_()
    torch.cuda._sleep(SLEEP_CYCLES)
    x_late.copy_(c.x)
    out = buf.dispatch(x_late, topk_idx=c.idx, topk_weights=c.w, previous_event=buf.capture(), async_finish=True,
                       allocate_on_comm_stream=True, num_experts=E)
    with out[5]:
        pass
    ck.check("previous_event + allocate_on_comm_stream: the comm stream waits for the event",
             torch.equal(out[0], recv_x))
    got, _, ev2 = buf.combine(y, out[4], async_finish=True, previous_event=out[5])
    ev2.current_stream_wait()
    ck.check("async_finish combine: event and result", ev2.event is not None and torch.equal(got, cx0))

    # async_finish: the current stream is not held while the comm stream is stalled (the overlap it exists for).
    W = c.R * c.n_max
    torch.cuda.synchronize()
    with torch.cuda.stream(comm):
        torch.cuda._sleep(SLEEP_CYCLES)
    out = buf.dispatch(c.x, topk_idx=c.idx, topk_weights=c.w, num_worst_tokens=W, async_finish=True,
                       num_experts=E)
    mark = torch.cuda.Event()
    mark.record(torch.cuda.current_stream())
    mark.synchronize()
    ck.check("async_finish: the current stream runs on while the comm stream is busy", not out[5].event.query())
    out[5].current_stream_wait()
    cnt = recv_x.shape[0]
    ck.check("async_finish: rows after the wait == the eager ones", torch.equal(out[0][:cnt], recv_x))

    # Without async_finish the current stream waits for the comm stream before its next work.
    torch.cuda.synchronize()
    with torch.cuda.stream(comm):
        torch.cuda._sleep(SLEEP_CYCLES)
    out = buf.dispatch(c.x, topk_idx=c.idx, topk_weights=c.w, num_worst_tokens=W, num_experts=E)
    copy = out[0][:cnt].clone()  # on the current stream
    ck.check("synchronous call: the current stream waits for the comm stream", torch.equal(copy, recv_x))
    torch.cuda.synchronize()

    ck.raises("allocate_on_comm_stream without previous_event -> ValueError", ValueError,
              lambda: buf.dispatch(c.x, topk_idx=c.idx, async_finish=True, allocate_on_comm_stream=True,
                                   num_experts=E), "allocate_on_comm_stream")
    ck.raises("previous_event of a wrong type -> TypeError", TypeError,
              lambda: buf.get_dispatch_layout(c.idx, E, previous_event=1), "previous_event")


def check_autograd(ck, c, num_worst_tokens):
    """loss = sum(g * combine(y)) + sum(gw * combined weights), y = recv_x * (sum of the row's received weights);
    dense: out[t] = sum over ranks r (ascending) of bf16(x[t] * weights of t's experts on r)."""
    buf, R, E, H, dev = c.buf, c.R, c.E, c.H, c.dev
    tag = f"autograd ({'num_worst_tokens' if num_worst_tokens else 'eager'})"
    g = torch.randn((c.n, H), generator=c.gen, device=dev)
    gw = torch.randn((c.n, c.K), generator=c.gen, device=dev)
    x = c.x.clone().requires_grad_(True)
    w = c.w.clone().requires_grad_(True)
    recv_x, recv_idx, recv_w, _, h = ep.dispatch(buf, x, c.idx, w, E, num_worst_tokens=num_worst_tokens)
    y = (recv_x.float() * recv_w.sum(1, keepdim=True)).to(torch.bfloat16)
    out, cw = ep.combine(buf, y, h, topk_weights=recv_w)
    ((out.float() * g).sum() + (cw * gw).sum()).backward()

    xd = c.x.clone().requires_grad_(True)
    wd = c.w.clone().requires_grad_(True)
    e_loc = E // R
    valid = c.idx >= 0
    acc = torch.zeros((c.n, H), dtype=torch.float32, device=dev)
    for r in range(R):
        on_r = valid & (c.idx // e_loc == r)
        s_r = (wd * on_r).sum(1, keepdim=True)
        y_r = (xd.float() * s_r).to(torch.bfloat16).float()
        acc = acc + torch.where(on_r.any(1, keepdim=True), y_r, torch.zeros((), device=dev))
    out_d = acc.to(torch.bfloat16)
    cw_d = wd * valid
    ((out_d.float() * g).sum() + (cw_d * gw).sum()).backward()
    ck.check(f"{tag}: output == dense (rel {rel(out, out_d):.2e})", rel(out, out_d) < 1e-2)
    ck.check(f"{tag}: grad x == dense (rel {rel(x.grad, xd.grad):.2e})",
             x.grad is not None and rel(x.grad, xd.grad) < 1e-2)
    ck.check(f"{tag}: grad topk_weights == dense (rel {rel(w.grad, wd.grad):.2e})",
             w.grad is not None and rel(w.grad, wd.grad) < 1e-2)


def check_errors(ck, c, handle, y):
    """Argument errors are raised before any kernel (so every rank raises the same, in step)."""
    buf, E, H, dev = c.buf, c.E, c.H, c.dev
    x, idx, w = c.x, c.idx, c.w
    ck.raises("error: dispatch x float16 -> TypeError naming x and both dtypes", TypeError,
              lambda: buf.dispatch(x.half(), topk_idx=idx), "dispatch: x must be torch.bfloat16", "torch.float16")
    ck.raises("error: dispatch x on the CPU -> ValueError naming x and the device", ValueError,
              lambda: buf.dispatch(x.cpu(), topk_idx=idx), "x must be", f"cuda:{c.dev.index}", "cpu")
    ck.raises("error: fresh dispatch with neither num_tokens_per_expert nor num_experts -> ValueError", ValueError,
              lambda: buf.dispatch(x, topk_idx=idx), "num_tokens_per_expert", "num_experts")
    if c.n > 0:  # torch calls a tensor of no elements contiguous, whatever its strides
        xnc = torch.empty((c.n, 2 * H), dtype=torch.bfloat16, device=dev)[:, ::2]
        ck.raises("error: dispatch x non-contiguous -> ValueError", ValueError,
                  lambda: buf.dispatch(xnc, topk_idx=idx), "x must be", "non-contiguous")
    ck.raises("error: dispatch x 1-D -> ValueError naming x", ValueError,
              lambda: buf.dispatch(x.flatten(), topk_idx=idx), "x must be")
    ck.raises("error: dispatch hidden above the hint -> ValueError naming the hint", ValueError,
              lambda: buf.dispatch(torch.zeros((c.n, H_HINT + 128), dtype=torch.bfloat16, device=dev), topk_idx=idx),
              "hidden")
    ck.raises("error: dispatch topk_idx int32 -> TypeError naming topk_idx", TypeError,
              lambda: buf.dispatch(x, topk_idx=idx.int()), "topk_idx", "torch.int32")
    ck.raises("error: dispatch topk_idx wrong rows -> ValueError naming topk_idx", ValueError,
              lambda: buf.dispatch(x, topk_idx=torch.zeros((c.n + 1, c.K), dtype=torch.int64, device=dev)),
              "topk_idx")
    ck.raises("error: dispatch topk_weights bf16 -> TypeError naming topk_weights", TypeError,
              lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w.bfloat16()), "topk_weights")
    ck.raises("error: dispatch without topk_idx or handle -> ValueError naming topk_idx", ValueError,
              lambda: buf.dispatch(x), "topk_idx")
    ck.raises("error: dispatch num_experts above the hint -> ValueError", ValueError,
              lambda: buf.dispatch(x, topk_idx=idx, num_experts=2 * E_HINT), "num_experts")
    ck.raises("error: cached dispatch with topk_idx -> ValueError", ValueError,
              lambda: buf.dispatch(x, handle=handle, topk_idx=idx), "cached")
    ck.raises("error: cached dispatch wrong rows -> ValueError naming x", ValueError,
              lambda: buf.dispatch(torch.zeros((c.n + 1, H), dtype=torch.bfloat16, device=dev), handle=handle), "x")
    ck.raises("error: fp8 tuple with int32 scales -> TypeError naming the scales", TypeError,
              lambda: buf.dispatch((x.to(torch.float8_e4m3fn), torch.zeros((c.n, H // 128), dtype=torch.int32,
                                                                             device=dev)), topk_idx=idx), "scales")
    ck.raises("error: combine x wrong rows -> ValueError naming x", ValueError,
              lambda: buf.combine(torch.zeros((y.shape[0] + 1, H), dtype=torch.bfloat16, device=dev), handle),
              "combine: x must be")
    ck.raises("error: combine x float32 -> TypeError naming x", TypeError, lambda: buf.combine(y.float(), handle),
              "combine: x must be torch.bfloat16")
    ck.raises("error: combine bias wrong shape -> ValueError naming bias", ValueError,
              lambda: buf.combine(y, handle, bias=torch.zeros((c.n + 1, H), dtype=torch.bfloat16, device=dev)),
              "bias")
    ck.raises("error: combine three biases -> TypeError", TypeError, lambda: buf.combine(y, handle, bias=(y, y, y)),
              "bias")
    ck.raises("error: combine handle not a handle -> TypeError", TypeError, lambda: buf.combine(y, (1, 2)), "handle")
    ck.raises("error: get_dispatch_layout topk_idx int32 -> TypeError", TypeError,
              lambda: buf.get_dispatch_layout(idx.int(), E), "topk_idx")
    if c.R > 1:  # every count is a multiple of one rank
        ck.raises("error: get_dispatch_layout num_experts not a multiple of ranks -> ValueError", ValueError,
                  lambda: buf.get_dispatch_layout(idx, E + 1), "num_experts")
    ck.raises("error: config of the wrong type -> TypeError", TypeError,
              lambda: buf.dispatch(x, topk_idx=idx, config=3), "config")

    # A bad expert id: the layout kernel records it, the next call (here get_async_error) raises naming it.
    bad = idx.clone()
    if c.n:
        bad[0, 0] = E + 5
    buf.get_dispatch_layout(bad, E)
    torch.cuda.synchronize()
    if c.n:
        ck.raises("error: expert id out of range -> EpError(EP_STATUS_DEVICE_ERROR) naming the token", ep.EpError,
                  buf.get_async_error, "EP_STATUS_DEVICE_ERROR", "token 0")
    buf.get_async_error()  # reported once, then cleared
    ck.check("error: the group works after a reported data fault", buf.get_dispatch_layout(idx, E)[0] is not None)


def check_graph(ck, c):
    """dispatch (num_worst_tokens) + combine in one CUDA graph, replayed with new data and routing."""
    buf, R, E, H, K, dev = c.buf, c.R, c.E, c.H, c.K, c.dev
    W = R * c.n_max
    sx, sidx, sw = c.x.clone(), c.idx.clone(), c.w.clone()
    buf.dispatch(sx, topk_idx=sidx, topk_weights=sw, num_worst_tokens=W, num_experts=E)  # warm-up, eager stream
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: the NCCL watchdog thread keeps querying its events while this thread captures.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        gx, gidx, gw, _, gh, _ = buf.dispatch(sx, topk_idx=sidx, topk_weights=sw, num_worst_tokens=W, num_experts=E)
        gy = gx * 2
        gout, gcw, _ = buf.combine(gy, gh, topk_weights=gw)
    for trial in range(2):
        nx = torch.randn((c.n, H), generator=c.gen, device=dev).to(torch.bfloat16)
        nidx, nw = make_routing(c.gen, c.n, E, K, dev)
        sx.copy_(nx)
        sidx.copy_(nidx)
        sw.copy_(nw)
        graph.replay()
        ex, eidx, ew, _, eh, _ = buf.dispatch(nx, topk_idx=nidx, topk_weights=nw, num_experts=E)
        eout, ecw, _ = buf.combine(ex * 2, eh, topk_weights=ew)
        cnt = ex.shape[0]
        ck.check(f"graph replay {trial}: received count == eager", int(gh.num_recv_tokens_dev.item()) == cnt)
        ck.check(f"graph replay {trial}: dispatch outputs == eager, -1 past the count",
                 torch.equal(gx[:cnt], ex) and torch.equal(gidx[:cnt], eidx) and torch.equal(gw[:cnt], ew)
                 and bool((gidx[cnt:] == -1).all()))
        ck.check(f"graph replay {trial}: combine outputs == eager", torch.equal(gout, eout) and torch.equal(gcw, ecw))
    torch.cuda.synchronize()
    del graph


def check_empty_rank(ck, c):
    """The last rank dispatches no tokens; everything still lines up."""
    buf, R, E, H, K, me, dev = c.buf, c.R, c.E, c.H, c.K, c.rank, c.dev
    ns = [5] * (R - 1) + [0]
    n = ns[me]
    x = torch.randn((n, H), generator=c.gen, device=dev).to(torch.bfloat16)
    idx, w = make_routing(c.gen, n, E, K, dev)
    xs, idxs = all_gather_rows(x, ns), all_gather_rows(idx, ns)
    recv_x, recv_idx, recv_w, counts, h, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E)
    src, tok, local = expected_rows(me, R, E, idxs)
    want = torch.cat([xs[s][tok[src == s]] for s in range(R)]) if tok.numel() else recv_x[:0]
    ck.check(f"empty rank: dispatch with tokens per rank {ns}", torch.equal(recv_x, want)
             and torch.equal(recv_idx, local))
    out, _, _ = buf.combine(recv_x, h)
    ck.check("empty rank: combine shape [n, H]", tuple(out.shape) == (n, H))
    rows_of = [expected_rows(r, R, E, idxs) for r in range(R)]
    ys = all_gather_rows(recv_x, [rows_of[r][0].numel() for r in range(R)])
    ok, d = close_bf16(out, expected_combine(me, R, ys, rows_of, n, H))
    ck.check(f"empty rank: combine == torch (max diff {d:g})", ok)


def check_regions(ck, c):
    """Inputs the other checks do not send: no tokens on rank 0, top-k 12 with one expert twice in every third
    token, hidden 1000 (a multiple of 8 only). Dispatch, counts and combine as torch computes them."""
    buf, R, E, me, dev = c.buf, c.R, c.E, c.rank, c.dev
    H, K = 1000, min(12, E)
    ns = [0] + [9] * (R - 1) if R > 1 else [9]
    n = ns[me]
    x = torch.randn((n, H), generator=c.gen, device=dev).to(torch.bfloat16)
    idx, w = make_routing(c.gen, n, E, K, dev)
    if K > 1 and n:
        every_third = torch.arange(n, device=dev) % 3 == 0
        idx[every_third, K - 1] = idx[every_third, 0]  # the same expert in slots 0 and K-1 (or -1 in both)
    xs, idxs = all_gather_rows(x, ns), all_gather_rows(idx, ns)
    recv_x, recv_idx, recv_w, counts, h, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E)
    src, tok, local = expected_rows(me, R, E, idxs)
    want = torch.cat([xs[s][tok[src == s]] for s in range(R)]) if tok.numel() else recv_x[:0]
    tag = f"regions (tokens {ns}, top-{K} with repeats, hidden {H})"
    ck.check(f"{tag}: dispatch rows and recv_topk_idx (each slot mapped)", torch.equal(recv_x, want)
             and torch.equal(recv_idx, local))
    want_counts = expected_counts(local, E // R, 1)
    ck.check(f"{tag}: per-expert counts (a repeated expert counts once)", counts == want_counts,
             f"{counts} vs {want_counts}")
    out, cw, _ = buf.combine(recv_x, h, topk_weights=recv_w)
    rows_of = [expected_rows(r, R, E, idxs) for r in range(R)]
    ys = all_gather_rows(recv_x, [rows_of[r][0].numel() for r in range(R)])
    ok, d = close_bf16(out, expected_combine(me, R, ys, rows_of, n, H))
    ck.check(f"{tag}: combine == torch (max diff {d:g})", ok)
    want_cw = torch.where(idx >= 0, w, torch.zeros((), device=dev))
    ck.check(f"{tag}: combined_topk_weights, each slot its own weight", torch.equal(cw, want_cw))


def check_virtual_nodes(ck, c):
    """The same routing on a Buffer whose ranks form virtual nodes (the internode path): dispatch rows exactly as
    torch gathers them; combine within bf16 rounding of the partial sums (each node's partial is rounded to bf16
    before the last hop, as DeepEP does), i.e. |got - sum| <= 2^-7 * (sum of |terms|) per element."""
    buf, R, H, me, dev = c.buf, c.R, c.H, c.rank, c.dev
    tag = f" [{R // buf.info['ranks_per_node']} virtual nodes]"
    recv_x, recv_idx, recv_w, handle = check_dispatch(ck, c, tag=tag)
    ck.check("cached dispatch" + tag, torch.equal(buf.dispatch(c.x, handle=handle)[0], recv_x))
    W = R * max(c.ns)
    wx, widx, ww, _, wh, _ = buf.dispatch(c.x, topk_idx=c.idx, topk_weights=c.w, num_worst_tokens=W, num_experts=c.E)
    cnt = recv_x.shape[0]
    ck.check("num_worst_tokens: first rows == eager" + tag, torch.equal(wx[:cnt], recv_x)
             and torch.equal(widx[:cnt], recv_idx) and torch.equal(ww[:cnt], recv_w))
    y = torch.randn((cnt, H), generator=c.gen, device=dev).to(torch.bfloat16)
    ys = all_gather_rows(y, [c.rows_of[r][0].numel() for r in range(R)])
    b0 = torch.randn((c.n, H), generator=c.gen, device=dev).to(torch.bfloat16)
    cx, cw, _ = buf.combine(y, handle, topk_weights=recv_w, bias=b0)
    want = expected_combine(me, R, ys, c.rows_of, c.n, H, (b0,), rounded=False)
    bound = expected_combine(me, R, ys, c.rows_of, c.n, H, (b0,), term=torch.abs, rounded=False)
    d = (cx.float() - want).abs()
    ok = bool((d <= bound * 2 ** -7 + 1e-6).all().item()) if d.numel() else True
    ck.check(f"combine with a bias{tag}: within bf16 rounding of the partial sums "
             f"(max diff {d.max().item() if d.numel() else 0:g})", ok)
    want_cw = torch.where(c.idx >= 0, c.w, torch.zeros((), device=dev))
    ck.check("combine: combined_topk_weights" + tag, torch.allclose(cw, want_cw, rtol=1e-6, atol=1e-6))
    yw = torch.zeros((W, H), device=dev, dtype=torch.bfloat16)
    yw[:cnt] = y
    ck.check("combine: graph-safe handle == eager" + tag,
             torch.equal(buf.combine(yw, wh, topk_weights=ww, bias=b0)[0], cx))


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
        experts = eptest.experts_for(world, E_HINT // 2)  # E_HINT = 2 * E, both multiples of the rank count
        buf = ep.Buffer(dist.group.WORLD, num_experts=2 * experts, hidden=H_HINT, max_tokens_per_rank=T_HINT,
                        max_topk=K_HINT, explicitly_destroy=True, **share_kwargs)
        ck.check("Buffer: created, rank and group size", buf.rank == rank and buf.group_size == world
                 and buf.info["num_ranks"] == world and buf.device == dev.index)
        ck.check("Buffer without ranks_per_node, one host: one node", buf.info["ranks_per_node"] == world,
                 buf.info["ranks_per_node"])
        c = Ctx()
        c.buf, c.R, c.rank, c.dev = buf, world, rank, dev
        c.E, c.H, c.K = experts, 1024, 6
        c.ns = [max(0, T_HINT - 37 * r) for r in range(world)]  # different token counts per rank (0 at 8 ranks)
        c.n, c.n_max = c.ns[rank], max(c.ns)
        c.gen = torch.Generator(device=c.dev)
        c.gen.manual_seed(seed * 1000003 + rank)
        c.x = torch.randn((c.n, c.H), generator=c.gen, device=c.dev).to(torch.bfloat16)
        c.idx, c.w = make_routing(c.gen, c.n, c.E, c.K, c.dev)
        c.xs, c.idxs, c.ws = all_gather_rows(c.x, c.ns), all_gather_rows(c.idx, c.ns), all_gather_rows(c.w, c.ns)
        c.rows_of = [expected_rows(r, world, c.E, c.idxs) for r in range(world)]
        run_checks(ck, c)
        torch.cuda.synchronize()
        buf.get_async_error()
        ck.check("no pending device error at the end", True)
        # The internode path: the same ranks as virtual nodes (2 ranks: 2 nodes of 1; 4: 2 of 2; 8: 2 of 4; odd
        # counts: nodes of 1 rank; none at 1 rank).
        dist.barrier()
        buf.destroy()
        buf = None
        # The internode path on virtual nodes, each Buffer made without ranks_per_node: each rank names the host of
        # its virtual node, and the Buffer finds the nodes as it finds real ones. First sized from the hints; then as
        # DeepEP's users size it, by num_nvl_bytes: a pool a third of the first one's heap, so that these calls (up
        # to T_HINT tokens a rank) run in rounds.
        rpn = eptest.virtual_ranks_per_node(world)
        pool = None
        for sizing in ("hints", "pool") if rpn is not None else ():
            if sizing == "pool":
                pool = buf.info["symmetric_heap_bytes"] // 3
                dist.barrier()
                buf.destroy()
                buf = None
            nbytes, hint = (pool, {}) if pool else (0, {"max_tokens_per_rank": T_HINT})
            real_host_id = ep.buffer.host_id
            ep.buffer.host_id = lambda: f"virtual-node-{rank // rpn}/boot"
            try:
                buf = ep.Buffer(dist.group.WORLD, nbytes, 0, num_experts=2 * experts, hidden=H_HINT, max_topk=K_HINT,
                                explicitly_destroy=True, **hint, **share_kwargs)
            finally:
                ep.buffer.host_id = real_host_id
            made = f"Buffer(group, num_nvl_bytes={pool})" if pool else "Buffer without ranks_per_node"
            ck.check(f"{made}, hosts of {rpn} consecutive ranks: nodes of {rpn}", buf.info["ranks_per_node"] == rpn,
                     buf.info["ranks_per_node"])
            c.buf = buf
            check_virtual_nodes(ck, c)
            torch.cuda.synchronize()
            buf.get_async_error()
            ck.check(f"no pending device error after the virtual-node checks ({sizing})", True)
    except Exception:
        ck.check("ran every check without an exception", False, traceback.format_exc())
    eptest.finish_rank(ck, buf)


def main():
    eptest.run_ranks(worker, TIMEOUT_S)


if __name__ == "__main__":
    main()
