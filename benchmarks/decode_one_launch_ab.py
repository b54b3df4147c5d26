"""A/B: the decode layer as two kernels (``fused_moe_decode``) against one launch
(``w4a16moe.kernels.decode_layer``), under CUDA graphs with cold L2, in one process.

    PYTHONPATH=. python benchmarks/decode_one_launch_ab.py --out DIR
        [--cases qwen3-30b-a3b:1,qwen3-30b-a3b:2,...] [--variants BN1,BKW1,BN2,BKW2,WARPS,PF ...]
        [--rounds 3]

Each graph holds R launches whose routing cycles through disjoint expert sets (as
``decode_tune.py``), so every launch reads weights that left L2 long ago. Per case: the
baseline's layer graph time per launch and each variant's, taken alternately ``--rounds``
times (median of 20 replays each round, then the median over rounds); the variant's output
(NaN-poisoned first) against the baseline's and against the float32 reference; the
compiled kernel's registers and spills. The intermediate buffer is NaN-poisoned before
every checked launch, so a launch whose GEMM2 programs do not wait fails the check.
``WAIT_MODE`` 2 (no wait) is racy and for timing only: it shows what the wait costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import triton
from decode_tune import MODELS, STREAM_BW, distinct, gemm_bytes, make_experts, routing, time_graph

from w4a16moe.kernels.decode import DecodeWorkspace, fused_moe_decode
from w4a16moe.kernels.decode_layer import _decode_layer_kernel, fused_moe_decode_one_launch
from w4a16moe.reference import moe_reference


def parse_variant(text):
    f = [int(v) for v in text.split(",")]
    if not 6 <= len(f) <= 8:
        raise argparse.ArgumentTypeError(
            f"variant {text!r}: expected BN1,BKW1,BN2,BKW2,WARPS,PF[,WAIT_MODE[,SLEEP_NS]]")
    v = dict(block_n1=f[0], block_kw1=f[1], block_n2=f[2], block_kw2=f[3], num_warps=f[4],
             prefetch_l2=bool(f[5]))
    if len(f) > 6:
        v["wait_mode"] = f[6]
    if len(f) > 7:
        v["sleep_ns"] = f[7]
    return v


def compiled_info():
    out = []
    for caches in getattr(_decode_layer_kernel, "device_caches", {}).values():
        for k in caches[0].values():
            out.append(dict(n_regs=getattr(k, "n_regs", None),
                            n_spills=getattr(k, "n_spills", None)))
    return out


def clear_after_racy(variant, ws):
    """The racy no-wait variant can leave ``ready`` counters set: clear the workspace."""
    if variant.get("wait_mode") == 2:
        torch.cuda.synchronize()
        for t in (ws.cnt1, ws.cnt2, ws.acc2):
            t.zero_()


def run_case(name, m, variants, rounds, device):
    p = MODELS[name]
    E, top_k, H, I, G = p["E"], p["top_k"], p["H"], p["I"], p["G"]
    dtype = torch.bfloat16
    ex = make_experts(E, H, I, G, dtype, device, seed=3)
    per_launch = min(m * top_k, E)
    R = max(-(-E // per_launch), 4, int(-(-400e6 // (per_launch * ex.nbytes / E))))
    routes = [routing(m, top_k, E, r, device) for r in range(R)]
    u = sum(distinct(ids) for _, ids in routes) / R
    floor = (gemm_bytes(u, 2 * I, H, G, m, H, m * top_k, I)
             + gemm_bytes(u, H, I, G, m * top_k, I, m, H)) / STREAM_BW * 1e6
    x = torch.randn(m, H, dtype=dtype, device=device)
    ws = DecodeWorkspace.create(ex, top_k=top_k, max_tokens=m)
    out = torch.empty(m, H, dtype=dtype, device=device)

    def base_fns():
        return [(lambda w=w, ids=ids: fused_moe_decode(x, ex, w, ids, out=out, workspace=ws))
                for w, ids in routes]

    def var_fns(v):
        return [(lambda w=w, ids=ids: fused_moe_decode_one_launch(x, ex, w, ids, out=out,
                                                                  workspace=ws, **v))
                for w, ids in routes]

    w0, ids0 = routes[0]
    out.fill_(float("nan"))
    fused_moe_decode(x, ex, w0, ids0, out=out, workspace=ws)
    base_out = out.float().clone()
    used = torch.unique(ids0)
    remap = torch.full((E,), -1, dtype=torch.int32, device=device)
    remap[used] = torch.arange(used.numel(), dtype=torch.int32, device=device)
    ref = moe_reference(x, ex.select_experts(used), w0, remap[ids0.long()],
                        compute_dtype=torch.float32, round_intermediate=True)
    base_err = ((base_out - ref).abs().max() / ref.abs().max()).item()
    recs = []
    for v in variants:
        out.fill_(float("nan"))
        ws.inter.fill_(float("nan"))  # a launch that does not wait would read these
        fused_moe_decode_one_launch(x, ex, w0, ids0, out=out, workspace=ws, **v)
        torch.cuda.synchronize()
        got = out.float()
        clear_after_racy(v, ws)
        recs.append(dict(variant={k: (int(val) if isinstance(val, bool) else val)
                                  for k, val in v.items()},
                         rel_err_vs_ref=((got - ref).abs().max() / ref.abs().max()).item(),
                         rel_diff_vs_base=((got - base_out).abs().max()
                                           / base_out.abs().max()).item(),
                         finite=bool(torch.isfinite(got).all()), graph_us=[]))
    clean = all(int(torch.count_nonzero(t)) == 0 for t in (ws.acc2, ws.cnt2, ws.cnt1))
    base_t = []
    fns_b = base_fns()
    fns_v = [var_fns(v) for v in variants]
    for _ in range(rounds):
        base_t.append(time_graph(fns_b, 20, profile=False)[0])
        for rec, fns in zip(recs, fns_v, strict=True):
            rec["graph_us"].append(time_graph(fns, 20, profile=False)[0])
            clear_after_racy(rec["variant"], ws)
    base_us = statistics.median(base_t)
    # correctness again after all the replays (graph replays with other routings)
    for rec, v in zip(recs, variants, strict=True):
        out.fill_(float("nan"))
        ws.inter.fill_(float("nan"))
        fused_moe_decode_one_launch(x, ex, w0, ids0, out=out, workspace=ws, **v)
        torch.cuda.synchronize()
        clear_after_racy(v, ws)
        rec["rel_diff_vs_base_after"] = ((out.float() - base_out).abs().max()
                                         / base_out.abs().max()).item()
        rec["us"] = statistics.median(rec["graph_us"])
        rec["vs_base"] = rec["us"] / base_us
        rec["x_floor"] = rec["us"] / floor
    clean_after = all(int(torch.count_nonzero(t)) == 0 for t in (ws.acc2, ws.cnt2, ws.cnt1))
    case = dict(model=name, m=m, launches_per_graph=R, distinct_experts=u, floor_us=floor,
                base_us=base_us, base_rounds=base_t, base_x_floor=base_us / floor,
                base_rel_err_vs_ref=base_err, workspace_clean=clean and clean_after,
                variants=recs, compiled=compiled_info())
    print(f"{name} M={m}: base {base_us:.2f} us ({base_us / floor:.2f}x floor {floor:.2f})",
          flush=True)
    for rec in recs:
        print(f"   {rec['variant']}: {rec['us']:.2f} us ({rec['vs_base']:.3f}x base, "
              f"{rec['x_floor']:.2f}x floor) err {rec['rel_err_vs_ref']:.2e} "
              f"diff {rec['rel_diff_vs_base']:.2e}/{rec['rel_diff_vs_base_after']:.2e}",
              flush=True)
    return case


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cases", default="qwen3-30b-a3b:1,qwen3-30b-a3b:2,qwen3-30b-a3b:4,"
                                       "qwen3-30b-a3b:8")
    ap.add_argument("--variants", nargs="*", type=parse_variant,
                    default=[parse_variant(v) for v in ("8,32,64,32,2,1", "8,32,64,32,2,0")])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    res = dict(gpu=props.name, torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d"), cases=[])
    for c in args.cases.split(","):
        name, m = c.split(":")
        res["cases"].append(run_case(name, int(m), args.variants, args.rounds, device))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode_one_launch_ab{args.tag}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
