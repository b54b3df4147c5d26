"""The packed int4 layout: pack/unpack bit order, validation, dequantize, save/load."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from w4a16moe.layout import (
    SHUFFLE_SHIFTS,
    PackedExperts,
    PackedWeights,
    load_packed,
    pack_int4,
    packed_file_metadata,
    save_packed,
    unpack_int4,
)
from w4a16moe.quantize import random_experts

# --------------------------------------------------------------------------------------------
# pack / unpack


def test_shuffle_shifts_are_the_exllama_order():
    # value j at bit (j // 2) * 4 + (j % 2) * 16, written out by hand
    assert SHUFFLE_SHIFTS == (0, 16, 4, 20, 8, 24, 12, 28)


def test_pack_hand_computed_word():
    # v0..v7 = 1..8. Nibbles from bit 0 upwards hold v0 v2 v4 v6 v1 v3 v5 v7 = 1 3 5 7 2 4 6 8,
    # so the unsigned word is 0x86427531; as int32 (bit 31 set) that is 0x86427531 - 2**32.
    values = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    word = pack_int4(values)
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    assert int(word) == 0x86427531 - 2**32
    assert torch.equal(unpack_int4(word), values)


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0] * 8, 0),
        ([15] * 8, -1),                                   # 0xFFFFFFFF
        ([15, 0, 0, 0, 0, 0, 0, 0], 0x0000000F),
        ([0, 15, 0, 0, 0, 0, 0, 0], 0x000F0000),
        ([0, 0, 15, 0, 0, 0, 0, 0], 0x000000F0),
        ([0, 0, 0, 0, 0, 0, 0, 8], -(2**31)),             # only the int32 sign bit
        ([0, 0, 0, 0, 0, 0, 0, 7], 0x70000000),           # largest top nibble without sign
        ([15, 15, 15, 15, 15, 15, 15, 7], 0x7FFFFFFF),    # int32 max
    ],
)
def test_pack_special_words(values, expected):
    v = torch.tensor(values, dtype=torch.int64).reshape(1, 8)
    word = pack_int4(v)
    assert int(word) == expected
    assert unpack_int4(word).tolist() == [values]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(8,), (3, 16), (2, 5, 64), (2, 3, 4, 24)])
def test_pack_unpack_round_trip(dtype, shape):
    values = torch.randint(0, 16, shape, dtype=dtype)
    values.view(-1)[0], values.view(-1)[-1] = 0, 15
    packed = pack_int4(values)
    assert packed.shape == (*shape[:-1], shape[-1] // 8) and packed.dtype == torch.int32
    out = unpack_int4(packed)
    assert out.dtype == torch.uint8
    assert torch.equal(out.to(torch.int64), values.to(torch.int64))


def test_unpack_pack_is_a_bijection_on_int32_words():
    words = torch.randint(-(2**31), 2**31, (7, 33), dtype=torch.int64).to(torch.int32)
    words[0, :4] = torch.tensor([-(2**31), 2**31 - 1, -1, 0], dtype=torch.int32)
    assert torch.equal(pack_int4(unpack_int4(words)), words)


def test_pack_matches_bitwise_formula_on_random_values():
    values = torch.randint(0, 16, (5, 40))
    packed = pack_int4(values)
    for r in range(5):
        for w in range(5):
            expected = 0
            for j in range(8):
                expected |= int(values[r, w * 8 + j]) << ((j // 2) * 4 + (j % 2) * 16)
            assert int(packed[r, w]) & 0xFFFFFFFF == expected


@pytest.mark.parametrize(
    "values, match",
    [
        (torch.zeros(2, 8), r"values has dtype torch.float32; expected an integer dtype"),
        (torch.zeros(2, 8, dtype=torch.bool), r"dtype torch.bool; expected an integer"),
        (torch.zeros(2, 12, dtype=torch.uint8), r"shape \(2, 12\); expected the last .* of 8"),
        (torch.zeros((), dtype=torch.uint8), r"shape \(\); expected the last"),
        (torch.tensor([[0, 1, 2, 3, 4, 5, 6, 16]]), r"range over \[0, 16\]; expected 0..15"),
        (torch.tensor([[0, 1, 2, 3, 4, 5, 6, -1]]), r"range over \[-1, 6\]; expected 0..15"),
        ([0] * 8, r"values is a list; expected a torch.Tensor"),
    ],
)
def test_pack_rejects(values, match):
    with pytest.raises(ValueError, match=match):
        pack_int4(values)


def test_unpack_rejects_wrong_dtype():
    with pytest.raises(ValueError, match=r"qweight has dtype torch.int64; expected torch.int32"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"at least 1 dim"):
        unpack_int4(torch.tensor(3, dtype=torch.int32))


def test_pack_on_meta_device_gives_shapes():
    out = pack_int4(torch.empty(2, 3, 16, dtype=torch.uint8, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3, 2) and out.dtype == torch.int32


# --------------------------------------------------------------------------------------------
# PackedWeights / PackedExperts validation


def _weights_kwargs(e=2, n=4, k=64, g=32, zeros=True, perm=True, dtype=torch.float16):
    kw = dict(qweight=pack_int4(torch.randint(0, 16, (e, n, k))),
              scales=(torch.rand(e, n, k // g) + 0.5).to(dtype), group_size=g, name="w")
    if zeros:
        kw["zeros"] = torch.randint(0, 16, (e, n, k // g), dtype=torch.uint8)
    if perm:
        kw["perm"] = torch.stack([torch.randperm(k) for _ in range(e)]).to(torch.int32)
    return kw


def _bad_perm():
    p = torch.stack([torch.randperm(64) for _ in range(2)]).to(torch.int32)
    p[1, 5] = p[1, 6]
    return p


BAD_WEIGHTS = [
    ("qweight", torch.zeros(2, 4, 8, dtype=torch.int64),
     r"w.qweight has dtype torch.int64; expected torch.int32"),
    ("qweight", torch.zeros(4, 8, dtype=torch.int32),
     r"w.qweight has shape \(4, 8\); expected 3 dims \[E, N, K/8\]"),
    ("qweight", torch.zeros(2, 4, 0, dtype=torch.int32), r"w.qweight .* expected K/8 >= 1"),
    ("qweight", [[[0]]], r"w.qweight has dtype list; expected torch.int32"),
    ("scales", torch.ones(2, 4, 3, dtype=torch.float16),
     r"w.scales has shape \(2, 4, 3\); expected \(2, 4, 2\)"),
    ("scales", torch.ones(2, 4, 2, dtype=torch.float32),
     r"w.scales has dtype torch.float32; expected float16 or bfloat16"),
    ("scales", torch.ones(2, 4, 2, dtype=torch.float16, device="meta"),
     r"w.scales is on meta; expected cpu \(the device of qweight\)"),
    ("zeros", torch.zeros(2, 4, 2, dtype=torch.int32),
     r"w.zeros has dtype torch.int32; expected torch.uint8"),
    ("zeros", torch.zeros(2, 4, 1, dtype=torch.uint8),
     r"w.zeros has shape \(2, 4, 1\); expected \(2, 4, 2\)"),
    ("zeros", torch.full((2, 4, 2), 16, dtype=torch.uint8),
     r"w.zeros has a value 16; expected 0..15"),
    ("zeros", torch.zeros(2, 4, 2, dtype=torch.uint8, device="meta"),
     r"w.zeros is on meta; expected cpu"),
    ("perm", torch.zeros(2, 64, dtype=torch.int64),
     r"w.perm has dtype torch.int64; expected torch.int32"),
    ("perm", torch.zeros(2, 32, dtype=torch.int32),
     r"w.perm has shape \(2, 32\); expected \(2, 64\)"),
    ("perm", _bad_perm(), r"w.perm\[1\] is not a permutation of 0..63"),
    ("perm", torch.zeros(2, 64, dtype=torch.int32, device="meta"), r"w.perm is on meta"),
    ("group_size", 48, r"w.group_size is 48; expected one of \(32, 64, 128\) or K=64"),
    ("group_size", 0, r"w.group_size is 0; expected a positive int"),
    ("group_size", True, r"w.group_size is True; expected a positive int"),
    ("group_size", 32.0, r"w.group_size is 32.0; expected a positive int"),
]


@pytest.mark.parametrize("field, value, match", BAD_WEIGHTS,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_WEIGHTS)])
def test_packed_weights_rejects(field, value, match):
    kw = _weights_kwargs()
    kw[field] = value
    with pytest.raises(ValueError, match=match):
        PackedWeights(**kw)


def test_packed_weights_k_not_multiple_of_group():
    kw = _weights_kwargs(k=192, g=64, perm=False)
    kw["group_size"] = 128
    with pytest.raises(ValueError, match=r"w: K=192 is not a multiple of group_size 128"):
        PackedWeights(**kw)


def test_packed_weights_properties_and_per_channel():
    pw = PackedWeights(**_weights_kwargs(e=3, n=5, k=48, g=48))   # G = K: per channel
    assert (pw.num_experts, pw.n, pw.k, pw.group_size, pw.num_groups) == (3, 5, 48, 48, 1)
    assert pw.dtype == torch.float16 and pw.device == torch.device("cpu")
    assert pw.nbytes == 3 * 5 * 6 * 4 + 3 * 5 * 2 + 3 * 5 * 1 + 3 * 48 * 4
    assert pw == pw and pw != PackedWeights(**_weights_kwargs(e=3, n=5, k=48, g=48))


def test_packed_weights_to_and_contiguous():
    pw = PackedWeights(**_weights_kwargs())
    bf = pw.to(dtype=torch.bfloat16)
    assert bf.scales.dtype == torch.bfloat16 and bf.qweight is pw.qweight and bf.name == "w"
    meta = pw.to("meta")
    assert all(t.device.type == "meta" for t in (meta.qweight, meta.scales, meta.zeros, meta.perm))
    assert meta.dequantize().shape == (2, 4, 64)
    with pytest.raises(ValueError, match=r"w.scales has dtype torch.float32"):
        pw.to(dtype=torch.float32)
    kw = _weights_kwargs()
    kw["qweight"] = kw["qweight"].transpose(1, 2).contiguous().transpose(1, 2)
    nc = PackedWeights(**kw)
    assert not nc.qweight.is_contiguous() and nc.contiguous().qweight.is_contiguous()
    assert torch.equal(nc.contiguous().dequantize(), nc.dequantize())


def _dequantize_by_hand(pw: PackedWeights) -> torch.Tensor:
    """w[e, n, perm[e, k]] = (code - z) * s from Python ints, one value at a time."""
    e_, n_, k_ = pw.num_experts, pw.n, pw.k
    words = pw.qweight.tolist()
    scales = pw.scales.double().tolist()
    zeros = pw.zeros.tolist() if pw.zeros is not None else None
    perm = pw.perm.tolist() if pw.perm is not None else None
    out = torch.full((e_, n_, k_), float("nan"), dtype=torch.float64)
    for e in range(e_):
        for n in range(n_):
            for k in range(k_):
                word = words[e][n][k // 8] & 0xFFFFFFFF
                j = k % 8
                code = (word >> ((j // 2) * 4 + (j % 2) * 16)) & 0xF
                g = k // pw.group_size
                z = zeros[e][n][g] if zeros is not None else 8
                col = perm[e][k] if perm is not None else k
                out[e, n, col] = (code - z) * scales[e][n][g]
    return out


@pytest.mark.parametrize("zeros, perm, g", [(False, False, 32), (True, False, 64),
                                            (False, True, 32), (True, True, 64)])
def test_dequantize_matches_independent_formula(zeros, perm, g):
    pw = PackedWeights(**_weights_kwargs(e=2, n=3, k=64, g=g, zeros=zeros, perm=perm,
                                         dtype=torch.bfloat16))
    expected = _dequantize_by_hand(pw)
    assert not expected.isnan().any()
    assert torch.equal(pw.dequantize(torch.float64), expected)
    assert torch.equal(pw.dequantize(), expected.float())


def test_dequantize_rejects_integer_dtype():
    with pytest.raises(ValueError, match="expected a floating-point dtype"):
        PackedWeights(**_weights_kwargs()).dequantize(torch.int32)


def _experts_kwargs(e=2, h=64, i=32, g=32, dtype=torch.float16):
    w13 = PackedWeights(**_weights_kwargs(e=e, n=2 * i, k=h, g=g, dtype=dtype))
    w2 = PackedWeights(**_weights_kwargs(e=e, n=h, k=i, g=g, dtype=dtype))
    return dict(w13=w13, w2=w2, num_experts=e, hidden_size=h, intermediate_size=i, dtype=dtype)


def test_packed_experts_valid_and_names():
    ex = PackedExperts(**_experts_kwargs())
    assert ex.w13.name == "w13" and ex.w2.name == "w2"
    assert ex.nbytes == ex.w13.nbytes + ex.w2.nbytes
    w13, w2 = ex.dequantize(torch.float64)
    assert w13.shape == (2, 64, 64) and w2.shape == (2, 64, 32)
    sub = ex.select_experts(slice(1, 2))
    assert sub.num_experts == 1 and torch.equal(sub.w2.dequantize(), ex.w2.dequantize()[1:])
    on_meta = ex.to("meta")
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float16
    bf = ex.to(dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and bf.w2.scales.dtype == torch.bfloat16


def _replace_w2(kw, **changes):
    w2 = kw["w2"]
    fields = dict(qweight=w2.qweight, scales=w2.scales, zeros=w2.zeros, perm=w2.perm,
                  group_size=w2.group_size)
    fields.update(changes)
    kw["w2"] = PackedWeights(**fields)
    return kw


BAD_EXPERTS = [
    (lambda kw: kw.update(intermediate_size=16),
     r"w13.qweight has shape \(2, 64, 8\); expected \(2, 32, 8\)"),
    (lambda kw: kw.update(num_experts=3),
     r"w13.qweight has shape \(2, 64, 8\); expected \(3, 64, 8\)"),
    (lambda kw: kw.update(hidden_size=60),
     r"hidden_size=60 and intermediate_size=32; expected positive multiples of 8"),
    (lambda kw: kw.update(intermediate_size=0), r"intermediate_size=0; expected positive"),
    (lambda kw: kw.update(num_experts=2.0), r"num_experts is 2.0; expected a non-negative int"),
    (lambda kw: kw.update(dtype=torch.float32),
     r"dtype is torch.float32; expected torch.float16 or torch.bfloat16"),
    (lambda kw: kw.update(dtype=torch.bfloat16),
     r"w13.scales has dtype torch.float16; expected torch.bfloat16 \(the experts' dtype\)"),
    (lambda kw: kw.update(w2="weights"), r"w2 is a str; expected PackedWeights"),
    (lambda kw: _replace_w2(kw, qweight=pack_int4(torch.randint(0, 16, (2, 64, 64))),
                            scales=torch.ones(2, 64, 2, dtype=torch.float16), zeros=None,
                            perm=None),
     r"w2.qweight has shape \(2, 64, 8\); expected \(2, 64, 4\)"),
    (lambda kw: _replace_w2(kw, scales=kw["w2"].scales.bfloat16()),
     r"w2.scales has dtype torch.bfloat16; expected torch.float16"),
    (lambda kw: kw.update(w2=kw["w2"].to("meta")),
     r"w2 is on meta; expected cpu \(the device of w13\)"),
]


@pytest.mark.parametrize("change, match", BAD_EXPERTS,
                         ids=[str(i) for i in range(len(BAD_EXPERTS))])
def test_packed_experts_rejects(change, match):
    kw = _experts_kwargs()
    change(kw)
    with pytest.raises(ValueError, match=match):
        PackedExperts(**kw)


# --------------------------------------------------------------------------------------------
# save / load


def _assert_same_experts(a: PackedExperts, b: PackedExperts):
    assert (a.num_experts, a.hidden_size, a.intermediate_size, a.dtype) == \
        (b.num_experts, b.hidden_size, b.intermediate_size, b.dtype)
    for pa, pb in ((a.w13, b.w13), (a.w2, b.w2)):
        assert pa.group_size == pb.group_size and pa.name == pb.name
        for f in ("qweight", "scales", "zeros", "perm"):
            ta, tb = getattr(pa, f), getattr(pb, f)
            assert (ta is None) == (tb is None), f
            if ta is not None:
                assert ta.dtype == tb.dtype and torch.equal(ta, tb), f


def test_save_load_round_trip_exact(tmp_path):
    layers = {
        0: random_experts(3, 64, 32, group_size=32, symmetric=False, act_order=True,
                          dtype=torch.float16, seed=1),
        5: random_experts(2, 128, 64, group_size=-1, symmetric=True, dtype=torch.bfloat16,
                          seed=2),
        7: random_experts(1, 128, 128, group_size=64, symmetric=False, dtype=torch.bfloat16,
                          seed=3),
    }
    path = tmp_path / "experts.safetensors"
    save_packed(path, layers, extra_metadata={"model": "tiny-moe", "note": "ü"})
    assert os.listdir(tmp_path) == ["experts.safetensors"]
    loaded = load_packed(path)
    assert sorted(loaded) == [0, 5, 7]
    for idx, ex in layers.items():
        _assert_same_experts(ex, loaded[idx])
    assert loaded[5].w13.group_size == 128 and loaded[5].w2.group_size == 64   # per channel
    meta = packed_file_metadata(str(path))
    assert meta["model"] == "tiny-moe" and meta["note"] == "ü" and meta["format"] == "w4a16moe"
    assert json.loads(meta["layers"])["0"]["dtype"] == "float16"


def test_save_non_contiguous_and_shared_tensors(tmp_path):
    kw = _experts_kwargs()
    q = kw["w13"].qweight
    kw["w13"] = PackedWeights(qweight=q.transpose(1, 2).contiguous().transpose(1, 2),
                              scales=kw["w13"].scales.transpose(1, 2).contiguous().transpose(1, 2),
                              zeros=kw["w13"].zeros, perm=kw["w13"].perm, group_size=32)
    assert not kw["w13"].qweight.is_contiguous()
    ex = PackedExperts(**kw)
    sliced = random_experts(4, 64, 32, group_size=32, seed=4).select_experts(slice(1, 3))
    path = tmp_path / "x.safetensors"
    save_packed(path, {0: ex, 1: ex, 2: sliced})     # layers 0 and 1 share every tensor
    loaded = load_packed(path)
    _assert_same_experts(ex, loaded[0])
    _assert_same_experts(ex, loaded[1])
    _assert_same_experts(sliced, loaded[2])


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "x.safetensors"
    save_packed(path, {0: random_experts(1, 64, 32, group_size=32, seed=1)})
    new = random_experts(2, 64, 32, group_size=32, seed=2)
    save_packed(path, {3: new})
    loaded = load_packed(path)
    assert list(loaded) == [3]
    _assert_same_experts(new, loaded[3])


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:      # half-written output, then the failure
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    ex = random_experts(1, 64, 32, group_size=32, seed=1)
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_packed(tmp_path / "x.safetensors", {0: ex})
    assert os.listdir(tmp_path) == []
    # an existing file survives a failed overwrite unchanged
    monkeypatch.undo()
    save_packed(tmp_path / "x.safetensors", {0: ex})
    before = (tmp_path / "x.safetensors").read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError):
        save_packed(tmp_path / "x.safetensors", {1: ex})
    assert os.listdir(tmp_path) == ["x.safetensors"]
    assert (tmp_path / "x.safetensors").read_bytes() == before


@pytest.mark.parametrize("cut", [-10, 20, 5])
def test_load_truncated_file(tmp_path, cut):
    path = tmp_path / "x.safetensors"
    save_packed(path, {0: random_experts(1, 64, 32, group_size=32, seed=1)})
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_packed(path)


def test_load_garbage_and_missing(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_packed(path)
    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "missing.safetensors")


def test_load_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"model.layers.0.mlp.weight": torch.zeros(4, 4)}, str(path),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"is not a w4a16moe packed file .*format='pt'"):
        load_packed(path)
    with pytest.raises(ValueError, match=r"is not a w4a16moe packed file"):
        packed_file_metadata(path)
    save_file({"x": torch.zeros(4)}, str(path))     # no metadata at all
    with pytest.raises(ValueError, match=r"format=None"):
        load_packed(path)


def _write_raw(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)


def test_load_inconsistent_files(tmp_path):
    ex = random_experts(2, 64, 32, group_size=32, seed=1)
    tensors = {k: v.contiguous() for k, v in ex.state_dict("layers.0.").items()}
    layers = json.dumps({"0": ex.metadata()})
    path = tmp_path / "x.safetensors"
    good = {"format": "w4a16moe", "format_version": "1", "layers": layers}

    _write_raw(path, tensors, {**good, "format_version": "99"})
    with pytest.raises(ValueError, match=r"format_version '99'"):
        load_packed(path)

    _write_raw(path, {**tensors, "layers.1.w13.qweight": tensors["layers.0.w13.qweight"].clone()},
               good)
    with pytest.raises(ValueError, match=r"layers.1.w13.qweight.*belong to no layer"):
        load_packed(path)

    _write_raw(path, {k: v for k, v in tensors.items() if k != "layers.0.w2.scales"}, good)
    with pytest.raises(ValueError, match=r"x.safetensors.*missing tensor layers.0.w2.scales"):
        load_packed(path)

    bad_meta = dict(ex.metadata(), num_experts=3)
    _write_raw(path, tensors, {**good, "layers": json.dumps({"0": bad_meta})})
    with pytest.raises(ValueError, match=r"x.safetensors.*w13.qweight has shape"):
        load_packed(path)

    bad_meta = dict(ex.metadata(), dtype="float32")
    _write_raw(path, tensors, {**good, "layers": json.dumps({"0": bad_meta})})
    with pytest.raises(ValueError, match=r"dtype 'float32'"):
        load_packed(path)

    _write_raw(path, tensors, {**good, "layers": "{not json"})
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_packed(path)

    bad_meta = {k: v for k, v in ex.metadata().items() if k != "w2_group_size"}
    _write_raw(path, tensors, {**good, "layers": json.dumps({"0": bad_meta})})
    with pytest.raises(ValueError, match=r"metadata lacks 'w2_group_size'"):
        load_packed(path)


@pytest.mark.parametrize(
    "layers, extra, match",
    [
        ({"0": None}, None, r"layers has key '0'; expected a non-negative int"),
        ({-1: None}, None, r"layers has key -1"),
        ({0: "experts"}, None, r"layers\[0\] is a str; expected PackedExperts"),
        ([1], None, r"layers is a list; expected a dict"),
        ({}, {"format": "x"}, r"extra_metadata sets 'format'"),
        ({}, {"layers": "x"}, r"extra_metadata sets 'layers'"),
        ({}, {"n": 3}, r"extra_metadata has 'n': 3; expected str -> str"),
    ],
)
def test_save_rejects(tmp_path, layers, extra, match):
    with pytest.raises(ValueError, match=match):
        save_packed(tmp_path / "x.safetensors", layers, extra_metadata=extra)
    assert os.listdir(tmp_path) == []
