"""What the small kernels of the prefill chain cost, and layer paths that take them out.

At M <= 64 the prefill layer is a chain of programmatic dependents: router -> alignment ->
GEMM1 -> GEMM2 -> top-k sum. Two measurements:

1. **Per call in the chain** (``python3 benchmarks/chain_small_kernels.py``): ``--calls``
   launches of one kernel, each a PDL dependent of the one before, captured in one CUDA
   graph; the median over at least ``--reps`` replays of a replay's time divided by the
   calls (``w4a16moe.bench.timing.time_calls``). Kernels: an
   empty one-program kernel (the edge alone), the router, the one-program alignment ranking
   by counting as shipped (``align_count``), by counting with each slot loading its own
   count words (``align_rows``: ``align.COUNT_TABLE_MIN_SLOTS`` out of reach) and by sorting
   (``align_sort``: ``align.count_words`` forced to 0; all checked equal to the torch
   alignment), the router and the alignment in one program (``route_align``:
   ``fused_topk_align``, checked equal to both), and the top-k sum. Writes
   ``$OUT/chain_small_kernels.json``.
2. **In the layer** (``w4a16moe bench --paths ...``, weights rotated, router included):

       PYTHONPATH=.:benchmarks w4a16moe bench --model qwen3-30b-a3b --m 16,32,64 \\
           --paths prefill,no_sum=chain_small_kernels:no_sum,\\
       sum_twice=chain_small_kernels:sum_twice,align_twice=chain_small_kernels:align_twice,\\
       sorting=chain_small_kernels:sorting_align

   ``no_sum`` skips the top-k sum (a wrong output: what the sum costs at most),
   ``sum_twice`` and ``align_twice`` run that kernel twice (what one more call costs),
   ``sorting_align`` the shipped layer with the alignment sorting at every M.
"""

from __future__ import annotations

import argparse
import json
import os
from unittest import mock

import torch
import triton
import triton.language as tl
from prefill_mma_ab import shipped_layer

from w4a16moe.bench.timing import time_calls
from w4a16moe.kernels import align as align_mod
from w4a16moe.kernels import prefill as prefill_mod
from w4a16moe.kernels.pdl import prefill_chain, prefill_pdl_args, wait_upstream_release_next
from w4a16moe.kernels.router import topk_router
from w4a16moe.kernels.tune import MODEL_SHAPES
from w4a16moe.routing import (
    align_block_size,
    fused_topk_align,
    fused_topk_align_supported,
    max_num_tokens_padded,
)


def no_sum(x, experts, topk_weights, topk_ids, *, activation="silu"):
    """The prefill layer without its top-k sum (the output is wrong)."""
    with mock.patch.object(prefill_mod, "topk_sum", lambda per_slot, top_k, out, **kw: out):
        return shipped_layer(x, experts, topk_weights, topk_ids, activation=activation)


def sum_twice(x, experts, topk_weights, topk_ids, *, activation="silu"):
    """The prefill layer with the top-k sum run twice."""
    real = prefill_mod.topk_sum

    def twice(per_slot, top_k, out, **kw):
        real(per_slot, top_k, out, **kw)
        return real(per_slot, top_k, out, **kw)
    with mock.patch.object(prefill_mod, "topk_sum", twice):
        return shipped_layer(x, experts, topk_weights, topk_ids, activation=activation)


def align_twice(x, experts, topk_weights, topk_ids, *, activation="silu"):
    """The prefill layer with the alignment run twice."""
    real = prefill_mod.align_block_size

    def twice(*args, **kwargs):
        real(*args, **kwargs)
        return real(*args, **kwargs)
    with mock.patch.object(prefill_mod, "align_block_size", twice):
        return shipped_layer(x, experts, topk_weights, topk_ids, activation=activation)


def sorting_align(x, experts, topk_weights, topk_ids, *, activation="silu"):
    """The prefill layer with the one-program alignment sorting at every M."""
    with mock.patch.object(align_mod, "count_words", lambda num_tokens, top_k: 0):
        return shipped_layer(x, experts, topk_weights, topk_ids, activation=activation)


@triton.jit
def _empty_kernel(out_ptr, PDL: tl.constexpr = False):
    if PDL:
        wait_upstream_release_next()
    tl.store(out_ptr + tl.program_id(0), 1)


def per_call_us(launch, calls: int, reps: int) -> float:
    """Median microseconds a call of ``launch``, ``calls`` launches as PDL dependents in one
    CUDA graph (:func:`~w4a16moe.bench.timing.time_calls`, at least ``reps`` replays)."""
    with prefill_chain(1):
        return time_calls([launch], min_calls=calls, min_reps=reps, target_ms=20.0).median_us


def measure(model: str, ms: list[int], calls: int, reps: int, dev: torch.device) -> list[dict]:
    shape = MODEL_SHAPES[model]
    e, k, h = shape.num_experts, shape.top_k, shape.hidden_size
    block = 8   # the mma tiles' block (the table's blocks at M <= 64 on the H100)
    records = []
    for m in ms:
        gen = torch.Generator(device=dev).manual_seed(m)
        logits = torch.randn(m, e, device=dev, generator=gen)
        row = {"model": model, "M": m}
        row["router_us"] = per_call_us(lambda logits=logits: topk_router(logits, k), calls, reps)
        _, ids = topk_router(logits, k)
        ref = align_block_size(ids, block, e, backend="torch")
        padded = max_num_tokens_padded(m * k, block, e)
        real = align_mod.count_words
        for mode in ("count", "rows", "sort"):
            out = (torch.empty(padded, dtype=torch.int32, device=dev),
                   torch.empty(padded // block, dtype=torch.int32, device=dev),
                   torch.empty(1, dtype=torch.int32, device=dev))
            scratch = torch.empty(align_mod.scratch_numel(m * k, e), dtype=torch.int32,
                                  device=dev)
            words = real if mode != "sort" else (lambda num_tokens, top_k: 0)
            table_from = 1 << 30 if mode == "rows" else align_mod.COUNT_TABLE_MIN_SLOTS
            with mock.patch.multiple(align_mod, count_words=words,
                                     COUNT_TABLE_MIN_SLOTS=table_from):
                row[f"align_{mode}_us"] = per_call_us(
                    lambda out=out, scratch=scratch, ids=ids: align_mod.align_block_size_triton(
                        ids, block, e, None, *out, scratch=scratch), calls, reps)
                row[f"align_{mode}_words"] = align_mod.count_words(m, k)
            if not all(torch.equal(a, b) for a, b in zip(out, ref, strict=True)):
                raise AssertionError(f"{model} M={m}: the {mode} alignment differs from torch")
        # the router and the alignment in one program (fused_topk_align): its first call's
        # outputs are the timed calls', and what they hold last is checked equal
        if fused_topk_align_supported(m, e, dev):
            w1, i1, out = fused_topk_align(logits, k, block)
            row["route_align_us"] = per_call_us(
                lambda logits=logits, out=out: fused_topk_align(logits, k, block, out=out),
                calls, reps)
            w0, i0 = topk_router(logits, k)
            if not (torch.equal(w0, w1) and torch.equal(i0, i1)
                    and all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))):
                raise AssertionError(f"{model} M={m}: fused_topk_align differs")
        per_slot = torch.randn(m * k, h, device=dev, dtype=torch.bfloat16)
        y = torch.empty(m, h, device=dev, dtype=torch.bfloat16)
        row["topk_sum_us"] = per_call_us(
            lambda per_slot=per_slot, y=y: prefill_mod.topk_sum(per_slot, k, y), calls, reps)
        records.append(row)
        print(f"{model} M={m}: " + ", ".join(f"{key} {val:.2f}" for key, val in row.items()
                                             if key.endswith("_us")), flush=True)
    return records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b,deepseek-v2-lite")
    ap.add_argument("--m", default="1,4,8,16,32,64")
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = torch.device("cuda")
    buf = torch.zeros(64, dtype=torch.int32, device=dev)
    result = {"gpu": torch.cuda.get_device_name(dev), "calls": args.calls,
              "reps": args.reps, "records": []}
    result["empty_us"] = per_call_us(
        lambda: _empty_kernel[(1,)](buf, **prefill_pdl_args(dev)), args.calls, args.reps)
    print(f"empty one-program kernel: {result['empty_us']:.2f} us a call", flush=True)
    for model in args.models.split(","):
        result["records"] += measure(model, [int(v) for v in args.m.split(",")], args.calls,
                                     args.reps, dev)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "chain_small_kernels.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
