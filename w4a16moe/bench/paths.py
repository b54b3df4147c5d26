"""The benchmark's paths: named callables that compute one MoE layer.

Every path has the signature::

    fn(hidden_states [M, H], weights, topk_weights [M, top_k], topk_ids [M, top_k], *,
       activation="silu") -> [M, H]

``weights`` is a :class:`~w4a16moe.layout.PackedExperts` for ``"int4"`` paths and the
dequantized ``(w13 [E, 2I, H], w2 [E, H, I])`` for ``"bf16"`` paths. A path's target is a
callable or a ``"module:function"`` string imported on first use, so paths whose module does
not exist yet (or needs a GPU) are simply reported unavailable. Adding a path is one
:func:`register_path` line; ``--paths my=package.module:function`` also works from the CLI.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from . import baseline

WEIGHTS = ("int4", "bf16")


@dataclass(frozen=True)
class PathSpec:
    """One benchmarked way to compute the layer.

    Attributes:
        name: short name used on the command line and in records.
        target: the callable, or ``"package.module:function"`` imported lazily.
        weights: ``"int4"`` (PackedExperts) or ``"bf16"`` (dequantized float weights).
        graph_safe: can be captured in a CUDA graph (no host sync); otherwise timed eagerly.
        needs_triton: runs Triton kernels (needs a GPU, or TRITON_INTERPRET=1 on CPU).
        on_cpu: worth timing on a CPU (False: a GPU-only strategy, skipped there).
        variants: for a "best of" path: names of the paths tried at each M, the fastest kept.
        fits: optional ``fits(shape, M) -> reason or None``: skip sizes a path cannot do.
        default: run when no ``--paths`` are given.
        description: one line for ``--help``.
    """

    name: str
    target: str | Callable | None = None
    weights: str = "int4"
    graph_safe: bool = True
    needs_triton: bool = False
    on_cpu: bool = True
    variants: tuple[str, ...] = ()
    fits: Callable | None = field(default=None, compare=False)
    default: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"path {self.name}: weights is {self.weights!r}; expected one of "
                             f"{WEIGHTS}")
        if (self.target is None) == (not self.variants):
            raise ValueError(f"path {self.name}: give exactly one of target or variants")

    def resolve(self) -> Callable:
        """The callable (imports ``module:function`` targets). ImportError/AttributeError
        propagate with the target named."""
        if callable(self.target):
            return self.target
        if not isinstance(self.target, str) or ":" not in self.target:
            raise ValueError(f"path {self.name}: target {self.target!r}; expected a callable or "
                             "'package.module:function'")
        module, _, attr = self.target.partition(":")
        mod = importlib.import_module(module)
        try:
            return getattr(mod, attr)
        except AttributeError:
            raise ImportError(f"{module} has no {attr!r} (path {self.name})") from None

    def unavailable(self, device_type: str) -> str | None:
        """Why this path cannot run here, or None."""
        if self.needs_triton and device_type != "cuda" \
                and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels need a GPU (or TRITON_INTERPRET=1, slow)"
        if not self.on_cpu and device_type != "cuda":
            return "a GPU strategy, not timed on a CPU"
        if self.variants:
            reasons = [PATHS[v].unavailable(device_type) for v in self.variants]
            if all(reasons):
                return "; ".join(f"{v}: {r}" for v, r in zip(self.variants, reasons, strict=True))
            return None
        try:
            self.resolve()
        except (ImportError, ValueError) as exc:
            return f"cannot import {self.target}: {exc}"
        return None


PATHS: dict[str, PathSpec] = {}


def register_path(spec: PathSpec, replace: bool = False) -> PathSpec:
    """Add a path to the registry (``replace`` to overwrite one of the same name)."""
    if spec.name in PATHS and not replace:
        raise ValueError(f"path {spec.name!r} is already registered")
    PATHS[spec.name] = spec
    return spec


def get_path(name: str) -> PathSpec:
    """A registered path, or ``name=package.module:function`` (or just the target string)
    for an ad-hoc int4 path."""
    if name in PATHS:
        return PATHS[name]
    if ":" in name:
        label, _, target = name.rpartition("=")
        return PathSpec(label or target.rpartition(":")[2], target, weights="int4",
                        needs_triton=True)
    raise ValueError(f"unknown path {name!r}; expected one of {sorted(PATHS)} or "
                     "NAME=package.module:function")


def clear_path_caches() -> None:
    """Drop state that paths keep between calls (modules holding weights, workspaces)."""
    import sys

    adapters = sys.modules.get("w4a16moe.bench.adapters")
    if adapters is not None:
        adapters.clear_caches()


def default_paths(device_type: str) -> list[str]:
    """Default paths that can run on this device type."""
    return [p.name for p in PATHS.values() if p.default and not p.unavailable(device_type)]


# -- the built-in paths -----------------------------------------------------------------------
register_path(PathSpec("decode", "w4a16moe.kernels.decode:fused_moe_decode", needs_triton=True,
                       default=True, description="int4 split-K GEMV kernel (few tokens)"))
register_path(PathSpec("prefill", "w4a16moe.bench.adapters:prefill_moe",
                       needs_triton=True, default=True,
                       description="int4 grouped GEMM kernel (many tokens)"))
register_path(PathSpec("mixed", "w4a16moe.bench.adapters:mixed_moe", needs_triton=True,
                       description="GEMM1 on the grouped GEMM's tensor-core tiles, GEMM2 on "
                                   "the split-K GEMV kernel (few tokens, long K)"))
register_path(PathSpec("hybrid", "w4a16moe.bench.adapters:hybrid_moe", needs_triton=True,
                       default=True,
                       description="decode, mixed or prefill chosen by token count"))
register_path(PathSpec("reference", "w4a16moe.reference:moe_reference", graph_safe=False,
                       description="plain-torch oracle (dequantizes every call; slow)"))
register_path(PathSpec("bf16-grouped", baseline.bf16_grouped_mm, weights="bf16",
                       description="torch._grouped_mm on expert-sorted tokens"))
register_path(PathSpec("bf16-bmm", baseline.bf16_bmm, weights="bf16", fits=baseline.bmm_fits,
                       on_cpu=False,
                       description="torch.bmm on gathered per-slot weights (tiny M)"))
register_path(PathSpec("bf16-loop", baseline.bf16_expert_loop, weights="bf16",
                       graph_safe=False, description="per-expert torch.mm loop (eager)"))
register_path(PathSpec("bf16", weights="bf16", variants=("bf16-grouped", "bf16-bmm", "bf16-loop"),
                       default=True,
                       description="fastest of the bf16 baselines at each M (dequantized weights)"))
