"""The normal (high-throughput) path of `ep.Buffer`: get_dispatch_layout, dispatch, combine (DeepEP V1's).

`NormalPath` is a part of `Buffer` (a base class that holds these methods only): it uses the state that
Buffer.__init__ sets (`_lib`, `_group_ptr`, `_limits`, `_comm_stream`, `_handle_bytes`, `device`, `group_size`,
`num_nodes` and the shape hints) and Buffer's `_alive`, `get_dispatch_config` and `get_combine_config`.
Every call checks its arguments first (ep._checks), then runs on the comm stream (ep._streams).
"""

import ctypes

from . import _capi
from ._checks import config_sms, expert_count, int_arg, require_torch, tensor
from ._handles import DispatchHandle
from ._streams import comm_begin, comm_end


class NormalPath:
    """get_dispatch_layout, dispatch and combine of `ep.Buffer` (see the module's docstring)."""

    def _unpack_x(self, fn, x, num_tokens=None):
        """x as bf16 tensor or (fp8 tensor, fp32 scales). Returns (data, scales or None)."""
        torch = require_torch(fn)
        n = num_tokens
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(f"{fn}: x as a tuple must be (x_fp8 [num_tokens, hidden] torch.float8_e4m3fn, "
                                 f"scales [num_tokens, hidden / 128] torch.float32), got {len(x)} items")
            data, scales = x
            tensor(self.device, fn, "x[0]", data, torch.float8_e4m3fn, (n, None), "[num_tokens, hidden]")
            n, h = data.shape
            if h % 128 or h > self.hidden:
                raise ValueError(f"{fn}: x[0] has hidden {h}; FP8 dispatch needs a multiple of 128, <= the "
                                 f"Buffer's hidden hint ({self.hidden})")
            if not isinstance(scales, torch.Tensor):
                raise TypeError(f"{fn}: x[1] (scales) must be a torch.Tensor, got {type(scales).__name__}")
            if scales.dtype != torch.float32:
                raise TypeError(f"{fn}: x[1] (scales) must be torch.float32 [num_tokens, hidden / 128] = "
                                f"[{n}, {h // 128}], got {scales.dtype} (packed UE8M0 int32 scales are NOT YET "
                                "SUPPORTED)")
            if not scales.is_contiguous() and tuple(scales.shape) == (n, h // 128):
                scales = scales.contiguous()  # DeepEP accepts strided scales; ours copies them to rows first
            tensor(self.device, fn, "x[1] (scales)", scales, torch.float32, (n, h // 128),
                   f"[{n}, {h // 128}]", align16=False)
            return data, scales
        tensor(self.device, fn, "x", x, torch.bfloat16, (n, None), "[num_tokens, hidden]")
        h = x.shape[1]
        if h % 8 or h > self.hidden:
            raise ValueError(f"{fn}: x has hidden {h}; it must be a multiple of 8, <= the Buffer's hidden hint "
                             f"({self.hidden}; raise Buffer(hidden=...))")
        return x, None

    def _new_handle(self, fn, stream, num_tokens, num_topk, num_experts, hidden):
        torch = require_torch(fn)
        nbytes = self._handle_bytes
        raw = torch.empty(nbytes + 256, dtype=torch.uint8, device=self._device_str)
        off = (-raw.data_ptr()) % 256
        memory = raw[off:off + nbytes]
        h = ctypes.c_void_p()
        g = self._group_ptr
        _capi.check(self._lib.ep_handle_create_in(g, memory.data_ptr(), nbytes, ctypes.byref(h)), g)
        return DispatchHandle(self, raw, h.value, num_tokens, num_topk, num_experts, hidden, stream)

    # ---- layout ---------------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        """Count, from topk_idx ([num_tokens, num_topk] int64, -1 = none), the tokens each rank, node and expert
        receives. Returns (num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [num_nodes] int32 or None
        with one node, num_tokens_per_expert [num_experts] int32, is_token_in_rank [num_tokens, R] bool,
        EventOverlap). A token counts once per rank and expert. An expert id outside [-1, num_experts) raises
        EpError(EP_STATUS_DEVICE_ERROR) naming the token on the next call (DeepEP: undefined)."""
        fn = "get_dispatch_layout"
        g = self._alive(fn)
        torch = require_torch(fn)
        tensor(self.device, fn, "topk_idx", topk_idx, torch.int64, (None, None), "[num_tokens, num_topk]",
               align16=False)
        n, k = topk_idx.shape
        int_arg(fn, "topk_idx.shape[1] (num_topk)", k, 1, self._limits.max_topk)
        expert_count(fn, num_experts, self.group_size, self.num_experts)
        with comm_begin(fn, self.device, self._comm_stream, previous_event, async_finish,
                        allocate_on_comm_stream) as call:
            dev, R = self._device_str, self.group_size
            with torch.cuda.stream(call.alloc):
                per_rank = torch.empty(R, dtype=torch.int32, device=dev)
                per_node = torch.empty(self.num_nodes, dtype=torch.int32, device=dev) if self.num_nodes > 1 else None
                per_expert = torch.empty(num_experts, dtype=torch.int32, device=dev)
                in_rank = torch.empty((n, R), dtype=torch.bool, device=dev)
            a = _capi.LayoutArgs.init(topk_idx=topk_idx.data_ptr(), num_tokens=n, num_topk=k, num_experts=num_experts,
                                      num_tokens_per_rank=per_rank.data_ptr(),
                                      num_tokens_per_node=per_node.data_ptr() if per_node is not None else None,
                                      num_tokens_per_expert=per_expert.data_ptr(), is_token_in_rank=in_rank.data_ptr())
            _capi.check(self._lib.ep_get_dispatch_layout(g, ctypes.byref(a), call.comm.cuda_stream), g)
            event = comm_end(call, (topk_idx, per_rank, per_node, per_expert, in_rank))
        return per_rank, per_node, per_expert, in_rank, event

    # ---- dispatch -------------------------------------------------------------------------------------------
    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False, *, num_experts=None):
        """Send each token to the ranks that hold its experts. DeepEP V1's signature and results:

        returns (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)

        x: bf16 [num_tokens, hidden], or (x_fp8 [num_tokens, hidden] float8_e4m3fn, scales [num_tokens,
          hidden / 128] float32) -- then recv_x is the same kind of tuple.
        topk_idx: int64 [num_tokens, num_topk], -1 = none: the routing (a token goes to each rank holding one of
          its experts; num_tokens_per_rank / num_tokens_per_rdma_rank / is_token_in_rank are then unused).
          topk_weights: float32 [num_tokens, num_topk] or None.
        Without topk_idx (DeepEP's dispatch without top-k): is_token_in_rank (bool [num_tokens, R]) is the
          routing; recv_topk_idx and recv_topk_weights are None, and num_recv_tokens_per_expert_list sums the
          sources' num_tokens_per_expert (int32 [num_experts]; zeros without it). Every rank of a dispatch uses the
          same form.
        num_experts (ep only, keyword): the model's expert count (expert e lives on rank e // (num_experts / R));
          defaults to num_tokens_per_expert.numel() when that is given. One of the two is required: without them a
          dispatch raises ValueError rather than guess the mapping from the Buffer's hint.
        Received rows are ordered by source rank, then by token index on the source (deterministic).
        recv_topk_idx holds local expert ids (0 .. num_experts / R - 1), -1 for experts on other ranks;
        recv_topk_weights is 0.0 there. num_recv_tokens_per_expert_list: per local expert, rounded up to
        expert_alignment.

        Eager (num_worst_tokens == 0): waits on the host for the received count and returns exactly sized outputs.
        Graph-safe (num_worst_tokens > 0): no host wait, capturable in a CUDA graph; outputs have num_worst_tokens
          rows (a receive beyond it raises EP_STATUS_DEVICE_ERROR on the next call), recv_topk_idx rows past the
          count are -1, the list is [] and the counts are on the device: handle.num_recv_tokens_dev and
          handle.num_recv_tokens_per_expert.
        Cached (handle given, no topk_idx / topk_weights): moves new x along the handle's routing, no counting;
          returns (recv_x, None, None, None, None, event).
        The handle indexes as DeepEP's tuple where ep has the entry (DispatchHandle says which).
        config / set_num_sms: SMs used. Streams (previous_event, async_finish, allocate_on_comm_stream): as in
          DeepEP; see ep.buffer's docstring.
        """
        fn = "dispatch"
        g = self._alive(fn)
        torch = require_torch(fn)
        num_sms = config_sms(fn, config, lambda: self.get_dispatch_config(self.group_size), self._limits.max_sms)
        cached = handle is not None

        if cached:
            if not isinstance(handle, DispatchHandle):
                raise TypeError(f"{fn}: handle must be a DispatchHandle returned by dispatch, got "
                                f"{type(handle).__name__}")
            if topk_idx is not None or topk_weights is not None:
                raise ValueError(f"{fn}: a cached dispatch (handle given) takes no topk_idx / topk_weights; the "
                                 "routing is the handle's")
            handle._check(fn, self)
            data, scales = self._unpack_x(fn, x, num_tokens=handle.num_tokens)
            n, k = handle.num_tokens, handle.num_topk
        else:
            data, scales = self._unpack_x(fn, x)
            n = data.shape[0]
            if n > self.max_tokens_per_rank:  # a pooled Buffer runs rounds up to its (large) ceiling
                raise ValueError(f"{fn}: x has {n} tokens but the Buffer takes at most max_tokens_per_rank="
                                 f"{self.max_tokens_per_rank} a call; raise Buffer(max_tokens_per_rank=...)")
            if topk_idx is not None:  # the routing comes from topk_idx
                tensor(self.device, fn, "topk_idx", topk_idx, torch.int64, (n, None), f"[num_tokens={n}, num_topk]",
                       align16=False)
                k = topk_idx.shape[1]
                if not 1 <= k <= self.max_topk:
                    raise ValueError(f"{fn}: topk_idx has num_topk {k}; it must be in [1, max_topk={self.max_topk}]"
                                     " (raise Buffer(max_topk=...))")
            else:  # the routing comes from is_token_in_rank (DeepEP's dispatch without top-k)
                if is_token_in_rank is None:
                    raise ValueError(f"{fn}: a non-cached dispatch needs topk_idx or is_token_in_rank (bool "
                                     f"[num_tokens={n}, num_ranks={self.group_size}])")
                if topk_weights is not None:
                    raise ValueError(f"{fn}: topk_weights is given without topk_idx")
                tensor(self.device, fn, "is_token_in_rank", is_token_in_rank, torch.bool, (n, self.group_size),
                       f"[num_tokens={n}, num_ranks={self.group_size}]", align16=False)
                k = 0
            if topk_weights is not None:
                tensor(self.device, fn, "topk_weights", topk_weights, torch.float32, (n, k), f"[{n}, {k}]",
                       align16=False)
            if num_experts is None:
                if num_tokens_per_expert is None:
                    raise ValueError(f"{fn}: a non-cached dispatch needs num_tokens_per_expert (from "
                                     "get_dispatch_layout) or num_experts=..., to know how experts map to ranks")
                num_experts = num_tokens_per_expert.numel()
            expert_count(fn, num_experts, self.group_size, self.num_experts)
            if topk_idx is None and num_tokens_per_expert is not None:
                tensor(self.device, fn, "num_tokens_per_expert", num_tokens_per_expert, torch.int32,
                       (num_experts,), f"[num_experts={num_experts}]", align16=False)
            int_arg(fn, "expert_alignment", expert_alignment, 1, self._limits.max_expert_alignment)
            int_arg(fn, "num_worst_tokens", num_worst_tokens, 0)
            if num_worst_tokens == 0 and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{fn}: the eager form waits on the host for the received count and cannot be "
                                   "captured in a CUDA graph; pass num_worst_tokens > 0 (e.g. num_ranks * "
                                   "max tokens per rank)")
        with comm_begin(fn, self.device, self._comm_stream, previous_event, async_finish,
                        allocate_on_comm_stream) as call:
            stream = call.comm.cuda_stream
            dev, R = self._device_str, self.group_size
            count_dev = per_expert_dev = None

            if not cached:
                with torch.cuda.stream(call.alloc):
                    handle = self._new_handle(fn, call.alloc.cuda_stream, n, k, num_experts, data.shape[1])
                e_loc = num_experts // R
                pa = _capi.DispatchPrepareArgs.init(num_tokens=n, num_topk=k, num_experts=num_experts,
                                                    expert_alignment=expert_alignment)
                if topk_idx is not None:
                    pa.topk_idx = topk_idx.data_ptr()
                else:
                    pa.is_token_in_rank = is_token_in_rank.data_ptr()
                    if num_tokens_per_expert is not None:
                        pa.num_tokens_per_expert = num_tokens_per_expert.data_ptr()
                if num_worst_tokens == 0:
                    count = ctypes.c_int(-1)
                    per_expert = (ctypes.c_int * max(e_loc, 1))()
                    pa.num_recv_tokens = ctypes.addressof(count)
                    pa.num_recv_tokens_per_expert = ctypes.addressof(per_expert)
                else:
                    with torch.cuda.stream(call.alloc):
                        count_dev = torch.empty(1, dtype=torch.int32, device=dev)
                        per_expert_dev = torch.empty(e_loc, dtype=torch.int32, device=dev)
                    pa.num_recv_tokens_dev = count_dev.data_ptr()
                    pa.num_recv_tokens_per_expert_dev = per_expert_dev.data_ptr()
                hptr = handle._use(fn, self, stream)
                _capi.check(self._lib.ep_dispatch_prepare(g, hptr, ctypes.byref(pa), stream), g)
                if num_worst_tokens == 0:
                    handle.num_recv_tokens = count.value
                    handle.num_recv_rows = count.value
                    handle.num_recv_tokens_per_expert = list(per_expert)[:e_loc]
                else:
                    handle.is_graph_safe = True
                    handle.num_recv_rows = num_worst_tokens
                    handle.num_recv_tokens_dev = count_dev
                    handle.num_recv_tokens_per_expert = per_expert_dev
            else:
                hptr = handle._use(fn, self, stream)

            rows, h = handle.num_recv_rows, data.shape[1]
            recv_topk_idx = recv_topk_weights = recv_src_idx = None
            with torch.cuda.stream(call.alloc):
                recv_x = torch.empty((rows, h), dtype=data.dtype, device=dev)
                recv_scales = (torch.empty((rows, h // 128), dtype=torch.float32, device=dev) if scales is not None
                               else None)
                if not cached and topk_idx is not None:
                    recv_topk_idx = torch.empty((rows, k), dtype=torch.int64, device=dev)
                    if topk_weights is not None:
                        recv_topk_weights = torch.empty((rows, k), dtype=torch.float32, device=dev)
                if not cached:
                    recv_src_idx = torch.empty(rows, dtype=torch.int32, device=dev)
            da = _capi.DispatchArgs.init(
                x=data.data_ptr(), x_dtype=_capi.EP_FP8_E4M3 if scales is not None else _capi.EP_BF16, hidden=h,
                x_scales=scales.data_ptr() if scales is not None else None,
                topk_idx=topk_idx.data_ptr() if not cached and topk_idx is not None else None,
                topk_weights=topk_weights.data_ptr() if topk_weights is not None else None,
                recv_capacity=rows, recv_x=recv_x.data_ptr(),
                recv_x_scales=recv_scales.data_ptr() if recv_scales is not None else None,
                recv_topk_idx=recv_topk_idx.data_ptr() if recv_topk_idx is not None else None,
                recv_topk_weights=recv_topk_weights.data_ptr() if recv_topk_weights is not None else None,
                recv_src_idx=recv_src_idx.data_ptr() if recv_src_idx is not None else None, num_sms=num_sms)
            _capi.check(self._lib.ep_dispatch(g, hptr, ctypes.byref(da), stream), g)

            out_x = (recv_x, recv_scales) if scales is not None else recv_x
            event = comm_end(call, (data, scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
                                    recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, count_dev,
                                    per_expert_dev))
        if cached:
            return out_x, None, None, None, None, event
        handle.recv_src_idx = recv_src_idx
        handle._keep_routing(topk_idx, is_token_in_rank)
        counts = [] if handle.is_graph_safe else list(handle.num_recv_tokens_per_expert)
        return out_x, recv_topk_idx, recv_topk_weights, counts, handle, event

    # ---- combine --------------------------------------------------------------------------------------------
    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False,
                allocate_on_comm_stream=False):
        """Sum each token's expert outputs back on its source rank. DeepEP V1's signature and results:

        returns (combined_x [num_tokens, hidden] bf16, combined_topk_weights [num_tokens, num_topk] float32 or
        None, event)

        x: bf16 [handle.num_recv_rows, hidden], rows in the order dispatch returned them. The sum is unweighted
          (apply weights before combine), accumulated in fp32 in ascending rank order and rounded once to bf16:
          deterministic. topk_weights: float32 [handle.num_recv_rows, num_topk] or None; summed back the same way.
        bias: None, a bf16 [num_tokens, hidden] tensor, or a tuple of up to two (None entries allowed), added.
        Tokens sent nowhere get the biases (or zeros).
        """
        fn = "combine"
        g = self._alive(fn)
        torch = require_torch(fn)
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"{fn}: handle must be the DispatchHandle returned by dispatch, got "
                            f"{type(handle).__name__}")
        num_sms = config_sms(fn, config, lambda: self.get_combine_config(self.group_size), self._limits.max_sms)
        handle._check(fn, self)
        rows, n, k = handle.num_recv_rows, handle.num_tokens, handle.num_topk
        tensor(self.device, fn, "x", x, torch.bfloat16, (rows, None),
               f"[num_recv_rows={rows}, hidden] (the rows of this handle's dispatch: "
               + (f"num_worst_tokens={rows}" if handle.is_graph_safe else
                  f"{rows} received for num_experts={handle.num_experts}") + ")")
        h = x.shape[1]
        if h % 8 or h > self.hidden:
            raise ValueError(f"{fn}: x has hidden {h}; it must be a multiple of 8, <= the Buffer's hidden hint "
                             f"({self.hidden})")
        if topk_weights is not None:
            tensor(self.device, fn, "topk_weights", topk_weights, torch.float32, (rows, k), f"[{rows}, {k}]",
                   align16=False)
        if bias is None:
            biases = ()
        elif isinstance(bias, torch.Tensor):
            biases = (bias,)
        elif isinstance(bias, (tuple, list)) and len(bias) <= 2:
            biases = tuple(bias)
        else:
            raise TypeError(f"{fn}: bias must be None, a tensor, or a tuple of up to two tensors, got "
                            f"{type(bias).__name__}" + (f" of {len(bias)}" if isinstance(bias, (tuple, list)) else ""))
        biases = [b for b in biases if b is not None]
        for i, b in enumerate(biases):
            tensor(self.device, fn, f"bias[{i}]" if not isinstance(bias, torch.Tensor) else "bias", b,
                   torch.bfloat16, (n, h), f"[num_tokens={n}, hidden={h}]")
        with comm_begin(fn, self.device, self._comm_stream, previous_event, async_finish,
                        allocate_on_comm_stream) as call:
            stream = call.comm.cuda_stream
            hptr = handle._use(fn, self, stream)
            dev = self._device_str
            with torch.cuda.stream(call.alloc):
                out = torch.empty((n, h), dtype=torch.bfloat16, device=dev)
                out_w = torch.empty((n, k), dtype=torch.float32, device=dev) if topk_weights is not None else None
            ca = _capi.CombineArgs.init(
                x=x.data_ptr(), hidden=h, topk_weights=topk_weights.data_ptr() if topk_weights is not None else None,
                bias0=biases[0].data_ptr() if len(biases) > 0 else None,
                bias1=biases[1].data_ptr() if len(biases) > 1 else None, combined_x=out.data_ptr(),
                combined_topk_weights=out_w.data_ptr() if out_w is not None else None, num_sms=num_sms)
            _capi.check(self._lib.ep_combine(g, hptr, ctypes.byref(ca), stream), g)
            event = comm_end(call, (x, topk_weights, *biases, out, out_w))
        return out, out_w, event

