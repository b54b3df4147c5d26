"""Run one prefill GEMM of a built-in model shape a few times, for a profiler to catch.

    ncu -k regex:prefill --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis python3 benchmarks/ncu_prefill_gemm.py \\
        --model mixtral-8x7b --tokens 16 --gemm 1 --config '{"RS": true, ...}'

Without ``--config`` the table's config for the shape and M is used; ``--switch NAME=VALUE``
sets a module switch of ``prefill_mma`` first (an A/B of one GEMM). The first runs compile;
``--runs`` launches follow (the default 3 lets ``--launch-skip 2`` skip warm-up). With a
``SORTED_ROWS`` config the GEMM reads its activations as rows in sorted order (GEMM1 also
writes them so), as the layer runs it; the gather is a separate kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_mma_ab import add_switch_argument, apply_switches  # noqa: E402

from w4a16moe.kernels.configs import get_prefill_config  # noqa: E402
from w4a16moe.kernels.prefill import (  # noqa: E402
    _fragment_tiles,
    fragment_order_columns,
    gather_sorted_rows,
    prefill_gemm,
)
from w4a16moe.kernels.tune import MODEL_SHAPES, random_packed_experts, random_routing  # noqa: E402
from w4a16moe.routing import align_block_size  # noqa: E402


def routing_bytes(weights, ids: torch.Tensor, blocks, block_size: int, num_experts: int) -> str:
    """What a profiler's DRAM read count of one GEMM compares with: the weight bytes (packed
    words, scales, zero points) of the distinct experts routed to, and of every non-empty
    block reading its expert's weights (what the kernel reads if no two blocks of one expert
    share them through L2)."""
    per_expert = sum(t[0].numel() * t.element_size()
                     for t in (weights.qweight, weights.scales, weights.zeros) if t is not None)
    counts = torch.bincount(ids.flatten().long(), minlength=num_experts)
    distinct = int((counts > 0).sum())
    used = int(blocks.num_tokens_post_padded.item()) // block_size
    per_block = int((blocks.expert_ids[:used] >= 0).sum())
    return (f"distinct experts {distinct}, blocks {per_block} (most slots an expert "
            f"{int(counts.max())}); weight bytes: distinct {distinct * per_expert / 1e6:.2f} MB, "
            f"a block each {per_block * per_expert / 1e6:.2f} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODEL_SHAPES), required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--gemm", type=int, choices=(1, 2), required=True,
                    help="1: gate/up with the fused SiLU*up, 2: down with the router weight")
    ap.add_argument("--config", type=json.loads, default=None,
                    help="kernel config as JSON (default: the shipped table's)")
    ap.add_argument("--runs", type=int, default=3)
    add_switch_argument(ap)
    args = ap.parse_args()
    apply_switches(ap, args.switch)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    s = MODEL_SHAPES[args.model]
    h, i, e, k, m = s.hidden_size, s.intermediate_size, s.num_experts, s.top_k, args.tokens
    n, kk = (2 * i, h) if args.gemm == 1 else (h, i)
    cfg = args.config or get_prefill_config(m, n, kk, e, k, dtype, dev)
    ex = random_packed_experts(s, dtype, dev, seed=11)
    w, ids = random_routing(m, s, dev, seed=m)
    blocks = align_block_size(ids, cfg["BLOCK_SIZE_M"], e)
    frag = _fragment_tiles(cfg)
    if args.gemm == 1:
        a = torch.randn(m, h, device=dev, dtype=dtype)
        kw = dict(activation="silu")
        weights = ex.w13
    else:
        a = torch.randn(m * k, i, device=dev, dtype=dtype)
        kw = dict(mul_routed_weight=True, a_is_slots=True)
        weights = ex.w2
    if frag:
        a = fragment_order_columns(a)
    if cfg.get("SORTED_ROWS"):
        a = gather_sorted_rows(a, blocks, top_k=k, a_is_slots=args.gemm == 2)
        kw.update(a_sorted=True, out_sorted=args.gemm == 1)
    for _ in range(args.runs):
        prefill_gemm(a, weights, blocks, ids, w, top_k=k, config=cfg, a_fragment_order=frag,
                     **kw)
    torch.cuda.synchronize()
    print(f"{args.model} M={m} GEMM{args.gemm} config {json.dumps(cfg)}")
    print(routing_bytes(weights, ids, blocks, cfg["BLOCK_SIZE_M"], e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
