"""Timing on the GPU (CUDA graphs, cold L2) and on the CPU, and the device's measured rates.

On a GPU a benchmark captures one CUDA graph that runs the measured callable once per layer
copy (``calls[0..R-1]``, each reading its own weights so the L2 cache does not hold them),
replays it many times and reports the median time of one call. On the CPU the calls run in a
plain loop timed with ``time.perf_counter``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

DEFAULT_L2_BYTES = 50 * 2**20
#: weights streamed per replay must exceed this many times the L2 size
L2_FACTOR = 4


@dataclass(frozen=True)
class Timing:
    """Result of :func:`time_calls`: microseconds per call."""

    median_us: float
    p10_us: float
    p90_us: float
    reps: int
    calls_per_rep: int
    method: str  # "cuda_graph", "cuda_eager" or "cpu"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class DeviceRates:
    """Streaming-read bandwidth and matmul rate measured on one device."""

    device: str
    read_gbps: float
    matmul_tflops: float
    read_method: str
    matmul_method: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def as_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def l2_cache_bytes(device: torch.device) -> int:
    """The device's L2 size (50 MB when torch does not report it); 0 on the CPU."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def copies_for(active_bytes: float, copy_bytes: float, device: torch.device,
               max_copies: int = 64, memory_fraction: float = 0.3) -> int:
    """Layer copies to rotate so that one replay streams more than ``L2_FACTOR`` times the L2:
    ``ceil(4 * L2 / active_bytes)``, at least 1, capped by ``max_copies`` and by
    ``memory_fraction`` of the free device memory (``copy_bytes`` each). 1 on the CPU."""
    if device.type != "cuda":
        return 1
    want = math.ceil(L2_FACTOR * l2_cache_bytes(device) / max(active_bytes, 1.0))
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(memory_fraction * free // max(copy_bytes, 1.0))
    return max(1, min(want, max_copies, fit))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``: the nearest sample, no interpolation."""
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def event_samples(replay: Callable[[], object], reps: int, calls_per_rep: int) -> list[float]:
    """Microseconds per call of ``reps`` back-to-back runs of ``replay`` (each running
    ``calls_per_rep`` calls), each bracketed by CUDA events; one synchronisation at the end."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for a, b in events:
        a.record()
        replay()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) * 1e3 / calls_per_rep for a, b in events]


def warm_up_on_side_stream(fn: Callable[[], object], times: int = 1) -> None:
    """Run ``fn`` ``times`` times on a side stream, as graph capture wants (kernels compile
    and buffers are allocated outside the capture), then make the current stream wait."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(stream)


def capture_graph(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """:func:`warm_up_on_side_stream` once, then capture one call of ``fn`` in a new CUDA
    graph on the current device. Returns the graph and what the captured call returned
    (tensors that the replays write into). Capture errors propagate (RuntimeError)."""
    warm_up_on_side_stream(fn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def time_calls(calls: Sequence[Callable[[], object]], device: str | torch.device | None = None,
               *, use_graph: bool = True, target_ms: float = 200.0, min_reps: int = 5,
               max_reps: int = 500, warmup: int = 2, min_calls: int = 1,
               min_replay_us: float = 0.0, max_repeat: int = 64) -> Timing:
    """Median time of one call of ``calls`` (each typically runs the same layer on its own
    weight copy, so consecutive calls do not find each other's weights in L2).

    GPU: the calls run eagerly ``warmup`` times (compiling kernels), then are captured in one
    CUDA graph (``use_graph``; falls back to eager launches timed with CUDA events if capture
    fails), replayed until about ``target_ms`` of samples are taken; each sample is one replay
    divided by the calls it ran. CPU: a plain loop timed with ``time.perf_counter``.

    Two replays are separated by a gap (the graph launch on the device, two event records;
    about 3 us on an H100, benchmarks/RESULTS.md) that a layer inside a model's graph does
    not pay. So the graph holds ``calls`` repeated until it has at least ``min_calls`` calls
    and, when one replay of them takes less than ``min_replay_us``, repeated again (at most
    ``max_repeat`` times in all) until a replay takes about that long. Repeating the cycle
    keeps the L2 cold when ``calls`` alone streams more than the L2 between two uses of a
    copy.
    """
    if not calls:
        raise ValueError("calls is empty; expected at least one callable")
    if min_calls < 1 or max_repeat < 1:
        raise ValueError(f"min_calls is {min_calls} and max_repeat {max_repeat}; expected at "
                         "least 1")
    device = as_device(device)
    base = list(calls)
    calls = base * (math.ceil(min_calls / len(base)) if device.type == "cuda" else 1)

    def run_all() -> None:
        for c in calls:
            c()

    if device.type != "cuda":
        run_all()  # one warm-up: no kernels to compile on a CPU
        n = len(calls)
        min_reps = min(min_reps, 3)
        t0 = time.perf_counter()
        run_all()
        first = time.perf_counter() - t0
        reps = int(min(max_reps, max(min_reps, target_ms / 1e3 / max(first, 1e-9))))
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run_all()
            samples.append((time.perf_counter() - t0) * 1e6 / n)
        return Timing(statistics.median(samples), percentile(samples, 0.1),
                      percentile(samples, 0.9), reps, n, "cpu")

    def capture() -> tuple[object, str]:
        if use_graph:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    run_all()
                return graph, "cuda_graph"
            except RuntimeError:
                torch.cuda.synchronize()
        return None, "cuda_eager"

    with torch.cuda.device(device):
        warm_up_on_side_stream(run_all, max(1, warmup))
        torch.cuda.synchronize()
        graph, method = capture()
        replay = graph.replay if graph is not None else run_all
        replay()
        torch.cuda.synchronize()
        first_ms = event_samples(replay, 1, 1)[0] / 1e3
        repeat = min(math.ceil(min_replay_us / max(first_ms * 1e3, 1e-3)),
                     len(base) * max_repeat // len(calls))
        if graph is not None and repeat > 1:
            del graph, replay
            calls = calls * repeat
            graph, method = capture()
            replay = graph.replay if graph is not None else run_all
            replay()
            torch.cuda.synchronize()
            first_ms = event_samples(replay, 1, 1)[0] / 1e3
        n = len(calls)
        reps = int(min(max_reps, max(min_reps, target_ms / max(first_ms, 1e-6))))
        samples = event_samples(replay, reps, n)
        del graph
    return Timing(statistics.median(samples), percentile(samples, 0.1),
                  percentile(samples, 0.9), reps, n, method)


# -- device rates -----------------------------------------------------------------------------
def measure_read_bandwidth(device: str | torch.device | None = None,
                           nbytes: int | None = None) -> tuple[float, str]:
    """Streaming-read bandwidth in GB/s (1e9 B/s): a read-only reduction over ``nbytes``
    (GPU: 2 GiB of bf16, well past the L2; CPU: 256 MiB of fp32), median under a CUDA graph.
    Two reductions are tried (full sum, row sums of [rows, 8192]); the faster one counts."""
    device = as_device(device)
    if device.type != "cuda":
        nbytes = nbytes or 256 * 2**20
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        t = time_calls([lambda: x.sum()], device, target_ms=100, min_reps=3)
        return nbytes / (t.median_us * 1e3), "cpu torch.sum fp32"
    nbytes = nbytes or 2 * 2**30
    cols = 8192
    x = torch.ones(nbytes // 2 // cols, cols, dtype=torch.bfloat16, device=device)
    real = x.numel() * 2
    best = (0.0, "")
    for label, fn in (("torch.sum", lambda: x.sum()),
                      ("row sums", lambda: x.sum(dim=1, dtype=torch.float32))):
        t = time_calls([fn], device, target_ms=150, min_reps=10)
        gbps = real / (t.median_us * 1e3)
        if gbps > best[0]:
            best = (gbps, f"{label} over {real / 2**30:.0f} GiB bf16, CUDA graph median")
    return best


def measure_matmul_rate(device: str | torch.device | None = None, n: int | None = None,
                        dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """Dense matmul rate in TFLOP/s: ``n^3`` (GPU: 8192, bf16, CUDA graph median; CPU: 1024
    in ``dtype``). On a GPU both random and constant operands are timed and the faster counts
    (random data draws more power and can lower the clock; the floor wants the peak)."""
    device = as_device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    out = torch.empty(n, n, device=device, dtype=dtype)
    inputs = [("random", torch.randn(n, n, device=device).to(dtype),
               torch.randn(n, n, device=device).to(dtype))]
    if device.type == "cuda":
        ones = torch.full((n, n), 1.0 / n, device=device, dtype=dtype)
        inputs.append(("constant", ones, ones))
    results = []
    for label, a, b in inputs:
        t = time_calls([lambda a=a, b=b: torch.mm(a, b, out=out)], device,
                       target_ms=150 if device.type == "cuda" else 100, min_reps=3)
        results.append((2.0 * n**3 / (t.median_us * 1e6), label, t.method))
    best = max(results)
    detail = ", ".join(f"{label} {tf:.0f}" for tf, label, _ in results)
    return best[0], (f"{n}^3 {str(dtype).removeprefix('torch.')} torch.mm, {best[2]} median "
                     f"({detail})")


def rotation_probe(device: str | torch.device | None = None, nbytes: int = 16 * 2**20,
                   copies: int | None = None, target_ms: float = 100.0) -> dict[str, float]:
    """Check that rotating copies defeats the L2: time a read-only reduction over a buffer
    of ``nbytes`` (smaller than the L2) rotated over ``copies`` buffers (cold) and over one
    buffer every call (warm), same graph length. Cold should stream near the HBM bandwidth,
    warm well above it. Returns both times and bandwidths."""
    device = as_device(device)
    if device.type != "cuda":
        raise ValueError("rotation_probe needs a CUDA device")
    copies = copies or copies_for(nbytes, nbytes, device)
    bufs = [torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device) for _ in range(copies)]
    cold = time_calls([lambda b=b: b.sum() for b in bufs], device, target_ms=target_ms)
    warm = time_calls([lambda: bufs[0].sum()] * copies, device, target_ms=target_ms)
    return {"nbytes": nbytes, "copies": copies, "cold_us": cold.median_us,
            "warm_us": warm.median_us, "cold_gbps": nbytes / (cold.median_us * 1e3),
            "warm_gbps": nbytes / (warm.median_us * 1e3),
            "ratio": cold.median_us / warm.median_us}


_RATES: dict[str, DeviceRates] = {}


def measure_device(device: str | torch.device | None = None, refresh: bool = False,
                   dtype: torch.dtype = torch.bfloat16) -> DeviceRates:
    """Read bandwidth and matmul rate of ``device``, measured once per process (cached by
    device and dtype)."""
    device = as_device(device)
    key = f"{device}/{dtype}"
    if refresh or key not in _RATES:
        gbps, read_method = measure_read_bandwidth(device)
        tflops, mm_method = measure_matmul_rate(device, dtype=dtype)
        _RATES[key] = DeviceRates(device_name(device), gbps, tflops, read_method, mm_method)
        if device.type == "cuda":
            # remembered for `w4a16moe profile-bandwidth`'s "% of peak" column
            from ..profiling.bandwidth import save_peak_bandwidth

            try:
                save_peak_bandwidth(device_name(device), gbps)
            except OSError:
                pass  # a read-only home directory only loses the default peak
    return _RATES[key]
