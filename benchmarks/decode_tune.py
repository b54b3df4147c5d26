"""Correctness at real shapes and timing of the decode kernels on the GPU (one run does all).

    PYTHONPATH=. python benchmarks/decode_tune.py [--out DIR] [--quick]
        [--models NAME ...] [--ms M ...] [--g1 BN,BKW,SPLIT,WARPS[,PF[,TI[,STAGES]]] ...]
        [--g2 ...] [--routing disjoint|random]
    (STAGES >= 2: loads through a cp.async ring instead of registers)

What it does, for Qwen3-30B-A3B (E=128, top_k=8, H=2048, I=768, G=128) and Mixtral-8x7B
(E=8, top_k=2, H=4096, I=14336, G=128), and for deepseek-v2-lite, qwen3-235b-a22b and
olmoe-1b-7b when ``--models`` names them (the timing; the correctness checks cover all five):

1. Correctness of ``fused_moe_decode`` with the default configs in bf16 and fp16 against
   ``moe_reference`` (fp32, intermediate rounded) on the experts the routing touches.
2. CUDA graph capture of the whole layer, replayed with new routing / activations.
3. Timing of GEMM1 and GEMM2 config variants (the built-in lists, or ``--g1``/``--g2``) and
   of the default layer, under CUDA graphs, with each variant's registers and spills:
   one graph holds R launches whose routing cycles through disjoint expert sets, so every
   launch reads weights that left L2 long ago (> 200 MB read in between); with
   ``--routing random`` each launch takes the top-k of random logits instead, so slots share
   experts as a router's do. Two numbers per
   variant: graph replay time per launch (includes the ~launch gap between graph nodes) and
   the kernel's own duration from the profiler (CUPTI).
4. The floor: active bytes (distinct experts u, averaged over the launches: u*N*K/2 +
   scales, plus activations in/out) over this GPU's streaming read rate, measured at the
   start (``measure_read_bandwidth``; ``--read-gbps`` sets it instead, e.g. 2940 for the
   H100 rate that the records before session 40 used).

Weights are random int32 words (every word is a valid packed code set) and random scales,
made on the GPU directly: building them through the CPU quantizer would take minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from w4a16moe.bench.timing import capture_graph, measure_read_bandwidth
from w4a16moe.kernels.decode import (
    DecodeConfig,
    DecodeWorkspace,
    card_sm_read_rate,
    decode_gemm1,
    decode_gemm2,
    fused_moe_decode,
    pick_config_gemm1,
    pick_config_gemm2,
)
from w4a16moe.layout import PackedExperts, PackedWeights
from w4a16moe.reference import moe_reference
from w4a16moe.routing import fused_topk

#: H100 streaming read (shared/TESTING_FACTS.md): the floors' rate before session 40, and
#: where nothing is measured (``--mode warm``)
H100_STREAM_BW = 2.94e12
MODELS = {
    "qwen3-30b-a3b": dict(E=128, top_k=8, H=2048, I=768, G=128),
    "mixtral-8x7b": dict(E=8, top_k=2, H=4096, I=14336, G=128),
    # swept only when named with --models (the built-in plan covers the two above)
    "deepseek-v2-lite": dict(E=64, top_k=6, H=2048, I=1408, G=128),
    "qwen3-235b-a22b": dict(E=128, top_k=8, H=4096, I=1536, G=128),
    "olmoe-1b-7b": dict(E=64, top_k=8, H=2048, I=1024, G=128),
}


def make_experts(E, H, I, G, dtype, device, seed=0):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def one(n, k):
        q = torch.randint(-2**31, 2**31 - 1, (E, n, k // 8), dtype=torch.int32, device=device,
                          generator=gen)
        s = (torch.rand((E, n, k // G), device=device, generator=gen) * 0.5 + 0.75)
        return PackedWeights(qweight=q, scales=(s / (4 * k**0.5)).to(dtype), group_size=G)

    return PackedExperts(w13=one(2 * I, H), w2=one(H, I), num_experts=E, hidden_size=H,
                         intermediate_size=I, dtype=dtype)


def routing(m, top_k, E, launch, device):
    """Token t of launch r uses experts (r*m*top_k + t*top_k + k) mod E: all distinct
    within a launch while m*top_k <= E, and far from the previous launches' experts."""
    base = launch * m * top_k
    ids = (base + torch.arange(m * top_k, device=device)) % E
    ids = ids.view(m, top_k).to(torch.int32)
    w = torch.rand(m, top_k, device=device)
    return (w / w.sum(-1, keepdim=True)).contiguous(), ids.contiguous()


def random_routing(m, top_k, E, launch, device):
    """Top-k of random logits (seeded by the launch): what a router gives, so tokens share
    experts; every launch draws anew, so consecutive launches mostly touch other weights."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(1000 + launch)
    w, ids = fused_topk(torch.randn(m, E, generator=gen).to(device), top_k)
    return w.contiguous(), ids.to(torch.int32).contiguous()


def distinct(ids):
    return int(torch.unique(ids).numel())


def gemm_bytes(u, n, k, g, m_in_rows, k_in, m_out_rows, n_out, act_bytes=2):
    return u * n * k // 2 + u * n * (k // g) * 2 + m_in_rows * k_in * act_bytes \
        + m_out_rows * n_out * act_bytes


def check_real_shapes(device, results):
    for name, p in MODELS.items():
        for dtype in (torch.bfloat16, torch.float16):
            ex = make_experts(p["E"], p["H"], p["I"], p["G"], dtype, device, seed=1)
            for m in (1, 5):
                w, _ = routing(m, p["top_k"], p["E"], 0, device)
                # top-k ids within a token are distinct: a random permutation prefix each
                ids = torch.stack([torch.randperm(p["E"], device=device)[:p["top_k"]]
                                   for _ in range(m)]).to(torch.int32)
                x = torch.randn(m, p["H"], dtype=dtype, device=device)
                out = fused_moe_decode(x, ex, w, ids)
                used = torch.unique(ids)
                remap = torch.full((p["E"],), -1, dtype=torch.int32, device=device)
                remap[used] = torch.arange(used.numel(), dtype=torch.int32, device=device)
                sub = ex.select_experts(used)
                ref = moe_reference(x, sub, w, remap[ids.long()], compute_dtype=torch.float32,
                                    round_intermediate=True)
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                tol = 2**-6 if dtype == torch.bfloat16 else 2**-9
                rec = dict(model=name, dtype=str(dtype), m=m, rel_err=err, ok=err <= tol)
                results["correctness"].append(rec)
                print("check", rec, flush=True)
            del ex
            torch.cuda.empty_cache()


def check_graph(device, results):
    p = MODELS["qwen3-30b-a3b"]
    dtype = torch.bfloat16
    ex = make_experts(p["E"], p["H"], p["I"], p["G"], dtype, device, seed=2)
    m = 4
    ws = DecodeWorkspace.create(ex, top_k=p["top_k"], max_tokens=m)
    x = torch.randn(m, p["H"], dtype=dtype, device=device)
    w, ids = routing(m, p["top_k"], p["E"], 0, device)
    out = torch.empty(m, p["H"], dtype=dtype, device=device)

    def step():
        fused_moe_decode(x, ex, w, ids, out=out, workspace=ws)

    g, _ = capture_graph(step)
    worst = 0.0
    for _ in range(6):
        ids.copy_(torch.stack([torch.randperm(p["E"], device=device)[:p["top_k"]]
                               for _ in range(m)]).to(torch.int32))
        w.copy_(torch.rand_like(w))
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        g.replay()
        ref = moe_reference(x, ex, w, ids, compute_dtype=torch.float32, round_intermediate=True)
        worst = max(worst, ((out.float() - ref).abs().max() / ref.abs().max()).item())
    clean = all(int(torch.count_nonzero(t)) == 0 for t in (ws.acc1, ws.acc2, ws.cnt1, ws.cnt2))
    rec = dict(m=m, replays=6, worst_rel_err=worst, ok=worst <= 2**-6, workspace_clean=clean)
    results["graph"] = rec
    print("graph", rec, flush=True)


def time_graph(fn_list, replays, profile=True):
    """Per-launch time of a graph holding every fn in fn_list once (median of ``replays``)
    and, with ``profile``, the median kernel duration per launch from the profiler."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fn_list:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fn_list:
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fn_list))
    times.sort()
    kernel_us = None
    if not profile:
        return times[len(times) // 2], None
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
        durs = {}
        for e in prof.events():
            if "decode_gemm" in e.name and str(e.device_type).endswith("CUDA"):
                durs.setdefault(e.name, []).append(e.time_range.elapsed_us())
        if durs:
            per = {k: sorted(v)[len(v) // 2] for k, v in durs.items()}
            kernel_us = sum(per.values())
    except Exception as exc:  # profiler trouble must not lose the timings
        print("profiler failed:", exc)
    return times[len(times) // 2], kernel_us


def _cfg(bn, bkw, split, nw, pf=1, ti=1, stages=1):
    return DecodeConfig(block_n=bn, block_kw=bkw, split_k=split, num_warps=nw, prefetch=pf,
                        topk_inner=ti, num_stages=stages)


# (block_n, block_kw, split_k, num_warps, prefetch[, topk_inner]); GEMM1 tiles hold 2*block_n
G1_VARIANTS = [_cfg(*c) for c in (
    (8, 32, 1, 1), (8, 32, 1, 2), (16, 32, 1, 2), (16, 32, 1, 4), (32, 32, 1, 4),
    (8, 32, 2, 2), (8, 64, 1, 1))]
G2_VARIANTS = [_cfg(*c) for c in (
    (16, 32, 1, 1), (32, 32, 1, 2), (32, 32, 1, 1), (64, 32, 1, 4), (64, 32, 2, 4),
    (64, 32, 4, 4), (64, 32, 1, 4, 1, 64))]
PLAN = {"qwen3-30b-a3b": (1, 2, 4, 8, 16), "mixtral-8x7b": (1, 2, 4)}


def _new_kernels(seen, kernels=None):
    """Registers and spills of the ``kernels`` (default: the decode kernels) compiled since
    the last call (Triton's per-device caches; ``seen`` holds the ones already reported)."""
    from w4a16moe.kernels import decode as dec
    found = []
    for fn in kernels or (dec._decode_gemm1_kernel, dec._decode_gemm2_kernel):
        for caches in getattr(fn, "device_caches", {}).values():
            for key, k in caches[0].items():
                if (fn.__name__, key) not in seen:
                    seen.add((fn.__name__, key))
                    found.append(dict(kernel=fn.__name__, n_regs=getattr(k, "n_regs", None),
                                      n_spills=getattr(k, "n_spills", None)))
    return found


_SEEN_KERNELS: set = set()


def _launches(kind, routes, x, ex, out, ws, cfg=None):
    """One closure per routing: a GEMM1, GEMM2 or whole-layer launch."""
    def make(w, ids):
        if kind == "gemm1":
            return lambda: decode_gemm1(x, ex.w13, ids, w, out=out, workspace=ws, config=cfg)
        if kind == "gemm2":
            return lambda: decode_gemm2(x, ex.w2, ids, w, out=out, workspace=ws, config=cfg)
        return lambda: fused_moe_decode(x, ex, w, ids, out=out, workspace=ws)
    return [make(w, ids) for w, ids in routes]


#: ``--routing``: how each launch of a timing graph picks its experts
ROUTINGS = {"disjoint": routing, "random": random_routing}


def sweep_model(name, ms, device, results, g1_variants, g2_variants, warm_only,
                route=routing, stream_bw=H100_STREAM_BW):
    dtype = torch.bfloat16
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    p = MODELS[name]
    E, top_k, H, I, G = p["E"], p["top_k"], p["H"], p["I"], p["G"]
    ex = make_experts(E, H, I, G, dtype, device, seed=3)
    layer_bytes = ex.nbytes
    for m in ms:
        # enough launches that > 200 MB of weights are read between two uses of an expert
        per_launch = min(m * top_k, E)
        expert_bytes = layer_bytes / E
        R = max(-(-E // per_launch), 4, int(-(-400e6 // (per_launch * expert_bytes))))
        routes = [route(m, top_k, E, r, device) for r in range(R)]
        u = sum(distinct(ids) for _, ids in routes) / R
        x = torch.randn(m, H, dtype=dtype, device=device)
        inter = torch.randn(m * top_k, I, dtype=dtype, device=device)
        b1 = gemm_bytes(u, 2 * I, H, G, m, H, m * top_k, I)
        b2 = gemm_bytes(u, H, I, G, m * top_k, I, m, H)
        floor1, floor2 = b1 / stream_bw * 1e6, b2 / stream_bw * 1e6
        ws = DecodeWorkspace.create(ex, top_k=top_k, max_tokens=m)
        out1 = torch.empty(m * top_k, I, dtype=dtype, device=device)
        out2 = torch.empty(m, H, dtype=dtype, device=device)
        rate = card_sm_read_rate(device)
        d1 = pick_config_gemm1(m, I, H, E, top_k, sms, sm_read_rate=rate)
        d2 = pick_config_gemm2(m, H, I, E, top_k, sms, sm_read_rate=rate)
        for gemm, variants, floor, byts in (("gemm1", [d1] + g1_variants, floor1, b1),
                                            ("gemm2", [d2] + g2_variants, floor2, b2)):
            recs = []
            target = None
            for i, cfg in enumerate(variants):
                if gemm == "gemm1":
                    out = out1
                    fns = _launches("gemm1", routes, x, ex, out1, ws, cfg)
                else:
                    out = out2
                    fns = _launches("gemm2", routes, inter, ex, out2, ws, cfg)
                out.fill_(float("nan"))
                fns[0]()
                compiled = _new_kernels(_SEEN_KERNELS)
                if warm_only:
                    continue
                if target is None:  # the default config (checked against the reference)
                    target = out.float().clone()
                err = ((out.float() - target).abs().max() / target.abs().max()).item()
                graph_us, _ = time_graph(fns, 20, profile=False)
                recs.append(dict(model=name, m=m, gemm=gemm, default=(i == 0),
                                 config=cfg.__dict__, graph_us=graph_us, kernel_us=None,
                                 floor_us=floor, bytes=byts, distinct_experts=u,
                                 launches_per_graph=R, rel_diff_vs_default=err,
                                 compiled=compiled,
                                 agrees=err <= 2**-6, _fns=fns))
            if warm_only:
                continue
            best = min(recs, key=lambda r: r["graph_us"])
            for rec in recs:
                fns = rec.pop("_fns")
                if rec["default"] or rec is best:
                    rec["graph_us"], rec["kernel_us"] = time_graph(fns, 20, profile=True)
                t = rec["kernel_us"] or rec["graph_us"]
                rec.update(x_floor=t / floor, bw_frac=floor / t, best=rec is best)
                results["timing"].append(rec)
                print(f"{name} M={m} {gemm} {'DEFAULT ' if rec['default'] else ''}"
                      f"{'BEST ' if rec['best'] else ''}{rec['config']} graph "
                      f"{rec['graph_us']:.2f}us kernel {rec['kernel_us'] or float('nan'):.2f}us "
                      f"floor {floor:.2f}us -> {t / floor:.2f}x "
                      f"regs {[c['n_regs'] for c in rec['compiled']]}"
                      f"{'' if rec['agrees'] else ' DISAGREES WITH DEFAULT'}", flush=True)
        fns = _launches("layer", routes, x, ex, out2, ws)
        if warm_only:
            fns[0]()
            torch.cuda.synchronize()
            continue
        graph_us, kern_us = time_graph(fns, 20)
        results["layer"].append(dict(model=name, m=m, graph_us=graph_us, kernel_us=kern_us,
                                     floor_us=floor1 + floor2))
        print(f"{name} M={m} layer graph {graph_us:.2f}us kernels {kern_us}us floor "
              f"{floor1 + floor2:.2f}us", flush=True)


def parse_config(text):
    """``"block_n,block_kw,split_k,num_warps[,prefetch[,topk_inner[,num_stages]]]"`` ->
    DecodeConfig (``num_stages`` >= 2: the ``cp.async`` ring instead of the register
    prefetch)."""
    try:
        fields = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"config {text!r}: expected comma-separated integers") from None
    if not 4 <= len(fields) <= 7:
        raise argparse.ArgumentTypeError(
            f"config {text!r}: expected block_n,block_kw,split_k,num_warps[,prefetch"
            f"[,topk_inner[,num_stages]]], found {len(fields)} fields")
    try:
        return _cfg(*fields)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"config {text!r}: {exc}") from None


def sweep(device, results, quick, models, warm_only=False, defaults_only=False,
          g1=None, g2=None, ms=None, route=routing, stream_bw=H100_STREAM_BW):
    """Time every variant (or, with ``warm_only``, launch each once to fill the compile
    cache; run several warm processes side by side to compile in parallel). ``g1``/``g2``
    replace the built-in variant lists, ``ms`` the token counts of every model, ``route``
    the routing of each launch (one of :data:`ROUTINGS`), ``stream_bw`` the read rate
    (bytes/s) of the floors."""
    g1_variants = G1_VARIANTS if g1 is None else g1
    g2_variants = G2_VARIANTS if g2 is None else g2
    if quick:
        g1_variants, g2_variants = g1_variants[:3], g2_variants[:3]
    if defaults_only:
        g1_variants, g2_variants = [], []
    for name in MODELS:
        ms_ = tuple(ms) if ms else PLAN.get(name, (1, 2, 4, 8))
        if (not models and name in PLAN) or (models and name in models):
            sweep_model(name, ms_, device, results, g1_variants, g2_variants, warm_only,
                        route, stream_bw)
            torch.cuda.empty_cache()
    if warm_only:
        return
    # the price of one more (tiny) kernel in a graph: what a separate epilogue would cost
    tiny = torch.zeros(4096, device=device)
    graph_us, _ = time_graph([lambda: tiny.add_(1.0)] * 32, 20)
    results["tiny_kernel_graph_us"] = graph_us
    print(f"tiny kernel in a graph: {graph_us:.2f}us per launch", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="three variants per GEMM")
    ap.add_argument("--defaults-only", action="store_true",
                    help="time only the heuristic's configs (and the layer)")
    ap.add_argument("--mode", choices=("all", "checks", "warm", "time"), default="all",
                    help="checks: correctness only; warm: compile every variant; time: sweep")
    ap.add_argument("--models", nargs="*", default=None, choices=tuple(MODELS))
    ap.add_argument("--ms", nargs="*", type=int, default=None,
                    help="token counts to sweep (default: the built-in plan per model)")
    ap.add_argument("--g1", nargs="*", type=parse_config, default=None,
                    metavar="BN,BKW,SPLIT,WARPS[,PF[,TI[,STAGES]]]",
                    help="GEMM1 variants to time besides the default config (replaces the "
                         "built-in list; GEMM1 tiles hold 2*BN rows; TI is unused; STAGES "
                         ">= 2 loads through a cp.async ring)")
    ap.add_argument("--g2", nargs="*", type=parse_config, default=None,
                    metavar="BN,BKW,SPLIT,WARPS[,PF[,TOPK_INNER[,STAGES]]]",
                    help="GEMM2 variants to time besides the default config")
    ap.add_argument("--read-gbps", type=float, default=None,
                    help="streaming read rate of the floors in GB/s (default: measured on "
                         "this GPU at the start; 2940 gives the H100 floors of the records "
                         "before session 40)")
    ap.add_argument("--routing", choices=tuple(ROUTINGS), default="disjoint",
                    help="disjoint: every slot of a launch on its own expert (the worst "
                         "case, the default); random: top-k of random logits, so slots "
                         "share experts as a router's do (the floor counts the distinct "
                         "experts, averaged over the launches)")
    args = ap.parse_args()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    import triton
    results = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                   triton=triton.__version__, date=time.strftime("%Y-%m-%d"),
                   routing=args.routing, correctness=[], timing=[], layer=[])
    t0 = time.time()
    if args.mode in ("all", "checks"):
        check_real_shapes(device, results)
        check_graph(device, results)
        print(f"checks took {time.time() - t0:.1f}s", flush=True)
    if args.mode in ("all", "warm", "time"):
        if args.read_gbps is not None:
            read_gbps, how = args.read_gbps, "--read-gbps"
        elif args.mode == "warm":
            read_gbps, how = H100_STREAM_BW / 1e9, "not measured (--mode warm)"
        else:
            read_gbps, how = measure_read_bandwidth(device)
        results.update(read_gbps=read_gbps, read_gbps_how=how)
        print(f"floors at {read_gbps:.0f} GB/s ({how})", flush=True)
        sweep(device, results, args.quick, args.models, warm_only=args.mode == "warm",
              defaults_only=args.defaults_only, g1=args.g1, g2=args.g2, ms=args.ms,
              route=ROUTINGS[args.routing], stream_bw=read_gbps * 1e9)
    if args.mode == "warm":
        print(f"warm took {time.time() - t0:.1f}s")
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"decode_{args.mode}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
