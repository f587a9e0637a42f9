"""ep.utils: the event helpers of DeepEP's `deep_ep.utils` (EventOverlap, EventHandle).

After `ep.install_as_deep_ep()`, `from deep_ep.utils import EventHandle, EventOverlap` resolves to this module.
Importing it imports neither PyTorch nor libep.so; making an EventHandle imports PyTorch."""

from ._streams import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
