"""Layer benchmark: time each path on one MoE layer shape at several token counts.

For every (path, M) :func:`bench_layer` produces one record::

    {"model", "M", "path", "impl", "kernel_us", "layer_us", "floor_us", "bf16_us",
     "read_gbps", "x_floor", "speedup_vs_bf16", "rel_err", "u", "bytes", "flops", "copies",
     "timing", "calls_per_graph", "dtype", "device", "gpu", "torch", "triton", "date", "rates",
     "shape", "error"}

* ``kernel_us``: the experts computation alone (routing precomputed), median per call.
* ``layer_us``: router logits -> ``fused_topk`` -> experts -> output; a path whose function
  has a ``from_logits`` attribute (``fn.from_logits(hidden_states, weights, router_logits, *,
  activation, top_k, renormalize, scoring, num_expert_group, topk_group, correction_bias,
  routed_scaling_factor)``) routes the logits itself (the hybrid and prefill paths: the
  routing and the alignment in one kernel where they can), and its output is checked too.
* ``floor_us``: ``max(int4 bytes / measured read bandwidth, flops / measured matmul rate)``
  with the exact distinct-expert count of the routings used.
* ``bf16_us``: ``kernel_us`` of the fastest bf16 baseline at the same M (same run).
* ``read_gbps``: bytes the path streams (int4 or bf16 weights) / ``kernel_us``.
* ``rel_err``: ``|out - ref| / |ref|`` of copy 0 against an fp32 oracle (M <= 64), else None
  (the larger of the two outputs' for a path with ``from_logits``).

Weights are rotated over several random copies (L2 defeated, see :mod:`.timing`); each copy
also has its own tokens and routing. One CUDA graph replay runs the copies' calls repeated
until it holds about 1 ms of work (``calls_per_graph`` calls), so the ~3 us gap between
two replays is not charged to one or two calls.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from ..layout import PACK_FACTOR, PackedExperts, PackedWeights
from ..routing import fused_topk
from .baseline import dense_reference
from .clocks import nvml_reader, sample_clocks
from .floors import distinct_experts, layer_bytes, layer_floor, layer_flops
from .models import MoEShape
from .paths import PathSpec, clear_path_caches, get_path
from .timing import DeviceRates, as_device, copies_for, device_name, measure_device, time_calls

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16}
RECORD_KEYS = ("model", "M", "path", "kernel_us", "layer_us", "floor_us", "bf16_us",
               "read_gbps", "gpu", "torch", "triton", "date")
CHECK_MAX_M = 64
REL_TOL = 3e-2
#: routings every path is timed on at each token count on a GPU (more when more weight
#: copies are rotated), so that a time does not hang on one routing's count of distinct
#: experts; the calls of a replay cycle through them, the weights through their copies
MIN_ROUTINGS = 4


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype is {dtype}; expected torch.bfloat16 or torch.float16")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype is {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# -- random layer copies ----------------------------------------------------------------------
def fast_random_experts(shape: MoEShape, dtype: torch.dtype, device: torch.device,
                        seed: int) -> PackedExperts:
    """Random packed experts of ``shape`` made directly on ``device``: random bytes are valid
    packed int4 words, so nothing is packed on the host (a Mixtral layer takes milliseconds
    on a GPU). Scales ~ 1/sqrt(K) / 4 as in :func:`~w4a16moe.quantize.random_experts`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    e = shape.num_experts

    def one(n: int, k: int, name: str) -> PackedWeights:
        g = shape.group_for(k)
        q = torch.randint(0, 256, (e, n, k // PACK_FACTOR * 4), dtype=torch.uint8,
                          device=device, generator=gen).view(torch.int32)
        s = torch.rand((e, n, k // g), device=device, generator=gen) * 0.5 + 0.75
        return PackedWeights(qweight=q, scales=(s / (4 * k**0.5)).to(dtype), group_size=g,
                             name=name)

    h, i = shape.hidden_size, shape.intermediate_size
    return PackedExperts(w13=one(2 * i, h, "w13"), w2=one(h, i, "w2"), num_experts=e,
                         hidden_size=h, intermediate_size=i, dtype=dtype)


def dequantize_experts(experts: PackedExperts, dtype: torch.dtype,
                       chunk_values: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact dequantized ``(w13 [E, 2I, H], w2 [E, H, I])`` in ``dtype``, a few experts at a
    time to bound the temporary memory."""
    out = []
    for p in (experts.w13, experts.w2):
        w = torch.empty(p.num_experts, p.n, p.k, dtype=dtype, device=p.device)
        step = max(1, chunk_values // (p.n * p.k))
        for e0 in range(0, p.num_experts, step):
            idx = slice(e0, min(p.num_experts, e0 + step))
            w[idx] = p.select_experts(idx).dequantize(torch.float32).to(dtype)
        out.append(w)
    return out[0], out[1]


def filled_float_experts(shape: MoEShape, dtype: torch.dtype, device: torch.device,
                         seed: int, pool: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weights of ``shape`` filled by copying a few random per-expert matrices (fast on
    a CPU, where generating a full random layer takes seconds). For timing only."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    e, h, i = shape.num_experts, shape.hidden_size, shape.intermediate_size
    out = []
    for n, k in ((2 * i, h), (h, i)):
        base = [(torch.rand(n, k, device=device, generator=gen) - 0.5) / (2 * k**0.5)
                for _ in range(min(pool, e))]
        base = [b.to(dtype) for b in base]
        w = torch.empty(e, n, k, dtype=dtype, device=device)
        for j in range(e):
            w[j].copy_(base[j % len(base)])
        out.append(w)
    return out[0], out[1]


class LayerCopies:
    """Random copies of one layer's weights on a device, made on first use.

    ``int4(i)`` is a :class:`PackedExperts`; ``bf16(i)`` its exact dequantization in the
    benchmark dtype (on a CPU with a large layer: random float weights instead, since exact
    dequantization there is slow; ``exact`` says which).
    """

    def __init__(self, shape: MoEShape, dtype: torch.dtype, device: torch.device,
                 seed: int = 0, exact: bool | None = None) -> None:
        self.shape, self.dtype, self.device, self.seed = shape, dtype, device, seed
        numel = 3 * shape.num_experts * shape.hidden_size * shape.intermediate_size
        self.exact = (device.type == "cuda" or numel <= 1 << 24) if exact is None else exact
        self._int4: dict[int, PackedExperts] = {}
        self._float: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def int4(self, i: int) -> PackedExperts:
        if i not in self._int4:
            self._int4[i] = fast_random_experts(self.shape, self.dtype, self.device,
                                                self.seed * 1000 + i)
        return self._int4[i]

    def bf16(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self._float:
            if self.exact:
                self._float[i] = dequantize_experts(self.int4(i), self.dtype)
            else:
                self._float[i] = filled_float_experts(self.shape, self.dtype, self.device,
                                                      self.seed * 1000 + i)
        return self._float[i]

    def weights(self, kind: str, i: int):
        return self.int4(i) if kind == "int4" else self.bf16(i)

    def copy_bytes(self, kind: str) -> int:
        s = self.shape
        if kind == "int4":
            return int(layer_bytes(s, 0, u=s.num_experts, dtype_bytes=self.dtype.itemsize))
        return 3 * s.num_experts * s.hidden_size * s.intermediate_size * self.dtype.itemsize

    def release(self, kind: str) -> None:
        (self._int4 if kind == "int4" else self._float).clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class Inputs:
    """Tokens, router logits and routing of one copy for ``m`` tokens."""

    def __init__(self, shape: MoEShape, m: int, dtype: torch.dtype, device: torch.device,
                 seed: int) -> None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        self.shape = shape
        self.x = torch.randn(m, shape.hidden_size, device=device, generator=gen).to(dtype)
        self.logits = torch.randn(m, shape.num_experts, device=device, generator=gen)
        self.bias = (torch.randn(shape.num_experts, device=device, generator=gen) * 0.1
                     if shape.correction_bias else None)
        self.topk_weights, self.topk_ids = self.route()

    def routing(self) -> dict:
        """The keyword arguments of :func:`~w4a16moe.routing.fused_topk` (``top_k`` first)
        that route this copy's logits."""
        s = self.shape
        return dict(top_k=s.top_k, renormalize=s.renormalize, scoring=s.scoring,
                    num_expert_group=s.num_expert_group, topk_group=s.topk_group,
                    correction_bias=self.bias, routed_scaling_factor=s.routed_scaling_factor)

    def route(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_topk(self.logits, **self.routing())


# -- the benchmark ----------------------------------------------------------------------------
def _versions() -> tuple[str, str | None]:
    try:
        import triton

        return torch.__version__, triton.__version__
    except ImportError:
        return torch.__version__, None


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def _oracle(copies: LayerCopies, inp: Inputs, activation: str,
            kind: str = "int4") -> torch.Tensor:
    """fp32 output of copy 0 for the paths on ``kind`` weights: from the int4 weights of the
    experts touched, dequantized (``"int4"``, and ``"bf16"`` when the float copies are that
    dequantization), else from the float copy (random fill-ins on a CPU, see
    :class:`LayerCopies`)."""
    if kind == "int4" or copies.exact:
        experts = copies.int4(0)
        used = torch.unique(inp.topk_ids.to(torch.int64))
        sub = experts.select_experts(used)
        local = torch.searchsorted(used, inp.topk_ids.to(torch.int64))
        w13, w2 = sub.dequantize(torch.float32)
        return dense_reference(inp.x, w13, w2, inp.topk_weights, local, activation)
    w13, w2 = copies.bf16(0)
    return dense_reference(inp.x, w13, w2, inp.topk_weights, inp.topk_ids, activation)


def _time_path(spec: PathSpec, fn: Callable, copies: LayerCopies, inputs: Sequence[Inputs],
               activation: str, layer: bool, device: torch.device, target_ms: float,
               warm: bool = False, min_calls: int = 1,
               min_replay_us: float = 0.0, n_weights: int | None = None) -> object:
    """Time ``fn`` over ``inputs``, call ``i`` on weight copy ``i % n_weights`` (default: one
    copy per input)."""
    n_weights = n_weights or len(inputs)
    calls = []
    for i, inp in enumerate(inputs):
        if warm:  # every call on copy 0 with the same routing: its weights stay in L2
            i, inp = 0, inputs[0]
        w = copies.weights(spec.weights, i % n_weights)
        from_logits = getattr(fn, "from_logits", None)
        if layer and from_logits is not None:  # the path routes the logits itself
            def call(inp=inp, w=w, route=from_logits):
                return route(inp.x, w, inp.logits, activation=activation, **inp.routing())
        elif layer:
            def call(inp=inp, w=w):
                tw, ti = inp.route()
                return fn(inp.x, w, tw, ti, activation=activation)
        else:
            def call(inp=inp, w=w):
                return fn(inp.x, w, inp.topk_weights, inp.topk_ids, activation=activation)
        calls.append(call)
    return time_calls(calls, device, use_graph=spec.graph_safe, target_ms=target_ms,
                      min_calls=min_calls, min_replay_us=min_replay_us)


def bench_layer(
    shape: MoEShape,
    ms: Sequence[int],
    paths: Sequence[str],
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device | None = None,
    *,
    rates: DeviceRates | None = None,
    max_copies: int = 64,
    target_ms: float | None = None,
    check: bool = True,
    layer_time: bool = True,
    max_m: dict[str, int] | None = None,
    seed: int = 0,
    min_calls: int = 1,
    min_replay_us: float = 1000.0,
    on_step: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Benchmark ``paths`` on the layer ``shape`` for each token count in ``ms``.

    Args:
        shape: the layer (see :mod:`.models`).
        ms: token counts.
        paths: path names (see :mod:`.paths`); unavailable ones are skipped with a log line.
        dtype: activation and scale dtype (``bf16`` or ``fp16``).
        device: default: CUDA if present, else CPU.
        rates: measured device rates for the floor (default: measured now, once per process).
        max_copies: cap on rotated weight copies per weight format.
        target_ms: sampling time per measurement (default 200 ms on a GPU, 50 ms on a CPU).
        check: compare copy 0's output with an fp32 oracle for M <= 64 (``rel_err``).
        layer_time: also time routing + experts (``layer_us``); else it is None.
        max_m: per-path cap on M (e.g. ``{"decode": 256}``); larger M are skipped.
        min_calls, min_replay_us: a CUDA graph replay holds at least ``min_calls`` calls and
            about ``min_replay_us`` of work (the copies' calls repeated), so that the gap
            between two replays (~3 us on an H100) is shared by enough calls; see
            :func:`.timing.time_calls`. ``calls_per_graph`` in a record says how many ran.
        on_step: called with a label after each (path, M) measurement (progress bars).
        log: called with notes (skipped paths, copies used).

    Returns:
        One record per (path, M) measured, in the order of ``paths`` then ``ms``; a path
        that raised at some M gets a record with ``error`` set and no times. Every path at
        one M runs on the same ``routings`` (at least :data:`MIN_ROUTINGS` on a GPU, one a
        weight copy if more), which ``u`` and the floor average over. On a GPU with
        NVML, ``clocks`` and ``layer_clocks`` summarize the SM clock during the experts and
        the layer timing (:func:`.clocks.summarize`: how often the card held it down, and
        why); else they are None.
    """
    dtype = parse_dtype(dtype)
    device = as_device(device)
    log = log or (lambda msg: None)
    on_step = on_step or (lambda label: None)
    target_ms = target_ms or (200.0 if device.type == "cuda" else 50.0)
    rates = rates or measure_device(device, dtype=dtype)
    ms = sorted({int(m) for m in ms})
    if not ms or ms[0] < 1:
        raise ValueError(f"ms is {ms}; expected positive token counts")
    specs: list[PathSpec] = []
    for name in paths:
        spec = get_path(name)
        reason = spec.unavailable(device.type)
        if reason:
            log(f"skipping path {spec.name}: {reason}")
            continue
        specs.append(spec)
    torch_version, triton_version = _versions()
    base = {"model": shape.name, "gpu": device_name(device), "device": device.type,
            "torch": torch_version, "triton": triton_version,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": str(dtype).removeprefix("torch."), "rates": rates.as_dict(),
            "shape": asdict(shape)}

    copies = LayerCopies(shape, dtype, device, seed=seed)
    read_clocks = nvml_reader(device)  # None on a CPU or without pynvml
    kinds = {s.weights for s in specs}
    n_copies: dict[str, int] = {}
    for kind in sorted(kinds):
        fmt = "int4" if kind == "int4" else "bf16"
        active = layer_bytes(shape, ms[0], dtype.itemsize, u=min(ms[0] * shape.top_k,
                             shape.num_experts), weight_format=fmt)
        n_copies[kind] = copies_for(active, copies.copy_bytes(kind), device, max_copies)
        log(f"{kind} weights: {n_copies[kind]} copies of "
            f"{copies.copy_bytes(kind) / 2**20:.0f} MiB rotated")
    # every path at one token count runs on the same routings
    n_inputs = max(max(n_copies.values(), default=1),
                   MIN_ROUTINGS if device.type == "cuda" else 1)

    records: list[dict] = []
    by_m: dict[int, dict] = {}
    for m in ms:
        inputs = [Inputs(shape, m, dtype, device, seed * 7919 + 31 * m + i)
                  for i in range(n_inputs)]
        u = sum(distinct_experts(inp.topk_ids) for inp in inputs) / len(inputs)
        floor = layer_floor(shape, m, rates.read_gbps, rates.matmul_tflops, dtype.itemsize, u=u)
        refs: dict[str, torch.Tensor] = {}  # oracle per weight kind, made when first needed
        by_m[m] = {"floor": floor, "u": u}
        for spec in specs:
            rec = dict(base, M=m, path=spec.name, impl=spec.name, kernel_us=None,
                       layer_us=None, floor_us=floor.us, floor_bound=floor.bound, bf16_us=None,
                       read_gbps=None, x_floor=None, speedup_vs_bf16=None, rel_err=None,
                       u=u, flops=layer_flops(shape, m), copies=n_copies[spec.weights],
                       routings=n_inputs,
                       timing=None, error=None, clocks=None, layer_clocks=None)
            fmt = "int4" if spec.weights == "int4" else "bf16"
            rec["bytes"] = layer_bytes(shape, m, dtype.itemsize, u=u, weight_format=fmt)
            cap = (max_m or {}).get(spec.name)
            if cap is not None and m > cap:
                continue
            candidates = [get_path(v) for v in spec.variants] if spec.variants else [spec]
            best = None
            for cand in candidates:
                if cand.unavailable(device.type):
                    continue
                if cand.fits is not None and cand.fits(shape, m, dtype.itemsize):
                    continue
                try:
                    fn = cand.resolve()
                    if check and m <= CHECK_MAX_M:
                        kind = "int4" if cand.weights == "int4" or copies.exact else "bf16"
                        if kind not in refs:
                            refs[kind] = _oracle(copies, inputs[0], shape.activation, kind)
                        out = fn(inputs[0].x, copies.weights(cand.weights, 0),
                                 inputs[0].topk_weights, inputs[0].topk_ids,
                                 activation=shape.activation)
                        err = _rel_err(out, refs[kind])
                        from_logits = getattr(fn, "from_logits", None)
                        if from_logits is not None and layer_time:  # its layer's own routing
                            lout = from_logits(inputs[0].x, copies.weights(cand.weights, 0),
                                               inputs[0].logits, activation=shape.activation,
                                               **inputs[0].routing())
                            err = max(err, _rel_err(lout, refs[kind]))
                            del lout
                        del out
                    else:
                        err = None
                    with sample_clocks(read_clocks) as clocks:
                        t = _time_path(cand, fn, copies, inputs, shape.activation, False, device,
                                       target_ms, min_calls=min_calls,
                                       min_replay_us=min_replay_us,
                                       n_weights=n_copies[spec.weights])
                except Exception as exc:  # noqa: BLE001 - a failing path must not stop the run
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    log(f"{cand.name} at M={m}: {msg}")
                    if best is None:
                        rec["error"] = msg
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    continue
                if best is None or t.median_us < best[1].median_us:
                    best = (cand, t, fn, err, clocks["summary"])
            if best is not None:
                cand, t, fn, err, kernel_clocks = best
                rec.update(impl=cand.name, kernel_us=t.median_us, timing=t.method, rel_err=err,
                           error=None, read_gbps=rec["bytes"] / (t.median_us * 1e3),
                           x_floor=t.median_us / floor.us, calls_per_graph=t.calls_per_rep,
                           clocks=kernel_clocks)
                if spec.name == "hybrid":
                    from .adapters import hybrid_choice

                    rec["hybrid_kernel"] = rec["impl"] = hybrid_choice(
                        copies.weights("int4", 0), shape.top_k, m)
                if layer_time:
                    with sample_clocks(read_clocks) as clocks:
                        lt = _time_path(cand, fn, copies, inputs, shape.activation, True,
                                        device, target_ms, min_calls=min_calls,
                                        min_replay_us=min_replay_us,
                                        n_weights=n_copies[spec.weights])
                    rec["layer_us"] = lt.median_us
                    rec["layer_clocks"] = clocks["summary"]
                if err is not None and err > REL_TOL:
                    log(f"{spec.name} at M={m}: output differs from the oracle "
                        f"(rel err {err:.3g})")
            records.append(rec)
            on_step(f"{shape.name} M={m} {spec.name}")
        del inputs
    for rec in records:
        bf16 = next((r for r in records if r["M"] == rec["M"] and r["path"] == "bf16"
                     and r["kernel_us"] is not None), None)
        if bf16 is not None:
            rec["bf16_us"] = bf16["kernel_us"]
            if rec["kernel_us"]:
                rec["speedup_vs_bf16"] = bf16["kernel_us"] / rec["kernel_us"]
    clear_path_caches()
    copies.release("int4")
    copies.release("bf16")
    return records


def cold_vs_warm(shape: MoEShape, m: int, path: str, dtype: str | torch.dtype = "bf16",
                 device: str | torch.device | None = None, copies: int | None = None,
                 target_ms: float = 200.0) -> dict[str, float]:
    """Time ``path`` with weights rotated over copies (cold L2) and with every call on copy 0
    (warm L2), same graph length. On a GPU a layer whose active weights fit the L2 runs
    clearly faster warm; equal numbers would mean the rotation does not defeat the cache."""
    dtype = parse_dtype(dtype)
    device = as_device(device)
    spec = get_path(path)
    if spec.variants:
        spec = get_path(spec.variants[0])
    fn = spec.resolve()
    lc = LayerCopies(shape, dtype, device)
    fmt = "int4" if spec.weights == "int4" else "bf16"
    active = layer_bytes(shape, m, dtype.itemsize, u=min(m * shape.top_k, shape.num_experts),
                         weight_format=fmt)
    n = copies or copies_for(active, lc.copy_bytes(spec.weights), device)
    inputs = [Inputs(shape, m, dtype, device, 100 + i) for i in range(n)]
    cold = _time_path(spec, fn, lc, inputs, shape.activation, False, device, target_ms)
    warm = _time_path(spec, fn, lc, inputs, shape.activation, False, device, target_ms,
                      warm=True)
    clear_path_caches()
    lc.release("int4")
    lc.release("bf16")
    return {"model": shape.name, "M": m, "path": spec.name, "copies": n,
            "active_mib": active / 2**20, "cold_us": cold.median_us, "warm_us": warm.median_us,
            "cold_gbps": active / (cold.median_us * 1e3),
            "warm_gbps": active / (warm.median_us * 1e3), "timing": cold.method,
            "ratio": cold.median_us / warm.median_us if warm.median_us else math.nan}
