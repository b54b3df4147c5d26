"""End-to-end generation timing of a whole MoE model: bf16 vs int4 experts, eager vs CUDA graphs.

:func:`bench_e2e` builds a transformers 5.x model from a config (the real Qwen3-30B-A3B config
by default; ``num_layers`` makes a shorter variant) with random weights, once with bf16
experts and once with int4 experts (:class:`~w4a16moe.integrations.transformers.W4A16Experts`,
random packed weights made on the device: no bf16 experts are materialised for the int4
model, and the bf16 model is freed before the int4 one is built), and times greedy
generation at batch 1:

* TTFT: the prefill forward over the prompt plus the choice of the first token;
* TPOT: the mean time of one decode step (forward of one token + greedy choice) over the
  other ``new_tokens - 1`` tokens.

Both run on a static KV cache with explicit 4-D attention masks kept in device buffers, so a
step reads nothing back to the host. ``-graphs`` modes capture the prefill and one decode step
in CUDA graphs (``torch.cuda.CUDAGraph``) and replay them; ``-eager`` modes launch every
kernel from Python; ``-compiled`` modes run the model's decode step (forward + greedy
choice) through ``torch.compile(fullgraph=True, dynamic=False)`` with inductor, so the small
non-expert ops (norms, rotary, router softmax / top-k, residual adds) are fused, and on a GPU
capture prefill and decode step in CUDA graphs exactly like ``-graphs`` (on the CPU they run
without graphs). The prefill is compiled too with ``compile_options={"prefill": True}``: off
by default because each prompt length is one more whole-model compilation (about 100 s for
the 48-layer Qwen3-30B-A3B on an H100 host) for a forward that is bound by its GEMMs. bf16
and int4 go through the same pipeline; the int4 experts are the opaque custom op
``w4a16moe::moe_experts``, the bf16 experts transformers' ``grouped_mm`` implementation.
The floor of TPOT is the bytes one decode step must read (every non-expert weight but the
embedding table, the ``top_k`` active experts of each MoE layer in the mode's format, the KV
cache at the mean context) over the measured streaming bandwidth.

:class:`GreedyRunner` is the generation loop; ``w4a16moe generate`` uses it too.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .transformers import (
    W4A16Experts,
    activation_for,
    build_empty_model,
    cache_kwarg,
    find_moe_blocks,
    fuse_routers,
    materialize,
    prepare_for_cuda_graphs,
    random_fill,
)

MODES = ("bf16-eager", "bf16-graphs", "bf16-compiled", "int4-eager", "int4-graphs",
         "int4-compiled")
#: modes that need a CUDA device (``-compiled`` also runs on the CPU, without CUDA graphs)
CUDA_ONLY_MODES = ("bf16-graphs", "int4-graphs")
#: ``torch.compile`` arguments of the ``-compiled`` modes (inductor; the runner captures its
#: own CUDA graphs, so no mode that adds cudagraphs). Chosen on an H100 (torch 2.11) with a
#: 4-layer Qwen3-30B-A3B, decode TPOT at 128/64: inductor default 0.62 ms (int4) / 0.81 ms
#: (bf16), with ``coordinate_descent_tuning`` 0.53 / 0.72 ms (eager forward in CUDA graphs:
#: 0.97 / 1.33 ms); ``max-autotune-no-cudagraphs`` spent its time autotuning the bf16
#: grouped GEMMs (~18 s per shape) and was not completed.
COMPILE_KWARGS: dict = {"fullgraph": True, "dynamic": False, "mode": None,
                        "options": {"coordinate_descent_tuning": True}}
#: ``torch.compile`` modes that capture CUDA graphs themselves: refused (the runner captures)
_CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
#: (prompt tokens, new tokens) measured by default
DEFAULT_CASES = ((128, 128), (512, 1))
RECORD_KEYS = ("model", "mode", "prompt_len", "new_tokens", "ttft_ms", "tpot_ms",
               "floor_tpot_ms", "bf16_tpot_ms", "bf16_ttft_ms", "gpu", "torch", "triton",
               "date")

#: Qwen/Qwen3-30B-A3B config.json (model fields only)
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
E2E_CONFIGS: dict[str, dict] = {"qwen3-30b-a3b": QWEN3_30B_A3B}


# --------------------------------------------------------------------------------------------
# config and random models
# --------------------------------------------------------------------------------------------
def e2e_config(config_path_or_name: str | os.PathLike | dict = "qwen3-30b-a3b",
               num_layers: int | None = None):
    """A transformers config from a built-in name (``qwen3-30b-a3b``), a ``config.json``
    path (or its directory) or a dict, with ``num_hidden_layers`` overridden by
    ``num_layers`` (the MoE layout rules of the family still apply)."""
    from transformers import CONFIG_MAPPING

    if isinstance(config_path_or_name, dict):
        raw = dict(config_path_or_name)
    elif str(config_path_or_name).lower() in E2E_CONFIGS:
        raw = dict(E2E_CONFIGS[str(config_path_or_name).lower()])
    else:
        path = os.fspath(config_path_or_name)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"{config_path_or_name!r} is neither a built-in config "
                             f"({sorted(E2E_CONFIGS)}) nor a config.json file")
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
        raw.pop("quantization_config", None)
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"config model_type is {model_type!r}; transformers does not know it")
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers is {num_layers}; expected >= 1")
        raw["num_hidden_layers"] = num_layers
        for key in ("max_window_layers",):
            if key in raw:
                raw[key] = min(raw[key], num_layers)
        if "layer_types" in raw:
            raw["layer_types"] = raw["layer_types"][:num_layers]
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    return CONFIG_MAPPING[model_type](**fields)


def _moe_shape(config, experts: nn.Module, group_size: int):
    from ..bench.models import MoEShape

    e, two_i, h = experts.gate_up_proj.shape
    return MoEShape(name=config.model_type, num_experts=e, top_k=config.num_experts_per_tok,
                    hidden_size=h, intermediate_size=two_i // 2, group_size=group_size,
                    activation=activation_for(config))


def build_random_model(config, precision: str, device: str | torch.device,
                       dtype: torch.dtype = torch.bfloat16, group_size: int = 128,
                       seed: int = 0, decode_threshold: int | None = None,
                       attn_implementation: str | None = "sdpa") -> nn.Module:
    """A model of ``config`` with random weights on ``device``: ``precision`` ``"bf16"``
    (float experts in ``dtype``) or ``"int4"`` (random packed experts made on the device,
    symmetric, group ``group_size`` or per channel where it does not divide K; the float
    experts are never allocated)."""
    from ..bench.layer import fast_random_experts

    if precision not in ("bf16", "int4"):
        raise ValueError(f"precision is {precision!r}; expected 'bf16' or 'int4'")
    device = torch.device(device)
    model = build_empty_model(config, dtype, attn_implementation)
    if precision == "int4":
        refs = find_moe_blocks(model)
        if not refs:
            raise ValueError(f"the {config.model_type} model has no MoE block")
        activation = activation_for(config)
        for ref in refs:
            shape = _moe_shape(config, ref.experts, group_size)
            packed = fast_random_experts(shape, dtype, device, seed + 1000 + ref.layer)
            ref.block.experts = W4A16Experts(packed, config.num_experts_per_tok,
                                             activation=activation,
                                             decode_threshold=decode_threshold)
    materialize(model, device, random_fill(seed=seed), skip=(W4A16Experts,))
    if precision == "int4":
        fuse_routers(model)  # as quantize_model and load_quantized do
    model.requires_grad_(False)
    if precision == "bf16" and hasattr(model, "set_experts_implementation"):
        try:  # sort + grouped GEMM: no host sync, capturable in a CUDA graph, and traceable
            # by torch.compile(fullgraph=True) (the default loop over hit experts is not)
            model.set_experts_implementation("grouped_mm")
        except (ValueError, KeyError, ImportError):
            pass
    return model


# --------------------------------------------------------------------------------------------
# greedy generation on a static cache
# --------------------------------------------------------------------------------------------
class _Clock:
    """Elapsed milliseconds between :meth:`start` and :meth:`stop`: CUDA events on a GPU
    (no host sync until :meth:`ms`), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._a = torch.cuda.Event(enable_timing=True)
            self._b = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self._a.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._b.record()
        else:
            self._t1 = time.perf_counter()

    def ms(self) -> float:
        if self.cuda:
            self._b.synchronize()
            return self._a.elapsed_time(self._b)
        return (self._t1 - self._t0) * 1e3


@dataclass
class GenerationTiming:
    """Times of one greedy generation (milliseconds)."""

    ttft_ms: float
    decode_ms: float
    decode_steps: int

    @property
    def tpot_ms(self) -> float | None:
        return self.decode_ms / self.decode_steps if self.decode_steps else None


def compile_kwargs(overrides: dict | None = None) -> dict:
    """The ``torch.compile`` keyword arguments of the ``-compiled`` modes:
    :data:`COMPILE_KWARGS` updated by ``overrides`` (e.g. ``{"mode":
    "max-autotune-no-cudagraphs"}`` or ``{"options": {"coordinate_descent_tuning": True}}``).

    ``fullgraph`` must stay True (a graph break inside the model is an error, not a silent
    slow path) and ``dynamic`` False (each prompt length and the decode step get their own
    static-shape graph); modes that capture CUDA graphs themselves (``reduce-overhead``,
    ``max-autotune``) and ``options={"triton.cudagraphs": True}`` are refused because the
    runner captures the compiled steps in its own graphs."""
    kw = {**COMPILE_KWARGS, "options": dict(COMPILE_KWARGS.get("options") or {})}
    for key, value in (overrides or {}).items():
        if key == "options":
            kw["options"].update(value or {})
        elif key in ("mode", "fullgraph", "dynamic", "backend"):
            kw[key] = value
        else:
            raise ValueError(f"compile option {key!r}; expected mode, options, fullgraph, "
                             "dynamic or backend")
    if kw.get("fullgraph") is not True:
        raise ValueError(f"compile fullgraph is {kw.get('fullgraph')!r}; the -compiled modes "
                         "need fullgraph=True (no graph break inside the model)")
    if kw.get("dynamic") is not False:
        raise ValueError(f"compile dynamic is {kw.get('dynamic')!r}; the -compiled modes need "
                         "dynamic=False (static shapes per prompt length and decode step)")
    if kw.get("mode") in _CUDAGRAPH_COMPILE_MODES or kw["options"].get("triton.cudagraphs"):
        raise ValueError(f"compile mode {kw.get('mode')!r} / options {kw['options']} capture "
                         "CUDA graphs inside torch.compile; the runner captures its own, so use "
                         "'default' or 'max-autotune-no-cudagraphs'")
    if kw.get("mode") is not None and kw["options"]:
        # torch.compile takes one of the two; fold the mode's inductor options in
        from torch._inductor import list_mode_options

        kw["options"] = {**list_mode_options(kw["mode"]), **kw["options"]}
        kw["mode"] = None
    if kw.get("mode") is None:
        kw.pop("mode", None)
    if not kw["options"]:
        kw.pop("options")
    return kw


class GreedyRunner:
    """Greedy generation with a transformers ``StaticCache``, nothing read back to the host
    between steps, optionally compiled with ``torch.compile`` and / or replayed from CUDA
    graphs.

    Every call passes ``position_ids`` and a 4-D additive attention mask held in device
    buffers (transformers returns a 4-D mask as is), so the model's own mask code never
    inspects tensor values. A decode step feeds the previous token, appends the argmax to a
    device token history and advances position and mask in place.

    Args:
        model: a transformers ``...ForCausalLM`` (any of the supported MoE families, bf16 or
            with :class:`W4A16Experts`).
        max_len: the cache length (prompt + new tokens).
        batch_size: rows per call (all prompts of one length).
        cuda_graphs: capture the prefill (per prompt length) and the decode step in CUDA
            graphs on the first :meth:`generate` and replay them afterwards.
        compile: run the decode step's forward + greedy choice (and the prefill's, see
            ``compile_options``) through ``torch.compile`` (arguments :func:`compile_kwargs`
            of ``compile_options``): static-shape graphs compiled on the first
            :meth:`generate` (before any capture when ``cuda_graphs``). The static cache is
            filled by one eager forward first (transformers allocates it lazily).
        compile_options: overrides of :data:`COMPILE_KWARGS`, plus ``"prefill": True`` to
            compile the prefill forward as well (default: the decode step only; the prefill
            runs the eager forward, in a CUDA graph when ``cuda_graphs``, which saves one
            whole-model compilation per prompt length).
    """

    def __init__(self, model: nn.Module, max_len: int, batch_size: int = 1,
                 cuda_graphs: bool = False, compile: bool = False,
                 compile_options: dict | None = None) -> None:
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device; found "
                             f"{self.device}")
        self.max_len = max_len
        self.batch_size = batch_size
        self.cuda_graphs = cuda_graphs
        self.compiled = compile
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self._cache_kw = cache_kwarg(model)
        opts = dict(compile_options or {})
        self.compile_prefill = bool(opts.pop("prefill", False))
        self._fwd_prefill = self._fwd_decode = self._forward
        if compile:
            self._fwd_decode = torch.compile(self._forward, **compile_kwargs(opts))
            if self.compile_prefill:
                self._fwd_prefill = self._fwd_decode
        self._cache_ready = False
        dev = self.device
        self._neg = torch.finfo(self.dtype).min
        self._tok = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
        self._step = torch.zeros(1, dtype=torch.long, device=dev)
        self._hist = torch.zeros(batch_size, max_len, dtype=torch.long, device=dev)
        self._mask = torch.full((batch_size, 1, 1, max_len), self._neg, dtype=self.dtype,
                                device=dev)
        self._prompt: torch.Tensor | None = None
        self._prompt_mask: torch.Tensor | None = None
        self._prompt_pos: torch.Tensor | None = None
        self._graph_prefill: torch.cuda.CUDAGraph | None = None
        self._graph_decode: torch.cuda.CUDAGraph | None = None

    # -- steps ---------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: self.cache})
        return out.logits[:, -1].argmax(dim=-1, keepdim=True)

    def _prefill_step(self) -> None:
        nxt = self._fwd_prefill(self._prompt, self._prompt_pos, self._prompt_mask)
        self._tok.copy_(nxt)

    def _decode_step(self) -> None:
        self._mask.index_fill_(3, self._pos[0], 0.0)
        nxt = self._fwd_decode(self._tok, self._pos, self._mask)
        self._tok.copy_(nxt)
        self._hist.index_copy_(1, self._step, nxt)
        self._step.add_(1)
        self._pos.add_(1)

    def _set_prompt(self, input_ids: torch.Tensor) -> None:
        b, p = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"input_ids has batch {b}; the runner was made for "
                             f"{self.batch_size}")
        if p < 1 or p >= self.max_len:
            raise ValueError(f"prompt of {p} tokens; expected 1 <= P < max_len={self.max_len}")
        if self._prompt is None or self._prompt.shape != input_ids.shape:
            dev = self.device
            self._prompt = torch.empty_like(input_ids, device=dev)
            i = torch.arange(p, device=dev).view(p, 1)
            j = torch.arange(self.max_len, device=dev).view(1, -1)
            allowed = (j <= i).view(1, 1, p, self.max_len).expand(b, 1, p, self.max_len)
            self._prompt_mask = torch.where(allowed, 0.0, self._neg).to(self.dtype).contiguous()
            self._prompt_pos = torch.arange(p, device=dev).view(1, p).expand(b, p).contiguous()
            self._graph_prefill = None
        self._prompt.copy_(input_ids)

    def _reset(self, p: int) -> None:
        self.cache.reset()
        self._mask.fill_(self._neg)
        self._mask[..., :p] = 0.0
        self._pos.fill_(p)
        self._step.zero_()

    def _prepare_cache(self, p: int) -> None:
        """One eager prefill, so transformers allocates the static cache's tensors before the
        compiled code sees them (a compiled graph then takes them as inputs; the lazy
        allocation itself is never traced)."""
        if self._cache_ready:
            return
        self._reset(p)
        nxt = self._forward(self._prompt, self._prompt_pos, self._prompt_mask)
        self._tok.copy_(nxt)
        self._cache_ready = True

    # -- graphs --------------------------------------------------------------------------
    @staticmethod
    def _capture(fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph

    def _warm_up_and_capture(self, input_ids: torch.Tensor, decode: bool) -> None:
        """Run prefill (and, when ``decode``, two decode steps) on a side stream (kernels and
        compiled graphs are built, lazy buffers are made), reserve the experts' workspaces,
        then capture the prefill and, when ``decode``, the decode step (a prompt that fills
        the cache but one position captures no decode step: it never runs one)."""
        p = input_ids.shape[1]
        prepare_for_cuda_graphs(self.model, max(p * self.batch_size, self.batch_size))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            if self.compiled:
                self._prepare_cache(p)
            self._reset(p)
            if self._graph_prefill is None:
                self._prefill_step()
            if decode:
                for _ in range(min(2, self.max_len - p)):
                    self._decode_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        if self._graph_prefill is None:
            self._graph_prefill = self._capture(self._prefill_step)
        if decode:
            self._graph_decode = self._capture(self._decode_step)

    # -- public --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, new_tokens: int
                 ) -> tuple[torch.Tensor, GenerationTiming]:
        """Greedy tokens ``[B, new_tokens]`` after ``input_ids [B, P]`` and their timing.
        Exactly ``new_tokens`` are produced (no stop on EOS: the caller truncates)."""
        if new_tokens < 1:
            raise ValueError(f"new_tokens is {new_tokens}; expected >= 1")
        p = input_ids.shape[1]
        if p + new_tokens > self.max_len:
            raise ValueError(f"prompt {p} + new tokens {new_tokens} exceed the cache length "
                             f"{self.max_len}")
        self._set_prompt(input_ids.to(self.device))
        steps = new_tokens - 1
        if self.cuda_graphs and (self._graph_prefill is None
                                 or (steps and self._graph_decode is None)):
            self._warm_up_and_capture(input_ids, decode=steps > 0)
        elif self.compiled:
            self._prepare_cache(p)
        clock = _Clock(self.device)
        self._reset(p)
        clock.start()
        if self.cuda_graphs:
            self._graph_prefill.replay()
        else:
            self._prefill_step()
        clock.stop()
        ttft = clock.ms()
        first = self._tok.clone()
        clock.start()
        for _ in range(steps):
            if self.cuda_graphs:
                self._graph_decode.replay()
            else:
                self._decode_step()
        clock.stop()
        decode_ms = clock.ms() if steps else 0.0
        tokens = torch.cat([first, self._hist[:, :steps]], dim=1)
        return tokens, GenerationTiming(ttft, decode_ms, steps)


# --------------------------------------------------------------------------------------------
# bytes per decode step
# --------------------------------------------------------------------------------------------
def decode_bytes(model: nn.Module, context: float, batch_size: int = 1) -> dict[str, float]:
    """Bytes one decode step reads at ``context`` cached tokens: every non-expert weight
    except the embedding table (one row is read; a tied ``lm_head`` is counted), the
    ``top_k`` active experts of each MoE layer as stored (int4 packed or float), and the KV
    cache (per position: the model's KV width as the static cache stores it)."""
    moe = find_moe_blocks(model, include_swapped=True)
    expert_ids: set[int] = set()
    experts_bytes = 0.0
    top_k = model.config.num_experts_per_tok
    for ref in moe:
        ex = ref.experts
        tensors = list(ex.parameters()) + list(ex.buffers())
        expert_ids.update(id(t) for t in tensors)
        total = sum(t.numel() * t.element_size() for t in tensors
                    if t is not getattr(getattr(ex, "moe", None), "expert_map", None))
        e = ex.num_experts
        experts_bytes += total * min(top_k * batch_size, e) / e
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = out.weight if out is not None else None
    other = 0.0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in expert_ids or id(p) in seen:
            continue
        seen.add(id(p))
        if emb is not None and p is emb and p is not lm_head:
            continue
        other += p.numel() * p.element_size()
    kv_per_pos = _kv_bytes_per_position(model, batch_size)
    kv = kv_per_pos * context
    return {"non_expert": other, "experts": experts_bytes, "kv_cache": kv,
            "total": other + experts_bytes + kv}


def _kv_bytes_per_position(model: nn.Module, batch_size: int) -> float:
    """Bytes of K and V per cached position over all layers, from the config (heads x head
    dims; multi-head latent attention caches full K / V per head in transformers)."""
    cfg = model.config
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if getattr(cfg, "kv_lora_rank", None):  # DeepSeek MLA: transformers caches per-head K, V
        k_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        v_dim = cfg.v_head_dim
    else:
        k_dim = v_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(p.element_size() for p in model.parameters() if p.dtype.is_floating_point)
    return float(layers * heads * (k_dim + v_dim) * elem * batch_size)


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------
def _versions() -> tuple[str, str | None, str | None]:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    try:
        import transformers

        hv = transformers.__version__
    except ImportError:
        hv = None
    return torch.__version__, tv, hv


def time_generation(model: nn.Module, prompt_len: int, new_tokens: int, cuda_graphs: bool,
                    repeats: int = 3, batch_size: int = 1, seed: int = 0,
                    compile: bool = False, compile_options: dict | None = None
                    ) -> tuple[GenerationTiming, torch.Tensor]:
    """Median TTFT and TPOT of ``repeats`` greedy generations of ``new_tokens`` after a
    random prompt of ``prompt_len`` tokens (one untimed warm-up run first: kernels and, with
    ``compile``, the compiled graphs are built there, graphs captured)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=gen)
    runner = GreedyRunner(model, prompt_len + new_tokens, batch_size, cuda_graphs, compile,
                          compile_options)
    runner.generate(prompt, new_tokens)  # warm-up (and capture)
    runs = []
    tokens = None
    for _ in range(max(1, repeats)):
        tokens, t = runner.generate(prompt, new_tokens)
        runs.append(t)
    timing = GenerationTiming(statistics.median(r.ttft_ms for r in runs),
                              statistics.median(r.decode_ms for r in runs),
                              runs[0].decode_steps)
    del runner
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return timing, tokens


def bench_e2e(config_path_or_name: str | os.PathLike | dict = "qwen3-30b-a3b",
              prompt_len: int = 128, new_tokens: int = 128,
              modes: Sequence[str] = MODES, num_layers: int | None = None, *,
              cases: Sequence[tuple[int, int]] | None = None,
              device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
              group_size: int = 128, repeats: int | None = None, seed: int = 0,
              read_gbps: float | None = None, decode_threshold: int | None = None,
              compile_options: dict | None = None, progress: bool = False) -> list[dict]:
    """Time greedy generation of a random-weight model with bf16 and int4 experts.

    Args:
        config_path_or_name: ``"qwen3-30b-a3b"`` (built in), a ``config.json`` path or dict.
        prompt_len, new_tokens: the case measured, unless ``cases`` lists several
            (:data:`DEFAULT_CASES` = (128, 128) and (512, 1)).
        modes: any of :data:`MODES`; ``-graphs`` modes need a CUDA device; ``-compiled``
            modes run ``torch.compile`` (:func:`compile_kwargs`) and, on a GPU, CUDA graphs
            (on the CPU inductor needs a C++ compiler).
        num_layers: override ``num_hidden_layers`` (a smaller model of the same shape).
        device: default CUDA if available, else CPU (eager modes, fp16 for the kernels'
            interpreter: pass ``dtype=torch.float16``).
        dtype: activation / weight dtype (bf16 on a GPU).
        group_size: int4 group size of the random packed experts.
        repeats: timed runs per case after one warm-up (default 3 on a GPU, 1 on the CPU).
        read_gbps: streaming-read bandwidth for the floor (default: measured here).
        decode_threshold: passed to :class:`W4A16Experts`.
        compile_options: overrides of :data:`COMPILE_KWARGS` for the ``-compiled`` modes,
            and ``"prefill": True`` to compile the prefill too (default: the decode step
            only, see :class:`GreedyRunner`; the TTFT of such records is the eager prefill's
            in a CUDA graph).
        progress: print a line per measurement.

    Returns:
        One record per (mode, case) with :data:`RECORD_KEYS` (``tpot_ms`` is None when only
        one token is generated; ``bf16_*`` are the bf16 mode of the same kind (eager,
        graphs or compiled), None when not run), plus ``compile`` (the ``torch.compile``
        arguments) and ``compile_s`` (seconds of the untimed warm-up, compilation included)
        for ``-compiled`` modes, ``read_gbps``, ``decode_bytes``, ``transformers`` and, for
        a failed measurement, ``error``.
    """
    from ..bench.timing import as_device, device_name, measure_read_bandwidth

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes {list(modes)}; expected a non-empty subset of {MODES}")
    device = as_device(device)
    if device.type != "cuda" and any(m in CUDA_ONLY_MODES for m in modes):
        raise ValueError(f"modes {[m for m in modes if m in CUDA_ONLY_MODES]} need a CUDA "
                         f"device; running on {device}")
    ckw = None
    if any(m.endswith("compiled") for m in modes):
        opts = dict(compile_options or {})
        prefill = bool(opts.pop("prefill", False))
        ckw = {**compile_kwargs(opts), "prefill": prefill}
    cases = list(cases) if cases is not None else [(prompt_len, new_tokens)]
    for p, n in cases:
        if p < 1 or n < 1:
            raise ValueError(f"case (prompt_len={p}, new_tokens={n}); expected both >= 1")
    repeats = repeats if repeats is not None else (3 if device.type == "cuda" else 1)
    config = e2e_config(config_path_or_name, num_layers)
    name = (config_path_or_name if isinstance(config_path_or_name, str)
            and config_path_or_name.lower() in E2E_CONFIGS else config.model_type)
    if num_layers is not None:
        name = f"{name} ({num_layers} layers)"
    if read_gbps is None:
        read_gbps, _ = measure_read_bandwidth(device)
    torch_v, triton_v, hf_v = _versions()
    common = {"gpu": device_name(device), "torch": torch_v, "triton": triton_v,
              "transformers": hf_v, "date": _dt.date.today().isoformat(),
              "read_gbps": round(read_gbps, 1)}
    measured: dict[tuple[str, int, int], dict] = {}
    for precision in ("bf16", "int4"):
        todo = [m for m in modes if m.startswith(precision)]
        if not todo:
            continue
        try:
            model = build_random_model(config, precision, device, dtype, group_size, seed,
                                       decode_threshold)
        except torch.OutOfMemoryError as exc:  # e.g. a bf16 model larger than the GPU
            for p, n in cases:
                for mode in todo:
                    measured[(mode, p, n)] = {
                        "decode_bytes": None, "floor_tpot_ms": None, "ttft_ms": None,
                        "tpot_ms": None, "error": f"building the {precision} model: {exc}"[:500]}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for p, n in cases:
            nbytes = decode_bytes(model, context=p + (n - 1) / 2.0)
            for mode in todo:
                rec: dict = {"decode_bytes": nbytes["total"],
                             "floor_tpot_ms": nbytes["total"] / (read_gbps * 1e9) * 1e3}
                kind = mode.split("-", 1)[1]
                graphs = kind == "graphs" or (kind == "compiled" and device.type == "cuda")
                try:
                    t0 = time.perf_counter()
                    timing, _ = time_generation(model, p, n, graphs, repeats, seed=seed,
                                                compile=kind == "compiled",
                                                compile_options=compile_options)
                    rec.update(ttft_ms=timing.ttft_ms, tpot_ms=timing.tpot_ms)
                    if kind == "compiled":
                        rec.update(compile=_jsonable(ckw), compile_s=round(
                            time.perf_counter() - t0 - _timed_s(timing, repeats), 1))
                except Exception as exc:  # keep the other measurements of a long run
                    rec.update(ttft_ms=None, tpot_ms=None,
                               error=f"{type(exc).__name__}: {exc}"[:500])
                measured[(mode, p, n)] = rec
                if progress:
                    print(f"{name} {mode} {p}/{n}: TTFT {_fmt(rec['ttft_ms'])} ms, TPOT "
                          f"{_fmt(rec['tpot_ms'])} ms (floor {_fmt(rec['floor_tpot_ms'])} ms)"
                          + (f" ERROR {rec['error']}" if "error" in rec else ""), flush=True)
        del model
        if ckw is not None:
            torch._dynamo.reset()  # drop the compiled graphs (and their hold on the model)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    records = []
    for p, n in cases:
        for mode in modes:
            rec = measured[(mode, p, n)]
            base = measured.get(("bf16-" + mode.split("-", 1)[1], p, n), {})
            out = {"model": name, "mode": mode, "prompt_len": p, "new_tokens": n,
                   "ttft_ms": rec["ttft_ms"], "tpot_ms": rec["tpot_ms"],
                   "floor_tpot_ms": rec["floor_tpot_ms"],
                   "bf16_tpot_ms": base.get("tpot_ms"), "bf16_ttft_ms": base.get("ttft_ms"),
                   **common, "decode_bytes": rec["decode_bytes"]}
            for key in ("compile", "compile_s", "error"):
                if key in rec:
                    out[key] = rec[key]
            records.append(out)
    return records


def _timed_s(timing: GenerationTiming, repeats: int) -> float:
    """Seconds the timed runs of :func:`time_generation` took (about: median x repeats)."""
    return max(1, repeats) * (timing.ttft_ms + timing.decode_ms) / 1e3


def _jsonable(kw: dict) -> dict:
    return json.loads(json.dumps(kw, default=str))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_records(records: Sequence[dict]) -> str:
    """A plain-text table of :func:`bench_e2e` records."""
    head = ("mode", "P/N", "TTFT ms", "TPOT ms", "floor ms", "bf16 TPOT", "speedup")
    rows = [head]
    for r in records:
        tp, b = r.get("tpot_ms"), r.get("bf16_tpot_ms")
        speed = f"{b / tp:.2f}x" if tp and b else "-"
        rows.append((r["mode"], f"{r['prompt_len']}/{r['new_tokens']}", _fmt(r.get("ttft_ms")),
                     _fmt(tp), _fmt(r.get("floor_tpot_ms")), _fmt(b), speed))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True))
             for row in rows]
    title = f"{records[0]['model']} on {records[0]['gpu']}" if records else ""
    return "\n".join([title, *lines])


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"128/128,512/1"`` -> ``[(128, 128), (512, 1)]`` (prompt tokens / new tokens)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            p, n = (int(v) for v in part.split("/"))
        except ValueError:
            raise ValueError(f"case {part!r}: expected PROMPT/NEW like 128/128") from None
        out.append((p, n))
    if not out:
        raise ValueError(f"cases {text!r}: expected PROMPT/NEW pairs like 128/128,512/1")
    return out


def run_e2e(config_path_or_name: str = "qwen3-30b-a3b", num_layers: int | None = None,
            cases: Sequence[tuple[int, int]] = DEFAULT_CASES, modes: Sequence[str] = MODES,
            out: str | None = None, as_json: bool = False, **kwargs) -> list[dict]:
    """:func:`bench_e2e` over ``cases``, printing a table (or the JSON records) and appending
    the records to the JSON list file ``out`` (see ``w4a16moe.bench.cli.append_records``).
    ``kwargs`` go to :func:`bench_e2e`."""
    records = bench_e2e(config_path_or_name, modes=modes, num_layers=num_layers, cases=cases,
                        progress=not as_json, **kwargs)
    print(json.dumps(records, indent=1) if as_json else format_records(records), flush=True)
    if out:
        from ..bench.cli import append_records

        total = append_records(out, records)
        if not as_json:
            print(f"appended {len(records)} records to {out} ({total} in all)")
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m w4a16moe.integrations.e2e``: the end-to-end benchmark from a shell."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m w4a16moe.integrations.e2e",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-30b-a3b",
                    help="built-in config name or a config.json path (default qwen3-30b-a3b)")
    ap.add_argument("--num-layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--cases", default="128/128,512/1", help="PROMPT/NEW pairs")
    ap.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the -compiled modes (default "
                         f"{COMPILE_KWARGS['mode']!r}; e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--compile-options", default=None, metavar="JSON",
                    help='inductor options, e.g. \'{"coordinate_descent_tuning": true}\'')
    ap.add_argument("--compile-prefill", action="store_true",
                    help="-compiled modes compile the prefill too (default: decode step only)")
    ap.add_argument("--out", default=None, help="append the records to this JSON list")
    ap.add_argument("--json", action="store_true", help="print the records as JSON")
    args = ap.parse_args(argv)
    modes = parse_modes(args.modes)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    run_e2e(args.model, args.num_layers, parse_cases(args.cases), modes, args.out, args.json,
            device=args.device, dtype=dtype, group_size=args.group_size, repeats=args.repeats,
            compile_options=compile_options_from_args(args.compile_mode, args.compile_options,
                                                      args.compile_prefill))
    return 0


def parse_modes(text: str) -> list[str]:
    """``"bf16-graphs,int4-compiled"`` -> the list, each checked against :data:`MODES`."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes {text!r}; expected a comma-separated subset of "
                         f"{','.join(MODES)}")
    return modes


def compile_options_from_args(mode: str | None = None, options_json: str | None = None,
                              prefill: bool = False) -> dict | None:
    """``compile_options`` of :func:`bench_e2e` from command-line values (None: defaults)."""
    out: dict = {}
    if mode:
        out["mode"] = mode
    if options_json:
        try:
            opts = json.loads(options_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"compile options {options_json!r} are not JSON ({exc})") from None
        if not isinstance(opts, dict):
            raise ValueError(f"compile options {options_json!r}: expected a JSON object")
        out["options"] = opts
    if prefill:
        out["prefill"] = True
    if out:
        compile_kwargs({k: v for k, v in out.items() if k != "prefill"})  # validate now
    return out or None


__all__ = [
    "DEFAULT_CASES",
    "E2E_CONFIGS",
    "COMPILE_KWARGS",
    "CUDA_ONLY_MODES",
    "MODES",
    "QWEN3_30B_A3B",
    "RECORD_KEYS",
    "GenerationTiming",
    "GreedyRunner",
    "bench_e2e",
    "build_random_model",
    "compile_kwargs",
    "compile_options_from_args",
    "decode_bytes",
    "e2e_config",
    "format_records",
    "main",
    "parse_cases",
    "parse_modes",
    "run_e2e",
    "time_generation",
]


if __name__ == "__main__":
    raise SystemExit(main())
