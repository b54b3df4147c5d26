"""Shared by the ahead-of-time compile helpers (``rs_aot.py``, ``pdl_aot.py``): the
signature Triton's ``ASTSource`` wants for a kernel, built from its argument names."""

from __future__ import annotations


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
