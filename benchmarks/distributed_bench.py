#!/usr/bin/env python3
"""Tensor- and expert-parallel int4 MoE layer vs one GPU, under torchrun.

    torchrun --nproc-per-node 2 benchmarks/distributed_bench.py --out dist_h100x2.json
    torchrun --nproc-per-node 4 benchmarks/distributed_bench.py --out dist.json --append \\
        [--model qwen3-235b-a22b] [--ms 1,8,1024,4096] [--modes tp,ep] [--dtype bf16] \\
        [--no-graph] [--reps-decode 100] [--reps-prefill 20]

Default layer: Qwen3-235B-A22B (E=128, top_k=8, H=4096, I=1536, G=128), decode M=1, 8 and
prefill M=1024, 4096, bf16. For each mode (``tp``: I split, ``ep``: experts split; see
``w4a16moe/distributed.py``) and M it measures, under one CUDA graph per measurement when
capture works on every rank (else eager launches timed with CUDA events; ``method`` says which):

- ``layer_us``: one :class:`ParallelHybridMoE` call (local kernels + NCCL all-reduce of the
  ``[M, H]`` output), the worst rank's median;
- ``local_us``: the local kernels alone (no communication), worst rank;
- ``comm_us``: the all-reduce of an ``[M, H]`` tensor alone;
- ``single_gpu_us``: the unsharded layer on rank 0's GPU alone (same method, same inputs);
- ``rel_err``: ``||out - single|| / ||single||`` on rank 0 (must be ~1e-3 in bf16).

Weights are rotated over several copies on each GPU so the 50 MB L2 does not hold them
between calls (``copies``, ``single_copies``): each timed call reads weights no other call of
the replay read recently. All ranks run the same number of calls (collectives must match), so
rep counts are fixed, not adaptive. Rank 0 writes the records (a JSON list) to ``--out``.

Without GPUs it runs over gloo with the Triton interpreter (``--model tiny`` only; a smoke test
of the script, the times mean nothing). ``NCCL_NVLS_ENABLE=0`` is set unless already set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from functools import partial

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch.distributed as dist  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from w4a16moe.bench.floors import expected_experts  # noqa: E402
from w4a16moe.bench.layer import fast_random_experts  # noqa: E402
from w4a16moe.bench.models import MoEShape, get_shape  # noqa: E402
from w4a16moe.bench.timing import (  # noqa: E402
    copies_for,
    device_name,
    event_samples,
    percentile,
)
from w4a16moe.distributed import (  # noqa: E402
    ParallelHybridMoE,
    ShardedExperts,
    broadcast_experts,
    init_distributed,
    shard_experts,
)
from w4a16moe.experts import HybridW4A16MoEExperts  # noqa: E402
from w4a16moe.layout import PackedExperts, PackedWeights  # noqa: E402
from w4a16moe.routing import fused_topk  # noqa: E402

DEFAULT_MODEL = "qwen3-235b-a22b"
DEFAULT_MS = "1,8,1024,4096"
TINY = MoEShape("tiny", num_experts=8, top_k=2, hidden_size=128, intermediate_size=128,
                group_size=32)
#: M at or below this counts as decode for the default rep count
DECODE_MAX_M = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the records (rank 0 writes)")
    p.add_argument("--append", action="store_true",
                   help="append to the JSON list in --out instead of overwriting it")
    p.add_argument("--model", default=None,
                   help=f"built-in model shape or 'tiny' (default {DEFAULT_MODEL} on GPUs, "
                        "tiny on the CPU)")
    p.add_argument("--ms", default=None, help=f"token counts (default {DEFAULT_MS}; CPU: 1,4)")
    p.add_argument("--modes", default="tp,ep", help="comma-separated: tp, ep")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default=None,
                   help="default bf16 on GPUs, fp16 on the CPU")
    p.add_argument("--act-order", action="store_true",
                   help="random act-order permutations (TP folds w2's into w13's row order)")
    p.add_argument("--asym", action="store_true", help="random zero points")
    p.add_argument("--no-graph", action="store_true", help="time eager launches only")
    p.add_argument("--reps-decode", type=int, default=100)
    p.add_argument("--reps-prefill", type=int, default=20)
    p.add_argument("--max-copies", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# -- weights ----------------------------------------------------------------------------------
def clone_experts(ex: PackedExperts) -> PackedExperts:
    def c(w: PackedWeights) -> PackedWeights:
        def t(x):
            return None if x is None else x.clone()

        return PackedWeights(qweight=t(w.qweight), scales=t(w.scales), zeros=t(w.zeros),
                             perm=t(w.perm), group_size=w.group_size, name=w.name)

    return PackedExperts(w13=c(ex.w13), w2=c(ex.w2), num_experts=ex.num_experts,
                         hidden_size=ex.hidden_size, intermediate_size=ex.intermediate_size,
                         dtype=ex.dtype)


def random_layer(shape: MoEShape, dtype: torch.dtype, device: torch.device, seed: int,
                 act_order: bool = False, asym: bool = False) -> PackedExperts:
    """Random packed experts of ``shape`` made on ``device`` (``fast_random_experts``), plus
    random act-order permutations and/or zero points."""
    ex = fast_random_experts(shape, dtype, device, seed)
    if not (act_order or asym):
        return ex
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 1)

    def extend(w: PackedWeights) -> PackedWeights:
        e, n, k = w.num_experts, w.n, w.k
        perm = zeros = None
        if act_order:
            perm = torch.rand(e, k, device=device, generator=gen).argsort(dim=1)
            perm = perm.to(torch.int32)
        if asym:
            zeros = torch.randint(0, 16, (e, n, w.num_groups), dtype=torch.uint8,
                                  device=device, generator=gen)
        return PackedWeights(qweight=w.qweight, scales=w.scales, zeros=zeros, perm=perm,
                             group_size=w.group_size, name=w.name)

    return PackedExperts(w13=extend(ex.w13), w2=extend(ex.w2), num_experts=ex.num_experts,
                         hidden_size=ex.hidden_size, intermediate_size=ex.intermediate_size,
                         dtype=dtype)


def agree(value: float, op, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def n_copies(active_bytes: float, copy_bytes: float, device: torch.device, cap: int,
             collective: bool) -> int:
    """Copies to rotate (see ``copies_for``), the same on every rank when ``collective``."""
    n = copies_for(active_bytes, copy_bytes, device, max_copies=cap)
    if collective:
        n = int(agree(n, dist.ReduceOp.MIN, device))
    return max(1, n)


# -- timing -----------------------------------------------------------------------------------
def time_calls(calls, device: torch.device, reps: int, graph: bool, collective: bool) -> dict:
    """Median / p10 / p90 microseconds of one call of ``calls`` (run in turn, ``reps`` times).

    GPU: two eager warm-up passes on a side stream, then (``graph``) one CUDA graph holding
    all calls, used only if capture worked on every rank (``collective``); each sample is one
    replay (or eager pass) between CUDA events, divided by ``len(calls)``. CPU: wall clock.
    Every rank runs exactly the same calls in the same order.
    """
    def run_all():
        for c in calls:
            c()

    n = len(calls)
    if device.type != "cuda":
        run_all()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run_all()
            samples.append((time.perf_counter() - t0) * 1e6 / n)
        method = "cpu"
    else:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run_all()
            run_all()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = None
        method = "cuda_eager"
        if graph:
            ok = 1.0
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, capture_error_mode="thread_local"):
                    run_all()
            except Exception as exc:  # noqa: BLE001 - any capture failure means eager timing
                print(f"[rank {dist.get_rank() if collective else 0}] CUDA graph capture "
                      f"failed ({type(exc).__name__}: {exc}); timing eager launches",
                      flush=True)
                ok, g = 0.0, None
            torch.cuda.synchronize()
            if collective and agree(ok, dist.ReduceOp.MIN, device) < 1:
                g = None
            method = "cuda_graph" if g is not None else method
        replay = g.replay if g is not None else run_all
        replay()
        torch.cuda.synchronize()
        if collective:
            dist.barrier()
        samples = event_samples(replay, reps, n)
        del g
    return {"median_us": statistics.median(samples), "p10_us": percentile(samples, 0.1),
            "p90_us": percentile(samples, 0.9),
            "reps": reps, "calls_per_rep": n, "method": method}


def worst(t: dict, device: torch.device) -> dict:
    """The slowest rank's timing (by median)."""
    slowest = agree(t["median_us"], dist.ReduceOp.MAX, device)
    return dict(t, median_us=slowest)


# -- the benchmark ----------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    device = init_distributed()
    try:
        records = run(args, device)
    finally:
        dist.destroy_process_group()
    if records is not None:
        write(args.out, records, args.append)
    return 0


def write(path: str, records: list[dict], append: bool) -> None:
    existing: list = []
    if append and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            existing = json.load(f)
        if not isinstance(existing, list):
            raise ValueError(f"{path} holds a {type(existing).__name__}; expected a JSON list")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(existing + records, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {len(records)} records to {path}")


def run(args: argparse.Namespace, device: torch.device) -> list[dict] | None:
    rank, ws = dist.get_rank(), dist.get_world_size()
    on_gpu = device.type == "cuda"
    model = args.model or (DEFAULT_MODEL if on_gpu else "tiny")
    shape = TINY if model == "tiny" else get_shape(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if on_gpu else "fp16")]
    ms = [int(m) for m in (args.ms or (DEFAULT_MS if on_gpu else "1,4")).split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    graph = on_gpu and not args.no_graph
    e, top_k, h = shape.num_experts, shape.top_k, shape.hidden_size

    def say(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    say(f"{shape.describe()} | {dtype} | world_size={ws} | "
        f"{device_name(device)} | modes={modes} M={ms}")
    full = random_layer(shape, dtype, device, args.seed, args.act_order, args.asym)
    broadcast_experts(full, src=0)  # identical weights whatever the generator does
    full_bytes = full.nbytes
    per_expert = full_bytes / e

    # inputs, identical on every rank (rank 0's values)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    inputs = {}
    for m in ms:
        x = torch.randn(m, h, generator=gen).to(device=device, dtype=dtype)
        logits = torch.randn(m, e, generator=gen).to(device)
        dist.broadcast(x, src=0)
        dist.broadcast(logits, src=0)
        w, ids = fused_topk(logits, top_k, renormalize=shape.renormalize,
                            scoring=shape.scoring)
        inputs[m] = (x, w, ids)

    def reps_for(m: int) -> int:
        return args.reps_decode if m <= DECODE_MAX_M else args.reps_prefill

    # -- one GPU: the unsharded layer on rank 0 ------------------------------------------------
    single: dict[int, tuple[dict, str, torch.Tensor]] = {}
    if rank == 0:
        for m in ms:
            active = expected_experts(e, top_k, m) * per_expert
            nc = n_copies(active, full_bytes, device, args.max_copies, collective=False)
            mods = [HybridW4A16MoEExperts(full if c == 0 else clone_experts(full), top_k)
                    for c in range(nc)]
            x, w, ids = inputs[m]
            ref = mods[0](x, w, ids).clone()
            t = time_calls([partial(mod, x, w, ids) for mod in mods], device,
                           reps_for(m), graph, collective=False)
            single[m] = (dict(t, copies=nc), mods[0].choose_path(m), ref)
            say(f"single GPU  M={m:>5} {single[m][1]:>8} {t['median_us']:>10.1f} us "
                f"({nc} copies, {t['method']})")
            del mods
            if on_gpu:
                torch.cuda.empty_cache()
    dist.barrier()

    torch_version = torch.__version__
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    base = {"model": shape.name, "world_size": ws, "gpu": device_name(device),
            "act_order": args.act_order, "zeros": args.asym,
            "dtype": str(dtype).removeprefix("torch."), "E": e, "top_k": top_k, "H": h,
            "I": shape.intermediate_size, "G": shape.group_size, "torch": torch_version,
            "triton": triton_version,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if on_gpu else None,
            "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    records = []
    for mode in modes:
        sharded = shard_experts(full, rank, ws, mode)
        shard_bytes = sharded.experts.nbytes
        for m in ms:
            x, w, ids = inputs[m]
            # bytes one call streams on a rank: its share of the touched experts
            active = expected_experts(e, top_k, m) * per_expert / ws
            nc = n_copies(active, shard_bytes, device, args.max_copies, collective=True)
            layers = [ParallelHybridMoE(sharded if c == 0 else
                                        ShardedExperts(clone_experts(sharded.experts),
                                                       sharded.expert_map, mode, rank, ws),
                                        top_k) for c in range(nc)]
            out = layers[0](x, w, ids).clone()
            path = layers[0].choose_path(m) or "-"  # the local kernel (- without experts)
            reps = reps_for(m)
            t_layer = worst(time_calls([partial(lay, x, w, ids) for lay in layers],
                                       device, reps, graph, collective=True), device)
            locals_ = [lay.local for lay in layers if lay.local is not None]
            if locals_:
                t_local = time_calls([partial(lo, x, w, ids) for lo in locals_], device,
                                     reps, graph, collective=False)
            else:
                t_local = {"median_us": 0.0}
            local_us = agree(t_local["median_us"], dist.ReduceOp.MAX, device)
            buf = torch.zeros(m, h, dtype=dtype, device=device)
            t_comm = worst(time_calls([partial(dist.all_reduce, buf)], device, reps, graph,
                                      collective=True), device)
            del layers, locals_
            if on_gpu:
                torch.cuda.empty_cache()
            if rank == 0:
                s_t, s_path, ref = single[m]
                rel = float((out.float() - ref.float()).norm()
                            / ref.float().norm().clamp_min(1e-30))
                rec = dict(base, M=m, mode=mode, layer_us=t_layer["median_us"],
                           single_gpu_us=s_t["median_us"],
                           speedup=s_t["median_us"] / t_layer["median_us"],
                           local_us=local_us, comm_us=t_comm["median_us"],
                           p10_us=t_layer["p10_us"], p90_us=t_layer["p90_us"],
                           method=t_layer["method"], single_method=s_t["method"],
                           reps=reps, copies=nc, single_copies=s_t["copies"],
                           path=path, single_path=s_path,
                           local_experts=sharded.num_local_experts,
                           local_intermediate=sharded.experts.intermediate_size,
                           rel_err=rel, ok=bool(math.isfinite(rel) and rel < 2e-2))
                records.append(rec)
                say(f"{mode} x{ws}     M={m:>5} {rec['path']:>8} {rec['layer_us']:>10.1f} us "
                    f"(local {local_us:.1f}, all-reduce {rec['comm_us']:.1f}, one GPU "
                    f"{rec['single_gpu_us']:.1f}, x{rec['speedup']:.2f}) rel_err {rel:.1e}"
                    f"{'' if rec['ok'] else '  MISMATCH'}")
        del sharded
        if on_gpu:
            torch.cuda.empty_cache()
    return records if rank == 0 else None


if __name__ == "__main__":
    sys.exit(main())
