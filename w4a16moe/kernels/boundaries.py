"""Where one bucket of a prefill config table should hand over to the next.

A config table keys its entries by token count M, and :func:`~.configs.lookup_config` takes
the bucket nearest M, so two neighbouring buckets hand over at their midpoint. The best tiles
do not change there: they change with the rows each expert holds (``M * top_k / E``). A
64-token block, for instance, wins while an expert holds up to about 64 rows and loses soon
after, when half the experts need a second, nearly empty block (on the H100, olmoe's M=512
tiles were 13 % faster than bucket 1024's at M=512 and 13 % slower at M=640;
benchmarks/RESULTS.md, session 23).

:func:`refine_boundaries` times the prefill layer with each neighbouring pair's entries at
token counts between them and, where the summed time is lower with the handover elsewhere,
adds one bucket that moves it there (:func:`boundary_bucket`). ``w4a16moe tune
--boundaries`` runs it on the running GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

#: token counts timed between two neighbouring buckets (evenly spaced)
DEFAULT_POINTS = 3
#: routings (seeds) each time is the mean of
DEFAULT_SEEDS = 2
#: move a handover only when that saves at least this fraction of the summed time
DEFAULT_MIN_GAIN = 0.01


def nearest_bucket(buckets: Iterable[int], m: int) -> int:
    """The bucket :func:`~.configs.lookup_config` reads for ``m`` tokens: the nearest, the
    smaller one on a tie."""
    return min(buckets, key=lambda b: (abs(b - m), b))


def points_between(low: int, high: int, count: int = DEFAULT_POINTS) -> tuple[int, ...]:
    """``count`` token counts evenly spaced strictly between buckets ``low`` < ``high``
    (fewer where the gap holds fewer integers)."""
    if not 0 < low < high:
        raise ValueError(f"buckets are {low} and {high}; expected 0 < low < high")
    if count < 1:
        raise ValueError(f"count is {count}; expected at least 1")
    pts = {low + round((high - low) * j / (count + 1)) for j in range(1, count + 1)}
    return tuple(sorted(p for p in pts if low < p < high))


def best_split(points: Sequence[int], low_us: Sequence[float], high_us: Sequence[float], *,
               low: int, high: int, min_gain: float = DEFAULT_MIN_GAIN) -> int | None:
    """The last token count that should run bucket ``low``'s entries, from the times of both
    buckets' entries at ``points`` (ascending, between ``low`` and ``high``): the handover
    with the least summed time over the points, taken only when it saves at least ``min_gain``
    of the time the midpoint handover gives. None: leave the midpoint.

    The handover falls halfway between the last point that runs ``low``'s entries and the
    first that runs ``high``'s (or ``low`` / ``high`` themselves at the ends)."""
    n = len(points)
    if not (len(low_us) == len(high_us) == n) or n == 0:
        raise ValueError(f"{n} points with {len(low_us)} and {len(high_us)} times; expected "
                         "one time per point for each bucket, and at least one point")
    if list(points) != sorted(points) or points[0] <= low or points[-1] >= high:
        raise ValueError(f"points {list(points)} are not ascending strictly between {low} "
                         f"and {high}")

    def cost(c: int) -> float:  # the first c points run low's entries
        return sum(low_us[:c]) + sum(high_us[c:])

    mid = sum(1 for p in points if nearest_bucket((low, high), p) == low)
    best = min(range(n + 1), key=lambda c: (cost(c), abs(c - mid)))
    if best == mid or cost(mid) - cost(best) < min_gain * cost(mid):
        return None
    edges = (low, *points, high)
    return (edges[best] + edges[best + 1]) // 2


def boundary_bucket(low: int, high: int, last_low: int) -> tuple[int, str] | None:
    """The bucket to add between ``low`` and ``high`` so that the nearest-bucket lookup reads
    ``low``'s entries up to ``last_low`` tokens and ``high``'s above, and whose entries it
    holds (``"low"`` or ``"high"``); None when the midpoint already hands over there.

    To hand over later than the midpoint: bucket ``2 * last_low - high`` with ``low``'s
    entries (it and ``high`` meet at ``last_low``, a tie, which goes to the smaller bucket).
    Earlier: bucket ``2 * last_low - low + 1`` with ``high``'s entries (it and ``low`` meet at
    ``last_low + 1/2``)."""
    if not low <= last_low < high:
        raise ValueError(f"last_low is {last_low}; expected {low} <= last_low < {high}")
    if nearest_bucket((low, high), last_low) == high:
        return 2 * last_low - high, "low"
    if nearest_bucket((low, high), last_low + 1) == low:
        return 2 * last_low - low + 1, "high"
    return None


@dataclass
class BoundaryChange:
    """One moved handover: bucket ``bucket`` (holding the entries of ``low`` or ``high``, as
    ``holds`` says) added so that ``low``'s entries serve up to ``last_low`` tokens; the
    layer times (us, mean over the routings) at ``points`` with each bucket's entries."""

    model: str
    low: int
    high: int
    points: tuple[int, ...]
    low_us: tuple[float, ...]
    high_us: tuple[float, ...]
    last_low: int
    bucket: int
    holds: str


#: ``measure(model, m, seed, (gemm1 config, gemm2 config)) -> us``: the prefill layer's time
Measure = Callable[[str, int, int, tuple[dict, dict]], float]


def refine_boundaries(table: dict, models: dict, *, measure: Measure,
                      points: int = DEFAULT_POINTS, seeds: int = DEFAULT_SEEDS,
                      min_gain: float = DEFAULT_MIN_GAIN,
                      on_step: Callable[[int, int, str], None] | None = None
                      ) -> tuple[dict, list[BoundaryChange]]:
    """Move the handovers between neighbouring buckets of ``table`` to where the layer is
    faster.

    Args:
        table: a config table (the JSON object: ``{"N,K": {"M": config}}``, ``_meta`` kept).
        models: ``{name: ModelShape}``; each model's GEMM1 (``2I,H``) and GEMM2 (``H,I``)
            entries must be in ``table``. Its buckets are those of either GEMM, and a bucket's
            entries are what the lookup gives each GEMM there.
        measure: times the prefill layer (see :data:`Measure`); :func:`gpu_measure` on a GPU.
        points, seeds: token counts timed between two buckets, routings per time.
        min_gain: see :func:`best_split`.
        on_step: ``on_step(done, total, description)`` after each timed pair of entries.

    Returns:
        A new table with the added buckets (the input is not changed), and the changes.
    """
    new = {k: (dict(v) if not k.startswith("_") else v) for k, v in table.items()}
    plan = []
    for name, shape in models.items():
        keys = (f"{2 * shape.intermediate_size},{shape.hidden_size}",
                f"{shape.hidden_size},{shape.intermediate_size}")
        missing = [k for k in keys if not table.get(k)]
        if missing:
            raise ValueError(f"model {name!r}: the table has no entries for {missing}; tune "
                             "its configs first")
        per_key = [{int(m): cfg for m, cfg in table[k].items()} for k in keys]
        buckets = sorted(set(per_key[0]) | set(per_key[1]))

        def entries(b, per_key=per_key):
            return tuple(pk[nearest_bucket(pk, b)] for pk in per_key)

        for low, high in pairwise(buckets):
            pts = points_between(low, high, points)
            if pts and entries(low) != entries(high):
                plan.append((name, keys, low, high, entries(low), entries(high), pts))
    total = sum(len(pts) * seeds for *_, pts in plan)
    done = 0
    changes: list[BoundaryChange] = []
    for name, keys, low, high, low_cfgs, high_cfgs, pts in plan:
        low_us, high_us = [], []
        for m in pts:
            t_low = t_high = 0.0
            for seed in range(seeds):
                t_low += measure(name, m, m + 1000 * seed, low_cfgs) / seeds
                t_high += measure(name, m, m + 1000 * seed, high_cfgs) / seeds
                done += 1
                if on_step is not None:
                    on_step(done, total, f"{name} M={m} (between buckets {low} and {high}), "
                                         f"mean of {seed + 1} of {seeds} routings: "
                                         f"{t_low * seeds / (seed + 1):.1f} us with bucket "
                                         f"{low}'s entries, {t_high * seeds / (seed + 1):.1f} "
                                         f"with {high}'s")
            low_us.append(t_low)
            high_us.append(t_high)
        last_low = best_split(pts, low_us, high_us, low=low, high=high, min_gain=min_gain)
        placed = None if last_low is None else boundary_bucket(low, high, last_low)
        if placed is None:
            continue
        bucket, holds = placed
        cfgs = low_cfgs if holds == "low" else high_cfgs
        for key, cfg in zip(keys, cfgs, strict=True):
            new[key][str(bucket)] = dict(cfg)
        changes.append(BoundaryChange(name, low, high, tuple(pts), tuple(low_us),
                                      tuple(high_us), last_low, bucket, holds))
    return new, changes


def gpu_measure(models: dict, dtype=None, rep_ms: float = 10.0, skew: float = 0.0) -> Measure:
    """A :data:`Measure` for the running GPU and the shapes ``models`` (``{name:
    ModelShape}``): the prefill layer (``fused_moe_prefill``) on random weights (one set per
    model, kept while that model's times are taken) and the softmax routing of ``seed``
    (with routing skew ``skew``: :func:`~w4a16moe.kernels.tune.random_routing`), the median
    of CUDA-graph replays."""
    import torch

    from .prefill import PrefillWorkspace, fused_moe_prefill
    from .tune import random_packed_experts, random_routing, time_cuda_graph

    if not torch.cuda.is_available():
        raise ValueError("timing the bucket handovers needs a CUDA GPU; none is available")
    dtype = dtype or torch.bfloat16
    device = torch.device("cuda")
    cache: dict = {}

    def measure(model: str, m: int, seed: int, configs: tuple[dict, dict]) -> float:
        shape = models[model]
        if cache.get("model") != model:
            cache.clear()
            torch.cuda.empty_cache()
            cache.update(model=model, experts=random_packed_experts(shape, dtype, device))
        experts = cache["experts"]
        if cache.get("m") != (m, seed):
            weights, ids = random_routing(m, shape, device, seed=seed, skew=skew)
            cache.update(m=(m, seed), weights=weights, ids=ids,
                         x=torch.randn(m, shape.hidden_size, device=device, dtype=dtype),
                         out=torch.empty(m, shape.hidden_size, device=device, dtype=dtype),
                         ws=PrefillWorkspace.allocate(m, experts, shape.top_k))

        def layer():
            return fused_moe_prefill(cache["x"], experts, cache["weights"], cache["ids"],
                                     out=cache["out"], workspace=cache["ws"], configs=configs)

        layer()
        return time_cuda_graph(layer, rep_ms)

    return measure
