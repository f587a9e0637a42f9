"""Argument checks of the Python API, made before any kernel runs so that every rank raises the same error in step.

Each check raises TypeError (wrong kind) or ValueError (wrong value) with a message that names the call, the
argument, what it must be and what was given. Bounds that the library also enforces come from `_capi.limits()`.
`require_torch` imports PyTorch on first use and says plainly when it is missing.
"""

_torch = None


def require_torch(what):
    """Import torch on first use (later calls return it at once); without it, say plainly that `what` needs it."""
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


C_INT_MAX = 2**31 - 1


def int_arg(fn, name, value, lo, hi=None, hint=None, c_int=True):
    """`value` as an int in [lo, hi]; `hint` says how to raise the bound. hi None: at most C_INT_MAX when the value
    goes to C as an int (c_int; ctypes would silently keep it modulo 2^32), else no upper bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if hi is None and c_int:
        hi, hint = C_INT_MAX, hint or "the library takes it as a C int"
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{fn}: {name} is {value}; it must be {rng}" + (f" ({hint})" if hint else ""))
    return value


def flag(fn, name, value):
    """`value` as a bool (True, False, 1 or 0)."""
    if not isinstance(value, bool) and value not in (0, 1):
        raise TypeError(f"{fn}: {name} must be a bool, got {value!r}")
    return bool(value)


def tensor(device, fn, name, t, dtype, shape, desc, *, align16=True):
    """`t` as a contiguous torch tensor of `dtype` on CUDA device `device` (an index), of `shape` (ints, or None for
    any size); `desc` describes the shape in the message. align16: the data must start on a 16-byte boundary (the
    kernels move 16 bytes at a time)."""
    torch = require_torch(fn)
    want = f"{dtype} {desc} contiguous on cuda:{device}"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor ({want}), got {type(t).__name__}")
    got = f"{t.dtype} {list(t.shape)}{'' if t.is_contiguous() else ' non-contiguous'} on {t.device}"
    if t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must be {want}, got {got}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise ValueError(f"{fn}: {name} must be {want}, got {got}")
    if t.device.type != "cuda" or t.device.index != device:
        raise ValueError(f"{fn}: {name} must be {want}, got {got}")
    if not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be {want}, got {got}")
    if align16 and t.data_ptr() % 16:
        raise ValueError(f"{fn}: {name} must start on a 16-byte boundary (data_ptr {t.data_ptr():#x}); "
                         "pass a fresh tensor or .clone() the view")
    return t


def expert_count(fn, value, group_size, hint, name="num_experts"):
    """A call's expert count: a positive multiple of the group size, at most the Buffer's num_experts hint."""
    int_arg(fn, name, value, 1)
    if value % group_size:
        raise ValueError(f"{fn}: {name} is {value}; it must be a multiple of the group size ({group_size})")
    if value > hint:
        raise ValueError(f"{fn}: {name} is {value} but the Buffer was sized for {hint}; "
                         "raise Buffer(num_experts=...)")
    return value


def config_sms(fn, config, default_config, max_sms):
    """The SMs a normal-path call uses: config.num_sms, or default_config().num_sms when config is None."""
    if config is None:
        return default_config().num_sms
    if not hasattr(config, "num_sms"):
        raise TypeError(f"{fn}: config must be an ep.Config (or None), got {type(config).__name__}")
    return int_arg(fn, "config.num_sms", config.num_sms, 1, max_sms)
