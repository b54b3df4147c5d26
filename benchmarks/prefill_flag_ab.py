"""Device A/B of a per-entry flag of the Gluon kernel (default ``PREFETCH_SCALES``) over every
RS entry of the shipped H100 table: each GEMM (built-in model shape, M bucket) runs its
entry as the layer would (``tune.candidate_runs``: gathered or ``SORTED_ROWS`` as the entry
says, GEMM2 on GEMM1's BLOCK_SIZE_M) with the flag off and on, and a table with the flag set
where it won is written.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_flag_ab.py --out $OUT

Both versions first run into NaN-poisoned outputs and must agree bit for bit, NaN where
neither writes (the flag only moves loads); then they are timed off, on, off, on (CUDA-graph
medians, the faster of each pair kept). ``$OUT/prefill_flag_ab.json`` holds the records,
``$OUT/table_<flag>.json`` the shipped table with the flag on every entry that was at least
``--min-gain`` faster: a candidate for ``prefill_table_ab.py`` at the layer level, not
shipped as is.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import best_of_two, write_records  # noqa: E402

from w4a16moe.kernels import configs as cfgmod  # noqa: E402
from w4a16moe.kernels.tune import (  # noqa: E402
    MODEL_SHAPES,
    candidate_runs,
    random_packed_experts,
    random_routing,
)
from w4a16moe.routing import align_block_size  # noqa: E402

DEV = torch.device("cuda")
TABLE = cfgmod.CONFIG_DIR / "NVIDIA_H100_80GB_HBM3.json"


def case_tensors(m: int, shape, block_m: int, dtype, device=DEV) -> dict:
    """The inputs and buffers ``tune.candidate_runs`` takes for ``m`` tokens of ``shape``:
    ``x``, a softmax top-k routing (``w``, ``ids``, seeded by ``m``), its ``blocks`` of
    ``block_m`` rows, a random intermediate ``inter`` and GEMM2's output ``c2`` by slot, and
    the sorted-row buffers ``x_sorted`` / ``inter_sorted``."""
    h, i, k = shape.hidden_size, shape.intermediate_size, shape.top_k
    x = torch.randn(m, h, device=device, dtype=dtype)
    w, ids = random_routing(m, shape, device, seed=m)
    blocks = align_block_size(ids, block_m, shape.num_experts)
    em = blocks.sorted_token_ids.numel()
    return dict(x=x, w=w, ids=ids, blocks=blocks,
                inter=torch.randn(m * k, i, device=device, dtype=dtype),
                c2=torch.empty(m * k, h, device=device, dtype=dtype),
                x_sorted=torch.empty(em, h, device=device, dtype=dtype),
                inter_sorted=torch.randn(em, i, device=device, dtype=dtype))


def pick_run(runs, entry: dict, flag: str, on: bool):
    """The run of ``runs`` with ``entry``'s SORTED_ROWS and ``flag`` set to ``on``."""
    for cfg, fn in runs:
        if (bool(cfg.get("SORTED_ROWS")) == bool(entry.get("SORTED_ROWS"))
                and bool(cfg.get(flag)) == on):
            return fn
    raise RuntimeError(f"no run with SORTED_ROWS={entry.get('SORTED_ROWS')} {flag}={on}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flag", default="PREFETCH_SCALES")
    ap.add_argument("--models", default=",".join(MODEL_SHAPES))
    ap.add_argument("--min-gain", type=float, default=0.01,
                    help="relative gain needed to set the flag in the written table")
    ap.add_argument("--rep", type=float, default=10.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    raw = json.loads(TABLE.read_text())
    table = cfgmod.parse_table(raw)
    new_raw = copy.deepcopy(raw)
    records = []
    dtype = torch.bfloat16
    for model in args.models.split(","):
        s = MODEL_SHAPES[model]
        h, i, k = s.hidden_size, s.intermediate_size, s.top_k
        keys = ((2 * i, h), (h, i))
        g1, g2 = (table.get(key, {}) for key in keys)
        # GEMM2 runs on GEMM1's BLOCK_SIZE_M: buckets with a GEMM1 entry
        buckets = sorted(m for m in g1 if g1[m].get("RS") or g2.get(m, {}).get("RS"))
        if not buckets:
            continue
        experts = random_packed_experts(s, dtype, DEV)
        for m in buckets:
            bm = g1[m]["BLOCK_SIZE_M"]
            t = case_tensors(m, s, bm, dtype)
            x, w, ids, blocks, inter, c2, x_sorted, inter_sorted = (
                t[n] for n in ("x", "w", "ids", "blocks", "inter", "c2", "x_sorted",
                               "inter_sorted"))
            for gemm, key, entry in (("w13", keys[0], g1[m]), ("w2", keys[1], g2.get(m))):
                if not entry or not entry.get("RS"):
                    continue
                entry = {**entry, "BLOCK_SIZE_M": bm}
                base = {kk: v for kk, v in entry.items() if kk not in (args.flag, "SORTED_ROWS")}
                runs = candidate_runs(gemm, base, experts=experts, x=x, inter=inter,
                                      out=inter if gemm == "w13" else c2, blocks=blocks,
                                      topk_ids=ids, topk_weights=w, top_k=k,
                                      x_sorted=x_sorted, inter_sorted=inter_sorted)
                fns = {on: pick_run(runs, entry, args.flag, on) for on in (False, True)}
                if gemm == "w13":
                    result = inter_sorted if entry.get("SORTED_ROWS") else inter
                else:
                    result = c2
                outs = {}
                for on, fn in fns.items():
                    result.fill_(float("nan"))
                    fn()
                    torch.cuda.synchronize()
                    outs[on] = result.clone()
                # NaN where neither wrote (sorted GEMM1 output: the padding rows)
                nan_off, nan_on = torch.isnan(outs[False]), torch.isnan(outs[True])
                same = (torch.equal(nan_off, nan_on) and not bool(nan_off.all())
                        and torch.equal(outs[False].nan_to_num(0.0), outs[True].nan_to_num(0.0)))
                times = dict(zip(fns, best_of_two(*fns.values(), args.rep), strict=True))
                gain = 1 - times[True] / times[False]
                take = same and gain >= args.min_gain
                if take:
                    new_raw[f"{key[0]},{key[1]}"][str(m)][args.flag] = True
                rec = {"model": model, "M": m, "gemm": gemm, "config": entry,
                       "us_off": times[False], "us_on": times[True], "gain": gain,
                       "bit_identical": same, "taken": take}
                records.append(rec)
                print(f"{model} M={m} {gemm} {bm}x{entry['BLOCK_SIZE_N']}x"
                      f"{entry['BLOCK_SIZE_K']}s{entry['num_stages']}"
                      f"{' sorted' if entry.get('SORTED_ROWS') else ''}: off "
                      f"{times[False]:.1f} us, on {times[True]:.1f} us ({100 * gain:+.1f} %)"
                      f"{'' if same else ' DIFFERENT OUTPUT'}{' -> taken' if take else ''}",
                      flush=True)
        del experts
        torch.cuda.empty_cache()
    write_records(args.out, "prefill_flag_ab.json", records, flag=args.flag,
                  min_gain=args.min_gain)
    path = os.path.join(args.out, f"table_{args.flag}.json")
    with open(path, "w") as f:
        json.dump(new_raw, f, indent=1)
    taken = sum(r["taken"] for r in records)
    print(f"{taken} of {len(records)} RS entries faster with {args.flag}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
