"""``HybridW4A16MoEExperts``: the experts of one MoE layer, decode or prefill kernel by M.

GEMM1 (w13) -> activation -> GEMM2 (w2) -> top-k weighted sum. Few tokens run the split-K
decode kernel (weights streamed at memory bandwidth, no alignment pass); many tokens run the
grouped-GEMM prefill kernel. The switch point (``decode_threshold``: the largest M that runs
the decode kernel) comes from a measurement on the GPU, shipped per GPU and shape in
``kernels/configs/<gpu>_thresholds.json`` (``w4a16moe tune`` writes it), unless given.
"""

from __future__ import annotations

import json
import os
import warnings
from functools import cache

import torch
from torch import nn

from .layout import PackedExperts, PackedWeights
from .reference import ACTIVATIONS
from .routing import fused_topk

#: used when no measured threshold exists for the GPU and shape: the decode kernel streams
#: each active expert once per token, the prefill kernel once per block, so decode wins while
#: the tokens per expert stay small.
DEFAULT_DECODE_THRESHOLD = 32
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "kernels", "configs")


def thresholds_path(device_name: str) -> str:
    return os.path.join(CONFIG_DIR, device_name.replace(" ", "_") + "_thresholds.json")


def threshold_key(num_experts: int, hidden_size: int, intermediate_size: int, top_k: int,
                  group_size: int) -> str:
    return f"E={num_experts},H={hidden_size},I={intermediate_size},top_k={top_k},G={group_size}"


@cache
def _read_thresholds(path: str) -> dict[str, int]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        return {str(k): int(v) for k, v in data.items() if not str(k).startswith("_")}
    except (OSError, ValueError, TypeError) as exc:
        warnings.warn(f"ignoring decode thresholds file {path}: {exc}; using the default "
                      f"threshold {DEFAULT_DECODE_THRESHOLD}", stacklevel=3)
        return {}


def measured_decode_threshold(experts: PackedExperts, top_k: int,
                              device: torch.device | None = None) -> int | None:
    """The threshold measured for this GPU and layer shape, or None if none was shipped."""
    device = device or experts.device
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = _read_thresholds(thresholds_path(name))
    key = threshold_key(experts.num_experts, experts.hidden_size, experts.intermediate_size,
                        top_k, experts.w13.group_size)
    return table.get(key)


class HybridW4A16MoEExperts(nn.Module):
    """The routed experts of one MoE layer with int4 weights.

    Args:
        experts: the packed weights (local experts when ``expert_map`` is given).
        top_k: experts per token.
        activation: ``"silu"`` (SiLU(gate) * up), ``"gelu"`` or ``"gelu_tanh"``.
        apply_router_weight_on_input: scale the input of GEMM1 by the router weight instead
            of GEMM2's output.
        expert_map: optional int32 ``[num_global_experts]`` global -> local expert id, -1 for
            experts not on this rank (they contribute nothing).
        decode_threshold: the largest token count that runs the decode kernel (default: the
            measured value for this GPU and shape, else ``DEFAULT_DECODE_THRESHOLD``).

    ``forward(hidden_states [M, H], topk_weights [M, top_k], topk_ids [M, top_k]) -> [M, H]``.
    Workspaces are allocated on first use and reused; call :meth:`reserve` with the largest M
    before capturing a CUDA graph so that nothing is allocated inside the capture.
    """

    def __init__(self, experts: PackedExperts, top_k: int, *, activation: str = "silu",
                 apply_router_weight_on_input: bool = False,
                 expert_map: torch.Tensor | None = None,
                 decode_threshold: int | None = None) -> None:
        super().__init__()
        if not isinstance(experts, PackedExperts):
            raise ValueError(f"experts is a {type(experts).__name__}; expected PackedExperts")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation is {activation!r}; expected one of {ACTIVATIONS}")
        num_global = experts.num_experts if expert_map is None else expert_map.shape[0]
        if not 1 <= top_k <= num_global:
            raise ValueError(f"top_k is {top_k}; expected 1 <= top_k <= {num_global} experts")
        if decode_threshold is not None and decode_threshold < 0:
            raise ValueError(f"decode_threshold is {decode_threshold}; expected >= 0")
        self.top_k = top_k
        self.activation = activation
        self.apply_router_weight_on_input = apply_router_weight_on_input
        self._threshold_arg = decode_threshold
        self._meta = dict(num_experts=experts.num_experts, hidden_size=experts.hidden_size,
                          intermediate_size=experts.intermediate_size, dtype=experts.dtype)
        self._group_sizes = (experts.w13.group_size, experts.w2.group_size)
        for prefix, w in (("w13", experts.w13), ("w2", experts.w2)):
            for part in ("qweight", "scales", "zeros", "perm"):
                self.register_buffer(f"{prefix}_{part}", getattr(w, part))
        self.register_buffer("expert_map", None if expert_map is None
                             else expert_map.to(device=experts.device, dtype=torch.int32))
        self._experts = experts
        self._decode_ws = None
        self._prefill_ws = None

    # -- weights --------------------------------------------------------------------------
    @property
    def experts(self) -> PackedExperts:
        """The packed weights, rebuilt from the module's buffers after ``.to()``/``.cuda()``."""
        ex = self._experts
        if ex.w13.qweight is not self.w13_qweight or ex.w2.scales is not self.w2_scales:
            def weights(prefix: str, g: int) -> PackedWeights:
                return PackedWeights(
                    qweight=getattr(self, f"{prefix}_qweight"),
                    scales=getattr(self, f"{prefix}_scales"),
                    zeros=getattr(self, f"{prefix}_zeros"), perm=getattr(self, f"{prefix}_perm"),
                    group_size=g, name=prefix)

            meta = dict(self._meta, dtype=self.w13_scales.dtype)
            ex = PackedExperts(w13=weights("w13", self._group_sizes[0]),
                               w2=weights("w2", self._group_sizes[1]), **meta)
            self._experts = ex
            self._decode_ws = self._prefill_ws = None
        return ex

    @property
    def num_global_experts(self) -> int:
        return self._meta["num_experts"] if self.expert_map is None else self.expert_map.shape[0]

    @property
    def decode_threshold(self) -> int:
        if self._threshold_arg is not None:
            return self._threshold_arg
        measured = measured_decode_threshold(self.experts, self.top_k)
        return DEFAULT_DECODE_THRESHOLD if measured is None else measured

    def extra_repr(self) -> str:
        m = self._meta
        return (f"num_experts={m['num_experts']}, hidden_size={m['hidden_size']}, "
                f"intermediate_size={m['intermediate_size']}, top_k={self.top_k}, "
                f"group_size={self._group_sizes[0]}, activation={self.activation!r}")

    # -- workspaces -----------------------------------------------------------------------
    def reserve(self, max_tokens: int) -> None:
        """Allocate the workspaces for up to ``max_tokens`` tokens now (e.g. before graph
        capture), so later calls with at most that many tokens allocate nothing."""
        self._workspace("decode", min(max_tokens, max(self.decode_threshold, 1)))
        if max_tokens > self.decode_threshold:
            self._workspace("prefill", max_tokens)

    def _workspace(self, path: str, m: int):
        from .kernels.decode import DecodeWorkspace
        from .kernels.prefill import PrefillWorkspace

        ex = self.experts
        if path == "decode":
            ws = self._decode_ws
            if ws is None or ws.max_tokens < m:
                ws = self._decode_ws = DecodeWorkspace.create(ex, self.top_k, max(m, 1))
            return ws
        ws = self._prefill_ws
        if ws is None or ws.intermediate.shape[0] < m * self.top_k:
            ws = self._prefill_ws = PrefillWorkspace.allocate(
                max(m, 1), ex, self.top_k, num_global_experts=self.num_global_experts)
        return ws

    # -- forward --------------------------------------------------------------------------
    def choose_path(self, num_tokens: int) -> str:
        """``"decode"`` or ``"prefill"``: the kernel ``forward`` runs for ``num_tokens``."""
        return "decode" if num_tokens <= self.decode_threshold else "prefill"

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, *, path: str | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``[M, H]`` output; ``path`` forces ``"decode"`` or ``"prefill"``."""
        from .kernels.decode import fused_moe_decode
        from .kernels.prefill import fused_moe_prefill

        m = hidden_states.shape[0] if hidden_states.dim() == 2 else -1
        path = path or self.choose_path(m)
        if path not in ("decode", "prefill"):
            raise ValueError(f"path is {path!r}; expected 'decode' or 'prefill'")
        run = fused_moe_decode if path == "decode" else fused_moe_prefill
        return run(hidden_states, self.experts, topk_weights, topk_ids,
                   activation=self.activation,
                   apply_router_weight_on_input=self.apply_router_weight_on_input,
                   expert_map=self.expert_map, out=out,
                   workspace=self._workspace(path, max(m, 1)))

    def forward_logits(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *,
                       renormalize: bool = True, scoring: str = "softmax",
                       num_expert_group: int | None = None, topk_group: int | None = None,
                       correction_bias: torch.Tensor | None = None,
                       routed_scaling_factor: float = 1.0, path: str | None = None
                       ) -> torch.Tensor:
        """Route with :func:`~w4a16moe.routing.fused_topk` on ``router_logits [M, E]``, then
        :meth:`forward`."""
        topk_weights, topk_ids = fused_topk(
            router_logits, self.top_k, renormalize=renormalize, scoring=scoring,
            num_expert_group=num_expert_group, topk_group=topk_group,
            correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor)
        return self.forward(hidden_states, topk_weights, topk_ids, path=path)
