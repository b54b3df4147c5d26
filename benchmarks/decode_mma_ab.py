"""The tensor-core decode GEMM1 (``kernels/decode_mma.py``) against the CUDA-core one.

    PYTHONPATH=. python benchmarks/decode_mma_ab.py [--out DIR] [--models ...] [--ms ...]

For each model and M: the float32 reference of GEMM1 + activation on the routed experts
(dequantized weights, slots' tokens), both kernels checked against it into NaN-poisoned
outputs, then both timed in one process under CUDA graphs whose launches cycle through
disjoint expert sets (cold L2; ``decode_tune.py``'s method), kernel time from the profiler.
Prints one line per kernel and config and writes ``decode_mma_ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_tune import MODELS, STREAM_BW, gemm_bytes, make_experts, routing  # noqa: E402

from w4a16moe.kernels.decode import decode_gemm1  # noqa: E402
from w4a16moe.kernels.decode_mma import decode_mma_gemm1, mma_gemm1_unsupported  # noqa: E402
from w4a16moe.reference import activation_and_mul  # noqa: E402

#: (block_n_out, num_warps, block_k, stages) variants of the tensor-core kernel (stages 0:
#: words loaded into registers two steps ahead; else a cp.async ring in shared memory)
MMA_VARIANTS = [(16, 2, 128, 0), (8, 1, 128, 0), (32, 4, 128, 0), (8, 1, 128, 4),
                (16, 2, 128, 4), (16, 1, 128, 4), (8, 1, 128, 3)]


def reference_gemm1(x, w13, ids, top_k):
    """float32 ``act(gate) * up`` per slot from the dequantized weights."""
    used = torch.unique(ids)
    dense = w13.select_experts(used).dequantize(torch.float32)  # [u, 2I, H]
    remap = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long, device=ids.device)
    remap[used] = torch.arange(used.numel(), device=ids.device)
    flat = remap[ids.reshape(-1).long()]
    xs = x.float().repeat_interleave(top_k, dim=0)  # row slot -> token slot // top_k
    gate_up = torch.stack([dense[e] @ xs[s] for s, e in enumerate(flat.tolist())])
    return activation_and_mul(gate_up, "silu")


def graph_time(fns, replays=20):
    """Median per-launch graph replay time and the profiler's median kernel time (us)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    times.sort()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
    durs = [e.time_range.elapsed_us() for e in prof.events()
            if "gemm1" in e.name and str(e.device_type).endswith("CUDA")]
    durs.sort()
    return times[len(times) // 2], (durs[len(durs) // 2] if durs else None)


def run_case(name, m, ex, rounds, device):
    """Check and time both kernels for one model and M; returns the records."""
    p = MODELS[name]
    E, top_k, H, I, G = p["E"], p["top_k"], p["H"], p["I"], p["G"]
    expert_bytes = ex.nbytes / E
    per_launch = min(m * top_k, E)
    R = max(-(-E // per_launch), 4, int(-(-400e6 // (per_launch * expert_bytes))))
    routes = [routing(m, top_k, E, r, device) for r in range(R)]
    x = torch.randn(m, H, dtype=torch.bfloat16, device=device)
    ids0 = routes[0][1]
    ref = reference_gemm1(x, ex.w13, ids0, top_k)
    u = int(torch.unique(ids0).numel())
    floor = gemm_bytes(u, 2 * I, H, G, m, H, m * top_k, I) / STREAM_BW * 1e6
    out = torch.empty(m * top_k, I, dtype=torch.bfloat16, device=device)

    def cuda_core(w, ids):
        return decode_gemm1(x, ex.w13, ids, w, out=out)

    def mma(bn, nw, bk, st):
        return lambda w, ids: decode_mma_gemm1(x, ex.w13, ids, out=out, block_n_out=bn,
                                               block_k=bk, num_warps=nw, stages=st)

    kernels = {"cuda-core": cuda_core}
    for bn, nw, bk, st in MMA_VARIANTS:
        if mma_gemm1_unsupported(x, ex.w13, block_n_out=bn, block_k=bk, num_warps=nw) is None:
            kernels[f"mma {bn}x{nw}w k{bk} s{st}"] = mma(bn, nw, bk, st)
    checked = {}
    for kname, fn in kernels.items():
        out.fill_(float("nan"))
        fn(*routes[0])
        checked[kname] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    timings = {k: [] for k in kernels}
    for _ in range(rounds):
        for kname, fn in kernels.items():
            fns = [lambda fn=fn, w=w, ids=ids: fn(w, ids) for w, ids in routes]
            timings[kname].append(graph_time(fns))
    records = []
    for kname in kernels:
        graph_us = sorted(t[0] for t in timings[kname])[len(timings[kname]) // 2]
        kern = sorted(t[1] for t in timings[kname] if t[1] is not None)
        kernel_us = kern[len(kern) // 2] if kern else None
        rec = dict(model=name, m=m, kernel=kname, graph_us=graph_us, kernel_us=kernel_us,
                   floor_us=floor, rel_err=checked[kname], ok=checked[kname] <= 2**-6,
                   distinct_experts=u, launches_per_graph=R)
        records.append(rec)
        t = kernel_us or graph_us
        print(f"{name} M={m} {kname:22} graph {graph_us:7.2f} us kernel "
              f"{kernel_us or float('nan'):7.2f} us floor {floor:6.2f} -> {t / floor:.2f}x  "
              f"rel err {checked[kname]:.1e}{'' if rec['ok'] else '  WRONG'}", flush=True)
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=tuple(MODELS))
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=2,
                    help="times each kernel is timed, alternating (A B A B ...)")
    args = ap.parse_args()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    import triton
    results = dict(gpu=props.name, torch=torch.__version__, triton=triton.__version__,
                   date=time.strftime("%Y-%m-%d"), records=[])
    for name in args.models:
        p = MODELS[name]
        ex = make_experts(p["E"], p["H"], p["I"], p["G"], torch.bfloat16, device, seed=5)
        for m in args.ms:
            results["records"] += run_case(name, m, ex, args.rounds, device)
        del ex
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_mma_ab.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
