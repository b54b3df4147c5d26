"""Device microbenchmark: DRAM read bandwidth when a tile reads ``ROWS`` rows of a row-major
int32 matrix ``CHUNK`` words at a time (each row's chunk is contiguous, the rows are ``K/8``
words apart), as the int4 GEMMs read their packed weights ``[E, N, K/8]``: the Gluon
prefill kernel's mid-M tiles take 128 or 256 rows x 16 words (BLOCK_SIZE_K 128: 64 bytes a
row) per K step, the decode kernel's tiles 8-128 rows x 32-64 words.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/row_chunk_bandwidth.py --out $OUT

Question (benchmarks/notes_prefill.md, session 19): the mid-M prefill GEMMs stream their
weights at 63-84 % of the 3.08 TB/s a contiguous read reaches. Is a 64-byte run per row and
step itself slower to stream from HBM than longer runs, whatever the kernel does with it?
Each program of a Triton kernel reads one ``ROWS``-row tile over the whole K, ``CHUNK`` words
a row per step (``tl.range`` pipelined, ``--stages`` steps in flight), XORs the words and
stores one int32; the matrix (``--mbytes``, two copies alternated so the 50 MB L2 holds none
of it) is read once per call. Loads are plain global loads (cp.async with the pipeline),
with ``--pair`` also two adjacent chunks a step as two separate loads, with
``--l2-prefetch`` also after an L2 bulk prefetch of each row's whole range, or TMA copies of the
``[ROWS, CHUNK]`` box (``tl.make_tensor_descriptor``) with ``--tma`` (and with both flags a
``[2, ROWS, CHUNK]`` box of two adjacent chunks, the chunk index outermost).
``$OUT/row_chunk_bandwidth.json`` holds GB/s per (rows, chunk, warps, stages, loads).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import write_records  # noqa: E402

from w4a16moe.bench.timing import time_calls  # noqa: E402


@triton.jit
def _read_tiles(w_ptr, out_ptr, KW, ROWS: tl.constexpr, CHUNK: tl.constexpr,
                STAGES: tl.constexpr, PAIR: tl.constexpr, L2_PREFETCH: tl.constexpr):
    """Program ``p`` XORs rows ``p*ROWS ..`` of ``w`` (``[R, KW]`` int32, row stride ``KW``)
    over all ``KW`` words, ``CHUNK`` words a row per step, and stores the result at
    ``out[p]``. ``PAIR``: each step is two separate ``[ROWS, CHUNK]`` loads of adjacent
    chunks (two ``CHUNK``-word requests a row issued together, not one twice as long).
    ``L2_PREFETCH``: before the loop each row's whole range (``4*KW`` bytes) is asked into
    L2 by one ``cp.async.bulk.prefetch.L2`` (sm_90), so HBM sees one long run a row while
    the loop still reads ``CHUNK`` words a step."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    if L2_PREFETCH:
        tl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
            [w_ptr + rows * KW, tl.full([ROWS], 4, tl.int32) * KW], dtype=tl.int32,
            is_pure=False, pack=1)
    ptrs = w_ptr + rows[:, None] * KW + tl.arange(0, CHUNK)[None, :]
    acc = tl.zeros([ROWS, CHUNK], dtype=tl.int32)
    for kw in tl.range(0, KW, CHUNK * (1 + PAIR), num_stages=STAGES):
        acc ^= tl.load(ptrs + kw)
        if PAIR:
            acc ^= tl.load(ptrs + kw + CHUNK)
    tl.store(out_ptr + pid, tl.reduce(tl.reduce(acc, 1, _xor), 0, _xor))


@triton.jit
def _read_tiles_tma(w_ptr, out_ptr, R, KW, ROWS: tl.constexpr, CHUNK: tl.constexpr,
                    STAGES: tl.constexpr):
    """:func:`_read_tiles` with each step's ``[ROWS, CHUNK]`` box copied by TMA."""
    pid = tl.program_id(0)
    desc = tl.make_tensor_descriptor(w_ptr, shape=[R, KW], strides=[KW, 1],
                                     block_shape=[ROWS, CHUNK])
    acc = tl.zeros([ROWS, CHUNK], dtype=tl.int32)
    for kw in tl.range(0, KW, CHUNK, num_stages=STAGES):
        acc ^= desc.load([pid * ROWS, kw])
    tl.store(out_ptr + pid, tl.reduce(tl.reduce(acc, 1, _xor), 0, _xor))


@triton.jit
def _read_tiles_tma_pair(w_ptr, out_ptr, R, KW, ROWS: tl.constexpr, CHUNK: tl.constexpr,
                         STAGES: tl.constexpr):
    """:func:`_read_tiles_tma` with one TMA box of two adjacent chunks a step, the chunk index
    the box's outer dimension (``[2, ROWS, CHUNK]``: in shared memory the two chunks land as
    two ``[ROWS, CHUNK]`` tiles one after the other, so a kernel can keep one tile per K step
    while each row's two chunks are read by one copy)."""
    pid = tl.program_id(0)
    desc = tl.make_tensor_descriptor(w_ptr, shape=[KW // CHUNK, R, CHUNK],
                                     strides=[CHUNK, KW, 1], block_shape=[2, ROWS, CHUNK])
    acc = tl.zeros([2, ROWS, CHUNK], dtype=tl.int32)
    for kw in tl.range(0, KW, 2 * CHUNK, num_stages=STAGES):
        acc ^= desc.load([kw // CHUNK, pid * ROWS, 0])
    acc2 = tl.reduce(acc, 0, _xor)
    tl.store(out_ptr + pid, tl.reduce(tl.reduce(acc2, 1, _xor), 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mbytes", type=int, default=480, help="size of one weight copy, MB")
    ap.add_argument("--kw", type=int, default=512,
                    help="words per row (K/8: 512 = Mixtral's GEMM1, 1792 its GEMM2)")
    ap.add_argument("--rows", default="128,256")
    ap.add_argument("--chunks", default="8,16,32,64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="3,4")
    ap.add_argument("--tma", action="store_true", help="also time the TMA version")
    ap.add_argument("--pair", action="store_true",
                    help="also time plain loads with two adjacent chunks a step (PAIR)")
    ap.add_argument("--l2-prefetch", action="store_true",
                    help="also time plain loads after an L2 bulk prefetch of each row "
                         "(ldg_l2pf)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.tma:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                      device=dev))
    kw = args.kw
    r = args.mbytes * 2**20 // (4 * kw) // 256 * 256
    copies = [torch.randint(-2**31, 2**31 - 1, (r, kw), dtype=torch.int32, device=dev)
              for _ in range(2)]
    nbytes = copies[0].numel() * 4
    # the streaming rate of the same bytes read contiguously as bf16 (what the floors divide
    # by: RESULTS.md's 3078 GB/s is torch.sum over bf16)
    flat = [c.view(-1).view(torch.bfloat16) for c in copies]
    base = time_calls([lambda f=f: torch.sum(f) for f in flat], dev)
    records = [dict(kind="torch.sum", bytes=nbytes, us=base.median_us,
                    gbs=nbytes / base.median_us / 1e3)]
    print(f"torch.sum over {nbytes / 1e6:.0f} MB: {base.median_us:.1f} us, "
          f"{nbytes / base.median_us / 1e3:.0f} GB/s", flush=True)
    kinds = (("ldg",) + (("ldg_pair",) if args.pair else ())
             + (("ldg_l2pf",) if args.l2_prefetch else ())
             + (("tma",) + (("tma_pair",) if args.pair else ()) if args.tma else ()))
    for loads in kinds:
        for rows in map(int, args.rows.split(",")):
            outs = torch.empty(r // rows, dtype=torch.int32, device=dev)
            for chunk in map(int, args.chunks.split(",")):
                if rows * chunk > 16384:  # registers: at most 64 words a thread on 8 warps
                    continue
                for warps in map(int, args.warps.split(",")):
                    for stages in map(int, args.stages.split(",")):
                        def call(c, rows=rows, chunk=chunk, warps=warps, stages=stages,
                                 loads=loads, outs=outs):
                            if loads == "tma_pair":
                                _read_tiles_tma_pair[(r // rows,)](c, outs, r, kw, ROWS=rows,
                                                                   CHUNK=chunk, STAGES=stages,
                                                                   num_warps=warps)
                            elif loads == "tma":
                                _read_tiles_tma[(r // rows,)](c, outs, r, kw, ROWS=rows,
                                                              CHUNK=chunk, STAGES=stages,
                                                              num_warps=warps)
                            else:
                                _read_tiles[(r // rows,)](c, outs, kw, ROWS=rows, CHUNK=chunk,
                                                          STAGES=stages,
                                                          PAIR=loads == "ldg_pair",
                                                          L2_PREFETCH=loads == "ldg_l2pf",
                                                          num_warps=warps)
                        try:
                            t = time_calls([lambda c=c: call(c) for c in copies], dev)
                        except Exception as exc:  # a variant that does not compile
                            print(f"{loads} rows={rows} chunk={chunk} warps={warps} "
                                  f"stages={stages}: {type(exc).__name__}: {exc}"[:300])
                            continue
                        gbs = nbytes / t.median_us / 1e3
                        records.append(dict(kind=loads, rows=rows, chunk_words=chunk,
                                            row_bytes=4 * chunk, warps=warps, stages=stages,
                                            bytes=nbytes, us=t.median_us, gbs=gbs,
                                            of_sum=gbs / records[0]["gbs"]))
                        print(f"{loads} rows={rows} chunk={chunk} words ({4 * chunk} B a row) "
                              f"warps={warps} stages={stages}: {t.median_us:.1f} us, "
                              f"{gbs:.0f} GB/s ({100 * records[-1]['of_sum']:.0f} % of "
                              "torch.sum)", flush=True)
    path = write_records(args.out, "row_chunk_bandwidth.json", records, kw=kw,
                         triton=triton.__version__)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
