"""Device probe: what a K split gives GEMM2 on the mma kernel at a few tokens, emulated
through views of the unsplit kernel (session 42, before the kernel had ``SPLIT_K``) and, with
``--real``, the kernel's own ``SPLIT_K`` in each build of ``--real-variants``.

    PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks python3 benchmarks/mma_split_k_probe.py \\
        --model mixtral-8x7b --ms 1 2 --splits 1 2 4 --out $OUT

A split of K into S ranges is the same GEMM over S times the experts, each with a K of K/S:
range ``s`` of expert ``e`` is read as "expert" ``e * N * S + s`` of an ``as_strided`` view of
the packed words and scales (expert stride K/S/8 words, row stride K/8: no copy), the input of
slot ``j`` range ``s`` is row ``j * S + s`` of the intermediate viewed as ``[slots * S, K/S]``
(no copy), and the top-k sum adds the ``top_k * S`` rows of a token. So one launch of the
unchanged kernel runs S times the programs a K split would, each over K/S; the partial sums
are stored in the activations' dtype where a split would store float32 (a few KB at these
sizes). The blocks are made before the graph, over the used ranges only. Timed per routing
(cycling as ``decode_tune.py`` does), the GEMM plus its top-k sum, against the decode
kernel's GEMM2 (its split-K and fused top-k sum), outputs checked against it.
``--sum-alone`` times a top-k sum as a graph of its own, one launch: the time holds the
replay's own cost (some microseconds), so only the two sums' difference says something.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial

import torch
from decode_tune import (
    MODELS,
    ROUTINGS,
    _new_kernels,
    distinct,
    gemm_bytes,
    make_experts,
    time_graph,
)
from small_m_gemm_probe import parse_prefill_config

from w4a16moe.bench.timing import measure_read_bandwidth
from w4a16moe.kernels import prefill_mma
from w4a16moe.kernels.decode import (
    DecodeWorkspace,
    card_sm_read_rate,
    decode_gemm2,
    pick_config_gemm2,
)
from w4a16moe.kernels.prefill import prefill_gemm, topk_sum
from w4a16moe.layout import PACK_FACTOR, PackedWeights
from w4a16moe.routing import AlignedBlocks, align_block_size

DEV = torch.device("cuda")


def split_weights(w: PackedWeights, splits: int) -> PackedWeights:
    """``w`` seen as ``(E - 1) * N * S + S`` experts of K/S: expert ``e * N * S + s`` is the
    K range ``s`` of expert ``e`` (views, no copy)."""
    e, n, kw = w.qweight.shape
    k = kw * PACK_FACTOR
    ks = k // splits
    g = w.group_size
    count = (e - 1) * n * splits + splits
    q = w.qweight.as_strided((count, n, ks // PACK_FACTOR), (ks // PACK_FACTOR, kw, 1))
    ng = k // g
    s = w.scales.as_strided((count, n, ks // g), (ks // g, ng, 1))
    return PackedWeights(qweight=q, scales=s, group_size=g, name=f"{w.name} split {splits}")


def split_routing(ids: torch.Tensor, weights: torch.Tensor, n: int, splits: int, bm: int
                  ) -> tuple[torch.Tensor, torch.Tensor, AlignedBlocks]:
    """The routing of the split layer (``top_k * S`` slots a token) and its aligned blocks
    over the ranges it uses."""
    m, top_k = ids.shape
    s = torch.arange(splits, device=ids.device, dtype=ids.dtype)
    ids_s = (ids.long()[:, :, None] * n * splits + s[None, None, :]).reshape(m, top_k * splits)
    w_s = weights[:, :, None].expand(m, top_k, splits).reshape(m, top_k * splits).contiguous()
    used, compact = torch.unique(ids_s, return_inverse=True)
    blocks = align_block_size(compact.to(torch.int32), bm, used.numel())
    mapped = torch.where(blocks.expert_ids >= 0,
                         used[blocks.expert_ids.clamp(min=0).long()].to(torch.int32),
                         blocks.expert_ids)
    return (ids_s.to(torch.int32), w_s,
            AlignedBlocks(blocks.sorted_token_ids, mapped.contiguous(),
                          blocks.num_tokens_post_padded))


def run_split(a, w, blocks, ids, weights, slots_a_token, part, out, cfg) -> None:
    """GEMM2 of the split layer into ``part``, then the top-k sum of a token's rows."""
    prefill_gemm(a, w, blocks, ids, weights, top_k=slots_a_token, mul_routed_weight=True,
                 a_is_slots=True, out=part, config=cfg)
    topk_sum(part, slots_a_token, out)


def run_real(a, w, blocks, ids, weights, top_k, parts, out, cfg, runtime_steps=True
             ) -> None:
    """GEMM2 with the kernel's ``SPLIT_K`` into float32 partials, then the top-k sum;
    ``runtime_steps``: the kernel's ``SPLIT_RUNTIME_STEPS`` for this launch."""
    prefill_mma.SPLIT_RUNTIME_STEPS = runtime_steps
    prefill_gemm(a, w, blocks, ids, weights, top_k=top_k, mul_routed_weight=True,
                 a_is_slots=True, out=parts, config=cfg)
    topk_sum(parts, top_k, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mixtral-8x7b", choices=sorted(MODELS))
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--g2", nargs="*", default=["16,16,256,1,1,MMA,WORD_RING=3",
                                                "16,16,512,1,1,MMA,WORD_RING=2",
                                                "8,16,256,1,1,MMA", "8,32,256,2,1,MMA"])
    ap.add_argument("--routing", default="random", choices=sorted(ROUTINGS))
    ap.add_argument("--real", action="store_true",
                    help="also time the kernel's own SPLIT_K (float32 partials) on each split")
    ap.add_argument("--real-variants", nargs="*", default=["runtime"],
                    help="builds of SPLIT_K to time: const (the range's steps a compile-time "
                         "count), runtime (counted at run time: SPLIT_RUNTIME_STEPS, the "
                         "default build)")
    ap.add_argument("--sum-alone", action="store_true",
                    help="also time each top-k sum alone (the emulation's and the real one's)")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dtype = torch.bfloat16
    read_gbps, _ = measure_read_bandwidth(DEV)
    print(f"streaming read {read_gbps:.0f} GB/s", flush=True)
    p = MODELS[args.model]
    E, top_k, H, I, G = p["E"], p["top_k"], p["H"], p["I"], p["G"]
    ex = make_experts(E, H, I, G, dtype, DEV, seed=3)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    records, seen = [], set()
    for m in args.ms:
        per_launch = min(m * top_k, E)
        R = max(-(-E // per_launch), 4, int(-(-400e6 // (per_launch * ex.nbytes / E))))
        routes = [ROUTINGS[args.routing](m, top_k, E, r, DEV) for r in range(R)]
        u = sum(distinct(ids) for _, ids in routes) / R
        floor = gemm_bytes(u, H, I, G, m * top_k, I, m, H) / (read_gbps * 1e9) * 1e6
        inter = torch.randn(m * top_k, I, dtype=dtype, device=DEV)
        out = torch.empty(m, H, dtype=dtype, device=DEV)
        ws = DecodeWorkspace.create(ex, top_k=top_k, max_tokens=m)
        d2 = pick_config_gemm2(m, H, I, E, top_k, sms, sm_read_rate=card_sm_read_rate(DEV))
        variants = [("decode", [partial(decode_gemm2, inter, ex.w2, ids, w, out=out,
                                        workspace=ws, config=d2) for w, ids in routes])]
        for splits in args.splits:
            if I % (splits * G):
                continue
            w2s = split_weights(ex.w2, splits)
            a_s = inter.view(m * top_k * splits, I // splits)
            part = torch.empty(m * top_k * splits, H, dtype=dtype, device=DEV)
            for text in args.g2:
                cfg = parse_prefill_config(text)
                if (I // splits) % cfg["BLOCK_SIZE_K"]:
                    continue
                fns = []
                for w, ids in routes:
                    ids_s, w_s, blocks = split_routing(ids, w, H, splits, cfg["BLOCK_SIZE_M"])

                    fns.append(partial(run_split, a_s, w2s, blocks, ids_s, w_s,
                                       top_k * splits, part, out, cfg))
                variants.append((f"split {splits} {text}", fns))
                if splits > 1 and args.real:
                    # the kernel's own SPLIT_K: float32 partials [S, slots, H], then the top-k
                    # sum of each token's slots over the ranges
                    blocks8 = [align_block_size(ids, cfg["BLOCK_SIZE_M"], E) for _, ids in routes]
                    parts = torch.empty(splits, m * top_k, H, dtype=torch.float32, device=DEV)
                    for v in args.real_variants:
                        if v not in ("const", "runtime"):
                            raise SystemExit(f"--real-variants: {v!r}: expected const or "
                                             "runtime")
                        variant = v == "runtime"
                        real = [partial(run_real, inter, ex.w2, b, ids, w, top_k, parts, out,
                                        {**cfg, "SPLIT_K": splits}, variant)
                                for (w, ids), b in zip(routes, blocks8, strict=True)]
                        variants.append((f"SPLIT_K {splits} {text} {v}", real))
                    if args.sum_alone and not any(n.startswith(f"sum alone {splits} ")
                                                  for n, _ in variants):
                        variants.append((f"sum alone {splits} emulated", [partial(
                            topk_sum, part, top_k * splits, out)]))
                        variants.append((f"sum alone {splits} real", [partial(
                            topk_sum, parts, top_k, out)]))
        ref = None
        for name, fns in variants:
            out.fill_(float("nan"))
            try:
                fns[0]()
                torch.cuda.synchronize()
            except Exception as exc:  # a tile the kernel refuses: record why
                print(f"{args.model} M={m} {name}: {type(exc).__name__}: {exc}", flush=True)
                records.append(dict(model=args.model, m=m, name=name, error=str(exc)[:300]))
                continue
            regs = [k["n_regs"] for k in _new_kernels(
                seen, kernels=(prefill_mma._prefill_mma_kernel,))]
            got = out.float()
            if ref is None:
                ref = got.clone()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            us = min(time_graph(fns, args.replays, profile=False)[0] for _ in range(2))
            records.append(dict(model=args.model, m=m, name=name, graph_us=us, floor_us=floor,
                                x_floor=us / floor, rel_diff_vs_decode=err,
                                distinct_experts=u, launches_per_graph=R, registers=regs))
            print(f"{args.model} M={m} GEMM2 {name:>42s} {us:7.2f} us  floor {floor:6.2f}  "
                  f"{us / floor:5.2f}x  rel diff {err:.1e}  regs {regs}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"mma_split_k_probe_{args.model}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(read_gbps=read_gbps, records=records), f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
