"""Profiler annotations for the expert GEMMs.

Every GEMM launch of the MoE experts is wrapped in::

    with annotate_gemm(DECODE_KERNEL_NAME, m, n, k, num_experts, top_k):
        launch(...)

While a torch profiler is recording, this opens a ``torch.profiler.record_function`` region
named ``"<kernel> {M}x{N}x{K} E={E} top_k={top_k}"`` (M tokens, N output features, K the
reduction, E experts, the real top_k). The kernels launched inside it are linked to the region
in the exported trace, which is what ``w4a16moe profile-bandwidth`` reads.

When no profiler is recording, ``annotate_gemm`` returns a shared ``nullcontext`` without
formatting the name: about two Python calls of overhead per launch. It is also a no-op while
``torch.compile`` traces the caller (Dynamo cannot trace the profiler-state query), and safe
during CUDA graph capture: a region recorded during capture is a CPU-side event only; replays
of the graph record no regions, so profile eager runs for per-shape numbers.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch
from torch.profiler import record_function

__all__ = [
    "DECODE_KERNEL_NAME",
    "PREFILL_KERNEL_NAME",
    "annotate_gemm",
    "gemm_region_name",
    "profiler_enabled",
]

#: region name prefix of the decode (split-K GEMV) kernel
DECODE_KERNEL_NAME = "fused_moe_wvsplitk_int4"
#: region name prefix of the prefill (grouped GEMM) kernel
PREFILL_KERNEL_NAME = "hybrid_triton_moe"

_NULL = contextlib.nullcontext()
_profiler_enabled = torch._C._autograd._profiler_enabled
_is_compiling = torch.compiler.is_compiling


def profiler_enabled() -> bool:
    """True while a torch profiler (``torch.profiler.profile`` or the legacy
    ``torch.autograd.profiler.profile``) is recording events on this process.

    Reads the profiler state kept in C++ (what ``record_function`` itself checks), so it is
    right for profilers started by any front end, including ones with a ``schedule`` (False
    during their wait steps). Always False while ``torch.compile`` traces the caller.
    """
    return not _is_compiling() and _profiler_enabled()


def gemm_region_name(kernel: str, m: int, n: int, k: int, num_experts: int | None = None,
                     top_k: int | None = None) -> str:
    """The region name for one GEMM: ``"<kernel> {m}x{n}x{k} E={E} top_k={top_k}"``, or
    ``"<kernel> {m}x{n}x{k}"`` for a dense GEMM (``num_experts`` and ``top_k`` None)."""
    if (num_experts is None) != (top_k is None):
        raise ValueError(f"num_experts={num_experts!r} and top_k={top_k!r}: "
                         "expected both set (MoE GEMM) or both None (dense GEMM)")
    if num_experts is None:
        return f"{kernel} {m}x{n}x{k}"
    return f"{kernel} {m}x{n}x{k} E={num_experts} top_k={top_k}"


def annotate_gemm(kernel: str, m: int, n: int, k: int, num_experts: int, top_k: int
                  ) -> AbstractContextManager[object]:
    """Context manager marking one expert GEMM launch for the profiler.

    Args:
        kernel: the kernel family, ``DECODE_KERNEL_NAME`` or ``PREFILL_KERNEL_NAME``.
        m: tokens (rows of the layer input, not ``m * top_k``).
        n: output features of this GEMM (``2 * I`` for w13, ``H`` for w2).
        k: reduction size (``H`` for w13, ``I`` for w2).
        num_experts: E, experts held by the weight tensor.
        top_k: experts per token.

    Returns:
        ``record_function(gemm_region_name(...))`` while a profiler records, else a shared
        ``nullcontext`` (the name is not even formatted).
    """
    if _is_compiling() or not _profiler_enabled():
        return _NULL
    return record_function(f"{kernel} {m}x{n}x{k} E={num_experts} top_k={top_k}")
