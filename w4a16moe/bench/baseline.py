"""16-bit baselines: the MoE layer on dequantized weights with plain torch ops.

Every function has the benchmark path signature::

    fn(hidden_states [M, H], weights, topk_weights [M, top_k], topk_ids [M, top_k], *,
       activation="silu") -> [M, H] in hidden_states.dtype

with ``weights = (w13 [E, 2I, H], w2 [E, H, I])`` float tensors (gate rows first in w13).
Three ways, each fastest somewhere:

* :func:`bf16_grouped_mm`: sort the (token, k) slots by expert, ``torch._grouped_mm`` with
  the per-expert offsets for both GEMMs. No host sync (CUDA-graph safe).
* :func:`bf16_bmm`: gather each slot's expert weights and batch-multiply; reads
  ``M*top_k`` experts' weights (twice: gather copy), so only for tiny M. Graph safe.
* :func:`bf16_expert_loop`: one ``torch.mm`` pair per expert touched (the classic eager
  loop); reads the counts back to the host, so it runs eagerly.
"""

from __future__ import annotations

import torch

from ..reference import activation_and_mul


def _check(hidden_states: torch.Tensor, weights, topk_ids: torch.Tensor):
    w13, w2 = weights
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0]:
        raise ValueError(f"weights have shapes {tuple(w13.shape)} and {tuple(w2.shape)}; "
                         "expected w13 [E, 2I, H] and w2 [E, H, I]")
    e, two_i, h = w13.shape
    if tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"w2 has shape {tuple(w2.shape)}; expected {(e, h, two_i // 2)}")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != h:
        raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}; expected "
                         f"[M, {h}]")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)}; expected "
                         f"[{hidden_states.shape[0]}, top_k]")
    return w13, w2


def _combine(y_sorted: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor,
             m: int, top_k: int) -> torch.Tensor:
    """Undo the expert sort of per-slot outputs ``[S, H]`` and sum each token's ``top_k``
    slots weighted by the router (accumulated in fp32)."""
    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)
    y = y.view(m, top_k, -1).float() * topk_weights.float().unsqueeze(-1)
    return y.sum(dim=1)


def _expert_counts(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat_ids.device)
    return counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))


def bf16_grouped_mm(hidden_states: torch.Tensor, weights, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, *, activation: str = "silu") -> torch.Tensor:
    """Grouped GEMMs over the expert-sorted slots (``torch._grouped_mm``, offsets = running
    per-expert counts)."""
    w13, w2 = _check(hidden_states, weights, topk_ids)
    m, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    offs = _expert_counts(flat, w13.shape[0]).cumsum(0, dtype=torch.int32)
    xs = hidden_states.index_select(0, order // top_k)
    gate_up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    inter = activation_and_mul(gate_up, activation)
    y = torch._grouped_mm(inter, w2.transpose(1, 2), offs=offs)
    return _combine(y, order, topk_weights, m, top_k).to(hidden_states.dtype)


def bf16_bmm(hidden_states: torch.Tensor, weights, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor, *, activation: str = "silu") -> torch.Tensor:
    """Batched GEMV on gathered per-slot weights ``[M*top_k, 2I, H]`` and ``[M*top_k, H, I]``."""
    w13, w2 = _check(hidden_states, weights, topk_ids)
    m, top_k = topk_ids.shape
    ids = topk_ids.reshape(-1).to(torch.int64)
    xs = hidden_states.repeat_interleave(top_k, dim=0).unsqueeze(2)        # [S, H, 1]
    gate_up = torch.bmm(w13.index_select(0, ids), xs).squeeze(2)           # [S, 2I]
    inter = activation_and_mul(gate_up, activation).unsqueeze(2)            # [S, I, 1]
    y = torch.bmm(w2.index_select(0, ids), inter).squeeze(2)               # [S, H]
    y = y.view(m, top_k, -1).float() * topk_weights.float().unsqueeze(-1)
    return y.sum(dim=1).to(hidden_states.dtype)


def bf16_expert_loop(hidden_states: torch.Tensor, weights, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, *, activation: str = "silu") -> torch.Tensor:
    """One ``x_e @ w13[e].T`` / ``inter_e @ w2[e].T`` pair per expert that has tokens."""
    w13, w2 = _check(hidden_states, weights, topk_ids)
    m, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = _expert_counts(flat, w13.shape[0]).tolist()
    xs = hidden_states.index_select(0, order // top_k)
    y = torch.empty(flat.numel(), w2.shape[1], dtype=hidden_states.dtype,
                    device=hidden_states.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        inter = activation_and_mul(xs[rows] @ w13[e].T, activation)
        torch.mm(inter, w2[e].T, out=y[rows])
        start += count
    return _combine(y, order, topk_weights, m, top_k).to(hidden_states.dtype)


def bmm_fits(shape, m: int, dtype_bytes: int = 2, limit_bytes: int = 2 * 2**30,
             max_slots: int = 64) -> str | None:
    """Why :func:`bf16_bmm` is not run for ``m`` tokens (its gathered weights are too big),
    or None."""
    slots = m * shape.top_k
    gathered = slots * 3 * shape.intermediate_size * shape.hidden_size * dtype_bytes
    if slots > max_slots or gathered > limit_bytes:
        return f"gathers {slots} experts' weights ({gathered / 2**30:.1f} GiB)"
    return None


def dense_reference(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    activation: str = "silu") -> torch.Tensor:
    """fp32 MoE over float weights (only the experts touched are converted): the oracle the
    benchmark checks every path's output against. Returns float32 ``[M, H]``."""
    m, top_k = topk_ids.shape
    ids = topk_ids.to(torch.int64)
    x = hidden_states.float()
    out = torch.zeros(m, w2.shape[1], dtype=torch.float32, device=hidden_states.device)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        inter = activation_and_mul(x[tok] @ w13[e].float().T, activation)
        y = inter @ w2[e].float().T
        out.index_add_(0, tok, y * topk_weights[tok, slot].float().unsqueeze(1))
    return out
