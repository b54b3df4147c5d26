"""Shared ``@triton.jit`` helpers for reading the packed int4 layout (see :mod:`w4a16moe.layout`).

Every kernel reads ``qweight`` int32 ``[E, N, K/8]`` whose words hold eight consecutive K
values in ExLlama shuffle order ``v0 | v2<<4 | v4<<8 | v6<<12 | v1<<16 | v3<<20 | v5<<24 |
v7<<28``: value ``j`` of a word sits at bit ``(j // 2) * 4 + (j % 2) * 16``.

The helpers work on a tile of words ``[R, C]`` whose last axis runs along K (C words = 8*C
K values), i.e. the natural orientation of a load from ``qweight`` (rows = output features).
A kernel that wants K on the first axis (``tl.dot(x, w)`` with ``w`` ``[K, N]``) unpacks in
this orientation and transposes with ``tl.trans``.

Two ways to turn a word tile into numbers:

* :func:`unpack_int4` gives the integer codes 0..15 ``[R, 8*C]`` (int32), for kernels that
  dequantize element-wise with :func:`dequantize` (e.g. before a ``tl.dot``).
* :func:`unpack_int4_to_unit_float` gives ``1 + q / d`` as float32 (``d`` = 16 or 256 by
  position in the word) without an int->float conversion: the code is moved
  into the mantissa of 1.0 with one shift per *two* values and one logic op per value.
  Integer-to-float conversion runs at a quarter of the FP32 rate on NVIDIA GPUs and a GEMV
  that streams int4 weights at memory speed is close to issue-bound, so the decode kernel
  uses this form: :func:`unit_float_chunk_dots` sums ``(1 + q/d) * x`` and ``x`` over runs
  of 32 K values (inside one group) and recovers ``sum(q * x)`` from them.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: values per int32 word
PACK_FACTOR = tl.constexpr(8)
#: bits of 1.0f (exponent 127, empty mantissa)
ONE_F32_BITS = tl.constexpr(0x3F800000)


@triton.jit
def shuffle_shift(j):
    """Bit offset inside a packed word of the value with in-word index ``j`` (0..7).

    ``j`` is any integer tensor; the result has its shape: ``(j // 2) * 4 + (j % 2) * 16``.
    """
    return (j // 2) * 4 + (j % 2) * 16


@triton.jit
def replicate_words(w):
    """``[R, C]`` words -> ``[R, 8*C]``: element ``k`` is word ``k // 8`` (kept in registers).

    Built from three ``tl.interleave`` so the copies stay in the thread that loaded the word.
    """
    w = tl.interleave(w, w)
    w = tl.interleave(w, w)
    w = tl.interleave(w, w)
    return w


@triton.jit
def unpack_int4(w, BLOCK_K: tl.constexpr):
    """Unpack words ``[R, BLOCK_K // 8]`` (int32, shuffle order) to codes ``[R, BLOCK_K]``.

    Returns int32 values 0..15 in plain K order: column ``k`` is value ``k % 8`` of word
    ``k // 8``.
    """
    wr = replicate_words(w)
    j = tl.arange(0, BLOCK_K) % 8
    return (wr >> shuffle_shift(j)[None, :]) & 0xF


@triton.jit
def unpack_int4_to_unit_float(w, BLOCK_K: tl.constexpr, one_bits):
    """Unpack words ``[R, BLOCK_K // 8]`` to float32 ``[R, BLOCK_K]`` equal to ``1 + q/d``.

    ``q`` is the 4-bit code of each K position (plain K order); ``d`` is 16 for in-word values
    j in {2, 3, 6, 7} and 256 for j in {0, 1, 4, 5}. The code lands in mantissa bits 19..22
    (``d = 16``) or 15..18 (``d = 256``) of a float whose other bits are ``one_bits`` (the
    bits of 1.0, ``ONE_F32_BITS``). The shuffle order puts two values four bits apart under
    each of four shifts of the word (>>1: j=3,1; >>9: j=7,5; <<7: j=6,4; <<15: j=2,0), so
    the conversion costs half a shift and one logic op per value and is exact. Pass
    ``one_bits`` as a runtime kernel argument: held in a register, it lets the GPU compiler
    fuse the mask and the OR into one three-input logic op. Masked-out words loaded as 0
    read as 1.0; multiply by a zero activation to cancel them.

    Precision: a product ``(1 + q/d) * x`` rounded to fp32 is off by ``2^-24 * |x|``, i.e.
    by ``2^-24 * d * |x|`` on the recovered ``q * x``: below 2^-16 of ``|x|``.
    """
    wr = replicate_words(w)
    j = tl.arange(0, BLOCK_K) % 8
    odd = (j % 2) != 0
    upper = j >= 4
    left = tl.where(odd, 0, tl.where(upper, 7, 15))
    right = tl.where(odd, tl.where(upper, 9, 1), 0)
    mask = tl.where((j & 2) != 0, 0xF << 19, 0xF << 15)
    t = (wr << left[None, :]) >> right[None, :]
    bits = (t & mask[None, :]) | one_bits
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dequantize(q, scale, zero):
    """``(q - zero) * scale`` in float32 for codes ``q`` and broadcastable ``scale``/``zero``."""
    return (q.to(tl.float32) - zero.to(tl.float32)) * scale.to(tl.float32)


@triton.jit
def _class_chunk_sums(v, ROWS: tl.constexpr, CHUNKS: tl.constexpr):
    """``[ROWS, CHUNKS * 32]`` -> ``[ROWS, CHUNKS, 2]``: sums over each run of 32 K values,
    split by ``(k % 8) & 2`` (index 1: in-word values 2, 3, 6, 7)."""
    # the long axis first: each thread then sums products in multiply-add chains
    t = tl.sum(tl.reshape(v, [ROWS, CHUNKS, 8, 2, 2]), axis=2)
    return tl.sum(t, axis=3)


@triton.jit
def unit_float_chunk_dots(f, x, ROWS: tl.constexpr, CHUNKS: tl.constexpr):
    """Integer dot products per 32-value chunk from :func:`unpack_int4_to_unit_float` codes.

    Args:
        f: float32 ``[ROWS, CHUNKS * 32]`` (``1 + q/d``).
        x: float32 ``[CHUNKS * 32]`` activations (zero where masked).

    Returns ``(qx, xs)``: ``qx`` ``[ROWS, CHUNKS]`` = ``sum(q * x)`` over each chunk and ``xs``
    ``[1, CHUNKS]`` = ``sum(x)``, so a chunk inside one quantization group contributes
    ``scale * (qx - zero * xs)``. Per divisor class ``c``:
    ``sum(q x) = d_c * (sum(f x) - sum(x))``; the subtraction cancels at most
    ``log2(d) <= 8`` bits of fp32. With 32 = the values one thread loads (one 16-byte load of
    words) every sum stays inside a thread.
    """
    s_fx = _class_chunk_sums(f * x[None, :], ROWS, CHUNKS)
    s_x = _class_chunk_sums(x[None, :], 1, CHUNKS)
    div = tl.where(tl.arange(0, 2) == 1, 16.0, 256.0)
    qx = tl.sum((s_fx - s_x) * div[None, None, :], axis=2)
    return qx, tl.sum(s_x, axis=2)


@triton.jit
def activation(x, ACTIVATION: tl.constexpr):
    """act(x) in fp32 (the prefill kernels' fused epilogue): 1 silu, 2 gelu (erf), 3 gelu
    (tanh approximation). This helper and the two below use plain Triton ops only, so the
    Gluon kernel of ``prefill_rs`` wraps the same functions."""
    if ACTIVATION == 1:
        y = x / (1.0 + tl.exp(-x))
    elif ACTIVATION == 2:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # tanh(t) = 1 - 2 / (exp(2t) + 1), safe for large |t|
        t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
        y = 0.5 * x * (1.0 + t)
    return y


@triton.jit
def fragment_order(k):
    """The K column that position ``k`` of a fragment-order tile holds (an involution).

    Within each run of 32 columns, position ``8i + 2c + p`` holds column ``8c + 2i + p``
    (``i, c`` in 0..3, ``p`` in 0..1): the two 2-bit fields swap. Word ``c`` of a run (8
    columns) then holds exactly the 8 values that lane ``c`` of a quad owns in the register
    operand of a 16-bit ``wgmma``/``mma`` (columns ``2c, 2c+1, 2c+8, 2c+9, ...`` of the
    run), so a tile dequantized word by word is already in the operand layout.
    """
    return (k // 32) * 32 + ((k // 2) % 4) * 8 + ((k // 8) % 4) * 2 + k % 2


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_SIZE_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``tile`` of a grouped GEMM: GROUP_SIZE_M row blocks
    side by side per column band, so programs running at the same time share the column
    band's weight tiles in L2."""
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_SIZE_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


__all__ = [
    "activation",
    "fragment_order",
    "grouped_tile",
    "ONE_F32_BITS",
    "PACK_FACTOR",
    "dequantize",
    "replicate_words",
    "shuffle_shift",
    "unit_float_chunk_dots",
    "unpack_int4",
    "unpack_int4_to_unit_float",
]
