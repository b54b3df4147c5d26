"""A/B: a MoE layer (router + experts) with and without programmatic dependent launch
(``w4a16moe.kernels.pdl``), under CUDA graphs with cold L2, in one process.

    PYTHONPATH=. python benchmarks/layer_pdl_ab.py --out DIR [--cases model:M,...]
        [--rounds 5] [--tag _x] [--path decode|prefill]

``--path decode`` (default): router + ``fused_moe_decode``, PDL on or off as a whole (the
router releases GEMM1, launched as its dependent). ``--path prefill``: router +
``fused_moe_prefill``, the prefill chain's PDL (``pdl.PREFILL``: alignment, row gather,
GEMM1, GEMM2, top-k sum each a dependent of the kernel before) on or off; the chain is only
used up to ``pdl.PREFILL_MAX_TOKENS`` tokens, so larger cases time the same launches twice
unless ``--prefill-max-tokens`` raises that limit for the run.

Per case, one graph per version holds R layer calls (``fused_topk`` on random logits, then
the experts); each call draws its own logits, so consecutive calls mostly touch
other experts, and R is large enough that >= 400 MB of weights pass between two uses of a
call's weights. The two graphs are replayed alternately (``--rounds`` x 20 replays, median
per round, median over rounds). Outputs are NaN-poisoned and compared with each other and
with the float32 reference (intermediate rounded) on the first call's routing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import triton
from decode_tune import H100_STREAM_BW, MODELS, distinct, gemm_bytes, make_experts, time_graph

from w4a16moe.kernels import pdl
from w4a16moe.kernels.decode import DecodeWorkspace, fused_moe_decode
from w4a16moe.kernels.prefill import PrefillWorkspace, fused_moe_prefill
from w4a16moe.reference import moe_reference
from w4a16moe.routing import fused_topk


def run_case(name, m, rounds, device, path="decode"):
    p = MODELS[name]
    E, top_k, H, I, G = p["E"], p["top_k"], p["H"], p["I"], p["G"]
    dtype = torch.bfloat16
    ex = make_experts(E, H, I, G, dtype, device, seed=3)
    per_launch = min(m * top_k, E)
    R = max(4, int(-(-400e6 // (per_launch * ex.nbytes / E))))
    gen = torch.Generator(device=device)
    gen.manual_seed(7)
    logits = [torch.randn(m, E, device=device, generator=gen) for _ in range(R)]
    xs = [torch.randn(m, H, device=device, generator=gen).to(dtype) for _ in range(R)]
    ids_all = [fused_topk(lg, top_k)[1] for lg in logits]
    u = sum(distinct(ids) for ids in ids_all) / R
    floor = (gemm_bytes(u, 2 * I, H, G, m, H, m * top_k, I)
             + gemm_bytes(u, H, I, G, m * top_k, I, m, H)) / H100_STREAM_BW * 1e6
    ws = DecodeWorkspace.create(ex, top_k=top_k, max_tokens=m)
    pws = PrefillWorkspace.allocate(m, ex, top_k)
    out = torch.empty(m, H, dtype=dtype, device=device)

    def layer(r):
        w, ids = fused_topk(logits[r], top_k)
        if path == "decode":
            fused_moe_decode(xs[r], ex, w, ids, out=out, workspace=ws)
        else:
            fused_moe_prefill(xs[r], ex, w, ids, out=out, workspace=pws)

    def setting(on):
        if path == "decode":
            pdl.ENABLED = on
        else:
            pdl.PREFILL = on

    fns = [lambda r=r: layer(r) for r in range(R)]
    w0, ids0 = fused_topk(logits[0], top_k)
    used = torch.unique(ids0)
    remap = torch.full((E,), -1, dtype=torch.int32, device=device)
    remap[used] = torch.arange(used.numel(), dtype=torch.int32, device=device)
    ref = moe_reference(xs[0], ex.select_experts(used), w0, remap[ids0.long()],
                        compute_dtype=torch.float32, round_intermediate=True)
    outs, times = {}, {True: [], False: []}
    for on in (False, True):
        setting(on)
        out.fill_(float("nan"))
        ws.inter.fill_(float("nan"))
        fns[0]()
        torch.cuda.synchronize()
        outs[on] = out.float().clone()
    for _ in range(rounds):
        for on in (False, True):
            setting(on)
            times[on].append(time_graph(fns, 20, profile=False)[0])
    pdl.ENABLED = pdl.PREFILL = True
    base, cand = statistics.median(times[False]), statistics.median(times[True])
    err = {on: ((outs[on] - ref).abs().max() / ref.abs().max()).item() for on in outs}
    diff = ((outs[True] - outs[False]).abs().max() / outs[False].abs().max()).item()
    clean = all(int(torch.count_nonzero(t)) == 0 for t in (ws.acc1, ws.acc2, ws.cnt1, ws.cnt2))
    rec = dict(model=name, m=m, path=path, launches_per_graph=R, distinct_experts=u, floor_us=floor,
               off_us=base, on_us=cand, off_rounds=times[False], on_rounds=times[True],
               change=cand / base - 1, off_x_floor=base / floor, on_x_floor=cand / floor,
               rel_err_off=err[False], rel_err_on=err[True], rel_diff_on_vs_off=diff,
               workspace_clean=clean)
    print(f"{name} M={m} {path}: off {base:.2f} us ({base / floor:.2f}x) on {cand:.2f} us "
          f"({cand / floor:.2f}x) {100 * (cand / base - 1):+.1f}% err {err[False]:.2e}/"
          f"{err[True]:.2e} diff {diff:.1e} clean {clean}", flush=True)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cases", default="qwen3-30b-a3b:1,qwen3-30b-a3b:2,qwen3-30b-a3b:4,"
                                       "qwen3-30b-a3b:8,mixtral-8x7b:1,mixtral-8x7b:2,"
                                       "mixtral-8x7b:4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tag", default="")
    ap.add_argument("--path", choices=("decode", "prefill"), default="decode")
    ap.add_argument("--prefill-max-tokens", type=int, default=None,
                    help="raise pdl.PREFILL_MAX_TOKENS for this run (the chain's A/B at "
                         "larger M)")
    args = ap.parse_args()
    if args.prefill_max_tokens is not None:
        pdl.PREFILL_MAX_TOKENS = args.prefill_max_tokens
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    res = dict(gpu=props.name, torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d"), pdl_supported=pdl.pdl_enabled(device),
               prefill_max_tokens=pdl.PREFILL_MAX_TOKENS,
               cases=[])
    for c in args.cases.split(","):
        name, m = c.split(":")
        res["cases"].append(run_case(name, int(m), args.rounds, device, args.path))
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"layer_pdl_ab{args.tag}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
