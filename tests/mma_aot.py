"""Ahead-of-time compilation of the ``mma.sync`` prefill kernel for sm_90, no GPU needed.

``ptxas_report(...)`` compiles ``_prefill_mma_kernel`` the way ``launch_prefill_mma`` would
launch it and returns what ``ptxas -v`` says (registers, spills); compiling at all checks that
every layout conversion of the K permutation is free (``assert_trivial``). With
``ring_stages`` the PTX loses the ring's barriers as the launcher's hook strips them, and
``ring_barriers`` counts the CTA barriers left between the ring's first copies and its final
wait, ``ring_warp_barriers`` the warp barriers there (``whole_runs``: the ring's copies in
whole runs of a row, by default as the launcher picks them). With ``sass`` the report also
holds the kernel's SASS (``cuobjdump -sass``; ``benchmarks/mma_sass_loop.py`` counts its loop).
``ptxas_reports(variants)`` does that for many in a fresh Python process (the test session
runs Triton's interpreter, see ``rs_aot.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from aot import kernel_signature, run_in_child


def ptxas_report(*, block_t: int, block_n: int, num_warps: int, activation: bool,
                 has_zeros: bool = False, fp16: bool = False, mul_routed_weight: bool = False,
                 a_sorted: bool = False, out_sorted: bool = False, groups: int = 1,
                 scale_words: bool | None = None, weights_before_wait: bool = False,
                 predicated_reloads: bool = False, ring_stages: int = 0,
                 x_ahead: bool | None = None, timeline: bool = False,
                 rotate_k: bool | None = None, ready: int = 0,
                 persistent: bool = False, whole_runs: bool | None = None,
                 split: int = 1, k_range: int = 0, split_runtime_steps: bool | None = None,
                 sass: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource

    from w4a16moe.kernels import prefill_mma
    from w4a16moe.kernels.membar import strip_ring_barriers

    fn = prefill_mma._prefill_mma_kernel
    if whole_runs is None:  # as the launcher picks it
        whole_runs = prefill_mma.RING_COPIES_WHOLE_RUNS and ring_stages > 0 and groups >= 2
    rows = 2 * block_n if activation else block_n
    words, x, sz, szw, pairs = prefill_mma.mma_layouts(rows, block_t, num_warps, groups)
    if scale_words is None:  # as the launcher picks it for contiguous scales and G = 128
        scale_words = groups > 1
    constexprs = dict(
        GROUP_SIZE=128, HAS_ZEROS=has_zeros, ACTIVATION=1 if activation else 0,
        MUL_ROUTED_WEIGHT=mul_routed_weight, A_IS_SLOTS=not activation, A_SORTED=a_sorted,
        C_SORTED=out_sorted, IS_FP16=fp16, BLOCK_T=block_t, BLOCK_N=rows, GROUPS=groups,
        SCALE_WORDS=scale_words, WORDS_LAYOUT=words, X_LAYOUT=x, SZ_LAYOUT=sz,
        SZW_LAYOUT=szw, PAIRS_LAYOUT=pairs,
        OUT_LAYOUT=prefill_mma.store_layout(block_t, block_n, num_warps),
        num_warps=num_warps, PDL=True, WEIGHTS_BEFORE_WAIT=weights_before_wait,
        PREDICATED_RELOADS=predicated_reloads, RING_STAGES=ring_stages,
        RING_LAYOUT=prefill_mma.ring_layout() if ring_stages else None,
        X_AHEAD=block_t == 8 if x_ahead is None else x_ahead, TIMELINE=timeline,
        ROTATE_K=(prefill_mma.ROTATE_K_STEPS and block_t == 8) if rotate_k is None
        else rotate_k, READY=ready, PERSISTENT=persistent,
        COPY_LAYOUT=(prefill_mma.ring_copy_layout(rows, num_warps, groups) if whole_runs
                     else None),
        SPLIT=split, K_RANGE=k_range,
        SPLIT_RUNTIME_STEPS=split > 1 and (prefill_mma.SPLIT_RUNTIME_STEPS
                                           if split_runtime_steps is None
                                           else split_runtime_steps))
    if not timeline:
        constexprs["timeline_ptr"] = None
    if not ready:
        constexprs["ready_ptr"] = None
    h = "*fp16" if fp16 else "*bf16"
    pointers = {"a_ptr": h, "qw_ptr": "*i32", "s_ptr": h, "z_ptr": "*u8", "c_ptr": h,
                "topk_weights_ptr": "*fp32", "sorted_ids_ptr": "*i32",
                "expert_ids_ptr": "*i32", "num_post_padded_ptr": "*i32",
                "timeline_ptr": "*i64", "ready_ptr": "*i32"}
    sig, attrs = kernel_signature(fn, constexprs, pointers,
                                  divisible=lambda name: name.startswith("stride")
                                  or name in ("N", "K"))
    kernel = triton.compile(GluonASTSource(fn, sig, constexprs, attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    text = kernel.asm["ptx"]
    ring_barriers = ring_warp_barriers = None
    if ring_stages:
        # as the launcher compiles it: without the barriers around the ring
        text, _ = strip_ring_barriers(text, warp_barriers=whole_runs)
        first = text.index("cp.async.commit_group")
        # the final wait after the first copies (a persistent grid's code places its tile
        # loop's wait before them: there the ring's body is not told apart, None)
        end = text.find("cp.async.wait_group \t0;", first)
        if end >= 0:
            body = text[first:end]
            ring_barriers = body.count("bar.sync") + body.count("barrier.sync")
            ring_warp_barriers = body.count("bar.warp.sync")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(text)
        cubin = os.path.join(tmp, "kernel.cubin")
        run = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx, "-o", cubin],
                             capture_output=True, text=True, check=True)
        sass_text = None
        if sass:  # the wheel's cuobjdump sits next to its ptxas
            cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
            sass_text = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True,
                                       text=True, check=True).stdout
    return {"ptxas": run.stdout + run.stderr, "sass": sass_text, "mma": text.count("mma.sync"),
            "globaltimer": text.count("%globaltimer"),
            "launch_dependents": text.count("griddepcontrol.launch_dependents"),
            "grid_waits": text.count("griddepcontrol.wait"),
            "acquire_polls": text.count("ld.global.acquire.gpu"),
            "ring_barriers": ring_barriers, "ring_warp_barriers": ring_warp_barriers}


def ptxas_reports(variants: list[dict]) -> list[dict]:
    """:func:`ptxas_report` of each variant (its keyword arguments), in a child process
    (:func:`aot.run_in_child`)."""
    return run_in_child(__file__, variants)


if __name__ == "__main__":
    print(json.dumps([ptxas_report(**v) for v in json.loads(sys.stdin.read())]))
