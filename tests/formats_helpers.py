"""Writers of small checkpoints in the real on-disk formats, for the converter tests.

Everything here is written from the formats' definitions, independently of
``w4a16moe.formats``: codes are drawn at random, packed with plain numpy loops in each
format's bit order, and the expected float weights come straight from the codes (never by
unpacking), following each format's dequantization rule.

Bit orders (value ``i`` of an int32 word sits at bits ``4i .. 4i+3``):
- GPTQ ``qweight [K/8, N]``: word ``[r, n]`` value ``i`` = input column ``8r+i``.
  ``qzeros [K/G, N/8]``: word ``[g, c]`` value ``i`` = output ``8c+i``; v1 stores zero - 1.
- AWQ ``qweight [K, N/8]`` and ``qzeros``: word ``[k, c]`` value ``i`` = output
  ``8c + (0, 2, 4, 6, 1, 3, 5, 7)[i]``.
- compressed-tensors ``weight_packed [N, K/8]``: word ``[n, c]`` value ``i`` = input ``8c+i``,
  stored as signed code + 8; ``weight_zero_point [N/8, K/G]``: word ``[r, g]`` value ``i`` =
  output ``8r+i``, signed zero + 8.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

# expert module names per family, written out here (not taken from the package)
EXPERT_NAMES = {
    "qwen3_moe": ("model.layers.{L}.mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": ("model.layers.{L}.mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("model.layers.{L}.mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v2": ("model.layers.{L}.mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": ("model.layers.{L}.mlp.experts.{e}", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("model.layers.{L}.block_sparse_moe.experts.{e}", ("w1", "w3", "w2")),
    "granitemoe": ("model.layers.{L}.block_sparse_moe.experts.{e}", ("w1", "w3", "w2")),
}


# ---------------------------------------------------------------------------------------------
# packing, one word value at a time
# ---------------------------------------------------------------------------------------------
def pack_last_dim(vals: np.ndarray, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """uint ``[R, C]`` (0..15) -> int32 ``[R, C/8]``; value ``i`` of word ``[r, c]`` holds
    column ``8c + order[i]``."""
    vals = np.asarray(vals).astype(np.uint32)
    r, c = vals.shape
    assert c % 8 == 0 and vals.max(initial=0) <= 15
    out = np.zeros((r, c // 8), dtype=np.uint32)
    for i in range(8):
        out |= vals[:, order[i]::8] << np.uint32(4 * i)
    return torch.from_numpy(out.view(np.int32).copy())


def pack_first_dim(vals: np.ndarray) -> torch.Tensor:
    """uint ``[R, C]`` -> int32 ``[R/8, C]``; value ``i`` of word ``[r, c]`` is row ``8r+i``."""
    return pack_last_dim(np.ascontiguousarray(np.asarray(vals).T)).T.contiguous()


# ---------------------------------------------------------------------------------------------
# one quantized projection per format: (tensors by suffix, expected W [N, K] float64)
# ---------------------------------------------------------------------------------------------
def _groups(k: int, g: int) -> tuple[int, int]:
    gs = k if g == -1 else g
    assert k % gs == 0
    return gs, k // gs


def act_order_g_idx(k: int, g: int, rng: np.random.Generator) -> np.ndarray:
    """GPTQ's act-order g_idx: columns visited in a random order, G at a time."""
    gs, _ = _groups(k, g)
    order = rng.permutation(k)
    g_idx = np.empty(k, dtype=np.int64)
    g_idx[order] = np.arange(k) // gs
    return g_idx


def _scales(shape, rng, dtype=torch.float16) -> torch.Tensor:
    s = rng.uniform(0.002, 0.05, size=shape) * rng.choice([1.0, 1.0, 1.0, -1.0], size=shape)
    return torch.from_numpy(s).to(dtype)


def gptq_projection(n: int, k: int, g: int, sym: bool, v1: bool, g_idx: np.ndarray | None,
                    rng: np.random.Generator, write_g_idx: bool = True,
                    scale_dtype=torch.float16):
    gs, groups = _groups(k, g)
    q = rng.integers(0, 16, size=(k, n))
    if sym:
        real_z = np.full((groups, n), 8)
    elif v1:
        real_z = rng.integers(0, 15, size=(groups, n)) + 1  # stored 0..14 means 1..15
    else:
        real_z = rng.integers(0, 16, size=(groups, n))
    stored_z = real_z - 1 if v1 else real_z
    s = _scales((groups, n), rng, scale_dtype)
    gi = np.arange(k) // gs if g_idx is None else g_idx
    t = {"qweight": pack_first_dim(q), "qzeros": pack_last_dim(stored_z), "scales": s}
    if write_g_idx:
        t["g_idx"] = torch.from_numpy(gi.astype(np.int32))
    sd = s.double().numpy()
    w = (q - real_z[gi, :]) * sd[gi, :]  # [K, N]
    return t, torch.from_numpy(np.ascontiguousarray(w.T))


def awq_projection(n: int, k: int, g: int, rng: np.random.Generator, scale_dtype=torch.float16):
    gs, groups = _groups(k, g)
    q = rng.integers(0, 16, size=(k, n))
    z = rng.integers(0, 16, size=(groups, n))
    s = _scales((groups, n), rng, scale_dtype)
    t = {"qweight": pack_last_dim(q, AWQ_ORDER), "qzeros": pack_last_dim(z, AWQ_ORDER),
         "scales": s}
    gi = np.arange(k) // gs
    w = (q - z[gi, :]) * s.double().numpy()[gi, :]
    return t, torch.from_numpy(np.ascontiguousarray(w.T))


def ct_projection(n: int, k: int, g: int, sym: bool, g_idx: np.ndarray | None,
                  rng: np.random.Generator, scale_dtype=torch.bfloat16, zp_packed: bool = True):
    gs, groups = _groups(k, g)
    q = rng.integers(-8, 8, size=(n, k))
    zp = np.zeros((n, groups), dtype=np.int64) if sym else rng.integers(-8, 8, size=(n, groups))
    s = _scales((n, groups), rng, scale_dtype)
    t = {"weight_packed": pack_last_dim(q + 8), "weight_scale": s,
         "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not sym:
        # packed along N (as pack-quantized writes it), or the signed int8 values unpacked
        t["weight_zero_point"] = (pack_first_dim(zp + 8) if zp_packed
                                  else torch.from_numpy(zp.astype(np.int8)))
    gi = np.arange(k) // gs
    if g_idx is not None:
        gi = g_idx
        t["weight_g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
    w = (q - zp[:, gi]) * s.double().numpy()[:, gi]
    return t, torch.from_numpy(w)


def quant_config(fmt: str, g: int, sym: bool, act: bool) -> dict:
    if fmt in ("gptq", "gptq_v2"):
        return {"quant_method": "gptq", "bits": 4, "group_size": g, "sym": sym, "desc_act": act,
                "checkpoint_format": fmt, "static_groups": False, "true_sequential": True}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
    assert fmt == "ct"
    weights = {"num_bits": 4, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "channel" if g == -1 else "group",
               "group_size": None if g == -1 else g, "actorder": "group" if act else None,
               "observer": "minmax", "block_structure": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None,
                                          "output_activations": None}},
            "ignore": ["lm_head", "re:.*mlp.gate$"]}


def model_config(family: str, e: int, h: int, i: int, layers: int, **extra) -> dict:
    cfg: dict = {"model_type": family, "hidden_size": h, "num_hidden_layers": layers,
                 "torch_dtype": "bfloat16", "vocab_size": 64}
    if family in ("qwen3_moe", "qwen2_moe"):
        cfg.update(num_experts=e, moe_intermediate_size=i, decoder_sparse_step=1,
                   mlp_only_layers=[], intermediate_size=3 * i)
        if family == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = 2 * i
    elif family == "olmoe":
        cfg.update(num_experts=e, intermediate_size=i)
    elif family in ("deepseek_v2", "deepseek_v3"):
        cfg.update(n_routed_experts=e, moe_intermediate_size=i, first_k_dense_replace=1,
                   moe_layer_freq=1, n_shared_experts=1, intermediate_size=2 * i)
    elif family in ("mixtral", "granitemoe"):
        cfg.update(num_local_experts=e, intermediate_size=i)
    cfg.update(extra)
    return cfg


# ---------------------------------------------------------------------------------------------
# whole checkpoints
# ---------------------------------------------------------------------------------------------
@dataclass
class Built:
    """A written checkpoint and the weights its experts must dequantize to."""

    path: str
    # layer -> (w13 [E, 2I, H], w2 [E, H, I]) float64
    expected: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def write_checkpoint(path: str, config: dict, tensors: dict[str, torch.Tensor],
                     shards: int = 1) -> None:
    """config.json plus model.safetensors, or ``shards`` files listed in
    model.safetensors.index.json (tensors dealt round-robin)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names},
                  os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        save_file(part, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, fh, indent=1)


def projection(fmt: str, n: int, k: int, g: int, sym: bool, g_idx, rng, **kw):
    if fmt in ("gptq", "gptq_v2"):
        return gptq_projection(n, k, g, sym, fmt == "gptq", g_idx, rng, **kw)
    if fmt == "awq":
        return awq_projection(n, k, g, rng, **kw)
    return ct_projection(n, k, g, sym, g_idx, rng, **kw)


def build(path: str, fmt: str, *, family: str = "qwen3_moe", e: int = 3, h: int = 96,
          i: int = 160, g: int = 32, sym: bool = True, act: bool = False, layers: int = 1,
          moe_layers: list[int] | None = None, shards: int = 1, seed: int = 0,
          config_extra: dict | None = None, qcfg_extra: dict | None = None,
          write_g_idx: bool = True, extra_tensors: dict | None = None,
          projection_kw: dict | None = None) -> Built:
    """A ``family`` checkpoint in format ``fmt`` (gptq, gptq_v2, awq, ct) with ``e`` experts
    per MoE layer and a few non-expert tensors (embedding, router, attention)."""
    rng = np.random.default_rng(seed)
    cfg = model_config(family, e, h, i, layers, **(config_extra or {}))
    qc = quant_config(fmt, g, sym, act)
    qc.update(qcfg_extra or {})
    cfg["quantization_config"] = qc
    module_fmt, (gate, up, down) = EXPERT_NAMES[family]
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(64, h).to(torch.bfloat16)}
    kw: dict = dict(projection_kw or {})
    if fmt in ("gptq", "gptq_v2"):
        kw["write_g_idx"] = write_g_idx
    built = Built(path)
    moe_layers = list(range(layers)) if moe_layers is None else moe_layers
    for layer in range(layers):
        tensors[f"model.layers.{layer}.self_attn.o_proj.weight"] = torch.randn(h, h).to(
            torch.bfloat16)
        if layer not in moe_layers:
            continue
        w13s, w2s = [], []
        for ex in range(e):
            mod = module_fmt.format(L=layer, e=ex)
            gi_h = act_order_g_idx(h, g, rng) if act else None
            gi_i = act_order_g_idx(i, g, rng) if act else None
            parts = {}
            for name, n, k, gi in ((gate, i, h, gi_h), (up, i, h, gi_h), (down, h, i, gi_i)):
                t, w = projection(fmt, n, k, g, sym, gi, rng, **kw)
                tensors.update({f"{mod}.{name}.{s}": v for s, v in t.items()})
                parts[name] = w
            w13s.append(torch.cat([parts[gate], parts[up]]))
            w2s.append(parts[down])
        built.expected[layer] = (torch.stack(w13s), torch.stack(w2s))
    tensors.update(extra_tensors or {})
    write_checkpoint(path, cfg, tensors, shards=shards)
    built.tensors = tensors
    return built


def rewrite(path: str, tensors: dict[str, torch.Tensor], config: dict | None = None,
            shards: int = 1) -> None:
    """Rewrite a checkpoint directory with other tensors (and config)."""
    for f in os.listdir(path):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(path, f))
    if config is None:
        with open(os.path.join(path, "config.json")) as fh:
            config = json.load(fh)
    write_checkpoint(path, config, tensors, shards=shards)


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as fh:
        return json.load(fh)
