"""Differentiable dispatch and combine (torch.autograd.Function), for training.

    recv_x, recv_topk_idx, recv_topk_weights, counts, handle = ep.dispatch(buffer, x, topk_idx, topk_weights, E)
    ...experts on recv_x, weighted by recv_topk_weights...
    out, _ = ep.combine(buffer, y, handle)

The two are each other's transpose along one handle:
  * backward of dispatch = a combine of the gradient of recv_x (a sum of the gradients of every copy of a token)
    and, when topk_weights was given, of the gradient of recv_topk_weights (entries for experts on other ranks,
    which dispatch set to 0.0, get no gradient), summed back to d topk_weights;
  * backward of combine = a cached dispatch of the gradient along the same handle (each copy of a token gets the
    token's gradient); the gradient of combine's topk_weights travels the same way, bit-exact; each bias gets the
    output gradient.
With a graph-safe handle (num_worst_tokens > 0) the rows past the received count get zero gradient, so padding
rows never reach the expert weights.

Only bf16 x is differentiable here (FP8 dispatch is for inference: call Buffer.dispatch directly).
"""

import torch

from .buffer import Buffer, DispatchHandle

__all__ = ["dispatch", "combine", "DispatchFunction", "CombineFunction"]


def _valid_rows(handle, rows, device):
    """[rows, 1] bool: rows below the received count (all True for an eager handle)."""
    if not handle.is_graph_safe:
        return None
    idx = torch.arange(rows, device=device, dtype=torch.int32)
    return (idx < handle.num_recv_tokens_dev).unsqueeze(1)


class DispatchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, x, topk_weights, topk_idx, num_experts, expert_alignment, num_worst_tokens, config):
        recv_x, recv_topk_idx, recv_topk_weights, counts, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens, config=config, num_experts=num_experts)
        ctx.buffer, ctx.handle, ctx.config = buffer, handle, config
        ctx.x_shape, ctx.x_dtype = tuple(x.shape), x.dtype
        ctx.has_weights = topk_weights is not None
        ctx.save_for_backward(recv_topk_idx)
        ctx.mark_non_differentiable(recv_topk_idx)
        return recv_x, recv_topk_idx, recv_topk_weights, counts, handle

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_topk_idx, grad_recv_topk_weights, grad_counts, grad_handle):
        buffer, handle = ctx.buffer, ctx.handle
        (recv_topk_idx,) = ctx.saved_tensors
        rows, hidden = handle.num_recv_rows, ctx.x_shape[1]
        dev = recv_topk_idx.device
        if grad_recv_x is None:
            grad_recv_x = torch.zeros((rows, hidden), dtype=torch.bfloat16, device=dev)
        gx = grad_recv_x.to(torch.bfloat16).contiguous()
        gw = None
        if ctx.has_weights and ctx.needs_input_grad[2]:
            if grad_recv_topk_weights is None:
                gw = torch.zeros(recv_topk_idx.shape, dtype=torch.float32, device=dev)
            else:
                gw = grad_recv_topk_weights.float().masked_fill(recv_topk_idx < 0, 0.0).contiguous()
        grad_x, grad_w, _ = buffer.combine(gx, handle, topk_weights=gw, config=ctx.config)
        grad_x = grad_x.to(ctx.x_dtype) if ctx.needs_input_grad[1] else None
        return None, grad_x, grad_w, None, None, None, None, None


class CombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, y, handle, topk_weights, bias0, bias1, config):
        bias = tuple(b for b in (bias0, bias1) if b is not None) or None
        out, out_w, _ = buffer.combine(y, handle, topk_weights=topk_weights, bias=bias, config=config)
        ctx.buffer, ctx.handle, ctx.config = buffer, handle, config
        ctx.y_dtype, ctx.hidden = y.dtype, y.shape[1]
        ctx.num_topk = handle.num_topk
        return out, out_w

    @staticmethod
    def backward(ctx, grad_out, grad_out_w):
        buffer, handle = ctx.buffer, ctx.handle
        n, rows = handle.num_tokens, handle.num_recv_rows
        grad_y = grad_w = None
        dev = torch.device("cuda", buffer.device)
        valid = _valid_rows(handle, rows, dev)
        if ctx.needs_input_grad[1]:
            g = grad_out if grad_out is not None else torch.zeros((n, ctx.hidden), device=dev)
            grad_y = buffer.dispatch(g.to(torch.bfloat16).contiguous(), handle=handle, config=ctx.config)[0]
            if valid is not None:
                grad_y = torch.where(valid, grad_y, torch.zeros((), dtype=grad_y.dtype, device=dev))
            grad_y = grad_y.to(ctx.y_dtype)
        if ctx.needs_input_grad[3]:
            # float32 [n, k] travels bit-exact as bf16 "channels": pad k to a multiple of 4 (rows of 16 bytes).
            k = ctx.num_topk
            kp = (k + 3) // 4 * 4
            g = torch.zeros((n, kp), dtype=torch.float32, device=dev)
            if grad_out_w is not None:
                g[:, :k] = grad_out_w
            moved = buffer.dispatch(g.view(torch.bfloat16), handle=handle, config=ctx.config)[0]
            grad_w = moved.view(torch.float32)[:, :k]
            if valid is not None:
                grad_w = torch.where(valid, grad_w, torch.zeros((), dtype=grad_w.dtype, device=dev))
            grad_w = grad_w.contiguous()
        grad_b0 = grad_out if ctx.needs_input_grad[4] else None
        grad_b1 = grad_out if ctx.needs_input_grad[5] else None
        return None, grad_y, None, grad_w, grad_b0, grad_b1, None


def dispatch(buffer, x, topk_idx, topk_weights, num_experts, *, expert_alignment=1, num_worst_tokens=0,
             config=None):
    """Differentiable Buffer.dispatch of bf16 x. Returns (recv_x, recv_topk_idx, recv_topk_weights,
    num_recv_tokens_per_expert_list, handle); gradients flow to x and topk_weights (see the module doc)."""
    if not isinstance(buffer, Buffer):
        raise TypeError(f"ep.dispatch: buffer must be an ep.Buffer, got {type(buffer).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
        raise TypeError("ep.dispatch: x must be a torch.bfloat16 tensor [num_tokens, hidden] (FP8 dispatch is not "
                        f"differentiable: call Buffer.dispatch), got {getattr(x, 'dtype', type(x).__name__)}")
    return DispatchFunction.apply(buffer, x, topk_weights, topk_idx, num_experts, expert_alignment,
                                  num_worst_tokens, config)


def combine(buffer, y, handle, topk_weights=None, bias=None, *, config=None):
    """Differentiable Buffer.combine. Returns (combined_x, combined_topk_weights or None); gradients flow to y,
    topk_weights and the biases (see the module doc)."""
    if not isinstance(buffer, Buffer):
        raise TypeError(f"ep.combine: buffer must be an ep.Buffer, got {type(buffer).__name__}")
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"ep.combine: handle must be the DispatchHandle from ep.dispatch, got "
                        f"{type(handle).__name__}")
    if bias is None or isinstance(bias, torch.Tensor):
        bias0, bias1 = bias, None
    elif isinstance(bias, (tuple, list)) and len(bias) <= 2:
        bias0, bias1 = (tuple(bias) + (None, None))[:2]
    else:
        raise TypeError("ep.combine: bias must be None, a tensor, or a tuple of up to two tensors")
    return CombineFunction.apply(buffer, y, handle, topk_weights, bias0, bias1, config)
