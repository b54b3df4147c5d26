"""Device probe: would splitting the mma kernel's K loop pay? GEMM1 of a model shape against
the same bytes cut into shorter programs.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_split_probe.py --out $OUT \
        [--model qwen3-30b-a3b] [--m 8,16,32,64] [--splits 1,2,4]

``prefill_rounds_probe.py`` found (H200, session 31) that the ``mma.sync`` kernel's GEMM1
time goes by rounds of resident programs: at qwen3-30b M=16, 12 programs past a full round
(396 = 132 SMs x 3) added 4.4 us to 18.1, a third of a full round. A K split would make each
program shorter, so a partial round would cost less. Before building one (partial sums, a
counter, the last piece's epilogue), this probe measures the layout such a split reaches
without its costs: split ``s`` runs GEMM1 on experts of hidden size ``H / s`` and
intermediate size ``s I`` (the same bytes an expert, ``s`` times the programs of ``1 / s``
the K steps), same routing, same config (the shipped table's for the model's GEMM1 at M),
two weight copies alternated, each kernel's GPU time from the profiler (median over
``--iters`` calls); ``--variants`` times config overrides too (each against the first one
timed at that M). ``$OUT/prefill_split_probe.json`` holds the records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import kernel_times, write_records  # noqa: E402

from w4a16moe.kernels.configs import get_prefill_config  # noqa: E402
from w4a16moe.kernels.prefill import prefill_gemm  # noqa: E402
from w4a16moe.kernels.tune import MODEL_SHAPES, random_packed_experts, random_routing  # noqa: E402
from w4a16moe.routing import align_block_size  # noqa: E402

DEV = torch.device("cuda")


def gemm1_us(shape, m: int, cfg: dict, iters: int, seed: int) -> float:
    copies = [random_packed_experts(shape, torch.bfloat16, DEV, seed=seed + c)
              for c in range(2)]
    x = torch.randn(m, shape.hidden_size, device=DEV, dtype=torch.bfloat16)
    w, ids = random_routing(m, shape, DEV, seed=seed)
    blocks = align_block_size(ids, cfg["BLOCK_SIZE_M"], shape.num_experts)
    out = torch.empty(m * shape.top_k, shape.intermediate_size, device=DEV,
                      dtype=torch.bfloat16)

    def call(i):
        prefill_gemm(x, copies[i % 2].w13, blocks, ids, w, top_k=shape.top_k, config=cfg,
                     activation="silu", mul_routed_weight=True, out=out)

    for i in range(4):
        call(i)
    torch.cuda.synchronize()
    per = kernel_times(lambda: [call(i) for i in range(iters)])
    times = sorted(t for name, ts in per.items() if name.startswith("_prefill") for t in ts)
    return times[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--m", default="8,16,32,64")
    ap.add_argument("--splits", default="1,2,4")
    ap.add_argument("--variants", type=json.loads, default=[{}],
                    help="JSON list of config overrides merged into the table's GEMM1 config "
                         "(default: the table's config alone), each timed at every split")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    base = MODEL_SHAPES[args.model]
    records = []
    for m in (int(v) for v in args.m.split(",")):
        cfg = get_prefill_config(m, 2 * base.intermediate_size, base.hidden_size,
                                 base.num_experts, base.top_k, torch.bfloat16, DEV)
        # GEMM1 on its own: activations by token, output by slot
        table = {k: v for k, v in cfg.items() if k != "SORTED_ROWS"}
        ref = None
        for override in args.variants:
            cfg = {**table, **override}
            line = []
            for s in (int(v) for v in args.splits.split(",")):
                shape = dataclasses.replace(base, hidden_size=base.hidden_size // s,
                                            intermediate_size=base.intermediate_size * s)
                us = gemm1_us(shape, m, cfg, args.iters, seed=m)
                ref = ref or us
                records.append({"model": args.model, "M": m, "split": s, "override": override,
                                "hidden_size": shape.hidden_size,
                                "intermediate_size": shape.intermediate_size,
                                "k_steps": shape.hidden_size // cfg["BLOCK_SIZE_K"],
                                "config": cfg, "gemm1_us": us, "vs_first": us / ref})
                line.append(f"split {s} ({shape.hidden_size // cfg['BLOCK_SIZE_K']} steps) "
                            f"{us:.1f} us ({100 * (us / ref - 1):+.1f} %)")
            print(f"{args.model} M={m} {json.dumps(override)}: " + ", ".join(line),
                  flush=True)
    print("wrote", write_records(args.out, "prefill_split_probe.json", records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
