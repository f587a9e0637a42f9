"""`ep.Buffer`: DeepEP V1's `deep_ep.Buffer` API (normal and low-latency paths) on top of libep.so.

Code written against `deep_ep.Buffer` runs with `import ep as deep_ep`, with these differences:

* Sizes come from shape hints, not bytes. `num_nvl_bytes` / `num_rdma_bytes` are accepted and ignored; the
  keyword-only hints `num_experts`, `hidden`, `max_tokens_per_rank`, `max_topk` (the largest shapes any later
  call will use) size every buffer. A call that exceeds a hint raises ValueError naming the hint to raise.
* Streams as in DeepEP on the normal path (get_dispatch_layout, dispatch, combine): the kernels run on the
  Buffer's communication stream (`get_comm_stream()`, high priority), which first waits for `previous_event` or,
  without one, for the current stream. `async_finish=True` returns an `EventOverlap` recorded on the comm stream,
  and every input and output is `record_stream`ed there, so that compute on the current stream overlaps the
  communication until the caller waits on the event; otherwise the current stream waits for the comm stream before
  the call returns. `allocate_on_comm_stream=True` (with `previous_event` and `async_finish`) allocates the
  outputs on the comm stream. The low-latency calls run on the current stream (their overlap is the hook).
* The handle is an opaque `DispatchHandle` object (DeepEP: a tuple of tensors). Pass it back, do not index it.
* Errors are exceptions, never process aborts: arguments are checked before any kernel runs (ValueError /
  TypeError naming the argument, its expected dtype, shape and device, and what was given), and a library
  failure raises `ep.EpError` with the library's message. Every device-side wait has a time budget
  (`timeout_seconds`): a peer that never arrives becomes `EpError("EP_STATUS_TIMEOUT", "... waiting for rank
  N ...")` on the next call, naming the peer, instead of a hang.
* Low-latency path: `low_latency_mode=True` reserves the LL buffer at construction, sized by the keyword-only
  hint `ll_max_tokens_per_rank` (default 128): the largest `num_max_dispatch_tokens_per_rank` any
  `low_latency_dispatch` will pass (DeepEP sizes it from `num_rdma_bytes` instead). The LL handle is a
  `LowLatencyHandle` object; indexing it gives DeepEP's tuple (src_info, layout_range, T, hidden, num_experts).
  `low_latency_combine` uses the routing kept in the handle: its `topk_idx` is checked for shape, not read.
  Hooks launch the receive phase on the stream that was current at the call, as DeepEP's do. NOT YET
  SUPPORTED (NotImplementedError): `use_logfmt=True`, `dispatch_wait_recv_cost_stats`,
  `combine_wait_recv_cost_stats`, and the shrink-mode mask calls. See `low_latency_dispatch` for the
  two-buffer rule. The handle's src_info / layout_range and the zero-copy combine buffer are views of
  library-owned memory made with torch.as_tensor over __cuda_array_interface__, which needs NumPy installed.
* Groups of several nodes (`ranks_per_node` < group size) take the internode normal path (docs/internode.md): the
  same calls and return values; combine rounds each node's partial sum to bf16 before the last hop, as DeepEP
  does, so it is within bf16 rounding of the fp32 sum rather than bit-identical to the one-node order.

PyTorch is imported when a Buffer is made, not when `ep` is imported.
"""

import ctypes
import weakref

from . import _capi

_torch = None


def _require_torch(what):
    """Import torch on first use; without it, say plainly that `what` needs PyTorch."""
    global _torch
    if _torch is None:
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"{what} needs PyTorch with CUDA (import torch failed: {e}). Install PyTorch; without it only "
                "ep._capi (the ctypes binding of libep.so) is usable.") from e
        _torch = torch
    return _torch


def _int_arg(fn, name, value, lo, hi=None, hint=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{fn}: {name} is {value}; it must be {rng}" + (f" ({hint})" if hint else ""))
    return value


class Config:
    """Per-call tuning, DeepEP's `Config` signature. Only `num_sms` (SMs a dispatch or combine may use) is used;
    the chunk sizes describe DeepEP's ring buffers, which `ep` does not have, and are kept only so that code
    that builds a Config keeps working. DeepEP requires an even num_sms; `ep` takes any value in [1, 1024]."""

    def __init__(self, num_sms=24, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
                 num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256):
        self.num_sms = _int_arg("Config", "num_sms", num_sms, 1, 1024)
        self.num_max_nvl_chunked_send_tokens = _int_arg(
            "Config", "num_max_nvl_chunked_send_tokens", num_max_nvl_chunked_send_tokens, 1)
        self.num_max_nvl_chunked_recv_tokens = _int_arg(
            "Config", "num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens, 1)
        self.num_max_rdma_chunked_send_tokens = _int_arg(
            "Config", "num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens, 1)
        self.num_max_rdma_chunked_recv_tokens = _int_arg(
            "Config", "num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens, 1)

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        """0: `ep` sizes its buffers from the Buffer's shape hints, so no byte count is needed."""
        return 0

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        """0: `ep` sizes its buffers from the Buffer's shape hints, so no byte count is needed."""
        return 0

    def __repr__(self):
        return (f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens="
                f"{self.num_max_nvl_chunked_send_tokens}, num_max_nvl_chunked_recv_tokens="
                f"{self.num_max_nvl_chunked_recv_tokens}, num_max_rdma_chunked_send_tokens="
                f"{self.num_max_rdma_chunked_send_tokens}, num_max_rdma_chunked_recv_tokens="
                f"{self.num_max_rdma_chunked_recv_tokens})")


class EventOverlap:
    """A `torch.cuda.Event` (or None) plus tensors to keep alive, DeepEP's EventOverlap.

    `current_stream_wait()` makes the current stream wait for the event (nothing to do when the event is None: the
    call that returned it already made the current stream wait). As a context manager, it waits on exit:
    `with event: ...`."""

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self):
        if self.event is not None:
            _require_torch("EventOverlap").cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self.current_stream_wait()
        return False


class _CommCall:
    """The streams of one normal-path call (Buffer._comm_begin): where it was called (compute), where its kernels run
    (comm), where its outputs are allocated (alloc: comm with allocate_on_comm_stream, else compute). A context
    manager: a call that raises makes the current stream wait for what it had launched, so that nothing of it runs
    unordered with the caller's later work (such as reusing the memory of its inputs)."""
    __slots__ = ("compute", "comm", "alloc", "async_finish")

    def __init__(self, compute, comm, alloc, async_finish):
        self.compute, self.comm, self.alloc, self.async_finish = compute, comm, alloc, async_finish

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is not None:
            self.compute.wait_stream(self.comm)
        return False


def _not_yet(name):
    raise NotImplementedError(
        f"ep.Buffer.{name}: shrink mode (masking failed ranks) is NOT YET SUPPORTED by ep. A peer that stops "
        "responding makes the next call raise EpError(EP_STATUS_TIMEOUT) naming it instead.")


def _destroy_group(lib, group_ptr, ll_handles):
    """weakref.finalize target: must not reference the Buffer. LL handles go first (they point into the group)."""
    try:
        while ll_handles:
            lib.ep_ll_handle_destroy(ll_handles.pop())
        lib.ep_group_destroy(group_ptr)
    except Exception:  # interpreter teardown: nothing sensible left to do
        pass


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
    """

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

    def _check(self, fn, buffer):
        if self._ptr is None:
            raise ValueError(f"{fn}: handle was destroyed")
        if self._buffer is not buffer:
            raise ValueError(f"{fn}: handle belongs to another Buffer")

    def _use(self, fn, buffer, stream):
        self._check(fn, buffer)
        if stream != self._stream:  # memory allocated on another stream: keep the allocator from reusing it early
            self._memory.record_stream(_torch.cuda.ExternalStream(stream, device=self._memory.device))
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
        self._slot = slot
        self._serial = serial
        self.num_tokens = num_tokens
        self.num_topk = num_topk
        self.num_experts = num_experts
        self.hidden = hidden
        self.num_max_dispatch_tokens_per_rank = max_tokens
        self.use_fp8 = use_fp8
        self._dispatch_pending = False  # receive hook of the dispatch not called yet
        self._combine_pending = False   # receive hook of a combine not called yet

    @property
    def num_local_experts(self):
        return self.num_experts // self._buffer.group_size

    def is_current(self):
        """True while the Buffer lives and no later dispatch has taken this handle's memory (and half)."""
        b = self._buffer
        return b._group_ptr is not None and b._ll_serial[self._slot] == self._serial

    def _routing(self, which):
        b = self._buffer
        if not self.is_current():
            raise RuntimeError(f"LowLatencyHandle.{which}: stale handle: a later low_latency_dispatch (or "
                               "clean_low_latency_buffer) has reused its memory (two-buffer rule: at most two LL "
                               "results alive)")
        src, rng = ctypes.c_void_p(), ctypes.c_void_p()
        _capi.check(b._lib.ep_ll_get_routing(b._ll_slots[self._slot], ctypes.byref(src), ctypes.byref(rng)),
                    b._group_ptr)
        e_loc, R = self.num_local_experts, b.group_size
        if which == "src_info":
            return b._device_view(src.value, (e_loc, R * self.num_max_dispatch_tokens_per_rank), _torch.int32)
        return b._device_view(rng.value, (e_loc, R), _torch.int64)

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


class _RecvHook:
    """The receive phase of an LL call made with return_recv_hook=True: calling it launches the phase (once) on
    the stream that was current at the call. Holds the call's tensors so that they outlive the phase."""

    def __init__(self, what, run, keep):
        self._what = what
        self._run = run
        self._keep = keep

    def __call__(self):
        if self._run is None:
            raise RuntimeError(f"the receive hook of {self._what} was already called (it runs once)")
        run, self._run = self._run, None
        try:
            run()
        finally:
            self._keep = None

    def __repr__(self):
        return f"<receive hook of {self._what}{' (called)' if self._run is None else ''}>"


class Buffer:
    """Expert-parallel dispatch and combine over one group of GPUs, DeepEP V1's `Buffer` API (normal and
    low-latency paths).

    Buffer(group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
           allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=False, *,
           num_experts=256, hidden=7168, max_tokens_per_rank=4096, max_topk=8, ranks_per_node=0,
           timeout_seconds=20.0, ll_max_tokens_per_rank=128, max_sms=0, comm=None)

    group: a torch.distributed ProcessGroup (None = the default group); it is used once, to broadcast the
      128-byte bootstrap id from rank 0. `comm` (an mpi4py communicator) may replace it.
    num_nvl_bytes, num_rdma_bytes: accepted and IGNORED (DeepEP sizes its buffers in bytes; `ep` from shapes).
    low_latency_mode: True reserves the low-latency buffer (symmetric memory, get_low_latency_rdma_size_hint()
      bytes for the shape hints) and two LL handles, so that the low_latency_* methods work; the normal path works
      either way.
    num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl: accepted and ignored.
    explicitly_destroy: False -> the group is destroyed when the Buffer is garbage-collected or at interpreter
      exit; True -> only `destroy()` does it (recommended: destroy is collective, and a rank that died would
      leave the others waiting at exit).
    num_experts, hidden, max_tokens_per_rank, max_topk: the largest shapes any call will use; they size the
      symmetric buffers (the group reports its heap in `info["symmetric_heap_bytes"]`).
    ll_max_tokens_per_rank (ep only, keyword, used with low_latency_mode=True): the largest
      num_max_dispatch_tokens_per_rank any low_latency_dispatch will pass, 1..8192 (default 128). The group is
      created here, so this hint, not the first call, sizes the LL buffer; a larger call raises ValueError.
    ranks_per_node: ranks per NVLink domain (node), 0 = all; a smaller divisor of the group size makes the
      normal path run internode (on one host: virtual nodes, for testing).
    timeout_seconds: budget of every device-side wait on a peer; past it the next call raises EpError naming
      the peer (DeepEP: a printf and a trap that kills the process).
    max_sms (ep only, keyword): the most SMs any kernel of this Buffer occupies at once, 0..1024 (0 = all the
      device reports, `info["device_sms"]`): a Config's num_sms above it is clamped, and the low-latency kernels,
      which otherwise take every SM, stay under it. For leaving SMs to compute that overlaps, or for ranks that
      share a GPU under CUDA MPS.

    The device is `torch.cuda.current_device()` at construction. One Buffer per process at a time (the library
    holds one group per process); `destroy()` frees it so that another can be made.
    """

    num_sms = 24  # SMs of a normal dispatch / combine (class-level, as in DeepEP; ep's measured default)

    def __init__(self, group=None, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=False, *,
                 num_experts=256, hidden=7168, max_tokens_per_rank=4096, max_topk=8, ranks_per_node=0,
                 timeout_seconds=20.0, use_fabric=False, enable_shrink=False, ll_max_tokens_per_rank=128, max_sms=0,
                 comm=None):
        fn = "Buffer"
        self._group_ptr = None
        self._finalizer = None
        self._ll_slots = []  # the two ep_ll_handle_t of the LL path (shared with the finalizer)
        # Checks that need neither torch nor the library.
        _int_arg(fn, "num_experts", num_experts, 1)
        _int_arg(fn, "hidden", hidden, 128, 65536)
        if hidden % 128:
            raise ValueError(f"{fn}: hidden is {hidden}; it must be a positive multiple of 128")
        _int_arg(fn, "max_tokens_per_rank", max_tokens_per_rank, 1)
        _int_arg(fn, "max_topk", max_topk, 1, 32)
        _int_arg(fn, "ranks_per_node", ranks_per_node, 0)
        _int_arg(fn, "max_sms", max_sms, 0, 1024)
        if not isinstance(timeout_seconds, (int, float)) or not 0 < timeout_seconds <= 3600:
            raise ValueError(f"{fn}: timeout_seconds is {timeout_seconds!r}; it must be in (0, 3600]")
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            _int_arg(fn, name, v, 0)
        if enable_shrink:
            raise NotImplementedError(f"{fn}: enable_shrink (masking failed ranks) is NOT YET SUPPORTED")
        low_latency_mode = bool(low_latency_mode)
        if low_latency_mode:
            _int_arg(fn, "ll_max_tokens_per_rank", ll_max_tokens_per_rank, 1, 8192,
                     "the largest num_max_dispatch_tokens_per_rank of any low_latency_dispatch")

        torch = _require_torch("ep.Buffer")
        lib = _capi.load()
        if not torch.cuda.is_available():
            raise RuntimeError(f"{fn}: PyTorch sees no CUDA device")

        # Ranks and the bootstrap id.
        if comm is not None:
            rank, size = comm.Get_rank(), comm.Get_size()
        else:
            import torch.distributed as dist
            if not dist.is_initialized():
                raise RuntimeError(f"{fn}: torch.distributed is not initialised; call "
                                   "dist.init_process_group() first (or pass an mpi4py comm=)")
            rank, size = dist.get_rank(group), dist.get_world_size(group)
            if rank < 0:
                raise ValueError(f"{fn}: this process is not a member of group")
        if num_experts % size:
            raise ValueError(f"{fn}: num_experts is {num_experts}; it must be a multiple of the group size ({size})")
        uid = _capi.UniqueId()
        payload = None
        if rank == 0:
            st = lib.ep_get_unique_id(ctypes.byref(uid))
            payload = bytes(uid.bytes) if st == 0 else f"{_capi.status_name(st)}: {_capi.last_error(None)}"
        if comm is not None:
            payload = comm.bcast(payload, root=0)
        else:
            obj = [payload]
            src = 0 if group is None else dist.get_global_rank(group, 0)
            dist.broadcast_object_list(obj, src=src, group=group)
            payload = obj[0]
        if isinstance(payload, str):
            raise _capi.EpError(payload.split(":", 1)[0], f"rank 0 could not make the bootstrap id: {payload}")
        ctypes.memmove(uid.bytes, payload, _capi.EP_UNIQUE_ID_BYTES)

        self.device = torch.cuda.current_device()
        self._comm_stream = torch.cuda.Stream(device=self.device, priority=-1)  # high priority, as DeepEP's
        cfg = _capi.GroupConfig.init(ranks_per_node=ranks_per_node, num_experts=num_experts, hidden=hidden,
                                     max_tokens_per_rank=max_tokens_per_rank, max_topk=max_topk, num_sms=0,
                                     max_sms=max_sms,
                                     ll_max_tokens_per_rank=ll_max_tokens_per_rank if low_latency_mode else 0,
                                     timeout_seconds=float(timeout_seconds))
        g = ctypes.c_void_p()
        _capi.check(lib.ep_group_create(ctypes.byref(g), ctypes.byref(uid), rank, size, self.device,
                                        ctypes.byref(cfg)), None)
        self._lib = lib
        self._group_ptr = g.value
        if not explicitly_destroy:
            self._finalizer = weakref.finalize(self, _destroy_group, lib, g.value, self._ll_slots)
        if low_latency_mode:
            # Two handles, made now: making one allocates (not capturable); each LL dispatch takes the next.
            try:
                for _ in range(2):
                    h = ctypes.c_void_p()
                    _capi.check(lib.ep_ll_handle_create(g.value, ctypes.byref(h)), g.value)
                    self._ll_slots.append(h.value)
            except Exception:
                self.destroy()
                raise

        info = _capi.GroupInfo()
        _capi.check(lib.ep_group_get_info(self._group_ptr, ctypes.byref(info)), self._group_ptr)
        self.info = {name: getattr(info, name) for name, _ in _capi.GroupInfo._fields_}
        hb = ctypes.c_size_t()
        _capi.check(lib.ep_handle_memory_bytes(self._group_ptr, ctypes.byref(hb)), self._group_ptr)
        self._handle_bytes = hb.value

        # DeepEP's attributes, then ours.
        self.rank, self.group_size, self.group, self.comm = rank, size, group, comm
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.ll_max_tokens_per_rank = ll_max_tokens_per_rank if low_latency_mode else 0
        self._ll_next = 0            # the slot (ep_ll_handle_t) the next LL dispatch takes
        self._ll_serial = [0, 0]     # per slot: the serial of the LowLatencyHandle that holds it now
        self._ll_dispatches = 0      # LL dispatches so far (serials)
        self._ll_views = {}          # (pointer, shape, dtype) -> tensor view of library-owned device memory
        self.explicitly_destroy = explicitly_destroy
        self.num_experts, self.hidden = num_experts, hidden
        self.max_tokens_per_rank, self.max_topk = max_tokens_per_rank, max_topk
        self.num_nodes = info.num_nodes
        self.timeout_seconds = float(timeout_seconds)
        self._device_str = f"cuda:{self.device}"

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def destroy(self):
        """Destroy the group (collective: every rank calls it). Idempotent; later calls on the Buffer raise.
        Unlike DeepEP, allowed whether or not explicitly_destroy was set."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        ptr, self._group_ptr = self._group_ptr, None
        if ptr is not None:
            self._ll_views = {}
            while self._ll_slots:
                self._lib.ep_ll_handle_destroy(self._ll_slots.pop())
            _capi.check(self._lib.ep_group_destroy(ptr), None)

    def _alive(self, fn):
        if self._group_ptr is None:
            raise RuntimeError(f"{fn}: this Buffer was destroyed")
        return self._group_ptr

    # ---- class-level settings and small utilities -----------------------------------------------------------
    @classmethod
    def set_num_sms(cls, new_num_sms):
        """SMs each normal dispatch / combine uses unless a Config says otherwise (default 24). Any value in
        [1, 1024]; DeepEP requires an even one."""
        cls.num_sms = _int_arg("set_num_sms", "new_num_sms", new_num_sms, 1, 1024)

    @staticmethod
    def get_dispatch_config(num_ranks):
        """Config(num_sms=Buffer.num_sms) for any group size (DeepEP: tuned tables for listed sizes only)."""
        _int_arg("get_dispatch_config", "num_ranks", num_ranks, 1)
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks):
        """Config(num_sms=Buffer.num_sms) for any group size (DeepEP: tuned tables for listed sizes only)."""
        _int_arg("get_combine_config", "num_ranks", num_ranks, 1)
        return Config(Buffer.num_sms)

    @staticmethod
    def is_sm90_compiled():
        return True

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts, *,
                                       max_topk=8):
        """Bytes of symmetric memory the LL buffer takes for this shape (ep_ll_buffer_size_hint: both halves).
        Informational: ep sizes the buffer itself from the Buffer's hints (num_rdma_bytes is ignored). ep's size
        also depends on the largest top-k (keyword max_topk, default 8, the Buffer's default). Needs libep.so,
        not PyTorch."""
        fn = "get_low_latency_rdma_size_hint"
        for name, v in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank), ("hidden", hidden),
                        ("num_ranks", num_ranks), ("num_experts", num_experts), ("max_topk", max_topk)):
            _int_arg(fn, name, v, 1)
        try:
            return _capi.ll_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts,
                                             max_topk)
        except _capi.EpError as e:
            if e.status_name != "EP_STATUS_INVALID_ARGUMENT":
                raise
            msg = e.message.replace("max_tokens_per_rank", "num_max_dispatch_tokens_per_rank")
            raise ValueError(f"{fn}: {msg.split(': ', 1)[-1]}") from None

    def get_comm_stream(self):
        """The Buffer's communication stream (a high-priority torch.cuda.Stream), where the normal-path calls run."""
        self._alive("get_comm_stream")
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        raise NotImplementedError("ep.Buffer.get_local_buffer_tensor is NOT SUPPORTED: ep's symmetric buffers are "
                                  "internal to the library and laid out per call")

    def capture(self):
        """An EventOverlap of an event recorded now on the current stream."""
        ev = _torch.cuda.Event()
        ev.record(_torch.cuda.current_stream(self.device))
        return EventOverlap(ev)

    def get_async_error(self):
        """(ep only) Raise EpError if a finished kernel recorded a fault (bad expert id, timeout naming the peer,
        receive overflow); otherwise return None. Synchronise the stream first to see a given call's outcome."""
        g = self._alive("get_async_error")
        st = ctypes.c_int()
        _capi.check(self._lib.ep_get_async_error(g, ctypes.byref(st)), g)
        _capi.check(st.value, g)

    def check(self):
        """(ep only) End-to-end self-check of every data path between the ranks (collective; synchronises)."""
        g = self._alive("check")
        _capi.check(self._lib.ep_group_check(g, self._stream()), g)

    # ---- helpers --------------------------------------------------------------------------------------------
    def _stream(self):
        return _torch.cuda.current_stream(self.device).cuda_stream

    def _tensor(self, fn, name, t, dtype, shape, desc, *, align16=True):
        """Check dtype, shape (ints or None for any), device and contiguity; raise naming the argument."""
        torch = _torch
        want = f"{dtype} {desc} contiguous on {self._device_str}"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor ({want}), got {type(t).__name__}")
        got = f"{t.dtype} {list(t.shape)}{'' if t.is_contiguous() else ' non-contiguous'} on {t.device}"
        if t.dtype != dtype:
            raise TypeError(f"{fn}: {name} must be {want}, got {got}")
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise ValueError(f"{fn}: {name} must be {want}, got {got}")
        if t.device.type != "cuda" or t.device.index != self.device:
            raise ValueError(f"{fn}: {name} must be {want}, got {got}")
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be {want}, got {got}")
        if align16 and t.data_ptr() % 16:
            raise ValueError(f"{fn}: {name} must start on a 16-byte boundary (data_ptr {t.data_ptr():#x}); "
                             "pass a fresh tensor or .clone() the view")
        return t

    def _config_sms(self, fn, config, default_getter):
        if config is None:
            return default_getter(self.group_size).num_sms
        if not hasattr(config, "num_sms"):
            raise TypeError(f"{fn}: config must be an ep.Config (or None), got {type(config).__name__}")
        return _int_arg(fn, "config.num_sms", config.num_sms, 1, 1024)

    def _comm_begin(self, fn, previous_event, async_finish, allocate_on_comm_stream):
        """Start a normal-path call on the comm stream (DeepEP's rule): the comm stream waits for previous_event, or
        for the current stream when there is none (an EventOverlap without an event counts as none). Returns a
        _CommCall to use as `with ... as call:`; allocate under `with torch.cuda.stream(call.alloc)`, end with
        _comm_end."""
        torch = _torch
        async_finish = self._flag(fn, "async_finish", async_finish)
        if self._flag(fn, "allocate_on_comm_stream", allocate_on_comm_stream) and (
                previous_event is None or not async_finish):
            raise ValueError(f"{fn}: allocate_on_comm_stream=True needs previous_event and async_finish=True (the "
                             "outputs then belong to the comm stream, which only the event orders with yours)")
        event = previous_event.event if isinstance(previous_event, EventOverlap) else previous_event
        if event is not None and not isinstance(event, torch.cuda.Event):
            raise TypeError(f"{fn}: previous_event must be an EventOverlap, a torch.cuda.Event or None, got "
                            f"{type(previous_event).__name__}")
        compute, comm = torch.cuda.current_stream(self.device), self._comm_stream
        if event is None:
            comm.wait_stream(compute)
        else:
            comm.wait_event(event)
        return _CommCall(compute, comm, comm if allocate_on_comm_stream else compute, async_finish)

    @staticmethod
    def _comm_end(call, tensors):
        """End a normal-path call: without async_finish the current stream waits for the comm stream; with it, an
        EventOverlap on the comm stream, and the tensors recorded on it so that the allocator does not reuse
        their memory before the comm stream is done with it (inside a graph capture, the graph's pool keeps them,
        and the event holds them too)."""
        if not call.async_finish:
            call.compute.wait_stream(call.comm)
            return EventOverlap(None)
        tensors = tuple(t for t in tensors if t is not None)
        if not _torch.cuda.is_current_stream_capturing():
            for t in tensors:
                t.record_stream(call.comm)
        ev = _torch.cuda.Event()
        ev.record(call.comm)
        return EventOverlap(ev, extra_tensors=tensors)

    def _ll_finish(self, async_finish, tensors):
        if not async_finish:
            return EventOverlap(None)
        ev = _torch.cuda.Event()
        ev.record(_torch.cuda.current_stream(self.device))
        return EventOverlap(ev, extra_tensors=tuple(t for t in tensors if t is not None))

    def _unpack_x(self, fn, x, num_tokens=None):
        """x as bf16 tensor or (fp8 tensor, fp32 scales). Returns (data, scales or None)."""
        torch = _torch
        n = num_tokens
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(f"{fn}: x as a tuple must be (x_fp8 [num_tokens, hidden] torch.float8_e4m3fn, "
                                 f"scales [num_tokens, hidden / 128] torch.float32), got {len(x)} items")
            data, scales = x
            self._tensor(fn, "x[0]", data, torch.float8_e4m3fn, (n, None), "[num_tokens, hidden]")
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
            self._tensor(fn, "x[1] (scales)", scales, torch.float32, (n, h // 128), f"[{n}, {h // 128}]",
                         align16=False)
            return data, scales
        self._tensor(fn, "x", x, torch.bfloat16, (n, None), "[num_tokens, hidden]")
        h = x.shape[1]
        if h % 8 or h > self.hidden:
            raise ValueError(f"{fn}: x has hidden {h}; it must be a multiple of 8, <= the Buffer's hidden hint "
                             f"({self.hidden}; raise Buffer(hidden=...))")
        return x, None

    def _new_handle(self, fn, stream, num_tokens, num_topk, num_experts, hidden):
        torch = _torch
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
        torch = _torch
        self._tensor(fn, "topk_idx", topk_idx, torch.int64, (None, None), "[num_tokens, num_topk]", align16=False)
        n, k = topk_idx.shape
        _int_arg(fn, "topk_idx.shape[1] (num_topk)", k, 1, 32)
        self._check_num_experts(fn, num_experts)
        with self._comm_begin(fn, previous_event, async_finish, allocate_on_comm_stream) as call:
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
            event = self._comm_end(call, (topk_idx, per_rank, per_node, per_expert, in_rank))
        return per_rank, per_node, per_expert, in_rank, event

    def _check_num_experts(self, fn, num_experts, name="num_experts"):
        _int_arg(fn, name, num_experts, 1)
        if num_experts % self.group_size:
            raise ValueError(f"{fn}: {name} is {num_experts}; it must be a multiple of the group size "
                             f"({self.group_size})")
        if num_experts > self.num_experts:
            raise ValueError(f"{fn}: {name} is {num_experts} but the Buffer was sized for {self.num_experts}; "
                             "raise Buffer(num_experts=...)")

    # ---- dispatch -------------------------------------------------------------------------------------------
    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False, *, num_experts=None):
        """Send each token to the ranks that hold its experts. DeepEP V1's signature and results:

        returns (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)

        x: bf16 [num_tokens, hidden], or (x_fp8 [num_tokens, hidden] float8_e4m3fn, scales [num_tokens,
          hidden / 128] float32) -- then recv_x is the same kind of tuple.
        topk_idx: int64 [num_tokens, num_topk], -1 = none (required unless `handle` is given: ep computes the
          routing from it; num_tokens_per_rank / num_tokens_per_rdma_rank / is_token_in_rank are accepted and
          unused). topk_weights: float32 [num_tokens, num_topk] or None.
        num_experts (ep only, keyword): defaults to num_tokens_per_expert.numel() when that is given, else to the
          Buffer's num_experts hint. Pass one of them whenever the model has fewer experts than the hint: with the
          hint, expert e lives on rank e // (hint / R), so a smaller model's experts all land on the first ranks.
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
        config / set_num_sms: SMs used. Streams (previous_event, async_finish, allocate_on_comm_stream): see the
          module's docstring; as in DeepEP.
        """
        fn = "dispatch"
        g = self._alive(fn)
        torch = _torch
        num_sms = self._config_sms(fn, config, Buffer.get_dispatch_config)
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
            if n > self.max_tokens_per_rank:
                raise ValueError(f"{fn}: x has {n} tokens but the Buffer was sized for max_tokens_per_rank="
                                 f"{self.max_tokens_per_rank}; raise Buffer(max_tokens_per_rank=...)")
            if topk_idx is None:
                raise ValueError(f"{fn}: topk_idx is required for a non-cached dispatch (ep derives the routing "
                                 "from it; is_token_in_rank alone is not enough)")
            self._tensor(fn, "topk_idx", topk_idx, torch.int64, (n, None), f"[num_tokens={n}, num_topk]",
                         align16=False)
            k = topk_idx.shape[1]
            if not 1 <= k <= self.max_topk:
                raise ValueError(f"{fn}: topk_idx has num_topk {k}; it must be in [1, max_topk={self.max_topk}] "
                                 "(raise Buffer(max_topk=...))")
            if topk_weights is not None:
                self._tensor(fn, "topk_weights", topk_weights, torch.float32, (n, k), f"[{n}, {k}]",
                             align16=False)
            if num_experts is None:
                if num_tokens_per_expert is None:
                    raise ValueError(f"{fn}: a non-cached dispatch needs num_tokens_per_expert (from "
                                     "get_dispatch_layout) or num_experts=..., to know how experts map to ranks")
                num_experts = num_tokens_per_expert.numel()
            self._check_num_experts(fn, num_experts)
            _int_arg(fn, "expert_alignment", expert_alignment, 1, 65536)
            _int_arg(fn, "num_worst_tokens", num_worst_tokens, 0)
            if num_worst_tokens == 0 and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{fn}: the eager form waits on the host for the received count and cannot be "
                                   "captured in a CUDA graph; pass num_worst_tokens > 0 (e.g. num_ranks * "
                                   "max tokens per rank)")
        with self._comm_begin(fn, previous_event, async_finish, allocate_on_comm_stream) as call:
            stream = call.comm.cuda_stream
            dev, R = self._device_str, self.group_size
            count_dev = per_expert_dev = None

            if not cached:
                with torch.cuda.stream(call.alloc):
                    handle = self._new_handle(fn, call.alloc.cuda_stream, n, k, num_experts, data.shape[1])
                e_loc = num_experts // R
                pa = _capi.DispatchPrepareArgs.init(topk_idx=topk_idx.data_ptr(), num_tokens=n, num_topk=k,
                                                    num_experts=num_experts, expert_alignment=expert_alignment)
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
                if not cached:
                    recv_topk_idx = torch.empty((rows, k), dtype=torch.int64, device=dev)
                    if topk_weights is not None:
                        recv_topk_weights = torch.empty((rows, k), dtype=torch.float32, device=dev)
                    recv_src_idx = torch.empty(rows, dtype=torch.int32, device=dev)
            da = _capi.DispatchArgs.init(
                x=data.data_ptr(), x_dtype=_capi.EP_FP8_E4M3 if scales is not None else _capi.EP_BF16, hidden=h,
                x_scales=scales.data_ptr() if scales is not None else None,
                topk_idx=topk_idx.data_ptr() if not cached else None,
                topk_weights=topk_weights.data_ptr() if topk_weights is not None else None,
                recv_capacity=rows, recv_x=recv_x.data_ptr(),
                recv_x_scales=recv_scales.data_ptr() if recv_scales is not None else None,
                recv_topk_idx=recv_topk_idx.data_ptr() if recv_topk_idx is not None else None,
                recv_topk_weights=recv_topk_weights.data_ptr() if recv_topk_weights is not None else None,
                recv_src_idx=recv_src_idx.data_ptr() if recv_src_idx is not None else None, num_sms=num_sms)
            _capi.check(self._lib.ep_dispatch(g, hptr, ctypes.byref(da), stream), g)

            out_x = (recv_x, recv_scales) if scales is not None else recv_x
            event = self._comm_end(call, (data, scales, topk_idx, topk_weights, recv_x, recv_scales, recv_topk_idx,
                                          recv_topk_weights, recv_src_idx, count_dev, per_expert_dev))
        if cached:
            return out_x, None, None, None, None, event
        handle.recv_src_idx = recv_src_idx
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
        torch = _torch
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"{fn}: handle must be the DispatchHandle returned by dispatch, got "
                            f"{type(handle).__name__}")
        num_sms = self._config_sms(fn, config, Buffer.get_combine_config)
        handle._check(fn, self)
        rows, n, k = handle.num_recv_rows, handle.num_tokens, handle.num_topk
        self._tensor(fn, "x", x, torch.bfloat16, (rows, None),
                     f"[num_recv_rows={rows}, hidden] (the rows of this handle's dispatch: "
                     + (f"num_worst_tokens={rows}" if handle.is_graph_safe else
                        f"{rows} received for num_experts={handle.num_experts}") + ")")
        h = x.shape[1]
        if h % 8 or h > self.hidden:
            raise ValueError(f"{fn}: x has hidden {h}; it must be a multiple of 8, <= the Buffer's hidden hint "
                             f"({self.hidden})")
        if topk_weights is not None:
            self._tensor(fn, "topk_weights", topk_weights, torch.float32, (rows, k), f"[{rows}, {k}]",
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
            self._tensor(fn, f"bias[{i}]" if not isinstance(bias, torch.Tensor) else "bias", b, torch.bfloat16,
                         (n, h), f"[num_tokens={n}, hidden={h}]")
        with self._comm_begin(fn, previous_event, async_finish, allocate_on_comm_stream) as call:
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
            event = self._comm_end(call, (x, topk_weights, *biases, out, out_w))
        return out, out_w, event

    # ---- low-latency path -------------------------------------------------------------------------------------
    def _ll_alive(self, fn):
        g = self._alive(fn)
        if not self._ll_slots:
            raise RuntimeError(f"{fn}: this Buffer has no low-latency buffer; create it with low_latency_mode=True "
                               "(and ll_max_tokens_per_rank=... >= num_max_dispatch_tokens_per_rank)")
        return g

    def _device_view(self, ptr, shape, dtype):
        """A tensor over library-owned device memory (no copy), cached per (pointer, shape, dtype).

        The view is made by torch.as_tensor over a __cuda_array_interface__, which PyTorch implements with NumPy's
        C API (it raises "Numpy is not available" without numpy installed) and, in some versions, by asking
        cudaPointerGetAttributes for the pointer's device; for the zero-copy buffer (NVSHMEM symmetric memory)
        this works with PyTorch 2.11 (the GPU tests' zero-copy and src_info checks, 2 and 4 GPUs). A copy instead
        of a view is detected below and raises. A numpy-free alternative is a DLPack capsule built with ctypes
        and passed to torch.from_dlpack."""
        torch = _torch
        key = (ptr, tuple(shape), dtype)
        t = self._ll_views.get(key)
        if t is None:
            raw_dtype, typestr = {torch.int32: (torch.int32, "<i4"), torch.int64: (torch.int64, "<i8"),
                                  torch.bfloat16: (torch.int16, "<i2")}[dtype]
            try:
                t = torch.as_tensor(_DeviceArray(ptr, shape, typestr), device=self._device_str)
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
            self._ll_views[key] = t
        return t

    def _ll_handle(self, fn, handle, for_combine):
        """The ep_ll_handle_t of a LowLatencyHandle of this Buffer that the two-buffer rule still allows."""
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"{fn}: handle must be the LowLatencyHandle returned by low_latency_dispatch, got "
                            f"{type(handle).__name__}")
        if handle._buffer is not self:
            raise ValueError(f"{fn}: handle belongs to another Buffer")
        if not handle.is_current():
            raise RuntimeError(f"{fn}: stale handle: its buffer half was reused by a later low_latency_dispatch or "
                               "reset by clean_low_latency_buffer (two-buffer rule: combine a handle before the "
                               "dispatch after next)")
        if for_combine and handle._dispatch_pending:
            raise RuntimeError(f"{fn}: the handle's dispatch was made with return_recv_hook=True and its hook has "
                               "not been called yet; call the hook first")
        if for_combine and handle._combine_pending:
            raise RuntimeError(f"{fn}: the handle's previous combine was made with return_recv_hook=True and its "
                               "hook has not been called yet; call it first")
        return self._ll_slots[handle._slot]

    @staticmethod
    def _flag(fn, name, value):
        if not isinstance(value, bool) and value not in (0, 1):
            raise TypeError(f"{fn}: {name} must be a bool, got {value!r}")
        return bool(value)

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False, topk_weights=None):
        """Send each token straight to the experts it selects (decoding: up to a few hundred tokens per rank).
        DeepEP V1's signature and results:

        returns (recv_x, recv_count, handle, event, hook)

        x: bf16 [num_tokens, hidden], num_tokens <= num_max_dispatch_tokens_per_rank (T). topk_idx: int64
          [num_tokens, num_topk], -1 = none. T and num_experts must be the same on every rank; T <= the Buffer's
          ll_max_tokens_per_rank, num_experts <= its num_experts, hidden <= its hidden.
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
          phase). dispatch_wait_recv_cost_stats: NOT YET SUPPORTED.
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
        torch = _torch
        if dispatch_wait_recv_cost_stats is not None:
            raise NotImplementedError(f"{fn}: dispatch_wait_recv_cost_stats (per-rank wait clocks) is NOT YET "
                                      "SUPPORTED by ep; pass None")
        use_fp8 = self._flag(fn, "use_fp8", use_fp8)
        round_scale = self._flag(fn, "round_scale", round_scale)
        use_ue8m0 = self._flag(fn, "use_ue8m0", use_ue8m0)
        async_finish = self._flag(fn, "async_finish", async_finish)
        return_recv_hook = self._flag(fn, "return_recv_hook", return_recv_hook)
        if async_finish and return_recv_hook:
            raise ValueError(f"{fn}: async_finish and return_recv_hook are exclusive (as in DeepEP)")
        T = _int_arg(fn, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1,
                     self.ll_max_tokens_per_rank, "raise Buffer(ll_max_tokens_per_rank=...)")
        self._check_num_experts(fn, num_experts)
        self._tensor(fn, "x", x, torch.bfloat16, (None, None), f"[num_tokens <= {T}, hidden]")
        n, h = x.shape
        if n > T:
            raise ValueError(f"{fn}: x has {n} tokens, more than num_max_dispatch_tokens_per_rank={T}")
        if use_fp8 and use_ue8m0 and not round_scale:
            raise ValueError(f"{fn}: use_ue8m0=True needs round_scale=True (UE8M0 scales are powers of two)")
        mult = (512 if use_ue8m0 else 128) if use_fp8 else 8
        if h % mult or h > self.hidden:
            what = "use_ue8m0" if use_fp8 and use_ue8m0 else "FP8" if use_fp8 else "BF16"
            raise ValueError(f"{fn}: x has hidden {h}; with {what} it must be a multiple of {mult}, <= the Buffer's "
                             f"hidden hint ({self.hidden})")
        self._tensor(fn, "topk_idx", topk_idx, torch.int64, (n, None), f"[num_tokens={n}, num_topk]",
                     align16=False)
        k = topk_idx.shape[1]
        if topk_weights is not None:
            self._tensor(fn, "topk_weights", topk_weights, torch.float32, (n, k), f"[num_tokens={n}, num_topk={k}]",
                         align16=False)
        if not 1 <= k <= self.max_topk:
            raise ValueError(f"{fn}: topk_idx has num_topk {k}; it must be in [1, max_topk={self.max_topk}] "
                             "(raise Buffer(max_topk=...))")
        R = self.group_size
        e_loc = num_experts // R
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            self._tensor(fn, "cumulative_local_expert_recv_stats", stats, torch.int32, (e_loc,),
                         f"[num_local_experts={e_loc}]", align16=False)

        dev, RT = self._device_str, R * T
        slot = self._ll_next
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
            topk_weights=topk_weights.data_ptr() if topk_weights is not None and n else None)
        _capi.check(self._lib.ep_ll_dispatch(g, hptr, ctypes.byref(a), stream), g)
        # The send is issued: the slot now belongs to this dispatch.
        self._ll_dispatches += 1
        self._ll_serial[slot] = self._ll_dispatches
        self._ll_next = slot ^ 1
        handle = LowLatencyHandle(self, slot, self._ll_dispatches, n, k, num_experts, h, T, use_fp8)

        def add_stats():
            if stats is not None:
                with torch.cuda.stream(tstream):
                    stats.add_(recv_count)

        hook = None
        if return_recv_hook:
            handle._dispatch_pending = True

            def recv():
                gg = self._alive(fn + " hook")
                _capi.check(self._lib.ep_ll_dispatch_recv(gg, hptr, stream), gg)
                handle._dispatch_pending = False
                add_stats()
            hook = _RecvHook(fn, recv, (x, topk_idx, topk_weights, recv_x, scales_store, recv_count, stats))
        else:
            add_stats()
        event = self._ll_finish(async_finish, (x, topk_idx, topk_weights, recv_x, scales_store, recv_count))
        return ((recv_x, scales) if use_fp8 else recv_x), recv_count, handle, event, hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None,
                            sum_on_expert_ranks=False):
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
          hook. use_logfmt and combine_wait_recv_cost_stats: NOT YET SUPPORTED.
        sum_on_expert_ranks (ep's addition; the same on every rank): each rank weights its experts' rows of a token
          with the weights given to the dispatch (low_latency_dispatch(..., topk_weights=...)) and sums them in
          fp32, and one bf16 row per (token, rank) comes back instead of one per (token, expert): fewer bytes when
          a token has several experts on one rank. combined_x[t] = bf16(sum over the token's ranks, in the order of
          their first top-k slot, of each rank's bf16 sum); a rank's sum adds its experts in the order of their
          first slot, each with the sum of its slots' weights. topk_weights must be None then.
        The handle must be current (two-buffer rule) and its dispatch's receive hook called.
        """
        fn = "low_latency_combine"
        g = self._ll_alive(fn)
        torch = _torch
        if use_logfmt:
            raise NotImplementedError(f"{fn}: use_logfmt (10-bit log-format combine payload) is NOT YET SUPPORTED "
                                      "by ep; pass use_logfmt=False (combine sends bf16)")
        if combine_wait_recv_cost_stats is not None:
            raise NotImplementedError(f"{fn}: combine_wait_recv_cost_stats (per-rank wait clocks) is NOT YET "
                                      "SUPPORTED by ep; pass None")
        zero_copy = self._flag(fn, "zero_copy", zero_copy)
        async_finish = self._flag(fn, "async_finish", async_finish)
        return_recv_hook = self._flag(fn, "return_recv_hook", return_recv_hook)
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
            self._tensor(fn, "x", x, torch.bfloat16, (e_loc, RT, h), xdesc)
        self._tensor(fn, "topk_idx", topk_idx, torch.int64, (n, k), f"[num_tokens={n}, num_topk={k}] (the "
                     "handle's dispatch)", align16=False)
        sum_on_expert_ranks = self._flag(fn, "sum_on_expert_ranks", sum_on_expert_ranks)
        if sum_on_expert_ranks:
            if topk_weights is not None:
                raise ValueError(f"{fn}: sum_on_expert_ranks=True uses the weights given to the dispatch; pass "
                                 "topk_weights=None")
        else:
            self._tensor(fn, "topk_weights", topk_weights, torch.float32, (n, k), f"[num_tokens={n}, num_topk={k}]",
                         align16=False)
        if out is None:
            out = torch.empty((n, h), dtype=torch.bfloat16, device=self._device_str)
        else:
            self._tensor(fn, "out", out, torch.bfloat16, (n, h), f"[num_tokens={n}, hidden={h}]")
        stream = self._stream()
        a = _capi.LLCombineArgs.init(
            x=None if zero_copy else x.data_ptr(),
            topk_weights=topk_weights.data_ptr() if n and topk_weights is not None else None,
            out=out.data_ptr() if n else None, zero_copy=int(zero_copy), return_after_send=int(return_recv_hook),
            sum_on_expert_ranks=int(sum_on_expert_ranks))
        _capi.check(self._lib.ep_ll_combine(g, hptr, ctypes.byref(a), stream), g)
        hook = None
        if return_recv_hook:
            handle._combine_pending = True

            def recv():
                gg = self._alive(fn + " hook")
                _capi.check(self._lib.ep_ll_combine_recv(gg, hptr, stream), gg)
                handle._combine_pending = False
            hook = _RecvHook(fn, recv, (x, topk_idx, topk_weights, out))
        event = self._ll_finish(async_finish, (x, topk_idx, topk_weights, out))
        return out, event, hook

    def get_next_low_latency_combine_buffer(self, handle):
        """The zero-copy combine buffer of the handle: a bf16 [E_loc, R * T, hidden] view of symmetric memory
        (contiguous; DeepEP's is strided). Write the experts' outputs into it, then call
        low_latency_combine(..., zero_copy=True). Valid from the handle's dispatch until its combine; the dispatch
        after next reuses it (and a non-zero-copy combine of the handle may stage its rows there for peers
        reached over NVSHMEM).
        The tensor does not own the memory: it dangles once the Buffer is destroyed.
        The view of NVSHMEM memory is made with torch.as_tensor over __cuda_array_interface__, which needs NumPy
        installed and relies on PyTorch accepting a pointer into the NVSHMEM heap (it does with PyTorch 2.11: the
        GPU tests' zero-copy combine equals the copying one); a copy instead of a view raises RuntimeError rather
        than silently breaking zero-copy."""
        fn = "get_next_low_latency_combine_buffer"
        g = self._ll_alive(fn)
        hptr = self._ll_handle(fn, handle, for_combine=False)
        p = ctypes.c_void_p()
        _capi.check(self._lib.ep_ll_get_combine_buffer(g, hptr, ctypes.byref(p)), g)
        shape = (handle.num_local_experts, self.group_size * handle.num_max_dispatch_tokens_per_rank, handle.hidden)
        return self._device_view(p.value, shape, _torch.bfloat16)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """Zero the LL buffer's signals in both halves and restart its turn-taking (collective; synchronises the
        device and waits for every rank; not capturable). No LL receive hook may be outstanding. Every
        LowLatencyHandle made before becomes stale. The arguments are checked against the Buffer's hints (ep's
        buffer serves every shape up to them, so a clean is not needed to change shape)."""
        fn = "clean_low_latency_buffer"
        g = self._ll_alive(fn)
        _int_arg(fn, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1,
                 self.ll_max_tokens_per_rank, "raise Buffer(ll_max_tokens_per_rank=...)")
        _int_arg(fn, "hidden", hidden, 1, self.hidden, "the Buffer's hidden hint")
        self._check_num_experts(fn, num_experts)
        if _torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{fn}: synchronises the device and all ranks, so it cannot be captured in a CUDA "
                               "graph")
        _capi.check(self._lib.ep_ll_clean(g, self._stream()), g)
        self._ll_next = 0
        self._ll_serial = [0, 0]

    def low_latency_update_mask_buffer(self, *args, **kwargs):
        _not_yet("low_latency_update_mask_buffer")

    def low_latency_query_mask_buffer(self, *args, **kwargs):
        _not_yet("low_latency_query_mask_buffer")

    def low_latency_clean_mask_buffer(self, *args, **kwargs):
        _not_yet("low_latency_clean_mask_buffer")
