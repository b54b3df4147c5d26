"""Decode kernels (w4a16moe.kernels.decode) against the plain-torch reference.

Runs under the Triton interpreter on CPU (fp16, tiny shapes, each launch a few dozen
programs) and unchanged on a GPU, where the bf16 cases run too.

Tolerances. The kernels accumulate in fp32 and round twice, as the reference does with
``round_intermediate=True`` (computed in float64): the GEMM1 output to the activation dtype,
and the final output. fp32 accumulation over K <= 256 terms is ~1e-6 relative, far below
the roundings. A GEMM1 value that lands within fp32 noise of a rounding boundary may round
to the neighbouring 16-bit value (one ulp: 2^-10 relative in fp16, 2^-7 in bf16) in the
kernel and not in the reference; that feeds GEMM2 as a one-ulp change of a few of its I
inputs. The final rounding adds half an ulp of the output. Hence
``|out - ref| <= rtol * |ref| + atol * max|ref|`` with rtol = atol = 2^-9 (fp16) and 2^-6
(bf16): about two ulps of the output's own rounding, with an absolute part for outputs that
cancel to near zero. A kernel bug (a wrong group, a missed slot, a wrong shift) is off by
tens of percent.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, ON_GPU

from w4a16moe.bench.timing import capture_graph
from w4a16moe.kernels import decode
from w4a16moe.kernels.decode import (
    DecodeConfig,
    DecodeWorkspace,
    decode_gemm1,
    decode_gemm2,
    deterministic_decode_configs,
    fused_moe_decode,
    pick_config_gemm1,
    pick_config_gemm2,
    ring_step_words,
)
from w4a16moe.quantize import random_experts
from w4a16moe.reference import activation_and_mul, moe_reference

DTYPES = [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not ON_GPU, reason="bf16 arithmetic is wrong under the Triton interpreter")),
]
TOL = {torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}

# small configs that keep every interpreted launch to a few dozen programs
SMALL = DecodeConfig(block_n=32, block_kw=8)
SMALL2 = DecodeConfig(block_n=64, block_kw=8, topk_inner=64)


def _routing(m: int, num_experts: int, top_k: int, device=DEVICE):
    logits = torch.randn(m, num_experts, device=device)
    weights, ids = torch.topk(logits.softmax(dim=-1), top_k, dim=-1)
    return weights.contiguous(), ids.to(torch.int32).contiguous()


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    assert out.shape == ref.shape
    out = out.double()
    assert torch.isfinite(out).all(), "output has NaN/inf (a poisoned element was not written)"
    bound = tol * ref.abs() + tol * ref.abs().max().clamp_min(1e-30)
    err = (out - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3e} exceeds the bound by {worst:.2f}x"


def _run(experts, x, weights, ids, *, cfg1=SMALL, cfg2=SMALL2, workspace=None, **kw):
    out = torch.full_like(x, float("nan"))
    if workspace is not None:
        workspace.inter.fill_(float("nan"))
    res = fused_moe_decode(x, experts, weights, ids, out=out, workspace=workspace,
                           gemm1_config=cfg1, gemm2_config=cfg2, **kw)
    assert res.data_ptr() == out.data_ptr()
    ref = moe_reference(x, experts, weights, ids, compute_dtype=torch.float64,
                        round_intermediate=True, **kw)
    return res, ref


# ------------------------------------------------------------------------------------------
# numerics against the reference
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_groups_and_zeros(dtype, group_size, symmetric):
    experts = random_experts(4, 128, 64, group_size=group_size, symmetric=symmetric,
                             dtype=dtype, device=DEVICE, seed=1)
    x = torch.randn(3, 128, dtype=dtype, device=DEVICE)
    weights, ids = _routing(3, 4, 2)
    _assert_close(*_run(experts, x, weights, ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_128(dtype):
    experts = random_experts(3, 256, 128, group_size=128, dtype=dtype, device=DEVICE, seed=2)
    x = torch.randn(2, 256, dtype=dtype, device=DEVICE)
    weights, ids = _routing(2, 3, 2)
    cfg1 = DecodeConfig(block_n=64, block_kw=32)  # 256-wide K steps: two groups per step
    cfg2 = DecodeConfig(block_n=128, block_kw=8, topk_inner=2)
    _assert_close(*_run(experts, x, weights, ids, cfg1=cfg1, cfg2=cfg2), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order(dtype, symmetric):
    experts = random_experts(3, 128, 64, group_size=32, symmetric=symmetric, act_order=True,
                             dtype=dtype, device=DEVICE, seed=3)
    x = torch.randn(2, 128, dtype=dtype, device=DEVICE)
    weights, ids = _routing(2, 3, 2)
    _assert_close(*_run(experts, x, weights, ids), dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_activations(dtype, activation):
    experts = random_experts(3, 64, 32, group_size=32, dtype=dtype, device=DEVICE, seed=4)
    x = torch.randn(2, 64, dtype=dtype, device=DEVICE) * 4  # reach the non-linear range
    weights, ids = _routing(2, 3, 2)
    _assert_close(*_run(experts, x, weights, ids, activation=activation), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_weight_on_input(dtype):
    experts = random_experts(4, 64, 32, group_size=32, dtype=dtype, device=DEVICE, seed=5)
    x = torch.randn(3, 64, dtype=dtype, device=DEVICE)
    weights, ids = _routing(3, 4, 2)
    weights = weights * 3.0  # not renormalised: on-input and on-output results differ
    res, ref = _run(experts, x, weights, ids, apply_router_weight_on_input=True)
    _assert_close(res, ref, dtype)
    ref_out = moe_reference(x, experts, weights, ids, compute_dtype=torch.float64,
                            round_intermediate=True)
    assert (ref - ref_out).abs().max() > 0.1 * ref.abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("on_input", [False, True])
def test_expert_map(dtype, on_input):
    """8 global experts, this rank holds 3 of them; slots routed elsewhere add nothing."""
    local = random_experts(3, 64, 32, group_size=32, dtype=dtype, device=DEVICE, seed=6)
    expert_map = torch.full((8,), -1, dtype=torch.int32, device=DEVICE)
    expert_map[torch.tensor([5, 1, 6])] = torch.arange(3, dtype=torch.int32, device=DEVICE)
    x = torch.randn(4, 64, dtype=dtype, device=DEVICE)
    weights, ids = _routing(4, 8, 3)
    ids[0] = torch.tensor([0, 2, 3], dtype=torch.int32)  # token 0: no local expert at all
    ids[1] = torch.tensor([5, 1, 6], dtype=torch.int32)  # token 1: all three local
    res, ref = _run(local, x, weights, ids, expert_map=expert_map,
                    apply_router_weight_on_input=on_input)
    _assert_close(res, ref, dtype)
    assert torch.all(res[0] == 0)
    # split variants take the atomic path with skipped slots still counted
    res2, _ = _run(local, x, weights, ids, expert_map=expert_map,
                   apply_router_weight_on_input=on_input,
                   cfg1=DecodeConfig(block_n=32, block_kw=4, split_k=2),
                   cfg2=DecodeConfig(block_n=64, block_kw=4, split_k=2, topk_inner=1))
    _assert_close(res2, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "cfg1,cfg2",
    [
        (DecodeConfig(block_n=16, block_kw=4, split_k=2),
         DecodeConfig(block_n=64, block_kw=4, topk_inner=1)),
        (DecodeConfig(block_n=32, block_kw=4, split_k=4),
         DecodeConfig(block_n=32, block_kw=4, split_k=2, topk_inner=2)),
        (DecodeConfig(block_n=32, block_kw=8, num_warps=2, prefetch=2),
         DecodeConfig(block_n=64, block_kw=4, split_k=3, topk_inner=1, prefetch=2)),
        # the heuristic's GEMM2 shapes: one-warp 32-row tiles split along K, 64-row tiles
        # on two warps
        (DecodeConfig(block_n=16, block_kw=4, num_warps=1),
         DecodeConfig(block_n=32, block_kw=4, split_k=2, num_warps=1)),
        (DecodeConfig(block_n=16, block_kw=4, num_warps=1),
         DecodeConfig(block_n=64, block_kw=4, num_warps=2)),
        (DecodeConfig(block_n=16, block_kw=4, num_warps=1),
         DecodeConfig(block_n=128, block_kw=4, num_warps=4)),
        # the cp.async ring instead of the register prefetch, split and not
        (DecodeConfig(block_n=16, block_kw=4, num_warps=1, num_stages=3),
         DecodeConfig(block_n=32, block_kw=4, split_k=2, num_warps=1, num_stages=4)),
    ],
    ids=["split1-2_topk-split", "split1-4_split2", "nw2-prefetch2_split2-3",
         "nw1_split2-nw1", "nw1_nw2", "nw1_128rows-nw4", "stages3_stages4-split2"],
)
def test_split_variants(dtype, cfg1, cfg2):
    experts = random_experts(4, 128, 64, group_size=32, symmetric=False, dtype=dtype,
                             device=DEVICE, seed=7)
    x = torch.randn(2, 128, dtype=dtype, device=DEVICE)
    weights, ids = _routing(2, 4, 2)
    ws = DecodeWorkspace.create(experts, top_k=2, max_tokens=4)
    _assert_close(*_run(experts, x, weights, ids, cfg1=cfg1, cfg2=cfg2, workspace=ws), dtype)
    # the arrival counters and accumulators are back to zero for the next call
    for name in ("acc1", "acc2", "cnt1", "cnt2"):
        assert torch.count_nonzero(getattr(ws, name)) == 0, name
    # and a second call through the same workspace with other routing is right too
    weights, ids = _routing(2, 4, 2)
    _assert_close(*_run(experts, x, weights, ids, cfg1=cfg1, cfg2=cfg2, workspace=ws), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [1, 2])
def test_ring_with_act_order_zeros_and_expert_map(dtype, split):
    """The cp.async ring tiles (``num_stages`` > 1) with every option that changes their
    loads: act-order (the activation gather through ``perm``), zero points, slots mapped
    to -1 (an empty K range), four K steps per program, split or not."""
    local = random_experts(3, 256, 128, group_size=32, symmetric=False, act_order=True,
                           dtype=dtype, device=DEVICE, seed=21)
    expert_map = torch.full((6,), -1, dtype=torch.int32, device=DEVICE)
    expert_map[torch.tensor([4, 0, 2])] = torch.arange(3, dtype=torch.int32, device=DEVICE)
    x = torch.randn(3, 256, dtype=dtype, device=DEVICE)
    weights, ids = _routing(3, 6, 2)
    ids[0] = torch.tensor([1, 3], dtype=torch.int32)  # token 0: no local expert
    cfg1 = DecodeConfig(block_n=16, block_kw=8, split_k=split, num_warps=1, num_stages=3)
    cfg2 = DecodeConfig(block_n=32, block_kw=4, split_k=split, num_warps=1, num_stages=3)
    res, ref = _run(local, x, weights, ids, expert_map=expert_map, cfg1=cfg1, cfg2=cfg2,
                    workspace=DecodeWorkspace.create(local, top_k=2, max_tokens=3))
    _assert_close(res, ref, dtype)
    assert torch.all(res[0] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ring_with_128_word_steps(dtype):
    """The ring tiles with the 128-word steps of high-rate cards (``ring_step_words``): K of
    2048 (two steps) and 1152 (one and a half: a masked last step), group 128, zero points,
    split in two."""
    for h, i, split in ((2048, 1024, 1), (1152, 1152, 2)):
        experts = random_experts(2, h, i, group_size=128, symmetric=False, dtype=dtype,
                                 device=DEVICE, seed=22)
        x = torch.randn(2, h, dtype=dtype, device=DEVICE)
        weights, ids = _routing(2, 2, 2)
        cfg1 = DecodeConfig(block_n=64, block_kw=128, split_k=split, num_warps=1,
                            num_stages=3)
        cfg2 = DecodeConfig(block_n=64, block_kw=128, split_k=split, num_warps=1,
                            num_stages=3)
        ws = DecodeWorkspace.create(experts, top_k=2, max_tokens=2) if split > 1 else None
        _assert_close(*_run(experts, x, weights, ids, cfg1=cfg1, cfg2=cfg2, workspace=ws),
                      dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_shapes(dtype):
    """K not a multiple of the K step (96 = 1.5 x 64), N not a multiple of the tile
    (I = 96 rows per half vs 64-row tiles; H = 96 vs 64-row tiles), odd M."""
    experts = random_experts(3, 96, 96, group_size=32, symmetric=False, dtype=dtype,
                             device=DEVICE, seed=8)
    x = torch.randn(3, 96, dtype=dtype, device=DEVICE)
    weights, ids = _routing(3, 3, 2)
    cfg1 = DecodeConfig(block_n=64, block_kw=8)
    cfg2 = DecodeConfig(block_n=64, block_kw=8, topk_inner=2)
    _assert_close(*_run(experts, x, weights, ids, cfg1=cfg1, cfg2=cfg2), dtype)
    cfg1 = DecodeConfig(block_n=64, block_kw=8, split_k=2)
    cfg2 = DecodeConfig(block_n=64, block_kw=8, split_k=2, topk_inner=1)
    _assert_close(*_run(experts, x, weights, ids, cfg1=cfg1, cfg2=cfg2), dtype)
    cfg1 = DecodeConfig(block_n=64, block_kw=4, prefetch=2)  # 3 steps, 2 ahead
    cfg2 = DecodeConfig(block_n=64, block_kw=4, topk_inner=2, prefetch=2)
    _assert_close(*_run(experts, x, weights, ids, cfg1=cfg1, cfg2=cfg2), dtype)
    cfg1 = DecodeConfig(block_n=64, block_kw=8, num_stages=3)  # masked K in the ring
    cfg2 = DecodeConfig(block_n=64, block_kw=8, topk_inner=2, num_stages=2)
    _assert_close(*_run(experts, x, weights, ids, cfg1=cfg1, cfg2=cfg2), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_channel_odd_k(dtype):
    """Per-channel scales with K = 40 (not a power of two, not a multiple of the step)."""
    experts = random_experts(2, 40, 24, group_size=-1, dtype=dtype, device=DEVICE, seed=9)
    x = torch.randn(2, 40, dtype=dtype, device=DEVICE)
    weights, ids = _routing(2, 2, 1)
    cfg1 = DecodeConfig(block_n=32, block_kw=8)
    cfg2 = DecodeConfig(block_n=8, block_kw=4, topk_inner=1)  # all rows valid, K ragged
    _assert_close(*_run(experts, x, weights, ids, cfg1=cfg1, cfg2=cfg2), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_expert_top1(dtype):
    experts = random_experts(1, 64, 32, group_size=32, dtype=dtype, device=DEVICE, seed=10)
    x = torch.randn(5, 64, dtype=dtype, device=DEVICE)
    weights = torch.rand(5, 1, device=DEVICE)
    ids = torch.zeros(5, 1, dtype=torch.int32, device=DEVICE)
    _assert_close(*_run(experts, x, weights, ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicate_experts(dtype):
    """The same expert across tokens (common) and twice within one token (not produced by
    top-k, but the kernels must still add both slots)."""
    experts = random_experts(4, 64, 32, group_size=32, dtype=dtype, device=DEVICE, seed=11)
    x = torch.randn(3, 64, dtype=dtype, device=DEVICE)
    weights = torch.rand(3, 2, device=DEVICE)
    ids = torch.tensor([[2, 1], [2, 3], [1, 1]], dtype=torch.int32, device=DEVICE)
    _assert_close(*_run(experts, x, weights, ids), dtype)
    _assert_close(*_run(experts, x, weights, ids, cfg2=DecodeConfig(block_n=32, block_kw=4,
                                                                    split_k=2)), dtype)


def test_int64_ids_and_default_configs():
    dtype = torch.float16
    experts = random_experts(4, 64, 32, group_size=32, dtype=dtype, device=DEVICE, seed=12)
    x = torch.randn(2, 64, dtype=dtype, device=DEVICE)
    weights, ids = _routing(2, 4, 2)
    out = fused_moe_decode(x, experts, weights, ids.long())
    ref = moe_reference(x, experts, weights, ids, compute_dtype=torch.float64,
                        round_intermediate=True)
    assert out.dtype == dtype
    _assert_close(out, ref, dtype)


def test_gemm_launchers_separately():
    dtype = torch.float16
    experts = random_experts(3, 64, 32, group_size=32, symmetric=False, dtype=dtype,
                             device=DEVICE, seed=13)
    x = torch.randn(2, 64, dtype=dtype, device=DEVICE)
    weights, ids = _routing(2, 3, 2)
    w13, w2 = experts.dequantize(torch.float64)
    flat = ids.flatten().long()
    inter = decode_gemm1(x, experts.w13, ids, weights, activation="gelu", config=SMALL)
    ref1 = activation_and_mul(
        torch.einsum("sk,snk->sn", x.double()[torch.arange(4) // 2], w13[flat]), "gelu")
    assert inter.shape == (4, 32) and inter.dtype == dtype
    _assert_close(inter, ref1, dtype)
    out = torch.full((2, 64), float("nan"), dtype=dtype, device=DEVICE)
    decode_gemm2(inter, experts.w2, ids, weights, out=out, config=SMALL2)
    y = torch.einsum("sk,snk->sn", inter.double(), w2[flat]) * weights.double().reshape(-1, 1)
    _assert_close(out, y.reshape(2, 2, 64).sum(1), dtype)


def test_m0_returns_empty_without_launch(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched for M=0")

    monkeypatch.setattr(decode, "_decode_gemm1_kernel", NoLaunch())
    monkeypatch.setattr(decode, "_decode_gemm2_kernel", NoLaunch())
    experts = random_experts(2, 64, 32, group_size=32, dtype=torch.float16, device=DEVICE,
                             seed=14)
    x = torch.empty(0, 64, dtype=torch.float16, device=DEVICE)
    ids = torch.empty(0, 2, dtype=torch.int32, device=DEVICE)
    weights = torch.empty(0, 2, device=DEVICE)
    out = fused_moe_decode(x, experts, weights, ids)
    assert out.shape == (0, 64) and out.dtype == torch.float16


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
def _small():
    experts = random_experts(2, 64, 32, group_size=32, dtype=torch.float16, device=DEVICE,
                             seed=15)
    x = torch.randn(2, 64, dtype=torch.float16, device=DEVICE)
    weights, ids = _routing(2, 2, 1)
    return experts, x, weights, ids


def test_rejects_bad_inputs():
    experts, x, weights, ids = _small()
    with pytest.raises(ValueError, match="hidden_states has dtype torch.float32"):
        fused_moe_decode(x.float(), experts, weights, ids)
    with pytest.raises(ValueError, match="hidden_states has dtype torch.bfloat16; expected "
                                         "torch.float16"):
        fused_moe_decode(x.bfloat16(), experts, weights, ids)
    with pytest.raises(ValueError, match=r"hidden_states has shape \(2, 32\)"):
        fused_moe_decode(x[:, :32], experts, weights, ids)
    with pytest.raises(ValueError, match="hidden_states has strides"):
        fused_moe_decode(x.t().contiguous().t(), experts, weights, ids)
    with pytest.raises(ValueError, match=r"topk_ids has shape \(3, 1\)"):
        fused_moe_decode(x, experts, weights, torch.zeros(3, 1, dtype=torch.int32,
                                                          device=DEVICE))
    with pytest.raises(ValueError, match="topk_ids has dtype torch.float32"):
        fused_moe_decode(x, experts, weights, ids.float())
    with pytest.raises(ValueError, match=r"topk_weights has shape \(2, 2\)"):
        fused_moe_decode(x, experts, weights.expand(2, 2), ids)
    ids2 = torch.zeros(2, 4, dtype=torch.int32, device=DEVICE)[:, ::2]
    with pytest.raises(ValueError, match="topk_ids has strides"):
        fused_moe_decode(x, experts, torch.zeros(2, 2, device=DEVICE), ids2)
    with pytest.raises(ValueError, match="expert_map has shape"):
        fused_moe_decode(x, experts, weights, ids, expert_map=torch.zeros(2, 2,
                                                                          dtype=torch.int32))
    with pytest.raises(ValueError, match="activation is 'relu'"):
        fused_moe_decode(x, experts, weights, ids, activation="relu")
    with pytest.raises(ValueError, match="out is"):
        fused_moe_decode(x, experts, weights, ids, out=torch.empty(2, 63, dtype=x.dtype,
                                                                   device=DEVICE))


def test_rejects_bad_gemm_inputs():
    experts, x, weights, ids = _small()
    with pytest.raises(ValueError, match=r"inter has shape \(3, 32\)"):
        decode_gemm2(torch.zeros(3, 32, dtype=x.dtype, device=DEVICE), experts.w2, ids,
                     weights)
    with pytest.raises(ValueError, match=r"w2.qweight has shape \(2, 64, 4\); expected "
                                         r"\[E, 64, 8\]"):
        decode_gemm2(torch.zeros(2, 64, dtype=x.dtype, device=DEVICE), experts.w2, ids,
                     weights)
    with pytest.raises(ValueError, match="w13.scales has dtype torch.float16; expected "
                                         "torch.bfloat16"):
        decode_gemm1(x.bfloat16(), experts.w13, ids, weights)
    with pytest.raises(ValueError, match="w13 is a Tensor"):
        decode_gemm1(x, experts.w13.qweight, ids, weights)


def test_workspace_checks():
    experts, x, weights, ids = _small()
    ws = DecodeWorkspace.create(experts, top_k=1, max_tokens=1)
    with pytest.raises(ValueError, match="max_tokens=1; got M=2"):
        fused_moe_decode(x, experts, weights, ids, workspace=ws)
    ws = DecodeWorkspace.create(experts, top_k=2, max_tokens=4)
    with pytest.raises(ValueError, match="workspace was made for"):
        fused_moe_decode(x, experts, weights, ids, workspace=ws)
    with pytest.raises(ValueError, match="max_tokens=0"):
        DecodeWorkspace.create(experts, top_k=1, max_tokens=0)
    with pytest.raises(ValueError, match="block_n is 12"):
        DecodeConfig(block_n=12)
    with pytest.raises(ValueError, match="block_kw is 2"):
        DecodeConfig(block_kw=2)
    with pytest.raises(ValueError, match="prefetch is 3"):
        DecodeConfig(prefetch=3)
    with pytest.raises(ValueError, match="num_stages is 0"):
        DecodeConfig(num_stages=0)


# ------------------------------------------------------------------------------------------
# heuristics (pure Python)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 64])
@pytest.mark.parametrize("shape", [(128, 8, 2048, 768), (8, 2, 4096, 14336),
                                   (64, 6, 2048, 1408), (32, 4, 1024, 512)],
                         ids=["qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite", "tiny"])
def test_heuristic_fills_the_gpu(m, shape):
    e, top_k, h, i = shape
    sms = 132
    c1 = pick_config_gemm1(m, i, h, e, top_k, sms)
    c2 = pick_config_gemm2(m, h, i, e, top_k, sms)
    p1 = m * top_k * -(-i // c1.block_n) * c1.split_k
    split2 = (1 if c2.topk_inner >= top_k else top_k) * c2.split_k
    p2 = m * -(-h // c2.block_n) * split2
    assert p1 >= sms and p2 >= sms, (c1, c2)
    # no more K splits than K steps
    assert c1.split_k <= -(-h // (8 * c1.block_kw))
    assert c2.split_k <= -(-i // (8 * c2.block_kw))


def test_heuristics_fill_waves():
    """Configs measured on the H100 (notes_decode.md, session 14). GEMM2: split one-warp
    tiles only where the split keeps them in one wave of 8 warps per SM; 64-row two-warp
    tiles with 16-word steps only for short K; 128-row four-warp tiles for many waves.
    GEMM1: the one-warp tile whose waves of resident warps are fullest."""
    sms = 132
    mixtral = dict(n=4096, k=14336, num_experts=8, top_k=2, num_sms=sms)
    qwen3 = dict(n=2048, k=768, num_experts=128, top_k=8, num_sms=sms)

    def shape(c):
        return c.block_n, c.block_kw, c.split_k, c.num_warps

    # long K (Mixtral's 1792 words): 16-row 64-word one-warp tiles through the cp.async
    # ring, split two ways at M=1 (1024 warps) and not beyond
    ring = pick_config_gemm2(1, **mixtral)
    assert shape(ring) == (16, 64, 2, 1) and ring.num_stages == 3
    for m in (2, 3, 8):
        c = pick_config_gemm2(m, **mixtral)
        assert shape(c) == (16, 64, 1, 1) and c.num_stages == 3, m
    # shorter K keeps the register prefetch
    assert pick_config_gemm2(1, **qwen3).num_stages == 1
    assert shape(pick_config_gemm2(4, **qwen3)) == (64, 16, 1, 2)
    assert shape(pick_config_gemm2(2, **qwen3)) == (32, 32, 1, 1)
    # 2.5+ waves of one-warp tiles: 128-row tiles on four warps (12 warps per SM)
    assert shape(pick_config_gemm2(8, **qwen3)) == (128, 32, 1, 4)
    # deepseek-v2-lite M=4: K too long for 16-word steps; the one-warp tiles need 1.45
    # waves, the wide ones fit one
    deepseek = dict(n=2048, k=1408, num_experts=64, top_k=6, num_sms=sms)
    assert shape(pick_config_gemm2(4, **deepseek)) == (128, 32, 1, 4)
    # qwen3-235b M=2: 1.94 waves of one-warp tiles beat 1.29 of wide ones
    qwen3_235b = dict(n=4096, k=1536, num_experts=128, top_k=8, num_sms=sms)
    assert shape(pick_config_gemm2(2, **qwen3_235b)) == (32, 32, 1, 1)
    # GEMM1: another one-warp tile where its last wave of resident warps is 10 % fuller
    g1 = {"mixtral": (14336, 4096, 8, 2), "qwen3": (768, 2048, 128, 8),
          "deepseek": (1408, 2048, 64, 6), "qwen3_235b": (1536, 4096, 128, 8),
          "olmoe": (1024, 2048, 64, 8)}

    def gemm1(m, model):
        return shape(pick_config_gemm1(m, *g1[model], sms))

    assert gemm1(1, "qwen3_235b") == (8, 32, 1, 1)  # 1536 warps: 0.97 of a 12-warp wave
    assert gemm1(2, "deepseek") == (8, 64, 1, 1)  # 2112 warps: two full 8-warp waves
    assert gemm1(4, "olmoe") == (8, 64, 1, 1)
    # long K with 2.5+ waves of the ring tile (21 warps an SM): 8-row ring tiles
    assert gemm1(1, "mixtral") == (4, 64, 1, 1)
    assert pick_config_gemm1(1, *g1["mixtral"], sms).num_stages == 3
    assert gemm1(3, "qwen3_235b") == (4, 64, 1, 1)
    assert pick_config_gemm1(1, *g1["qwen3_235b"], sms).num_stages == 1  # 1.1 waves
    assert pick_config_gemm1(2, *g1["qwen3_235b"], sms).num_stages == 1  # 2.2 waves
    assert pick_config_gemm1(8, *g1["qwen3"], sms).num_stages == 1  # short K
    assert gemm1(2, "qwen3") == (8, 32, 1, 1)
    assert gemm1(1, "qwen3") == (8, 32, 1, 2)  # below 8 warps an SM: two warps a tile
    # the deterministic mode never gets a split, so never the split one-warp tiles
    _, d2 = deterministic_decode_configs(14336, 4096, 8, 2, sms)
    assert d2.split_k == 1 and d2.topk_inner == 2
    _, d2 = deterministic_decode_configs(768, 2048, 128, 8, sms)
    assert d2.split_k == 1 and d2.num_warps == 4


# memory clock x 2 x bus width over the SMs; the H200's as its driver reported them (session 40)
H100_SM_READ_RATE = 2 * 2.619e9 * 5120 / 8 / 132  # 3.35 TB/s over 132 SMs: 25.4 GB/s
H200_SM_READ_RATE = 2 * 3.201e9 * 6016 / 8 / 132  # 4.81 TB/s over 132 SMs: 36.5 GB/s


def test_ring_steps_follow_the_cards_read_rate():
    """The ring tiles read 64-word steps on the H100's rate (or an unknown one) and 128-word
    steps from ``WIDE_RING_MIN_SM_READ_RATE`` an SM (the H200: session 40), GEMM1's from one
    wave of warps; GEMM2's split stays what the 64-word steps give; the register tiles of
    short K do not change."""
    assert ring_step_words(None) == ring_step_words(H100_SM_READ_RATE) == 64
    assert ring_step_words(H200_SM_READ_RATE) == 128
    assert ring_step_words(decode.WIDE_RING_MIN_SM_READ_RATE) == 128
    sms = 132
    mixtral1 = (14336, 4096, 8, 2, sms)
    mixtral2 = dict(n=4096, k=14336, num_experts=8, top_k=2, num_sms=sms)

    def shape(c):
        return c.block_n, c.block_kw, c.split_k, c.num_warps, c.num_stages

    for rate, words in ((None, 64), (H100_SM_READ_RATE, 64), (H200_SM_READ_RATE, 128)):
        for m in (1, 2, 4):
            assert shape(pick_config_gemm1(m, *mixtral1, sm_read_rate=rate)) == (
                4, words, 1, 1, 3), (rate, m)
        assert shape(pick_config_gemm2(1, **mixtral2, sm_read_rate=rate)) == (
            16, words, 2, 1, 3)
        assert shape(pick_config_gemm2(2, **mixtral2, sm_read_rate=rate)) == (
            16, words, 1, 1, 3)
        d1, d2 = deterministic_decode_configs(14336, 4096, 8, 2, sms, sm_read_rate=rate)
        assert d1.block_kw == d2.block_kw == words and d2.split_k == 1
    # GEMM1's ring tile with 128-word steps from one wave of warps (qwen3-235b M=1: 1.1
    # waves, M=2: 2.2), with 64-word steps from 2.5; below one wave the register tiles
    qwen3_235b = (1536, 4096, 128, 8, sms)
    for m in (1, 2):
        assert shape(pick_config_gemm1(m, *qwen3_235b, sm_read_rate=H200_SM_READ_RATE)) == (
            4, 128, 1, 1, 3)
        assert pick_config_gemm1(m, *qwen3_235b, sm_read_rate=H100_SM_READ_RATE).num_stages == 1
    assert pick_config_gemm1(1, 1024, 4096, 8, 2, sms,
                             sm_read_rate=H200_SM_READ_RATE).num_stages == 1  # 0.18 waves
    for m in (1, 2, 4, 8):  # qwen3-30b: short K, the register tiles whatever the card
        assert pick_config_gemm1(m, 768, 2048, 128, 8, sms) == pick_config_gemm1(
            m, 768, 2048, 128, 8, sms, sm_read_rate=H200_SM_READ_RATE)
        assert pick_config_gemm2(m, 2048, 768, 128, 8, sms) == pick_config_gemm2(
            m, 2048, 768, 128, 8, sms, sm_read_rate=H200_SM_READ_RATE)


def test_card_sm_read_rate():
    """An SM's share of the card's peak DRAM rate from the driver on the GPU (between a
    consumer card's and a future HBM card's), None off it."""
    assert decode.card_sm_read_rate(torch.device("cpu")) is None
    if ON_GPU:
        rate = decode.card_sm_read_rate(torch.device(DEVICE))
        assert rate is not None and 2e9 < rate < 200e9, rate


# ------------------------------------------------------------------------------------------
# CUDA graphs (GPU only)
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_replay_with_new_routing(dtype):
    experts = random_experts(16, 256, 128, group_size=64, dtype=dtype, device=DEVICE, seed=16)
    m, top_k = 3, 4
    x = torch.randn(m, 256, dtype=dtype, device=DEVICE)
    weights, ids = _routing(m, 16, top_k)
    ws = DecodeWorkspace.create(experts, top_k=top_k, max_tokens=m)
    out = torch.empty(m, 256, dtype=dtype, device=DEVICE)
    cfg1 = DecodeConfig(block_n=16, block_kw=8, split_k=2)
    cfg2 = DecodeConfig(block_n=16, block_kw=4, split_k=2, topk_inner=1)

    def step():
        fused_moe_decode(x, experts, weights, ids, out=out, workspace=ws,
                         gemm1_config=cfg1, gemm2_config=cfg2)

    graph, _ = capture_graph(step)  # compiles outside the capture
    for _ in range(5):
        w_new, i_new = _routing(m, 16, top_k)
        weights.copy_(w_new)
        ids.copy_(i_new)
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        ref = moe_reference(x, experts, weights, ids, compute_dtype=torch.float64,
                            round_intermediate=True)
        _assert_close(out, ref, dtype)
