"""Grouped int4 GEMM for few tokens an expert on ``mma.sync`` tensor cores, written in Gluon.

The same product as the prefill kernels (:mod:`w4a16moe.kernels.prefill`,
:mod:`w4a16moe.kernels.prefill_rs`): the aligned blocks of :func:`align_block_size`, one
expert each, times that expert's packed weights, read once a block. It is made for blocks of
8-32 slots (a decode-sized or mid-sized batch over many experts), where the wgmma kernel's
shared-memory ring and warp specialisation cost more than they give: here every warp streams
its weight rows from global memory straight into registers and multiplies them on the tensor
cores itself. A program computes ``BLOCK_N`` weight rows (``num_warps`` warps of
``BLOCK_N / num_warps`` rows, in 16-row slabs) of one block over the whole K.

**The K permutation.** A dot product does not change when both operands' K are permuted the
same way. In ``mma.sync.m16n8k16`` lane ``(g, c)`` (``g = lane / 4``, ``c = lane % 4``) holds
columns ``2c, 2c+1, 2c+8, 2c+9`` of its rows ``g`` and ``g + 8``; in the ExLlama order one
packed word holds 8 consecutive K values of one row, so in natural K order each word would
feed all four lanes of a quad (loaded four times, or staged in shared memory: why session 14's
tensor-core decode kernel lost, ``benchmarks/notes_decode.md``). Here logical column ``16j +
8h + 2c + q`` of a 128-column group (``j < 8`` the mma of the group, ``h, q < 2``) is physical
column ``32c + 4j + 2h + q``. So lane ``c`` owns the words ``4c .. 4c+3`` of each of its two
rows (one 16-byte load each); pair ``p = 2 (j % 2) + h`` of word ``4c + j / 2`` (bits ``4p``
and ``16 + 4p``: one shift, one LOP3, one packed add) is exactly its A registers for mma
``j``; and its B registers for the tokens ``g`` are their activations ``32c .. 32c + 31`` of
the group, contiguous (four 16-byte loads, the same for every warp: L1 hits). No value is
loaded twice and nothing goes through shared memory.

The codes minus their zero point are exact in 16 bits; each group's products go to a fresh
float32 accumulator that is scaled per row once the group is done (``G`` a multiple of 128).
A K step reads ``GROUPS`` = ``BLOCK_SIZE_K / 128`` groups, so a weight row is read in runs of
``64 GROUPS`` bytes (a quad's four 16-byte loads of a group are one 64-byte run, and HBM
streams 64-byte runs of a row at about two thirds of its rate: ``row_chunk_bandwidth.py``).
Words, scales and (for 8-slot blocks) activations run two K steps ahead of the arithmetic in
registers: the loop is unrolled by two and each half has its own buffers, reloaded in place,
and the 16-bit activations and scales travel as 32-bit words (two values each). A value
copied from one register to another, or repacked from 16-bit halves, waits for its load
there: with such copies ncu put a sixth to a third of the warps' stall samples on them,
and the layer was 4-6 % slower (``benchmarks/notes_prefill.md``, session 26). Zero points
are loaded at their step (L1 hits after a row's first step).

**The words' ring.** ptxas puts every global load of the loop on one scoreboard, so the first
use of a register buffer waits for all of the warp's loads in flight, the two-steps-ahead
reloads included: a warp's loads and its arithmetic take turns, and only the other warps of
the SM overlap them. Programs of at most ``WORD_RING_MAX_STEPS`` K steps of at least
``WORD_RING_MIN_BLOCK_K`` columns (qwen3-30b's GEMMs, 8 and 3 steps of 256; Mixtral's GEMM1,
16) read their words through a ring of ``WORD_RING_STAGES`` shared-memory stages
instead: each thread ``cp.async``-copies its own 16-byte pieces one step ahead (two stages)
and reads back only those after ``cp.async.wait_group``, which counts its groups in flight,
so the next step's copies stay in flight during the arithmetic. The CTA barriers Triton's
shared-memory analysis puts around the ring order nothing here and are stripped from the PTX
(:func:`~w4a16moe.kernels.membar.strip_ring_barriers`). The words' registers go (168 a
thread instead of 255 on the shipped 4-warp tiles: three programs an SM instead of two). On
the H200 this took qwen3-30b's prefill layer 7-17 % lower at M=4-64 and qwen3-235b's 4-8 % at
M=8-32; Mixtral's GEMM2 (56 steps) and one-group steps (64 bytes a row ahead) were slower with
it and keep the registers (``benchmarks/notes_prefill.md``, session 30). With K steps of two
groups or more the copies go in whole 128-byte runs of a row (``RING_COPIES_WHOLE_RUNS``: 8
lanes a row, each warp copying the rows it computes), half the L2 requests of each lane
copying its own pieces; a lane then reads back what other lanes of its warp copied, so the
ring's barriers become warp barriers (session 37). A table entry's ``WORD_RING`` sets the
stages itself at any step count: Mixtral's GEMM2 at 2-4 tokens, whose one-warp programs of 56
(or 28) steps each stream their rows at a pace set by the bytes they keep in flight, so the
time follows how many such programs fit an SM at once (one wave or two); there the ring keeps a
whole 512-column step in flight (two stages, 254 registers: 8 programs an SM) or frees registers
for more programs (256-column steps, three stages, 136 registers: 15 an SM). H200: that layer
9-15 % lower at M=2 (session 41).

**The K order.** 8-slot programs walk their K steps from step ``pid % steps`` round
(``ROTATE_K_STEPS``): a launch's first wave, whose programs all start together, otherwise
reads the same column runs of every row at once, and read 10-15 % slower than the staggered
waves after it (H200: 1-5 % off most layers, ``benchmarks/notes_prefill.md``, session 32).
With ``TIMELINE`` each program also records its SM, start, end and cycles
(``benchmarks/prefill_timeline_probe.py``).

**GEMM2 per block.** In a small layer's chain GEMM2 is launched as GEMM1's programmatic
dependent once every GEMM1 program has started, so its programs can take the SMs GEMM1's last
programs leave idle; waiting there for all of GEMM1 (``griddepcontrol.wait``) they only loaded
their first weights. With ``GEMM2_WAITS_PER_BLOCK`` a GEMM1 program raises its block's count
once its tile is stored (CTA barrier, GPU-scope fence, relaxed atomic: a release), and a GEMM2
program polls its own block's count with acquire loads instead (H200: 2-7 % off qwen3-30b's
layer at M=2-16, session 33).

Shapes: A ``[M, K]`` (rows ``slot // top_k``), ``[M*top_k, K]`` (``A_IS_SLOTS``) or ``[EM,
K]`` (``A_SORTED``: row ``p`` for sorted position ``p``); qweight int32 ``[E, N_w, K/8]``;
scales ``[E, N_w, K/G]``; zeros uint8 ``[E, N_w, K/G]``; C ``[M*top_k, N_out]`` or ``[EM,
N_out]`` (``C_SORTED``). With ``ACTIVATION`` the program's rows are gate and up rows
interleaved in runs of 8 and it stores ``act(gate) * up`` (``N_out = N_w / 2``).

:func:`mma_unsupported` says which calls qualify; ``prefill_gemm`` runs the same block size on
the Triton kernel otherwise. Gluon does not run under the Triton interpreter: the CPU tests
compile the kernel for sm_90 and check the permutation on the host
(:func:`permuted_columns`); the numerical tests are GPU tests.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .membar import stripped_ring_barriers
from .pdl import prefill_pdl_args
from .prefill_rs import HAVE_GLUON, gluon_unsupported

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

    from .prefill_rs import (
        _packed_pair,
        _rs_tile_rows,
        _tile_result,
        _wait_upstream_release_next,
    )

#: columns of one quantization group as the kernel takes them (``G`` and ``BLOCK_SIZE_K`` must
#: be multiples of it)
MMA_BLOCK_K = 128
#: the kernel's name as Triton compiles it (for the ring's barrier-stripping hook)
_KERNEL_NAME = "_prefill_mma_kernel"


def permuted_columns(k: int = MMA_BLOCK_K) -> list[int]:
    """Physical K column of each logical mma column ``16j + 8h + 2c + q`` (see the module
    docstring): ``32c + 4j + 2h + q`` within each group of 128."""
    out = []
    for logical in range(k):
        g, r = divmod(logical, 128)
        j, r = divmod(r, 16)
        h, r = divmod(r, 8)
        c, q = divmod(r, 2)
        out.append(128 * g + 32 * c + 4 * j + 2 * h + q)
    return out


if HAVE_GLUON:

    def _code_pair_asm(one: str, bias: str, fma: str) -> gl.constexpr:
        """The PTX of :func:`_code_pair` for one 16-bit type: ``one`` and ``bias`` its 1.0
        and code bias (1024 for fp16, 128 for bf16) as packed pairs, ``fma`` its packed FMA."""
        return gl.constexpr(f"""{{
                .reg .b32 t, one;
                mov.b32 one, {one};
                shr.u32 t, $2, $3;
                lop3.b32 t, t, 0x000F000F, {bias}, 0xEA;
                {fma} t, t, one, $4;
                mov.b32 {{$0, $1}}, t;
                }}""")

    _CODE_PAIR_FP16 = _code_pair_asm("0x3C003C00", "0x64006400", "fma.rn.f16x2")
    _CODE_PAIR_BF16 = _code_pair_asm("0x3F803F80", "0x43004300", "fma.rn.bf16x2")
    _WORD_HALVES = gl.constexpr("mov.b32 {$0, $1}, $2;")

    @gluon.jit
    def _code_pair(words, shift, zz, IS_FP16: gl.constexpr):
        """Values ``2p`` and ``2p+1`` of each word (``shift`` = 4p: bits 4p and 16+4p in the
        ExLlama order) minus their zero point, packed: (bias + v) by one shift and one LOP3,
        then one packed add of ``zz`` (the negated bias + zero point), exact."""
        return gl.inline_asm_elementwise(
            asm=_CODE_PAIR_FP16 if IS_FP16 else _CODE_PAIR_BF16,
            constraints="=h,=h,r,r,r", args=[words, shift, zz],
            dtype=(gl.float16, gl.float16) if IS_FP16 else (gl.bfloat16, gl.bfloat16),
            is_pure=True, pack=1)

    # special registers read where the program gets there (not pure: never hoisted or merged)
    @gluon.jit
    def _globaltimer():
        """The GPU's nanosecond clock (one for all SMs)."""
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64,
                                         is_pure=False, pack=1)

    @gluon.jit
    def _clock64():
        """This SM's cycle counter."""
        return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64,
                                         is_pure=False, pack=1)

    @gluon.jit
    def _smid():
        """The SM this program runs on."""
        return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32,
                                         is_pure=False, pack=1)

    # the per-block handshake of GEMM1 and GEMM2 (``GEMM2_WAITS_PER_BLOCK``), as CUTLASS's
    # split-K semaphores do it: a CTA barrier, then one thread's fence and relaxed atomic
    _BLOCK_DONE = gl.constexpr("""{
            .reg .pred p;
            .reg .b32 t;
            bar.sync 0;
            mov.u32 t, %tid.x;
            setp.eq.u32 p, t, 0;
            @p fence.acq_rel.gpu;
            @p red.relaxed.gpu.global.add.s32 [$1], 1;
            mov.b32 $0, 0;
            }""")

    @gluon.jit
    def _block_done(count_ptr):
        """A GEMM1 program's tile of its block is stored: once every thread of the program is
        here, one thread adds 1 to the block's count, after a GPU-scope fence (release)."""
        gl.inline_asm_elementwise(_BLOCK_DONE, "=r,l", [count_ptr], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _wait_block_ready(count_ptr, tiles):
        """A GEMM2 program waits until its block's count reaches ``tiles`` (every GEMM1 tile
        of the block stored): each thread polls with acquire loads, so its loads after this
        see those tiles."""
        ready = gl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l",
                                          [count_ptr], dtype=gl.int32, is_pure=False, pack=1)
        while ready < tiles:
            ready = gl.inline_asm_elementwise(
                "nanosleep.u32 100;\n\tld.global.acquire.gpu.b32 $0, [$1];", "=r,l",
                [count_ptr], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _wait_upstream():
        """``griddepcontrol.wait`` alone (a kernel that releases the next one later)."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _release_next():
        """``griddepcontrol.launch_dependents`` alone (a program that never waits for the
        kernel before as a whole)."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _release_next_after(a, b):
        """``griddepcontrol.launch_dependents`` once ``a`` and ``b`` (loaded values) are in:
        the next kernel's programs launch only after every program here has them."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0 $1 $2", "=r,r,r",
                                  [a, b], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _word_halves(words, IS_FP16: gl.constexpr):
        """The two 16-bit values of each 32-bit word (low half first), as fp16 or bf16."""
        return gl.inline_asm_elementwise(
            asm=_WORD_HALVES, constraints="=h,=h,r", args=[words],
            dtype=(gl.float16, gl.float16) if IS_FP16 else (gl.bfloat16, gl.bfloat16),
            is_pure=True, pack=1)

    @gluon.jit
    def _mma_group(acc, words, x, sc, zr, IS_FP16: gl.constexpr, HAS_ZEROS: gl.constexpr,
                   BLOCK_N: gl.constexpr, BLOCK_T: gl.constexpr, a_layout: gl.constexpr,
                   b_layout: gl.constexpr, mma_layout: gl.constexpr,
                   pairs_layout: gl.constexpr):
        """``acc + sc * ((W_q - z) @ x)`` over one group of 128 columns. ``words``: the rows'
        16 words ``[BLOCK_N, 16]`` (lane ``c`` holding words ``4c .. 4c+3``); ``x``: the
        tokens' 128 activations in physical order as 64 words of two, ``[64, BLOCK_T]``
        (lane ``c`` holding words ``16c .. 16c+15``: columns ``32c .. 32c+31``); ``sc``,
        ``zr``: the group's scale and raw zero point per row (``zr`` unused without
        ``HAS_ZEROS``: the zero point is 8)."""
        row_layout: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(
            3, pairs_layout)))
        if IS_FP16:
            bias = 1024
            vdtype: gl.constexpr = gl.float16
        else:
            bias = 128
            vdtype: gl.constexpr = gl.bfloat16
        if HAS_ZEROS:
            zneg = -(bias + gl.convert_layout(zr, row_layout, assert_trivial=True).to(
                gl.int32))
        else:
            zneg = gl.full([BLOCK_N], -(bias + 8), gl.int32, layout=row_layout)
        zz = _packed_pair(zneg.to(vdtype))
        words4 = gl.convert_layout(gl.reshape(words, [BLOCK_N, 4, 4]),
                                   gl.SliceLayout(3, pairs_layout), assert_trivial=True)
        p = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(
            2, pairs_layout))))
        w4, shift = gl.broadcast(gl.expand_dims(words4, 3), (p * 4)[None, None, None, :])
        zz4 = gl.broadcast(zz[:, None, None, None], w4)[0]
        lo, hi = _code_pair(w4, shift, zz4, IS_FP16)
        # (row, c, w, p = 2 jl + h, q) -> logical column 32 w + 16 jl + 8 h + 2 c + q
        v = gl.reshape(gl.join(lo, hi), [BLOCK_N, 4, 4, 2, 2, 2])  # (row, c, w, jl, h, q)
        v = gl.permute(v, (0, 2, 3, 4, 1, 5))
        a = gl.convert_layout(gl.reshape(v, [BLOCK_N, 128]), a_layout, assert_trivial=True)
        # activation word 16 c + 4 w + 2 jl + h holds physical columns 32 c + 8 w + 4 jl + 2 h
        # + q (q < 2): the same logical columns
        x_lo, x_hi = _word_halves(x, IS_FP16)
        xb = gl.reshape(gl.join(x_lo, x_hi), [4, 4, 2, 2, BLOCK_T, 2])  # (c, w, jl, h, t, q)
        xb = gl.permute(xb, (1, 2, 3, 0, 5, 4))
        b = gl.convert_layout(gl.reshape(xb, [128, BLOCK_T]), b_layout, assert_trivial=True)
        part = mma_v2(a, b, gl.zeros([BLOCK_N, BLOCK_T], gl.float32, layout=mma_layout))
        scale = gl.convert_layout(sc, gl.SliceLayout(1, mma_layout), assert_trivial=True)
        return acc + part * scale.to(gl.float32)[:, None]

    @gluon.jit
    def _col_halves(t, R: gl.constexpr, C: gl.constexpr):
        """``[R, 2C]`` -> its columns ``[0, C)`` and ``[C, 2C)`` (held by the same threads)."""
        return gl.split(gl.permute(gl.reshape(t, [R, 2, C]), (0, 2, 1)))

    @gluon.jit
    def _row_halves(t, R: gl.constexpr, C: gl.constexpr):
        """``[2R, C]`` -> its rows ``[0, R)`` and ``[R, 2R)`` (held by the same threads)."""
        return gl.split(gl.permute(gl.reshape(t, [2, R, C]), (1, 2, 0)))

    @gluon.jit
    def _mma_two(acc, words, x, sc, zr, IS_FP16: gl.constexpr, HAS_ZEROS: gl.constexpr,
                 BLOCK_N: gl.constexpr, BLOCK_T: gl.constexpr, a_layout: gl.constexpr,
                 b_layout: gl.constexpr, mma_layout: gl.constexpr,
                 pairs_layout: gl.constexpr):
        """:func:`_mma_group` over two groups: words ``[BLOCK_N, 32]``, x ``[128, BLOCK_T]``,
        scales and zeros ``[BLOCK_N, 2]``."""
        w0, w1 = _col_halves(words, BLOCK_N, 16)
        x0, x1 = _row_halves(x, 64, BLOCK_T)
        s0, s1 = gl.split(sc)
        z0, z1 = gl.split(zr)
        acc = _mma_group(acc, w0, x0, s0, z0, IS_FP16, HAS_ZEROS, BLOCK_N, BLOCK_T,
                         a_layout, b_layout, mma_layout, pairs_layout)
        return _mma_group(acc, w1, x1, s1, z1, IS_FP16, HAS_ZEROS, BLOCK_N, BLOCK_T,
                          a_layout, b_layout, mma_layout, pairs_layout)

    @gluon.jit
    def _mma_step(acc, words, x, sc, zr, GROUPS: gl.constexpr, IS_FP16: gl.constexpr,
                  HAS_ZEROS: gl.constexpr, SCALE_WORDS: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_T: gl.constexpr, a_layout: gl.constexpr, b_layout: gl.constexpr,
                  mma_layout: gl.constexpr, pairs_layout: gl.constexpr,
                  sz_layout: gl.constexpr):
        """One K step of ``GROUPS`` groups: words ``[BLOCK_N, 16 GROUPS]``, activation words
        ``[64 GROUPS, BLOCK_T]``, scales ``[BLOCK_N, GROUPS]`` (``SCALE_WORDS``: as 32-bit
        words of two, ``[BLOCK_N, GROUPS / 2]``) and raw zero points ``[BLOCK_N, GROUPS]``
        (unused without ``HAS_ZEROS``)."""
        if SCALE_WORDS:
            s_lo, s_hi = _word_halves(sc, IS_FP16)
            sc = gl.convert_layout(gl.reshape(gl.join(s_lo, s_hi), [BLOCK_N, GROUPS]),
                                   sz_layout, assert_trivial=True)
        if not HAS_ZEROS:
            zr = sc
        if GROUPS == 1:
            acc = _mma_group(acc, gl.reshape(words, [BLOCK_N, 16]),
                             gl.reshape(x, [64, BLOCK_T]), gl.reshape(sc, [BLOCK_N]),
                             gl.reshape(zr, [BLOCK_N]), IS_FP16, HAS_ZEROS, BLOCK_N,
                             BLOCK_T, a_layout, b_layout, mma_layout, pairs_layout)
        elif GROUPS == 2:
            acc = _mma_two(acc, words, x, sc, zr, IS_FP16, HAS_ZEROS, BLOCK_N, BLOCK_T,
                           a_layout, b_layout, mma_layout, pairs_layout)
        else:
            w01, w23 = _col_halves(words, BLOCK_N, 32)
            x01, x23 = _row_halves(x, 128, BLOCK_T)
            s01, s23 = _col_halves(sc, BLOCK_N, 2)
            z01, z23 = _col_halves(zr, BLOCK_N, 2)
            acc = _mma_two(acc, w01, x01, s01, z01, IS_FP16, HAS_ZEROS, BLOCK_N, BLOCK_T,
                           a_layout, b_layout, mma_layout, pairs_layout)
            acc = _mma_two(acc, w23, x23, s23, z23, IS_FP16, HAS_ZEROS, BLOCK_N, BLOCK_T,
                           a_layout, b_layout, mma_layout, pairs_layout)
        return acc

    @gluon.jit
    def _step_scales(ptrs, s_grp, step, STEP_K: gl.constexpr, GROUP_SIZE: gl.constexpr,
                     stride_g, AS_WORDS: gl.constexpr, mask=None):
        """The scales (or zero points) of K step ``step``: ``[BLOCK_N, GROUPS]`` values from
        the row pointers ``ptrs`` (group of column ``step * STEP_K + s_grp``), or with
        ``AS_WORDS`` ``[BLOCK_N, GROUPS / 2]`` words from word pointers (G = 128, stride 1);
        ``mask`` (a scalar) predicates the load."""
        if AS_WORDS:
            return gl.load(ptrs + step * (STEP_K // 256), mask=mask)
        else:
            return gl.load(ptrs + ((step * STEP_K + s_grp[None, :]) // GROUP_SIZE) * stride_g,
                           mask=mask)

    @gluon.jit
    def _k_step(step, rot, last, ROTATE_K: gl.constexpr):
        """The K step a program reads at its loop step ``step``: with ``ROTATE_K`` its loop
        starts at step ``rot`` and wraps around after ``last`` (a step past ``last``, a
        masked prefetch, reads ``last``'s place)."""
        if ROTATE_K:
            m = gl.minimum(step, last) + rot
            return gl.where(m > last, m - last - 1, m)
        else:
            return step

    @gluon.jit
    def _step_then_reload(acc, words, x, sc, step, last, w_ptrs, x_ptrs, x_mask, s_ptrs,
                          z_ptrs, s_grp, stride_sg, stride_zg, GROUP_SIZE: gl.constexpr,
                          GROUPS: gl.constexpr, IS_FP16: gl.constexpr,
                          HAS_ZEROS: gl.constexpr, SCALE_WORDS: gl.constexpr,
                          X_AHEAD: gl.constexpr, BLOCK_N: gl.constexpr,
                          BLOCK_T: gl.constexpr, a_layout: gl.constexpr,
                          b_layout: gl.constexpr, mma_layout: gl.constexpr,
                          pairs_layout: gl.constexpr, sz_layout: gl.constexpr,
                          PREDICATED_RELOADS: gl.constexpr = False, ring=None,
                          RING_STAGES: gl.constexpr = 0, w_mask=None, rot=0,
                          ROTATE_K: gl.constexpr = False, wc_ptrs=None):
        """K step ``step`` on one half's buffers (``words``, ``sc`` and, with ``X_AHEAD``,
        ``x``), then those buffers reloaded in place with step ``step + 2`` (at most
        ``last``, the final step; with ``PREDICATED_RELOADS`` a reload past ``last`` is
        masked off rather than loading the last step again). Without
        ``X_AHEAD`` the activations are loaded here at their step and ``x`` passes through
        unchanged; the zero points are loaded at their step either way."""
        STEP_K: gl.constexpr = 128 * GROUPS
        if RING_STAGES > 0:
            # the words of step + RING_STAGES - 1 into the stage step - 1 read (its values are
            # in this thread's registers: the mma of step - 1 used them), then wait until at
            # most RING_STAGES - 1 groups are in flight: this step's has landed
            nxt = step + RING_STAGES - 1
            nxt_k = _k_step(nxt, rot, last, ROTATE_K)
            # (wc_ptrs: the copies' pointers, in whole 128-byte runs of a row with
            # RING_COPIES_WHOLE_RUNS; the read-back below keeps the words' layout)
            async_copy.async_copy_global_to_shared(
                ring.index(nxt % RING_STAGES), wc_ptrs + nxt_k * (16 * GROUPS),
                mask=w_mask & (nxt <= last))
            async_copy.commit_group()
            async_copy.wait_group(RING_STAGES - 1)
            step_words = ring.index(step % RING_STAGES).load(w_ptrs.type.layout)
        else:
            step_words = words
        step_k = _k_step(step, rot, last, ROTATE_K)
        if X_AHEAD:
            xs = x
        else:
            xs = gl.load(x_ptrs + step_k * (STEP_K // 2), mask=x_mask, other=0)
        if HAS_ZEROS:
            zr = _step_scales(z_ptrs, s_grp, step_k, STEP_K, GROUP_SIZE, stride_zg, False)
        else:
            zr = sc  # a placeholder, unused
        acc = _mma_step(acc, step_words, xs, sc, zr, GROUPS, IS_FP16, HAS_ZEROS, SCALE_WORDS,
                        BLOCK_N, BLOCK_T, a_layout, b_layout, mma_layout, pairs_layout,
                        sz_layout)
        ahead = _k_step(gl.minimum(step + 2, last), rot, last, ROTATE_K)
        # with PREDICATED_RELOADS a reload past the last step is off (the buffer is not used
        # again); else the last step is loaded again, 1 of 4 word loads at K = 768
        more = step + 2 <= last if PREDICATED_RELOADS else None
        if RING_STAGES == 0:
            words = gl.load(w_ptrs + ahead * (16 * GROUPS), mask=more)
        sc = _step_scales(s_ptrs, s_grp, ahead, STEP_K, GROUP_SIZE, stride_sg, SCALE_WORDS,
                          mask=more)
        if X_AHEAD:
            x = gl.load(x_ptrs + ahead * (STEP_K // 2),
                        mask=x_mask & more if PREDICATED_RELOADS else x_mask, other=0)
        return acc, words, sc, x

    @gluon.jit
    def _prefill_mma_tile(
        pid, pid_m, n0, num_post_padded, expert,
        a_ptr, qw_ptr, s_ptr, z_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr,
        K, num_valid_slots, top_k, up_offset,
        stride_am, stride_qe, stride_qn, stride_se, stride_sn, stride_sg,
        stride_ze, stride_zn, stride_zg, stride_cm,
        GROUP_SIZE: gl.constexpr, HAS_ZEROS: gl.constexpr, ACTIVATION: gl.constexpr,
        MUL_ROUTED_WEIGHT: gl.constexpr, A_IS_SLOTS: gl.constexpr, A_SORTED: gl.constexpr,
        C_SORTED: gl.constexpr, IS_FP16: gl.constexpr,
        BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_N_OUT: gl.constexpr,
        GROUPS: gl.constexpr, SCALE_WORDS: gl.constexpr, WORDS_LAYOUT: gl.constexpr,
        X_LAYOUT: gl.constexpr, SZ_LAYOUT: gl.constexpr, PAIRS_LAYOUT: gl.constexpr,
        OUT_LAYOUT: gl.constexpr, SZW_LAYOUT: gl.constexpr, a_layout: gl.constexpr,
        b_layout: gl.constexpr, mma_layout: gl.constexpr,
        PDL: gl.constexpr, EARLY: gl.constexpr, PREDICATED_RELOADS: gl.constexpr,
        RING_STAGES: gl.constexpr, RING_LAYOUT: gl.constexpr, X_AHEAD: gl.constexpr,
        ROTATE_K: gl.constexpr, ready_ptr, ready_tiles, READY: gl.constexpr,
        COPY_LAYOUT: gl.constexpr,
    ):
        """One tile of :func:`_prefill_mma_kernel`: block ``pid_m`` (of expert ``expert``, -1
        for none: its rows get zeros), output columns ``n0`` onwards; ``pid`` picks the first
        K step (``ROTATE_K``), ``EARLY`` says the program has not yet waited for the kernel
        before. Nothing past the padded count."""
        row0 = pid_m * BLOCK_T
        if row0 < num_post_padded:
            out_layout: gl.constexpr = OUT_LAYOUT
            t_o = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, out_layout))
            slots_o = gl.load(sorted_ids_ptr + row0 + t_o)
            if C_SORTED:
                c_rows = row0 + t_o.to(gl.int64)
            else:
                c_rows = slots_o.to(gl.int64)
            cols = n0 + gl.arange(0, BLOCK_N_OUT, layout=gl.SliceLayout(0, out_layout))
            c_ptrs = c_ptr + c_rows[:, None] * stride_cm + cols[None, :]
            c_mask = (slots_o < num_valid_slots)[:, None]
            if expert == -1:
                if READY == 2:
                    _wait_block_ready(ready_ptr + pid_m, ready_tiles)
                    if PDL:
                        _release_next()
                elif EARLY:
                    _wait_upstream_release_next()
                gl.store(c_ptrs, gl.zeros([BLOCK_T, BLOCK_N_OUT], c_ptr.dtype.element_ty,
                                          out_layout), mask=c_mask)
                if READY == 1:
                    _block_done(ready_ptr + pid_m)
            else:
                e64 = expert.to(gl.int64)
                # the words: rows of this program in the word-load layout, a step's
                # GROUPS groups (16 words each) side by side
                w_rows = _rs_tile_rows(n0, up_offset, BLOCK_N, ACTIVATION,
                                       gl.SliceLayout(1, WORDS_LAYOUT))
                w_cols = gl.arange(0, 16 * GROUPS, layout=gl.SliceLayout(0, WORDS_LAYOUT))
                w_ptrs = qw_ptr + e64 * stride_qe + (w_rows[:, None] * stride_qn
                                                     + w_cols[None, :])
                # scales and zero points: [BLOCK_N, GROUPS] a step
                s_rows = _rs_tile_rows(n0, up_offset, BLOCK_N, ACTIVATION,
                                       gl.SliceLayout(1, SZ_LAYOUT))
                s_grp = gl.arange(0, GROUPS, layout=gl.SliceLayout(0, SZ_LAYOUT)) * 128
                if SCALE_WORDS:
                    # [BLOCK_N, GROUPS / 2] words: each holds two groups' scales
                    sw_rows = _rs_tile_rows(n0, up_offset, BLOCK_N, ACTIVATION,
                                            gl.SliceLayout(1, SZW_LAYOUT))
                    sw_cols = gl.arange(0, GROUPS // 2, layout=gl.SliceLayout(0, SZW_LAYOUT))
                    s_ptrs = (s_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
                              + (e64 * stride_se + sw_rows[:, None] * stride_sn) // 2
                              + sw_cols[None, :])
                else:
                    s_ptrs = s_ptr + e64 * stride_se + s_rows[:, None] * stride_sn
                z_ptrs = z_ptr + e64 * stride_ze + s_rows[:, None] * stride_zn
                # the activations: [64 GROUPS, BLOCK_T] words of the block's tokens, k fastest
                t_x = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, X_LAYOUT))
                slots_x = gl.load(sorted_ids_ptr + row0 + t_x)
                valid_x = slots_x < num_valid_slots
                if A_SORTED:
                    a_rows = (row0 + t_x).to(gl.int64)
                elif A_IS_SLOTS:
                    a_rows = gl.where(valid_x, slots_x, 0).to(gl.int64)
                else:
                    a_rows = gl.where(valid_x, slots_x // top_k, 0).to(gl.int64)
                # (32-bit words of two columns each, so that values carried from one step
                # to the next stay in the registers they were loaded into)
                a_words = a_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
                k_x = gl.arange(0, 64 * GROUPS, layout=gl.SliceLayout(1, X_LAYOUT))
                x_ptrs = a_words + (a_rows[None, :] * (stride_am // 2) + k_x[:, None])
                x_mask = valid_x[None, :] & (k_x[:, None] >= 0)

                acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, layout=mma_layout)
                STEP_K: gl.constexpr = 128 * GROUPS
                STEP_W: gl.constexpr = 16 * GROUPS
                num_steps = K // STEP_K
                # everything a step reads runs two steps ahead in registers: the loop is
                # unrolled by two and each of the two steps has its own buffers, reloaded in
                # place right after their use (a value carried from one buffer to another
                # would be a register copy that waits for its load: ncu put a sixth to a third
                # of the warps' stall samples on such copies, and 16-bit values carried over
                # the loop were repacked into 32-bit registers with the same wait: so the
                # activations and the scales travel as 32-bit words). The activations are
                # prefetched for 8-slot blocks only (X_AHEAD, set by the launcher: 16 registers
                # a group), else loaded at their step (L1 hits after the first warp): on the
                # H100 the prefetch made 8-slot blocks faster (Mixtral M=4-8, four groups a
                # step: 262 -> 217 us a layer) and 16-slot ones slower (qwen3 M=64: 162 ->
                # 181); on the H200 with the words' ring, loading them at their step instead
                # (104 registers a thread, four programs an SM instead of three) made
                # qwen3-30b's layer 13-23 % slower (benchmarks/notes_prefill.md, session 32)
                last = num_steps - 1
                # ROTATE_K: program pid starts at K step pid % num_steps and wraps around
                rot = pid % num_steps if ROTATE_K else 0
                k0 = _k_step(0, rot, last, ROTATE_K)
                kb = _k_step(gl.minimum(1, last), rot, last, ROTATE_K)
                if RING_STAGES > 0:
                    # the words through a ring of RING_STAGES shared-memory stages filled by
                    # cp.async, RING_STAGES - 1 steps ahead: each thread copies its own 16-byte
                    # pieces and reads back only those, and waits by counting its groups in
                    # flight (a register buffer's first use waits for every load in flight)
                    ring = gl.allocate_shared_memory(gl.int32, [RING_STAGES, BLOCK_N, STEP_W],
                                                     RING_LAYOUT)
                    if COPY_LAYOUT is None:
                        wc_ptrs = w_ptrs
                        w_mask = w_cols[None, :] < STEP_W
                    else:
                        # the copies in whole runs of a row (RING_COPIES_WHOLE_RUNS)
                        wc_rows = _rs_tile_rows(n0, up_offset, BLOCK_N, ACTIVATION,
                                                gl.SliceLayout(1, COPY_LAYOUT))
                        wc_cols = gl.arange(0, 16 * GROUPS,
                                            layout=gl.SliceLayout(0, COPY_LAYOUT))
                        wc_ptrs = qw_ptr + e64 * stride_qe + (wc_rows[:, None] * stride_qn
                                                              + wc_cols[None, :])
                        w_mask = wc_cols[None, :] < STEP_W
                    for st in gl.static_range(RING_STAGES - 1):
                        st_k = _k_step(st, rot, last, ROTATE_K)
                        async_copy.async_copy_global_to_shared(
                            ring.index(st), wc_ptrs + st_k * STEP_W, mask=w_mask & (st <= last))
                        async_copy.commit_group()
                    words_a = w_cols  # placeholders: the words come from the ring
                    words_b = w_cols
                else:
                    ring = None
                    w_mask = None
                    wc_ptrs = w_ptrs
                    words_a = gl.load(w_ptrs + k0 * STEP_W)
                    words_b = gl.load(w_ptrs + kb * STEP_W)
                sc_a = _step_scales(s_ptrs, s_grp, k0, STEP_K, GROUP_SIZE, stride_sg,
                                    SCALE_WORDS)
                sc_b = _step_scales(s_ptrs, s_grp, kb, STEP_K, GROUP_SIZE, stride_sg,
                                    SCALE_WORDS)
                # zero points are loaded at their step: a row's zero points of every group
                # share a 32-byte sector, so after its first step they are L1 hits, and
                # registers are short (two steps of words and activations ahead)
                if READY == 2:
                    _wait_block_ready(ready_ptr + pid_m, ready_tiles)
                    if PDL:
                        _release_next()
                elif EARLY:
                    _wait_upstream_release_next()
                if X_AHEAD:
                    x_a = gl.load(x_ptrs + k0 * (STEP_K // 2), mask=x_mask, other=0)
                    x_b = gl.load(x_ptrs + kb * (STEP_K // 2), mask=x_mask, other=0)
                else:  # loaded at their step: placeholders
                    x_a = gl.zeros([64 * GROUPS, BLOCK_T], gl.int32, layout=X_LAYOUT)
                    x_b = x_a
                for i in range(0, num_steps, 2):
                    acc, words_a, sc_a, x_a = _step_then_reload(
                        acc, words_a, x_a, sc_a, i, last, w_ptrs, x_ptrs,
                        x_mask, s_ptrs, z_ptrs, s_grp, stride_sg, stride_zg, GROUP_SIZE,
                        GROUPS, IS_FP16, HAS_ZEROS, SCALE_WORDS, X_AHEAD, BLOCK_N, BLOCK_T,
                        a_layout, b_layout, mma_layout, PAIRS_LAYOUT, SZ_LAYOUT,
                        PREDICATED_RELOADS, ring, RING_STAGES, w_mask, rot, ROTATE_K,
                        wc_ptrs)
                    if i + 1 < num_steps:
                        acc, words_b, sc_b, x_b = _step_then_reload(
                            acc, words_b, x_b, sc_b, i + 1, last, w_ptrs,
                            x_ptrs, x_mask, s_ptrs, z_ptrs, s_grp, stride_sg, stride_zg,
                            GROUP_SIZE, GROUPS, IS_FP16, HAS_ZEROS, SCALE_WORDS, X_AHEAD,
                            BLOCK_N, BLOCK_T, a_layout, b_layout, mma_layout, PAIRS_LAYOUT,
                            SZ_LAYOUT, PREDICATED_RELOADS, ring, RING_STAGES, w_mask, rot,
                            ROTATE_K, wc_ptrs)
                if RING_STAGES > 0:
                    # the copies past the last step (masked: they write zeros) land before the
                    # epilogue's scratch may reuse the ring's shared memory
                    async_copy.wait_group(0)

                res = _tile_result(acc, topk_weights_ptr, sorted_ids_ptr, row0,
                                   num_valid_slots, MUL_ROUTED_WEIGHT, ACTIVATION, BLOCK_T,
                                   BLOCK_N, BLOCK_N_OUT, mma_layout)
                res = gl.convert_layout(gl.permute(res.to(c_ptr.dtype.element_ty), (1, 0)),
                                        out_layout)
                gl.store(c_ptrs, res, mask=c_mask)
                if READY == 1:
                    _block_done(ready_ptr + pid_m)

    @gluon.jit
    def _prefill_mma_kernel(
        a_ptr, qw_ptr, s_ptr, z_ptr, c_ptr, topk_weights_ptr,
        sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
        N, K, num_valid_slots, top_k, up_offset,
        stride_am, stride_qe, stride_qn, stride_se, stride_sn, stride_sg,
        stride_ze, stride_zn, stride_zg, stride_cm,
        GROUP_SIZE: gl.constexpr, HAS_ZEROS: gl.constexpr, ACTIVATION: gl.constexpr,
        MUL_ROUTED_WEIGHT: gl.constexpr, A_IS_SLOTS: gl.constexpr, A_SORTED: gl.constexpr,
        C_SORTED: gl.constexpr, IS_FP16: gl.constexpr,
        BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, GROUPS: gl.constexpr,
        SCALE_WORDS: gl.constexpr, WORDS_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
        SZ_LAYOUT: gl.constexpr, SZW_LAYOUT: gl.constexpr, PAIRS_LAYOUT: gl.constexpr,
        OUT_LAYOUT: gl.constexpr, num_warps: gl.constexpr,
        PDL: gl.constexpr = False, WEIGHTS_BEFORE_WAIT: gl.constexpr = False,
        PREDICATED_RELOADS: gl.constexpr = False, RING_STAGES: gl.constexpr = 0,
        RING_LAYOUT: gl.constexpr = None, X_AHEAD: gl.constexpr = False,
        timeline_ptr=None, TIMELINE: gl.constexpr = False, ROTATE_K: gl.constexpr = False,
        ready_ptr=None, ready_tiles=0, READY: gl.constexpr = 0,
        PERSISTENT: gl.constexpr = False, COPY_LAYOUT: gl.constexpr = None,
        SPLIT: gl.constexpr = 1, K_RANGE: gl.constexpr = 0, stride_cs=0,
        SPLIT_RUNTIME_STEPS: gl.constexpr = False,
    ):
        """Program ``pid``: block ``pid // (N_out / BLOCK_N_OUT)`` of the aligned slots,
        output columns ``BLOCK_N_OUT * (pid % ...)`` onwards, whole K in steps of ``GROUPS``
        groups. ``WORDS_LAYOUT``, ``X_LAYOUT``, ``SZ_LAYOUT``, ``SZW_LAYOUT``,
        ``PAIRS_LAYOUT``: :func:`mma_layouts` (a lane's words and activations of a group as its
        contiguous registers, so they load as 16-byte vectors); ``OUT_LAYOUT``:
        :func:`store_layout`. ``SCALE_WORDS``: a step's scales are read as 32-bit words of two
        (``G`` = 128, two or four groups a step, scales contiguous along K).
        ``WEIGHTS_BEFORE_WAIT`` (with ``PDL``): the kernel before writes only ``a``, so the
        first two steps' weights and scales are loaded before waiting for it. ``X_AHEAD``:
        the activations run two steps ahead in registers (8-slot blocks), else each step
        loads its own. ``READY`` (``GEMM2_WAITS_PER_BLOCK``): 1, GEMM1 of a chain: each
        program adds 1 to ``ready_ptr[block]`` once its tile is stored; 2, GEMM2: a program
        waits until its block's count is ``ready_tiles`` (GEMM1's tiles a block) instead of
        waiting for all of GEMM1 (the top-k sum after it sets the counts back to 0).
        ``PERSISTENT`` (:data:`GEMM1_PERSISTENT`): the grid holds no more programs than the GPU
        runs at once, and program ``pid`` takes tiles ``pid``, ``pid + programs``, ... of the
        padded count's blocks. ``SPLIT`` (``SPLIT_K``; not persistent): program ``pid`` runs K
        range ``pid % SPLIT`` (``K_RANGE = K / SPLIT`` columns, a compile-time constant so
        that the ranges' pointers keep their 16-byte alignment for the compiler) of tile
        ``pid // SPLIT`` into that range's partial sums, ``c_ptr + range * stride_cs``;
        ``SPLIT_RUNTIME_STEPS``: the range's K steps counted from the run-time ``K``."""
        BLOCK_N_OUT: gl.constexpr = BLOCK_N // 2 if ACTIVATION != 0 else BLOCK_N
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout,
                                                     k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma_layout,
                                                     k_width=2)

        if TIMELINE:
            t_start = _globaltimer()
            c_start = _clock64()
        num_pid_n = N // BLOCK_N_OUT
        pid = gl.program_id(0)
        # the kernel before writes what this one reads: wait for it first, or with
        # WEIGHTS_BEFORE_WAIT (it writes only the activations) once the weights are on the way;
        # with READY == 2 (GEMM2 waiting per block) only for the block's GEMM1 tiles
        EARLY: gl.constexpr = (PDL and WEIGHTS_BEFORE_WAIT) or READY == 2
        if PERSISTENT:  # (GEMM1 of a chain: never EARLY, the launcher sees to it)
            # no program of this grid is dispatched only to find its block past the padded
            # count: once all have started (at once: the grid fits the GPU) the next kernel is
            # launched, and its programs take each SM that these leave.
            # A tile's first ring copies may overwrite the shared memory the tile before read
            # last (its epilogue's layout change), and the ring's barriers are stripped
            # (membar.strip_ring_barriers): what orders them is _block_done's CTA barrier at
            # the end of every tile (READY == 1), after the store that uses those reads
            gl.static_assert(READY == 1, "a persistent grid is GEMM1 raising its blocks' counts")
            if PDL:
                _wait_upstream()
            num_post_padded = gl.load(num_post_padded_ptr)
            # the first tile's expert with the count (tile pid is one of the grid's blocks)
            expert_first = gl.load(expert_ids_ptr + pid // num_pid_n)
            if PDL:
                _release_next_after(num_post_padded, expert_first)
            tiles = (num_post_padded // BLOCK_T) * num_pid_n
            for tile in range(pid, tiles, gl.num_programs(0)):
                pid_m = tile // num_pid_n
                later = tile != pid
                expert = gl.where(later, gl.load(expert_ids_ptr + pid_m, mask=later, other=0),
                                  expert_first)
                _prefill_mma_tile(
                    tile, pid_m, (tile % num_pid_n) * BLOCK_N_OUT, num_post_padded, expert,
                    a_ptr, qw_ptr, s_ptr, z_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr,
                    K, num_valid_slots, top_k, up_offset,
                    stride_am, stride_qe, stride_qn, stride_se, stride_sn, stride_sg,
                    stride_ze, stride_zn, stride_zg, stride_cm,
                    GROUP_SIZE, HAS_ZEROS, ACTIVATION, MUL_ROUTED_WEIGHT, A_IS_SLOTS,
                    A_SORTED, C_SORTED, IS_FP16, BLOCK_T, BLOCK_N, BLOCK_N_OUT, GROUPS,
                    SCALE_WORDS, WORDS_LAYOUT, X_LAYOUT, SZ_LAYOUT, PAIRS_LAYOUT, OUT_LAYOUT,
                    SZW_LAYOUT, a_layout, b_layout, mma_layout, PDL, EARLY,
                    PREDICATED_RELOADS, RING_STAGES, RING_LAYOUT, X_AHEAD, ROTATE_K,
                    ready_ptr, ready_tiles, READY, COPY_LAYOUT)
        else:
            tile_pid = pid
            if SPLIT > 1:
                # the same tile over one K range: that range's words, scales, zero points and
                # activations, into that range's partial sums (the GEMM over K / SPLIT)
                gl.static_assert(READY == 0, "a split GEMM neither raises nor waits for counts")
                # consecutive programs run the K ranges of one tile (on the H200, Mixtral's GEMM2
                # at M=1-2, 1.4-4.5 us faster than one range of consecutive tiles:
                # benchmarks/notes_prefill.md, session 42)
                k_range = pid % SPLIT
                tile_pid = pid // SPLIT
                if SPLIT_RUNTIME_STEPS:  # (SPLIT_RUNTIME_STEPS in the module: why)
                    K = K // SPLIT
                else:
                    K = K_RANGE
                a_ptr += k_range * K_RANGE
                qw_ptr += k_range * (K_RANGE // 8)
                s_ptr += k_range * (K_RANGE // GROUP_SIZE) * stride_sg
                z_ptr += k_range * (K_RANGE // GROUP_SIZE) * stride_zg
                c_ptr += k_range * stride_cs
            pid_m = tile_pid // num_pid_n
            if PDL and READY == 1:
                _wait_upstream()
            elif PDL and not EARLY:
                _wait_upstream_release_next()
            num_post_padded = gl.load(num_post_padded_ptr)
            # every block of the grid has an expert id (-1 past the padded count or off this
            # rank): loaded with the count rather than after it, one round trip less before
            # the program's first weight loads
            expert = gl.load(expert_ids_ptr + pid_m)
            if PDL and READY == 1:
                # GEMM2 launches once every program here has read these: GEMM2 does not wait
                # for this kernel to complete, and a program past the blocks reads nothing else
                _release_next_after(num_post_padded, expert)
            _prefill_mma_tile(
                tile_pid, pid_m, (tile_pid % num_pid_n) * BLOCK_N_OUT, num_post_padded, expert,
                a_ptr, qw_ptr, s_ptr, z_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr,
                K, num_valid_slots, top_k, up_offset,
                stride_am, stride_qe, stride_qn, stride_se, stride_sn, stride_sg,
                stride_ze, stride_zn, stride_zg, stride_cm,
                GROUP_SIZE, HAS_ZEROS, ACTIVATION, MUL_ROUTED_WEIGHT, A_IS_SLOTS, A_SORTED,
                C_SORTED, IS_FP16, BLOCK_T, BLOCK_N, BLOCK_N_OUT, GROUPS, SCALE_WORDS,
                WORDS_LAYOUT, X_LAYOUT, SZ_LAYOUT, PAIRS_LAYOUT, OUT_LAYOUT, SZW_LAYOUT,
                a_layout, b_layout, mma_layout, PDL, EARLY, PREDICATED_RELOADS, RING_STAGES,
                RING_LAYOUT, X_AHEAD, ROTATE_K, ready_ptr, ready_tiles, READY, COPY_LAYOUT)
        if TIMELINE:
            # when and where this program ran: [SM, start ns, end ns, SM clock cycles]
            c_end = _clock64()
            t_end = _globaltimer()
            sm = _smid()
            gl.store(timeline_ptr + pid * 4, sm.to(gl.int64))
            gl.store(timeline_ptr + pid * 4 + 1, t_start)
            gl.store(timeline_ptr + pid * 4 + 2, t_end)
            gl.store(timeline_ptr + pid * 4 + 3, c_end - c_start)


#: GEMM2 (``a_is_slots``) launched as a programmatic dependent of GEMM1 issues its first
#: weight and scale loads before it waits for GEMM1 (benchmarks turn it off to A/B it)
GEMM2_WEIGHTS_BEFORE_WAIT = True
#: a split program (``SPLIT_K``) counts its range's K steps at run time (``K // SPLIT``) while
#: its pointers move by the compile-time ``K_RANGE``: with the count a constant too the
#: compiler gave Mixtral's GEMM2 tiles 168 registers instead of 128 (8x16x256, S=4: twelve
#: one-warp programs an SM instead of sixteen, 1.3 waves of 2048 programs instead of one) and
#: GEMM2 + top-k sum at M=1 on the H200 took 27.4 us instead of 23.0 (8x32x256: 26.7 and
#: 22.1; a 128-register cap on the constant count, 24.3 and 22.2; session 43,
#: benchmarks/notes_prefill.md). The switch is for A/Bs
SPLIT_RUNTIME_STEPS = True
#: programs of at most PREDICATED_RELOADS_MAX_STEPS K steps predicate off their last two
#: reloads (two steps ahead, past the end) instead of loading the last step again: on the
#: H100 with every program so (session 28), qwen3-30b M=64 went 132.6 -> 130.5 us a layer
#: (8 and 3 steps), M=8-32 within 0.7 us, and Mixtral (16 and 56 steps) 0.6-1.2 % slower;
#: gated so, qwen3-30b M=64 132.7 / 133.1 -> 130.9 us, M=8-32 within 0.6 us. The switch is
#: for A/Bs
PREDICATED_RELOADS = True
PREDICATED_RELOADS_MAX_STEPS = 8
#: programs of at most WORD_RING_MAX_STEPS K steps read their words through a ``cp.async``
#: ring of WORD_RING_STAGES shared-memory stages (one step ahead with 2), the others two steps
#: ahead in registers (0 stages: registers everywhere). In registers, a buffer's first use
#: waits for every load in flight (one scoreboard for all of them), so a warp's loads and its
#: arithmetic take turns; the ring waits by counting its groups of copies and frees the words'
#: registers (168 a thread instead of 255: three 4-warp programs an SM). On the H200, layer A/B
#: in one run (session 30), 2 / 3 / 4 stages everywhere against registers: qwen3-30b M=8, 16,
#: 32, 64 (programs of 8 and 3 steps) -10.6 / -7.2 / -8.1 / -9.5 % with 2 stages, less with
#: more; Mixtral (16 and 56 steps) M=8 and 16 +4 % with 2 stages, +11 % with 4. The ring
#: where at most 8 steps: qwen3-30b M=4-64 -7 to -17 %, olmoe and deepseek-v2-lite M=8-32 -3
#: to -10 % (M=4 -0.8 and +2.3 %), qwen3-235b M=4-64 -1 to -4 % (its GEMM2), Mixtral even.
#: Up to 16 steps (the GEMM1 of Mixtral and qwen3-235b too): Mixtral M=4, 8, 16 -2.3, -3.9,
#: -2.9 % against registers, M=2 +3.4 % (one-warp tiles); qwen3-235b M=8, 16, 32 -3.7, -7.0,
#: -7.5 %
WORD_RING_STAGES = 2
WORD_RING_MAX_STEPS = 16
#: ... and of K steps of at least WORD_RING_MIN_BLOCK_K columns: one step ahead is then 128
#: bytes a row. deepseek-v2-lite's GEMM2 (11 steps of one group, 64 bytes a row) was 0.5-5.5 %
#: slower on the ring at M=4-16 (-1.8 % at 32); Mixtral's and qwen3-235b's GEMM1 (16 steps
#: of two groups) 1.0-4.7 % faster than in registers at M=4-32 (H200, session 30)
WORD_RING_MIN_BLOCK_K = 256
#: in a prefill chain with both GEMMs on this kernel, GEMM2's programs wait for their own
#: block's GEMM1 tiles (a count a block that GEMM1's programs raise as they store their tiles)
#: instead of for all of GEMM1: GEMM2 is launched as GEMM1's programmatic dependent, once
#: every GEMM1 program has started, so its programs take the SMs GEMM1's last programs leave
#: idle. With the wait for all of GEMM1 they only loaded their first two steps' weights
#: there: in the layer's CUDA graph (H200, qwen3-30b M=16) GEMM1's last 10 us ran 178 down
#: to 3 programs while up to 395 GEMM2 programs waited (``prefill_timeline_probe.py
#: --graph``). Layer A/B on the H200 (session 33, against the wait for all of GEMM1 in the
#: same run; three runs for qwen3-30b): qwen3-30b M=2 -5.2 to -5.7 %, M=8 -6.5 to -6.8, M=16
#: -2.8 to -3.2, M=32 -0.9 to -1.8, M=4 (one wave: nothing to fill) +0.9 to +1.2; olmoe
#: M=8-32 -3.5 to -8.9; qwen3-235b M=4-32 -0.2 to -6.7; deepseek-v2-lite M=4-32 -0.6 to
#: -2.2. The switch is for A/Bs (``fused_moe_prefill`` reads it)
GEMM2_WAITS_PER_BLOCK = True
#: ... for layers of at most this many tokens: the gain shrinks as GEMM1's waves grow and
#: each of its programs pays the handshake. Alone (session 33) it lost past 48 tokens
#: (qwen3-30b M=56 / 64 +0.5 / +0.3 to +0.7 %, qwen3-235b M=64 +4.0 %); with the persistent
#: GEMM1 it gains to 64 (H200 layer, 64 against 48 tokens, three runs: qwen3-30b M=56 -1.9 to
#: -2.3 %, M=64 -1.2 to -1.9 %; qwen3-235b M=56 -0.2 / -2.3 %, M=64 -0.7 to +0.7 %, power
#: cap). Past 64, in the PDL chain that now reaches 120 tokens (session 35), against the chain
#: alone: qwen3-30b M=72 / 80 / 96 -1.4 / -0.7 / -0.9 %, M=112 / 120 +0.2 / +0.2 %;
#: qwen3-235b M=72 -1.7 %, M=96 +0.8 % (+3.4 % against neither; all under the power cap);
#: repeated in session 36, qwen3-30b M=72 / 96 / 120 +0.1 / +0.2 / -0.1 %: nothing to take
GEMM2_WAITS_MAX_TOKENS = 64
#: ... and where GEMM1 has at most this many tiles a block (each raises the block's count
#: once, after a CTA barrier and a GPU-scope fence): Mixtral's one-warp tiles at M=2-4 (1792
#: a block) were 2-3 % slower with it, its 4-warp ones at M=8-16 (224) -2.3 to +0.4 %
GEMM2_WAITS_MAX_TILES = 256
#: ... and GEMM1 of such a chain runs a persistent grid (``PERSISTENT``): no more programs than
#: the GPU holds at once (:func:`programs_an_sm`), each taking every so many tiles of the padded
#: count's blocks. A grid of a program a tile is sized for the most blocks the routing could
#: need, and its programs past the padded count (a third of qwen3-30b's GEMM1 grid at M=16) are
#: dispatched only as its last programs with work free their SMs: GEMM2, launched once every
#: GEMM1 program has started, found the first ~4 us of GEMM1's drain still closed to it (session
#: 33). The switch is for A/Bs
GEMM1_PERSISTENT = True
#: ... for layers of at least this many tokens over at least this many experts (where the
#: grid's blocks past the padded count are many: up to one an expert more than the slots fill).
#: Layer A/B on the H200 (session 34), persistent against a program a tile: qwen3-30b (128
#: experts) M=4 -3.2 to -4.6 % (four runs), M=8 -1.6 to -2.1, M=16 -2.1 to -2.2, M=24 -3.1 and
#: -3.6, M=32 -1.9 to -2.4, M=48 -1.2 and -1.7, but M=2 +0.8 to +1.7 and M=3 +1.3 (one wave
#: either way, and the grid's empty programs then find free SMs at once); deepseek-v2-lite (64)
#: M=4-32 -1.4 to -5.1; olmoe (64) M=4 -3.2, M=8 0.0 and +0.7, M=16-32 -1.6 to -3.4;
#: qwen3-235b (128) M=4 -1.7, M=8 -2.4 to -3.1, M=16 +0.4 to -2.4, M=32 even; Mixtral (8
#: experts, 224 tiles a block) M=8 +1.8 and +2.0, M=16 +6.2 and +3.2 (power cap), not
#: understood
GEMM1_PERSISTENT_MIN_TOKENS = 4
GEMM1_PERSISTENT_MIN_EXPERTS = 64
#: 8-slot programs carry their activations two steps ahead in registers (``X_AHEAD``); off,
#: they load them at their step like 16- and 32-slot ones (104 registers a thread instead of
#: 168 on the shipped 4-warp tiles, but qwen3-30b's layer 13-23 % slower on the H200, session
#: 32). The switch is for A/Bs
ACTIVATIONS_AHEAD = True
#: a list to record program timelines into (``benchmarks/prefill_timeline_probe.py``), or
#: None: while it is a list, every launch appends ``(launch facts, timeline)``, the timeline
#: an int64 ``[programs, 4]`` tensor of (SM id, start and end ``%globaltimer`` in ns, SM clock
#: cycles from start to end) filled by the kernel. It allocates a tensor a launch: under CUDA
#: graph capture from the graph's pool, left unfilled (fill it before each replay); the
#: kernel compiled without it has none of this code
TIMELINE = None
#: 8-slot program ``pid`` walks its K steps from step ``pid % steps`` round to the one before (the
#: same sum in another order, float32 rounding aside), so that the programs of a wave do not all
#: read the same column runs of their rows at once: the first wave of a launch, all of whose
#: programs start together, read at 3.3-3.5 TB/s where later, staggered ones read at 3.7-4.0 (H200,
#: ``benchmarks/prefill_timeline_probe.py``). Layer A/B on the H200 (session 32, two runs for
#: qwen3-30b), rotated against not: qwen3-30b M=8 / 16 / 32 -1.0 to -1.2 / -2.1 to -2.3 / -2.0 to
#: -2.7 %, M=4 +0.2 / -0.4 %, M=2 +1.6 % in both, M=64 +0.1 / +0.6 %; olmoe M=8-32 -1.2 to -4.9 %;
#: deepseek-v2-lite M=4-32 -0.9 to -3.9 %; qwen3-235b M=4-32 -0.5 to -1.3 %; Mixtral M=2 / 4 / 8 /
#: 16 -4.4 / -0.7 / -1.2 / -2.6 % (8-slot blocks in every cell; on a 32-slot two-warp tile with
#: zero points triton 3.7 spilled 8 bytes with it, so 16- and 32-slot programs keep the plain
#: order). The switch is for A/Bs
ROTATE_K_STEPS = True
#: the words' ring copies whole 128-byte runs of a row (8 lanes a row, each warp its own rows)
#: instead of each lane copying the 16-byte pieces it reads back (a copy instruction then asks
#: the L2 for 64 bytes of each of 8 rows): the lanes of a warp read back each other's copies,
#: so the ring's barriers become warp barriers (``bar.warp.sync``). K steps of two groups or
#: more (one group is a 64-byte run either way). ncu on qwen3-30b's GEMM1 at M=64 (H200,
#: session 37): L2 tag requests 50.9 -> 31.2 % of peak, DRAM 59.3 -> 61.4 %, 72.3 -> 69.8 us;
#: the L2 partitions' fabric stays the busiest unit (75.9 -> 73.0 %). Layer A/B on the H200:
#: qwen3-30b M=8 / 16 / 32 / 64 / 96 -1.8 / -1.6 / -1.9 / -2.3 / -2.5 % (a second run: -1.9 /
#: -1.6 / -2.9 / -2.6 / -2.0 %), olmoe M=16 / 64 -0.8 / -1.2 %, deepseek-v2-lite M=16 / 32 / 64
#: -0.6 / -1.2 / +0.2 %, Mixtral M=4 / 8 / 16 -1.3 / -2.3 / -2.6 %. The switch is for A/Bs
RING_COPIES_WHOLE_RUNS = True


#: programs of a persistent grid, by the launch's kind (:func:`launch_prefill_mma`)
_RESIDENT_PROGRAMS: dict[tuple, int] = {}


def programs_an_sm(*, registers: int, num_warps: int, shared_bytes: int,
                   registers_an_sm: int = 65536, threads_an_sm: int = 2048,
                   shared_an_sm: int = 233472, programs_max: int = 32) -> int:
    """How many programs of a kernel an SM runs at once (the CUDA occupancy rules of sm_80 and
    sm_90): registers are given to a warp in units of 256 (8 a thread), each program takes 1 KiB
    of shared memory besides its own. At least 1."""
    warp_registers = -(-registers * 32 // 256) * 256
    by_registers = (registers_an_sm // max(warp_registers, 1)) // num_warps
    by_threads = threads_an_sm // (32 * num_warps)
    by_shared = shared_an_sm // (shared_bytes + 1024)
    return max(1, min(by_registers, by_threads, by_shared, programs_max))


def resident_programs(compiled, device: torch.device) -> int:
    """Programs of ``compiled`` (a launched Triton kernel) the whole GPU runs at once."""
    props = torch.cuda.get_device_properties(device)
    an_sm = programs_an_sm(
        registers=compiled.n_regs, num_warps=compiled.metadata.num_warps,
        shared_bytes=compiled.metadata.shared,
        registers_an_sm=getattr(props, "regs_per_multiprocessor", 65536),
        threads_an_sm=props.max_threads_per_multi_processor,
        shared_an_sm=getattr(props, "shared_memory_per_multiprocessor", 233472))
    return an_sm * props.multi_processor_count


def _log2(v: int) -> int:
    return v.bit_length() - 1


def _row_bases(block_n: int, num_warps: int) -> tuple[list, list]:
    """(slab bases, warp bases) of a ``[block_n, ...]`` layout whose warp ``w`` holds rows
    ``16 (w + num_warps s) .. + 15``: the rows each warp computes (:func:`mma_layouts`)."""
    slabs = block_n // (16 * num_warps)
    return ([[16 * num_warps << b, 0] for b in range(_log2(slabs))],
            [[16 << b, 0] for b in range(_log2(num_warps))])


@functools.cache
def ring_copy_layout(block_n: int, num_warps: int, groups: int):
    """The layout the words' ring copies a step ``[block_n, 16 groups]`` in with
    :data:`RING_COPIES_WHOLE_RUNS` (two groups or more): 8 lanes a row, 16 bytes each (a
    128-byte run), 4 rows a copy instruction; warp ``w`` copies the rows it computes (those
    of :func:`mma_layouts`' words: ``16 (w + num_warps s) .. + 15``)."""
    slab_bases, warp = _row_bases(block_n, num_warps)
    reg = ([[0, 1], [0, 2]] + [[0, 32 << b] for b in range(_log2(groups // 2))]
           + [[4, 0], [8, 0]] + slab_bases)
    lane = [[0, 4], [0, 8], [0, 16], [1, 0], [2, 0]]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, 16 * groups])


@functools.cache
def ring_layout():
    """The shared-memory layout of the words' ring: plain rows (a thread reads back only the
    16-byte pieces it copied)."""
    return gl.SwizzledSharedLayout(1, 1, 1, [1, 0])


@functools.cache
def mma_layouts(block_n: int, block_t: int, num_warps: int, groups: int = 1):
    """(words, activations, scales, scale words, pairs) layouts of
    :func:`_prefill_mma_kernel` for a K step of ``groups`` groups of 128 columns.

    * words ``[block_n, 16 groups]`` (the step's words of the program's rows): lane ``4g + c``
      of warp ``w`` holds words ``16t + 4c .. 16t + 4c + 3`` of each group ``t`` of rows ``16
      (w + num_warps s) + g`` and ``... + 8`` (``s`` the warp's slabs), each row's four words
      of a group contiguous registers (a 16-byte load);
    * activations as 32-bit words of two columns, ``[64 groups, block_t]`` (k first): lane
      ``4g + c`` holds words ``64t + 16c .. 64t + 16c + 15`` (columns ``128t + 32c .. 128t +
      32c + 31``) of tokens ``g, g + 8, ...``, k its first registers (16-byte loads); every
      warp holds them all;
    * scales (and zero points) ``[block_n, groups]``: a thread holds the groups of its rows
      (as the accumulator's rows: lanes ``c`` of a quad share them); scale words ``[block_n,
      groups / 2]`` the same with two groups a word;
    * pairs ``[block_n, 4 (c), 4 (w), 4 (p)]``: the value pairs of one group as
      :func:`_code_pair` makes them (the layout their assembly into the A operand needs,
      checked by the kernel's ``assert_trivial`` conversions).
    """
    slabs = block_n // (16 * num_warps)
    slab_bases, warp = _row_bases(block_n, num_warps)
    reg = ([[0, 1], [0, 2]] + [[0, 16 << b] for b in range(_log2(groups))] + [[8, 0]]
           + slab_bases)
    lane = [[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]]
    words = gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, 16 * groups])
    xreg = ([[1 << b, 0] for b in range(4)] + [[64 << b, 0] for b in range(_log2(groups))]
            + [[0, 8 << b] for b in range(_log2(block_t // 8))])
    xlane = [[16, 0], [32, 0], [0, 1], [0, 2], [0, 4]]
    xwarp = [[0, 0] for _ in range(_log2(num_warps))]
    x = gl.DistributedLinearLayout(xreg, xlane, xwarp, [], [64 * groups, block_t])
    sreg = [[0, 1 << b] for b in range(_log2(groups))] + [[8, 0]] + slab_bases
    slane = [[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]]
    sz = gl.DistributedLinearLayout(sreg, slane, warp, [], [block_n, groups])
    # scale words [block_n, groups / 2] (two groups a word; with one group a step: unused)
    half = max(1, groups // 2)
    swreg = [[0, 1 << b] for b in range(_log2(half))] + [[8, 0]] + slab_bases
    szw = gl.DistributedLinearLayout(swreg, slane, warp, [], [block_n, half])
    # pairs: (row, c, w, p); registers: w (4), p (4), row + 8, slabs; lanes: c, g
    preg = ([[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 1], [0, 0, 0, 2], [8, 0, 0, 0]]
            + [[16 * num_warps << b, 0, 0, 0] for b in range(_log2(slabs))])
    plane = [[0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]]
    pwarp = [[16 << b, 0, 0, 0] for b in range(_log2(num_warps))]
    pairs = gl.DistributedLinearLayout(preg, plane, pwarp, [], [block_n, 4, 4, 4])
    return words, x, sz, szw, pairs


@functools.cache
def store_layout(block_t: int, block_n_out: int, num_warps: int):
    """Stores ``[block_t, block_n_out]``: 8 contiguous columns a thread, a row's columns
    across lanes first (no two threads store one element where the tile allows)."""
    lanes_n = max(1, min(32, block_n_out // 8))
    lanes_t = 32 // lanes_n
    warps_t = max(1, min(num_warps, block_t // lanes_t))
    return gl.BlockedLayout([1, 8], [lanes_t, lanes_n], [warps_t, num_warps // warps_t], [1, 0])


def mma_groups(config: dict) -> int:
    """Groups of 128 columns a K step of an ``MMA`` config reads (``BLOCK_SIZE_K / 128``):
    a weight row is read in runs of 64 bytes times this (HBM streams runs of 128 bytes and
    more near its full rate, 64-byte ones at about two thirds: ``row_chunk_bandwidth.py``)."""
    return config["BLOCK_SIZE_K"] // MMA_BLOCK_K


def word_ring_stages(k: int, config: dict) -> int:
    """Stages of the words' ``cp.async`` ring for a GEMM of reduction ``k`` on an ``MMA``
    config: the config's ``WORD_RING`` where it has one, else :data:`WORD_RING_STAGES` for
    programs of at most :data:`WORD_RING_MAX_STEPS` K steps of at least
    :data:`WORD_RING_MIN_BLOCK_K` columns, else 0 (the words two steps ahead in registers)."""
    if "WORD_RING" in config:
        return config["WORD_RING"]
    block_k = config["BLOCK_SIZE_K"]
    short = k // block_k <= WORD_RING_MAX_STEPS and block_k >= WORD_RING_MIN_BLOCK_K
    return WORD_RING_STAGES if short else 0


def mma_tiles_unsupported(config: dict, *, activation: bool) -> str | None:
    """Why an ``MMA`` config's tiles can't run on :func:`_prefill_mma_kernel`, or None."""
    bt, bn, warps = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["num_warps"]
    if bt not in (8, 16, 32):
        return f"BLOCK_SIZE_M is {bt}; the mma kernel takes 8, 16 or 32 slots a block"
    if config["BLOCK_SIZE_K"] not in (128, 256, 512):
        return (f"BLOCK_SIZE_K is {config['BLOCK_SIZE_K']}; the mma kernel takes 128, 256 or "
                "512 (1, 2 or 4 groups of 128 a K step)")
    rows = 2 * bn if activation else bn
    if warps not in (1, 2, 4, 8) or rows % (16 * warps) or (rows // (16 * warps)) & (
            rows // (16 * warps) - 1):
        return (f"BLOCK_SIZE_N {bn} ({rows} weight rows) with num_warps {warps}; expected "
                f"a power-of-two count of 16-row slabs per warp, 1-8 warps")
    return None


def mma_unsupported(*, device: torch.device, k: int, n_out: int, group_size: int,
                    config: dict, has_perm: bool, a_fragment_order: bool,
                    atomic_topk_sum: bool, activation: bool, a: torch.Tensor,
                    qweight: torch.Tensor) -> str | None:
    """Why an ``MMA`` config can't run this ``prefill_gemm`` call on
    :func:`_prefill_mma_kernel` (then the Triton kernel runs the same block size), or
    None."""
    why = (gluon_unsupported(device, min_major=8)
           or mma_tiles_unsupported(config, activation=activation))
    if why is not None:
        return why
    split = config.get("SPLIT_K", 1)
    if (k % (split * config["BLOCK_SIZE_K"]) or group_size % MMA_BLOCK_K
            or (k // split) % group_size):
        return (f"K = {k} must be a multiple of SPLIT_K = {split} times BLOCK_SIZE_K = "
                f"{config['BLOCK_SIZE_K']}, G = {group_size} a multiple of {MMA_BLOCK_K} and "
                "each K range whole groups")
    if n_out % config["BLOCK_SIZE_N"]:
        return f"{n_out} output columns are not a multiple of BLOCK_SIZE_N"
    if has_perm or a_fragment_order or atomic_topk_sum:
        return "act-order, fragment-order inputs and the atomic top-k sum are not supported"
    if split > 1 and activation:
        return "SPLIT_K with a fused activation (GEMM1 needs whole sums)"
    if a.stride(1) != 1 or qweight.stride(2) != 1:
        return "the activations' and the packed words' K must be contiguous"
    if a.data_ptr() % 4 or a.stride(0) % 2:
        return ("the kernel reads the activations as 32-bit words: their start and row "
                f"stride must be even (start {a.data_ptr()} bytes, row stride {a.stride(0)})")
    return None


def launch_prefill_mma(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, out: torch.Tensor,
                       topk_weights: torch.Tensor | None, sorted_ids: torch.Tensor,
                       expert_ids: torch.Tensor, num_post_padded: torch.Tensor, *,
                       n_out: int, k: int, slots: int, top_k: int, up_offset: int,
                       group_size: int, a_is_slots: bool, activation_code: int,
                       config: dict, a_sorted: bool = False,
                       out_sorted: bool = False, ready_counts: torch.Tensor | None = None,
                       ready_wait_tiles: int = 0):
    """Run :func:`_prefill_mma_kernel` and return the compiled kernel Triton launched (its
    ``n_regs`` and ``metadata`` say how many programs an SM it runs:
    :func:`resident_programs`); inputs already validated by ``prefill_gemm`` and
    :func:`mma_unsupported`. ``ready_counts`` (int32, one per block, zero; see
    :data:`GEMM2_WAITS_PER_BLOCK`): with ``ready_wait_tiles`` 0 each program adds 1 to its
    block's count once its tile is stored (GEMM1); else each program waits until its block's
    count is ``ready_wait_tiles`` before it reads ``a`` (GEMM2 on GEMM1's output; the caller
    sets the counts back to zero once GEMM2 is done: ``fused_moe_prefill``'s top-k sum).
    ``SPLIT_K`` S in ``config``: ``out`` is ``[S, slots, n_out]`` (float32 partial sums, one
    per K range) and each program runs one range of one tile."""
    bt, bn, warps = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["num_warps"]
    rows = 2 * bn if activation_code else bn
    split = config.get("SPLIT_K", 1)
    if split > 1 and (ready_counts is not None or out.dim() != 3 or out.shape[0] != split):
        raise ValueError(f"SPLIT_K={split} with out of shape {tuple(out.shape)} and ready "
                         f"counts {ready_counts is not None}; expected [{split}, slots, N] "
                         "partial sums and no counts")
    # what a program reads: one K range
    k_range = k // split
    # in a prefill chain the GEMM on slot rows is GEMM2, and the kernel before it (GEMM1)
    # writes only its activations: the weights may be read before the wait
    weights_before_wait = a_is_slots and GEMM2_WEIGHTS_BEFORE_WAIT
    predicated_reloads = (PREDICATED_RELOADS
                          and k_range // config["BLOCK_SIZE_K"] <= PREDICATED_RELOADS_MAX_STEPS)
    em = sorted_ids.numel()
    z = zeros if zeros is not None else qweight  # dummy pointer when absent
    tw = topk_weights if topk_weights is not None else scales
    groups = mma_groups(config)
    words, x, sz, szw, pairs = mma_layouts(rows, bt, warps, groups)
    scale_words = (groups > 1 and group_size == MMA_BLOCK_K and scales.stride(2) == 1
                   and scales.stride(1) % 2 == 0 and scales.stride(0) % 2 == 0
                   and scales.data_ptr() % 4 == 0)
    grid = ((em // bt) * (n_out // bn) * split,)
    # the words' ring (WORD_RING_STAGES) compiles without the CTA barriers Triton's
    # shared-memory analysis puts around it (each thread reads back only its own copies)
    ring = word_ring_stages(k_range, config)
    # the ring's copies in whole 128-byte runs of a row (two groups or more a step)
    whole_runs = bool(ring) and RING_COPIES_WHOLE_RUNS and groups >= 2
    copy_layout = ring_copy_layout(rows, warps, groups) if whole_runs else None
    x_ahead = bt == 8 and ACTIVATIONS_AHEAD
    rotate_k = ROTATE_K_STEPS and bt == 8
    # GEMM1 of a chain whose GEMM2 waits per block (it waits for the kernel before it first):
    # a persistent grid, sized once the kernel's registers and shared memory are known (its
    # first launch runs a program a tile)
    persistent = (GEMM1_PERSISTENT and ready_counts is not None and not ready_wait_tiles
                  and not weights_before_wait
                  and slots // top_k >= GEMM1_PERSISTENT_MIN_TOKENS
                  and qweight.shape[0] >= GEMM1_PERSISTENT_MIN_EXPERTS)
    resident_key = (a.device, a.dtype, rows, bt, warps, groups, k_range, n_out, zeros is not None,
                    activation_code, topk_weights is not None, a_sorted, out_sorted,
                    scale_words, ring, x_ahead, rotate_k, predicated_reloads,
                    TIMELINE is not None, whole_runs)
    if persistent and resident_key in _RESIDENT_PROGRAMS:
        grid = (min(grid[0], _RESIDENT_PROGRAMS[resident_key]),)
    timeline = None
    if TIMELINE is not None:
        # filled with -1 (a row a program did not write is told apart), except under CUDA
        # graph capture: a fill kernel between two launches of a PDL chain would make the
        # second wait for the first to finish (the capturer fills them before each replay)
        if torch.cuda.is_current_stream_capturing():
            timeline = torch.empty((grid[0], 4), dtype=torch.int64, device=a.device)
        else:
            timeline = torch.full((grid[0], 4), -1, dtype=torch.int64, device=a.device)
        facts = {"n_out": n_out, "k": k, "config": dict(config), "group_size": group_size,
                 "has_zeros": zeros is not None, "activation": bool(activation_code),
                 "ring_stages": ring, "persistent": persistent}
        TIMELINE.append((facts, timeline))
    with (stripped_ring_barriers(_KERNEL_NAME, warp_barriers=whole_runs) if ring
          else contextlib.nullcontext()):
        compiled = _prefill_mma_kernel[grid](
            a, qweight, scales, z, out, tw, sorted_ids, expert_ids, num_post_padded,
            n_out, k, slots, top_k, up_offset,
            a.stride(0), qweight.stride(0), qweight.stride(1),
            scales.stride(0), scales.stride(1), scales.stride(2),
            z.stride(0), z.stride(1), z.stride(2), out.stride(-2),
            GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, ACTIVATION=activation_code,
            MUL_ROUTED_WEIGHT=topk_weights is not None, A_IS_SLOTS=a_is_slots,
            A_SORTED=a_sorted, C_SORTED=out_sorted, IS_FP16=a.dtype == torch.float16,
            BLOCK_T=bt, BLOCK_N=rows, GROUPS=groups, SCALE_WORDS=scale_words,
            WORDS_LAYOUT=words, X_LAYOUT=x, SZ_LAYOUT=sz, SZW_LAYOUT=szw, PAIRS_LAYOUT=pairs,
            OUT_LAYOUT=store_layout(bt, bn, warps), num_warps=warps,
            WEIGHTS_BEFORE_WAIT=weights_before_wait, PREDICATED_RELOADS=predicated_reloads,
            RING_STAGES=ring, RING_LAYOUT=ring_layout() if ring else None, X_AHEAD=x_ahead,
            timeline_ptr=timeline, TIMELINE=timeline is not None,
            ROTATE_K=rotate_k, ready_ptr=ready_counts, ready_tiles=ready_wait_tiles,
            READY=0 if ready_counts is None else (2 if ready_wait_tiles else 1),
            PERSISTENT=persistent, COPY_LAYOUT=copy_layout, SPLIT=split,
            K_RANGE=k_range if split > 1 else 0, stride_cs=out.stride(0) if split > 1 else 0,
            SPLIT_RUNTIME_STEPS=split > 1 and SPLIT_RUNTIME_STEPS,
            **prefill_pdl_args(a.device))
    if persistent and resident_key not in _RESIDENT_PROGRAMS:
        _RESIDENT_PROGRAMS[resident_key] = resident_programs(compiled, a.device)
    if timeline is not None:
        # the clock reads may take registers of their own: programs an SM can differ
        facts["registers"] = getattr(compiled, "n_regs", None)
    return compiled


__all__ = ["ACTIVATIONS_AHEAD", "GEMM1_PERSISTENT", "GEMM1_PERSISTENT_MIN_EXPERTS",
           "GEMM1_PERSISTENT_MIN_TOKENS", "GEMM2_WAITS_MAX_TILES",
           "GEMM2_WAITS_MAX_TOKENS", "GEMM2_WAITS_PER_BLOCK", "MMA_BLOCK_K", "PREDICATED_RELOADS",
           "PREDICATED_RELOADS_MAX_STEPS", "RING_COPIES_WHOLE_RUNS", "ROTATE_K_STEPS",
           "SPLIT_RUNTIME_STEPS", "TIMELINE",
           "WORD_RING_MAX_STEPS", "WORD_RING_MIN_BLOCK_K", "WORD_RING_STAGES",
           "launch_prefill_mma", "mma_groups", "mma_layouts", "programs_an_sm",
           "resident_programs", "word_ring_stages",
           "mma_tiles_unsupported", "mma_unsupported", "permuted_columns", "store_layout"]
