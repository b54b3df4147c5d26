"""Profiler annotations: exact region names under a profiler, nothing at all without one."""

import contextlib
import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, schedule

from w4a16moe.profiling import annotate
from w4a16moe.profiling.annotate import (
    DECODE_KERNEL_NAME,
    PREFILL_KERNEL_NAME,
    annotate_gemm,
    gemm_region_name,
    profiler_enabled,
)


class _Unformattable(int):
    """An int whose formatting fails: proves a code path never builds the region name."""

    def __format__(self, spec):
        raise AssertionError("the region name was formatted")

    __str__ = __repr__ = __format__


def _work(x):
    with annotate_gemm(DECODE_KERNEL_NAME, 1, 4096, 2048, 128, 8):
        x = x @ x
    with annotate_gemm(PREFILL_KERNEL_NAME, 512, 2048, 768, 64, 6):
        x = torch.relu(x)
    return x


def test_names_are_the_ones_downstream_tools_match():
    assert DECODE_KERNEL_NAME == "fused_moe_wvsplitk_int4"
    assert PREFILL_KERNEL_NAME == "hybrid_triton_moe"
    assert gemm_region_name("k", 3, 5, 7, 16, 2) == "k 3x5x7 E=16 top_k=2"
    assert gemm_region_name("k", 3, 5, 7) == "k 3x5x7"
    with pytest.raises(ValueError, match="num_experts=16 and top_k=None"):
        gemm_region_name("k", 3, 5, 7, 16)


def test_cpu_profiler_records_exact_names(tmp_path):
    x = torch.randn(16, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        assert profiler_enabled()
        _work(x)
        _work(x)
    assert not profiler_enabled()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    names = [e["name"] for e in events if e.get("cat") == "user_annotation"]
    assert names == [
        "fused_moe_wvsplitk_int4 1x4096x2048 E=128 top_k=8",
        "hybrid_triton_moe 512x2048x768 E=64 top_k=6",
    ] * 2
    # the matmul ran inside the first region
    mm = [e for e in events if e.get("name") == "aten::mm"]
    region = [e for e in events if e.get("name", "").startswith(DECODE_KERNEL_NAME)][0]
    assert region["ts"] <= mm[0]["ts"] <= region["ts"] + region["dur"]


def test_no_profiler_means_no_record_function_and_no_formatting(monkeypatch):
    calls = []
    monkeypatch.setattr(annotate, "record_function", lambda name: calls.append(name))
    m = _Unformattable(7)
    ctx = annotate_gemm(DECODE_KERNEL_NAME, m, 4096, 2048, 128, 8)
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx, annotate_gemm(PREFILL_KERNEL_NAME, m, 1, 1, 1, 1):  # reentrant, nestable
        pass
    assert calls == []
    # and under a profiler the spy is called with the formatted name
    with profile(activities=[ProfilerActivity.CPU]):
        annotate_gemm(DECODE_KERNEL_NAME, 7, 4096, 2048, 128, 8)
    assert calls == ["fused_moe_wvsplitk_int4 7x4096x2048 E=128 top_k=8"]


def test_scheduled_profiler_records_only_active_steps(tmp_path):
    seen = []
    x = torch.randn(8, 8)
    sched = schedule(wait=1, warmup=1, active=1, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=sched,
                 on_trace_ready=lambda p: p.export_chrome_trace(str(tmp_path / "t.json"))
                 ) as prof:
        for step in range(3):
            seen.append(profiler_enabled())
            with annotate_gemm(DECODE_KERNEL_NAME, step, 8, 8, 4, 2):
                x = x @ x
            prof.step()
    assert seen[0] is False  # wait step: annotate_gemm is a no-op
    assert seen[2] is True
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    names = [e["name"] for e in events if e.get("cat") == "user_annotation"]
    assert names == ["ProfilerStep#2", "fused_moe_wvsplitk_int4 2x8x8 E=4 top_k=2"]


def test_torch_compile_traces_through_without_graph_break():
    def f(x):
        with annotate_gemm(DECODE_KERNEL_NAME, x.shape[0], x.shape[1], 8, 4, 2):
            return x * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True, dynamic=True)
    x = torch.randn(3, 5)
    torch.testing.assert_close(compiled(x), x * 2)
    with profile(activities=[ProfilerActivity.CPU]):
        torch.testing.assert_close(compiled(x), x * 2)
