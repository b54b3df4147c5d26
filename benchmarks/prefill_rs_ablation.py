"""Device ablation of the Gluon kernel (kernels/prefill_rs.py): which part of a K step bounds
it. Each variant is a patched copy of the kernel's source (written to a temporary file and
imported as a sibling module), run with the same launch as the real one; the outputs of the
ablated variants are wrong by construction and only timed.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_rs_ablation.py --out $OUT

Each variant's output is compared with the shipped kernel's (printed as ``(differs: max
|diff| / max |shipped|)`` unless bit-identical; expected for the ablations). Variants:
``full`` (the kernel as shipped, through the patch path, as a control; ``--source``
adds another version of the kernel file, e.g. the previous commit's, for an A/B),
``no-dequant`` (the words' halves bit-cast into the operand: no shift/LOP3/packed math),
``no-word-loads`` (a constant operand word instead of the shared-memory loads; the loader, its
TMA/cp.async copies and the barriers unchanged), ``no-loader-words`` (the loader skips the
words' copies and their expected bytes; the consumer reads stale shared memory) and
``cp-async`` (the words cp.asynced instead of TMA), ``tma-unswizzled`` (the TMA words without
the bank swizzle). Per case (``model:M``, the table's configs), GEMM1 and GEMM2 in CUDA
graphs, the same variants in one run.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import experts_of, write_records  # noqa: E402

import w4a16moe.kernels.prefill as prefill_mod  # noqa: E402
from w4a16moe.kernels import prefill_rs  # noqa: E402
from w4a16moe.kernels.configs import get_prefill_config  # noqa: E402
from w4a16moe.kernels.tune import MODEL_SHAPES, random_routing, time_cuda_graph  # noqa: E402
from w4a16moe.routing import align_block_size  # noqa: E402

DEV = torch.device("cuda")

#: variant -> [(text in kernels/prefill_rs.py, replacement)]
PATCHES = {
    "full": [],
    "no-dequant": [(
        "        lo, hi = _rs_dequant_pair(words4, shift, ss4, zz4, IS_FP16)\n",
        "        lo = words4.to(gl.int16).to(vdtype, bitcast=True)\n"
        "        hi = (words4 >> 16).to(gl.int16).to(vdtype, bitcast=True)\n")],
    "no-word-loads": [(
        "        words = gl.convert_layout(\n"
        "            gl.reshape(wd_bufs.index(stage).load(words2d_layout), [BLOCK_N, T, 4]),\n"
        "            words_layout, assert_trivial=True)\n",
        "        words = gl.full([BLOCK_N, T, 4], 0x12345678, gl.int32,\n"
        "                        layout=words_layout) + i\n")],
    "no-loader-words": [(
        "                        mbarrier.expect(x_ready_bars.index(stage), BLOCK_N * BLOCK_K // 2)\n"  # noqa: E501
        "                        tma.async_copy_global_to_shared(\n"
        "                            w_desc, [expert, pid_n * (BLOCK_N_OUT // 8), 0, 0, k0 // 8],\n"
        "                            x_ready_bars.index(stage), wd_tma.index(stage))\n",
        "                        mbarrier.arrive(x_ready_bars.index(stage), count=1)\n")],
    "cp-async": [("WEIGHT_TMA = True\n", "WEIGHT_TMA = False\n")],
    "tma-unswizzled": [
        ("            if ROW_BYTES >= 32:\n", "            if ROW_BYTES >= 4096:\n"),
        ("swizzle_byte_width=row_bytes if row_bytes >= 32 else 0,",
         "swizzle_byte_width=0,")],
}


def load_variant(name: str, tmpdir: str, source: str | None = None):
    """The kernel module with ``PATCHES[name]`` applied (or the kernel source file ``source``
    as is), imported as a sibling module."""
    src = open(source or prefill_rs.__file__).read()
    for old, new in ([] if source else PATCHES[name]):
        if src.count(old) != 1:
            raise RuntimeError(f"variant {name}: patch target not found once: {old[:60]!r}")
        src = src.replace(old, new)
    modname = "w4a16moe.kernels._rs_ablation_" + name.replace("-", "_")
    path = os.path.join(tmpdir, modname.rsplit(".", 1)[1] + ".py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(modname, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mixtral-8x7b:16,qwen3-30b-a3b:64")
    ap.add_argument("--variants", default=",".join(PATCHES))
    ap.add_argument("--source", action="append", default=[],
                    help="NAME=PATH: also time another version of kernels/prefill_rs.py (e.g. "
                         "the previous commit's, from git show) under NAME")
    ap.add_argument("--rep", type=float, default=15.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    tmpdir = tempfile.mkdtemp()
    mods = {v: load_variant(v, tmpdir) for v in args.variants.split(",") if v}
    for item in args.source:
        name, _, path = item.partition("=")
        mods[name] = load_variant(name, tmpdir, source=path)
    real_launch = prefill_mod.launch_prefill_rs
    cache: dict = {}
    records = []
    for case in args.cases.split(","):
        model, m = case.split(":")
        m = int(m)
        ex, _, _ = experts_of(model, cache)
        s = MODEL_SHAPES[model]
        h, i, e, k = s.hidden_size, s.intermediate_size, s.num_experts, s.top_k
        x = torch.randn(m, h, device=DEV, dtype=torch.bfloat16)
        inter = torch.randn(m * k, i, device=DEV, dtype=torch.bfloat16)
        w, ids = random_routing(m, s, DEV, seed=m)
        cfgs = (get_prefill_config(m, 2 * i, h, e, k, torch.bfloat16, DEV),
                get_prefill_config(m, h, i, e, k, torch.bfloat16, DEV))
        for which, cfg in enumerate(cfgs):
            if not cfg.get("RS"):
                print(f"{model} M={m} GEMM{which + 1}: table config is not RS, skipped")
                continue
            blocks = align_block_size(ids, cfg["BLOCK_SIZE_M"], e)
            out = torch.empty(m * k, i if which == 0 else h, device=DEV, dtype=torch.bfloat16)
            kw = (dict(a=x, weights=ex.w13, activation="silu") if which == 0 else
                  dict(a=inter, weights=ex.w2, a_is_slots=True, mul_routed_weight=True))
            fn = functools.partial(prefill_mod.prefill_gemm, blocks=blocks, topk_ids=ids,
                                   topk_weights=w, top_k=k, out=out, config=cfg, **kw)
            # each variant's output against the shipped kernel's (``--source`` versions must
            # match bit for bit; the ablated ones differ by construction)
            outs = {}
            for v, mod in mods.items():
                prefill_mod.launch_prefill_rs = mod.launch_prefill_rs
                try:
                    out.fill_(float("nan"))
                    fn()
                    torch.cuda.synchronize()
                    outs[v] = out.clone()
                finally:
                    prefill_mod.launch_prefill_rs = real_launch
            out.fill_(float("nan"))
            fn()
            same = {v: torch.equal(o, out) for v, o in outs.items()}
            scale = out.float().abs().max().item()
            diff = {v: (o.float() - out.float()).abs().max().item() / scale
                    for v, o in outs.items()}
            times = {}
            for _ in range(2):  # two rounds, the faster of each variant's two medians
                for v, mod in mods.items():
                    prefill_mod.launch_prefill_rs = mod.launch_prefill_rs
                    try:
                        t = time_cuda_graph(fn, args.rep)
                    finally:
                        prefill_mod.launch_prefill_rs = real_launch
                    times[v] = min(times.get(v, t), t)
            rec = {"model": model, "M": m, "gemm": which + 1, "config": cfg, "us": times,
                   "same_as_shipped": same, "max_rel_diff": diff}
            records.append(rec)
            print(f"{model} M={m} GEMM{which + 1} {cfg['BLOCK_SIZE_M']}x{cfg['BLOCK_SIZE_N']}x"
                  f"{cfg['BLOCK_SIZE_K']}s{cfg['num_stages']}: "
                  + ", ".join(f"{v} {t:.1f}{'' if same[v] else f' (differs: {diff[v]:.1e})'}"
                              for v, t in times.items()), flush=True)
    print("wrote", write_records(args.out, "prefill_rs_ablation.json", records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
