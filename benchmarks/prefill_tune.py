"""Device script for the prefill kernel: correctness at real shapes, timing against a bf16
baseline, a config sweep, and (``--tune``) filling the GPU's config JSON.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_tune.py --check --bench \
        --sweep --out $OUT
    PYTHONPATH=. python3 benchmarks/prefill_tune.py --tune qwen3-30b-a3b,... --out $OUT
    PYTHONPATH=. python3 benchmarks/prefill_tune.py --align --thresholds all \
        --threshold-sweep qwen3-30b-a3b,mixtral-8x7b --dequant-gmm qwen3-30b-a3b,mixtral-8x7b \
        --deadline 230 --out $OUT

Everything is timed under CUDA graphs (median of replays). Weights of these shapes exceed the
50 MB L2 several times over, so one copy is enough (no rotation). FLOPs of one layer:
``2 * M * top_k * (2I*H + H*I)``; the bf16 baseline is ``torch._grouped_mm`` (or per-expert
matmuls) on dequantized weights with the tokens already sorted by expert.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

from w4a16moe.kernels.configs import get_prefill_config
from w4a16moe.kernels.prefill import (
    PrefillWorkspace,
    _group_mode,
    _weight_tile,
    fused_moe_prefill,
    prefill_gemm,
)
from w4a16moe.kernels.tune import (
    DEFAULT_THRESHOLD_CANDIDATES,
    MODEL_SHAPES,
    measure_decode_threshold,
    random_packed_experts,
    random_routing,
    select_threshold,
    threshold_costs,
    time_cuda_graph,
    tune_prefill,
    write_thresholds,
)
from w4a16moe.layout import PackedWeights
from w4a16moe.reference import moe_reference
from w4a16moe.routing import AlignedBlocks, align_block_size, max_num_tokens_padded

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: denser token counts for the "best fixed threshold" sweep (contains the default ones)
DENSE_CANDIDATES = tuple(sorted(set(DEFAULT_THRESHOLD_CANDIDATES)
                                | {3, 6, 12, 20, 28, 40, 56, 80, 112, 160, 192}))

#: (SWAP_AB, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, DEQUANT) tried at the largest M (the
#: first sweep's list is in notes_prefill.md; this is the follow-up around its winners)
SWEEP = [
    (True, 128, 64, 64, 4, 5, 2), (True, 128, 64, 128, 4, 3, 2), (False, 128, 64, 64, 4, 4, 2),
    (False, 128, 128, 64, 8, 4, 2),
]

def flops(m: int, s) -> float:
    return 2.0 * m * s.top_k * (3 * s.intermediate_size * s.hidden_size)


def with_options(pw: PackedWeights, zeros: bool, perm: bool, seed: int) -> PackedWeights:
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    e, n, k = pw.num_experts, pw.n, pw.k
    z = torch.randint(0, 16, (e, n, k // pw.group_size), dtype=torch.uint8, device=DEV,
                      generator=g) if zeros else None
    p = torch.stack([torch.randperm(k, device=DEV, generator=g) for _ in range(e)]).int() \
        if perm else None
    return PackedWeights(pw.qweight, pw.scales, z, p, pw.group_size, pw.name)


def check(results: dict) -> None:
    cases = [("qwen3-30b-a3b", torch.bfloat16, 256, {}),
             ("qwen3-30b-a3b", torch.float16, 333, {"zeros": True, "perm": True}),
             ("qwen3-30b-a3b", torch.bfloat16, 100, {"on_input": True, "emap": True,
                                                     "act": "gelu"}),
             ("qwen3-30b-a3b", torch.bfloat16, 4096, {}),
             ("mixtral-8x7b", torch.bfloat16, 200, {}),
             ("mixtral-8x7b", torch.float16, 77, {"zeros": True, "act": "gelu_tanh"}),
             ("qwen3-30b-a3b", torch.bfloat16, 300, {"zeros": True, "perm": True, "g": 32}),
             ("qwen3-30b-a3b", torch.float16, 50, {"g": 64})]
    out = []
    for name, dtype, m, opt in cases:
        s = MODEL_SHAPES[name]
        if "g" in opt:
            s = dataclasses.replace(s, group_size=opt["g"])
        ex = random_packed_experts(s, dtype, DEV, seed=m)
        if opt.get("zeros") or opt.get("perm"):
            ex.w13 = with_options(ex.w13, opt.get("zeros", False), opt.get("perm", False), 1)
            ex.w2 = with_options(ex.w2, opt.get("zeros", False), opt.get("perm", False), 2)
        x = torch.randn(m, s.hidden_size, device=DEV, dtype=dtype)
        w, ids = random_routing(m, s, DEV, seed=m + 1)
        emap = None
        if opt.get("emap"):
            e = s.num_experts
            emap = torch.full((e,), -1, dtype=torch.int32, device=DEV)
            keep = torch.arange(0, e, 2, device=DEV)
            emap[keep] = torch.arange(keep.numel(), device=DEV, dtype=torch.int32)
            ex = ex.select_experts(keep)
        act = opt.get("act", "silu")
        y = torch.full((m, s.hidden_size), float("nan"), device=DEV, dtype=dtype)
        fused_moe_prefill(x, ex, w, ids, activation=act, expert_map=emap,
                          apply_router_weight_on_input=opt.get("on_input", False), out=y)
        torch.cuda.synchronize()
        ref = moe_reference(x, ex, w, ids, activation=act, expert_map=emap,
                            apply_router_weight_on_input=opt.get("on_input", False),
                            round_intermediate=True)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        ok = bool(torch.isfinite(y).all()) and err < tol
        out.append({"model": name, "dtype": str(dtype), "M": m, "opt": opt, "rel_err": err,
                    "ok": ok})
        print(f"check {name} {dtype} M={m} {opt}: rel_err={err:.2e} {'OK' if ok else 'FAIL'}",
              flush=True)
        del ex, ref
        torch.cuda.empty_cache()
    results["check"] = out


def baseline_fn(m: int, s, w13d, w2d, ids, dtype):
    """bf16 GEMM1 + GEMM2 on dequantized weights, tokens pre-sorted by expert."""
    slots = m * s.top_k
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    xs = torch.randn(slots, s.hidden_size, device=DEV, dtype=dtype)
    inter = torch.randn(slots, s.intermediate_size, device=DEV, dtype=dtype)
    counts = torch.bincount(flat, minlength=s.num_experts)
    offs = counts.cumsum(0).to(torch.int32)
    w13t, w2t = w13d.transpose(1, 2), w2d.transpose(1, 2)
    if hasattr(torch, "_grouped_mm"):
        try:
            def fn():
                torch._grouped_mm(xs, w13t, offs=offs)
                torch._grouped_mm(inter, w2t, offs=offs)
            fn()
            torch.cuda.synchronize()
            return fn, "torch._grouped_mm"
        except Exception as exc:  # noqa: BLE001 - fall back to per-expert matmuls
            print(f"_grouped_mm unavailable: {exc}", flush=True)
    bounds = [0] + offs.tolist()
    del order

    def fn():
        for e in range(s.num_experts):
            a, b = bounds[e], bounds[e + 1]
            if b > a:
                torch.mm(xs[a:b], w13t[e])
                torch.mm(inter[a:b], w2t[e])
    return fn, "per-expert torch.mm"


def bench(results: dict, models: list[str], tokens: list[int], sweep: bool, rep: float) -> None:
    rows = []
    for name in models:
        s = MODEL_SHAPES[name]
        dtype = torch.bfloat16
        ex = random_packed_experts(s, dtype, DEV, seed=7)
        w13d, w2d = (t.to(dtype) for t in ex.dequantize(torch.bfloat16))
        for m in tokens:
            x = torch.randn(m, s.hidden_size, device=DEV, dtype=dtype)
            w, ids = random_routing(m, s, DEV, seed=m)
            fl = flops(m, s)
            bfn, bname = baseline_fn(m, s, w13d, w2d, ids, dtype)
            t_base = time_cuda_graph(bfn, rep)
            cfg1 = get_prefill_config(m, 2 * s.intermediate_size, s.hidden_size,
                                      s.num_experts, s.top_k, dtype, DEV)
            cfg2 = get_prefill_config(m, s.hidden_size, s.intermediate_size, s.num_experts,
                                      s.top_k, dtype, DEV)
            variants = [("default", cfg1, cfg2)]
            if sweep and m == max(tokens):
                for swap, bm, bn, bk, wp, st, dq in SWEEP:
                    c = {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk,
                         "GROUP_SIZE_M": 8, "num_warps": wp, "num_stages": st,
                         "SWAP_AB": swap, "DEQUANT": dq}
                    variants.append((f"sw{int(swap)} {bm}x{bn}x{bk} w{wp} s{st} d{dq}", c, c))
            best = None
            for vname, c1, c2 in variants:
                c2 = {**c2, "BLOCK_SIZE_M": c1["BLOCK_SIZE_M"]}
                blocks = align_block_size(ids, c1["BLOCK_SIZE_M"], s.num_experts)
                inter = torch.empty(m * s.top_k, s.intermediate_size, device=DEV, dtype=dtype)
                c2o = torch.empty(m * s.top_k, s.hidden_size, device=DEV, dtype=dtype)

                g1 = functools.partial(prefill_gemm, x, ex.w13, blocks, ids, w, top_k=s.top_k,
                                       activation="silu", out=inter, config=c1)
                g2 = functools.partial(prefill_gemm, inter, ex.w2, blocks, ids, w,
                                       top_k=s.top_k, mul_routed_weight=True, a_is_slots=True,
                                       out=c2o, config=c2)
                try:
                    g1()
                    g2()
                    t1 = time_cuda_graph(g1, rep)
                    t2 = time_cuda_graph(g2, rep)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    print(f"{name} M={m} {vname}: failed: {str(exc)[:200]}", flush=True)
                    continue
                row = {"model": name, "M": m, "variant": vname, "gemm1_us": t1, "gemm2_us": t2,
                       "total_us": t1 + t2, "tflops": fl / (t1 + t2) / 1e6,
                       "baseline": bname, "baseline_us": t_base,
                       "baseline_tflops": fl / t_base / 1e6, "cfg1": c1, "cfg2": c2}
                rows.append(row)
                print(f"{name:15s} M={m:5d} {vname:28s} g1={t1:8.1f} g2={t2:8.1f} "
                      f"sum={t1 + t2:8.1f}us {row['tflops']:6.1f}TF | bf16 {t_base:8.1f}us "
                      f"{row['baseline_tflops']:6.1f}TF", flush=True)
                if best is None or t1 + t2 < best[0]:
                    best = (t1 + t2, c1, c2)
            y = torch.empty(m, s.hidden_size, device=DEV, dtype=dtype)
            t_layer = time_cuda_graph(functools.partial(fused_moe_prefill, x, ex, w, ids, out=y),
                                      rep)
            t_align = time_cuda_graph(functools.partial(
                align_block_size, ids, cfg1["BLOCK_SIZE_M"], s.num_experts), rep)
            print(f"{name} M={m} full layer with default configs (align + GEMM1 + GEMM2 + "
                  f"top-k sum): {t_layer:.1f} us; align_block_size alone {t_align:.1f} us",
                  flush=True)
            rows.append({"model": name, "M": m, "variant": "layer default",
                         "total_us": t_layer, "align_us": t_align})
            if best is not None and sweep and m == max(tokens):
                # the best GEMM1 and GEMM2 configs of the best BLOCK_SIZE_M, then the layer
                swept = [r for r in rows if r["model"] == name and r["M"] == m and "cfg1" in r]
                bm = best[1]["BLOCK_SIZE_M"]
                g1 = min((r for r in swept if r["cfg1"]["BLOCK_SIZE_M"] == bm),
                         key=lambda r: r["gemm1_us"])
                g2 = min((r for r in swept if r["cfg1"]["BLOCK_SIZE_M"] == bm),
                         key=lambda r: r["gemm2_us"])
                best = (g1["gemm1_us"] + g2["gemm2_us"], g1["cfg1"], g2["cfg2"])
                print(f"{name} M={m} best pair: g1 {g1['variant']} {g1['gemm1_us']:.1f} + g2 "
                      f"{g2['variant']} {g2['gemm2_us']:.1f} = {best[0]:.1f} us "
                      f"{fl / best[0] / 1e6:.1f} TF", flush=True)
                rows.append({"model": name, "M": m, "variant": "best pair", "cfg1": best[1],
                             "cfg2": best[2], "total_us": best[0]})
                # (atomic_topk_sum=True measured 1.6x / 1.06x slower at M=4096 in the
                # first sweeps: not repeated)
                for atomic in (False,):
                    t = time_cuda_graph(functools.partial(
                        fused_moe_prefill, x, ex, w, ids, out=y, configs=(best[1], best[2]),
                        atomic_topk_sum=atomic), rep)
                    print(f"{name} M={m} full layer (align+g1+g2+sum) atomic={atomic}: "
                          f"{t:.1f} us", flush=True)
                    rows.append({"model": name, "M": m, "variant": f"layer atomic={atomic}",
                                 "total_us": t})
        del ex, w13d, w2d
        torch.cuda.empty_cache()
    results["bench"] = rows


# --------------------------------------------------------------------------------------------
# align_block_size: Triton against torch
# --------------------------------------------------------------------------------------------
def align_bench(results: dict, rep: float, variants: bool = False) -> None:
    """Equality of the Triton and torch align_block_size and their CUDA-graph times."""
    from w4a16moe.kernels.align import scratch_numel

    cases = [(128, 8, 64, 16), (128, 8, 256, 64), (128, 8, 1024, 128), (128, 8, 4096, 128),
             (8, 2, 256, 64), (8, 2, 4096, 128), (256, 8, 4096, 128), (128, 8, 16384, 128),
             (512, 8, 8192, 64)]
    rows = []
    for e, top_k, m, bs in cases:
        gen = torch.Generator(device=DEV)
        gen.manual_seed(m + e)
        logits = torch.randn(m, e, device=DEV, generator=gen)
        ids = logits.topk(top_k, dim=-1).indices.to(torch.int32)
        emap = None
        if e == 256:      # expert-parallel half: odd experts remote
            emap = torch.where(torch.arange(e, device=DEV) % 2 == 0,
                               torch.arange(e, device=DEV) // 2, -1).to(torch.int32)
        tri = align_block_size(ids, bs, e, emap, backend="triton")
        ref = align_block_size(ids, bs, e, emap, backend="torch")
        ok = all(torch.equal(a, b) for a, b in zip(tri, ref, strict=True))
        slots = m * top_k
        n = max_num_tokens_padded(slots, bs, e)
        out = AlignedBlocks(torch.empty(n, dtype=torch.int32, device=DEV),
                            torch.empty(n // bs, dtype=torch.int32, device=DEV),
                            torch.empty(1, dtype=torch.int32, device=DEV))
        scratch = torch.empty(scratch_numel(slots, e), dtype=torch.int32, device=DEV)
        t_tri = time_cuda_graph(functools.partial(align_block_size, ids, bs, e, emap, out=out,
                                                  scratch=scratch, backend="triton"), rep)
        t_tri_alloc = time_cuda_graph(functools.partial(align_block_size, ids, bs, e, emap,
                                                        backend="triton"), rep)
        t_torch = time_cuda_graph(functools.partial(align_block_size, ids, bs, e, emap,
                                                    backend="torch"), rep)
        row = {"E": e, "top_k": top_k, "M": m, "block": bs, "expert_map": emap is not None,
               "equal": ok, "triton_us": t_tri, "triton_alloc_us": t_tri_alloc,
               "torch_us": t_torch}
        rows.append(row)
        print(f"align E={e:3d} top_k={top_k} M={m:5d} bs={bs:3d} map={emap is not None}: "
              f"equal={ok} triton {t_tri:6.1f} us (allocating {t_tri_alloc:6.1f}) | torch "
              f"{t_torch:6.1f} us", flush=True)
        if variants and m >= 4096:   # variants: chunk size and scan tile rows
            from w4a16moe.kernels.align import align_block_size_triton

            found = {}
            for chunk in (64, 128, 256, 512):
                for rows_ in (None, max(2, 16384 // max(16, 1 << (e - 1).bit_length()))):
                    sc = torch.empty(scratch_numel(slots, e, chunk), dtype=torch.int32,
                                     device=DEV)
                    fn = functools.partial(align_block_size_triton, ids, bs, e, emap, *out,
                                           scratch=sc, chunk=chunk, scan_rows=rows_)
                    fn()
                    same = all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
                    found[f"chunk{chunk}/rows{rows_}"] = (time_cuda_graph(fn, rep), same)
            row["variants"] = found
            print("   variants: " + ", ".join(f"{k} {t:.1f}{'' if ok_ else ' WRONG'}"
                                            for k, (t, ok_) in found.items()), flush=True)
    results["align"] = rows


# --------------------------------------------------------------------------------------------
# decode/prefill thresholds
# --------------------------------------------------------------------------------------------
def thresholds(results: dict, models: list[str], dense: list[str], rep: float, out_dir: str,
               deadline: float, t0: float) -> None:
    """Measure the threshold of each model (dense candidates for ``dense``), write the
    thresholds JSON into ``out_dir`` and, for the dense ones, compare the threshold chosen
    from the default candidates with the best fixed threshold over the dense grid."""
    from w4a16moe.experts import threshold_key
    from w4a16moe.kernels.configs import device_config_filename

    path = os.path.join(out_dir, device_config_filename().removesuffix(".json")
                        + "_thresholds.json")
    rows = results.setdefault("thresholds", [])
    for name in models:
        if time.time() - t0 > deadline:
            print(f"thresholds: deadline reached before {name}", flush=True)
            break
        s = MODEL_SHAPES[name]
        cands = DENSE_CANDIDATES if name in dense else DEFAULT_THRESHOLD_CANDIDATES
        t1 = time.time()
        try:
            r = measure_decode_threshold(s.num_experts, s.top_k, s.hidden_size,
                                         s.intermediate_size, s.group_size, candidates=cands,
                                         rep_ms=rep)
        except Exception as exc:  # noqa: BLE001 - record and go on
            print(f"thresholds {name}: failed: {type(exc).__name__}: {str(exc)[:300]}",
                  flush=True)
            rows.append({"model": name, "error": str(exc)[:500]})
            continue
        torch.cuda.empty_cache()
        key = threshold_key(s.num_experts, s.hidden_size, s.intermediate_size, s.top_k,
                            s.group_size)
        row = {"model": name, "key": key, "threshold": r.threshold, "M": list(r.candidates),
               "decode_us": list(r.decode_us), "prefill_us": list(r.prefill_us),
               "mixed_us": list(r.mixed_us), "gemm1_threshold": r.gemm1_threshold,
               "seconds": time.time() - t1}
        # the decode range's time: the faster of decode and mixed (where mixed ran)
        low = ([min(d, x) for d, x in zip(r.decode_us, r.mixed_us, strict=True)]
               if r.mixed_us else list(r.decode_us))
        for j, (m, td, tp) in enumerate(zip(r.candidates, r.decode_us, r.prefill_us,
                                            strict=True)):
            tx = f"  mixed {r.mixed_us[j]:8.1f} us" if r.mixed_us else ""
            print(f"  {name} M={m:4d}: decode {td:8.1f} us{tx}  prefill {tp:8.1f} us "
                  f"{'<- decode range' if low[j] <= tp else ''}", flush=True)
        if name in dense:
            sub = [i for i, m in enumerate(r.candidates) if m in DEFAULT_THRESHOLD_CANDIDATES]
            sparse_t = select_threshold([r.candidates[i] for i in sub],
                                        [low[i] for i in sub],
                                        [r.prefill_us[i] for i in sub])
            costs = threshold_costs(r.candidates, low, r.prefill_us)
            best_t = min(costs, key=lambda t: (costs[t], t))
            row.update({"threshold_default_candidates": sparse_t, "best_fixed": best_t,
                        "cost_chosen": costs[r.threshold],
                        "cost_default_candidates": costs[sparse_t],
                        "cost_best_fixed": costs[best_t]})
            print(f"{name}: chosen (dense) {r.threshold} cost {costs[r.threshold]:.4f}; "
                  f"from default candidates {sparse_t} cost {costs[sparse_t]:.4f}; best fixed "
                  f"{best_t} cost {costs[best_t]:.4f}", flush=True)
        print(f"thresholds {name}: decode up to M={r.threshold} ({row['seconds']:.0f} s)",
              flush=True)
        rows.append(row)
        timings = {key: {"model": name, "M": list(r.candidates),
                         "decode_us": [round(t, 2) for t in r.decode_us],
                         "prefill_us": [round(t, 2) for t in r.prefill_us]}}
        old = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f).get("_meta", {}).get("timings", {})
        write_thresholds(path, {key: r.threshold}, {
            "device": torch.cuda.get_device_name(), "triton": triton.__version__,
            "torch": torch.__version__, "dtype": "bfloat16", "timings": {**old, **timings},
            "note": "value: largest M that runs the decode kernel (last measured M before "
                    "prefill first wins); layer times per call under CUDA graphs, random "
                    "softmax routing rotated over 8 calls; benchmarks/prefill_tune.py "
                    "--thresholds"})
    print(f"wrote {path}", flush=True)


# --------------------------------------------------------------------------------------------
# dequantize to bf16 + torch._grouped_mm (measurement for the largest M)
# --------------------------------------------------------------------------------------------
@triton.jit
def _dequant_dense_kernel(qw_ptr, s_ptr, out_ptr, N, K,
                          stride_qe, stride_qn, stride_qk, stride_se, stride_sn, stride_sg,
                          stride_oe, stride_on, stride_ok,
                          GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DEQUANT: tl.constexpr, IS_FP16: tl.constexpr):
    """out[e, n, k] = dequantized weight (symmetric, no perm); grid (N/BN, K/BK, E)."""
    e = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    k_start = tl.program_id(1) * BLOCK_K
    s_pc = tl.zeros((BLOCK_N, 1), dtype=s_ptr.dtype.element_ty)
    z_pc = tl.full((1, 1), 8, tl.int32)
    w = _weight_tile(qw_ptr + e * stride_qe, s_ptr + e * stride_se, s_ptr, rows, n_mask,
                     k_start, K, stride_qn, stride_qk, stride_sn, stride_sg, 0, 0, s_pc, z_pc,
                     GROUP_SIZE, GROUP_MODE, False, True, BLOCK_K, DEQUANT, IS_FP16)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + e * stride_oe + rows[:, None] * stride_on + offs_k[None, :] * stride_ok,
             w, mask=n_mask[:, None])


def dequant_dense(pw: PackedWeights, out: torch.Tensor, block_n: int = 64,
                  block_k: int = 128) -> torch.Tensor:
    """Dequantize symmetric, unpermuted weights into ``out [E, N, K]`` (scales' dtype)."""
    if pw.zeros is not None or pw.perm is not None or pw.k % block_k:
        raise ValueError("dequant_dense: symmetric, unpermuted weights with K % BLOCK_K == 0 "
                         "only")
    q, s = pw.qweight, pw.scales
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (triton.cdiv(pw.n, block_n), pw.k // block_k, pw.num_experts)
    _dequant_dense_kernel[grid](
        q, s, out, pw.n, pw.k, q.stride(0), q.stride(1), q.stride(2), s.stride(0), s.stride(1),
        s.stride(2), out.stride(0), out.stride(1), out.stride(2),
        GROUP_SIZE=pw.group_size, GROUP_MODE=_group_mode(pw.group_size, pw.k, block_k),
        BLOCK_N=block_n, BLOCK_K=block_k, DEQUANT=1 if interpreted else 2,
        IS_FP16=s.dtype == torch.float16, num_warps=4)
    return out


def dequant_gmm(results: dict, models: list[str], m: int, rep: float) -> None:
    """Same run: fused GEMM1+GEMM2 (table configs) vs dequantize-to-bf16 + _grouped_mm."""
    rows = []
    for name in models:
        s = MODEL_SHAPES[name]
        dtype = torch.bfloat16
        ex = random_packed_experts(s, dtype, DEV, seed=3)
        w13d = torch.empty(s.num_experts, 2 * s.intermediate_size, s.hidden_size,
                           device=DEV, dtype=dtype)
        w2d = torch.empty(s.num_experts, s.hidden_size, s.intermediate_size, device=DEV,
                          dtype=dtype)
        dequant_dense(ex.w13, w13d)
        dequant_dense(ex.w2, w2d)
        ref0 = ex.w13.select_experts(slice(0, 1)).dequantize(torch.float32)[0]
        ok = torch.equal(w13d[0].float(), ref0.to(dtype).float())
        def dq(ex=ex, a=w13d, b=w2d):
            dequant_dense(ex.w13, a)
            dequant_dense(ex.w2, b)

        t_dq = time_cuda_graph(dq, rep)
        w, ids = random_routing(m, s, DEV, seed=m)
        bfn, bname = baseline_fn(m, s, w13d, w2d, ids, dtype)
        t_base = time_cuda_graph(bfn, rep)
        x = torch.randn(m, s.hidden_size, device=DEV, dtype=dtype)
        cfg1 = get_prefill_config(m, 2 * s.intermediate_size, s.hidden_size, s.num_experts,
                                  s.top_k, dtype, DEV)
        cfg2 = {**get_prefill_config(m, s.hidden_size, s.intermediate_size, s.num_experts,
                                     s.top_k, dtype, DEV), "BLOCK_SIZE_M": cfg1["BLOCK_SIZE_M"]}
        blocks = align_block_size(ids, cfg1["BLOCK_SIZE_M"], s.num_experts)
        inter = torch.empty(m * s.top_k, s.intermediate_size, device=DEV, dtype=dtype)
        c2o = torch.empty(m * s.top_k, s.hidden_size, device=DEV, dtype=dtype)
        g1 = functools.partial(prefill_gemm, x, ex.w13, blocks, ids, w, top_k=s.top_k,
                               activation="silu", out=inter, config=cfg1)
        g2 = functools.partial(prefill_gemm, inter, ex.w2, blocks, ids, w, top_k=s.top_k,
                               mul_routed_weight=True, a_is_slots=True, out=c2o, config=cfg2)
        g1()
        g2()
        t1 = time_cuda_graph(g1, rep)
        t2 = time_cuda_graph(g2, rep)
        row = {"model": name, "M": m, "dequant_ok": ok, "dequant_us": t_dq,
               "baseline": bname, "grouped_mm_us": t_base, "fused_gemm1_us": t1,
               "fused_gemm2_us": t2, "dequant_plus_gmm_us": t_dq + t_base}
        rows.append(row)
        print(f"{name} M={m}: fused g1+g2 {t1:.0f}+{t2:.0f}={t1 + t2:.0f} us | dequant "
              f"{t_dq:.0f} us (ok={ok}) + {bname} {t_base:.0f} us = {t_dq + t_base:.0f} us",
              flush=True)
        del ex, w13d, w2d
        torch.cuda.empty_cache()
    results["dequant_gmm"] = rows


def layer_bench(results: dict, m_list: list[int], rep: float) -> None:
    """qwen3 layer (align + GEMM1 + GEMM2 + sum) with and without a workspace."""
    s = MODEL_SHAPES["qwen3-30b-a3b"]
    ex = random_packed_experts(s, torch.bfloat16, DEV, seed=5)
    rows = []
    for m in m_list:
        x = torch.randn(m, s.hidden_size, device=DEV, dtype=torch.bfloat16)
        w, ids = random_routing(m, s, DEV, seed=m)
        y = torch.empty_like(x)
        ws = PrefillWorkspace.allocate(m, ex, s.top_k)
        fused_moe_prefill(x, ex, w, ids, out=y, workspace=ws)
        ref = moe_reference(x, ex, w, ids, round_intermediate=True)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        t_ws = time_cuda_graph(functools.partial(fused_moe_prefill, x, ex, w, ids, out=y,
                                                 workspace=ws), rep)
        t_plain = time_cuda_graph(functools.partial(fused_moe_prefill, x, ex, w, ids, out=y),
                                  rep)
        rows.append({"M": m, "rel_err": err, "layer_workspace_us": t_ws,
                     "layer_us": t_plain})
        print(f"qwen3 layer M={m}: rel_err {err:.2e}; with workspace {t_ws:.1f} us, without "
              f"{t_plain:.1f} us", flush=True)
    results["layer"] = rows


def dense_layer_bench(results: dict, models: list[str], m_list: list[int], rep: float) -> None:
    """fused_moe_prefill with the table configs against the same call forced onto the dense
    path (dequantize + torch._grouped_mm), both checked against moe_reference."""
    rows = []
    for name in models:
        s = MODEL_SHAPES[name]
        dtype = torch.bfloat16
        ex = random_packed_experts(s, dtype, DEV, seed=9)
        for m in m_list:
            x = torch.randn(m, s.hidden_size, device=DEV, dtype=dtype)
            w, ids = random_routing(m, s, DEV, seed=m + 3)
            cfg1 = get_prefill_config(m, 2 * s.intermediate_size, s.hidden_size,
                                      s.num_experts, s.top_k, dtype, DEV)
            cfg2 = get_prefill_config(m, s.hidden_size, s.intermediate_size, s.num_experts,
                                      s.top_k, dtype, DEV)
            ws = PrefillWorkspace.allocate(m, ex, s.top_k, dense=True)
            ref = moe_reference(x, ex, w, ids, round_intermediate=True)
            res = {}
            for label, c1 in (("fused", {**cfg1, "DENSE": False}),
                              ("dense", {**cfg1, "DENSE": True})):
                y = torch.empty_like(x)
                fn = functools.partial(fused_moe_prefill, x, ex, w, ids, out=y,
                                       workspace=ws, configs=(c1, cfg2))
                fn()
                torch.cuda.synchronize()
                err = ((y.float() - ref).norm() / ref.norm()).item()
                res[label] = (time_cuda_graph(fn, rep), err)
            del ref
            row = {"model": name, "M": m, "fused_us": res["fused"][0],
                   "fused_rel_err": res["fused"][1], "dense_us": res["dense"][0],
                   "dense_rel_err": res["dense"][1]}
            rows.append(row)
            print(f"{name} M={m}: layer fused {res['fused'][0]:.0f} us (err "
                  f"{res['fused'][1]:.1e}) | dense {res['dense'][0]:.0f} us (err "
                  f"{res['dense'][1]:.1e})", flush=True)
            del ws
            torch.cuda.empty_cache()
        del ex
        torch.cuda.empty_cache()
    results["dense_layer"] = rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--tokens", default="256,1024,4096")
    ap.add_argument("--tune", default="")
    ap.add_argument("--space", default="quick")
    ap.add_argument("--rep", type=float, default=10.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--align", action="store_true")
    ap.add_argument("--align-variants", action="store_true")
    ap.add_argument("--thresholds", default="", help="models, or 'all'")
    ap.add_argument("--threshold-sweep", default="", help="models timed on the dense grid")
    ap.add_argument("--dequant-gmm", default="", help="models: dequant + _grouped_mm at M")
    ap.add_argument("--dequant-m", type=int, default=4096)
    ap.add_argument("--layer", default="", help="qwen3 layer with/without workspace at M,...")
    ap.add_argument("--dense", default="", help="models: layer fused vs dense path")
    ap.add_argument("--dense-m", default="2048,4096")
    ap.add_argument("--deadline", type=float, default=1e9,
                    help="seconds after which remaining sections are skipped")
    args = ap.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    t0 = time.time()
    tokens = [int(t) for t in args.tokens.split(",")]
    def save() -> None:
        results["elapsed_s"] = time.time() - t0
        with open(os.path.join(args.out, "prefill_results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)

    def live() -> bool:
        return time.time() - t0 < args.deadline

    try:
        if args.align:
            align_bench(results, args.rep, args.align_variants)
            save()
        if args.thresholds and live():
            names = list(MODEL_SHAPES) if args.thresholds == "all" else \
                args.thresholds.split(",")
            dense = [n for n in args.threshold_sweep.split(",") if n]
            thresholds(results, names, dense, args.rep, args.out, args.deadline, t0)
            save()
        if args.dequant_gmm and live():
            dequant_gmm(results, args.dequant_gmm.split(","), args.dequant_m, args.rep)
            save()
        if args.dense and live():
            dense_layer_bench(results, args.dense.split(","),
                              [int(v) for v in args.dense_m.split(",")], args.rep)
            save()
        if args.layer and live():
            layer_bench(results, [int(v) for v in args.layer.split(",")], args.rep)
            save()
        if args.check:
            check(results)
        if args.bench:
            bench(results, args.models.split(","), tokens, args.sweep, args.rep)
        if args.tune:
            from w4a16moe.kernels.configs import device_config_filename

            path = os.path.join(args.out, device_config_filename())
            last = [0.0]

            def step(done, total, desc):
                if time.time() - last[0] > 10:
                    last[0] = time.time()
                    print(f"[{done}/{total}] {desc}", flush=True)
            tune_prefill(args.tune.split(","), tokens, space=args.space, out=path,
                         rep_ms=args.rep, on_step=step)
            print(f"wrote {path}", flush=True)
    finally:
        save()
    fails = [c for c in results.get("check", []) if not c["ok"]]
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
