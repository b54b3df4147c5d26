"""The mixed layer: GEMM1 on the grouped GEMM's tensor-core tiles, GEMM2 on the decode kernel.

For a few tokens over few, large experts with a long K (Mixtral at one token) neither whole
path is best. The split-K decode GEMM1 dequantizes on CUDA cores and, on a card that streams
faster than the H100, runs out of issue slots before it runs out of bandwidth (H200, session
40: 2.9 TB/s of 4.3). The prefill kernel's ``mma.sync`` tiles spend fewer instructions a
weight (two values a shift, LOP3 and a packed add, every word loaded once) and read GEMM1 at
1.26x its floor there, but its GEMM2 at one token has too few programs for K = 14336, and
the split-K decode GEMM2 with its fused top-k sum is the faster one.

    x [M, H] --align--> blocks --prefill_gemm (MMA tiles, fused activation)--> inter [M*top_k, I]
    inter --decode_gemm2 (split-K, top-k weighted sum)--> out [M, H]

``inter`` has one row per slot (``m * top_k + k``), the decode kernel's layout, so GEMM2 is
the decode path's own launch. :class:`MixedWorkspace` holds the decode workspace and the
alignment's buffers; with it and ``out`` nothing is allocated (CUDA-graph safe), and no
host synchronisation happens. Where GEMM1 cannot run on the mma kernel
(:func:`mixed_unsupported`: act-order, a group size or K the tiles do not divide, no sm_80
GPU, the CPU interpreter) ``prefill_gemm`` runs the same block size on the Triton kernel:
the same result, without the reason for this path, so the hybrid module does not choose it
there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import PackedExperts
from ..profiling.annotate import DECODE_KERNEL_NAME, PREFILL_KERNEL_NAME, annotate_gemm
from ..reference import ACTIVATIONS, check_routing
from ..routing import AlignedBlocks, align_block_size
from .align import AlignmentBuffers
from .decode import DecodeConfig, DecodeWorkspace, _check_out, decode_gemm2
from .pdl import prefill_chain
from .prefill import _check_given_blocks, prefill_gemm
from .prefill_mma import mma_unsupported

#: GEMM1's tile: 8 slots x 8 output columns of gate and up on one warp, K steps of 256 (no
#: ``SORTED_ROWS``: the input is gathered by row). The best of eight mma tiles for Mixtral's
#: GEMM1 at M=1 on the H200 (``benchmarks/small_m_gemm_probe.py``, session 41: 35.8 us against
#: the decode kernel's 41.8; at M=2 within 2 % of the best, 67.7 against 66.6)
MIXED_GEMM1_CONFIG = {"BLOCK_SIZE_M": 8, "BLOCK_SIZE_N": 8, "BLOCK_SIZE_K": 256,
                      "GROUP_SIZE_M": 1, "num_warps": 1, "num_stages": 1, "MMA": True}


@dataclass
class MixedWorkspace:
    """Reusable buffers of :func:`fused_moe_mixed` for up to ``decode.max_tokens`` tokens:
    the :class:`~w4a16moe.kernels.decode.DecodeWorkspace` (GEMM1's output ``inter``, GEMM2's
    split-K accumulators and counters; it may be shared with the decode path, one stream at a
    time) and the :class:`~w4a16moe.kernels.align.AlignmentBuffers` of GEMM1's blocks."""

    decode: DecodeWorkspace
    align: AlignmentBuffers

    @classmethod
    def create(cls, experts: PackedExperts, top_k: int, max_tokens: int, *,
               num_global_experts: int | None = None,
               decode: DecodeWorkspace | None = None) -> MixedWorkspace:
        """Buffers for up to ``max_tokens`` tokens; ``num_global_experts`` (default
        ``experts.num_experts``) sizes the alignment (the global count under an
        ``expert_map``); ``decode``: a decode workspace to share (it must hold
        ``max_tokens``)."""
        if decode is None:
            decode = DecodeWorkspace.create(experts, top_k, max_tokens)
        elif decode.max_tokens < max_tokens:
            raise ValueError(f"decode workspace holds max_tokens={decode.max_tokens}; "
                             f"expected at least {max_tokens}")
        e = experts.num_experts if num_global_experts is None else num_global_experts
        return cls(decode=decode,
                   align=AlignmentBuffers.allocate(max_tokens * top_k, e, decode.device))

    @property
    def max_tokens(self) -> int:
        return self.decode.max_tokens


def mixed_unsupported(experts: PackedExperts, hidden_states: torch.Tensor | None = None,
                      config: dict | None = None) -> str | None:
    """Why GEMM1 of this layer cannot run on the mma kernel with ``config`` (default
    :data:`MIXED_GEMM1_CONFIG`), for ``hidden_states`` (default: a contiguous ``[1, H]``
    input), or None when it can."""
    cfg = MIXED_GEMM1_CONFIG if config is None else config
    if not cfg.get("MMA"):
        return "the GEMM1 config is not an MMA config"
    w = experts.w13
    a = hidden_states
    if a is None:
        a = torch.empty(1, experts.hidden_size, dtype=experts.dtype, device=experts.device)
    return mma_unsupported(device=a.device, k=w.k, n_out=w.n // 2, group_size=w.group_size,
                           config=cfg, has_perm=w.perm is not None, a_fragment_order=False,
                           atomic_topk_sum=False, activation=True, a=a, qweight=w.qweight)


def fused_moe_mixed(
    hidden_states: torch.Tensor,
    experts: PackedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: MixedWorkspace | None = None,
    gemm1_config: dict | None = None,
    gemm2_config: DecodeConfig | None = None,
    blocks: AlignedBlocks | None = None,
) -> torch.Tensor:
    """W4A16 MoE layer with GEMM1 on the grouped GEMM's tensor-core tiles and GEMM2 on the
    split-K decode kernel: ``[M, H]``, the same sum as :func:`fused_moe_decode`
    (``out[m] = sum_k w[m, k] * W2[e] @ act(W13_gate[e] @ x[m]) * (W13_up[e] @ x[m])``,
    ``e = topk_ids[m, k]`` through ``expert_map``; experts mapped to -1 contribute zero).

    Args:
        hidden_states, experts, topk_weights, topk_ids, activation,
            apply_router_weight_on_input, expert_map, out: as for ``fused_moe_decode``.
        workspace: optional :class:`MixedWorkspace` for at least ``M`` tokens (then nothing
            is allocated; the alignment is written into it unless ``blocks`` are given).
        gemm1_config: ``prefill_gemm`` config of GEMM1 (default :data:`MIXED_GEMM1_CONFIG`).
        gemm2_config: the decode GEMM2's config (default ``pick_config_gemm2``).
        blocks: ``topk_ids`` already aligned to GEMM1's ``BLOCK_SIZE_M`` over the global
            experts through ``expert_map`` (e.g. by ``fused_topk_align``); the layer then
            skips its own alignment.
    """
    num_global = check_routing(hidden_states, experts, topk_weights, topk_ids, expert_map)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation is {activation!r}; expected one of {ACTIVATIONS}")
    if hidden_states.dtype != experts.dtype:
        raise ValueError(f"hidden_states has dtype {hidden_states.dtype}; expected "
                         f"{experts.dtype} (the experts' dtype)")
    m, h = hidden_states.shape
    top_k = topk_ids.shape[1]
    i = experts.intermediate_size
    cfg1 = dict(MIXED_GEMM1_CONFIG if gemm1_config is None else gemm1_config)
    for flag in ("SORTED_ROWS", "SPLIT_K", "DENSE"):
        if cfg1.get(flag) and not (flag == "SPLIT_K" and cfg1[flag] == 1):
            raise ValueError(f"gemm1_config has {flag}={cfg1[flag]!r}; the mixed layer's GEMM1 "
                             "writes one row a slot for the decode GEMM2: expected none")
    out = _check_out(out, (m, h), experts.dtype, hidden_states.device)
    if m == 0:
        return out
    slots = m * top_k
    bm = cfg1["BLOCK_SIZE_M"]
    dws = None
    if workspace is not None:
        if not isinstance(workspace, MixedWorkspace):
            raise ValueError(f"workspace is a {type(workspace).__name__}; expected "
                             "MixedWorkspace")
        dws = workspace.decode
        dws.check(m, h, i, top_k, hidden_states.dtype, hidden_states.device)
        inter = dws.inter[:slots]
    else:
        inter = torch.empty(slots, i, dtype=experts.dtype, device=hidden_states.device)
    if blocks is not None:
        _check_given_blocks(blocks, slots, bm, num_global)
    with prefill_chain(m):
        if blocks is None:
            views = (workspace.align.views(slots, bm, num_global) if workspace is not None
                     else None)
            if views is not None:
                blocks = align_block_size(topk_ids, bm, num_global, expert_map, out=views[0],
                                          scratch=views[1])
            else:
                blocks = align_block_size(topk_ids, bm, num_global, expert_map)
        with annotate_gemm(PREFILL_KERNEL_NAME, m, 2 * i, h, num_global, top_k):
            prefill_gemm(hidden_states, experts.w13, blocks, topk_ids, topk_weights,
                         top_k=top_k, mul_routed_weight=apply_router_weight_on_input,
                         activation=activation, out=inter, config=cfg1)
    with annotate_gemm(DECODE_KERNEL_NAME, m, h, i, num_global, top_k):
        return decode_gemm2(inter, experts.w2, topk_ids, topk_weights,
                            apply_router_weight_on_input=apply_router_weight_on_input,
                            expert_map=expert_map, out=out, workspace=dws,
                            config=gemm2_config)


__all__ = ["MIXED_GEMM1_CONFIG", "MixedWorkspace", "fused_moe_mixed", "mixed_unsupported"]
