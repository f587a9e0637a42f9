"""`install_as_deep_ep()`: make `import deep_ep` give ep, for code written against DeepEP V1 that is not edited.

The names are registered in sys.modules, so the import system finds them before searching any path: `deep_ep` is
the ep package itself, and each DeepEP submodule that clients import is the ep module that holds the same names.
No package named `deep_ep` is installed: the switch is made by the process that calls this function, and, with
children=True, by the processes it starts afterwards (through the sitecustomize.py of ep/_deep_ep_site, which the
function puts on PYTHONPATH)."""

import importlib
import os
import sys

from ._checks import flag

# DeepEP V1's module names -> the ep modules that stand for them. deep_ep.utils: EventOverlap, EventHandle
# (Megatron-Core's fused_a2a.py imports both); deep_ep.buffer: Buffer (DeepEP's own layout).
DEEP_EP_MODULES = {"deep_ep": "ep", "deep_ep.utils": "ep.utils", "deep_ep.buffer": "ep.buffer"}


# The folder whose sitecustomize.py makes the alias at the start of a process that has it on PYTHONPATH.
CHILDREN_SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_deep_ep_site")


def install_as_deep_ep(children=False):
    """Register ep under DeepEP's module names, so that `import deep_ep`, `from deep_ep import Buffer, Config,
    EventOverlap, topk_idx_t` and `from deep_ep.utils import EventHandle, EventOverlap` resolve to ep.

    Call it before the code that imports deep_ep runs (at the top of a launcher script, say). Calling it again is
    harmless. Returns the ep package. Raises RuntimeError, registering nothing, when another module is already
    imported as `deep_ep` (DeepEP itself, say): the process would otherwise hold two Buffer classes under one name.
    Names DeepEP has and ep lacks (HybridEPBuffer, ElasticBuffer, ...) raise ImportError on `from deep_ep import
    ...`, so a client's `try: ... except ImportError` fallback still runs.

    children=True also gives the alias to every Python process started from this one afterwards (it puts
    CHILDREN_SITE_DIR first on the PYTHONPATH they inherit). Clients that start their ranks with the spawn method
    need it (DeepEP's test scripts, through torch.multiprocessing.spawn): each rank re-imports the script, and its
    `import deep_ep`, before any code of the parent runs there. From a shell, the same without editing anything:
    `PYTHONPATH=$(python -c 'import ep._compat as c; print(c.CHILDREN_SITE_DIR)') python client.py`."""
    children = flag("install_as_deep_ep", "children", children)
    modules = {alias: importlib.import_module(name) for alias, name in DEEP_EP_MODULES.items()}
    for alias, module in modules.items():
        present = sys.modules.get(alias)
        if present is not None and present is not module:
            where = getattr(present, "__file__", None) or repr(present)
            raise RuntimeError(f"ep.install_as_deep_ep: module {alias!r} is already imported from {where}; call "
                               "install_as_deep_ep() before anything imports deep_ep")
    sys.modules.update(modules)
    if children:
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if CHILDREN_SITE_DIR not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([CHILDREN_SITE_DIR] + paths)
    return modules["deep_ep"]
