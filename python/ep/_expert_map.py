"""The redundant-expert map of `ep.Buffer` (ep's own; DeepEP V1 has none): map_experts turns a router's logical
top-k into physical expert slots, one live copy each, over ep_map_experts (include/ep.h, "Redundant experts").

`ExpertMapPath` is a part of `Buffer` (a base class that holds this method only): it uses the state that
Buffer.__init__ sets (`_lib`, `device`, `num_experts`) and Buffer's `_alive` and `_stream`.
"""

import ctypes

from . import _capi
from ._checks import expert_count, require_torch, tensor


class ExpertMapPath:
    def map_experts(self, topk_idx, expert_map, num_experts=None, out=None):
        """Map a logical top-k to physical expert slots, in the current stream's order (capturable in a CUDA graph).

        topk_idx: torch.int64 [num_tokens, num_topk] on the Buffer's device: logical experts, -1 = none.
        expert_map: torch.int32 [num_logical_experts, max_copies] on the Buffer's device: row l lists the physical
          slots holding a copy of logical expert l (slot s lives on rank s // (num_experts // group_size)); -1 pads.
          DeepSeek EPLB's log2phy[layer].to(torch.int32) is one.
        num_experts: the physical slots (the num_experts of the dispatch that takes the result); None = the
          Buffer's num_experts.
        out: torch.int64 like topk_idx to write into (topk_idx itself maps in place); None = a new tensor.
        Returns the physical top-k: each pick becomes one copy of its expert on a rank this rank has not masked
        (enable_shrink: ranks masked by hand or by a low-latency timeout, read on the device when the kernel runs),
        spread over the copies by token index; -1 stays -1, and an expert with no live copy becomes -1. A logical
        index or a slot out of range is a data fault (EpError from the next call; the pick becomes -1)."""
        fn = "map_experts"
        g = self._alive(fn)
        torch = require_torch(fn)
        tensor(self.device, fn, "topk_idx", topk_idx, torch.int64, (None, None), "[num_tokens, num_topk]",
               align16=False)
        tensor(self.device, fn, "expert_map", expert_map, torch.int32, (None, None),
               "[num_logical_experts, max_copies]", align16=False)
        num_experts = expert_count(fn, self.num_experts if num_experts is None else num_experts, self.group_size,
                                   self.num_experts)
        if out is None:
            out = torch.empty_like(topk_idx)
        else:
            tensor(self.device, fn, "out", out, torch.int64, tuple(topk_idx.shape),
                   f"{list(topk_idx.shape)} (topk_idx's shape)", align16=False)
        num_tokens, num_topk = topk_idx.shape
        m = _capi.ExpertMap.init(slots=expert_map.data_ptr(), num_logical_experts=expert_map.shape[0],
                                 max_copies=expert_map.shape[1], num_experts=num_experts)
        _capi.check(self._lib.ep_map_experts(g, ctypes.byref(m), topk_idx.data_ptr(), out.data_ptr(), num_tokens,
                                             num_topk, self._stream()), g)
        return out
