"""The handles that dispatches return, and tensor views of the library-owned memory behind them.

`DispatchHandle` (normal path) wraps an `ep_handle_t` whose device memory is a torch tensor it owns, and indexes as
much of DeepEP's handle tuple as ep can produce.
`LowLatencyHandle` (low-latency path) names one of the Buffer's two `ep_ll_handle_t`; where it stands in the
two-buffer turn-taking is the library's to say (`ep_ll_handle_get_state`): this object keeps only the serial of the
dispatch that made it, which tells whether the library's handle has been refilled since.
`DeviceViews` makes (and caches) tensors over library-owned device memory: the LL routing and the zero-copy buffer.
"""

import ctypes

from . import _capi
from ._checks import require_torch


class DispatchHandle:
    """The routing of one non-cached `Buffer.dispatch`, for `combine` and cached dispatches (DeepEP's `handle`).

    Wraps an `ep_handle_t` whose device memory is a torch uint8 CUDA tensor held by this object, so making and
    dropping handles never synchronises the device. Keep it alive as long as a call or a captured CUDA graph that
    uses it may run.

    Attributes (read-only by convention):
      num_tokens, num_topk, num_experts, hidden -- of the dispatch that made it
      num_recv_rows         -- rows of its outputs: the received count (eager) or num_worst_tokens (graph-safe)
      num_recv_tokens       -- rows this rank received, an int; None in the graph-safe form (count on device)
      is_graph_safe         -- made with num_worst_tokens > 0
      num_recv_tokens_dev   -- int32 [1] CUDA tensor of the received count (graph-safe form), else None
      num_recv_tokens_per_expert -- list (eager) or int32 [num_local_experts] CUDA tensor (graph-safe)
      recv_src_idx          -- int32 [num_recv_rows] CUDA tensor: each received row's token index on its source
                               rank (-1 past the count)

    Indexing it (`handle[i]`, `len(handle)`) gives the entries of DeepEP's handle tuple that ep can produce, each
    made on first access only: a handle that is never indexed costs nothing more. The tuple is DeepEP's
    intranode one on a one-node Buffer, its internode one otherwise (see DEEPEP_ENTRIES):
      recv_src_idx      the attribute above
      is_token_in_rank  bool [num_tokens, R]: the one given to dispatch, else made from the dispatch's topk_idx
                        (which the handle keeps referenced for it: do not modify it in place while you may ask)
      rank_prefix_matrix        int32 [R, R] (one node): [s][d] = rows rank d receives from ranks 0..s
      recv_gbl_rank_prefix_sum  int32 [R]: [s] = rows this rank receives from ranks 0..s
    The two prefix entries are computed on the device by ep_handle_get_rank_prefix, on the current stream (which
    must be ordered after the dispatch, as DeepEP's event.current_stream_wait() does), once, then kept.
    DeepEP's per-channel state (channel prefix matrices, send heads, source metadata) raises NotImplementedError:
    ep moves tokens without DeepEP's channels and has no such state.
    """

    # DeepEP V1's handle tuples, entry by entry: one node (intranode) and several nodes (internode).
    DEEPEP_ENTRIES = {
        "intranode": ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx",
                      "is_token_in_rank", "send_head"),
        "internode": ("is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix",
                      "recv_rdma_channel_prefix_matrix", "recv_rdma_rank_prefix_sum",
                      "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum", "recv_src_meta",
                      "send_rdma_head", "send_nvl_head"),
    }
    # Entries made by ep_handle_get_rank_prefix.
    _RANK_PREFIX = ("rank_prefix_matrix", "recv_gbl_rank_prefix_sum")

    def __init__(self, buffer, memory, ptr, num_tokens, num_topk, num_experts, hidden, stream):
        self._buffer = buffer
        self._memory = memory
        self._ptr = ptr
        self._stream = stream
        self.num_tokens = num_tokens
        self.num_topk = num_topk
        self.num_experts = num_experts
        self.hidden = hidden
        self.num_recv_rows = 0
        self.num_recv_tokens = None
        self.is_graph_safe = False
        self.num_recv_tokens_dev = None
        self.num_recv_tokens_per_expert = None
        self.recv_src_idx = None
        self._topk_idx = None           # of the dispatch, for is_token_in_rank on first access
        self._is_token_in_rank = None   # given to the dispatch, or made on first access
        self._rank_prefix = {}          # _RANK_PREFIX entries made so far

    def _keep_routing(self, topk_idx, is_token_in_rank):
        """Keep what the DeepEP view's is_token_in_rank is made from (references only: no work, no copy): the
        caller's is_token_in_rank when it has DeepEP's form, else the dispatch's topk_idx."""
        torch = require_torch("dispatch")
        if (isinstance(is_token_in_rank, torch.Tensor) and is_token_in_rank.dtype == torch.bool
                and tuple(is_token_in_rank.shape) == (self.num_tokens, self._buffer.group_size)):
            self._is_token_in_rank = is_token_in_rank
        else:
            self._topk_idx = topk_idx

    def _layout_name(self):
        return "intranode" if self._buffer.num_nodes == 1 else "internode"

    def __len__(self):
        return len(self.DEEPEP_ENTRIES[self._layout_name()])

    def __getitem__(self, index):
        names = self.DEEPEP_ENTRIES[self._layout_name()]
        if isinstance(index, slice):
            return tuple(self._deepep_entry(name) for name in names[index])
        return self._deepep_entry(names[index])

    def _deepep_entry(self, name):
        where = f"DispatchHandle[{self.DEEPEP_ENTRIES[self._layout_name()].index(name)}] ({name})"
        if name == "recv_src_idx":
            return self.recv_src_idx
        if name == "is_token_in_rank":
            if self._is_token_in_rank is None:
                self._is_token_in_rank = self._make_is_token_in_rank(where)
                self._topk_idx = None
            return self._is_token_in_rank
        if name in self._RANK_PREFIX:
            if name not in self._rank_prefix:
                self._rank_prefix[name] = self._make_rank_prefix(where, name)
            return self._rank_prefix[name]
        raise NotImplementedError(f"{where} has no counterpart in ep: it is DeepEP's per-channel transfer state, "
                                  "and ep does not move tokens in DeepEP's channels")

    def _make_rank_prefix(self, where, name):
        if self._ptr is None:
            raise ValueError(f"{where}: handle was destroyed")
        torch = require_torch(where)
        b, R = self._buffer, self._buffer.group_size
        b._alive(where)
        shape = (R, R) if name == "rank_prefix_matrix" else (R,)
        out = torch.empty(shape, dtype=torch.int32, device=self._memory.device)
        matrix, prefix = (out, None) if name == "rank_prefix_matrix" else (None, out)
        stream = torch.cuda.current_stream(self._memory.device)
        ptr = self._use(where, b, stream.cuda_stream)
        _capi.check(b._lib.ep_handle_get_rank_prefix(ptr, matrix.data_ptr() if matrix is not None else None,
                                                     prefix.data_ptr() if prefix is not None else None,
                                                     stream.cuda_stream), b._group_ptr)
        return out

    def _make_is_token_in_rank(self, where):
        if self._topk_idx is None:
            raise ValueError(f"{where}: this handle has no routing (it was not made by a dispatch)")
        torch = require_torch(where)
        R = self._buffer.group_size
        topk = self._topk_idx
        ranks = torch.arange(R, device=topk.device, dtype=topk.dtype)
        owner = torch.where(topk >= 0, topk // (self.num_experts // R), -1)  # -1 (no expert) goes to no rank
        return (owner.unsqueeze(-1) == ranks).any(dim=1)

    def _check(self, fn, buffer):
        if self._ptr is None:
            raise ValueError(f"{fn}: handle was destroyed")
        if self._buffer is not buffer:
            raise ValueError(f"{fn}: handle belongs to another Buffer")

    def _use(self, fn, buffer, stream):
        self._check(fn, buffer)
        if stream != self._stream:  # memory allocated on another stream: keep the allocator from reusing it early
            torch = require_torch(fn)
            self._memory.record_stream(torch.cuda.ExternalStream(stream, device=self._memory.device))
            self._stream = stream
        return self._ptr

    def destroy(self):
        """Free the host struct now (the device memory goes with this object). Later use raises ValueError."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _capi.load().ep_handle_destroy(ptr)

    def __del__(self):
        try:
            self.destroy()
        except Exception:
            pass

    def __repr__(self):
        count = self.num_recv_tokens if not self.is_graph_safe else f"<device>, capacity {self.num_recv_rows}"
        return (f"DispatchHandle(num_tokens={self.num_tokens}, num_topk={self.num_topk}, num_experts="
                f"{self.num_experts}, num_recv_tokens={count})")


class _DeviceArray:
    """A CUDA array interface over library-owned device memory, for torch.as_tensor (no copy, no stream sync)."""

    def __init__(self, ptr, shape, typestr):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False),
                                         "strides": None, "version": 3}


class DeviceViews:
    """Tensors over library-owned device memory of one CUDA device (no copy), cached per (pointer, shape, dtype).

    A view is made by torch.as_tensor over a __cuda_array_interface__, which PyTorch implements with NumPy's C API
    (it raises "Numpy is not available" without numpy installed) and, in some versions, by asking
    cudaPointerGetAttributes for the pointer's device. PyTorch 2.11 accepts pointers into NVSHMEM symmetric memory
    (tests/python/test_low_latency_gpu.py compares the zero-copy combine with the copying one, and src_info with
    the routing). A copy instead of a view is detected and raises. A numpy-free alternative is a DLPack capsule
    built with ctypes and passed to torch.from_dlpack."""

    def __init__(self, device):
        self._device = f"cuda:{device}"
        self._views = {}

    def clear(self):
        """Forget every view (the memory is about to be freed)."""
        self._views = {}

    def get(self, ptr, shape, dtype):
        """A tensor of `dtype` (int32, int64 or bfloat16) and `shape` over the memory at device pointer `ptr`."""
        torch = require_torch("ep")
        key = (ptr, tuple(shape), dtype)
        t = self._views.get(key)
        if t is None:
            raw_dtype, typestr = {torch.int32: (torch.int32, "<i4"), torch.int64: (torch.int64, "<i8"),
                                  torch.bfloat16: (torch.int16, "<i2")}[dtype]
            try:
                t = torch.as_tensor(_DeviceArray(ptr, shape, typestr), device=self._device)
            except RuntimeError as e:
                if "umpy" not in str(e):
                    raise
                raise RuntimeError(
                    f"ep: wrapping library-owned device memory as a tensor (LowLatencyHandle.src_info / "
                    f"layout_range, get_next_low_latency_combine_buffer) uses torch.as_tensor over "
                    f"__cuda_array_interface__, which needs NumPy in PyTorch: `pip install numpy` ({e})") from e
            if t.dtype != raw_dtype or t.data_ptr() != ptr:
                raise RuntimeError(f"ep: wrapping device memory {ptr:#x} as a tensor gave {t.dtype} at "
                                   f"{t.data_ptr():#x}")
            if dtype != raw_dtype:
                t = t.view(dtype)
            self._views[key] = t
        return t


class LowLatencyHandle:
    """The routing of one `Buffer.low_latency_dispatch`, for its `low_latency_combine` (DeepEP's LL `handle`).

    Indexing or unpacking it gives DeepEP's tuple: (src_info, layout_range, num_max_dispatch_tokens_per_rank,
    hidden, num_experts).
      src_info      int32 [E_loc, R * T]: the source token index of each received row
      layout_range  int64 [E_loc, R]: (first row << 32) | rows, per (local expert, source rank)
    Both are views of memory the library owns (one of the Buffer's two LL handles; made with torch.as_tensor
    over __cuda_array_interface__, which needs NumPy installed), not copies: they are valid
    from the dispatch's receive phase until the dispatch after next takes the same memory (DeepEP's rule: at most
    two LL results alive), and while the Buffer lives. `.clone()` them to keep them longer.

    Attributes: num_tokens, num_topk, num_experts, hidden, num_max_dispatch_tokens_per_rank, use_fp8 (of the
    dispatch); `is_current()` (ep only) says whether the two-buffer rule still lets its combine run.
    """

    def __init__(self, buffer, slot, serial, num_tokens, num_topk, num_experts, hidden, max_tokens, use_fp8):
        self._buffer = buffer
        self._slot = slot        # which of the Buffer's two ep_ll_handle_t
        self._serial = serial    # the library's serial of the dispatch that made this object
        self.num_tokens = num_tokens
        self.num_topk = num_topk
        self.num_experts = num_experts
        self.hidden = hidden
        self.num_max_dispatch_tokens_per_rank = max_tokens
        self.use_fp8 = use_fp8

    @property
    def num_local_experts(self):
        return self.num_experts // self._buffer.group_size

    def _state(self):
        """The library's state of this dispatch's handle (an _capi.LLHandleState), or None once the handle holds
        something else: the Buffer was destroyed, or a later dispatch refilled the handle."""
        b = self._buffer
        if b._group_ptr is None:
            return None
        state = _capi.ll_handle_state(b._ll_slots[self._slot])
        return state if state.serial == self._serial else None

    def is_current(self):
        """True while the Buffer lives and no later dispatch (or clean_low_latency_buffer) has taken this handle's
        memory or its buffer half: the library's two-buffer rule still lets its combine run."""
        state = self._state()
        return state is not None and bool(state.is_current)

    def _routing(self, which):
        b = self._buffer
        if not self.is_current():
            raise RuntimeError(f"LowLatencyHandle.{which}: stale handle: a later low_latency_dispatch (or "
                               "clean_low_latency_buffer) has reused its memory (two-buffer rule: at most two LL "
                               "results alive)")
        src, rng = ctypes.c_void_p(), ctypes.c_void_p()
        _capi.check(b._lib.ep_ll_get_routing(b._ll_slots[self._slot], ctypes.byref(src), ctypes.byref(rng)),
                    b._group_ptr)
        torch = require_torch(f"LowLatencyHandle.{which}")
        e_loc, R = self.num_local_experts, b.group_size
        if which == "src_info":
            return b._views.get(src.value, (e_loc, R * self.num_max_dispatch_tokens_per_rank), torch.int32)
        return b._views.get(rng.value, (e_loc, R), torch.int64)

    @property
    def src_info(self):
        return self._routing("src_info")

    @property
    def layout_range(self):
        return self._routing("layout_range")

    def _astuple(self):
        return (self.src_info, self.layout_range, self.num_max_dispatch_tokens_per_rank, self.hidden,
                self.num_experts)

    def __getitem__(self, i):
        return self._astuple()[i]

    def __len__(self):
        return 5

    def __iter__(self):
        return iter(self._astuple())

    def __repr__(self):
        return (f"LowLatencyHandle(num_tokens={self.num_tokens}, num_topk={self.num_topk}, num_experts="
                f"{self.num_experts}, hidden={self.hidden}, T={self.num_max_dispatch_tokens_per_rank}, "
                f"fp8={self.use_fp8}, current={self.is_current()})")
