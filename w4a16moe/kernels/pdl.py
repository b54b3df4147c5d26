"""Programmatic dependent launch (PDL) between the small kernels of one layer (sm_90+).

Under a CUDA graph every kernel node waits for the previous one to finish, and the next
kernel's programs are only then set up and started: ~2 us a node on an H100 for the tiny
kernels of a decode layer (router, GEMM1, GEMM2), a large share of a 15-25 us layer. With
PDL a kernel is launched as a *dependent* of the one before it in the stream: its programs
may start as soon as every program of the previous kernel has executed
``griddepcontrol.launch_dependents`` (or exited), and they block in ``griddepcontrol.wait``
until that kernel has completed and its memory is visible, so the set-up of the next kernel
overlaps the end of the previous one.

Where it is used (measured on the H100 in session 17, ``benchmarks/notes_decode.md``):

* decode: the Triton router (:mod:`.router`) releases its dependents when it starts, and
  the decode GEMM1 (:mod:`.decode`) is launched as a dependent and waits before it reads
  anything: 0.6-4.0 % off the router + experts layer (qwen3-30b M=1 17.46 -> 16.76 us).
  The edge GEMM1 -> GEMM2 is not used: released at GEMM1's start it made Mixtral M=1-2
  18-22 % slower, released after GEMM1's K loop it gained nothing;
* prefill (``PREFILL``, layers of up to ``PREFILL_MAX_TOKENS`` tokens): the one-program
  alignment, the row gather, both GEMMs (Triton and Gluon kernels) and the top-k sum are
  each launched as a dependent of the kernel before, wait for it first thing and then
  release the next: 0.8-2.1 % off the layer at M=8-64 (H100, session 17); with the mma
  kernel's per-block wait and persistent GEMM1 up to 64 tokens and its tiles up to 120
  (session 35), 1.4-2.2 % off qwen3-30b's layer at M=72-120 (H200).

Every such kernel waits before its first global load or store, so the order of all memory
accesses is the one without PDL: the results are those without it (bit for bit in the
deterministic mode; checked in the PTX and on the GPU by ``tests/test_pdl.py``). Two
exceptions on the mma prefill kernel, each with its own ordering: GEMM2 loads its first
weights (which no kernel writes) before it waits (``GEMM2_WEIGHTS_BEFORE_WAIT``), and where
both GEMMs run on it GEMM2 never waits for GEMM1 as a whole but for a count of its block's
GEMM1 tiles (``GEMM2_WAITS_PER_BLOCK``: release and acquire at GPU scope;
``tests/test_prefill_mma.py``). Kernels not
listed (torch's, the multi-program alignment) are launched normally, and a dependent after
one of them simply starts when it ends.

:func:`pdl_enabled` says whether a launch on ``device`` uses it: an NVIDIA CUDA device of
compute capability 9.0 or newer (not ROCm), a Triton with ``gdc_wait``, not the interpreter, and the
environment variable ``W4A16MOE_PDL`` not set to ``0`` (the environment is read once, when
this module is imported: every launch asks). ``ENABLED`` switches it off for A/B
measurements.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch
import triton

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAVE_GDC = True
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None
    HAVE_GDC = False

#: master switch (benchmarks turn it off to time the same kernels without PDL)
ENABLED = True


def _environment_allows() -> bool:
    """This build and environment can use PDL at all: Triton has the ``griddepcontrol``
    ops, ``W4A16MOE_PDL`` is not ``0``, kernels are not interpreted, and torch is not a ROCm
    build (whose capability numbers overlap NVIDIA's; ``griddepcontrol`` is PTX)."""
    return (HAVE_GDC and os.environ.get("W4A16MOE_PDL", "1") != "0"
            and os.environ.get("TRITON_INTERPRET") != "1"
            and not getattr(torch.version, "hip", None))


#: :func:`_environment_allows`, read at import (launches ask for every kernel)
_ALLOWED = _environment_allows()
#: the prefill path's chain (alignment, row gather, GEMM1, GEMM2, top-k sum); benchmarks
#: turn it off to time the prefill layer without it
PREFILL = True
#: the prefill chain uses PDL for layers of at most this many tokens. Session 17 measured
#: M = 8-64 on qwen3-30b and Mixtral (H100, 0.8-2.1 % faster) and stopped there. Session 35
#: (H200 layer, router included, the chain to 120-256 tokens against 64 in the same run):
#: qwen3-30b M=72 / 80 / 96 / 112 / 120 -2.2 / -1.7 to -2.0 / -0.5 to -1.9 / -1.6 / -1.4 %
#: (96-120 on the mma tiles its bucket 112 took then), deepseek-v2-lite M=80 -2.1 %, M=96
#: even; qwen3-235b M=72 -0.4 %, M=96 +0.8 % (power cap), M=120 / 128 +1.2 / +0.1 %; olmoe
#: M=72 / 96 +0.4 / +0.5 %; Mixtral M=72 +1.6 and -1.8 %, M=96 +1.5 % (power cap), M=128
#: +1.2 %; qwen3-30b M=128 -0.5 %, M=256 even. So it stops where qwen3-30b's mma tiles stop
PREFILL_MAX_TOKENS = 120

_PREFILL_CHAIN: contextvars.ContextVar[bool] = contextvars.ContextVar("w4a16moe_prefill_chain",
                                                                      default=False)


@contextlib.contextmanager
def prefill_chain(num_tokens: int) -> Iterator[bool]:
    """While open, the prefill kernels launched here are PDL dependents when the layer has at
    most :data:`PREFILL_MAX_TOKENS` tokens (``fused_moe_prefill`` opens it around its
    launches; outside it they launch normally). Yields whether the chain is on."""
    token = _PREFILL_CHAIN.set(PREFILL and num_tokens <= PREFILL_MAX_TOKENS)
    try:
        yield _PREFILL_CHAIN.get()
    finally:
        _PREFILL_CHAIN.reset(token)


def dependent_launch_args(device: torch.device) -> dict:
    """Launch arguments of a kernel that runs as a PDL dependent on ``device`` (its ``PDL``
    constexpr and Triton's ``launch_pdl``), or none where :func:`pdl_enabled` says no."""
    if pdl_enabled(device):
        return dict(PDL=True, launch_pdl=True)
    return {}


def prefill_pdl_args(device: torch.device) -> dict:
    """:func:`dependent_launch_args` for a prefill-chain kernel: only inside
    :func:`prefill_chain` for a small layer."""
    return dependent_launch_args(device) if _PREFILL_CHAIN.get() else {}


@triton.jit
def wait_upstream_release_next():
    """First thing in a kernel of a chain: wait until the kernel before has completed and
    its memory is visible, then let the next kernel's programs launch."""
    gdc_wait()
    gdc_launch_dependents()


@functools.cache
def _device_supports(index: int) -> bool:
    major, _ = torch.cuda.get_device_capability(index)
    return major >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` use programmatic dependent launch."""
    if not (ENABLED and _ALLOWED and device.type == "cuda"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_supports(index)


__all__ = ["ENABLED", "HAVE_GDC", "PREFILL", "PREFILL_MAX_TOKENS", "dependent_launch_args",
           "gdc_launch_dependents", "gdc_wait", "pdl_enabled", "prefill_chain",
           "prefill_pdl_args", "wait_upstream_release_next"]
