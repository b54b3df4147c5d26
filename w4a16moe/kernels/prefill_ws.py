"""Warp-specialised prefill GEMM for Hopper (sm_90), written in Gluon.

The same grouped int4 GEMM as :func:`w4a16moe.kernels.prefill.prefill_gemm` (same packed
weights, same aligned blocks, same outputs), but each program is split into two partitions
that run at once on the SM:

* the **producer** (a worker partition of 4 warps) reads the packed words, the group scales and
  zero points and the gathered activation rows of K step ``i + 1`` from global memory while it
  dequantizes step ``i`` (two values per 32-bit op, PTX) and writes the bf16/fp16 weight tile
  and the activation tile into shared-memory stage ``i % STAGES``; then it fences the async
  proxy and arrives on that stage's *ready* barrier;
* the **consumer** (the default partition, one warpgroup) waits for a stage, issues the
  wgmma(s) on the two shared-memory tiles (weights as A ``[BLOCK_N, BLOCK_K]``, activations
  as B via a transposed view), waits for the previous step's wgmma and releases that stage
  through its *empty* barrier; after the loop it runs the epilogue (router weight, fused
  ``act(gate) * up``) and stores its tile.

The aim was to keep the tensor cores from waiting for the dequantization. Measured on the H100
(benchmarks/notes_prefill.md, session 6) it is correct and repeats bit for bit, but it is
faster than the tuned Triton configs only for Mixtral at M=4096 (GEMMs -4 to -7 %, where the
dense path is chosen anyway) and slower elsewhere, so no shipped config uses it.

One program computes ``C[slot, n0:n0 + BLOCK_N_OUT]`` for the ``BLOCK_T`` slots of one aligned
block (one expert). With ``ACTIVATION`` the weight tile holds ``BLOCK_N/2`` gate rows and the
matching ``BLOCK_N/2`` up rows (``+ up_offset``), the consumer keeps two accumulators and
stores ``act(gate) * up``. Shapes: A ``[M, K]`` (rows ``slot // top_k``) or ``[M*top_k, K]``
(``A_IS_SLOTS``); qweight int32 ``[E, N_w, K/8]``; scales ``[E, N_w, K/G]``; zeros uint8
``[E, N_w, K/G]``; C ``[M*top_k, N_out]``.

Supported here (:func:`ws_supported` says which calls qualify, the launcher falls back to the
Triton kernel otherwise): a CUDA device of compute capability 9.x, ``G`` a multiple of
``BLOCK_K``, K a multiple of ``BLOCK_K``, the output width a multiple of the tile, no act-order
``perm``, no fragment-order activations, no atomic top-k sum. Gluon does not run under the
Triton interpreter: the CPU tests check :func:`ws_supported` and the config rules; the
numerical tests of this kernel are GPU tests (``tests/test_prefill_ws.py``).
"""

from __future__ import annotations

import functools

import torch

try:  # Gluon ships with triton >= 3.5; without it the Triton kernel runs everything
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed triton
    HAVE_GLUON = False

#: warps of the producer partition (dequantization + activation staging)
PRODUCER_WARPS = 4
#: registers per thread granted to the producer partition by default (setmaxnreg)
PRODUCER_REGS = 128
#: stages of the dequantized weight ring (the copy ring has ``num_stages``)
W_STAGES = 2



if HAVE_GLUON:

    @gluon.jit
    def _act(x, ACTIVATION: gl.constexpr):
        """act(x) in fp32: 1 silu, 2 gelu (erf), 3 gelu (tanh approximation)."""
        if ACTIVATION == 1:
            y = x / (1.0 + gl.exp(-x))
        elif ACTIVATION == 2:
            y = 0.5 * x * (1.0 + gl.erf(x * 0.7071067811865476))
        else:
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            t = 1.0 - 2.0 / (gl.exp(2.0 * inner) + 1.0)
            y = 0.5 * x * (1.0 + t)
        return y

    @gluon.jit
    def _dequant_words(words, s, zb, IS_FP16: gl.constexpr):
        """``[R, C]`` int32 words (ExLlama order) -> ``[R, 8 C]`` values in K order.

        Values 2i and 2i+1 of a word sit at bits 4i and 16+4i, so ``(w >> 4i) & 0x000F000F |
        bias`` is a packed pair (bias + v); one packed subtract of (bias + z) and one packed
        multiply by the scale finish two values (``zb`` = bias + z in the value dtype).
        """
        if IS_FP16:
            v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t0, t1, t2, t3, w, zz, ss;
                mov.b32 zz, {$10, $10};
                mov.b32 ss, {$9, $9};
                lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xEA;
                shr.u32 w, $8, 4;
                lop3.b32 t1, w, 0x000F000F, 0x64006400, 0xEA;
                shr.u32 w, $8, 8;
                lop3.b32 t2, w, 0x000F000F, 0x64006400, 0xEA;
                shr.u32 w, $8, 12;
                lop3.b32 t3, w, 0x000F000F, 0x64006400, 0xEA;
                sub.f16x2 t0, t0, zz;
                sub.f16x2 t1, t1, zz;
                sub.f16x2 t2, t2, zz;
                sub.f16x2 t3, t3, zz;
                mul.f16x2 t0, t0, ss;
                mul.f16x2 t1, t1, ss;
                mul.f16x2 t2, t2, ss;
                mul.f16x2 t3, t3, ss;
                mov.b32 {$0, $1}, t0;
                mov.b32 {$2, $3}, t1;
                mov.b32 {$4, $5}, t2;
                mov.b32 {$6, $7}, t3;
                }""",
                constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
                args=[words, s, zb], dtype=(gl.float16,) * 8, is_pure=True, pack=1)
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t0, t1, t2, t3, w, nz, ss, one, n0;
                mov.b32 one, 0x3F803F80;
                mov.b32 n0, 0x80008000;
                mov.b32 nz, {$10, $10};
                xor.b32 nz, nz, 0x80008000;
                mov.b32 ss, {$9, $9};
                lop3.b32 t0, $8, 0x000F000F, 0x43004300, 0xEA;
                shr.u32 w, $8, 4;
                lop3.b32 t1, w, 0x000F000F, 0x43004300, 0xEA;
                shr.u32 w, $8, 8;
                lop3.b32 t2, w, 0x000F000F, 0x43004300, 0xEA;
                shr.u32 w, $8, 12;
                lop3.b32 t3, w, 0x000F000F, 0x43004300, 0xEA;
                fma.rn.bf16x2 t0, t0, one, nz;
                fma.rn.bf16x2 t1, t1, one, nz;
                fma.rn.bf16x2 t2, t2, one, nz;
                fma.rn.bf16x2 t3, t3, one, nz;
                fma.rn.bf16x2 t0, t0, ss, n0;
                fma.rn.bf16x2 t1, t1, ss, n0;
                fma.rn.bf16x2 t2, t2, ss, n0;
                fma.rn.bf16x2 t3, t3, ss, n0;
                mov.b32 {$0, $1}, t0;
                mov.b32 {$2, $3}, t1;
                mov.b32 {$4, $5}, t2;
                mov.b32 {$6, $7}, t3;
                }""",
                constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
                args=[words, s, zb], dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)
        # value j of word w goes to column 8w + j: three joins give [R, C, 2, 2, 2] whose
        # flattened last three dims run v0..v7
        even = gl.join(gl.join(v0, v4), gl.join(v2, v6))
        odd = gl.join(gl.join(v1, v5), gl.join(v3, v7))
        vals = gl.join(even, odd)
        return gl.reshape(vals, [words.shape[0], words.shape[1] * 8])

    @gluon.jit
    def _ws_tile(tile, num_pid_m, num_pid_n, GROUP_SIZE_M: gl.constexpr):
        """(pid_m, pid_n) of output tile ``tile``: GROUP_SIZE_M token blocks side by side per
        column band, so programs running at the same time share weight tiles in L2."""
        num_pid_in_group = GROUP_SIZE_M * num_pid_n
        group_id = tile // num_pid_in_group
        first_pid_m = group_id * GROUP_SIZE_M
        group_size_m = gl.minimum(num_pid_m - first_pid_m, GROUP_SIZE_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @gluon.jit
    def _ws_group_params(step, s_base, z_base, s_offs, z_offs, stride_sg, stride_zg, bias,
                         vdtype: gl.constexpr, HAS_ZEROS: gl.constexpr, BLOCK_N: gl.constexpr,
                         BLOCK_K: gl.constexpr, GROUP_SIZE: gl.constexpr, layout: gl.constexpr):
        """Scales and (bias + zero point) of K step ``step``'s group for the tile's rows."""
        g = (step * BLOCK_K) // GROUP_SIZE
        sc = gl.load(s_base + (s_offs + g * stride_sg))
        if HAS_ZEROS:
            zb = (gl.load(z_base + (z_offs + g * stride_zg)).to(gl.int32) + bias).to(vdtype)
        else:
            zb = gl.full([BLOCK_N], bias + 8, vdtype, layout=gl.SliceLayout(1, layout))
        return sc, zb

    @gluon.jit
    def _ws_issue_copies(step, ring_step, a_ptr, qw_ptr, x_offs, w_offs, x_bufs, wd_bufs,
                         empty_bars, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """cp.async of K step ``step``'s activation tile and packed words into the copy-ring
        stage of ``ring_step`` (the running step count), once the consumer released it."""
        stage = ring_step % STAGES
        mbarrier.wait(empty_bars.index(stage), ((ring_step // STAGES) & 1) ^ 1)
        k0 = step * BLOCK_K
        async_copy.async_copy_global_to_shared(x_bufs.index(stage), a_ptr + (x_offs + k0))
        async_copy.async_copy_global_to_shared(wd_bufs.index(stage),
                                               qw_ptr + (w_offs + k0 // 8))

    @gluon.jit
    def _ws_producer(a_ptr, qw_ptr, s_ptr, z_ptr, sorted_ids_ptr, expert_ids_ptr,
                     num_post_padded_ptr, w_bufs, x_bufs, wd_bufs, empty_bars, w_empty_bars,
                     ready_bars, N, K, EM, num_valid_slots, top_k, up_offset, stride_am,
                     stride_qe, stride_qn, stride_se, stride_sn, stride_sg, stride_ze,
                     stride_zn, stride_zg,
                     GROUP_SIZE: gl.constexpr, A_IS_SLOTS: gl.constexpr,
                     HAS_ZEROS: gl.constexpr, ACTIVATION: gl.constexpr, IS_FP16: gl.constexpr,
                     BLOCK_T: gl.constexpr, BLOCK_N_OUT: gl.constexpr, BLOCK_N: gl.constexpr,
                     BLOCK_K: gl.constexpr, GROUP_SIZE_M: gl.constexpr, STAGES: gl.constexpr,
                     W_STAGES: gl.constexpr, PRODUCER_WARPS: gl.constexpr):
        """Worker partition, over this program's tiles: copy the activation tiles and packed
        words of K step i + STAGES - 1 into the copy ring (cp.async) while it dequantizes step
        i's words into the weight ring; see the module docstring."""
        WORDS: gl.constexpr = BLOCK_K // 8
        # words: a thread holds single words of several rows; a row's words lie in WORDS lanes
        w_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32 // WORDS, WORDS],
                                                  [PRODUCER_WARPS, 1], [1, 0])
        # words copy: 16-byte chunks (4 words)
        wc_layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (WORDS // 4), WORDS // 4],
                                                   [PRODUCER_WARPS, 1], [1, 0])
        # activations: 16-byte chunks, a row's BLOCK_K values over BLOCK_K / 8 lanes
        x_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // WORDS, WORDS],
                                                  [PRODUCER_WARPS, 1], [1, 0])
        HALF: gl.constexpr = BLOCK_N // 2
        if IS_FP16:
            bias = 1024
            vdtype = gl.float16
        else:
            bias = 128
            vdtype = gl.bfloat16

        num_pid_m = gl.cdiv(EM, BLOCK_T)
        num_pid_n = N // BLOCK_N_OUT
        num_post_padded = gl.load(num_post_padded_ptr)
        num_steps = K // BLOCK_K
        ring = 0  # K steps this program has put through the rings so far
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _ws_tile(tile, num_pid_m, num_pid_n, GROUP_SIZE_M)
            row0 = pid_m * BLOCK_T
            expert = gl.load(expert_ids_ptr + pid_m, mask=row0 < num_post_padded, other=-1)
            if expert != -1:
                e64 = expert.to(gl.int64)
                n0 = pid_n * BLOCK_N_OUT
                # weight rows of the tile (gate rows, then the matching up rows)
                r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_layout))
                if ACTIVATION != 0:
                    w_rows = gl.where(r < HALF, n0 + r, up_offset + n0 + r - HALF)
                else:
                    w_rows = n0 + r
                s_base = s_ptr + e64 * stride_se
                z_base = z_ptr + e64 * stride_ze
                s_offs = w_rows * stride_sn
                z_offs = w_rows * stride_zn
                rc = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, wc_layout))
                if ACTIVATION != 0:
                    wc_rows = gl.where(rc < HALF, n0 + rc, up_offset + n0 + rc - HALF)
                else:
                    wc_rows = n0 + rc
                qw_base = qw_ptr + e64 * stride_qe
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
                    0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))[None, :]

                for j in gl.static_range(STAGES - 1):
                    if j < num_steps:
                        _ws_issue_copies(j, ring + j, a_ptr, qw_base, x_offs, w_offs, x_bufs,
                                         wd_bufs, empty_bars, BLOCK_K, STAGES)
                    async_copy.commit_group()
                # group scales / zero points run two steps ahead in registers: a load from
                # L2 takes longer than a step
                sc0, zb0 = _ws_group_params(0, s_base, z_base, s_offs, z_offs, stride_sg,
                                            stride_zg, bias, vdtype, HAS_ZEROS, BLOCK_N,
                                            BLOCK_K, GROUP_SIZE, w_layout)
                sc1, zb1 = _ws_group_params(gl.minimum(1, num_steps - 1), s_base, z_base,
                                            s_offs, z_offs, stride_sg, stride_zg, bias, vdtype,
                                            HAS_ZEROS, BLOCK_N, BLOCK_K, GROUP_SIZE, w_layout)
                for i in range(num_steps):
                    sc2, zb2 = _ws_group_params(gl.minimum(i + 2, num_steps - 1), s_base,
                                                z_base, s_offs, z_offs, stride_sg, stride_zg,
                                                bias, vdtype, HAS_ZEROS, BLOCK_N, BLOCK_K,
                                                GROUP_SIZE, w_layout)
                    sc = sc0
                    zb = zb0
                    # this thread's copies of step i are done; the barrier makes every
                    # producer thread's copies visible before the words are read
                    async_copy.wait_group(STAGES - 2)
                    gl.thread_barrier()
                    words = wd_bufs.index((ring + i) % STAGES).load(w_layout)
                    s2 = gl.broadcast(sc[:, None], words)[0]
                    z2 = gl.broadcast(zb[:, None], words)[0]
                    w = _dequant_words(words, s2, z2, IS_FP16)
                    w_stage = (ring + i) % W_STAGES
                    mbarrier.wait(w_empty_bars.index(w_stage),
                                  (((ring + i) // W_STAGES) & 1) ^ 1)
                    w_bufs.index(w_stage).store(w)
                    fence_async_shared()
                    mbarrier.arrive(ready_bars.index(w_stage), count=1)
                    # refill: step i + STAGES - 1 goes to the stage step i - 1 used
                    nxt = i + STAGES - 1
                    if nxt < num_steps:
                        _ws_issue_copies(nxt, ring + nxt, a_ptr, qw_base, x_offs, w_offs,
                                         x_bufs, wd_bufs, empty_bars, BLOCK_K, STAGES)
                    async_copy.commit_group()
                    sc0, zb0 = sc1, zb1
                    sc1, zb1 = sc2, zb2
                ring += num_steps

    @gluon.jit
    def _ws_consumer(w_bufs, x_bufs, empty_bars, w_empty_bars, ready_bars, c_ptr,
                     topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
                     N, K, EM, num_valid_slots, stride_cm,
                     ACTIVATION: gl.constexpr, MUL_ROUTED_WEIGHT: gl.constexpr,
                     BLOCK_T: gl.constexpr, BLOCK_N_OUT: gl.constexpr, BLOCK_N: gl.constexpr,
                     BLOCK_K: gl.constexpr, GROUP_SIZE_M: gl.constexpr, STAGES: gl.constexpr,
                     W_STAGES: gl.constexpr, num_warps: gl.constexpr):
        """Default partition, over this program's tiles: wgmma over the staged tiles, then
        the epilogue and the store (zero rows for blocks whose expert is -1)."""
        if ACTIVATION != 0:
            ROWS: gl.constexpr = BLOCK_N // 2
        else:
            ROWS: gl.constexpr = BLOCK_N
        # one warpgroup per BLOCK_T / (num_warps / 4) tokens: with 8 warps, two warpgroups
        # share each weight tile (half the dequantization per MAC of a 128-token tile)
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, num_warps // 4],
            instr_shape=[16, BLOCK_T // (num_warps // 4), 16])
        # stores: 8 consecutive output columns (16 bytes) per thread
        out_layout: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, num_warps], [0, 1])

        num_pid_m = gl.cdiv(EM, BLOCK_T)
        num_pid_n = N // BLOCK_N_OUT
        num_post_padded = gl.load(num_post_padded_ptr)
        num_steps = K // BLOCK_K
        ring = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _ws_tile(tile, num_pid_m, num_pid_n, GROUP_SIZE_M)
            row0 = pid_m * BLOCK_T
            if row0 < num_post_padded:
                expert = gl.load(expert_ids_ptr + pid_m)
                n0 = pid_n * BLOCK_N_OUT
                t_o = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, out_layout))
                slots_o = gl.load(sorted_ids_ptr + row0 + t_o).to(gl.int64)
                col = gl.arange(0, BLOCK_N_OUT, layout=gl.SliceLayout(1, out_layout))
                c_ptrs = c_ptr + slots_o[None, :] * stride_cm + (n0 + col)[:, None]
                c_mask = (slots_o < num_valid_slots)[None, :]
                if expert == -1:
                    # padding block or an expert on another rank: zero rows
                    gl.store(c_ptrs, gl.zeros([BLOCK_N_OUT, BLOCK_T], c_ptr.dtype.element_ty,
                                              out_layout), mask=c_mask)
                else:
                    acc = gl.zeros([ROWS, BLOCK_T], gl.float32, layout=mma_layout)
                    acc_up = gl.zeros([ROWS, BLOCK_T], gl.float32, layout=mma_layout)
                    for i in range(num_steps):
                        w_stage = (ring + i) % W_STAGES
                        mbarrier.wait(ready_bars.index(w_stage), ((ring + i) // W_STAGES) & 1)
                        w_tile = w_bufs.index(w_stage)
                        x_tile = x_bufs.index((ring + i) % STAGES).permute((1, 0))
                        if ACTIVATION != 0:
                            acc = warpgroup_mma(w_tile.slice(0, ROWS), x_tile, acc,
                                                is_async=True)
                            acc_up = warpgroup_mma(w_tile.slice(ROWS, ROWS), x_tile, acc_up,
                                                   is_async=True)
                            # the two of step i may run on; those of step i - 1 are done
                            acc, acc_up = warpgroup_mma_wait(num_outstanding=2,
                                                             deps=(acc, acc_up))
                        else:
                            acc = warpgroup_mma(w_tile, x_tile, acc, is_async=True)
                            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                        # step i - 1 is done: release its copy stage and its weight stage
                        prev = ring + i + STAGES * W_STAGES - 1
                        mbarrier.arrive(empty_bars.index(prev % STAGES), count=1, pred=i > 0)
                        mbarrier.arrive(w_empty_bars.index(prev % W_STAGES), count=1,
                                        pred=i > 0)
                    if ACTIVATION != 0:
                        acc, acc_up = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_up))
                    else:
                        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                    last = ring + num_steps - 1
                    mbarrier.arrive(empty_bars.index(last % STAGES), count=1)
                    mbarrier.arrive(w_empty_bars.index(last % W_STAGES), count=1)
                    ring += num_steps

                    # epilogue on the [ROWS, BLOCK_T] tile of C^T
                    if MUL_ROUTED_WEIGHT:
                        t = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, mma_layout))
                        slots = gl.load(sorted_ids_ptr + row0 + t)
                        rw = gl.load(topk_weights_ptr + slots, mask=slots < num_valid_slots,
                                     other=0.0).to(gl.float32)
                        acc = acc * rw[None, :]
                        if ACTIVATION != 0:
                            acc_up = acc_up * rw[None, :]
                    if ACTIVATION != 0:
                        acc = _act(acc, ACTIVATION) * acc_up
                    res = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), out_layout)
                    gl.store(c_ptrs, res, mask=c_mask)

    @gluon.jit
    def _prefill_ws_kernel(
        a_ptr, qw_ptr, s_ptr, z_ptr, c_ptr, topk_weights_ptr,
        sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
        N, K, EM, num_valid_slots, top_k, up_offset,
        stride_am,
        stride_qe, stride_qn,
        stride_se, stride_sn, stride_sg,
        stride_ze, stride_zn, stride_zg,
        stride_cm,
        GROUP_SIZE: gl.constexpr,
        A_IS_SLOTS: gl.constexpr,
        MUL_ROUTED_WEIGHT: gl.constexpr,
        HAS_ZEROS: gl.constexpr,
        ACTIVATION: gl.constexpr,
        IS_FP16: gl.constexpr,
        BLOCK_T: gl.constexpr,
        BLOCK_N_OUT: gl.constexpr,
        BLOCK_K: gl.constexpr,
        GROUP_SIZE_M: gl.constexpr,
        STAGES: gl.constexpr,
        W_STAGES: gl.constexpr,
        PRODUCER_WARPS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """C[slot, n] = sum_k A[row(slot), k] * W[e, n, k]; a persistent program walks the
        output tiles ``pid, pid + num_programs, ...`` (a tile: one aligned block of BLOCK_T
        slots x BLOCK_N_OUT output columns; ``cdiv(EM, BLOCK_T) * N / BLOCK_N_OUT`` of them,
        N = the output width)."""
        if ACTIVATION != 0:
            BLOCK_N: gl.constexpr = 2 * BLOCK_N_OUT
        else:
            BLOCK_N: gl.constexpr = BLOCK_N_OUT
        dtype: gl.constexpr = c_ptr.dtype.element_ty
        w_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K],
                                                                           dtype)
        x_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, BLOCK_K],
                                                                           dtype)
        w_bufs = gl.allocate_shared_memory(dtype, [W_STAGES, BLOCK_N, BLOCK_K], w_smem_layout)
        x_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_T, BLOCK_K], x_smem_layout)
        wd_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        wd_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BLOCK_K // 8], wd_layout)
        empty_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        w_empty_bars = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1],
                                                 mbarrier.MBarrierLayout())
        ready_bars = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1],
                                               mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(empty_bars.index(s), count=1)
        for s in gl.static_range(W_STAGES):
            mbarrier.init(w_empty_bars.index(s), count=1)
            mbarrier.init(ready_bars.index(s), count=1)

        gl.warp_specialize([
            (_ws_consumer, (w_bufs, x_bufs, empty_bars, w_empty_bars, ready_bars, c_ptr,
                            topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
                            num_post_padded_ptr, N, K, EM, num_valid_slots, stride_cm,
                            ACTIVATION, MUL_ROUTED_WEIGHT, BLOCK_T, BLOCK_N_OUT, BLOCK_N,
                            BLOCK_K, GROUP_SIZE_M, STAGES, W_STAGES, num_warps)),
            (_ws_producer, (a_ptr, qw_ptr, s_ptr, z_ptr, sorted_ids_ptr, expert_ids_ptr,
                            num_post_padded_ptr, w_bufs, x_bufs, wd_bufs, empty_bars,
                            w_empty_bars, ready_bars, N, K, EM, num_valid_slots, top_k,
                            up_offset, stride_am, stride_qe, stride_qn, stride_se, stride_sn,
                            stride_sg, stride_ze, stride_zn, stride_zg, GROUP_SIZE, A_IS_SLOTS,
                            HAS_ZEROS, ACTIVATION, IS_FP16, BLOCK_T, BLOCK_N_OUT, BLOCK_N,
                            BLOCK_K, GROUP_SIZE_M, STAGES, W_STAGES, PRODUCER_WARPS)),
        ], [PRODUCER_WARPS], [PRODUCER_REGS])


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
def ws_unsupported(*, device: torch.device, k: int, n_out: int, group_size: int,
                   config: dict, has_perm: bool, a_fragment_order: bool,
                   out_fragment_order: bool, atomic_topk_sum: bool, activation: bool,
                   a_numel: int, out_numel: int) -> str | None:
    """Why a ``WS`` config cannot run this call on the warp-specialised kernel (the caller
    then runs the Triton kernel with the same tiles), or None when it can."""
    bt, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    rows = 2 * bn if activation else bn
    if not HAVE_GLUON:
        return "triton.experimental.gluon is not available"
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return f"{device} is not a compute capability 9.x GPU"
    if config["num_warps"] not in (4, 8):
        return f"num_warps={config['num_warps']} (the consumer is one or two warpgroups: 4 or 8)"
    if bt not in (64, 128, 256) or bk not in (32, 64, 128) or rows not in (64, 128, 256):
        return (f"tiles {bt}x{bn}x{bk}: expected BLOCK_SIZE_M in 64/128/256, BLOCK_SIZE_K in "
                f"32/64/128 and {rows} weight rows in 64/128/256")
    if k % bk or group_size % bk:
        return f"K={k} and G={group_size} must be multiples of BLOCK_SIZE_K={bk}"
    if n_out % bn:
        return f"the output width {n_out} is not a multiple of BLOCK_SIZE_N={bn}"
    if has_perm or a_fragment_order or out_fragment_order or atomic_topk_sum:
        return "act-order perm, fragment-order columns and the atomic top-k sum are not supported"
    if max(a_numel, out_numel) >= 2**31:
        return "tensors of 2**31 elements or more (int32 offsets)"
    return None


def launch_prefill_ws(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      zeros: torch.Tensor | None, out: torch.Tensor,
                      topk_weights: torch.Tensor | None, sorted_ids: torch.Tensor,
                      expert_ids: torch.Tensor, num_post_padded: torch.Tensor, *, n_out: int,
                      k: int, slots: int, top_k: int, up_offset: int, group_size: int,
                      a_is_slots: bool, activation_code: int, config: dict) -> None:
    """Run :func:`_prefill_ws_kernel` (inputs already validated by ``prefill_gemm`` and
    :func:`ws_unsupported`); ``a`` and ``out`` must have unit column stride."""
    if a.stride(1) != 1 or out.stride(1) != 1 or qweight.stride(2) != 1:
        raise ValueError(f"a, out and qweight need unit column strides; found {a.stride()}, "
                         f"{out.stride()}, {qweight.stride()}")
    bt, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    em = sorted_ids.numel()
    z = zeros if zeros is not None else qweight
    tw = topk_weights if topk_weights is not None else scales
    tiles = triton_cdiv(em, bt) * (n_out // bn)
    if config.get("PERSISTENT", True):
        grid = (min(tiles, _sm_count(a.device) * config.get("PROGRAMS_PER_SM", 1)),)
    else:
        grid = (tiles,)
    _prefill_ws_kernel[grid](
        a, qweight, scales, z, out, tw, sorted_ids, expert_ids, num_post_padded,
        n_out, k, em, slots, top_k, up_offset,
        a.stride(0),
        qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), scales.stride(2),
        z.stride(0), z.stride(1), z.stride(2),
        out.stride(0),
        GROUP_SIZE=group_size,
        A_IS_SLOTS=a_is_slots,
        MUL_ROUTED_WEIGHT=topk_weights is not None,
        HAS_ZEROS=zeros is not None,
        ACTIVATION=activation_code,
        IS_FP16=a.dtype == torch.float16,
        BLOCK_T=bt,
        BLOCK_N_OUT=bn,
        BLOCK_K=bk,
        GROUP_SIZE_M=config["GROUP_SIZE_M"],
        STAGES=config["num_stages"],
        W_STAGES=config.get("W_STAGES", W_STAGES),
        PRODUCER_WARPS=config.get("PRODUCER_WARPS", PRODUCER_WARPS),
        PRODUCER_REGS=config.get("PRODUCER_REGS", PRODUCER_REGS),
        num_warps=config["num_warps"],
        maxnreg=config.get("MAXNREG"),
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else
                        torch.cuda.current_device())
