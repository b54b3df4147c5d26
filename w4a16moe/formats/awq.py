"""AWQ checkpoints in the GEMM layout (AutoAWQ ``version: gemm``).

Tensors of one linear module with weight ``W [N, K]``, group size ``G``:

- ``qweight`` int32 ``[K, N/8]``: packed along N in AWQ's interleaved order; value ``i`` of
  word ``[k, c]`` (bits ``4i .. 4i+3``) is the code of output column
  ``8c + AWQ_PACK_ORDER[i]`` with ``AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)`` (equivalently,
  column ``8c + j`` sits in value ``(0, 4, 1, 5, 2, 6, 3, 7)[j]``).
- ``qzeros`` int32 ``[K/G, N/8]``: the same packing, zero points stored as they are.
- ``scales`` float16 ``[K/G, N]``.

Dequantization: ``W[n, k] = (q[k, n] - z[k // G, n]) * scales[k // G, n]``. No act-order.
"""

from __future__ import annotations

import torch

from .common import (
    DecodedProjection,
    check_dims,
    expect_dtype,
    expect_shape,
    pack_sequential,
    unpack_along_cols,
)
from .quant_config import WeightScheme

PRIMARY = "qweight"
#: value i of a packed word holds column AWQ_PACK_ORDER[i] of its block of 8
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tensor_suffixes(scheme: WeightScheme) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) tensor suffixes of one quantized module."""
    return ("qweight", "qzeros", "scales"), ()


def decode(tensors: dict[str, torch.Tensor], n: int, k: int, scheme: WeightScheme,
           name: str) -> DecodedProjection:
    """Decode one AWQ GEMM module (``tensors`` by suffix) whose weight is ``[n, k]``."""
    g = check_dims(n, k, scheme.group_size, name)
    groups = k // g
    qweight = tensors["qweight"]
    expect_dtype(qweight, (torch.int32,), f"{name}.qweight")
    expect_shape(qweight, (k, n // 8), f"{name}.qweight", "[K, N/8]")
    qzeros = tensors["qzeros"]
    expect_dtype(qzeros, (torch.int32,), f"{name}.qzeros")
    expect_shape(qzeros, (groups, n // 8), f"{name}.qzeros", "[K/G, N/8]")
    scales = tensors["scales"]
    expect_dtype(scales, SCALE_DTYPES, f"{name}.scales")
    expect_shape(scales, (groups, n), f"{name}.scales", f"[K/G, N] with group_size {g}")
    # an 8x8 transpose of nibbles (packed along N -> along K) needs the codes
    words = pack_sequential(unpack_along_cols(qweight, AWQ_PACK_ORDER).t())
    zeros = unpack_along_cols(qzeros, AWQ_PACK_ORDER).t().contiguous()
    return DecodedProjection(words=words, scales=scales.t().contiguous(), zeros=zeros,
                             g_idx=None, group_size=g, name=name)
