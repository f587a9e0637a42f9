#!/usr/bin/env python3
"""test_library_rules (CPU): the rules libep.so owns, as the package uses them.

  * limits: ep_get_limits through _capi.limits() (its size field checked, a bad one a named error); the package's
    argument checks take their bounds from there (a Buffer or Config one past a limit is refused naming the
    library's number, and a changed limit moves the check with it: nothing in the package repeats the numbers);
  * the low-latency two-buffer turn-taking: ep_ll_handle_get_state's argument checks, and LowLatencyHandle /
    Buffer asking it (is_current, the stale and pending-hook refusals, which handle the next dispatch refills),
    against library states made up here (no GPU: a real LL handle needs a group).
Skips (77) without a built libep.so."""

import ctypes

import eptest

eptest.use_package()
import ep  # noqa: E402
from ep import _capi  # noqa: E402


def limit_checks(ck, lib):
    limits = _capi.limits()
    ck.check("_capi.limits() is read once and kept", _capi.limits() is limits)
    raw = _capi.Limits.init()
    ck.check("ep_get_limits with EP_LIMITS_INIT succeeds and fills every field",
             lib.ep_get_limits(ctypes.byref(raw)) == 0 and all(getattr(raw, f) > 0 for f in limits._fields),
             _capi.last_error(None))

    def get_limits(size):
        s = _capi.Limits()
        s.size = size
        _capi.check(lib.ep_get_limits(ctypes.byref(s)), None)
    ck.raises("ep_get_limits with size 0 (uninitialised) -> EpError naming limits.size and EP_LIMITS_INIT",
              _capi.EpError, lambda: get_limits(0), "EP_STATUS_INVALID_ARGUMENT", "limits.size is 0",
              "EP_LIMITS_INIT")
    bigger = ctypes.sizeof(_capi.Limits) + 4
    ck.raises("ep_get_limits with a larger size (a later header) -> EpError naming both sizes", _capi.EpError,
              lambda: get_limits(bigger), "EP_STATUS_INVALID_ARGUMENT", f"limits.size is {bigger}",
              f"want {ctypes.sizeof(_capi.Limits)}")
    ck.raises("ep_get_limits(NULL) -> EpError naming limits", _capi.EpError,
              lambda: _capi.check(lib.ep_get_limits(None), None), "limits is NULL")

    # The package's checks at the library's limits.
    ck.check("Config() takes the library's default_num_sms, Buffer.num_sms too",
             ep.Config().num_sms == limits.default_num_sms and ep.Buffer.num_sms == limits.default_num_sms,
             f"{ep.Config().num_sms}, {ep.Buffer.num_sms}, library {limits.default_num_sms}")
    ck.check("Config(num_sms=max_sms) is accepted", ep.Config(num_sms=limits.max_sms).num_sms == limits.max_sms)
    ck.raises("Config(num_sms=max_sms + 1) -> ValueError naming the library's limit", ValueError,
              lambda: ep.Config(num_sms=limits.max_sms + 1), "num_sms", f"[1, {limits.max_sms}]")
    ck.raises("set_num_sms(max_sms + 1) -> ValueError naming the library's limit", ValueError,
              lambda: ep.Buffer.set_num_sms(limits.max_sms + 1), f"[1, {limits.max_sms}]")
    over = {
        "hidden": (dict(hidden=limits.max_hidden + 128), f"[128, {limits.max_hidden}]"),
        "max_topk": (dict(max_topk=limits.max_topk + 1), f"[1, {limits.max_topk}]"),
        "max_sms": (dict(max_sms=limits.max_sms + 1), f"[0, {limits.max_sms}]"),
        "timeout_seconds": (dict(timeout_seconds=limits.max_timeout_seconds + 1),
                            f"(0, {limits.max_timeout_seconds}]"),
        "ll_max_tokens_per_rank": (dict(low_latency_mode=True,
                                        ll_max_tokens_per_rank=limits.ll_max_tokens_per_rank + 1),
                                   f"[1, {limits.ll_max_tokens_per_rank}]"),
    }
    for name, (kw, rng) in over.items():
        ck.raises(f"Buffer({name} one past the library's limit) -> ValueError naming {rng}", ValueError,
                  lambda kw=kw: ep.Buffer(None, **kw), name, rng)

    # One owner: with other limits in _capi, the checks follow them (no number of the package's own decides).
    smaller = limits._replace(max_topk=8, max_hidden=8192, max_sms=16, ll_max_tokens_per_rank=64,
                              max_timeout_seconds=30, default_num_sms=5)
    saved_limits, saved_num_sms = _capi._limits, ep.Buffer._num_sms
    _capi._limits, ep.Buffer._num_sms = smaller, None
    try:
        for kw, word in ((dict(max_topk=9), "[1, 8]"), (dict(hidden=8320), "[128, 8192]"),
                         (dict(max_sms=17), "[0, 16]"), (dict(timeout_seconds=31), "(0, 30]"),
                         (dict(low_latency_mode=True, ll_max_tokens_per_rank=65), "[1, 64]")):
            ck.raises(f"with smaller library limits, Buffer({kw}) -> ValueError {word}", ValueError,
                      lambda kw=kw: ep.Buffer(None, **kw), word)
        ck.raises("with smaller library limits, Config(num_sms=17) -> ValueError [1, 16]", ValueError,
                  lambda: ep.Config(num_sms=17), "[1, 16]")
        ck.check("with another library default, Config() and Buffer.num_sms follow it",
                 ep.Config().num_sms == 5 and ep.Buffer.num_sms == 5, f"{ep.Config().num_sms}, {ep.Buffer.num_sms}")
    finally:
        _capi._limits, ep.Buffer._num_sms = saved_limits, saved_num_sms


def fake_state(serial, half=0, is_current=1, dispatch_recv_pending=0, combine_recv_pending=0):
    s = _capi.LLHandleState.init()
    s.serial, s.half, s.is_current = serial, half, is_current
    s.dispatch_recv_pending, s.combine_recv_pending = dispatch_recv_pending, combine_recv_pending
    return s


def ll_state_checks(ck, lib):
    ck.raises("ep_ll_handle_get_state(NULL handle) -> EpError naming handle", _capi.EpError,
              lambda: _capi.ll_handle_state(None), "EP_STATUS_INVALID_ARGUMENT", "handle is NULL")
    ck.check("LLHandleState.init() sets size to sizeof(ep_ll_handle_state_t)",
             _capi.LLHandleState.init().size == ctypes.sizeof(_capi.LLHandleState))

    # A Buffer with two made-up LL handles (1001, 1002) whose library states this test decides.
    buf = object.__new__(ep.Buffer)
    buf._group_ptr, buf._finalizer, buf._ll_slots, buf.group_size = 1, None, [1001, 1002], 2
    states = {}
    real = _capi.ll_handle_state
    _capi.ll_handle_state = lambda handle: states[handle]
    try:
        def handle(slot=0, serial=3):
            return ep.LowLatencyHandle(buf, slot, serial, 4, 2, 8, 128, 16, False)
        h = handle()
        states[1001] = fake_state(3)
        ck.check("is_current: the library's handle holds this dispatch (serial 3) and says current", h.is_current())
        states[1001] = fake_state(3, is_current=0)
        ck.check("is_current: False when the library says the half was taken (or cleaned)", not h.is_current())
        states[1001] = fake_state(5)
        ck.check("is_current: False when a later dispatch (serial 5) refilled the library's handle",
                 not h.is_current())
        ck.raises("a combine of that handle -> RuntimeError naming the two-buffer rule", RuntimeError,
                  lambda: buf._ll_handle("low_latency_combine", h, for_combine=True), "stale", "two-buffer")
        ck.raises("its src_info -> RuntimeError naming the stale handle", RuntimeError, lambda: h.src_info, "stale")
        states[1001] = fake_state(3, dispatch_recv_pending=1)
        ck.raises("a combine while the library says the dispatch's receive phase is pending -> RuntimeError "
                  "naming the hook", RuntimeError,
                  lambda: buf._ll_handle("low_latency_combine", h, for_combine=True), "hook has not been called")
        ck.check("the zero-copy buffer needs no received dispatch (for_combine=False passes)",
                 buf._ll_handle("get_next_low_latency_combine_buffer", h, for_combine=False) == 1001)
        states[1001] = fake_state(3, combine_recv_pending=1)
        ck.raises("a combine while the previous combine's receive phase is pending -> RuntimeError", RuntimeError,
                  lambda: buf._ll_handle("low_latency_combine", h, for_combine=True), "previous combine")
        states[1001] = fake_state(3)
        ck.check("a current handle with nothing pending gives its library handle",
                 buf._ll_handle("low_latency_combine", h, for_combine=True) == 1001)
        ck.raises("a handle of another Buffer -> ValueError", ValueError,
                  lambda: buf._ll_handle("low_latency_combine", ep.LowLatencyHandle(
                      object.__new__(ep.Buffer), 0, 3, 4, 2, 8, 128, 16, False), for_combine=True), "another Buffer")

        # Which library handle the next dispatch refills: the one with the older dispatch.
        for serials, want in (((0, 0), 0), ((1, 0), 1), ((1, 2), 0), ((3, 2), 1), ((7, 8), 0)):
            states[1001], states[1002] = fake_state(serials[0]), fake_state(serials[1])
            ck.check(f"next dispatch with serials {serials} refills handle {want}", buf._ll_next_slot() == want,
                     str(buf._ll_next_slot()))
        buf._group_ptr = None
        ck.check("is_current: False once the Buffer is destroyed", not h.is_current())
    finally:
        _capi.ll_handle_state = real


def main():
    ck = eptest.Checker()
    try:
        lib = _capi.load()
    except _capi.EpLibraryError as e:
        eptest.skip(f"no libep.so: {e}")
    limit_checks(ck, lib)
    ll_state_checks(ck, lib)
    ck.exit()


if __name__ == "__main__":
    main()
