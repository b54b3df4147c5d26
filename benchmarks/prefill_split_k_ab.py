"""Device A/B of ``SPLIT_K`` on GEMM2 at small M: GEMM2 alone and the prefill layer, each
with the table's configs and GEMM2 split over K into S ranges, next to the decode layer, all
timed over rotated routings as ``w4a16moe tune --thresholds`` times them.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_split_k_ab.py --out $OUT

Each timed CUDA graph runs ``--rotations`` calls back to back, each with its own random
softmax routing (so consecutive calls touch different experts and the weights come from HBM),
and reports the median time per call. Before timing, every split's output is compared with
the unsplit one (GEMM2: the sum of the float32 partials against the 16-bit unsplit output;
layer: the two layers' outputs), into NaN-poisoned buffers. The byte floor is the mean over
the routings of the touched experts' words + scales and the GEMM's input and output at
``--gbps``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import write_records  # noqa: E402

from w4a16moe.bench.floors import distinct_experts, gemm_bytes  # noqa: E402
from w4a16moe.kernels.decode import DecodeWorkspace, fused_moe_decode  # noqa: E402
from w4a16moe.kernels.prefill import (  # noqa: E402
    PrefillWorkspace,
    fused_moe_prefill,
    layer_configs,
    prefill_gemm,
)
from w4a16moe.kernels.tune import (  # noqa: E402
    MODEL_SHAPES,
    random_packed_experts,
    time_cuda_graph,
)
from w4a16moe.routing import align_block_size, fused_topk  # noqa: E402

DEV = torch.device("cuda")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def run_case(model: str, m: int, experts, args) -> dict:
    s = MODEL_SHAPES[model]
    h, i, e, k = s.hidden_size, s.intermediate_size, s.num_experts, s.top_k
    dtype, slots = torch.bfloat16, m * s.top_k
    gen = torch.Generator(device=DEV)
    gen.manual_seed(m)
    x = torch.randn(m, h, device=DEV, dtype=dtype, generator=gen)
    routes = [fused_topk(torch.randn(m, e, device=DEV, generator=gen), k)
              for _ in range(args.rotations)]
    cfg1, cfg2 = layer_configs(experts, k, m, DEV)
    cfg2 = {key: v for key, v in cfg2.items() if key != "SPLIT_K"}
    bm = cfg1["BLOCK_SIZE_M"]
    blocks = [align_block_size(ids, bm, e) for _, ids in routes]
    inter = torch.randn(slots, i, device=DEV, dtype=dtype, generator=gen)
    u = sum(distinct_experts(ids) for _, ids in routes) / len(routes)
    g = experts.w2.group_size
    floor2 = gemm_bytes(u, h, i, g, slots, slots) / (args.gbps * 1e3)
    floor_layer = floor2 + gemm_bytes(u, 2 * i, h, g, m, slots, i) / (args.gbps * 1e3)
    rec = {"model": model, "M": m, "rotations": args.rotations, "distinct_experts": u,
           "gemm2_floor_us": floor2, "layer_floor_us": floor_layer, "gemm1": cfg1,
           "gemm2": cfg2, "splits": {}}

    def gemm2_fn(cfg, outs):
        def run():
            for (w, ids), blk, out in zip(routes, blocks, outs, strict=True):
                prefill_gemm(inter, experts.w2, blk, ids, w, top_k=k, mul_routed_weight=True,
                             a_is_slots=True, out=out, config=cfg)
        return run

    pws = PrefillWorkspace.allocate(m, experts, k)
    ys = [torch.empty(m, h, device=DEV, dtype=dtype) for _ in routes]

    def layer_fn(cfgs):
        def run():
            for (w, ids), y in zip(routes, ys, strict=True):
                fused_moe_prefill(x, experts, w, ids, out=y, workspace=pws, configs=cfgs)
        return run

    dws = DecodeWorkspace.create(experts, k, m)

    def decode_fn():
        for (w, ids), y in zip(routes, ys, strict=True):
            fused_moe_decode(x, experts, w, ids, out=y, workspace=dws)

    base2 = base_layer = None
    for split in args.splits:
        c2 = dict(cfg2) if split == 1 else {**cfg2, "SPLIT_K": split}
        shape = (slots, h) if split == 1 else (split, slots, h)
        outs = [torch.full(shape, float("nan"), device=DEV,
                           dtype=dtype if split == 1 else torch.float32) for _ in routes]
        fn2, fnl = gemm2_fn(c2, outs), layer_fn((cfg1, c2))
        fn2()
        got2 = [o if split == 1 else o.sum(0) for o in outs]
        for y in ys:
            y.fill_(float("nan"))
        fnl()
        got_layer = [y.clone() for y in ys]
        if split == 1:
            base2, base_layer = got2, got_layer
        row = {"gemm2_err": max(rel_err(a, b) for a, b in zip(got2, base2, strict=True)),
               "layer_err": max(rel_err(a, b) for a, b in zip(got_layer, base_layer,
                                                               strict=True)),
               "finite": all(bool(torch.isfinite(t).all()) for t in got2 + got_layer)}
        row["gemm2_us"] = time_cuda_graph(fn2, args.rep) / len(routes)
        row["layer_us"] = time_cuda_graph(fnl, args.rep) / len(routes)
        rec["splits"][str(split)] = row
    decode_fn()
    rec["decode_layer_us"] = time_cuda_graph(decode_fn, args.rep) / len(routes)
    print(f"{model} M={m} ({u:.2f} experts; GEMM2 floor {floor2:.1f} us, layer floor "
          f"{floor_layer:.1f} us): decode layer {rec['decode_layer_us']:.1f} us; "
          + "; ".join(f"S={sp}: GEMM2 {r['gemm2_us']:.1f} layer {r['layer_us']:.1f} "
                      f"(err {r['gemm2_err']:.1e}/{r['layer_err']:.1e}"
                      f"{'' if r['finite'] else ', NaN'})"
                      for sp, r in rec["splits"].items()), flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mixtral-8x7b:1,mixtral-8x7b:2,mixtral-8x7b:4,"
                    "mixtral-8x7b:8")
    ap.add_argument("--splits", type=lambda t: [int(v) for v in t.split(",")],
                    default=[1, 2, 4, 8], help="SPLIT_K values; 1 (unsplit) must come first")
    ap.add_argument("--rotations", type=int, default=8)
    ap.add_argument("--rep", type=float, default=10.0)
    ap.add_argument("--gbps", type=float, default=2940.0,
                    help="read bandwidth for the byte floor (TESTING_FACTS: streaming read)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.splits[0] != 1:
        ap.error("--splits must start with 1 (the reference for the others)")
    records, cache = [], {}
    for case in args.cases.split(","):
        model, m = case.split(":")
        if model not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            cache[model] = random_packed_experts(MODEL_SHAPES[model], torch.bfloat16, DEV)
        records.append(run_case(model, int(m), cache[model], args))
    print("wrote", write_records(args.out, "prefill_split_k_ab.json", records,
                                 gbps=args.gbps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
