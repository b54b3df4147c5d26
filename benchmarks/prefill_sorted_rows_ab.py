"""Device A/B: the Gluon kernel's activations gathered row by row with cp.async (as shipped)
against activations already in sorted order and read with one TMA copy per K step
(``launch_prefill_rs(..., a_sorted=True)``), for both GEMMs and for the pair, in one run.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_sorted_rows_ab.py --out $OUT

Per case (``model:M``), with the table's configs (which must be RS configs):

* GEMM1 gathered (as shipped) vs GEMM1 on ``x_sorted`` (one row per sorted position, made by
  ``index_select``) writing its output in sorted order (``out_sorted``); the gather is timed
  on its own;
* GEMM2 gathered vs GEMM2 on the sorted intermediate (``a_sorted``);
* the pair: gathered GEMM1 + GEMM2 vs gather + sorted GEMM1 + sorted GEMM2, one CUDA graph
  each;
* the sorted GEMM1 + GEMM2 without the gather against the bf16 pair of prefill_tune.py
  (``torch._grouped_mm`` on dequantized weights, rows pre-sorted by expert, no activation);
* ``--gemm1-rs``/``--gemm2-rs`` candidate tiles (``BNxBKsSTAGES[wWARPS][tTOKENS][gGROUP]``,
  e.g. ``64x64s4t256g8``), each on its own blocks, sorted only (GEMM1 with its gather),
  checked against the reference and timed after the table's sorted GEMM.

Every variant first runs 3 times into a NaN-poisoned output and must match the float32
reference (max |diff| / max |ref|) and repeat bit for bit; the sorted variants must also
equal the gathered ones bit for bit (same tiles, same K order). Timed A, B, A, B (CUDA-graph
medians); the faster of each pair is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import check, run_cases  # noqa: E402
from prefill_rs_midm import case_inputs, parse_candidates, rs_config  # noqa: E402
from prefill_tune import baseline_fn  # noqa: E402

from w4a16moe.kernels.prefill import ACTIVATION_CODES  # noqa: E402
from w4a16moe.kernels.prefill_rs import launch_prefill_rs  # noqa: E402
from w4a16moe.kernels.tune import MODEL_SHAPES, rs_skip_reason, time_cuda_graph  # noqa: E402
from w4a16moe.routing import align_block_size  # noqa: E402

DEV = torch.device("cuda")
CASES = "mixtral-8x7b:2048,mixtral-8x7b:4096,qwen3-30b-a3b:1024,qwen3-30b-a3b:4096"


def timed_pair(fn_a, fn_b, rep):
    ta, tb = [], []
    for _ in range(2):
        ta.append(time_cuda_graph(fn_a, rep))
        tb.append(time_cuda_graph(fn_b, rep))
    return min(ta), min(tb)


def run_case(model: str, m: int, ex, w13d, w2d, args) -> dict:
    (dtype, h, i, e, k, slots, x, w, ids, inter_ref, inter_b, out2_ref, layer_ref, table, rec,
     inter, out2) = case_inputs(model, m, ex, w13d, w2d, args.gbps)
    for which, cfg in enumerate(table):
        reason = rs_skip_reason(cfg, x if which == 0 else inter_b, ex.w13 if which == 0 else ex.w2,
                                inter if which == 0 else out2, activation=which == 0)
        if reason is not None:
            rec["skipped"] = f"GEMM{which + 1} table config does not run the Gluon kernel: {reason}"
            print(model, m, rec["skipped"], flush=True)
            return rec
    if table[0]["BLOCK_SIZE_M"] != table[1]["BLOCK_SIZE_M"]:
        rec["skipped"] = "the two GEMMs' token tiles differ (the sorted rows need one blocking)"
        print(model, m, rec["skipped"], flush=True)
        return rec
    bt = table[0]["BLOCK_SIZE_M"]
    sorted_ids, expert_ids, npp = align_block_size(ids, bt, e)
    em = sorted_ids.numel()
    valid = sorted_ids < slots
    pos = valid.nonzero().flatten()
    x_rows = torch.where(valid, sorted_ids // k, 0).long()
    inter_rows = torch.where(valid, sorted_ids, 0).long()
    x_sorted = torch.empty(em, h, device=DEV, dtype=dtype)
    inter_sorted = torch.empty(em, i, device=DEV, dtype=dtype)
    g = ex.w13.group_size

    def gemm1(sorted_rows: bool, gather: bool = True):
        def fn():
            if sorted_rows and gather:
                torch.index_select(x, 0, x_rows, out=x_sorted)
            launch_prefill_rs(
                x_sorted if sorted_rows else x, ex.w13.qweight, ex.w13.scales, ex.w13.zeros,
                inter_sorted if sorted_rows else inter, None, sorted_ids, expert_ids, npp,
                n_out=i, k=h, slots=slots, top_k=k, up_offset=i, group_size=g,
                a_is_slots=False, activation_code=ACTIVATION_CODES["silu"],
                out_fragment_order=False, config=table[0], a_sorted=sorted_rows,
                out_sorted=sorted_rows)
        return fn

    def gemm2(sorted_rows: bool):
        def fn():
            launch_prefill_rs(
                inter_sorted if sorted_rows else inter, ex.w2.qweight, ex.w2.scales,
                ex.w2.zeros, out2, w, sorted_ids, expert_ids, npp, n_out=h, k=i, slots=slots,
                top_k=k, up_offset=0, group_size=g, a_is_slots=True, activation_code=0,
                out_fragment_order=False, config=table[1], a_sorted=sorted_rows)
        return fn

    def gather():
        torch.index_select(x, 0, x_rows, out=x_sorted)

    # GEMM1: gathered, then sorted (its output rows compared at the valid positions)
    err1, same1 = check(gemm1(False), inter, inter_ref)
    ref1 = inter.clone()
    inter_sorted.fill_(float("nan"))
    gemm1(True)()
    torch.cuda.synchronize()
    got = torch.empty_like(inter)
    got[sorted_ids[pos].long()] = inter_sorted[pos]
    eq1 = torch.equal(got, ref1)
    err1s = ((got.float() - inter_ref).abs().max() / inter_ref.abs().max()).item()
    # GEMM2: the sorted intermediate from the gathered GEMM1's output
    inter.copy_(inter_b)
    torch.index_select(inter, 0, inter_rows, out=inter_sorted)
    err2, same2 = check(gemm2(False), out2, out2_ref)
    ref2 = out2.clone()
    err2s, same2s = check(gemm2(True), out2, out2_ref)
    eq2 = torch.equal(out2, ref2)
    rec["checks"] = {"gemm1_err": err1, "gemm1_repeat": same1, "gemm1_sorted_err": err1s,
                     "gemm1_sorted_equal": eq1, "gemm2_err": err2, "gemm2_repeat": same2,
                     "gemm2_sorted_err": err2s, "gemm2_sorted_repeat": same2s,
                     "gemm2_sorted_equal": eq2}
    ok = max(err1, err1s, err2, err2s) < 2e-2 and same1 and same2 and same2s and eq1 and eq2
    print(model, m, "checks", json.dumps(rec["checks"]), flush=True)
    if not ok:
        rec["failed"] = True
        return rec
    rec["gather_us"] = time_cuda_graph(gather, args.rep)
    rec["gemm1_us"] = timed_pair(gemm1(False), gemm1(True), args.rep)
    inter.copy_(inter_b)
    torch.index_select(inter, 0, inter_rows, out=inter_sorted)
    rec["gemm2_us"] = timed_pair(gemm2(False), gemm2(True), args.rep)

    def pair(sorted_rows):
        def fn():
            gemm1(sorted_rows)()
            gemm2(sorted_rows)()
        return fn

    rec["pair_us"] = timed_pair(pair(False), pair(True), args.rep)
    # the M=4096 comparison: the two GEMMs on rows already in order (the gather
    # left out, as the bf16 baseline's sort is) against bf16 torch._grouped_mm on
    # dequantized weights, rows pre-sorted by expert
    gather()
    base, base_name = baseline_fn(m, MODEL_SHAPES[model], w13d, w2d, ids, dtype)

    def sorted_gemms():
        gemm1(True, gather=False)()
        gemm2(True)()

    rec["sorted_gemms_vs_bf16_us"] = timed_pair(sorted_gemms, base, args.rep)
    rec["bf16_baseline"] = base_name
    rec["candidates"] = []
    for which, cands in ((0, args.gemm1_rs), (1, args.gemm2_rs)):
        for cand in cands:
            cfg = rs_config(bt, *cand)
            cs, ce, cn = align_block_size(ids, cfg["BLOCK_SIZE_M"], e)
            cem = cs.numel()
            cvalid = cs < slots
            xs = torch.empty(cem, h, device=DEV, dtype=dtype)
            isd = torch.empty(cem, i, device=DEV, dtype=dtype)
            torch.index_select(inter_b, 0, torch.where(cvalid, cs, 0).long(), out=isd)
            if which == 0:
                def fn(cfg=cfg, cs=cs, ce=ce, cn=cn, xs=xs, isd=isd, cvalid=cvalid):
                    torch.index_select(x, 0, torch.where(cvalid, cs // k, 0).long(), out=xs)
                    launch_prefill_rs(
                        xs, ex.w13.qweight, ex.w13.scales, ex.w13.zeros, isd, None, cs, ce, cn,
                        n_out=i, k=h, slots=slots, top_k=k, up_offset=i, group_size=g,
                        a_is_slots=False, activation_code=ACTIVATION_CODES["silu"],
                        out_fragment_order=False, config=cfg, a_sorted=True, out_sorted=True)
            else:
                def fn(cfg=cfg, cs=cs, ce=ce, cn=cn, isd=isd):
                    launch_prefill_rs(
                        isd, ex.w2.qweight, ex.w2.scales, ex.w2.zeros, out2, w, cs, ce, cn,
                        n_out=h, k=i, slots=slots, top_k=k, up_offset=0, group_size=g,
                        a_is_slots=True, activation_code=0, out_fragment_order=False,
                        config=cfg, a_sorted=True)
            fn()
            torch.cuda.synchronize()
            if which == 0:
                cpos = cvalid.nonzero().flatten()
                got = torch.empty_like(inter)
                got[cs[cpos].long()] = isd[cpos]
                ref = inter_ref
            else:
                out2.fill_(float("nan"))
                fn()
                got, ref = out2, out2_ref
            err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
            row = {"gemm": which + 1, "config": cfg, "err": err}
            if err < 2e-2:
                row["us"] = min(time_cuda_graph(fn, args.rep) for _ in range(2))
            rec["candidates"].append(row)
            print(f"{model} M={m} GEMM{which + 1} sorted {cfg['BLOCK_SIZE_M']}x"
                  f"{cfg['BLOCK_SIZE_N']}x{cfg['BLOCK_SIZE_K']}s{cfg['num_stages']}: "
                  f"{row.get('us', float('nan')):.1f} us (err {err:.1e})", flush=True)
    print(f"{model} M={m} bt={bt}: gather {rec['gather_us']:.1f} us; GEMM1 "
          f"{rec['gemm1_us'][0]:.1f} -> {rec['gemm1_us'][1]:.1f} us (incl. gather); GEMM2 "
          f"{rec['gemm2_us'][0]:.1f} -> {rec['gemm2_us'][1]:.1f} us; pair "
          f"{rec['pair_us'][0]:.1f} -> {rec['pair_us'][1]:.1f} us; sorted GEMMs without the "
          f"gather {rec['sorted_gemms_vs_bf16_us'][0]:.1f} us vs bf16 {base_name} "
          f"{rec['sorted_gemms_vs_bf16_us'][1]:.1f} us", flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=CASES, help="model:M,... (default: %(default)s)")
    ap.add_argument("--gemm1-rs", type=parse_candidates, default=[])
    ap.add_argument("--gemm2-rs", type=parse_candidates, default=[])
    ap.add_argument("--rep", type=float, default=20.0)
    ap.add_argument("--gbps", type=float, default=3078.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    return run_cases(run_case, ap.parse_args(), "prefill_sorted_rows_ab.json")


if __name__ == "__main__":
    sys.exit(main())
