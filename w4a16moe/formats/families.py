"""Model families: where the experts of each MoE layer live in a Hugging Face checkpoint.

Per-expert module names (``{L}`` layer, ``{e}`` expert; a tensor name adds ``.qweight``,
``.weight_packed``, ``.weight`` ...):

==============  ==============================================  =====================
model_type      expert module                                   gate / up / down
==============  ==============================================  =====================
qwen3_moe       ``model.layers.{L}.mlp.experts.{e}``            gate_proj/up_proj/down_proj
qwen2_moe       ``model.layers.{L}.mlp.experts.{e}``            gate_proj/up_proj/down_proj
olmoe           ``model.layers.{L}.mlp.experts.{e}``            gate_proj/up_proj/down_proj
deepseek_v2/v3  ``model.layers.{L}.mlp.experts.{e}``            gate_proj/up_proj/down_proj
mixtral         ``model.layers.{L}.block_sparse_moe.experts.{e}``  w1 / w3 / w2
granitemoe      ``model.layers.{L}.block_sparse_moe.experts.{e}``  w1 / w3 / w2
==============  ==============================================  =====================

Not experts (left alone, reported): Qwen2-MoE ``mlp.shared_expert`` (+ ``shared_expert_gate``),
DeepSeek ``mlp.shared_experts``, Granite ``shared_mlp``; DeepSeek's first
``first_k_dense_replace`` layers (and those off ``moe_layer_freq``) are dense MLPs; Qwen MoE
layers listed in ``mlp_only_layers`` or off ``decoder_sparse_step`` are dense too.

Granite-MoE as trained stores each layer's experts fused, unquantized:
``block_sparse_moe.input_linear.weight`` ``[E, 2I, H]`` (gate rows then up) and
``block_sparse_moe.output_linear.weight`` ``[E, H, I]``. GPTQ / AWQ / compressed-tensors tools
quantize ``nn.Linear`` modules, so a quantized Granite-MoE checkpoint names its experts per
expert as Mixtral does (``block_sparse_moe.experts.{e}.w1`` ...), the names vLLM also accepts;
both are read here (the fused form as unquantized experts).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

PROJECTIONS = ("gate", "up", "down")


def _cfg_int(config: dict, keys: tuple[str, ...], family: str) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.json {key} is {value!r}; expected a positive integer")
            return value
    raise ValueError(f"config.json lacks {' / '.join(keys)} (needed for {family})")


def _all_layers(config: dict) -> list[int]:
    return list(range(_cfg_int(config, ("num_hidden_layers",), "the layer count")))


def _qwen_layers(config: dict) -> list[int]:
    step = config.get("decoder_sparse_step") or 1
    dense = set(config.get("mlp_only_layers") or [])
    return [i for i in _all_layers(config) if i not in dense and (i + 1) % step == 0]


def _deepseek_layers(config: dict) -> list[int]:
    first = config.get("first_k_dense_replace") or 0
    freq = config.get("moe_layer_freq") or 1
    return [i for i in _all_layers(config) if i >= first and i % freq == 0]


@dataclass(frozen=True)
class Family:
    """Tensor names and sizes of one model family.

    Attributes:
        model_type: ``config.json`` ``model_type``.
        expert_module: format string of one expert's module with ``{layer}`` and ``{expert}``.
        names: module names of the gate, up and down projections inside an expert.
        experts_keys / intermediate_keys: config keys of E and of I (first present wins).
        moe_layers: config -> indices of the layers that hold routed experts.
        shared: module names (relative to the layer) that hold shared experts, not converted.
        fused: (w13, w2) tensor names relative to the layer for fused unquantized experts.
    """

    model_type: str
    expert_module: str
    names: tuple[str, str, str]
    experts_keys: tuple[str, ...]
    intermediate_keys: tuple[str, ...]
    moe_layers: Callable[[dict], list[int]]
    shared: tuple[str, ...] = ()
    fused: tuple[str, str] | None = None

    def num_experts(self, config: dict) -> int:
        return _cfg_int(config, self.experts_keys, self.model_type)

    def hidden_size(self, config: dict) -> int:
        return _cfg_int(config, ("hidden_size",), self.model_type)

    def intermediate_size(self, config: dict) -> int:
        return _cfg_int(config, self.intermediate_keys, self.model_type)

    def module(self, layer: int, expert: int, proj: str) -> str:
        """Full module name of one projection (``proj`` in gate / up / down)."""
        return (self.expert_module.format(layer=layer, expert=expert)
                + "." + self.names[PROJECTIONS.index(proj)])

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def expert_regex(self) -> re.Pattern[str]:
        """Matches a per-expert tensor name; groups: layer, expert, projection name, suffix."""
        mod = re.escape(self.expert_module).replace(r"\{layer\}", r"(\d+)")
        mod = mod.replace(r"\{expert\}", r"(\d+)")
        return re.compile(rf"^{mod}\.({'|'.join(map(re.escape, self.names))})\.(\w+)$")

    def experts_container_regex(self) -> re.Pattern[str]:
        """Matches every tensor under a layer's experts container (per expert or fused)."""
        container = self.expert_module.split(".{expert}")[0]
        return re.compile("^" + re.escape(container).replace(r"\{layer\}", r"(\d+)") + r"\.")


_QWEN_NAMES = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_NAMES = ("w1", "w3", "w2")
_MLP = "model.layers.{layer}.mlp.experts.{expert}"
_BSM = "model.layers.{layer}.block_sparse_moe.experts.{expert}"

FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family("qwen3_moe", _MLP, _QWEN_NAMES, ("num_experts", "num_local_experts"),
                        ("moe_intermediate_size",), _qwen_layers),
    "qwen2_moe": Family("qwen2_moe", _MLP, _QWEN_NAMES, ("num_experts", "num_local_experts"),
                        ("moe_intermediate_size",), _qwen_layers,
                        shared=("mlp.shared_expert", "mlp.shared_expert_gate")),
    "olmoe": Family("olmoe", _MLP, _QWEN_NAMES, ("num_experts", "num_local_experts"),
                    ("intermediate_size",), _all_layers),
    "deepseek_v2": Family("deepseek_v2", _MLP, _QWEN_NAMES, ("n_routed_experts",),
                          ("moe_intermediate_size",), _deepseek_layers,
                          shared=("mlp.shared_experts",)),
    "deepseek_v3": Family("deepseek_v3", _MLP, _QWEN_NAMES, ("n_routed_experts",),
                          ("moe_intermediate_size",), _deepseek_layers,
                          shared=("mlp.shared_experts",)),
    "mixtral": Family("mixtral", _BSM, _MIXTRAL_NAMES, ("num_local_experts",),
                      ("intermediate_size",), _all_layers),
    "granitemoe": Family("granitemoe", _BSM, _MIXTRAL_NAMES, ("num_local_experts",),
                         ("intermediate_size",), _all_layers, shared=("shared_mlp",),
                         fused=("block_sparse_moe.input_linear.weight",
                                "block_sparse_moe.output_linear.weight")),
}


def family_for(config: dict) -> Family:
    """The family of a ``config.json`` (by ``model_type``); ``ValueError`` naming an unknown
    one."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"config.json model_type is {model_type!r}; expected one of "
                         f"{tuple(FAMILIES)}")
    return FAMILIES[model_type]
