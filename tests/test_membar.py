"""The compile hook that drops the barriers in front of ``mbarrier.wait`` (kernels/membar.py):
what it removes from PTX, that it touches only the named kernels, chains a hook already
installed and puts it back. Runs without a GPU; the compiled Gluon kernel is checked in
test_prefill_rs.py (test_shipped_rs_configs_keep_their_wgmmas_async)."""

from __future__ import annotations

import pytest
import triton

from w4a16moe.kernels import membar

WAIT = """\t// begin inline asm
\t
{
\t.reg .pred complete;
\twaitLoop:
\tmbarrier.try_wait.parity.shared::cta.b64 complete, [%r412], %r413;
\t@!complete bra.uni waitLoop;
}

\t// end inline asm
"""
PTX = ("\tadd.s32 \t%r1, %r2, 1;\n"
       "\tbar.sync \t0, 256;\n" + WAIT +
       "\tld.shared.v4.b32 \t{%r1, %r2, %r3, %r4}, [%r5];\n"
       "\tbar.sync \t0, 256;\n"            # in front of a shared load: kept
       "\tld.shared.v4.b32 \t{%r1, %r2, %r3, %r4}, [%r5];\n"
       "\tbarrier.sync \t0;\n" + WAIT.replace("%r412", "%r9") +
       "\tbar.sync \t1, 64;\n" + WAIT)     # another named barrier: kept


def test_strip_removes_only_the_barriers_in_front_of_waits():
    out, n = membar.strip_wait_barriers(PTX)
    assert n == 2
    assert out.count("mbarrier.try_wait") == 3
    assert out.count("bar.sync \t0, 256;") == 1
    assert "barrier.sync \t0;" not in out
    assert "bar.sync \t1, 64;" in out
    # nothing else changes
    assert out == PTX.replace("\tbar.sync \t0, 256;\n\t// begin", "\t// begin", 1).replace(
        "\tbarrier.sync \t0;\n", "")
    assert membar.strip_wait_barriers(out) == (out, 0)


def _run_hook(hook, name: str, ptx: str = PTX) -> str:
    stages = {"ptx": lambda src, metadata: ptx}
    hook(object(), stages, None, None, 90)
    return stages["ptx"](None, {"name": name})


def test_hook_touches_only_the_named_kernels_and_restores_the_previous_one():
    calls = []

    def previous(*args, **kwargs):
        calls.append(len(args))
        if not args:
            return "user-key", "user-hash"
        return None

    runtime = triton.knobs.runtime
    saved = runtime.add_stages_inspection_hook
    runtime.add_stages_inspection_hook = previous
    try:
        with membar.stripped_wait_barriers("_prefill_rs_kernel") as hook:
            assert runtime.add_stages_inspection_hook is hook
            key, hsh = hook()
            assert key == "user-key" + membar.HOOK_KEY and hsh == "user-hash" + membar.HOOK_KEY
            assert _run_hook(hook, "_prefill_rs_kernel").count("bar.sync \t0, 256;") == 1
            assert hook.removed == {"_prefill_rs_kernel": 2}
            assert _run_hook(hook, "some_user_kernel") == PTX
        assert runtime.add_stages_inspection_hook is previous
        assert calls == [0, 5, 5]  # the key, then both stage rewrites went through it too
        with pytest.raises(RuntimeError), membar.stripped_wait_barriers("k"):
            raise RuntimeError("launch failed")
        assert runtime.add_stages_inspection_hook is previous
    finally:
        runtime.add_stages_inspection_hook = saved


def test_hook_without_a_previous_one():
    runtime = triton.knobs.runtime
    saved = runtime.add_stages_inspection_hook
    runtime.add_stages_inspection_hook = None
    try:
        with membar.stripped_wait_barriers("k") as hook:
            assert hook() == (membar.HOOK_KEY, membar.HOOK_KEY)
            assert _run_hook(hook, "k").count("mbarrier.try_wait") == 3
        assert runtime.add_stages_inspection_hook is None
    finally:
        runtime.add_stages_inspection_hook = saved


RING = ("\tcp.async.commit_group;\n"
        "\tadd.s64 \t%rd43, %rd35, 128;\n"
        "\tbar.sync \t0;\n"                  # in front of a stage's refill: removed
        "\tadd.s32 \t%r51, %r42, 16384;\n"
        "\tselp.b32 \t%r52, 16, 0, %p6;\n"
        "\t// begin inline asm\n"
        "\tcp.async.cg.shared.global [ %r51 + 0 ], [ %rd43 + 0 ], 0x10, %r52;\n"
        "\t// end inline asm\n"
        "\tcp.async.commit_group;\n"
        "\t.loc\t1 274 30\n"
        "\tcp.async.wait_group \t2;\n"
        "\tbar.sync \t0;\n"                  # after a counted wait: removed
        "\tld.shared.v4.b32 \t{%r123, %r124, %r125, %r126}, [%r341+-58432];\n"
        "\tbar.sync \t0;\n"                  # in front of a shared load: kept
        "\tld.shared.v4.b32 \t{%r1, %r2, %r3, %r4}, [%r5];\n"
        "\tbar.sync \t0;\n"                  # a branch comes first: kept
        "\t@%p9 bra \t$L__BB0_7;\n"
        "\tcp.async.cg.shared.global [ %r51 + 0 ], [ %rd43 + 0 ], 0x10, %r52;\n"
        "\tcp.async.wait_group \t0;\n"
        "\tbar.sync \t0;\n"                  # after the final wait: kept
        "\tst.shared.b32 \t[%r7], %r8;\n"
        "\tcp.async.wait_group \t0;\n"
        "\tbar.sync \t0;\n"                  # after a full wait, before a refill: kept
        "\tcp.async.cg.shared.global [ %r51 + 0 ], [ %rd43 + 0 ], 0x10, %r52;\n")


def test_ring_strip_removes_only_the_barriers_around_the_ring():
    out, n = membar.strip_ring_barriers(RING)
    assert n == 2
    assert out.count("bar.sync") == RING.count("bar.sync") - 2
    lines = RING.split("\n")
    assert out == "\n".join(x for j, x in enumerate(lines) if j not in (2, 11))
    assert membar.strip_ring_barriers(out) == (out, 0)
    assert membar.strip_ring_barriers(PTX) == (PTX, 0)


def test_ring_hook_has_its_own_cache_key():
    hook = membar._StripHook(frozenset({"k"}), None, membar.strip_ring_barriers,
                             membar.RING_HOOK_KEY)
    assert hook() == (membar.RING_HOOK_KEY, membar.RING_HOOK_KEY)
    assert membar.RING_HOOK_KEY != membar.HOOK_KEY
    assert _run_hook(hook, "k", RING) == membar.strip_ring_barriers(RING)[0]
    assert _run_hook(hook, "other", RING) == RING


def test_ring_strip_makes_warp_barriers_of_the_ring_barriers_when_asked():
    """With ``warp_barriers`` (a ring whose lanes read back what their warp copied) the two
    barriers the strip removes become ``bar.warp.sync -1``, in place; every other barrier
    stays a CTA barrier."""
    out, n = membar.strip_ring_barriers(RING, warp_barriers=True)
    assert n == 2
    lines, got = RING.split("\n"), out.split("\n")
    assert len(got) == len(lines)
    for j, (was, now) in enumerate(zip(lines, got, strict=True)):
        if j in (2, 11):
            assert now == "\tbar.warp.sync -1;", (j, now)
        else:
            assert now == was, j
    assert out.count("bar.sync") == RING.count("bar.sync") - 2
    # stripping again finds nothing: warp barriers are not CTA barriers
    assert membar.strip_ring_barriers(out, warp_barriers=True) == (out, 0)
    assert membar.RING_WARP_HOOK_KEY not in (membar.RING_HOOK_KEY, membar.HOOK_KEY)
