"""Device experiment: the expert-grouped decode kernels (``DecodeConfig.group_rows``) against
the per-slot decode kernels and the prefill kernel, at the token counts where slots start to
share experts.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/decode_grouped.py [--out DIR]
        [--models qwen3-30b-a3b,mixtral-8x7b] [--ms 1,2,4,8,16,32,48,64]

1. Correctness at real shapes (bf16): every grouped variant against ``moe_reference``
   (fp32, intermediate rounded), relative error max|out - ref| / max|ref|.
2. Timing of the whole layer from routed inputs (``fused_moe_decode`` / ``fused_moe_prefill``,
   preallocated workspaces): each timed graph holds 8 layer calls with their own random
   softmax routing, so the weights mostly come from HBM (the layer is 6x the L2 or more),
   median per call (``w4a16moe.bench.timing.time_calls``).
3. The byte floor with the experts the routing touched (distinct experts' int4 words and
   scales + activations), over the measured streaming read rate.

Writes ``decode_grouped.json`` under ``--out`` (default ``$OUT`` or ``.``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace

import torch

from w4a16moe.bench.floors import layer_bytes
from w4a16moe.bench.models import get_shape
from w4a16moe.bench.timing import measure_read_bandwidth, time_calls
from w4a16moe.kernels.decode import (
    DecodeConfig,
    DecodeWorkspace,
    fused_moe_decode,
    pick_config_gemm1,
    pick_config_gemm2,
)
from w4a16moe.kernels.prefill import PrefillWorkspace, fused_moe_prefill
from w4a16moe.kernels.tune import MODEL_SHAPES, random_packed_experts
from w4a16moe.reference import moe_reference

DEV = torch.device("cuda")
ROTATIONS = 8


def routings(m, e, top_k, n, seed):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    out = []
    for _ in range(n):
        logits = torch.randn(m, e, device=DEV, generator=gen)
        w, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
        out.append(((w / w.sum(-1, keepdim=True)).contiguous(), ids.to(torch.int32).contiguous()))
    return out


def layer_call(ex, route, x, out, dws, pws, cfgs):
    """One layer call on ``route``: the prefill kernel when ``cfgs`` is None, else the decode
    kernels with the (GEMM1, GEMM2) configs."""
    w, ids = route
    if cfgs is None:
        return lambda: fused_moe_prefill(x, ex, w, ids, out=out, workspace=pws)
    return lambda: fused_moe_decode(x, ex, w, ids, out=out, workspace=dws,
                                    gemm1_config=cfgs[0], gemm2_config=cfgs[1])


def variants(shape, m, sms):
    """name -> (gemm1 config, gemm2 config) or None for the prefill kernel."""
    c1 = pick_config_gemm1(m, shape.intermediate_size, shape.hidden_size, shape.num_experts,
                           shape.top_k, sms)
    c2 = pick_config_gemm2(m, shape.hidden_size, shape.intermediate_size, shape.num_experts,
                           shape.top_k, sms)
    out = {"per-slot": (replace(c1, group_rows=0), replace(c2, group_rows=0))}
    # (GEMM1 block_n, GEMM2 block_n, block_kw, num_warps): GEMM1 tiles hold 2 * block_n rows
    for r in (2, 4):
        for bn1, bn2, kw, nw in ((8, 16, 32, 1), (16, 32, 32, 2), (32, 64, 32, 4),
                                 (16, 32, 64, 4), (32, 64, 64, 8)):
            out[f"grouped r{r} {bn1}/{bn2}x{kw} w{nw}"] = (
                DecodeConfig(block_n=bn1, block_kw=kw, num_warps=nw, group_rows=r),
                DecodeConfig(block_n=bn2, block_kw=kw, num_warps=nw, group_rows=r))
    out["grouped r2 per-slot tiles"] = (replace(c1, group_rows=2, split_k=1),
                                        replace(c2, group_rows=2, split_k=1))
    out["prefill"] = None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--ms", default="1,2,4,8,16,32,64")
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    bw = measure_read_bandwidth(DEV)[0] * 1e9
    records = []
    print(f"{torch.cuda.get_device_name(DEV)}; streaming read {bw / 1e9:.0f} GB/s", flush=True)
    for name in args.models.split(","):
        shape = MODEL_SHAPES[name]
        ex = random_packed_experts(shape, torch.bfloat16, DEV, seed=1)
        e, k, h = shape.num_experts, shape.top_k, shape.hidden_size
        for m in ms:
            routes = routings(m, e, k, ROTATIONS, seed=m)
            xs = [torch.randn(m, h, device=DEV, dtype=torch.bfloat16) for _ in routes]
            u = sum(int(torch.unique(ids).numel()) for _, ids in routes) / len(routes)
            floor_us = layer_bytes(get_shape(name), m, u=u) / bw * 1e6
            dws = DecodeWorkspace.create(ex, k, m)
            pws = PrefillWorkspace.allocate(m, ex, k)
            outs = [torch.empty(m, h, device=DEV, dtype=torch.bfloat16) for _ in routes]
            # reference on the first routing (touched experts only: moe_reference loops)
            w0, ids0 = routes[0]
            ref = moe_reference(xs[0], ex, w0, ids0, compute_dtype=torch.float32,
                                round_intermediate=True).float()
            for vname, cfgs in variants(shape, m, sms).items():
                calls = [layer_call(ex, r, x, y, dws, pws, cfgs)
                         for r, x, y in zip(routes, xs, outs, strict=True)]
                outs[0].fill_(float("nan"))
                calls[0]()
                torch.cuda.synchronize()
                err = ((outs[0].float() - ref).abs().max() / ref.abs().max()).item()
                t = time_calls(calls, DEV, target_ms=150).median_us
                rec = dict(model=name, m=m, variant=vname, us=t, floor_us=floor_us,
                           x_floor=t / floor_us, rel_err=err, distinct_experts=u,
                           gemm1_config=asdict(cfgs[0]) if cfgs else None,
                           gemm2_config=asdict(cfgs[1]) if cfgs else None)
                records.append(rec)
                print(f"{name:14s} M={m:3d} {vname:26s} {t:8.1f} us  floor {floor_us:7.1f}  "
                      f"x{t / floor_us:5.2f}  err {err:.1e}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_grouped.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(DEV), read_gbps=bw / 1e9,
                       torch=torch.__version__, records=records), f, indent=1)
    print("\nbest per (model, M):")
    best = {}
    for r in records:
        key = (r["model"], r["m"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for (name, m), r in best.items():
        base = next(x for x in records if x["model"] == name and x["m"] == m
                    and x["variant"] == "per-slot")
        print(f"{name:14s} M={m:3d} best {r['variant']:20s} {r['us']:8.1f} us "
              f"(per-slot {base['us']:8.1f}, x floor {r['x_floor']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
