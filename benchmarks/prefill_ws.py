"""Device experiment: the warp-specialised Gluon prefill kernel (``WS`` configs,
kernels/prefill_ws.py) against the shipped Triton configs and the bf16 baseline
(``torch._grouped_mm`` on dequantized weights), GEMM1 (fused SiLU*up) and GEMM2 timed
separately under CUDA graphs.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_ws.py --out $OUT

Correctness first: every variant runs ``--repeats`` times into a NaN-poisoned output and is
compared with the float32 product of the same dequantized weights (max |diff| / max |ref|)
and with its own first run (bit for bit: a race shows up as repeats that differ).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_tune import baseline_fn  # noqa: E402

from w4a16moe.kernels.configs import get_prefill_config  # noqa: E402
from w4a16moe.kernels.prefill import fragment_order_columns, prefill_gemm  # noqa: E402
from w4a16moe.kernels.tune import (  # noqa: E402
    MODEL_SHAPES,
    random_packed_experts,
    random_routing,
    time_cuda_graph,
)
from w4a16moe.routing import align_block_size  # noqa: E402

DEV = torch.device("cuda")


def cfg(bm, bn, bk, stages, **extra):
    return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 8,
            "num_warps": 4, "num_stages": stages, "SWAP_AB": True, "WS": True} | extra


#: large M (compute-bound): two consumer warpgroups share each weight tile over 256 tokens
LARGE_GEMM1 = {
    "ws 256 w8 s4 w2": cfg(256, 64, 64, 4, W_STAGES=2, MAXNREG=168, num_warps=8,
                           PRODUCER_REGS=104),
    "ws 128 s6 w2": cfg(128, 64, 64, 6, W_STAGES=2, MAXNREG=168),
}
LARGE_GEMM2 = {
    "ws 256 w8 s4 w2": cfg(256, 128, 64, 4, W_STAGES=2, MAXNREG=168, num_warps=8,
                           PRODUCER_REGS=104),
    "ws 128 s6 w3": cfg(128, 128, 64, 6, W_STAGES=3, MAXNREG=168),
}
#: mid M (weight streaming): few tokens per expert, deep copy rings, two programs per SM
MID = {"W_STAGES": 2, "PRODUCER_REGS": 88, "MAXNREG": 128}
MID_GEMM1 = {
    "ws 16 s8": cfg(16, 64, 64, 8, **MID, PROGRAMS_PER_SM=2),
    "ws 16 s8 np": cfg(16, 64, 64, 8, **MID, PERSISTENT=False),
    "ws 32 s8": cfg(32, 64, 64, 8, **MID, PROGRAMS_PER_SM=2),
    "ws 16x64x128 s4": cfg(16, 64, 128, 4, **MID, PROGRAMS_PER_SM=2),
    "ws 64 s6": cfg(64, 64, 64, 6, **MID, PROGRAMS_PER_SM=2),
}
MID_GEMM2 = {
    "ws 16 s8": cfg(16, 128, 64, 8, **MID, PROGRAMS_PER_SM=2),
    "ws 16 s8 np": cfg(16, 128, 64, 8, **MID, PERSISTENT=False),
    "ws 32 s8": cfg(32, 128, 64, 8, **MID, PROGRAMS_PER_SM=2),
    "ws 16x128x128 s4": cfg(16, 128, 128, 4, **MID, PROGRAMS_PER_SM=2),
    "ws 64 s6": cfg(64, 128, 64, 6, **MID, PROGRAMS_PER_SM=2),
}


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def reference(x, w13d, w2d, ids, weights, top_k, inter_size):
    """float32 GEMM1 (silu*up per slot) and GEMM2 (per slot, router weight applied)."""
    m = x.shape[0]
    e_of = ids.flatten().long()
    xs = x.float().repeat_interleave(top_k, dim=0)
    inter = torch.empty(m * top_k, inter_size, device=x.device, dtype=torch.float32)
    out2 = torch.empty(m * top_k, w2d.shape[1], device=x.device, dtype=torch.float32)
    for e in e_of.unique().tolist():
        sel = (e_of == e).nonzero().flatten()
        gu = xs[sel] @ w13d[e].float().t()
        inter[sel] = torch.nn.functional.silu(gu[:, :inter_size]) * gu[:, inter_size:]
    inter_b = inter.to(x.dtype).float()
    for e in e_of.unique().tolist():
        sel = (e_of == e).nonzero().flatten()
        out2[sel] = (inter_b[sel] @ w2d[e].float().t()) * weights.flatten()[sel, None].float()
    return inter, out2


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--tokens", default="4096,1024")
    ap.add_argument("--rep", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dtype = torch.bfloat16
    records = []
    for model in args.models.split(","):
        s = MODEL_SHAPES[model]
        ex = random_packed_experts(s, dtype, DEV, seed=11)
        w13d, w2d = ex.dequantize(torch.bfloat16)
        h, i = s.hidden_size, s.intermediate_size
        for m in (int(t) for t in args.tokens.split(",")):
            slots = m * s.top_k
            fl1 = 2.0 * slots * 2 * i * h
            fl2 = 2.0 * slots * h * i
            x = torch.randn(m, h, device=DEV, dtype=dtype)
            x_frag = fragment_order_columns(x)
            w, ids = random_routing(m, s, DEV, seed=m)
            ref1, ref2 = reference(x, w13d, w2d, ids, w, s.top_k, i)
            bfn, bname = baseline_fn(m, s, w13d, w2d, ids, dtype)
            t_base = time_cuda_graph(bfn, args.rep)
            print(f"{model} M={m}: bf16 GEMM1+GEMM2 ({bname}) {t_base:.1f} us "
                  f"({(fl1 + fl2) / t_base / 1e6:.0f} TFLOP/s)", flush=True)
            records.append({"model": model, "M": m, "gemm": "bf16", "variant": bname,
                            "us": t_base, "tflops": (fl1 + fl2) / t_base / 1e6})
            t1 = get_prefill_config(m, 2 * i, h, s.num_experts, s.top_k, dtype, DEV)
            t2 = get_prefill_config(m, h, i, s.num_experts, s.top_k, dtype, DEV)
            t1.pop("DENSE", None)
            t2.pop("DENSE", None)
            blocks = {}
            inter = torch.empty(slots, i, device=DEV, dtype=dtype)
            out2 = torch.empty(slots, h, device=DEV, dtype=dtype)
            inter_in = ref1.to(dtype)
            inter_in_frag = fragment_order_columns(inter_in)
            g1, g2 = (MID_GEMM1, MID_GEMM2) if m <= 512 else (LARGE_GEMM1, LARGE_GEMM2)
            for gemm, variants, fl in (("gemm1", {"table": t1, **g1, "table again": None}, fl1),
                                       ("gemm2", {"table": t2, **g2, "table again": None}, fl2)):
                for name, c in variants.items():
                    c = c if c is not None else variants["table"]
                    bm = c["BLOCK_SIZE_M"]
                    if bm not in blocks:
                        blocks[bm] = align_block_size(ids, bm, s.num_experts)
                    frag = bool(c.get("FRAG_K")) and not c.get("WS")
                    if gemm == "gemm1":
                        dst, ref = inter, ref1
                        fn = functools.partial(prefill_gemm, x_frag if frag else x, ex.w13,
                                               blocks[bm], ids, w, top_k=s.top_k,
                                               activation="silu", out=inter, config=c,
                                               a_fragment_order=frag)
                    else:
                        dst, ref = out2, ref2
                        fn = functools.partial(prefill_gemm,
                                               inter_in_frag if frag else inter_in, ex.w2,
                                               blocks[bm], ids, w, top_k=s.top_k,
                                               mul_routed_weight=True, a_is_slots=True,
                                               out=out2, config=c, a_fragment_order=frag)
                    rec = {"model": model, "M": m, "gemm": gemm, "variant": name, "config": c}
                    try:
                        first = None
                        diffs, same = [], True
                        for _ in range(args.repeats):
                            dst.fill_(float("nan"))
                            fn()
                            torch.cuda.synchronize()
                            diffs.append(rel_diff(dst, ref))
                            if first is None:
                                first = dst.clone()
                            else:
                                same = same and torch.equal(dst, first)
                        rec["rel_err"] = max(diffs)
                        rec["repeats_identical"] = same
                        rec["us"] = time_cuda_graph(fn, args.rep)
                        rec["tflops"] = fl / rec["us"] / 1e6
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    records.append(rec)
                    nan = float("nan")
                    print(f"  {gemm} {name:22s} {rec.get('us', nan):8.1f} us "
                          f"{rec.get('tflops', 0):5.0f} TF/s err {rec.get('rel_err', nan):.1e}"
                          f" same {rec.get('repeats_identical')} {rec.get('error', '')}",
                          flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "prefill_ws.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "records": records}, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
