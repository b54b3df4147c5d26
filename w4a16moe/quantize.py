"""Round-to-nearest int4 quantization of float expert weights into the packed layout."""

from __future__ import annotations

import torch

from .layout import (
    FLOAT_DTYPES,
    PACK_FACTOR,
    SUPPORTED_GROUP_SIZES,
    PackedExperts,
    PackedWeights,
    pack_int4,
)


def _scales_rounded_up(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Non-negative float32 scales -> ``dtype`` (fp16/bf16), rounded *up* to the next
    representable value where round-to-nearest would go down. A stored scale is then never
    below the exact one, so no value leaves the 4-bit range (the error stays <= scale/2) and
    a non-zero scale never underflows to 0."""
    out = s.to(dtype)
    low = out.float() < s
    # for positive finite values (and +0), the next larger value is the next bit pattern
    bumped = (out.view(torch.int16) + 1).view(dtype)
    return torch.where(low, bumped, out)


def quantize_weights(
    w: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
    name: str = "weights",
) -> PackedWeights:
    """Quantize float weights ``[E, N, K]`` to int4 with one scale per ``group_size`` K values.

    ``group_size`` is 32, 64, 128, or -1 / K for one group per output channel. Symmetric:
    ``s = max|w| / 7``, ``q = round(w / s) + 8`` (codes 1..15, zero point 8, no ``zeros``
    tensor); asymmetric: the range ``[min(w, 0), max(w, 0)]`` is split in 15 steps,
    ``s = (max - min) / 15``, zero point ``z = round(-min / s)``, ``q = round(w / s) + z``.
    The scales take ``scale_dtype`` (fp16/bf16; default: ``w``'s dtype if 16-bit, else
    bfloat16) and are rounded up to it, so every dequantized value ``(q - z) * s`` is within
    ``s / 2`` of ``w`` (computed in float32); weights already on such a grid come back exactly.
    An all-zero group gets scale 0 and dequantizes to exact zeros.

    Raises ``ValueError`` for a non-float or non-finite ``w``, a shape that is not
    ``[E, N, K]`` with K a multiple of 8 and of the group size, an unsupported group size or
    ``scale_dtype``, or scales that overflow ``scale_dtype``.
    """
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor; found "
                         f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 3:
        raise ValueError(f"{name} has shape {tuple(w.shape)}; expected 3 dims [E, N, K]")
    e, n, k = w.shape
    if k == 0 or k % PACK_FACTOR:
        raise ValueError(f"{name} has K={k}; expected a positive multiple of {PACK_FACTOR}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size is {group_size!r}; expected an int")
    g = k if group_size in (-1, k) else group_size
    if g not in SUPPORTED_GROUP_SIZES and g != k:
        raise ValueError(f"group_size={group_size}; expected one of {SUPPORTED_GROUP_SIZES} "
                         "or -1 (per channel)")
    if k % g:
        raise ValueError(f"{name} has K={k}, not a multiple of group_size {g}")
    if scale_dtype is None:
        scale_dtype = w.dtype if w.dtype in FLOAT_DTYPES else torch.bfloat16
    if scale_dtype not in FLOAT_DTYPES:
        raise ValueError(f"scale_dtype is {scale_dtype}; expected torch.float16 or "
                         "torch.bfloat16")
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} holds NaN or infinite values; expected finite weights")
    wf = w.float().reshape(e, n, k // g, g)
    if symmetric:
        scales = _scales_rounded_up(wf.abs().amax(dim=-1) / 7.0, scale_dtype)
    else:
        wmin = wf.amin(dim=-1).clamp(max=0.0)
        wmax = wf.amax(dim=-1).clamp(min=0.0)
        scales = _scales_rounded_up((wmax - wmin) / 15.0, scale_dtype)
    if scales.numel() and not bool(torch.isfinite(scales).all()):
        raise ValueError(f"{name}: a scale overflows {scale_dtype} (max |w| "
                         f"{float(wf.abs().max()):.4g}); use bfloat16 scales")
    s = scales.float().unsqueeze(-1)
    s = torch.where(s == 0, torch.ones_like(s), s)  # all-zero group: any s gives q == z
    if symmetric:
        q = torch.clamp(torch.round(wf / s) + 8, 0, 15)
        zeros = None
    else:
        z = torch.clamp(torch.round(-wmin.unsqueeze(-1) / s), 0, 15)
        q = torch.clamp(torch.round(wf / s) + z, 0, 15)
        zeros = z.squeeze(-1).to(torch.uint8)
    qweight = pack_int4(q.reshape(e, n, k).to(torch.uint8))
    return PackedWeights(qweight=qweight, scales=scales, zeros=zeros, group_size=g, name=name)


def quantize_experts(
    w13: torch.Tensor,
    w2: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> PackedExperts:
    """Quantize float experts: ``w13`` ``[E, 2I, H]`` (gate rows then up) and ``w2`` ``[E, H, I]``.

    ``dtype`` is the experts' (activations' and scales') dtype. A K (H for w13, I for w2) that
    is not a multiple of ``group_size`` is an error. See :func:`quantize_weights`.
    """
    for t_name, t in (("w13", w13), ("w2", w2)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{t_name} is a {type(t).__name__}; expected a torch.Tensor")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 has shape {tuple(w13.shape)} and w2 {tuple(w2.shape)}; "
                         "expected [E, 2I, H] and [E, H, I]")
    e, two_i, h = w13.shape
    if two_i % 2 or w2.shape != (e, h, two_i // 2):
        raise ValueError(f"w2 has shape {tuple(w2.shape)}; expected {(e, h, two_i // 2)} "
                         f"to match w13 {tuple(w13.shape)}")
    p13 = quantize_weights(w13, group_size, symmetric, dtype, name="w13")
    p2 = quantize_weights(w2, group_size, symmetric, dtype, name="w2")
    return PackedExperts(w13=p13, w2=p2, num_experts=e, hidden_size=h,
                         intermediate_size=two_i // 2, dtype=dtype)


def random_experts(
    num_experts: int,
    hidden_size: int,
    intermediate_size: int,
    group_size: int = 128,
    symmetric: bool = True,
    act_order: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> PackedExperts:
    """Random packed experts (uniform codes, scales ~ 1/sqrt(K) / 4) for tests and benchmarks,
    built directly in packed form so large model shapes are cheap to make.

    ``seed=None`` draws a seed from torch's global generator, so results follow
    ``torch.manual_seed``. ``act_order`` adds a random ``perm`` per expert; ``symmetric=False``
    adds random zero points."""
    if seed is None:
        # draw from the global generator (respects torch.manual_seed; does not reseed it)
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)

    def one(n: int, k: int, name: str) -> PackedWeights:
        g = k if group_size in (-1, k) else group_size
        q = torch.randint(0, 16, (num_experts, n, k), dtype=torch.uint8, generator=gen)
        scales = (torch.rand((num_experts, n, k // g), generator=gen) * 0.5 + 0.75) / (4 * k**0.5)
        zeros = None
        if not symmetric:
            zeros = torch.randint(0, 16, (num_experts, n, k // g), dtype=torch.uint8,
                                  generator=gen)
        perm = None
        if act_order:
            perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(num_experts)])
            perm = perm.to(torch.int32)
        return PackedWeights(qweight=pack_int4(q), scales=scales.to(dtype), zeros=zeros,
                             perm=perm, group_size=g, name=name).to(device)

    return PackedExperts(w13=one(2 * intermediate_size, hidden_size, "w13"),
                         w2=one(hidden_size, intermediate_size, "w2"), num_experts=num_experts,
                         hidden_size=hidden_size, intermediate_size=intermediate_size,
                         dtype=dtype)
