"""Streams and events: `EventOverlap` and `EventHandle` (DeepEP's), and the communication-stream rule of the
normal path.

A normal-path call (layout, dispatch, combine) runs on the Buffer's comm stream, which first waits for
`previous_event` or, without one, for the current stream (`comm_begin`). At its end (`comm_end`) either the current
stream waits for the comm stream, or, with async_finish, the call returns an EventOverlap recorded on the comm
stream and every tensor it touched is `record_stream`ed there, so that the allocator does not hand their memory out
before the comm stream is done with it. The low-latency calls run on the current stream (`current_stream_event`).
"""

from ._checks import flag, require_torch


class EventHandle:
    """A CUDA event recorded on the current stream when made (DeepEP's `deep_ep.utils.EventHandle`).

    `current_stream_wait()` makes the (then) current stream wait for it. Wrapped in an EventOverlap, or alone, it is
    accepted wherever a normal-path call takes `previous_event`: `EventOverlap(EventHandle())` orders a call after
    the work queued so far on the current stream, which is what Megatron-Core's fused_a2a passes."""

    def __init__(self):
        torch = require_torch("EventHandle")
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream())

    def current_stream_wait(self):
        """Make the current stream wait for the event."""
        require_torch("EventHandle").cuda.current_stream().wait_event(self.event)


class EventOverlap:
    """A `torch.cuda.Event`, an `EventHandle` or None, plus tensors to keep alive, DeepEP's EventOverlap (the calls
    of ep return one over a `torch.cuda.Event`).

    `current_stream_wait()` makes the current stream wait for the event (nothing to do when the event is None: the
    call that returned it already made the current stream wait). As a context manager, it waits on exit:
    `with event: ...`."""

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self):
        """Make the current stream wait for the event (no-op without one)."""
        if isinstance(self.event, EventHandle):
            self.event.current_stream_wait()
        elif self.event is not None:
            require_torch("EventOverlap").cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self.current_stream_wait()
        return False


class CommCall:
    """The streams of one normal-path call (comm_begin): where it was called (compute), where its kernels run
    (comm), where its outputs are allocated (alloc: comm with allocate_on_comm_stream, else compute). A context
    manager: a call that raises makes the current stream wait for what it had launched, so that nothing of it runs
    unordered with the caller's later work (such as reusing the memory of its inputs)."""
    __slots__ = ("compute", "comm", "alloc", "async_finish")

    def __init__(self, compute, comm, alloc, async_finish):
        self.compute, self.comm, self.alloc, self.async_finish = compute, comm, alloc, async_finish

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is not None:
            self.compute.wait_stream(self.comm)
        return False


def comm_begin(fn, device, comm_stream, previous_event, async_finish, allocate_on_comm_stream):
    """Start a normal-path call on `comm_stream` (DeepEP's rule): it waits for previous_event, or for the current
    stream of `device` when there is none (an EventOverlap without an event counts as none). Returns a CommCall to
    use as `with ... as call:`; allocate under `with torch.cuda.stream(call.alloc)`, end with comm_end."""
    torch = require_torch(fn)
    async_finish = flag(fn, "async_finish", async_finish)
    if flag(fn, "allocate_on_comm_stream", allocate_on_comm_stream) and (previous_event is None or not async_finish):
        raise ValueError(f"{fn}: allocate_on_comm_stream=True needs previous_event and async_finish=True (the "
                         "outputs then belong to the comm stream, which only the event orders with yours)")
    event = previous_event.event if isinstance(previous_event, EventOverlap) else previous_event
    if isinstance(event, EventHandle):
        event = event.event
    if event is not None and not isinstance(event, torch.cuda.Event):
        raise TypeError(f"{fn}: previous_event must be an EventOverlap, an EventHandle, a torch.cuda.Event or "
                        f"None, got {type(previous_event).__name__}")
    compute = torch.cuda.current_stream(device)
    if event is None:
        comm_stream.wait_stream(compute)
    else:
        comm_stream.wait_event(event)
    return CommCall(compute, comm_stream, comm_stream if allocate_on_comm_stream else compute, async_finish)


def comm_end(call, tensors):
    """End a normal-path call: without async_finish the current stream waits for the comm stream; with it, an
    EventOverlap on the comm stream, and the tensors recorded on it so that the allocator does not reuse their
    memory before the comm stream is done with it (inside a graph capture, the graph's pool keeps them, and the
    event holds them too)."""
    if not call.async_finish:
        call.compute.wait_stream(call.comm)
        return EventOverlap(None)
    torch = require_torch("ep")
    tensors = tuple(t for t in tensors if t is not None)
    if not torch.cuda.is_current_stream_capturing():
        for t in tensors:
            t.record_stream(call.comm)
    ev = torch.cuda.Event()
    ev.record(call.comm)
    return EventOverlap(ev, extra_tensors=tensors)


def current_stream_event(device, async_finish, tensors):
    """The event of a low-latency call: with async_finish, an EventOverlap recorded now on the current stream of
    `device`, holding `tensors`; otherwise one without an event."""
    if not async_finish:
        return EventOverlap(None)
    torch = require_torch("ep")
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return EventOverlap(ev, extra_tensors=tuple(t for t in tensors if t is not None))
