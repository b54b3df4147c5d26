"""Decode (few tokens) W4A16 MoE kernels: GEMV-style, split-K, CUDA-graph safe.

The expert of each (token, k) *slot* is read on the device from ``topk_ids`` (a grid axis
runs over the ``M * top_k`` slots) and activations are read in place (row ``slot // top_k``
for GEMM1, row ``slot`` of the intermediate for GEMM2). There is no token sort, no host
synchronisation and no data-dependent shape, so a whole layer can be captured in a CUDA
graph and replayed with different routing.

Two kernels, one per GEMM:

* :func:`_decode_gemm1_kernel` (w13, gate+up): one program computes the gate rows ``n`` and
  the up rows ``I + n`` of a ``BLOCK_N`` tile for one slot over a K range, so the
  activation ``act(gate) * up`` is applied in the epilogue without another pass.
* :func:`_decode_gemm2_kernel` (w2, down): one program computes a ``BLOCK_N`` tile of the
  output of one token over a K range, for one slot or summing all ``top_k`` slots of the
  token (router weights applied), so the top-k weighted sum needs no extra pass.

Split-K (and, for GEMM2, splitting the top-k slots over programs) keeps every SM streaming
when there are few slots. Split programs add fp32 partial sums with relaxed atomics into a
workspace buffer, pass a CTA barrier and bump a per-tile arrival counter (acq_rel); the last
program to arrive reads the finished sums from L2 (``.cg``), applies the epilogue, stores
the output and puts the buffer and the counter back to zero, so the workspace is always
clean between launches and nothing is memset.

Inner loop (``_stream_rows``): each thread loads 16 bytes (4 words, 32 int4 values) per row
and step, turns them into ``1 + q/d`` floats with half a shift and one logic op per value
(:func:`~w4a16moe.kernels.common.unpack_int4_to_unit_float`), multiply-adds them with the
activations and keeps per-chunk partial sums in registers; scales and zero points are
applied per 32-value chunk and the cross-thread reduction happens once, after the loop.
Loads run one step ahead, held in registers; or, with ``DecodeConfig.num_stages > 1``,
Triton's software pipeline copies them by ``cp.async`` into a ring of shared-memory steps
(the heuristics take that for K of 512+ words, where it frees registers for more resident
warps and keeps two steps in flight; the steps are 128 words instead of 64 on cards whose
SMs each get more of the DRAM rate than an H100's: :func:`ring_step_words`). The heuristics
aim at four to eight rows per thread, which amortises the per-step activation handling (see
``benchmarks/notes_decode.md``).

Out-of-range ``topk_ids`` (not in ``[0, E)``, or ``[0, len(expert_map))`` with an
``expert_map``) are the caller's bug: they are not checked on the device (that would need a
host sync) and read memory outside the weights.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..layout import PACK_FACTOR, PackedExperts, PackedWeights
from ..profiling.annotate import DECODE_KERNEL_NAME, annotate_gemm
from .common import (
    ONE_F32_BITS,
    unit_float_chunk_dots,
    unpack_int4_to_unit_float,
)
from .pdl import dependent_launch_args, gdc_wait

#: words per chunk: one thread's 16-byte load, 32 K values, the unit of in-thread sums
CHUNK_WORDS = tl.constexpr(4)

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
#: smallest BLOCK_N any config uses: sizes the arrival counters of a workspace
MIN_BLOCK_N = 4


# --------------------------------------------------------------------------------------------
# device code
# --------------------------------------------------------------------------------------------
@triton.jit
def _activation_and_mul(gate, up, ACTIVATION: tl.constexpr):
    """``act(gate) * up`` in float32: 0 = SiLU, 1 = GELU (erf), 2 = GELU (tanh approx.)."""
    if ACTIVATION == 0:
        a = gate * tl.sigmoid(gate)
    elif ACTIVATION == 1:
        a = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:
        # 0.5 * (1 + tanh(y)) == sigmoid(2 y)
        y = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        a = gate * tl.sigmoid(2.0 * y)
    return a * up


@triton.jit
def _load_step(w_rows, s_rows, z_rows, mask_r, x_row, perm_row, kw0, kw_end, num_groups,
               GROUP_SIZE: tl.constexpr, BLOCK_KW: tl.constexpr, HAS_ZEROS: tl.constexpr,
               HAS_PERM: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """Loads of one K step: words ``[R, BLOCK_KW]``, activations ``[8 * BLOCK_KW]`` (fp32)
    and the scale and zero point of each 32-value chunk ``[R, BLOCK_KW/4]`` (one chunk = the
    4 words one thread loads; chunks never straddle a group since G >= 32).

    Without ``EVEN_K`` everything past ``kw_end`` is masked off (activations read as 0), so
    a prefetch beyond the end moves no data; with ``EVEN_K`` (the range is whole steps) the
    caller keeps ``kw0`` inside the range and no K mask is built. Without ``EVEN_N`` rows
    outside ``mask_r`` read as 0."""
    BLOCK_K: tl.constexpr = BLOCK_KW * 8
    CHUNKS: tl.constexpr = BLOCK_KW // CHUNK_WORDS
    offs_kw = kw0 + tl.arange(0, BLOCK_KW)
    offs_k = kw0 * 8 + tl.arange(0, BLOCK_K)
    offs_c = kw0 * 8 + tl.arange(0, CHUNKS) * (CHUNK_WORDS * 8)
    offs_g = offs_c // GROUP_SIZE
    if EVEN_K:
        if EVEN_N:
            w = tl.load(w_rows + offs_kw[None, :])
            s = tl.load(s_rows + offs_g[None, :]).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_rows + offs_g[None, :]).to(tl.float32)
            else:
                z = s  # unused
        else:
            w = tl.load(w_rows + offs_kw[None, :], mask=mask_r[:, None], other=0)
            s = tl.load(s_rows + offs_g[None, :], mask=mask_r[:, None], other=0.0)
            s = s.to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_rows + offs_g[None, :], mask=mask_r[:, None], other=0)
                z = z.to(tl.float32)
            else:
                z = s  # unused
        if HAS_PERM:
            idx = tl.load(perm_row + offs_k)
        else:
            idx = offs_k
        x = tl.load(x_row + idx).to(tl.float32)
    else:
        w = tl.load(w_rows + offs_kw[None, :],
                    mask=mask_r[:, None] & (offs_kw < kw_end)[None, :], other=0)
        mask_k = offs_k < kw_end * 8
        if HAS_PERM:
            idx = tl.load(perm_row + offs_k, mask=mask_k, other=0)
        else:
            idx = offs_k
        x = tl.load(x_row + idx, mask=mask_k, other=0.0).to(tl.float32)
        mask_g = mask_r[:, None] & ((offs_c < kw_end * 8) & (offs_g < num_groups))[None, :]
        s = tl.load(s_rows + offs_g[None, :], mask=mask_g, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_rows + offs_g[None, :], mask=mask_g, other=0).to(tl.float32)
        else:
            z = s  # unused
    return w, x, s, z


@triton.jit
def _step_dots(w, x, s, z, one_bits, ROWS: tl.constexpr, BLOCK_KW: tl.constexpr,
               HAS_ZEROS: tl.constexpr):
    """One K step of :func:`_stream_rows`: words ``[ROWS, BLOCK_KW]`` against activations
    ``x`` -> scaled partial sums ``[ROWS, BLOCK_KW / 4]`` (one per 32-value chunk, with the
    chunk's scale ``s`` and zero point ``z``, or 8 for symmetric weights)."""
    f = unpack_int4_to_unit_float(w, BLOCK_KW * 8, one_bits)
    qx, xs = unit_float_chunk_dots(f, x, ROWS, BLOCK_KW // CHUNK_WORDS)
    if HAS_ZEROS:
        return s * (qx - z * xs)
    else:
        return s * (qx - 8.0 * xs)


@triton.jit
def _stream_rows(w_rows, s_rows, z_rows, mask_r, x_row, perm_row, kw_start, kw_end,
                 num_groups, one_bits, ROWS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 BLOCK_KW: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
                 PREFETCH: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                 STAGES: tl.constexpr):
    """Dot products of ``ROWS`` weight rows with one activation row over packed words
    ``kw_start .. kw_end``, returned unreduced as ``[ROWS, BLOCK_KW / 4]`` fp32 partials
    (sum them along axis 1; callers that add several rows of activations first reduce once).

    ``w_rows``/``s_rows``/``z_rows``: ``[ROWS, 1]`` pointers to the start of each row of
    qweight/scales/zeros; ``mask_r`` ``[ROWS]`` valid rows; ``x_row``/``perm_row``: the
    activation row and (act-order) the expert's permutation. Loads run ``PREFETCH`` (1 or 2)
    steps ahead of the arithmetic, and each thread keeps its partial sums in registers (no
    cross-thread reduction inside the loop). ``EVEN_N``: all rows valid; ``EVEN_K``: the
    range is whole steps (both drop masks from the loop).

    ``STAGES > 1`` replaces the register prefetch by Triton's software pipeline: the loads
    of a step go to a ring of ``STAGES`` shared-memory buffers by ``cp.async`` and run
    ``STAGES - 1`` steps ahead, without holding the steps in flight in registers.
    """
    acc = tl.zeros([ROWS, BLOCK_KW // CHUNK_WORDS], dtype=tl.float32)
    if STAGES > 1:
        for kw0 in tl.range(kw_start, kw_end, BLOCK_KW, num_stages=STAGES):
            w, x, s, z = _load_step(w_rows, s_rows, z_rows, mask_r, x_row, perm_row, kw0,
                                    kw_end, num_groups, GROUP_SIZE, BLOCK_KW, HAS_ZEROS,
                                    HAS_PERM, EVEN_N, EVEN_K)
            acc += _step_dots(w, x, s, z, one_bits, ROWS, BLOCK_KW, HAS_ZEROS)
        return acc
    # with EVEN_K the loads are unmasked: prefetches past the end re-read the last step
    if EVEN_K:
        last = tl.maximum(kw_end - BLOCK_KW, kw_start)
    else:
        last = kw_end
    w, x, s, z = _load_step(w_rows, s_rows, z_rows, mask_r, x_row, perm_row, kw_start, kw_end,
                            num_groups, GROUP_SIZE, BLOCK_KW, HAS_ZEROS, HAS_PERM, EVEN_N,
                            EVEN_K)
    if PREFETCH == 2:
        w1, x1, s1, z1 = _load_step(w_rows, s_rows, z_rows, mask_r, x_row, perm_row,
                                    tl.minimum(kw_start + BLOCK_KW, last), kw_end, num_groups,
                                    GROUP_SIZE, BLOCK_KW, HAS_ZEROS, HAS_PERM, EVEN_N, EVEN_K)
    for kw0 in range(kw_start, kw_end, BLOCK_KW):
        w_n, x_n, s_n, z_n = _load_step(w_rows, s_rows, z_rows, mask_r, x_row, perm_row,
                                        tl.minimum(kw0 + PREFETCH * BLOCK_KW, last), kw_end,
                                        num_groups, GROUP_SIZE, BLOCK_KW, HAS_ZEROS, HAS_PERM,
                                        EVEN_N, EVEN_K)
        acc += _step_dots(w, x, s, z, one_bits, ROWS, BLOCK_KW, HAS_ZEROS)
        if PREFETCH == 2:
            w, x, s, z = w1, x1, s1, z1
            w1, x1, s1, z1 = w_n, x_n, s_n, z_n
        else:
            w, x, s, z = w_n, x_n, s_n, z_n
    return acc


@triton.jit
def _decode_gemm1_kernel(
    x_ptr, stride_xm,
    qw_ptr, s_ptr, z_ptr, perm_ptr,
    ids_ptr, tw_ptr, emap_ptr,
    out_ptr, stride_om,
    acc_ptr, cnt_ptr,
    N_HALF, K, KW, num_groups, top_k, one_bits,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_EMAP: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    SPLIT_K: tl.constexpr, KW_PER_SPLIT: tl.constexpr, PREFETCH: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """GEMM1 of the decode MoE: ``out[s, n] = act(x[s // top_k] . W[e, n]) * (x . W[e, I + n])``.

    Shapes: x ``[M, K]`` (row stride ``stride_xm``), qweight int32 ``[E, 2*N_HALF, KW]``
    (``KW = K / 8``, passed so Triton sees its divisibility and issues 16-byte loads),
    scales/zeros ``[E, 2*N_HALF, num_groups]``, perm int32 ``[E, K]``, topk_ids/topk_weights
    ``[M * top_k]`` (flattened), out ``[M * top_k, N_HALF]`` (row stride ``stride_om``),
    acc fp32 ``[M * top_k, 2 * N_HALF]`` and cnt int32 ``[M * top_k * cdiv(N_HALF, BLOCK_N)]``
    (zero on entry and on exit; used only when ``SPLIT_K > 1``). ``one_bits`` is
    ``ONE_F32_BITS`` (see :func:`unpack_int4_to_unit_float`).

    Grid ``(M * top_k, cdiv(N_HALF, BLOCK_N), SPLIT_K)``: program ``(s, j, p)`` reads the
    expert ``e`` of slot ``s`` and computes gate rows ``j*BLOCK_N ..`` and the matching up
    rows (one tile of ``2 * BLOCK_N`` interleaved rows) over words ``p*KW_PER_SPLIT ..
    (p+1)*KW_PER_SPLIT`` of K. A slot whose expert maps to -1 does no work and yields zeros.
    ``PDL``: launched as a dependent of the kernel before it, normally the router
    (:mod:`.pdl`): wait for that kernel to complete before reading anything.
    """
    if PDL:
        gdc_wait()
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    expert = tl.load(ids_ptr + slot).to(tl.int32)
    if HAS_EMAP:
        expert = tl.load(emap_ptr + expert).to(tl.int32)
    kw_start = pid_k * KW_PER_SPLIT
    kw_end = tl.minimum(kw_start + KW_PER_SPLIT, KW)
    kw_end = tl.where(expert < 0, kw_start, kw_end)
    expert = tl.maximum(expert, 0).to(tl.int64)

    # row r of the tile: gate row n = pid_n*BLOCK_N + r // 2 when r is even, up row I + n else
    offs_r = tl.arange(0, 2 * BLOCK_N)
    offs_n = pid_n * BLOCK_N + offs_r // 2
    mask_r = offs_n < N_HALF
    rows = offs_n + (offs_r % 2) * N_HALF
    w_rows = qw_ptr + expert * (2 * N_HALF * KW) + (rows * KW)[:, None]
    s_rows = s_ptr + expert * (2 * N_HALF * num_groups) + (rows * num_groups)[:, None]
    z_rows = z_ptr + expert * (2 * N_HALF * num_groups) + (rows * num_groups)[:, None]
    x_row = x_ptr + (slot // top_k) * stride_xm
    perm_row = perm_ptr + expert * K
    acc = tl.sum(_stream_rows(w_rows, s_rows, z_rows, mask_r, x_row, perm_row, kw_start,
                              kw_end, num_groups, one_bits, 2 * BLOCK_N, GROUP_SIZE, BLOCK_KW,
                              HAS_ZEROS, HAS_PERM, PREFETCH, EVEN_N, EVEN_K, STAGES), axis=1)
    # de-interleave with a masked row sum, not tl.split: the interpreter hands tl.split's
    # strided views to tl.atomic_add as if they were contiguous
    pair = tl.reshape(acc, [BLOCK_N, 2])
    is_up = (tl.arange(0, 2) == 1)[None, :]
    gate = tl.sum(tl.where(is_up, 0.0, pair), axis=1)
    up = tl.sum(tl.where(is_up, pair, 0.0), axis=1)

    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_o = offs_o < N_HALF
    out_ptrs = out_ptr + slot * stride_om + offs_o
    if SPLIT_K == 1:
        if WEIGHT_ON_INPUT:
            rw = tl.load(tw_ptr + slot).to(tl.float32)
            gate *= rw
            up *= rw
        y = _activation_and_mul(gate, up, ACTIVATION)
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_o)
    else:
        accg_ptrs = acc_ptr + slot * (2 * N_HALF) + offs_o
        accu_ptrs = accg_ptrs + N_HALF
        tl.atomic_add(accg_ptrs, gate, mask=mask_o, sem="relaxed")
        tl.atomic_add(accu_ptrs, up, mask=mask_o, sem="relaxed")
        tl.debug_barrier()
        cnt = cnt_ptr + slot * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            g = tl.load(accg_ptrs, mask=mask_o, other=0.0, cache_modifier=".cg")
            u = tl.load(accu_ptrs, mask=mask_o, other=0.0, cache_modifier=".cg")
            tl.store(accg_ptrs, tl.zeros_like(g), mask=mask_o)
            tl.store(accu_ptrs, tl.zeros_like(u), mask=mask_o)
            tl.store(cnt, 0)
            if WEIGHT_ON_INPUT:
                rw = tl.load(tw_ptr + slot).to(tl.float32)
                g *= rw
                u *= rw
            y = _activation_and_mul(g, u, ACTIVATION)
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_o)


@triton.jit
def _decode_gemm2_kernel(
    x_ptr, stride_xm,
    qw_ptr, s_ptr, z_ptr, perm_ptr,
    ids_ptr, tw_ptr, emap_ptr,
    out_ptr, stride_om,
    acc_ptr, cnt_ptr,
    N, K, KW, num_groups, top_k, one_bits,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_EMAP: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    SPLIT_K: tl.constexpr, KW_PER_SPLIT: tl.constexpr, PREFETCH: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    TOPK_INNER: tl.constexpr, NUM_SPLITS: tl.constexpr, STAGES: tl.constexpr,
):
    """GEMM2 of the decode MoE with the top-k weighted sum:
    ``out[m, n] = sum_k w[m, k] * (inter[m * top_k + k] . W[e(m, k), n])``.

    Shapes: inter ``[M * top_k, K]`` (row stride ``stride_xm``), qweight int32
    ``[E, N, KW]`` (``KW = K / 8``), scales/zeros ``[E, N, num_groups]``, perm ``[E, K]``,
    topk_ids / topk_weights ``[M * top_k]``, out ``[M, N]`` (row stride ``stride_om``), acc
    fp32 ``[M, N]`` and cnt int32 ``[M * cdiv(N, BLOCK_N)]`` (zero on entry and exit; used
    when ``NUM_SPLITS > 1``).

    Grid ``(M * top_k / TOPK_INNER, cdiv(N, BLOCK_N), SPLIT_K)``: program ``(i, j, p)``
    sums slots ``i*TOPK_INNER .. (i+1)*TOPK_INNER`` (``TOPK_INNER`` is 1 or ``top_k``) of
    token ``i*TOPK_INNER // top_k`` for rows ``j*BLOCK_N ..`` over the p-th K range.
    ``NUM_SPLITS = (top_k / TOPK_INNER) * SPLIT_K`` programs contribute to each output tile.
    With ``WEIGHT_ON_INPUT`` the router weight was applied before GEMM1 and is not applied.
    """
    pid0 = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot0 = pid0 * TOPK_INNER
    token = slot0 // top_k

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_w = (offs_n * KW)[:, None]
    row_s = (offs_n * num_groups)[:, None]
    kw_first = pid_k * KW_PER_SPLIT
    kw_last = tl.minimum(kw_first + KW_PER_SPLIT, KW)

    acc = tl.zeros([BLOCK_N, BLOCK_KW // CHUNK_WORDS], dtype=tl.float32)
    for t in range(TOPK_INNER):
        slot = slot0 + t
        expert = tl.load(ids_ptr + slot).to(tl.int32)
        if HAS_EMAP:
            expert = tl.load(emap_ptr + expert).to(tl.int32)
        kw_end = tl.where(expert < 0, kw_first, kw_last)
        expert = tl.maximum(expert, 0).to(tl.int64)
        part = _stream_rows(qw_ptr + expert * (N * KW) + row_w,
                            s_ptr + expert * (N * num_groups) + row_s,
                            z_ptr + expert * (N * num_groups) + row_s,
                            mask_n, x_ptr + slot * stride_xm, perm_ptr + expert * K,
                            kw_first, kw_end, num_groups, one_bits, BLOCK_N, GROUP_SIZE,
                            BLOCK_KW, HAS_ZEROS, HAS_PERM, PREFETCH, EVEN_N, EVEN_K, STAGES)
        if WEIGHT_ON_INPUT:
            acc += part
        else:
            acc += part * tl.load(tw_ptr + slot).to(tl.float32)

    acc = tl.sum(acc, axis=1)
    out_ptrs = out_ptr + token * stride_om + offs_n
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        acc_ptrs = acc_ptr + token * N + offs_n
        tl.atomic_add(acc_ptrs, acc, mask=mask_n, sem="relaxed")
        tl.debug_barrier()
        cnt = cnt_ptr + token * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            y = tl.load(acc_ptrs, mask=mask_n, other=0.0, cache_modifier=".cg")
            tl.store(acc_ptrs, tl.zeros_like(y), mask=mask_n)
            tl.store(cnt, 0)
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_n)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of one decode GEMM.

    Attributes:
        block_n: output rows per program (GEMM1: gate rows; the up rows come along).
        block_kw: packed words along K per loop step (``8 * block_kw`` K values).
        split_k: programs sharing the K range of one output tile.
        num_warps: warps per program.
        topk_inner: GEMM2 only: slots one program sums (1, or top_k: any value >= top_k).
        prefetch: K steps the loads run ahead of the arithmetic (1 or 2), held in
            registers (``num_stages == 1``).
        num_stages: 1 = the register prefetch above; 2 or more = Triton's software
            pipeline instead: ``cp.async`` into a ring of ``num_stages`` shared-memory
            steps, ``num_stages - 1`` of them in flight (``prefetch`` is then unused).
    """

    block_n: int = 16
    block_kw: int = 32
    split_k: int = 1
    num_warps: int = 4
    topk_inner: int = 1
    prefetch: int = 1
    num_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block_n", "block_kw", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"DecodeConfig.{name} is {v}; expected a power of two")
        if self.block_kw < CHUNK_WORDS:
            raise ValueError(f"DecodeConfig.block_kw is {self.block_kw}; expected >= "
                             f"{int(CHUNK_WORDS)} (one 16-byte load per thread)")
        if self.block_n < MIN_BLOCK_N:
            raise ValueError(f"DecodeConfig.block_n is {self.block_n}; expected >= "
                             f"{MIN_BLOCK_N}")
        if self.prefetch not in (1, 2):
            raise ValueError(f"DecodeConfig.prefetch is {self.prefetch}; expected 1 or 2")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"DecodeConfig.num_stages is {self.num_stages}; expected 1 to 8")
        if self.split_k < 1 or self.topk_inner < 1:
            raise ValueError(f"DecodeConfig has split_k={self.split_k} and topk_inner="
                             f"{self.topk_inner}; expected >= 1")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs keep the CPU tests fast


@functools.cache
def _peak_read_rate_per_sm(index: int) -> float | None:
    """An SM's share of the peak DRAM rate (bytes/s) of CUDA device ``index``: the driver's
    memory clock (kHz, double data rate) times its bus width, over the SMs; None where the
    driver does not report them."""
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        rate = 2 * props["mem_clock_rate"] * 1e3 * props["mem_bus_width"] / 8
        sms = props["multiprocessor_count"]
    except Exception:  # no such driver query (another backend, an old Triton)
        return None
    return rate / sms if rate > 0 and sms > 0 else None


def card_sm_read_rate(device: torch.device) -> float | None:
    """:func:`_peak_read_rate_per_sm` of ``device``; None off the GPU (the interpreter)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _peak_read_rate_per_sm(index)


def _pow2_at_most(v: int, cap: int) -> int:
    p = 1
    while p * 2 <= min(v, cap):
        p *= 2
    return p


#: K steps a split must keep: shorter splits lose more to the arrival protocol than they gain
MIN_STEPS_PER_SPLIT = 8


def _split_for(warps: int, k_steps: int, target_warps: int) -> int:
    """Smallest power-of-two K split giving ``warps * split >= target_warps`` while every
    split keeps ``MIN_STEPS_PER_SPLIT`` steps."""
    split = 1
    while warps * split < target_warps and k_steps // (split * 2) >= MIN_STEPS_PER_SPLIT:
        split *= 2
    return split


#: one-warp GEMM1 tiles (block_n gate rows + as many up rows, words a step) -> the warps of
#: each an H100 SM holds at once (ptxas, session 14: 254-255 registers a thread for 16 rows
#: x 64 words and 32 rows x 32 words, 168 for 16 rows x 32 words); the first of equals wins
GEMM1_ONE_WARP_TILES = {(8, 64): 8, (16, 32): 8, (8, 32): 12}
#: how much fuller the last wave of resident warps must get before another tile is taken
GEMM1_WAVE_GAIN = 0.1

#: shortest K (in words) for the ``cp.async`` ring tiles: with 512+ words (Mixtral's and
#: qwen3-235b's H = 4096, Mixtral's I = 14336) a program's steps are long enough to keep
#: two in flight; at 96-256 words (qwen3-30b, deepseek-v2-lite, olmoe) the ring was 5-20 %
#: slower than the register prefetch (session 15, benchmarks/notes_decode.md)
RING_MIN_K_WORDS = 512
#: steps in the ring: two in flight (four stages were slower: less occupancy from smem)
RING_STAGES = 3
#: GEMM1 ring tile: 4 gate + 4 up rows, 64-word steps, one warp: 96 registers and ~10 KB of
#: shared memory, so an H100 SM holds ~21 of them
GEMM1_RING_WARPS_PER_SM = 21
#: the ring GEMM1 tile needs this many waves of resident warps to beat the register tiles
#: (qwen3-235b M=1, 1.1 waves: 26.3 against 23.4 us; M=3, 3.3 waves: 60.7 against 65.6)
GEMM1_RING_MIN_WAVES = 2.5
#: words a step of the ring tiles ...
RING_STEP_WORDS = 64
#: ... and on cards whose SMs each have :data:`WIDE_RING_MIN_SM_READ_RATE` of DRAM rate or
#: more: the bytes an SM must keep in flight grow with its share of the rate (Little's law),
#: and two 64-word steps a warp no longer hold enough. Session 40 on the H200 (36.5 GB/s an
#: SM by its driver's memory clock and bus width), Mixtral: GEMM1 M=1 / 2 -5 / -7 %, GEMM2
#: M=1 / 2 -2 / -9 %; on the H100 (3.35 TB/s, ~25 GB/s an SM) session 15 found 128-word
#: steps no faster for GEMM1 and 4-12 % slower for GEMM2 (benchmarks/notes_decode.md)
WIDE_RING_STEP_WORDS = 128
WIDE_RING_MIN_SM_READ_RATE = 30e9
#: :data:`GEMM1_RING_MIN_WAVES` for the 128-word steps: on the H200 they beat the register
#: tiles at qwen3-235b M=2 (2.2 waves: 36.3 against 38.7 us) and tied them at M=1 (1.1
#: waves: 21.3 against 21.4; the kernel alone 20.2 against 21.1)
GEMM1_WIDE_RING_MIN_WAVES = 1.0


def ring_step_words(sm_read_rate: float | None) -> int:
    """Words a step of the ``cp.async`` ring tiles read on a card whose SMs each have
    ``sm_read_rate`` bytes/s of its peak DRAM rate (None: unknown, the H100's steps)."""
    if sm_read_rate is not None and sm_read_rate >= WIDE_RING_MIN_SM_READ_RATE:
        return WIDE_RING_STEP_WORDS
    return RING_STEP_WORDS


def _waves(warps: int, warps_per_sm: int, num_sms: int) -> float:
    """Waves of resident warps ``warps`` take when an SM holds ``warps_per_sm`` of them."""
    return warps / (warps_per_sm * num_sms)


def _wave_fill(warps: int, warps_per_sm: int, num_sms: int) -> float:
    """Waves of resident warps over the waves started: 1.0 when the last wave is full."""
    waves = _waves(warps, warps_per_sm, num_sms)
    return waves / math.ceil(waves)


def pick_config_gemm1(m: int, n_half: int, k: int, num_experts: int, top_k: int,
                      num_sms: int, *, sm_read_rate: float | None = None) -> DecodeConfig:
    """Heuristic config of GEMM1 (w13: ``2*n_half`` rows, ``k`` = hidden size).

    From H100 sweeps (benchmarks/notes_decode.md): one warp per tile of 16 rows (8 gate + 8
    up) -- four rows per thread with 32-word steps, eight with 64-word steps, which amortises
    the activation handling -- whenever that gives at least 8 warps per SM; 64-word steps
    for long K (>= 4096) or plenty of warps; below 8 warps per SM, two warps share a tile.
    Split-K loses to its arrival protocol at these sizes unless each split keeps 8+ steps.
    Among the one-warp tiles (:data:`GEMM1_ONE_WARP_TILES`) another one is taken when its
    last wave of resident warps is at least 10 % fuller (session 14: qwen3-235b M=1 27.6 ->
    23.6 us, deepseek-v2-lite M=2 22.5 -> 19.0, olmoe M=2 22.3 -> 18.7, M=4 35.0 -> 33.8).
    Long K (:data:`RING_MIN_K_WORDS`) with 2.5+ waves of warps: 8-row, 64-word one-warp
    tiles that load through a ``cp.async`` ring two steps ahead (session 15: Mixtral M=1
    50.7 -> 46.3 us, M=4 171.8 -> 164.8, qwen3-235b M=3 63.1 -> 57.7); 128-word steps where
    an SM's share of the card's DRAM rate, ``sm_read_rate`` (bytes/s), calls for them
    (:func:`ring_step_words`), and those from one wave of warps
    (:data:`GEMM1_WIDE_RING_MIN_WAVES`).
    """
    del num_experts
    k_words = k // PACK_FACTOR
    block_n = 8
    slots = m * top_k
    ring_warps = slots * triton.cdiv(n_half, 4)
    ring_words = ring_step_words(sm_read_rate)
    min_waves = (GEMM1_WIDE_RING_MIN_WAVES if ring_words == WIDE_RING_STEP_WORDS
                 else GEMM1_RING_MIN_WAVES)
    if (k_words >= RING_MIN_K_WORDS
            and _waves(ring_warps, GEMM1_RING_WARPS_PER_SM, num_sms) >= min_waves):
        return DecodeConfig(block_n=4, block_kw=ring_words, num_warps=1,
                            num_stages=RING_STAGES)
    warps = slots * triton.cdiv(n_half, block_n)
    if warps >= 8 * num_sms:
        num_warps = 1
        wide = k_words >= 512 or warps >= 32 * num_sms
        block_kw = max(int(CHUNK_WORDS), _pow2_at_most(k_words, 64 if wide else 32))
        if (block_n, block_kw) in GEMM1_ONE_WARP_TILES:
            fill = _wave_fill(warps, GEMM1_ONE_WARP_TILES[block_n, block_kw], num_sms)
            best = None
            for (bn, bkw), n in GEMM1_ONE_WARP_TILES.items():
                if bkw > k_words:
                    continue
                f = _wave_fill(slots * triton.cdiv(n_half, bn), n, num_sms)
                if f >= fill + GEMM1_WAVE_GAIN and (best is None or f > best[0]):
                    best = (f, bn, bkw)
            if best is not None:
                return DecodeConfig(block_n=best[1], block_kw=best[2], num_warps=1)
    else:
        num_warps = 2
        block_kw = max(int(CHUNK_WORDS), _pow2_at_most(k_words, 32))
    split_k = _split_for(warps * num_warps, triton.cdiv(k_words, block_kw), 8 * num_sms)
    return DecodeConfig(block_n=block_n, block_kw=block_kw, split_k=split_k,
                        num_warps=num_warps)


#: warps of one-warp, 32-row, 32-word GEMM2 programs an H100 SM holds at once: they take
#: 255 registers a thread (ptxas, session 14), so 8 warps fill the 64 K registers
ONE_WARP_TILE_WARPS_PER_SM = 8
#: the same for 64-row, 16-word tiles on two warps (127 registers a thread)
HALF_STEP_TILE_WARPS_PER_SM = 16
#: the same for 128-row, 32-word tiles on four warps (167 registers: three programs)
WIDE_TILE_WARPS_PER_SM = 12
#: longest K (in words) for the 16-word tiles: at qwen3-30b's 96 words (three 32-word steps) the
#: extra steps overlap the loads better; at Mixtral's 1792 they were 7-16 % slower
HALF_STEP_MAX_K_WORDS = 128


def pick_config_gemm2(m: int, n: int, k: int, num_experts: int, top_k: int,
                      num_sms: int, *, allow_split_k: bool = True,
                      sm_read_rate: float | None = None) -> DecodeConfig:
    """Heuristic config of GEMM2 (w2: ``n`` = hidden rows, ``k`` = intermediate size).

    From H100 sweeps (``benchmarks/notes_decode.md``): one program per (slot, row tile), the
    top-k sum done by the arrival protocol. The aim is ~7 warps per SM in one wave of
    resident programs:

    * 32-row tiles on one warp (eight rows per thread) when that gives ~7 warps per SM and
      they fit one wave (8 such warps per SM: 255 registers a thread);
    * more of them than one wave holds, but few enough for a wave of 64-row tiles with
      16-word steps on two warps (four rows per thread, 127 registers, 16 warps per SM),
      and short K (at most 128 words): those (qwen3-30b M=3: 16.1 -> 13.1 us, M=4: 18.8 ->
      16.3 us; Mixtral M=6 / 8, K = 1792 words: 7-16 % slower, so not there);
    * more still, or too long a K for those: 128-row tiles on four warps (167 registers,
      12 warps per SM) where the one-warp tiles need 2.5 waves or more, or where the wide
      ones fit one wave and the one-warp ones do not (at M=8: qwen3-30b 33.5 -> 31.1 us,
      deepseek-v2-lite 41.7 -> 39.5, qwen3-235b 91.7 -> 87.2, olmoe 39.3 -> 37.4;
      deepseek-v2-lite M=4 26.3 -> 21.6); else the one-warp tiles (qwen3-235b M=2, 1.94
      waves: 27.4 us against 30.3 for the wide tiles);
    * long K (Mixtral's I = 14336) and too few slots: the 32-row one-warp tiles split along
      K (8+ steps per split) up to ~7 warps per SM within one wave (Mixtral M=1 / 2: 29.9
      -> 27.1 us and 57.0 -> 51.0 us against 64-row tiles on 4 warps);
    * else 64-row tiles on 4 warps, split along K up to ~7 warps per SM where K allows;
      smaller tiles on fewer warps when that still leaves fewer programs than SMs (tiny
      layers).

    * long K (:data:`RING_MIN_K_WORDS`, Mixtral's I = 14336) first of all: 16-row, 64-word
      one-warp tiles loading through a ``cp.async`` ring two steps ahead (127 registers),
      split along K up to ~7 warps per SM (session 15 against the register tiles: Mixtral
      M=1 27.2 -> 26.0 us, M=2 51.1 -> 47.2, M=3 76.0 -> 69.0, M=4 97.8 -> 92.2); 128-word
      steps where ``sm_read_rate`` calls for them (:func:`ring_step_words`), split as the
      64-word ones are;

    ``allow_split_k=False`` (the deterministic mode, which drops the split) skips the split
    one-warp tiles: unsplit, they are too few programs.
    """
    del num_experts
    k_words = k // PACK_FACTOR
    slots = m * top_k
    target = 7 * num_sms
    if k_words >= RING_MIN_K_WORDS:
        warps = slots * triton.cdiv(n, 16)
        # the split counts 64-word steps whatever the step: with 128-word steps Mixtral M=1
        # on the H200 was 2 % faster split in two (seven steps a split) than unsplit
        split_k = (_split_for(warps, triton.cdiv(k_words, RING_STEP_WORDS), target)
                   if allow_split_k else 1)
        return DecodeConfig(block_n=16, block_kw=ring_step_words(sm_read_rate),
                            split_k=split_k, num_warps=1, num_stages=RING_STAGES)
    block_kw = max(int(CHUNK_WORDS), _pow2_at_most(k_words, 32))
    k_steps = triton.cdiv(k_words, block_kw)
    programs = slots * triton.cdiv(n, 32)
    if programs >= target:
        one_warp_waves = _waves(programs, ONE_WARP_TILE_WARPS_PER_SM, num_sms)
        half_step_warps = 2 * slots * triton.cdiv(n, 64)
        if (one_warp_waves > 1
                and half_step_warps <= HALF_STEP_TILE_WARPS_PER_SM * num_sms
                and 4 * int(CHUNK_WORDS) <= k_words <= HALF_STEP_MAX_K_WORDS):
            return DecodeConfig(block_n=64, block_kw=_pow2_at_most(k_words, 16),
                                num_warps=2)
        wide_waves = _waves(4 * slots * triton.cdiv(n, 128), WIDE_TILE_WARPS_PER_SM, num_sms)
        if one_warp_waves >= 2.5 or (one_warp_waves > 1 and wide_waves <= 1):
            return DecodeConfig(block_n=128, block_kw=block_kw, num_warps=4)
        return DecodeConfig(block_n=32, block_kw=block_kw, num_warps=1)
    split_k = _split_for(programs, k_steps, target)
    if (allow_split_k and split_k > 1
            and target <= programs * split_k <= ONE_WARP_TILE_WARPS_PER_SM * num_sms):
        return DecodeConfig(block_n=32, block_kw=block_kw, split_k=split_k, num_warps=1)
    num_warps, block_n = 4, 64
    while True:
        programs = slots * triton.cdiv(n, block_n)
        split_k = _split_for(programs * num_warps, k_steps, target)
        if programs * split_k >= num_sms or num_warps == 1:
            break
        num_warps, block_n = num_warps // 2, block_n // 2
    return DecodeConfig(block_n=block_n, block_kw=block_kw, split_k=split_k,
                        num_warps=num_warps, topk_inner=1)


def deterministic_decode_configs(intermediate_size: int, hidden_size: int, num_experts: int,
                                 top_k: int, num_sms: int, *, sm_read_rate: float | None = None
                                 ) -> tuple[DecodeConfig, DecodeConfig]:
    """(GEMM1, GEMM2) configs of the deterministic mode, the same for every M.

    No atomics: GEMM1 without split-K, GEMM2 without split-K and with all ``top_k`` slots of
    a token summed in one program in ascending order (``NUM_SPLITS == 1``: no fp32 atomic
    accumulator, no arrival counter). The block sizes are those the heuristics pick for one
    token, fixed for every M: a program's K order depends on ``block_kw`` only, and each
    program computes one slot (GEMM1) or one token (GEMM2), so a token's result does not
    depend on the other tokens.
    """
    cfg1 = pick_config_gemm1(1, intermediate_size, hidden_size, num_experts, top_k, num_sms,
                             sm_read_rate=sm_read_rate)
    cfg2 = pick_config_gemm2(1, hidden_size, intermediate_size, num_experts, top_k, num_sms,
                             allow_split_k=False, sm_read_rate=sm_read_rate)
    return (replace(cfg1, split_k=1),
            replace(cfg2, split_k=1, topk_inner=max(top_k, cfg2.topk_inner)))


def _deterministic(cfg: DecodeConfig, top_k: int | None = None) -> DecodeConfig:
    """``cfg`` without anything that adds with atomics (split-K; for GEMM2 split top-k)."""
    cfg = replace(cfg, split_k=1)
    if top_k is not None and cfg.topk_inner < top_k:
        cfg = replace(cfg, topk_inner=top_k)
    return cfg


# --------------------------------------------------------------------------------------------
# workspace
# --------------------------------------------------------------------------------------------
@dataclass
class DecodeWorkspace:
    """Preallocated buffers for :func:`fused_moe_decode` up to ``max_tokens`` tokens.

    Reusing one workspace makes repeated calls (and CUDA graph capture) allocate nothing.
    The fp32 accumulators and arrival counters are zero on creation and every kernel leaves
    them zero, so they are never cleared; one workspace must not be used by two streams at
    the same time. ``key`` identifies what it fits (device, sizes, dtype).

    Attributes:
        inter: ``[max_tokens * top_k, I]`` activation dtype: the GEMM1 output.
        acc1: fp32 ``[max_tokens * top_k, 2 * I]``; acc2: fp32 ``[max_tokens, H]``.
        cnt1, cnt2: int32 arrival counters for split GEMM1 / GEMM2 tiles.
    """

    max_tokens: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype
    device: torch.device
    inter: torch.Tensor
    acc1: torch.Tensor
    acc2: torch.Tensor
    cnt1: torch.Tensor
    cnt2: torch.Tensor

    @classmethod
    def create(cls, experts: PackedExperts, top_k: int, max_tokens: int,
               dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> DecodeWorkspace:
        if max_tokens < 1 or top_k < 1:
            raise ValueError(f"max_tokens={max_tokens} and top_k={top_k}; expected >= 1")
        device = torch.device(device) if device is not None else experts.device
        dtype = dtype or experts.dtype
        h, i = experts.hidden_size, experts.intermediate_size
        slots = max_tokens * top_k
        f32, i32 = torch.float32, torch.int32
        return cls(
            max_tokens=max_tokens, top_k=top_k, hidden_size=h, intermediate_size=i,
            dtype=dtype, device=device,
            inter=torch.empty(slots, i, dtype=dtype, device=device),
            acc1=torch.zeros(slots, 2 * i, dtype=f32, device=device),
            acc2=torch.zeros(max_tokens, h, dtype=f32, device=device),
            cnt1=torch.zeros(slots * triton.cdiv(i, MIN_BLOCK_N), dtype=i32, device=device),
            cnt2=torch.zeros(max_tokens * triton.cdiv(h, MIN_BLOCK_N), dtype=i32,
                             device=device),
        )

    @property
    def key(self) -> tuple:
        return (str(self.device), self.hidden_size, self.intermediate_size, self.top_k,
                self.dtype, self.max_tokens)

    def check(self, m: int, hidden_size: int, intermediate_size: int, top_k: int,
              dtype: torch.dtype, device: torch.device) -> None:
        """Raise ValueError unless this workspace serves ``m`` tokens of that layer."""
        want = (hidden_size, intermediate_size, top_k, dtype, torch.device(device))
        have = (self.hidden_size, self.intermediate_size, self.top_k, self.dtype, self.device)
        if want != have:
            raise ValueError(f"workspace was made for (H, I, top_k, dtype, device)={have}; "
                             f"expected {want}")
        if m > self.max_tokens:
            raise ValueError(f"workspace holds max_tokens={self.max_tokens}; got M={m} tokens")


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _check_float(t: torch.Tensor, name: str, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} is a {type(t).__name__}; expected a torch.Tensor")
    if t.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name} has dtype {t.dtype}; expected torch.float16 or bfloat16")
    if t.dim() != dim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {dim} dims")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} has strides {t.stride()}; expected the last dim contiguous")


def _check_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, m: int,
                   device: torch.device, expert_map: torch.Tensor | None) -> int:
    if topk_ids.dim() != 2 or topk_ids.shape[0] != m:
        raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)}; expected [{m}, top_k]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids has dtype {topk_ids.dtype}; expected torch.int32 or int64")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights has shape {tuple(topk_weights.shape)}; expected "
                         f"{tuple(topk_ids.shape)} (the shape of topk_ids)")
    if not topk_weights.dtype.is_floating_point:
        raise ValueError(f"topk_weights has dtype {topk_weights.dtype}; expected a float dtype")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not t.is_contiguous():
            raise ValueError(f"{name} has strides {t.stride()}; expected a contiguous tensor")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}; expected {device}")
    if expert_map is not None:
        if expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"expert_map has shape {tuple(expert_map.shape)} and dtype "
                             f"{expert_map.dtype}; expected a 1-D int32 tensor")
        if not expert_map.is_contiguous() or expert_map.device != device:
            raise ValueError(f"expert_map must be contiguous on {device}; found strides "
                             f"{expert_map.stride()} on {expert_map.device}")
    return topk_ids.shape[1]


def _check_weights(w: PackedWeights, name: str, n: int, k: int, dtype: torch.dtype,
                   device: torch.device) -> None:
    if not isinstance(w, PackedWeights):
        raise ValueError(f"{name} is a {type(w).__name__}; expected PackedWeights")
    if w.n != n or w.k != k:
        raise ValueError(f"{name}.qweight has shape {tuple(w.qweight.shape)}; expected "
                         f"[E, {n}, {k // PACK_FACTOR}]")
    if w.scales.dtype != dtype:
        raise ValueError(f"{name}.scales has dtype {w.scales.dtype}; expected {dtype} "
                         "(the activations' dtype)")
    for part in ("qweight", "scales", "zeros", "perm"):
        t = getattr(w, part)
        if t is None:
            continue
        if t.device != device:
            raise ValueError(f"{name}.{part} is on {t.device}; expected {device}")
        if not t.is_contiguous():
            raise ValueError(f"{name}.{part} has strides {t.stride()}; expected contiguous")


def _check_out(out: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype,
               device: torch.device, name: str = "out") -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"{name} is {tuple(out.shape)} {out.dtype} on {out.device}; expected "
                         f"{shape} {dtype} on {device}")
    if shape[1] > 1 and out.stride(1) != 1:
        raise ValueError(f"{name} has strides {out.stride()}; expected the last dim contiguous")
    return out


def _weight_args(w: PackedWeights) -> dict:
    dummy = w.qweight  # any tensor: the pointer is never read when the option is off
    return dict(
        qw_ptr=w.qweight, s_ptr=w.scales,
        z_ptr=w.zeros if w.zeros is not None else dummy,
        perm_ptr=w.perm if w.perm is not None else dummy,
        num_groups=w.num_groups, GROUP_SIZE=w.group_size, HAS_ZEROS=w.zeros is not None,
        HAS_PERM=w.perm is not None,
    )


def _kw_per_split(k: int, cfg: DecodeConfig) -> tuple[int, int]:
    """(words per split, effective split) with splits aligned to ``block_kw``."""
    k_words = k // PACK_FACTOR
    steps = triton.cdiv(k_words, cfg.block_kw)
    split = max(1, min(cfg.split_k, steps))
    per = triton.cdiv(steps, split) * cfg.block_kw
    return per, triton.cdiv(k_words, per)


def decode_gemm1(
    x: torch.Tensor,
    w13: PackedWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """GEMM1 + activation of the decode MoE: ``[M * top_k, I]`` with row ``m * top_k + k``
    = ``act(gate) * up`` of token ``m`` through expert ``topk_ids[m, k]``.

    Args:
        x: ``[M, H]`` fp16/bf16 activations (last dim contiguous).
        w13: packed ``[E, 2I, H/8]`` (gate rows, then up rows), scales in ``x.dtype``.
        topk_ids: ``[M, top_k]`` int32/int64 expert ids (global ids when ``expert_map``).
        topk_weights: ``[M, top_k]`` router weights (used only with
            ``apply_router_weight_on_input``, which scales ``x`` before the GEMM).
        activation: ``"silu"``, ``"gelu"`` or ``"gelu_tanh"``.
        expert_map: ``[num_global_experts]`` int32 global -> local id, -1 = not on this
            rank (that slot's row is zero).
        out: optional ``[M * top_k, I]`` output in ``x.dtype``.
        workspace: buffers for split-K (allocated per call when None and needed).
        config: launch parameters (default: :func:`pick_config_gemm1`).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation is {activation!r}; expected one of {tuple(ACTIVATIONS)}")
    _check_float(x, "x", 2)
    m, h = x.shape
    device = x.device
    top_k = _check_routing(topk_ids, topk_weights, m, device, expert_map)
    if not isinstance(w13, PackedWeights):
        raise ValueError(f"w13 is a {type(w13).__name__}; expected PackedWeights")
    if w13.n % 2:
        raise ValueError(f"w13.qweight has {w13.n} rows; expected an even count (gate + up)")
    i = w13.n // 2
    _check_weights(w13, "w13", 2 * i, h, x.dtype, device)
    out = _check_out(out, (m * top_k, i), x.dtype, device)
    if m == 0:
        return out
    cfg = config or pick_config_gemm1(m, i, h, w13.num_experts, top_k, _num_sms(device),
                                      sm_read_rate=card_sm_read_rate(device))
    per, split = _kw_per_split(h, cfg)
    n_tiles = triton.cdiv(i, cfg.block_n)
    acc, cnt = _split_buffers(workspace, split, (m * top_k, 2 * i), m * top_k * n_tiles,
                              "acc1", "cnt1", device)
    grid = (m * top_k, n_tiles, split)
    _decode_gemm1_kernel[grid](
        x, x.stride(0), ids_ptr=topk_ids, tw_ptr=topk_weights,
        emap_ptr=expert_map if expert_map is not None else topk_ids,
        out_ptr=out, stride_om=out.stride(0), acc_ptr=acc, cnt_ptr=cnt,
        N_HALF=i, K=h, KW=h // PACK_FACTOR, top_k=top_k, one_bits=int(ONE_F32_BITS),
        HAS_EMAP=expert_map is not None,
        WEIGHT_ON_INPUT=apply_router_weight_on_input, ACTIVATION=ACTIVATIONS[activation],
        BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw, SPLIT_K=split, KW_PER_SPLIT=per,
        PREFETCH=cfg.prefetch, STAGES=cfg.num_stages, EVEN_N=i % cfg.block_n == 0,
        EVEN_K=(h // PACK_FACTOR) % cfg.block_kw == 0,
        num_warps=cfg.num_warps, num_stages=1,
        **_weight_args(w13),
        # a PDL dependent of the kernel before (the router); GEMM2 is launched normally: as
        # GEMM1's dependent it made Mixtral M=1-2 18-22 % slower (notes_decode.md, session 17)
        **dependent_launch_args(device),
    )
    return out


def decode_gemm2(
    inter: torch.Tensor,
    w2: PackedWeights,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """GEMM2 + top-k weighted sum of the decode MoE: ``[M, H]``,
    ``out[m] = sum_k topk_weights[m, k] * W2[topk_ids[m, k]] @ inter[m * top_k + k]``
    (weights not applied with ``apply_router_weight_on_input``; slots whose expert maps to
    -1 contribute nothing).

    Args:
        inter: ``[M * top_k, I]`` fp16/bf16 (the output of :func:`decode_gemm1`).
        w2: packed ``[E, H, I/8]``, scales in ``inter.dtype``.
        topk_ids, topk_weights, expert_map: as for :func:`decode_gemm1`.
        out: optional ``[M, H]`` output in ``inter.dtype``.
        workspace, config: as for :func:`decode_gemm1` (default :func:`pick_config_gemm2`).
    """
    _check_float(inter, "inter", 2)
    slots, i = inter.shape
    device = inter.device
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)}; expected [M, top_k]")
    m, top_k = topk_ids.shape
    if slots != m * top_k:
        raise ValueError(f"inter has shape {tuple(inter.shape)}; expected [{m * top_k}, I] "
                         f"(M * top_k rows for topk_ids {tuple(topk_ids.shape)})")
    _check_routing(topk_ids, topk_weights, m, device, expert_map)
    if not isinstance(w2, PackedWeights):
        raise ValueError(f"w2 is a {type(w2).__name__}; expected PackedWeights")
    h = w2.n
    _check_weights(w2, "w2", h, i, inter.dtype, device)
    out = _check_out(out, (m, h), inter.dtype, device)
    if m == 0:
        return out
    cfg = config or pick_config_gemm2(m, h, i, w2.num_experts, top_k, _num_sms(device),
                                      sm_read_rate=card_sm_read_rate(device))
    topk_inner = top_k if cfg.topk_inner >= top_k else 1
    per, split = _kw_per_split(i, cfg)
    num_splits = (top_k // topk_inner) * split
    n_tiles = triton.cdiv(h, cfg.block_n)
    acc, cnt = _split_buffers(workspace, num_splits, (m, h), m * n_tiles, "acc2", "cnt2",
                              device)
    grid = (m * top_k // topk_inner, n_tiles, split)
    _decode_gemm2_kernel[grid](
        inter, inter.stride(0), ids_ptr=topk_ids, tw_ptr=topk_weights,
        emap_ptr=expert_map if expert_map is not None else topk_ids,
        out_ptr=out, stride_om=out.stride(0), acc_ptr=acc, cnt_ptr=cnt,
        N=h, K=i, KW=i // PACK_FACTOR, top_k=top_k, one_bits=int(ONE_F32_BITS),
        HAS_EMAP=expert_map is not None,
        WEIGHT_ON_INPUT=apply_router_weight_on_input,
        BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw, SPLIT_K=split, KW_PER_SPLIT=per,
        PREFETCH=cfg.prefetch, STAGES=cfg.num_stages,
        TOPK_INNER=topk_inner, NUM_SPLITS=num_splits,
        EVEN_N=h % cfg.block_n == 0, EVEN_K=(i // PACK_FACTOR) % cfg.block_kw == 0,
        num_warps=cfg.num_warps, num_stages=1,
        **_weight_args(w2),
    )
    return out


def _split_buffers(workspace: DecodeWorkspace | None, splits: int, acc_shape: tuple[int, int],
                   counters: int, acc_name: str, cnt_name: str, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed fp32 accumulator and counters a split launch needs (dummies otherwise)."""
    if workspace is not None:
        acc, cnt = getattr(workspace, acc_name), getattr(workspace, cnt_name)
        if acc.shape[0] < acc_shape[0] or acc.shape[1] != acc_shape[1] or cnt.numel() < counters:
            raise ValueError(f"workspace.{acc_name} has shape {tuple(acc.shape)}; expected at "
                             f"least {acc_shape}")
        return acc, cnt
    if splits == 1:
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        return dummy, torch.empty(1, dtype=torch.int32, device=device)
    return (torch.zeros(acc_shape, dtype=torch.float32, device=device),
            torch.zeros(counters, dtype=torch.int32, device=device))


def fused_moe_decode(
    hidden_states: torch.Tensor,
    experts: PackedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    gemm1_config: DecodeConfig | None = None,
    gemm2_config: DecodeConfig | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """W4A16 MoE layer for few tokens: ``[M, H]`` in ``hidden_states.dtype``.

    ``out[m] = sum_k topk_weights[m, k] * W2[e] @ act(W13_gate[e] @ x[m]) * (W13_up[e] @ x[m])``
    with ``e = topk_ids[m, k]`` (mapped through ``expert_map``; experts mapped to -1
    contribute zero). With ``apply_router_weight_on_input`` the weight scales ``x`` instead.
    The intermediate is rounded to the activation dtype between the GEMMs.

    Two kernel launches, no host synchronisation, no allocation when ``workspace`` (see
    :class:`DecodeWorkspace`) and ``out`` are given: safe to capture in a CUDA graph.
    M=0 returns an empty tensor without launching. Out-of-range ``topk_ids`` are the
    caller's bug (not checked on the device).

    ``deterministic``: no atomics (:func:`deterministic_decode_configs` by default; given
    configs lose their split-K and GEMM2 sums all top-k slots in one program), so the result
    is bitwise reproducible and the same for a token whatever the batch.
    """
    _check_float(hidden_states, "hidden_states", 2)
    if not isinstance(experts, PackedExperts):
        raise ValueError(f"experts is a {type(experts).__name__}; expected PackedExperts")
    m, h = hidden_states.shape
    if h != experts.hidden_size:
        raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}; expected "
                         f"[M, {experts.hidden_size}]")
    if hidden_states.dtype != experts.dtype:
        raise ValueError(f"hidden_states has dtype {hidden_states.dtype}; expected "
                         f"{experts.dtype} (the experts' dtype)")
    device = hidden_states.device
    top_k = _check_routing(topk_ids, topk_weights, m, device, expert_map)
    out = _check_out(out, (m, h), hidden_states.dtype, device)
    if m == 0:
        return out
    i = experts.intermediate_size
    if workspace is not None:
        workspace.check(m, h, i, top_k, hidden_states.dtype, device)
        inter = workspace.inter[: m * top_k]
    else:
        inter = None
    num_global = experts.num_experts if expert_map is None else expert_map.shape[0]
    if deterministic:
        if gemm1_config is None or gemm2_config is None:
            d1, d2 = deterministic_decode_configs(i, h, experts.num_experts, top_k,
                                                  _num_sms(device),
                                                  sm_read_rate=card_sm_read_rate(device))
            gemm1_config = gemm1_config or d1
            gemm2_config = gemm2_config or d2
        gemm1_config = _deterministic(gemm1_config)
        gemm2_config = _deterministic(gemm2_config, top_k)
    with annotate_gemm(DECODE_KERNEL_NAME, m, 2 * i, h, num_global, top_k):
        inter = decode_gemm1(hidden_states, experts.w13, topk_ids, topk_weights,
                             activation=activation,
                             apply_router_weight_on_input=apply_router_weight_on_input,
                             expert_map=expert_map, out=inter, workspace=workspace,
                             config=gemm1_config)
    with annotate_gemm(DECODE_KERNEL_NAME, m, h, i, num_global, top_k):
        return decode_gemm2(inter, experts.w2, topk_ids, topk_weights,
                            apply_router_weight_on_input=apply_router_weight_on_input,
                            expert_map=expert_map, out=out, workspace=workspace,
                            config=gemm2_config)


__all__ = [
    "ACTIVATIONS",
    "DecodeConfig",
    "DecodeWorkspace",
    "card_sm_read_rate",
    "decode_gemm1",
    "decode_gemm2",
    "deterministic_decode_configs",
    "fused_moe_decode",
    "pick_config_gemm1",
    "pick_config_gemm2",
    "ring_step_words",
]
