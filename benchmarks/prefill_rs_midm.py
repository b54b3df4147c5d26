"""Device A/B at mid M (a few to ~32 slots per expert): the register-operand Gluon kernel
(kernels/prefill_rs.py) with 16- and 32-token tiles against the table's Triton configs, per
GEMM and for the whole prefill layer.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_rs_midm.py --out $OUT

At these M the GEMMs are bound by the weight bytes (each expert's words read once per aligned
block), so every row also gives the byte floor (``bench.floors.gemm_bytes``: the touched
experts' words + scales and the GEMM's input and output, at ``--gbps``; the records in
results/h100_prefill_rs_midm*.json counted the words + scales only) and the achieved rate.
Every variant first runs 3 times into a NaN-poisoned output and must match the float32
reference of the same dequantized weights (max |diff| / max |ref|) and repeat bit for bit; a
variant that fails is reported and not timed. The table config is timed before and after the
candidates and the faster of its two times is kept.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import check, reference, run_cases  # noqa: E402

from w4a16moe.bench.floors import distinct_experts, gemm_bytes  # noqa: E402
from w4a16moe.kernels.configs import get_prefill_config  # noqa: E402
from w4a16moe.kernels.prefill import (  # noqa: E402
    PrefillWorkspace,
    _fragment_tiles,
    fragment_order_columns,
    fused_moe_prefill,
    prefill_gemm,
)
from w4a16moe.kernels.tune import (  # noqa: E402
    MODEL_SHAPES,
    random_routing,
    rs_skip_reason,
    time_cuda_graph,
)
from w4a16moe.routing import align_block_size  # noqa: E402

DEV = torch.device("cuda")
#: RS candidates (BLOCK_SIZE_N, BLOCK_SIZE_K, num_stages); GEMM1's BLOCK_SIZE_N counts output
#: columns (twice as many gate + up weight rows)
GEMM1_RS = [(128, 64, 6), (64, 64, 8), (64, 128, 6), (128, 128, 4)]
GEMM2_RS = [(256, 64, 6), (128, 64, 8), (128, 128, 6), (256, 128, 4)]
BLOCK_T = (16, 32)


def parse_candidates(text: str) -> list[tuple[int, ...]]:
    """``"128x128s4,256x128s4w16,64x64s4t256g8"`` -> [(BLOCK_SIZE_N, BLOCK_SIZE_K,
    num_stages, num_warps, BLOCK_SIZE_M or None, GROUP_SIZE_M), ...] (``wN``: the consumer
    warps, 8 when absent; ``tN``: the token tile, the table's when absent; ``gN``:
    GROUP_SIZE_M, 1 when absent)"""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)x(\d+)s(\d+)(?:w(\d+))?(?:t(\d+))?(?:g(\d+))?", item.strip())
        if m is None:
            raise argparse.ArgumentTypeError(
                f"candidate {item!r}: expected BNxBKsSTAGES[wWARPS][tTOKENS][gGROUP], e.g. "
                "128x128s4, 256x128s4w16 or 64x64s4t256g8")
        bn, bk, stages, warps, bt, group = m.groups()
        out.append((int(bn), int(bk), int(stages), int(warps or 8),
                    int(bt) if bt else None, int(group or 1)))
    return out


def rs_config(bt: int, bn: int, bk: int, stages: int, warps: int = 8, tokens: int | None = None,
              group: int = 1) -> dict:
    """An RS config; ``tokens`` (when given) overrides the token tile ``bt``."""
    return {"BLOCK_SIZE_M": tokens or bt, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk,
            "GROUP_SIZE_M": group, "num_warps": warps, "num_stages": stages, "SWAP_AB": True,
            "RS": True}


class CaseInputs(NamedTuple):
    """One ``model:M`` case of the mid-M A/Bs (see :func:`case_inputs`)."""

    dtype: torch.dtype
    h: int
    i: int
    e: int
    k: int
    slots: int
    x: torch.Tensor
    w: torch.Tensor
    ids: torch.Tensor
    inter_ref: torch.Tensor
    inter_b: torch.Tensor
    out2_ref: torch.Tensor
    layer_ref: torch.Tensor
    table: tuple
    rec: dict
    inter: torch.Tensor
    out2: torch.Tensor


def case_inputs(model: str, m: int, ex, w13d, w2d, gbps: float) -> CaseInputs:
    """Random bf16 inputs and routing of ``model`` at ``m`` tokens, the float32 references
    (:func:`prefill_rs_ab.reference`), the table's (GEMM1, GEMM2) configs, the record started
    with the byte floors (the touched experts' weights + scales, the GEMM's input and output,
    at ``gbps``) and the two GEMMs' output buffers."""
    dtype = torch.bfloat16
    s = MODEL_SHAPES[model]
    h, i, e, k = s.hidden_size, s.intermediate_size, s.num_experts, s.top_k
    slots = m * k
    x = torch.randn(m, h, device=DEV, dtype=dtype)
    w, ids = random_routing(m, s, DEV, seed=m)
    refs = reference(x, w13d, w2d, w, ids)
    table = (get_prefill_config(m, 2 * i, h, e, k, dtype, DEV),
             get_prefill_config(m, h, i, e, k, dtype, DEV))
    u, g = distinct_experts(ids), ex.w13.group_size
    rec = {"model": model, "M": m, "table": list(table),
           "floor_us": [gemm_bytes(u, 2 * i, h, g, m, slots, i) / (gbps * 1e3),
                        gemm_bytes(u, h, i, g, slots, slots) / (gbps * 1e3)]}
    return CaseInputs(dtype, h, i, e, k, slots, x, w, ids, *refs, table, rec,
                      torch.empty(slots, i, device=DEV, dtype=dtype),
                      torch.empty(slots, h, device=DEV, dtype=dtype))


def run_case(model: str, m: int, ex, w13d, w2d, args) -> dict:
    """GEMM1, GEMM2 and the layer of ``model`` at ``m`` tokens: the table's configs against
    the RS candidates; prints a summary and returns the record."""
    (dtype, h, i, e, k, slots, x, w, ids, inter_ref, inter_b, out2_ref, layer_ref, table, rec,
     inter, out2) = case_inputs(model, m, ex, w13d, w2d, args.gbps)
    blocks = {}

    def gemm_fn(which, cfg):
        bm = cfg["BLOCK_SIZE_M"]
        if bm not in blocks:
            blocks[bm] = align_block_size(ids, bm, e)
        if which == 0:
            return functools.partial(
                prefill_gemm, fragment_order_columns(x) if _fragment_tiles(cfg) else x, ex.w13,
                blocks[bm], ids, w, top_k=k, activation="silu", out=inter, config=cfg,
                a_fragment_order=_fragment_tiles(cfg)), inter, inter_ref
        return functools.partial(
            prefill_gemm, fragment_order_columns(inter_b) if _fragment_tiles(cfg) else inter_b,
            ex.w2, blocks[bm], ids, w, top_k=k, mul_routed_weight=True, a_is_slots=True,
            out=out2, config=cfg, a_fragment_order=_fragment_tiles(cfg)), out2, out2_ref

    best = {}  # (gemm, bt) -> (us, config)
    for which, cands in ((0, args.gemm1_rs), (1, args.gemm2_rs)):
        rows = []
        fn_t, out_t, ref_t = gemm_fn(which, table[which])
        err, same = check(fn_t, out_t, ref_t)
        t_table = time_cuda_graph(fn_t, args.rep)
        for bt in args.block_t:
            for cand in cands:
                cfg = rs_config(bt, *cand)
                fn, out_c, ref_c = gemm_fn(which, cfg)
                row = {"config": cfg}
                a_in, w_in = (x, ex.w13) if which == 0 else (inter_b, ex.w2)
                reason = rs_skip_reason(cfg, a_in, w_in, out_c, activation=which == 0)
                if reason is not None:  # it would time the Triton fallback: skip
                    row["error"] = f"not on the Gluon kernel: {reason}"
                    rows.append(row)
                    continue
                try:
                    row["err"], row["same"] = check(fn, out_c, ref_c)
                except Exception as exc:  # a candidate that does not compile is reported
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
                    continue
                if row["err"] < 2e-2 and row["same"]:
                    row["us"] = time_cuda_graph(fn, args.rep)
                    key = (which, bt)
                    if key not in best or row["us"] < best[key][0]:
                        best[key] = (row["us"], cfg)
                rows.append(row)
        t_table = min(t_table, time_cuda_graph(fn_t, args.rep))
        rec[f"gemm{which + 1}"] = {"table_us": t_table, "table_err": err,
                                   "table_same": same, "rs": rows}
        fl = rec["floor_us"][which]
        line = ", ".join(f"{r['config']['BLOCK_SIZE_M']}x{r['config']['BLOCK_SIZE_N']}x"
                         f"{r['config']['BLOCK_SIZE_K']}s{r['config']['num_stages']} "
                         + (f"{r['us']:.1f}" if "us" in r else
                            r.get("error", f"err {r.get('err', 0):.1e} same "
                                           f"{r.get('same')}"))
                         for r in rows)
        print(f"{model} M={m} GEMM{which + 1}: floor {fl:.1f} us; table {t_table:.1f} us "
              f"({fl / t_table * args.gbps:.0f} GB/s, err {err:.1e}); RS: {line}",
              flush=True)

    if args.no_layer:
        return rec
    # the layer: the table against the best RS pair of each token tile
    ws = PrefillWorkspace.allocate(m, ex, k)
    y = torch.empty(m, h, device=DEV, dtype=dtype)
    variants = {"table": table}
    for bt in args.block_t:
        if (0, bt) in best and (1, bt) in best:
            variants[f"rs{bt}"] = (best[(0, bt)][1], best[(1, bt)][1])
        if (1, bt) in best and table[0]["BLOCK_SIZE_M"] == bt:
            variants[f"table+rs{bt}"] = (table[0], best[(1, bt)][1])
    layer = {}
    for name, cfgs in variants.items():
        fn = functools.partial(fused_moe_prefill, x, ex, w, ids, out=y, workspace=ws,
                               configs=cfgs)
        err, same = check(fn, y, layer_ref)
        layer[name] = {"configs": list(cfgs), "err": err, "same": same,
                       "us": time_cuda_graph(fn, args.rep)}
    layer["table"]["us"] = min(layer["table"]["us"],
                               time_cuda_graph(functools.partial(
                                   fused_moe_prefill, x, ex, w, ids, out=y, workspace=ws,
                                   configs=table), args.rep))
    rec["layer"] = layer
    print(f"{model} M={m} layer (floor {sum(rec['floor_us']):.1f} us): "
          + ", ".join(f"{n} {v['us']:.1f} us (err {v['err']:.1e}, same {v['same']})"
                      for n, v in layer.items()), flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="mixtral-8x7b:16,mixtral-8x7b:64,mixtral-8x7b:128,"
                    "qwen3-30b-a3b:32,qwen3-30b-a3b:64,qwen3-30b-a3b:256")
    ap.add_argument("--gemm1-rs", type=parse_candidates, default=GEMM1_RS,
                    help="GEMM1 RS candidates, e.g. 128x128s4,64x64s8 (BLOCK_SIZE_N counts "
                         "output columns)")
    ap.add_argument("--gemm2-rs", type=parse_candidates, default=GEMM2_RS)
    ap.add_argument("--block-t", type=lambda t: tuple(int(v) for v in t.split(",")),
                    default=BLOCK_T, help="token tiles (BLOCK_SIZE_M) to try, e.g. 16,32")
    ap.add_argument("--no-layer", action="store_true", help="time the GEMMs only")
    ap.add_argument("--rep", type=float, default=20.0)
    ap.add_argument("--gbps", type=float, default=3078.0,
                    help="read bandwidth for the byte floor (RESULTS.md's measured value)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    return run_cases(run_case, ap.parse_args(), "prefill_rs_midm.json")


if __name__ == "__main__":
    raise SystemExit(main())
