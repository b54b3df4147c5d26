"""Adapters giving library entry points the benchmark path signature
``fn(hidden_states, experts, topk_weights, topk_ids, *, activation) -> [M, H]``, and for the
layer timing a ``from_logits`` attribute that routes the logits itself
(``fn.from_logits(hidden_states, experts, router_logits, *, activation, top_k, **routing)``).

Importing this module imports :mod:`w4a16moe.experts`; when that fails, the paths that use it
are reported unavailable.
"""

from __future__ import annotations

import torch

from ..experts import HybridW4A16MoEExperts
from ..kernels.mixed import fused_moe_mixed
from ..kernels.prefill import fused_moe_prefill, fused_moe_prefill_from_logits
from ..layout import PackedExperts

#: one module per (weights, top_k, activation), so workspaces are reused across calls and
#: allocated in the warm-up before CUDA graph capture; emptied by :func:`clear_caches`
_HYBRID: dict[tuple[int, int, str], tuple[PackedExperts, HybridW4A16MoEExperts]] = {}


def _module(experts: PackedExperts, top_k: int, activation: str) -> HybridW4A16MoEExperts:
    """The cached module of (``experts``, ``top_k``, ``activation``)."""
    key = (id(experts), top_k, activation)
    entry = _HYBRID.get(key)
    if entry is None or entry[0] is not experts:
        entry = (experts, HybridW4A16MoEExperts(experts, top_k, activation=activation))
        _HYBRID[key] = entry
    return entry[1]


def hybrid_moe(hidden_states: torch.Tensor, experts: PackedExperts, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor, *, activation: str = "silu") -> torch.Tensor:
    """:class:`~w4a16moe.experts.HybridW4A16MoEExperts` (decode, mixed or prefill path chosen
    by the token count) as a benchmark path."""
    return _module(experts, topk_ids.shape[1], activation)(hidden_states, topk_weights,
                                                           topk_ids)


def hybrid_moe_from_logits(hidden_states: torch.Tensor, experts: PackedExperts,
                           router_logits: torch.Tensor, *, activation: str = "silu",
                           top_k: int, **routing) -> torch.Tensor:
    """:func:`hybrid_moe` routing ``router_logits`` itself
    (:meth:`~w4a16moe.experts.HybridW4A16MoEExperts.forward_logits`; ``routing``: the other
    keyword arguments of :func:`~w4a16moe.routing.fused_topk`)."""
    return _module(experts, top_k, activation).forward_logits(hidden_states, router_logits,
                                                              **routing)


hybrid_moe.from_logits = hybrid_moe_from_logits


def prefill_moe(hidden_states: torch.Tensor, experts: PackedExperts, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, *, activation: str = "silu") -> torch.Tensor:
    """:func:`~w4a16moe.kernels.prefill.fused_moe_prefill` as a benchmark path; its layer
    routes with :func:`~w4a16moe.kernels.prefill.fused_moe_prefill_from_logits`."""
    return fused_moe_prefill(hidden_states, experts, topk_weights, topk_ids,
                             activation=activation)


def prefill_moe_from_logits(hidden_states: torch.Tensor, experts: PackedExperts,
                            router_logits: torch.Tensor, *, activation: str = "silu",
                            top_k: int, **routing) -> torch.Tensor:
    """The layer of :func:`prefill_moe`: routing and alignment in one kernel where they can."""
    return fused_moe_prefill_from_logits(hidden_states, experts, router_logits, top_k,
                                         activation=activation, **routing)


prefill_moe.from_logits = prefill_moe_from_logits


def mixed_moe(hidden_states: torch.Tensor, experts: PackedExperts, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, activation: str = "silu") -> torch.Tensor:
    """:func:`~w4a16moe.kernels.mixed.fused_moe_mixed` as a benchmark path; its layer routes
    and aligns in one kernel where it can (the hybrid module's mixed path, forced)."""
    return fused_moe_mixed(hidden_states, experts, topk_weights, topk_ids,
                           activation=activation)


def mixed_moe_from_logits(hidden_states: torch.Tensor, experts: PackedExperts,
                          router_logits: torch.Tensor, *, activation: str = "silu",
                          top_k: int, **routing) -> torch.Tensor:
    """The layer of :func:`mixed_moe`: :meth:`~w4a16moe.experts.HybridW4A16MoEExperts.
    forward_logits` with ``path="mixed"``."""
    return _module(experts, top_k, activation).forward_logits(hidden_states, router_logits,
                                                              path="mixed", **routing)


mixed_moe.from_logits = mixed_moe_from_logits


def hybrid_choice(experts: PackedExperts, top_k: int, m: int) -> str:
    """The path (``"decode"``, ``"mixed"`` or ``"prefill"``) the hybrid path runs for ``m``
    tokens."""
    return HybridW4A16MoEExperts(experts, top_k).choose_path(m)


def clear_caches() -> None:
    """Drop the cached modules (and with them their weights and workspaces)."""
    _HYBRID.clear()
