"""The mixed layer (GEMM1 on the grouped GEMM's tensor-core tiles, GEMM2 on the decode kernel)
and its place in the hybrid module: against the float32 reference, every option, the path
choice, workspaces, errors and annotations. On the CPU interpreter GEMM1 runs the same tiles on
the Triton kernel (the mma kernel needs a GPU); on a GPU these shapes run the mma kernel."""

import pytest
import torch
from conftest import DEVICE, ON_GPU

from w4a16moe import HybridW4A16MoEExperts, random_experts
from w4a16moe.kernels.mixed import (
    MIXED_GEMM1_CONFIG,
    MixedWorkspace,
    fused_moe_mixed,
    mixed_unsupported,
)
from w4a16moe.reference import moe_reference
from w4a16moe.routing import align_block_size, fused_topk

DTYPES = [torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# K = H a multiple of GEMM1's 256-column steps, G of the mma kernel's 128
H, I, G = 256, 128, 128


def _layer(e=4, symmetric=True, act_order=False, dtype=torch.float16, seed=0, g=G):
    return random_experts(e, H, I, group_size=g, symmetric=symmetric, act_order=act_order,
                          dtype=dtype, device=DEVICE, seed=seed)


def _routing(m, e, top_k, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return fused_topk(torch.randn(m, e, device=DEVICE, generator=gen), top_k)


def _check(out, ref, dtype):
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.abs().max().item() + 1e-6
    assert err <= (2e-2 if dtype == torch.float16 else 4e-2) * scale, (err, scale)


def _poisoned(m, dtype):
    return torch.full((m, H), float("nan"), device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_mixed_layer_matches_the_reference(dtype, symmetric, m, activation):
    ex = _layer(symmetric=symmetric, dtype=dtype, seed=m)
    x = torch.randn(m, H, device=DEVICE, dtype=dtype)
    tw, ti = _routing(m, ex.num_experts, 2, seed=m)
    ref = moe_reference(x, ex, tw, ti, activation=activation, round_intermediate=True)
    ws = MixedWorkspace.create(ex, 2, max_tokens=4)
    ws.decode.inter.fill_(float("nan"))
    out = _poisoned(m, dtype)
    assert fused_moe_mixed(x, ex, tw, ti, activation=activation, out=out, workspace=ws) is out
    _check(out, ref, dtype)
    # and without a workspace (allocating), the same bits
    assert torch.equal(fused_moe_mixed(x, ex, tw, ti, activation=activation), out)


def test_mixed_layer_act_order_expert_map_and_weight_on_input():
    """Act-order weights (GEMM1 then off the mma kernel), experts on another rank (-1) and
    the router weight on GEMM1's input."""
    ex = _layer(e=3, act_order=True, symmetric=False, seed=5)
    emap = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32, device=DEVICE)
    x = torch.randn(5, H, device=DEVICE, dtype=torch.float16)
    tw, ti = _routing(5, 6, 2, seed=5)
    ref = moe_reference(x, ex, tw, ti, expert_map=emap, apply_router_weight_on_input=True,
                        round_intermediate=True)
    ws = MixedWorkspace.create(ex, 2, max_tokens=5, num_global_experts=6)
    ws.decode.inter.fill_(float("nan"))
    out = fused_moe_mixed(x, ex, tw, ti, expert_map=emap, apply_router_weight_on_input=True,
                          workspace=ws, out=_poisoned(5, torch.float16))
    _check(out, ref, torch.float16)
    assert mixed_unsupported(ex) is not None
    if ON_GPU:
        assert "act-order" in mixed_unsupported(ex)


def test_mixed_layer_takes_given_blocks_and_checks_them():
    ex = _layer(seed=7)
    x = torch.randn(2, H, device=DEVICE, dtype=torch.float16)
    tw, ti = _routing(2, 4, 2, seed=7)
    ref = fused_moe_mixed(x, ex, tw, ti)
    blocks = align_block_size(ti, MIXED_GEMM1_CONFIG["BLOCK_SIZE_M"], 4)
    assert torch.equal(fused_moe_mixed(x, ex, tw, ti, blocks=blocks), ref)
    wrong = align_block_size(ti, 16, 4)
    with pytest.raises(ValueError, match="blocks has shapes"):
        fused_moe_mixed(x, ex, tw, ti, blocks=wrong)


def test_mixed_layer_rejects_bad_arguments():
    ex = _layer()
    x = torch.randn(2, H, device=DEVICE, dtype=torch.float16)
    tw, ti = _routing(2, 4, 2)
    with pytest.raises(ValueError, match="gemm1_config has SORTED_ROWS=True"):
        fused_moe_mixed(x, ex, tw, ti, gemm1_config={**MIXED_GEMM1_CONFIG, "SORTED_ROWS": True})
    with pytest.raises(ValueError, match="workspace is a dict; expected MixedWorkspace"):
        fused_moe_mixed(x, ex, tw, ti, workspace={})
    with pytest.raises(ValueError, match="max_tokens=1; got M=2"):
        fused_moe_mixed(x, ex, tw, ti, workspace=MixedWorkspace.create(ex, 2, 1))
    with pytest.raises(ValueError, match=r"out is \(2, 8\)"):
        fused_moe_mixed(x, ex, tw, ti, out=torch.empty(2, 8, device=DEVICE,
                                                      dtype=torch.float16))
    with pytest.raises(ValueError, match="activation"):
        fused_moe_mixed(x, ex, tw, ti, activation="relu")
    with pytest.raises(ValueError, match="hidden_states has dtype"):
        fused_moe_mixed(x.float(), ex, tw, ti)
    with pytest.raises(ValueError, match="expected at least 3"):
        MixedWorkspace.create(ex, 2, 3, decode=MixedWorkspace.create(ex, 2, 1).decode)
    assert fused_moe_mixed(x[:0], ex, tw[:0], ti[:0]).shape == (0, H)


def test_mixed_unsupported_names_why():
    ex = _layer(g=64)
    why = mixed_unsupported(ex)
    assert why is not None
    if ON_GPU:
        assert "G = 64" in why
    assert "not an MMA config" in mixed_unsupported(_layer(), config={"BLOCK_SIZE_M": 8})


def test_module_chooses_mixed_between_the_thresholds(monkeypatch):
    ex = _layer()
    moe = HybridW4A16MoEExperts(ex, top_k=2, decode_threshold=4, decode_gemm1_threshold=1)
    # as if GEMM1 could run on the mma kernel here (on the CPU it cannot)
    monkeypatch.setattr(moe, "_mixed_why", None)
    assert [moe.choose_path(m) for m in (1, 2, 4, 5)] == ["decode", "mixed", "mixed", "prefill"]
    monkeypatch.setattr(moe, "_mixed_why", "no mma kernel here")
    assert [moe.choose_path(m) for m in (1, 2, 4, 5)] == ["decode", "decode", "decode",
                                                          "prefill"]
    # the default: no measured value, so the decode threshold (no mixed path)
    plain = HybridW4A16MoEExperts(ex, top_k=2, decode_threshold=4)
    if not ON_GPU:
        assert plain.decode_gemm1_threshold == 4
    deterministic = HybridW4A16MoEExperts(ex, top_k=2, decode_threshold=4,
                                          decode_gemm1_threshold=0, deterministic=True)
    assert deterministic.choose_path(2) == "prefill"
    x = torch.randn(2, H, device=DEVICE, dtype=torch.float16)
    tw, ti = _routing(2, 4, 2)
    with pytest.raises(ValueError, match="path is 'mixed' with deterministic=True"):
        deterministic(x, tw, ti, path="mixed")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="decode_gemm1_threshold is"):
            HybridW4A16MoEExperts(ex, top_k=2, decode_gemm1_threshold=bad)


def test_module_mixed_path_forward_and_logits_match_the_reference(monkeypatch):
    """The chosen mixed path from routed inputs and from logits (routing and alignment in one
    kernel where supported), against the reference and the decode path; its workspace is
    reserved ahead and reused."""
    ex = _layer(seed=11)
    moe = HybridW4A16MoEExperts(ex, top_k=2, decode_threshold=3, decode_gemm1_threshold=0)
    monkeypatch.setattr(moe, "_mixed_why", None)
    moe.reserve(3)
    mws, dws = moe._mixed_ws, moe._decode_ws
    assert mws is not None and mws.decode is dws
    for m in (1, 3):
        x = torch.randn(m, H, device=DEVICE, dtype=torch.float16)
        logits = torch.randn(m, 4, device=DEVICE)
        tw, ti = fused_topk(logits, 2)
        ref = moe_reference(x, ex, tw, ti, round_intermediate=True)
        out = moe(x, tw, ti, out=_poisoned(m, torch.float16))
        _check(out, ref, torch.float16)
        _check(moe.forward_logits(x, logits), ref, torch.float16)
        _check(moe(x, tw, ti, path="decode"), out.float(), torch.float16)
    assert moe._mixed_ws is mws and moe._decode_ws is dws


@pytest.mark.parametrize("m", [1, 2])
def test_mixed_path_is_annotated(m):
    moe = HybridW4A16MoEExperts(_layer(), top_k=2)
    x = torch.randn(m, H, device=DEVICE, dtype=torch.float16)
    tw, ti = _routing(m, 4, 2)
    with torch.profiler.profile() as prof:
        moe(x, tw, ti, path="mixed")
    names = [evt.name for evt in prof.events()]
    assert f"hybrid_triton_moe {m}x{2 * I}x{H} E=4 top_k=2" in names   # GEMM1: prefill kernel
    assert f"fused_moe_wvsplitk_int4 {m}x{H}x{I} E=4 top_k=2" in names  # GEMM2: decode kernel


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs: GPU only")
@pytest.mark.parametrize("from_logits", [False, True])
def test_mixed_path_in_a_cuda_graph(from_logits):
    """After ``reserve`` the mixed path allocates nothing, eager or captured, and 50 replays
    on new inputs match eager calls bit for bit and the reference."""
    allocs = "allocation.all.allocated"
    e, m = 8, 3
    ex = _layer(e=e, dtype=torch.bfloat16, seed=21)
    moe = HybridW4A16MoEExperts(ex, top_k=2, decode_threshold=4, decode_gemm1_threshold=0)
    assert moe.choose_path(m) == "mixed", moe.mixed_unsupported
    moe.reserve(m)
    gen = torch.Generator(device="cuda").manual_seed(21)

    def batch():
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=gen)
        logits = torch.randn(m, e, device="cuda", generator=gen)
        return (x, logits, *fused_topk(logits, 2))

    sx, slog, stw, sti = batch()
    sout = torch.empty(m, H, device="cuda", dtype=torch.bfloat16)

    def call():
        if from_logits:
            sout.copy_(moe.forward_logits(sx, slog))
        else:
            moe(sx, stw, sti, out=sout)

    for _ in range(2):
        call()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()[allocs]
    if not from_logits:   # (forward_logits returns a new tensor: its output is allocated)
        call()
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()[allocs] == before, "an eager forward allocated"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(50):
        x, logits, tw, ti = batch()
        for dst, src in ((sx, x), (slog, logits), (stw, tw), (sti, ti)):
            dst.copy_(src)
        sout.fill_(float("nan"))
        graph.replay()
        eager = moe.forward_logits(x, logits) if from_logits else moe(x, tw, ti)
        assert torch.equal(sout, eager)
    ref = moe_reference(sx, ex, stw, sti, round_intermediate=True)
    _check(sout, ref, torch.bfloat16)
