"""Device A/Bs of the layer's small kernels, per built-in model shape and M, in CUDA graphs
(``time_cuda_graph`` medians, the two versions interleaved twice, the faster of each pair
kept), each pair also checked for identical outputs:

* ``topk_sum``: ``torch.sum`` over the ``[M, top_k, H]`` view (``fused_moe_prefill`` outside
  the deterministic mode before session 12) against the fixed-order Triton ``topk_sum``;
* ``align``: ``align_block_size`` as three kernels (count, scan, scatter) against one
  program (``_align_sort_kernel``, forced), at the BLOCK_SIZE_M the layer uses for that M;
  or, with ``--align-source PATH``, the align module at PATH with its default choice
  against the shipped one program;
* ``router``: the Triton top-k router with session 11's launch (16 rows of 4096 logits a
  program, 4 warps from 2048 logits) against :func:`~w4a16moe.kernels.router.
  rows_per_program` / :func:`~w4a16moe.kernels.router.warps_per_program` (one warp up to
  512 experts); or, with ``--router-source PATH``, the router module at PATH (e.g. an
  earlier version of ``kernels/router.py``) against the shipped one, both with their default
  launch; both also checked against the torch path (same ids, weights within 2e-6).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/layer_small_kernels_ab.py \\
        --kernels topk_sum,align,router --out $OUT

writes ``$OUT/<kernel>_ab.json`` for each.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import best_of_two, write_records  # noqa: E402

from w4a16moe.kernels.align import (  # noqa: E402
    SINGLE_PROGRAM_MAX_SLOTS,
    align_block_size_triton,
)
from w4a16moe.kernels.configs import get_prefill_config  # noqa: E402
from w4a16moe.kernels.prefill import topk_sum  # noqa: E402
from w4a16moe.kernels.router import topk_router  # noqa: E402
from w4a16moe.kernels.tune import MODEL_SHAPES, random_routing  # noqa: E402
from w4a16moe.routing import AlignedBlocks, fused_topk, max_num_tokens_padded  # noqa: E402

DEV = torch.device("cuda")


def topk_sum_case(model: str, shape, m: int):
    """(name A, fn A, name B, fn B, outputs equal?, extra record fields); the other cases
    return the same, or None where they do not apply."""
    h, k = shape.hidden_size, shape.top_k
    per_slot = torch.randn(m * k, h, device=DEV, dtype=torch.bfloat16)
    out_t, out_k = (torch.empty(m, h, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    fn_a = functools.partial(torch.sum, per_slot.view(m, k, h), dim=1, out=out_t)
    fn_b = functools.partial(topk_sum, per_slot, k, out_k)
    fn_a()
    fn_b()
    return "torch.sum", fn_a, "topk_sum", fn_b, torch.equal(out_t, out_k), {}


def align_case(model: str, shape, m: int):
    if m * shape.top_k > SINGLE_PROGRAM_MAX_SLOTS:
        return None
    e = shape.num_experts
    bm = get_prefill_config(m, 2 * shape.intermediate_size, shape.hidden_size, e, shape.top_k,
                            torch.bfloat16, DEV)["BLOCK_SIZE_M"]
    _, ids = random_routing(m, shape, DEV, seed=m)
    size = max_num_tokens_padded(ids.numel(), bm, e)
    scratch = torch.empty(1 << 16, dtype=torch.int32, device=DEV)
    outs, fns = [], []
    for single in (False, True):
        out = AlignedBlocks(torch.empty(size, dtype=torch.int32, device=DEV),
                            torch.empty(size // bm, dtype=torch.int32, device=DEV),
                            torch.empty(1, dtype=torch.int32, device=DEV))
        if single or BASELINE_ALIGN is None:
            fn = functools.partial(align_block_size_triton, ids, bm, e, None, *out,
                                   scratch=scratch, single_program=single)
        else:  # the baseline module's own choice (one program or three kernels)
            fn = functools.partial(BASELINE_ALIGN.align_block_size_triton, ids, bm, e, None,
                                   *out, scratch=scratch)
        fn()
        outs.append(out)
        fns.append(fn)
    same = all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    name_a = "three kernels" if BASELINE_ALIGN is None else "baseline source"
    return name_a, fns[0], "one program", fns[1], same, {"block_size": bm}


#: ``--router-source``: the baseline router module (None: session 11's launch instead)
BASELINE_ROUTER = None
#: ``--align-source``: the baseline align module (None: the shipped three kernels instead)
BASELINE_ALIGN = None


def load_module(path: str, name: str):
    """The module at ``path`` (a kernel file, e.g. ``git show REV:w4a16moe/kernels/align.py``),
    loaded as ``w4a16moe.kernels.<name>`` so that its relative imports (``.pdl``) resolve."""
    import w4a16moe.kernels  # noqa: F401  (the parent package of the loaded module)

    spec = importlib.util.spec_from_file_location(f"w4a16moe.kernels.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def router_case(model: str, shape, m: int):
    e, k = shape.num_experts, shape.top_k
    logits = 3 * torch.randn(m, e, device=DEV)  # float32: bf16 logits tie, and torch.topk
    # breaks ties in its own order
    kw = dict(renormalize=True)  # both models renormalise their top-k weights
    if BASELINE_ROUTER is None:
        block_e = triton.next_power_of_2(e)
        old_rows = max(1, min(16, 4096 // block_e))
        old = dict(rows=old_rows, num_warps=4 if block_e * old_rows >= 2048 else 1)
        fn_a = functools.partial(topk_router, logits, k, **kw, **old)
        name_a, extra = "16 rows (old)", {"old_launch": old}
    else:
        fn_a = functools.partial(BASELINE_ROUTER.topk_router, logits, k, **kw)
        name_a, extra = "baseline source", {}
    fn_b = functools.partial(topk_router, logits, k, **kw)
    ref_w, ref_i = fused_topk(logits, k, backend="torch", **kw)
    results = []
    for name, fn in ((name_a, fn_a), ("shipped", fn_b)):
        w, i = fn()
        if not torch.equal(i, ref_i) or not torch.allclose(w, ref_w, rtol=2e-6, atol=1e-7):
            raise RuntimeError(f"router {name} differs from torch at {model} M={m}")
        results.append((w, i))
    same = all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    return name_a, fn_a, "shipped", fn_b, same, extra


CASES = {"topk_sum": topk_sum_case, "align": align_case, "router": router_case}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default="topk_sum,align,router")
    ap.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,4,8,16,32,64,128,256,1024,4096,8192")
    ap.add_argument("--rep", type=float, default=10.0)
    ap.add_argument("--router-source", default=None,
                    help="router: time this router module (a file) against the shipped one")
    ap.add_argument("--align-source", default=None,
                    help="align: time this align module (a file, its default choice) against "
                         "the shipped one program")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    global BASELINE_ROUTER, BASELINE_ALIGN
    if args.router_source:
        BASELINE_ROUTER = load_module(args.router_source, "baseline_router")
    if args.align_source:
        BASELINE_ALIGN = load_module(args.align_source, "baseline_align")
    for kernel in args.kernels.split(","):
        if kernel not in CASES:
            raise SystemExit(f"--kernels: {kernel!r} is not one of {sorted(CASES)}")
        rows = []
        for model in args.models.split(","):
            shape = MODEL_SHAPES[model]
            for m in map(int, args.tokens.split(",")):
                case = CASES[kernel](model, shape, m)
                if case is None:
                    continue
                name_a, fn_a, name_b, fn_b, same, extra = case
                t_a, t_b = best_of_two(fn_a, fn_b, args.rep)
                rows.append({"model": model, "M": m, "us": {name_a: t_a, name_b: t_b},
                             "same_output": same, **extra})
                print(f"{kernel} {model} M={m}: {name_a} {t_a:.2f} us, {name_b} {t_b:.2f} us"
                      f"{'' if same else ' (outputs differ)'}", flush=True)
        print("wrote", write_records(args.out, f"{kernel}_ab.json", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
