"""The CTA barriers Triton's shared-memory analysis puts in front of ``mbarrier.wait``, and
a compile hook that removes them from the Gluon prefill kernel.

Triton's membar pass orders any two accesses to one shared-memory allocation that may
conflict, and it counts two ``mbarrier.wait`` on the same barrier array as such a pair (so
that no warp can get a phase ahead through a chain of waits). In the Gluon prefill kernel
(:mod:`w4a16moe.kernels.prefill_rs`) that puts ``bar.sync 0, <consumer threads>`` in front
of every K step's wait for its stage: the 8 (or 16) consumer warps meet once a step and each
step costs the slowest warp's time.

That barrier orders nothing in this kernel. A consumer thread waits on ``x_ready[s]`` for
step ``i`` with the parity of ``i // STAGES``; the loader refills stage ``s`` for step
``i + STAGES`` only after every consumer thread has released step ``i`` (``empty[s]`` counts
``32 * num_warps`` arrivals, one per thread, ``cp.async.mbarrier.arrive.noinc``). So while
a thread waits for step ``i`` the barrier is at most at that phase, never two phases on, and
each thread's own wait is all it needs. The other shared-memory hazards of the consumer (the
epilogue's ``convert_layout`` scratch) keep their own barriers: the pass puts one in front
of the arrive after the K loop, before the epilogue writes its scratch, and
``tests/test_prefill_rs.py`` checks that every scratch write of every shipped config still
follows a barrier once the waits' barriers are gone.

Removing them made the prefill GEMMs 0.6-9.7 % faster on an H100, bit-identical
(``benchmarks/prefill_wait_barrier_ab.py``; ``benchmarks/notes_prefill.md``, session 16).

:func:`strip_wait_barriers` does it on PTX text; :func:`stripped_wait_barriers` is a context
manager that installs it for the named kernels as a stage of Triton's compiler
(``triton.knobs.runtime.add_stages_inspection_hook``) while a launch compiles them. Any hook
already installed is chained, and everything else compiles as before.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import triton

#: ``bar.sync 0[, n]`` directly in front of the inline-asm wait loop ``mbarrier.wait`` lowers to
_WAIT_BARRIER = re.compile(
    r"^[ \t]*(?:bar|barrier)\.sync(?:\.aligned)?[ \t]+0(?:,[ \t]*\d+)?;\n"
    r"(?=[ \t]*// begin inline asm\n\s*\{\s*\.reg \.pred complete;\s*waitLoop:\s*"
    r"mbarrier\.try_wait)", re.M)
#: added to Triton's cache keys (triton >= 3.7) of what compiles while the hook is installed
HOOK_KEY = "w4a16moe-strip-wait-barriers-1"
#: Triton's runtime knobs where they have the stages hook (triton >= 3.5), else None;
#: looked up once, since the launcher enters :func:`stripped_wait_barriers` every launch
_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)
if _RUNTIME is not None and not hasattr(_RUNTIME, "add_stages_inspection_hook"):
    _RUNTIME = None


def strip_wait_barriers(ptx: str) -> tuple[str, int]:
    """``ptx`` without the ``bar.sync`` lines that directly precede an ``mbarrier.wait``
    loop, and how many were removed. Only valid for kernels whose waits need no warp
    synchronisation (see the module docstring)."""
    return _WAIT_BARRIER.subn("", ptx)


class _StripHook:
    """A ``PipelineStagesHook``: called without arguments (triton >= 3.7, for the cache
    keys) it returns its key; called with a backend's stages it wraps the PTX stage so the
    kernels named in ``names`` lose their wait barriers. ``previous`` (the hook installed
    before, if any) runs first in both roles."""

    def __init__(self, names: frozenset[str], previous) -> None:
        self.names = names
        self.previous = previous
        self.removed: dict[str, int] = {}

    def __call__(self, *args, **kwargs):
        if not args and not kwargs:
            key = hsh = ""
            if self.previous is not None:
                key, hsh = self.previous()
            return f"{key}{HOOK_KEY}", f"{hsh}{HOOK_KEY}"
        if self.previous is not None:
            self.previous(*args, **kwargs)
        stages = args[1] if len(args) > 1 else kwargs["stages"]
        make_ptx = stages.get("ptx")
        if make_ptx is None:
            return

        def ptx_stage(src, metadata):
            ptx = make_ptx(src, metadata)
            name = metadata.get("name", "")
            if name in self.names:
                ptx, self.removed[name] = strip_wait_barriers(ptx)
            return ptx
        stages["ptx"] = ptx_stage


@contextlib.contextmanager
def stripped_wait_barriers(*names: str) -> Iterator[_StripHook | None]:
    """While the block runs, kernels named ``names`` that Triton compiles lose the barriers
    in front of their ``mbarrier.wait``; yields the hook (its ``removed`` maps a compiled
    kernel's name to the count), or None where this Triton has no stages hook. Kernels
    compiled before keep what they were compiled with."""
    runtime = _RUNTIME
    if runtime is None:
        yield None
        return
    previous = runtime.add_stages_inspection_hook
    hook = _StripHook(frozenset(names), previous)
    runtime.add_stages_inspection_hook = hook
    try:
        yield hook
    finally:
        runtime.add_stages_inspection_hook = previous


__all__ = ["HOOK_KEY", "strip_wait_barriers", "stripped_wait_barriers"]
