"""Device A/B: the Gluon kernel's packed words read with one TMA copy per K step
(``prefill_rs.WEIGHT_TMA = True``, the default) against the loader warp's 16-byte cp.asyncs,
per GEMM and for the whole prefill layer, in one run.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_weight_tma_ab.py --out $OUT

Per case (``model:M``) each GEMM runs its table config and the ``--gemm1-rs``/``--gemm2-rs``
candidates (tiles ``BNxBKsSTAGES`` with the table's token tile); every RS config is checked
both ways (3 runs into a NaN-poisoned output against the float32 reference, bit-identical
repeats, and TMA == cp.async bit for bit) and then timed on, off, on, off (CUDA-graph
medians; the faster of each pair is kept). A config the Gluon kernel does not run (a Triton
entry) is timed once. The layer runs the table's pair both ways. Byte floors as in
prefill_rs_midm.py (``bench.floors.gemm_bytes`` at ``--gbps``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import check, run_cases  # noqa: E402
from prefill_rs_midm import case_inputs, parse_candidates, rs_config  # noqa: E402

from w4a16moe.kernels import prefill_rs  # noqa: E402
from w4a16moe.kernels.prefill import (  # noqa: E402
    PrefillWorkspace,
    _fragment_tiles,
    fragment_order_columns,
    fused_moe_prefill,
    prefill_gemm,
)
from w4a16moe.kernels.tune import rs_skip_reason, time_cuda_graph  # noqa: E402
from w4a16moe.routing import align_block_size  # noqa: E402

DEV = torch.device("cuda")
CASES = ("mixtral-8x7b:16,mixtral-8x7b:64,mixtral-8x7b:256,qwen3-30b-a3b:64,"
         "qwen3-30b-a3b:256,mixtral-8x7b:1024,mixtral-8x7b:4096")


def ab(fn, out, ref, rep: float, both: bool) -> dict:
    """Check ``fn`` with TMA on (and off), then time it on, off, on, off."""
    row = {}
    outs = {}
    for tma in (True, False) if both else (True,):
        prefill_rs.WEIGHT_TMA = tma
        err, same = check(fn, out, ref)
        outs[tma] = out.clone()
        row[f"err_{'tma' if tma else 'cp'}"] = err
        row[f"same_{'tma' if tma else 'cp'}"] = same
    if both:
        row["tma_equals_cp"] = torch.equal(outs[True], outs[False])
    ok = all(v < 2e-2 for k, v in row.items() if k.startswith("err")) and all(
        v for k, v in row.items() if k.startswith("same") or k == "tma_equals_cp")
    if ok:
        times = {True: [], False: []}
        for _ in range(2):
            for tma in (True, False) if both else (True,):
                prefill_rs.WEIGHT_TMA = tma
                times[tma].append(time_cuda_graph(fn, rep))
        row["us_tma" if both else "us"] = min(times[True])
        if both:
            row["us_cp"] = min(times[False])
    prefill_rs.WEIGHT_TMA = True
    return row


def fmt(row: dict) -> str:
    if "us_tma" in row:
        return f"cp {row['us_cp']:.1f} -> tma {row['us_tma']:.1f} us"
    if "us" in row:
        triton = not row.get("config", {"RS": True}).get("RS")
        return f"{row['us']:.1f} us" + (" (Triton)" if triton else "")
    return "FAILED " + json.dumps(row)


def run_case(model: str, m: int, ex, w13d, w2d, args) -> dict:
    """GEMM1, GEMM2 (table config and candidates) and the layer of ``model`` at ``m`` tokens,
    TMA words against cp.async; prints a summary and returns the record."""
    (dtype, h, i, e, k, slots, x, w, ids, inter_ref, inter_b, out2_ref, layer_ref, table, rec,
     inter, out2) = case_inputs(model, m, ex, w13d, w2d, args.gbps)
    blocks = {}
    for which, cands in ((0, args.gemm1_rs), (1, args.gemm2_rs)):
        a_in, w_in, out_c, ref_c = ((x, ex.w13, inter, inter_ref) if which == 0 else
                                    (inter_b, ex.w2, out2, out2_ref))
        bt = table[which]["BLOCK_SIZE_M"]
        rows = []
        for cfg in [table[which]] + [rs_config(bt, *cand) for cand in cands]:
            bm = cfg["BLOCK_SIZE_M"]
            if bm not in blocks:
                blocks[bm] = align_block_size(ids, bm, e)
            frag = _fragment_tiles(cfg)
            a = fragment_order_columns(a_in) if frag else a_in
            kw = (dict(activation="silu") if which == 0 else
                  dict(mul_routed_weight=True, a_is_slots=True))
            fn = functools.partial(prefill_gemm, a, w_in, blocks[bm], ids, w, top_k=k,
                                   out=out_c, config=cfg, a_fragment_order=frag, **kw)
            gluon = bool(cfg.get("RS")) and rs_skip_reason(
                cfg, a_in, w_in, out_c, activation=which == 0) is None
            if cfg is not table[which] and not gluon:
                continue  # a candidate the Gluon kernel does not run: nothing to compare
            row = {"config": cfg, "table": cfg is table[which],
                   **ab(fn, out_c, ref_c, args.rep, gluon and not args.tma_only)}
            rows.append(row)
            print(f"{model} M={m} GEMM{which + 1} {'table ' if row['table'] else ''}"
                  f"{bm}x{cfg['BLOCK_SIZE_N']}x{cfg['BLOCK_SIZE_K']}s{cfg['num_stages']}"
                  f"w{cfg['num_warps']}"
                  f"{' RS' if cfg.get('RS') else ''}: {fmt(row)} "
                  f"(floor {rec['floor_us'][which]:.1f} us)", flush=True)
        rec[f"gemm{which + 1}"] = rows
    if not args.no_layer:
        ws = PrefillWorkspace.allocate(m, ex, k)
        y = torch.empty(m, h, device=DEV, dtype=dtype)
        fn = functools.partial(fused_moe_prefill, x, ex, w, ids, out=y, workspace=ws,
                               configs=table)
        any_gluon = any(r["table"] and "us_tma" in r
                        for r in rec["gemm1"] + rec["gemm2"])
        rec["layer"] = ab(fn, y, layer_ref, args.rep, any_gluon and not args.tma_only)
        print(f"{model} M={m} layer (table, floor {sum(rec['floor_us']):.1f} us): "
              f"{fmt(rec['layer'])}", flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=CASES, help="model:M,... (default: %(default)s)")
    ap.add_argument("--gemm1-rs", type=parse_candidates, default=[],
                    help="extra GEMM1 RS tiles, e.g. 128x128s4 (BLOCK_SIZE_N counts output "
                         "columns)")
    ap.add_argument("--gemm2-rs", type=parse_candidates, default=[])
    ap.add_argument("--no-layer", action="store_true", help="time the GEMMs only")
    ap.add_argument("--tma-only", action="store_true",
                    help="time every config only as shipped (TMA words): to compare tiles")
    ap.add_argument("--rep", type=float, default=20.0)
    ap.add_argument("--gbps", type=float, default=3078.0,
                    help="read bandwidth for the byte floor (RESULTS.md's measured value)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    return run_cases(run_case, ap.parse_args(), "prefill_weight_tma_ab.json")


if __name__ == "__main__":
    raise SystemExit(main())
