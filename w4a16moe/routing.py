"""Routing: top-k expert selection and the token -> expert sort used by the prefill kernel.

Everything here runs on the tensors' device with no host synchronisation (no ``.item()``,
no data-dependent shapes), so it can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SCORINGS = ("softmax", "sigmoid")
TOPK_BACKENDS = ("auto", "triton", "torch")


def check_router_args(router_logits: torch.Tensor, top_k: int, scoring: str,
                      num_expert_group: int | None, topk_group: int | None,
                      correction_bias: torch.Tensor | None) -> bool:
    """Raise ValueError naming the first argument of :func:`fused_topk` that is wrong;
    return whether the routing is grouped top-k (``num_expert_group > 1``)."""
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError(f"router_logits has shape {tuple(getattr(router_logits, 'shape', ()))}; "
                         "expected [M, E]")
    e = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ValueError(f"top_k is {top_k!r}; expected an int with 1 <= top_k <= E={e}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring is {scoring!r}; expected one of {SCORINGS}")
    grouped_topk = num_expert_group is not None and num_expert_group > 1
    if num_expert_group is not None and num_expert_group < 1:
        raise ValueError(f"num_expert_group is {num_expert_group}; expected >= 1 or None")
    if grouped_topk:
        if topk_group is None or not 1 <= topk_group <= num_expert_group:
            raise ValueError(f"topk_group is {topk_group}; expected 1..{num_expert_group} "
                             "with grouped top-k")
        if e % num_expert_group:
            raise ValueError(f"E={e} is not divisible by num_expert_group={num_expert_group}")
        eligible = topk_group * (e // num_expert_group)
        if top_k > eligible:
            raise ValueError(f"top_k is {top_k}; expected <= topk_group * E / num_expert_group "
                             f"= {eligible} (the experts of the chosen groups)")
    if correction_bias is not None:
        if not isinstance(correction_bias, torch.Tensor) or correction_bias.shape != (e,):
            found = tuple(getattr(correction_bias, "shape", ()))
            raise ValueError(f"correction_bias has shape {found}; expected ({e},)")
        if correction_bias.device != router_logits.device:
            raise ValueError(f"correction_bias is on {correction_bias.device}; expected "
                             f"{router_logits.device} (the device of router_logits)")
    if not router_logits.is_floating_point():
        raise ValueError(f"router_logits has dtype {router_logits.dtype}; expected a floating "
                         "point dtype")
    return grouped_topk


def fused_topk(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    scoring: str = "softmax",
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``top_k`` experts per token.

    Args:
        router_logits: ``[M, E]`` router outputs.
        top_k: experts per token.
        renormalize: rescale the selected weights to sum to 1.
        scoring: ``"softmax"`` (Mixtral, Qwen, DeepSeek-V2) or ``"sigmoid"`` (DeepSeek-V3).
        num_expert_group, topk_group: grouped top-k (DeepSeek-V2/V3): experts are split into
            ``num_expert_group`` groups, only the best ``topk_group`` groups are eligible.
            A group's score is its best expert, or the sum of its best two when
            ``correction_bias`` is given (DeepSeek-V3).
        correction_bias: ``[E]`` added to the scores for *choosing* experts only; the returned
            weights are the unbiased scores (DeepSeek-V3 ``e_score_correction_bias``).
            Experts of groups that were not chosen are never selected.
        routed_scaling_factor: multiplies the final weights.
        backend: ``"triton"`` (one kernel, :mod:`w4a16moe.kernels.router`; not for grouped
            top-k; on CPU tensors only under ``TRITON_INTERPRET=1``), ``"torch"`` or
            ``"auto"``: Triton on CUDA tensors without grouped top-k, torch otherwise. Both
            return the experts in descending score order; they can differ only in which of
            two exactly equal scores comes first (Triton: the lower expert id) and in the
            last bit of the weights.

    Returns:
        ``(topk_weights float32 [M, top_k], topk_ids int32 [M, top_k])``.
    """
    grouped_topk = check_router_args(router_logits, top_k, scoring, num_expert_group,
                                     topk_group, correction_bias)
    m, e = router_logits.shape
    if backend not in TOPK_BACKENDS:
        raise ValueError(f"backend is {backend!r}; expected one of {TOPK_BACKENDS}")
    if backend == "triton" and grouped_topk:
        raise ValueError("backend 'triton' does not do grouped top-k (num_expert_group > 1); "
                         "use backend='torch' or 'auto'")
    if backend == "triton" or (backend == "auto" and router_logits.is_cuda
                               and not grouped_topk):
        from .kernels.router import MAX_EXPERTS, topk_router

        if e <= MAX_EXPERTS or backend == "triton":
            return topk_router(router_logits, top_k, renormalize=renormalize, scoring=scoring,
                               correction_bias=correction_bias,
                               routed_scaling_factor=routed_scaling_factor)
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores
    if correction_bias is not None:
        choice = scores + correction_bias.to(torch.float32)
    if grouped_topk:
        grouped = choice.view(m, num_expert_group, e // num_expert_group)
        if correction_bias is not None:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(m, e)
        choice = choice.masked_fill(expert_mask == 0, float("-inf"))
    topk_ids = choice.topk(top_k, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if routed_scaling_factor != 1.0:
        topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids.to(torch.int32)


class AlignedBlocks(NamedTuple):
    """Output of :func:`align_block_size`.

    sorted_token_ids: int32 ``[max_num_tokens_padded]``: flat (token, k) slot indices grouped
        by expert, each expert's run padded to a multiple of ``block_size`` with the sentinel
        ``M * top_k``.
    expert_ids: int32 ``[max_num_blocks]``: the (local) expert of each block; -1 for a block
        past the end or of an expert not on this rank.
    num_tokens_post_padded: int32 ``[1]``: how many entries of ``sorted_token_ids`` are used.
    """

    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor


def max_num_tokens_padded(num_slots: int, block_size: int, num_experts: int) -> int:
    """Upper bound of the padded slot count: every expert may waste ``block_size - 1`` slots."""
    bound = num_slots + num_experts * (block_size - 1)
    return -(-bound // block_size) * block_size


ALIGN_BACKENDS = ("auto", "triton", "torch")


def align_block_size(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
    *,
    out: AlignedBlocks | None = None,
    scratch: torch.Tensor | None = None,
    backend: str = "auto",
) -> AlignedBlocks:
    """Sort (token, k) slots by expert and pad each expert's run to ``block_size``.

    Args:
        topk_ids: ``[M, top_k]`` global expert ids.
        block_size: rows per block of the grouped GEMM.
        num_experts: number of global experts (ids are in ``[0, num_experts)``).
        expert_map: optional int32/int64 ``[num_experts]`` on ``topk_ids``' device: global id
            -> local id, -1 if the expert is not on this rank (its blocks get expert id -1;
            its slots are still listed in ``sorted_token_ids``).
        out: optional preallocated outputs (int32, contiguous, of exactly the shapes below,
            e.g. views of a workspace); they are filled and returned.
        scratch: optional int32 buffer of at least
            :func:`w4a16moe.kernels.align.scratch_numel` entries for the Triton kernels
            (ignored by the torch path).
        backend: ``"triton"`` (three small kernels, :mod:`w4a16moe.kernels.align`; on CPU
            tensors only under ``TRITON_INTERPRET=1``), ``"torch"`` (sort/scatter/searchsorted)
            or ``"auto"``: Triton on CUDA tensors, torch elsewhere. Both give identical
            outputs.

    Returns:
        :class:`AlignedBlocks`; within an expert the slots keep their flat (token-major)
        order. ``sorted_token_ids`` has ``max_num_tokens_padded(M * top_k, block_size,
        num_experts)`` entries and ``expert_ids`` that divided by ``block_size``.

    Shapes depend only on ``topk_ids.numel()``, ``block_size`` and ``num_experts``; nothing
    is read back to the host (ids outside ``[0, num_experts)`` are not checked: on CPU they
    raise in ``scatter_add_``, on a GPU they are undefined behaviour).
    """
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids has shape {tuple(getattr(topk_ids, 'shape', ()))}; "
                         "expected [M, top_k]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids has dtype {topk_ids.dtype}; expected torch.int32 or int64")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size is {block_size!r}; expected a positive int")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts is {num_experts!r}; expected a positive int")
    _check_expert_map(expert_map, num_experts, topk_ids.device, "topk_ids")
    if backend not in ALIGN_BACKENDS:
        raise ValueError(f"backend is {backend!r}; expected one of {ALIGN_BACKENDS}")
    device = topk_ids.device
    num_slots = topk_ids.numel()
    max_padded = max_num_tokens_padded(num_slots, block_size, num_experts)
    max_blocks = max_padded // block_size
    if out is not None:
        _check_out_blocks(out, max_padded, max_blocks, device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        from .kernels.align import align_block_size_triton

        if out is None:
            out = AlignedBlocks(torch.empty(max_padded, dtype=torch.int32, device=device),
                                torch.empty(max_blocks, dtype=torch.int32, device=device),
                                torch.empty(1, dtype=torch.int32, device=device))
        align_block_size_triton(topk_ids, block_size, num_experts, expert_map, *out,
                                scratch=scratch)
        return out
    result = _align_block_size_torch(topk_ids, block_size, num_experts, expert_map,
                                     max_padded, max_blocks)
    if out is None:
        return result
    for dst, src in zip(out, result, strict=True):
        dst.copy_(src)
    return out


def fused_topk_align(
    router_logits: torch.Tensor,
    top_k: int,
    block_size: int,
    expert_map: torch.Tensor | None = None,
    *,
    renormalize: bool = True,
    scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    out: AlignedBlocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor, AlignedBlocks]:
    """:func:`fused_topk` then :func:`align_block_size` (``num_experts`` = E, the logits'
    columns): ``(topk_weights, topk_ids, blocks)``: the two calls' outputs (Triton router),
    the weights bit for bit for the built-in models' expert counts and within their last bit
    otherwise (:mod:`w4a16moe.kernels.route_align`).

    On a GPU (or under ``TRITON_INTERPRET=1``) one program does both for as many tokens as
    :func:`w4a16moe.kernels.route_align.supported` takes (qwen3-30b up to 4, Mixtral up to
    16): the prefill layer's first two kernels in one launch, with no read-back of the ids.
    Elsewhere it raises (and grouped top-k is not taken here: route with :func:`fused_topk`);
    :func:`fused_topk_align_supported` says which. ``out`` as for :func:`align_block_size`.
    """
    check_router_args(router_logits, top_k, scoring, None, None, correction_bias)
    m, e = router_logits.shape
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size is {block_size!r}; expected a positive int")
    if not fused_topk_align_supported(m, e, router_logits.device):
        from .kernels.route_align import MAX_WARPS

        raise ValueError(f"router_logits has shape {(m, e)} on {router_logits.device}; "
                         "fused_topk_align takes as many tokens as the router's tiles fill "
                         f"{MAX_WARPS} warps with (route_align.supported) on a CUDA device (or "
                         "the CPU under TRITON_INTERPRET=1)")
    _check_expert_map(expert_map, e, router_logits.device, "router_logits")
    device = router_logits.device
    max_padded = max_num_tokens_padded(m * top_k, block_size, e)
    if out is None:
        out = AlignedBlocks(torch.empty(max_padded, dtype=torch.int32, device=device),
                            torch.empty(max_padded // block_size, dtype=torch.int32,
                                        device=device),
                            torch.empty(1, dtype=torch.int32, device=device))
    else:
        _check_out_blocks(out, max_padded, max_padded // block_size, device)
    from .kernels.route_align import route_and_align

    weights, ids = route_and_align(router_logits, top_k, block_size, expert_map, *out,
                                   renormalize=renormalize, scoring=scoring,
                                   correction_bias=correction_bias,
                                   routed_scaling_factor=routed_scaling_factor)
    return weights, ids, out


def fused_topk_align_supported(num_tokens: int, num_experts: int,
                               device: torch.device | str) -> bool:
    """Whether :func:`fused_topk_align` takes ``num_tokens`` tokens over ``num_experts``
    experts on ``device``: a CUDA device (or the CPU under ``TRITON_INTERPRET=1``) and the one
    program's limits (:func:`w4a16moe.kernels.route_align.supported`)."""
    import os

    device = torch.device(device)
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return False
    from .kernels.route_align import supported

    return supported(num_tokens, num_experts)


def _check_expert_map(expert_map: torch.Tensor | None, num_experts: int,
                      device: torch.device, on: str) -> None:
    """Raise ValueError unless ``expert_map`` is None or an int32/int64 ``[num_experts]``
    tensor on ``device`` (that of the tensor named ``on``)."""
    if expert_map is None:
        return
    if not isinstance(expert_map, torch.Tensor) or expert_map.shape != (num_experts,):
        raise ValueError(f"expert_map has shape {tuple(getattr(expert_map, 'shape', ()))}; "
                         f"expected ({num_experts},)")
    if expert_map.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_map has dtype {expert_map.dtype}; expected torch.int32 "
                         "or int64")
    if expert_map.device != device:
        raise ValueError(f"expert_map is on {expert_map.device}; expected {device} (the "
                         f"device of {on})")


def _check_out_blocks(out: AlignedBlocks, max_padded: int, max_blocks: int,
                      device: torch.device) -> None:
    """Raise ValueError unless ``out`` holds contiguous int32 buffers of the output shapes."""
    if not isinstance(out, tuple) or len(out) != 3:
        raise ValueError(f"out is a {type(out).__name__}; expected AlignedBlocks")
    for name, t, n in (("sorted_token_ids", out[0], max_padded),
                       ("expert_ids", out[1], max_blocks),
                       ("num_tokens_post_padded", out[2], 1)):
        if (not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1
                or t.numel() != n or t.device != device or t.stride(0) != 1):
            found = (f"dtype {t.dtype}, shape {tuple(t.shape)} on {t.device}"
                     if isinstance(t, torch.Tensor) else type(t).__name__)
            raise ValueError(f"out.{name} has {found}; expected a contiguous int32 tensor of "
                             f"shape ({n},) on {device}")


def _align_block_size_torch(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                            expert_map: torch.Tensor | None, max_padded: int,
                            max_blocks: int) -> AlignedBlocks:
    """The torch implementation of :func:`align_block_size` (arguments already checked)."""
    device = topk_ids.device
    num_slots = topk_ids.numel()
    flat = topk_ids.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_size - 1) // block_size * block_size
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    start = counts.cumsum(0) - counts

    order = torch.sort(flat, stable=True).indices
    sorted_experts = flat[order]
    rank = torch.arange(num_slots, device=device, dtype=torch.int64)
    dest = padded_start[sorted_experts] + (rank - start[sorted_experts])
    sorted_token_ids = torch.full((max_padded,), num_slots, dtype=torch.int32, device=device)
    sorted_token_ids.scatter_(0, dest, order.to(torch.int32))

    block_starts = torch.arange(max_blocks, device=device, dtype=torch.int64) * block_size
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    used = block_starts < padded_end[-1]
    block_expert = block_expert.clamp(max=num_experts - 1)
    if expert_map is not None:
        local = expert_map.to(torch.int64)[block_expert]
    else:
        local = block_expert
    expert_ids = torch.where(used, local, torch.full_like(local, -1)).to(torch.int32)
    total = padded_end[-1:].to(torch.int32)
    return AlignedBlocks(sorted_token_ids, expert_ids, total)
