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
