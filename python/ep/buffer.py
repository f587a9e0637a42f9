"""`ep.Buffer`: DeepEP V1's `deep_ep.Buffer` API (normal and low-latency paths) on top of libep.so.

Code written against `deep_ep.Buffer` runs with `import ep as deep_ep`, with these differences:

* Sizes: `Buffer(group, num_nvl_bytes, num_rdma_bytes, ...)` without `max_tokens_per_rank` (DeepEP's and
  Megatron-Core's call) gives the normal path regions of at most `num_nvl_bytes` bytes on one node, and of at most
  `num_nvl_bytes + num_rdma_bytes` on several (in low-latency mode less the LL buffer's `num_rdma_bytes`; with only
  those, a pool of LL_ONLY_TOKENS_PER_ROUND tokens a round); calls of more tokens than they hold run in rounds
  inside the library, with the same results (up to POOL_MAX_TOKENS_PER_RANK tokens a call). With
  `max_tokens_per_rank` (or no bytes) the keyword-only hints `num_experts`, `hidden`, `max_tokens_per_rank`,
  `max_topk` (the largest shapes any later call will use) size every buffer. Either way `hidden`, `max_topk` and
  `num_experts` bound the calls (defaults 7168, 8, 256): a call that exceeds a hint raises ValueError naming the
  hint to raise.
* Streams as in DeepEP on the normal path (get_dispatch_layout, dispatch, combine): the kernels run on the
  Buffer's communication stream (`get_comm_stream()`, high priority), which first waits for `previous_event` or,
  without one, for the current stream. `async_finish=True` returns an `EventOverlap` recorded on the comm stream,
  and every input and output is `record_stream`ed there, so that compute on the current stream overlaps the
  communication until the caller waits on the event; otherwise the current stream waits for the comm stream before
  the call returns. `allocate_on_comm_stream=True` (with `previous_event` and `async_finish`) allocates the
  outputs on the comm stream. The low-latency calls run on the current stream (their overlap is the hook).
* The handle is a `DispatchHandle` object (DeepEP: a tuple of tensors). Indexing it gives the entries of DeepEP's
  tuple that ep has (recv_src_idx, is_token_in_rank), each made on first access; the others raise
  NotImplementedError saying why (see DispatchHandle).
* Code that imports `deep_ep` runs unedited after `ep.install_as_deep_ep()` (ep.utils stands for deep_ep.utils:
  EventOverlap, EventHandle). A `previous_event` may be an EventOverlap, an EventHandle or a torch.cuda.Event.
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
  Hooks launch the receive phase on the stream that was current at the call, as DeepEP's do. The wait-cost
  stats (`dispatch_wait_recv_cost_stats`, `combine_wait_recv_cost_stats`) count clock64 cycles per source rank.
  `use_logfmt=True` sends the combine's rows as LogFMT-10. Shrink mode (`enable_shrink=True`) masks a peer whose
  low-latency or one-node normal-path wait runs out of time instead of raising (the `low_latency_*_mask_buffer` calls read and set the
  mask; an unmask needs `clean_low_latency_buffer` on every rank). See `low_latency_dispatch` for the two-buffer
  rule. The handle's src_info /
  layout_range and the zero-copy combine buffer are views of library-owned memory made with torch.as_tensor over
  __cuda_array_interface__, which needs NumPy installed.
* Redundant experts (ep's own): `map_experts(topk_idx, expert_map)` turns a router's logical top-k into physical
  expert slots, one live copy each (an EPLB placement; with shrink mode, a masked rank's experts are served by
  their copies on the other ranks). It runs on the current stream.
* Groups of several nodes (`ranks_per_node` < group size; without it, the ranks of each host) take the internode
  normal path (docs/internode.md): the same calls and return values; combine rounds each node's partial sum to
  bf16 before the last hop, as DeepEP does, so it is within bf16 rounding of the fp32 sum rather than bit-identical
  to the one-node order.

PyTorch is imported when a Buffer is made, not when `ep` is imported. Bounds that the library enforces too (the
largest top-k, hidden size, SM count, ...) come from the library itself (`ep._capi.limits()`).

The package's rooms: ep._checks (argument checks), ep._streams (EventOverlap and the comm stream),
ep._handles (DispatchHandle, LowLatencyHandle, views of library-owned memory), ep._normal (the normal path),
ep._low_latency (the low-latency path), ep._expert_map (the redundant-expert map), ep._capi (the ctypes
binding), ep.utils and ep._compat (DeepEP's deep_ep.utils, and install_as_deep_ep); this module is the facade that
holds them together: Config and Buffer (construction, lifecycle, settings).
"""

import ctypes
import weakref

from . import _capi
from ._checks import flag, int_arg, require_torch
from ._handles import DeviceViews, DispatchHandle, LowLatencyHandle
from ._expert_map import ExpertMapPath
from ._nodes import host_id, ranks_per_node_of
from ._low_latency import LowLatencyPath
from ._normal import NormalPath
from ._streams import EventOverlap

DEFAULT_MAX_TOKENS_PER_RANK = 4096  # the hint when none is given and the buffers are sized from the hints
# Calls' ceiling with a byte pool (num_nvl_bytes): the handle holds routing for this many tokens (about 8 bytes a
# token and rank); the symmetric region holds what num_nvl_bytes holds, and larger calls run in rounds.
POOL_MAX_TOKENS_PER_RANK = 65536
# Tokens a round of the normal path on a low-latency-only Buffer (DeepEP's Buffer(group, 0, num_rdma_bytes,
# low_latency_mode=True), which has no NVLink buffer and so no normal path in DeepEP): ep keeps one, this small, so
# that such a Buffer takes about DeepEP's memory (EP8, hidden 7168: 31 MiB, against 506 MiB for the default
# hint) and a normal call on it still runs, in rounds.
LL_ONLY_TOKENS_PER_ROUND = 256

__all__ = ["Buffer", "Config", "EventOverlap", "DispatchHandle", "LowLatencyHandle"]


class Config:
    """Per-call tuning, DeepEP's `Config` signature:

    Config(num_sms=None, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
           num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256)

    Only `num_sms` (SMs a dispatch or combine may use; None = the library's default, EP_DEFAULT_NUM_SMS = 24) is
    used; the chunk sizes describe DeepEP's ring buffers, which `ep` does not have, and are kept only so that code
    that builds a Config keeps working. DeepEP requires an even num_sms; `ep` takes any value from 1 to the
    library's EP_MAX_SMS (1024). Checking it loads libep.so (not PyTorch)."""

    def __init__(self, num_sms=None, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
                 num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256):
        limits = _capi.limits()
        if num_sms is None:
            num_sms = limits.default_num_sms
        self.num_sms = int_arg("Config", "num_sms", num_sms, 1, limits.max_sms)
        self.num_max_nvl_chunked_send_tokens = int_arg(
            "Config", "num_max_nvl_chunked_send_tokens", num_max_nvl_chunked_send_tokens, 1)
        self.num_max_nvl_chunked_recv_tokens = int_arg(
            "Config", "num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens, 1)
        self.num_max_rdma_chunked_send_tokens = int_arg(
            "Config", "num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens, 1)
        self.num_max_rdma_chunked_recv_tokens = int_arg(
            "Config", "num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens, 1)

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        """DeepEP's NVLink buffer size for rows of `hidden_bytes` in a group of `num_ranks`, 128-aligned: what
        DeepEP would allocate for this Config (channels = num_sms / 2, each with a receive ring of
        num_max_nvl_chunked_recv_tokens rows per NVLink peer). Given to `Buffer(group, num_nvl_bytes)`, ep uses at
        most these bytes for the normal path (larger calls run in rounds)."""
        channels, nvl_ranks, rdma_ranks = self._channels_and_ranks(hidden_bytes, num_ranks)
        row_bytes = hidden_bytes + 8 + 128 * 8 + 128 * 4 + 128 * 4  # row, source info, top-k, weights, scales
        heads = channels * nvl_ranks * (2 * rdma_ranks + 3) * 4
        return _align128(heads + channels * nvl_ranks * self.num_max_nvl_chunked_recv_tokens * row_bytes)

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        """DeepEP's RDMA buffer size (0 within one node of 8 ranks), 128-aligned, for code that adds it up."""
        channels, _, rdma_ranks = self._channels_and_ranks(hidden_bytes, num_ranks)
        if num_ranks <= 8:
            return 0
        row_bytes = hidden_bytes + 8 + 1024 + 512 + 512 + 16
        return _align128(channels * rdma_ranks * 18 * 2 * 4 +
                         2 * channels * rdma_ranks * self.num_max_rdma_chunked_recv_tokens * row_bytes)

    def _channels_and_ranks(self, hidden_bytes, num_ranks):
        int_arg("Config", "hidden_bytes", hidden_bytes, 1, c_int=False)
        int_arg("Config", "num_ranks", num_ranks, 1, c_int=False)
        return max(1, self.num_sms // 2), min(num_ranks, 8), max(1, num_ranks // 8)

    def __repr__(self):
        return (f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens="
                f"{self.num_max_nvl_chunked_send_tokens}, num_max_nvl_chunked_recv_tokens="
                f"{self.num_max_nvl_chunked_recv_tokens}, num_max_rdma_chunked_send_tokens="
                f"{self.num_max_rdma_chunked_send_tokens}, num_max_rdma_chunked_recv_tokens="
                f"{self.num_max_rdma_chunked_recv_tokens})")


def normal_sizes(one_node, num_nvl_bytes, num_rdma_bytes, ll_region_bytes, max_tokens_per_rank, pool_for_tokens):
    """(config.max_tokens_per_rank, config.normal_region_bytes) of a Buffer. With the max_tokens_per_rank hint: the
    hint, and regions sized from the hints. Else DeepEP's byte sizes are the pool of the normal path's regions:
    num_nvl_bytes on one node, num_nvl_bytes + num_rdma_bytes on several (DeepEP's NVLink and RDMA buffers of its
    internode path) less ll_region_bytes (DeepEP's low-latency mode uses its RDMA buffer too, so the LL buffer and the
    pool share those bytes and the Buffer takes no more than DeepEP's); calls of up to POOL_MAX_TOKENS_PER_RANK tokens
    run in rounds of what it holds. Only LL bytes (DeepEP's low-latency-only Buffer): a pool of
    LL_ONLY_TOKENS_PER_ROUND tokens a round, pool_for_tokens(n) being the library's bytes for n tokens a round. No
    bytes: DEFAULT_MAX_TOKENS_PER_RANK, sized from the hints."""
    if max_tokens_per_rank is not None:
        return max_tokens_per_rank, 0
    pool = num_nvl_bytes if one_node else num_nvl_bytes + num_rdma_bytes - ll_region_bytes
    if pool > 0:
        return POOL_MAX_TOKENS_PER_RANK, pool
    if ll_region_bytes > 0:
        return POOL_MAX_TOKENS_PER_RANK, pool_for_tokens(LL_ONLY_TOKENS_PER_ROUND)
    return DEFAULT_MAX_TOKENS_PER_RANK, 0


def _align128(n):
    return (n + 127) // 128 * 128


def _destroy_group(lib, group_ptr, ll_handles):
    """weakref.finalize target: must not reference the Buffer. LL handles go first (they point into the group)."""
    try:
        while ll_handles:
            lib.ep_ll_handle_destroy(ll_handles.pop())
        lib.ep_group_destroy(group_ptr)
    except Exception:  # interpreter teardown: nothing sensible left to do
        pass


class _BufferType(type):
    """Gives Buffer its class-level `num_sms` (as DeepEP's): the SMs of a normal dispatch / combine without a
    Config. Until set, it is the library's EP_DEFAULT_NUM_SMS, read on first use so that importing ep loads
    nothing."""

    @property
    def num_sms(cls):
        if cls._num_sms is None:
            cls._num_sms = _capi.limits().default_num_sms
        return cls._num_sms

    @num_sms.setter
    def num_sms(cls, value):
        cls._num_sms = int_arg(f"{cls.__name__}.num_sms", "num_sms", value, 1, _capi.limits().max_sms)


class Buffer(NormalPath, LowLatencyPath, ExpertMapPath, metaclass=_BufferType):
    """Expert-parallel dispatch and combine over one group of GPUs, DeepEP V1's `Buffer` API (normal and
    low-latency paths).

    Buffer(group=None, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
           allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=False, *,
           num_experts=256, hidden=7168, max_tokens_per_rank=None, max_topk=8, ranks_per_node=None,
           timeout_seconds=20.0, use_fabric=False, enable_shrink=False, ll_max_tokens_per_rank=None, max_sms=0,
           comm=None)

    group: a torch.distributed ProcessGroup (None = the default group); it is used once, to broadcast the
      128-byte bootstrap id from rank 0. `comm` (an mpi4py communicator) may replace it.
    num_nvl_bytes: with max_tokens_per_rank left None, the most bytes of symmetric memory the normal path takes
      (config.normal_region_bytes; on several nodes num_nvl_bytes + num_rdma_bytes, for its intranode and internode
      regions together): the regions hold as many tokens of `hidden` and `max_topk` a round as fit, and a call of
      more runs in rounds (same results); calls take up to POOL_MAX_TOKENS_PER_RANK (65536) tokens, a bound of the
      handle's routing arrays only (about 8 bytes a token and rank on one node, 16 on several). Fewer bytes than
      one token needs raise EpError. In low-latency mode on several nodes the LL buffer's num_rdma_bytes are not
      pooled again; num_nvl_bytes 0 in low-latency mode (DeepEP's LL-only Buffer) gives a pool of
      LL_ONLY_TOKENS_PER_ROUND (256) tokens a round. Otherwise ignored.
    low_latency_mode: True reserves the low-latency buffer (symmetric memory) and two LL handles, so that the
      low_latency_* methods work; the normal path works either way. The buffer is num_rdma_bytes, as DeepEP's
      (e.g. get_low_latency_rdma_size_hint(T, hidden, R, E)), unless ll_max_tokens_per_rank is given or
      num_rdma_bytes is 0: then get_low_latency_rdma_size_hint() bytes for the hints. Sized in bytes, each
      low_latency_dispatch must fit in them (EpError naming the bytes its shape needs), and the num_experts and
      hidden hints bound no LL call.
    num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric: accepted and ignored.
    enable_shrink: True keeps a rank mask (DeepEP's shrink mode; config.mask_failed_ranks): a low-latency wait on a
      peer that runs out of timeout_seconds masks that peer on this rank and the call succeeds without it (its
      experts' top-k entries dropped, 0 rows from it); low_latency_update_mask_buffer / query / clean read and set
      the mask. A Buffer with a masked rank is destroyed on each rank alone (NVSHMEM's shutdown needs every peer).
      The normal path honours the mask the same way (dispatch / combine with the mask's experts dropped, 0 rows
      from a masked rank; on several nodes a source whose rail peer on node m is masked also loses node m's
      experts); after an unmask it raises EpError (a new Buffer takes the rank back). False: every timeout is an
      error.
    explicitly_destroy: False -> the group is destroyed when the Buffer is garbage-collected or at interpreter
      exit; True -> only `destroy()` does it (recommended: destroy is collective, and a rank that died would
      leave the others waiting at exit).
    num_experts, hidden, max_tokens_per_rank, max_topk: the largest shapes any call will use; they size the
      symmetric buffers (the group reports its heap in `info["symmetric_heap_bytes"]`); max_tokens_per_rank None:
      4096, or 65536 with the pool above. hidden: a multiple of 128 up to the library's EP_MAX_HIDDEN (65536);
      max_topk up to EP_MAX_TOPK (32).
    ll_max_tokens_per_rank (ep only, keyword, used with low_latency_mode=True): the largest
      num_max_dispatch_tokens_per_rank any low_latency_dispatch will pass, from 1 to the library's
      EP_LL_MAX_TOKENS_PER_RANK (8192); default (None) 128. The group is created here, so this hint, not the
      first call, sizes the LL buffer (with num_rdma_bytes: the handles); a larger call raises ValueError.
    ranks_per_node: ranks per NVLink domain (node), 0 = all; a smaller divisor of the group size makes the
      normal path run internode (on one host: virtual nodes, for testing). None (the default, as DeepEP finds its
      nodes itself): the ranks of each host, from every rank's host name and boot id (one collective exchange);
      the hosts must hold blocks of consecutive ranks of one size, else ValueError.
    timeout_seconds: budget of every device-side wait on a peer, up to EP_MAX_TIMEOUT_SECONDS (3600); past it the
      next call raises EpError naming the peer (DeepEP: a printf and a trap that kills the process).
    max_sms (ep only, keyword): the most SMs any kernel of this Buffer occupies at once, 0 to EP_MAX_SMS (1024;
      0 = all the device reports, `info["device_sms"]`): a Config's num_sms above it is clamped, and the
      low-latency kernels, which otherwise take every SM, stay under it. For leaving SMs to compute that
      overlaps, or for ranks that share a GPU under CUDA MPS.

    The device is `torch.cuda.current_device()` at construction. One Buffer per process at a time (the library
    holds one group per process); `destroy()` frees it so that another can be made. The limits above are the
    library's (ep._capi.limits()); the numbers in brackets are those of this version.

    Class-level `num_sms` (as in DeepEP): SMs of a normal dispatch / combine without a Config; until set (with
    set_num_sms), the library's EP_DEFAULT_NUM_SMS (24).
    """

    _num_sms = None  # Buffer.num_sms once set (see _BufferType)

    def __init__(self, group=None, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=False, *,
                 num_experts=256, hidden=7168, max_tokens_per_rank=None, max_topk=8, ranks_per_node=None,
                 timeout_seconds=20.0, use_fabric=False, enable_shrink=False, ll_max_tokens_per_rank=None, max_sms=0,
                 comm=None):
        fn = "Buffer"
        self._group_ptr = None
        self._finalizer = None
        self._ll_slots = []  # the two ep_ll_handle_t of the LL path (shared with the finalizer)
        # Checks that need no torch, with the library's limits.
        limits = _capi.limits()
        int_arg(fn, "num_experts", num_experts, 1)
        int_arg(fn, "hidden", hidden, 128, limits.max_hidden)
        if hidden % 128:
            raise ValueError(f"{fn}: hidden is {hidden}; it must be a positive multiple of 128")
        if max_tokens_per_rank is not None:
            int_arg(fn, "max_tokens_per_rank", max_tokens_per_rank, 1)
        int_arg(fn, "max_topk", max_topk, 1, limits.max_topk)
        if ranks_per_node is not None:
            int_arg(fn, "ranks_per_node", ranks_per_node, 0)
        int_arg(fn, "max_sms", max_sms, 0, limits.max_sms)
        if not isinstance(timeout_seconds, (int, float)) or not 0 < timeout_seconds <= limits.max_timeout_seconds:
            raise ValueError(f"{fn}: timeout_seconds is {timeout_seconds!r}; it must be in "
                             f"(0, {limits.max_timeout_seconds}]")
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            int_arg(fn, name, v, 0, c_int=False)  # DeepEP's byte counts (size_t in C)
        enable_shrink = flag(fn, "enable_shrink", enable_shrink)
        low_latency_mode = bool(low_latency_mode)
        # DeepEP sizes the low-latency buffer in bytes: num_rdma_bytes, unless the ll hint was given.
        ll_region_bytes = num_rdma_bytes if low_latency_mode and ll_max_tokens_per_rank is None else 0
        ll_max_tokens_per_rank = 128 if ll_max_tokens_per_rank is None else ll_max_tokens_per_rank
        if low_latency_mode:
            int_arg(fn, "ll_max_tokens_per_rank", ll_max_tokens_per_rank, 1, limits.ll_max_tokens_per_rank,
                    "the largest num_max_dispatch_tokens_per_rank of any low_latency_dispatch")

        torch = require_torch("ep.Buffer")
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
        if ranks_per_node is None:
            if comm is not None:
                hosts = comm.allgather(host_id())
            else:
                hosts = [None] * size
                dist.all_gather_object(hosts, host_id(), group=group)
            ranks_per_node = ranks_per_node_of(fn, hosts)

        def pool_for_tokens(tokens):
            return _capi.normal_region_size_hint(tokens, hidden, size, ranks_per_node, num_experts, max_topk)

        max_tokens_per_rank, normal_region_bytes = normal_sizes(ranks_per_node in (0, size), num_nvl_bytes,
                                                                num_rdma_bytes, ll_region_bytes, max_tokens_per_rank,
                                                                pool_for_tokens)
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
        self._views = DeviceViews(self.device)  # tensors over library-owned device memory (LL routing, zero-copy)
        self._comm_stream = torch.cuda.Stream(device=self.device, priority=-1)  # high priority, as DeepEP's
        cfg = _capi.GroupConfig.init(ranks_per_node=ranks_per_node, num_experts=num_experts, hidden=hidden,
                                     max_tokens_per_rank=max_tokens_per_rank, max_topk=max_topk, num_sms=0,
                                     max_sms=max_sms,
                                     ll_max_tokens_per_rank=ll_max_tokens_per_rank if low_latency_mode else 0,
                                     timeout_seconds=float(timeout_seconds),
                                     normal_region_bytes=normal_region_bytes, ll_region_bytes=ll_region_bytes,
                                     mask_failed_ranks=int(enable_shrink))
        g = ctypes.c_void_p()
        _capi.check(lib.ep_group_create(ctypes.byref(g), ctypes.byref(uid), rank, size, self.device,
                                        ctypes.byref(cfg)), None)
        self._lib = lib
        self._limits = limits
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
        self.enable_shrink = enable_shrink
        self.ll_max_tokens_per_rank = ll_max_tokens_per_rank if low_latency_mode else 0
        self.ll_region_bytes = ll_region_bytes  # 0: the LL buffer is sized from the hints
        self.explicitly_destroy = explicitly_destroy
        self.num_experts, self.hidden = num_experts, hidden
        self.max_tokens_per_rank, self.max_topk = max_tokens_per_rank, max_topk
        self.normal_region_bytes = normal_region_bytes  # 0: sized from the hints
        self.num_nodes = info.num_nodes
        self.timeout_seconds = float(timeout_seconds)
        self._device_str = f"cuda:{self.device}"

    @property
    def num_sms(self):
        """The class-level num_sms (type(self).num_sms), seen from an instance as with DeepEP's class attribute."""
        return type(self).num_sms

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def destroy(self):
        """Destroy the group (collective: every rank calls it). Idempotent; later calls on the Buffer raise.
        Unlike DeepEP, allowed whether or not explicitly_destroy was set."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        ptr, self._group_ptr = self._group_ptr, None
        if ptr is not None:
            self._views.clear()
            # The LL handles' memory is freed in stream order after the library's last use, but tensors over it
            # (src_info, layout_range, the zero-copy buffer) may still be read by work queued on the caller's
            # streams: let the device finish them first.
            require_torch("Buffer.destroy").cuda.synchronize(self.device)
            while self._ll_slots:
                self._lib.ep_ll_handle_destroy(self._ll_slots.pop())
            _capi.check(self._lib.ep_group_destroy(ptr), None)

    def abort(self):
        """Tear the group down locally (ep_group_abort): not collective, waits for no peer and not for the device,
        so it returns promptly after a fatal fault (a timeout naming a peer that is gone). Later calls on the
        Buffer raise, and this process cannot create another Buffer (NVSHMEM's shutdown needs every peer): restart
        it. Idempotent; after destroy() it does nothing."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        ptr, self._group_ptr = self._group_ptr, None
        if ptr is not None:
            self._views.clear()
            self._ll_slots.clear()  # orphans of the aborted group: freeing their device memory would wait
            _capi.check(self._lib.ep_group_abort(ptr), None)

    def _alive(self, fn):
        """The group pointer; RuntimeError once the Buffer was destroyed."""
        if self._group_ptr is None:
            raise RuntimeError(f"{fn}: this Buffer was destroyed")
        return self._group_ptr

    def _stream(self):
        """The current stream of the Buffer's device, as a cudaStream_t (int) for the library."""
        return require_torch("ep.Buffer").cuda.current_stream(self.device).cuda_stream

    # ---- class-level settings and small utilities -----------------------------------------------------------
    @classmethod
    def set_num_sms(cls, new_num_sms):
        """SMs each normal dispatch / combine uses unless a Config says otherwise (default: the library's
        EP_DEFAULT_NUM_SMS, 24). Any value from 1 to EP_MAX_SMS (1024); DeepEP requires an even one."""
        cls.num_sms = int_arg("set_num_sms", "new_num_sms", new_num_sms, 1, _capi.limits().max_sms)

    @staticmethod
    def get_dispatch_config(num_ranks):
        """Config(num_sms=Buffer.num_sms) for any group size (DeepEP: tuned tables for listed sizes only)."""
        int_arg("get_dispatch_config", "num_ranks", num_ranks, 1)
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks):
        """Config(num_sms=Buffer.num_sms) for any group size (DeepEP: tuned tables for listed sizes only)."""
        int_arg("get_combine_config", "num_ranks", num_ranks, 1)
        return Config(Buffer.num_sms)

    @staticmethod
    def is_sm90_compiled():
        """True. DeepEP's clients ask it before using the FP8 paths; ep's run on every architecture libep.so is
        built for (sm_80 included: its FP8 cast is exact in software there), and ep_group_create refuses a device
        the build has no code for."""
        return True

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts, *,
                                       max_topk=8):
        """Bytes of symmetric memory the LL buffer takes for this shape (ep_ll_buffer_size_hint: both halves).
        Pass it as num_rdma_bytes with low_latency_mode=True, as with DeepEP. ep's size also depends on the
        largest top-k (keyword max_topk, default 8, the Buffer's default). Needs libep.so,
        not PyTorch."""
        fn = "get_low_latency_rdma_size_hint"
        for name, v in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank), ("hidden", hidden),
                        ("num_ranks", num_ranks), ("num_experts", num_experts), ("max_topk", max_topk)):
            int_arg(fn, name, v, 1)
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
        """NOT SUPPORTED (NotImplementedError): ep's symmetric buffers are internal to the library."""
        raise NotImplementedError("ep.Buffer.get_local_buffer_tensor is NOT SUPPORTED: ep's symmetric buffers are "
                                  "internal to the library and laid out per call")

    def capture(self):
        """An EventOverlap of an event recorded now on the current stream."""
        torch = require_torch("capture")
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
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
