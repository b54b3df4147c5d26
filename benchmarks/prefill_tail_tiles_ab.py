"""Device A/B: narrower tiles for each expert's last block (``TAIL_TILES`` 0, 1, 2) on the
Gluon kernel, for both GEMMs on rows already in sorted order and for the pair, against the
bf16 pair of prefill_tune.py, in one run.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_tail_tiles_ab.py --out $OUT

An expert's last aligned block holds its leftover slots and then padding; with random routing
over many experts that block is often nearly empty (qwen3-30b at M=4096: 25 % of the 128-row
blocks' rows are padding). With ``TAIL_TILES`` 1 a block whose rows from ``BLOCK_T / 2`` on
are padding runs a half-wide wgmma, with 2 also a quarter-wide one below ``BLOCK_T / 4``: the
dequantization is the same, the tensor-core work of the padding is skipped. The script prints
the share of the block rows that each variant still multiplies.

Per case (``model:M``) the table's configs, or ``--gemm1``/``--gemm2`` tiles in the
``BNxBKsSTAGES[wWARPS][tTOKENS][gGROUP]`` syntax of prefill_rs_midm.py (the two GEMMs must
share their token tile: GEMM1 writes the sorted rows GEMM2 reads). Every variant first runs 3
times into a NaN-poisoned output against the float32 reference and must repeat bit for bit
and equal ``TAIL_TILES`` 0 bit for bit; then all variants and the bf16 pair are timed in
turn, twice (CUDA-graph medians; the faster of each pair is kept).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import check, run_cases  # noqa: E402
from prefill_rs_midm import case_inputs, parse_candidates, rs_config  # noqa: E402
from prefill_tune import baseline_fn  # noqa: E402

from w4a16moe.kernels.prefill import ACTIVATION_CODES  # noqa: E402
from w4a16moe.kernels.prefill_rs import launch_prefill_rs, tail_tiles  # noqa: E402
from w4a16moe.kernels.tune import MODEL_SHAPES, rs_skip_reason, time_cuda_graph  # noqa: E402
from w4a16moe.routing import align_block_size  # noqa: E402

DEV = torch.device("cuda")
CASES = ("qwen3-30b-a3b:1024,qwen3-30b-a3b:2048,qwen3-30b-a3b:4096,qwen3-30b-a3b:8192,"
         "mixtral-8x7b:4096,olmoe-1b-7b:4096,deepseek-v2-lite:4096")


def multiplied_rows(sorted_ids: torch.Tensor, bt: int, slots: int, tails: int) -> int:
    """Rows the wgmmas multiply over all blocks with ``tails`` halvings allowed."""
    valid = (sorted_ids.view(-1, bt) < slots).sum(1)
    width = torch.full_like(valid, bt)
    for t in range(1, tails + 1):
        width = torch.where(valid <= bt >> t, bt >> t, width)
    return int(width[valid > 0].sum())


def run_case(model: str, m: int, ex, w13d, w2d, args) -> dict:
    (dtype, h, i, e, k, slots, x, w, ids, inter_ref, inter_b, out2_ref, layer_ref, table, rec,
     inter, out2) = case_inputs(model, m, ex, w13d, w2d, args.gbps)
    table = list(table)
    for which, cand in ((0, args.gemm1), (1, args.gemm2)):
        if cand:
            table[which] = rs_config(table[which]["BLOCK_SIZE_M"], *cand[0])
    rec["table"] = table
    for which, cfg in enumerate(table):
        reason = rs_skip_reason(cfg, x if which == 0 else inter_b,
                                ex.w13 if which == 0 else ex.w2, inter if which == 0 else out2,
                                activation=which == 0)
        if reason is not None:
            rec["skipped"] = f"GEMM{which + 1} config does not run the Gluon kernel: {reason}"
            print(model, m, rec["skipped"], flush=True)
            return rec
    bt = table[0]["BLOCK_SIZE_M"]
    if table[1]["BLOCK_SIZE_M"] != bt:
        rec["skipped"] = "the two GEMMs' token tiles differ (the sorted rows need one blocking)"
        print(model, m, rec["skipped"], flush=True)
        return rec
    sorted_ids, expert_ids, npp = align_block_size(ids, bt, e)
    em = sorted_ids.numel()
    valid = sorted_ids < slots
    pos = valid.nonzero().flatten()
    x_sorted = torch.index_select(x, 0, torch.where(valid, sorted_ids // k, 0).long())
    inter_b_sorted = torch.index_select(inter_b, 0, torch.where(valid, sorted_ids, 0).long())
    inter_sorted = torch.empty(em, i, device=DEV, dtype=dtype)
    g = ex.w13.group_size
    variants = [t for t in args.tails if tail_tiles({**table[0], "TAIL_TILES": t}) == t]
    rec["multiplied_rows_per_slot"] = {
        t: multiplied_rows(sorted_ids, bt, slots, t) / slots for t in variants}

    def gemm1(tails: int):
        cfg = {**table[0], "TAIL_TILES": tails}

        def fn():
            launch_prefill_rs(
                x_sorted, ex.w13.qweight, ex.w13.scales, ex.w13.zeros, inter_sorted, None,
                sorted_ids, expert_ids, npp, n_out=i, k=h, slots=slots, top_k=k, up_offset=i,
                group_size=g, a_is_slots=False, activation_code=ACTIVATION_CODES["silu"],
                out_fragment_order=False, config=cfg, a_sorted=True, out_sorted=True)
        return fn

    def gemm2(tails: int, a: torch.Tensor):
        cfg = {**table[1], "TAIL_TILES": tails}

        def fn():
            launch_prefill_rs(
                a, ex.w2.qweight, ex.w2.scales, ex.w2.zeros, out2, w, sorted_ids, expert_ids,
                npp, n_out=h, k=i, slots=slots, top_k=k, up_offset=0, group_size=g,
                a_is_slots=True, activation_code=0, out_fragment_order=False, config=cfg,
                a_sorted=True)
        return fn

    checks, first1, first2, ok = {}, None, None, True
    got1 = torch.empty_like(inter)
    for t in variants:
        same1 = True
        for _ in range(3):
            inter_sorted.fill_(float("nan"))
            gemm1(t)()
            torch.cuda.synchronize()
            got1[sorted_ids[pos].long()] = inter_sorted[pos]
            if first1 is None:
                first1 = got1.clone()
            same1 = same1 and torch.equal(got1, first1)
        err1 = ((got1.float() - inter_ref).abs().max() / inter_ref.abs().max()).item()
        err2, same2 = check(gemm2(t, inter_b_sorted), out2, out2_ref)
        if first2 is None:
            first2 = out2.clone()
        same2 = same2 and torch.equal(out2, first2)
        checks[t] = {"gemm1_err": err1, "gemm1_equal": same1, "gemm2_err": err2,
                     "gemm2_equal": same2}
        ok = ok and max(err1, err2) < 2e-2 and same1 and same2
    rec["checks"] = checks
    print(model, m, "checks", checks, flush=True)
    if not ok:
        rec["failed"] = True
        return rec
    base, rec["bf16_baseline"] = baseline_fn(m, MODEL_SHAPES[model], w13d, w2d, ids, dtype)

    def pair(t):
        def fn():
            gemm1(t)()
            gemm2(t, inter_sorted)()
        return fn

    fns = {("gemm1", t): gemm1(t) for t in variants}
    fns.update({("gemm2", t): gemm2(t, inter_b_sorted) for t in variants})
    fns.update({("pair", t): pair(t) for t in variants})
    fns[("pair", "bf16")] = base
    times: dict = {}
    for _ in range(2):
        for key, fn in fns.items():
            us = time_cuda_graph(fn, args.rep)
            times[key] = min(us, times.get(key, float("inf")))
    flops = 2 * slots * (2 * i * h + h * i)
    for part in ("gemm1", "gemm2", "pair"):
        rec[f"{part}_us"] = {str(t): us for (p, t), us in times.items() if p == part}
    rec["pair_tflops"] = {t: flops / us / 1e6 for t, us in rec["pair_us"].items()}
    print(f"{model} M={m} bt={bt} rows multiplied per slot "
          + ", ".join(f"tails {t}: {r:.3f}" for t, r in rec["multiplied_rows_per_slot"].items()),
          flush=True)
    for part in ("gemm1", "gemm2", "pair"):
        print(f"  {part}: " + ", ".join(f"{t}: {us:.1f} us" for t, us in rec[f'{part}_us'].items())
              + (f"  ({', '.join(f'{t}: {v:.0f} TF/s' for t, v in rec['pair_tflops'].items())})"
                 if part == "pair" else ""), flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=CASES, help="model:M,... (default: %(default)s)")
    ap.add_argument("--tails", default="0,1,2",
                    type=lambda s: [int(v) for v in s.split(",")],
                    help="TAIL_TILES values to compare (default: %(default)s)")
    ap.add_argument("--gemm1", type=parse_candidates, default=[],
                    help="GEMM1 tiles instead of the table's (one candidate)")
    ap.add_argument("--gemm2", type=parse_candidates, default=[],
                    help="GEMM2 tiles instead of the table's (one candidate)")
    ap.add_argument("--rep", type=float, default=20.0)
    ap.add_argument("--gbps", type=float, default=3078.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    return run_cases(run_case, ap.parse_args(), "prefill_tail_tiles_ab.json")


if __name__ == "__main__":
    sys.exit(main())
