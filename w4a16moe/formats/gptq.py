"""GPTQ checkpoints (AutoGPTQ / GPTQModel ``checkpoint_format`` ``gptq`` and ``gptq_v2``).

Tensors of one linear module with weight ``W [N, K]`` (``N`` outputs, ``K`` inputs), group
size ``G`` (``K`` when ``group_size`` is -1):

- ``qweight`` int32 ``[K/8, N]``: packed along K; value ``i`` of word ``[r, n]`` (bits
  ``4i .. 4i+3``) is the code of input column ``8r + i``.
- ``qzeros`` int32 ``[K/G, N/8]``: packed along N; value ``i`` of word ``[g, c]`` is the zero
  point of output ``8c + i``. Format ``gptq`` (v1) stores ``zero - 1``; ``gptq_v2`` stores the
  zero. Symmetric checkpoints store the constant zero 8 (``0x77777777`` in v1).
- ``scales`` float16 ``[K/G, N]``.
- ``g_idx`` int32 ``[K]`` (optional): the group of each input column; with ``desc_act``
  (act-order) it is not ``k // G``.

Dequantization: ``W[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]``.
"""

from __future__ import annotations

import torch

from .common import (
    DecodedProjection,
    check_dims,
    expect_dtype,
    expect_shape,
    unpack_along_cols,
)
from .quant_config import WeightScheme

PRIMARY = "qweight"
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64, torch.int16)


def tensor_suffixes(scheme: WeightScheme) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) tensor suffixes of one quantized module."""
    if scheme.symmetric:
        return ("qweight", "scales"), ("qzeros", "g_idx")
    return ("qweight", "qzeros", "scales"), ("g_idx",)


def decode(tensors: dict[str, torch.Tensor], n: int, k: int, scheme: WeightScheme, name: str,
           checkpoint_format: str = "gptq") -> DecodedProjection:
    """Decode one GPTQ module (``tensors`` by suffix) whose weight is ``[n, k]``."""
    g = check_dims(n, k, scheme.group_size, name)
    groups = k // g
    qweight = tensors["qweight"]
    expect_dtype(qweight, (torch.int32,), f"{name}.qweight")
    expect_shape(qweight, (k // 8, n), f"{name}.qweight", "[K/8, N]")
    scales = tensors["scales"]
    expect_dtype(scales, SCALE_DTYPES, f"{name}.scales")
    expect_shape(scales, (groups, n), f"{name}.scales", f"[K/G, N] with group_size {g}")
    zeros = None
    if "qzeros" in tensors:
        qzeros = tensors["qzeros"]
        expect_dtype(qzeros, (torch.int32,), f"{name}.qzeros")
        expect_shape(qzeros, (groups, n // 8), f"{name}.qzeros", "[K/G, N/8]")
        zeros = unpack_along_cols(qzeros).to(torch.int32)
        if checkpoint_format == "gptq":
            zeros = zeros + 1
        zeros = zeros.t().contiguous()
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        expect_dtype(g_idx, INDEX_DTYPES, f"{name}.g_idx")
        expect_shape(g_idx, (k,), f"{name}.g_idx", "[K]")
    # word [r, n] holds columns 8r..8r+7 of row n: transposed, it is packed along K already
    return DecodedProjection(words=qweight.t().contiguous(), scales=scales.t().contiguous(),
                             zeros=zeros, g_idx=g_idx, group_size=g, name=name)
