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
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return F.gelu(gate, approximate=approximate) * up


def check_routing(hidden_states: torch.Tensor, experts: PackedExperts, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> int:
    """Validate the routing inputs of one MoE forward; return the global expert count."""
    if hidden_states.dim() != 2 or hidden_states.shape[1] != experts.hidden_size:
        raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}; expected "
                         f"[M, {experts.hidden_size}]")
    m = hidden_states.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != m:
        raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)}; expected [{m}, top_k]")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights has shape {tuple(topk_weights.shape)}; expected "
                         f"{tuple(topk_ids.shape)} (the shape of topk_ids)")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids has dtype {topk_ids.dtype}; expected torch.int32 or int64")
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
    """
    num_global = check_routing(hidden_states, experts, topk_weights, topk_ids, expert_map)
    m, h = hidden_states.shape
    top_k = topk_ids.shape[1]
    w13, w2 = experts.dequantize(compute_dtype)
    x = hidden_states.to(compute_dtype)
    out = torch.zeros(m, h, dtype=compute_dtype, device=hidden_states.device)
    ids = topk_ids.to(torch.int64)
    if expert_map is not None:
        local = expert_map.to(device=ids.device, dtype=torch.int64)[ids.clamp(0, num_global - 1)]
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
