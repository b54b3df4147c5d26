"""Tensor and expert parallelism for int4 MoE layers over ``torch.distributed``.

Two ways to split one MoE layer's experts across the ``world_size`` ranks of a process group
(NCCL on GPUs, gloo on CPUs; any backend with ``all_reduce``):

**Tensor parallelism** (``mode="tp"``): every rank holds every expert, but only a slice of the
intermediate dimension I. Rank ``r`` owns the intermediate indices ``S_r`` (``I/ws`` of
them): the gate rows ``S_r`` and the up rows ``I + S_r`` of w13 (stacked gate then up, so the
local w13 is again ``[E, 2*I/ws, H/8]``) and the matching K columns of w2 (``[E, H, I/ws/8]``).
GEMM1's rows are computed whole on one rank (w13 is quantized per output row, so row slicing
is exact), the activation pairs gate ``j`` with up ``j`` on the same rank, and GEMM2 yields a
partial sum over ``S_r`` that the all-reduce adds up.

Without act-order, ``S_r`` is the contiguous range ``[r*I/ws, (r+1)*I/ws)``. With an act-order
w2 (``w2.perm``), packed column ``k`` of w2 multiplies intermediate ``perm[e, k]``, so a
contiguous range of w2's *packed* columns (which keeps its quantization groups whole) uses a
scattered set of intermediates. We keep w2's packed columns contiguous and instead choose
GEMM1's rows to match: ``S_r[e] = w2.perm[e, r*I/ws : (r+1)*I/ws]`` (per expert, in that
order). Local intermediate ``j`` is then exactly what local packed column ``j`` of w2 reads, so
the local w2 needs no permutation at all (``perm=None``), and the act-order cost disappears
from GEMM2. w13's own permutation (over H) is kept whole on every rank.

Constraints (checked, ``ValueError`` naming the numbers): ``I % world_size == 0``;
``I/ws`` a multiple of 8 (whole int32 words of w2); and ``I/ws`` a multiple of w2's group size
G (each rank gets whole groups) *or* a divisor of G (each rank's slice lies inside one group
and becomes a per-channel local group of size ``I/ws``; this covers per-channel w2, G = I).

**Expert parallelism** (``mode="ep"``): rank ``r`` holds the contiguous expert range
:func:`expert_range` (when E is not divisible by ws the first ``E % ws`` ranks get one more;
a rank may hold none when ws > E) and an ``expert_map`` ``[E]`` (global -> local id, -1
elsewhere). Routing is global: every rank sees every token and the same ``topk_ids``; experts
not on a rank contribute nothing there.

**Combine**: both modes finish with one ``all_reduce(SUM)`` of the ``[M, H]`` output in the
activation dtype (each rank's partial result is rounded to fp16/bf16 by the kernel, so the sum
carries up to ``ws - 1`` extra roundings). This assumes the activations are replicated on every
rank (as after a tensor-parallel attention block). All-to-all token dispatch/combine (which
moves only routed tokens) is not implemented.

>>> sharded = shard_experts(experts, rank, world_size, mode="ep")
>>> layer = ParallelHybridMoE(sharded, top_k=8)          # group: default WORLD
>>> out = layer(hidden_states, topk_weights, topk_ids)   # [M, H], identical on every rank
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .experts import HybridW4A16MoEExperts
from .layout import PACK_FACTOR, PackedExperts, PackedWeights
from .routing import fused_topk

MODES = ("tp", "ep")


# -- small helpers ----------------------------------------------------------------------------
def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} is {value!r}; expected an int >= {minimum}")
    return value


def _check_rank(rank: int, world_size: int) -> None:
    _check_int(world_size, "world_size", 1)
    _check_int(rank, "rank", 0)
    if rank >= world_size:
        raise ValueError(f"rank is {rank}; expected 0 <= rank < world_size={world_size}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode is {mode!r}; expected one of {MODES} (tensor or expert "
                         "parallelism)")


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """A contiguous copy with its own storage (a view would keep the whole unsharded tensor
    alive)."""
    return None if t is None else t.clone(memory_format=torch.contiguous_format)


# -- expert parallelism -----------------------------------------------------------------------
def expert_range(num_experts: int, rank: int, world_size: int) -> tuple[int, int]:
    """The experts ``[start, end)`` of ``rank`` under expert parallelism: contiguous ranges,
    the first ``num_experts % world_size`` ranks one expert more (empty when ws > E).

    >>> [expert_range(5, r, 3) for r in range(3)]
    [(0, 2), (2, 4), (4, 5)]
    """
    _check_int(num_experts, "num_experts", 0)
    _check_rank(rank, world_size)
    base, extra = divmod(num_experts, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def make_expert_map(num_experts: int, rank: int, world_size: int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """int32 ``[num_experts]``: global expert id -> local id on ``rank`` (``0..n-1`` for the
    experts of :func:`expert_range`), -1 for experts held by other ranks."""
    start, end = expert_range(num_experts, rank, world_size)
    out = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    out[start:end] = torch.arange(end - start, dtype=torch.int32, device=device)
    return out


def _select_experts(experts: PackedExperts, start: int, end: int) -> PackedExperts:
    def sel(w: PackedWeights) -> PackedWeights:
        return PackedWeights(qweight=_own(w.qweight[start:end]), scales=_own(w.scales[start:end]),
                             zeros=None if w.zeros is None else _own(w.zeros[start:end]),
                             perm=None if w.perm is None else _own(w.perm[start:end]),
                             group_size=w.group_size, name=w.name)

    return PackedExperts(w13=sel(experts.w13), w2=sel(experts.w2), num_experts=end - start,
                         hidden_size=experts.hidden_size,
                         intermediate_size=experts.intermediate_size, dtype=experts.dtype)


# -- tensor parallelism -----------------------------------------------------------------------
@dataclass(frozen=True)
class TPPlan:
    """How w2's K (= I) splits for tensor parallelism.

    Attributes:
        shard: ``I / world_size`` intermediates per rank.
        local_group_size: w2's group size on each rank (G, or ``shard`` when each rank's
            slice lies inside one group of G).
    """

    shard: int
    local_group_size: int


def tp_plan(intermediate_size: int, w2_group_size: int, world_size: int) -> TPPlan:
    """Check that I splits into ``world_size`` slices of whole int4 words and whole
    quantization groups of w2 (or slices inside one group); ``ValueError`` naming the numbers
    otherwise."""
    shard = _tp_shard(intermediate_size, world_size)
    g = _check_int(w2_group_size, "w2 group_size", 1)
    i, ws = intermediate_size, world_size
    if shard % g == 0:
        return TPPlan(shard, g)
    if g % shard == 0:
        return TPPlan(shard, shard)
    raise ValueError(f"I/world_size = {i}/{ws} = {shard} is neither a multiple nor a divisor of "
                     f"w2's group_size {g}; each rank's slice of w2's K (= I) must hold whole "
                     "quantization groups (or lie inside one group)")


def _tp_shard(intermediate_size: int, world_size: int) -> int:
    """``I / world_size``, checked to be whole int4 words (``ValueError`` otherwise)."""
    i = _check_int(intermediate_size, "intermediate_size", 1)
    ws = _check_int(world_size, "world_size", 1)
    if i % ws:
        raise ValueError(f"intermediate_size I={i} is not divisible by world_size={ws}; tensor "
                         "parallelism gives every rank I/world_size intermediates")
    shard = i // ws
    if shard % PACK_FACTOR:
        raise ValueError(f"I/world_size = {i}/{ws} = {shard} is not a multiple of {PACK_FACTOR}; "
                         f"each rank's slice of w2's K (= I) must hold whole int32 words of "
                         f"{PACK_FACTOR} int4 values")
    return shard


def intermediate_indices(experts: PackedExperts, rank: int, world_size: int) -> torch.Tensor:
    """int64 ``[E, I/ws]``: the global intermediate indices ``S_r`` rank ``rank`` computes
    under tensor parallelism, in its local order (local intermediate ``j`` of expert ``e`` is
    global intermediate ``out[e, j]``). A contiguous range, or a slice of ``w2.perm`` for
    act-order w2 (see the module docstring)."""
    _check_rank(rank, world_size)
    plan = tp_plan(experts.intermediate_size, experts.w2.group_size, world_size)
    c0, c1 = rank * plan.shard, (rank + 1) * plan.shard
    if experts.w2.perm is not None:
        return experts.w2.perm[:, c0:c1].to(torch.int64)
    idx = torch.arange(c0, c1, dtype=torch.int64, device=experts.device)
    return idx.unsqueeze(0).expand(experts.num_experts, -1)


def _gather_rows(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """``t[e, rows[e, j], :]`` for ``t`` ``[E, N, C]`` and ``rows`` ``[E, R]`` -> ``[E, R, C]``."""
    if t is None:
        return None
    idx = rows.to(t.device).unsqueeze(-1).expand(-1, -1, t.shape[-1])
    return t.gather(1, idx).contiguous()


def _shard_tp(experts: PackedExperts, rank: int, world_size: int) -> PackedExperts:
    plan = tp_plan(experts.intermediate_size, experts.w2.group_size, world_size)
    i, s = experts.intermediate_size, plan.shard
    c0, c1 = rank * s, (rank + 1) * s
    # w13: the gate rows S_r and the up rows I + S_r, stacked gate then up
    sel = intermediate_indices(experts, rank, world_size)
    rows = torch.cat([sel, sel + i], dim=1)
    w13 = experts.w13
    w13_local = PackedWeights(qweight=_gather_rows(w13.qweight, rows),
                              scales=_gather_rows(w13.scales, rows),
                              zeros=_gather_rows(w13.zeros, rows), perm=_own(w13.perm),
                              group_size=w13.group_size, name="w13")
    # w2: packed columns [c0, c1) of K; its groups are contiguous in packed order
    w2 = experts.w2
    g = w2.group_size
    if plan.local_group_size == g:
        g0, g1 = c0 // g, c1 // g
    else:  # the slice lies inside group c0 // g: one per-channel local group
        g0 = c0 // g
        g1 = g0 + 1
    w2_local = PackedWeights(
        qweight=_own(w2.qweight[:, :, c0 // PACK_FACTOR:c1 // PACK_FACTOR]),
        scales=_own(w2.scales[:, :, g0:g1]),
        zeros=None if w2.zeros is None else _own(w2.zeros[:, :, g0:g1]),
        perm=None,  # folded into w13's row choice
        group_size=plan.local_group_size, name="w2")
    return PackedExperts(w13=w13_local, w2=w2_local, num_experts=experts.num_experts,
                         hidden_size=experts.hidden_size, intermediate_size=s,
                         dtype=experts.dtype)


# -- the sharded experts ----------------------------------------------------------------------
@dataclass(eq=False)
class ShardedExperts:
    """One rank's part of an MoE layer.

    Attributes:
        experts: the local packed experts. ``tp``: all E experts, intermediate size
            ``I/world_size`` (w13 ``[E, 2*I/ws, H/8]``, w2 ``[E, H, I/ws/8]``). ``ep``: the
            experts of :func:`expert_range` (``[E_local, ...]``, full I).
        expert_map: ``ep``: int32 ``[E_global]`` global -> local id, -1 elsewhere; ``tp``: None.
        mode: ``"tp"`` or ``"ep"``.
        rank, world_size: this rank's position in the process group the layer reduces over.
    """

    experts: PackedExperts
    expert_map: torch.Tensor | None
    mode: str
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.experts, PackedExperts):
            raise ValueError(f"experts is a {type(self.experts).__name__}; expected "
                             "PackedExperts")
        _check_mode(self.mode)
        _check_rank(self.rank, self.world_size)
        if self.mode == "tp":
            if self.expert_map is not None:
                raise ValueError("expert_map is given with mode='tp'; expected None (every "
                                 "rank holds every expert under tensor parallelism)")
            return
        m = self.expert_map
        if not isinstance(m, torch.Tensor) or m.dim() != 1 or m.dtype != torch.int32:
            raise ValueError(f"expert_map is {getattr(m, 'shape', m)!r} of dtype "
                             f"{getattr(m, 'dtype', None)}; expected an int32 tensor "
                             "[num_global_experts] with mode='ep'")
        if m.device != self.experts.device:
            raise ValueError(f"expert_map is on {m.device}; expected {self.experts.device} "
                             "(the experts' device)")
        local = int((m >= 0).sum()) if m.device.type != "meta" else self.experts.num_experts
        if local != self.experts.num_experts:
            raise ValueError(f"expert_map maps {local} global experts to this rank; expected "
                             f"{self.experts.num_experts} (the local experts)")

    @property
    def num_global_experts(self) -> int:
        return self.experts.num_experts if self.expert_map is None else self.expert_map.shape[0]

    @property
    def num_local_experts(self) -> int:
        return self.experts.num_experts

    @property
    def global_intermediate_size(self) -> int:
        i = self.experts.intermediate_size
        return i * self.world_size if self.mode == "tp" else i

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> ShardedExperts:
        """Move to ``device`` and/or cast the scales to ``dtype``."""
        em = self.expert_map
        return ShardedExperts(self.experts.to(device, dtype),
                              None if em is None else em.to(device or em.device),
                              self.mode, self.rank, self.world_size)


def shard_experts(experts: PackedExperts, rank: int, world_size: int,
                  mode: str = "tp") -> ShardedExperts:
    """Rank ``rank``'s part of ``experts`` (all E experts, full I) for tensor (``"tp"``) or
    expert (``"ep"``) parallelism over ``world_size`` ranks; see the module docstring.

    The result owns its tensors (copies; the unsharded experts can be freed). With
    ``world_size=1`` it is a copy, except that ``tp`` with an act-order w2 reorders w13's rows
    to w2's order and drops w2's permutation (the same layer). ``ValueError`` when I does not
    split (``tp``: see :func:`tp_plan`) or ``rank``/``mode`` are out of range.
    """
    if not isinstance(experts, PackedExperts):
        raise ValueError(f"experts is a {type(experts).__name__}; expected PackedExperts")
    _check_mode(mode)
    _check_rank(rank, world_size)
    if mode == "tp":
        return ShardedExperts(_shard_tp(experts, rank, world_size), None, "tp", rank, world_size)
    start, end = expert_range(experts.num_experts, rank, world_size)
    return ShardedExperts(_select_experts(experts, start, end),
                          make_expert_map(experts.num_experts, rank, world_size,
                                          experts.device),
                          "ep", rank, world_size)


def _concat(pieces: Sequence[PackedExperts]) -> PackedExperts:
    """Concatenate packed experts along E (same shapes and group sizes). Zero points or
    permutations present in some pieces only are filled with 8 (symmetric) and the identity
    elsewhere."""
    if len(pieces) == 1:
        return pieces[0]

    def cat(name: str) -> PackedWeights:
        ws = [getattr(p, name) for p in pieces]
        for w in ws[1:]:
            if w.group_size != ws[0].group_size:
                raise ValueError(f"{name} has group_size {w.group_size} in a later chunk of "
                                 f"experts; expected {ws[0].group_size} (one group size per "
                                 "projection)")

        def filler(w: PackedWeights, part: str) -> torch.Tensor:
            if part == "zeros":
                return torch.full(w.scales.shape, 8, dtype=torch.uint8, device=w.device)
            ident = torch.arange(w.k, dtype=torch.int32, device=w.device)
            return ident.expand(w.num_experts, -1)

        def c(part: str):
            ts = [getattr(w, part) for w in ws]
            if all(t is None for t in ts):
                return None
            return torch.cat([filler(w, part) if t is None else t for w, t in zip(ws, ts,
                                                                                 strict=True)])

        return PackedWeights(qweight=c("qweight"), scales=c("scales"), zeros=c("zeros"),
                             perm=c("perm"), group_size=ws[0].group_size, name=name)

    w13 = cat("w13")
    return PackedExperts(w13=w13, w2=cat("w2"), num_experts=w13.num_experts,
                         hidden_size=pieces[0].hidden_size,
                         intermediate_size=pieces[0].intermediate_size, dtype=pieces[0].dtype)


def load_checkpoint_sharded(path, rank: int, world_size: int, mode: str = "tp", *,
                            device: str | torch.device = "cpu",
                            dtype: torch.dtype | str | None = None,
                            layers: Sequence[int] | None = None,
                            quantize_unquantized: bool = False,
                            experts_per_read: int = 16,
                            progress: Callable[[int], None] | None = None
                            ) -> dict[int, ShardedExperts]:
    """This rank's experts of a GPTQ / AWQ / compressed-tensors MoE checkpoint directory.

    ``ep``: reads only the experts of :func:`expert_range` (the formats' ``experts=``
    selection; other experts' tensors are never read). A rank with no experts (ws > E) reads
    expert 0 of each layer once for the shapes and keeps none of it.
    ``tp``: every expert is needed, but only its I slice: experts are read
    ``experts_per_read`` at a time onto ``device``, sliced, and the full chunk dropped. Peak
    memory on ``device``: this rank's shard plus one chunk of full experts (plus the converter's
    temporaries for it), not the whole layer.

    Args are those of :func:`~w4a16moe.formats.load_checkpoint` plus ``rank``,
    ``world_size``, ``mode`` and ``experts_per_read``; ``progress`` is called with each layer
    index once it is loaded. Returns ``{MoE layer index: ShardedExperts}``; layers whose experts
    are stored unquantized are left out with a warning unless ``quantize_unquantized``.
    """
    from .formats import Checkpoint

    _check_mode(mode)
    _check_rank(rank, world_size)
    _check_int(experts_per_read, "experts_per_read", 1)
    out: dict[int, ShardedExperts] = {}
    skipped: list[int] = []
    with Checkpoint(path) as ckpt:
        todo = list(ckpt.moe_layers) if layers is None else [int(x) for x in layers]
        num_e = ckpt.num_experts
        if mode == "tp":  # fail before reading anything when I cannot split at all
            _tp_shard(ckpt.intermediate_size, world_size)
        kw = dict(device=device, dtype=dtype, quantize_unquantized=quantize_unquantized)
        for layer in todo:
            if mode == "ep":
                start, end = expert_range(num_e, rank, world_size)
                ids = list(range(start, end)) or [0]
                pe = ckpt.load_layer(layer, experts=ids, **kw)
                if pe is not None:
                    if start == end:
                        pe = _select_experts(pe, 0, 0)
                    out[layer] = ShardedExperts(
                        pe, make_expert_map(num_e, rank, world_size, pe.device), "ep", rank,
                        world_size)
            else:
                pieces: list[PackedExperts] | None = []
                for c0 in range(0, num_e, experts_per_read):
                    ids = list(range(c0, min(num_e, c0 + experts_per_read)))
                    chunk = ckpt.load_layer(layer, experts=ids, **kw)
                    if chunk is None:  # stored unquantized
                        pieces = None
                        break
                    pieces.append(_shard_tp(chunk, rank, world_size))
                    del chunk  # free the full experts before reading the next chunk
                if pieces:
                    out[layer] = ShardedExperts(_concat(pieces), None, "tp", rank, world_size)
            if layer not in out:
                skipped.append(layer)
            elif progress is not None:
                progress(layer)
    if skipped:
        warnings.warn(f"{path}: MoE layers {skipped} not loaded (experts stored unquantized); "
                      "pass quantize_unquantized=True to quantize them", stacklevel=2)
    return out


def broadcast_experts(experts: PackedExperts, src: int = 0,
                      group: dist.ProcessGroup | None = None) -> PackedExperts:
    """Overwrite ``experts``' tensors in place with those of rank ``src`` (a collective: every
    rank passes experts of the same shapes, dtypes and optional tensors, e.g. built from the
    same seed) and return them. Values are not re-validated."""
    if not isinstance(experts, PackedExperts):
        raise ValueError(f"experts is a {type(experts).__name__}; expected PackedExperts")
    for w in (experts.w13, experts.w2):
        for t in (w.qweight, w.scales, w.zeros, w.perm):
            if t is not None:
                if not t.is_contiguous():
                    raise ValueError(f"{w.name} has a non-contiguous tensor of shape "
                                     f"{tuple(t.shape)}; expected contiguous tensors")
                dist.broadcast(t, src=src, group=group)
    return experts


# -- the parallel layer -----------------------------------------------------------------------
class ParallelHybridMoE(nn.Module):
    """An MoE experts layer split over a process group: the local
    :class:`~w4a16moe.experts.HybridW4A16MoEExperts` followed by an all-reduce (sum).

    Args:
        sharded: this rank's :class:`ShardedExperts` (from :func:`shard_experts` or
            :func:`load_checkpoint_sharded`); its ``rank``/``world_size`` must be this
            process's rank and size in ``group``.
        top_k, activation, apply_router_weight_on_input, decode_threshold: as for
            :class:`~w4a16moe.experts.HybridW4A16MoEExperts`.
        group: the process group to reduce over (default: the WORLD group). With
            ``world_size == 1`` there is no communication and ``torch.distributed`` need not be
            initialized.

    ``forward(hidden_states [M, H], topk_weights [M, top_k], topk_ids [M, top_k])`` -> ``[M, H]``
    in the activations' dtype, the full layer output, identical on every rank. Every rank must
    call it with the same tokens and the same global routing (it is a collective).
    """

    def __init__(self, sharded: ShardedExperts, top_k: int, *, activation: str = "silu",
                 apply_router_weight_on_input: bool = False,
                 decode_threshold: int | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(sharded, ShardedExperts):
            raise ValueError(f"sharded is a {type(sharded).__name__}; expected ShardedExperts "
                             "(see shard_experts)")
        if dist.is_available() and dist.is_initialized():
            ws, rank = dist.get_world_size(group), dist.get_rank(group)
            if (ws, rank) != (sharded.world_size, sharded.rank):
                raise ValueError(f"sharded is rank {sharded.rank} of world_size "
                                 f"{sharded.world_size}; expected rank {rank} of {ws} (this "
                                 "process in the process group)")
        elif sharded.world_size != 1 or group is not None:
            raise ValueError(f"sharded has world_size {sharded.world_size} but "
                             "torch.distributed is not initialized; call "
                             "torch.distributed.init_process_group first")
        self.mode = sharded.mode
        self.rank = sharded.rank
        self.world_size = sharded.world_size
        self.group = group
        self.top_k = top_k
        self.hidden_size = sharded.experts.hidden_size
        self.num_global_experts = sharded.num_global_experts
        if not 1 <= top_k <= sharded.num_global_experts:
            raise ValueError(f"top_k is {top_k}; expected 1 <= top_k <= "
                             f"{sharded.num_global_experts} experts")
        # a rank without experts (expert parallel, world_size > E) only adds zeros
        self.local = None
        if sharded.num_local_experts > 0:
            self.local = HybridW4A16MoEExperts(
                sharded.experts, top_k, activation=activation,
                apply_router_weight_on_input=apply_router_weight_on_input,
                expert_map=sharded.expert_map, decode_threshold=decode_threshold)

    @classmethod
    def from_experts(cls, experts: PackedExperts, top_k: int, mode: str = "tp", *,
                     group: dist.ProcessGroup | None = None, **kwargs) -> ParallelHybridMoE:
        """Shard the full ``experts`` for this process's rank in ``group`` and wrap them
        (``kwargs`` as for the constructor)."""
        if dist.is_available() and dist.is_initialized():
            rank, ws = dist.get_rank(group), dist.get_world_size(group)
        else:
            rank, ws = 0, 1
        return cls(shard_experts(experts, rank, ws, mode), top_k, group=group, **kwargs)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, rank={self.rank}, world_size={self.world_size}"

    def choose_path(self, num_tokens: int) -> str | None:
        """The local path (``"decode"``/``"mixed"``/``"prefill"``) for ``num_tokens``; None without
        local experts."""
        return None if self.local is None else self.local.choose_path(num_tokens)

    def reserve(self, max_tokens: int) -> None:
        """Allocate the local workspaces now (e.g. before CUDA graph capture)."""
        if self.local is not None:
            self.local.reserve(max_tokens)

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, *, path: str | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``[M, H]``, summed over the group; ``path`` forces the local kernel."""
        if self.local is not None:
            y = self.local(hidden_states, topk_weights, topk_ids, path=path, out=out)
        else:
            if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_size:
                raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}; "
                                 f"expected [M, {self.hidden_size}]")
            y = torch.zeros_like(hidden_states) if out is None else out.zero_()
        if self.world_size > 1 and y.numel():
            dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y

    def forward_logits(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *,
                       path: str | None = None, **routing) -> torch.Tensor:
        """Route with :func:`~w4a16moe.routing.fused_topk` on the global ``router_logits``
        ``[M, E_global]`` (same on every rank), then :meth:`forward`. ``routing``: the
        keyword arguments of ``fused_topk``."""
        topk_weights, topk_ids = fused_topk(router_logits, self.top_k, **routing)
        return self.forward(hidden_states, topk_weights, topk_ids, path=path)


def init_distributed() -> torch.device:
    """Start the default process group as ``torchrun`` set it up: NCCL bound to this rank's
    GPU (``LOCAL_RANK``) when CUDA exists, gloo on the CPU otherwise. Returns the device."""
    import os

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        # binding the group to this GPU lets barrier() and NCCL pick the right one
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


__all__ = [
    "init_distributed",
    "MODES",
    "ParallelHybridMoE",
    "ShardedExperts",
    "TPPlan",
    "broadcast_experts",
    "expert_range",
    "intermediate_indices",
    "load_checkpoint_sharded",
    "make_expert_map",
    "shard_experts",
    "tp_plan",
]
