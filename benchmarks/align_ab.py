"""Device A/B of ``align_block_size`` at small batches: one program
(``_align_single_kernel``) against the count / scan / scatter kernels, per built-in model
shape and M, at the BLOCK_SIZE_M the layer uses there, in CUDA graphs (``time_cuda_graph``
medians, interleaved twice, the faster of each pair kept). Both must give the same outputs.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/align_ab.py --out $OUT
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import best_of_two, write_records  # noqa: E402

from w4a16moe.kernels.align import SINGLE_PROGRAM_SLOTS, align_block_size_triton  # noqa: E402
from w4a16moe.kernels.configs import get_prefill_config  # noqa: E402
from w4a16moe.kernels.tune import MODEL_SHAPES, random_routing  # noqa: E402
from w4a16moe.routing import AlignedBlocks, max_num_tokens_padded  # noqa: E402

DEV = torch.device("cuda")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,4,8,16,32,64,128")
    ap.add_argument("--rep", type=float, default=10.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    rows = []
    for model in args.models.split(","):
        s = MODEL_SHAPES[model]
        for m in map(int, args.tokens.split(",")):
            if m * s.top_k > SINGLE_PROGRAM_SLOTS:
                continue
            bm = get_prefill_config(m, 2 * s.intermediate_size, s.hidden_size, s.num_experts,
                                    s.top_k, torch.bfloat16, DEV)["BLOCK_SIZE_M"]
            _, ids = random_routing(m, s, DEV, seed=m)
            size = max_num_tokens_padded(ids.numel(), bm, s.num_experts)
            outs = {single: AlignedBlocks(
                torch.empty(size, dtype=torch.int32, device=DEV),
                torch.empty(size // bm, dtype=torch.int32, device=DEV),
                torch.empty(1, dtype=torch.int32, device=DEV)) for single in (True, False)}
            scratch = torch.empty(1 << 16, dtype=torch.int32, device=DEV)
            fns = {single: functools.partial(align_block_size_triton, ids, bm, s.num_experts,
                                             None, *outs[single], scratch=scratch,
                                             single_program=single)
                   for single in (True, False)}
            for fn in fns.values():
                fn()
            same = all(torch.equal(a, b) for a, b in zip(outs[True], outs[False], strict=True))
            times = dict(zip(fns, best_of_two(*fns.values(), args.rep), strict=True))
            rows.append({"model": model, "M": m, "block_size": bm, "us_single": times[True],
                         "us_three": times[False], "same": same})
            print(f"{model} M={m} BLOCK_SIZE_M={bm}: three kernels {times[False]:.2f} us, one "
                  f"program {times[True]:.2f} us{'' if same else ' DIFFERENT OUTPUT'}",
                  flush=True)
    print("wrote", write_records(args.out, "align_ab.json", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
