"""Register-operand prefill GEMM for Hopper (sm_90), written in Gluon.

The same grouped int4 GEMM as the Triton kernel of :mod:`w4a16moe.kernels.prefill` (same
packed weights, same aligned blocks, same outputs), chosen by an ``RS`` config entry. The
weight tile is dequantized straight into the register A operand of a 16-bit ``wgmma`` and
never goes through shared memory; the activations stay in natural K order. A program has

* a **loader** warp (worker partition): for every K step it cp.asyncs the gathered activation
  rows ``[BLOCK_T, BLOCK_K]`` into stage ``step % STAGES`` of a shared-memory ring, as far
  ahead as the ring allows, each lane's copies arriving on the stage's barrier when they land
  (32 arrivals), and reads the tile's packed words ``[BLOCK_N, BLOCK_K/8]`` into the stage
  with one TMA copy (``W_TMA``; the barrier also expects its bytes) or, where the strides do
  not allow TMA, with the same cp.asyncs;
* two or four **consumer** warpgroups (the default partition, ``num_warps`` 8 or 16, BLOCK_N/2
  or BLOCK_N/4 weight rows each):
  per step they wait for the stage and build their A operand: in it, lane ``c`` of a quad
  holds columns ``2c, 2c+1`` of each 8-column word of a 32-column run, which the ExLlama
  shuffle keeps at bits ``4c`` and ``16+4c`` of the word, so the quad's lanes read the same
  four words (one 16-byte load) and each dequantizes its own pair with one shift, one LOP3
  and two packed 16-bit ops (PTX). They issue the register-A wgmma against the activation
  tile, release the previous step's stage once its wgmma is done (every consumer thread
  arrives on the stage's empty barrier itself, ``cp.async.mbarrier.arrive.noinc``: Gluon's
  one-thread ``mbarrier.arrive`` needs a barrier over all consumer warps before it), and
  after the K loop run the epilogue (router weight, ``act(gate) * up``) and the store.

With ``PAIRED_STAGES`` a ring stage holds two K steps instead of one (twice the columns, half
the stages), so the loader reads each weight row in ``BLOCK_K / 2``-byte runs instead of
``BLOCK_K / 4`` (HBM streams 64-byte runs of a row at about two thirds of the rate of 128-byte
ones) and the consumer takes each step of its unrolled pair from one half of the stage.

With ``SCALE_ACC`` the operand is the exact ``v - z`` and each step's wgmma writes a fresh
float32 partial sum, which the consumer adds to the tile's sum times the step's scales once the
wgmma is retired: one FMA an accumulator element and step instead of one packed multiply a value
pair (the loop of 16-slot tiles 14 % fewer instructions). It waits for each wgmma before the
next step, so it pays on four consumer warpgroups (``num_warps`` 16), whose warps hide each
other's waits. With ``SUB_STEPS`` 2 each K step is two wgmmas of half its columns into the
step's partial, one after the other, each from a half-width operand: half the operand
registers, so that 32-slot tiles fit the 96 registers a thread of sixteen warps without
spilling; the same K16 wgmma instructions in the same order, so the same bits.

Consumer warps do not meet once a K step: Triton's shared-memory analysis puts a CTA barrier
in front of each stage wait (two waits on one barrier array count as a conflict), which the
launcher's compile hook removes, since the ring keeps every thread within a phase
(:mod:`w4a16moe.kernels.membar`).

Race freedom: a wgmma reads its register operand while it runs, so the loop is unrolled by two
with one set of A registers per parity; step ``i``'s registers are rewritten only after the
wait that retires step ``i``'s wgmma (checked in the SASS: the two sets alternate and neither
is written inside the other's window; the GPU tests repeat every shipped config bit for bit).

One program walks output tiles ``pid, pid + num_programs, ...``; a tile is one aligned block of
``BLOCK_T`` slots x ``BLOCK_N_OUT`` output columns, or with ``SPLIT_K`` > 1 one of SPLIT_K
equal K ranges of it (the innermost tile index, so the valid units of a launch are contiguous
and spread evenly over the programs) whose float32 partial sums go to ``C[split]`` of a
``[SPLIT_K, rows, N_out]`` output, summed afterwards in a fixed order (split-K: when the
experts a few tokens touch make fewer tiles than the GPU has SMs). With ``STREAM_K``
the programs take whole tiles round by round, then split the last round's tiles by K steps
(when the idle part of that round would be long enough to pay for it): a tile cut between
programs is summed from float32 partials, in program order, by the piece that completes it
(see ``_sk_schedule`` and ``_rs_consumer_sk_pieces``). A launch whose valid units leave
nothing to cut (``_sk_cuts``) runs the loops without STREAM_K (the same SASS for the K loop;
the layer measured about 1 % slower with the flag there all the same, notes session 47).
With ``SHORT_T``
(config ``SHORT_BLOCK_T``) a block whose real slots all lie in its first ``SHORT_T`` positions
runs ``SHORT_T``-column wgmmas on them, from the same staged tiles (``_rs_consumer``): half the
multiply-adds of a half-empty block, the same bits. With ``QUARTER_T`` (config
``QUARTER_BLOCKS``, ``SHORT_T`` half the block) a block that fits its first quarter runs
quarter-width wgmmas, and one that fits three quarters a half- and a quarter-width wgmma a step
from the same operand registers (``_rs_part_unit``): one dequantization, the multiply-adds of
its slots rounded up to a quarter of the tile. With ``ACTIVATION`` the
weight tile holds ``BLOCK_N_OUT`` gate and as many up rows interleaved in runs of 8, so each
accumulator thread holds a column's gate and up values.

Shapes: A ``[M, K]`` (rows ``slot // top_k``) or ``[M*top_k, K]`` (``A_IS_SLOTS``), or
``[EM, K]`` with ``A_SORTED`` (row ``p`` for sorted position ``p``: a tile's rows are
contiguous, so the loader reads them with one TMA copy per K step instead of gathering them
row by row); qweight int32 ``[E, N_w, K/8]``; scales ``[E, N_w, K/G]``; zeros uint8
``[E, N_w, K/G]``; C ``[M*top_k, N_out]`` or ``[EM, N_out]`` with ``C_SORTED`` (columns in
fragment order with ``OUT_FRAG``, for a next GEMM that reads them so).

:func:`rs_unsupported` says which calls qualify (``prefill_gemm`` runs the same tiles on the
Triton kernel otherwise). Gluon does not run under the Triton interpreter: the CPU tests
cover the config rules and the fallback; the numerical tests of this kernel are GPU tests
(``tests/test_prefill_rs.py``).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .common import activation, fragment_order, grouped_tile
from .configs import quarter_block_rows, scale_acc_wgmmas, short_block_rows, stream_k_conflict
from .membar import stripped_wait_barriers
from .pdl import prefill_pdl_args

try:  # Gluon ships with triton >= 3.5; without it the Triton kernel runs everything
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed triton
    HAVE_GLUON = False

#: STREAM_K: the last round of units is split by K steps only when that saves each program
#: at least this many granules (two K steps each) on average, i.e. when its idle part,
#: ``(P - R) G``, is at least ``SK_MIN_SAVED P``: a cut unit's partial sums (store, count,
#: reload, epilogue) cost about that much (benchmarks/notes_prefill.md, session 21)
SK_MIN_SAVED = 4
#: STREAM_K: a unit of the last round is cut into at most about this many pieces, so the
#: program that completes it adds up few partial sums (all loaded at once)
SK_PIECES = 4
#: registers per thread of the loader warp (setmaxnreg)
LOADER_REGS = 64
#: read the packed words with TMA (one bulk copy per K step) where the strides allow; False:
#: the loader warp cp.asyncs them in 16-byte pieces (benchmarks flip this for A/Bs)
WEIGHT_TMA = True
#: compile the kernel without the CTA barrier Triton puts in front of each consumer
#: ``mbarrier.wait`` (:mod:`w4a16moe.kernels.membar`: it orders nothing here; the GEMMs
#: 0.6-9.7 % faster on the H100); False keeps it (benchmarks flip this for A/Bs)
STRIP_WAIT_BARRIERS = True


if HAVE_GLUON:

    # a barrier over the partition's warps: gl.thread_barrier in triton 3.6, gl.barrier since
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    _SK_MIN_SAVED = gl.constexpr(SK_MIN_SAVED)
    _SK_PIECES = gl.constexpr(SK_PIECES)

    # the Triton kernel's helpers, compiled as Gluon functions
    _act = gluon.jit(activation.fn)
    _fragment_order = gluon.jit(fragment_order.fn)
    _tile = gluon.jit(grouped_tile.fn)

    @gluon.jit
    def _wait_upstream_release_next():
        """``griddepcontrol.wait`` then ``griddepcontrol.launch_dependents``: the Gluon form of
        :func:`~w4a16moe.kernels.pdl.wait_upstream_release_next` (whose Triton ops build
        Triton's inline asm, not Gluon's)."""
        gl.inline_asm_elementwise(
            "griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents; // dummy $0", "=r", [],
            dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _rs_tile_rows(n0, up_offset, BLOCK_N: gl.constexpr, ACTIVATION: gl.constexpr,
                      layout: gl.constexpr):
        """Weight rows of a tile: ``n0 + r``, or with ACTIVATION gate and up rows interleaved
        in runs of 8 (tile rows 16b + j: gate row n0 + 8b + j; 16b + 8 + j: the up row
        ``+ up_offset``), so a wgmma accumulator thread holds a column's gate and up values."""
        r = gl.arange(0, BLOCK_N, layout=layout)
        if ACTIVATION != 0:
            rows = n0 + (r // 16) * 8 + r % 8 + gl.where((r // 8) % 2 == 1, up_offset, 0)
        else:
            rows = n0 + r
        return rows

    @gluon.jit
    def _rs_load_unit(a_ptr, a_desc, qw_ptr, w_desc, sorted_ids_ptr, x_bufs, wd_bufs, wd_tma,
                      empty_bars, x_ready_bars, num_valid_slots, top_k, up_offset, stride_am,
                      stride_qe, stride_qn, expert, pid_n, row0, kstep0, num_fills, ring,
                      A_IS_SLOTS: gl.constexpr, ACTIVATION: gl.constexpr,
                      BLOCK_T: gl.constexpr, BLOCK_N_OUT: gl.constexpr, BLOCK_N: gl.constexpr,
                      BLOCK_K: gl.constexpr, STAGES: gl.constexpr, W_TMA: gl.constexpr,
                      A_SORTED: gl.constexpr, PAIRED: gl.constexpr):
        """The loader's copies of one unit (or of a piece of one): ``num_fills`` ring stages
        from K step ``kstep0`` of the tile (block ``row0``, output tile ``pid_n``, weights of
        ``expert``), the ring's fills counted from ``ring``."""
        STEPS: gl.constexpr = 2 if PAIRED else 1  # K steps a stage holds
        STAGE_K: gl.constexpr = STEPS * BLOCK_K
        WORDS: gl.constexpr = STAGE_K // 8
        # 16-byte chunks: a row's STAGE_K activations over STAGE_K / 8 lanes, 4 words a lane
        x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // WORDS, WORDS], [1, 1], [1, 0])
        wc_layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (WORDS // 4), WORDS // 4],
                                                   [1, 1], [1, 0])
        wc_rows = _rs_tile_rows(pid_n * BLOCK_N_OUT, up_offset, BLOCK_N, ACTIVATION,
                                gl.SliceLayout(1, wc_layout))
        qw_base = qw_ptr + expert.to(gl.int64) * stride_qe
        w_offs = wc_rows[:, None] * stride_qn + gl.arange(
            0, WORDS, layout=gl.SliceLayout(0, wc_layout))[None, :]
        t = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, x_layout))
        slots = gl.load(sorted_ids_ptr + row0 + t)
        if A_IS_SLOTS:
            a_rows = slots
        else:
            a_rows = slots // top_k
        # slots past the end (padding) read row 0: their results are never stored
        a_rows = gl.where(slots < num_valid_slots, a_rows, 0)
        x_offs = a_rows[:, None] * stride_am + gl.arange(
            0, STAGE_K, layout=gl.SliceLayout(0, x_layout))[None, :]
        for i in range(num_fills):
            stage = (ring + i) % STAGES
            mbarrier.wait(empty_bars.index(stage), (((ring + i) // STAGES) & 1) ^ 1)
            k0 = (kstep0 + i * STEPS) * BLOCK_K
            if A_SORTED:
                mbarrier.expect(x_ready_bars.index(stage),
                                BLOCK_T * STAGE_K * 2 + W_TMA * (BLOCK_N * STAGE_K // 2))
                tma.async_copy_global_to_shared(a_desc, [row0, k0],
                                                x_ready_bars.index(stage),
                                                x_bufs.index(stage))
            else:
                async_copy.async_copy_global_to_shared(x_bufs.index(stage),
                                                       a_ptr + (x_offs + k0))
            if W_TMA:
                if not A_SORTED:
                    mbarrier.expect(x_ready_bars.index(stage), BLOCK_N * STAGE_K // 2)
                tma.async_copy_global_to_shared(
                    w_desc, [expert, pid_n * (BLOCK_N_OUT // 8), 0, 0, k0 // 8],
                    x_ready_bars.index(stage), wd_tma.index(stage))
            else:
                async_copy.async_copy_global_to_shared(wd_bufs.index(stage),
                                                       qw_base + (w_offs + k0 // 8))
            if not (A_SORTED and W_TMA):
                async_copy.mbarrier_arrive(x_ready_bars.index(stage),
                                           increment_count=False)

    @gluon.jit
    def _rs_loader(a_ptr, a_desc, qw_ptr, w_desc, sorted_ids_ptr, expert_ids_ptr,
                   num_post_padded_ptr,
                   x_bufs, wd_bufs, wd_tma, empty_bars, x_ready_bars, N, K, EM,
                   num_valid_slots, top_k, up_offset, stride_am, stride_qe, stride_qn,
                   A_IS_SLOTS: gl.constexpr, ACTIVATION: gl.constexpr, BLOCK_T: gl.constexpr,
                   BLOCK_N_OUT: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                   GROUP_SIZE_M: gl.constexpr, STAGES: gl.constexpr, W_TMA: gl.constexpr,
                   A_SORTED: gl.constexpr, SPLIT_K: gl.constexpr, PAIRED: gl.constexpr):
        """Worker partition (one warp): cp.async of each K step's gathered activation rows
        into the copy ring, as far ahead as the ring allows, each lane's copies arriving on the
        stage's barrier when they land; the packed words the same way, or with ``W_TMA`` as one
        TMA copy of the tile (``w_desc``: see :func:`weight_descriptor`) whose bytes the
        barrier expects. With ``A_SORTED`` the activation rows of a tile are the contiguous
        rows ``row0 ...`` of ``a_desc`` and come as one TMA copy too. With ``PAIRED`` a stage
        is two K steps: the copies are ``2 * BLOCK_K`` columns wide, one stage per step pair."""
        STEPS: gl.constexpr = 2 if PAIRED else 1  # K steps a stage holds
        num_pid_m = gl.cdiv(EM, BLOCK_T)
        num_pid_n = N // BLOCK_N_OUT
        num_post_padded = gl.load(num_post_padded_ptr)
        num_steps = K // BLOCK_K // SPLIT_K  # K steps of one unit (its K range)
        num_fills = num_steps // STEPS  # stages one unit fills
        ring = 0  # stages this program has filled so far
        for unit in range(gl.program_id(0), num_pid_m * num_pid_n * SPLIT_K,
                          gl.num_programs(0)):
            pid_m, pid_n = _tile(unit // SPLIT_K, num_pid_m, num_pid_n, GROUP_SIZE_M)
            kstep0 = (unit % SPLIT_K) * num_steps
            row0 = pid_m * BLOCK_T
            expert = gl.load(expert_ids_ptr + pid_m, mask=row0 < num_post_padded, other=-1)
            if expert != -1:
                _rs_load_unit(a_ptr, a_desc, qw_ptr, w_desc, sorted_ids_ptr, x_bufs, wd_bufs,
                              wd_tma, empty_bars, x_ready_bars, num_valid_slots, top_k,
                              up_offset, stride_am, stride_qe, stride_qn, expert, pid_n, row0,
                              kstep0, num_fills, ring, A_IS_SLOTS, ACTIVATION, BLOCK_T,
                              BLOCK_N_OUT, BLOCK_N, BLOCK_K, STAGES, W_TMA, A_SORTED, PAIRED)
                ring += num_fills

    @gluon.jit
    def _rs_pairs_layout(BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, a_layout: gl.constexpr):
        """The layout of the [BLOCK_N, BLOCK_K/32, 4 (quad lane c), 4 (word j)] value pairs
        that assemble into the wgmma A operand: a probe tensor in the operand layout taken
        back through the inverse of that assembly (see :func:`_rs_step_operand`)."""
        T: gl.constexpr = BLOCK_K // 32
        probe = gl.full([BLOCK_N, BLOCK_K], 0, gl.bfloat16, a_layout)
        p6 = gl.reshape(probe, [BLOCK_N, T, 2, 2, 4, 2])  # (row, run, j_hi, j_lo, c, q)
        p6 = gl.permute(p6, (0, 1, 4, 2, 3, 5))  # (row, run, c, j_hi, j_lo, q)
        p5 = gl.reshape(p6, [BLOCK_N, T, 4, 4, 2])  # (row, run, c, j, q)
        p4, _other = gl.split(p5)
        return p4

    @gluon.jit
    def _rs_words2d_layout(BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                           words_layout: gl.constexpr):
        """The layout of the [BLOCK_N, BLOCK_K/8] word tile that reshapes to the [BLOCK_N,
        BLOCK_K/32, 4] word layout of the pairs: a probe taken through the reshape."""
        probe = gl.full([BLOCK_N, BLOCK_K // 32, 4], 0, gl.int32, words_layout)
        return gl.reshape(probe, [BLOCK_N, BLOCK_K // 8])

    @gluon.constexpr_function
    def _rs_dequant_asm(IS_FP16, SCALED):
        """The PTX of :func:`_rs_dequant_pair` (operands: the two 16-bit halves, the words,
        the shift, the packed scale, the packed zero term)."""
        if IS_FP16:
            regs, magic, pre = "t", "0x64006400", []
            post = ["sub.f16x2 t, t, $5;"] + (["mul.f16x2 t, t, $4;"] if SCALED else [])
        else:
            regs, magic = "t, one, n0", "0x43004300"
            pre = ["mov.b32 one, 0x3F803F80;", "mov.b32 n0, 0x80008000;"]
            post = ["fma.rn.bf16x2 t, t, one, $5;"] + (
                ["fma.rn.bf16x2 t, t, $4, n0;"] if SCALED else [])
        ops = pre + ["shr.u32 t, $2, $3;", f"lop3.b32 t, t, 0x000F000F, {magic}, 0xEA;"] + post
        return "{ .reg .b32 " + regs + "; " + " ".join(ops) + " mov.b32 {$0, $1}, t; }"

    @gluon.jit
    def _rs_dequant_pair(words, shift, ss, zz, IS_FP16: gl.constexpr,
                         SCALED: gl.constexpr = True):
        """Values ``2c`` and ``2c+1`` of each word (``shift`` = 4c: ExLlama order keeps them
        at bits 4c and 16+4c) as (bias + v) packed in one 32-bit op, then minus the packed
        (bias + z) and, with ``SCALED``, times the packed scale ``ss`` (without: the exact
        ``v - z``, ``ss`` not read; ``SCALE_ACC`` scales the step's float32 partial sum
        instead); ``zz`` is (bias + z) packed (fp16) or its negation (bf16, whose packed ops
        are fma only)."""
        asm: gl.constexpr = _rs_dequant_asm(IS_FP16, SCALED)
        if IS_FP16:
            lo, hi = gl.inline_asm_elementwise(asm, "=h,=h,r,r,r,r", [words, shift, ss, zz],
                                               (gl.float16, gl.float16), is_pure=True, pack=1)
        else:
            lo, hi = gl.inline_asm_elementwise(asm, "=h,=h,r,r,r,r", [words, shift, ss, zz],
                                               (gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        return lo, hi

    @gluon.jit
    def _packed_pair(v):
        """A 16-bit tensor as int32 holding the value twice (the operand of a packed op)."""
        bits = v.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return bits | (bits << 16)

    @gluon.jit
    def _rs_scale_ptrs(s_ptr, z_ptr, expert, s_rows, z_rows, stride_se, stride_sn, stride_ze,
                       stride_zn):
        """The bases and row offsets :func:`_rs_pair_scales` reads for the tile's weight rows
        of ``expert``: the scales' at ``s_rows``, the zero points' at ``z_rows`` (each in the
        layout its consumer wants), and the scales again as int32 pairs (only read with
        ``SCALE_PAIRS``, whose strides are even). Returns ``s_base, s32_base, z_base,
        s_offs, s32_offs, z_offs``."""
        e64 = expert.to(gl.int64)
        s32_base = s_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + e64 * (stride_se // 2)
        return (s_ptr + e64 * stride_se, s32_base, z_ptr + e64 * stride_ze,
                s_rows * stride_sn, s_rows * (stride_sn // 2), z_rows * stride_zn)

    @gluon.jit
    def _rs_pair_scales(i, s_base, s32_base, z_base, s_offs, s32_offs, z_offs, stride_sg,
                        stride_zg, vdtype: gl.constexpr, HAS_ZEROS: gl.constexpr,
                        SCALE_PAIRS: gl.constexpr, GROUP_SIZE: gl.constexpr,
                        BLOCK_K: gl.constexpr):
        """Scales (and raw uint8 zeros; the scales again when there are none, never read) of
        steps ``i`` and ``i + 1`` (``i`` even) for the tile's rows, with as few loads as the
        group size allows: one load when both steps are in one group (G >= 2 BLOCK_K); with
        ``SCALE_PAIRS`` (G == BLOCK_K, scales 4-byte aligned per pair) one 32-bit load of the
        two adjacent groups; else one load per step."""
        g0 = (i * BLOCK_K) // GROUP_SIZE
        if GROUP_SIZE >= 2 * BLOCK_K:
            sc0 = gl.load(s_base + (s_offs + g0 * stride_sg))
            sc1 = sc0
        elif SCALE_PAIRS:
            v = gl.load(s32_base + (s32_offs + g0 // 2))  # groups g0 (low half), g0 + 1
            sc0 = (v & 0xFFFF).to(gl.int16).to(vdtype, bitcast=True)
            sc1 = (v >> 16).to(gl.int16).to(vdtype, bitcast=True)
        else:
            sc0 = gl.load(s_base + (s_offs + g0 * stride_sg))
            sc1 = gl.load(s_base + (s_offs + (g0 + 1) * stride_sg))
        if HAS_ZEROS:
            zr0 = gl.load(z_base + (z_offs + g0 * stride_zg))
            if GROUP_SIZE >= 2 * BLOCK_K:
                zr1 = zr0
            else:
                zr1 = gl.load(z_base + (z_offs + (g0 + 1) * stride_zg))
        else:
            zr0 = sc0
            zr1 = sc1
        return sc0, zr0, sc1, zr1

    @gluon.constexpr_function
    def _rs_step_column(BLOCK_K, PAIRED, HALF, SUBS, SUB):
        """The first of the ``BLOCK_K / SUBS`` stage columns a step's part ``SUB`` reads
        (with ``PAIRED`` the step is the stage's half ``HALF``)."""
        return (HALF * BLOCK_K if PAIRED else 0) + SUB * (BLOCK_K // SUBS)

    @gluon.jit
    def _rs_step_x(x_bufs, fill, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                   PAIRED: gl.constexpr, HALF: gl.constexpr, SUBS: gl.constexpr = 1,
                   SUB: gl.constexpr = 0, ROWS: gl.constexpr = 0, ROW0: gl.constexpr = 0):
        """A step's activation tile as the wgmma B operand ``[BLOCK_K, BLOCK_T]``: the stage
        of ring fill ``fill``, or with ``PAIRED`` its half ``HALF``; with ``SUBS`` > 1 only
        the step's part ``SUB`` of ``SUBS`` (``BLOCK_K / SUBS`` columns); with ``ROWS`` > 0
        only the stage's ``ROWS`` token rows from row ``ROW0`` (``[BLOCK_K, ROWS]``: a short
        block, or the second piece of a three-quarter block)."""
        x = x_bufs.index(fill % STAGES)
        if ROWS > 0:
            x = x.slice(ROW0, ROWS, dim=0)
        if PAIRED or SUBS > 1:
            x = x.slice(_rs_step_column(BLOCK_K, PAIRED, HALF, SUBS, SUB), BLOCK_K // SUBS,
                        dim=1)
        return x.permute((1, 0))

    @gluon.jit
    def _rs_step_operand(fill, wd_bufs, x_ready_bars, sc, zr, bias, vdtype: gl.constexpr,
                         HAS_ZEROS: gl.constexpr, IS_FP16: gl.constexpr, A_SORTED: gl.constexpr,
                         BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                         PAIRED: gl.constexpr, HALF: gl.constexpr, pairs_layout: gl.constexpr,
                         row_layout: gl.constexpr, a_layout: gl.constexpr,
                         SCALED: gl.constexpr = True, SUBS: gl.constexpr = 1,
                         SUB: gl.constexpr = 0):
        """A step's weight tile in the wgmma A-operand registers, once its words and
        activations have landed in ring fill ``fill`` (its stage is ``fill % STAGES``; with
        ``PAIRED`` the step is its half ``HALF``, and the second half's wait finds the phase
        already complete); fences the activation tile for wgmma. ``sc``/``zr``: the step's
        scales and raw zeros per row (:func:`_rs_pair_scales`).

        In the operand a thread (lane ``c`` of its quad) holds, per row and 32-column run,
        columns ``2c, 2c+1`` of each of the run's four 8-column words, i.e. value pair ``c``
        of each word: the quad's four lanes read the same four words (one 16-byte load) and
        each dequantizes its own pair, so the activations stay in natural K order. The proxy
        fence is only needed for activations that came by cp.async (not ``A_SORTED``'s TMA).
        ``SCALED`` False (``SCALE_ACC``): the exact ``v - z``, ``sc`` not read. With ``SUBS``
        > 1 only the step's part ``SUB`` of ``SUBS``, ``BLOCK_K / SUBS`` columns (``SUB_STEPS``;
        ``pairs_layout`` is then that width's)."""
        KW: gl.constexpr = BLOCK_K // SUBS  # the operand's columns
        T: gl.constexpr = KW // 32
        if HAS_ZEROS:
            zb = (zr.to(gl.int32) + bias).to(vdtype)
        else:
            zb = gl.full([BLOCK_N], bias + 8, vdtype, layout=row_layout)
        if IS_FP16:
            zz = _packed_pair(zb)
        else:
            zz = _packed_pair(-zb)
        ss = _packed_pair(sc) if SCALED else zz  # not read unless SCALED
        stage = fill % STAGES
        mbarrier.wait(x_ready_bars.index(stage), (fill // STAGES) & 1)
        # words (row, run, j), the same for the four lanes c of a quad: loaded as the 2-D
        # [row, word] tile (the ring's layout may be swizzled) in the layout that reshapes to
        # the pairs' word layout without moving data
        words_layout: gl.constexpr = gl.SliceLayout(2, pairs_layout)
        words2d_layout: gl.constexpr = _rs_words2d_layout(BLOCK_N, KW,
                                                          words_layout).type.layout
        if PAIRED or SUBS > 1:
            K0: gl.constexpr = _rs_step_column(BLOCK_K, PAIRED, HALF, SUBS, SUB)
            wd = wd_bufs.index(stage).slice(K0 // 8, KW // 8, dim=1)
        else:
            wd = wd_bufs.index(stage)
        words = gl.convert_layout(gl.reshape(wd.load(words2d_layout), [BLOCK_N, T, 4]),
                                  words_layout, assert_trivial=True)
        c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(
            3, pairs_layout))))
        words4, shift = gl.broadcast(gl.expand_dims(words, 2), (c * 4)[None, None, :, None])
        ss4 = gl.broadcast(ss[:, None, None, None], words4)[0]
        zz4 = gl.broadcast(zz[:, None, None, None], words4)[0]
        lo, hi = _rs_dequant_pair(words4, shift, ss4, zz4, IS_FP16, SCALED)
        v = gl.reshape(gl.join(lo, hi), [BLOCK_N, T, 4, 2, 2, 2])  # (row, run, c, jh, jl, q)
        v = gl.permute(v, (0, 1, 3, 4, 2, 5))  # (row, run, j_hi, j_lo, c, q): column order
        a = gl.convert_layout(gl.reshape(v, [BLOCK_N, KW]), a_layout, assert_trivial=True)
        if not A_SORTED:
            fence_async_shared()
        return a

    @gluon.constexpr_function
    def _rs_mma_layout(num_warps, BLOCK_T):
        """The wgmma accumulator layout: ``num_warps`` warps down the weight rows."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                         instr_shape=[16, BLOCK_T, 16])

    @gluon.constexpr_function
    def _rs_a_layout(mma_layout):
        """The register A operand of that wgmma (16-bit, two values a register)."""
        return gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)

    @gluon.constexpr_function
    def _rs_mma_layout_like(mma_layout, BLOCK_T):
        """``mma_layout``'s warps on a wgmma of ``BLOCK_T`` columns (a second piece's
        accumulator: the same rows in the same threads, so the A operand and the row values
        of one convert to the other's without moving); ``mma_layout`` itself for 0."""
        if BLOCK_T == 0:
            return mma_layout
        return _rs_mma_layout(mma_layout.warps_per_cta[0], BLOCK_T)

    @gluon.constexpr_function
    def _rs_pair_in_flight(mma_layout, X_ROWS):
        """1 where a three-quarter block's loop keeps a step's two wgmmas in flight (eight
        consumer warps, its half-width piece ``X_ROWS`` of 32 columns or more), else 0: ptxas
        serialized every wgmma of the kernel with them in flight on sixteen warps (96
        registers; the 64-slot GEMM2 of 256 rows) and on the 32-slot eight-warp GEMM1 of
        128-column K steps, as it had with session 49's short loop."""
        return 1 if mma_layout.warps_per_cta[0] <= 8 and X_ROWS >= 32 else 0

    @gluon.constexpr_function
    def _rs_row_layout(pairs_layout):
        """One value a weight row, as the pairs hold them (scales, zero points)."""
        return gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, pairs_layout)))

    @gluon.constexpr_function
    def _rs_out_layout(num_warps, BLOCK_T):
        """Stores: 8 rows x 1 slot per thread, warps across the slots (fewer for narrow
        tiles, so no two threads store the same element)."""
        warps_t = min(num_warps, BLOCK_T // 4)
        return gl.BlockedLayout([8, 1], [8, 4], [num_warps // warps_t, warps_t], [0, 1])

    @gluon.jit
    def _rs_out_tile(c_base, sorted_ids_ptr, row0, n0, stride_cm, num_valid_slots,
                     OUT_FRAG: gl.constexpr, C_SORTED: gl.constexpr, BLOCK_T: gl.constexpr,
                     BLOCK_N_OUT: gl.constexpr, out_layout: gl.constexpr):
        """Output pointers ``[BLOCK_N_OUT, BLOCK_T]`` of the tile at block ``row0``, columns
        ``n0 ...`` (row ``slot``, or ``row0 + t`` with ``C_SORTED``; columns in fragment order
        with ``OUT_FRAG``) from ``c_base``, and the mask of the block's real slots."""
        t_o = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, out_layout))
        slots_o = gl.load(sorted_ids_ptr + row0 + t_o).to(gl.int64)
        col = n0 + gl.arange(0, BLOCK_N_OUT, layout=gl.SliceLayout(1, out_layout))
        if OUT_FRAG:
            # the output's columns in fragment order (the next GEMM reads them as is)
            col = _fragment_order(col)
        if C_SORTED:
            c_rows = row0 + t_o.to(gl.int64)
        else:
            c_rows = slots_o
        c_ptrs = c_base + c_rows[None, :] * stride_cm + col[:, None]
        c_mask = (slots_o < num_valid_slots)[None, :]
        return c_ptrs, c_mask

    @gluon.jit
    def _rs_unit_acc(x_bufs, wd_bufs, empty_bars, x_ready_bars, s_ptr, z_ptr, expert, n0,
                     up_offset, kstep0, num_steps, ring, bias, stride_se, stride_sn, stride_sg,
                     stride_ze, stride_zn, stride_zg, GROUP_SIZE: gl.constexpr,
                     HAS_ZEROS: gl.constexpr, SCALE_PAIRS: gl.constexpr,
                     ACTIVATION: gl.constexpr, IS_FP16: gl.constexpr, A_SORTED: gl.constexpr,
                     BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                     STAGES: gl.constexpr, PREFETCH_SCALES: gl.constexpr,
                     PAIRED: gl.constexpr, vdtype: gl.constexpr, pairs_layout: gl.constexpr,
                     row_layout: gl.constexpr, a_layout: gl.constexpr,
                     mma_layout: gl.constexpr, SCALE_ACC: gl.constexpr = False,
                     X_ROWS: gl.constexpr = 0, X_ROWS2: gl.constexpr = 0):
        """The consumer's K loop over ``num_steps`` steps of one unit (or of a piece of one)
        from K step ``kstep0``: the float32 accumulator ``[BLOCK_N, BLOCK_T]`` of the tile's
        weight rows (``n0 ...`` of ``expert``), the ring's fills counted from ``ring``, every
        stage it used released; returned with a second accumulator ``[BLOCK_N, X_ROWS2]``
        (the first again when ``X_ROWS2`` is 0). With ``SCALE_ACC``:
        :func:`_rs_unit_acc_scaled`. ``X_ROWS`` > 0 (= ``BLOCK_T``): the staged activation
        tiles have more rows, and the wgmmas read only their first ``X_ROWS`` (a short block,
        see :func:`_rs_consumer`); ``X_ROWS2`` > 0: each step's operand also goes to a second
        wgmma on the ``X_ROWS2`` rows after those, into the second accumulator (a block that
        fits three quarters of its tile, as a half and a quarter: one dequantization). The
        short loop retires each step's wgmma before the next step's dequantization
        (``wait(0)``), as the scaled loop does. Its wgmmas are narrow, so little is lost, and
        the kernel keeps the registers its full-width loop needs: with both loops keeping a
        wgmma in flight ptxas ran out of registers for the pair on some tiles and then
        serialized every wgmma of the kernel (C7512: the 32-slot GEMM1 of 128-column K steps
        on eight warps, the 64-slot GEMM2 of 256 rows on sixteen) or spilled (32-40 bytes on
        the 128-slot tiles; benchmarks/notes_prefill.md, session 50). The three-quarter loop
        keeps its step's two wgmmas in flight on eight warps from 64-slot tiles, as the full
        loop does (retiring them cost the 64-slot tiles 2-5 % on the H200, session 51), and
        retires them elsewhere (:func:`_rs_pair_in_flight`)."""
        if SCALE_ACC:
            return _rs_unit_acc_scaled(
                x_bufs, wd_bufs, empty_bars, x_ready_bars, s_ptr, z_ptr, expert, n0,
                up_offset, kstep0, num_steps, ring, bias, stride_se, stride_sn, stride_sg,
                stride_ze, stride_zn, stride_zg, GROUP_SIZE, HAS_ZEROS, SCALE_PAIRS, ACTIVATION,
                IS_FP16, A_SORTED, BLOCK_T, BLOCK_N, BLOCK_K, STAGES, PAIRED, vdtype, a_layout,
                mma_layout, SCALE_ACC, X_ROWS, X_ROWS2)
        STEPS: gl.constexpr = 2 if PAIRED else 1  # K steps a stage holds
        # wgmmas a step leaves in flight: one on the full-width loop, none on the short one
        IN_FLIGHT: gl.constexpr = 0 if X_ROWS > 0 else 1
        # ... and a step's pair on the three-quarter loop on eight warps (see above)
        IN_FLIGHT2: gl.constexpr = _rs_pair_in_flight(mma_layout, X_ROWS)
        w_rows = _rs_tile_rows(n0, up_offset, BLOCK_N, ACTIVATION, row_layout)
        s_base, s32_base, z_base, s_offs, s32_offs, z_offs = _rs_scale_ptrs(
            s_ptr, z_ptr, expert, w_rows, w_rows, stride_se, stride_sn, stride_ze, stride_zn)
        acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, layout=mma_layout)
        # the second piece's accumulator (passed through the steps unread without one)
        mma_layout2: gl.constexpr = _rs_mma_layout_like(mma_layout, X_ROWS2)
        a_layout2: gl.constexpr = _rs_a_layout(mma_layout2)
        if X_ROWS2 > 0:
            acc2 = gl.zeros([BLOCK_N, X_ROWS2], gl.float32, layout=mma_layout2)
        else:
            acc2 = acc
        a1 = gl.zeros([BLOCK_N, BLOCK_K], vdtype, layout=a_layout)
        # two steps per iteration, each with its own A registers: a wgmma reads
        # its register operand while it runs, so step i + 1 must not dequantize
        # into the registers step i's wgmma may still be reading
        # PREFETCH_SCALES: the scales of a step pair are loaded one iteration
        # ahead, so their latency (an L2/DRAM round trip) hides behind the
        # previous pair's work instead of stalling its dequantization
        if PREFETCH_SCALES:
            sc0, zr0, sc1, zr1 = _rs_pair_scales(
                kstep0, s_base, s32_base, z_base, s_offs, s32_offs, z_offs,
                stride_sg, stride_zg, vdtype, HAS_ZEROS, SCALE_PAIRS, GROUP_SIZE,
                BLOCK_K)
        for i in range(0, num_steps, 2):
            if PREFETCH_SCALES:
                nsc0, nzr0, nsc1, nzr1 = _rs_pair_scales(
                    kstep0 + gl.minimum(i + 2, num_steps - 2), s_base, s32_base,
                    z_base, s_offs, s32_offs, z_offs, stride_sg, stride_zg, vdtype,
                    HAS_ZEROS, SCALE_PAIRS, GROUP_SIZE, BLOCK_K)
            else:
                sc0, zr0, sc1, zr1 = _rs_pair_scales(
                    kstep0 + i, s_base, s32_base, z_base, s_offs, s32_offs, z_offs,
                    stride_sg, stride_zg, vdtype, HAS_ZEROS, SCALE_PAIRS,
                    GROUP_SIZE, BLOCK_K)
            # ring fills of steps i and i + 1 (one fill with PAIRED)
            fill0 = ring + i // STEPS
            fill1 = ring + (i + 1) // STEPS
            a0 = _rs_step_operand(fill0, wd_bufs, x_ready_bars, sc0, zr0, bias,
                                  vdtype, HAS_ZEROS, IS_FP16, A_SORTED, BLOCK_N,
                                  BLOCK_K, STAGES, PAIRED, 0, pairs_layout,
                                  row_layout, a_layout)
            acc, acc2, a1 = _rs_step_mmas(a0, a1, acc, acc2, x_bufs, fill0, BLOCK_K,
                                            STAGES, PAIRED, 0, X_ROWS, X_ROWS2, IN_FLIGHT,
                                            IN_FLIGHT2, a_layout2)
            if i > 0:
                # the stage of step i - 1 (with PAIRED: of steps i - 2, i - 1)
                async_copy.mbarrier_arrive(empty_bars.index((fill0 - 1) % STAGES),
                                           increment_count=False)
            a1 = _rs_step_operand(fill1, wd_bufs, x_ready_bars, sc1, zr1,
                                  bias, vdtype, HAS_ZEROS, IS_FP16, A_SORTED,
                                  BLOCK_N, BLOCK_K, STAGES, PAIRED, 1,
                                  pairs_layout, row_layout, a_layout)
            acc, acc2, a0 = _rs_step_mmas(a1, a0, acc, acc2, x_bufs, fill1, BLOCK_K,
                                            STAGES, PAIRED, 1, X_ROWS, X_ROWS2, IN_FLIGHT,
                                            IN_FLIGHT2, a_layout2)
            if not PAIRED:
                # step i's stage (with PAIRED step i + 1's wgmma still reads it)
                async_copy.mbarrier_arrive(empty_bars.index(fill0 % STAGES),
                                           increment_count=False)
            if PREFETCH_SCALES:
                sc0, zr0, sc1, zr1 = nsc0, nzr0, nsc1, nzr1
        if X_ROWS2 > 0:
            acc, acc2, a1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc2, a1))
        else:
            acc, a1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a1))
        last = ring + (num_steps - 1) // STEPS
        async_copy.mbarrier_arrive(empty_bars.index(last % STAGES),
                                   increment_count=False)
        if X_ROWS2 == 0:
            acc2 = acc
        return acc, acc2

    @gluon.jit
    def _rs_step_mmas(a, other, acc, acc2, x_bufs, fill, BLOCK_K: gl.constexpr,
                      STAGES: gl.constexpr, PAIRED: gl.constexpr, HALF: gl.constexpr,
                      X_ROWS: gl.constexpr, X_ROWS2: gl.constexpr, IN_FLIGHT: gl.constexpr,
                      IN_FLIGHT2: gl.constexpr, a_layout2: gl.constexpr):
        """A step's wgmma of :func:`_rs_unit_acc` from operand ``a`` into ``acc`` (and with
        ``X_ROWS2`` > 0 the second piece's into ``acc2``), then the wait that leaves this
        step's in flight (``IN_FLIGHT``, or ``IN_FLIGHT2`` pairs) and retires the previous
        step's, which read ``other``; returns ``acc, acc2, other`` (``acc2`` as given
        without a second piece)."""
        acc = warpgroup_mma(a, _rs_step_x(x_bufs, fill, BLOCK_K, STAGES, PAIRED, HALF,
                                          ROWS=X_ROWS), acc, is_async=True)
        if X_ROWS2 > 0:
            acc2 = warpgroup_mma(gl.convert_layout(a, a_layout2, assert_trivial=True),
                                 _rs_step_x(x_bufs, fill, BLOCK_K, STAGES, PAIRED, HALF,
                                            ROWS=X_ROWS2, ROW0=X_ROWS), acc2, is_async=True)
            acc, acc2, other = warpgroup_mma_wait(num_outstanding=2 * IN_FLIGHT2,
                                                  deps=(acc, acc2, other))
        else:
            acc, other = warpgroup_mma_wait(num_outstanding=IN_FLIGHT, deps=(acc, other))
        return acc, acc2, other

    @gluon.jit
    def _rs_scaled_step(acc, p, acc2, p2, fill, x_bufs, wd_bufs, x_ready_bars, sc, zr, bias,
                        HALF: gl.constexpr, HAS_ZEROS: gl.constexpr, IS_FP16: gl.constexpr,
                        A_SORTED: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                        STAGES: gl.constexpr, PAIRED: gl.constexpr, vdtype: gl.constexpr,
                        pairs_layout: gl.constexpr, row_layout: gl.constexpr,
                        a_layout: gl.constexpr, SUBS: gl.constexpr,
                        X_ROWS: gl.constexpr, X_ROWS2: gl.constexpr,
                        mma_layout2: gl.constexpr):
        """One step of :func:`_rs_unit_acc_scaled`: the K step of ring fill ``fill`` (with
        ``PAIRED`` its half ``HALF``) into a fresh partial ``p`` (``use_acc=False``),
        retired, then ``acc += sc * p`` (``sc``: the step's scales in the accumulator's row
        layout; ``zr``: its raw zero points in the operand's); returns ``acc, p, acc2, p2``
        (with ``X_ROWS2`` > 0 the same for the second piece's ``acc2, p2``, in
        ``mma_layout2``, else those two as given). With ``SUBS`` > 1 the step is that many
        wgmmas of ``BLOCK_K / SUBS`` columns into the partial, one after the other, each
        from an operand of that width (``pairs_layout`` is that width's): fewer registers,
        one more wait."""
        a_layout2: gl.constexpr = _rs_a_layout(mma_layout2)
        for sub in gl.static_range(SUBS):
            a = _rs_step_operand(fill, wd_bufs, x_ready_bars, sc, zr, bias, vdtype,
                                 HAS_ZEROS, IS_FP16, A_SORTED, BLOCK_N, BLOCK_K, STAGES, PAIRED,
                                 HALF, pairs_layout, row_layout, a_layout, False, SUBS, sub)
            p = warpgroup_mma(a, _rs_step_x(x_bufs, fill, BLOCK_K, STAGES, PAIRED, HALF, SUBS,
                                            sub, X_ROWS), p, use_acc=sub > 0, is_async=True)
            if X_ROWS2 > 0:
                p2 = warpgroup_mma(gl.convert_layout(a, a_layout2, assert_trivial=True),
                                   _rs_step_x(x_bufs, fill, BLOCK_K, STAGES, PAIRED, HALF, SUBS,
                                              sub, X_ROWS2, X_ROWS), p2, use_acc=sub > 0,
                                   is_async=True)
                p, p2, a = warpgroup_mma_wait(num_outstanding=0, deps=(p, p2, a))
            else:
                p, a = warpgroup_mma_wait(num_outstanding=0, deps=(p, a))
        acc += p * sc.to(gl.float32)[:, None]
        if X_ROWS2 > 0:
            rows2: gl.constexpr = gl.SliceLayout(1, mma_layout2)
            sc2 = gl.convert_layout(sc, rows2, assert_trivial=True)
            acc2 += p2 * sc2.to(gl.float32)[:, None]
        return acc, p, acc2, p2

    @gluon.jit
    def _rs_unit_acc_scaled(x_bufs, wd_bufs, empty_bars, x_ready_bars, s_ptr, z_ptr, expert,
                            n0, up_offset, kstep0, num_steps, ring, bias, stride_se,
                            stride_sn, stride_sg, stride_ze, stride_zn, stride_zg,
                            GROUP_SIZE: gl.constexpr, HAS_ZEROS: gl.constexpr,
                            SCALE_PAIRS: gl.constexpr, ACTIVATION: gl.constexpr,
                            IS_FP16: gl.constexpr, A_SORTED: gl.constexpr,
                            BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr,
                            BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                            PAIRED: gl.constexpr, vdtype: gl.constexpr,
                            a_layout: gl.constexpr, mma_layout: gl.constexpr,
                            SUBS: gl.constexpr, X_ROWS: gl.constexpr = 0,
                            X_ROWS2: gl.constexpr = 0):
        """:func:`_rs_unit_acc` with the scales on the accumulator (``SCALE_ACC``): each
        step's operand is the exact ``v - z`` in 16 bits (no multiply a value pair), its
        wgmma writes a fresh float32 partial sum, which is retired (``wait(0)``) and added to
        the tile's sum times the step's scales: one FMA an accumulator element and step
        instead of one packed multiply a value pair (a quarter of the dequantization's
        instructions), and the weights are no longer rounded to 16 bits after scaling.

        One operand register set and a wait a step, so a warpgroup's wgmma overlaps the other
        warpgroups' dequantization, not its own: ptxas serializes every wgmma when a second
        operand set and the partial do not fit the consumer's registers (C7511), and when a
        partial is read while another wgmma may still run (C7514). It pays with four
        consumer warpgroups (``num_warps`` 16, one SM's 96 registers a thread), whose
        sixteen warps hide each other's waits (benchmarks/notes_prefill.md, session 45).
        A step pair's scales are loaded at its start, as few loads as the group size allows
        (:func:`_rs_pair_scales`, ``PREFETCH_SCALES`` does not apply): the first step's
        dequantization and wgmma cover their latency."""
        STEPS: gl.constexpr = 2 if PAIRED else 1  # K steps a stage holds
        acc_rows: gl.constexpr = gl.SliceLayout(1, mma_layout)
        # the operand's layouts at its width (BLOCK_K / SUBS columns)
        pairs_layout: gl.constexpr = _rs_pairs_layout(BLOCK_N, BLOCK_K // SUBS,
                                                      a_layout).type.layout
        row_layout: gl.constexpr = _rs_row_layout(pairs_layout)
        # the scales in the accumulator's row layout, the zero points in the operand's
        s_base, s32_base, z_base, sa_offs, s32_offs, z_offs = _rs_scale_ptrs(
            s_ptr, z_ptr, expert, _rs_tile_rows(n0, up_offset, BLOCK_N, ACTIVATION, acc_rows),
            _rs_tile_rows(n0, up_offset, BLOCK_N, ACTIVATION, row_layout), stride_se,
            stride_sn, stride_ze, stride_zn)
        acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, layout=mma_layout)
        p = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, layout=mma_layout)  # a step's partial
        # the second piece's accumulators' layout (mma_layout without one)
        mma_layout2: gl.constexpr = _rs_mma_layout_like(mma_layout, X_ROWS2)
        if X_ROWS2 > 0:  # the second piece's sum and partial
            acc2 = gl.zeros([BLOCK_N, X_ROWS2], gl.float32, layout=mma_layout2)
            p2 = gl.zeros([BLOCK_N, X_ROWS2], gl.float32, layout=mma_layout2)
        else:  # passed through the steps unread
            acc2 = acc
            p2 = p
        for i in range(0, num_steps, 2):
            sc0, zr0, sc1, zr1 = _rs_pair_scales(
                kstep0 + i, s_base, s32_base, z_base, sa_offs, s32_offs, z_offs, stride_sg,
                stride_zg, vdtype, HAS_ZEROS, SCALE_PAIRS, GROUP_SIZE, BLOCK_K)
            fill0 = ring + i // STEPS
            fill1 = ring + (i + 1) // STEPS
            acc, p, acc2, p2 = _rs_scaled_step(
                acc, p, acc2, p2, fill0, x_bufs, wd_bufs, x_ready_bars, sc0, zr0, bias, 0,
                HAS_ZEROS, IS_FP16, A_SORTED, BLOCK_N, BLOCK_K, STAGES, PAIRED, vdtype,
                pairs_layout, row_layout, a_layout, SUBS, X_ROWS, X_ROWS2, mma_layout2)
            if not PAIRED:
                async_copy.mbarrier_arrive(empty_bars.index(fill0 % STAGES),
                                           increment_count=False)
            acc, p, acc2, p2 = _rs_scaled_step(
                acc, p, acc2, p2, fill1, x_bufs, wd_bufs, x_ready_bars, sc1, zr1, bias, 1,
                HAS_ZEROS, IS_FP16, A_SORTED, BLOCK_N, BLOCK_K, STAGES, PAIRED, vdtype,
                pairs_layout, row_layout, a_layout, SUBS, X_ROWS, X_ROWS2, mma_layout2)
            # step i + 1's stage (with PAIRED: the stage of both)
            async_copy.mbarrier_arrive(empty_bars.index(fill1 % STAGES),
                                       increment_count=False)
        if X_ROWS2 == 0:
            acc2 = acc
        return acc, acc2

    @gluon.jit
    def _tile_result(acc, topk_weights_ptr, sorted_ids_ptr, row0, num_valid_slots,
                     MUL_ROUTED_WEIGHT: gl.constexpr, ACTIVATION: gl.constexpr,
                     BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_N_OUT: gl.constexpr,
                     mma_layout: gl.constexpr):
        """A tile's float32 result ``[BLOCK_N_OUT, BLOCK_T]`` from its accumulator ``[BLOCK_N,
        BLOCK_T]`` (in ``mma_layout``; slots of block ``row0`` as columns): times the router
        weight (``MUL_ROUTED_WEIGHT``), then ``act(gate) * up`` (``ACTIVATION``: rows ``16b +
        j`` gate and ``16b + 8 + j`` up give output row ``8b + j``). Shared with the mma
        kernel of :mod:`~w4a16moe.kernels.prefill_mma`."""
        if MUL_ROUTED_WEIGHT:
            t = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, mma_layout))
            slots = gl.load(sorted_ids_ptr + row0 + t)
            rw = gl.load(topk_weights_ptr + slots, mask=slots < num_valid_slots,
                         other=0.0).to(gl.float32)
            acc = acc * rw[None, :]
        if ACTIVATION != 0:
            acc4 = gl.permute(gl.reshape(acc, [BLOCK_N // 16, 2, 8, BLOCK_T]),
                              (0, 2, 3, 1))
            gate, up = gl.split(acc4)
            res = gl.reshape(_act(gate, ACTIVATION) * up, [BLOCK_N_OUT, BLOCK_T])
        else:
            res = acc
        return res

    @gluon.jit
    def _rs_epilogue(acc, c_ptrs, c_mask, topk_weights_ptr, sorted_ids_ptr, row0,
                     num_valid_slots, MUL_ROUTED_WEIGHT: gl.constexpr,
                     ACTIVATION: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr,
                     BLOCK_N_OUT: gl.constexpr, mma_layout: gl.constexpr,
                     out_layout: gl.constexpr):
        """A tile's epilogue: :func:`_tile_result`, then the store of the real slots' rows."""
        res = _tile_result(acc, topk_weights_ptr, sorted_ids_ptr, row0, num_valid_slots,
                           MUL_ROUTED_WEIGHT, ACTIVATION, BLOCK_T, BLOCK_N, BLOCK_N_OUT,
                           mma_layout)
        gl.store(c_ptrs, gl.convert_layout(res.to(c_ptrs.dtype.element_ty), out_layout),
                 mask=c_mask)

    @gluon.jit
    def _rs_unit(x_bufs, wd_bufs, empty_bars, x_ready_bars, c_ptrs, c_mask, s_ptr, z_ptr,
                 topk_weights_ptr, sorted_ids_ptr, expert, row0, n0, up_offset, kstep0,
                 num_steps, ring, bias, stride_se, stride_sn, stride_sg, stride_ze, stride_zn,
                 stride_zg, num_valid_slots, GROUP_SIZE: gl.constexpr, HAS_ZEROS: gl.constexpr,
                 SCALE_PAIRS: gl.constexpr, ACTIVATION: gl.constexpr,
                 MUL_ROUTED_WEIGHT: gl.constexpr, IS_FP16: gl.constexpr,
                 A_SORTED: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_N_OUT: gl.constexpr,
                 BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                 PREFETCH_SCALES: gl.constexpr, PAIRED: gl.constexpr, num_warps: gl.constexpr,
                 SCALE_ACC: gl.constexpr, X_ROWS: gl.constexpr, X_ROWS2: gl.constexpr = 0,
                 c_ptrs2=None, c_mask2=None):
        """One whole unit of a valid expert on ``BLOCK_T`` token columns: its K loop
        (:func:`_rs_unit_acc`) and its epilogue into ``c_ptrs`` (:func:`_rs_out_tile` at that
        width; with ``X_ROWS`` > 0 the wgmmas read the first ``X_ROWS`` = ``BLOCK_T`` rows of
        larger staged activation tiles). ``X_ROWS2`` > 0: the block's ``X_ROWS2`` slots after
        those as a second piece from the same operands, stored into ``c_ptrs2`` (the tile's
        pointers at that width from position ``row0 + X_ROWS``)."""
        mma_layout: gl.constexpr = _rs_mma_layout(num_warps, BLOCK_T)
        a_layout: gl.constexpr = _rs_a_layout(mma_layout)
        pairs_layout: gl.constexpr = _rs_pairs_layout(BLOCK_N, BLOCK_K, a_layout).type.layout
        row_layout: gl.constexpr = _rs_row_layout(pairs_layout)
        out_layout: gl.constexpr = _rs_out_layout(num_warps, BLOCK_T)
        vdtype: gl.constexpr = gl.float16 if IS_FP16 else gl.bfloat16
        acc, acc2 = _rs_unit_acc(
            x_bufs, wd_bufs, empty_bars, x_ready_bars, s_ptr, z_ptr, expert, n0, up_offset,
            kstep0, num_steps, ring, bias, stride_se, stride_sn, stride_sg, stride_ze,
            stride_zn, stride_zg, GROUP_SIZE, HAS_ZEROS, SCALE_PAIRS, ACTIVATION, IS_FP16,
            A_SORTED, BLOCK_T, BLOCK_N, BLOCK_K, STAGES, PREFETCH_SCALES, PAIRED, vdtype,
            pairs_layout, row_layout, a_layout, mma_layout, SCALE_ACC, X_ROWS, X_ROWS2)
        _rs_epilogue(acc, c_ptrs, c_mask, topk_weights_ptr, sorted_ids_ptr, row0,
                     num_valid_slots, MUL_ROUTED_WEIGHT, ACTIVATION, BLOCK_T, BLOCK_N,
                     BLOCK_N_OUT, mma_layout, out_layout)
        if X_ROWS2 > 0:
            mma_layout2: gl.constexpr = _rs_mma_layout_like(mma_layout, X_ROWS2)
            out_layout2: gl.constexpr = _rs_out_layout(num_warps, X_ROWS2)
            _rs_epilogue(acc2, c_ptrs2, c_mask2, topk_weights_ptr, sorted_ids_ptr,
                         row0 + X_ROWS, num_valid_slots, MUL_ROUTED_WEIGHT, ACTIVATION, X_ROWS2,
                         BLOCK_N, BLOCK_N_OUT, mma_layout2, out_layout2)

    @gluon.jit
    def _rs_part_unit(x_bufs, wd_bufs, empty_bars, x_ready_bars, c_base, s_ptr, z_ptr,
                      topk_weights_ptr, sorted_ids_ptr, expert, row0, n0, up_offset, kstep0,
                      num_steps, ring, bias, stride_cm, stride_se, stride_sn, stride_sg,
                      stride_ze, stride_zn, stride_zg, num_valid_slots,
                      GROUP_SIZE: gl.constexpr, HAS_ZEROS: gl.constexpr,
                      SCALE_PAIRS: gl.constexpr, ACTIVATION: gl.constexpr,
                      MUL_ROUTED_WEIGHT: gl.constexpr, OUT_FRAG: gl.constexpr,
                      C_SORTED: gl.constexpr, IS_FP16: gl.constexpr, A_SORTED: gl.constexpr,
                      BLOCK_N_OUT: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                      STAGES: gl.constexpr, PREFETCH_SCALES: gl.constexpr,
                      PAIRED: gl.constexpr, num_warps: gl.constexpr, SCALE_ACC: gl.constexpr,
                      WIDTH: gl.constexpr, WIDTH2: gl.constexpr):
        """:func:`_rs_unit` of a block whose real slots all lie in its first ``WIDTH +
        WIDTH2`` positions: wgmmas of ``WIDTH`` columns on its first slots and, with
        ``WIDTH2`` > 0, of ``WIDTH2`` on the next (the same operands), each piece stored from
        its own output pointers (:func:`_rs_out_tile` at that width)."""
        out_layout: gl.constexpr = _rs_out_layout(num_warps, WIDTH)
        c_ptrs, c_mask = _rs_out_tile(c_base, sorted_ids_ptr, row0, n0, stride_cm,
                                      num_valid_slots, OUT_FRAG, C_SORTED, WIDTH, BLOCK_N_OUT,
                                      out_layout)
        if WIDTH2 > 0:
            out_layout2: gl.constexpr = _rs_out_layout(num_warps, WIDTH2)
            c_ptrs2, c_mask2 = _rs_out_tile(c_base, sorted_ids_ptr, row0 + WIDTH, n0,
                                            stride_cm, num_valid_slots, OUT_FRAG, C_SORTED,
                                            WIDTH2, BLOCK_N_OUT, out_layout2)
        else:
            c_ptrs2 = c_ptrs
            c_mask2 = c_mask
        _rs_unit(x_bufs, wd_bufs, empty_bars, x_ready_bars, c_ptrs, c_mask, s_ptr, z_ptr,
                 topk_weights_ptr, sorted_ids_ptr, expert, row0, n0, up_offset, kstep0,
                 num_steps, ring, bias, stride_se, stride_sn, stride_sg, stride_ze, stride_zn,
                 stride_zg, num_valid_slots, GROUP_SIZE, HAS_ZEROS, SCALE_PAIRS, ACTIVATION,
                 MUL_ROUTED_WEIGHT, IS_FP16, A_SORTED, WIDTH, BLOCK_N_OUT, BLOCK_N, BLOCK_K,
                 STAGES, PREFETCH_SCALES, PAIRED, num_warps, SCALE_ACC, WIDTH, WIDTH2, c_ptrs2,
                 c_mask2)

    @gluon.jit
    def _rs_consumer(x_bufs, wd_bufs, empty_bars, x_ready_bars, c_ptr, s_ptr, z_ptr,
                     topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
                     N, K, EM, num_valid_slots, up_offset, stride_cm, stride_cs, stride_se,
                     stride_sn, stride_sg, stride_ze, stride_zn, stride_zg,
                     GROUP_SIZE: gl.constexpr, HAS_ZEROS: gl.constexpr,
                     SCALE_PAIRS: gl.constexpr,
                     ACTIVATION: gl.constexpr, MUL_ROUTED_WEIGHT: gl.constexpr,
                     OUT_FRAG: gl.constexpr, A_SORTED: gl.constexpr, C_SORTED: gl.constexpr,
                     IS_FP16: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_N_OUT: gl.constexpr,
                     BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_SIZE_M: gl.constexpr,
                     STAGES: gl.constexpr, PREFETCH_SCALES: gl.constexpr,
                     SPLIT_K: gl.constexpr, PAIRED: gl.constexpr, num_warps: gl.constexpr,
                     SCALE_ACC: gl.constexpr, SHORT_T: gl.constexpr = 0,
                     QUARTER_T: gl.constexpr = 0):
        """Default partition: dequantize each step's words straight into the wgmma A-operand
        registers, wgmma against the staged activation tile, epilogue (with ``C_SORTED`` into
        row ``row0 + t``, the sorted position, instead of row ``slot``; with ``SPLIT_K`` > 1
        the unit's partial sums into ``C[split]``, ``stride_cs`` apart). With ``PAIRED`` the
        two steps of an iteration come from the two halves of one stage, which is released
        once the second step's wgmma is retired. ``SHORT_T`` > 0: a block whose real slots
        all lie in its first ``SHORT_T`` positions (the alignment puts a block's padding
        last, so its position ``SHORT_T`` tells) runs ``SHORT_T``-column wgmmas on those
        columns only, from the same ring stages: it costs its dequantization and ``SHORT_T /
        BLOCK_T`` of the multiply-adds (a second K loop in the code, chosen per unit).
        ``QUARTER_T`` > 0 (= ``BLOCK_T / 4``, with ``SHORT_T`` half the block): a block that
        fits its first quarter runs ``QUARTER_T``-column wgmmas, and one that fits three
        quarters (but not half) a ``SHORT_T``- and a ``QUARTER_T``-column wgmma a step from
        the same operand (:func:`_rs_part_unit`): two more K loops in the code."""
        out_layout: gl.constexpr = _rs_out_layout(num_warps, BLOCK_T)
        bias = 1024 if IS_FP16 else 128  # the magic exponent's value in vdtype

        num_pid_m = gl.cdiv(EM, BLOCK_T)
        num_pid_n = N // BLOCK_N_OUT
        num_post_padded = gl.load(num_post_padded_ptr)
        num_steps = K // BLOCK_K // SPLIT_K
        STEPS: gl.constexpr = 2 if PAIRED else 1  # K steps a stage holds
        ring = 0  # stages this program has consumed so far
        for unit in range(gl.program_id(0), num_pid_m * num_pid_n * SPLIT_K,
                          gl.num_programs(0)):
            pid_m, pid_n = _tile(unit // SPLIT_K, num_pid_m, num_pid_n, GROUP_SIZE_M)
            split = unit % SPLIT_K
            kstep0 = split * num_steps
            row0 = pid_m * BLOCK_T
            if row0 < num_post_padded:
                expert = gl.load(expert_ids_ptr + pid_m)
                n0 = pid_n * BLOCK_N_OUT
                c_base = c_ptr + split.to(gl.int64) * stride_cs
                c_ptrs, c_mask = _rs_out_tile(c_base, sorted_ids_ptr, row0, n0, stride_cm,
                                              num_valid_slots, OUT_FRAG, C_SORTED, BLOCK_T,
                                              BLOCK_N_OUT, out_layout)
                if expert == -1:
                    gl.store(c_ptrs, gl.zeros([BLOCK_N_OUT, BLOCK_T], c_ptr.dtype.element_ty,
                                              out_layout), mask=c_mask)
                else:
                    # constexpr SHORT_T / QUARTER_T of 0 drop their branches at compile
                    # time: one K loop, as without the keys
                    block_ids = sorted_ids_ptr + row0  # the block's slots, padding last
                    if QUARTER_T > 0 and gl.load(block_ids + QUARTER_T) >= num_valid_slots:
                        _rs_part_unit(
                            x_bufs, wd_bufs, empty_bars, x_ready_bars, c_base, s_ptr, z_ptr,
                            topk_weights_ptr, sorted_ids_ptr, expert, row0, n0, up_offset,
                            kstep0, num_steps, ring, bias, stride_cm, stride_se, stride_sn,
                            stride_sg, stride_ze, stride_zn, stride_zg, num_valid_slots,
                            GROUP_SIZE, HAS_ZEROS, SCALE_PAIRS, ACTIVATION, MUL_ROUTED_WEIGHT,
                            OUT_FRAG, C_SORTED, IS_FP16, A_SORTED, BLOCK_N_OUT, BLOCK_N, BLOCK_K,
                            STAGES, PREFETCH_SCALES, PAIRED, num_warps, SCALE_ACC, QUARTER_T, 0)
                    elif SHORT_T > 0 and gl.load(block_ids + SHORT_T) >= num_valid_slots:
                        _rs_part_unit(
                            x_bufs, wd_bufs, empty_bars, x_ready_bars, c_base, s_ptr, z_ptr,
                            topk_weights_ptr, sorted_ids_ptr, expert, row0, n0, up_offset,
                            kstep0, num_steps, ring, bias, stride_cm, stride_se, stride_sn,
                            stride_sg, stride_ze, stride_zn, stride_zg, num_valid_slots,
                            GROUP_SIZE, HAS_ZEROS, SCALE_PAIRS, ACTIVATION, MUL_ROUTED_WEIGHT,
                            OUT_FRAG, C_SORTED, IS_FP16, A_SORTED, BLOCK_N_OUT, BLOCK_N, BLOCK_K,
                            STAGES, PREFETCH_SCALES, PAIRED, num_warps, SCALE_ACC, SHORT_T, 0)
                    elif QUARTER_T > 0 and (gl.load(block_ids + SHORT_T + QUARTER_T)
                                            >= num_valid_slots):
                        _rs_part_unit(
                            x_bufs, wd_bufs, empty_bars, x_ready_bars, c_base, s_ptr, z_ptr,
                            topk_weights_ptr, sorted_ids_ptr, expert, row0, n0, up_offset,
                            kstep0, num_steps, ring, bias, stride_cm, stride_se, stride_sn,
                            stride_sg, stride_ze, stride_zn, stride_zg, num_valid_slots,
                            GROUP_SIZE, HAS_ZEROS, SCALE_PAIRS, ACTIVATION, MUL_ROUTED_WEIGHT,
                            OUT_FRAG, C_SORTED, IS_FP16, A_SORTED, BLOCK_N_OUT, BLOCK_N, BLOCK_K,
                            STAGES, PREFETCH_SCALES, PAIRED, num_warps, SCALE_ACC, SHORT_T,
                            QUARTER_T)
                    else:
                        _rs_unit(x_bufs, wd_bufs, empty_bars, x_ready_bars, c_ptrs, c_mask,
                                 s_ptr, z_ptr, topk_weights_ptr, sorted_ids_ptr, expert, row0,
                                 n0, up_offset, kstep0, num_steps, ring, bias, stride_se,
                                 stride_sn, stride_sg, stride_ze, stride_zn, stride_zg,
                                 num_valid_slots, GROUP_SIZE, HAS_ZEROS, SCALE_PAIRS,
                                 ACTIVATION, MUL_ROUTED_WEIGHT, IS_FP16, A_SORTED, BLOCK_T,
                                 BLOCK_N_OUT, BLOCK_N, BLOCK_K, STAGES, PREFETCH_SCALES, PAIRED,
                                 num_warps, SCALE_ACC, 0)
                    ring += num_steps // STEPS

    @gluon.jit
    def _sk_units(num_post_padded_ptr, N, BLOCK_T: gl.constexpr, BLOCK_N_OUT: gl.constexpr):
        """A ``STREAM_K`` launch's valid units: aligned blocks up to ``num_post_padded`` x
        output tiles (what :func:`_sk_cuts` and :func:`_sk_schedule` share out)."""
        return gl.cdiv(gl.load(num_post_padded_ptr), BLOCK_T) * (N // BLOCK_N_OUT)

    @gluon.jit
    def _sk_cuts(num_post_padded_ptr, N, K, BLOCK_T: gl.constexpr,
                 BLOCK_N_OUT: gl.constexpr, BLOCK_K: gl.constexpr):
        """Whether this ``STREAM_K`` launch cuts units into pieces (:func:`_sk_schedule`
        then says which; :func:`stream_k_cut_units` on the host): its last round of valid
        units would leave at least ``SK_MIN_SAVED`` granules a program idle. The same for
        every program and both partitions, which take the loops without STREAM_K when it is
        False."""
        units = _sk_units(num_post_padded_ptr, N, BLOCK_T, BLOCK_N_OUT)
        nprog = gl.num_programs(0)
        rest = units % nprog
        return (rest > 0) & ((nprog - rest) * (K // BLOCK_K // 2) >= _SK_MIN_SAVED * nprog)

    @gluon.jit
    def _sk_schedule(num_post_padded_ptr, N, K, BLOCK_T: gl.constexpr,
                     BLOCK_N_OUT: gl.constexpr, BLOCK_K: gl.constexpr):
        """This program's work in a ``STREAM_K`` launch that cuts (:func:`_sk_cuts`: its
        last round would leave at least :data:`SK_MIN_SAVED` granules of two K steps a
        program idle; the pieces loops run only then). The launch's valid units (aligned
        blocks up to ``num_post_padded`` x output tiles), ``U = F P + R`` for ``P``
        programs: the first ``F P`` go to the programs whole, units ``p, p + P, ...`` as
        without STREAM_K; the last ``R`` are split by K steps: their ``W = R G`` granules
        (``G`` a unit) in ``P' = min(P, R SK_PIECES)`` contiguous ranges ``[p W / P',
        (p + 1) W / P')`` of the first ``P'`` programs (Stream-K; a unit in at most
        ``SK_PIECES + 1`` pieces, whose sums one program adds up).

        Returns (tiles a block row, G, F, W, P', this program's granule range [t0, t1) of
        the last round's)."""
        num_pid_n = N // BLOCK_N_OUT
        g_unit = K // BLOCK_K // 2
        units = _sk_units(num_post_padded_ptr, N, BLOCK_T, BLOCK_N_OUT)
        p = gl.program_id(0)
        nprog = gl.num_programs(0)
        full = units // nprog
        rest = units - full * nprog
        w = rest * g_unit
        # at most SK_PIECES pieces a unit: fewer, longer pieces when few units remain
        tail_progs = gl.minimum(nprog, rest * _SK_PIECES)
        t0 = gl.minimum(p, tail_progs) * w // tail_progs
        t1 = gl.minimum(p + 1, tail_progs) * w // tail_progs
        return num_pid_n, g_unit, full, w, tail_progs, t0, t1

    @gluon.jit
    def _sk_piece(g, n_whole, full, g_unit, t0, t1, num_pid_n):
        """The piece at granule ``g`` of this program's walk (:func:`_sk_schedule`): whole
        units ``p, p + P, ...`` for its first ``n_whole`` granules, then its range ``[t0,
        t1)`` of the last round's. Returns (unit, its block and output tile, granule of the
        last round's W or 0, first and end granule of the piece within its unit)."""
        if g < n_whole:
            unit = gl.program_id(0) + (g // g_unit) * gl.num_programs(0)
            gu0 = 0
            gu1 = g_unit
            tg = 0
        else:
            tg = t0 + (g - n_whole)
            unit = full * gl.num_programs(0) + tg // g_unit
            gu0 = tg % g_unit
            gu1 = gl.minimum(g_unit, gu0 + (t1 - tg))
        return unit, unit // num_pid_n, unit % num_pid_n, tg, gu0, gu1

    @gluon.jit
    def _rs_loader_sk(a_ptr, a_desc, qw_ptr, w_desc, sorted_ids_ptr, expert_ids_ptr,
                      num_post_padded_ptr,
                      x_bufs, wd_bufs, wd_tma, empty_bars, x_ready_bars, N, K, EM,
                      num_valid_slots, top_k, up_offset, stride_am, stride_qe, stride_qn,
                      A_IS_SLOTS: gl.constexpr, ACTIVATION: gl.constexpr,
                      BLOCK_T: gl.constexpr, BLOCK_N_OUT: gl.constexpr, BLOCK_N: gl.constexpr,
                      BLOCK_K: gl.constexpr, STAGES: gl.constexpr, W_TMA: gl.constexpr,
                      A_SORTED: gl.constexpr, PAIRED: gl.constexpr):
        """The loader of a ``STREAM_K`` launch: :func:`_rs_loader_sk_pieces` when the launch
        cuts units (:func:`_sk_cuts`), else :func:`_rs_loader` (whole units, as without the
        flag)."""
        if _sk_cuts(num_post_padded_ptr, N, K, BLOCK_T, BLOCK_N_OUT, BLOCK_K):
            _rs_loader_sk_pieces(a_ptr, a_desc, qw_ptr, w_desc, sorted_ids_ptr, expert_ids_ptr,
                                 num_post_padded_ptr, x_bufs, wd_bufs, wd_tma, empty_bars,
                                 x_ready_bars, N, K, EM, num_valid_slots, top_k, up_offset,
                                 stride_am, stride_qe, stride_qn, A_IS_SLOTS, ACTIVATION,
                                 BLOCK_T, BLOCK_N_OUT, BLOCK_N, BLOCK_K, STAGES, W_TMA,
                                 A_SORTED, PAIRED)
        else:
            _rs_loader(a_ptr, a_desc, qw_ptr, w_desc, sorted_ids_ptr, expert_ids_ptr,
                       num_post_padded_ptr, x_bufs, wd_bufs, wd_tma, empty_bars, x_ready_bars,
                       N, K, EM, num_valid_slots, top_k, up_offset, stride_am, stride_qe,
                       stride_qn, A_IS_SLOTS, ACTIVATION, BLOCK_T, BLOCK_N_OUT, BLOCK_N,
                       BLOCK_K, 1, STAGES, W_TMA, A_SORTED, 1, PAIRED)

    @gluon.jit
    def _rs_loader_sk_pieces(a_ptr, a_desc, qw_ptr, w_desc, sorted_ids_ptr, expert_ids_ptr,
                             num_post_padded_ptr,
                             x_bufs, wd_bufs, wd_tma, empty_bars, x_ready_bars, N, K, EM,
                             num_valid_slots, top_k, up_offset, stride_am, stride_qe,
                             stride_qn, A_IS_SLOTS: gl.constexpr, ACTIVATION: gl.constexpr,
                             BLOCK_T: gl.constexpr, BLOCK_N_OUT: gl.constexpr,
                             BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                             STAGES: gl.constexpr, W_TMA: gl.constexpr,
                             A_SORTED: gl.constexpr, PAIRED: gl.constexpr):
        """:func:`_rs_loader` over this program's pieces (:func:`_sk_schedule`): whole units,
        then the K steps of the last round's units that fall in the program's range."""
        STEPS: gl.constexpr = 2 if PAIRED else 1  # K steps a stage holds
        num_pid_n, g_unit, full, w, tail_progs, t0, t1 = _sk_schedule(
            num_post_padded_ptr, N, K, BLOCK_T, BLOCK_N_OUT, BLOCK_K)
        n_whole = full * g_unit  # granules of the whole units, then the last round's
        ring = 0  # stages this program has filled so far
        g = 0
        while g < n_whole + (t1 - t0):
            _, pid_m, pid_n, _, gu0, gu1 = _sk_piece(g, n_whole, full, g_unit, t0, t1,
                                                     num_pid_n)
            kstep0 = 2 * gu0
            num_fills = 2 * (gu1 - gu0) // STEPS
            row0 = pid_m * BLOCK_T
            expert = gl.load(expert_ids_ptr + pid_m)
            if expert != -1:
                _rs_load_unit(a_ptr, a_desc, qw_ptr, w_desc, sorted_ids_ptr, x_bufs, wd_bufs,
                              wd_tma, empty_bars, x_ready_bars, num_valid_slots, top_k,
                              up_offset, stride_am, stride_qe, stride_qn, expert, pid_n, row0,
                              kstep0, num_fills, ring, A_IS_SLOTS, ACTIVATION, BLOCK_T,
                              BLOCK_N_OUT, BLOCK_N, BLOCK_K, STAGES, W_TMA, A_SORTED, PAIRED)
                ring += num_fills
            g += gu1 - gu0

    @gluon.jit
    def _rs_consumer_sk(x_bufs, wd_bufs, empty_bars, x_ready_bars, c_ptr, s_ptr, z_ptr,
                        topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
                        sk_partials_ptr, sk_counters_ptr,
                        N, K, EM, num_valid_slots, up_offset, stride_cm, stride_se,
                        stride_sn, stride_sg, stride_ze, stride_zn, stride_zg,
                        GROUP_SIZE: gl.constexpr, HAS_ZEROS: gl.constexpr,
                        SCALE_PAIRS: gl.constexpr,
                        ACTIVATION: gl.constexpr, MUL_ROUTED_WEIGHT: gl.constexpr,
                        OUT_FRAG: gl.constexpr, A_SORTED: gl.constexpr,
                        C_SORTED: gl.constexpr, IS_FP16: gl.constexpr, BLOCK_T: gl.constexpr,
                        BLOCK_N_OUT: gl.constexpr, BLOCK_N: gl.constexpr,
                        BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                        PREFETCH_SCALES: gl.constexpr, PAIRED: gl.constexpr,
                        num_warps: gl.constexpr, SCALE_ACC: gl.constexpr,
                        SHORT_T: gl.constexpr = 0, QUARTER_T: gl.constexpr = 0):
        """The consumer of a ``STREAM_K`` launch: :func:`_rs_consumer_sk_pieces` when the
        launch cuts units (:func:`_sk_cuts`, as the loader decides), else
        :func:`_rs_consumer` (whole units, as without the flag, with its short blocks:
        ``SHORT_T``, ``QUARTER_T``; the pieces run every block on all its columns)."""
        if _sk_cuts(num_post_padded_ptr, N, K, BLOCK_T, BLOCK_N_OUT, BLOCK_K):
            _rs_consumer_sk_pieces(x_bufs, wd_bufs, empty_bars, x_ready_bars, c_ptr, s_ptr,
                                   z_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
                                   num_post_padded_ptr, sk_partials_ptr, sk_counters_ptr, N, K,
                                   EM, num_valid_slots, up_offset, stride_cm, stride_se,
                                   stride_sn, stride_sg, stride_ze, stride_zn, stride_zg,
                                   GROUP_SIZE, HAS_ZEROS, SCALE_PAIRS, ACTIVATION,
                                   MUL_ROUTED_WEIGHT, OUT_FRAG, A_SORTED, C_SORTED, IS_FP16,
                                   BLOCK_T, BLOCK_N_OUT, BLOCK_N, BLOCK_K, STAGES,
                                   PREFETCH_SCALES, PAIRED, num_warps, SCALE_ACC)
        else:
            _rs_consumer(x_bufs, wd_bufs, empty_bars, x_ready_bars, c_ptr, s_ptr, z_ptr,
                         topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
                         N, K, EM, num_valid_slots, up_offset, stride_cm, 0, stride_se,
                         stride_sn, stride_sg, stride_ze, stride_zn, stride_zg, GROUP_SIZE,
                         HAS_ZEROS, SCALE_PAIRS, ACTIVATION, MUL_ROUTED_WEIGHT, OUT_FRAG,
                         A_SORTED, C_SORTED, IS_FP16, BLOCK_T, BLOCK_N_OUT, BLOCK_N, BLOCK_K,
                         1, STAGES, PREFETCH_SCALES, 1, PAIRED, num_warps, SCALE_ACC, SHORT_T,
                         QUARTER_T)

    @gluon.jit
    def _rs_consumer_sk_pieces(x_bufs, wd_bufs, empty_bars, x_ready_bars, c_ptr, s_ptr, z_ptr,
                               topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
                               num_post_padded_ptr, sk_partials_ptr, sk_counters_ptr,
                               N, K, EM, num_valid_slots, up_offset, stride_cm, stride_se,
                               stride_sn, stride_sg, stride_ze, stride_zn, stride_zg,
                               GROUP_SIZE: gl.constexpr, HAS_ZEROS: gl.constexpr,
                               SCALE_PAIRS: gl.constexpr,
                               ACTIVATION: gl.constexpr, MUL_ROUTED_WEIGHT: gl.constexpr,
                               OUT_FRAG: gl.constexpr, A_SORTED: gl.constexpr,
                               C_SORTED: gl.constexpr, IS_FP16: gl.constexpr,
                               BLOCK_T: gl.constexpr, BLOCK_N_OUT: gl.constexpr,
                               BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                               STAGES: gl.constexpr, PREFETCH_SCALES: gl.constexpr,
                               PAIRED: gl.constexpr, num_warps: gl.constexpr,
                               SCALE_ACC: gl.constexpr):
        """:func:`_rs_consumer` over this program's pieces (:func:`_sk_schedule`). A piece
        that is a whole unit ends as there. A piece of part of a unit stores its float32
        accumulator in its program's slot of ``sk_partials`` (``[2 P, BLOCK_N, BLOCK_T]``:
        slot ``2p`` for the program's first piece of the last round, ``2p + 1`` for its
        last), then adds its
        granules to the unit's counter (``sk_counters``, acq_rel, after a barrier over the
        consumer warps, as the decode kernel's split-K arrival). The piece whose granules
        complete the unit sums every piece's stored partial in program order (so the result
        does not depend on which piece came last), resets the counter and runs the
        epilogue."""
        mma_layout: gl.constexpr = _rs_mma_layout(num_warps, BLOCK_T)
        a_layout: gl.constexpr = _rs_a_layout(mma_layout)
        pairs_layout: gl.constexpr = _rs_pairs_layout(BLOCK_N, BLOCK_K, a_layout).type.layout
        row_layout: gl.constexpr = _rs_row_layout(pairs_layout)
        out_layout: gl.constexpr = _rs_out_layout(num_warps, BLOCK_T)
        vdtype: gl.constexpr = gl.float16 if IS_FP16 else gl.bfloat16
        bias = 1024 if IS_FP16 else 128  # the magic exponent's value in vdtype
        # a partial accumulator's elements, in the accumulator's own layout
        pr = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_layout))
        pt = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, mma_layout))
        p_offs = pr[:, None] * BLOCK_T + pt[None, :]
        TILE: gl.constexpr = BLOCK_N * BLOCK_T
        num_pid_n, g_unit, full, w, tail_progs, t0, t1 = _sk_schedule(
            num_post_padded_ptr, N, K, BLOCK_T, BLOCK_N_OUT, BLOCK_K)
        nprog = gl.num_programs(0)
        pid = gl.program_id(0)
        n_whole = full * g_unit  # granules of the whole units, then the last round's
        STEPS: gl.constexpr = 2 if PAIRED else 1  # K steps a stage holds
        ring = 0  # stages this program has consumed so far
        g = 0
        while g < n_whole + (t1 - t0):
            unit, pid_m, pid_n, tg, gu0, gu1 = _sk_piece(g, n_whole, full, g_unit, t0, t1,
                                                         num_pid_n)
            kstep0 = 2 * gu0
            num_steps = 2 * (gu1 - gu0)
            row0 = pid_m * BLOCK_T
            expert = gl.load(expert_ids_ptr + pid_m)
            n0 = pid_n * BLOCK_N_OUT
            c_ptrs, c_mask = _rs_out_tile(c_ptr, sorted_ids_ptr, row0, n0, stride_cm,
                                          num_valid_slots, OUT_FRAG, C_SORTED, BLOCK_T,
                                          BLOCK_N_OUT, out_layout)
            if expert == -1:
                if gu0 == 0:  # one piece of the unit writes its zeros
                    gl.store(c_ptrs, gl.zeros([BLOCK_N_OUT, BLOCK_T], c_ptr.dtype.element_ty,
                                              out_layout), mask=c_mask)
            else:
                acc, _ = _rs_unit_acc(
                    x_bufs, wd_bufs, empty_bars, x_ready_bars, s_ptr, z_ptr, expert, n0,
                    up_offset, kstep0, num_steps, ring, bias, stride_se, stride_sn, stride_sg,
                    stride_ze, stride_zn, stride_zg, GROUP_SIZE, HAS_ZEROS, SCALE_PAIRS,
                    ACTIVATION, IS_FP16, A_SORTED, BLOCK_T, BLOCK_N, BLOCK_K, STAGES,
                    PREFETCH_SCALES, PAIRED, vdtype, pairs_layout, row_layout, a_layout,
                    mma_layout, SCALE_ACC)
                ring += num_steps // STEPS
                finish = gu1 - gu0 == g_unit
                if gu1 - gu0 < g_unit:
                    # a part of the unit: store it, count its granules in
                    # (only the last round's units are cut, so tg is a granule of its W)
                    slot = 2 * pid + (tg != t0).to(gl.int32)
                    gl.store(sk_partials_ptr + slot.to(gl.int64) * TILE + p_offs, acc)
                    _cta_barrier()
                    done = gl.atomic_add(sk_counters_ptr + unit, gu1 - gu0, sem="acq_rel",
                                         scope="gpu")
                    finish = done + (gu1 - gu0) == g_unit
                    if finish:
                        # every piece's partial, in program order: the programs whose ranges
                        # meet the unit's granules [u G, (u + 1) G) of the last round's W
                        # (at most SK_PIECES + 2 programs meet it: all loads at once)
                        u0 = (unit - full * nprog) * g_unit
                        q0 = ((u0 + 1) * tail_progs - 1) // w
                        acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, layout=mma_layout)
                        for j in gl.static_range(_SK_PIECES + 2):
                            q = q0 + j
                            qs = q * w // tail_progs
                            meets = ((q < tail_progs) & (qs < u0 + g_unit)
                                     & ((q + 1) * w // tail_progs > qs))
                            qslot = 2 * q + (qs < u0).to(gl.int32)
                            acc += gl.load(sk_partials_ptr + qslot.to(gl.int64) * TILE
                                           + p_offs, mask=(p_offs < TILE) & meets,
                                           other=0.0, cache_modifier=".cg")
                        gl.store(sk_counters_ptr + unit, 0)
                if finish:
                    _rs_epilogue(acc, c_ptrs, c_mask, topk_weights_ptr, sorted_ids_ptr, row0,
                                 num_valid_slots, MUL_ROUTED_WEIGHT, ACTIVATION, BLOCK_T,
                                 BLOCK_N, BLOCK_N_OUT, mma_layout, out_layout)
            g += gu1 - gu0

    @gluon.jit
    def _prefill_rs_kernel(
        a_ptr, a_desc, qw_ptr, w_desc, s_ptr, z_ptr, c_ptr, topk_weights_ptr,
        sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr, sk_partials_ptr, sk_counters_ptr,
        N, K, EM, num_valid_slots, top_k, up_offset,
        stride_am, stride_qe, stride_qn, stride_se, stride_sn, stride_sg,
        stride_ze, stride_zn, stride_zg, stride_cm, stride_cs,
        GROUP_SIZE: gl.constexpr, A_IS_SLOTS: gl.constexpr, MUL_ROUTED_WEIGHT: gl.constexpr,
        HAS_ZEROS: gl.constexpr, SCALE_PAIRS: gl.constexpr, ACTIVATION: gl.constexpr,
        OUT_FRAG: gl.constexpr, A_SORTED: gl.constexpr, C_SORTED: gl.constexpr,
        IS_FP16: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_N_OUT: gl.constexpr,
        BLOCK_K: gl.constexpr, GROUP_SIZE_M: gl.constexpr, STAGES: gl.constexpr,
        W_TMA: gl.constexpr, PREFETCH_SCALES: gl.constexpr, SPLIT_K: gl.constexpr,
        LOADER_REGS: gl.constexpr, STRIPPED_WAITS: gl.constexpr, num_warps: gl.constexpr,
        PDL: gl.constexpr = False, PAIRED: gl.constexpr = False,
        STREAM_K: gl.constexpr = False, SCALE_ACC: gl.constexpr = False,
        SHORT_T: gl.constexpr = 0, QUARTER_T: gl.constexpr = 0,
    ):
        """C[slot, n] = sum_k A[row(slot), k] * W[e, n, k] over the tiles of this persistent
        program (see the module docstring); grid ``min(tiles, SMs)``, ``num_warps`` + the loader.

        ``STRIPPED_WAITS`` is not read here: it keys the compiled variants, since the
        launcher compiles the True one through
        :func:`~w4a16moe.kernels.membar.stripped_wait_barriers` (its PTX without the
        barriers in front of the consumer waits) and Triton's caches would not tell the two
        apart otherwise. ``PDL``: launched as a programmatic dependent (:mod:`.pdl`): wait for
        the kernel before to complete, then release the next. ``PAIRED``: each ring stage
        holds two K steps (``2 * BLOCK_K`` columns), so each weight row comes as one copy of
        ``BLOCK_K`` bytes instead of two of ``BLOCK_K / 2`` (``STAGES`` counts such pairs)."""
        if PDL:
            _wait_upstream_release_next()
        if ACTIVATION != 0:
            BLOCK_N: gl.constexpr = 2 * BLOCK_N_OUT
        else:
            BLOCK_N: gl.constexpr = BLOCK_N_OUT
        dtype: gl.constexpr = a_ptr.dtype.element_ty
        # K columns of one ring stage: one step, or two with PAIRED
        STAGE_K: gl.constexpr = 2 * BLOCK_K if PAIRED else BLOCK_K
        x_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, STAGE_K],
                                                                           dtype)
        x_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_T, STAGE_K], x_smem_layout)
        if W_TMA:
            # the TMA box [1, rows/8 (b), 1 or 2 (gate/up), 8 (j), words] lands as dense rows
            # 16b + 8h + j (with activation) or 8b + j, the loader's row order, with the
            # descriptor's swizzle (see weight_descriptor): 16-byte chunk c of row r at chunk
            # c ^ ((r // PER_PHASE) % MAX_PHASE), so the 8 rows a warp's quads read at once
            # fall in different banks
            ROW_BYTES: gl.constexpr = STAGE_K // 2
            if ROW_BYTES >= 32:
                wd_layout: gl.constexpr = gl.SwizzledSharedLayout(4, 128 // ROW_BYTES,
                                                                  ROW_BYTES // 16, [1, 0])
            else:
                wd_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
            wd_tma = gl.allocate_shared_memory(gl.int32, [STAGES] + w_desc.block_type.shape,
                                               w_desc.layout)
            wd_bufs = wd_tma._reinterpret(gl.int32, [STAGES, BLOCK_N, STAGE_K // 8], wd_layout)
        else:
            wd_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
            wd_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, STAGE_K // 8],
                                                wd_layout)
            wd_tma = wd_bufs
        # arrivals per stage: the 32 lanes' cp.asyncs (unless everything comes by TMA) and
        # one expect-tx arrival when anything does
        READY_ARRIVALS: gl.constexpr = (0 if A_SORTED and W_TMA else 32) + (
            1 if A_SORTED or W_TMA else 0)
        empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        x_ready_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1],
                                                 mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(empty_bars.index(s), count=num_warps * 32)
            mbarrier.init(x_ready_bars.index(s), count=READY_ARRIVALS)
        if STREAM_K:
            gl.warp_specialize([
                (_rs_consumer_sk, (x_bufs, wd_bufs, empty_bars, x_ready_bars, c_ptr, s_ptr,
                                   z_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
                                   num_post_padded_ptr, sk_partials_ptr, sk_counters_ptr, N, K,
                                   EM, num_valid_slots, up_offset, stride_cm, stride_se,
                                   stride_sn, stride_sg, stride_ze, stride_zn, stride_zg,
                                   GROUP_SIZE, HAS_ZEROS, SCALE_PAIRS, ACTIVATION,
                                   MUL_ROUTED_WEIGHT, OUT_FRAG, A_SORTED, C_SORTED, IS_FP16,
                                   BLOCK_T, BLOCK_N_OUT, BLOCK_N, BLOCK_K, STAGES,
                                   PREFETCH_SCALES, PAIRED, num_warps, SCALE_ACC, SHORT_T,
                                   QUARTER_T)),
                (_rs_loader_sk, (a_ptr, a_desc, qw_ptr, w_desc, sorted_ids_ptr, expert_ids_ptr,
                                 num_post_padded_ptr, x_bufs, wd_bufs, wd_tma, empty_bars,
                                 x_ready_bars, N, K, EM, num_valid_slots, top_k, up_offset,
                                 stride_am, stride_qe, stride_qn, A_IS_SLOTS, ACTIVATION,
                                 BLOCK_T, BLOCK_N_OUT, BLOCK_N, BLOCK_K, STAGES, W_TMA,
                                 A_SORTED, PAIRED)),
            ], [1], [LOADER_REGS])
        else:
            gl.warp_specialize([
                (_rs_consumer, (x_bufs, wd_bufs, empty_bars, x_ready_bars, c_ptr, s_ptr, z_ptr,
                                topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
                                num_post_padded_ptr, N, K, EM, num_valid_slots, up_offset,
                                stride_cm, stride_cs, stride_se, stride_sn, stride_sg,
                                stride_ze, stride_zn, stride_zg, GROUP_SIZE, HAS_ZEROS,
                                SCALE_PAIRS, ACTIVATION, MUL_ROUTED_WEIGHT, OUT_FRAG, A_SORTED,
                                C_SORTED, IS_FP16, BLOCK_T, BLOCK_N_OUT, BLOCK_N, BLOCK_K,
                                GROUP_SIZE_M, STAGES, PREFETCH_SCALES, SPLIT_K, PAIRED,
                                num_warps, SCALE_ACC, SHORT_T, QUARTER_T)),
                (_rs_loader, (a_ptr, a_desc, qw_ptr, w_desc, sorted_ids_ptr, expert_ids_ptr,
                              num_post_padded_ptr, x_bufs, wd_bufs, wd_tma, empty_bars,
                              x_ready_bars, N, K, EM, num_valid_slots, top_k, up_offset,
                              stride_am, stride_qe, stride_qn, A_IS_SLOTS, ACTIVATION, BLOCK_T,
                              BLOCK_N_OUT, BLOCK_N, BLOCK_K, GROUP_SIZE_M, STAGES, W_TMA,
                              A_SORTED, SPLIT_K, PAIRED)),
            ], [1], [LOADER_REGS])



# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
#: the tiles this kernel is built for (rows: weight rows per tile, gate + up with activation)
RS_BLOCK_T = (16, 32, 64, 128, 256)
RS_BLOCK_K = (32, 64, 128)
RS_ROWS = (128, 256)


def rs_tiles_unsupported(config: dict, activation: bool) -> str | None:
    """Why the tiles of an ``RS`` config are not ones the Gluon kernel is built for (whatever
    the GPU and tensors), or None. ``activation``: GEMM1 with the fused activation (twice
    ``BLOCK_SIZE_N`` weight rows)."""
    bt, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    rows = 2 * bn if activation else bn
    if bt not in RS_BLOCK_T or bk not in RS_BLOCK_K or rows not in RS_ROWS:
        return (f"tiles {bt}x{bn}x{bk}: expected BLOCK_SIZE_M in {RS_BLOCK_T}, BLOCK_SIZE_K in "
                f"{RS_BLOCK_K} and {rows} weight rows in {RS_ROWS}")
    warps = config.get("num_warps", 8)
    if rows < 16 * warps:
        return (f"tiles {bt}x{bn}x{bk}: {warps} consumer warps need at least {16 * warps} "
                f"weight rows (64 per warpgroup); found {rows}")
    if bt == 256 and (warps != 8 or rows != 128 or bk > 64):
        return (f"tiles {bt}x{bn}x{bk}: BLOCK_SIZE_M=256 needs 8 consumer warps, 128 weight "
                f"rows (one 64x256 wgmma accumulator per warpgroup) and BLOCK_SIZE_K <= 64; "
                f"found {warps} warps, {rows} rows, BLOCK_SIZE_K={bk}")
    if bk == 128 and (bt > 64 or rows * bt > 8192):
        return (f"tiles {bt}x{bn}x{bk}: BLOCK_SIZE_K=128 needs BLOCK_SIZE_M <= 64 and "
                f"{rows} weight rows x BLOCK_SIZE_M <= 8192 (registers)")
    return None


def gluon_unsupported(device: torch.device, *, min_major: int | None = None) -> str | None:
    """Why a Gluon kernel cannot run on ``device`` at all, or None: no Gluon, not an NVIDIA
    GPU, or not of compute capability 9.x (this module's wgmma kernel) or, with
    ``min_major``, not of that major or newer (the ``mma.sync`` kernel: 8)."""
    if not HAVE_GLUON:
        return "triton.experimental.gluon is not available"
    if device.type == "cuda" and torch.version.hip is None:
        major = torch.cuda.get_device_capability(device)[0]
        supported = major == 9 if min_major is None else major >= min_major
        if supported:
            return None
    need = "9.x" if min_major is None else f"{min_major}.0 or newer"
    return f"{device} is not a compute capability {need} NVIDIA GPU"


def rs_unsupported(*, device: torch.device, k: int, n_out: int, group_size: int, config: dict,
                   has_perm: bool, a_fragment_order: bool, atomic_topk_sum: bool,
                   activation: bool, a: torch.Tensor, out: torch.Tensor,
                   qweight: torch.Tensor) -> str | None:
    """Why an ``RS`` config cannot run this call on the Gluon kernel (the caller then runs the
    Triton kernel with the same tiles), or None when it can."""
    bn, bk = config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    split = config.get("SPLIT_K", 1)
    reason = gluon_unsupported(device) or rs_tiles_unsupported(config, activation)
    if reason is not None:
        return reason
    if k % (2 * bk * split) or group_size % bk:
        return (f"K={k} must be a multiple of 2*BLOCK_SIZE_K*SPLIT_K={2 * bk * split} and "
                f"G={group_size} of BLOCK_SIZE_K")
    if n_out % bn:
        return f"the output width {n_out} is not a multiple of BLOCK_SIZE_N={bn}"
    if a_fragment_order or has_perm or atomic_topk_sum:
        return ("it needs activations in natural order, no act-order perm and no atomic "
                "top-k sum")
    if (a.stride(1) != 1 or out.stride(-1) != 1 or qweight.stride(2) != 1 or a.stride(0) % 8
            or qweight.stride(1) % 4):
        return "a, out and qweight need unit column strides and 16-byte aligned rows"
    if max(a.numel(), out.numel()) >= 2**31:
        return "tensors of 2**31 elements or more (int32 offsets)"
    return None


def weight_tma_unsupported(qweight: torch.Tensor) -> str | None:
    """Why the packed words cannot be read with TMA (the loader then cp.asyncs them), or None:
    TMA needs a 16-byte aligned base and 16-byte multiples as expert and row strides (and so
    as the gate-to-up stride, ``up_offset`` rows)."""
    if qweight.data_ptr() % 16:
        return "qweight's base address is not 16-byte aligned"
    if qweight.stride(0) % 4 or qweight.stride(1) % 4 or qweight.stride(2) != 1:
        return f"qweight strides {tuple(qweight.stride())} are not multiples of 16 bytes"
    return None


def sorted_rows_unsupported(a: torch.Tensor, *, rows: int) -> str | None:
    """Why ``a`` cannot be read by TMA as ``rows`` activation rows in sorted order (the
    ``a_sorted`` mode of :func:`launch_prefill_rs`), or None."""
    if a.dim() != 2 or a.shape[0] < rows:
        return (f"a must be 2-D with at least {rows} rows (one per sorted position); found "
                f"{tuple(a.shape)}")
    if a.stride(1) != 1 or (a.stride(0) * a.element_size()) % 16 or a.data_ptr() % 16:
        return f"a (strides {tuple(a.stride())}) needs unit columns and 16-byte aligned rows"
    return None


def stage_columns(config: dict) -> int:
    """K columns one ring stage (one TMA box of words and of sorted activations) holds for
    an ``RS`` config: ``BLOCK_SIZE_K``, or twice that with ``PAIRED_STAGES``."""
    return config["BLOCK_SIZE_K"] * (2 if config.get("PAIRED_STAGES") else 1)


def weight_smem_layout(block_k: int):
    """The shared-memory layout of one K step of packed words as TMA writes it (5-D, see
    :func:`weight_descriptor`): swizzled by the row's width (32 or 64 bytes; the 16-byte rows
    of BLOCK_K=32 are not), which the kernel's view of the ring matches."""
    row_bytes = block_k // 2
    return gl.NVMMASharedLayout(swizzle_byte_width=row_bytes if row_bytes >= 32 else 0,
                                element_bitwidth=32, rank=5)


def activation_smem_layout(block_t: int, block_k: int, dtype: torch.dtype):
    """The shared-memory layout of a ``[BLOCK_T, BLOCK_K]`` activation tile that TMA writes
    (``a_sorted``) and the wgmma reads."""
    gdtype = gl.float16 if dtype == torch.float16 else gl.bfloat16
    return gl.NVMMASharedLayout.get_default_for([block_t, block_k], gdtype)


def weight_descriptor(qweight: torch.Tensor, *, n_out: int, up_offset: int, activation: bool,
                      block_n_out: int, block_k: int) -> TensorDescriptor:
    """The TMA descriptor of the packed words ``[E, N_w, K/8]`` as the 5-D view
    ``[E, n_out/8 (b), 2 or 1 (gate/up), 8 (j), K/8]`` whose box ``[1, BLOCK_N_OUT/8, 2 or 1,
    8, BLOCK_K/8]`` is one K step of a tile in the kernel's row order: with the activation,
    gate row ``8b + j`` at tile row ``16b + j`` and its up row (``+ up_offset``) at
    ``16b + 8 + j``; without, weight row ``8b + j``. Swizzled by the row's width (32 or 64
    bytes; BLOCK_K=32 rows of 16 bytes are not), which the kernel's view of the ring matches."""
    e, _, words = qweight.shape
    se, sn = qweight.stride(0), qweight.stride(1)
    halves = 2 if activation else 1
    layout = weight_smem_layout(block_k)
    return TensorDescriptor(qweight, [e, n_out // 8, halves, 8, words],
                            [se, 8 * sn, (up_offset if activation else 8) * sn, sn, 1],
                            [1, block_n_out // 8, halves, 8, block_k // 8], layout)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


#: Stream-K scratch per device: (float32 partials, int32 unit counters), grown on demand
_STREAM_K_SCRATCH: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def stream_k_sizes(config: dict, *, em: int, n_out: int, k: int, activation: bool,
                   sms: int) -> tuple[int, int, int]:
    """(programs, float32 partial elements, unit counters) of a ``STREAM_K`` launch over
    ``em`` aligned slots with ``sms`` SMs: a program for each SM (at most one per granule of
    two K steps), two ``[rows, BLOCK_SIZE_M]`` partial tiles a program, a counter a unit."""
    bt, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    units = -(-em // bt) * (n_out // bn)
    programs = max(1, min(units * (k // bk // 2), sms))
    rows = 2 * bn if activation else bn
    return programs, 2 * programs * rows * bt, units


def stream_k_cut_units(units: int, k_steps: int, programs: int) -> int:
    """How many of ``units`` valid units (aligned blocks x output tiles) of ``k_steps`` K
    steps each a ``STREAM_K`` launch on ``programs`` programs cuts into pieces: the last
    round's ``R = units mod P`` when that round would leave at least :data:`SK_MIN_SAVED`
    granules of two K steps a program idle (``(P - R) G >= SK_MIN_SAVED P``, ``G = k_steps
    // 2``), else 0 (every unit runs whole, as without the flag). The host's copy of
    ``_sk_cuts``' rule, for the tuner."""
    if units < 0 or k_steps < 1 or programs < 1:
        raise ValueError(f"units={units}, k_steps={k_steps}, programs={programs}; expected "
                         "units >= 0, k_steps >= 1 and programs >= 1")
    rest = units % programs
    saved = (programs - rest) * (k_steps // 2)
    return rest if rest > 0 and saved >= SK_MIN_SAVED * programs else 0


def stream_k_scratch(device: torch.device, partial_elems: int, units: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers of a ``STREAM_K`` launch on ``device``: at least ``partial_elems`` float32
    partial sums and ``units`` int32 counters, zero between launches (the program that
    completes a tile resets its counter). Kept per device and grown outside CUDA-graph
    capture (``HybridW4A16MoEExperts.reserve`` sizes them for its layer); launches on two
    streams at once must not share them."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cur = _STREAM_K_SCRATCH.get(index)
    if cur is None or cur[0].numel() < partial_elems or cur[1].numel() < units:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"a STREAM_K launch needs {partial_elems} partial sums and {units} counters, "
                "more than its scratch holds, during CUDA-graph capture; run the layer once "
                "at its largest size before capturing")
        old_p, old_c = cur if cur is not None else (None, None)
        cur = (torch.empty(max(partial_elems, 0 if old_p is None else old_p.numel()),
                           dtype=torch.float32, device=device),
               torch.zeros(max(units, 0 if old_c is None else old_c.numel()),
                           dtype=torch.int32, device=device))
        _STREAM_K_SCRATCH[index] = cur
    return cur


def launch_prefill_rs(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      zeros: torch.Tensor | None, out: torch.Tensor,
                      topk_weights: torch.Tensor | None, sorted_ids: torch.Tensor,
                      expert_ids: torch.Tensor, num_post_padded: torch.Tensor, *, n_out: int,
                      k: int, slots: int, top_k: int, up_offset: int, group_size: int,
                      a_is_slots: bool, activation_code: int, out_fragment_order: bool,
                      config: dict, weight_tma: bool | None = None, a_sorted: bool = False,
                      out_sorted: bool = False) -> None:
    """Run :func:`_prefill_rs_kernel`; inputs already validated by ``prefill_gemm`` and
    :func:`rs_unsupported`. ``weight_tma`` (default :data:`WEIGHT_TMA`): read the packed words
    with TMA where :func:`weight_tma_unsupported` allows, else with cp.async. ``a_sorted``:
    ``a`` holds one row per position of ``sorted_ids`` (padding included), read by TMA (see
    :func:`sorted_rows_unsupported`); ``out_sorted``: write ``out`` so (row ``i`` for position
    ``i``, ``out`` with ``sorted_ids.numel()`` rows) instead of one row per slot. With
    ``config["SPLIT_K"]`` > 1, ``out`` is ``[SPLIT_K, rows, n_out]`` (float32) and gets each K
    range's partial sums. ``config["PAIRED_STAGES"]``: each ring stage (``num_stages`` of
    them) holds two K steps, so the loader reads ``BLOCK_SIZE_K / 2``-byte runs of each
    weight row instead of ``BLOCK_SIZE_K / 4``-byte ones (HBM streams runs under 128 bytes a
    row at about two thirds of its rate: ``benchmarks/row_chunk_bandwidth.py``).
    ``config["SHORT_BLOCK_T"]``: blocks whose real slots all lie in their first that many
    positions multiply only those columns (see ``_rs_consumer``)."""
    bt, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    split = config.get("SPLIT_K", 1)
    stage_k = stage_columns(config)
    em = sorted_ids.numel()
    z = zeros if zeros is not None else qweight  # dummy pointer when absent
    tw = topk_weights if topk_weights is not None else scales
    units = -(-em // bt) * (n_out // bn) * split
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    grid = (min(units, _sm_count(index)),)
    activation = activation_code != 0
    stream_k = bool(config.get("STREAM_K", False))
    sk_partials = sk_counters = out  # dummy pointers without STREAM_K
    if stream_k:
        if (why := stream_k_conflict(config)) is not None:
            raise ValueError(why)
        # every SM, so that a last round of fewer units than SMs can be spread over all
        programs, partial_elems, units = stream_k_sizes(config, em=em, n_out=n_out, k=k,
                                                        activation=activation,
                                                        sms=_sm_count(index))
        grid = (programs,)
        sk_partials, sk_counters = stream_k_scratch(a.device, partial_elems, units)
    w_desc = None
    if weight_tma is None:
        weight_tma = WEIGHT_TMA
    if weight_tma and weight_tma_unsupported(qweight) is None:
        w_desc = weight_descriptor(qweight, n_out=n_out, up_offset=up_offset,
                                   activation=activation, block_n_out=bn, block_k=stage_k)
    a_desc = None
    if a_sorted:
        a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [bt, stage_k],
                                  activation_smem_layout(bt, stage_k, a.dtype))
    strip = STRIP_WAIT_BARRIERS
    with stripped_wait_barriers("_prefill_rs_kernel") if strip else contextlib.nullcontext():
        _prefill_rs_kernel[grid](
            a, a_desc, qweight, w_desc, scales, z, out, tw, sorted_ids, expert_ids,
            num_post_padded, sk_partials, sk_counters, n_out, k, em, slots, top_k, up_offset,
            a.stride(0), qweight.stride(0), qweight.stride(1),
            scales.stride(0), scales.stride(1), scales.stride(2),
            z.stride(0), z.stride(1), z.stride(2), out.stride(-2),
            out.stride(0) if split > 1 else 0,
            GROUP_SIZE=group_size, A_IS_SLOTS=a_is_slots,
            # two adjacent groups' scales as one 32-bit load (G == BLOCK_K, pairs 4-byte
            # aligned)
            SCALE_PAIRS=(group_size == bk and scales.stride(2) == 1
                         and scales.stride(1) % 2 == 0 and scales.stride(0) % 2 == 0
                         and scales.data_ptr() % 4 == 0),
            MUL_ROUTED_WEIGHT=topk_weights is not None, HAS_ZEROS=zeros is not None,
            ACTIVATION=activation_code, OUT_FRAG=out_fragment_order, A_SORTED=a_sorted,
            C_SORTED=out_sorted, IS_FP16=a.dtype == torch.float16, BLOCK_T=bt,
            BLOCK_N_OUT=bn, BLOCK_K=bk,
            GROUP_SIZE_M=config["GROUP_SIZE_M"], STAGES=config["num_stages"],
            W_TMA=w_desc is not None,
            PREFETCH_SCALES=bool(config.get("PREFETCH_SCALES", False)), SPLIT_K=split,
            LOADER_REGS=LOADER_REGS, STRIPPED_WAITS=strip, num_warps=config["num_warps"],
            PAIRED=bool(config.get("PAIRED_STAGES", False)), STREAM_K=stream_k,
            SCALE_ACC=scale_acc_wgmmas(config), SHORT_T=short_block_rows(config),
            QUARTER_T=quarter_block_rows(config),
            **prefill_pdl_args(a.device))
