#!/usr/bin/env python3
"""test_lifecycle (CPU): what the package does around the library's calls.

  * ints above what C holds: ctypes keeps an int modulo 2^32 without a word (max_tokens_per_rank=2**32+1 would
    become 1); every int the package hands to C is range-checked first (Buffer's arguments, the ctypes structs'
    fields, the int arguments of the library's functions), with an error naming it;
  * the LL receive hook counts as used only once its launch succeeded: one that raised can be called again;
  * the library is loaded with ctypes.CDLL, which releases the GIL around every call, so a call that waits in C
    (an eager prepare, a collective create) does not stop the process's other Python threads.
Skips (77) without a built libep.so."""

import ctypes
import threading
import time

import eptest

eptest.use_package()
import ep  # noqa: E402
from ep import _capi  # noqa: E402
from ep._low_latency import RecvHook  # noqa: E402


def int_range_checks(ck, lib):
    ck.raises("Buffer(max_tokens_per_rank=2**32 + 1) -> ValueError (not 1)", ValueError,
              lambda: ep.Buffer(None, max_tokens_per_rank=2**32 + 1), "max_tokens_per_rank is 4294967297",
              "2147483647")
    ck.raises("Buffer(num_experts=2**31) -> ValueError", ValueError, lambda: ep.Buffer(None, num_experts=2**31),
              "num_experts is 2147483648")
    ck.raises("GroupConfig.max_tokens_per_rank = 2**32 + 1 -> OverflowError naming the field", OverflowError,
              lambda: _capi.GroupConfig.init(max_tokens_per_rank=2**32 + 1), "GroupConfig.max_tokens_per_rank")
    ck.raises("LayoutArgs.num_tokens = -2**31 - 1 -> OverflowError", OverflowError,
              lambda: _capi.LayoutArgs.init(num_tokens=-2**31 - 1), "LayoutArgs.num_tokens")
    cfg = _capi.GroupConfig.init(max_tokens_per_rank=2**31 - 1)
    ck.check("GroupConfig keeps 2**31 - 1 as it is", cfg.max_tokens_per_rank == 2**31 - 1, cfg.max_tokens_per_rank)
    size = ctypes.c_size_t()
    ck.raises("ep_ll_buffer_size_hint(2**32 + 128, ...) -> OverflowError naming the argument", OverflowError,
              lambda: lib.ep_ll_buffer_size_hint(2**32 + 128, 7168, 8, 256, 8, ctypes.byref(size)),
              "ep_ll_buffer_size_hint: argument 1 is 4294967424")
    st = lib.ep_ll_buffer_size_hint(128, 7168, 8, 256, 8, ctypes.byref(size))
    ck.check("ep_ll_buffer_size_hint with ints in range still works", st == 0 and size.value > 0, size.value)


def recv_hook_checks(ck):
    calls = []

    def run():
        calls.append(1)
        if len(calls) == 1:
            raise _capi.EpError("EP_STATUS_CUDA_ERROR", "made up: the launch failed")

    hook = RecvHook("low_latency_dispatch", run, ("tensors",))
    ck.raises("a hook whose launch fails raises its error", _capi.EpError, hook, "made up")
    ck.check("...and is not used up: it can be called again", "(called)" not in repr(hook), repr(hook))
    hook()
    ck.check("the second call launched", len(calls) == 2, len(calls))
    ck.raises("once it succeeded, it runs once", RuntimeError, hook, "already called")


def gil_checks(ck, lib):
    ck.check("libep.so is a ctypes.CDLL (not a PyDLL): calls release the GIL",
             isinstance(lib, ctypes.CDLL) and not isinstance(lib, ctypes.PyDLL)
             and not lib._func_flags_ & ctypes._FUNCFLAG_PYTHONAPI)
    # The same loader on a C call that blocks (libc's usleep): another Python thread runs meanwhile.
    libc = ctypes.CDLL(None)
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    time.sleep(0.01)
    before = len(ticks)
    libc.usleep(200000)
    during = len(ticks) - before
    stop.set()
    t.join()
    ck.check("a thread runs while another is inside a ctypes.CDLL call", during >= 10, f"{during} ticks in 0.2 s")


def main():
    ck = eptest.Checker()
    try:
        lib = _capi.load()
    except _capi.EpLibraryError as e:
        eptest.skip(f"no libep.so: {e}")
    int_range_checks(ck, lib)
    recv_hook_checks(ck)
    gil_checks(ck, lib)
    ck.exit()


if __name__ == "__main__":
    main()
