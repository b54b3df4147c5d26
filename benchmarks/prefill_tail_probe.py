"""Probe: what do the nearly empty last blocks of each expert cost the prefill layer at large M,
and what would running them on smaller tiles save? A what-if, before building it.

``align_block_size`` pads every expert's rows to a multiple of BLOCK_SIZE_M, and a block costs
the same however few of its rows are real. With ~256 rows an expert on 256-token tiles about
half the experts need a second, nearly empty block. Per case (model, M, routing) this times,
under CUDA graphs on the shipped table's configs:

- ``real``: the prefill layer on the routing;
- ``full``: the layer on the same routing with every expert's remainder (its rows past the last
  whole block) of at most ``--tail`` x BLOCK_SIZE_M rows taken out: whole blocks only;
- ``tail``: the layer on just those remainders, with the table's configs for that many tokens
  (small tiles).

``full + tail`` is what a layer that ran the remainders as a second launch on small tiles
would cost, plus one extra alignment and top-k sum (so a slight overestimate). Slots are
regrouped into tokens of ``top_k`` slots at random, so a token may repeat an expert; the GEMMs
treat slots independently.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_tail_probe.py --out $OUT \
        [--cases mixtral-8x7b:1024,qwen3-30b-a3b:4096] [--seeds 2] [--tail 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import experts_of  # noqa: E402

from w4a16moe.kernels.configs import get_prefill_config  # noqa: E402
from w4a16moe.kernels.prefill import PrefillWorkspace, fused_moe_prefill  # noqa: E402
from w4a16moe.kernels.tune import MODEL_SHAPES, random_routing, time_cuda_graph  # noqa: E402

DEV = torch.device("cuda")


def routing_of(counts: torch.Tensor, top_k: int, gen: torch.Generator):
    """(weights, ids) of ``counts[e]`` slots on expert e, shuffled into tokens of ``top_k``
    slots; the last token is filled up with slots of the most loaded expert."""
    ids = torch.repeat_interleave(torch.arange(counts.numel(), device=DEV), counts.to(DEV))
    short = (-ids.numel()) % top_k
    if short:
        ids = torch.cat([ids, torch.full((short,), int(counts.argmax()), device=DEV)])
    ids = ids[torch.randperm(ids.numel(), device=DEV, generator=gen)]
    ids = ids.view(-1, top_k).to(torch.int32)
    w = torch.full(ids.shape, 1.0 / top_k, device=DEV, dtype=torch.float32)
    return w, ids


def time_layer(ex, ids, w, dtype, rep):
    m, k = ids.shape
    h, i = ex.hidden_size, ex.intermediate_size
    cfgs = (get_prefill_config(m, 2 * i, h, ex.num_experts, k, dtype, DEV),
            get_prefill_config(m, h, i, ex.num_experts, k, dtype, DEV))
    x = torch.randn(m, h, device=DEV, dtype=dtype)
    y = torch.empty(m, h, device=DEV, dtype=dtype)
    ws = PrefillWorkspace.allocate(m, ex, k)

    def fn():
        fused_moe_prefill(x, ex, w, ids, out=y, workspace=ws, configs=cfgs)

    return time_cuda_graph(fn, rep), cfgs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mixtral-8x7b:1024,mixtral-8x7b:2048,mixtral-8x7b:4096,"
                    "qwen3-30b-a3b:2048,qwen3-30b-a3b:4096,qwen3-30b-a3b:8192")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tail", type=float, default=0.5,
                    help="remainders of at most this fraction of BLOCK_SIZE_M rows go to the "
                         "tail launch (default: %(default)s)")
    ap.add_argument("--rep", type=float, default=30.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dtype = torch.bfloat16
    cache: dict = {}
    records = []
    for case in args.cases.split(","):
        model, m = case.split(":")
        m = int(m)
        s = MODEL_SHAPES[model]
        ex = experts_of(model, cache, dtype)[0]
        for r in range(args.seeds):
            seed = m + 1000 * r
            w, ids = random_routing(m, s, DEV, seed=seed)
            t_real, cfgs = time_layer(ex, ids, w, dtype, args.rep)
            bm = cfgs[0]["BLOCK_SIZE_M"]
            counts = torch.bincount(ids.flatten().long(), minlength=s.num_experts).cpu()
            rem = counts % bm
            to_tail = (rem > 0) & (rem <= args.tail * bm)
            tail = torch.where(to_tail, rem, torch.zeros_like(rem))
            full = counts - tail
            gen = torch.Generator(device=DEV)
            gen.manual_seed(seed)
            wf, idf = routing_of(full, s.top_k, gen)
            wt, idt = routing_of(tail, s.top_k, gen)
            t_full, _ = time_layer(ex, idf, wf, dtype, args.rep)
            t_tail, cfgs_t = time_layer(ex, idt, wt, dtype, args.rep)
            blocks = int(((counts + bm - 1) // bm).sum())
            rec = {"model": model, "M": m, "seed": seed, "block_size_m": bm,
                   "blocks": blocks, "whole_blocks": int(((full + bm - 1) // bm).sum()),
                   "tail_experts": int(to_tail.sum()), "tail_slots": int(tail.sum()),
                   "tail_tokens": int(idt.shape[0]),
                   "tail_block_size_m": cfgs_t[0]["BLOCK_SIZE_M"],
                   "real_us": t_real, "full_us": t_full, "tail_us": t_tail,
                   "full_plus_tail_us": t_full + t_tail,
                   "saving": 1 - (t_full + t_tail) / t_real}
            records.append(rec)
            print(f"{model} M={m} seed {seed}: BM {bm}, {blocks} blocks, {rec['tail_experts']} "
                  f"experts' remainders ({rec['tail_slots']} slots) to {rec['tail_block_size_m']}"
                  f"-token tiles: real {t_real:.1f} us, whole blocks {t_full:.1f} + tail "
                  f"{t_tail:.1f} = {t_full + t_tail:.1f} ({100 * rec['saving']:+.1f} % saved)",
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "prefill_tail_probe.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "tail": args.tail, "records": records}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
