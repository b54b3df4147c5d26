#!/usr/bin/env python3
"""One int4 MoE layer split over several processes: tensor or expert parallelism.

    torchrun --nproc-per-node 2 examples/distributed_moe.py --mode tp
    torchrun --nproc-per-node 4 examples/distributed_moe.py --mode ep --model qwen3-235b-a22b \\
        --tokens 1,8,1024

On GPUs each process takes the GPU ``LOCAL_RANK`` and the group talks NCCL; without GPUs it
runs on the CPU over gloo with the Triton interpreter (slow: keep the default ``tiny`` model).

Every rank builds the same random experts (same seed; rank 0's copy is then broadcast so they
are identical whatever the generator does), keeps its shard (:func:`shard_experts`) and wraps
it in :class:`ParallelHybridMoE`. Rank 0 broadcasts the tokens and the router logits; every
rank routes them the same way (global routing), runs its shard, and the all-reduce sums the
parts. Rank 0 checks the result against the unsharded layer run in one process and prints
both timings (CUDA events around eager calls on GPUs, wall clock on the CPU; per-rank
worst). For careful GPU numbers (CUDA graphs, weights rotated out of L2) use
``benchmarks/distributed_bench.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # the Triton interpreter must be chosen before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from w4a16moe.distributed import (  # noqa: E402
    ParallelHybridMoE,
    broadcast_experts,
    init_distributed,
    shard_experts,
)
from w4a16moe.experts import HybridW4A16MoEExperts  # noqa: E402
from w4a16moe.layout import PackedExperts, PackedWeights  # noqa: E402
from w4a16moe.quantize import random_experts  # noqa: E402
from w4a16moe.routing import fused_topk  # noqa: E402

#: a shape the CPU interpreter runs in seconds
TINY = dict(num_experts=8, top_k=2, hidden_size=128, intermediate_size=128, group_size=32)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("tp", "ep"), default="tp",
                   help="tensor parallel (split I) or expert parallel (split E)")
    p.add_argument("--model", default="tiny",
                   help="'tiny' or a built-in model shape (e.g. qwen3-235b-a22b, "
                        "qwen3-30b-a3b, mixtral-8x7b)")
    p.add_argument("--tokens", default=None,
                   help="comma-separated token counts M (default: 1,4 on the CPU, "
                        "1,8,1024 on GPUs)")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default=None,
                   help="activation dtype (default bf16 on GPUs, fp16 on the CPU: the "
                        "interpreter gets bf16 wrong)")
    p.add_argument("--act-order", action="store_true", help="random act-order permutations")
    p.add_argument("--asym", action="store_true", help="asymmetric (zero points)")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 20 GPU, 2 CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def shape_of(name: str) -> dict:
    if name == "tiny":
        return dict(TINY)
    from w4a16moe.bench.models import get_shape

    s = get_shape(name)
    return dict(num_experts=s.num_experts, top_k=s.top_k, hidden_size=s.hidden_size,
                intermediate_size=s.intermediate_size, group_size=s.group_size)


def device_random_experts(e: int, h: int, i: int, g: int, dtype: torch.dtype,
                          device: torch.device, seed: int, *, act_order: bool = False,
                          asym: bool = False) -> PackedExperts:
    """Random packed experts built on ``device``: random int32 words are valid packed codes."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def one(n: int, k: int, name: str) -> PackedWeights:
        gk = k if g in (-1, k) else g
        q = torch.randint(-2**31, 2**31 - 1, (e, n, k // 8), dtype=torch.int32, device=device,
                          generator=gen)
        s = (torch.rand(e, n, k // gk, device=device, generator=gen) * 0.5 + 0.75) / (4 * k**0.5)
        z = (torch.randint(0, 16, (e, n, k // gk), dtype=torch.uint8, device=device,
                           generator=gen) if asym else None)
        p = (torch.rand(e, k, device=device, generator=gen).argsort(dim=1).to(torch.int32)
             if act_order else None)
        return PackedWeights(qweight=q, scales=s.to(dtype), zeros=z, perm=p, group_size=gk,
                             name=name)

    return PackedExperts(w13=one(2 * i, h, "w13"), w2=one(h, i, "w2"), num_experts=e,
                         hidden_size=h, intermediate_size=i, dtype=dtype)


def time_us(fn, iters: int, device: torch.device) -> float:
    """Median microseconds of ``fn()`` over ``iters`` calls (after one warm-up)."""
    fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = init_distributed()
    rank, ws = dist.get_rank(), dist.get_world_size()
    try:
        return run(args, rank, ws, device)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, rank: int, ws: int, device: torch.device) -> int:
    on_gpu = device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if on_gpu else "fp16")]
    tokens = [int(t) for t in (args.tokens or ("1,8,1024" if on_gpu else "1,4")).split(",")]
    iters = args.iters or (20 if on_gpu else 2)
    shp = shape_of(args.model)
    e, top_k, h, i = (shp[k] for k in ("num_experts", "top_k", "hidden_size",
                                       "intermediate_size"))
    g = shp["group_size"] if h % shp["group_size"] == 0 and i % shp["group_size"] == 0 else -1

    # the same full layer on every rank (rank 0's values win), then this rank's shard
    if args.model == "tiny":
        experts = random_experts(e, h, i, group_size=g, symmetric=not args.asym,
                                 act_order=args.act_order, dtype=dtype, device=device,
                                 seed=args.seed)
    else:  # real model shapes: random words made on the device (packing on the host is slow)
        experts = device_random_experts(e, h, i, g, dtype, device, args.seed,
                                        act_order=args.act_order, asym=args.asym)
    broadcast_experts(experts, src=0)
    layer = ParallelHybridMoE(shard_experts(experts, rank, ws, args.mode), top_k)
    single = HybridW4A16MoEExperts(experts, top_k) if rank == 0 else None
    if rank != 0:
        del experts  # only rank 0 keeps the unsharded layer (for the check)
    if rank == 0:
        print(f"{args.model}: E={e} top_k={top_k} H={h} I={i} G={g} {dtype} | mode={args.mode} "
              f"world_size={ws} on {torch.cuda.get_device_name(device) if on_gpu else 'cpu'}")
        print(f"rank 0 holds {layer.local.experts.num_experts if layer.local else 0} experts "
              f"with I={layer.local.experts.intermediate_size if layer.local else 0}")
        print(f"{'M':>6} {'path':>8} {'layer_us':>10} {'single_us':>10} {'max_rel_err':>12}")

    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    failed = False
    for m in tokens:
        x = torch.randn(m, h, generator=gen).to(device=device, dtype=dtype)
        logits = torch.randn(m, e, generator=gen).to(device)
        dist.broadcast(x, src=0)
        dist.broadcast(logits, src=0)
        weights, ids = fused_topk(logits, top_k)
        out = layer(x, weights, ids)
        us = time_us(lambda x=x, w=weights, ids=ids: layer(x, w, ids), iters, device)
        worst = torch.tensor([us], dtype=torch.float64, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if rank == 0:
            ref = single(x, weights, ids)
            err = float((out.float() - ref.float()).abs().max()
                        / ref.float().abs().max().clamp_min(1e-30))
            single_us = time_us(lambda x=x, w=weights, ids=ids: single(x, w, ids), iters, device)
            ok = err <= 2e-2
            failed |= not ok
            print(f"{m:>6} {layer.choose_path(m) or '-':>8} {float(worst):>10.1f} "
                  f"{single_us:>10.1f} {err:>12.2e}{'' if ok else '  MISMATCH'}")
        dist.barrier()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
