"""MoE layer shapes of real models, built in or read from a transformers ``config.json``.

A :class:`MoEShape` holds what a benchmark of one routed-experts layer needs: expert count,
top-k, hidden size H, per-expert intermediate size I, quantization group size, activation and
the router's scoring rules. Shared experts (DeepSeek, Qwen2-MoE) are noted but are not part
of the routed-experts layer the kernels compute: they are a dense MLP run beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from ..reference import ACTIVATIONS


@dataclass(frozen=True)
class MoEShape:
    """Shape and routing of one MoE layer.

    Attributes:
        name: short model name (``qwen3-30b-a3b``).
        num_experts: routed experts E.
        top_k: experts per token.
        hidden_size: H (GEMM1 reduction, GEMM2 output).
        intermediate_size: I of one expert (w13 has 2I rows, w2 reduces over I).
        group_size: int4 quantization group G along K.
        activation: ``silu``, ``gelu`` or ``gelu_tanh`` (gated: ``act(gate) * up``).
        scoring: router scores, ``softmax`` or ``sigmoid``.
        renormalize: rescale the top-k weights to sum to 1.
        num_layers: transformer layers of the model.
        num_moe_layers: how many of them are MoE layers (the others are dense MLPs).
        num_expert_group, topk_group: grouped top-k (DeepSeek); None when not grouped.
        correction_bias: the router adds a per-expert bias when choosing (DeepSeek-V3).
        routed_scaling_factor: multiplies the routed weights.
        num_shared_experts: always-on experts beside the routed ones (not benchmarked here).
        shared_intermediate_size: total intermediate size of the shared expert MLP.
        source: where the numbers come from (Hugging Face repository or config path).
    """

    name: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    group_size: int = 128
    activation: str = "silu"
    scoring: str = "softmax"
    renormalize: bool = True
    num_layers: int = 1
    num_moe_layers: int | None = None
    num_expert_group: int | None = None
    topk_group: int | None = None
    correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("num_experts", "top_k", "hidden_size", "intermediate_size", "num_layers"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{self.name}: {key} is {value!r}; expected a positive int")
        if self.top_k > self.num_experts:
            raise ValueError(f"{self.name}: top_k={self.top_k} exceeds num_experts="
                             f"{self.num_experts}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{self.name}: activation is {self.activation!r}; expected one of "
                             f"{ACTIVATIONS}")
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"{self.name}: scoring is {self.scoring!r}; expected 'softmax' or "
                             "'sigmoid'")
        for key, k in (("hidden_size", self.hidden_size),
                       ("intermediate_size", self.intermediate_size)):
            if k % 8:
                raise ValueError(f"{self.name}: {key}={k} is not a multiple of 8 (int4 packing)")
        if self.num_moe_layers is None:
            object.__setattr__(self, "num_moe_layers", self.num_layers)

    def group_for(self, k: int) -> int:
        """The group size used for reduction length ``k``: G, or per channel when G does not
        divide ``k``."""
        return self.group_size if self.group_size > 0 and k % self.group_size == 0 else k

    def scaled(self, **changes) -> MoEShape:
        """A copy with some fields changed (e.g. fewer experts for a CPU run)."""
        fields = asdict(self)
        fields.update(changes)
        return MoEShape(**fields)

    def describe(self) -> str:
        text = (f"{self.name}: E={self.num_experts} top_k={self.top_k} H={self.hidden_size} "
                f"I={self.intermediate_size} G={self.group_size} {self.activation}, "
                f"{self.num_moe_layers} MoE layers")
        if self.num_shared_experts:
            text += f", +{self.num_shared_experts} shared experts (not benchmarked)"
        return text


#: built-in shapes, numbers from each model's Hugging Face config.json
MODELS: dict[str, MoEShape] = {
    s.name: s
    for s in (
        MoEShape("qwen3-30b-a3b", num_experts=128, top_k=8, hidden_size=2048,
                 intermediate_size=768, num_layers=48, renormalize=True,
                 source="Qwen/Qwen3-30B-A3B"),
        MoEShape("mixtral-8x7b", num_experts=8, top_k=2, hidden_size=4096,
                 intermediate_size=14336, num_layers=32, renormalize=True,
                 source="mistralai/Mixtral-8x7B-v0.1"),
        # 27 layers, the first dense (first_k_dense_replace=1); 2 shared experts of I=1408
        # each run beside the routed ones; greedy (ungrouped) top-k, no renormalization.
        MoEShape("deepseek-v2-lite", num_experts=64, top_k=6, hidden_size=2048,
                 intermediate_size=1408, num_layers=27, num_moe_layers=26, renormalize=False,
                 num_shared_experts=2, shared_intermediate_size=2 * 1408,
                 source="deepseek-ai/DeepSeek-V2-Lite"),
        MoEShape("qwen3-235b-a22b", num_experts=128, top_k=8, hidden_size=4096,
                 intermediate_size=1536, num_layers=94, renormalize=True,
                 source="Qwen/Qwen3-235B-A22B"),
        MoEShape("olmoe-1b-7b", num_experts=64, top_k=8, hidden_size=2048,
                 intermediate_size=1024, num_layers=16, renormalize=False,
                 source="allenai/OLMoE-1B-7B-0924"),
    )
}
DEFAULT_MODEL = "qwen3-30b-a3b"


def get_shape(name: str) -> MoEShape:
    """A built-in shape by name (case-insensitive)."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)} "
                         "(or pass --config config.json)")
    return MODELS[key]


# -- config.json ------------------------------------------------------------------------------
_HIDDEN_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}
SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3",
                         "olmoe", "granitemoe", "granitemoeshared")


def _req(cfg: dict, key: str | tuple[str, ...], where: str) -> int:
    """The int at ``key`` (or the first present of several spellings) of ``cfg``."""
    if isinstance(key, tuple):
        key = next((k for k in key if cfg.get(k) is not None), key[0])
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{where} lacks {key!r}")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} is {value!r}; expected an int")
    return value


def _qwen_moe_layers(cfg: dict, num_layers: int) -> int:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return sum(1 for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def shape_from_config(path: str | os.PathLike, name: str | None = None,
                      group_size: int = 128) -> MoEShape:
    """Read a transformers ``config.json`` (or the directory holding one) into a
    :class:`MoEShape`.

    Supports model types qwen3_moe, qwen2_moe, mixtral, deepseek_v2, deepseek_v3, olmoe,
    granitemoe and granitemoeshared; a multimodal config's ``text_config`` is used when the
    outer model type is not one of them. Raises ValueError on other model types or missing keys.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a {type(cfg).__name__}; expected a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
        model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not a supported MoE model; "
                         f"expected one of {SUPPORTED_MODEL_TYPES}")
    where = f"{path} (model_type {model_type})"
    hidden = _req(cfg, "hidden_size", where)
    top_k = _req(cfg, "num_experts_per_tok", where)
    num_layers = _req(cfg, "num_hidden_layers", where)
    act_name = cfg.get("hidden_act", "silu")
    if act_name not in _HIDDEN_ACT:
        raise ValueError(f"{where}: hidden_act {act_name!r} is not supported; expected one of "
                         f"{sorted(_HIDDEN_ACT)}")
    fields: dict[str, object] = {
        "name": name or cfg.get("_name_or_path", "").rstrip("/").split("/")[-1].lower()
        or model_type,
        "hidden_size": hidden, "top_k": top_k, "num_layers": num_layers,
        "activation": _HIDDEN_ACT[act_name], "group_size": group_size, "source": path,
    }
    if model_type in ("qwen3_moe", "qwen2_moe"):
        # transformers 5.x writes num_local_experts where 4.x wrote num_experts
        fields["num_experts"] = _req(cfg, ("num_experts", "num_local_experts"), where)
        fields["intermediate_size"] = _req(cfg, "moe_intermediate_size", where)
        fields["renormalize"] = bool(cfg.get("norm_topk_prob", False))
        fields["num_moe_layers"] = _qwen_moe_layers(cfg, num_layers)
        shared = cfg.get("shared_expert_intermediate_size") or 0
        if model_type == "qwen2_moe" and shared:
            fields["num_shared_experts"] = 1
            fields["shared_intermediate_size"] = int(shared)
    elif model_type == "mixtral":
        fields["num_experts"] = _req(cfg, "num_local_experts", where)
        fields["intermediate_size"] = _req(cfg, "intermediate_size", where)
        fields["renormalize"] = True
    elif model_type in ("deepseek_v2", "deepseek_v3"):
        fields["num_experts"] = _req(cfg, "n_routed_experts", where)
        fields["intermediate_size"] = _req(cfg, "moe_intermediate_size", where)
        v3 = model_type == "deepseek_v3"
        fields["scoring"] = cfg.get("scoring_func", "sigmoid" if v3 else "softmax")
        fields["renormalize"] = bool(cfg.get("norm_topk_prob", v3))
        fields["routed_scaling_factor"] = float(cfg.get("routed_scaling_factor", 1.0) or 1.0)
        method = cfg.get("topk_method", "noaux_tc" if v3 else "greedy")
        n_group = cfg.get("n_group") or 1
        if method in ("group_limited_greedy", "noaux_tc") and n_group > 1:
            fields["num_expert_group"] = int(n_group)
            fields["topk_group"] = _req(cfg, "topk_group", where)
        fields["correction_bias"] = method == "noaux_tc"
        first_dense = int(cfg.get("first_k_dense_replace", 0) or 0)
        freq = int(cfg.get("moe_layer_freq", 1) or 1)
        fields["num_moe_layers"] = sum(1 for i in range(num_layers)
                                       if i >= first_dense and i % freq == 0)
        n_shared = int(cfg.get("n_shared_experts") or 0)
        fields["num_shared_experts"] = n_shared
        fields["shared_intermediate_size"] = n_shared * fields["intermediate_size"]
    elif model_type == "olmoe":
        # transformers 5.x writes num_local_experts where 4.x wrote num_experts
        fields["num_experts"] = _req(cfg, ("num_experts", "num_local_experts"), where)
        fields["intermediate_size"] = _req(cfg, "intermediate_size", where)
        fields["renormalize"] = bool(cfg.get("norm_topk_prob", False))
    else:  # granitemoe, granitemoeshared
        fields["num_experts"] = _req(cfg, "num_local_experts", where)
        fields["intermediate_size"] = _req(cfg, "intermediate_size", where)
        fields["renormalize"] = True  # top-k of the logits, then softmax over the k chosen
        shared = cfg.get("shared_intermediate_size") or 0
        if model_type == "granitemoeshared" and shared:
            fields["num_shared_experts"] = 1
            fields["shared_intermediate_size"] = int(shared)
    return MoEShape(**fields)
