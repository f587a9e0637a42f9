"""ep: expert-parallel dispatch and combine for Mixture-of-Experts models, DeepEP V1's Python API over libep.so.

    import ep as deep_ep
    buffer = deep_ep.Buffer(group, num_experts=256, hidden=7168, max_tokens_per_rank=4096, max_topk=8)

Importing `ep` imports neither PyTorch nor libep.so: PyTorch is imported when a Buffer (or `ep.topk_idx_t`, or
the autograd functions `ep.dispatch` / `ep.combine`) is first used, and the library is loaded then too
(EP_LIBRARY_PATH, else <repo>/build/lib/libep.so, else the loader's path). See ep.buffer for what differs from
DeepEP.
"""

from ._capi import EpError, EpLibraryError
from .buffer import Buffer, Config, DispatchHandle, EventOverlap

__version__ = "0.1.0"

__all__ = ["Buffer", "Config", "EventOverlap", "DispatchHandle", "EpError", "EpLibraryError", "topk_idx_t",
           "dispatch", "combine", "DispatchFunction", "CombineFunction", "__version__"]

_AUTOGRAD_NAMES = ("dispatch", "combine", "DispatchFunction", "CombineFunction")


def __getattr__(name):
    # Names that need torch resolve on first access, so that `import ep` works without it.
    if name == "topk_idx_t":
        from .buffer import _require_torch
        return _require_torch("ep.topk_idx_t").int64
    if name in _AUTOGRAD_NAMES or name == "autograd":
        from .buffer import _require_torch
        _require_torch(f"ep.{name}")
        from . import autograd
        for n in _AUTOGRAD_NAMES:
            globals()[n] = getattr(autograd, n)
        return autograd if name == "autograd" else getattr(autograd, name)
    raise AttributeError(f"module 'ep' has no attribute {name!r}")
