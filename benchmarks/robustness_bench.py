#!/usr/bin/env python3
"""The deterministic mode's cost: layer time with ``deterministic=True`` vs the default.

    PYTHONPATH=. python3 benchmarks/robustness_bench.py --out $OUT/robustness.json
        [--models qwen3-30b-a3b,mixtral-8x7b] [--ms 1,8,64,512,4096] [--dtype bf16]
        [--reference-ms 1024,4096] [--decode-max-m 64] [--target-ms 80]

For each model and M, :class:`HybridW4A16MoEExperts` in the default mode (decode or prefill
by M, per-M tuned configs, split-K atomics) and in the deterministic mode (one prefill config
for every M, fixed-order top-k sum), timed under CUDA graphs (median of the replays, weights
rotated over several layer copies so the L2 cache does not hold them; see
``w4a16moe/bench/timing.py``). Also timed, to justify the deterministic mode's choices:
the deterministic prefill with the configs tuned for other token counts
(``--reference-ms``) and the atomic-free decode kernel (M <= ``--decode-max-m``).

Each (model, M) also checks, on copy 0: the deterministic output against the default one
(relative error) and that token 0 alone gives bitwise the row it gets inside the batch.
Writes JSON (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def bench_m(name: str, shape, layers, m: int, dtype, reference_ms: list[int],
            decode_max_m: int, target_ms: float) -> dict:
    """One (model, M) row: timings of every variant and the checks on copy 0."""
    import torch

    from w4a16moe import HybridW4A16MoEExperts
    from w4a16moe.bench.floors import layer_bytes
    from w4a16moe.bench.layer import Inputs
    from w4a16moe.bench.timing import copies_for, time_calls
    from w4a16moe.kernels.prefill import (
        DETERMINISTIC_REFERENCE_M,
        deterministic_prefill_configs,
        fused_moe_prefill,
    )

    device = torch.device("cuda")
    n = copies_for(layer_bytes(shape, m, dtype_bytes=2), layers.copy_bytes("int4"), device,
                   max_copies=16)
    exs = [layers.int4(c) for c in range(n)]
    inputs = [Inputs(shape, m, dtype, device, seed=100 * m + c) for c in range(n)]
    outs = [torch.empty(m, shape.hidden_size, dtype=dtype, device=device) for _ in range(n)]
    default = [HybridW4A16MoEExperts(ex, shape.top_k) for ex in exs]
    determ = [HybridW4A16MoEExperts(ex, shape.top_k, deterministic=True) for ex in exs]
    for mod in default + determ:
        mod.reserve(m)

    def layer(mods, c, **kw):
        return mods[c](inputs[c].x, inputs[c].topk_weights, inputs[c].topk_ids, out=outs[c],
                       **kw)

    def with_configs(c, cfgs):
        return fused_moe_prefill(inputs[c].x, exs[c], inputs[c].topk_weights,
                                 inputs[c].topk_ids, out=outs[c],
                                 workspace=determ[c]._prefill_ws, configs=cfgs,
                                 deterministic=True)

    variants = {"default": [lambda c=c: layer(default, c) for c in range(n)],
                "deterministic": [lambda c=c: layer(determ, c) for c in range(n)]}
    for ref_m in reference_ms:
        if ref_m != DETERMINISTIC_REFERENCE_M:
            cfgs = deterministic_prefill_configs(exs[0], shape.top_k, reference_m=ref_m)
            variants[f"deterministic_ref{ref_m}"] = [
                lambda c=c, cfgs=cfgs: with_configs(c, cfgs) for c in range(n)]
    if m <= decode_max_m:
        variants["deterministic_decode"] = [lambda c=c: layer(determ, c, path="decode")
                                            for c in range(n)]

    # checks on copy 0
    inp = inputs[0]
    d_out = determ[0](inp.x, inp.topk_weights, inp.topk_ids)
    ref = default[0](inp.x, inp.topk_weights, inp.topk_ids)
    rel = ((d_out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    alone = determ[0](inp.x[:1], inp.topk_weights[:1], inp.topk_ids[:1])
    default_alone = default[0](inp.x[:1], inp.topk_weights[:1], inp.topk_ids[:1])
    row = {"model": name, "M": m, "copies": n, "rel_err_vs_default": rel,
           "token0_alone_bitwise_equal": bool(torch.equal(alone, d_out[:1])),
           "default_token0_alone_bitwise_equal": bool(torch.equal(default_alone, ref[:1])),
           "default_path": default[0].choose_path(m),
           "reference_m": DETERMINISTIC_REFERENCE_M,
           "configs": [dict(c) for c in deterministic_prefill_configs(exs[0], shape.top_k)]}
    for label, fns in variants.items():
        t = time_calls(fns, device, target_ms=target_ms, min_reps=10)
        row[f"{label}_us"] = round(t.median_us, 2)
        row[f"{label}_method"] = t.method
    row["ratio"] = round(row["deterministic_us"] / row["default_us"], 3)
    return row


def bench_model(name: str, ms: list[int], dtype, reference_ms: list[int], decode_max_m: int,
                target_ms: float, log) -> list[dict]:
    import torch

    from w4a16moe.bench.layer import LayerCopies
    from w4a16moe.bench.models import get_shape

    shape = get_shape(name)
    layers = LayerCopies(shape, dtype, torch.device("cuda"), seed=3)
    records = []
    for m in ms:
        row = bench_m(name, shape, layers, m, dtype, reference_ms, decode_max_m, target_ms)
        records.append(row)
        extra = "  ".join(f"{k[:-3]}={v:.1f}" for k, v in row.items()
                          if k.endswith("_us") and k not in ("default_us", "deterministic_us"))
        log(f"{name:15s} M={m:5d} default={row['default_us']:9.1f} us "
            f"({row['default_path']})  deterministic={row['deterministic_us']:9.1f} us  "
            f"x{row['ratio']:.2f}  rel_err={row['rel_err_vs_default']:.1e}  alone==batch: "
            f"det={row['token0_alone_bitwise_equal']} "
            f"default={row['default_token0_alone_bitwise_equal']}  {extra}")
        torch.cuda.synchronize()
    layers.release("int4")
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--ms", default="1,8,64,512,4096")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--reference-ms", default="1024,4096",
                    help="also time the deterministic prefill with the configs tuned for "
                         "these token counts")
    ap.add_argument("--decode-max-m", type=int, default=64,
                    help="time the atomic-free decode path up to this M")
    ap.add_argument("--target-ms", type=float, default=80.0)
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)

    import torch
    import triton

    if not torch.cuda.is_available():
        print("robustness_bench: no CUDA GPU; nothing to measure", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    t0 = time.perf_counter()
    records: list[dict] = []
    for name in args.models.split(","):
        records += bench_model(name.strip(), _ints(args.ms), dtype, _ints(args.reference_ms),
                               args.decode_max_m, args.target_ms, print)
    summary = {}
    for name in {r["model"] for r in records}:
        rows = [r for r in records if r["model"] == name]
        summary[name] = {"median_ratio": statistics.median(r["ratio"] for r in rows),
                         "max_ratio": max(r["ratio"] for r in rows),
                         "min_ratio": min(r["ratio"] for r in rows)}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "dtype": args.dtype,
              "method": "CUDA graph replay, median per call, weights rotated over copies",
              "seconds": round(time.perf_counter() - t0, 1), "records": records,
              "summary": summary}
    print(json.dumps(summary, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
