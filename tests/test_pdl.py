"""Programmatic dependent launch (w4a16moe.kernels.pdl): when it is used, and where the
``griddepcontrol`` instructions sit in the compiled kernels (sm_90 PTX, compiled ahead of
time on the CPU). The GPU test runs the router and the decode layer in a CUDA graph with
PDL and checks them against the reference and against the same launches without PDL."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, ON_GPU

from w4a16moe.kernels import pdl
from w4a16moe.kernels.decode import DecodeWorkspace, fused_moe_decode
from w4a16moe.quantize import random_experts
from w4a16moe.reference import moe_reference
from w4a16moe.routing import fused_topk


def test_pdl_is_off_on_cpu_and_in_the_interpreter(monkeypatch):
    assert not pdl.pdl_enabled(torch.device("cpu"))
    # a CUDA device that supports it: on unless switched off
    monkeypatch.setattr(pdl, "_device_supports", lambda index: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("W4A16MOE_PDL", raising=False)
    cuda = torch.device("cuda", 0)
    assert pdl.pdl_enabled(cuda) == pdl.HAVE_GDC
    monkeypatch.setenv("W4A16MOE_PDL", "0")
    assert not pdl.pdl_enabled(cuda)
    monkeypatch.setenv("W4A16MOE_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.pdl_enabled(cuda)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.pdl_enabled(cuda)
    monkeypatch.setattr(pdl, "ENABLED", True)
    monkeypatch.setattr(pdl, "_device_supports", lambda index: False)  # pre-Hopper
    assert not pdl.pdl_enabled(cuda)


def test_decode_gemm1_waits_before_its_first_read():
    """With ``PDL`` the decode GEMM1 may start while the router still runs: its
    ``griddepcontrol.wait`` must come before every global read (the routing ids, the
    activations, the weights); the router releases its dependents first thing. Without
    ``PDL`` neither instruction is there."""
    if not pdl.HAVE_GDC:
        pytest.skip("this Triton has no gdc_wait")
    from pdl_aot import pdl_reports

    r = pdl_reports()
    on, off = r["gemm1_pdl=True"], r["gemm1_pdl=False"]
    assert on["wait"] is not None and on["first_global_read"] is not None
    assert on["wait"] < on["first_global_read"], on
    assert on["launch_dependents"] is None  # GEMM2 is not released early (session 17)
    assert off["wait"] is None and off["launch_dependents"] is None
    router_on, router_off = r["router_pdl=True"], r["router_pdl=False"]
    assert router_on["launch_dependents"] is not None
    assert router_on["launch_dependents"] < router_on["first_global_read"], router_on
    assert router_on["wait"] is None
    assert router_off["launch_dependents"] is None


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs and PDL need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_then_decode_in_a_graph_with_pdl(dtype):
    experts = random_experts(16, 256, 128, group_size=64, dtype=dtype,
                                            device=DEVICE, seed=21)
    m, top_k = 3, 4
    logits = torch.randn(m, 16, device=DEVICE)
    x = torch.randn(m, 256, dtype=dtype, device=DEVICE)
    ws = DecodeWorkspace.create(experts, top_k=top_k, max_tokens=m)
    out = torch.empty(m, 256, dtype=dtype, device=DEVICE)

    def step():
        w, ids = fused_topk(logits, top_k)
        fused_moe_decode(x, experts, w, ids, out=out, workspace=ws, deterministic=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        logits.copy_(torch.randn_like(logits))
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        ws.inter.fill_(float("nan"))
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
        finally:
            pdl.ENABLED = True
        assert torch.equal(out, got)
