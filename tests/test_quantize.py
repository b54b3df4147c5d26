"""Round-to-nearest quantizer: error bound, exactness on the grid, edge cases, errors."""

from __future__ import annotations

import pytest
import torch

from w4a16moe.layout import PackedExperts, PackedWeights, pack_int4, unpack_int4
from w4a16moe.quantize import quantize_experts, quantize_weights, random_experts

K = 256


def _codes_zeros_scales(pw: PackedWeights):
    """Per-value code, zero point and scale (float64), expanded to [E, N, K]."""
    g = pw.group_size
    q = unpack_int4(pw.qweight).double()
    s = pw.scales.double().repeat_interleave(g, dim=-1)
    z = 8.0 if pw.zeros is None else pw.zeros.double().repeat_interleave(g, dim=-1)
    return q, z, s


def _assert_within_half_step(pw: PackedWeights, w: torch.Tensor):
    q, z, s = _codes_zeros_scales(pw)
    deq = (q - z) * s
    err = (deq - w.double()).abs()
    # half a quantization step (float32 arithmetic inside the quantizer adds ~1e-7 relative)
    bound = s / 2 * (1 + 1e-6) + 1e-30
    worst = (err - bound).max()
    assert worst <= 0, f"error exceeds scale/2 by {float(worst)}"
    assert torch.equal(deq.float(), pw.dequantize(torch.float64).float())


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_bound(symmetric, group_size, scale_dtype):
    w = torch.randn(2, 6, K) * torch.logspace(-3, 1, 6).reshape(1, 6, 1)
    w[0, 0] += 0.5                      # an all-positive row (asym: min clamps to 0)
    w[1, 1] = -w[1, 1].abs()            # an all-negative row (asym: max clamps to 0)
    pw = quantize_weights(w, group_size, symmetric, scale_dtype, name="w13")
    g = K if group_size == -1 else group_size
    assert pw.group_size == g and pw.name == "w13" and pw.scales.dtype == scale_dtype
    assert pw.scales.shape == (2, 6, K // g) and pw.perm is None
    assert (pw.zeros is None) == symmetric
    q = unpack_int4(pw.qweight)
    if symmetric:
        assert int(q.min()) >= 1          # symmetric codes use 1..15 around 8
    else:
        assert pw.zeros.dtype == torch.uint8 and int(pw.zeros.max()) <= 15
    _assert_within_half_step(pw, w)

    # scales are the exact (float32) scale rounded up to the 16-bit grid, never down
    wf = w.reshape(2, 6, K // g, g)
    if symmetric:
        exact = wf.abs().amax(-1) / 7
    else:
        exact = (wf.amax(-1).clamp(min=0) - wf.amin(-1).clamp(max=0)) / 15
    stored = pw.scales.float()
    rel = 2.0 ** -7 if scale_dtype == torch.bfloat16 else 2.0 ** -10
    assert (stored >= exact).all() and (stored <= exact * (1 + rel)).all()


def test_float64_and_fp16_inputs():
    w64 = torch.randn(1, 4, 64, dtype=torch.float64)
    pw = quantize_weights(w64, 32)
    assert pw.scales.dtype == torch.bfloat16        # float32/64 input: bfloat16 scales
    _assert_within_half_step(pw, w64.float())
    w16 = torch.randn(1, 4, 64, dtype=torch.float16)
    pw16 = quantize_weights(w16, 64, symmetric=False)
    assert pw16.scales.dtype == torch.float16       # 16-bit input keeps its dtype
    _assert_within_half_step(pw16, w16)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_exact_on_the_symmetric_grid(group_size, scale_dtype):
    g = K if group_size == -1 else group_size
    codes = torch.randint(1, 16, (2, 5, K))
    codes[..., ::g] = 1                               # every group reaches -7 * s
    scales = (torch.rand(2, 5, K // g) * 2 + 0.01).to(scale_dtype)
    w = (codes - 8).float() * scales.float().repeat_interleave(g, dim=-1)
    pw = quantize_weights(w, group_size, True, scale_dtype)
    assert torch.equal(pw.scales, scales)
    assert torch.equal(unpack_int4(pw.qweight).long(), codes)
    assert torch.equal(pw.dequantize(), w)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [64, -1])
def test_exact_on_the_asymmetric_grid(group_size, scale_dtype):
    g = K if group_size == -1 else group_size
    codes = torch.randint(0, 16, (2, 5, K))
    codes[..., ::g] = 0                               # every group spans the full 0..15
    codes[..., 1::g] = 15
    zeros = torch.randint(0, 16, (2, 5, K // g))
    scales = (torch.rand(2, 5, K // g) + 0.05).to(scale_dtype)
    w = (codes - zeros.repeat_interleave(g, -1)).float() * scales.float().repeat_interleave(g, -1)
    pw = quantize_weights(w, group_size, False, scale_dtype)
    assert torch.equal(pw.scales, scales)
    assert torch.equal(pw.zeros.long(), zeros)
    assert torch.equal(unpack_int4(pw.qweight).long(), codes)
    assert torch.equal(pw.dequantize(), w)


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_groups(symmetric):
    w = torch.randn(2, 3, 128)
    w[0, 1, 32:64] = 0.0
    w[1] = 0.0
    pw = quantize_weights(w, 32, symmetric, torch.float16)
    deq = pw.dequantize()
    assert not deq.isnan().any()
    assert (deq[0, 1, 32:64] == 0).all() and (deq[1] == 0).all()
    assert (pw.scales[1] == 0).all()
    _assert_within_half_step(pw, w)
    zero = quantize_weights(torch.zeros(1, 2, 64), -1, symmetric, torch.bfloat16)
    assert torch.equal(zero.dequantize(), torch.zeros(1, 2, 64))


@pytest.mark.parametrize("symmetric", [True, False])
def test_tiny_weights_do_not_get_zero_fp16_scales(symmetric):
    # max|w|/7 is below fp16's smallest subnormal (6e-8): round-to-nearest would give 0
    w = torch.randn(1, 4, 64) * 1e-9
    w[0, 0] *= 1e3                      # one row in the subnormal range instead
    pw = quantize_weights(w, 32, symmetric, torch.float16)
    assert (pw.scales > 0).all()
    assert not pw.dequantize().isnan().any()
    _assert_within_half_step(pw, w)


def test_scale_overflow_is_an_error():
    w = torch.randn(1, 2, 64)
    w[0, 1, 3] = 1e6                     # 1e6 / 7 > fp16 max 65504
    with pytest.raises(ValueError, match=r"w2: a scale overflows torch.float16.*bfloat16"):
        quantize_weights(w, 32, True, torch.float16, name="w2")
    pw = quantize_weights(w, 32, True, torch.bfloat16)
    _assert_within_half_step(pw, w)


@pytest.mark.parametrize(
    "w, kwargs, match",
    [
        (torch.zeros(1, 2, 64, dtype=torch.int32), {}, r"w must be a floating-point tensor; "
                                                       r"found torch.int32"),
        ([[[0.0]]], {}, r"w must be a floating-point tensor; found list"),
        (torch.zeros(2, 64), {}, r"w has shape \(2, 64\); expected 3 dims \[E, N, K\]"),
        (torch.zeros(1, 2, 12), {"group_size": -1}, r"w has K=12; expected a positive multiple"),
        (torch.zeros(1, 2, 0), {}, r"w has K=0"),
        (torch.zeros(1, 2, 96), {"group_size": 64}, r"w has K=96, not a multiple of group_size 64"),
        (torch.zeros(1, 2, 96), {"group_size": 48}, r"group_size=48; expected one of"),
        (torch.zeros(1, 2, 64), {"group_size": 0}, r"group_size=0; expected one of"),
        (torch.zeros(1, 2, 64), {"group_size": True}, r"group_size is True; expected an int"),
        (torch.zeros(1, 2, 64), {"scale_dtype": torch.float32},
         r"scale_dtype is torch.float32; expected torch.float16 or torch.bfloat16"),
        (torch.full((1, 2, 64), float("nan")), {}, r"w holds NaN or infinite values"),
        (torch.full((1, 2, 64), float("inf")), {}, r"w holds NaN or infinite values"),
    ],
)
def test_quantize_weights_rejects(w, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_weights(w, **{"group_size": 32, **kwargs}, name="w")


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_experts(symmetric):
    e, h, i = 3, 128, 64
    w13 = torch.randn(e, 2 * i, h) / h**0.5
    w2 = torch.randn(e, h, i) / i**0.5
    ex = quantize_experts(w13, w2, 64, symmetric, torch.float16)
    assert isinstance(ex, PackedExperts)
    assert (ex.num_experts, ex.hidden_size, ex.intermediate_size, ex.dtype) == \
        (e, h, i, torch.float16)
    assert ex.w13.name == "w13" and ex.w2.name == "w2" and ex.w13.group_size == 64
    _assert_within_half_step(ex.w13, w13)
    _assert_within_half_step(ex.w2, w2)
    per_channel = quantize_experts(w13, w2, -1, symmetric)
    assert per_channel.w13.group_size == h and per_channel.w2.group_size == i


def test_quantize_experts_rejects():
    w13, w2 = torch.randn(2, 64, 64), torch.randn(2, 64, 32)
    with pytest.raises(ValueError, match=r"w2 has shape \(2, 64, 16\); expected \(2, 64, 32\)"):
        quantize_experts(w13, torch.randn(2, 64, 16), 32)
    with pytest.raises(ValueError, match=r"w2 has shape .* expected \(2, 64, 31\)"):
        quantize_experts(torch.randn(2, 62, 64), w2, 32)
    with pytest.raises(ValueError, match=r"w13 has shape \(64, 64\) and w2"):
        quantize_experts(w13[0], w2, 32)
    with pytest.raises(ValueError, match=r"w13 is a NoneType; expected a torch.Tensor"):
        quantize_experts(None, w2, 32)
    with pytest.raises(ValueError, match=r"w2 has K=32, not a multiple of group_size 64"):
        quantize_experts(w13, w2, 64)


def test_random_experts_shapes_and_options():
    ex = random_experts(3, 64, 32, group_size=32, symmetric=False, act_order=True,
                        dtype=torch.float16, seed=7)
    assert ex.w13.qweight.shape == (3, 64, 8) and ex.w2.qweight.shape == (3, 64, 4)
    assert ex.w13.zeros is not None and ex.w13.perm is not None and ex.dtype == torch.float16
    assert torch.equal(ex.w13.perm.sort(-1).values[0], torch.arange(64, dtype=torch.int32))
    pc = random_experts(2, 64, 32, group_size=-1, seed=1)
    assert pc.w13.group_size == 64 and pc.w2.group_size == 32 and pc.w13.zeros is None
    assert pc.w13.scales.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"w2: K=32 is not a multiple of group_size 64"):
        random_experts(1, 64, 32, group_size=64, seed=1)


def test_random_experts_seeding():
    a = random_experts(2, 64, 32, group_size=32, seed=11)
    b = random_experts(2, 64, 32, group_size=32, seed=11)
    c = random_experts(2, 64, 32, group_size=32, seed=12)
    assert torch.equal(a.w13.qweight, b.w13.qweight) and torch.equal(a.w2.scales, b.w2.scales)
    assert not torch.equal(a.w13.qweight, c.w13.qweight)
    # seed=None follows torch.manual_seed and leaves the global generator reproducible
    runs = []
    for _ in range(2):
        torch.manual_seed(99)
        ex = random_experts(2, 64, 32, group_size=32)
        runs.append((ex.w13.qweight, torch.rand(4)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def test_pack_int4_used_by_quantizer_is_consistent():
    # quantize a weight whose codes we know, then check the words bit for bit
    codes = torch.arange(16).repeat(4).reshape(1, 1, 64)      # 0..15 repeated
    scales = torch.tensor([[[0.5, 0.25]]], dtype=torch.float16)
    zeros = torch.tensor([[[0, 15]]])
    w = (codes - zeros.repeat_interleave(32, -1)).float() * scales.float().repeat_interleave(32, -1)
    pw = quantize_weights(w, 32, symmetric=False, scale_dtype=torch.float16)
    assert torch.equal(pw.qweight, pack_int4(codes))
