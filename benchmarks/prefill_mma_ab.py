"""Layer paths for A/Bs of the ``mma.sync`` prefill kernel (``MMA`` configs) against the
shipped hybrid layer, through ``w4a16moe bench``'s ad-hoc paths (weights rotated, CUDA graphs,
router included, checked against the float32 oracle)::

    PYTHONPATH=.:benchmarks w4a16moe bench --model qwen3-30b-a3b --m 8,16,32,64 \\
        --paths hybrid,mma_a=prefill_mma_ab:mma_a,mma_b=prefill_mma_ab:mma_b

Each path runs :func:`~w4a16moe.kernels.prefill.fused_moe_prefill` with both GEMMs on the
mma kernel: blocks of 8, 16 or 32 slots by the expected slots an expert (``BLOCK_T``), GEMM1
writing its output in sorted order for GEMM2 (``SORTED_ROWS``). The variants differ in the
weight rows a program takes (16-row slabs a warp, warps a program)."""

from __future__ import annotations

import functools

import torch

from w4a16moe.kernels.prefill import PrefillWorkspace, fused_moe_prefill


def block_slots(m: int, top_k: int, num_experts: int) -> int:
    """Slots a block: 8 up to ~2.5 slots an expert on average, 16 up to 6, else 32."""
    avg = m * top_k / num_experts
    return 8 if avg <= 2.5 else 16 if avg <= 6 else 32


def mma_configs(m: int, top_k: int, num_experts: int, *, g1_out: int, g1_warps: int,
                g2_rows: int, g2_warps: int, bt: int | None = None) -> tuple[dict, dict]:
    bt = bt or block_slots(m, top_k, num_experts)
    base = {"BLOCK_SIZE_M": bt, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_stages": 1,
            "MMA": True}
    return ({**base, "BLOCK_SIZE_N": g1_out, "num_warps": g1_warps},
            {**base, "BLOCK_SIZE_N": g2_rows, "num_warps": g2_warps, "SORTED_ROWS": True})


@functools.lru_cache(maxsize=8)
def _workspace(experts_id: int, m: int, top_k: int, experts) -> PrefillWorkspace:
    return PrefillWorkspace.allocate(m, experts, top_k)


def _run(hidden_states, experts, topk_weights, topk_ids, *, activation="silu", **tiles):
    m, top_k = topk_ids.shape
    cfgs = mma_configs(m, top_k, experts.num_experts, **tiles)
    ws = _workspace(id(experts), m, top_k, experts)
    return fused_moe_prefill(hidden_states, experts, topk_weights, topk_ids,
                             activation=activation, workspace=ws, configs=cfgs)


def mma_a(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
    """GEMM1: 32 features (64 rows) a program on 4 warps; GEMM2: 64 rows on 4 warps."""
    return _run(hidden_states, experts, topk_weights, topk_ids, activation=activation,
                g1_out=32, g1_warps=4, g2_rows=64, g2_warps=4)


def mma_b(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
    """Two slabs a warp: GEMM1 64 features (128 rows) on 4 warps; GEMM2 128 rows."""
    return _run(hidden_states, experts, topk_weights, topk_ids, activation=activation,
                g1_out=64, g1_warps=4, g2_rows=128, g2_warps=4)


def mma_c(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
    """Small programs: GEMM1 16 features (32 rows) on 2 warps; GEMM2 32 rows on 2 warps."""
    return _run(hidden_states, experts, topk_weights, topk_ids, activation=activation,
                g1_out=16, g1_warps=2, g2_rows=32, g2_warps=2)


def mma_d(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
    """One warp a program, one slab: GEMM1 8 features (16 rows); GEMM2 16 rows."""
    return _run(hidden_states, experts, topk_weights, topk_ids, activation=activation,
                g1_out=8, g1_warps=1, g2_rows=16, g2_warps=1)


__all__ = ["block_slots", "mma_a", "mma_b", "mma_c", "mma_d", "mma_configs"]


