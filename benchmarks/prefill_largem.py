"""Device experiment: the prefill GEMMs at large M (compute-bound), config variants against the
table config and the bf16 baseline (``torch._grouped_mm`` on dequantized weights, tokens
pre-sorted), GEMM1 (fused SiLU*up) and GEMM2 timed separately under CUDA graphs.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_largem.py --out $OUT

Variants (besides the table config):
* ``gu``: GATE_UP_TILE, gate and up rows in one weight tile of 2*BLOCK_SIZE_N rows with one
  ``tl.dot``, so with 8 warps each warpgroup dequantizes only its own 64 rows while its
  accumulator spans BLOCK_SIZE_M = 256 tokens: half the dequantization per MAC of the
  128-token tiles;
* ``frag``: FRAG_K weight tiles (the layer feeds fragment-ordered activations);
* GEMM2 with SWAP_AB, BLOCK_SIZE_N = 128 weight rows (64 per warpgroup), 256 tokens.

Each variant's output is compared with the table config's (max |diff| / max |ref|).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_tune import baseline_fn  # noqa: E402

from w4a16moe.kernels.configs import get_prefill_config  # noqa: E402
from w4a16moe.kernels.prefill import fragment_order_columns, prefill_gemm  # noqa: E402
from w4a16moe.kernels.tune import (  # noqa: E402
    MODEL_SHAPES,
    random_packed_experts,
    random_routing,
    time_cuda_graph,
)
from w4a16moe.routing import align_block_size  # noqa: E402

DEV = torch.device("cuda")


def cfg(bm, bn, bk, warps, stages, swap, **extra):
    return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 8,
            "num_warps": warps, "num_stages": stages, "SWAP_AB": swap, **extra}


GEMM1_VARIANTS = {
    "gu 256x64x64 w8 s4": cfg(256, 64, 64, 8, 4, True, GATE_UP_TILE=True),
    "gu 256x64x64 w8 s3 frag (8w)": cfg(256, 64, 64, 8, 3, True, GATE_UP_TILE=True,
                                        FRAG_K=True),
    "gu 256x32x64 w4 s3 frag": cfg(256, 32, 64, 4, 3, True, GATE_UP_TILE=True, FRAG_K=True),
    "gu 256x32x64 w4 s4 frag": cfg(256, 32, 64, 4, 4, True, GATE_UP_TILE=True, FRAG_K=True),
    "gu 256x32x64 w4 s3": cfg(256, 32, 64, 4, 3, True, GATE_UP_TILE=True),
    "gu 128x32x64 w4 s4 frag": cfg(128, 32, 64, 4, 4, True, GATE_UP_TILE=True, FRAG_K=True),
}
GEMM2_VARIANTS = {
    "sw1 256x128x64 w8 s4 frag (8w)": cfg(256, 128, 64, 8, 4, True, FRAG_K=True),
    "sw1 256x64x64 w4 s3 frag": cfg(256, 64, 64, 4, 3, True, FRAG_K=True),
    "sw1 256x64x64 w4 s4 frag": cfg(256, 64, 64, 4, 4, True, FRAG_K=True),
    "sw1 256x64x64 w4 s3": cfg(256, 64, 64, 4, 3, True),
    "sw1 128x64x64 w4 s4 frag": cfg(128, 64, 64, 4, 4, True, FRAG_K=True),
}
#: correctness: each variant runs this many times on NaN-poisoned outputs (the 8-warp
#: fragment-order configs gave sporadic wrong elements; see benchmarks/notes_prefill.md)
REPEATS = 4


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1024,2048,4096")
    ap.add_argument("--rep", type=float, default=20.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dtype = torch.bfloat16
    records = []
    for model in args.models.split(","):
        s = MODEL_SHAPES[model]
        ex = random_packed_experts(s, dtype, DEV, seed=11)
        w13d, w2d = ex.dequantize(torch.bfloat16)
        h, i = s.hidden_size, s.intermediate_size
        for m in (int(t) for t in args.tokens.split(",")):
            slots = m * s.top_k
            fl1 = 2.0 * slots * 2 * i * h
            fl2 = 2.0 * slots * h * i
            x = torch.randn(m, h, device=DEV, dtype=dtype)
            x_frag = fragment_order_columns(x)
            w, ids = random_routing(m, s, DEV, seed=m)
            bfn, bname = baseline_fn(m, s, w13d, w2d, ids, dtype)
            t_base = time_cuda_graph(bfn, args.rep)
            print(f"{model} M={m}: bf16 GEMM1+GEMM2 ({bname}) {t_base:.1f} us "
                  f"({(fl1 + fl2) / t_base / 1e6:.0f} TFLOP/s)", flush=True)
            records.append({"model": model, "M": m, "gemm": "bf16", "variant": bname,
                            "us": t_base, "tflops": (fl1 + fl2) / t_base / 1e6})

            t1 = get_prefill_config(m, 2 * i, h, s.num_experts, s.top_k, dtype, DEV)
            t2 = get_prefill_config(m, h, i, s.num_experts, s.top_k, dtype, DEV)
            t1.pop("DENSE", None)
            t2.pop("DENSE", None)
            block_ms = {128, 256, t1["BLOCK_SIZE_M"], t2["BLOCK_SIZE_M"]}
            blocks = {bm: align_block_size(ids, bm, s.num_experts) for bm in block_ms}
            inter = torch.empty(slots, i, device=DEV, dtype=dtype)
            out2 = torch.empty(slots, h, device=DEV, dtype=dtype)
            ref1 = ref2 = None
            v1 = {"table": t1, **GEMM1_VARIANTS}
            if t1.get("SWAP_AB"):
                v1["table frag"] = {**t1, "FRAG_K": True}
            for name, c in v1.items():
                frag = bool(c.get("FRAG_K"))
                fn = functools.partial(prefill_gemm, x_frag if frag else x, ex.w13,
                                       blocks[c["BLOCK_SIZE_M"]], ids, w, top_k=s.top_k,
                                       activation="silu", out=inter, config=c,
                                       a_fragment_order=frag)
                rec = {"model": model, "M": m, "gemm": "gemm1", "variant": name, "config": c}
                try:
                    diffs = []
                    for _ in range(REPEATS):
                        inter.fill_(float("nan"))
                        fn()
                        if ref1 is None:
                            ref1 = inter.clone()
                        diffs.append(rel_diff(inter, ref1))
                    rec["diff"] = max(diffs)
                    rec["us"] = time_cuda_graph(fn, args.rep)
                    rec["tflops"] = fl1 / rec["us"] / 1e6
                except Exception as exc:  # noqa: BLE001 - out of resources etc.
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                records.append(rec)
                print(f"  gemm1 {name:28s} {rec.get('us', float('nan')):8.1f} us "
                      f"{rec.get('tflops', 0):5.0f} TF/s diff {rec.get('diff', float('nan')):.1e}"
                      f" {rec.get('error', '')}", flush=True)
            inter_frag = fragment_order_columns(ref1)
            v2 = {"table": t2, **GEMM2_VARIANTS}
            for name, c in v2.items():
                frag = bool(c.get("FRAG_K")) and bool(c.get("SWAP_AB"))
                fn = functools.partial(prefill_gemm, inter_frag if frag else ref1, ex.w2,
                                       blocks[c["BLOCK_SIZE_M"]], ids, w, top_k=s.top_k,
                                       mul_routed_weight=True, a_is_slots=True, out=out2,
                                       config=c, a_fragment_order=frag)
                rec = {"model": model, "M": m, "gemm": "gemm2", "variant": name, "config": c}
                try:
                    diffs = []
                    for _ in range(REPEATS):
                        out2.fill_(float("nan"))
                        fn()
                        if ref2 is None:
                            ref2 = out2.clone()
                        diffs.append(rel_diff(out2, ref2))
                    rec["diff"] = max(diffs)
                    rec["us"] = time_cuda_graph(fn, args.rep)
                    rec["tflops"] = fl2 / rec["us"] / 1e6
                except Exception as exc:  # noqa: BLE001
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                records.append(rec)
                print(f"  gemm2 {name:28s} {rec.get('us', float('nan')):8.1f} us "
                      f"{rec.get('tflops', 0):5.0f} TF/s diff {rec.get('diff', float('nan')):.1e}"
                      f" {rec.get('error', '')}", flush=True)
            for which in ("gemm1", "gemm2"):
                ok = [r for r in records if r["model"] == model and r["M"] == m
                      and r["gemm"] == which and r.get("us")]
                best = min(ok, key=lambda r: r["us"])
                table = next(r for r in ok if r["variant"] == "table")
                print(f"  best {which}: {best['variant']} {best['us']:.1f} us "
                      f"(table {table['us']:.1f})", flush=True)
            with open(os.path.join(args.out, "prefill_largem.json"), "w") as fh:
                json.dump(records, fh, indent=1)
        del ex, w13d, w2d
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
