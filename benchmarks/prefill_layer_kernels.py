"""Per-kernel GPU time of one prefill layer call (no CUDA graph, so each kernel shows up):
where the time between the two GEMMs goes (alignment, top-k sum, copies).

    PYTHONPATH=. python3 benchmarks/prefill_layer_kernels.py --cases qwen3-30b-a3b:64

A case is ``model:M`` (the routing of seed M) or ``model:M:seed``.

Prints, per case, every kernel's name (shortened) and mean time over ``--iters`` calls, and
their sum; writes ``$OUT/prefill_layer_kernels.json``.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import experts_of, kernel_times, write_records  # noqa: E402

from w4a16moe.kernels.prefill import PrefillWorkspace, fused_moe_prefill  # noqa: E402
from w4a16moe.kernels.tune import MODEL_SHAPES, random_routing  # noqa: E402

DEV = torch.device("cuda")


def breakdown(model: str, m: int, iters: int, cache: dict, seed: int | None = None) -> dict:
    ex, _, _ = experts_of(model, cache)
    s = MODEL_SHAPES[model]
    x = torch.randn(m, s.hidden_size, device=DEV, dtype=torch.bfloat16)
    seed = m if seed is None else seed
    w, ids = random_routing(m, s, DEV, seed=seed)
    most = int(torch.bincount(ids.flatten(), minlength=s.num_experts).max())
    ws = PrefillWorkspace.allocate(m, ex, s.top_k)
    y = torch.empty_like(x)
    for _ in range(3):
        fused_moe_prefill(x, ex, w, ids, out=y, workspace=ws)
    torch.cuda.synchronize()
    def calls():
        for _ in range(iters):
            fused_moe_prefill(x, ex, w, ids, out=y, workspace=ws)

    per = collections.defaultdict(float)
    for name, times in kernel_times(calls).items():
        per[name[:60]] += sum(times) / iters
    kernels = sorted(per.items(), key=lambda kv: -kv[1])
    print(f"{model} M={m} seed {seed} (at most {most} slots an expert): "
          f"{sum(per.values()):.1f} us in {len(per)} kernels")
    for name, us in kernels:
        print(f"  {us:8.1f} us  {name}")
    return {"model": model, "M": m, "seed": seed, "most_slots_an_expert": most,
            "kernels_us": dict(kernels)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mixtral-8x7b:16,mixtral-8x7b:64,qwen3-30b-a3b:64,"
                    "qwen3-30b-a3b:256",
                    help="model:M or model:M:seed, comma-separated (default: %(default)s)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    cache: dict = {}
    recs = []
    for case in args.cases.split(","):
        model, m, *seed = case.split(":")
        recs.append(breakdown(model, int(m), args.iters, cache,
                              int(seed[0]) if seed else None))
    print("wrote", write_records(args.out, "prefill_layer_kernels.json", recs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
