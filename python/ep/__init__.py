"""ep: expert-parallel dispatch and combine for Mixture-of-Experts models, DeepEP V1's Python API over libep.so.

    import ep as deep_ep
    buffer = deep_ep.Buffer(group, num_experts=256, hidden=7168, max_tokens_per_rank=4096, max_topk=8)

Code that writes `import deep_ep` (DeepEP's tests, Megatron-Core's fused_a2a.py) runs on ep unedited after
`ep.install_as_deep_ep()`: it registers ep as `deep_ep`, ep.utils as `deep_ep.utils` (EventOverlap, EventHandle)
and ep.buffer as `deep_ep.buffer` in sys.modules (with children=True, in the processes started afterwards too).

Importing `ep` imports neither PyTorch nor libep.so: PyTorch is imported when a Buffer (or `ep.topk_idx_t`, or
the autograd functions `ep.dispatch` / `ep.combine`, or the submodule `ep.autograd`) is first used, and the
library is loaded then too (EP_LIBRARY_PATH, else the copy pip installed in the package, else
<repo>/build/lib/libep.so, else the loader's path). See ep.buffer for what differs from DeepEP.
"""

import importlib

from ._capi import EpError, EpLibraryError
from ._compat import install_as_deep_ep
from .buffer import Buffer, Config, DispatchHandle, EventOverlap, LowLatencyHandle

__version__ = "0.1.0"

__all__ = ["Buffer", "Config", "EventOverlap", "DispatchHandle", "LowLatencyHandle", "EpError", "EpLibraryError",
           "topk_idx_t", "install_as_deep_ep", "dispatch", "combine", "DispatchFunction", "CombineFunction",
           "__version__"]

# Names resolved on first access (they need torch), and the submodules that provide them.
_AUTOGRAD_NAMES = ("dispatch", "combine", "DispatchFunction", "CombineFunction")
_LAZY_SUBMODULES = ("autograd",)


def _load_submodule(name):
    """Import ep.<name> without going through this module's __getattr__.

    `from . import name` inside __getattr__ recurses: importlib's _handle_fromlist first asks
    hasattr(ep, name), which calls __getattr__ again before the submodule is ever imported.
    importlib.import_module imports it directly and binds it as an attribute of the package."""
    from ._checks import require_torch
    require_torch(f"ep.{name}")
    module = importlib.import_module(f"{__name__}.{name}")
    globals()[name] = module  # import_module already binds it; make that explicit
    return module


def __getattr__(name):
    # Only reached for names not (yet) in the module dict. Never import here with `from . import ...`.
    if name == "topk_idx_t":
        from ._checks import require_torch
        value = require_torch("ep.topk_idx_t").int64
        globals()[name] = value
        return value
    if name in _AUTOGRAD_NAMES or name in _LAZY_SUBMODULES:
        autograd = _load_submodule("autograd")
        for n in _AUTOGRAD_NAMES:
            globals()[n] = getattr(autograd, n)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_LAZY_SUBMODULES))
