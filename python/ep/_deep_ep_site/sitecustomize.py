"""Python imports this module (`sitecustomize`) at start-up in a process whose PYTHONPATH names this folder, as
`ep.install_as_deep_ep(children=True)` arranges for the processes started after it. A DeepEP client that starts
workers with torch.multiprocessing.spawn has each worker re-import its script, whose `import deep_ep` then needs the
alias before any of the client's code runs: this module makes it. It first runs the sitecustomize it hides (the
next one on the path), if there is one."""

import importlib.machinery
import importlib.util
import os
import sys


def _run_hidden_sitecustomize(here):
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _install():
    here = os.path.dirname(os.path.abspath(__file__))
    _run_hidden_sitecustomize(here)
    if importlib.util.find_spec("ep") is None:  # the parent found ep through sys.path, not PYTHONPATH
        sys.path.append(os.path.dirname(os.path.dirname(here)))
    import ep
    ep.install_as_deep_ep()


_install()
