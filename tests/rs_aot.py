"""Ahead-of-time compilation of the Gluon prefill kernel for sm_90, no GPU needed.

``ptxas_report(config, ...)`` compiles ``_prefill_rs_kernel`` for one ``RS`` config the way
``launch_prefill_rs`` would launch it (bf16, G=128, words by TMA) with the ptxas that ships
with Triton, and returns what ``ptxas -v`` says about it. ``ptxas_reports(variants)`` does
that for many in a fresh Python process: the test session runs Triton's interpreter
(``TRITON_INTERPRET=1``), which leaves the language patched for compilation once an
interpreted kernel has run. The check that matters: ptxas
prints ``C7512 ... wgmma.mma_async instructions are serialized due to insufficient register
resources`` when it cannot keep a wgmma in flight while the next step is dequantized, and then
waits for every wgmma to finish (128-token x 256-row tiles with BLOCK_SIZE_K 64 did: session
11 of benchmarks/notes_prefill.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch
from aot import kernel_signature, run_in_child

from w4a16moe.kernels import prefill_rs
from w4a16moe.kernels.configs import quarter_block_rows, scale_acc_wgmmas, short_block_rows


def _signature(fn, constexprs: dict, tensor_descs: dict, c_type: str = "*bf16"
               ) -> tuple[dict, dict]:
    pointers = {"a_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8",
                "c_ptr": c_type, "topk_weights_ptr": "*fp32", "sorted_ids_ptr": "*i32",
                "expert_ids_ptr": "*i32", "num_post_padded_ptr": "*i32",
                "sk_partials_ptr": "*fp32", "sk_counters_ptr": "*i32", **tensor_descs}
    return kernel_signature(
        fn, constexprs, pointers,
        divisible=lambda name: name.startswith("stride") or name in ("N", "K", "EM"))


def unguarded_shared_writes(ptx: str) -> list[int]:
    """Lines of ``ptx`` that write shared memory (``st.shared``, ``stmatrix``: the epilogue's
    layout-conversion scratch) with no ``bar.sync`` before them in their basic block. Once
    the waits' barriers are stripped (``w4a16moe.kernels.membar``) each such write must
    still follow a barrier that every consumer warp passes on the way to it, or warps of the
    next tile could overwrite scratch that others still read; one in the same block, with
    no label in between, is passed on every path to the write. (Writes to a fixed
    ``global_smem`` address, the prologue's, are not counted.)"""
    bad, guarded = [], False
    for n, line in enumerate(ptx.splitlines()):
        op = line.strip()
        if op.startswith("$L__BB") and op.split("//")[0].rstrip().endswith(":"):
            guarded = False
        elif op.startswith(("bar.sync", "barrier.sync")):
            guarded = True
        elif op.startswith(("st.shared", "stmatrix")) or " st.shared" in op:
            # stores to a fixed address of global_smem: the warp-specialization state the
            # prologue writes once before any partition starts
            if not guarded and "[global_smem+" not in op:
                bad.append(n)
    return bad


def ptxas_report(config: dict, *, activation: bool, a_sorted: bool = False,
                 out_sorted: bool = False, mul_routed_weight: bool = False) -> dict:
    """``config`` compiled for sm_90a the way the launcher compiles it (through the hook of
    ``w4a16moe.kernels.membar`` that strips the waits' barriers): ``{"ptxas": what ptxas -v
    says, "stripped": the barriers the hook removed, "left": wait barriers still in the PTX,
    "unguarded": unguarded_shared_writes(ptx)}`` (see the module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource

    from w4a16moe.kernels.membar import strip_wait_barriers, stripped_wait_barriers

    bt, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    fn = prefill_rs._prefill_rs_kernel
    constexprs = dict(
        GROUP_SIZE=128, A_IS_SLOTS=not activation, MUL_ROUTED_WEIGHT=mul_routed_weight,
        HAS_ZEROS=False, SCALE_PAIRS=False, ACTIVATION=1 if activation else 0, OUT_FRAG=False,
        A_SORTED=a_sorted, C_SORTED=out_sorted, IS_FP16=False, BLOCK_T=bt, BLOCK_N_OUT=bn,
        BLOCK_K=bk, GROUP_SIZE_M=config["GROUP_SIZE_M"], STAGES=config["num_stages"],
        W_TMA=True, PREFETCH_SCALES=bool(config.get("PREFETCH_SCALES", False)),
        SPLIT_K=config.get("SPLIT_K", 1), PAIRED=bool(config.get("PAIRED_STAGES", False)),
        LOADER_REGS=prefill_rs.LOADER_REGS, STRIPPED_WAITS=True, num_warps=config["num_warps"],
        STREAM_K=bool(config.get("STREAM_K", False)),
        SCALE_ACC=scale_acc_wgmmas(config),
        SHORT_T=short_block_rows(config), QUARTER_T=quarter_block_rows(config))
    # the launcher's layouts: the words' box [1, rows/8, 1 or 2, 8, words] and the tile
    stage_k = prefill_rs.stage_columns(config)
    w_layout = prefill_rs.weight_smem_layout(stage_k)
    box = [1, bn // 8, 2 if activation else 1, 8, stage_k // 8]
    descs = {"w_desc": f"tensordesc<i32[{','.join(map(str, box))}],{w_layout!r}>"}
    if a_sorted:
        a_layout = prefill_rs.activation_smem_layout(bt, stage_k, torch.bfloat16)
        descs["a_desc"] = f"tensordesc<bf16[{bt},{stage_k}],{a_layout!r}>"
    else:
        constexprs["a_desc"] = None
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names or k == "num_warps"}
    # SPLIT_K writes float32 partial sums
    sig, attrs = _signature(fn, constexprs, descs,
                            "*fp32" if config.get("SPLIT_K", 1) > 1 else "*bf16")
    # through the launcher's compile hook, so the hook itself is what is checked
    with stripped_wait_barriers("_prefill_rs_kernel") as hook:
        kernel = triton.compile(GluonASTSource(fn, sig, constexprs, attrs),
                                target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": config["num_warps"]})
    text = kernel.asm["ptx"]
    stripped = hook.removed.get("_prefill_rs_kernel", 0) if hook is not None else 0
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(text)
        run = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx, "-o",
                              os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    return {"ptxas": run.stdout + run.stderr, "stripped": stripped,
            "left": strip_wait_barriers(text)[1], "unguarded": unguarded_shared_writes(text)}


def ptxas_reports(variants: list[dict]) -> list[dict]:
    """:func:`ptxas_report` of each ``{"config", "activation", "a_sorted", "out_sorted",
    "mul_routed_weight"}``, computed in a child process (:func:`aot.run_in_child`)."""
    return run_in_child(__file__, variants)


if __name__ == "__main__":
    reports = [ptxas_report(v["config"], activation=v["activation"], a_sorted=v["a_sorted"],
                            out_sorted=v["out_sorted"],
                            mul_routed_weight=v["mul_routed_weight"])
               for v in json.load(sys.stdin)]
    json.dump(reports, sys.stdout)
