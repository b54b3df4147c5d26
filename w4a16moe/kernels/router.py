"""Top-k routing in one Triton kernel: scores, selection, renormalisation and scaling.

``fused_topk`` in torch is half a dozen small kernels (cast, softmax, topk, gather, sum,
divide); at decode batch sizes each costs a launch and a round trip through memory, more than
the experts' own GEMVs. Here one program handles ``ROWS`` tokens: it loads their ``[ROWS, E]``
logits once, computes the scores in float32 (softmax or sigmoid), adds the optional
correction bias for the *choice* only, picks the ``top_k`` largest (descending order, the
lowest expert id first among equal scores), takes the unbiased scores of the chosen experts,
renormalises them if asked, multiplies by the routed scaling factor and stores
``topk_weights`` (float32) and ``topk_ids`` (int32).

Every column's choice score and its id are packed into one int64 key (the score's bits made
order-preserving in the high half, ``BLOCK_E - 1 - id`` in the low half, so the lowest id
wins a tie); the keys are distinct, and :func:`triton.language.topk` (a bitonic network:
sort groups of ``TOP_K_P2`` keys, then halve by pairwise maxima and re-merge) gives the top
``TOP_K_P2`` in descending order, the order repeated arg-max would give. Without a
correction bias a chosen key holds the score itself; with one, the chosen logits are loaded
again and scored the same way. On the H100 this took qwen3-30b's router (E=128, top-8) from
2.31-2.63 to 1.89-2.23 us a call (M=1-64, 64 dependents in one graph; its eight dependent
warp arg-max reductions of 64-bit keys were 80 of the kernel's 91 shuffles, on one chain);
Mixtral's (E=8, top-2) 1.44-1.57 to 1.42-1.53.

Grouped top-k (DeepSeek's ``num_expert_group``) is not handled here; :func:`fused_topk`
keeps the torch path for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import gdc_launch_dependents, pdl_enabled

#: largest expert count one program holds in registers (one row of logits per token)
MAX_EXPERTS = 8192
#: the selection key of a NaN score: below every number's (-inf's is -2139095041), above a
#: column past E's
NAN_KEY = tl.constexpr(-2147483647)
SCORING_CODES = {"softmax": 0, "sigmoid": 1}
#: ``tl.topk`` (triton 3.4 and later) selects; before it, TOP_K rounds of arg-max
HAVE_TOPK = hasattr(tl, "topk")


@triton.jit
def _flip_negative(bits):
    """int32 float bits <-> an int32 whose signed order is the floats' order: negative values
    get their magnitude bits flipped (its own inverse)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _route_rows(logits_ptr, stride_lm, bias_ptr, rows, M, E, scaling,
                TOP_K: tl.constexpr, TOP_K_P2: tl.constexpr, BLOCK_E: tl.constexpr,
                SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
                BITONIC: tl.constexpr):
    """The routing of ``rows`` (``[R]`` token indices; those at or past ``M`` are padding)
    of ``logits [M, E]``: ``(top_i [R, TOP_K_P2] int32, top_w [R, TOP_K_P2] float32, key
    [R, BLOCK_E] int64, kth [R] int64)``: the chosen experts in descending order and their
    final weights (columns past ``TOP_K``: weight 0), every column's selection key, and the
    ``TOP_K``-th largest key of each row (a column is chosen iff its key is at least that:
    the keys are distinct). See :func:`_topk_router_kernel` for the scoring and the keys."""
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < M
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_lm + cols[None, :],
                mask=mask, other=float("-inf")).to(tl.float32)
    if SCORING == 0:
        peak = tl.where(row_ok, tl.max(x, axis=1), 0.0)  # rows past M: no -inf - -inf
        p = tl.exp(x - peak[:, None])
        p = tl.where(col_ok[None, :], p, 0.0)
        scores = p / tl.sum(p, axis=1)[:, None]
    else:
        scores = tl.sigmoid(x)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        choice = scores + bias[None, :]
    else:
        choice = scores
    kcols = tl.arange(0, TOP_K_P2)
    # the selection keys: the choice's float bits made order-preserving as int32 (negative
    # values: magnitude bits flipped; -0.0 first made +0.0; NaN the lowest key of an
    # available column), shifted up, and BLOCK_E - 1 - column below (ties: lowest column);
    # columns past E never win (top_k <= E). The keys are distinct, so their top TOP_K_P2
    # in descending order are the experts in the order of repeated arg-max.
    ordered = _flip_negative((choice + 0.0).to(tl.int32, bitcast=True))
    ordered = tl.where(choice == choice, ordered, NAN_KEY)
    key = (ordered.to(tl.int64) << 32) | (BLOCK_E - 1 - cols)[None, :].to(tl.int64)
    past_e = -9223372036854775807 - 1  # int64 minimum: past E, or (arg-max) already picked
    key = tl.where(col_ok[None, :], key, past_e)
    if BITONIC:
        best = tl.topk(key, TOP_K_P2, dim=1)  # [R, TOP_K_P2], a bitonic top-k network
    else:  # triton < 3.4 has no tl.topk: TOP_K rounds of arg-max
        best = tl.full([rows.shape[0], TOP_K_P2], past_e, tl.int64)
        left = key
        for j in tl.static_range(TOP_K):
            step = tl.max(left, axis=1)
            best = tl.where(kcols[None, :] == j, step[:, None], best)
            left = tl.where(left == step[:, None], past_e, left)
    kth = tl.min(tl.where((kcols < TOP_K)[None, :], best, 9223372036854775807), axis=1)
    top_i = (BLOCK_E - 1 - (best & 0xFFFFFFFF)).to(tl.int32)
    if HAS_BIAS:  # the weight is the unbiased score: the chosen logits scored again
        x_top = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_lm + top_i,
                        mask=row_ok[:, None] & (kcols < TOP_K)[None, :],
                        other=0.0).to(tl.float32)
        if SCORING == 0:
            top_w = tl.exp(x_top - peak[:, None]) / tl.sum(p, axis=1)[:, None]
        else:
            top_w = tl.sigmoid(x_top)
    else:  # the key holds the score: undo the ordering (NaN stays NaN)
        hi = (best >> 32).to(tl.int32)
        top_w = _flip_negative(hi).to(tl.float32, bitcast=True)
        top_w = tl.where(hi == NAN_KEY, float("nan"), top_w)
    top_w = tl.where((kcols < TOP_K)[None, :], top_w, 0.0)  # TOP_K_P2 > TOP_K: not summed
    if RENORMALIZE:
        total = tl.sum(top_w, axis=1)
        top_w = top_w / tl.maximum(total, 1e-20)[:, None]
    top_w = top_w * scaling
    return top_i, top_w, key, kth


@triton.jit
def _topk_router_kernel(
    logits_ptr, stride_lm, bias_ptr, weights_ptr, ids_ptr,
    M, E, scaling,
    TOP_K: tl.constexpr, TOP_K_P2: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr,
    SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    PDL: tl.constexpr = False, BITONIC: tl.constexpr = True,
):
    """Rows ``pid*ROWS .. pid*ROWS+ROWS-1`` of ``logits [M, E]`` -> ``weights [M, TOP_K]``
    (computed in float32, stored in the buffer's dtype) and ``ids [M, TOP_K]`` (int32 or
    int64), both contiguous. ``SCORING`` 0 = softmax over E,
    1 = sigmoid; ``bias_ptr`` ``[E]`` float32 is added to the scores for choosing only.
    ``PDL``: let the next kernel (the experts' first GEMM, which waits for this one to
    complete before it reads anything) launch right away (:mod:`.pdl`). ``BITONIC``: select
    with ``tl.topk`` (else ``TOP_K`` rounds of arg-max, the same keys in the same order)."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    top_i, top_w, _, _ = _route_rows(logits_ptr, stride_lm, bias_ptr, rows, M, E, scaling,
                                     TOP_K, TOP_K_P2, BLOCK_E, SCORING, HAS_BIAS, RENORMALIZE,
                                     BITONIC)
    kcols = tl.arange(0, TOP_K_P2)
    out_mask = (rows < M)[:, None] & (kcols < TOP_K)[None, :]
    offs = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    tl.store(weights_ptr + offs, top_w.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + offs, top_i.to(ids_ptr.dtype.element_ty), mask=out_mask)


def rows_per_program(num_experts: int) -> int:
    """Tokens per program: enough rows for one logit a lane (32 // E, at least one row). Each
    top-k step is a chain of dependent instructions over every value a thread holds, padding
    rows included: with 512 logits a program (4 rows of qwen3-30b's 128) the one warp of the
    M=1 launch issued ~2600 instructions (ncu on the H100: 11.8 K active cycles at 4.6 cycles
    an instruction), and the router took 6.8 us; one row a program takes 2.4 us (3.0 at
    M=1024, 9.9 at 8192 instead of 11.1). Mixtral (E=8, 4 rows): 1.7 -> 1.4 us at M=1, 2.0
    -> 2.5 at M=8192 (benchmarks/layer_small_kernels_ab.py --kernels router). The count
    depends on E only, so a token's bits do not depend on the batch."""
    block_e = triton.next_power_of_2(max(num_experts, 1))
    return max(1, 32 // block_e)


def warps_per_program(num_experts: int) -> int:
    """One warp up to 512 experts: every per-row reduction (the softmax's max and sum, each
    top-k step's arg-max) then stays within the warp. With more warps Triton spreads a row
    over them and each reduction crosses shared memory behind a CTA barrier (105 barriers
    for E=128, top-8 at 16 rows and 4 warps): qwen3-30b's router went 7.6 -> 6.7 us at M=1
    on the H100, Mixtral's (one warp before too) is unchanged
    (benchmarks/layer_small_kernels_ab.py). Above 512 experts a row takes 512 columns a
    warp, up to 4 warps. The choice depends on E only, so a token's bits do not depend on
    the batch."""
    block_e = triton.next_power_of_2(max(num_experts, 1))
    return max(1, min(4, block_e // 512))


def topk_router(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = True,
    scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    weights_dtype: torch.dtype = torch.float32,
    ids_dtype: torch.dtype = torch.int32,
    rows: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-kernel top-k routing of ``router_logits [M, E]`` (any float dtype, last dim
    contiguous or not) -> ``(topk_weights [M, top_k], topk_ids [M, top_k])``, the contract of
    :func:`w4a16moe.routing.fused_topk` without grouped top-k. The weights are computed in
    float32 and stored as ``weights_dtype`` (float32, bf16 or fp16: a transformers router
    that casts its scores to the logits' dtype gets them without another kernel); ids are
    ``ids_dtype`` (int32 or int64). ``rows`` (tokens per program, a power of two) and
    ``num_warps`` override :func:`rows_per_program` and :func:`warps_per_program` (for
    benchmarks; a token's bits may then depend on them). Other arguments are validated by
    the caller (``fused_topk``); this checks only what the kernel needs."""
    if scoring not in SCORING_CODES:
        raise ValueError(f"scoring is {scoring!r}; expected one of {tuple(SCORING_CODES)}")
    if weights_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"weights_dtype is {weights_dtype}; expected torch.float32, "
                         "torch.bfloat16 or torch.float16")
    if ids_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids_dtype is {ids_dtype}; expected torch.int32 or torch.int64")
    m, e = router_logits.shape
    if e > MAX_EXPERTS:
        raise ValueError(f"router_logits has E={e} experts; the Triton router handles at most "
                         f"{MAX_EXPERTS}")
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    dev = logits.device
    weights = torch.empty(m, top_k, dtype=weights_dtype, device=dev)
    ids = torch.empty(m, top_k, dtype=ids_dtype, device=dev)
    if m == 0:
        return weights, ids
    bias = None
    if correction_bias is not None:
        bias = correction_bias.to(device=dev, dtype=torch.float32).contiguous()
    rows = rows if rows is not None else rows_per_program(e)
    num_warps = num_warps if num_warps is not None else warps_per_program(e)
    if rows < 1 or rows & (rows - 1) or num_warps not in (1, 2, 4, 8):
        raise ValueError(f"rows={rows}, num_warps={num_warps}; expected a power of two and "
                         "one of 1, 2, 4, 8")
    grid = (triton.cdiv(m, rows),)
    _topk_router_kernel[grid](
        logits, logits.stride(0), bias if bias is not None else weights, weights, ids,
        m, e, float(routed_scaling_factor),
        TOP_K=top_k, TOP_K_P2=triton.next_power_of_2(top_k),
        BLOCK_E=triton.next_power_of_2(e), ROWS=rows,
        SCORING=SCORING_CODES[scoring], HAS_BIAS=bias is not None,
        RENORMALIZE=bool(renormalize), PDL=pdl_enabled(dev), BITONIC=HAVE_TOPK,
        num_warps=num_warps,
    )
    return weights, ids


__all__ = ["HAVE_TOPK", "MAX_EXPERTS", "rows_per_program", "topk_router", "warps_per_program"]
