"""Shared pieces of the converters: 4-bit unpacking, the decoded projection, and re-packing
into :class:`~w4a16moe.layout.PackedWeights`.

Every format decoder turns the tensors of one expert projection into a
:class:`DecodedProjection`: int32 words ``[N, K/8]`` packed *sequentially* along K (value ``i``
of word ``c`` at bits ``4i`` is input column ``8c + i``, as GPTQ and compressed-tensors store
it), in the checkpoint's own column order and group numbering. This module then checks
groups and re-packs: without act-order a per-word bit permutation (sequential -> shuffle
order), with act-order an unpack, a column gather and a pack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..layout import PACK_FACTOR, SHUFFLE_SHIFTS, SUPPORTED_GROUP_SIZES, PackedWeights


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def expect_shape(t: torch.Tensor, expected: tuple[int, ...], name: str, hint: str = "") -> None:
    if shape_of(t) != expected:
        more = f" {hint}" if hint else ""
        raise ValueError(f"{name} has shape {shape_of(t)}; expected {expected}{more}")


def expect_dtype(t: torch.Tensor, dtypes: Sequence[torch.dtype], name: str) -> None:
    if t.dtype not in dtypes:
        wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; "
                         f"expected {wanted}")


def _shifts(order: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([4 * i for i in order], dtype=torch.int32, device=device)


def nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[...]`` -> uint8 ``[..., 8]``: value ``i`` is bits ``4i .. 4i+3`` of a word."""
    # arithmetic shift of negative words is fine: the mask drops the sign bits
    return ((words.unsqueeze(-1) >> _shifts(range(8), words.device)) & 0xF).to(torch.uint8)


def unpack_along_rows(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C]`` packed along rows (value ``i`` of word ``[r, c]`` is row ``8r+i``) ->
    uint8 ``[8R, C]``."""
    r, c = words.shape
    sh = _shifts(range(8), words.device).view(PACK_FACTOR, 1)
    return ((words.unsqueeze(1) >> sh) & 0xF).to(torch.uint8).reshape(r * PACK_FACTOR, c)


def unpack_along_cols(words: torch.Tensor, order: Sequence[int] | None = None) -> torch.Tensor:
    """int32 ``[R, C]`` packed along columns -> uint8 ``[R, 8C]``. Value ``i`` of word
    ``[r, c]`` is column ``8c + order[i]`` (``order`` defaults to ``0..7``)."""
    r, c = words.shape
    position = list(range(PACK_FACTOR))  # position[j]: which value of the word is column j
    if order is not None:
        for i, col in enumerate(order):
            position[col] = i
    sh = _shifts(position, words.device)
    return ((words.unsqueeze(-1) >> sh) & 0xF).to(torch.uint8).reshape(r, c * PACK_FACTOR)


def pack_shuffled(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., N, K]`` (0..15) -> int32 ``[..., N, K/8]`` in the layout's shuffle order;
    the same words as :func:`~w4a16moe.layout.pack_int4`, without int64 temporaries (the
    fields are disjoint, so an int32 sum of the shifted values is their bitwise or)."""
    v = codes.reshape(*codes.shape[:-1], codes.shape[-1] // PACK_FACTOR, PACK_FACTOR)
    sh = torch.tensor(SHUFFLE_SHIFTS, dtype=torch.int32, device=codes.device)
    return (v.to(torch.int32) << sh).sum(dim=-1, dtype=torch.int32)


def pack_sequential(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., N, K]`` (0..15) -> int32 ``[..., N, K/8]``, value ``i`` of word ``c`` at
    bits ``4i`` holding column ``8c + i``."""
    v = codes.reshape(*codes.shape[:-1], codes.shape[-1] // PACK_FACTOR, PACK_FACTOR)
    return (v.to(torch.int32) << _shifts(range(8), codes.device)).sum(dim=-1, dtype=torch.int32)


def sequential_to_shuffled(words: torch.Tensor) -> torch.Tensor:
    """Move value ``j`` of every int32 word from bit ``4j`` to the shuffle order's bit
    ``(j // 2) * 4 + (j % 2) * 16``: the sequential packing along K becomes the layout's
    without unpacking. Left shifts wrap in int32 (two's complement)."""
    out = words & 0xF
    for j in range(1, PACK_FACTOR):
        out |= ((words >> (4 * j)) & 0xF) << SHUFFLE_SHIFTS[j]
    return out


@dataclass
class DecodedProjection:
    """One projection of one expert, decoded from a checkpoint, not yet re-packed.

    ``W[n, k] = (q[n, k] - zeros[n, g[k]]) * scales[n, g[k]]`` with ``q[n, k]`` value ``k % 8``
    (bits ``4 * (k % 8)``) of ``words[n, k // 8]``, and ``g = g_idx`` when given, else
    ``g[k] = k // group_size``.

    Attributes:
        words: int32 ``[N, K/8]`` codes packed sequentially along K.
        scales: float ``[N, K/G]``.
        zeros: ``[N, K/G]`` integer zero points (None: symmetric, 8). Values outside 0..15
            are rejected when packing, naming the module.
        g_idx: ``[K]`` group of each input column (act-order) or None.
        group_size: G (K for per channel).
        name: the checkpoint module, for error messages.
    """

    words: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    group_size: int
    name: str

    @property
    def k(self) -> int:
        return self.words.shape[1] * PACK_FACTOR

    @property
    def device(self) -> torch.device:
        return self.words.device


def check_dims(n: int, k: int, group_size: int, name: str) -> int:
    """Check ``K`` and the group size of a projection ``[N, K]``; return G (K for -1)."""
    if k % PACK_FACTOR or n % PACK_FACTOR:
        raise ValueError(f"{name}: weight is [N={n}, K={k}]; N and K must be multiples of "
                         f"{PACK_FACTOR}")
    g = k if group_size in (-1, k) else group_size
    if g <= 0:
        raise ValueError(f"{name}: group_size is {group_size}; expected a positive size or -1")
    if k % g:
        raise ValueError(f"{name}: K={k} is not a multiple of group_size {g}")
    return g


def g_idx_permutation(g_idx: torch.Tensor, group_size: int, name: str) -> torch.Tensor | None:
    """The column order that makes act-order groups contiguous, or None when ``g_idx`` is the
    trivial ``k // G``. ``perm`` sorts columns by group (stable), so packed column ``j``
    is checkpoint column ``perm[j]`` and belongs to group ``j // G``."""
    k = g_idx.numel()
    groups = k // group_size
    g = g_idx.to(torch.int64)
    trivial = torch.arange(k, device=g.device) // group_size
    if torch.equal(g, trivial):
        return None
    if int(g.min()) < 0 or int(g.max()) >= groups:
        raise ValueError(f"{name}: g_idx ranges over [{int(g.min())}, {int(g.max())}]; expected "
                         f"groups 0..{groups - 1} (K={k}, group_size={group_size})")
    counts = torch.bincount(g, minlength=groups)
    if bool((counts != group_size).any()):
        bad = int((counts != group_size).nonzero()[0, 0])
        raise ValueError(f"{name}: g_idx puts {int(counts[bad])} columns in group {bad}; expected "
                         f"{group_size} in every group")
    return torch.sort(g, stable=True).indices


def _full_g_idx(p: DecodedProjection) -> torch.Tensor:
    """``g_idx`` of ``p`` as int64 ``[K]``, ``k // G`` when absent."""
    if p.g_idx is None:
        return torch.arange(p.k, device=p.device) // p.group_size
    return p.g_idx.to(device=p.device, dtype=torch.int64)


def pack_projections(parts: Sequence[DecodedProjection], name: str) -> PackedWeights:
    """Stack the rows of ``parts`` (one expert: e.g. gate then up, which share K and must share
    ``g_idx``) and pack them as a one-expert :class:`PackedWeights` ``[1, sum N, K/8]``."""
    first = parts[0]
    k, g = first.k, first.group_size
    for p in parts[1:]:
        if p.k != k:
            raise ValueError(f"{p.name} has K={p.k}; expected K={k} like {first.name}")
        if p.group_size != g:
            raise ValueError(f"{p.name} has group_size {p.group_size}; expected {g} like "
                             f"{first.name} (they are stacked into one projection)")
        if not torch.equal(_full_g_idx(p), _full_g_idx(first)):
            raise ValueError(
                f"{p.name} g_idx differs from {first.name} g_idx; the two share their input "
                "and are stacked with one act-order permutation, so their g_idx must match")
    perm = None if first.g_idx is None else g_idx_permutation(first.g_idx, g, first.name)
    words = torch.cat([p.words for p in parts], dim=0)
    scales = torch.cat([p.scales for p in parts], dim=0)
    if all(p.zeros is None for p in parts):
        zeros = None
    else:
        zs = []
        for p in parts:
            z = p.zeros
            if z is None:
                z = torch.full(p.scales.shape, 8, dtype=torch.int32, device=p.device)
            elif z.numel() and (int(z.min()) < 0 or int(z.max()) > 15):
                bad = int(z.max()) if int(z.max()) > 15 else int(z.min())
                raise ValueError(
                    f"{p.name} has a zero point of {bad}; the packed layout holds zero points "
                    "0..15 (a GPTQ v1 checkpoint stores zero - 1, so its stored 15 means 16, "
                    "which no 4-bit layout can hold)")
            zs.append(z.to(torch.int32))
        zeros = torch.cat(zs, dim=0).to(torch.uint8)
    if perm is None:
        qweight = sequential_to_shuffled(words)
    else:
        codes = unpack_along_cols(words)
        qweight = pack_shuffled(codes[:, perm])
    if g != k and g not in SUPPORTED_GROUP_SIZES:
        if g % SUPPORTED_GROUP_SIZES[-1]:
            raise ValueError(f"{first.name}: group_size {g} cannot be expressed in the packed "
                             f"layout (groups of {SUPPORTED_GROUP_SIZES} or per channel)")
        # a group of 256, 512 ... is several groups of 128 with the same scale and zero
        rep = g // SUPPORTED_GROUP_SIZES[-1]
        scales = scales.repeat_interleave(rep, dim=1)
        zeros = None if zeros is None else zeros.repeat_interleave(rep, dim=1)
        g = SUPPORTED_GROUP_SIZES[-1]
    return PackedWeights(
        qweight=qweight.unsqueeze(0), scales=scales.unsqueeze(0),
        zeros=None if zeros is None else zeros.unsqueeze(0),
        perm=None if perm is None else perm.to(torch.int32).unsqueeze(0),
        group_size=g, name=name)


def concat_experts(pieces: Sequence[PackedWeights], name: str,
                   expert_ids: Sequence[int]) -> PackedWeights:
    """Concatenate one-expert (or few-expert) :class:`PackedWeights` along E. Zero points and
    permutations absent in some pieces are filled with 8 and the identity; an all-8 zero
    tensor is dropped (symmetric)."""
    g = pieces[0].group_size
    for p, e in zip(pieces, expert_ids, strict=True):
        if p.group_size != g:
            raise ValueError(f"{name} of expert {e} has group_size {p.group_size}; expected {g} "
                             f"like expert {expert_ids[0]} (one group size per projection)")
    dtype = pieces[0].scales.dtype
    qweight = torch.cat([p.qweight for p in pieces])
    scales = torch.cat([p.scales.to(dtype) for p in pieces])
    zeros = None
    if any(p.zeros is not None for p in pieces):
        zeros = torch.cat([p.zeros if p.zeros is not None
                           else torch.full(p.scales.shape, 8, dtype=torch.uint8,
                                           device=p.scales.device) for p in pieces])
        if bool((zeros == 8).all()):
            zeros = None
    perm = None
    if any(p.perm is not None for p in pieces):
        k = pieces[0].k
        perm = torch.cat([p.perm if p.perm is not None else
                          torch.arange(k, dtype=torch.int32, device=p.qweight.device)
                          .expand(p.num_experts, k) for p in pieces])
    return PackedWeights(qweight=qweight, scales=scales, zeros=zeros, perm=perm, group_size=g,
                         name=name)
