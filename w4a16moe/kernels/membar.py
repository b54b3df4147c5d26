"""CTA barriers Triton's shared-memory analysis puts where the Gluon prefill kernels need
none, and compile hooks that remove them: in front of ``mbarrier.wait`` (the wgmma kernel,
below) and around the ``mma.sync`` kernel's per-thread ``cp.async`` ring of words
(:func:`strip_ring_barriers`).

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
import functools
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
RING_HOOK_KEY = "w4a16moe-strip-ring-barriers-2"
RING_WARP_HOOK_KEY = "w4a16moe-ring-warp-barriers-1"
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


#: an instruction line's opcode (after an optional predicate guard)
_OPCODE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)")
#: opcodes that end the look-ahead of :func:`strip_ring_barriers`: memory, synchronisation,
#: control flow and matrix instructions (anything else is arithmetic on registers)
_ORDERED = ("ld.", "st.", "bar.", "barrier.", "cp.", "atom.", "red.", "fence.", "membar.",
            "mbarrier.", "bra", "ret", "exit", "mma.", "wgmma.", "ldmatrix.", "stmatrix.")
_CTA_BARRIER = re.compile(r"^(?:bar|barrier)\.sync(?:\.aligned)?\s+0(?:,\s*\d+)?;")
_WAIT_GROUP = re.compile(r"^cp\.async\.wait_group\s+(\d+);")
_RING_COPY = re.compile(r"^(?:@!?%\w+\s+)?cp\.async\.c[ag]\.shared\.global")


def _is_ordered(line: str) -> bool:
    """Whether a PTX line holds a memory, barrier, control-flow or matrix instruction, or
    is a basic-block label."""
    text = line.strip()
    if text.startswith("$L__BB"):
        return True
    if not text or text.startswith(("//", ".", "{", "}", "$")):
        return False
    op = _OPCODE.match(text)
    return op is not None and op.group(1).startswith(_ORDERED)


def _next_ordered(lines: list[str], start: int) -> int | None:
    """Index of the first :func:`_is_ordered` line from ``start``; None at the end."""
    return next((j for j in range(start, len(lines)) if _is_ordered(lines[j])), None)


def _previous_ordered(lines: list[str], end: int) -> int | None:
    """Index of the last :func:`_is_ordered` line before ``end``; None at the start."""
    return next((j for j in range(end - 1, -1, -1) if _is_ordered(lines[j])), None)


def strip_ring_barriers(ptx: str, warp_barriers: bool = False) -> tuple[str, int]:
    """``ptx`` without the CTA barriers Triton's shared-memory analysis puts around a
    per-thread ``cp.async`` ring, and how many were removed: a ``bar.sync`` whose next
    memory or synchronisation instruction is a ``cp.async`` into shared memory (a stage
    refilled after reads of it), and one right after a ``cp.async.wait_group N`` with N > 0
    (a stage read after its copies). A barrier right after ``cp.async.wait_group 0`` always
    stays: there every thread's copies have landed, and the barrier is what lets other
    threads read them or reuse that memory (an epilogue's scratch, operands staged for
    every warp).

    Only valid where every thread reads back only the shared memory its own ``cp.async``
    wrote, its reads of a stage come before its refill of it in program order, and nothing
    else in the kernel shares that memory before ``wait_group 0`` (the ``mma.sync`` kernel's
    ring: ``prefill_mma.WORD_RING_STAGES``). With ``warp_barriers`` each such barrier becomes
    ``bar.warp.sync -1`` instead: for a ring whose copies a thread's warp makes and reads back
    (``prefill_mma.RING_COPIES_WHOLE_RUNS``)."""
    lines = ptx.split("\n")
    drop: set[int] = set()
    for i, line in enumerate(lines):
        text = line.strip()
        barrier = _CTA_BARRIER.match(text) is not None
        wait = _WAIT_GROUP.match(text)
        if not barrier and (wait is None or int(wait.group(1)) == 0):
            continue
        nxt = _next_ordered(lines, i + 1)
        if nxt is None:
            continue
        if barrier and _RING_COPY.match(lines[nxt].strip()):
            before = _previous_ordered(lines, i)
            after_wait = None if before is None else _WAIT_GROUP.match(lines[before].strip())
            if after_wait is None or int(after_wait.group(1)) != 0:
                drop.add(i)
        elif not barrier and _CTA_BARRIER.match(lines[nxt].strip()):
            drop.add(nxt)
    if warp_barriers:
        for j in drop:  # the barrier line, its indentation kept
            lines[j] = lines[j][:len(lines[j]) - len(lines[j].lstrip())] + "bar.warp.sync -1;"
        return "\n".join(lines), len(drop)
    return "\n".join(x for j, x in enumerate(lines) if j not in drop), len(drop)


class _StripHook:
    """A ``PipelineStagesHook``: called without arguments (triton >= 3.7, for the cache
    keys) it returns its key; called with a backend's stages it wraps the PTX stage so the
    kernels named in ``names`` lose their wait barriers. ``previous`` (the hook installed
    before, if any) runs first in both roles."""

    def __init__(self, names: frozenset[str], previous, strip=strip_wait_barriers,
                 key: str = HOOK_KEY) -> None:
        self.names = names
        self.previous = previous
        self.strip = strip
        self.key = key
        self.removed: dict[str, int] = {}

    def __call__(self, *args, **kwargs):
        if not args and not kwargs:
            key = hsh = ""
            if self.previous is not None:
                key, hsh = self.previous()
            return f"{key}{self.key}", f"{hsh}{self.key}"
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
                ptx, self.removed[name] = self.strip(ptx)
            return ptx
        stages["ptx"] = ptx_stage


@contextlib.contextmanager
def stripped_wait_barriers(*names: str) -> Iterator[_StripHook | None]:
    """While the block runs, kernels named ``names`` that Triton compiles lose the barriers
    in front of their ``mbarrier.wait``; yields the hook (its ``removed`` maps a compiled
    kernel's name to the count), or None where this Triton has no stages hook. Kernels
    compiled before keep what they were compiled with."""
    with _stripped(names, strip_wait_barriers, HOOK_KEY) as hook:
        yield hook


@contextlib.contextmanager
def stripped_ring_barriers(*names: str, warp_barriers: bool = False
                           ) -> Iterator[_StripHook | None]:
    """:func:`stripped_wait_barriers` for :func:`strip_ring_barriers`: the named kernels
    that compile while the block runs lose the barriers around their ``cp.async`` ring (with
    ``warp_barriers``: they become warp barriers)."""
    strip = functools.partial(strip_ring_barriers, warp_barriers=warp_barriers)
    with _stripped(names, strip, RING_WARP_HOOK_KEY if warp_barriers else RING_HOOK_KEY) as hook:
        yield hook


@contextlib.contextmanager
def _stripped(names, strip, key: str) -> Iterator[_StripHook | None]:
    runtime = _RUNTIME
    if runtime is None:
        yield None
        return
    previous = runtime.add_stages_inspection_hook
    hook = _StripHook(frozenset(names), previous, strip, key)
    runtime.add_stages_inspection_hook = hook
    try:
        yield hook
    finally:
        runtime.add_stages_inspection_hook = previous


__all__ = ["HOOK_KEY", "RING_HOOK_KEY", "RING_WARP_HOOK_KEY", "strip_ring_barriers",
           "strip_wait_barriers", "stripped_ring_barriers", "stripped_wait_barriers"]
