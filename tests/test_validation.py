"""Input validation at the public boundary of :class:`HybridW4A16MoEExperts`.

Bad inputs raise ValueError naming the tensor, the expected and the found value; inputs that
are merely laid out differently (non-contiguous, int64 ids, other float weights) give the
same result as the plain ones; NaN/Inf in the activations reach the outputs of the affected
tokens as float arithmetic would (never silent zeros) and no other token.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, ON_GPU

from w4a16moe import HybridW4A16MoEExperts
from w4a16moe import experts as experts_mod
from w4a16moe.kernels.prefill import fused_moe_prefill
from w4a16moe.quantize import random_experts
from w4a16moe.reference import moe_reference
from w4a16moe.routing import fused_topk

E, H, I, TOP_K = 5, 64, 96, 2
PATHS = ["decode", "prefill"]


def _layer(dtype=torch.float16, e=E, **kw):
    return random_experts(e, H, I, group_size=32, dtype=dtype, device=DEVICE, seed=3, **kw)


def _inputs(m=3, e=E, dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, H, generator=gen).to(dtype).to(DEVICE)
    tw, ti = fused_topk(torch.randn(m, e, generator=gen).to(DEVICE), TOP_K)
    return x, tw, ti


def _close(out, ref, tol=2.0**-7):
    ref = ref.double()
    err = (out.double() - ref).abs()
    assert (err <= tol * (ref.abs() + ref.abs().max())).all(), err.max().item()


# ------------------------------------------------------------------------------------------
# shapes, dtypes, devices
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    (lambda x, tw, ti: (x.float(), tw, ti),
     r"hidden_states has dtype torch.float32; expected torch.float16 \(the experts' dtype\)"),
    (lambda x, tw, ti: (x.to(torch.bfloat16), tw, ti),
     r"hidden_states has dtype torch.bfloat16; expected torch.float16"),
    (lambda x, tw, ti: (x[:, :-8], tw, ti),
     r"hidden_states has shape \(3, 56\); expected \[M, 64\]"),
    (lambda x, tw, ti: (x[0], tw, ti), r"hidden_states has shape \(64,\); expected \[M, 64\]"),
    (lambda x, tw, ti: (x, tw, ti.float()),
     r"topk_ids has dtype torch.float32; expected torch.int32 or torch.int64"),
    (lambda x, tw, ti: (x, tw, ti.to(torch.int16)),
     r"topk_ids has dtype torch.int16; expected torch.int32 or torch.int64"),
    (lambda x, tw, ti: (x, tw, ti[:, :1]),
     r"topk_ids has shape \(3, 1\); expected \[3, 2\] \(M, top_k\)"),
    (lambda x, tw, ti: (x, tw, ti[:2]), r"topk_ids has shape \(2, 2\); expected \[3, 2\]"),
    (lambda x, tw, ti: (x, tw[:, :1], ti),
     r"topk_weights has shape \(3, 1\); expected \[3, 2\]"),
    (lambda x, tw, ti: (x, ti, ti),
     r"topk_weights has dtype torch.int32; expected a floating-point dtype"),
    (lambda x, tw, ti: (x.tolist(), tw, ti),
     r"hidden_states is a list; expected a torch.Tensor"),
])
def test_bad_inputs_name_tensor_expected_and_found(bad, match):
    moe = HybridW4A16MoEExperts(_layer(), TOP_K)
    args = bad(*_inputs())
    for path in PATHS + [None]:
        with pytest.raises(ValueError, match=match):
            moe(*args, path=path)


@pytest.mark.parametrize("which", ["hidden_states", "topk_weights", "topk_ids"])
def test_mismatched_device(which):
    """A tensor on another device (the meta device stands in for a second device on a
    machine without a GPU) is rejected before any kernel runs."""
    moe = HybridW4A16MoEExperts(_layer(), TOP_K)
    x, tw, ti = _inputs()
    args = {"hidden_states": x, "topk_weights": tw, "topk_ids": ti}
    args[which] = args[which].to("meta")
    expected = torch.device(DEVICE).type
    with pytest.raises(ValueError, match=rf"{which} is on meta; expected {expected}"):
        moe(args["hidden_states"], args["topk_weights"], args["topk_ids"])


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU for a second real device")
def test_cpu_routing_with_gpu_activations():
    moe = HybridW4A16MoEExperts(_layer(), TOP_K)
    x, tw, ti = _inputs()
    with pytest.raises(ValueError, match=r"topk_ids is on cpu; expected cuda"):
        moe(x, tw, ti.cpu())


def test_bad_out():
    moe = HybridW4A16MoEExperts(_layer(), TOP_K)
    x, tw, ti = _inputs()
    for path in PATHS:
        with pytest.raises(ValueError, match="out"):
            moe(x, tw, ti, path=path, out=torch.empty(3, H + 8, dtype=x.dtype, device=DEVICE))
        with pytest.raises(ValueError, match="out"):
            moe(x, tw, ti, path=path, out=torch.empty(3, H, dtype=torch.float32, device=DEVICE))


# ------------------------------------------------------------------------------------------
# values of topk_ids and expert_map
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_id,lo,hi", [(E, 0, E), (-1, -1, None), (100, 0, 100)])
def test_topk_ids_out_of_range(bad_id, lo, hi):
    moe = HybridW4A16MoEExperts(_layer(), TOP_K, validate=True)
    x, tw, ti = _inputs()
    ti = ti.clone()
    ti[1, 1] = bad_id
    hi = int(ti.max()) if hi is None else hi
    for path in PATHS:
        with pytest.raises(ValueError, match=rf"topk_ids range over \[{lo}, {hi}\]; expected "
                                             rf"ids in \[0, {E}\)"):
            moe(x, tw, ti, path=path)


def test_topk_ids_checked_against_global_count_with_expert_map():
    emap = torch.tensor([-1, 0, 1, -1, 2, 3, 4], dtype=torch.int32, device=DEVICE)
    moe = HybridW4A16MoEExperts(_layer(), TOP_K, expert_map=emap, validate=True)
    x, tw, ti = _inputs(e=7)
    moe(x, tw, ti)  # ids up to 6 (global) are fine
    ti = ti.clone()
    ti[0, 0] = 7
    with pytest.raises(ValueError, match=r"expected ids in \[0, 7\)"):
        moe(x, tw, ti)


def test_value_check_policy(monkeypatch):
    """CPU tensors are always checked; GPU tensors only with validate=True or
    W4A16MOE_CHECK=1; validate=False turns the check off everywhere."""
    ex = _layer()
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(experts_mod.CHECK_ENV, raising=False)
    default = HybridW4A16MoEExperts(ex, TOP_K)
    assert default.checks_values(cpu) and not default.checks_values(gpu)
    monkeypatch.setenv(experts_mod.CHECK_ENV, "1")
    assert default.checks_values(gpu)
    assert HybridW4A16MoEExperts(ex, TOP_K, validate=True).checks_values(gpu)
    off = HybridW4A16MoEExperts(ex, TOP_K, validate=False)
    assert not off.checks_values(cpu) and not off.checks_values(gpu)


@pytest.mark.parametrize("emap,match", [
    ([0, 1, -2], r"expert_map ranges over \[-2, 1\]; expected local ids in \[0, 5\) or -1"),
    ([0, 5, 1], r"expert_map ranges over \[0, 5\]; expected local ids in \[0, 5\) or -1"),
    ([[0, 1]], r"expert_map has shape \(1, 2\) and dtype torch.int32; expected a 1-D"),
    ([], r"expert_map is empty"),
])
def test_bad_expert_map(emap, match):
    t = torch.tensor(emap, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        HybridW4A16MoEExperts(_layer(), 1, expert_map=t)
    with pytest.raises(ValueError, match=r"expert_map has shape \(3,\) and dtype torch.float32"):
        HybridW4A16MoEExperts(_layer(), 1, expert_map=torch.zeros(3, device=DEVICE))


def test_deterministic_rejects_atomic_topk_sum():
    ex = _layer()
    x, tw, ti = _inputs()
    with pytest.raises(ValueError, match="atomic_topk_sum=True with deterministic=True"):
        fused_moe_prefill(x, ex, tw, ti, atomic_topk_sum=True, deterministic=True)


# ------------------------------------------------------------------------------------------
# accepted variants give the same result
# ------------------------------------------------------------------------------------------
def _variants(x, tw, ti):
    """(label, x, tw, ti) with the same values in other layouts and dtypes."""
    wide = torch.zeros(x.shape[0], 2 * H, dtype=x.dtype, device=DEVICE)
    wide[:, 8: 8 + H] = x
    x_t = x.t().contiguous().t()                              # column-major: stride (1, M)
    ti_wide = torch.zeros(ti.shape[0], 2 * TOP_K, dtype=ti.dtype, device=DEVICE)
    ti_wide[:, ::2] = ti
    tw_t = tw.t().contiguous().t()
    yield "row-strided x", wide[:, 8: 8 + H], tw, ti
    yield "column-major x", x_t, tw, ti
    yield "strided ids", x, tw, ti_wide[:, ::2]
    yield "column-major weights", x, tw_t, ti
    yield "int64 ids", x, tw, ti.long()
    yield "fp16 weights", x, tw.half(), ti  # exactly representable? compared with tolerance
    yield "fp64 weights", x, tw.double(), ti


@pytest.mark.parametrize("path", PATHS)
def test_layouts_and_dtypes_accepted_and_correct(path):
    ex = _layer()
    x, tw, ti = _inputs(m=2)
    moe = HybridW4A16MoEExperts(ex, TOP_K, deterministic=True)
    base = moe(x, tw, ti, path=path)
    ref = moe_reference(x, ex, tw, ti, compute_dtype=torch.float64, round_intermediate=True)
    _close(base, ref)
    for label, xv, twv, tiv in _variants(x, tw, ti):
        got = moe(xv, twv, tiv, path=path)
        if label == "fp16 weights":
            _close(got, moe_reference(x, ex, twv, ti, compute_dtype=torch.float64,
                                      round_intermediate=True))
        else:
            assert torch.equal(got, base), label


# ------------------------------------------------------------------------------------------
# NaN / Inf
# ------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_propagate_to_affected_tokens_only(path, deterministic, poison):
    """Token 1 gets one poisoned element: its output is non-finite wherever the float64
    reference is (NaN, not a silent zero); every other token is finite and correct."""
    ex = _layer()
    moe = HybridW4A16MoEExperts(ex, TOP_K, deterministic=deterministic)
    x, tw, ti = _inputs(m=5)
    ti = ti.clone()
    ti[3] = ti[1]  # a clean token on the same experts: shares the poisoned token's blocks
    x = x.clone()
    x[1, 17] = poison
    out = moe(x, tw, ti, path=path)
    ref = moe_reference(x, ex, tw, ti, compute_dtype=torch.float64, round_intermediate=True)
    bad = ~torch.isfinite(ref)
    assert bad[1].any() and not bad[[0, 2, 3, 4]].any()
    assert (~torch.isfinite(out[1]))[bad[1]].all(), "poisoned token has finite outputs"
    clean = [0, 2, 3, 4]
    assert torch.isfinite(out[clean]).all(), "poison leaked into other tokens"
    _close(out[clean], ref[clean])


@pytest.mark.parametrize("path", PATHS)
def test_nan_in_remote_expert_slot_contributes_nothing(path):
    """With an expert_map, a token routed only to remote experts yields zeros even with NaN
    activations (the reference skips those slots; so do the kernels)."""
    emap = torch.tensor([0, 1, 2, 3, 4, -1, -1], dtype=torch.int32, device=DEVICE)
    moe = HybridW4A16MoEExperts(_layer(), TOP_K, expert_map=emap)
    x, tw, ti = _inputs(m=3, e=7)
    ti = ti.clone()
    ti[2] = torch.tensor([5, 6], dtype=ti.dtype)
    x = x.clone()
    x[2] = float("nan")
    out = moe(x, tw, ti, path=path)
    assert (out[2] == 0).all()
    assert torch.isfinite(out[:2]).all()
