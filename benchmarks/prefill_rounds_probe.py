"""Device probe: does a prefill GEMM's time follow its rounds of units or its bytes?

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_rounds_probe.py --out $OUT \
        [--model qwen3-30b-a3b] [--m 16] [--experts 60,66,67,72,88,89]

The Gluon prefill kernel runs ``min(units, SMs)`` programs, program ``p`` taking units
``p, p + P, ...`` (a unit: one aligned block of tokens x one tile of output columns). If its
consumers, not HBM, set the pace, a launch takes as long as its busiest program: ``ceil(units
/ 132)`` rounds, so one unit past a multiple of 132 adds a whole round. If HBM sets it, time
follows the bytes. The probe routes ``M`` tokens to exactly ``u`` distinct experts (token
``t``'s ``j``-th slot to expert ``subset[(top_k t + j) % u]``, a random subset per call, two
weight copies alternated) and takes each kernel's GPU time from the profiler (eager calls,
``--iters`` per u). ``$OUT/prefill_rounds_probe.json`` holds kernel times per u with the
units and rounds of GEMM1 at the shipped config. The ``mma.sync`` kernel (a program a unit,
not persistent) runs both GEMMs under one name: its GEMM1 and GEMM2 times are told apart by
their order in each call.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import kernel_times, write_records  # noqa: E402

from w4a16moe.kernels.configs import get_prefill_config  # noqa: E402
from w4a16moe.kernels.prefill import PrefillWorkspace, fused_moe_prefill  # noqa: E402
from w4a16moe.kernels.tune import MODEL_SHAPES, random_packed_experts  # noqa: E402

DEV = torch.device("cuda")


def routing(m: int, top_k: int, subset: torch.Tensor):
    u = subset.numel()
    idx = (torch.arange(m, device=DEV)[:, None] * top_k + torch.arange(top_k, device=DEV)) % u
    ids = subset[idx].to(torch.int32)
    return torch.full((m, top_k), 1.0 / top_k, device=DEV), ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--experts", default="60,66,67,72,88,89,99,100")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--stream-k", default="off",
                    help="off, on, or both (each u timed with and without STREAM_K on the "
                         "shipped configs of both GEMMs)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    s = MODEL_SHAPES[args.model]
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    copies = [random_packed_experts(s, torch.bfloat16, DEV, seed=11 + c) for c in range(2)]
    x = torch.randn(args.m, s.hidden_size, device=DEV, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ws = PrefillWorkspace.allocate(args.m, copies[0], s.top_k)
    cfg1 = get_prefill_config(args.m, 2 * s.intermediate_size, s.hidden_size, s.num_experts,
                              s.top_k, torch.bfloat16, DEV)
    cfg2 = get_prefill_config(args.m, s.hidden_size, s.intermediate_size, s.num_experts,
                              s.top_k, torch.bfloat16, DEV)

    def with_sk(cfg, on):
        cfg = {k: v for k, v in cfg.items() if k not in ("DENSE", "STREAM_K")}
        if on and cfg.get("RS") and cfg["GROUP_SIZE_M"] == 1:
            cfg.pop("SPLIT_K", None)
            cfg["STREAM_K"] = True
        return cfg
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.stream_k]
    gen = torch.Generator(device=DEV)
    gen.manual_seed(0)
    records = []
    for u in (int(v) for v in args.experts.split(",")):
        routes = [routing(args.m, s.top_k, torch.randperm(s.num_experts, device=DEV,
                                                          generator=gen)[:u])
                  for _ in range(args.iters)]
        for sk in modes:
            cfgs = (with_sk(cfg1, sk), with_sk(cfg2, sk))
            for i in range(4):
                fused_moe_prefill(x, copies[i % 2], *routes[i], out=y, workspace=ws,
                                  configs=cfgs)
            torch.cuda.synchronize()
            def calls(cfgs=cfgs, routes=routes):
                for i, (w, ids) in enumerate(routes):
                    fused_moe_prefill(x, copies[i % 2], w, ids, out=y, workspace=ws,
                                      configs=cfgs)

            per = collections.defaultdict(list)
            for name, times in kernel_times(calls).items():
                per[name[:40]] += times
            # a kernel that runs both GEMMs (the mma kernel) shows up twice a call: GEMM1
            # first, then GEMM2
            for name in [k for k, v in per.items() if len(v) == 2 * len(routes)]:
                both = per.pop(name)
                per[f"{name} GEMM1"], per[f"{name} GEMM2"] = both[0::2], both[1::2]
            med = {k: sorted(v)[len(v) // 2] for k, v in per.items()}
            bpe = max(1, math.ceil(args.m * s.top_k / u / cfg1["BLOCK_SIZE_M"]))
            units = u * bpe * (s.intermediate_size // cfg1["BLOCK_SIZE_N"])
            rec = {"model": args.model, "M": args.m, "u": u, "stream_k": sk,
                   "gemm1_units": units, "gemm1_rounds": math.ceil(units / sms),
                   "units_per_sm": units / sms, "kernels_us": med, "configs": cfgs}
            records.append(rec)
            g1 = med.get("_prefill_rs_kernel", med.get("_prefill_mma_kernel GEMM1",
                                                       float("nan")))
            print(f"u={u:4d} stream_k={sk!s:5} units={units:5d} ({units / sms:5.2f} a "
                  f"program, {math.ceil(units / sms)} rounds): " + ", ".join(
                      f"{k} {v:.1f}" for k, v in sorted(med.items(), key=lambda kv: -kv[1])[:3])
                  + f" | GEMM1 per round {g1 / math.ceil(units / sms):.2f} us",
                  flush=True)
    print("wrote", write_records(args.out, "prefill_rounds_probe.json", records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
