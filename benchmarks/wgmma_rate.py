"""Device microbenchmark: cycles per ``wgmma.mma_async`` m64 x N x k16 (bf16, fp32 accumulate)
by N, with the A operand from registers (RS, what the Gluon prefill kernel issues) or from
shared memory (SS), and one or two warpgroups per SM.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/wgmma_rate.py --out $OUT

Question it answers (benchmarks/notes_prefill.md, session 12): at mid M the Gluon kernel's
GEMMs take ~48-53 cycles per SM for each 64 x 16 x 16 register-operand wgmma they issue,
whatever else is removed from the loop. Is that the tensor pipe's cost of a narrow RS wgmma?
One program per SM issues ``--iters`` steps of four k16 wgmmas per warpgroup (a 64-column K
step) against a constant operand, keeping one step in flight (``wait(1)``, as the kernel
does); ``%clock64`` around the loop gives the cycles, per SM, of one wgmma instruction of
the whole CTA (both warpgroups' wgmmas counted). The nominal dense bf16 rate is 4096 FLOP
per SM and cycle (989 TFLOP/s at 1.83 GHz on 132 SMs): 8 cycles for N=16, 128 for N=256.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import write_records  # noqa: E402


@gluon.jit
def _clock(x):
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [x], dtype=gl.int64,
                                     is_pure=False, pack=1)


@gluon.jit
def _wgmma_loop(out_ptr, cycles_ptr, iters, BLOCK_T: gl.constexpr, RS: gl.constexpr,
                num_warps: gl.constexpr):
    """``iters`` K steps (64 columns: four k16 wgmmas per warpgroup) of a [64 * warpgroups,
    BLOCK_T] accumulator against constant operands; writes the accumulator's sum (so
    nothing is dead) and the loop's cycles (clock64 of thread 0)."""
    ROWS: gl.constexpr = 16 * num_warps
    BK: gl.constexpr = 64
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_T, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout,
                                                 k_width=2)
    fill: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    b_smem = gl.allocate_shared_memory(
        gl.bfloat16, [BLOCK_T, BK], gl.NVMMASharedLayout.get_default_for([BLOCK_T, BK],
                                                                         gl.bfloat16),
        gl.full([BLOCK_T, BK], 0.5, gl.bfloat16, fill))
    acc = gl.zeros([ROWS, BLOCK_T], gl.float32, mma_layout)
    if RS:
        a = gl.full([ROWS, BK], 1.0, gl.bfloat16, a_layout)
    else:
        a = gl.allocate_shared_memory(
            gl.bfloat16, [ROWS, BK], gl.NVMMASharedLayout.get_default_for([ROWS, BK],
                                                                          gl.bfloat16),
            gl.full([ROWS, BK], 1.0, gl.bfloat16, fill))
    t = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, mma_layout))
    start = _clock(t)
    for _ in range(iters):
        acc = warpgroup_mma(a, b_smem.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    total = gl.sum(acc, axis=0)
    end = _clock(total.to(gl.int32))
    pid = gl.program_id(0)
    gl.store(out_ptr + pid * BLOCK_T + t, total)
    gl.store(cycles_ptr + pid * BLOCK_T + t, end - start)


def measure(block_t: int, rs: bool, warps: int, iters: int, sms: int) -> dict:
    out = torch.empty(sms, block_t, device="cuda", dtype=torch.float32)
    cycles = torch.empty(sms, block_t, device="cuda", dtype=torch.int64)
    run = lambda: _wgmma_loop[(sms,)](out, cycles, iters, BLOCK_T=block_t, RS=rs,  # noqa: E731
                                      num_warps=warps)
    run()
    torch.cuda.synchronize()
    expected = iters * 64 * 0.5  # every accumulator entry: iters * 64 products 1 * 0.5
    ok = bool(torch.allclose(out, torch.full_like(out, expected * 16 * warps), rtol=1e-3))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    wgmmas = iters * 4 * (warps // 4)  # per CTA
    cyc = float(cycles[:, 0].double().median())
    us = start.elapsed_time(end) * 1e3
    flop = 2.0 * 64 * block_t * 16 * wgmmas * sms
    return {"N": block_t, "mode": "RS" if rs else "SS", "warpgroups": warps // 4,
            "cycles_per_wgmma": cyc / wgmmas, "nominal_cycles": 64 * block_t * 16 * 2 / 4096,
            "tflops": flop / us / 1e6, "us": us, "sum_ok": ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for warps in (4, 8):
        for rs in (True, False):
            for n in (8, 16, 32, 64, 128, 256):
                r = measure(n, rs, warps, args.iters, sms)
                rows.append(r)
                print(f"{r['mode']} warpgroups={r['warpgroups']} m64n{n}k16: "
                      f"{r['cycles_per_wgmma']:.1f} cycles/wgmma per SM (nominal "
                      f"{r['nominal_cycles']:.0f}), {r['tflops']:.0f} TFLOP/s"
                      f"{'' if r['sum_ok'] else ' WRONG SUM'}", flush=True)
    print("wrote", write_records(args.out, "wgmma_rate.json", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
