"""The mma prefill kernel's K loop in SASS, counted by opcode, built for sm_90 on any machine.

    python benchmarks/mma_sass_loop.py                   # qwen3-30b's shipped GEMM1, GEMM2
    python benchmarks/mma_sass_loop.py --variant '{"block_t": 8, "block_n": 64, "num_warps": 4,
        "activation": true, "groups": 2, "ring_stages": 2}' --switch RING_COPIES_WHOLE_RUNS=False

What a kernel change does to the loop's instructions, before any GPU time: each variant (the
keyword arguments of ``tests/mma_aot.py``'s ``ptxas_report``, which builds the kernel as the
launcher would) is compiled by the Triton wheel's ``ptxas``, disassembled by its
``cuobjdump``, and the K loop (the shortest span of a backward branch holding more than
``--min-body`` instructions: the loop over step pairs) is counted by opcode. ``--switch``
sets a module switch of ``prefill_mma`` first (as the bench paths do). Session 37 counted the
shipped tiles' two-step iteration so (GEMM1: 1016 instructions, 256 of them the packed adds of
the codes' zero points), before measuring that 10 % fewer changed no layer time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from prefill_mma_ab import add_switch_argument, apply_switches  # noqa: E402

#: qwen3-30b-a3b's shipped mma tiles as the layer launches them (8-slot blocks, two groups a
#: step, the words' ring, GEMM1 raising its blocks' counts and GEMM2 waiting on them)
SHIPPED = {
    "gemm1": dict(block_t=8, block_n=64, num_warps=4, activation=True, groups=2,
                  out_sorted=True, predicated_reloads=True, ring_stages=2, ready=1),
    "gemm2": dict(block_t=8, block_n=128, num_warps=4, activation=False, groups=2,
                  a_sorted=True, weights_before_wait=True, predicated_reloads=True,
                  mul_routed_weight=True, ring_stages=2, ready=2),
}
_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")


def loop_opcodes(sass: str, min_body: int = 100) -> tuple[int, collections.Counter]:
    """``(instructions, opcode counts)`` of the K loop in ``sass`` (``cuobjdump -sass``
    text): the shortest span from a backward branch's target to the branch that holds more
    than ``min_body`` instructions; opcodes without their modifiers (``HMMA``, ``LOP3``)."""
    ins = []
    for line in sass.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    spans = []
    for addr, op, rest in ins:
        target = _TARGET.search(rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            body = [o for a, o, _ in ins if start <= a <= addr]
            if len(body) > min_body:
                spans.append(body)
    if not spans:
        raise ValueError(f"no loop of more than {min_body} instructions in this SASS")
    body = min(spans, key=len)
    return len(body), collections.Counter(op.split(".")[0] for op in body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", type=json.loads, action="append", default=[],
                    metavar="JSON", help="ptxas_report keyword arguments (repeatable; default: "
                    "qwen3-30b's shipped GEMM1 and GEMM2 tiles)")
    ap.add_argument("--min-body", type=int, default=100,
                    help="least instructions of the loop taken for the K loop (default 100)")
    ap.add_argument("--top", type=int, default=12, help="opcodes shown (default 12)")
    ap.add_argument("--json", action="store_true", help="print the counts as JSON only")
    add_switch_argument(ap)
    args = ap.parse_args()
    apply_switches(ap, args.switch)
    from mma_aot import ptxas_report

    variants = ({f"variant{i}": v for i, v in enumerate(args.variant)} if args.variant
                else SHIPPED)
    out = {}
    for name, v in variants.items():
        rep = ptxas_report(**v, sass=True)
        registers = int(re.search(r"Used (\d+) registers", rep["ptxas"]).group(1))
        spills = "0 bytes spill stores" not in rep["ptxas"]
        total, ops = loop_opcodes(rep["sass"], args.min_body)
        out[name] = {"variant": v, "registers": registers, "spills": spills,
                     "loop_instructions": total, "opcodes": dict(ops.most_common())}
        if not args.json:
            top = ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top))
            print(f"{name}: {registers} registers{' (spills)' if spills else ''}, "
                  f"loop {total} instructions: {top}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
