"""compressed-tensors checkpoints in the ``pack-quantized`` format (llm-compressor W4A16).

Tensors of one linear module with weight ``W [N, K]``, group size ``G`` (strategy ``group``)
or ``K`` (strategy ``channel``):

- ``weight_packed`` int32 ``[N, K/8]``: packed along K; value ``i`` of word ``[n, c]`` (bits
  ``4i .. 4i+3``) is ``q + 8`` for the signed code ``q`` (-8..7) of input column ``8c + i``.
- ``weight_scale`` float ``[N, K/G]``.
- ``weight_zero_point`` (asymmetric only) int32 ``[N/8, K/G]``: packed along N; value ``i`` of
  word ``[r, g]`` is ``z + 8`` for the signed zero point ``z`` of output ``8r + i``. (An
  unpacked int8 ``[N, K/G]`` of signed zero points, written by some versions, is read too.)
- ``weight_g_idx`` int32 ``[K]`` (actorder ``group``): the group of each input column.
- ``weight_shape`` int ``[2]``: ``(N, K)``.

Dequantization: ``W[n, k] = (q[n, k] - z[n, g[k]]) * weight_scale[n, g[k]]``; adding 8 to both
``q`` and ``z`` gives the unsigned codes and zero points of the packed layout.
"""

from __future__ import annotations

import torch

from .common import (
    DecodedProjection,
    check_dims,
    expect_dtype,
    expect_shape,
    shape_of,
    unpack_along_rows,
)
from .quant_config import WeightScheme

PRIMARY = "weight_packed"
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64, torch.int16)
SUPPORTED_FORMATS = ("pack-quantized",)


def tensor_suffixes(scheme: WeightScheme) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) tensor suffixes of one quantized module."""
    if scheme.symmetric:
        return ("weight_packed", "weight_scale"), ("weight_zero_point", "weight_g_idx",
                                                   "weight_shape")
    return ("weight_packed", "weight_scale", "weight_zero_point"), ("weight_g_idx",
                                                                   "weight_shape")


def decode(tensors: dict[str, torch.Tensor], n: int, k: int, scheme: WeightScheme,
           name: str) -> DecodedProjection:
    """Decode one pack-quantized module (``tensors`` by suffix) whose weight is ``[n, k]``."""
    if scheme.format not in SUPPORTED_FORMATS:
        raise ValueError(f"{name}: compressed-tensors format is {scheme.format!r}; expected one "
                         f"of {SUPPORTED_FORMATS}")
    g = check_dims(n, k, scheme.group_size, name)
    groups = k // g
    if "weight_shape" in tensors:
        ws = tensors["weight_shape"]
        if ws.dtype.is_floating_point or tuple(int(v) for v in ws.flatten()) != (n, k):
            raise ValueError(f"{name}.weight_shape is {ws.tolist()}; expected [{n}, {k}]")
    packed = tensors["weight_packed"]
    expect_dtype(packed, (torch.int32,), f"{name}.weight_packed")
    expect_shape(packed, (n, k // 8), f"{name}.weight_packed", "[N, K/8]")
    scales = tensors["weight_scale"]
    expect_dtype(scales, SCALE_DTYPES, f"{name}.weight_scale")
    if scales.dim() == 1 and groups == 1:
        scales = scales.unsqueeze(1)
    expect_shape(scales, (n, groups), f"{name}.weight_scale",
                 "[N, K/G] with " + ("strategy channel" if g == k else f"group_size {g}"))
    zeros = None
    zp = tensors.get("weight_zero_point")
    if zp is not None:
        if zp.dim() == 1 and groups == 1:
            zp = zp.unsqueeze(1)
        if zp.dtype == torch.int32 and shape_of(zp) == (n // 8, groups):
            zeros = unpack_along_rows(zp).to(torch.int32)
        elif zp.dtype in (torch.int8, torch.int32) and shape_of(zp) == (n, groups):
            zeros = zp.to(torch.int32) + 8
        else:
            raise ValueError(f"{name}.weight_zero_point has shape {shape_of(zp)} and dtype "
                             f"{zp.dtype}; expected int32 {(n // 8, groups)} (packed along N)")
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None:
        expect_dtype(g_idx, INDEX_DTYPES, f"{name}.weight_g_idx")
        expect_shape(g_idx, (k,), f"{name}.weight_g_idx", "[K]")
    # stored code q + 8 is the layout's unsigned code; the words are packed along K already
    return DecodedProjection(words=packed.contiguous(), scales=scales, zeros=zeros, g_idx=g_idx,
                             group_size=g, name=name)
