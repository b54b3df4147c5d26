"""Programmatic dependent launch (w4a16moe.kernels.pdl): when it is used, and where the
``griddepcontrol`` instructions sit in the compiled kernels (sm_90 PTX, compiled ahead of
time on the CPU). The GPU test runs the router and the experts (decode and prefill paths)
in a CUDA graph with PDL and checks them against the reference and against the same
launches without PDL."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, ON_GPU

from w4a16moe.bench.timing import capture_graph
from w4a16moe.kernels import pdl
from w4a16moe.kernels.decode import DecodeWorkspace, fused_moe_decode
from w4a16moe.kernels.prefill import PrefillWorkspace, fused_moe_prefill
from w4a16moe.quantize import random_experts
from w4a16moe.reference import moe_reference
from w4a16moe.routing import fused_topk


def test_pdl_is_off_on_cpu_and_in_the_interpreter(monkeypatch):
    assert not pdl.pdl_enabled(torch.device("cpu"))
    # what the environment allows (read once at import into pdl._ALLOWED)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("W4A16MOE_PDL", raising=False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert pdl._environment_allows() == pdl.HAVE_GDC
    monkeypatch.setenv("W4A16MOE_PDL", "0")
    assert not pdl._environment_allows()
    monkeypatch.setenv("W4A16MOE_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl._environment_allows()
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm reports its own capabilities
    assert not pdl._environment_allows()
    monkeypatch.setattr(torch.version, "hip", None)
    assert pdl._environment_allows() == pdl.HAVE_GDC
    # a CUDA device that supports it: on unless switched off
    monkeypatch.setattr(pdl, "_device_supports", lambda index: True)
    monkeypatch.setattr(pdl, "_ALLOWED", True)
    cuda = torch.device("cuda", 0)
    assert pdl.pdl_enabled(cuda)
    assert pdl.dependent_launch_args(cuda) == dict(PDL=True, launch_pdl=True)
    monkeypatch.setattr(pdl, "_ALLOWED", False)  # the environment said no at import
    assert not pdl.pdl_enabled(cuda)
    assert pdl.dependent_launch_args(cuda) == {}
    monkeypatch.setattr(pdl, "_ALLOWED", True)
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.pdl_enabled(cuda)
    monkeypatch.setattr(pdl, "ENABLED", True)
    monkeypatch.setattr(pdl, "_device_supports", lambda index: False)  # pre-Hopper
    assert not pdl.pdl_enabled(cuda)


def test_prefill_chain_only_inside_a_small_layer(monkeypatch):
    """The prefill kernels launch as PDL dependents only inside ``fused_moe_prefill`` of at
    most ``PREFILL_MAX_TOKENS`` tokens (where it was measured), never on their own."""
    monkeypatch.setattr(pdl, "pdl_enabled", lambda device: True)
    dev = torch.device("cuda", 0)
    on = dict(PDL=True, launch_pdl=True)
    assert pdl.prefill_pdl_args(dev) == {}
    with pdl.prefill_chain(pdl.PREFILL_MAX_TOKENS) as chained:
        assert chained and pdl.prefill_pdl_args(dev) == on
        with pdl.prefill_chain(pdl.PREFILL_MAX_TOKENS + 1) as inner:  # nested: its own size
            assert not inner and pdl.prefill_pdl_args(dev) == {}
        assert pdl.prefill_pdl_args(dev) == on
    assert pdl.prefill_pdl_args(dev) == {}
    monkeypatch.setattr(pdl, "PREFILL", False)
    with pdl.prefill_chain(1):
        assert pdl.prefill_pdl_args(dev) == {}


def test_fused_moe_prefill_opens_the_chain_around_its_launches(monkeypatch):
    """``fused_moe_prefill`` launches its kernels inside ``prefill_chain(M)`` (checked by
    recording what the prefill kernels' launcher sees on a CPU run)."""
    import contextlib

    from w4a16moe.kernels import prefill

    opened, inside, seen = [], [False], []

    @contextlib.contextmanager
    def chain(num_tokens):
        opened.append(num_tokens)
        inside[0] = True
        try:
            yield True
        finally:
            inside[0] = False

    monkeypatch.setattr(prefill, "prefill_chain", chain)
    real = prefill.prefill_pdl_args
    monkeypatch.setattr(prefill, "prefill_pdl_args",
                        lambda device: seen.append(inside[0]) or real(device))
    experts = random_experts(4, 64, 32, group_size=32, dtype=torch.float16, device=DEVICE,
                             seed=3)
    x = torch.randn(5, 64, dtype=torch.float16, device=DEVICE)
    w, ids = fused_topk(torch.randn(5, 4, device=DEVICE), 2)
    fused_moe_prefill(x, experts, w, ids)
    assert opened == [5]
    assert seen and all(seen)  # every launch of the layer asked inside the chain


def test_dependents_wait_before_their_first_memory_access():
    """A kernel launched with PDL may start while the kernel before it still runs: its
    ``griddepcontrol.wait`` must come before every global load or store. The decode GEMM1
    (after the router) does not release its dependents (GEMM2 is launched normally); the
    prefill chain's kernels release theirs right after their own wait, and the router first
    thing. Without ``PDL`` none of the instructions is there. (sm_90 PTX, compiled on the
    CPU; the Gluon prefill kernel's wait is the first statement of its body.)"""
    if not pdl.HAVE_GDC:
        pytest.skip("this Triton has no gdc_wait")
    from pdl_aot import pdl_reports

    r = pdl_reports()
    for kernel in ("gemm1", "align", "align_count", "align_table", "gather", "topk_sum",
                   "topk_sum_zeroing"):
        on, off = r[f"{kernel}_pdl=True"], r[f"{kernel}_pdl=False"]
        assert on["wait"] is not None and on["first_global_access"] is not None, (kernel, on)
        assert on["wait"] < on["first_global_access"], (kernel, on)
        assert off["wait"] is None and off["launch_dependents"] is None, (kernel, off)
        if kernel == "gemm1":  # GEMM2 is not released early (session 17)
            assert on["launch_dependents"] is None, on
        else:
            assert on["wait"] < on["launch_dependents"] < on["first_global_access"], (kernel, on)
    router_on, router_off = r["router_pdl=True"], r["router_pdl=False"]
    assert router_on["launch_dependents"] is not None
    assert router_on["launch_dependents"] < router_on["first_global_access"], router_on
    assert router_on["wait"] is None
    assert router_off["launch_dependents"] is None


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs and PDL need a GPU")
@pytest.mark.parametrize(("path", "m", "top_k"), [("decode", 3, 4), ("prefill", 3, 4),
                                                   ("prefill", 100, 4), ("prefill", 120, 6)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_then_experts_in_a_graph_with_pdl(dtype, path, m, top_k):
    # prefill at 100 tokens: the chain past the counting alignment's 64 tokens; at 120
    # tokens of 6 experts (720 slots) the one-program alignment past 512 slots in the chain
    # (pdl.PREFILL_MAX_TOKENS 120, align.SINGLE_PROGRAM_CHAIN_SLOTS 1024)
    experts = random_experts(16, 256, 128, group_size=64, dtype=dtype,
                                            device=DEVICE, seed=21)
    logits = torch.randn(m, 16, device=DEVICE)
    x = torch.randn(m, 256, dtype=dtype, device=DEVICE)
    ws = DecodeWorkspace.create(experts, top_k=top_k, max_tokens=m)
    pws = PrefillWorkspace.allocate(m, experts, top_k)
    out = torch.empty(m, 256, dtype=dtype, device=DEVICE)

    def step():
        w, ids = fused_topk(logits, top_k)
        if path == "decode":
            fused_moe_decode(x, experts, w, ids, out=out, workspace=ws, deterministic=True)
        else:
            fused_moe_prefill(x, experts, w, ids, out=out, workspace=pws, deterministic=True)

    graph, _ = capture_graph(step)
    for _ in range(5):
        logits.copy_(torch.randn_like(logits))
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        ws.inter.fill_(float("nan"))
        pws.intermediate.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        got = out.clone()
        w, ids = fused_topk(logits, top_k, backend="torch")
        ref = moe_reference(x, experts, w, ids, compute_dtype=torch.float64,
                            round_intermediate=True)
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
        err = ((got.double() - ref.double()).abs().max() / ref.abs().max()).item()
        assert err < tol, err
        # the same launches without PDL give the same bits (deterministic mode)
        pdl.ENABLED = False
        try:
            out.fill_(float("nan"))
            step()
            torch.cuda.synchronize()
        finally:
            pdl.ENABLED = True
        assert torch.equal(out, got)
