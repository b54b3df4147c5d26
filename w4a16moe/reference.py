"""Plain-torch MoE forward over :class:`PackedExperts`: the oracle for every kernel test."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import PackedExperts

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def activation_and_mul(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` for ``gate_up`` ``[..., 2I]`` (gate first)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation is {activation!r}; expected one of {ACTIVATIONS}")
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up has shape {tuple(gate_up.shape)}; expected an even last "
                         "dimension [..., 2I] (gate then up)")
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return F.gelu(gate, approximate=approximate) * up


def check_routing(hidden_states: torch.Tensor, experts: PackedExperts, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> int:
    """Validate the shapes, dtypes and devices of one MoE forward's inputs; return the global
    expert count (``expert_map``'s length, else ``experts.num_experts``).

    Reads nothing back from the device (safe in CUDA graph capture): the *values* of
    ``topk_ids`` and ``expert_map`` are checked by :func:`moe_reference` only.
    """
    for t_name, t in (("hidden_states", hidden_states), ("topk_weights", topk_weights),
                      ("topk_ids", topk_ids)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{t_name} is a {type(t).__name__}; expected a torch.Tensor")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != experts.hidden_size:
        raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}; expected "
                         f"[M, {experts.hidden_size}]")
    if not hidden_states.dtype.is_floating_point:
        raise ValueError(f"hidden_states has dtype {hidden_states.dtype}; expected a "
                         "floating-point dtype")
    m = hidden_states.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != m:
        raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)}; expected [{m}, top_k]")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights has shape {tuple(topk_weights.shape)}; expected "
                         f"{tuple(topk_ids.shape)} (the shape of topk_ids)")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids has dtype {topk_ids.dtype}; expected torch.int32 or int64")
    if not topk_weights.dtype.is_floating_point:
        raise ValueError(f"topk_weights has dtype {topk_weights.dtype}; expected a "
                         "floating-point dtype")
    tensors = [("hidden_states", hidden_states), ("topk_weights", topk_weights),
               ("topk_ids", topk_ids)]
    if expert_map is not None:
        tensors.append(("expert_map", expert_map))
    for t_name, t in tensors:
        if t.device != experts.device:
            raise ValueError(f"{t_name} is on {t.device}; expected {experts.device} "
                             "(the experts' device)")
    if expert_map is None:
        return experts.num_experts
    if expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_map has shape {tuple(expert_map.shape)} and dtype "
                         f"{expert_map.dtype}; expected a 1-D int32 tensor [num_global_experts]")
    return expert_map.shape[0]


def moe_reference(
    hidden_states: torch.Tensor,
    experts: PackedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    round_intermediate: bool = False,
) -> torch.Tensor:
    """Reference MoE layer.

    ``out[m] = sum_k w[m,k] * W2[e] @ act(W13[e] @ x[m])`` with ``e = topk_ids[m, k]``
    (mapped through ``expert_map`` when given; experts mapped to -1 contribute zero). With
    ``apply_router_weight_on_input`` the weight scales ``x`` before GEMM1 instead of the output.

    Computed in ``compute_dtype`` (float32 or float64) from dequantized weights; the result is
    in ``compute_dtype``. ``round_intermediate`` rounds the activation between the two GEMMs to
    ``experts.dtype`` as the kernels do (it makes tolerances tighter, not looser).

    Args:
        hidden_states: ``[M, H]`` activations (any float dtype).
        experts: the packed experts (``E`` local experts).
        topk_weights: ``[M, top_k]`` router weights.
        topk_ids: ``[M, top_k]`` int32/int64 global expert ids in ``[0, num_global)``
            (``num_global`` = ``expert_map``'s length, else ``E``).
        expert_map: optional ``[num_global]`` global -> local id in ``[0, E)`` or -1.

    Returns:
        ``[M, H]`` in ``compute_dtype``. Reads ids back to the host (not graph-safe).
    """
    num_global = check_routing(hidden_states, experts, topk_weights, topk_ids, expert_map)
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype is {compute_dtype}; expected torch.float32 or "
                         "torch.float64")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation is {activation!r}; expected one of {ACTIVATIONS}")
    if topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_global:
            raise ValueError(f"topk_ids range over [{lo}, {hi}]; expected ids in "
                             f"[0, {num_global})")
    if expert_map is not None and expert_map.numel():
        lo, hi = int(expert_map.min()), int(expert_map.max())
        if lo < -1 or hi >= experts.num_experts:
            raise ValueError(f"expert_map ranges over [{lo}, {hi}]; expected local ids in "
                             f"[0, {experts.num_experts}) or -1")
    m, h = hidden_states.shape
    top_k = topk_ids.shape[1]
    w13, w2 = experts.dequantize(compute_dtype)
    x = hidden_states.to(compute_dtype)
    out = torch.zeros(m, h, dtype=compute_dtype, device=hidden_states.device)
    ids = topk_ids.to(torch.int64)
    if expert_map is not None:
        local = expert_map.to(device=ids.device, dtype=torch.int64)[ids]
    else:
        local = ids
    weights = topk_weights.to(compute_dtype)
    for k in range(top_k):
        for e in torch.unique(local[:, k]).tolist():
            if e < 0:
                continue
            rows = (local[:, k] == e).nonzero().squeeze(1)
            xr = x[rows]
            wr = weights[rows, k].unsqueeze(1)
            if apply_router_weight_on_input:
                xr = xr * wr
            inter = activation_and_mul(xr @ w13[e].T, activation)
            if round_intermediate:
                inter = inter.to(experts.dtype).to(compute_dtype)
            y = inter @ w2[e].T
            if not apply_router_weight_on_input:
                y = y * wr
            out.index_add_(0, rows, y)
    return out
