"""Device experiment: the prefill kernel at mid M (few rows per expert), where it should be
memory-bound, against its byte floor. Times GEMM1 (fused SiLU*up) and GEMM2 separately for
a list of configs and prints achieved GB/s of the weight bytes the routing touches.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_midm.py --out $OUT
    ncu ... python3 benchmarks/prefill_midm.py --ncu      # one launch of each GEMM, table config

Bytes of one GEMM = (distinct experts touched) * N * (K/2 + 2*K/G) + activations in and out.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os

import torch

from w4a16moe.kernels.configs import get_prefill_config
from w4a16moe.kernels.prefill import fragment_order_columns, prefill_gemm
from w4a16moe.kernels.tune import (
    MODEL_SHAPES,
    random_packed_experts,
    random_routing,
    time_cuda_graph,
)
from w4a16moe.routing import align_block_size

DEV = torch.device("cuda")


def gemm_bytes(touched: int, n: int, k: int, g: int, rows_in: int, rows_out: int,
               n_out: int) -> float:
    return touched * n * (k / 2 + 2 * k / g) + 2 * rows_in * k + 2 * rows_out * n_out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", default="64,128,256")
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--rep", type=float, default=20.0)
    ap.add_argument("--frag", action="store_true",
                    help="also time every config with FRAG_K (weight tiles in fragment order)")
    ap.add_argument("--no-sweep", action="store_true", help="only the table config")
    ap.add_argument("--stages", default="4,6",
                    help="num_stages values of the SWAP_AB sweep (1 = no software pipelining: "
                         "the weight words load straight into registers)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    s = MODEL_SHAPES[args.model]
    dtype = torch.bfloat16
    ex = random_packed_experts(s, dtype, DEV, seed=3)
    g = ex.w13.group_size
    bw = 3.0e12
    records = []
    for m in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(m, s.hidden_size, device=DEV, dtype=dtype)
        w, ids = random_routing(m, s, DEV, seed=m)
        touched = int(torch.unique(ids).numel())
        slots = m * s.top_k
        b1 = gemm_bytes(touched, 2 * s.intermediate_size, s.hidden_size, g, m, slots,
                        s.intermediate_size)
        b2 = gemm_bytes(touched, s.hidden_size, s.intermediate_size, g, slots, slots,
                        s.hidden_size)
        t1 = get_prefill_config(m, 2 * s.intermediate_size, s.hidden_size, s.num_experts,
                                s.top_k, dtype, DEV)
        t2 = get_prefill_config(m, s.hidden_size, s.intermediate_size, s.num_experts, s.top_k,
                                dtype, DEV)
        rows = slots / touched
        bm_table = 16 if rows <= 16 else 32 if rows <= 64 else t1["BLOCK_SIZE_M"]
        variants = [("table", {**t1, "BLOCK_SIZE_M": bm_table, "FRAG_K": False},
                     {**t2, "BLOCK_SIZE_M": bm_table, "FRAG_K": False})]
        if not args.ncu and not args.no_sweep:
            stages = tuple(int(v) for v in args.stages.split(","))
            for swap, bn, bk, wp, st in itertools.product((True,), (32, 64, 128), (64, 128, 256),
                                                         (4,), stages):
                if bn * bk > 8192:  # the dequantized gate+up tiles would not fit registers
                    continue
                c = {"BLOCK_SIZE_M": bm_table, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk,
                     "GROUP_SIZE_M": 1, "num_warps": wp, "num_stages": st, "SWAP_AB": swap}
                variants.append((f"sw{int(swap)} {bm_table}x{bn}x{bk} w{wp} s{st}", c, c))
            for bn, bk, wp, st in ((64, 128, 8, 4), (128, 128, 8, 4), (128, 64, 8, 3)):
                c = {"BLOCK_SIZE_M": bm_table, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk,
                     "GROUP_SIZE_M": 1, "num_warps": wp, "num_stages": st, "SWAP_AB": False}
                variants.append((f"sw0 {bm_table}x{bn}x{bk} w{wp} s{st}", c, c))
        if args.frag:
            variants += [(f"{name} frag", {**c1, "FRAG_K": True}, {**c2, "FRAG_K": True})
                         for name, c1, c2 in variants
                         if c1["BLOCK_SIZE_K"] >= 32 and c2["BLOCK_SIZE_K"] >= 32
                         and c1.get("SWAP_AB") and c2.get("SWAP_AB")]
        blocks = align_block_size(ids, bm_table, s.num_experts)
        inter = torch.empty(slots, s.intermediate_size, device=DEV, dtype=dtype)
        c2o = torch.empty(slots, s.hidden_size, device=DEV, dtype=dtype)
        print(f"{args.model} M={m}: {touched} experts touched, {rows:.1f} rows/expert, "
              f"GEMM1 floor {b1 / bw * 1e6:.1f} us ({b1 / 1e6:.0f} MB), GEMM2 floor "
              f"{b2 / bw * 1e6:.1f} us ({b2 / 1e6:.0f} MB) at 3.0 TB/s; table {t1} / {t2}")
        ref1 = None
        x_frag = fragment_order_columns(x)
        for name, c1, c2 in variants:
            # "frag" variants run as fused_moe_prefill does: the input and the intermediate
            # stored in fragment order, so the activation tiles stay 16-byte copies
            frag = name.endswith("frag")
            g1 = functools.partial(prefill_gemm, x_frag if frag else x, ex.w13, blocks, ids, w,
                                   top_k=s.top_k, activation="silu", out=inter, config=c1,
                                   a_fragment_order=frag, out_fragment_order=frag)
            g2 = functools.partial(prefill_gemm, inter, ex.w2, blocks, ids, w, top_k=s.top_k,
                                   mul_routed_weight=True, a_is_slots=True, out=c2o, config=c2,
                                   a_fragment_order=frag)
            if args.ncu:
                g1()
                g2()
                torch.cuda.synchronize()
                continue
            res = {}
            for which, fn, b in (("gemm1", g1, b1), ("gemm2", g2, b2)):
                try:
                    fn()
                    if which == "gemm1":
                        if name == "table":
                            ref1 = inter.clone()
                        got1 = fragment_order_columns(inter) if frag else inter
                        res["gemm1_diff"] = ((got1.float() - ref1.float()).abs().max()
                                             / ref1.float().abs().max()).item()
                    us = time_cuda_graph(fn, args.rep)
                    res[which] = us
                    res[which + "_gbs"] = b / us / 1e3
                except Exception as exc:  # out of resources etc.
                    res[which] = None
                    res[which + "_err"] = type(exc).__name__
            rec = {"model": args.model, "M": m, "variant": name, "touched": touched,
                   "floor1_us": b1 / bw * 1e6, "floor2_us": b2 / bw * 1e6, **res}
            records.append(rec)
            f = lambda v: f"{v:7.1f}" if v else "   fail"  # noqa: E731
            print(f"  {name:28s} gemm1 {f(res.get('gemm1'))} us "
                  f"({res.get('gemm1_gbs') or 0:6.0f} GB/s)  gemm2 {f(res.get('gemm2'))} us "
                  f"({res.get('gemm2_gbs') or 0:6.0f} GB/s)  vs table "
                  f"{res.get('gemm1_diff', float('nan')):.1e}", flush=True)
        if not args.ncu:
            for which in ("gemm1", "gemm2"):
                ok = [r for r in records if r["M"] == m and r.get(which)]
                best = min(ok, key=lambda r: r[which])
                print(f"  best {which}: {best['variant']} {best[which]:.1f} us")
    if not args.ncu:
        with open(os.path.join(args.out, f"prefill_midm_{args.model}.json"), "w") as fh:
            json.dump(records, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
