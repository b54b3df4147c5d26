"""Checkpoint converters: GPTQ (v1, v2), AWQ GEMM and compressed-tensors pack-quantized
checkpoints written by ``formats_helpers`` must dequantize EXACTLY to the format's own rule."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
from formats_helpers import (
    AWQ_ORDER,
    EXPERT_NAMES,
    act_order_g_idx,
    build,
    pack_first_dim,
    pack_last_dim,
    read_config,
    rewrite,
    write_checkpoint,
)

from w4a16moe.formats import (
    convert_checkpoint,
    load_checkpoint,
    read_checkpoint,
    read_quant_config,
)
from w4a16moe.formats.common import (
    pack_sequential,
    pack_shuffled,
    sequential_to_shuffled,
    unpack_along_cols,
    unpack_along_rows,
)
from w4a16moe.layout import load_packed, pack_int4, packed_file_metadata
from w4a16moe.quantize import quantize_weights

# (H, I) per group size: K (H for w13, I for w2) must be a multiple of G; none a power of two
SHAPES = {32: (96, 160), 64: (192, 320), 128: (384, 640), -1: (96, 160)}


def check_exact(layers, built, experts=None):
    assert sorted(layers) == sorted(built.expected)
    for layer, (w13_ref, w2_ref) in built.expected.items():
        if experts is not None:
            w13_ref, w2_ref = w13_ref[experts], w2_ref[experts]
        w13, w2 = layers[layer].dequantize(torch.float64)
        assert torch.equal(w13, w13_ref), f"layer {layer} w13"
        assert torch.equal(w2, w2_ref), f"layer {layer} w2"


# ---------------------------------------------------------------------------------------------
# bit orders, pinned by hand-computed words
# ---------------------------------------------------------------------------------------------
def test_helper_bit_orders_match_published_words():
    vals = np.arange(1, 9)  # 1..8
    # GPTQ qweight: K rows 0..7 of one column -> value i at bits 4i
    assert pack_first_dim(vals.reshape(8, 1)).item() == np.uint32(0x87654321).view(np.int32)
    # AWQ: columns 0..7 go to values in order (0,2,4,6,1,3,5,7) -> nibbles 1,3,5,7,2,4,6,8
    assert pack_last_dim(vals.reshape(1, 8), AWQ_ORDER).item() == \
        np.uint32(0x86427531).view(np.int32)
    # compressed-tensors: signed -8..-1 stored +8 -> 0..7 along K
    assert pack_last_dim((np.arange(-8, 0) + 8).reshape(1, 8)).item() == 0x76543210


def test_unpack_helpers_invert_the_format_packings():
    rng = np.random.default_rng(1)
    v = rng.integers(0, 16, size=(24, 40))
    assert torch.equal(unpack_along_rows(pack_first_dim(v)), torch.from_numpy(v).to(torch.uint8))
    assert torch.equal(unpack_along_cols(pack_last_dim(v)), torch.from_numpy(v).to(torch.uint8))
    assert torch.equal(unpack_along_cols(pack_last_dim(v, AWQ_ORDER), AWQ_ORDER),
                       torch.from_numpy(v).to(torch.uint8))
    word = torch.tensor([[np.uint32(0x86427531).view(np.int32)]], dtype=torch.int32)
    assert unpack_along_cols(word, AWQ_ORDER).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]


def test_repacking_equals_layout_pack_int4():
    codes = torch.randint(0, 16, (3, 24, 64), dtype=torch.uint8)
    assert torch.equal(pack_shuffled(codes), pack_int4(codes))
    seq = pack_last_dim(codes.reshape(-1, 64).numpy()).reshape(3, 24, 8)
    assert torch.equal(pack_sequential(codes), seq)
    assert torch.equal(sequential_to_shuffled(seq), pack_int4(codes))


# ---------------------------------------------------------------------------------------------
# the format matrix: format x sym/asym x G x act-order, exact equality
# ---------------------------------------------------------------------------------------------
CASES = []
for _fmt in ("gptq", "gptq_v2", "ct"):
    for _sym in (True, False):
        for _g in (32, 64, 128, -1):
            for _act in (False, True):
                CASES.append((_fmt, _sym, _g, _act))
for _g in (32, 64, 128, -1):
    CASES.append(("awq", False, _g, False))


@pytest.mark.parametrize("fmt,sym,g,act", CASES,
                         ids=[f"{f}-{'sym' if s else 'asym'}-g{g}-{'act' if a else 'noact'}"
                              for f, s, g, a in CASES])
def test_format_matrix_exact(tmp_path, fmt, sym, g, act):
    h, i = SHAPES[g]
    built = build(str(tmp_path), fmt, g=g, h=h, i=i, sym=sym, act=act, e=3,
                  seed=CASES.index((fmt, sym, g, act)))
    layers, report = read_checkpoint(tmp_path)
    check_exact(layers, built)
    pe = layers[0]
    kh = h if g == -1 else g
    ki = i if g == -1 else g
    assert (pe.w13.group_size, pe.w2.group_size) == (kh, ki)
    # act-order gives a permutation (per channel: one group, nothing to reorder)
    assert (pe.w13.perm is not None) == (act and g != -1)
    assert (pe.w13.zeros is not None) == (not sym)
    assert pe.dtype == (torch.bfloat16 if fmt == "ct" else torch.float16)
    assert report.source_format == {"gptq": "gptq", "gptq_v2": "gptq_v2", "awq": "awq-gemm",
                                    "ct": "compressed-tensors/pack-quantized"}[fmt]


@pytest.mark.parametrize("fmt", ["gptq", "awq", "ct"])
def test_sharded_checkpoint(tmp_path, fmt):
    built = build(str(tmp_path), fmt, g=32, sym=False, act=fmt != "awq", layers=2, shards=3)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    check_exact(load_checkpoint(tmp_path), built)


def test_compressed_tensors_unpacked_int8_zero_points(tmp_path):
    built = build(str(tmp_path), "ct", g=32, sym=False, act=True,
                  projection_kw={"zp_packed": False})
    assert built.tensors["model.layers.0.mlp.experts.0.up_proj.weight_zero_point"].dtype == \
        torch.int8
    check_exact(load_checkpoint(tmp_path), built)


def test_scheme_rules():
    from w4a16moe.formats.quant_config import _ct_config, _gptq_config

    ct = _ct_config({
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {
            "a": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128,
                                                     "strategy": "group", "symmetric": True}},
            "b": {"targets": ["re:.*down_proj$"],
                  "weights": {"num_bits": 4, "group_size": 32, "strategy": "group",
                              "symmetric": False}},
            "c": {"targets": ["model.layers.0.mlp.experts.1.down_proj"],
                  "weights": {"num_bits": 8, "strategy": "channel"}}},
        "ignore": ["lm_head", "re:.*mlp.gate$"]}, "test")
    name = "model.layers.{}.mlp.experts.{}.{}"
    assert ct.scheme_for(name.format(0, 0, "up_proj"))[0].group_size == 128  # class match
    assert ct.scheme_for(name.format(0, 0, "down_proj"))[0].group_size == 32  # regex > class
    assert ct.scheme_for(name.format(0, 1, "down_proj"))[0].bits == 8  # exact name wins
    assert ct.scheme_for("model.layers.0.mlp.gate") == (
        None, "in the compressed-tensors ignore list ('re:.*mlp.gate$')")
    gptq = _gptq_config({"bits": 4, "group_size": 128, "sym": True, "dynamic": {
        r"+:.*\.experts\.0\..*": {"group_size": 64, "sym": False},
        r"-:.*\.experts\..*": {}}}, "test")
    s0, _ = gptq.scheme_for(name.format(3, 0, "gate_proj"))
    assert (s0.group_size, s0.symmetric) == (64, False)  # first matching rule decides
    assert gptq.scheme_for(name.format(3, 1, "gate_proj"))[0] is None
    assert gptq.scheme_for("model.layers.3.self_attn.q_proj")[0].group_size == 128


def test_gptq_without_g_idx_tensor(tmp_path):
    built = build(str(tmp_path), "gptq", g=64, h=192, i=320, sym=False, write_g_idx=False)
    check_exact(load_checkpoint(tmp_path), built)


def test_gptq_group_256_becomes_groups_of_128(tmp_path):
    built = build(str(tmp_path), "gptq", g=256, h=512, i=768, sym=False, act=True)
    layers = load_checkpoint(tmp_path)
    assert layers[0].w13.group_size == 128
    check_exact(layers, built)


# ---------------------------------------------------------------------------------------------
# model families
# ---------------------------------------------------------------------------------------------
def test_qwen2_moe_shared_expert_is_reported_not_converted(tmp_path):
    h, i = 96, 160
    extra = {}
    for layer in range(2):
        for proj, shape in (("gate_proj", (2 * i, h)), ("up_proj", (2 * i, h)),
                            ("down_proj", (h, 2 * i))):
            extra[f"model.layers.{layer}.mlp.shared_expert.{proj}.weight"] = torch.randn(shape)
        extra[f"model.layers.{layer}.mlp.shared_expert_gate.weight"] = torch.randn(1, h)
        extra[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(3, h)
    built = build(str(tmp_path), "gptq", family="qwen2_moe", layers=2, sym=True,
                  extra_tensors=extra)
    layers, report = read_checkpoint(tmp_path)
    check_exact(layers, built)
    shared = [s.module for s in report.not_experts]
    assert shared == ["model.layers.0.mlp.shared_expert", "model.layers.0.mlp.shared_expert_gate",
                      "model.layers.1.mlp.shared_expert", "model.layers.1.mlp.shared_expert_gate"]
    assert all("shared expert" in s.reason for s in report.not_experts)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_dense_first_layer_and_shared_experts(tmp_path, family):
    h, i = 96, 160
    extra = {"model.layers.0.mlp.gate_proj.weight": torch.randn(2 * i, h),
             "model.layers.0.mlp.up_proj.weight": torch.randn(2 * i, h),
             "model.layers.0.mlp.down_proj.weight": torch.randn(h, 2 * i)}
    for layer in (1, 2):
        extra[f"model.layers.{layer}.mlp.shared_experts.gate_proj.weight"] = torch.randn(i, h)
    # a multi-token-prediction layer past num_hidden_layers (DeepSeek-V3 ships one)
    mtp = EXPERT_NAMES[family][0].format(L=3, e=0)
    extra[f"{mtp}.gate_proj.weight"] = torch.randn(i, h)
    built = build(str(tmp_path), "awq", family=family, layers=3, moe_layers=[1, 2],
                  extra_tensors=extra)
    layers, report = read_checkpoint(tmp_path)
    check_exact(layers, built)
    notes = {s.module: s.reason for s in report.not_experts}
    assert "dense" in notes["model.layers.0"]
    assert "shared expert" in notes["model.layers.1.mlp.shared_experts"]
    assert "num_hidden_layers" in notes["model.layers.3"]
    with pytest.raises(ValueError, match="layer 0 is not a MoE layer"):
        load_checkpoint(tmp_path, layers=[0])


@pytest.mark.parametrize("family,fmt", [("qwen3_moe", "ct"), ("mixtral", "gptq"),
                                        ("olmoe", "gptq_v2"), ("granitemoe", "ct"),
                                        ("deepseek_v3", "gptq")])
def test_family_names(tmp_path, family, fmt):
    moe = [1] if family.startswith("deepseek") else None
    built = build(str(tmp_path), fmt, family=family, layers=2, moe_layers=moe, sym=False,
                  act=fmt != "awq")
    if family == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.2.w3.qweight" in built.tensors
    check_exact(load_checkpoint(tmp_path), built)


def test_granitemoe_fused_unquantized_experts(tmp_path):
    """Granite-MoE as trained: fused [E, 2I, H] / [E, H, I] bf16 experts, no quant config."""
    e, h, i = 3, 256, 384
    w_in = torch.randn(e, 2 * i, h, dtype=torch.bfloat16)
    w_out = torch.randn(e, h, i, dtype=torch.bfloat16)
    cfg = {"model_type": "granitemoe", "hidden_size": h, "intermediate_size": i,
           "num_local_experts": e, "num_hidden_layers": 1, "torch_dtype": "bfloat16"}
    write_checkpoint(str(tmp_path), cfg, {
        "model.layers.0.block_sparse_moe.input_linear.weight": w_in,
        "model.layers.0.block_sparse_moe.output_linear.weight": w_out,
        "model.layers.0.block_sparse_moe.router.layer.weight": torch.randn(e, h)})
    layers, report = read_checkpoint(tmp_path)
    assert layers == {}
    assert [s.module for s in report.skipped] == ["model.layers.0.block_sparse_moe.experts.*.*"]
    assert "no quantization config" in report.skipped[0].reason
    with pytest.warns(UserWarning, match="quantize_unquantized"):
        assert load_checkpoint(tmp_path) == {}
    layers, report = read_checkpoint(tmp_path, quantize_unquantized=True, experts=[2, 1])
    w13, w2 = layers[0].dequantize()
    # RTN with G=128 symmetric (no config to follow), gate rows first as in input_linear
    assert torch.equal(w13, quantize_weights(w_in[[2, 1]], 128, True).dequantize())
    assert torch.equal(w2, quantize_weights(w_out[[2, 1]], 128, True).dequantize())
    assert len(report.quantized_here) == 6 and report.source_format == "unquantized"


# ---------------------------------------------------------------------------------------------
# subsets, dtype, files, CLI
# ---------------------------------------------------------------------------------------------
def test_expert_and_layer_subsets(tmp_path):
    built = build(str(tmp_path), "gptq", layers=3, sym=False, act=True)
    layers = load_checkpoint(tmp_path, layers=[2, 0], experts=[2, 0])
    assert sorted(layers) == [0, 2]
    for layer in (0, 2):
        w13, w2 = layers[layer].dequantize(torch.float64)
        assert torch.equal(w13, built.expected[layer][0][[2, 0]])
        assert torch.equal(w2, built.expected[layer][1][[2, 0]])
        assert layers[layer].num_experts == 2
    with pytest.raises(ValueError, match="experts has 3; expected indices in 0..2"):
        load_checkpoint(tmp_path, experts=[0, 3])
    with pytest.raises(ValueError, match="duplicates"):
        load_checkpoint(tmp_path, experts=[1, 1])
    with pytest.raises(ValueError, match="layer 5 is not a MoE layer"):
        load_checkpoint(tmp_path, layers=[5])


def test_dtype_cast(tmp_path):
    built = build(str(tmp_path), "awq", g=32)
    layers = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    pe = layers[0]
    assert pe.dtype == torch.bfloat16 and pe.w13.scales.dtype == torch.bfloat16
    # same codes and zeros; only the scales are rounded to bf16
    ref = load_checkpoint(tmp_path)[0]
    assert torch.equal(pe.w13.qweight, ref.w13.qweight)
    assert torch.equal(pe.w13.scales, ref.w13.scales.to(torch.bfloat16))
    del built
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(tmp_path, dtype=torch.float32)


def test_convert_checkpoint_writes_packed_file(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "experts.safetensors"
    built = build(str(ckpt), "ct", g=64, h=192, i=320, sym=False, act=True, layers=2)
    report = convert_checkpoint(ckpt, out, progress=False)
    check_exact(load_packed(out), built)
    meta = packed_file_metadata(out)
    assert meta["source_format"] == "compressed-tensors/pack-quantized"
    assert meta["family"] == "qwen3_moe" and meta["group_size"] == "64"
    assert json.loads(meta["skipped"]) == []
    assert sorted(report.layers) == [0, 1] and report.group_sizes() == [64]
    assert report.bytes_out == sum(v["bytes"] for v in report.layers.values()) > 0
    assert report.bytes_in > 0 and report.out_file == str(out)


def _cli(argv):
    from w4a16moe.formats.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_convert_json_and_table(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    build(str(ckpt), "gptq", g=32, layers=3, sym=False)
    assert _cli(["convert", str(ckpt), str(tmp_path / "a.safetensors"), "--json",
                 "--layers", "0,2", "--experts", "0-1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert sorted(rep["layers"]) == ["0", "2"] and rep["experts"] == [0, 1]
    assert rep["source_format"] == "gptq" and rep["family"] == "qwen3_moe"
    assert sorted(load_packed(tmp_path / "a.safetensors")) == [0, 2]
    assert _cli(["convert", str(ckpt), str(tmp_path / "b.safetensors")]) == 0  # progress bar
    out = capsys.readouterr().out
    assert "format" in out and "gptq" in out and "3 MoE layers" in out and "group size" in out
    with pytest.raises(ValueError, match="not a list of indices"):
        _cli(["convert", str(ckpt), str(tmp_path / "c.safetensors"), "--layers", "a-b"])


# ---------------------------------------------------------------------------------------------
# excluded and unquantized experts
# ---------------------------------------------------------------------------------------------
def _replace_layer_with_bf16(built, layer, family="qwen3_moe", only=None):
    """Swap the quantized expert tensors of ``layer`` for plain bf16 weights; return them."""
    module_fmt, names = EXPERT_NAMES[family]
    tensors = dict(built.tensors)
    plain = {}
    w13_ref, w2_ref = built.expected[layer]
    e, two_i, h = w13_ref.shape
    i = two_i // 2
    for ex in range(e):
        for name, w in ((names[0], w13_ref[ex, :i]), (names[1], w13_ref[ex, i:]),
                        (names[2], w2_ref[ex])):
            mod = f"{module_fmt.format(L=layer, e=ex)}.{name}"
            if only is not None and mod != only:
                continue
            for key in [k for k in tensors if k.startswith(mod + ".")]:
                del tensors[key]
            plain[mod] = tensors[f"{mod}.weight"] = w.to(torch.bfloat16)
    return tensors, plain


def test_gptq_dynamic_exclusion_reported_or_quantized(tmp_path):
    built = build(str(tmp_path), "gptq", g=32, layers=2, sym=True,
                  qcfg_extra={"dynamic": {r"-:model\.layers\.1\.mlp\.experts\..*": {}}})
    tensors, plain = _replace_layer_with_bf16(built, 1)
    rewrite(str(tmp_path), tensors)
    qc = read_quant_config(tmp_path)
    assert qc.scheme_for("model.layers.1.mlp.experts.0.up_proj")[0] is None
    layers, report = read_checkpoint(tmp_path)
    assert sorted(layers) == [0]
    assert [s.module for s in report.skipped] == ["model.layers.1.mlp.experts.*.*"]
    assert "excluded by GPTQ dynamic rule" in report.skipped[0].reason
    with pytest.warns(UserWarning, match="not loaded"):
        assert sorted(load_checkpoint(tmp_path)) == [0]
    layers, report = read_checkpoint(tmp_path, quantize_unquantized=True)
    w13, w2 = layers[1].dequantize()
    gate = torch.stack([plain[f"model.layers.1.mlp.experts.{e}.gate_proj"] for e in range(3)])
    up = torch.stack([plain[f"model.layers.1.mlp.experts.{e}.up_proj"] for e in range(3)])
    down = torch.stack([plain[f"model.layers.1.mlp.experts.{e}.down_proj"] for e in range(3)])
    # the config's scheme (G=32, symmetric), scales in the checkpoint's dtype (fp16)
    assert torch.equal(w13, quantize_weights(torch.cat([gate, up], 1), 32, True,
                                             torch.float16).dequantize())
    assert torch.equal(w2, quantize_weights(down, 32, True, torch.float16).dequantize())
    assert len(report.quantized_here) == 9
    check_exact({0: layers[0]}, type(built)(built.path, {0: built.expected[0]}))


def test_gptq_dynamic_positive_override(tmp_path):
    """A ``+:`` rule changes the group size of down_proj only: w2 gets G=32, w13 keeps 64."""
    rng = np.random.default_rng(5)
    from formats_helpers import gptq_projection, model_config

    e, h, i = 2, 192, 320
    cfg = model_config("qwen3_moe", e, h, i, 1)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64,
                                  "sym": False, "desc_act": False,
                                  "dynamic": {r"+:.*down_proj": {"group_size": 32}}}
    tensors, ref13, ref2 = {}, [], []
    for ex in range(e):
        mod = f"model.layers.0.mlp.experts.{ex}"
        parts = []
        for name, n, k, g in (("gate_proj", i, h, 64), ("up_proj", i, h, 64),
                              ("down_proj", h, i, 32)):
            t, w = gptq_projection(n, k, g, False, True, None, rng)
            tensors.update({f"{mod}.{name}.{s}": v for s, v in t.items()})
            parts.append(w)
        ref13.append(torch.cat(parts[:2]))
        ref2.append(parts[2])
    write_checkpoint(str(tmp_path), cfg, tensors)
    pe = load_checkpoint(tmp_path)[0]
    assert (pe.w13.group_size, pe.w2.group_size) == (64, 32)
    w13, w2 = pe.dequantize(torch.float64)
    assert torch.equal(w13, torch.stack(ref13)) and torch.equal(w2, torch.stack(ref2))


def test_compressed_tensors_ignore_one_module(tmp_path):
    """One expert's up_proj is in the ignore list and stored bf16: the layer is skipped, or
    the module is quantized with the layer's scheme and stacked with the quantized gate."""
    mod = "model.layers.0.mlp.experts.1.up_proj"
    built = build(str(tmp_path), "ct", g=32, sym=False,
                  qcfg_extra={"ignore": ["lm_head", mod]})
    tensors, plain = _replace_layer_with_bf16(built, 0, only=mod)
    rewrite(str(tmp_path), tensors)
    layers, report = read_checkpoint(tmp_path)
    assert layers == {}
    assert [(s.module, s.reason) for s in report.skipped] == [
        (mod, f"unquantized: in the compressed-tensors ignore list ('{mod}')")]
    pe = load_checkpoint(tmp_path, quantize_unquantized=True)[0]
    w13, w2 = pe.dequantize(torch.float64)
    i = 160
    exp13 = built.expected[0][0].clone()
    rtn = quantize_weights(plain[mod].unsqueeze(0), 32, False, torch.bfloat16)
    exp13[1, i:] = rtn.dequantize(torch.float64)[0]
    assert torch.equal(w13, exp13) and torch.equal(w2, built.expected[0][1])


def test_awq_modules_to_not_convert(tmp_path):
    built = build(str(tmp_path), "awq", g=32, layers=2,
                  qcfg_extra={"modules_to_not_convert": ["layers.0.mlp.experts"]})
    tensors, _ = _replace_layer_with_bf16(built, 0)
    rewrite(str(tmp_path), tensors)
    layers, report = read_checkpoint(tmp_path)
    assert sorted(layers) == [1]
    assert "modules_to_not_convert" in report.skipped[0].reason


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _edit_config(path, **changes):
    cfg = read_config(path)
    for key, value in changes.items():
        if key == "quantization_config":
            cfg[key].update(value)
        else:
            cfg[key] = value
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)


def test_bits_not_4(tmp_path):
    build(str(tmp_path), "gptq")
    _edit_config(str(tmp_path), quantization_config={"bits": 8})
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj: quantized with bits=8"):
        load_checkpoint(tmp_path)


def test_k_not_multiple_of_8(tmp_path):
    build(str(tmp_path), "ct", g=-1)
    _edit_config(str(tmp_path), hidden_size=100)
    with pytest.raises(ValueError, match=r"K=100\]; N and K must be multiples of 8"):
        load_checkpoint(tmp_path)


def test_k_not_multiple_of_group(tmp_path):
    build(str(tmp_path), "awq", g=32)  # H=96
    _edit_config(str(tmp_path), quantization_config={"group_size": 64})
    with pytest.raises(ValueError, match="K=96 is not a multiple of group_size 64"):
        load_checkpoint(tmp_path)


def test_group_size_not_expressible(tmp_path):
    build(str(tmp_path), "gptq", g=16, sym=False)
    with pytest.raises(ValueError, match=r"gate_proj: group_size 16 cannot be expressed in the "
                                         r"packed layout"):
        load_checkpoint(tmp_path)


def test_scales_shape_disagrees_with_config_group_size(tmp_path):
    build(str(tmp_path), "gptq", g=32)
    _edit_config(str(tmp_path), quantization_config={"group_size": 16})
    with pytest.raises(ValueError, match=r"scales has shape \(3, 160\); expected \(6, 160\)"):
        load_checkpoint(tmp_path)


def test_expert_bias_is_refused(tmp_path):
    built = build(str(tmp_path), "awq")
    tensors = dict(built.tensors)
    tensors["model.layers.0.mlp.experts.0.down_proj.bias"] = torch.zeros(96)
    rewrite(str(tmp_path), tensors)
    with pytest.raises(ValueError, match=r"experts\.0\.down_proj\.bias: the expert has a bias"):
        load_checkpoint(tmp_path)


def test_autogptq_quantize_config_json(tmp_path):
    """Older GPTQ repos keep the settings in quantize_config.json, without quant_method."""
    built = build(str(tmp_path), "gptq", g=32, sym=False, act=True)
    cfg = read_config(str(tmp_path))
    qc = cfg.pop("quantization_config")
    del qc["quant_method"], qc["checkpoint_format"]
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(cfg, fh)
    with open(tmp_path / "quantize_config.json", "w") as fh:
        json.dump(qc, fh)
    assert read_quant_config(tmp_path).checkpoint_format == "gptq"
    check_exact(load_checkpoint(tmp_path), built)


@pytest.mark.parametrize("fmt", ["gptq", "ct"])
def test_gate_up_different_g_idx(tmp_path, fmt):
    built = build(str(tmp_path), fmt, g=32, act=True)
    tensors = dict(built.tensors)
    key = "model.layers.0.mlp.experts.1.up_proj." + ("g_idx" if fmt == "gptq" else "weight_g_idx")
    tensors[key] = torch.from_numpy(
        act_order_g_idx(96, 32, np.random.default_rng(9)).astype(np.int32))
    rewrite(str(tmp_path), tensors)
    with pytest.raises(ValueError, match=r"experts\.1\.up_proj g_idx differs from .*experts\.1"
                                         r"\.gate_proj g_idx"):
        load_checkpoint(tmp_path)


def test_bad_g_idx_counts(tmp_path):
    built = build(str(tmp_path), "gptq", g=32, act=True)
    tensors = dict(built.tensors)
    bad = torch.zeros(160, dtype=torch.int32)
    bad[:100] = 1
    tensors["model.layers.0.mlp.experts.0.down_proj.g_idx"] = bad
    rewrite(str(tmp_path), tensors)
    with pytest.raises(ValueError, match=r"down_proj: g_idx puts 60 columns in group 0; "
                                         r"expected 32"):
        load_checkpoint(tmp_path)


def test_missing_expert_tensors(tmp_path):
    built = build(str(tmp_path), "gptq", g=32, sym=False)
    tensors = dict(built.tensors)
    del tensors["model.layers.0.mlp.experts.1.up_proj.qzeros"]
    rewrite(str(tmp_path), tensors)
    with pytest.raises(ValueError,
                       match=r"missing expert tensor model\.layers\.0\.mlp\.experts\.1\.up_proj"
                             r"\.qzeros"):
        load_checkpoint(tmp_path)
    tensors = {k: v for k, v in built.tensors.items()
               if not k.startswith("model.layers.0.mlp.experts.2.down_proj.")}
    rewrite(str(tmp_path), tensors)
    with pytest.raises(ValueError, match=r"missing expert tensor model\.layers\.0\.mlp\.experts"
                                         r"\.2\.down_proj\.qweight"):
        load_checkpoint(tmp_path)
    # but loading only the experts that are there works
    assert load_checkpoint(tmp_path, experts=[0, 1])[0].num_experts == 2


def test_extra_experts_beyond_config(tmp_path):
    build(str(tmp_path), "awq", g=32, e=3)
    _edit_config(str(tmp_path), num_experts=2)
    with pytest.raises(ValueError, match="holds expert 2 of layer 0 but config.json has 2 "
                                         "experts"):
        load_checkpoint(tmp_path)


def test_shapes_inconsistent_with_config(tmp_path):
    build(str(tmp_path), "gptq", g=32)  # I=160
    _edit_config(str(tmp_path), moe_intermediate_size=128)
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj\.qweight has shape \(12, 160\); "
                                         r"expected \(12, 128\)"):
        load_checkpoint(tmp_path)


def test_experts_in_a_dense_layer(tmp_path):
    build(str(tmp_path), "ct", layers=2)
    _edit_config(str(tmp_path), mlp_only_layers=[1])
    with pytest.raises(ValueError, match="layer 1 holds expert tensors but config.json makes "
                                         "it a dense layer"):
        load_checkpoint(tmp_path)


def test_truncated_safetensors(tmp_path):
    build(str(tmp_path), "gptq", shards=2)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(tmp_path)


def test_index_lists_missing_shard(tmp_path):
    build(str(tmp_path), "gptq", shards=2)
    os.remove(tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(ValueError, match="lists shard model-00001-of-00002.safetensors"):
        load_checkpoint(tmp_path)


def test_no_safetensors_files(tmp_path):
    build(str(tmp_path), "gptq")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        load_checkpoint(tmp_path)


def test_unknown_family(tmp_path):
    build(str(tmp_path), "gptq")
    _edit_config(str(tmp_path), model_type="llama4_text")
    with pytest.raises(ValueError, match="model_type is 'llama4_text'; expected one of"):
        load_checkpoint(tmp_path)


def test_unknown_quant_method(tmp_path):
    build(str(tmp_path), "gptq")
    _edit_config(str(tmp_path), quantization_config={"quant_method": "bitsandbytes"})
    with pytest.raises(ValueError, match="quant_method is 'bitsandbytes'"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("fmt,change,message", [
    ("awq", {"version": "gemv"}, "AWQ version is 'gemv'"),
    ("gptq", {"checkpoint_format": "marlin"}, "checkpoint_format is 'marlin'"),
    ("ct", {"format": "int-quantized"}, "compressed-tensors format is 'int-quantized'"),
])
def test_unsupported_sub_formats(tmp_path, fmt, change, message):
    build(str(tmp_path), fmt)
    _edit_config(str(tmp_path), quantization_config=change)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path)


def test_missing_config(tmp_path):
    build(str(tmp_path), "gptq")
    os.remove(tmp_path / "config.json")
    with pytest.raises(ValueError, match="has no config.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        load_checkpoint(tmp_path / "nope")


def test_gptq_v1_stored_zero_15_is_rejected(tmp_path):
    """v1 stores zero - 1: a stored 15 dequantizes with zero 16, outside any 4-bit layout."""
    built = build(str(tmp_path), "gptq", g=32, sym=False)
    tensors = dict(built.tensors)
    key = "model.layers.0.mlp.experts.2.down_proj.qzeros"
    qz = tensors[key].clone()
    qz[0, 0] |= 0xF  # output 0 of group 0: stored 15
    tensors[key] = qz
    rewrite(str(tmp_path), tensors)
    with pytest.raises(ValueError, match=r"experts\.2\.down_proj has a zero point of 16"):
        load_checkpoint(tmp_path)


def test_unsupported_fused_layout(tmp_path):
    """Fused 3-D expert tensors under mlp.experts (not per expert) are refused by name."""
    cfg = {"model_type": "qwen3_moe", "hidden_size": 64, "moe_intermediate_size": 32,
           "num_experts": 2, "num_hidden_layers": 1}
    write_checkpoint(str(tmp_path), cfg, {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(2, 64, 64),
        "model.layers.0.mlp.experts.down_proj": torch.randn(2, 32, 64)})
    with pytest.raises(ValueError, match="not as per-expert modules"):
        load_checkpoint(tmp_path, quantize_unquantized=True)

