"""Decode GEMM1 on tensor cores (``mma.sync`` m16n8k16), written in Gluon: an experiment.

The same product as :func:`w4a16moe.kernels.decode.decode_gemm1` (row ``slot`` of the output
is ``act(gate) * up`` of token ``slot // top_k`` through expert ``topk_ids[slot]``), computed
with the weights as the 16-row A operand of ``mma.sync`` and the token's activations as
column 0 of the 8-column B operand (the other seven columns are zero). The CUDA-core decode
kernel spends ~3.5 instructions per int4 value (shift, logic op, fp32 multiply-add and the
per-chunk bookkeeping: ``benchmarks/notes_decode.md``); here a thread dequantizes two values
with one shift, one logic op and two packed 16-bit ops (the register-operand prefill kernel's
dequantization, :mod:`w4a16moe.kernels.prefill_rs`), and one ``mma`` does the 256 multiply-adds
of a warp's 16 x 16 slab, so about 2 instructions per value remain.

One program computes ``BLOCK_N_OUT`` output features of one slot over the whole K: its tile
holds their gate rows and up rows interleaved in runs of 8 (tile rows ``16b + j``: gate row
``n0 + 8b + j``; ``16b + 8 + j``: the matching up row), so an accumulator thread holds a
feature's gate and up sums and applies the activation in place. Each K step loads the next
step's words (16-byte loads straight from global memory, one step ahead), the step's scales
and activation chunk, dequantizes the current words into the A registers and issues the
``mma``. No split-K, no atomics: the output is written once.

Shapes: x ``[M, K]``; qweight int32 ``[E, 2I, K/8]``; scales ``[E, 2I, K/G]``; topk_ids
``[M, top_k]``; out ``[M*top_k, I]``. Supported: fp16/bf16, symmetric weights (no zeros, no
act-order), ``G`` a multiple of ``BLOCK_K``, ``K`` a multiple of ``BLOCK_K`` and ``I`` of
``BLOCK_N_OUT`` (:func:`mma_gemm1_unsupported` says why not). Gluon does not run under the
Triton interpreter: the tests are GPU tests.
"""

from __future__ import annotations

import torch

from ..layout import PackedWeights
from .common import activation
from .prefill_rs import HAVE_GLUON

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

    # renamed between triton releases
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

    from .prefill_rs import (
        _packed_pair,
        _rs_pairs_layout,
        _rs_tile_rows,
        _rs_words2d_layout,
    )

#: prefill-kernel activation codes (``common.activation``)
ACTIVATION_CODES = {"silu": 1, "gelu": 2, "gelu_tanh": 3}


if HAVE_GLUON:

    _act = gluon.jit(activation.fn)

    @gluon.jit
    def _unit_pair(words, shift, zz, IS_FP16: gl.constexpr):
        """Values ``2c`` and ``2c+1`` of each word (``shift`` = 4c) minus their zero point,
        packed: (bias + v) by one shift and one LOP3, then one packed add of ``zz`` (the
        negated bias + zero point), exact; the scale comes after the mma."""
        if IS_FP16:
            lo, hi = gl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t, one;
                mov.b32 one, 0x3C003C00;
                shr.u32 t, $2, $3;
                lop3.b32 t, t, 0x000F000F, 0x64006400, 0xEA;
                fma.rn.f16x2 t, t, one, $4;
                mov.b32 {$0, $1}, t;
                }""",
                constraints="=h,=h,r,r,r", args=[words, shift, zz],
                dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
        else:
            lo, hi = gl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t, one;
                mov.b32 one, 0x3F803F80;
                shr.u32 t, $2, $3;
                lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA;
                fma.rn.bf16x2 t, t, one, $4;
                mov.b32 {$0, $1}, t;
                }""",
                constraints="=h,=h,r,r,r", args=[words, shift, zz],
                dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        return lo, hi

    @gluon.jit
    def _mma_step(acc, words2d, sc, b, c, zz,
                  IS_FP16: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_K: gl.constexpr, words_layout: gl.constexpr,
                  words2d_layout: gl.constexpr, a_layout: gl.constexpr,
                  b_layout: gl.constexpr, mma_layout: gl.constexpr):
        """``acc + scale * (W_q - z) @ x`` over K step ``i`` (inside one group): the words
        dequantized into the A operand, one mma per 16 columns into a fresh accumulator,
        then the group's scale ``sc`` per row; ``b``: the step's activations (B operand)."""
        T: gl.constexpr = BLOCK_K // 32
        words2d = gl.convert_layout(words2d, words2d_layout, assert_trivial=True)
        words = gl.convert_layout(gl.reshape(words2d, [BLOCK_N, T, 4]), words_layout,
                                  assert_trivial=True)
        words4, shift = gl.broadcast(gl.expand_dims(words, 2), (c * 4)[None, None, :, None])
        zz4 = gl.broadcast(zz[:, None, None, None], words4)[0]
        lo, hi = _unit_pair(words4, shift, zz4, IS_FP16)
        v = gl.reshape(gl.join(lo, hi), [BLOCK_N, T, 4, 2, 2, 2])
        v = gl.permute(v, (0, 1, 3, 4, 2, 5))
        a = gl.convert_layout(gl.reshape(v, [BLOCK_N, BLOCK_K]), a_layout,
                              assert_trivial=True)
        part = mma_v2(a, b, gl.zeros([BLOCK_N, 8], gl.float32, layout=mma_layout))
        return acc + part * sc.to(gl.float32)[:, None]

    @gluon.jit
    def _decode_mma_gemm1_kernel(
        x_ptr, qw_ptr, s_ptr, ids_ptr, out_ptr,
        K, I, top_k,
        stride_xm, stride_qe, stride_qn, stride_se, stride_sn, stride_sg, stride_om,
        GROUP_SIZE: gl.constexpr, ACTIVATION: gl.constexpr, IS_FP16: gl.constexpr,
        BLOCK_N_OUT: gl.constexpr, BLOCK_K: gl.constexpr, WORDS_LOAD_LAYOUT: gl.constexpr,
        STAGES: gl.constexpr, num_warps: gl.constexpr,
    ):
        """out[slot, n0:n0+BLOCK_N_OUT] for slot = program 0, n0 = BLOCK_N_OUT * program 1.
        ``WORDS_LOAD_LAYOUT``: the word tile's operand layout with each thread's words of a
        row as its first registers, so they load as 16-byte vectors (see
        :func:`words_load_layout`)."""
        BLOCK_N: gl.constexpr = 2 * BLOCK_N_OUT
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout,
                                                     k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma_layout,
                                                     k_width=2)
        pairs_layout: gl.constexpr = _rs_pairs_layout(
            BLOCK_N, BLOCK_K, a_layout).type.layout
        row_layout: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(
            3, pairs_layout)))
        words_layout: gl.constexpr = gl.SliceLayout(2, pairs_layout)
        words2d_layout: gl.constexpr = _rs_words2d_layout(
            BLOCK_N, BLOCK_K, words_layout).type.layout
        out_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        if IS_FP16:
            bias = 1024
            vdtype: gl.constexpr = gl.float16
        else:
            bias = 128
            vdtype: gl.constexpr = gl.bfloat16

        slot = gl.program_id(0)
        n0 = gl.program_id(1) * BLOCK_N_OUT
        expert = gl.load(ids_ptr + slot).to(gl.int64)
        token = slot // top_k

        # the tile's weight rows in the word-load layout and in the scale (row) layout
        w_rows = _rs_tile_rows(n0, I, BLOCK_N, 1, gl.SliceLayout(1, WORDS_LOAD_LAYOUT))
        w_cols = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, WORDS_LOAD_LAYOUT))
        w_ptrs = qw_ptr + expert * stride_qe + (w_rows[:, None] * stride_qn + w_cols[None, :])
        s_rows = _rs_tile_rows(n0, I, BLOCK_N, 1, gl.SliceLayout(1, mma_layout))
        s_ptrs = s_ptr + expert * stride_se + s_rows * stride_sn
        # B: the token's activations in column 0, zeros elsewhere
        kb = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_layout))
        nb = gl.arange(0, 8, layout=gl.SliceLayout(0, b_layout))
        x_ptrs = x_ptr + token * stride_xm + (kb[:, None] + nb[None, :] * 0)
        x_mask = (nb[None, :] == 0) & (kb[:, None] >= 0)
        c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(
            3, pairs_layout))))
        zb = gl.full([BLOCK_N], bias + 8, vdtype, layout=row_layout)
        if IS_FP16:
            zz = _packed_pair(zb)
        else:
            zz = _packed_pair(-zb)

        acc = gl.zeros([BLOCK_N, 8], gl.float32, layout=mma_layout)
        num_steps = K // BLOCK_K
        WORDS: gl.constexpr = BLOCK_K // 8
        # scales and activations of a step are loaded one step ahead (their latency would
        # otherwise stall every step's first mma)
        sc_next = gl.load(s_ptrs)
        b_next = gl.load(x_ptrs, mask=x_mask, other=0.0)
        if STAGES == 0:
            # the words run two steps ahead of the arithmetic in registers; the loop is
            # unrolled by two so each of the two word buffers keeps its registers
            words_a = gl.load(w_ptrs)
            words_b = gl.load(w_ptrs + WORDS)
            for i in range(0, num_steps, 2):
                sc = sc_next
                b = b_next
                sc_next = gl.load(s_ptrs + ((i + 1) * BLOCK_K // GROUP_SIZE) * stride_sg)
                b_next = gl.load(x_ptrs + (i + 1) * BLOCK_K, mask=x_mask, other=0.0)
                acc = _mma_step(acc, words_a, sc, b, c, zz, IS_FP16, BLOCK_N, BLOCK_K,
                                words_layout, words2d_layout, a_layout, b_layout, mma_layout)
                words_a = gl.load(w_ptrs + gl.minimum(i + 2, num_steps - 2) * WORDS)
                sc = sc_next
                b = b_next
                k2 = gl.minimum(i + 2, num_steps - 1) * BLOCK_K
                sc_next = gl.load(s_ptrs + (k2 // GROUP_SIZE) * stride_sg)
                b_next = gl.load(x_ptrs + k2, mask=x_mask, other=0.0)
                acc = _mma_step(acc, words_b, sc, b, c, zz, IS_FP16, BLOCK_N, BLOCK_K,
                                words_layout, words2d_layout, a_layout, b_layout, mma_layout)
                words_b = gl.load(w_ptrs + gl.minimum(i + 3, num_steps - 1) * WORDS)
        else:
            # a ring of STAGES word tiles in shared memory filled by cp.async (16 bytes a
            # lane, each word once), STAGES - 1 steps ahead; each lane then reads its rows'
            # words from the ring (the four lanes of a quad read the same words: a broadcast)
            copy_layout: gl.constexpr = gl.BlockedLayout(
                [1, 4], [32 // (WORDS // 4), WORDS // 4], [num_warps, 1], [1, 0])
            c_rows = _rs_tile_rows(n0, I, BLOCK_N, 1, gl.SliceLayout(1, copy_layout))
            c_cols = gl.arange(0, WORDS, layout=gl.SliceLayout(0, copy_layout))
            src = qw_ptr + expert * stride_qe + (c_rows[:, None] * stride_qn + c_cols[None, :])
            ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, WORDS],
                                             gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
            for st in gl.static_range(STAGES - 1):
                async_copy.async_copy_global_to_shared(
                    ring.index(st), src + gl.minimum(st, num_steps - 1) * WORDS)
                async_copy.commit_group()
            for i in range(num_steps):
                nxt = i + STAGES - 1
                async_copy.async_copy_global_to_shared(
                    ring.index(nxt % STAGES), src + gl.minimum(nxt, num_steps - 1) * WORDS)
                async_copy.commit_group()
                sc = sc_next
                b = b_next
                k1 = gl.minimum(i + 1, num_steps - 1) * BLOCK_K
                sc_next = gl.load(s_ptrs + (k1 // GROUP_SIZE) * stride_sg)
                b_next = gl.load(x_ptrs + k1, mask=x_mask, other=0.0)
                async_copy.wait_group(STAGES - 1)
                _cta_barrier()
                words2d = ring.index(i % STAGES).load(words2d_layout)
                acc = _mma_step(acc, words2d, sc, b, c, zz, IS_FP16, BLOCK_N, BLOCK_K,
                                words_layout, words2d_layout, a_layout, b_layout, mma_layout)
                # every lane is done with this stage before the next iteration refills it
                _cta_barrier()
            async_copy.wait_group(0)

        # rows 16b + j (gate) and 16b + 8 + j (up) -> feature 8b + j; only column 0 is real
        acc4 = gl.permute(gl.reshape(acc, [BLOCK_N // 16, 2, 8, 8]), (0, 2, 3, 1))
        gate, up = gl.split(acc4)
        h = gl.sum(_act(gate, ACTIVATION) * up, axis=2)
        h = gl.convert_layout(gl.reshape(h, [BLOCK_N_OUT]).to(out_ptr.dtype.element_ty),
                              out_layout)
        cols = gl.arange(0, BLOCK_N_OUT, layout=out_layout)
        gl.store(out_ptr + slot.to(gl.int64) * stride_om + n0 + cols, h)


def words_load_layout(block_n: int, block_k: int, num_warps: int):
    """The ``[block_n, block_k / 8]`` word tile as the A operand's quads hold it (lanes ``4g +
    c`` of a warp: rows ``g`` and ``g + 8`` of the warp's 16-row slabs, every word of each;
    the four lanes ``c`` load the same words), with a thread's words of one row as its
    first registers: in that order a row's words are one contiguous run, which loads as
    16-byte vectors."""
    words = block_k // 8
    slabs = block_n // (16 * num_warps)
    reg = [[0, 1 << b] for b in range(words.bit_length() - 1)]
    reg.append([8, 0])
    reg += [[16 * num_warps << b, 0] for b in range(slabs.bit_length() - 1)]
    lane = [[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]]
    warp = [[16 << b, 0] for b in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, words])


def mma_gemm1_unsupported(x: torch.Tensor, w13: PackedWeights, *, block_n_out: int = 32,
                          block_k: int = 128, num_warps: int = 4) -> str | None:
    """Why :func:`decode_mma_gemm1` can't run this call, or None."""
    if not HAVE_GLUON:
        return "this triton has no Gluon"
    if not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] < 8:
        return "needs an NVIDIA GPU with mma.sync (sm_80 or newer)"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"x is {x.dtype}; expected float16 or bfloat16"
    if w13.zeros is not None or w13.perm is not None:
        return "zero points and act-order are not supported"
    h = x.shape[1]
    i = w13.n // 2
    if block_n_out % (8 * num_warps):
        return f"block_n_out is {block_n_out}; expected a multiple of 8 * num_warps"
    if h % (2 * block_k) or w13.group_size % block_k:
        return (f"K = {h} must be a multiple of 2 * BLOCK_K and G = {w13.group_size} one of "
                f"BLOCK_K = {block_k}")
    if i % block_n_out:
        return f"I = {i} must be a multiple of BLOCK_N_OUT = {block_n_out}"
    return None


def decode_mma_gemm1(x: torch.Tensor, w13: PackedWeights, topk_ids: torch.Tensor, *,
                     activation: str = "silu", out: torch.Tensor | None = None,
                     block_n_out: int = 32, block_k: int = 128,
                     num_warps: int = 4, stages: int = 0) -> torch.Tensor:
    """``[M * top_k, I]``: row ``slot`` = ``act(gate) * up`` of token ``slot // top_k``
    through expert ``topk_ids.flatten()[slot]`` (see the module docstring)."""
    why = mma_gemm1_unsupported(x, w13, block_n_out=block_n_out, block_k=block_k,
                                num_warps=num_warps)
    if why:
        raise ValueError(f"decode_mma_gemm1: {why}")
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation is {activation!r}; expected one of "
                         f"{tuple(ACTIVATION_CODES)}")
    m, h = x.shape
    top_k = topk_ids.shape[1]
    i = w13.n // 2
    ids = topk_ids.reshape(-1)
    if out is None:
        out = torch.empty(m * top_k, i, dtype=x.dtype, device=x.device)
    qw, sc = w13.qweight, w13.scales
    grid = (m * top_k, i // block_n_out)
    _decode_mma_gemm1_kernel[grid](
        x, qw, sc, ids, out, h, i, top_k,
        x.stride(0), qw.stride(0), qw.stride(1), sc.stride(0), sc.stride(1), sc.stride(2),
        out.stride(0),
        GROUP_SIZE=w13.group_size, ACTIVATION=ACTIVATION_CODES[activation],
        IS_FP16=x.dtype == torch.float16, BLOCK_N_OUT=block_n_out, BLOCK_K=block_k,
        WORDS_LOAD_LAYOUT=words_load_layout(2 * block_n_out, block_k, num_warps),
        STAGES=stages, num_warps=num_warps)
    return out


__all__ = ["decode_mma_gemm1", "mma_gemm1_unsupported"]
