#!/usr/bin/env python3
"""megatron_fused_a2a (GPU): Megatron-Core's DeepEP path (megatron/core/transformer/moe/fused_a2a.py: FusedDispatch
and FusedCombine, forward and backward) run unedited on ep, equal to a dense computation.

`deep_ep` resolves to ep through ep.install_as_deep_ep() in each rank before fused_a2a is imported, and fused_a2a
makes its Buffer as Megatron does: Buffer(group, num_nvl_bytes, num_rdma_bytes) from the Config size hints.
Megatron-Core is not fetched: EP_MEGATRON_WHEEL names a megatron-core wheel (a zip that Python imports from
directly), default the newest build/compat/megatron_core-*.whl of this repository, e.g. made here with
  pip download "megatron-core==0.19.*" --no-deps --python-version 3.12 --only-binary=:all: -d build/compat
Absent: one SKIP line, exit 77.

Each rank, EP_MEGATRON_TOKENS tokens (default 8192), hidden 2048, top-8 of 8 experts per rank, bf16:
  forward:   recv_x, recv_idx, recv_probs, tokens_per_expert, handle = FusedDispatch(x, idx, probs, E, group);
             each expert e scales its rows by w[e]: out = (sum over local k of recv_probs * w) * recv_x;
             y = FusedCombine(out, group, handle)
  dense:     y_ref[t] = (sum_k probs[t, k] * w[idx[t, k]]) * x[t], in fp32 on the rank itself
  backward:  (y * g).sum() backward, against the same through y_ref: grad x, grad probs
Checked: y, grad x (relative norm error < 1e-2: bf16 rows), grad probs (< 1e-4: fp32), tokens_per_expert (the
all-reduced count of each local expert), for async_finish False and True (with allocate_on_comm_stream).
EP_TEST_WORLD ranks (default 2; 1 for one rank); scripts/shared_gpu.sh shares one GPU between them.
If importing megatron.core needs a package this machine lacks, the missing name is printed and fused_a2a.py is
loaded from the wheel by itself, with only megatron.core.utils.internal_api (a marker decorator for HybridEP
classes, no behaviour) supplied; the line says so."""

import glob
import os
import sys
import types
import zipfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
import eptest  # noqa: E402

HIDDEN, TOPK, EXPERTS_PER_RANK = 2048, 8, 8
FUSED_A2A = "megatron/core/transformer/moe/fused_a2a.py"


def megatron_wheel():
    path = os.environ.get("EP_MEGATRON_WHEEL")
    if path:
        return path if os.path.isfile(path) else None
    found = sorted(glob.glob(os.path.join(eptest.REPO, "build", "compat", "megatron_core-*.whl")))
    return found[-1] if found else None


def import_fused_a2a(wheel):
    """fused_a2a from the wheel: through megatron.core's own package import, else alone (see the docstring)."""
    sys.path.insert(0, wheel)
    try:
        from megatron.core.transformer.moe import fused_a2a
        return fused_a2a, "megatron.core package import"
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        del sys.modules[name]
    utils = types.ModuleType("megatron.core.utils")
    utils.internal_api = lambda obj: obj
    for name in ("megatron", "megatron.core"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["megatron.core.utils"] = utils
    with zipfile.ZipFile(wheel) as z:
        source = z.read(FUSED_A2A).decode()
    module = types.ModuleType("megatron_fused_a2a")
    module.__file__ = f"{wheel}/{FUSED_A2A}"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module, f"fused_a2a.py alone (importing megatron.core needs {missing!r}, absent here)"


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def worker(rank, world, init_method, seed):
    import torch
    import torch.distributed as dist
    import ep
    ep.install_as_deep_ep()
    ck = eptest.Checker(f"[rank {rank}] ")
    device, _ = eptest.start_rank(rank, world, init_method)
    fused_a2a, how = import_fused_a2a(megatron_wheel())
    ck.check(f"fused_a2a imported ({how}) and found deep_ep", fused_a2a.HAVE_DEEP_EP and fused_a2a.Buffer is ep.Buffer)
    group = dist.new_group(list(range(world)))
    T = int(os.environ.get("EP_MEGATRON_TOKENS", "8192"))
    E = EXPERTS_PER_RANK * world
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    w = torch.linspace(0.5, 1.5, E, device=device)  # expert e scales its rows by w[e] (the same on every rank)
    x = torch.randn((T, HIDDEN), generator=gen, device=device).to(torch.bfloat16)
    scores = torch.rand((T, E), generator=gen, device=device)
    probs_top, idx = torch.topk(scores.softmax(-1), TOPK, dim=-1)
    idx = idx.to(torch.int64)
    g = torch.randn((T, HIDDEN), generator=gen, device=device).to(torch.bfloat16)

    counts = torch.bincount(idx.flatten(), minlength=E).to(torch.int64)
    on_cpu = dist.get_backend(group) == "gloo"
    counts = counts.cpu() if on_cpu else counts
    dist.all_reduce(counts, group=group)
    want_per_expert = counts[rank * EXPERTS_PER_RANK:(rank + 1) * EXPERTS_PER_RANK].cpu()

    # Dense reference: every token's experts are applied on its own rank.
    x_ref = x.detach().clone().requires_grad_(True)
    p_ref = probs_top.detach().clone().float().requires_grad_(True)
    y_ref = (p_ref * w[idx]).sum(-1, keepdim=True) * x_ref.float()
    (y_ref * g.float()).sum().backward()

    for async_finish in (False, True):
        tag = f"async_finish={async_finish}, {T} tokens, {world} rank(s)"
        xi = x.detach().clone().requires_grad_(True)
        pi = probs_top.detach().clone().float().requires_grad_(True)
        recv_x, recv_idx, recv_probs, tokens_per_expert, handle = fused_a2a.fused_dispatch(
            xi, idx, pi, E, group, async_finish=async_finish, allocate_on_comm_stream=async_finish)
        ck.check(f"tokens_per_expert == the all-reduced counts of my experts ({tag})",
                 torch.equal(tokens_per_expert.cpu().to(torch.int64), want_per_expert),
                 f"{tokens_per_expert.tolist()} vs {want_per_expert.tolist()}")
        local = recv_idx >= 0
        w_recv = torch.where(local, w[rank * EXPERTS_PER_RANK + recv_idx.clamp_min(0)], torch.zeros_like(recv_probs))
        scale = (recv_probs * w_recv).sum(-1, keepdim=True)
        out = (scale * recv_x.float()).to(torch.bfloat16)
        y, _ = fused_a2a.fused_combine(out, group, handle, async_finish=async_finish,
                                       allocate_on_comm_stream=async_finish)
        err = rel_err(y.float(), y_ref.detach())
        ck.check(f"forward: combined == dense, relative error {err:.2e} < 1e-2 ({tag})", err < 1e-2)
        (y.float() * g.float()).sum().backward()
        err_x = rel_err(xi.grad.float(), x_ref.grad.float())
        ck.check(f"backward: grad x == dense, relative error {err_x:.2e} < 1e-2 ({tag})", err_x < 1e-2)
        err_p = rel_err(pi.grad, p_ref.grad)
        ck.check(f"backward: grad probs == dense, relative error {err_p:.2e} < 1e-4 ({tag})", err_p < 1e-4)
    torch.cuda.synchronize()
    eptest.finish_rank(ck, fused_a2a._buffer)
    sys.exit(ck.result())


def main():
    wheel = megatron_wheel()
    if wheel is None:
        eptest.skip("no megatron-core wheel (set EP_MEGATRON_WHEEL, or pip download it into build/compat: see the "
                    "docstring)")
    print(f"Megatron-Core: {wheel}", flush=True)
    eptest.run_ranks(worker, timeout_s=600)


if __name__ == "__main__":
    main()
