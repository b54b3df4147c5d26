"""Shared by the ahead-of-time compile helpers (``rs_aot.py``, ``pdl_aot.py``,
``mma_aot.py``): the signature Triton's ``ASTSource`` wants for a kernel, built from its
argument names, and the child process those helpers compile in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def kernel_signature(fn, constexprs: dict, pointers: dict, scalars: dict | None = None,
                     divisible=lambda name: False) -> tuple[dict, dict]:
    """``(signature, attrs)`` of ``fn``: ``"constexpr"`` for the names in ``constexprs``,
    the type in ``pointers`` (16-byte aligned) or ``scalars`` for the others, ``"i32"`` for
    the rest; ``divisible(name)`` marks integer arguments that are multiples of 16."""
    scalars = scalars or {}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = scalars.get(name, "i32")
            if sig[name] == "i32" and divisible(name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def run_in_child(script: str, variants: list[dict]) -> list[dict]:
    """Run the helper ``script`` (its ``__main__`` reads ``variants`` as JSON on stdin and
    prints one JSON report list) in a fresh Python process without ``TRITON_INTERPRET`` (the
    test session runs Triton's interpreter, which leaves the language patched for
    compilation once an interpreted kernel has run), the repository on ``PYTHONPATH`` and
    an empty Triton cache (compile hooks run on every build, triton 3.6 keys its cache
    without them, and these sm_90 builds stay out of the user's cache)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        run = subprocess.run([sys.executable, os.path.abspath(script)],
                             input=json.dumps(variants), capture_output=True, text=True,
                             env=env, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"{os.path.basename(script)} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout)
