"""The router and the alignment in one program (``fused_topk_align``) and the prefill layer
that starts with it (``fused_moe_prefill_from_logits``): bit for bit the router, then
``align_block_size``, then ``fused_moe_prefill``."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, ON_GPU

from w4a16moe.experts import HybridW4A16MoEExperts
from w4a16moe.kernels import prefill as prefill_mod
from w4a16moe.kernels import route_align
from w4a16moe.kernels.prefill import (
    PrefillWorkspace,
    fused_moe_prefill,
    fused_moe_prefill_from_logits,
)
from w4a16moe.quantize import random_experts
from w4a16moe.routing import (
    align_block_size,
    fused_topk,
    fused_topk_align,
    fused_topk_align_supported,
)


def _separately(logits, top_k, block, expert_map=None, **routing):
    w, ids = fused_topk(logits, top_k, backend="triton", **routing)
    return w, ids, align_block_size(ids, block, logits.shape[1], expert_map, backend="torch")


#: expert counts of the built-in models: there the program's rows sit in their warps as in
#: the router's programs, so the softmax sums add in the same order (on the GPU; with other
#: counts Triton may lay a row out differently, and a weight's last bit can differ)
EXACT_WEIGHTS_EXPERTS = (8, 16, 64, 128)


def _assert_same(got, want, num_experts):
    (w1, i1, b1), (w2, i2, b2) = got, want
    assert torch.equal(i1, i2)
    if num_experts in EXACT_WEIGHTS_EXPERTS:  # the router's arithmetic, bit for bit (NaN too)
        assert torch.equal(w1.view(torch.int32), w2.view(torch.int32))
    else:
        torch.testing.assert_close(w1, w2, rtol=1e-6, atol=0, equal_nan=True)
    for name, a, b in zip(("sorted_token_ids", "expert_ids", "num_tokens_post_padded"), b1, b2,
                          strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("m,e,top_k,block", [(1, 8, 2, 16), (5, 8, 2, 4), (16, 8, 2, 16),
                                             (3, 64, 6, 16), (4, 60, 4, 32), (2, 128, 8, 8),
                                             (4, 128, 8, 8), (7, 16, 16, 1), (1, 1000, 8, 8)])
@pytest.mark.parametrize("scoring,renormalize,bias", [("softmax", True, False),
                                                       ("sigmoid", False, True)])
def test_equals_the_router_then_the_alignment(m, e, top_k, block, scoring, renormalize, bias):
    logits = torch.randn(m, e, device=DEVICE)
    routing = dict(scoring=scoring, renormalize=renormalize, routed_scaling_factor=2.5,
                   correction_bias=torch.randn(e, device=DEVICE) * 0.1 if bias else None)
    _assert_same(fused_topk_align(logits, top_k, block, **routing),
                 _separately(logits, top_k, block, **routing), e)


def test_expert_map_half_logits_strides_and_nan_rows():
    e, top_k, block = 16, 3, 4
    # 16 global experts; this rank holds every third as locals 0..5, the rest remote
    emap = torch.full((e,), -1, dtype=torch.int64, device=DEVICE)
    emap[::3] = torch.arange(6, device=DEVICE)
    wide = torch.randn(7, 2 * e, device=DEVICE).half()
    logits = wide[:, ::2]  # a non-unit column stride
    logits[4] = float("nan")
    _assert_same(fused_topk_align(logits, top_k, block, emap),
                 _separately(logits, top_k, block, emap), e)


def test_fills_given_outputs():
    logits = torch.randn(6, 8, device=DEVICE)
    want = _separately(logits, 2, 4)
    out = tuple(torch.full_like(t, 12345) for t in want[2])
    got = fused_topk_align(logits, 2, 4, out=out)
    assert all(a is b for a, b in zip(got[2], out, strict=True))
    _assert_same(got, want, 8)


def test_limits_and_errors():
    # the router's tiles side by side, at most MAX_WARPS warps
    assert route_align.tile(1, 128) == (1, 1) and route_align.tile(3, 128) == (4, 4)
    assert route_align.tile(1, 8) == (4, 1) and route_align.tile(16, 8) == (16, 4)
    assert route_align.tile(2, 1024) == (2, 4)  # two 1024-expert rows on two warps each
    assert route_align.supported(4, 128) and not route_align.supported(5, 128)
    assert route_align.supported(16, 8) and not route_align.supported(17, 8)
    assert not route_align.supported(0, 8)
    assert not fused_topk_align_supported(4, 8, "meta")
    logits = torch.randn(17, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"router_logits has shape \(17, 8\).*4 warps"):
        fused_topk_align(logits, 2, 4)
    small = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="block_size is 0"):
        fused_topk_align(small, 2, 0)
    with pytest.raises(ValueError, match="top_k is 9"):
        fused_topk_align(small, 9, 4)
    with pytest.raises(ValueError, match=r"expert_map has shape \(7,\); expected \(8,\)"):
        fused_topk_align(small, 2, 4, torch.zeros(7, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="sorted_token_ids"):
        bad = (torch.empty(3, dtype=torch.int32, device=DEVICE),) * 2 + (
            torch.empty(1, dtype=torch.int32, device=DEVICE),)
        fused_topk_align(small, 2, 4, out=bad)


def _layer_case(m, e=6, h=64, i=32, top_k=2, seed=0):
    experts = random_experts(e, h, i, group_size=32, dtype=torch.float16, device=DEVICE,
                             seed=seed)
    x = torch.randn(m, h, dtype=torch.float16, device=DEVICE)
    return experts, x, torch.randn(m, e, device=DEVICE)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("m", [1, 5])
def test_layer_from_logits_equals_route_then_layer(m, fused, monkeypatch):
    monkeypatch.setattr(prefill_mod, "ROUTE_ALIGN", fused)
    experts, x, logits = _layer_case(m)
    calls = []
    real = prefill_mod.fused_topk_align
    monkeypatch.setattr(prefill_mod, "fused_topk_align",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    got = fused_moe_prefill_from_logits(x, experts, logits, 2, renormalize=False)
    w, ids = fused_topk(logits, 2, renormalize=False)
    assert torch.equal(got, fused_moe_prefill(x, experts, w, ids))
    assert len(calls) == (1 if fused else 0)


def test_layer_from_logits_with_a_workspace_and_grouped_routing():
    experts, x, logits = _layer_case(4, e=8)
    ws = PrefillWorkspace.allocate(4, experts, 2)
    got = fused_moe_prefill_from_logits(x, experts, logits, 2, workspace=ws)
    w, ids = fused_topk(logits, 2)
    assert torch.equal(got, fused_moe_prefill(x, experts, w, ids, workspace=ws))
    # grouped top-k is not the one program's: routed by fused_topk, the same answer
    routing = dict(num_expert_group=2, topk_group=1)
    got = fused_moe_prefill_from_logits(x, experts, logits, 2, **routing)
    w, ids = fused_topk(logits, 2, **routing)
    assert torch.equal(got, fused_moe_prefill(x, experts, w, ids))


def test_layer_from_logits_errors():
    experts, x, logits = _layer_case(3)
    with pytest.raises(ValueError, match=r"router_logits has shape \(2, 6\); expected \[3, E\]"):
        fused_moe_prefill_from_logits(x, experts, logits[:2], 2)
    with pytest.raises(ValueError, match="top_k is 7"):
        fused_moe_prefill_from_logits(x, experts, logits, 7)
    with pytest.raises(ValueError, match=r"hidden_states has shape \(192,\); expected \[M, H\]"):
        fused_moe_prefill_from_logits(x.reshape(-1), experts, logits, 2)
    w, ids = fused_topk(logits, 2)
    blocks = align_block_size(ids, 16, 6)
    with pytest.raises(ValueError, match="blocks is given without configs"):
        fused_moe_prefill(x, experts, w, ids, blocks=blocks)
    cfgs = prefill_mod.layer_configs(experts, 2, 3, DEVICE)
    wrong = align_block_size(ids, 2 * cfgs[0]["BLOCK_SIZE_M"], 6)
    with pytest.raises(ValueError, match="blocks has shapes"):
        fused_moe_prefill(x, experts, w, ids, configs=cfgs, blocks=wrong)


def test_experts_forward_logits_on_the_prefill_path(monkeypatch):
    experts, x, logits = _layer_case(5)
    moe = HybridW4A16MoEExperts(experts, top_k=2)
    calls = []
    real = prefill_mod.fused_moe_prefill_from_logits
    monkeypatch.setattr(prefill_mod, "fused_moe_prefill_from_logits",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    got = moe.forward_logits(x, logits, path="prefill")
    w, ids = fused_topk(logits, 2)
    assert torch.equal(got, moe(x, w, ids, path="prefill"))
    assert calls == [1]
    with pytest.raises(ValueError, match=r"router_logits has shape \(5, 4\); expected \[M, 6\]"):
        moe.forward_logits(x, logits[:, :4], path="prefill")
    with pytest.raises(ValueError, match="hidden_states has dtype torch.float32"):
        moe.forward_logits(x.float(), logits, path="prefill")


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("model,m", [("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 3),
                                     ("qwen3-30b-a3b", 4), ("qwen3-30b-a3b", 8),
                                     ("mixtral-8x7b", 4), ("mixtral-8x7b", 16),
                                     ("deepseek-v2-lite", 4), ("olmoe-1b-7b", 2)])
def test_gpu_layer_bits_and_graph(model, m):
    """The shipped layer (its table's tiles, the PDL chain, the workspace) from the logits,
    bit for bit the router + layer, eagerly and replayed from a CUDA graph."""
    from w4a16moe.kernels.tune import MODEL_SHAPES, random_packed_experts

    s = MODEL_SHAPES[model]
    experts = random_packed_experts(s, torch.bfloat16, torch.device(DEVICE), seed=3)
    ws = PrefillWorkspace.allocate(m, experts, s.top_k)
    x = torch.randn(m, s.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    logits = torch.randn(m, s.num_experts, device=DEVICE)
    w, ids = fused_topk(logits, s.top_k)
    want = fused_moe_prefill(x, experts, w, ids, workspace=ws).clone()
    got = fused_moe_prefill_from_logits(x, experts, logits, s.top_k, workspace=ws)
    assert torch.equal(got, want)
    out = torch.empty_like(want)
    fused_moe_prefill_from_logits(x, experts, logits, s.top_k, workspace=ws, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_moe_prefill_from_logits(x, experts, logits, s.top_k, workspace=ws, out=out)
    for seed in range(3):
        logits.copy_(torch.randn(m, s.num_experts, device=DEVICE,
                                 generator=torch.Generator(DEVICE).manual_seed(seed)))
        out.fill_(float("nan"))
        graph.replay()
        w, ids = fused_topk(logits, s.top_k)
        assert torch.equal(out, fused_moe_prefill(x, experts, w, ids, workspace=ws))
