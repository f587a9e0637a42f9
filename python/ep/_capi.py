"""ctypes binding of libep.so: the structs of include/ep.h, the function prototypes, and status checking.

This module imports nothing but the standard library, so it works (and its CPU tests run) without PyTorch.
The library is loaded on first use (`load()`), not at import:

  1. `EP_LIBRARY_PATH`, when set, names the file to load (and nothing else is tried);
  2. else `ep/_lib/libep.so`, the library that `pip install` put inside this package;
  3. else `<repository>/build/lib/libep.so`, found relative to this package (python/ep/ -> ../../build/lib);
  4. else `ctypes.util.find_library("ep")` (an installed libep.so on the loader's path).
libep.so finds NVSHMEM's host library and the CUDA runtime through the rpath it was built with. Where that path is
gone (a wheel built in pip's temporary build environment, or moved to another machine), the copies in NVIDIA's
Python wheels (nvidia-nvshmem-cu13, nvidia-cuda-runtime) are loaded first and the load is tried once more.

Every struct below mirrors its C twin field for field, in the header's order; tests/python/test_capi_layout.py
compiles a small C program against include/ep.h and compares every size and offset.
"""

import collections
import ctypes
import ctypes.util
import os
import sys
import threading

__all__ = [
    "EpError", "EpLibraryError", "load", "library_path", "check", "status_name", "last_error",
    "UniqueId", "GroupConfig", "GroupInfo", "LayoutArgs", "DispatchPrepareArgs", "DispatchArgs", "CombineArgs",
    "LLDispatchArgs", "LLCombineArgs", "Limits", "LLHandleState", "LimitValues", "ll_buffer_size_hint",
    "normal_region_size_hint", "limits", "ll_handle_state",
]

# ---- Constants of include/ep.h -------------------------------------------------------------------------------
EP_VERSION_MAJOR, EP_VERSION_MINOR, EP_VERSION_PATCH = 0, 1, 0
EP_VERSION_CODE = EP_VERSION_MAJOR * 10000 + EP_VERSION_MINOR * 100 + EP_VERSION_PATCH
EP_UNIQUE_ID_BYTES = 128

EP_GROUP_CONFIG_MAGIC = 0x45504731  # "EPG1"
EP_LAYOUT_ARGS_MAGIC = 0x45504C31  # "EPL1"
EP_DISPATCH_PREPARE_ARGS_MAGIC = 0x45505031  # "EPP1"
EP_DISPATCH_ARGS_MAGIC = 0x45504431  # "EPD1"
EP_COMBINE_ARGS_MAGIC = 0x45504331  # "EPC1"
EP_LL_DISPATCH_ARGS_MAGIC = 0x45504C44  # "EPLD"
EP_LL_COMBINE_ARGS_MAGIC = 0x45504C43  # "EPLC"
EP_EXPERT_MAP_MAGIC = 0x45504D31  # "EPM1"

# ep_status_t, in the header's order.
STATUS_NAMES = (
    "EP_STATUS_SUCCESS",
    "EP_STATUS_INVALID_ARGUMENT",
    "EP_STATUS_INVALID_USAGE",
    "EP_STATUS_UNSUPPORTED",
    "EP_STATUS_OUT_OF_MEMORY",
    "EP_STATUS_CUDA_ERROR",
    "EP_STATUS_SUBSTRATE_ERROR",
    "EP_STATUS_DEVICE_ERROR",
    "EP_STATUS_TIMEOUT",
    "EP_STATUS_INTERNAL_ERROR",
    "EP_STATUS_PEER_FAILED",
)
for _i, _name in enumerate(STATUS_NAMES):
    globals()[_name] = _i
EP_STATUS_COUNT = len(STATUS_NAMES)

# ep_dtype_t
EP_DTYPE_INVALID, EP_BF16, EP_FP8_E4M3, EP_FP32, EP_INT32, EP_INT64 = 0, 1, 2, 3, 4, 5


# ---- Errors ----------------------------------------------------------------------------------------------------
class EpLibraryError(ImportError):
    """libep.so could not be found or loaded. The message names every path tried and how to fix it."""


class EpError(RuntimeError):
    """A call into libep.so failed.

    Attributes: `status` (the ep_status_t value), `status_name` ("EP_STATUS_TIMEOUT"), `message` (the library's
    ep_last_error() text, which names the bad argument or the peer that stalled)."""

    def __init__(self, status_name, message, status=None):
        self.status_name = status_name
        self.message = message
        self.status = STATUS_NAMES.index(status_name) if status is None and status_name in STATUS_NAMES else status
        super().__init__(f"{status_name}: {message}" if message else status_name)


# ---- Structs (field order EXACTLY as in include/ep.h) ---------------------------------------------------------
_u32, _int, _dbl, _size, _ptr = ctypes.c_uint32, ctypes.c_int, ctypes.c_double, ctypes.c_size_t, ctypes.c_void_p


# ctypes stores an int into a C int field or argument modulo 2^32 without a word (2**32 + 1 becomes 1): every int
# that reaches C through this module is range-checked first, with an error naming the field or argument.
_INT_RANGES = {
    ctypes.c_int: (-2**31, 2**31 - 1),
    ctypes.c_uint32: (0, 2**32 - 1),
    ctypes.c_size_t: (0, 2**(8 * ctypes.sizeof(ctypes.c_size_t)) - 1),
    ctypes.c_void_p: (0, 2**(8 * ctypes.sizeof(ctypes.c_void_p)) - 1),
}


def c_int_range(ctype, where, value):
    """Raise OverflowError naming `where` unless an int `value` fits C type `ctype` (other values pass through to
    ctypes, which rejects wrong kinds with its own TypeError)."""
    bounds = _INT_RANGES.get(ctype)
    if bounds and isinstance(value, int) and not bounds[0] <= value <= bounds[1]:
        raise OverflowError(f"{where} is {value}; it must fit a C {ctype.__name__[2:]} "
                            f"([{bounds[0]}, {bounds[1]}])")
    return value


class _Checked(ctypes.Structure):
    """A struct whose int fields refuse values their C type cannot hold."""

    def __setattr__(self, name, value):
        for field, ctype in type(self)._fields_:
            if field == name:
                c_int_range(ctype, f"{type(self).__name__}.{name}", value)
                break
        super().__setattr__(name, value)


class UniqueId(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * EP_UNIQUE_ID_BYTES)]


class _Args(_Checked):
    """Base of the size/magic-headed argument structs: `init()` gives the struct its _INIT macro's values."""

    _MAGIC = 0
    _DEFAULTS = {}

    @classmethod
    def init(cls, **fields):
        s = cls()
        s.size = ctypes.sizeof(cls)
        s.magic = cls._MAGIC
        for k, v in {**cls._DEFAULTS, **fields}.items():
            if not hasattr(s, k):
                raise AttributeError(f"{cls.__name__} has no field {k!r}")
            setattr(s, k, v)
        return s


class _Sized(_Checked):
    """Base of the structs the library fills that open with a `size` field only: `init()` is their _INIT macro."""

    @classmethod
    def init(cls):
        s = cls()
        s.size = ctypes.sizeof(cls)
        return s


class Limits(_Sized):
    _fields_ = [
        ("size", _u32),
        ("max_ranks", _int),
        ("max_topk", _int),
        ("max_hidden", _int),
        ("ll_max_tokens_per_rank", _int),
        ("max_expert_alignment", _int),
        ("max_sms", _int),
        ("default_num_sms", _int),
        ("max_timeout_seconds", _int),
    ]


class LLHandleState(_Sized):
    _fields_ = [
        ("size", _u32),
        ("half", _int),
        ("serial", ctypes.c_uint64),
        ("is_current", _int),
        ("dispatch_recv_pending", _int),
        ("combine_recv_pending", _int),
    ]


class ExpertMap(_Args):
    _fields_ = [
        ("size", _u32),
        ("magic", _u32),
        ("slots", _ptr),  # int32 [num_logical_experts, max_copies] device, -1 = no copy
        ("num_logical_experts", _int),
        ("max_copies", _int),
        ("num_experts", _int),
    ]
    _MAGIC = EP_EXPERT_MAP_MAGIC


class GroupConfig(_Args):
    _fields_ = [
        ("size", _u32),
        ("magic", _u32),
        ("ranks_per_node", _int),
        ("num_experts", _int),
        ("hidden", _int),
        ("max_tokens_per_rank", _int),
        ("max_topk", _int),
        ("ll_max_tokens_per_rank", _int),
        ("num_sms", _int),
        ("max_sms", _int),
        ("timeout_seconds", _dbl),
        ("normal_region_bytes", _size),
        ("ll_region_bytes", _size),
        ("mask_failed_ranks", _int),
    ]
    _MAGIC = EP_GROUP_CONFIG_MAGIC
    # EP_GROUP_CONFIG_INIT
    _DEFAULTS = dict(ranks_per_node=0, num_experts=256, hidden=7168, max_tokens_per_rank=4096, max_topk=8,
                     ll_max_tokens_per_rank=0, num_sms=0, max_sms=0, timeout_seconds=20.0,
                     normal_region_bytes=0, ll_region_bytes=0, mask_failed_ranks=0)


class GroupInfo(_Checked):
    _fields_ = [
        ("rank", _int),
        ("num_ranks", _int),
        ("ranks_per_node", _int),
        ("num_nodes", _int),
        ("node", _int),
        ("local_rank", _int),
        ("cuda_device", _int),
        ("num_nvlink_peers", _int),
        ("num_sms", _int),
        ("device_sms", _int),
        ("symmetric_heap_bytes", _size),
    ]


class LayoutArgs(_Args):
    _fields_ = [
        ("size", _u32),
        ("magic", _u32),
        ("topk_idx", _ptr),
        ("num_tokens", _int),
        ("num_topk", _int),
        ("num_experts", _int),
        ("num_tokens_per_rank", _ptr),
        ("num_tokens_per_node", _ptr),
        ("num_tokens_per_expert", _ptr),
        ("is_token_in_rank", _ptr),
    ]
    _MAGIC = EP_LAYOUT_ARGS_MAGIC


class DispatchPrepareArgs(_Args):
    _fields_ = [
        ("size", _u32),
        ("magic", _u32),
        ("topk_idx", _ptr),
        ("num_tokens", _int),
        ("num_topk", _int),
        ("num_experts", _int),
        ("expert_alignment", _int),
        ("num_recv_tokens", _ptr),             # host int*
        ("num_recv_tokens_per_expert", _ptr),  # host int*
        ("num_recv_tokens_dev", _ptr),
        ("num_recv_tokens_per_expert_dev", _ptr),
        ("is_token_in_rank", _ptr),       # rank-mask form (topk_idx NULL, num_topk 0): bool [num_tokens, R]
        ("num_tokens_per_expert", _ptr),  # with it: int32 [num_experts], or NULL
    ]
    _MAGIC = EP_DISPATCH_PREPARE_ARGS_MAGIC
    _DEFAULTS = dict(expert_alignment=1)


class DispatchArgs(_Args):
    _fields_ = [
        ("size", _u32),
        ("magic", _u32),
        ("x", _ptr),
        ("x_dtype", _int),  # ep_dtype_t
        ("hidden", _int),
        ("x_scales", _ptr),
        ("topk_idx", _ptr),
        ("topk_weights", _ptr),
        ("recv_capacity", _int),
        ("recv_x", _ptr),
        ("recv_x_scales", _ptr),
        ("recv_topk_idx", _ptr),
        ("recv_topk_weights", _ptr),
        ("recv_src_idx", _ptr),
        ("num_sms", _int),
    ]
    _MAGIC = EP_DISPATCH_ARGS_MAGIC
    _DEFAULTS = dict(x_dtype=EP_BF16)


class CombineArgs(_Args):
    _fields_ = [
        ("size", _u32),
        ("magic", _u32),
        ("x", _ptr),
        ("hidden", _int),
        ("topk_weights", _ptr),
        ("bias0", _ptr),
        ("bias1", _ptr),
        ("combined_x", _ptr),
        ("combined_topk_weights", _ptr),
        ("num_sms", _int),
    ]
    _MAGIC = EP_COMBINE_ARGS_MAGIC


class LLDispatchArgs(_Args):
    _fields_ = [
        ("size", _u32),
        ("magic", _u32),
        ("x", _ptr),
        ("num_tokens", _int),
        ("hidden", _int),
        ("topk_idx", _ptr),
        ("num_topk", _int),
        ("num_experts", _int),
        ("max_tokens_per_rank", _int),
        ("recv_dtype", _int),  # ep_dtype_t
        ("round_scale", _int),
        ("use_ue8m0", _int),
        ("recv_x", _ptr),
        ("recv_x_scales", _ptr),
        ("recv_count", _ptr),
        ("return_after_send", _int),
        ("topk_weights", _ptr),
        ("wait_recv_cost_stats", _ptr),
    ]
    _MAGIC = EP_LL_DISPATCH_ARGS_MAGIC
    _DEFAULTS = dict(recv_dtype=EP_FP8_E4M3)


class LLCombineArgs(_Args):
    _fields_ = [
        ("size", _u32),
        ("magic", _u32),
        ("x", _ptr),
        ("topk_weights", _ptr),
        ("out", _ptr),
        ("zero_copy", _int),
        ("return_after_send", _int),
        ("sum_on_expert_ranks", _int),
        ("wait_recv_cost_stats", _ptr),
        ("use_logfmt", _int),
        ("renormalize_masked", _int),
    ]
    _MAGIC = EP_LL_COMBINE_ARGS_MAGIC


# Every mirrored struct, by its C type name (the layout test walks this table).
STRUCTS = {
    "ep_unique_id_t": UniqueId,
    "ep_group_config_t": GroupConfig,
    "ep_group_info_t": GroupInfo,
    "ep_layout_args_t": LayoutArgs,
    "ep_dispatch_prepare_args_t": DispatchPrepareArgs,
    "ep_dispatch_args_t": DispatchArgs,
    "ep_combine_args_t": CombineArgs,
    "ep_ll_dispatch_args_t": LLDispatchArgs,
    "ep_ll_combine_args_t": LLCombineArgs,
    "ep_limits_t": Limits,
    "ep_ll_handle_state_t": LLHandleState,
    "ep_expert_map_t": ExpertMap,
}

# ---- Function prototypes ---------------------------------------------------------------------------------------
_S = ctypes.c_int  # ep_status_t
_P = ctypes.POINTER
_PROTOTYPES = {
    "ep_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "ep_get_version": (_S, [_P(ctypes.c_int)]),
    "ep_get_limits": (_S, [_P(Limits)]),
    "ep_get_unique_id": (_S, [_P(UniqueId)]),
    "ep_group_create": (_S, [_P(_ptr), _P(UniqueId), _int, _int, _int, _P(GroupConfig)]),
    "ep_group_destroy": (_S, [_ptr]),
    "ep_group_abort": (_S, [_ptr]),
    "ep_group_get_info": (_S, [_ptr, _P(GroupInfo)]),
    "ep_last_error": (ctypes.c_char_p, [_ptr]),
    "ep_get_async_error": (_S, [_ptr, _P(ctypes.c_int)]),
    "ep_group_check": (_S, [_ptr, _ptr]),
    "ep_group_mask_rank": (_S, [_ptr, _int, _int, _ptr]),
    "ep_group_get_rank_mask": (_S, [_ptr, _ptr, _ptr]),
    "ep_group_clear_rank_mask": (_S, [_ptr, _ptr]),
    "ep_map_experts": (_S, [_ptr, _P(ExpertMap), _ptr, _ptr, _int, _int, _ptr]),
    "ep_get_dispatch_layout": (_S, [_ptr, _P(LayoutArgs), _ptr]),
    "ep_handle_create": (_S, [_ptr, _P(_ptr)]),
    "ep_handle_memory_bytes": (_S, [_ptr, _P(_size)]),
    "ep_handle_create_in": (_S, [_ptr, _ptr, _size, _P(_ptr)]),
    "ep_handle_destroy": (_S, [_ptr]),
    "ep_dispatch_prepare": (_S, [_ptr, _ptr, _P(DispatchPrepareArgs), _ptr]),
    "ep_handle_get_rank_prefix": (_S, [_ptr, _ptr, _ptr, _ptr]),
    "ep_dispatch": (_S, [_ptr, _ptr, _P(DispatchArgs), _ptr]),
    "ep_combine": (_S, [_ptr, _ptr, _P(CombineArgs), _ptr]),
    "ep_normal_region_size_hint": (_S, [_int, _int, _int, _int, _int, _int, _P(_size)]),
    "ep_ll_buffer_size_hint": (_S, [_int, _int, _int, _int, _int, _P(_size)]),
    "ep_ll_handle_create": (_S, [_ptr, _P(_ptr)]),
    "ep_ll_handle_destroy": (_S, [_ptr]),
    "ep_ll_dispatch": (_S, [_ptr, _ptr, _P(LLDispatchArgs), _ptr]),
    "ep_ll_dispatch_recv": (_S, [_ptr, _ptr, _ptr]),
    "ep_ll_get_routing": (_S, [_ptr, _P(_ptr), _P(_ptr)]),
    "ep_ll_get_combine_buffer": (_S, [_ptr, _ptr, _P(_ptr)]),
    "ep_ll_combine": (_S, [_ptr, _ptr, _P(LLCombineArgs), _ptr]),
    "ep_ll_combine_recv": (_S, [_ptr, _ptr, _ptr]),
    "ep_ll_clean": (_S, [_ptr, _ptr]),
    "ep_ll_handle_get_state": (_S, [_ptr, _P(LLHandleState)]),
}

_lock = threading.Lock()
_lib = None
_lib_path = None


def _candidates():
    """(path or None, origin) pairs, in the order load() tries them."""
    env = os.environ.get("EP_LIBRARY_PATH")
    if env:
        yield env, "EP_LIBRARY_PATH"
        return
    here = os.path.dirname(os.path.abspath(__file__))
    bundled = os.path.join(here, "_lib", "libep.so")
    if os.path.exists(bundled):
        yield bundled, "the library installed with this package"
    repository_build = os.path.normpath(os.path.join(here, "..", "..", "build", "lib", "libep.so"))
    yield repository_build, "the repository's build directory"
    yield ctypes.util.find_library("ep"), "ctypes.util.find_library('ep')"  # asked only if the above failed


# Libraries libep.so needs at run time, by soname, and where NVIDIA's Python wheels put them (under site-packages).
_WHEEL_LIBRARIES = {
    "libnvshmem_host.so.3": os.path.join("nvidia", "nvshmem", "lib", "libnvshmem_host.so.3"),
    "libcudart.so.13": os.path.join("nvidia", "cu13", "lib", "libcudart.so.13"),
}
_preloaded = {}  # soname -> ctypes.CDLL, kept so that the libraries stay loaded


def wheel_library(soname):
    """The path of `soname` in an installed NVIDIA wheel (first sys.path entry that has it), or None."""
    relative = _WHEEL_LIBRARIES[soname]
    for entry in sys.path:
        path = os.path.join(entry or os.getcwd(), relative)
        if os.path.isfile(path):
            return path
    return None


def _preload_missing(error):
    """After ctypes.CDLL failed with `error`: load, globally, each wheel library that the error names, so that the
    dynamic loader finds it by soname on the next try. Returns the paths loaded (empty: nothing to try)."""
    loaded = []
    for soname in _WHEEL_LIBRARIES:
        if soname in str(error) and soname not in _preloaded:
            path = wheel_library(soname)
            if path is not None:
                _preloaded[soname] = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                loaded.append(path)
    return loaded


def _open(path):
    """ctypes.CDLL(path), tried again while each failure names a runtime library that a wheel can supply (a finite
    list, each loaded once). Raises OSError as ctypes does, naming what was loaded before the last try."""
    preloaded = []
    while True:
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            more = _preload_missing(e)
            if not more:
                raise OSError(f"{e} (after loading {', '.join(preloaded)})" if preloaded else str(e)) from e
            preloaded += more


def _range_checked(name, fn, argtypes):
    """`fn` behind a range check of its int arguments (only functions with plain int arguments get one; none of
    them is on a hot path). Pointer arguments pass as they are."""
    def call(*args):
        for i, (t, v) in enumerate(zip(argtypes, args)):
            if t is not _ptr:
                c_int_range(t, f"{name}: argument {i + 1}", v)
        return fn(*args)
    call.__name__ = name
    call.argtypes, call.restype = fn.argtypes, fn.restype
    return call


def _version_str(code):
    """'0.1.0' for EP_VERSION_CODE 100."""
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}"


def load():
    """Load libep.so once (thread-safe) and return the ctypes.CDLL. Raises EpLibraryError naming what it tried.

    ctypes.CDLL releases the GIL during every call, so a call that waits (an eager dispatch waiting for counts, a
    collective group creation) does not block other Python threads."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        tried = []
        for path, origin in _candidates():
            if path is None:
                tried.append(f"{origin}: found nothing")
                continue
            if os.sep in path and not os.path.exists(path):
                tried.append(f"{path} ({origin}): no such file")
                continue
            try:
                lib = _open(path)
            except OSError as e:
                tried.append(f"{path} ({origin}): {e}")
                continue
            missing = [n for n in _PROTOTYPES if not hasattr(lib, n)]
            if missing:
                tried.append(f"{path} ({origin}): not a libep.so of this version (lacks {', '.join(missing)})")
                continue
            for name, (restype, argtypes) in _PROTOTYPES.items():
                fn = getattr(lib, name)
                fn.restype = restype
                fn.argtypes = argtypes
                if any(t in _INT_RANGES and t is not _ptr for t in argtypes):
                    setattr(lib, name, _range_checked(name, fn, argtypes))
            version = ctypes.c_int(-1)
            lib.ep_get_version(ctypes.byref(version))
            if version.value != EP_VERSION_CODE:
                tried.append(f"{path} ({origin}): libep.so version {_version_str(version.value)}, this package is "
                             f"{_version_str(EP_VERSION_CODE)}")
                continue
            _lib, _lib_path = lib, path
            return lib
        detail = "; ".join(tried)
        raise EpLibraryError(
            f"cannot load libep.so: {detail}. Build it with `make` in the repository root (it produces "
            f"build/lib/libep.so), install the package with `pip install .` there, or set EP_LIBRARY_PATH to the "
            f"full path of a built libep.so.")


def library_path():
    """The path of the loaded library (loads it if needed)."""
    load()
    return _lib_path


def status_name(status):
    """The library's name for a status code ("EP_STATUS_TIMEOUT")."""
    return load().ep_status_string(int(status)).decode()


def last_error(group=None):
    """ep_last_error(group) as str; group is a raw ep_group_t (int or None)."""
    msg = load().ep_last_error(group)
    return msg.decode(errors="replace") if msg else ""


def check(status, group=None):
    """Raise EpError(status_name, ep_last_error(group)) unless status is EP_STATUS_SUCCESS."""
    if status != 0:
        raise EpError(status_name(status), last_error(group), status=int(status))


def normal_region_size_hint(tokens_per_round, hidden, num_ranks, ranks_per_node, num_experts, max_topk):
    """ep_normal_region_size_hint(): bytes of config.normal_region_bytes that hold tokens_per_round tokens a round
    (on several nodes both normal regions). Raises EpError (EP_STATUS_INVALID_ARGUMENT naming the argument) for a
    shape the library rejects."""
    n = ctypes.c_size_t(0)
    check(load().ep_normal_region_size_hint(int(tokens_per_round), int(hidden), int(num_ranks), int(ranks_per_node),
                                            int(num_experts), int(max_topk), ctypes.byref(n)), None)
    return n.value


def ll_buffer_size_hint(max_tokens_per_rank, hidden, num_ranks, num_experts, max_topk):
    """ep_ll_buffer_size_hint(): bytes of symmetric memory the low-latency buffer needs for this shape (both
    halves). Raises EpError (EP_STATUS_INVALID_ARGUMENT naming the argument) for a shape the library rejects."""
    n = ctypes.c_size_t(0)
    check(load().ep_ll_buffer_size_hint(int(max_tokens_per_rank), int(hidden), int(num_ranks), int(num_experts),
                                        int(max_topk), ctypes.byref(n)), None)
    return n.value


# The fields of ep_limits_t but `size`, as an immutable tuple (see limits()).
LimitValues = collections.namedtuple("LimitValues", [name for name, _ in Limits._fields_ if name != "size"])
_limits = None


def limits():
    """The library's limits (ep_get_limits: EP_MAX_TOPK, EP_LL_MAX_TOKENS_PER_RANK, ... of include/ep.h), read once
    and kept, as a LimitValues named tuple (limits().max_topk == 32). Loads the library. The package's argument
    checks take their bounds from here, so that they never disagree with the library's."""
    global _limits
    if _limits is None:
        s = Limits.init()
        check(load().ep_get_limits(ctypes.byref(s)), None)
        _limits = LimitValues(**{name: getattr(s, name) for name in LimitValues._fields})
    return _limits


def ll_handle_state(handle):
    """ep_ll_handle_get_state(handle) as an LLHandleState: where the LL handle (a raw ep_ll_handle_t) stands in the
    two-buffer turn-taking (serial, half, is_current, dispatch_recv_pending, combine_recv_pending)."""
    s = LLHandleState.init()
    check(load().ep_ll_handle_get_state(handle, ctypes.byref(s)), None)
    return s
