"""Hugging Face transformers 5.x models with int4 routed experts.

In transformers 5.x every supported MoE family stores the routed experts of a layer as one
module holding two fused 3-D parameters, ``gate_up_proj`` ``[E, 2I, H]`` (gate rows ``[0, I)``,
up rows ``[I, 2I)``, ``y = x @ W.T``) and ``down_proj`` ``[E, H, I]``, called by its MoE block
as ``experts(hidden_states [M, H], top_k_index [M, k], top_k_weights [M, k]) -> [M, H]``
after the block's own router chose the experts. That is exactly the packed layout's w13 / w2,
so the integration swaps that one module, in every MoE block, for :class:`W4A16Experts`:

* the router (softmax or sigmoid scores, ``norm_topk_prob``, DeepSeek's grouped top-k,
  correction bias and ``routed_scaling_factor``, Granite's softmax over the top-k logits, the
  router's dtype), the shared experts (Qwen2-MoE ``shared_expert`` + ``shared_expert_gate``,
  DeepSeek ``shared_experts``) and the rest of the model run unchanged, so the routing is the
  model's own; the softmax top-k routers of Qwen3-MoE, Qwen2-MoE, OLMoE and Mixtral keep
  their weight and outputs but compute softmax, top-k, renormalisation and cast in one
  kernel after their linear layer (:class:`FusedTopKRouter`, ``fused_router=False`` keeps
  the original module): the same experts except between exactly equal scores, the weights
  to float32 rounding;
* the routed experts run through :class:`~w4a16moe.experts.HybridW4A16MoEExperts` (decode or
  prefill kernel by token count).

===========  ======================================  ==================================
model_type   MoE block (5.x module name)             router; kept beside the experts
===========  ======================================  ==================================
qwen3_moe    ``model.layers.{L}.mlp``                ``gate``
qwen2_moe    ``model.layers.{L}.mlp``                ``gate``; ``shared_expert(_gate)``
mixtral      ``model.layers.{L}.mlp`` (*)            ``gate``
deepseek_v2  ``model.layers.{L}.mlp``                ``gate``; ``shared_experts``
deepseek_v3  ``model.layers.{L}.mlp``                ``gate`` (+ bias); ``shared_experts``
olmoe        ``model.layers.{L}.mlp``                ``gate``
granitemoe   ``model.layers.{L}.block_sparse_moe``   ``router`` (*)
===========  ======================================  ==================================

(*) checkpoints name them ``block_sparse_moe`` (Mixtral) and ``router.layer`` (Granite).

Two ways in:

* :func:`quantize_model` quantizes the bf16 experts of a loaded model (round to nearest) and
  frees them;
* :func:`load_quantized` builds the model from a GPTQ / AWQ / compressed-tensors checkpoint
  directory without materialising bf16 experts: the experts go through the converters of
  :mod:`w4a16moe.formats`, every other tensor is loaded as stored. Only expert weights stay
  int4: any other quantized linear layer of the checkpoint (attention projections, shared
  experts, ``lm_head``) is dequantized exactly (``(q - z) * s``) to the model dtype.

The swapped module is safe for ``model.generate``, the static KV cache and CUDA graphs: its
forward reads nothing back to the host and picks the kernel from the token count (a shape).
Under ``torch.compile`` the kernels run as the custom op ``torch.ops.w4a16moe.moe_experts``
(an opaque node with a shape-only fake implementation), so ``fullgraph=True`` traces through.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
import os
import re
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ..experts import PATHS, HybridW4A16MoEExperts
from ..layout import FLOAT_DTYPES, PackedExperts
from ..quantize import quantize_experts
from ..reference import ACTIVATIONS

# --------------------------------------------------------------------------------------------
# families
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformersFamily:
    """Where a transformers 5.x model family keeps its MoE pieces.

    Attributes:
        model_type: ``config.model_type``.
        modeling: module of the modeling code (``transformers.models...``).
        experts_class: name of the experts module class (fused ``gate_up_proj`` /
            ``down_proj``) in ``modeling``.
        block: attribute of a decoder layer that holds the MoE block.
        router: attribute of the MoE block that holds the router (kept).
        kept: other children of the MoE block kept as they are (shared experts).
        renames: ``(5.x name part, checkpoint name part)`` pairs: a non-expert tensor named
            ``a`` in the model may be stored under the name with ``a`` replaced by the
            checkpoint part (the names transformers 5.x itself converts on load).
    """

    model_type: str
    modeling: str
    experts_class: str
    block: str = "mlp"
    router: str = "gate"
    kept: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()

    def experts_type(self) -> type[nn.Module]:
        module = importlib.import_module(self.modeling)
        cls = getattr(module, self.experts_class, None)
        if cls is None:
            raise ValueError(f"{self.modeling} has no {self.experts_class}; this transformers "
                             f"version stores {self.model_type} experts differently (expected "
                             "transformers 5.x with fused gate_up_proj / down_proj experts)")
        return cls


def _family(model_type: str, stem: str, experts_class: str, **kw) -> TransformersFamily:
    return TransformersFamily(model_type, f"transformers.models.{stem}.modeling_{stem}",
                              experts_class, **kw)


FAMILIES: dict[str, TransformersFamily] = {
    f.model_type: f
    for f in (
        _family("qwen3_moe", "qwen3_moe", "Qwen3MoeExperts"),
        _family("qwen2_moe", "qwen2_moe", "Qwen2MoeExperts",
                kept=("shared_expert", "shared_expert_gate")),
        _family("mixtral", "mixtral", "MixtralExperts",
                renames=((".mlp.", ".block_sparse_moe."),)),
        _family("deepseek_v2", "deepseek_v2", "DeepseekV2Experts", kept=("shared_experts",)),
        _family("deepseek_v3", "deepseek_v3", "DeepseekV3Experts", kept=("shared_experts",)),
        _family("olmoe", "olmoe", "OlmoeExperts"),
        _family("granitemoe", "granitemoe", "GraniteMoeExperts", block="block_sparse_moe",
                router="router", renames=((".router.weight", ".router.layer.weight"),)),
    )
}

#: ``config.hidden_act`` -> the kernels' activation
HIDDEN_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
              "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def family_of(config) -> TransformersFamily:
    """The family of a transformers config (or model); ``ValueError`` naming an unsupported
    ``model_type``."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; expected one of "
                         f"{tuple(FAMILIES)}")
    return FAMILIES[model_type]


def activation_for(config) -> str:
    """The kernels' activation for ``config.hidden_act``; ``ValueError`` if none matches."""
    act = getattr(config, "hidden_act", "silu")
    if act not in HIDDEN_ACT:
        raise ValueError(f"config.hidden_act is {act!r}; expected one of {tuple(HIDDEN_ACT)}")
    out = HIDDEN_ACT[act]
    assert out in ACTIVATIONS
    return out


def _top_k(config) -> int:
    k = getattr(config, "num_experts_per_tok", None)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"config.num_experts_per_tok is {k!r}; expected a positive int")
    return k


def routing_kwargs(config, router: nn.Module | None = None) -> dict:
    """Keyword arguments of :func:`~w4a16moe.routing.fused_topk` that reproduce the router
    of a transformers 5.x MoE block of this family (the swapped blocks keep the model's own
    router; this is for code that routes with ``fused_topk``, e.g.
    :meth:`~w4a16moe.experts.HybridW4A16MoEExperts.forward_logits`).

    ``router`` (the block's router module) supplies DeepSeek-V3's correction bias. Granite's
    softmax over the top-k logits equals the renormalized softmax; DeepSeek-V2 never
    renormalizes (its router ignores ``norm_topk_prob``) and applies grouped top-k only with
    ``topk_method="group_limited_greedy"``.
    """
    family = family_of(config)
    kw: dict = {"top_k": _top_k(config), "scoring": "softmax", "renormalize": True}
    mt = family.model_type
    if mt in ("qwen3_moe", "qwen2_moe", "olmoe"):
        kw["renormalize"] = bool(getattr(config, "norm_topk_prob", False))
    elif mt == "deepseek_v2":
        kw["renormalize"] = False
        if getattr(config, "topk_method", "greedy") == "group_limited_greedy":
            kw.update(num_expert_group=config.n_group, topk_group=config.topk_group)
        kw["routed_scaling_factor"] = float(config.routed_scaling_factor)
    elif mt == "deepseek_v3":
        kw.update(scoring="sigmoid", renormalize=bool(config.norm_topk_prob),
                  num_expert_group=config.n_group, topk_group=config.topk_group,
                  routed_scaling_factor=float(config.routed_scaling_factor))
        if router is not None:
            kw["correction_bias"] = router.e_score_correction_bias
    return kw


@dataclass
class MoEBlockRef:
    """One MoE block of a model: ``block.experts`` is the routed experts module."""

    layer: int
    name: str  # module name of the block, e.g. "model.layers.3.mlp"
    block: nn.Module

    @property
    def experts(self) -> nn.Module:
        return self.block.experts


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def find_moe_blocks(model: nn.Module, family: TransformersFamily | None = None,
                    include_swapped: bool = False) -> list[MoEBlockRef]:
    """The MoE blocks of ``model`` in layer order: blocks whose ``experts`` child is the
    family's experts class (or a :class:`W4A16Experts` when ``include_swapped``)."""
    family = family or family_of(model)
    cls = family.experts_type()
    out = []
    for name, module in model.named_modules():
        child = module._modules.get("experts") if hasattr(module, "_modules") else None
        if child is None:
            continue
        if not (isinstance(child, cls) or (include_swapped and isinstance(child, W4A16Experts))):
            continue
        m = _LAYER_RE.search(name + ".")
        if m is None:
            raise ValueError(f"{name}.experts is not inside a numbered decoder layer "
                             "(model.layers.N); cannot tell which layer it belongs to")
        out.append(MoEBlockRef(int(m.group(1)), name, module))
    return sorted(out, key=lambda r: r.layer)


# --------------------------------------------------------------------------------------------
# the swapped module and its custom op
# --------------------------------------------------------------------------------------------
#: live :class:`W4A16Experts` by handle, for the custom op (which takes tensors and ints only)
_MODULES: weakref.WeakValueDictionary[int, W4A16Experts] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@torch.library.custom_op("w4a16moe::moe_experts", mutates_args=())
def moe_experts_op(hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, handle: int, path: str) -> torch.Tensor:
    """Routed experts of the :class:`W4A16Experts` registered as ``handle``: ``[M, H]``.

    ``path`` is ``"decode"``, ``"prefill"`` or ``""`` (chosen by M). The kernels' workspaces
    belong to the module and are reused; the output is a new tensor."""
    module = _MODULES.get(handle)
    if module is None:
        raise RuntimeError(f"w4a16moe::moe_experts: no live W4A16Experts with handle {handle}")
    return module.moe(hidden_states, topk_weights, topk_ids, path=path or None)


@moe_experts_op.register_fake
def _moe_experts_fake(hidden_states, topk_weights, topk_ids, handle, path):
    return hidden_states.new_empty(hidden_states.shape)


@torch.library.custom_op("w4a16moe::topk_router", mutates_args=())
def topk_router_op(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                   weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k of ``router_logits [M, E]``: ``(weights [M, top_k] in weights_dtype,
    ids [M, top_k] int64)``, one Triton kernel on a GPU
    (:func:`~w4a16moe.routing.fused_topk`), the torch path elsewhere."""
    from ..kernels.router import topk_router
    from ..routing import fused_topk

    if router_logits.is_cuda:
        return topk_router(router_logits, top_k, renormalize=renormalize,
                           weights_dtype=weights_dtype, ids_dtype=torch.int64)
    w, ids = fused_topk(router_logits, top_k, renormalize=renormalize, backend="torch")
    return w.to(weights_dtype), ids.long()


@topk_router_op.register_fake
def _topk_router_fake(router_logits, top_k, renormalize, weights_dtype):
    m = router_logits.shape[0]
    return (router_logits.new_empty((m, top_k), dtype=weights_dtype),
            router_logits.new_empty((m, top_k), dtype=torch.int64))


#: transformers 5.x router classes whose forward is exactly ``logits = x @ W^T``, softmax in
#: float32, ``topk``, renormalised when ``norm_topk_prob`` (always for Mixtral), scores cast
#: to the logits' dtype (not for Mixtral): class name -> (always renormalise, cast scores)
FUSABLE_ROUTERS: dict[str, tuple[bool, bool]] = {
    "Qwen3MoeTopKRouter": (False, True),
    "Qwen2MoeTopKRouter": (False, True),
    "OlmoeTopKRouter": (False, True),
    "MixtralTopKRouter": (True, False),
}


class FusedTopKRouter(nn.Module):
    """A transformers softmax top-k router computed by one Triton kernel after its linear
    layer (instead of softmax, topk, sum, divide and cast: five launches per layer, ~9 us
    of a Qwen3 decode step on an H100). Same parameter (``weight`` ``[E, H]``, so state
    dicts are unchanged), same outputs ``(router_logits, scores, indices int64)``; the
    selection can differ from ``torch.topk`` only between exactly equal scores (the lower
    expert id wins here).

    Built by :func:`fuse_routers` from a router listed in :data:`FUSABLE_ROUTERS`.
    """

    def __init__(self, router: nn.Module, renormalize: bool, cast_scores: bool) -> None:
        super().__init__()
        self.weight = router.weight
        self.top_k = int(router.top_k)
        self.num_experts = int(router.num_experts)
        self.hidden_dim = int(router.hidden_dim)
        self.renormalize = bool(renormalize)
        self.cast_scores = bool(cast_scores)
        self.replaced = type(router).__name__

    def extra_repr(self) -> str:
        return (f"{self.replaced}: top_k={self.top_k}, experts={self.num_experts}, "
                f"renormalize={self.renormalize}")

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = nn.functional.linear(hidden_states, self.weight)
        dtype = logits.dtype if self.cast_scores else torch.float32
        scores, indices = topk_router_op(logits, self.top_k, self.renormalize, dtype)
        return logits, scores, indices


def fuse_routers(model: nn.Module) -> int:
    """Replace the router of every MoE block whose class is in :data:`FUSABLE_ROUTERS` by a
    :class:`FusedTopKRouter` sharing its weight, in place; return how many were replaced
    (routers of other families, e.g. DeepSeek's grouped top-k, are left as they are)."""
    family = family_of(model)
    count = 0
    for ref in find_moe_blocks(model, family, include_swapped=True):
        router = getattr(ref.block, family.router, None)
        spec = FUSABLE_ROUTERS.get(type(router).__name__) if router is not None else None
        if spec is None:
            continue
        always, cast = spec
        renorm = always or bool(getattr(router, "norm_topk_prob", False))
        setattr(ref.block, family.router, FusedTopKRouter(router, renorm, cast))
        count += 1
    return count


class W4A16Experts(nn.Module):
    """Drop-in replacement of a transformers 5.x experts module with int4 weights.

    ``forward(hidden_states [M, H], top_k_index [M, top_k], top_k_weights [M, top_k]) ->
    [M, H]``, the call signature of the experts modules it replaces. Activations of another
    dtype than the experts' are cast in and the output cast back.

    Args:
        experts: the packed weights of one layer (``E`` experts, ``H``, ``I``).
        top_k: experts per token (the router's ``num_experts_per_tok``).
        activation: ``"silu"``, ``"gelu"`` or ``"gelu_tanh"``.
        decode_threshold: largest token count that runs the decode kernel (default: measured
            for the GPU, see :class:`~w4a16moe.experts.HybridW4A16MoEExperts`).
        path: force ``"decode"``, ``"mixed"`` or ``"prefill"`` for every call (default: by
            token count).
    """

    def __init__(self, experts: PackedExperts, top_k: int, *, activation: str = "silu",
                 decode_threshold: int | None = None, path: str | None = None) -> None:
        super().__init__()
        if path not in (None, *PATHS):
            raise ValueError(f"path is {path!r}; expected None or one of {PATHS}")
        self.moe = HybridW4A16MoEExperts(experts, top_k, activation=activation,
                                         decode_threshold=decode_threshold)
        self.num_experts = experts.num_experts
        self.hidden_dim = experts.hidden_size
        self.intermediate_dim = experts.intermediate_size
        self.top_k = top_k
        self.path = path
        self._register()

    def _register(self) -> None:
        self._handle = next(_HANDLES)
        _MODULES[self._handle] = self

    def __setstate__(self, state) -> None:
        # copy.deepcopy / pickle: the copy gets its own handle for the custom op
        super().__setstate__(state)
        self._register()

    @property
    def dtype(self) -> torch.dtype:
        return self.moe.w13_scales.dtype

    @property
    def packed(self) -> PackedExperts:
        return self.moe.experts

    def extra_repr(self) -> str:
        return f"path={self.path!r}" if self.path else ""

    def reserve(self, max_tokens: int) -> None:
        """Allocate the kernels' workspaces for up to ``max_tokens`` tokens now (call before
        capturing a CUDA graph)."""
        self.moe.reserve(max_tokens)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up_proj [E, 2I, H], down_proj [E, H, I])`` dequantized, in the layout of
        the transformers module this one replaced."""
        return self.packed.dequantize(dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        x = x.contiguous()
        ids = top_k_index.contiguous()
        weights = top_k_weights.contiguous()
        if torch.compiler.is_compiling():
            out = moe_experts_op(x, weights, ids, self._handle, self.path or "")
        else:
            out = self.moe(x, weights, ids, path=self.path)
        return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


def swapped_experts(model: nn.Module) -> list[W4A16Experts]:
    """Every :class:`W4A16Experts` of ``model``."""
    return [m for m in model.modules() if isinstance(m, W4A16Experts)]


def prepare_for_cuda_graphs(model: nn.Module, max_tokens: int) -> int:
    """Reserve the workspaces of every swapped experts module for up to ``max_tokens`` tokens
    per forward, so that a CUDA graph captured afterwards allocates nothing in them. Returns
    the number of modules prepared."""
    mods = swapped_experts(model)
    for m in mods:
        m.reserve(max_tokens)
    return len(mods)


# --------------------------------------------------------------------------------------------
# quantize a loaded model
# --------------------------------------------------------------------------------------------
def _check_experts_module(experts: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    for flag, want in (("has_bias", False), ("is_transposed", False), ("has_gate", True),
                       ("is_concatenated", True)):
        if getattr(experts, flag, want) != want:
            raise ValueError(f"{name}: {flag}={getattr(experts, flag)}; only experts with "
                             f"{flag}={want} map to the packed layout")
    w13 = getattr(experts, "gate_up_proj", None)
    w2 = getattr(experts, "down_proj", None)
    if not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor):
        raise ValueError(f"{name} has no gate_up_proj / down_proj tensors (already quantized, "
                         "or not a transformers 5.x experts module)")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"{name}.gate_up_proj has shape {tuple(w13.shape)} and down_proj "
                         f"{tuple(w2.shape)}; expected [E, 2I, H] and [E, H, I]")
    e, two_i, h = w13.shape
    if two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"{name}.down_proj has shape {tuple(w2.shape)}; expected "
                         f"{(e, h, two_i // 2)} to match gate_up_proj {tuple(w13.shape)}")
    if w13.device.type == "meta" or w2.device.type == "meta":
        raise ValueError(f"{name}: the expert weights are on the meta device; load the "
                         "model's weights before quantizing it")
    return w13, w2


def quantize_expert_weights(gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                            group_size: int = 128, symmetric: bool = True,
                            dtype: torch.dtype = torch.bfloat16,
                            chunk_bytes: int = 1 << 28) -> PackedExperts:
    """:func:`~w4a16moe.quantize.quantize_experts` of ``gate_up_proj [E, 2I, H]`` and
    ``down_proj [E, H, I]`` a few experts at a time, so the float32 temporaries stay near
    ``chunk_bytes`` (a 128-expert layer does not need gigabytes of scratch)."""
    from ..formats.common import concat_experts

    e = gate_up_proj.shape[0]
    per_expert = 4 * max(gate_up_proj[0].numel(), down_proj[0].numel()) if e else 1
    step = max(1, chunk_bytes // max(per_expert, 1))
    if step >= e:
        return quantize_experts(gate_up_proj.detach(), down_proj.detach(), group_size,
                                symmetric, dtype)
    pieces = [quantize_experts(gate_up_proj[a:a + step].detach(), down_proj[a:a + step].detach(),
                               group_size, symmetric, dtype) for a in range(0, e, step)]
    starts = list(range(0, e, step))
    w13 = concat_experts([p.w13 for p in pieces], "w13", starts)
    w2 = concat_experts([p.w2 for p in pieces], "w2", starts)
    return PackedExperts(w13=w13, w2=w2, num_experts=e, hidden_size=pieces[0].hidden_size,
                         intermediate_size=pieces[0].intermediate_size, dtype=dtype)


def _experts_dtype(w: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype is {dtype}; expected torch.float16 or torch.bfloat16")
        return dtype
    return w.dtype if w.dtype in FLOAT_DTYPES else torch.bfloat16


def quantize_model(model: nn.Module, group_size: int = 128, symmetric: bool = True, *,
                   dtype: torch.dtype | None = None, decode_threshold: int | None = None,
                   path: str | None = None, fused_router: bool = True,
                   progress: bool = False) -> nn.Module:
    """Quantize the routed experts of every MoE block of a loaded transformers 5.x model to
    int4 (round to nearest, :func:`~w4a16moe.quantize.quantize_experts`) and swap each
    experts module for a :class:`W4A16Experts`, in place. Shared experts and every other
    module are untouched; routers keep their weights and outputs (softmax top-k routers are
    computed by one kernel, see ``fused_router``); the bf16 expert weights are freed.

    Args:
        model: a loaded Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V2/V3, OLMoE or Granite-MoE
            model (``...ForCausalLM`` or the bare model), weights materialised.
        group_size: 32, 64, 128 or -1 (per channel); must divide H and I.
        symmetric: symmetric (zero point 8) or asymmetric (stored zero points).
        dtype: activation and scale dtype of the kernels (default: the experts' dtype when
            fp16/bf16, else bf16; other activation dtypes are cast in and out).
        decode_threshold, path: passed to :class:`W4A16Experts`.
        fused_router: compute softmax top-k routers with one kernel (:func:`fuse_routers`;
            same weights and outputs).
        progress: print one line per layer.

    Returns:
        ``model``. ``ValueError`` for an unsupported family, a model with no MoE block, expert
        weights on the meta device or sizes the group size does not divide.
    """
    family = family_of(model)
    refs = find_moe_blocks(model, family)
    if not refs:
        raise ValueError(f"no {family.experts_class} module found in the {family.model_type} "
                         "model (already quantized?)")
    config = model.config
    top_k = _top_k(config)
    activation = activation_for(config)
    for ref in refs:
        name = f"{ref.name}.experts"
        w13, w2 = _check_experts_module(ref.experts, name)
        dt = _experts_dtype(w13, dtype)
        try:
            packed = quantize_expert_weights(w13, w2, group_size, symmetric, dt)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        old = ref.experts
        ref.block.experts = W4A16Experts(packed, top_k, activation=activation,
                                         decode_threshold=decode_threshold, path=path)
        # free the float weights even if something else still holds the old module
        old.gate_up_proj = None
        old.down_proj = None
        del old
        if progress:
            print(f"quantized {name}: {packed.num_experts} experts, "
                  f"{packed.nbytes / 2**20:.1f} MiB int4", flush=True)
    if fused_router:
        fuse_routers(model)
    if any(p.is_cuda for p in model.parameters()):
        torch.cuda.empty_cache()
    return model


# --------------------------------------------------------------------------------------------
# building a model without materialising its weights
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, every ``nn.Parameter`` a module registers goes to the ``meta``
    device (no memory, no initialisation), while buffers (rotary ``inv_freq`` ...) are made
    as usual. The model is then filled with :func:`materialize`."""
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_empty_model(config, dtype: torch.dtype = torch.bfloat16,
                      attn_implementation: str | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` with its parameters on the ``meta``
    device (see :func:`parameters_on_meta`)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def _tensor_slots(model: nn.Module, skip: tuple[type, ...] = ()
                  ) -> dict[int, list[tuple[nn.Module, str, str, bool]]]:
    """Parameters and persistent buffers of ``model`` outside modules of types ``skip``:
    ``id(tensor) -> [(owner module, attribute, full name, is_parameter)]`` (tied tensors
    share one entry)."""
    slots: dict[int, list] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        if skip and isinstance(module, skip):
            return
        for attr, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((module, attr, prefix + attr, True))
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                slots.setdefault(id(b), []).append((module, attr, prefix + attr, False))
        for child_name, child in module._modules.items():
            if child is not None:
                walk(child, prefix + child_name + ".")

    walk(model, "")
    return slots


def _assign(entries: list[tuple[nn.Module, str, str, bool]], value: torch.Tensor) -> None:
    """Put ``value`` in every slot of one (possibly tied) tensor."""
    first_is_param = entries[0][3]
    new = nn.Parameter(value, requires_grad=False) if first_is_param else value
    for module, attr, _, is_param in entries:
        if is_param:
            module._parameters[attr] = new
        else:
            module._buffers[attr] = new


def materialize(model: nn.Module, device: str | torch.device, fill,
                skip: tuple[type, ...] = ()) -> None:
    """Replace every ``meta`` parameter / buffer of ``model`` (outside modules of types
    ``skip``) by ``fill(name, like, device)``, a tensor of ``like``'s shape on ``device``
    (cast to ``like``'s dtype here), and move the remaining tensors to ``device``. Tied
    tensors stay tied."""
    device = torch.device(device)
    for entries in _tensor_slots(model, skip).values():
        module, attr, name, is_param = entries[0]
        t = module._parameters[attr] if is_param else module._buffers[attr]
        if t.device.type != "meta":
            continue
        value = fill(name, t, device)
        if tuple(value.shape) != tuple(t.shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {tuple(t.shape)}")
        _assign(entries, value.to(device=device, dtype=t.dtype))
    _check_no_meta(model)
    model.to(device)


def _check_no_meta(model: nn.Module) -> None:
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    leftover += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if leftover:
        raise ValueError(f"{leftover[0]} is still on the meta device after loading "
                         f"({len(leftover)} tensors)")


def random_fill(std: float = 0.02, seed: int = 0):
    """A ``fill`` for :func:`materialize`, made directly on the target device: norm weights
    1, biases 0, other weights ``N(0, std)``."""
    generators: dict[str, torch.Generator] = {}

    def fill(name: str, like: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in generators:
            generators[key] = torch.Generator(device=device)
            generators[key].manual_seed(seed)
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and like.dim() == 1:
            return torch.ones(like.shape, dtype=like.dtype, device=device)
        if "bias" in leaf or not like.dtype.is_floating_point:
            return torch.zeros(like.shape, dtype=like.dtype, device=device)
        out = torch.empty(like.shape, dtype=like.dtype, device=device)
        return out.normal_(0.0, std, generator=generators[key])

    return fill


# --------------------------------------------------------------------------------------------
# loading a quantized checkpoint
# --------------------------------------------------------------------------------------------
_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _candidates(name: str, family: TransformersFamily) -> list[str]:
    out = [name]
    for model_part, ckpt_part in family.renames:
        if model_part in name:
            out.append(name.replace(model_part, ckpt_part))
    return out


def _dequantize_linear(ckpt, module: str, n: int, k: int, dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """Dequantize the non-expert quantized linear ``module`` (weight ``[n, k]``) of a
    checkpoint to ``dtype``: ``(weight, checkpoint tensor names read)``."""
    from ..formats.common import pack_projections

    quant, fmt, store = ckpt.quant, ckpt.format, ckpt.store
    if quant is None or fmt is None:
        raise ValueError(f"{module} is stored quantized but the checkpoint has no "
                         "quantization config")
    scheme, reason = quant.scheme_for(module)
    if scheme is None:
        raise ValueError(f"{module}.{fmt.PRIMARY} is stored quantized, but the quantization "
                         f"config says the module is not ({reason})")
    if scheme.bits != 4:
        raise ValueError(f"{module}: quantized with bits={scheme.bits}; only 4-bit layers "
                         "can be read (non-expert layers are dequantized to the model dtype)")
    required, optional = fmt.tensor_suffixes(scheme)
    missing = [s for s in required if f"{module}.{s}" not in store]
    if missing:
        raise ValueError(f"missing tensor {module}.{missing[0]} ({quant.format_name} needs "
                         f"{list(required)})")
    names = [f"{module}.{s}" for s in required + optional if f"{module}.{s}" in store]
    tensors = {n_.rsplit(".", 1)[1]: store.get(n_).to(device) for n_ in names}
    kw = {"checkpoint_format": quant.checkpoint_format} if quant.method == "gptq" else {}
    decoded = fmt.decode(tensors, n, k, scheme, module, **kw)
    packed = pack_projections([decoded], module)
    return packed.dequantize(torch.float32)[0].to(dtype), names


def load_quantized(checkpoint_dir: str | os.PathLike, device: str | torch.device = "cuda",
                   dtype: torch.dtype = torch.bfloat16, *, decode_threshold: int | None = None,
                   quantize_unquantized: bool = False, attn_implementation: str | None = None,
                   fused_router: bool = True, progress: bool = False) -> nn.Module:
    """A transformers 5.x ``...ForCausalLM`` built from a quantized MoE checkpoint directory
    with int4 routed experts (:class:`W4A16Experts`) and every other weight in ``dtype``.

    The model is built from ``config.json`` with its parameters on the ``meta`` device, the
    experts of each MoE layer are converted by :class:`w4a16moe.formats.Checkpoint` (GPTQ
    v1/v2, AWQ GEMM, compressed-tensors pack-quantized) straight into the packed layout on
    ``device``, and the other tensors are read under their 5.x names or the checkpoint names
    transformers converts (Mixtral ``block_sparse_moe`` -> ``mlp``, Granite ``router.layer``).
    Quantized non-expert linear layers are dequantized to ``dtype``.

    Args:
        checkpoint_dir: directory with ``config.json`` and safetensors file(s).
        device: where the model goes.
        dtype: fp16 or bf16: activations, non-expert weights and expert scales.
        decode_threshold: passed to :class:`W4A16Experts`.
        quantize_unquantized: experts stored unquantized are quantized here (RTN, the
            checkpoint's group size or 128) instead of refused.
        attn_implementation: e.g. ``"sdpa"`` or ``"eager"`` (default: transformers' choice).
        fused_router: compute softmax top-k routers with one kernel (:func:`fuse_routers`).
        progress: print one line per MoE layer.

    Raises:
        ValueError: unsupported family or quantization format, a model with other MoE
            layers than the checkpoint, missing tensors (named), experts stored unquantized
            (unless ``quantize_unquantized``), shape mismatches.
    """
    from transformers import AutoConfig, GenerationConfig

    from ..formats import Checkpoint, ConversionReport

    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype is {dtype}; expected torch.float16 or torch.bfloat16")
    device = torch.device(device)
    path = os.fspath(checkpoint_dir)
    with Checkpoint(path) as ckpt:
        family = family_of(SimpleNamespace(model_type=ckpt.config.get("model_type")))
        config = AutoConfig.from_pretrained(path)
        for key in ("quantization_config", "compression_config"):
            if hasattr(config, key):
                delattr(config, key)
        model = build_empty_model(config, dtype, attn_implementation)
        refs = find_moe_blocks(model, family)
        model_layers = [r.layer for r in refs]
        if sorted(model_layers) != sorted(ckpt.moe_layers):
            raise ValueError(f"the {family.model_type} model built from {path}/config.json has "
                             f"MoE blocks in layers {model_layers}, the checkpoint in "
                             f"{list(ckpt.moe_layers)}")
        top_k = _top_k(config)
        activation = activation_for(config)
        report = ConversionReport(checkpoint=path, family=family.model_type,
                                  source_format=ckpt.source_format,
                                  num_experts=ckpt.num_experts, hidden_size=ckpt.hidden_size,
                                  intermediate_size=ckpt.intermediate_size)
        for ref in refs:
            packed = ckpt.load_layer(ref.layer, device=device, dtype=dtype,
                                     quantize_unquantized=quantize_unquantized, report=report)
            if packed is None:
                why = "; ".join(f"{s.module}: {s.reason}" for s in report.skipped[-2:])
                raise ValueError(f"{path}: the experts of layer {ref.layer} are stored "
                                 f"unquantized ({why}); pass quantize_unquantized=True to "
                                 "quantize them here (round to nearest), or load the model "
                                 "with transformers and call quantize_model")
            ref.block.experts = W4A16Experts(packed, top_k, activation=activation,
                                             decode_threshold=decode_threshold)
            if progress:
                print(f"layer {ref.layer}: {packed.num_experts} experts, "
                      f"{packed.nbytes / 2**20:.1f} MiB int4", flush=True)
        used = _load_non_experts(model, ckpt, family, device)
        _warn_unused(ckpt, family, used, path)
    if fused_router:
        fuse_routers(model)
    model.to(device)
    model.requires_grad_(False)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        with contextlib.suppress(Exception):
            model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _load_non_experts(model: nn.Module, ckpt, family: TransformersFamily,
                      device: torch.device) -> set[str]:
    """Fill every parameter and persistent buffer of ``model`` outside :class:`W4A16Experts`
    from the checkpoint; return the checkpoint tensor names read. A parameter the checkpoint
    lacks is an error; a buffer it lacks keeps the value the model was built with (e.g.
    DeepSeek-V3's zero ``e_score_correction_bias``)."""
    store = ckpt.store
    primary = ckpt.format.PRIMARY if ckpt.format is not None else None
    used: set[str] = set()
    missing: list[str] = []
    for entries in _tensor_slots(model, skip=(W4A16Experts,)).values():
        module, attr, _, is_param = entries[0]
        like = module._parameters[attr] if is_param else module._buffers[attr]
        value = None
        for _, _, name, _ in entries:
            for cand in _candidates(name, family):
                if cand in store:
                    value = store.get(cand)
                    used.add(cand)
                    break
                prefix, _, leaf = cand.rpartition(".")
                if leaf == "weight" and primary and f"{prefix}.{primary}" in store:
                    if like.dim() != 2:
                        raise ValueError(f"{prefix} is stored quantized but {name} has shape "
                                         f"{tuple(like.shape)}; only linear weights "
                                         "[out, in] can be dequantized")
                    value, names = _dequantize_linear(ckpt, prefix, like.shape[0],
                                                      like.shape[1], like.dtype, device)
                    used.update(names)
                    break
            if value is not None:
                break
        if value is None:
            if like.device.type == "meta":
                missing.append(" / ".join(n for _, _, n, _ in entries))
            continue
        if tuple(value.shape) != tuple(like.shape):
            raise ValueError(f"checkpoint tensor for {entries[0][2]} has shape "
                             f"{tuple(value.shape)}; expected {tuple(like.shape)}")
        if not value.dtype.is_floating_point and like.dtype.is_floating_point:
            raise ValueError(f"checkpoint tensor for {entries[0][2]} has dtype {value.dtype}; "
                             f"expected a float tensor (the model's is {like.dtype})")
        _assign(entries, value.to(device=device, dtype=like.dtype))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{ckpt.path} lacks tensors the {family.model_type} model needs: "
                         f"{', '.join(missing[:5])}{more}")
    _check_no_meta(model)
    return used


def _warn_unused(ckpt, family: TransformersFamily, used: set[str], path: str) -> None:
    expert_re = ckpt.family.experts_container_regex()
    fused = tuple(ckpt.family.fused or ())
    num_layers = ckpt.num_layers
    unused = []
    for name in ckpt.store.names():
        if name in used or _IGNORED_RE.search(name) or expert_re.match(name):
            continue
        if fused and any(name.endswith(f) for f in fused):
            continue
        m = _LAYER_RE.search(name)
        if m and num_layers and int(m.group(1)) >= num_layers:
            continue  # e.g. DeepSeek-V3's multi-token-prediction layer
        unused.append(name)
    if unused:
        more = f" (+{len(unused) - 5} more)" if len(unused) > 5 else ""
        warnings.warn(f"{path}: checkpoint tensors not used by the {family.model_type} model: "
                      f"{', '.join(unused[:5])}{more}", stacklevel=3)


# --------------------------------------------------------------------------------------------
# calling a model the same way across transformers 5.x versions
# --------------------------------------------------------------------------------------------
def cache_kwarg(model: nn.Module) -> str:
    """``"cache"`` (transformers >= 5.2x) or ``"past_key_values"``: the keyword the model's
    forward takes its KV cache under."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def moe_layer_count(model: nn.Module) -> int:
    return len(find_moe_blocks(model, include_swapped=True))


__all__: Sequence[str] = (
    "FAMILIES",
    "FUSABLE_ROUTERS",
    "FusedTopKRouter",
    "HIDDEN_ACT",
    "MoEBlockRef",
    "TransformersFamily",
    "W4A16Experts",
    "activation_for",
    "build_empty_model",
    "cache_kwarg",
    "family_of",
    "find_moe_blocks",
    "fuse_routers",
    "load_quantized",
    "materialize",
    "moe_experts_op",
    "parameters_on_meta",
    "prepare_for_cuda_graphs",
    "quantize_expert_weights",
    "quantize_model",
    "random_fill",
    "routing_kwargs",
    "swapped_experts",
    "topk_router_op",
)
