"""Device A/B of config tables at the layer level: the prefill layer (``fused_moe_prefill``,
dense path included where a table's GEMM1 entry sets ``DENSE``) with each table's configs, and
the bf16 GEMM1 + GEMM2 of prefill_tune.py (``torch._grouped_mm`` on expert-sorted rows, no
routing, no activation: a lower bound of the bf16 layer), in one run.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_table_ab.py \\
        --table shipped --table $OUT/new.json --cases mixtral-8x7b:1024,mixtral-8x7b:4096

``--table shipped`` is the package's table for the GPU; any other value is a JSON file in
the same format (``w4a16moe tune --out``). Per case every table's layer runs 3 times into a
NaN-poisoned output against the float32 reference of the same dequantized weights and must
repeat bit for bit (the dense path's cuBLAS GEMMs need not: reported), then all tables are
timed in turn twice, the second time in reverse order, after one timing that is thrown away
(CUDA-graph medians; the faster of each pair is kept). ``--switch
NAME=VALUE`` sets a module switch of ``prefill_mma`` for every table of the run. ``--skews
0,0.5`` runs every case and seed on each routing skew (``random_routing``'s per-expert
bias); each record notes its routing's load (busiest expert, experts used) and, per table,
the aligned blocks its GEMM2 tiles run.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_mma_ab import add_switch_argument, apply_switches  # noqa: E402
from prefill_rs_ab import check, experts_of, reference, write_records  # noqa: E402
from prefill_tune import baseline_fn  # noqa: E402

from w4a16moe.kernels.configs import get_prefill_config  # noqa: E402
from w4a16moe.kernels.prefill import PrefillWorkspace, fused_moe_prefill  # noqa: E402
from w4a16moe.kernels.tune import (  # noqa: E402
    MODEL_SHAPES,
    check_skew,
    random_routing,
    routing_load,
    time_cuda_graph,
)

DEV = torch.device("cuda")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", action="append", required=True,
                    help="'shipped' or a config JSON file; repeat for each table")
    ap.add_argument("--cases", default="mixtral-8x7b:1024,mixtral-8x7b:2048,mixtral-8x7b:4096")
    ap.add_argument("--rep", type=float, default=20.0)
    ap.add_argument("--seeds", type=int, default=1,
                    help="routings per case: seeds M, M + 1000, ... (default: %(default)s)")
    ap.add_argument("--no-bf16", action="store_true",
                    help="leave out the bf16 GEMMs (the tables only)")
    ap.add_argument("--skews", default="0",
                    help="comma-separated routing skews, each run on every case and seed "
                         "(default: %(default)s)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    add_switch_argument(ap)
    args = ap.parse_args()
    apply_switches(ap, args.switch)
    dtype = torch.bfloat16
    cache: dict = {}
    records = []
    try:
        skews = [check_skew(float(v), "--skews") for v in args.skews.split(",")]
    except ValueError as exc:
        ap.error(f"--skews {args.skews!r}: expected comma-separated numbers >= 0 ({exc})")
    cases = [(*case.split(":"), r, skew) for case in args.cases.split(",")
             for skew in skews for r in range(args.seeds)]
    for model, m, r, skew in cases:
        m = int(m)
        s = MODEL_SHAPES[model]
        h, i, e, k = s.hidden_size, s.intermediate_size, s.num_experts, s.top_k
        ex, w13d, w2d = experts_of(model, cache, dtype)
        x = torch.randn(m, h, device=DEV, dtype=dtype)
        w, ids = random_routing(m, s, DEV, seed=m + 1000 * r, skew=skew)
        layer_ref = reference(x, w13d, w2d, w, ids)[3]
        ws = PrefillWorkspace.allocate(m, ex, k)
        y = torch.empty(m, h, device=DEV, dtype=dtype)
        fns, rec = {}, {"model": model, "M": m, "seed": m + 1000 * r, "skew": skew,
                        "load": routing_load(ids, e), "tables": {}}
        for t in args.table:
            file = None if t == "shipped" else t
            cfgs = (get_prefill_config(m, 2 * i, h, e, k, dtype, DEV, config_file=file),
                    get_prefill_config(m, h, i, e, k, dtype, DEV, config_file=file))
            fn = functools.partial(fused_moe_prefill, x, ex, w, ids, out=y, workspace=ws,
                                   configs=cfgs)
            err, same = check(fn, y, layer_ref)
            rec["tables"][t] = {"configs": list(cfgs), "err": err, "same": same,
                                "gemm2_blocks": routing_load(
                                    ids, e, cfgs[1]["BLOCK_SIZE_M"])["blocks"]}
            if err < 2e-2:
                fns[t] = fn
        base_name = None
        if not args.no_bf16:
            base, base_name = baseline_fn(m, s, w13d, w2d, ids, dtype)
            fns["bf16 GEMMs"] = base
        times: dict = {}
        # one timing thrown away first: after the light checks the card runs cooler, which
        # gave the first table of a case about 1 % (session 47: identical tables 1st and
        # last); the second pass runs in reverse order
        if fns:  # none when every table failed its check and --no-bf16 left out the baseline
            time_cuda_graph(next(iter(fns.values())), args.rep)
        for order in (list(fns), list(fns)[::-1]):
            for name in order:
                t_us = time_cuda_graph(fns[name], args.rep)
                times[name] = min(times.get(name, t_us), t_us)
        for name, t_us in times.items():
            rec["tables"].setdefault(name, {})["us"] = t_us
        rec["bf16_impl"] = base_name
        records.append(rec)
        load = rec["load"]
        print(f"{model} M={m} seed {m + 1000 * r} skew {skew} (busiest {load['busiest']}, "
              f"{load['experts']} experts): " + ", ".join(
            f"{n} {v['us']:.1f} us" + (f" (err {v['err']:.1e}, same {v['same']})"
                                       if "err" in v else "")
            for n, v in rec["tables"].items() if "us" in v), flush=True)
    print("wrote", write_records(args.out, "prefill_table_ab.json", records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
