"""Profiling: annotations on every expert GEMM launch, and per-shape bandwidth summaries of
torch profiler traces (``w4a16moe profile-bandwidth``)."""

from .annotate import (
    DECODE_KERNEL_NAME,
    PREFILL_KERNEL_NAME,
    annotate_gemm,
    gemm_region_name,
    profiler_enabled,
)
from .bandwidth import (
    BytesModel,
    ShapeSummary,
    SummaryList,
    load_peak_bandwidth,
    render_table,
    save_peak_bandwidth,
    summarize_traces,
)
from .traces import TraceError

__all__ = [
    "DECODE_KERNEL_NAME",
    "PREFILL_KERNEL_NAME",
    "BytesModel",
    "ShapeSummary",
    "SummaryList",
    "TraceError",
    "annotate_gemm",
    "gemm_region_name",
    "load_peak_bandwidth",
    "profiler_enabled",
    "render_table",
    "save_peak_bandwidth",
    "summarize_traces",
]
