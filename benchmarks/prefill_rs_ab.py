"""Device A/B: RS configs (register-operand Gluon kernel, kernels/prefill_rs.py) for GEMM2
against the configs before them, per GEMM and for the whole prefill layer, plus the bf16
baseline (``torch._grouped_mm`` on dequantized weights) in the same run.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_rs_ab.py --out $OUT

Every variant first runs 3 times into a NaN-poisoned output: it must match the float32
reference of the same dequantized weights (max |diff| / max |ref|) and repeat bit for bit.
Times are medians of CUDA-graph replays (``time_cuda_graph``); baseline and candidate are
timed twice each, interleaved, and the faster of each pair is reported.
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
from w4a16moe.kernels.prefill import (  # noqa: E402
    PrefillWorkspace,
    _fragment_tiles,
    fragment_order_columns,
    fused_moe_prefill,
    prefill_gemm,
)
from w4a16moe.kernels.tune import (  # noqa: E402
    MODEL_SHAPES,
    random_packed_experts,
    random_routing,
    time_cuda_graph,
)
from w4a16moe.routing import align_block_size  # noqa: E402

DEV = torch.device("cuda")

RS128 = {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
         "num_warps": 8, "num_stages": 6, "SWAP_AB": True, "RS": True}
RS256 = {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8,
         "num_warps": 8, "num_stages": 8, "SWAP_AB": True, "RS": True}
#: GEMM2 (shape "N,K" -> table bucket -> (the config before, the RS candidate)); the shipped
#: table took the mixtral candidates (qwen3-235b's GEMM2 gained 0-4 %: not taken)
CANDIDATES = {
    "4096,14336": {
        1024: ({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
                "num_warps": 8, "num_stages": 4, "SWAP_AB": True}, RS128),
        4096: ({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
                "num_warps": 8, "num_stages": 3, "SWAP_AB": False}, RS128),
    },
    "4096,1536": {
        4096: ({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
                "num_warps": 8, "num_stages": 3, "SWAP_AB": False}, RS256),
    },
}


def experts_of(model: str, cache: dict, dtype=torch.bfloat16):
    """(random packed experts of ``model``, their dequantized w13 and w2) on the GPU, kept in
    ``cache`` for the next case of the same model (one model held at a time)."""
    if model not in cache:
        cache.clear()
        torch.cuda.empty_cache()
        ex = random_packed_experts(MODEL_SHAPES[model], dtype, DEV, seed=11)
        cache[model] = (ex, *ex.dequantize(dtype))
    return cache[model]


def reference(x, w13d, w2d, w, ids):
    """float32 reference of the layer on the dequantized weights: GEMM1's output (silu(gate)
    * up, float32), the same rounded to ``x``'s dtype (GEMM2's input), GEMM2's output per
    slot (router weight applied) and the layer output ``[M, H]``."""
    m, k = ids.shape
    i, h = w2d.shape[2], w2d.shape[1]
    e_of = ids.flatten().long()
    xs = x.float().repeat_interleave(k, dim=0)
    inter_ref = torch.empty(m * k, i, device=x.device)
    out2_ref = torch.empty(m * k, h, device=x.device)
    for ex_id in e_of.unique().tolist():
        sel = (e_of == ex_id).nonzero().flatten()
        gu = xs[sel] @ w13d[ex_id].float().t()
        inter_ref[sel] = torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]
    inter_b = inter_ref.to(x.dtype)
    for ex_id in e_of.unique().tolist():
        sel = (e_of == ex_id).nonzero().flatten()
        out2_ref[sel] = ((inter_b[sel].float() @ w2d[ex_id].float().t())
                         * w.flatten()[sel, None].float())
    return inter_ref, inter_b, out2_ref, out2_ref.view(m, k, h).sum(1)


def best_of_two(fn_a, fn_b, rep):
    ta = [time_cuda_graph(fn_a, rep)]
    tb = [time_cuda_graph(fn_b, rep)]
    ta.append(time_cuda_graph(fn_a, rep))
    tb.append(time_cuda_graph(fn_b, rep))
    return min(ta), min(tb)


def kernel_times(run) -> dict[str, list[float]]:
    """GPU time (us) of every kernel that ``run()`` launches, from the torch profiler: kernel
    name -> its launches' times in launch order (``run`` is synchronized after)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = sorted((ev for ev in prof.events()
                     if ev.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda ev: ev.time_range.start)
    per: dict[str, list[float]] = {}
    for ev in events:
        per.setdefault(ev.name, []).append(ev.device_time)
    return per


def write_records(out_dir: str, name: str, records: list, **meta) -> str:
    """``{"device", "torch", **meta, "records"}`` as ``out_dir/name``; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, **meta,
                   "records": records}, f, indent=1)
    return path


def run_cases(run_case, args, name: str) -> int:
    """``run_case(model, M, experts, w13 dequantized, w2 dequantized, args)`` for every
    ``model:M`` of ``args.cases`` (one model's experts held at a time), records written to
    ``args.out/name`` with ``args.gbps``."""
    records: list = []
    cache: dict = {}
    for case in args.cases.split(","):
        model, m = case.split(":")
        records.append(run_case(model, int(m), *experts_of(model, cache), args))
    print("wrote", write_records(args.out, name, records, gbps=args.gbps))
    return 0


def check(fn, out, ref):
    """3 runs into a poisoned ``out``: (max rel. error against ``ref``, repeats identical)."""
    first, same, err = None, True, 0.0
    for _ in range(3):
        out.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        err = max(err, ((out.float() - ref).abs().max() / ref.abs().max()).item())
        if first is None:
            first = out.clone()
        else:
            same = same and torch.equal(out, first)
    return err, same


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="mixtral-8x7b:1024,mixtral-8x7b:2048,"
                    "mixtral-8x7b:4096,qwen3-235b-a22b:4096,qwen3-235b-a22b:8192")
    ap.add_argument("--rep", type=float, default=20.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dtype = torch.bfloat16
    records = []
    cache: dict = {}
    for case in args.cases.split(","):
        model, m = case.split(":")
        m = int(m)
        s = MODEL_SHAPES[model]
        ex, w13d, w2d = experts_of(model, cache, dtype)
        h, i, e, k = s.hidden_size, s.intermediate_size, s.num_experts, s.top_k
        slots = m * k
        x = torch.randn(m, h, device=DEV, dtype=dtype)
        w, ids = random_routing(m, s, DEV, seed=m)
        _inter_ref, inter_b, out2_ref, layer_ref = reference(x, w13d, w2d, w, ids)

        # the candidate pair of the bucket nearest m (ties: the smaller), as the table lookup
        per_bucket = CANDIDATES[f"{h},{i}"]
        old2, new2 = per_bucket[min(per_bucket, key=lambda b: (abs(b - m), b))]
        cfg1 = get_prefill_config(m, 2 * i, h, e, k, dtype, DEV)
        dense = cfg1.pop("DENSE", False)  # the A/B is of the fused layer; dense timed apart
        rec = {"model": model, "M": m, "gemm2_new": new2, "gemm2_old": old2, "gemm1": cfg1}
        # GEMM2 alone (the layer's block size)
        bm = cfg1["BLOCK_SIZE_M"]
        blocks = align_block_size(ids, bm, e)
        out2 = torch.empty(slots, h, device=DEV, dtype=dtype)
        fns = {}
        for name, c in (("old", old2), ("new", new2)):
            c = {**c, "BLOCK_SIZE_M": bm}
            frag = _fragment_tiles(c)
            fns[name] = functools.partial(
                prefill_gemm, fragment_order_columns(inter_b) if frag else inter_b, ex.w2,
                blocks, ids, w, top_k=k, mul_routed_weight=True, a_is_slots=True, out=out2,
                config=c, a_fragment_order=frag)
            rec[f"gemm2_{name}_err"], rec[f"gemm2_{name}_same"] = check(fns[name], out2,
                                                                        out2_ref)
        rec["gemm2_old_us"], rec["gemm2_new_us"] = best_of_two(fns["old"], fns["new"], args.rep)
        # the layer (align + GEMM1 + GEMM2 + top-k sum)
        ws = PrefillWorkspace.allocate(m, ex, k)
        y = torch.empty(m, h, device=DEV, dtype=dtype)
        lfns = {}
        for name, c2 in (("old", old2), ("new", new2)):
            lfns[name] = functools.partial(fused_moe_prefill, x, ex, w, ids, out=y,
                                           workspace=ws, configs=(cfg1, c2))
            rec[f"layer_{name}_err"], rec[f"layer_{name}_same"] = check(lfns[name], y,
                                                                        layer_ref)
        rec["layer_old_us"], rec["layer_new_us"] = best_of_two(lfns["old"], lfns["new"],
                                                               args.rep)
        if dense:
            dfn = functools.partial(fused_moe_prefill, x, ex, w, ids, out=y,
                                    configs=({**cfg1, "DENSE": True}, new2))
            rec["layer_dense_us"] = time_cuda_graph(dfn, args.rep)
        bfn, bname = baseline_fn(m, s, w13d, w2d, ids, dtype)
        rec["bf16_gemms_us"], rec["bf16_variant"] = time_cuda_graph(bfn, args.rep), bname
        records.append(rec)
        print(f"{model} M={m}: GEMM2 {rec['gemm2_old_us']:.1f} -> {rec['gemm2_new_us']:.1f} us"
              f" (err {rec['gemm2_new_err']:.1e}, same {rec['gemm2_new_same']}); layer "
              f"{rec['layer_old_us']:.1f} -> {rec['layer_new_us']:.1f} us (err "
              f"{rec['layer_new_err']:.1e}, same {rec['layer_new_same']}); bf16 GEMMs "
              f"{rec['bf16_gemms_us']:.1f} us"
              + (f"; dense layer {rec['layer_dense_us']:.1f} us" if dense else ""), flush=True)
    print("wrote", write_records(args.out, "prefill_rs_ab.json", records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
