"""The one-kernel Triton router (``fused_topk(backend="triton")``) against the torch path."""

import pytest
import torch

from w4a16moe.routing import fused_topk

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _both(logits, top_k, **kw):
    wt, it = fused_topk(logits, top_k, backend="torch", **kw)
    wk, ik = fused_topk(logits, top_k, backend="triton", **kw)
    assert wk.dtype == torch.float32 and ik.dtype == torch.int32
    assert wk.shape == wt.shape == (logits.shape[0], top_k) and ik.shape == it.shape
    return (wt, it), (wk, ik)


@pytest.mark.parametrize("e,top_k", [(8, 2), (60, 4), (128, 8), (5, 5)])
@pytest.mark.parametrize("m", [1, 7, 37])
@pytest.mark.parametrize("scoring,renormalize", [("softmax", True), ("softmax", False),
                                                 ("sigmoid", True)])
def test_matches_torch(e, top_k, m, scoring, renormalize):
    gen = torch.Generator().manual_seed(e * 1000 + m)
    logits = (3 * torch.randn(m, e, generator=gen)).to(DEV)
    (wt, it), (wk, ik) = _both(logits, top_k, scoring=scoring, renormalize=renormalize)
    assert torch.equal(it, ik)
    torch.testing.assert_close(wk, wt, rtol=2e-6, atol=1e-7)


def test_bias_and_scaling():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 64, generator=gen).to(DEV)
    bias = (0.3 * torch.randn(64, generator=gen)).to(DEV)
    (wt, it), (wk, ik) = _both(logits, 6, scoring="sigmoid", correction_bias=bias,
                               routed_scaling_factor=2.5)
    assert torch.equal(it, ik)
    torch.testing.assert_close(wk, wt, rtol=2e-6, atol=1e-7)
    # the bias changes the choice, not the weights: chosen weights are unbiased scores
    plain = torch.sigmoid(logits.float()).gather(1, ik.long())
    torch.testing.assert_close(wk, 2.5 * plain / plain.sum(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_and_strides(dtype):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(40, 6, generator=gen).to(DEV, dtype)
    logits = base.t()  # [6, 40] with stride (1, 6): not contiguous along E
    assert not logits.is_contiguous()
    (wt, it), (wk, ik) = _both(logits, 3)
    assert torch.equal(it, ik)
    torch.testing.assert_close(wk, wt, rtol=2e-6, atol=1e-7)


def test_ties_take_the_lower_expert_and_order_is_descending():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, -1.0, 1.0]], device=DEV)
    w, ids = fused_topk(logits, 4, backend="triton", renormalize=False)
    assert ids.tolist() == [[1, 3, 2, 5]]
    assert (w[0, :-1] >= w[0, 1:]).all()


def test_empty_batch_and_nan_rows():
    w, ids = fused_topk(torch.empty(0, 16, device=DEV), 2, backend="triton")
    assert w.shape == (0, 2) and ids.shape == (0, 2)
    logits = torch.randn(3, 16, device=DEV)
    logits[1, 4] = float("nan")
    w, ids = fused_topk(logits, 3, backend="triton")
    # a NaN logit poisons its token's softmax: the weights are NaN, never silently finite
    assert torch.isnan(w[1]).all() and torch.isfinite(w[[0, 2]]).all()
    assert ((ids >= 0) & (ids < 16)).all() and len(set(ids[1].tolist())) == 3
    wt, it = fused_topk(logits[[0, 2]], 3, backend="torch")
    assert torch.equal(ids[[0, 2]], it)


def test_nan_scores_are_picked_last():
    """With sigmoid scores a NaN logit spoils only its own expert: it ranks below every
    number (taken only when the numbers run out, its weight NaN), the ids stay distinct."""
    logits = torch.tensor([[0.5, float("nan"), 2.0, -1.0, float("nan"), 1.0]], device=DEV)
    w, ids = fused_topk(logits, 4, backend="triton", scoring="sigmoid", renormalize=False)
    assert ids.tolist() == [[2, 5, 0, 3]]
    torch.testing.assert_close(w, torch.sigmoid(logits[:, [2, 5, 0, 3]]))
    w, ids = fused_topk(logits, 6, backend="triton", scoring="sigmoid", renormalize=False)
    assert ids.tolist() == [[2, 5, 0, 3, 1, 4]]
    assert torch.isfinite(w[0, :4]).all() and torch.isnan(w[0, 4:]).all()


def test_negative_choices_rank_by_value():
    """A correction bias can make the choice scores negative: they still rank by value (the
    arg-max keys keep the order of negative floats), and the weights are the unbiased
    scores."""
    logits = torch.zeros(1, 5, device=DEV)
    bias = torch.tensor([-3.0, -1.0, -2.0, -0.5, -1.0], device=DEV)  # choices -2.5 .. 0
    w, ids = fused_topk(logits, 4, backend="triton", scoring="sigmoid", correction_bias=bias,
                        renormalize=False)
    assert ids.tolist() == [[3, 1, 4, 2]]
    torch.testing.assert_close(w, torch.full((1, 4), 0.5, device=DEV))


@pytest.mark.parametrize("wdt", [torch.float16, torch.bfloat16])
def test_output_dtypes(wdt):
    """Scores stored in the logits' dtype and int64 ids (what transformers routers return)."""
    from w4a16moe.kernels.router import topk_router

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(11, 24, generator=gen).to(DEV)
    wt, it = fused_topk(logits, 4, backend="torch")
    w, ids = topk_router(logits, 4, weights_dtype=wdt, ids_dtype=torch.int64)
    assert w.dtype == wdt and ids.dtype == torch.int64
    assert torch.equal(ids, it.long())
    if DEV == "cpu" and wdt == torch.bfloat16:
        # the interpreter's float32 -> bf16 store truncates (TESTING_FACTS: bf16 under the
        # interpreter): one bf16 ulp; on a GPU the store rounds to nearest, bit for bit
        torch.testing.assert_close(w.float(), wt, rtol=2.0**-7, atol=0.0)
    else:
        assert torch.equal(w, wt.to(wdt))
    with pytest.raises(ValueError, match="ids_dtype"):
        topk_router(logits, 4, ids_dtype=torch.int16)


def test_errors():
    logits = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="backend is 'cuda'"):
        fused_topk(logits, 2, backend="cuda")
    with pytest.raises(ValueError, match="grouped top-k"):
        fused_topk(logits, 2, backend="triton", num_expert_group=2, topk_group=1)
    with pytest.raises(ValueError, match="floating point"):
        fused_topk(torch.ones(2, 8, dtype=torch.int64, device=DEV), 2)
    # auto with groups falls back to torch
    w, ids = fused_topk(logits, 2, num_expert_group=2, topk_group=1)
    assert ids.shape == (2, 2)


@pytest.mark.parametrize("e,top_k", [(128, 8), (8, 2), (1024, 8)])
def test_a_token_routes_the_same_alone_and_in_a_batch(e, top_k):
    """The launch (tokens per program, warps) depends on E only, so a token's weights are
    bitwise the same whatever the batch around it (the deterministic mode relies on it)."""
    from w4a16moe.kernels.router import rows_per_program, topk_router, warps_per_program

    assert warps_per_program(e) == (1 if e <= 512 else 2)
    assert rows_per_program(e) * triton_pow2(e) <= 512 or rows_per_program(e) == 1
    gen = torch.Generator().manual_seed(e)
    logits = (3 * torch.randn(37, e, generator=gen)).to(DEV)
    w_all, i_all = topk_router(logits, top_k)
    for t in (0, 5, 36):
        w_one, i_one = topk_router(logits[t:t + 1], top_k)
        assert torch.equal(w_one[0], w_all[t]) and torch.equal(i_one[0], i_all[t]), t


def triton_pow2(v):
    return 1 << (v - 1).bit_length()


def test_launch_overrides_are_checked():
    from w4a16moe.kernels.router import topk_router

    logits = torch.randn(3, 8, device=DEV)
    with pytest.raises(ValueError, match=r"rows=3, num_warps=1; expected a power of two"):
        topk_router(logits, 2, rows=3, num_warps=1)
    with pytest.raises(ValueError, match=r"rows=4, num_warps=3"):
        topk_router(logits, 2, rows=4, num_warps=3)
    w, i = topk_router(logits, 2, rows=2, num_warps=2)
    wt, it = fused_topk(logits, 2, backend="torch")
    assert torch.equal(i, it)
    torch.testing.assert_close(w, wt, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("e,top_k,m", [(128, 8, 5), (8, 2, 9), (60, 6, 3), (5, 5, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_arg_max_rounds_select_like_the_bitonic_top_k(e, top_k, m, bias, monkeypatch):
    """Without ``tl.topk`` (triton < 3.4) the router selects by rounds of arg-max: bitwise
    the same weights and ids as the bitonic network, ties, NaN and a correction bias
    included."""
    from w4a16moe.kernels import router

    if not router.HAVE_TOPK:
        pytest.skip("this Triton has no tl.topk: only the arg-max rounds run")
    gen = torch.Generator().manual_seed(e + m)
    logits = torch.randn(m, e, generator=gen)
    logits[0, : e // 2] = logits[0, 0]          # ties: the lower expert first
    if m > 2:
        logits[2, 1] = float("nan")             # picked last
    logits = logits.to(DEV)
    kw = dict(scoring="sigmoid", correction_bias=torch.randn(e, generator=gen).to(DEV)
              ) if bias else {}
    outs = []
    for have in (True, False):
        monkeypatch.setattr(router, "HAVE_TOPK", have)
        outs.append(router.topk_router(logits, top_k, **kw))
    (wb, ib), (wa, ia) = outs
    assert torch.equal(ib, ia)
    assert torch.equal(wb.nan_to_num(-1.0), wa.nan_to_num(-1.0))
