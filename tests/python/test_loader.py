#!/usr/bin/env python3
"""test_loader (CPU): loading libep.so, status names and errors, the package without PyTorch, Config defaults,
the argument checks that need no tensor, which Buffer methods are stubs, and is_sm90_compiled() against the
architectures compiled into the library (cuobjdump).

Runs whether or not PyTorch is installed: the "without torch" checks run in a child process where `import torch`
is made to fail. The library checks use EP_LIBRARY_PATH when set, else <repo>/build/lib/libep.so; without a built
library they are skipped with a line that says so (the rest still runs)."""

import ctypes
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import eptest

eptest.use_package()
import ep  # noqa: E402
from ep import _capi  # noqa: E402

# A child process whose `import torch` fails, as on a machine without PyTorch.
NO_TORCH_PRELUDE = r"""
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch' (blocked by test_loader)")
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def child(code, env_extra=None, env_drop=(), no_torch=False):
    """Run python code in a child with python/ on sys.path; return (exit code, stdout, stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = eptest.PYTHON_DIR + os.pathsep + env.get("PYTHONPATH", "")
    for k in env_drop:
        env.pop(k, None)
    env.update(env_extra or {})
    src = (NO_TORCH_PRELUDE if no_torch else "") + code
    r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, env=env, timeout=120)
    return r.returncode, r.stdout, r.stderr


def child_json(ck, name, code, **kw):
    rc, out, err = child(code, **kw)
    if rc != 0:
        ck.check(name, False, f"child exited {rc}: {err.strip()[-1500:]}")
        return None
    return json.loads(out.strip().splitlines()[-1])


def loader_checks(ck):
    missing = "/nonexistent/ep-test/libep.so"
    code = """
import json, ep
from ep import _capi
try:
    _capi.load(); print(json.dumps({"raised": None}))
except Exception as e:
    print(json.dumps({"raised": type(e).__name__, "import_error": isinstance(e, ImportError),
                      "ep_library_error": isinstance(e, ep.EpLibraryError), "msg": str(e)}))
"""
    r = child_json(ck, "missing EP_LIBRARY_PATH: child ran", code, env_extra={"EP_LIBRARY_PATH": missing})
    if r:
        ck.check("missing EP_LIBRARY_PATH raises EpLibraryError (an ImportError)",
                 r["raised"] == "EpLibraryError" and r["import_error"] and r["ep_library_error"], str(r))
        msg = r.get("msg") or ""
        ck.check("its message names the path, `make` and EP_LIBRARY_PATH",
                 missing in msg and "make" in msg and "EP_LIBRARY_PATH" in msg, msg)
    with tempfile.NamedTemporaryFile("w", suffix=".so", delete=False) as f:
        f.write("not a shared library\n")
        bogus = f.name
    try:
        r = child_json(ck, "bogus EP_LIBRARY_PATH: child ran", code, env_extra={"EP_LIBRARY_PATH": bogus})
        if r:
            ck.check("a file that is not a library raises EpLibraryError naming it",
                     r["raised"] == "EpLibraryError" and bogus in r["msg"], str(r))
    finally:
        os.unlink(bogus)
    stub_library_checks(ck, code)
    code = "import ep, sys, json; print(json.dumps({'torch': 'torch' in sys.modules, 'lib': ep._capi._lib is not None}))"
    r = child_json(ck, "plain import: child ran", code)
    if r:
        ck.check("`import ep` loads neither torch nor libep.so", not r["torch"] and not r["lib"], str(r))


def stub_library_checks(ck, code):
    """Stub libep.so files built here with cc, each with every function the package binds but of another version:
    load() refuses them with a message naming both versions. The second stub also needs libnvshmem_host.so.3 and
    has no rpath, as a wheel built in pip's temporary environment would be: load() finds the library in the
    NVSHMEM wheel, loads it, and tries again (the version message shows that the second try loaded the stub)."""
    import shutil
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("SKIP stub library checks: no C compiler")
        return
    stubs = [f"int {name}(void) {{ return 0; }}" for name in _capi._PROTOTYPES if name != "ep_get_version"]
    src = "\n".join(stubs + ["int ep_get_version(int* v) { *v = 9999; return 0; }"]) + "\n"
    want = f"version 0.99.99, this package is {_capi._version_str(_capi.EP_VERSION_CODE)}"
    nvshmem_host = _capi.wheel_library("libnvshmem_host.so.3")
    tmp = tempfile.mkdtemp(prefix="ep-stub-")
    try:
        c_file = os.path.join(tmp, "stub.c")
        with open(c_file, "w") as f:
            f.write(src)
        # --no-as-needed: the stub uses no symbol of the library, and the linker would otherwise drop the need.
        for name, extra in (("plain", []),
                            ("needs libnvshmem_host.so.3, no rpath", ["-Wl,--no-as-needed", nvshmem_host])):
            if None in extra:
                print(f"SKIP stub that {name}: the nvidia-nvshmem-cu13 wheel is not installed")
                continue
            so_file = os.path.join(tmp, f"stub{len(extra)}", "libep.so")
            os.makedirs(os.path.dirname(so_file))
            r = subprocess.run([cc, "-shared", "-fPIC", "-o", so_file, c_file] + extra, capture_output=True, text=True)
            if not ck.check(f"a stub libep.so of version 0.99.99 ({name}) builds", r.returncode == 0, r.stderr[-500:]):
                continue
            r = child_json(ck, f"stub ({name}): child ran", code, env_extra={"EP_LIBRARY_PATH": so_file},
                           env_drop=("LD_LIBRARY_PATH", "LD_PRELOAD"))
            if r:
                ck.check(f"a libep.so of another version ({name}) raises EpLibraryError naming both versions",
                         r["raised"] == "EpLibraryError" and want in r["msg"], str(r))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def library_checks(ck):
    try:
        lib = _capi.load()
    except _capi.EpLibraryError as e:
        print(f"SKIP library checks: {e}")
        return
    print(f"library: {_capi.library_path()}")
    names = [_capi.status_name(i) for i in range(_capi.EP_STATUS_COUNT)]
    ck.check("ep_status_string names round-trip for every status", names == list(_capi.STATUS_NAMES), str(names))
    ck.check("ep_status_string of an unknown code", _capi.status_name(99) == "EP_STATUS_<unknown>",
             _capi.status_name(99))
    if not os.environ.get("EP_LIBRARY_PATH"):
        want = os.path.join(eptest.REPO, "build", "lib", "libep.so")
        ck.check("without EP_LIBRARY_PATH the repository's build/lib/libep.so is loaded",
                 os.path.realpath(_capi.library_path()) == os.path.realpath(want), _capi.library_path())
    ck.check("ep_last_error(NULL) is a str", isinstance(_capi.last_error(None), str))
    version = ctypes.c_int(-1)
    ck.check("ep_get_version == the package's EP_VERSION_CODE",
             lib.ep_get_version(ctypes.byref(version)) == 0 and version.value == _capi.EP_VERSION_CODE,
             str(version.value))
    ck.check("ep_get_version(NULL) -> EP_STATUS_INVALID_ARGUMENT naming version",
             lib.ep_get_version(None) == 1 and "version is NULL" in _capi.last_error(None), _capi.last_error(None))
    ck.check("ep_handle_destroy(NULL) succeeds", lib.ep_handle_destroy(None) == 0)

    # Failures that the library reports before touching a GPU, through check() -> EpError.
    def create(num_ranks=2, rank=0, cfg=None):
        g = ctypes.c_void_p()
        uid = _capi.UniqueId()
        st = lib.ep_group_create(ctypes.byref(g), ctypes.byref(uid), rank, num_ranks, 0,
                                 ctypes.byref(cfg) if cfg is not None else None)
        _capi.check(st, None)

    def expect_ep_error(name, fn, status_name, *words):
        try:
            fn()
        except _capi.EpError as e:
            missing = [w for w in words if w not in e.message]
            ck.check(name, e.status_name == status_name and e.status == _capi.STATUS_NAMES.index(status_name)
                     and not missing and str(e).startswith(status_name + ": "),
                     f"{e.status_name} ({e.status}) {e.message!r}")
            return
        except Exception as e:
            ck.check(name, False, f"raised {type(e).__name__}: {e}")
            return
        ck.check(name, False, "did not raise")

    expect_ep_error("ep_group_create(num_ranks=0) -> EpError naming num_ranks", lambda: create(num_ranks=0),
                    "EP_STATUS_INVALID_ARGUMENT", "num_ranks")
    expect_ep_error("ep_group_create(rank=5 of 2) -> EpError naming rank", lambda: create(rank=5),
                    "EP_STATUS_INVALID_ARGUMENT", "rank")
    bad = _capi.GroupConfig.init(hidden=100)
    expect_ep_error("GroupConfig.init(hidden=100) passes the size/magic check and fails on config.hidden",
                    lambda: create(cfg=bad), "EP_STATUS_INVALID_ARGUMENT", "config.hidden")
    bad = _capi.GroupConfig.init(num_experts=7)
    expect_ep_error("GroupConfig.init(num_experts=7) on 2 ranks fails on config.num_experts",
                    lambda: create(cfg=bad), "EP_STATUS_INVALID_ARGUMENT", "config.num_experts")
    wrong = _capi.GroupConfig()  # no size, no magic: what an uninitialised struct looks like
    expect_ep_error("an uninitialised config is rejected naming its _INIT macro", lambda: create(cfg=wrong),
                    "EP_STATUS_INVALID_ARGUMENT", "ep_group_config_t", "_INIT")

    def layout_null_group():
        a = _capi.LayoutArgs.init()
        _capi.check(lib.ep_get_dispatch_layout(None, ctypes.byref(a), None), None)
    expect_ep_error("ep_get_dispatch_layout(NULL group) -> EpError 'group is NULL'", layout_null_group,
                    "EP_STATUS_INVALID_ARGUMENT", "group is NULL")
    e = _capi.EpError("EP_STATUS_TIMEOUT", "rank 0 timed out waiting for rank 1")
    ck.check("EpError(status_name, message) fills status, str", e.status == 8 and
             str(e) == "EP_STATUS_TIMEOUT: rank 0 timed out waiting for rank 1" and isinstance(e, RuntimeError),
             str(e))


def no_torch_checks(ck):
    code = """
import json, sys, ep
out = {"torch_loaded": "torch" in sys.modules}
def grab(f):
    try:
        f(); return None
    except Exception as e:
        return [type(e).__name__, isinstance(e, ImportError), str(e)]
out["buffer"] = grab(lambda: ep.Buffer(None))
out["topk_idx_t"] = grab(lambda: ep.topk_idx_t)
out["dispatch"] = grab(lambda: ep.dispatch)
def from_autograd():
    from ep import autograd
out["from_autograd"] = grab(from_autograd)
out["unknown"] = grab(lambda: ep.no_such_name)
out["config"] = ep.Config().num_sms
ev = ep.EventOverlap()
ev.current_stream_wait()
with ev:
    pass
out["event"] = True
print(json.dumps(out))
"""
    r = child_json(ck, "without torch: child ran", code, no_torch=True)
    if not r:
        return
    ck.check("without torch: `import ep` works", not r["torch_loaded"], str(r))
    b = r["buffer"]
    ck.check("without torch: Buffer(...) raises ImportError saying PyTorch is needed",
             b is not None and b[1] and "needs PyTorch" in b[2], str(b))
    ck.check("without torch: ep.topk_idx_t raises ImportError saying PyTorch is needed",
             r["topk_idx_t"] is not None and r["topk_idx_t"][1] and "PyTorch" in r["topk_idx_t"][2],
             str(r["topk_idx_t"]))
    ck.check("without torch: ep.dispatch (autograd) raises ImportError saying PyTorch is needed",
             r["dispatch"] is not None and r["dispatch"][1] and "PyTorch" in r["dispatch"][2], str(r["dispatch"]))
    ck.check("without torch: `from ep import autograd` raises ImportError (not RecursionError)",
             r["from_autograd"] is not None and r["from_autograd"][1] and "PyTorch" in r["from_autograd"][2],
             str(r["from_autograd"]))
    ck.check("without torch: an unknown attribute raises AttributeError",
             r["unknown"] is not None and r["unknown"][0] == "AttributeError", str(r["unknown"]))
    ck.check("without torch: Config and EventOverlap(None) work", r["config"] == 24 and r["event"], str(r))


# A child process whose `torch` is a stub module with just what ep.autograd needs at import time, so that the
# package's lazy attributes (which import ep.autograd on first use) can be exercised on a machine without torch.
STUB_TORCH_PRELUDE = r"""
import sys, types
_torch = types.ModuleType("torch")
_torch.__path__ = []
_torch.int64 = "stub-int64"
_torch.autograd = types.ModuleType("torch.autograd")
class _Function:
    @classmethod
    def apply(cls, *args):
        return ("applied", cls.__name__)
_torch.autograd.Function = _Function
sys.modules["torch"] = _torch
sys.modules["torch.autograd"] = _torch.autograd
"""


def lazy_attribute_checks(ck):
    """ep.__getattr__ resolves topk_idx_t, the autograd names and the autograd submodule without recursing
    (`from . import autograd` inside a module __getattr__ re-enters it through importlib's _handle_fromlist),
    in every spelling, and raises AttributeError for anything else."""
    forms = {
        "attr_dispatch": "import ep; r = ep.dispatch",
        "attr_autograd": "import ep; r = ep.autograd",
        "from_autograd": "from ep import autograd as r",
        "from_names": "from ep import dispatch, combine, DispatchFunction, CombineFunction; r = dispatch",
        "import_submodule": "import ep.autograd; r = ep.autograd",
        "from_submodule": "from ep.autograd import dispatch as r",
        "topk_idx_t": "import ep; r = ep.topk_idx_t",
    }
    code = STUB_TORCH_PRELUDE + """
import json, sys
sys.setrecursionlimit(200)  # a recursion shows up at once
out = {}
for name, stmt in FORMS.items():
    for k in [m for m in sys.modules if m == "ep" or m.startswith("ep.")]:
        del sys.modules[k]
    try:
        ns = {}
        exec(stmt, ns)
        import ep
        r = ns["r"]
        out[name] = {"ok": True, "type": type(r).__name__, "is_autograd": r is sys.modules.get("ep.autograd"),
                     "same_dispatch": getattr(ep, "dispatch", None) is sys.modules["ep.autograd"].dispatch
                     if "ep.autograd" in sys.modules else None, "value": r if isinstance(r, str) else None}
    except BaseException as e:
        out[name] = {"ok": False, "error": type(e).__name__ + ": " + str(e)[:300]}
import ep
def grab(f):
    try:
        f(); return None
    except BaseException as e:
        return type(e).__name__
out["unknown"] = grab(lambda: ep.no_such_name)
out["hasattr_unknown"] = hasattr(ep, "no_such_name")
out["from_unknown"] = grab(lambda: exec("from ep import no_such_name", {}))
out["dir"] = all(n in dir(ep) for n in ("dispatch", "autograd", "topk_idx_t", "Buffer"))
out["all_resolve"] = [n for n in ep.__all__ if not hasattr(ep, n)]
print(json.dumps(out))
""".replace("FORMS", repr(forms))
    r = child_json(ck, "lazy attributes (stub torch): child ran", code)
    if not r:
        return
    for name in forms:
        v = r.get(name, {})
        ck.check(f"lazy attributes: `{forms[name]}` resolves without recursion", v.get("ok"), str(v))
    ck.check("lazy attributes: ep.autograd / from ep import autograd give the submodule",
             r["attr_autograd"].get("is_autograd") and r["from_autograd"].get("is_autograd")
             and r["import_submodule"].get("is_autograd"), str(r))
    ck.check("lazy attributes: ep.dispatch is ep.autograd.dispatch (a function)",
             r["attr_dispatch"].get("same_dispatch") and r["attr_dispatch"].get("type") == "function",
             str(r["attr_dispatch"]))
    ck.check("lazy attributes: ep.topk_idx_t is torch.int64", r["topk_idx_t"].get("value") == "stub-int64",
             str(r["topk_idx_t"]))
    ck.check("lazy attributes: an unknown name raises AttributeError (hasattr False, `from ep import` "
             "ImportError)", r["unknown"] == "AttributeError" and r["hasattr_unknown"] is False
             and r["from_unknown"] == "ImportError", str(r))
    ck.check("lazy attributes: dir(ep) lists them, every name in __all__ resolves",
             r["dir"] and r["all_resolve"] == [], str(r))


def python_checks(ck):
    c = ep.Config()
    ck.check("Config() defaults: num_sms 24, chunks (6, 256, 6, 256)",
             (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
              c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == (24, 6, 256, 6, 256), repr(c))
    ck.check("Config(20, 6, 256, 6, 128) positional like DeepEP", ep.Config(20, 6, 256, 6, 128).num_sms == 20)
    nvl = ep.Config(20).get_nvl_buffer_size_hint(7168 * 2, 8)
    ck.check("Config(20) NVLink size hint at EP8, hidden 7168 bf16: DeepEP's ~336 MB, 128-aligned",
             nvl % 128 == 0 and 335_000_000 < nvl < 337_000_000, str(nvl))
    ck.check("RDMA size hint is 0 within one node of 8, positive at 16 ranks",
             c.get_rdma_buffer_size_hint(7168 * 2, 8) == 0 and c.get_rdma_buffer_size_hint(7168 * 2, 16) > 0)
    ck.raises("Config(num_sms=0) -> ValueError naming num_sms", ValueError, lambda: ep.Config(num_sms=0), "num_sms")
    ck.raises("Config(num_sms=2.5) -> TypeError naming num_sms", TypeError, lambda: ep.Config(num_sms=2.5),
              "num_sms")
    ck.check("Buffer.num_sms defaults to 24", ep.Buffer.num_sms == 24, str(ep.Buffer.num_sms))
    ck.raises("set_num_sms(0) -> ValueError naming new_num_sms", ValueError, lambda: ep.Buffer.set_num_sms(0),
              "new_num_sms")
    ep.Buffer.set_num_sms(7)
    ck.check("set_num_sms(7) (odd is fine) feeds get_dispatch_config / get_combine_config",
             ep.Buffer.num_sms == 7 and ep.Buffer.get_dispatch_config(8).num_sms == 7
             and ep.Buffer.get_combine_config(2).num_sms == 7)
    ep.Buffer.set_num_sms(24)
    ck.raises("get_dispatch_config(0) -> ValueError naming num_ranks", ValueError,
              lambda: ep.Buffer.get_dispatch_config(0), "num_ranks")

    # Constructor checks that run before torch is imported.
    for kw, word in ((dict(hidden=100), "hidden"), (dict(hidden=0), "hidden"), (dict(hidden=65664), "hidden"),
                     (dict(num_experts=0), "num_experts"),
                     (dict(max_tokens_per_rank=0), "max_tokens_per_rank"), (dict(max_topk=33), "max_topk"),
                     (dict(timeout_seconds=0), "timeout_seconds"), (dict(ranks_per_node=-1), "ranks_per_node"),
                     (dict(num_nvl_bytes=-1), "num_nvl_bytes"), (dict(max_sms=-1), "max_sms"),
                     (dict(max_sms=2000), "max_sms")):
        ck.raises(f"Buffer({kw}) -> ValueError naming {word}", ValueError, lambda kw=kw: ep.Buffer(None, **kw), word)
    ck.raises("Buffer(hidden='7168') -> TypeError naming hidden", TypeError, lambda: ep.Buffer(None, hidden="7168"),
              "hidden")
    ck.raises("Buffer(enable_shrink=2) -> TypeError naming enable_shrink", TypeError,
              lambda: ep.Buffer(None, enable_shrink=2), "enable_shrink")
    shrink_mode_checks(ck)
    stub_checks(ck)
    ck.check("ep.LowLatencyHandle is exported", hasattr(ep, "LowLatencyHandle") and "LowLatencyHandle" in ep.__all__)
    for kw, word in ((dict(ll_max_tokens_per_rank=0), "ll_max_tokens_per_rank"),
                     (dict(ll_max_tokens_per_rank=8193), "ll_max_tokens_per_rank")):
        ck.raises(f"Buffer(low_latency_mode=True, {kw}) -> ValueError naming {word}", ValueError,
                  lambda kw=kw: ep.Buffer(None, low_latency_mode=True, **kw), word)
    ck.raises("Buffer(low_latency_mode=True, ll_max_tokens_per_rank=1.5) -> TypeError", TypeError,
              lambda: ep.Buffer(None, low_latency_mode=True, ll_max_tokens_per_rank=1.5), "ll_max_tokens_per_rank")
    ll_size_hint_checks(ck)
    ck.raises("Buffer.get_local_buffer_tensor raises NotImplementedError", NotImplementedError,
              lambda: ep.Buffer.get_local_buffer_tensor(None, None), "NOT SUPPORTED")
    ck.check("ep exports the DeepEP names", all(hasattr(ep, n) for n in ("Buffer", "Config", "EventOverlap",
                                                                         "EpError", "EpLibraryError")))


# The public Buffer methods that are stubs (raise NotImplementedError whatever they are given).
STUBS = {"get_local_buffer_tensor"}


def stub_checks(ck):
    """Every public method of Buffer, called on a destroyed Buffer with None for each required argument: the
    stubs raise NotImplementedError, every other method gets further (its own checks, or the destroyed group) and
    raises something else or returns. The set of NotImplementedError raisers must be exactly STUBS."""
    hollow = object.__new__(ep.Buffer)  # what destroy() leaves: no group, no LL handles
    hollow._group_ptr, hollow._finalizer, hollow._ll_slots = None, None, []
    raised = {}
    for name in sorted(n for n in dir(ep.Buffer) if not n.startswith("_")):
        method = getattr(hollow, name)
        if not callable(method):
            continue
        required = [p for p in inspect.signature(method).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        try:
            method(*[None] * len(required))
            raised[name] = None
        except Exception as e:
            raised[name] = e
    stubs = {n for n, e in raised.items() if isinstance(e, NotImplementedError)}
    ck.check(f"the Buffer methods that raise NotImplementedError are exactly {sorted(STUBS)}", stubs == STUBS,
             f"got {sorted(stubs)}")
    for name in ("get_dispatch_layout", "dispatch", "combine", "low_latency_dispatch", "low_latency_combine",
                 "get_next_low_latency_combine_buffer", "clean_low_latency_buffer", "low_latency_update_mask_buffer",
                 "low_latency_query_mask_buffer", "low_latency_clean_mask_buffer"):
        e = raised.get(name)
        ck.check(f"Buffer.{name} on a destroyed Buffer raises RuntimeError naming it (implemented, not a stub)",
                 isinstance(e, RuntimeError) and "destroyed" in str(e) and name in str(e), repr(e))


def shrink_mode_checks(ck):
    """Shrink mode's calls: DeepEP's signatures, and their checks before the library (a destroyed Buffer raises
    RuntimeError naming the call; a bad rank or flag, ValueError / TypeError naming it)."""
    sig = inspect.signature(ep.Buffer.low_latency_update_mask_buffer)
    ck.check("low_latency_update_mask_buffer(rank_to_mask, mask=False), as DeepEP's",
             list(sig.parameters)[1:] == ["rank_to_mask", "mask"] and sig.parameters["mask"].default is False,
             str(sig))
    ck.check("low_latency_query_mask_buffer(mask_status), as DeepEP's",
             list(inspect.signature(ep.Buffer.low_latency_query_mask_buffer).parameters)[1:] == ["mask_status"])
    ck.check("low_latency_combine(..., renormalize_masked=False)",
             inspect.signature(ep.Buffer.low_latency_combine).parameters["renormalize_masked"].default is False)
    alive = object.__new__(ep.Buffer)  # a group pointer that is never dereferenced: the checks come first
    alive._group_ptr, alive._finalizer, alive._ll_slots, alive.group_size = 1, None, [], 4
    ck.raises("low_latency_update_mask_buffer(4) on 4 ranks -> ValueError naming rank_to_mask", ValueError,
              lambda: alive.low_latency_update_mask_buffer(4, True), "rank_to_mask is 4")
    ck.raises("low_latency_update_mask_buffer(-1) -> ValueError naming rank_to_mask", ValueError,
              lambda: alive.low_latency_update_mask_buffer(-1, True), "rank_to_mask")
    ck.raises("low_latency_update_mask_buffer(1, mask=2) -> TypeError naming mask", TypeError,
              lambda: alive.low_latency_update_mask_buffer(1, 2), "mask")
    alive._group_ptr = None


def docstring_signature_checks(ck):
    """The signatures that Buffer's and Config's docstrings spell out are the real ones, every parameter with its
    default, in order."""
    for cls in (ep.Buffer, ep.Config):
        sig = inspect.signature(cls.__init__)
        want = str(sig.replace(parameters=list(sig.parameters.values())[1:]))  # without self
        m = re.search(rf"^\s*{cls.__name__}(\(.*?\))\n\n", cls.__doc__, re.S | re.M)
        got = " ".join(m.group(1).split()) if m else None
        ck.check(f"{cls.__name__}'s docstring gives its complete signature", got == want,
                 f"docstring {got}, real {want}")


def sm90_checks(ck):
    """is_sm90_compiled() against the architectures whose code libep.so holds, as cuobjdump lists them."""
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                           "cuobjdump")
    if not os.path.exists(cuobjdump):
        print("SKIP is_sm90_compiled against the library: cuobjdump not found (set CUDA_HOME)")
        return
    try:
        path = _capi.library_path()
    except _capi.EpLibraryError as e:
        print(f"SKIP is_sm90_compiled against the library: {e}")
        return
    r = subprocess.run([cuobjdump, "--list-elf", path], capture_output=True, text=True)
    archs = set(re.findall(r"\.(sm_\d+a?)\.cubin", r.stdout))
    if not ck.check("cuobjdump --list-elf lists the library's device code", r.returncode == 0 and archs,
                    (r.stdout + r.stderr)[-500:]):
        return
    ck.check(f"is_sm90_compiled() == whether libep.so holds sm_90 code (it holds {sorted(archs)})",
             ep.Buffer.is_sm90_compiled() == bool(archs & {"sm_90", "sm_90a"}), str(ep.Buffer.is_sm90_compiled()))


def ll_size_hint_checks(ck):
    """Buffer.get_low_latency_rdma_size_hint: a static call through ctypes to ep_ll_buffer_size_hint (no torch)."""
    hint = ep.Buffer.get_low_latency_rdma_size_hint
    ck.raises("get_low_latency_rdma_size_hint(hidden='7168') -> TypeError naming hidden", TypeError,
              lambda: hint(128, "7168", 8, 256), "hidden")
    ck.raises("get_low_latency_rdma_size_hint(T=0) -> ValueError naming num_max_dispatch_tokens_per_rank",
              ValueError, lambda: hint(0, 7168, 8, 256), "num_max_dispatch_tokens_per_rank")
    try:
        _capi.load()
    except _capi.EpLibraryError as e:
        print(f"SKIP size-hint library checks: {e}")
        return
    b = hint(128, 7168, 8, 256)
    ck.check("get_low_latency_rdma_size_hint(128, 7168, 8, 256) == ep_ll_buffer_size_hint(..., max_topk=8) > 0",
             isinstance(b, int) and b > 0 and b == _capi.ll_buffer_size_hint(128, 7168, 8, 256, 8), str(b))
    ck.check("the size hint grows with T and hidden",
             hint(256, 7168, 8, 256) > b and hint(128, 4096, 8, 256) < b)
    ck.check("the size hint takes max_topk (keyword)", hint(128, 7168, 8, 256, max_topk=1) > 0)
    for args, word in (((128, 100, 8, 256), "hidden"), ((9000, 7168, 8, 256), "num_max_dispatch_tokens_per_rank"),
                       ((128, 7168, 2, 7), "num_experts"), ((128, 7168, 8, 256, 33), "max_topk")):
        kw = {} if len(args) == 4 else {"max_topk": args[4]}
        ck.raises(f"get_low_latency_rdma_size_hint{args} -> ValueError naming {word}", ValueError,
                  lambda args=args, kw=kw: hint(*args[:4], **kw), word)
    code = """
import json, sys, ep
b = ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
print(json.dumps({"bytes": b, "torch_loaded": "torch" in sys.modules}))
"""
    r = child_json(ck, "size hint without torch: child ran", code, no_torch=True)
    if r:
        ck.check("get_low_latency_rdma_size_hint works without PyTorch", r["bytes"] == b and not r["torch_loaded"],
                 str(r))


def main():
    ck = eptest.Checker()
    loader_checks(ck)
    library_checks(ck)
    no_torch_checks(ck)
    lazy_attribute_checks(ck)
    python_checks(ck)
    docstring_signature_checks(ck)
    sm90_checks(ck)
    ck.exit()


if __name__ == "__main__":
    main()
