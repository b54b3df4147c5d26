"""Device probe: each GEMM of a small layer on the decode kernel and on the prefill kernels'
tiles (the ``mma.sync`` kernel among them), timed alone in the same run.

    PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks python3 benchmarks/small_m_gemm_probe.py \\
        --model mixtral-8x7b --ms 1 2 --out $OUT

Per M the launches of one CUDA graph cycle through routings as ``decode_tune.py``'s do
(``--routing disjoint``: every launch reads weights that left L2 long ago), and each GEMM
is timed on its own (graph replay time per launch, median of replays):
- GEMM1 (with the fused activation) by ``decode_gemm1`` with the shipped pick, and by
  ``prefill_gemm`` over the routing's aligned blocks (made before the graph, not timed) with
  each ``--g1`` prefill config;
- GEMM2 likewise (``decode_gemm2`` against ``prefill_gemm`` with ``--g2``; the prefill
  GEMM2 writes one row a slot, the decode one a token: the top-k sum is not in either time).
Every prefill output is checked against the decode kernel's on the first routing (NaN-poisoned
first; GEMM2's slots summed per token). Floors: the GEMM's bytes (distinct experts' words
and scales, activations in and out) over the card's streaming read rate, measured first.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial

import torch
from decode_tune import (
    MODELS,
    ROUTINGS,
    _new_kernels,
    distinct,
    gemm_bytes,
    make_experts,
    time_graph,
)

from w4a16moe.bench.timing import measure_read_bandwidth
from w4a16moe.kernels import prefill_mma
from w4a16moe.kernels.decode import (
    DecodeWorkspace,
    card_sm_read_rate,
    decode_gemm1,
    decode_gemm2,
    fused_moe_decode,
    pick_config_gemm1,
    pick_config_gemm2,
)
from w4a16moe.kernels.prefill import prefill_gemm
from w4a16moe.routing import align_block_size

DEV = torch.device("cuda")


def parse_prefill_config(text: str) -> dict:
    """``BM,BN,BK,WARPS,STAGES[,FLAG...]``: flags such as ``MMA``, ``RS``, ``SWAP_AB`` (True)
    or ``WORD_RING=S`` (an integer)."""
    parts = text.split(",")
    bm, bn, bk, warps, stages = (int(p) for p in parts[:5])
    cfg = dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=1,
               num_warps=warps, num_stages=stages)
    for flag in parts[5:]:
        name, _, value = flag.partition("=")
        cfg[name] = int(value) if value else True
    return cfg


def time_layers(args, m, routes, x, ex, ws, inter, out, d2, blocks, floor, u, R) -> list:
    """The layer from routed inputs: ``fused_moe_decode``, and GEMM1 on each prefill config
    of ``args.layers`` followed by ``decode_gemm2`` (with the alignment, and without it:
    blocks made before the graph)."""
    top_k = routes[0][1].shape[1]
    E = ex.num_experts

    def decode(w, ids):
        fused_moe_decode(x, ex, w, ids, out=out, workspace=ws)

    def mixed(w, ids, cfg, b=None):
        if b is None:
            b = align_block_size(ids, cfg["BLOCK_SIZE_M"], E)
        prefill_gemm(x, ex.w13, b, ids, w, top_k=top_k, activation="silu", out=inter,
                     config=cfg)
        decode_gemm2(inter, ex.w2, ids, w, out=out, workspace=ws, config=d2)

    variants = [("decode", [partial(decode, w, ids) for w, ids in routes])]
    for text in args.layers:
        cfg = parse_prefill_config(text)
        bl = blocks[cfg["BLOCK_SIZE_M"]]
        variants.append((f"{text} + align", [partial(mixed, w, ids, cfg) for w, ids in routes]))
        variants.append((f"{text} (blocks given)",
                         [partial(mixed, w, ids, cfg, b)
                          for (w, ids), b in zip(routes, bl, strict=True)]))
    recs, ref = [], None
    for name, fns in variants:
        out.fill_(float("nan"))
        fns[0]()
        torch.cuda.synchronize()
        got = out.float()
        if ref is None:
            ref = got.clone()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        us = min(time_graph(fns, args.replays, profile=False)[0] for _ in range(2))
        recs.append(dict(model=args.model, m=m, gemm="layer", name=name, graph_us=us,
                         floor_us=floor, x_floor=us / floor, rel_diff_vs_decode=err,
                         distinct_experts=u, launches_per_graph=R))
        print(f"{args.model} M={m} layer {name:>34s} {us:7.2f} us  floor {floor:6.2f}  "
              f"{us / floor:5.2f}x  rel diff {err:.1e}", flush=True)
    return recs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mixtral-8x7b", choices=sorted(MODELS))
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--g1", nargs="*", default=["8,8,256,1,1,MMA", "8,16,256,1,1,MMA",
                                                "8,16,256,2,1,MMA", "8,32,256,2,1,MMA",
                                                "8,32,256,4,1,MMA", "8,64,256,4,1,MMA",
                                                "8,8,512,1,1,MMA", "8,16,512,2,1,MMA"])
    ap.add_argument("--g2", nargs="*", default=["8,16,256,1,1,MMA", "8,8,256,1,1,MMA",
                                                "8,32,256,2,1,MMA", "8,64,256,4,1,MMA",
                                                "8,16,512,1,1,MMA", "8,32,512,2,1,MMA"])
    ap.add_argument("--layers", nargs="*", default=None,
                    help="instead of the GEMMs alone, the layer from routed inputs: the decode "
                         "kernels against GEMM1 on each of these prefill configs (over aligned "
                         "blocks, the alignment timed in and, as a bound, left out) and GEMM2 on "
                         "the decode kernel")
    ap.add_argument("--routing", default="disjoint", choices=sorted(ROUTINGS))
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dtype = torch.bfloat16
    read_gbps, _ = measure_read_bandwidth(DEV)
    read_bw = read_gbps * 1e9
    print(f"streaming read {read_gbps:.0f} GB/s", flush=True)
    p = MODELS[args.model]
    E, top_k, H, I, G = p["E"], p["top_k"], p["H"], p["I"], p["G"]
    ex = make_experts(E, H, I, G, dtype, DEV, seed=3)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    rate = card_sm_read_rate(DEV)
    records = []
    seen: set = set()
    for m in args.ms:
        per_launch = min(m * top_k, E)
        R = max(-(-E // per_launch), 4, int(-(-400e6 // (per_launch * ex.nbytes / E))))
        routes = [ROUTINGS[args.routing](m, top_k, E, r, DEV) for r in range(R)]
        u = sum(distinct(ids) for _, ids in routes) / R
        blocks = {bm: [align_block_size(ids, bm, E) for _, ids in routes] for bm in (8, 16)}
        x = torch.randn(m, H, dtype=dtype, device=DEV)
        inter = torch.randn(m * top_k, I, dtype=dtype, device=DEV)
        floors = (gemm_bytes(u, 2 * I, H, G, m, H, m * top_k, I) / read_bw * 1e6,
                  gemm_bytes(u, H, I, G, m * top_k, I, m, H) / read_bw * 1e6)
        ws = DecodeWorkspace.create(ex, top_k=top_k, max_tokens=m)
        out1 = torch.empty(m * top_k, I, dtype=dtype, device=DEV)
        out2 = torch.empty(m, H, dtype=dtype, device=DEV)
        slots2 = torch.empty(m * top_k, H, dtype=dtype, device=DEV)
        d1 = pick_config_gemm1(m, I, H, E, top_k, sms, sm_read_rate=rate)
        d2 = pick_config_gemm2(m, H, I, E, top_k, sms, sm_read_rate=rate)
        if args.layers is not None:
            records += time_layers(args, m, routes, x, ex, ws, out1, out2, d2, blocks,
                                   sum(floors), u, R)
            continue
        for gemm, texts, floor in (("gemm1", args.g1, floors[0]), ("gemm2", args.g2, floors[1])):
            if gemm == "gemm1":
                ref_out, a, w_e, decode_fn, dcfg = out1, x, ex.w13, decode_gemm1, d1
                kw = dict(activation="silu", out=out1)
            else:
                ref_out, a, w_e, decode_fn, dcfg = out2, inter, ex.w2, decode_gemm2, d2
                kw = dict(mul_routed_weight=True, a_is_slots=True, out=slots2)
            fns = [partial(decode_fn, a, w_e, ids, w, out=ref_out, workspace=ws, config=dcfg)
                   for w, ids in routes]
            variants = [("decode", dcfg.__dict__, fns, None)]
            for text in texts:
                cfg = parse_prefill_config(text)
                fns = [partial(prefill_gemm, a, w_e, b, ids, w, top_k=top_k, config=cfg, **kw)
                       for (w, ids), b in zip(routes, blocks[cfg["BLOCK_SIZE_M"]], strict=True)]
                check = kw["out"]
                variants.append((text, cfg, fns, check))
            ref = None
            for name, cfg, fns, check in variants:
                ref_out.fill_(float("nan"))
                if check is not None:
                    check.fill_(float("nan"))
                try:
                    fns[0]()
                    torch.cuda.synchronize()
                except Exception as exc:  # a tile the kernel refuses: record why
                    print(f"{args.model} M={m} {gemm} {name}: {type(exc).__name__}: {exc}",
                          flush=True)
                    records.append(dict(model=args.model, m=m, gemm=gemm, name=name,
                                        error=f"{type(exc).__name__}: {exc}"))
                    continue
                regs = [k["n_regs"] for k in _new_kernels(
                    seen, kernels=(prefill_mma._prefill_mma_kernel,))]
                got = ref_out if check is None else check
                got = got.float() if gemm == "gemm1" or check is None else \
                    got.float().view(m, top_k, H).sum(1)
                if ref is None:
                    ref = got.clone()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                us, _ = time_graph(fns, args.replays, profile=False)
                us2, _ = time_graph(fns, args.replays, profile=False)
                us = min(us, us2)
                rec = dict(model=args.model, m=m, gemm=gemm, name=name, config=cfg,
                           graph_us=us, floor_us=floor, x_floor=us / floor,
                           rel_diff_vs_decode=err, distinct_experts=u, launches_per_graph=R,
                           mma_regs=regs)
                records.append(rec)
                print(f"{args.model} M={m} {gemm} {name:>22s} {us:7.2f} us  floor "
                      f"{floor:6.2f}  {us / floor:5.2f}x  rel diff {err:.1e}  u {u:.2f} "
                      f"regs {regs}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"small_m_gemm_probe_{args.model}.json")
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(DEV), read_gbps=read_bw / 1e9,
                       records=records), f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
