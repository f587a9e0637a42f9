"""The low-latency path of `ep.Buffer` (DeepEP V1's): low_latency_dispatch / low_latency_combine with their
receive hooks, the zero-copy combine buffer, clean_low_latency_buffer, and shrink mode's rank mask
(low_latency_update_mask_buffer / query / clean, over the group's mask: ep_group_mask_rank and the calls after it).

`LowLatencyPath` is a part of `Buffer` (a base class that holds these methods only): it uses the state that
Buffer.__init__ sets (`_lib`, `_ll_slots` (the two ep_ll_handle_t), `_views`, `device`, `group_size`,
`ll_max_tokens_per_rank` and the shape hints) and Buffer's `_alive` and `_stream`. The two-buffer turn-taking is
the library's (ep_ll_handle_get_state): this module asks it, and checks only what the library cannot see (dtype,
device, contiguity and shape of tensors, and which LowLatencyHandle object names which library handle).
"""

import ctypes
import sys

from . import _capi
from ._checks import expert_count, flag, int_arg, require_torch, tensor
from ._handles import LowLatencyHandle
from ._streams import current_stream_event


def _ll_bounds(buf):
    """The most experts and the largest hidden an LL call may pass: the Buffer's hints, or, with the LL buffer sized
    in bytes (ll_region_bytes), the library's limits (the library then refuses a shape its bytes do not hold)."""
    if buf.ll_region_bytes:
        return sys.maxsize, buf._limits.max_hidden
    return buf.num_experts, buf.hidden


def _wait_stats(buf, fn, name, stats):
    """The device address of a wait-cost stats tensor (int64 [num_ranks]), or None."""
    if stats is None:
        return None
    torch = require_torch(fn)
    tensor(buf.device, fn, name, stats, torch.int64, (buf.group_size,), f"[num_ranks={buf.group_size}]",
           align16=False)
    return stats.data_ptr()


class RecvHook:
    """The receive phase of an LL call made with return_recv_hook=True: calling it launches the phase (once) on
    the stream that was current at the call. Holds the call's tensors so that they outlive the phase.

    The hook counts as used only once the launch succeeded: one that raised (e.g. a busy group, a CUDA error) may
    be called again. A hook that is never called (dropped, or failing for good) leaves its receive phase pending;
    `Buffer.clean_low_latency_buffer()` on every rank abandons it and frees the LL path."""

    def __init__(self, what, run, keep):
        self._what = what
        self._run = run
        self._keep = keep

    def __call__(self):
        if self._run is None:
            raise RuntimeError(f"the receive hook of {self._what} was already called (it runs once)")
        self._run()
        self._run = self._keep = None

    def __repr__(self):
        return f"<receive hook of {self._what}{' (called)' if self._run is None else ''}>"


class LowLatencyPath:
    """The low-latency calls of `ep.Buffer` (see the module's docstring)."""

    def _ll_alive(self, fn):
        g = self._alive(fn)
        if not self._ll_slots:
            raise RuntimeError(f"{fn}: this Buffer has no low-latency buffer; create it with low_latency_mode=True "
                               "(and ll_max_tokens_per_rank=... >= num_max_dispatch_tokens_per_rank)")
        return g

    def _ll_handle(self, fn, handle, for_combine):
        """The ep_ll_handle_t of a LowLatencyHandle of this Buffer that the two-buffer rule still allows."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"{fn}: handle must be the LowLatencyHandle returned by low_latency_dispatch, got "
                            f"{type(handle).__name__}")
        if handle._buffer is not self:
            raise ValueError(f"{fn}: handle belongs to another Buffer")
        state = handle._state()
        if state is None or not state.is_current:
            raise RuntimeError(f"{fn}: stale handle: its buffer half was reused by a later low_latency_dispatch or "
                               "reset by clean_low_latency_buffer (two-buffer rule: combine a handle before the "
                               "dispatch after next)")
        if for_combine and state.dispatch_recv_pending:
            raise RuntimeError(f"{fn}: the handle's dispatch was made with return_recv_hook=True and its hook has "
                               "not been called yet; call the hook first")
        if for_combine and state.combine_recv_pending:
            raise RuntimeError(f"{fn}: the handle's previous combine was made with return_recv_hook=True and its "
                               "hook has not been called yet; call it first")
        return self._ll_slots[handle._slot]

    def _ll_next_slot(self):
        """Which of the two LL handles the next dispatch refills: the one holding the older dispatch (the first
        before any). The library hands the buffer halves out in turn, so the older result is the one that the
        two-buffer rule gives up first."""
        serials = [_capi.ll_handle_state(h).serial for h in self._ll_slots]
        return serials.index(min(serials))

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False, topk_weights=None):
        """Send each token straight to the experts it selects (decoding: up to a few hundred tokens per rank).
        DeepEP V1's signature and results:

        returns (recv_x, recv_count, handle, event, hook)

        x: bf16 [num_tokens, hidden], num_tokens <= num_max_dispatch_tokens_per_rank (T). topk_idx: int64
          [num_tokens, num_topk], -1 = none. T and num_experts must be the same on every rank; T <= the Buffer's
          ll_max_tokens_per_rank, num_experts <= its num_experts, hidden <= its hidden (a Buffer sized in bytes,
          ll_region_bytes: the shape must fit the bytes instead, EpError naming the bytes it needs otherwise).
        recv_x: with use_fp8, (float8_e4m3fn [E_loc, R * T, hidden], scales), the scales float32
          [E_loc, R * T, hidden / 128] (with use_ue8m0, which needs round_scale and hidden % 512 == 0: int32
          [E_loc, R * T, hidden / 512], four UE8M0 bytes each) as a column-major view (the transpose of a
          contiguous [E_loc, hidden / 128, R * T] tensor), exactly as DeepEP returns them. The cast, per 128
          channels: scale = max(amax, 1e-4) / 448 (rounded up to a power of two with round_scale),
          q = e4m3(x * (1 / scale)). Without use_fp8: bf16 [E_loc, R * T, hidden].
        recv_count: int32 [E_loc]; rows i < recv_count[e] of expert e are valid, ordered by source rank, then
          source token (deterministic). A token that lists an expert twice arrives once.
        handle: a LowLatencyHandle (src_info, layout_range, T, hidden, num_experts when indexed).
        cumulative_local_expert_recv_stats: int32 [E_loc] or None; recv_count is added to it (after the receive
          phase). dispatch_wait_recv_cost_stats: int64 [num_ranks] or None; the receive phase adds to entry s the
          GPU clock cycles (clock64) it waited for rank s's tokens (DeepEP's unit), a diagnosis of slow ranks.
        topk_weights (ep's addition): float32 [num_tokens, num_topk] or None. Given, the weights travel with the
          tokens, and the handle's combine may weight and sum on the experts' ranks
          (low_latency_combine(..., sum_on_expert_ranks=True)), which then needs them on every rank with tokens.
        async_finish: event is an EventOverlap holding an event recorded after the call (the work is on the
          current stream either way). return_recv_hook: only the send phase is launched; `hook()` launches the
          receive phase on the stream that was current here; recv_x / recv_count are valid after it. The two
          are exclusive. Without the hook, hook is None.

        Two-buffer rule (as DeepEP): the LL buffer has two halves, taken in turn by each dispatch, and the
        Buffer's two LL handles likewise. At most two LL results may be alive: combine a handle before the
        dispatch after next (a stale handle raises RuntimeError; its src_info / layout_range views then show the
        newer dispatch). recv_x / recv_count / the scales are fresh tensors per call and are not reused.
        Capturable in a CUDA graph (with the combine and the experts between them); the hook may be called
        inside the capture too. Graph hazard: the host-side turn-taking runs at capture, not at replay; a graph
        always reuses the buffer half and the LL handle (routing memory) it captured. Do not keep an eager LL
        result (handle, src_info view, zero-copy buffer) alive across a replay, and replay only graphs that
        hold a complete dispatch + combine; stream-ordered eager calls between replays work (the GPU test makes
        them after each replay).
        """
        fn = "low_latency_dispatch"
        g = self._ll_alive(fn)
        torch = require_torch(fn)
        use_fp8 = flag(fn, "use_fp8", use_fp8)
        round_scale = flag(fn, "round_scale", round_scale)
        use_ue8m0 = flag(fn, "use_ue8m0", use_ue8m0)
        async_finish = flag(fn, "async_finish", async_finish)
        return_recv_hook = flag(fn, "return_recv_hook", return_recv_hook)
        if async_finish and return_recv_hook:
            raise ValueError(f"{fn}: async_finish and return_recv_hook are exclusive (as in DeepEP)")
        T = int_arg(fn, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1,
                    self.ll_max_tokens_per_rank, "raise Buffer(ll_max_tokens_per_rank=...)")
        experts_bound, hidden_bound = _ll_bounds(self)
        expert_count(fn, num_experts, self.group_size, experts_bound)
        tensor(self.device, fn, "x", x, torch.bfloat16, (None, None), f"[num_tokens <= {T}, hidden]")
        n, h = x.shape
        if n > T:
            raise ValueError(f"{fn}: x has {n} tokens, more than num_max_dispatch_tokens_per_rank={T}")
        if use_fp8 and use_ue8m0 and not round_scale:
            raise ValueError(f"{fn}: use_ue8m0=True needs round_scale=True (UE8M0 scales are powers of two)")
        mult = (512 if use_ue8m0 else 128) if use_fp8 else 8
        if h % mult or h > hidden_bound:
            what = "use_ue8m0" if use_fp8 and use_ue8m0 else "FP8" if use_fp8 else "BF16"
            raise ValueError(f"{fn}: x has hidden {h}; with {what} it must be a multiple of {mult}, <= the Buffer's "
                             f"hidden bound ({hidden_bound})")
        tensor(self.device, fn, "topk_idx", topk_idx, torch.int64, (n, None), f"[num_tokens={n}, num_topk]",
               align16=False)
        k = topk_idx.shape[1]
        if topk_weights is not None:
            tensor(self.device, fn, "topk_weights", topk_weights, torch.float32, (n, k),
                   f"[num_tokens={n}, num_topk={k}]", align16=False)
        if not 1 <= k <= self.max_topk:
            raise ValueError(f"{fn}: topk_idx has num_topk {k}; it must be in [1, max_topk={self.max_topk}] "
                             "(raise Buffer(max_topk=...))")
        R = self.group_size
        e_loc = num_experts // R
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            tensor(self.device, fn, "cumulative_local_expert_recv_stats", stats, torch.int32, (e_loc,),
                   f"[num_local_experts={e_loc}]", align16=False)
        wait_stats = _wait_stats(self, fn, "dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats)

        dev, RT = self._device_str, R * T
        slot = self._ll_next_slot()
        hptr = self._ll_slots[slot]
        stream = self._stream()
        tstream = torch.cuda.current_stream(self.device)
        recv_x = torch.empty((e_loc, RT, h), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=dev)
        scales_store = scales = None
        if use_fp8:
            if use_ue8m0:
                scales_store = torch.empty((e_loc, h // 512, RT), dtype=torch.int32, device=dev)
            else:
                scales_store = torch.empty((e_loc, h // 128, RT), dtype=torch.float32, device=dev)
            scales = scales_store.transpose(1, 2)
        recv_count = torch.empty(e_loc, dtype=torch.int32, device=dev)
        a = _capi.LLDispatchArgs.init(
            x=x.data_ptr() if n else None, num_tokens=n, hidden=h, topk_idx=topk_idx.data_ptr() if n else None,
            num_topk=k, num_experts=num_experts, max_tokens_per_rank=T,
            recv_dtype=_capi.EP_FP8_E4M3 if use_fp8 else _capi.EP_BF16, round_scale=int(use_fp8 and round_scale),
            use_ue8m0=int(use_fp8 and use_ue8m0), recv_x=recv_x.data_ptr(),
            recv_x_scales=scales_store.data_ptr() if use_fp8 else None, recv_count=recv_count.data_ptr(),
            return_after_send=int(return_recv_hook),
            topk_weights=topk_weights.data_ptr() if topk_weights is not None and n else None,
            wait_recv_cost_stats=wait_stats)
        _capi.check(self._lib.ep_ll_dispatch(g, hptr, ctypes.byref(a), stream), g)
        # The send is issued: the library's handle holds this dispatch now, named by its serial.
        handle = LowLatencyHandle(self, slot, _capi.ll_handle_state(hptr).serial, n, k, num_experts, h, T, use_fp8)

        def add_stats():
            if stats is not None:
                with torch.cuda.stream(tstream):
                    stats.add_(recv_count)

        hook = None
        if return_recv_hook:
            def recv():
                gg = self._alive(fn + " hook")
                _capi.check(self._lib.ep_ll_dispatch_recv(gg, hptr, stream), gg)
                add_stats()
            hook = RecvHook(fn, recv, (x, topk_idx, topk_weights, recv_x, scales_store, recv_count, stats,
                                       dispatch_wait_recv_cost_stats))
        else:
            add_stats()
        event = current_stream_event(self.device, async_finish,
                                     (x, topk_idx, topk_weights, recv_x, scales_store, recv_count))
        return ((recv_x, scales) if use_fp8 else recv_x), recv_count, handle, event, hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None,
                            sum_on_expert_ranks=False, renormalize_masked=False):
        """Send the experts' outputs back and sum each token's top-k outputs, weighted, on its source rank.
        DeepEP V1's signature and results:

        returns (combined_x bf16 [num_tokens, hidden], event, hook)

        x: bf16 [E_loc, R * T, hidden], the experts' outputs in the layout low_latency_dispatch returned (only the
          first recv_count[e] rows of expert e are read). topk_idx int64 / topk_weights float32
          [num_tokens, num_topk]: this rank's routing given to the dispatch. ep takes the routing from the handle:
          topk_idx is checked for dtype and shape only. combined_x[t] = bf16(sum over k in top-k order, skipping
          -1, of w[t][k] * y), accumulated in fp32 (deterministic); a token with no expert gets zeros.
        zero_copy: the outputs were written into get_next_low_latency_combine_buffer(handle); x is not read (it
          may be that buffer, or None). out: a bf16 [num_tokens, hidden] tensor to write into, or None.
        async_finish / return_recv_hook: as in low_latency_dispatch (exclusive); combined_x is valid after the
          hook. combine_wait_recv_cost_stats: int64 [num_ranks] or None, as dispatch_wait_recv_cost_stats (the
          wait for each rank's rows). use_logfmt: the rows travel as LogFMT-10 (DeepEP's byte count, hidden * 10 / 8
          + hidden / 32 a row; each value within 2^(step / 2) - 1 of its bf16, a step at most 32 / 510 octaves of its
          128-channel group); not with zero_copy or sum_on_expert_ranks (EpError), as in DeepEP.
        sum_on_expert_ranks (ep's addition; the same on every rank): each rank weights its experts' rows of a token
          with the weights given to the dispatch (low_latency_dispatch(..., topk_weights=...)) and sums them in
          fp32, and one bf16 row per (token, rank) comes back instead of one per (token, expert): fewer bytes when
          a token has several experts on one rank. combined_x[t] = bf16(sum over the token's ranks, in the order of
          their first top-k slot, of each rank's bf16 sum); a rank's sum adds its experts in the order of their
          first slot, each with the sum of its slots' weights. topk_weights must be None then.
        renormalize_masked (ep's addition; needs enable_shrink=True): a token that lost top-k entries to masked
          ranks has its kept weights scaled by (sum of its valid entries' weights) / (sum of its kept entries'
          weights); False (DeepEP's semantics) sums the kept entries as they are. Not with sum_on_expert_ranks.
        The handle must be current (two-buffer rule) and its dispatch's receive hook called.
        """
        fn = "low_latency_combine"
        g = self._ll_alive(fn)
        torch = require_torch(fn)
        use_logfmt = flag(fn, "use_logfmt", use_logfmt)
        zero_copy = flag(fn, "zero_copy", zero_copy)
        async_finish = flag(fn, "async_finish", async_finish)
        return_recv_hook = flag(fn, "return_recv_hook", return_recv_hook)
        if async_finish and return_recv_hook:
            raise ValueError(f"{fn}: async_finish and return_recv_hook are exclusive (as in DeepEP)")
        hptr = self._ll_handle(fn, handle, for_combine=True)
        R = self.group_size
        e_loc, RT, h = handle.num_local_experts, R * handle.num_max_dispatch_tokens_per_rank, handle.hidden
        n, k = handle.num_tokens, handle.num_topk
        xdesc = f"[E_loc={e_loc}, R*T={RT}, hidden={h}] (the layout of the handle's dispatch)"
        if zero_copy:
            if x is not None:
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"{fn}: x must be a torch.Tensor or None with zero_copy, got {type(x).__name__}")
                if x.dtype != torch.bfloat16 or tuple(x.shape) != (e_loc, RT, h):
                    raise ValueError(f"{fn}: x must be torch.bfloat16 {xdesc} (or None with zero_copy), got "
                                     f"{x.dtype} {list(x.shape)}")
        else:
            tensor(self.device, fn, "x", x, torch.bfloat16, (e_loc, RT, h), xdesc)
        tensor(self.device, fn, "topk_idx", topk_idx, torch.int64, (n, k),
               f"[num_tokens={n}, num_topk={k}] (the handle's dispatch)", align16=False)
        sum_on_expert_ranks = flag(fn, "sum_on_expert_ranks", sum_on_expert_ranks)
        renormalize_masked = flag(fn, "renormalize_masked", renormalize_masked)
        if sum_on_expert_ranks:
            if topk_weights is not None:
                raise ValueError(f"{fn}: sum_on_expert_ranks=True uses the weights given to the dispatch; pass "
                                 "topk_weights=None")
        else:
            tensor(self.device, fn, "topk_weights", topk_weights, torch.float32, (n, k),
                   f"[num_tokens={n}, num_topk={k}]", align16=False)
        if out is None:
            out = torch.empty((n, h), dtype=torch.bfloat16, device=self._device_str)
        else:
            tensor(self.device, fn, "out", out, torch.bfloat16, (n, h), f"[num_tokens={n}, hidden={h}]")
        wait_stats = _wait_stats(self, fn, "combine_wait_recv_cost_stats", combine_wait_recv_cost_stats)
        stream = self._stream()
        a = _capi.LLCombineArgs.init(
            x=None if zero_copy else x.data_ptr(),
            topk_weights=topk_weights.data_ptr() if n and topk_weights is not None else None,
            out=out.data_ptr() if n else None, zero_copy=int(zero_copy), return_after_send=int(return_recv_hook),
            sum_on_expert_ranks=int(sum_on_expert_ranks), wait_recv_cost_stats=wait_stats, use_logfmt=int(use_logfmt),
            renormalize_masked=int(renormalize_masked))
        _capi.check(self._lib.ep_ll_combine(g, hptr, ctypes.byref(a), stream), g)
        hook = None
        if return_recv_hook:
            def recv():
                gg = self._alive(fn + " hook")
                _capi.check(self._lib.ep_ll_combine_recv(gg, hptr, stream), gg)
            hook = RecvHook(fn, recv, (x, topk_idx, topk_weights, out, combine_wait_recv_cost_stats))
        event = current_stream_event(self.device, async_finish, (x, topk_idx, topk_weights, out))
        return out, event, hook

    def get_next_low_latency_combine_buffer(self, handle):
        """The zero-copy combine buffer of the handle: a bf16 [E_loc, R * T, hidden] view of symmetric memory
        (contiguous; DeepEP's is strided). Write the experts' outputs into it, then call
        low_latency_combine(..., zero_copy=True). Valid from the handle's dispatch until its combine; the dispatch
        after next reuses it (and a non-zero-copy combine of the handle may stage its rows there for peers
        reached over NVSHMEM).
        The tensor does not own the memory: it dangles once the Buffer is destroyed.
        The view of NVSHMEM memory is made with torch.as_tensor over __cuda_array_interface__, which needs NumPy
        installed and relies on PyTorch accepting a pointer into the NVSHMEM heap (PyTorch 2.11 does; see
        DeviceViews); a copy instead of a view raises RuntimeError rather than silently breaking zero-copy."""
        fn = "get_next_low_latency_combine_buffer"
        g = self._ll_alive(fn)
        hptr = self._ll_handle(fn, handle, for_combine=False)
        p = ctypes.c_void_p()
        _capi.check(self._lib.ep_ll_get_combine_buffer(g, hptr, ctypes.byref(p)), g)
        shape = (handle.num_local_experts, self.group_size * handle.num_max_dispatch_tokens_per_rank, handle.hidden)
        return self._views.get(p.value, shape, require_torch(fn).bfloat16)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """Zero the LL buffer's signals in both halves and restart its turn-taking (collective; synchronises the
        device and waits for every rank; not capturable). A receive hook still outstanding (dropped, or failed)
        is abandoned: its phase never runs, and calling it after the clean raises. Every LowLatencyHandle made
        before becomes stale. The arguments are checked against the Buffer's hints (ep's
        buffer serves every shape up to them, so a clean is not needed to change shape)."""
        fn = "clean_low_latency_buffer"
        g = self._ll_alive(fn)
        int_arg(fn, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1,
                self.ll_max_tokens_per_rank, "raise Buffer(ll_max_tokens_per_rank=...)")
        experts_bound, hidden_bound = _ll_bounds(self)
        int_arg(fn, "hidden", hidden, 1, hidden_bound, "the Buffer's hidden hint")
        expert_count(fn, num_experts, self.group_size, experts_bound)
        if require_torch(fn).cuda.is_current_stream_capturing():
            raise RuntimeError(f"{fn}: synchronises the device and all ranks, so it cannot be captured in a CUDA "
                               "graph")
        _capi.check(self._lib.ep_ll_clean(g, self._stream()), g)

    # ---- shrink mode (Buffer(enable_shrink=True)): the group's rank mask, this rank's view ----------------------
    def low_latency_update_mask_buffer(self, rank_to_mask, mask=False):
        """Mask (mask=True) or unmask (False) rank `rank_to_mask` on this rank, in the current stream's order: a
        masked rank is neither sent to nor waited for by the low-latency calls, and its experts' top-k entries are
        dropped. Masking a healthy rank means every rank masks it, itself included, before the same call. An unmask
        takes effect at the next clean_low_latency_buffer, which every rank must call before its next
        low_latency_dispatch (EpError otherwise). Needs enable_shrink=True (EpError otherwise).

        The mask is the group's: the normal path (dispatch, combine; on several nodes with the rail-peer rule,
        docs/faults.md) honours it the same way, and after an unmask, once the Buffer has used that path, raises
        EpError (a new Buffer takes the rank back)."""
        fn = "low_latency_update_mask_buffer"
        g = self._alive(fn)
        int_arg(fn, "rank_to_mask", rank_to_mask, 0, self.group_size - 1, "the group size - 1")
        mask = flag(fn, "mask", mask)
        _capi.check(self._lib.ep_group_mask_rank(g, rank_to_mask, int(mask), self._stream()), g)

    def low_latency_query_mask_buffer(self, mask_status):
        """Copy this rank's mask into `mask_status` (torch.int32 [num_ranks] on the Buffer's device; 1 = masked), in
        the current stream's order (capturable). Ranks whose low-latency or one-node normal-path waits ran out of
        timeout_seconds are masked by the calls themselves. Needs enable_shrink=True (EpError otherwise)."""
        fn = "low_latency_query_mask_buffer"
        g = self._alive(fn)
        torch = require_torch(fn)
        tensor(self.device, fn, "mask_status", mask_status, torch.int32, (self.group_size,),
               f"[num_ranks={self.group_size}]", align16=False)
        _capi.check(self._lib.ep_group_get_rank_mask(g, mask_status.data_ptr(), self._stream()), g)

    def low_latency_clean_mask_buffer(self):
        """Unmask every rank, in the current stream's order; then clean_low_latency_buffer on every rank, as after
        an unmask. Needs enable_shrink=True (EpError otherwise)."""
        fn = "low_latency_clean_mask_buffer"
        g = self._alive(fn)
        _capi.check(self._lib.ep_group_clear_rank_mask(g, self._stream()), g)
