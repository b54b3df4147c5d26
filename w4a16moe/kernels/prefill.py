"""Prefill kernel: a grouped int4 x 16-bit GEMM over the blocks of :func:`align_block_size`.

The (token, k) *slots* of a batch are sorted by expert and padded per expert to multiples of
``BLOCK_SIZE_M`` (see :class:`w4a16moe.routing.AlignedBlocks`). One program computes a
``[BLOCK_SIZE_M, BLOCK_SIZE_N]`` tile of the output for one block of slots, all of one expert:

* the activation rows are gathered through ``sorted_token_ids`` (row ``slot // top_k`` of the
  ``[M, K]`` input for GEMM1, row ``slot`` of the ``[M * top_k, K]`` input for GEMM2);
* the weight tile is read straight from the packed layout (``qweight`` int32 ``[E, N, K/8]``,
  ExLlama shuffle order, see :mod:`w4a16moe.layout`), unpacked with shifts, dequantized per
  group in registers (``(q - z) * s``) and fed to ``tl.dot`` with fp32 accumulation;
* blocks whose expert id is -1 (padding past the end, or experts not on this rank under an
  ``expert_map``) write zero rows; blocks past ``num_tokens_post_padded`` exit at once.

Options (all compile-time): zero points, act-order ``perm`` (the activation columns are
gathered through ``perm[e]``), the router weight multiplied on the output (or, for GEMM1 with
the weight applied on the input, on GEMM1's output, which is the same product), a fused
``act(gate) * up`` epilogue for GEMM1 (the program computes the gate and the up tile of the
same columns), and an fp32 atomic top-k reduction for GEMM2.

Public functions: :func:`prefill_gemm` (one GEMM), :func:`fused_moe_prefill` (the whole
experts layer: GEMM1 -> activation -> GEMM2 -> top-k sum) and :class:`PrefillWorkspace`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..layout import PACK_FACTOR, PackedExperts, PackedWeights
from ..profiling.annotate import PREFILL_KERNEL_NAME, annotate_gemm
from ..reference import ACTIVATIONS, check_routing
from ..routing import (
    AlignedBlocks,
    align_block_size,
    check_router_args,
    fused_topk,
    fused_topk_align,
    fused_topk_align_supported,
    max_num_tokens_padded,
)
from . import prefill_mma
from .align import ALIGN_BLOCK_SIZES, AlignmentBuffers
from .common import activation, fragment_order, grouped_tile
from .configs import get_prefill_config, validate_config
from .pdl import prefill_chain, prefill_pdl_args, wait_upstream_release_next
from .prefill_mma import launch_prefill_mma, mma_unsupported
from .prefill_rs import launch_prefill_rs, rs_unsupported, sorted_rows_unsupported

#: activation name -> the kernel's ACTIVATION constexpr (0 = no fused activation)
ACTIVATION_CODES = {None: 0, "silu": 1, "gelu": 2, "gelu_tanh": 3}

#: int4 values per int32 word, as a constexpr the kernels can read
_PACK = tl.constexpr(PACK_FACTOR)
_SWAP_AB_DEFAULT = True
#: :func:`fused_moe_prefill_from_logits` routes and aligns in one program where it can
#: (:func:`~w4a16moe.routing.fused_topk_align`); benchmarks turn it off for A/Bs
ROUTE_ALIGN = True


# --------------------------------------------------------------------------------------------
# Triton helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_group_params(s_base, z_base, rows, n_mask, group, stride_sn, stride_sg,
                       stride_zn, stride_zg, HAS_ZEROS: tl.constexpr):
    """Scales (as stored) ``[BLOCK_N, 1]`` and zero points (int32; 8 when symmetric) of
    ``rows`` [BLOCK_N] in the scalar group ``group``."""
    s = tl.load(s_base + rows * stride_sn + group * stride_sg, mask=n_mask, other=0.0)
    s = s[:, None]
    if HAS_ZEROS:
        z = tl.load(z_base + rows * stride_zn + group * stride_zg, mask=n_mask,
                    other=8).to(tl.int32)
        z = z[:, None]
    else:
        z = tl.full((1, 1), 8, tl.int32)
    return s, z


@triton.jit
def _load_column_group_params(s_base, z_base, rows, n_mask, groups, stride_sn, stride_sg,
                              stride_zn, stride_zg, HAS_ZEROS: tl.constexpr):
    """Like :func:`_load_group_params` with one group index per column: ``groups``
    [BLOCK_K] -> scales and zero points [BLOCK_N, BLOCK_K]."""
    offs = rows[:, None] * stride_sn + groups[None, :] * stride_sg
    s = tl.load(s_base + offs, mask=n_mask[:, None], other=0.0)
    if HAS_ZEROS:
        z = tl.load(z_base + rows[:, None] * stride_zn + groups[None, :] * stride_zg,
                    mask=n_mask[:, None], other=8).to(tl.int32)
    else:
        z = tl.full((1, 1), 8, tl.int32)
    return s, z


@triton.jit
def _unpack_dequant(words, s, z, BLOCK_K: tl.constexpr, DEQUANT: tl.constexpr,
                    IS_FP16: tl.constexpr):
    """int32 words [BLOCK_N, BLOCK_K/8] (shuffle order) -> dequantized [BLOCK_N, BLOCK_K] in
    the scales' dtype, with Triton ops (DEQUANT 0 or 1). ``s``/``z`` broadcast against
    [BLOCK_N, BLOCK_K]."""
    # each word repeated 8 times along K, then value j of the word picked by its shift
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    j = tl.arange(0, BLOCK_K) % _PACK
    shifts = (j // 2) * 4 + (j % 2) * 16
    q = (words >> shifts[None, :]) & 0xF
    return _dequant_codes(q, s, z, DEQUANT, IS_FP16)


@triton.jit
def _dequant_codes(q, s, z, DEQUANT: tl.constexpr, IS_FP16: tl.constexpr):
    """``(q - z) * s`` in the scales' dtype for int32 codes ``q`` (0..15), with Triton ops:
    DEQUANT 1 the exponent trick, 0 an int->float conversion."""
    if DEQUANT == 1:
        # exponent trick: OR the code into the mantissa of 1024.0 (fp16) / 128.0 (bf16), so
        # the float is (bias + q) exactly with no int->float conversion; subtract (bias + z).
        if IS_FP16:
            qf = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            zf = (z + 1024).to(tl.float16)
        else:
            qf = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            zf = (z + 128).to(tl.bfloat16)
        return (qf - zf) * s
    else:
        w = (q - z).to(tl.float32) * s.to(tl.float32)
        return w.to(s.dtype)


@triton.jit
def _dequant_asm_values(words, s, z, IS_FP16: tl.constexpr):
    """DEQUANT 2 (GPU only): the exponent trick on two values at once in packed 16-bit PTX.

    The shuffle order puts values 2i and 2i+1 of a word at bits 4i and 16+4i, so
    ``(word >> 4i) & 0x000F000F | bias`` is the pair (bias+v[2i], bias+v[2i+1]); a packed
    subtract of (bias+z) and a packed multiply by the scale finish it. ``words``, ``s`` and
    ``z`` (int32 zero points) share one shape; returns the eight values of each word
    (``v0`` .. ``v7``: value j of the word, K offset j) in that shape.
    """
    if IS_FP16:
        zb = (z + 1024).to(tl.float16)
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
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
            args=[words, s, zb], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        zb = (z + 128).to(tl.bfloat16)
        # bf16x2 subtract and multiply written as fma: sm_80 has only fma.rn.bf16x2
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
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
            args=[words, s, zb], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _dequant_asm(words, s, z, IS_FP16: tl.constexpr):
    """:func:`_dequant_asm_values` put back in K order: [BLOCK_N, BLOCK_K/8] -> [BLOCK_N,
    BLOCK_K]."""
    v0, v1, v2, v3, v4, v5, v6, v7 = _dequant_asm_values(words, s, z, IS_FP16)
    # back to K order: interleaving (0,4) with (2,6), (1,5) with (3,7), then the two halves
    even = tl.interleave(tl.interleave(v0, v4), tl.interleave(v2, v6))
    odd = tl.interleave(tl.interleave(v1, v5), tl.interleave(v3, v7))
    return tl.interleave(even, odd)


@triton.jit
def _weight_tile(qw_base, s_base, z_base, rows, n_mask, k_start, K, stride_qn, stride_qk,
                 stride_sn, stride_sg, stride_zn, stride_zg, s_pc, z_pc,
                 GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, DEQUANT: tl.constexpr,
                 IS_FP16: tl.constexpr):
    """Dequantized weight tile [BLOCK_N, BLOCK_K] of ``rows`` for K columns from ``k_start``.

    GROUP_MODE 0: one group per row (per channel; ``s_pc``/``z_pc`` preloaded);
    DEQUANT 0: int->float conversion, 1: exponent trick in Triton ops, 2: the same in PTX.
    1: BLOCK_K divides G (one group per tile); 2: G divides BLOCK_K (a group per column).
    """
    offs_w = k_start // _PACK + tl.arange(0, BLOCK_K // _PACK)
    w_ptrs = qw_base + rows[:, None] * stride_qn + offs_w[None, :] * stride_qk
    if EVEN_K:
        words = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
    else:
        words = tl.load(w_ptrs, mask=n_mask[:, None] & (offs_w[None, :] < K // _PACK),
                        other=0)
    if DEQUANT == 2:
        if GROUP_MODE == 0:
            s = s_pc
            z = z_pc
        elif GROUP_MODE == 1:
            s, z = _load_group_params(s_base, z_base, rows, n_mask, k_start // GROUP_SIZE,
                                      stride_sn, stride_sg, stride_zn, stride_zg, HAS_ZEROS)
        else:
            # G >= 32 > 8: each word lies in one group
            offs_kw = k_start + tl.arange(0, BLOCK_K // _PACK) * _PACK
            groups = tl.where(offs_kw < K, offs_kw // GROUP_SIZE, 0)
            s, z = _load_column_group_params(s_base, z_base, rows, n_mask, groups, stride_sn,
                                             stride_sg, stride_zn, stride_zg, HAS_ZEROS)
        s = tl.broadcast_to(s, words.shape)
        z = tl.broadcast_to(z, words.shape)
        return _dequant_asm(words, s, z, IS_FP16)
    if GROUP_MODE == 0:
        s = s_pc
        z = z_pc
    elif GROUP_MODE == 1:
        s, z = _load_group_params(s_base, z_base, rows, n_mask, k_start // GROUP_SIZE,
                                  stride_sn, stride_sg, stride_zn, stride_zg, HAS_ZEROS)
    else:
        offs_k = k_start + tl.arange(0, BLOCK_K)
        # masked-off columns (k >= K) read group 0: harmless, their activations are zero
        groups = tl.where(offs_k < K, offs_k // GROUP_SIZE, 0)
        s, z = _load_column_group_params(s_base, z_base, rows, n_mask, groups, stride_sn,
                                         stride_sg, stride_zn, stride_zg, HAS_ZEROS)
    return _unpack_dequant(words, s, z, BLOCK_K, DEQUANT, IS_FP16)


@triton.jit
def _dequant_value_ops(words, j: tl.constexpr, s, z, DEQUANT: tl.constexpr,
                       IS_FP16: tl.constexpr):
    """Value ``j`` (0..7) of every word, dequantized with Triton ops (DEQUANT 0 or 1) in the
    scales' dtype; ``s``/``z`` broadcast against ``words``."""
    q = (words >> ((j // 2) * 4 + (j % 2) * 16)) & 0xF
    return _dequant_codes(q, s, z, DEQUANT, IS_FP16)


@triton.jit
def _weight_tile_frag(qw_base, s_base, z_base, rows, n_mask, k_start, K, stride_qn, stride_qk,
                      stride_sn, stride_sg, stride_zn, stride_zg, s_pc, z_pc,
                      GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr,
                      HAS_ZEROS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
                      DEQUANT: tl.constexpr, IS_FP16: tl.constexpr):
    """:func:`_weight_tile` in fragment order: position ``k`` of the [BLOCK_N, BLOCK_K] tile
    holds K column ``k_start + fragment_order(k)`` (the caller reads the activations in the
    same order). The words are loaded as [BLOCK_N, 4, BLOCK_K/32] (word ``c`` of each
    32-column run) and each word's eight values stay in the thread that dequantizes them, so
    the compiler can give the tile the ``tl.dot`` operand layout directly instead of a
    round trip through shared memory."""
    T: tl.constexpr = BLOCK_K // 32
    offs_c = tl.arange(0, 4)
    offs_t = tl.arange(0, T)
    offs_w = k_start // _PACK + offs_c[None, :, None] + 4 * offs_t[None, None, :]  # [1, 4, T]
    w_ptrs = qw_base + rows[:, None, None] * stride_qn + offs_w * stride_qk
    if EVEN_K:
        words = tl.load(w_ptrs, mask=n_mask[:, None, None], other=0)
    else:
        words = tl.load(w_ptrs, mask=n_mask[:, None, None] & (offs_w < K // _PACK), other=0)
    if GROUP_MODE == 0:
        s = s_pc[:, :, None]
        z = z_pc[:, :, None]
    elif GROUP_MODE == 1:
        s, z = _load_group_params(s_base, z_base, rows, n_mask, k_start // GROUP_SIZE,
                                  stride_sn, stride_sg, stride_zn, stride_zg, HAS_ZEROS)
        s = s[:, :, None]
        z = z[:, :, None]
    else:
        # G >= 32: each word lies in one group
        groups = tl.where(offs_w < K // _PACK, (offs_w * _PACK) // GROUP_SIZE, 0)
        s = tl.load(s_base + rows[:, None, None] * stride_sn + groups * stride_sg,
                    mask=n_mask[:, None, None], other=0.0)
        if HAS_ZEROS:
            z = tl.load(z_base + rows[:, None, None] * stride_zn + groups * stride_zg,
                        mask=n_mask[:, None, None], other=8).to(tl.int32)
        else:
            z = tl.full((1, 1, 1), 8, tl.int32)
    if DEQUANT == 2:
        v0, v1, v2, v3, v4, v5, v6, v7 = _dequant_asm_values(
            words, tl.broadcast_to(s, words.shape), tl.broadcast_to(z, words.shape), IS_FP16)
    else:
        v0 = _dequant_value_ops(words, 0, s, z, DEQUANT, IS_FP16)
        v1 = _dequant_value_ops(words, 1, s, z, DEQUANT, IS_FP16)
        v2 = _dequant_value_ops(words, 2, s, z, DEQUANT, IS_FP16)
        v3 = _dequant_value_ops(words, 3, s, z, DEQUANT, IS_FP16)
        v4 = _dequant_value_ops(words, 4, s, z, DEQUANT, IS_FP16)
        v5 = _dequant_value_ops(words, 5, s, z, DEQUANT, IS_FP16)
        v6 = _dequant_value_ops(words, 6, s, z, DEQUANT, IS_FP16)
        v7 = _dequant_value_ops(words, 7, s, z, DEQUANT, IS_FP16)
    # value j = 2i + p of word c in run t goes to position 32t + 8i + 2c + p
    pairs = tl.join(tl.join(tl.join(v0, v1), tl.join(v2, v3)),
                    tl.join(tl.join(v4, v5), tl.join(v6, v7)))  # [BN, c, t, p, i_lo, i_hi]
    pairs = tl.permute(pairs, (0, 2, 5, 4, 1, 3))  # [BN, t, i_hi, i_lo, c, p]
    return tl.reshape(pairs, (rows.shape[0], BLOCK_K))


@triton.jit
def _prefill_kernel(
    a_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, c_ptr, topk_weights_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
    N, K, EM, num_valid_slots, top_k, up_offset,
    stride_am, stride_ak,
    stride_qe, stride_qn, stride_qk,
    stride_se, stride_sn, stride_sg,
    stride_ze, stride_zn, stride_zg,
    stride_pe,
    stride_cm, stride_cn,
    GROUP_SIZE: tl.constexpr,
    GROUP_MODE: tl.constexpr,
    A_IS_SLOTS: tl.constexpr,
    A_SORTED: tl.constexpr,
    C_SORTED: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ATOMIC_TOPK_SUM: tl.constexpr,
    EVEN_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    DEQUANT: tl.constexpr,
    IS_FP16: tl.constexpr,
    FRAG_K: tl.constexpr,
    A_FRAG: tl.constexpr,
    OUT_FRAG: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """C[slot, n] = sum_k A[row(slot), k] * W[e, n, k] for the slots of one sorted block.

    Shapes: A ``[M, K]`` (rows ``slot // top_k``) or ``[M*top_k, K]`` (``A_IS_SLOTS``), or
    with ``A_SORTED`` ``[EM, K]`` (row ``p`` for sorted position ``p``);
    qweight int32 ``[E, N_w, K/8]``; scales ``[E, N_w, K/G]``; zeros uint8 ``[E, N_w, K/G]``;
    perm int32 ``[E, K]``; C ``[M*top_k, N]``, ``[EM, N]`` with ``C_SORTED`` (row ``p``
    for sorted position ``p``; padding rows not written), or fp32 ``[M, N]`` with
    ``ATOMIC_TOPK_SUM`` (added into, so it must start zeroed). With ``ACTIVATION`` != 0
    the program computes the gate tile (rows ``n``) and the up tile (rows ``n + up_offset``)
    and stores ``act(gate) * up``; ``N`` is then the intermediate size. Grid:
    ``cdiv(EM, BLOCK_SIZE_M) * cdiv(N, BLOCK_SIZE_N)`` with ``EM = len(sorted_token_ids)``.
    ``PDL``: launched as a programmatic dependent (:mod:`.pdl`): wait for the kernel
    before to complete, then release the next.
    """
    if PDL:
        wait_upstream_release_next()
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(EM, BLOCK_SIZE_M),
                                tl.cdiv(N, BLOCK_SIZE_N), GROUP_SIZE_M)

    num_post_padded = tl.load(num_post_padded_ptr)
    if pid_m * BLOCK_SIZE_M >= num_post_padded:
        return

    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    slots = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    slot_mask = slots < num_valid_slots
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    n_mask = offs_n < N
    if ATOMIC_TOPK_SUM:
        c_rows = slots // top_k
    elif C_SORTED:
        c_rows = offs_m.to(tl.int64)
    else:
        c_rows = slots
    if OUT_FRAG:
        # the output's columns stored in fragment order (the next GEMM reads them as is)
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + fragment_order(offs_n)[None, :] * stride_cn
    else:
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = slot_mask[:, None] & n_mask[None, :]

    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert == -1:
        # padding block or an expert on another rank: these slots contribute nothing
        if not ATOMIC_TOPK_SUM:
            zero = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=c_ptr.dtype.element_ty)
            tl.store(c_ptrs, zero, mask=c_mask)
        return

    if A_SORTED:
        a_rows = offs_m.to(tl.int64)
    elif A_IS_SLOTS:
        a_rows = slots
    else:
        a_rows = slots // top_k
    # tile position p holds K column L(p): fragment_order(p) with FRAG_K, else p; A stores
    # column c at fragment_order(c) with A_FRAG (an involution), else at c
    offs_kb = tl.arange(0, BLOCK_SIZE_K)
    if FRAG_K:
        offs_kb = fragment_order(offs_kb)
    A_CONTIGUOUS: tl.constexpr = FRAG_K and A_FRAG and not HAS_PERM
    qw_base = qw_ptr + expert * stride_qe
    s_base = s_ptr + expert * stride_se
    z_base = z_ptr + expert * stride_ze
    up_rows = offs_n + up_offset

    s_pc = tl.zeros((BLOCK_SIZE_N, 1), dtype=s_ptr.dtype.element_ty)
    z_pc = tl.full((1, 1), 8, tl.int32)
    s_pc_up = s_pc
    z_pc_up = z_pc
    if GROUP_MODE == 0:
        s_pc, z_pc = _load_group_params(s_base, z_base, offs_n, n_mask, 0, stride_sn,
                                        stride_sg, stride_zn, stride_zg, HAS_ZEROS)
        if ACTIVATION != 0:
            s_pc_up, z_pc_up = _load_group_params(s_base, z_base, up_rows, n_mask, 0,
                                                  stride_sn, stride_sg, stride_zn, stride_zg,
                                                  HAS_ZEROS)

    if SWAP_AB:
        acc = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    acc_up = acc

    for k_start in range(0, K, BLOCK_SIZE_K):
        offs_k = k_start + offs_kb
        if EVEN_K:
            a_mask = slot_mask[:, None]
        else:
            a_mask = slot_mask[:, None] & (offs_k[None, :] < K)
        if A_CONTIGUOUS:
            # both orders cancel: a plain contiguous tile (K % 32 == 0, so no ragged run)
            a_cols = k_start + tl.arange(0, BLOCK_SIZE_K)
        elif HAS_PERM:
            if EVEN_K:
                a_cols = tl.load(perm_ptr + expert * stride_pe + offs_k)
            else:
                a_cols = tl.load(perm_ptr + expert * stride_pe + offs_k, mask=offs_k < K,
                                 other=0)
        else:
            a_cols = offs_k
        if A_FRAG and not A_CONTIGUOUS:
            a_cols = fragment_order(a_cols)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + a_cols[None, :] * stride_ak,
                    mask=a_mask, other=0.0)
        if FRAG_K:
            w = _weight_tile_frag(qw_base, s_base, z_base, offs_n, n_mask, k_start, K,
                                  stride_qn, stride_qk, stride_sn, stride_sg, stride_zn,
                                  stride_zg, s_pc, z_pc, GROUP_SIZE, GROUP_MODE, HAS_ZEROS,
                                  EVEN_K, BLOCK_SIZE_K, DEQUANT, IS_FP16)
        else:
            w = _weight_tile(qw_base, s_base, z_base, offs_n, n_mask, k_start, K, stride_qn,
                             stride_qk, stride_sn, stride_sg, stride_zn, stride_zg, s_pc, z_pc,
                             GROUP_SIZE, GROUP_MODE, HAS_ZEROS, EVEN_K, BLOCK_SIZE_K, DEQUANT,
                             IS_FP16)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(w), acc)
        if ACTIVATION != 0:
            if FRAG_K:
                w_up = _weight_tile_frag(qw_base, s_base, z_base, up_rows, n_mask, k_start, K,
                                         stride_qn, stride_qk, stride_sn, stride_sg,
                                         stride_zn, stride_zg, s_pc_up, z_pc_up, GROUP_SIZE,
                                         GROUP_MODE, HAS_ZEROS, EVEN_K, BLOCK_SIZE_K, DEQUANT,
                                         IS_FP16)
            else:
                w_up = _weight_tile(qw_base, s_base, z_base, up_rows, n_mask, k_start, K,
                                    stride_qn, stride_qk, stride_sn, stride_sg, stride_zn,
                                    stride_zg, s_pc_up, z_pc_up, GROUP_SIZE, GROUP_MODE,
                                    HAS_ZEROS, EVEN_K, BLOCK_SIZE_K, DEQUANT, IS_FP16)
            if SWAP_AB:
                acc_up = tl.dot(w_up, tl.trans(a), acc_up)
            else:
                acc_up = tl.dot(a, tl.trans(w_up), acc_up)

    if SWAP_AB:
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)
    if MUL_ROUTED_WEIGHT:
        rw = tl.load(topk_weights_ptr + slots, mask=slot_mask, other=0.0).to(tl.float32)
        acc = acc * rw[:, None]
        if ACTIVATION != 0:
            acc_up = acc_up * rw[:, None]
    if ACTIVATION != 0:
        acc = activation(acc, ACTIVATION) * acc_up
    if ATOMIC_TOPK_SUM:
        tl.atomic_add(c_ptrs, acc, mask=c_mask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _dequant_dense_kernel(
    qw_ptr, s_ptr, z_ptr, out_ptr, N, K,
    stride_qe, stride_qn, stride_qk,
    stride_se, stride_sn, stride_sg,
    stride_ze, stride_zn, stride_zg,
    stride_oe, stride_on, stride_ok,
    GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    EVEN_K: tl.constexpr, DEQUANT: tl.constexpr, IS_FP16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[e, n, k] = (q - z) * s for a [BLOCK_N, BLOCK_K] tile; grid (N/BN, K/BK, E).
    qweight int32 ``[E, N, K/8]``, scales/zeros ``[E, N, K/G]``, out ``[E, N, K]``."""
    e = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    k_start = tl.program_id(1) * BLOCK_K
    s_base = s_ptr + e * stride_se
    z_base = z_ptr + e * stride_ze
    s_pc = tl.zeros((BLOCK_N, 1), dtype=s_ptr.dtype.element_ty)
    z_pc = tl.full((1, 1), 8, tl.int32)
    if GROUP_MODE == 0:
        s_pc, z_pc = _load_group_params(s_base, z_base, rows, n_mask, 0, stride_sn, stride_sg,
                                        stride_zn, stride_zg, HAS_ZEROS)
    w = _weight_tile(qw_ptr + e * stride_qe, s_base, z_base, rows, n_mask, k_start, K,
                     stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg, s_pc,
                     z_pc, GROUP_SIZE, GROUP_MODE, HAS_ZEROS, EVEN_K, BLOCK_K, DEQUANT, IS_FP16)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    ptrs = out_ptr + e * stride_oe + rows[:, None] * stride_on + offs_k[None, :] * stride_ok
    if EVEN_K:
        tl.store(ptrs, w, mask=n_mask[:, None])
    else:
        tl.store(ptrs, w, mask=n_mask[:, None] & (offs_k[None, :] < K))


@triton.jit
def _act_mul_kernel(gu_ptr, out_ptr, w_ptr, I, stride_gm, stride_om,
                    ACTIVATION: tl.constexpr, MUL_WEIGHT: tl.constexpr, BLOCK_I: tl.constexpr):
    """out[r, :] = act(w[r] * gate) * (w[r] * up) for gate_up ``[R, 2I]`` (gate ``[:, :I]``,
    up ``[:, I:]``), in fp32, stored in out's dtype; ``w`` fp32 ``[R]`` only with
    MUL_WEIGHT. Grid (R, cdiv(I, BLOCK_I))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < I
    gate = tl.load(gu_ptr + row * stride_gm + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gm + I + cols, mask=mask, other=0.0).to(tl.float32)
    if MUL_WEIGHT:
        w = tl.load(w_ptr + row)
        gate = gate * w
        up = up * w
    y = activation(gate, ACTIVATION) * up
    tl.store(out_ptr + row * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _topk_sum_kernel(c_ptr, out_ptr, N, stride_cm, stride_cs, stride_om,
                     TOP_K: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                     PDL: tl.constexpr = False, counts_ptr=None, num_counts=0,
                     ZERO_COUNTS: tl.constexpr = False):
    """out[m, n] = sum_k sum_s c[s, m * TOP_K + k, n] in fp32, k ascending and for each k s
    ascending, rounded once to out's dtype. c ``[SPLITS, M * TOP_K, N]`` (``SPLITS`` partial
    sums of a split-K GEMM, ``stride_cs`` apart; one: ``[M * TOP_K, N]``), out ``[M, N]``;
    grid ``(M, cdiv(N, BLOCK_N))``.

    The order of the additions is fixed (slot 0, 1, ... of the token) and every element is
    computed on its own, so the result of a token depends neither on the batch size nor on
    the other tokens (the deterministic mode's top-k sum). Both loops are unrolled
    (``TOP_K`` is a constexpr), so a program issues all its loads before the first add: with
    a run-time loop each slot's load waited for the add before it, one L2 round trip a slot
    (SASS of the sm_90 build).

    ``ZERO_COUNTS``: program (0, 0) also sets the ``num_counts`` int32 at ``counts_ptr`` to
    zero (GEMM2's per-block counts, once GEMM2 is done: see ``GEMM2_WAITS_PER_BLOCK``)."""
    if PDL:
        wait_upstream_release_next()
    if ZERO_COUNTS:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            for c0 in range(0, num_counts, BLOCK_N):
                idx = c0 + tl.arange(0, BLOCK_N)
                tl.store(counts_ptr + idx, tl.zeros([BLOCK_N], dtype=tl.int32),
                         mask=idx < num_counts)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        for s in tl.static_range(SPLITS):
            acc += tl.load(c_ptr + s * stride_cs + (row * TOP_K + k) * stride_cm + offs,
                           mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _group_mode(group_size: int, k: int, block_k: int) -> int:
    if group_size == k:
        return 0
    if group_size % block_k == 0:
        return 1
    if block_k % group_size == 0:
        return 2
    raise ValueError(f"BLOCK_SIZE_K={block_k} and group_size={group_size}: one must divide "
                     "the other")


def _dequant_mode(config: dict, device: torch.device) -> int:
    """The config's DEQUANT (default 2 on a GPU); inline PTX (2) becomes 1 under the
    interpreter, which cannot run it."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda"
    mode = int(config.get("DEQUANT", 1 if interpreted else 2))
    if mode not in (0, 1, 2):
        raise ValueError(f"config DEQUANT is {mode}; expected 0, 1 or 2")
    return 1 if interpreted and mode == 2 else mode


def _fragment_tiles(config: dict) -> bool:
    """Whether ``config`` runs fragment-order weight tiles (``FRAG_K``, used with SWAP_AB)."""
    return bool(config.get("FRAG_K", False)) and bool(config.get("SWAP_AB", _SWAP_AB_DEFAULT))


@triton.jit
def _gather_sorted_rows_kernel(a_ptr, sorted_ids_ptr, num_post_padded_ptr, out_ptr, K, EM,
                               num_valid_slots, top_k, stride_am, stride_ak, stride_om,
                               A_IS_SLOTS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                               BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """out[p] = a[row(sorted_ids[p])] for the positions ``p < num_post_padded`` of one
    ``[BLOCK_ROWS, BLOCK_K]`` tile (grid: position tiles x column tiles), ``row(s) = s //
    top_k`` (or ``s`` with ``A_IS_SLOTS``); padding positions get zeros."""
    if PDL:
        wait_upstream_release_next()
    offs_p = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    num_post_padded = tl.load(num_post_padded_ptr)
    if tl.program_id(0) * BLOCK_ROWS >= num_post_padded:
        return
    p_mask = offs_p < tl.minimum(EM, num_post_padded)
    slots = tl.load(sorted_ids_ptr + offs_p, mask=p_mask, other=num_valid_slots).to(tl.int64)
    valid = slots < num_valid_slots
    if A_IS_SLOTS:
        rows = slots
    else:
        rows = slots // top_k
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    v = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                mask=valid[:, None] & k_mask[None, :], other=0.0)
    tl.store(out_ptr + offs_p.to(tl.int64)[:, None] * stride_om + offs_k[None, :], v,
             mask=p_mask[:, None] & k_mask[None, :])


def gather_sorted_rows(a: torch.Tensor, blocks: AlignedBlocks, *, top_k: int,
                       a_is_slots: bool = False, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """The activations of :func:`prefill_gemm` in sorted order, its ``a_sorted`` input:
    ``out[p] = a[blocks.sorted_token_ids[p] // top_k]`` (``a`` ``[M, K]`` by token; by slot
    with ``a_is_slots``) for every position ``p`` before ``blocks.num_tokens_post_padded``;
    padding positions get zeros, later rows are left as they are. One Triton kernel, no host
    sync. ``a`` may have any strides. ``out``: optional ``[EM, K]`` (or more rows) with unit
    column stride, ``EM = sorted_token_ids.numel()``."""
    sorted_ids, _, num_post_padded = blocks
    if a.dim() != 2:
        raise ValueError(f"a has shape {tuple(a.shape)}; expected 2 dims")
    em, k = sorted_ids.numel(), a.shape[1]
    if out is None:
        out = torch.empty(em, k, dtype=a.dtype, device=a.device)
    elif (out.dim() != 2 or out.shape[0] < em or out.shape[1] != k or out.dtype != a.dtype
          or out.device != a.device or out.stride(1) != 1):
        raise ValueError(f"out has shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}; "
                         f"expected at least ({em}, {k}), {a.dtype} on {a.device}, unit "
                         "column stride")
    if em == 0 or k == 0:
        return out
    block_rows, block_k = 16, min(512, triton.next_power_of_2(k))
    grid = (triton.cdiv(em, block_rows), triton.cdiv(k, block_k))
    _gather_sorted_rows_kernel[grid](
        a, sorted_ids, num_post_padded, out, k, em, a.shape[0] * (1 if a_is_slots else top_k),
        top_k, a.stride(0), a.stride(1), out.stride(0), A_IS_SLOTS=a_is_slots,
        BLOCK_ROWS=block_rows, BLOCK_K=block_k, num_warps=4, **prefill_pdl_args(a.device))
    return out


def fragment_order_columns(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` (K a multiple of 32) with column ``c`` moved to ``fragment_order(c)``:
    within each run of 32 columns, ``8i + 2c + p`` <-> ``8c + 2i + p``. Its own inverse."""
    m, k = x.shape
    if k % 32:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected a multiple of 32 columns")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out.view(m, k // 32, 4, 4, 2).copy_(x.reshape(m, k // 32, 4, 4, 2).transpose(2, 3))
    return out


def _gluon_call(a: torch.Tensor, weights: PackedWeights, config: dict, *,
                activation: str | None, a_fragment_order: bool = False,
                atomic_topk_sum: bool = False) -> dict:
    """The arguments of ``mma_unsupported`` / ``rs_unsupported`` for a :func:`prefill_gemm`
    call of ``a`` on ``weights`` with ``config``."""
    n_out = weights.n // 2 if activation is not None else weights.n
    return dict(device=a.device, k=weights.k, n_out=n_out, group_size=weights.group_size,
                config=config, has_perm=weights.perm is not None,
                a_fragment_order=a_fragment_order, atomic_topk_sum=atomic_topk_sum,
                activation=activation is not None, a=a, qweight=weights.qweight)


def prefill_gemm(
    a: torch.Tensor,
    weights: PackedWeights,
    blocks: AlignedBlocks,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None,
    *,
    top_k: int,
    mul_routed_weight: bool = False,
    a_is_slots: bool = False,
    activation: str | None = None,
    atomic_topk_sum: bool = False,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    a_fragment_order: bool = False,
    out_fragment_order: bool = False,
    a_sorted: bool = False,
    out_sorted: bool = False,
    ready_counts: torch.Tensor | None = None,
    ready_wait_tiles: int = 0,
) -> torch.Tensor:
    """One grouped int4 GEMM over aligned blocks.

    Args:
        a: activations, ``[M, K]`` indexed by token (``a_is_slots=False``, GEMM1) or
            ``[M*top_k, K]`` indexed by slot (``a_is_slots=True``, GEMM2); fp16/bf16 in the
            weights' dtype; any strides.
        weights: packed ``[E, N, K/8]`` weights (local experts; ``blocks`` carries local ids,
            i.e. any ``expert_map`` was applied by :func:`align_block_size`).
        blocks: :func:`align_block_size` output made with ``block_size ==
            config["BLOCK_SIZE_M"]``.
        topk_ids: ``[M, top_k]`` (only its shape is used: ``M*top_k`` valid slots).
        topk_weights: ``[M, top_k]`` router weights; required with ``mul_routed_weight``.
        mul_routed_weight: multiply output row ``slot`` by ``topk_weights.flatten()[slot]``.
        activation: None, or ``"silu"``/``"gelu"``/``"gelu_tanh"``: ``weights`` are w13
            (gate rows ``[0, N/2)``, up rows ``[N/2, N)``) and the output is
            ``act(gate) * up``, ``[M*top_k, N/2]``.
        atomic_topk_sum: add each slot's row into row ``slot // top_k`` of a float32
            ``[M, N]`` output instead (the top-k sum fused in; ``out`` is zeroed here).
        out: optional output tensor of the result's shape and dtype.
        config: kernel config (keys ``BLOCK_SIZE_M/N/K``, ``GROUP_SIZE_M``, ``num_warps``,
            ``num_stages``; optional ``SWAP_AB``, ``DEQUANT``, ``FRAG_K``: with SWAP_AB,
            weight tiles in :func:`fragment_order`, which spares the dequantized tile a trip
            through shared memory on the way to ``tl.dot``; ``RS``: the Gluon kernel of
            :mod:`~w4a16moe.kernels.prefill_rs` on Hopper where
            :func:`~w4a16moe.kernels.prefill_rs.rs_unsupported` allows, else these tiles on
            the Triton kernel); default from
            :func:`get_prefill_config` with ``BLOCK_SIZE_M`` taken from ``blocks``.
        a_fragment_order: ``a`` holds column ``c`` at column ``fragment_order(c)`` (e.g.
            written by a previous call with ``out_fragment_order``); K must be a multiple of
            32. With a ``FRAG_K`` config the activation tiles are then plain contiguous
            loads.
        out_fragment_order: store the output's columns in fragment order (output width a
            multiple of 32; not with ``atomic_topk_sum``).
        a_sorted: ``a`` holds one row per sorted position instead: ``[EM, K]`` with ``EM =
            blocks.sorted_token_ids.numel()`` (more rows are allowed), row ``p`` the
            activations of slot ``blocks.sorted_token_ids[p]`` (rows of padding positions
            are read but never affect a stored value). The Gluon kernel then reads a tile's
            rows with one TMA copy per K step instead of gathering them row by row.
        out_sorted: write the output that way too: ``[EM, N]``, row ``p`` for sorted
            position ``p`` (padding rows are left as they are); the input of a next call
            with ``a_sorted`` on the same blocks. Not with ``atomic_topk_sum``.
        ready_counts, ready_wait_tiles: a GEMM1 and GEMM2 pair on the mma kernel
            (:data:`~w4a16moe.kernels.prefill_mma.GEMM2_WAITS_PER_BLOCK`; only
            :func:`fused_moe_prefill` pairs them): int32 counts, one per block, zero. With
            ``ready_wait_tiles`` 0 this call (GEMM1) raises its block's count as each tile
            is stored; else this call (GEMM2, on GEMM1's output) waits per block until the
            count is ``ready_wait_tiles`` (the caller sets the counts back to zero once it is
            done: :func:`topk_sum`'s ``zero_counts``). A call given them that cannot run on
            the mma kernel is refused (its partner would wait forever).

    A config with ``"SPLIT_K": S`` > 1 (GEMM2-like calls only: no activation, atomic top-k
    sum, ``out_sorted`` or ``out_fragment_order``) splits K into S ranges, each program of
    the Gluon kernel doing one range of one tile, and returns the S float32 partial sums
    ``[S, M*top_k, N]`` (which :func:`topk_sum` adds up with the top-k slots); where the Gluon
    kernel does not run, the Triton kernel writes the whole sum into the first and zeros into
    the others.

    Returns:
        ``[M*top_k, N]`` (``[M*top_k, N/2]`` with ``activation``, ``[M, N]`` float32 with
        ``atomic_topk_sum``, ``[EM, ...]`` with ``out_sorted``, ``[S, M*top_k, N]`` float32
        with ``SPLIT_K``) in ``a``'s dtype. Rows of slots whose expert is -1 are zero.
    """
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation is {activation!r}; expected None or one of {ACTIVATIONS}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)}; expected [M, top_k]")
    m, tk = topk_ids.shape
    if tk != top_k:
        raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)}; expected [M, {top_k}] "
                         f"(top_k={top_k})")
    slots = m * top_k
    e, n_w, k = weights.num_experts, weights.n, weights.k
    if a.dim() != 2:
        raise ValueError(f"a has shape {tuple(a.shape)}; expected 2 dims")
    sorted_ids, expert_ids, num_post_padded = blocks
    for name, t in (("blocks.sorted_token_ids", sorted_ids), ("blocks.expert_ids", expert_ids),
                    ("blocks.num_tokens_post_padded", num_post_padded)):
        if t.dtype != torch.int32 or t.dim() != 1 or t.device != a.device or t.stride(0) != 1:
            raise ValueError(f"{name} has dtype {t.dtype}, shape {tuple(t.shape)} on "
                             f"{t.device}; expected a contiguous 1-D int32 tensor on "
                             f"{a.device}")
    em = sorted_ids.numel()
    if a_sorted:
        if a.shape[0] < em or a.shape[1] != k:
            raise ValueError(f"a has shape {tuple(a.shape)}; expected at least ({em}, {k}) "
                             f"with a_sorted (one row per sorted position)")
    else:
        rows = slots if a_is_slots else m
        if tuple(a.shape) != (rows, k):
            raise ValueError(f"a has shape {tuple(a.shape)}; expected {(rows, k)}")
    if a.dtype != weights.dtype:
        raise ValueError(f"a has dtype {a.dtype}; expected {weights.dtype} (the dtype of "
                         f"{weights.name}.scales)")
    if a.device != weights.device:
        raise ValueError(f"a is on {a.device}; expected {weights.device} (the weights' device)")
    if activation is not None and n_w % 2:
        raise ValueError(f"{weights.name} has N={n_w} rows; expected an even count (gate and "
                         "up) with an activation")
    if atomic_topk_sum and activation is not None:
        raise ValueError("atomic_topk_sum and activation cannot be combined")
    if atomic_topk_sum and out_sorted:
        raise ValueError("atomic_topk_sum and out_sorted cannot be combined (the atomic sum "
                         "writes one row per token)")
    n_out = n_w // 2 if activation is not None else n_w
    if mul_routed_weight:
        if topk_weights is None or tuple(topk_weights.shape) != (m, top_k):
            found = None if topk_weights is None else tuple(topk_weights.shape)
            raise ValueError(f"topk_weights has shape {found}; expected {(m, top_k)} with "
                             "mul_routed_weight")
        topk_weights = topk_weights.contiguous()
    if config is None:
        # the blocks fix BLOCK_SIZE_M; the rest comes from the tuned table / heuristic
        block_m = em // max(expert_ids.numel(), 1)
        config = {**get_prefill_config(m, n_w, k, e, top_k, a.dtype, a.device),
                  "BLOCK_SIZE_M": block_m}
        config.pop("DENSE", None)
    config = validate_config(config)
    split = config.get("SPLIT_K", 1)
    if split > 1 and (activation is not None or atomic_topk_sum or out_sorted
                      or out_fragment_order):
        raise ValueError(f"config has SPLIT_K={split}, which writes float32 partial sums per "
                         f"K range; expected no activation, atomic_topk_sum, out_sorted or "
                         f"out_fragment_order (found activation={activation!r}, "
                         f"atomic_topk_sum={atomic_topk_sum}, out_sorted={out_sorted}, "
                         f"out_fragment_order={out_fragment_order})")
    if atomic_topk_sum:
        out_shape, out_dtype = (m, n_out), torch.float32
    elif out_sorted:
        out_shape, out_dtype = (em, n_out), a.dtype
    elif split > 1:
        out_shape, out_dtype = (split, slots, n_out), torch.float32
    else:
        out_shape, out_dtype = (slots, n_out), a.dtype
    if out is not None:
        bad_rows = (out.shape[0] < em) if out_sorted else (out.shape[0] != out_shape[0])
        if (out.dim() != len(out_shape) or bad_rows or out.shape[1:] != out_shape[1:]
                or out.dtype != out_dtype or out.device != a.device):
            expected = (f"at least {out_shape}" if out_sorted else f"{out_shape}")
            raise ValueError(f"out has shape {tuple(out.shape)}, dtype {out.dtype} on "
                             f"{out.device}; expected {expected}, {out_dtype} on {a.device}"
                             + (f" (SPLIT_K={split}: one float32 partial sum per K range)"
                                if split > 1 else ""))
    else:
        out = torch.empty(out_shape, dtype=out_dtype, device=a.device)
    if atomic_topk_sum:
        out.zero_()
    if slots == 0:
        return out
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    if em % bm or expert_ids.numel() != em // bm:
        raise ValueError(f"blocks have {em} sorted slots and {expert_ids.numel()} expert ids; "
                         f"expected a multiple of BLOCK_SIZE_M={bm} slots and one id per "
                         f"block (align_block_size(..., block_size={bm}))")
    if a_fragment_order and k % 32:
        raise ValueError(f"a_fragment_order=True with K={k}; expected a multiple of 32 (the "
                         "fragment order works on runs of 32 columns)")
    if out_fragment_order and (n_out % 32 or atomic_topk_sum):
        raise ValueError(f"out_fragment_order=True with {n_out} output columns and "
                         f"atomic_topk_sum={atomic_topk_sum}; expected a multiple of 32 and "
                         "no atomic top-k sum")
    group_mode = _group_mode(weights.group_size, k, bk)
    q, s = weights.qweight, weights.scales
    z = weights.zeros if weights.zeros is not None else q  # dummy pointer when absent
    p = weights.perm if weights.perm is not None else q
    tw = topk_weights if mul_routed_weight else s
    gluon_call = _gluon_call(a, weights, config, activation=activation,
                             a_fragment_order=a_fragment_order, atomic_topk_sum=atomic_topk_sum)
    # why this call cannot run on the mma kernel (None: it runs there)
    no_mma = (mma_unsupported(**gluon_call) if config.get("MMA")
              else "its config is not an MMA one")
    if ready_counts is not None:
        if no_mma is not None:
            raise ValueError(f"ready_counts given, but this GEMM cannot run on the mma kernel: "
                             f"{no_mma}")
        if (ready_counts.dtype != torch.int32 or ready_counts.dim() != 1
                or ready_counts.numel() < expert_ids.numel()
                or ready_counts.device != a.device):
            raise ValueError(f"ready_counts has dtype {ready_counts.dtype}, shape "
                             f"{tuple(ready_counts.shape)} on {ready_counts.device}; expected "
                             f"int32 [>= {expert_ids.numel()}] (one per block) on {a.device}")
    if config.get("MMA") or config.get("RS"):
        # the Gluon kernels take the same call; where one cannot run, the Triton kernel runs
        # the same tiles
        gluon_args = (a, q, s, weights.zeros, out, topk_weights if mul_routed_weight else None,
                      sorted_ids, expert_ids, num_post_padded)
        gluon_kw = dict(n_out=n_out, k=k, slots=slots, top_k=top_k,
                        up_offset=n_w // 2 if activation is not None else 0,
                        group_size=weights.group_size, a_is_slots=a_is_slots,
                        activation_code=ACTIVATION_CODES[activation], config=config,
                        a_sorted=a_sorted, out_sorted=out_sorted)
        if no_mma is None:
            launch_prefill_mma(*gluon_args, **gluon_kw, ready_counts=ready_counts,
                               ready_wait_tiles=ready_wait_tiles)
            return out
        if config.get("RS"):
            reason = rs_unsupported(**gluon_call, out=out)
            if reason is None and a_sorted:
                reason = sorted_rows_unsupported(a, rows=em)
            if reason is None:
                launch_prefill_rs(*gluon_args, out_fragment_order=out_fragment_order,
                                  **gluon_kw)
                return out
    if split > 1:
        # the Triton kernel has no K split: the whole sum in the first partial, zeros in
        # the others (the same total)
        out[1:].zero_()
        config = {key: v for key, v in config.items() if key != "SPLIT_K"}
        out_full = out
        out = out[0]
    swap_ab = bool(config.get("SWAP_AB", _SWAP_AB_DEFAULT))
    grid = (triton.cdiv(em, bm) * triton.cdiv(n_out, bn),)
    _prefill_kernel[grid](
        a, q, s, z, p, out, tw, sorted_ids, expert_ids, num_post_padded,
        n_out, k, em, slots, top_k, n_w // 2 if activation is not None else 0,
        a.stride(0), a.stride(1),
        q.stride(0), q.stride(1), q.stride(2),
        s.stride(0), s.stride(1), s.stride(2),
        z.stride(0), z.stride(1), z.stride(2),
        p.stride(0),
        out.stride(0), out.stride(1),
        GROUP_SIZE=weights.group_size,
        GROUP_MODE=group_mode,
        A_IS_SLOTS=a_is_slots,
        A_SORTED=a_sorted,
        C_SORTED=out_sorted,
        MUL_ROUTED_WEIGHT=mul_routed_weight,
        HAS_ZEROS=weights.zeros is not None,
        HAS_PERM=weights.perm is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        ATOMIC_TOPK_SUM=atomic_topk_sum,
        EVEN_K=k % bk == 0,
        SWAP_AB=swap_ab,
        DEQUANT=_dequant_mode(config, a.device),
        IS_FP16=a.dtype == torch.float16,
        # with the weights as the shared-memory operand (no SWAP_AB) there is no register
        # round trip to spare, and Triton 3.6 failed to compile such a config: ignored there
        FRAG_K=bool(config.get("FRAG_K", False)) and swap_ab,
        A_FRAG=a_fragment_order,
        OUT_FRAG=out_fragment_order,
        BLOCK_SIZE_M=bm,
        BLOCK_SIZE_N=bn,
        BLOCK_SIZE_K=bk,
        GROUP_SIZE_M=config["GROUP_SIZE_M"],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
        **prefill_pdl_args(a.device),
    )
    return out_full if split > 1 else out


def dequantize_dense(weights: PackedWeights, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize packed weights into a dense ``[E, N, K]`` tensor in the scales' dtype with
    one Triton kernel (``W[e, n, k] = (q - z) * s``, the same rounding as the prefill
    kernel's tiles). Weights with an act-order ``perm`` are not supported (ValueError).
    ``out``: optional contiguous ``[E, N, K]`` destination."""
    if weights.perm is not None:
        raise ValueError(f"{weights.name} has an act-order perm; dequantize_dense needs "
                         "weights without one")
    e, n, k = weights.num_experts, weights.n, weights.k
    dtype = weights.scales.dtype
    if out is None:
        out = torch.empty(e, n, k, dtype=dtype, device=weights.device)
    elif (tuple(out.shape) != (e, n, k) or out.dtype != dtype or out.device != weights.device
          or not out.is_contiguous()):
        raise ValueError(f"out has shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}; "
                         f"expected contiguous {(e, n, k)}, {dtype} on {weights.device}")
    if out.numel() == 0:
        return out
    block_k = 128 if k >= 128 else max(16, triton.next_power_of_2(k))
    block_n = 64
    q, s = weights.qweight, weights.scales
    z = weights.zeros if weights.zeros is not None else q
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" or out.device.type != "cuda"
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k), e)
    _dequant_dense_kernel[grid](
        q, s, z, out, n, k,
        q.stride(0), q.stride(1), q.stride(2),
        s.stride(0), s.stride(1), s.stride(2),
        z.stride(0), z.stride(1), z.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP_SIZE=weights.group_size, GROUP_MODE=_group_mode(weights.group_size, k, block_k),
        HAS_ZEROS=weights.zeros is not None, EVEN_K=k % block_k == 0,
        DEQUANT=1 if interpreted else 2, IS_FP16=dtype == torch.float16,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def dense_path_supported(experts: PackedExperts, expert_map: torch.Tensor | None,
                         device: torch.device) -> bool:
    """Whether :func:`fused_moe_prefill` can run the dequantize + ``torch._grouped_mm``
    path: no ``expert_map``, no act-order ``perm``, ``torch._grouped_mm`` present, and on a
    GPU bf16 activations (its CUDA kernels' dtype)."""
    if expert_map is not None or experts.w13.perm is not None or experts.w2.perm is not None:
        return False
    if not hasattr(torch, "_grouped_mm"):
        return False
    return device.type != "cuda" or experts.dtype == torch.bfloat16


def _moe_dense(hidden_states: torch.Tensor, experts: PackedExperts, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor, activation: str, on_input: bool, out: torch.Tensor,
               workspace: PrefillWorkspace | None) -> torch.Tensor:
    """The layer as dequantize-to-dense + ``torch._grouped_mm`` over the slots sorted by
    expert (``align_block_size`` with block 1: no padding). One dense scratch of the larger
    projection is reused for both (w13, then w2)."""
    m, h = hidden_states.shape
    top_k = topk_ids.shape[1]
    e, i = experts.num_experts, experts.intermediate_size
    slots = m * top_k
    dtype, device = experts.dtype, hidden_states.device
    ws_align = workspace.align_views(slots, 1, e) if workspace is not None else None
    if ws_align is not None:
        blocks = align_block_size(topk_ids, 1, e, out=ws_align[0], scratch=ws_align[1])
    else:
        blocks = align_block_size(topk_ids, 1, e)
    order = blocks.sorted_token_ids.long()                 # [slots]: no padding with block 1
    flat_ids = topk_ids.reshape(-1).long()
    counts = torch.zeros(e, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    offs = counts.cumsum(0).to(torch.int32)
    w_sorted = topk_weights.reshape(-1)[order].to(torch.float32).contiguous()

    need = max(2 * i * h, h * i) * e
    scratch = workspace.dense_weights if workspace is not None else None
    if scratch is None or scratch.numel() < need or scratch.dtype != dtype:
        scratch = torch.empty(need, dtype=dtype, device=device)
    a = hidden_states.index_select(0, order // top_k)
    w13 = dequantize_dense(experts.w13, scratch[: e * 2 * i * h].view(e, 2 * i, h))
    gate_up = torch._grouped_mm(a, w13.transpose(1, 2), offs=offs)
    inter = torch.empty(slots, i, dtype=dtype, device=device)
    block_i = min(1024, triton.next_power_of_2(i))
    _act_mul_kernel[(slots, triton.cdiv(i, block_i))](
        gate_up, inter, w_sorted, i, gate_up.stride(0), inter.stride(0),
        ACTIVATION=ACTIVATION_CODES[activation], MUL_WEIGHT=on_input, BLOCK_I=block_i,
        num_warps=4)
    w2 = dequantize_dense(experts.w2, scratch[: e * h * i].view(e, h, i))
    y = torch._grouped_mm(inter, w2.transpose(1, 2), offs=offs)
    if not on_input:
        y = (y.float() * w_sorted[:, None]).to(dtype)
    per_slot = torch.empty(slots, h, dtype=dtype, device=device)
    per_slot.index_copy_(0, order, y)
    if top_k == 1:
        out.copy_(per_slot)
    else:
        topk_sum(per_slot, top_k, out)
    return out


#: BLOCK_SIZE_M values a workspace's alignment buffers are sized for
WORKSPACE_BLOCK_SIZES = ALIGN_BLOCK_SIZES


@dataclass
class PrefillWorkspace:
    """Reusable buffers of :func:`fused_moe_prefill` for up to ``max_slots = max_tokens *
    top_k`` slots: ``intermediate`` ``[max_slots, I]`` (GEMM1 output after the activation)
    and ``gemm2_out`` ``[max_slots, H]`` (per-slot GEMM2 output before the top-k sum).

    With ``num_experts_align`` set (by :meth:`allocate`), also the outputs of
    :func:`align_block_size` for any ``BLOCK_SIZE_M`` in :data:`WORKSPACE_BLOCK_SIZES` and up
    to that many (global) experts: int32 ``sorted_ids``, ``expert_ids``,
    ``num_post_padded [1]`` and the Triton kernels' ``align_scratch``; then a call allocates
    nothing (given ``out``). ``dense_weights`` (``allocate(..., dense=True)``): the
    ``E * max(2I*H, H*I)`` scratch of the dense path (``"DENSE"`` configs), which otherwise
    allocates it per call (that path also allocates its activations). ``hidden_fragment``
    ``[max_tokens, H]``: the input with its columns in fragment order, for a GEMM1 config
    with ``FRAG_K`` (see :func:`fused_moe_prefill`). ``block_ready``: int32 zeros, one per
    aligned block, the counts by which GEMM2 waits for its block's GEMM1 tiles on the mma
    kernel (:data:`~w4a16moe.kernels.prefill_mma.GEMM2_WAITS_PER_BLOCK`; zero again after
    every layer).

    With ``SORTED_ROWS`` configs ``intermediate`` and ``gemm2_out`` also hold the
    intermediate and the hidden states in sorted order, one row per position of the aligned
    blocks (padding included, so more rows than ``max_slots``): ``allocate(...,
    sorted_block=B)`` makes room for blocks up to ``B`` at ``max_tokens``, ``allocate(...,
    sorted_rows=R)`` for ``R`` positions, else the first such call grows them
    (:meth:`sorted_views`).
    """

    intermediate: torch.Tensor
    gemm2_out: torch.Tensor
    sorted_ids: torch.Tensor | None = None
    expert_ids: torch.Tensor | None = None
    num_post_padded: torch.Tensor | None = None
    align_scratch: torch.Tensor | None = None
    num_experts_align: int = 0
    dense_weights: torch.Tensor | None = None
    hidden_fragment: torch.Tensor | None = None
    split_partials: torch.Tensor | None = None
    block_ready: torch.Tensor | None = None

    @classmethod
    def allocate(cls, max_tokens: int, experts: PackedExperts, top_k: int,
                 device: torch.device | str | None = None,
                 num_global_experts: int | None = None,
                 dense: bool = False, sorted_block: int = 0, sorted_rows: int = 0,
                 split_partials: int = 0) -> PrefillWorkspace:
        """Buffers for up to ``max_tokens`` tokens; ``num_global_experts`` (default
        ``experts.num_experts``) sizes the alignment buffers (pass the global count when an
        ``expert_map`` is used); ``sorted_block``: room for the sorted rows of blocks up to
        that ``BLOCK_SIZE_M`` (``SORTED_ROWS`` configs; 0: none); ``sorted_rows``: room for
        that many sorted positions (the most a smaller call's blocks pad to may exceed
        ``max_tokens``' at ``sorted_block``); ``split_partials``: float32
        elements for GEMM2's partial sums (``SPLIT_K`` configs: splits x slots x H; 0:
        none)."""
        device = experts.device if device is None else device
        slots = max_tokens * top_k
        kw = {"dtype": experts.dtype, "device": device}
        e = experts.num_experts if num_global_experts is None else num_global_experts
        align = AlignmentBuffers.allocate(slots, e, device)
        if sorted_rows < 0:
            raise ValueError(f"sorted_rows is {sorted_rows}; expected >= 0")
        rows = max(slots, sorted_rows,
                   max_num_tokens_padded(slots, sorted_block, e) if sorted_block else 0)
        return cls(intermediate=torch.empty(rows, experts.intermediate_size, **kw),
                   gemm2_out=torch.empty(rows, experts.hidden_size, **kw),
                   sorted_ids=align.sorted_ids, expert_ids=align.expert_ids,
                   num_post_padded=align.num_post_padded, align_scratch=align.scratch,
                   num_experts_align=e,
                   dense_weights=torch.empty(experts.num_experts * 2 * experts.intermediate_size
                                             * experts.hidden_size, **kw) if dense else None,
                   hidden_fragment=torch.empty(max_tokens, experts.hidden_size, **kw),
                   split_partials=torch.empty(split_partials, dtype=torch.float32,
                                              device=device) if split_partials else None,
                   block_ready=torch.zeros(align.max_blocks, dtype=torch.int32,
                                           device=device))

    def views(self, slots: int, experts: PackedExperts) -> tuple[torch.Tensor, torch.Tensor]:
        i, h = experts.intermediate_size, experts.hidden_size
        for name, t, cols in (("intermediate", self.intermediate, i),
                              ("gemm2_out", self.gemm2_out, h)):
            if (t.dim() != 2 or t.shape[0] < slots or t.shape[1] != cols
                    or t.dtype != experts.dtype or t.device != experts.device
                    or not t.is_contiguous()):
                raise ValueError(f"workspace.{name} has shape {tuple(t.shape)}, dtype {t.dtype} "
                                 f"on {t.device}; expected at least ({slots}, {cols}), "
                                 f"{experts.dtype} on {experts.device}, contiguous")
        return self.intermediate[:slots], self.gemm2_out[:slots]

    def sorted_views(self, em: int, experts: PackedExperts
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([em, I], [em, H])`` views of ``intermediate`` and ``gemm2_out`` for the sorted
        rows of ``em`` positions (``SORTED_ROWS``: the sorted intermediate, and the hidden
        states in sorted order, which GEMM2's output may overwrite once GEMM1 has read
        them). Buffers with fewer rows are replaced by larger ones first (an allocation:
        size the workspace with ``allocate(..., sorted_block=...)`` before a CUDA-graph
        capture)."""
        self.views(0, experts)  # shape, dtype and device checks
        if self.intermediate.shape[0] < em:
            self.intermediate = self.intermediate.new_empty(em, self.intermediate.shape[1])
        if self.gemm2_out.shape[0] < em:
            self.gemm2_out = self.gemm2_out.new_empty(em, self.gemm2_out.shape[1])
        return self.intermediate[:em], self.gemm2_out[:em]

    def partials_view(self, splits: int, slots: int, cols: int) -> torch.Tensor:
        """A float32 ``[splits, slots, cols]`` view for a split-K GEMM2's partial sums
        (``SPLIT_K``), replacing a smaller buffer first (an allocation: size the workspace
        with ``allocate(..., split_partials=...)`` before a CUDA-graph capture)."""
        need = splits * slots * cols
        buf = self.split_partials
        if buf is None or buf.numel() < need:
            device = self.intermediate.device
            buf = self.split_partials = torch.empty(need, dtype=torch.float32, device=device)
        return buf[:need].view(splits, slots, cols)

    def align_views(self, slots: int, block_size: int, num_experts: int
                    ) -> tuple[AlignedBlocks, torch.Tensor] | None:
        """(outputs, scratch) of :func:`align_block_size` for ``slots`` slots over
        ``num_experts`` experts, as views of this workspace; None if it has no such buffers
        or they are too small (the caller then allocates)."""
        if self.sorted_ids is None:
            return None
        return AlignmentBuffers(self.sorted_ids, self.expert_ids, self.num_post_padded,
                                self.align_scratch, self.num_experts_align
                                ).views(slots, block_size, num_experts)


#: deterministic mode: the tuned config of this token count is used for *every* M, so the
#: kernels a token goes through do not change with the batch (see
#: :func:`deterministic_prefill_configs`)
DETERMINISTIC_REFERENCE_M = 256
#: smallest token tile the deterministic mode takes from a smaller batch's tuned config: the
#: tables' 8-slot ``MMA`` entries (for the mma kernel, which this mode does not run) gave the
#: Triton kernel 8-token tiles, whose sums differed in a last bit from the 16- to 128-token
#: tiles of larger batches (H200, session 39: qwen3-30b, a batch of 1 against one of 4096)
DETERMINISTIC_MIN_BLOCK_M = 16


def deterministic_prefill_configs(experts: PackedExperts, top_k: int,
                                  device: torch.device | str | None = None,
                                  reference_m: int = DETERMINISTIC_REFERENCE_M,
                                  num_tokens: int | None = None) -> tuple[dict, dict]:
    """(GEMM1, GEMM2) configs of the deterministic mode for one layer shape.

    The configs tuned for ``reference_m`` tokens (:func:`get_prefill_config`), without the
    dense path (``torch._grouped_mm`` picks its algorithm by shape) and with GEMM2's
    ``BLOCK_SIZE_M`` equal to GEMM1's. Each row of a ``tl.dot`` tile is computed from its own
    activation row with a K order fixed by the config, so the result of a token does not
    depend on the other tokens of the batch.

    Only ``BLOCK_SIZE_M`` (and ``GROUP_SIZE_M``, the program order) may follow
    ``num_tokens``, and only when both reference configs are ``SWAP_AB``: there the tokens
    are the N side of the MMA (the weight rows its M side), so a larger token tile issues the
    same MMA instructions along K per output element, from 16 tokens up
    (:data:`DETERMINISTIC_MIN_BLOCK_M`: an 8-token tile did not). Without ``SWAP_AB`` the
    tokens are the MMA's M side, where the tile size can change the instruction, so it stays
    fixed.
    """
    device = torch.device(device) if device is not None else experts.device
    i, h, e = experts.intermediate_size, experts.hidden_size, experts.num_experts
    cfg1 = get_prefill_config(reference_m, 2 * i, h, e, top_k, experts.dtype, device)
    cfg2 = get_prefill_config(reference_m, h, i, e, top_k, experts.dtype, device)
    cfg1.pop("DENSE", None)
    cfg2.pop("DENSE", None)
    for cfg in (cfg1, cfg2):
        # one kernel for every batch: the Gluon kernel's constraints are not part of the
        # batch-invariance checks, so its tiles run on the Triton kernel here
        cfg.pop("RS", None)
    if (num_tokens is not None and cfg1.get("SWAP_AB", False)
            and cfg2.get("SWAP_AB", False)):
        at_m = get_prefill_config(num_tokens, 2 * i, h, e, top_k, experts.dtype, device)
        cfg1["BLOCK_SIZE_M"] = max(at_m["BLOCK_SIZE_M"], DETERMINISTIC_MIN_BLOCK_M)
        cfg1["GROUP_SIZE_M"] = at_m["GROUP_SIZE_M"]
        cfg2["GROUP_SIZE_M"] = at_m["GROUP_SIZE_M"]
    cfg2["BLOCK_SIZE_M"] = cfg1["BLOCK_SIZE_M"]
    return cfg1, cfg2


#: columns and warps of a :func:`topk_sum` program (its grid: tokens x column blocks); 8
#: columns a thread, 16-byte loads of 16-bit values. 256 columns on one warp rather than 1024
#: on four: four times the programs, spread over more SMs, for the same bytes. H200 layer A/B
#: (session 39, router included, two runs, each against the 1024-column programs before and
#: after in the same run): qwen3-30b M=1 / 2 / 4 / 8 -0.2 / -0.1 / 0.0 to -0.1 / -0.1 to -0.2
#: us, M=16 / 32 / 64 -0.3 to -0.4 / -0.3 to -0.6 / -0.1 to -0.7; deepseek-v2-lite M=2 / 4 / 16
#: -0.1 to -0.3; olmoe M=4 / 8 -0.1 / -0.2; Mixtral M=2 -0.2 (M=4 under the power cap). The
#: same bits (each element is added up in its fixed order either way). The switch is for A/Bs
TOPK_SUM_BLOCK_N = 256
TOPK_SUM_WARPS = 1


def topk_sum(per_slot: torch.Tensor, top_k: int, out: torch.Tensor, *,
             zero_counts: torch.Tensor | None = None) -> torch.Tensor:
    """``out[m] = sum_k per_slot[m * top_k + k]`` in fp32, in ascending k, one kernel.

    ``per_slot`` ``[M * top_k, N]``, or ``[S, M * top_k, N]`` (the S partial sums of a
    split-K GEMM2, ``SPLIT_K`` configs: added too, for each k in ascending s), and ``out``
    ``[M, N]``, both with a contiguous last dim. Unlike ``torch.sum`` (whose reduction
    strategy may change with the shape), the order of the additions is fixed: bitwise the
    same for a token whatever the batch. ``zero_counts``: a contiguous int32 tensor the
    kernel also sets to zero (GEMM2's per-block counts in :func:`fused_moe_prefill`)."""
    if per_slot.dim() not in (2, 3):
        raise ValueError(f"per_slot has shape {tuple(per_slot.shape)}; expected [M * top_k, N] "
                         "or [S, M * top_k, N]")
    splits = per_slot.shape[0] if per_slot.dim() == 3 else 1
    slots, n = per_slot.shape[-2:]
    m = out.shape[0]
    if slots != m * top_k or tuple(out.shape) != (m, n) or splits < 1:
        raise ValueError(f"per_slot has shape {tuple(per_slot.shape)} and out "
                         f"{tuple(out.shape)}; expected [{m * top_k}, N] (or [S >= 1, "
                         f"{m * top_k}, N]) and [{m}, N] (top_k={top_k})")
    for name, t in (("per_slot", per_slot), ("out", out)):
        if n > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} has strides {t.stride()}; expected the last dim "
                             "contiguous")
    if zero_counts is not None and (zero_counts.dtype != torch.int32
                                    or not zero_counts.is_contiguous()
                                    or zero_counts.device != out.device):
        raise ValueError(f"zero_counts has dtype {zero_counts.dtype} on {zero_counts.device} "
                         f"(contiguous: {zero_counts.is_contiguous()}); expected a contiguous "
                         f"int32 tensor on {out.device}")
    if m == 0 or n == 0:
        if zero_counts is not None:
            zero_counts.zero_()
        return out
    block_n = min(TOPK_SUM_BLOCK_N, triton.next_power_of_2(n))
    _topk_sum_kernel[(m, triton.cdiv(n, block_n))](
        per_slot, out, n, per_slot.stride(-2),
        per_slot.stride(0) if per_slot.dim() == 3 else 0, out.stride(0), TOP_K=top_k,
        SPLITS=splits, BLOCK_N=block_n, num_warps=TOPK_SUM_WARPS, counts_ptr=zero_counts,
        num_counts=0 if zero_counts is None else zero_counts.numel(),
        ZERO_COUNTS=zero_counts is not None, **prefill_pdl_args(out.device))
    return out


def layer_configs(experts: PackedExperts, top_k: int, num_tokens: int,
                  device: torch.device | str | None = None, deterministic: bool = False
                  ) -> tuple[dict, dict]:
    """The (GEMM1, GEMM2) configs :func:`fused_moe_prefill` runs for ``num_tokens`` tokens
    when none are given: the tuned table's (:func:`get_prefill_config`), or in the
    deterministic mode :func:`deterministic_prefill_configs`."""
    device = experts.device if device is None else device
    if deterministic:
        return deterministic_prefill_configs(experts, top_k, device, num_tokens=num_tokens)
    i, h = experts.intermediate_size, experts.hidden_size
    return tuple(get_prefill_config(num_tokens, n, k, experts.num_experts, top_k,
                                    experts.dtype, device) for n, k in ((2 * i, h), (h, i)))


def fused_moe_prefill(
    hidden_states: torch.Tensor,
    experts: PackedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: PrefillWorkspace | None = None,
    configs: tuple[dict, dict] | None = None,
    atomic_topk_sum: bool = False,
    deterministic: bool = False,
    blocks: AlignedBlocks | None = None,
) -> torch.Tensor:
    """MoE experts layer with the prefill kernel: ``out[m] = sum_k w[m,k] * W2[e] @
    act(W13[e] @ x[m])``, ``e = topk_ids[m, k]`` (through ``expert_map``; -1 contributes 0).

    Args:
        hidden_states: ``[M, H]`` fp16/bf16 (the experts' dtype).
        experts: packed experts (local experts when ``expert_map`` is given).
        topk_weights: ``[M, top_k]`` router weights; topk_ids: ``[M, top_k]`` global ids.
        activation: ``"silu"``, ``"gelu"`` or ``"gelu_tanh"``; fused into GEMM1's epilogue.
        apply_router_weight_on_input: scale GEMM1's input (equivalently its output, before
            the activation) instead of GEMM2's output.
        expert_map: optional int32 ``[num_global_experts]`` global -> local id (-1: remote).
        out: optional ``[M, H]`` output in the experts' dtype.
        workspace: optional :class:`PrefillWorkspace` sized for at least ``M`` tokens; with
            it (made by :meth:`PrefillWorkspace.allocate` for at least the global expert
            count) nothing is allocated on a GPU, except with ``atomic_topk_sum``.
        configs: optional (GEMM1 config, GEMM2 config); GEMM2's BLOCK_SIZE_M is forced to
            GEMM1's (both walk the same blocks). ``"SORTED_ROWS": True`` in a GEMM's config
            feeds that GEMM its activations in sorted order (one row per position of the
            aligned blocks; the Gluon kernel then reads them by TMA): for GEMM1 the hidden
            states are first copied so (:func:`gather_sorted_rows`), for GEMM2 GEMM1 writes
            its output so. ``"DENSE": True`` in GEMM1's config (tuned
            tables set it where it measured faster) runs the layer as
            :func:`dequantize_dense` + ``torch._grouped_mm`` instead, when
            :func:`dense_path_supported` (else the flag is ignored). ``"SPLIT_K": S`` in
            GEMM2's config splits its K into S ranges whose float32 partial sums the top-k
            sum adds (more programs than tiles when a few tokens touch few experts; see
            :func:`prefill_gemm`).
        atomic_topk_sum: sum the top-k slots with fp32 atomics in GEMM2's epilogue instead of
            a separate reduction (order-nondeterministic rounding).
        deterministic: bitwise reproducible and batch invariant: the configs of
            :func:`deterministic_prefill_configs` (the same for every M, never the dense
            path) unless ``configs`` are given (then only ``"DENSE"`` is dropped). The
            top-k sum is in a fixed order (:func:`topk_sum`) in every mode. Rejects
            ``atomic_topk_sum``.
        blocks: ``topk_ids`` already aligned (:func:`align_block_size`, or the routing and
            alignment of :func:`fused_moe_prefill_from_logits`) to ``configs[0]``'s
            ``BLOCK_SIZE_M`` over the global experts through ``expert_map``; needs
            ``configs``. The layer then skips its own alignment.

    Returns:
        ``[M, H]`` in the experts' dtype.
    """
    if blocks is not None and configs is None:
        raise ValueError("blocks is given without configs; expected both (the blocks' size "
                         "is GEMM1's BLOCK_SIZE_M)")
    num_global = check_routing(hidden_states, experts, topk_weights, topk_ids, expert_map)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation is {activation!r}; expected one of {ACTIVATIONS}")
    if hidden_states.dtype != experts.dtype:
        raise ValueError(f"hidden_states has dtype {hidden_states.dtype}; expected "
                         f"{experts.dtype} (the experts' dtype)")
    if deterministic and atomic_topk_sum:
        raise ValueError("atomic_topk_sum=True with deterministic=True; expected at most one "
                         "(the atomic top-k sum adds in a nondeterministic order)")
    m, h = hidden_states.shape
    top_k = topk_ids.shape[1]
    i = experts.intermediate_size
    if out is not None and (tuple(out.shape) != (m, h) or out.dtype != experts.dtype
                            or out.device != hidden_states.device):
        raise ValueError(f"out has shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}; "
                         f"expected {(m, h)}, {experts.dtype} on {hidden_states.device}")
    if out is None:
        out = torch.empty(m, h, dtype=experts.dtype, device=hidden_states.device)
    if m == 0:
        return out
    # small layers: the kernels below launch as a chain of programmatic dependents (.pdl)
    with prefill_chain(m):
        slots = m * top_k
        if workspace is not None:
            inter, c2 = workspace.views(slots, experts)
        else:
            inter = torch.empty(slots, i, dtype=experts.dtype, device=hidden_states.device)
            c2 = None if atomic_topk_sum else torch.empty(slots, h, dtype=experts.dtype,
                                                          device=hidden_states.device)
        if configs is None:
            cfg1, cfg2 = layer_configs(experts, top_k, m, hidden_states.device, deterministic)
        else:
            cfg1, cfg2 = (dict(c) for c in configs)
        if deterministic:
            cfg1.pop("DENSE", None)
        if cfg1.get("DENSE", False) and dense_path_supported(experts, expert_map,
                                                             hidden_states.device):
            return _moe_dense(hidden_states, experts, topk_weights, topk_ids, activation,
                              apply_router_weight_on_input, out, workspace)
        cfg1.pop("SPLIT_K", None)  # GEMM1's fused activation needs whole sums: never split
        cfg2 = {**cfg2, "BLOCK_SIZE_M": cfg1["BLOCK_SIZE_M"]}
        # SPLIT_K: GEMM2 writes float32 partial sums per K range, which the top-k sum adds (the
        # atomic top-k sum adds into one buffer itself: no split there)
        split2 = 1 if atomic_topk_sum else cfg2.get("SPLIT_K", 1)
        if split2 == 1:
            cfg2.pop("SPLIT_K", None)
        # fragment-order weight tiles (FRAG_K with SWAP_AB) read their activations as plain
        # 16-byte copies when the activations are stored in fragment order: GEMM1's input is
        # permuted here (one copy), GEMM1 writes the intermediate that way for GEMM2
        a_frag1 = (_fragment_tiles(cfg1) and h % 32 == 0 and experts.w13.perm is None)
        a_frag2 = (_fragment_tiles(cfg2) and i % 32 == 0 and experts.w2.perm is None
                   and not atomic_topk_sum)
        x1 = hidden_states
        if a_frag1:
            buf = workspace.hidden_fragment if workspace is not None else None
            if buf is None or buf.shape[0] < m or buf.shape[1] != h or buf.dtype != x1.dtype:
                buf = torch.empty(m, h, dtype=x1.dtype, device=x1.device)
            x1 = fragment_order_columns(hidden_states, out=buf[:m])
        bm = cfg1["BLOCK_SIZE_M"]
        ws_align = workspace.align_views(slots, bm, num_global) if workspace is not None else None
        if blocks is not None:
            _check_given_blocks(blocks, slots, bm, num_global)
        elif ws_align is not None:
            blocks = align_block_size(topk_ids, bm, num_global, expert_map, out=ws_align[0],
                                      scratch=ws_align[1])
        else:
            blocks = align_block_size(topk_ids, bm, num_global, expert_map)
        # SORTED_ROWS: activations as rows in sorted order (read by TMA on the Gluon kernel)
        sorted1, sorted2 = bool(cfg1.get("SORTED_ROWS")), bool(cfg2.get("SORTED_ROWS"))
        if sorted1 or sorted2:
            em = blocks.sorted_token_ids.numel()
            if workspace is not None:
                rows = workspace.sorted_views(em, experts)
                if c2 is not None:  # the buffer may have grown: GEMM2's output in the new one
                    c2 = workspace.gemm2_out[:slots]
            else:   # only what the flags need
                rows = tuple(torch.empty(em, cols, dtype=experts.dtype, device=hidden_states.device)
                             if need else None for cols, need in ((i, sorted2), (h, sorted1)))
            if sorted2:
                inter = rows[0]
            if sorted1:
                # in the buffer of GEMM2's output, which is written only after GEMM1 read it
                x1 = gather_sorted_rows(x1, blocks, top_k=top_k, out=rows[1])
        mul2 = not apply_router_weight_on_input
        # GEMM2 waiting per block for GEMM1's tiles (None: for all of GEMM1)
        tiles1 = i // cfg1["BLOCK_SIZE_N"]  # GEMM1's tiles a block
        ready = _block_ready_counts(x1, inter, experts, blocks, cfg1, cfg2, activation,
                                    workspace, tiles1=tiles1, num_tokens=m, sorted1=sorted1,
                                    split2=split2,
                                    atomic_topk_sum=atomic_topk_sum,
                                    fragment_order=(a_frag1, a_frag2))
        try:
            with annotate_gemm(PREFILL_KERNEL_NAME, m, 2 * i, h, num_global, top_k):
                prefill_gemm(x1, experts.w13, blocks, topk_ids, topk_weights, top_k=top_k,
                             mul_routed_weight=apply_router_weight_on_input,
                             activation=activation, out=inter, config=cfg1,
                             a_fragment_order=a_frag1, out_fragment_order=a_frag2,
                             a_sorted=sorted1, out_sorted=sorted2, ready_counts=ready)
            if atomic_topk_sum:
                with annotate_gemm(PREFILL_KERNEL_NAME, m, h, i, num_global, top_k):
                    acc = prefill_gemm(inter, experts.w2, blocks, topk_ids, topk_weights,
                                       top_k=top_k, mul_routed_weight=mul2, a_is_slots=True,
                                       atomic_topk_sum=True, config=cfg2, a_sorted=sorted2)
                out.copy_(acc)
                return out
            if split2 > 1:
                c2 = (workspace.partials_view(split2, slots, h) if workspace is not None else
                      torch.empty(split2, slots, h, dtype=torch.float32,
                                  device=hidden_states.device))
            with annotate_gemm(PREFILL_KERNEL_NAME, m, h, i, num_global, top_k):
                prefill_gemm(inter, experts.w2, blocks, topk_ids, topk_weights, top_k=top_k,
                             mul_routed_weight=mul2, a_is_slots=True, out=c2, config=cfg2,
                             a_fragment_order=a_frag2, a_sorted=sorted2, ready_counts=ready,
                             ready_wait_tiles=0 if ready is None else tiles1)
            if top_k == 1 and split2 == 1:
                out.copy_(c2)
                if ready is not None:
                    ready.zero_()
            else:
                # the fixed-order kernel in every mode: bit-identical to torch.sum on the H100
                # and 1.1-4x faster (benchmarks/layer_small_kernels_ab.py); it also sets
                # GEMM2's per-block counts back to zero, once GEMM2 is done
                topk_sum(c2, top_k, out, zero_counts=ready)
        except BaseException:
            if ready is not None:  # a GEMM1 that ran without its GEMM2 left counts behind
                ready.zero_()
            raise
        return out


def _check_given_blocks(blocks: AlignedBlocks, slots: int, block_size: int,
                        num_experts: int) -> None:
    """Raise ValueError unless ``blocks`` has the shapes of :func:`align_block_size` for
    ``slots`` slots over ``num_experts`` experts in blocks of ``block_size``."""
    padded = max_num_tokens_padded(slots, block_size, num_experts)
    want = ((padded,), (padded // block_size,), (1,))
    shapes = tuple(tuple(getattr(t, "shape", ())) for t in blocks)
    if shapes != want:
        raise ValueError(f"blocks has shapes {shapes}; expected {want} (align_block_size of "
                         f"{slots} slots over {num_experts} experts, BLOCK_SIZE_M="
                         f"{block_size})")


def fused_moe_prefill_from_logits(
    hidden_states: torch.Tensor,
    experts: PackedExperts,
    router_logits: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = True,
    scoring: str = "softmax",
    num_expert_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: PrefillWorkspace | None = None,
    configs: tuple[dict, dict] | None = None,
    atomic_topk_sum: bool = False,
    deterministic: bool = False,
) -> torch.Tensor:
    """Route ``router_logits [M, E]`` (the arguments of :func:`~w4a16moe.routing.fused_topk`)
    and run :func:`fused_moe_prefill` (its other arguments) on the routing.

    Where one program can route and align (:func:`~w4a16moe.routing.fused_topk_align`: as
    many tokens as :func:`~w4a16moe.kernels.route_align.supported` takes, no grouped top-k,
    not the dense path, not the deterministic mode, :data:`ROUTE_ALIGN` on) it does, into the
    workspace's alignment buffers, and the layer skips its own alignment: one kernel fewer at
    the head of the chain, the same outputs (bit for bit where the routing weights are:
    :func:`~w4a16moe.routing.fused_topk_align`). Elsewhere
    :func:`~w4a16moe.routing.fused_topk` routes and the layer aligns.
    """
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
        found = tuple(getattr(hidden_states, "shape", ()))
        raise ValueError(f"hidden_states has shape {found}; expected [M, H]")
    m = hidden_states.shape[0]
    grouped = check_router_args(router_logits, top_k, scoring, num_expert_group, topk_group,
                                correction_bias)
    if router_logits.shape[0] != m:
        raise ValueError(f"router_logits has shape {tuple(router_logits.shape)}; expected "
                         f"[{m}, E] (a row per token of hidden_states)")
    num_global = router_logits.shape[1]
    common = dict(activation=activation, apply_router_weight_on_input=apply_router_weight_on_input,
                  expert_map=expert_map, out=out, workspace=workspace,
                  atomic_topk_sum=atomic_topk_sum, deterministic=deterministic)
    if (ROUTE_ALIGN and not grouped and not deterministic and m >= 1
            and hidden_states.dtype == experts.dtype
            and fused_topk_align_supported(m, num_global, router_logits.device)):
        cfgs = (layer_configs(experts, top_k, m, hidden_states.device)
                if configs is None else tuple(dict(c) for c in configs))
        dense = (cfgs[0].get("DENSE", False)
                 and dense_path_supported(experts, expert_map, hidden_states.device))
        bm = cfgs[0]["BLOCK_SIZE_M"]
        ws_align = (workspace.align_views(m * top_k, bm, num_global)
                    if workspace is not None else None)
        if not dense:
            weights, ids, blocks = fused_topk_align(
                router_logits, top_k, bm, expert_map, renormalize=renormalize, scoring=scoring,
                correction_bias=correction_bias, routed_scaling_factor=routed_scaling_factor,
                out=ws_align[0] if ws_align is not None else None)
            return fused_moe_prefill(hidden_states, experts, weights, ids, configs=cfgs,
                                     blocks=blocks, **common)
    weights, ids = fused_topk(router_logits, top_k, renormalize=renormalize, scoring=scoring,
                              num_expert_group=num_expert_group, topk_group=topk_group,
                              correction_bias=correction_bias,
                              routed_scaling_factor=routed_scaling_factor)
    return fused_moe_prefill(hidden_states, experts, weights, ids, configs=configs, **common)


def _block_ready_counts(x1: torch.Tensor, inter: torch.Tensor, experts: PackedExperts,
                        blocks: AlignedBlocks, cfg1: dict, cfg2: dict, activation: str,
                        workspace: PrefillWorkspace | None, *, tiles1: int, num_tokens: int,
                        sorted1: bool, split2: int, atomic_topk_sum: bool,
                        fragment_order: tuple[bool, bool]) -> torch.Tensor | None:
    """The counts by which GEMM2 waits per block for GEMM1
    (:data:`~w4a16moe.kernels.prefill_mma.GEMM2_WAITS_PER_BLOCK`), zero, one per block; or
    None where the layer's GEMMs wait for each other whole: the switch off, no PDL chain,
    more tokens than :data:`~w4a16moe.kernels.prefill_mma.GEMM2_WAITS_MAX_TOKENS`, either
    GEMM off the mma kernel, more GEMM1 tiles a block (``tiles1``) than
    :data:`~w4a16moe.kernels.prefill_mma.GEMM2_WAITS_MAX_TILES`, GEMM2 split or summing
    atomically, or GEMM1 reading its sorted input from GEMM2's output buffer (GEMM2 would
    overwrite it while GEMM1 runs). From the workspace when it has them (none allocated),
    else new zeros."""
    if (not prefill_mma.GEMM2_WAITS_PER_BLOCK or not prefill_pdl_args(x1.device)
            or num_tokens > prefill_mma.GEMM2_WAITS_MAX_TOKENS or sorted1
            or split2 > 1 or atomic_topk_sum or not (cfg1.get("MMA") and cfg2.get("MMA"))
            or tiles1 > prefill_mma.GEMM2_WAITS_MAX_TILES):
        return None
    if (mma_unsupported(**_gluon_call(x1, experts.w13, cfg1, activation=activation,
                                      a_fragment_order=fragment_order[0]))
            or mma_unsupported(**_gluon_call(inter, experts.w2, cfg2, activation=None,
                                             a_fragment_order=fragment_order[1]))):
        return None
    n = blocks.expert_ids.numel()
    if workspace is not None:
        have = workspace.block_ready
        if have is None or have.numel() < n or have.device != x1.device:
            return None
        return have[:n]
    return torch.zeros(n, dtype=torch.int32, device=x1.device)


__all__ = ["DETERMINISTIC_REFERENCE_M", "PrefillWorkspace", "ROUTE_ALIGN", "dense_path_supported",
           "dequantize_dense", "deterministic_prefill_configs", "fragment_order_columns",
           "fused_moe_prefill", "fused_moe_prefill_from_logits", "gather_sorted_rows",
           "layer_configs", "prefill_gemm", "topk_sum"]
