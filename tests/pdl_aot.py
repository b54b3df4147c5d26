"""Ahead-of-time compilation (sm_90, no GPU) of the kernels that take part in programmatic
dependent launch, to check where their ``griddepcontrol`` instructions sit in the PTX.

``pdl_reports()`` compiles, in a child process without ``TRITON_INTERPRET`` (the test
session's interpreter leaves the language patched), the router, the decode GEMM1 and the
prefill chain's one-program alignment, row gather and top-k sum with ``PDL`` on and off, and
returns for each the PTX line numbers of the first ``griddepcontrol.wait``, the first
``griddepcontrol.launch_dependents`` and the first global memory access (``ld.global``,
``st.global``, ``cp.async``, ``atom``, ``red``), or None where there is none.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile


def _first(pattern: str, lines: list[str]) -> int | None:
    rx = re.compile(pattern)
    return next((n for n, line in enumerate(lines) if rx.search(line)), None)


def _report(ptx: str) -> dict:
    lines = ptx.splitlines()
    return {"wait": _first(r"griddepcontrol\.wait", lines),
            "launch_dependents": _first(r"griddepcontrol\.launch_dependents", lines),
            "first_global_access": _first(
                r"\b(ld\.global|st\.global|cp\.async\.(ca|cg)|atom\.|red\.)", lines)}


def _compile(fn, pointers: dict, constexprs: dict, num_warps: int) -> str:
    import triton
    from aot import kernel_signature
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = kernel_signature(fn, constexprs, pointers, scalars={"scaling": "fp32"})
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps))
    return kernel.asm["ptx"]


def _reports() -> dict:
    from w4a16moe.kernels.align import _align_sort_kernel
    from w4a16moe.kernels.decode import _decode_gemm1_kernel
    from w4a16moe.kernels.prefill import _gather_sorted_rows_kernel, _topk_sum_kernel
    from w4a16moe.kernels.router import _topk_router_kernel

    out = {}
    for pdl in (False, True):
        gemm1 = dict(GROUP_SIZE=128, HAS_ZEROS=False, HAS_PERM=False, HAS_EMAP=False,
                     WEIGHT_ON_INPUT=False, ACTIVATION=0, BLOCK_N=8, BLOCK_KW=32, SPLIT_K=1,
                     KW_PER_SPLIT=256, PREFETCH=1, EVEN_N=True, EVEN_K=True, STAGES=1,
                     PDL=pdl)
        ptrs = {n: "*bf16" for n in ("x_ptr", "s_ptr", "out_ptr")}
        ptrs.update({n: "*i32" for n in ("qw_ptr", "z_ptr", "perm_ptr", "ids_ptr", "emap_ptr",
                                         "cnt_ptr")})
        ptrs.update(tw_ptr="*fp32", acc_ptr="*fp32")
        out[f"gemm1_pdl={pdl}"] = _report(_compile(_decode_gemm1_kernel, ptrs, gemm1, 2))
        router = dict(TOP_K=8, TOP_K_P2=8, BLOCK_E=128, ROWS=1, SCORING=0, HAS_BIAS=False,
                      RENORMALIZE=True, PDL=pdl, BITONIC=True)
        ptrs = dict(logits_ptr="*fp32", bias_ptr="*fp32", weights_ptr="*fp32", ids_ptr="*i32")
        out[f"router_pdl={pdl}"] = _report(_compile(_topk_router_kernel, ptrs, router, 1))
        ptrs = {n: "*i32" for n in ("topk_ids_ptr", "scratch_ptr", "expert_map_ptr",
                                    "sorted_ids_ptr", "expert_ids_ptr", "total_ptr")}
        align = dict(HAS_MAP=False, CHUNK=64, NUM_BINS=16, FILL_BLOCK=1024, TOP_K=0,
                     COUNT_WORDS=0, COUNT_TABLE=False, WORDS_P2=1, EXPERTS_P2=8, PDL=pdl)
        out[f"align_pdl={pdl}"] = _report(_compile(_align_sort_kernel, ptrs, align, 4))
        # the counting rank (up to 64 tokens): loads the token's earlier slots with its own
        counting = dict(align, TOP_K=8, COUNT_WORDS=1)
        out[f"align_count_pdl={pdl}"] = _report(_compile(_align_sort_kernel, ptrs, counting, 4))
        # ... and reads the count words back as one table
        table = dict(counting, CHUNK=512, COUNT_WORDS=8, COUNT_TABLE=True, WORDS_P2=8)
        out[f"align_table_pdl={pdl}"] = _report(_compile(_align_sort_kernel, ptrs, table, 4))
        gather = dict(A_IS_SLOTS=False, BLOCK_ROWS=16, BLOCK_K=512, PDL=pdl)
        ptrs = dict(a_ptr="*bf16", sorted_ids_ptr="*i32", num_post_padded_ptr="*i32",
                    out_ptr="*bf16")
        out[f"gather_pdl={pdl}"] = _report(_compile(_gather_sorted_rows_kernel, ptrs, gather,
                                                    4))
        topk_sum = dict(TOP_K=8, SPLITS=1, BLOCK_N=1024, PDL=pdl, counts_ptr=None,
                        ZERO_COUNTS=False)
        ptrs = dict(c_ptr="*bf16", out_ptr="*bf16")
        out[f"topk_sum_pdl={pdl}"] = _report(_compile(_topk_sum_kernel, ptrs, topk_sum, 4))
        # ... that also zeroes GEMM2's per-block counts (GEMM2_WAITS_PER_BLOCK)
        zeroing = {k: v for k, v in topk_sum.items() if k != "counts_ptr"}
        out[f"topk_sum_zeroing_pdl={pdl}"] = _report(_compile(
            _topk_sum_kernel, dict(ptrs, counts_ptr="*i32"), dict(zeroing, ZERO_COUNTS=True),
            4))
    return out


def pdl_reports() -> dict:
    """:func:`_reports` computed in a child process without ``TRITON_INTERPRET``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        run = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True,
                             text=True, env=env, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"pdl_aot.py failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout)


if __name__ == "__main__":
    json.dump(_reports(), sys.stdout)
