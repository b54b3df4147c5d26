"""Device A/B of the layer's last step, the top-k sum ``out[m] = sum_k per_slot[m * top_k + k]``:
``torch.sum`` over the ``[M, top_k, H]`` view (what ``fused_moe_prefill`` ran outside the
deterministic mode) against the fixed-order Triton kernel ``topk_sum``, per built-in model
shape and M, in CUDA graphs (``time_cuda_graph`` medians, the two interleaved twice, the
faster of each pair kept). Also reports whether the two results are bit-identical.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/topk_sum_ab.py --out $OUT
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import best_of_two, write_records  # noqa: E402

from w4a16moe.kernels.prefill import topk_sum  # noqa: E402
from w4a16moe.kernels.tune import MODEL_SHAPES  # noqa: E402

DEV = torch.device("cuda")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,4,16,32,64,256,1024,4096,8192")
    ap.add_argument("--rep", type=float, default=10.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    rows = []
    for model in args.models.split(","):
        s = MODEL_SHAPES[model]
        h, k = s.hidden_size, s.top_k
        for m in map(int, args.tokens.split(",")):
            per_slot = torch.randn(m * k, h, device=DEV, dtype=torch.bfloat16)
            out_t = torch.empty(m, h, device=DEV, dtype=torch.bfloat16)
            out_k = torch.empty_like(out_t)
            fns = {"torch.sum": functools.partial(torch.sum, per_slot.view(m, k, h), dim=1,
                                                  out=out_t),
                   "topk_sum": functools.partial(topk_sum, per_slot, k, out_k)}
            for fn in fns.values():
                fn()
            same = torch.equal(out_t, out_k)
            times = dict(zip(fns, best_of_two(*fns.values(), args.rep), strict=True))
            rows.append({"model": model, "M": m, "top_k": k, "H": h, "us": times,
                         "bit_identical": same})
            print(f"{model} M={m}: torch.sum {times['torch.sum']:.2f} us, topk_sum "
                  f"{times['topk_sum']:.2f} us, bit-identical {same}", flush=True)
    print("wrote", write_records(args.out, "topk_sum_ab.json", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
