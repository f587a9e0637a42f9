#!/usr/bin/env python3
"""A small Mixture-of-Experts layer on `ep`, and a check of it against a dense single-GPU computation.

The layer: router (linear, softmax, top-k) -> ep.dispatch -> on each rank, a two-layer MLP per local expert over
the received rows that chose it, each output weighted by its router weight -> ep.combine (the unweighted sum of
the weighted expert outputs). dispatch and combine are differentiable, so loss.backward() reaches the input, the
router and the expert weights.

Script mode runs it on N GPUs of this machine (torch.multiprocessing spawn, NCCL process group on
MASTER_ADDR:MASTER_PORT when MASTER_PORT is set, else a file rendezvous in a temporary directory) and compares
the output and the gradients of the input, the router and the expert weights with the same layer computed
densely on one GPU over the whole batch (every rank's tokens and every expert's weights, gathered). It prints
the largest difference of each, relative to the largest magnitude of the dense value, and exits 1 if one
exceeds --tolerance.

    python examples/moe_layer.py --num-gpus 2
    python examples/moe_layer.py --num-gpus 4 --tokens 1024 --hidden 2048 --experts 32 --topk 4
"""

import argparse
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

try:
    import ep
except ImportError:  # run from a checkout: use <repo>/python
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    import ep


def expert_mlp(x, w1, w2):
    """The per-expert MLP, shared by the layer and the dense reference: silu(x @ w1) @ w2, bf16."""
    return F.silu(x @ w1) @ w2


class MoELayer(nn.Module):
    """Top-k MoE layer with experts spread evenly over the ranks of `buffer` (rank r holds experts
    r * E_loc .. (r + 1) * E_loc - 1). The router is replicated: its gradient is this rank's share, to be
    all-reduced like any data-parallel weight."""

    def __init__(self, buffer, hidden, ffn_hidden, num_experts, topk, device=None):
        super().__init__()
        if num_experts % buffer.group_size:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the group size "
                             f"({buffer.group_size})")
        self.buffer = buffer
        self.num_experts, self.topk = num_experts, topk
        self.num_local_experts = num_experts // buffer.group_size
        self.router = nn.Parameter(torch.empty(num_experts, hidden, dtype=torch.float32, device=device))
        self.w1 = nn.Parameter(torch.empty(self.num_local_experts, hidden, ffn_hidden, dtype=torch.bfloat16,
                                           device=device))
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, ffn_hidden, hidden, dtype=torch.bfloat16,
                                           device=device))

    def route(self, x):
        """(topk_idx [N, K] int64, topk_weights [N, K] fp32) from the router (fp32 logits and softmax)."""
        probs = torch.softmax(F.linear(x.float(), self.router), dim=-1)
        topk_weights, topk_idx = probs.topk(self.topk, dim=-1)
        return topk_idx, topk_weights

    def forward(self, x, routing=None):
        """x: bf16 [num_tokens, hidden] -> bf16 [num_tokens, hidden]. `routing` (topk_idx) may fix the choice
        of experts (the weights still come from this router); the check uses it to compare with the dense
        computation on the very same choice."""
        if routing is None:
            topk_idx, topk_weights = self.route(x)
        else:
            topk_idx = routing
            probs = torch.softmax(F.linear(x.float(), self.router), dim=-1)
            topk_weights = probs.gather(1, topk_idx)
        recv_x, recv_idx, recv_w, _, handle = ep.dispatch(self.buffer, x, topk_idx, topk_weights, self.num_experts)
        y = self.experts(recv_x, recv_idx, recv_w)
        out, _ = ep.combine(self.buffer, y, handle)
        return out

    def experts(self, recv_x, recv_idx, recv_w):
        """Each received row, through each local expert it chose (recv_idx holds local ids, -1 elsewhere),
        weighted and summed in fp32, rounded to bf16 for the combine."""
        y = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
        for e in range(self.num_local_experts):
            rows, slot = (recv_idx == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            h = expert_mlp(recv_x[rows], self.w1[e], self.w2[e])
            y = y.index_add(0, rows, h.float() * recv_w[rows, slot].unsqueeze(1))
        return y.to(torch.bfloat16)


def dense_forward(x, router, w1, w2, topk_idx):
    """The same layer on one GPU: all tokens, all experts, the given choice of experts."""
    probs = torch.softmax(F.linear(x.float(), router), dim=-1)
    topk_weights = probs.gather(1, topk_idx)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        tok, slot = (topk_idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = expert_mlp(x[tok], w1[e], w2[e])
        out = out.index_add(0, tok, h.float() * topk_weights[tok, slot].unsqueeze(1))
    return out.to(torch.bfloat16)


def rel_diff(a, b):
    """max |a - b| / max |b| (in fp32); a None gradient counts as zeros."""
    b = b.float()
    a = torch.zeros_like(b) if a is None else a.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_check(rank, world, args):
    """One rank of the check. Returns {name: relative difference} (the same on every rank: max over ranks)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    n, h, f, E, K = args.tokens, args.hidden, args.ffn_hidden, args.experts, args.topk
    e_loc = E // world
    buffer = ep.Buffer(dist.group.WORLD, num_experts=E, hidden=h, max_tokens_per_rank=n, max_topk=K,
                       explicitly_destroy=True)
    try:
        # Every rank draws the whole problem from one seed and keeps its share.
        gen = torch.Generator(device=dev)
        gen.manual_seed(args.seed)
        x_all = torch.randn((world * n, h), generator=gen, device=dev).to(torch.bfloat16)
        router_all = torch.randn((E, h), generator=gen, device=dev) / h ** 0.5
        w1_all = (torch.randn((E, h, f), generator=gen, device=dev) / h ** 0.5).to(torch.bfloat16)
        w2_all = (torch.randn((E, f, h), generator=gen, device=dev) / f ** 0.5).to(torch.bfloat16)
        g_all = torch.randn((world * n, h), generator=gen, device=dev)  # d loss / d out

        mine = slice(rank * n, (rank + 1) * n)
        my_experts = slice(rank * e_loc, (rank + 1) * e_loc)
        layer = MoELayer(buffer, h, f, E, K, device=dev)
        with torch.no_grad():
            layer.router.copy_(router_all)
            layer.w1.copy_(w1_all[my_experts])
            layer.w2.copy_(w2_all[my_experts])
        x = x_all[mine].clone().requires_grad_(True)

        # Distributed: forward, backward; the router's gradient summed over ranks (it is replicated).
        topk_idx, _ = layer.route(x.detach())
        out = layer(x, routing=topk_idx)
        (out.float() * g_all[mine]).sum().backward()
        dist.all_reduce(layer.router.grad)

        # Dense, on this GPU, with every rank's choice of experts.
        idx_all = torch.empty((world * n, K), dtype=torch.int64, device=dev)
        dist.all_gather_into_tensor(idx_all, topk_idx.contiguous())
        xd = x_all.clone().requires_grad_(True)
        rd = router_all.clone().requires_grad_(True)
        w1d = w1_all.clone().requires_grad_(True)
        w2d = w2_all.clone().requires_grad_(True)
        out_d = dense_forward(xd, rd, w1d, w2d, idx_all)
        (out_d.float() * g_all).sum().backward()

        diffs = {
            "output": rel_diff(out, out_d[mine]),
            "grad input": rel_diff(x.grad, xd.grad[mine]),
            "grad router": rel_diff(layer.router.grad, rd.grad),
            "grad w1": rel_diff(layer.w1.grad, w1d.grad[my_experts]),
            "grad w2": rel_diff(layer.w2.grad, w2d.grad[my_experts]),
        }
        t = torch.tensor(list(diffs.values()), dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        torch.cuda.synchronize()
        dist.barrier()
        return dict(zip(diffs, t.tolist()))
    finally:
        buffer.destroy()


def _worker(rank, world, init_method, args):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world)
    try:
        diffs = run_check(rank, world, args)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print(f"moe_layer on {world} GPUs: {args.tokens} tokens per rank, hidden {args.hidden}, ffn "
              f"{args.ffn_hidden}, {args.experts} experts, top-{args.topk}; distributed (ep) vs dense (one GPU)")
        for name, d in diffs.items():
            print(f"RESULT {name}: max |diff| / max |dense| = {d:.3e} "
                  f"({'ok' if d < args.tolerance else 'TOO LARGE'}, tolerance {args.tolerance:g})", flush=True)
    if any(d >= args.tolerance for d in diffs.values()):
        sys.exit(1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-gpus", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn-hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tolerance", type=float, default=1e-2, help="largest relative difference accepted")
    args = p.parse_args(argv)
    if torch.cuda.device_count() < args.num_gpus:
        print(f"needs {args.num_gpus} GPUs, this machine has {torch.cuda.device_count()}")
        return 77
    os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")  # one machine: NVLink only, no network transport
    # Without MASTER_PORT, a file rendezvous: a TCP port found free here can be taken before rank 0 binds it.
    rendezvous_dir = None
    if "MASTER_PORT" in os.environ:
        init_method = "env://"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    else:
        rendezvous_dir = tempfile.mkdtemp(prefix="moe-layer-")
        init_method = "file://" + os.path.join(rendezvous_dir, "store")
    try:
        mp.spawn(_worker, args=(args.num_gpus, init_method, args), nprocs=args.num_gpus, join=True)
    except mp.ProcessExitedException as e:
        print(f"FAILED: {e}")
        return 1
    except mp.ProcessRaisedException as e:
        print(f"FAILED: a rank raised:\n{e}")
        return 1
    finally:
        if rendezvous_dir:
            shutil.rmtree(rendezvous_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
