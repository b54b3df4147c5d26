"""Per-shape GPU time and achieved bandwidth of annotated GEMM regions in profiler output.

``summarize_traces(paths)`` reads torch profiler Chrome traces (``.json``/``.json.gz``, one per
rank) and vLLM ``profiler_out_<rank>.txt`` tables, finds the regions named
``"<kernel> {M}x{N}x{K} E={E} top_k={top_k}"`` (or dense ``"<kernel> {M}x{N}x{K}"``) whose
kernel part matches one of the patterns, and returns one ``ShapeSummary`` per (kernel, shape):
calls, total/mean/median/p90 time, modelled bytes per call, GB/s, % of peak bandwidth and share
of all GPU time.

Timing sources, best first (``ShapeSummary.source``):

``kernels``
    GPU time of the kernels (and memcpy/memset) launched inside the region: CUDA runtime or
    driver calls (``cudaLaunchKernel``, ``cuLaunchKernelEx``...) on the region's thread within
    its CPU span, linked to GPU events by ``args["correlation"]`` (or ``ac2g`` flow events).
``gpu span``
    the duration of the region's ``gpu_user_annotation`` span, where no launch can be linked.
``table``
    a ``key_averages`` table: the ``CUDA total`` of the region's row (kernels launched inside
    it), or the ``Self CUDA`` of its GPU-annotation row; no median/p90.
``cpu``
    traces without any GPU event: the region's CPU duration. GB/s is then not a GPU number.

Bytes moved by one GEMM call (DESIGN.md section 7), ``u`` distinct experts touched::

    u * N * K * bits / 8  +  u * N * ceil(K / G) * (scale_bytes + zero_bytes)
      + input_rows * K * act_bytes  +  M * top_k * N * act_bytes,
    u = E * (1 - (1 - top_k / E) ** M)      (the expectation for uniform routing)

``input_rows`` is M, except for the second GEMM of a layer (its input has ``M * top_k`` rows),
recognised when a group of the same kernel, M, E and top_k has ``N == 2 * K_second`` and
``K == N_second``. vLLM's ``fused_moe_gptq_awq`` / ``exllama_moe`` regions report their second
GEMM with ``M * top_k`` rows and ``top_k=1``; such a group is paired with its first GEMM (same
kernel and E, ``M_second == M * top_k``, ``N_second == K``, ``N in (K_second, 2 * K_second)``)
and normalised to M tokens with the real top_k. Both are stated in the row's notes.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .annotate import DECODE_KERNEL_NAME, PREFILL_KERNEL_NAME
from .traces import (
    ChromeTrace,
    TraceError,
    read_chrome_trace,
    read_key_averages_tables,
    sniff_trace_kind,
)

__all__ = [
    "BANDWIDTH_CACHE_ENV",
    "DEFAULT_PATTERNS",
    "VLLM_FLATTENED_PATTERNS",
    "BytesModel",
    "RegionName",
    "ShapeSummary",
    "SummaryList",
    "TraceError",
    "bandwidth_cache_path",
    "expand_trace_paths",
    "load_peak_bandwidth",
    "parse_region_name",
    "render_table",
    "save_peak_bandwidth",
    "summarize_traces",
    "write_csv",
    "write_plot",
]

#: kernel-name regexes matched by default: ours, then vLLM's int4 MoE regions
DEFAULT_PATTERNS = (DECODE_KERNEL_NAME, PREFILL_KERNEL_NAME, "fused_moe_gptq_awq", "exllama_moe")
#: the vLLM region names whose second GEMM is reported as M*top_k rows with top_k=1
VLLM_FLATTENED_PATTERNS = ("fused_moe_gptq_awq", "exllama_moe")
#: environment variable overriding the measured-bandwidth file
BANDWIDTH_CACHE_ENV = "W4A16MOE_BANDWIDTH_FILE"

_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)(?:\s+E=(\d+)\s+top_k=(\d+))?")


# --------------------------------------------------------------------------- names


@dataclass(frozen=True)
class RegionName:
    """A parsed region name ``"<kernel> {m}x{n}x{k} E={num_experts} top_k={top_k}"``;
    ``num_experts`` and ``top_k`` are None for a dense ``"<kernel> {m}x{n}x{k}"``."""

    kernel: str
    m: int
    n: int
    k: int
    num_experts: int | None
    top_k: int | None


class _Matcher:
    """Decides which region names belong to the summary: the text before the first space
    must fully match one of the kernel-name regexes."""

    def __init__(self, patterns: Sequence[str]):
        self.patterns = list(patterns)
        if not self.patterns:
            raise ValueError("patterns is empty; expected at least one kernel-name regex")
        try:
            self._re = re.compile("|".join(f"(?:{p})" for p in self.patterns))
        except re.error as exc:
            raise ValueError(f"invalid --pattern regex {self.patterns!r}: {exc}") from None
        self._cache: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        head, sep, _ = name.partition(" ")
        if not sep:
            return False
        hit = self._cache.get(head)
        if hit is None:
            hit = self._cache[head] = self._re.fullmatch(head) is not None
        return hit


def parse_region_name(name: str) -> RegionName:
    """Parse ``"<kernel> {M}x{N}x{K}[ E={E} top_k={top_k}]"``; ValueError naming the region
    when the part after the kernel name is not such a shape."""
    kernel, _, rest = name.partition(" ")
    m = _SHAPE.fullmatch(rest.strip())
    if not kernel or m is None:
        raise ValueError(f"region {name!r} has no shape; expected "
                         "'<kernel> {M}x{N}x{K} E={E} top_k={top_k}' or '<kernel> {M}x{N}x{K}'")
    e = None if m.group(4) is None else int(m.group(4))
    t = None if m.group(5) is None else int(m.group(5))
    if e is not None and (e < 1 or t < 1 or t > e):
        raise ValueError(f"region {name!r}: E={e} top_k={t}; expected 1 <= top_k <= E")
    return RegionName(kernel, int(m.group(1)), int(m.group(2)), int(m.group(3)), e, t)


# --------------------------------------------------------------------------- bytes model


@dataclass(frozen=True)
class BytesModel:
    """Bytes one int4 (W4A16) GEMM moves between HBM and the chip.

    Attributes:
        weight_bits: bits per weight (4).
        group_size: K values per scale; 0 means one group per output row (per channel).
        act_bytes: bytes of an activation and of a scale (2 for fp16/bf16).
        zero_bytes: bytes of one zero point per (row, group): 0 for symmetric weights,
            1 for w4a16moe's uint8 zeros, 0.5 for packed int4 zeros (GPTQ/AWQ).
    """

    weight_bits: int = 4
    group_size: int = 128
    act_bytes: int = 2
    zero_bytes: float = 0.0

    def __post_init__(self):
        if self.weight_bits < 1:
            raise ValueError(f"weight_bits is {self.weight_bits}; expected >= 1")
        if self.group_size < 0:
            raise ValueError(f"group_size is {self.group_size}; expected >= 0 (0: per channel)")
        if self.act_bytes < 1:
            raise ValueError(f"act_bytes is {self.act_bytes}; expected >= 1")
        if self.zero_bytes < 0:
            raise ValueError(f"zero_bytes is {self.zero_bytes}; expected >= 0")

    @staticmethod
    def expected_experts(m: int, num_experts: int | None, top_k: int | None) -> float:
        """Expected distinct experts hit by ``m`` tokens routing uniformly to ``top_k`` of
        ``num_experts``: ``E * (1 - (1 - top_k / E) ** m)``; 1 for a dense GEMM."""
        if num_experts is None:
            return 1.0 if m > 0 else 0.0
        return num_experts * (1.0 - (1.0 - min(top_k, num_experts) / num_experts) ** m)

    def gemm_bytes(self, m: int, n: int, k: int, num_experts: int | None = None,
                   top_k: int | None = None, input_rows: int | None = None,
                   experts_touched: float | None = None) -> float:
        """Bytes of one call: weights, scales and zeros of the touched experts, the input
        (``input_rows`` x K, default M) and the output (M * top_k x N)."""
        u = (self.expected_experts(m, num_experts, top_k) if experts_touched is None
             else experts_touched)
        groups = math.ceil(k / self.group_size) if self.group_size else 1
        rows_out = m * (top_k or 1)
        weights = u * n * k * self.weight_bits / 8
        scales = u * n * groups * (self.act_bytes + self.zero_bytes)
        acts = ((m if input_rows is None else input_rows) * k + rows_out * n) * self.act_bytes
        return weights + scales + acts


# --------------------------------------------------------------------------- summaries


@dataclass
class ShapeSummary:
    """Time and bandwidth of one (kernel, shape) group of regions.

    Times in microseconds; ``median_us``/``p90_us`` are None for table input. ``gbps`` is
    ``bytes_per_call / mean``; ``peak_pct`` None without a peak; ``share_pct`` the group's
    part of all GPU time (of the profiled wall time for ``source == "cpu"``).
    """

    kernel: str
    m: int
    n: int
    k: int
    num_experts: int | None
    top_k: int | None
    calls: int
    total_us: float
    mean_us: float
    median_us: float | None
    p90_us: float | None
    bytes_per_call: float
    gbps: float
    peak_pct: float | None
    share_pct: float | None
    source: str
    traces: int
    expected_experts: float
    input_rows: int
    trace: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> str:
        s = f"{self.m}x{self.n}x{self.k}"
        return s if self.num_experts is None else f"{s} E={self.num_experts} top_k={self.top_k}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SummaryList(list):
    """``list[ShapeSummary]`` sorted by total time, plus what applies to all of them:
    ``notes`` (one line each), ``peak_gbps`` and where it came from, ``device``."""

    def __init__(self, items: Iterable[ShapeSummary] = (), notes: Iterable[str] = (),
                 peak_gbps: float | None = None, peak_source: str | None = None,
                 device: str | None = None):
        super().__init__(items)
        self.notes = list(notes)
        self.peak_gbps = peak_gbps
        self.peak_source = peak_source
        self.device = device

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "peak_gbps": self.peak_gbps,
                "peak_source": self.peak_source, "notes": self.notes,
                "summaries": [s.to_dict() for s in self]}


@dataclass
class _Group:
    durations: list[float] = field(default_factory=list)
    calls: int = 0
    total_us: float = 0.0
    traces: set = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    input_rows: int | None = None


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list."""
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _region_device_us(trace: ChromeTrace) -> dict[int, float | None]:
    """GPU time of each CPU region of ``trace``: index in ``trace.cpu_regions`` -> us, None
    where no GPU work could be linked."""
    # correlation ids of GPU events that carry none, from flow-end events at their position
    device_us = trace.device_us
    for pid, tid, ts, dur in trace.unlinked_device:
        fid = trace.flow_ends.get((pid, tid, ts))
        if fid is not None:
            device_us[fid] += dur
    threads: dict[Any, tuple[list[float], list[int | None]]] = {}
    by_pid: dict[Any, list[tuple[float, int | None]]] = defaultdict(list)
    for (pid, tid), calls in trace.launches.items():
        calls.sort(key=lambda c: c[0])
        resolved = [(ts, corr if corr is not None else trace.flow_starts.get((pid, tid, ts)))
                    for ts, corr in calls]
        threads[(pid, tid)] = ([c[0] for c in resolved], [c[1] for c in resolved])
        by_pid[pid].extend(resolved)
    pid_index = {}
    for pid, calls in by_pid.items():
        calls.sort(key=lambda c: c[0])
        pid_index[pid] = ([c[0] for c in calls], [c[1] for c in calls])
    out: dict[int, float | None] = {}
    for i, (_, pid, tid, ts, dur) in enumerate(trace.cpu_regions):
        # launches on the region's own thread; if that thread made no runtime calls at all
        # (thread ids written differently), any thread of the same process
        index = threads.get((pid, tid)) or pid_index.get(pid)
        total = 0.0
        linked = False
        if index is not None:
            times, corrs = index
            lo = bisect.bisect_left(times, ts)
            hi = bisect.bisect_right(times, ts + dur)
            for corr in corrs[lo:hi]:
                if corr is not None and corr in device_us:
                    total += device_us[corr]
                    linked = True
        out[i] = total if linked else None
    return out


class _Collector:
    def __init__(self, matcher: _Matcher, skip_unparsed: bool, by_trace: bool):
        self.matcher = matcher
        self.skip_unparsed = skip_unparsed
        self.by_trace = by_trace
        self.groups: dict[tuple, _Group] = defaultdict(_Group)
        self.notes: list[str] = []
        self.device_total_us = 0.0
        self.cpu_total_us = 0.0
        self.devices: list[str] = []
        self.skipped: dict[str, int] = defaultdict(int)

    def parse(self, name: str, where: str) -> RegionName | None:
        try:
            return parse_region_name(name)
        except ValueError as exc:
            if self.skip_unparsed:
                self.skipped[name] += 1
                return None
            raise TraceError(f"{where}: {exc} (use --skip-unparsed to ignore it)") from None

    def add(self, name: str, where: str, source: str, durations: list[float] | None,
            calls: int, total_us: float, note: str | None = None) -> None:
        r = self.parse(name, where)
        if r is None:
            return
        key = (r.kernel, r.m, r.n, r.k, r.num_experts, r.top_k, source,
               where if self.by_trace else None)
        g = self.groups[key]
        if durations is not None:
            g.durations.extend(durations)
        g.calls += calls
        g.total_us += total_us
        g.traces.add(where)
        if note and note not in g.notes:
            g.notes.append(note)

    def chrome(self, trace: ChromeTrace) -> None:
        path = trace.path
        if trace.device_name():
            self.devices.append(trace.device_name())
        has_device = trace.device_events > 0
        if has_device:
            self.device_total_us += trace.device_total_us
        else:
            self.cpu_total_us += trace.span_us
        region_us = _region_device_us(trace) if has_device and trace.cpu_regions else {}
        by_name_cpu: dict[str, list[float]] = defaultdict(list)
        unlinked: dict[str, int] = defaultdict(int)
        for i, (name, _, _, _, dur) in enumerate(trace.cpu_regions):
            if not has_device:
                by_name_cpu[name].append(dur)
            elif region_us.get(i) is not None:
                by_name_cpu[name].append(region_us[i])
            else:
                unlinked[name] += 1
        gpu_by_name: dict[str, list[float]] = defaultdict(list)
        for name, _, dur in trace.gpu_regions:
            gpu_by_name[name].append(dur)
        source = "kernels" if has_device else "cpu"
        for name, durs in by_name_cpu.items():
            note = None
            if unlinked.get(name):
                note = (f"{unlinked[name]} region(s) in {os.path.basename(path)} had no GPU "
                        "work linked and are left out")
            self.add(name, path, source, durs, len(durs), sum(durs), note)
        for name, durs in gpu_by_name.items():
            if name in by_name_cpu:
                continue
            note = None
            if unlinked.get(name):
                note = ("no kernel launch linked to the CPU region (CUDA graph?); "
                        "timed by its GPU annotation span")
            self.add(name, path, "gpu span", durs, len(durs), sum(durs), note)
        for name, n in unlinked.items():
            if name not in by_name_cpu and name not in gpu_by_name:
                r = self.parse(name, path)
                if r is not None:
                    self.notes.append(
                        f"{os.path.basename(path)}: {n} region(s) '{name}' had no GPU work "
                        "linked (recorded during CUDA graph capture, or kernels on another "
                        "thread?) and are left out")

    def table(self, path: str) -> None:
        for table in read_key_averages_tables(path):
            dev = table.device
            if dev is not None and dev in table.totals_us:
                self.device_total_us += table.totals_us[dev]
            elif dev is None and "CPU" in table.totals_us:
                self.cpu_total_us += table.totals_us["CPU"]
            by_name: dict[str, list] = defaultdict(list)
            for row in table.rows:
                if row.truncated:
                    if self.matcher(row.name):
                        self.skipped[row.name] += row.calls
                    continue
                if self.matcher(row.name):
                    by_name[row.name].append(row)
            for name, rows in by_name.items():
                cpu_rows = [r for r in rows if (r.cpu_total_us or 0) > 0]
                gpu_rows = [r for r in rows if not (r.cpu_total_us or 0) > 0]
                if dev is not None and any((r.device_total_us or 0) > 0 for r in cpu_rows):
                    row = max(cpu_rows, key=lambda r: r.device_total_us or 0)
                    self.add(name, path, "table", None, row.calls, row.device_total_us)
                elif dev is not None and any((r.self_device_us or 0) > 0 for r in gpu_rows):
                    row = max(gpu_rows, key=lambda r: r.self_device_us or 0)
                    self.add(name, path, "table", None, row.calls, row.self_device_us,
                             f"timed by the {dev} annotation span (no kernels under the region)")
                elif dev is None:
                    row = cpu_rows[0] if cpu_rows else rows[0]
                    self.add(name, path, "cpu", None, row.calls, row.cpu_total_us or 0.0)
                else:
                    self.notes.append(f"{os.path.basename(path)}: '{name}' has no {dev} time "
                                      "and is left out")


def _normalise(groups: dict[tuple, _Group]) -> dict[tuple, _Group]:
    """Pair vLLM's flattened second GEMMs with their first GEMM and mark the second GEMM of
    each layer (input of M*top_k rows)."""
    out: dict[tuple, _Group] = {}
    keys = list(groups)
    for key in keys:
        kernel, m, n, k, e, t, source, trace = key
        g = groups[key]
        new_key = key
        if e is not None and t == 1:
            cands = {(k1_m, k1_t) for (k1, k1_m, k1_n, k1_k, k1_e, k1_t, s1, tr1) in keys
                     if k1 == kernel and k1_e == e and k1_t > 1 and k1_m * k1_t == m
                     and k1_k == n and k1_n in (k, 2 * k) and s1 == source and tr1 == trace}
            if len(cands) == 1:
                (m1, t1), = cands
                g.input_rows = m
                g.notes.append(f"reported as {m}x{n}x{k} top_k=1 (second GEMM over M*top_k "
                               f"rows); normalised to M={m1} tokens, top_k={t1}")
                new_key = (kernel, m1, n, k, e, t1, source, trace)
        elif e is not None:
            first = any(k1 == kernel and k1_m == m and k1_e == e and k1_t == t
                        and k1_n == 2 * k and k1_k == n and s1 == source and tr1 == trace
                        for (k1, k1_m, k1_n, k1_k, k1_e, k1_t, s1, tr1) in keys)
            if first:
                g.input_rows = m * t
                g.notes.append("second GEMM of a layer: input counted as M*top_k rows")
        if new_key in out:
            o = out[new_key]
            o.durations += g.durations
            o.calls += g.calls
            o.total_us += g.total_us
            o.traces |= g.traces
            o.notes += [x for x in g.notes if x not in o.notes]
            o.input_rows = o.input_rows or g.input_rows
        else:
            out[new_key] = g
    return out


# --------------------------------------------------------------------------- peak bandwidth


def bandwidth_cache_path() -> str:
    """The file of measured streaming bandwidths: ``$W4A16MOE_BANDWIDTH_FILE`` if set, else
    ``$XDG_CACHE_HOME/w4a16moe/bandwidth.json`` (``~/.cache/w4a16moe/bandwidth.json``)."""
    env = os.environ.get(BANDWIDTH_CACHE_ENV)
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "w4a16moe", "bandwidth.json")


def _load_cache(path: str) -> dict[str, float]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object {{\"gpu name\": GB/s}}")
    return {str(k): float(v) for k, v in data.items()}


def load_peak_bandwidth(device: str | None, path: str | None = None
                        ) -> tuple[float | None, str | None]:
    """The measured streaming bandwidth (GB/s) of ``device`` from the cache file.

    With ``device`` None (e.g. tables, which do not name the GPU) the file's only entry is
    used when it holds exactly one. Returns ``(gbps, description)`` or ``(None, reason)``;
    a missing file gives ``(None, None)``.
    """
    path = path or bandwidth_cache_path()
    if not os.path.exists(path):
        return None, None
    try:
        data = _load_cache(path)
    except (OSError, ValueError) as exc:
        return None, f"ignored {path}: {exc}"
    if device is not None and device in data:
        return data[device], f"measured on {device} ({path})"
    if device is None and len(data) == 1:
        (name, gbps), = data.items()
        return gbps, f"measured on {name}, the only GPU in {path}"
    return None, None


def save_peak_bandwidth(device: str, gbps: float, path: str | None = None) -> str:
    """Record the measured streaming bandwidth of ``device`` (GB/s) in the cache file,
    keeping other GPUs' entries; returns the file's path."""
    if not gbps > 0:
        raise ValueError(f"gbps is {gbps}; expected > 0")
    path = path or bandwidth_cache_path()
    data: dict[str, float] = {}
    if os.path.exists(path):
        try:
            data = _load_cache(path)
        except (OSError, ValueError):
            data = {}
    data[device] = float(gbps)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- entry point


def expand_trace_paths(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """Files to read for ``paths``; a directory stands for the traces in it (``*.json``,
    ``*.json.gz``), or its ``profiler_out_*.txt`` tables when it has no trace (vLLM writes
    both, for the same run). Returns ``(files, notes)``."""
    files: list[str] = []
    notes: list[str] = []
    for p in paths:
        if not os.path.isdir(p):
            files.append(p)
            continue
        names = sorted(os.listdir(p))
        traces = [n for n in names if n.endswith((".json", ".json.gz"))]
        tables = [n for n in names if re.fullmatch(r"profiler_out_.*\.txt", n)]
        chosen = traces or tables
        if not chosen:
            raise TraceError(f"{p}: directory holds no *.json, *.json.gz or "
                             "profiler_out_*.txt file")
        if traces and tables:
            notes.append(f"{p}: read the {len(traces)} trace(s); its {len(tables)} "
                         "profiler_out table(s) describe the same run and were skipped")
        files += [os.path.join(p, n) for n in chosen]
    return files, notes


def summarize_traces(paths: Sequence[str], patterns: Sequence[str] | None = None, *,
                     model: BytesModel | None = None, peak_gbps: float | None = None,
                     skip_unparsed: bool = False, by_trace: bool = False,
                     on_progress: Callable[[str, int, int], None] | None = None,
                     ) -> SummaryList:
    """Summarise annotated GEMM regions of profiler traces and tables, per (kernel, shape).

    Args:
        paths: Chrome traces (``.json``/``.json.gz``), ``key_averages`` text tables, or
            directories of them (see ``expand_trace_paths``). Groups merge across files
            (ranks) unless ``by_trace``.
        patterns: regexes that must fully match the kernel part of a region name (the text
            before its first space); default ``DEFAULT_PATTERNS``.
        model: bytes model; default ``BytesModel()`` (4-bit, group 128, 2-byte
            activations/scales, symmetric).
        peak_gbps: the GPU's streaming bandwidth for ``peak_pct``; default the value stored
            for the trace's GPU in ``bandwidth_cache_path()``, else none.
        skip_unparsed: leave out (with a note) matching regions whose shape cannot be
            parsed, instead of raising.
        by_trace: one group per (kernel, shape, file).
        on_progress: ``on_progress(path, bytes_read, file_size)`` while a trace is read.

    Returns:
        ``SummaryList`` of ``ShapeSummary``, largest total time first.

    Raises:
        TraceError: an unreadable or malformed file, a matching region with an unexpected
            shape, or no matching region at all.
    """
    model = model or BytesModel()
    matcher = _Matcher(DEFAULT_PATTERNS if patterns is None else patterns)
    files, notes = expand_trace_paths(paths)
    if not files:
        raise TraceError("no trace given")
    col = _Collector(matcher, skip_unparsed, by_trace)
    col.notes += notes
    for path in files:
        kind = sniff_trace_kind(path)
        if kind == "chrome":
            cb = None if on_progress is None else (lambda r, s, _p=path: on_progress(_p, r, s))
            col.chrome(read_chrome_trace(path, matcher, cb))
        else:
            col.table(path)
    if col.skipped:
        shown = ", ".join(f"'{n}'" for n in list(col.skipped)[:3])
        more = "" if len(col.skipped) <= 3 else f" and {len(col.skipped) - 3} more"
        truncated = any(n.endswith("...") for n in col.skipped)
        col.notes.append(f"left out {sum(col.skipped.values())} region call(s) whose names "
                         f"could not be parsed: {shown}{more}"
                         + (" (names cut by torch's 55-character table column: use the JSON "
                            "traces)" if truncated else ""))
    if not col.groups:
        what = ", ".join(matcher.patterns)
        extra = f"; {col.notes[-1]}" if col.notes else ""
        raise TraceError(f"no region named '<kernel> MxNxK ...' with kernel matching "
                         f"{what} in {len(files)} file(s){extra}")
    groups = _normalise(col.groups)

    device = col.devices[0] if col.devices else None
    if len(set(col.devices)) > 1:
        col.notes.append(f"traces come from different GPUs: {sorted(set(col.devices))}")
    if peak_gbps is not None:
        peak_source = "given"
    else:
        peak_gbps, peak_source = load_peak_bandwidth(device)
        if peak_gbps is None and peak_source:
            col.notes.append(peak_source)
            peak_source = None

    rows = []
    for (kernel, m, n, k, e, t, source, trace), g in groups.items():
        if g.calls == 0:
            continue
        mean = g.total_us / g.calls
        durs = sorted(g.durations)
        median = _percentile(durs, 0.5) if durs else None
        p90 = _percentile(durs, 0.9) if durs else None
        input_rows = g.input_rows if g.input_rows is not None else m
        nbytes = model.gemm_bytes(m, n, k, e, t, input_rows=input_rows)
        gbps = nbytes / mean / 1e3 if mean > 0 else float("nan")
        denom = col.cpu_total_us if source == "cpu" else col.device_total_us
        rows.append(ShapeSummary(
            kernel=kernel, m=m, n=n, k=k, num_experts=e, top_k=t, calls=g.calls,
            total_us=g.total_us, mean_us=mean, median_us=median, p90_us=p90,
            bytes_per_call=nbytes, gbps=gbps,
            peak_pct=None if not peak_gbps or source == "cpu" else 100.0 * gbps / peak_gbps,
            share_pct=100.0 * g.total_us / denom if denom > 0 else None,
            source=source, traces=len(g.traces),
            expected_experts=model.expected_experts(m, e, t), input_rows=input_rows,
            trace=trace, notes=g.notes))
    rows.sort(key=lambda s: (-s.total_us, s.kernel, s.m, s.n, s.k))
    if any(s.source == "cpu" for s in rows):
        col.notes.append("rows with source 'cpu' are timed by the regions' CPU duration (no "
                         "GPU events): their GB/s is not GPU bandwidth")
    return SummaryList(rows, col.notes, peak_gbps, peak_source, device)


# --------------------------------------------------------------------------- output


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render_table(summaries: Sequence[ShapeSummary], console) -> None:
    """Print ``summaries`` as a rich table, then the numbered row notes and the general
    notes, on a ``rich.console.Console``."""
    from rich import box
    from rich.table import Table

    peak = getattr(summaries, "peak_gbps", None)
    device = getattr(summaries, "device", None)
    title = "GEMM regions by total time" + (f" on {device}" if device else "")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    by_trace = any(s.trace for s in summaries)
    if by_trace:
        table.add_column("trace", no_wrap=True)
    table.add_column("kernel", no_wrap=True)
    for name in ("M", "N", "K", "E", "top_k", "calls", "total us", "mean us", "med us",
                 "p90 us", "MB/call", "GB/s") + (("% peak",) if peak else ()) + ("% time",):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("source", no_wrap=True)
    table.add_column("notes", no_wrap=True)
    notes: list[str] = []
    for s in summaries:
        marks = []
        for note in s.notes:
            if note not in notes:
                notes.append(note)
            marks.append(str(notes.index(note) + 1))
        cells = [s.kernel, str(s.m), str(s.n), str(s.k), _fmt(s.num_experts, "d"),
                 _fmt(s.top_k, "d"), str(s.calls), _fmt(s.total_us), _fmt(s.mean_us, ".2f"),
                 _fmt(s.median_us, ".2f"), _fmt(s.p90_us, ".2f"),
                 _fmt(s.bytes_per_call / 1e6, ".3f"), _fmt(s.gbps)]
        if by_trace:
            cells.insert(0, os.path.basename(s.trace or ""))
        if peak:
            cells.append(_fmt(s.peak_pct))
        cells += [_fmt(s.share_pct), s.source, ",".join(marks)]
        table.add_row(*cells)
    console.print(table)
    if peak:
        src = getattr(summaries, "peak_source", None)
        console.print(f"peak bandwidth {peak:.0f} GB/s" + (f" ({src})" if src else ""),
                      highlight=False, markup=False)
    for i, note in enumerate(notes, 1):
        console.print(f"[{i}] {note}", highlight=False, markup=False)
    for note in getattr(summaries, "notes", ()):
        console.print(f"note: {note}", highlight=False, markup=False)


_CSV_FIELDS = ("kernel", "m", "n", "k", "num_experts", "top_k", "calls", "total_us", "mean_us",
               "median_us", "p90_us", "bytes_per_call", "gbps", "peak_pct", "share_pct",
               "source", "traces", "expected_experts", "input_rows", "trace", "notes")


def write_csv(summaries: Sequence[ShapeSummary], path: str) -> None:
    """One row per summary, the fields of ``ShapeSummary`` (notes joined by ' | ')."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(_CSV_FIELDS)
        for s in summaries:
            d = s.to_dict()
            d["notes"] = " | ".join(s.notes)
            w.writerow(["" if d[c] is None else d[c] for c in _CSV_FIELDS])


def write_plot(summaries: Sequence[ShapeSummary], path: str,
               peak_gbps: float | None = None) -> None:
    """Scatter of achieved GB/s against bytes per call (log x), one series per kernel,
    with the peak as a horizontal line. Needs matplotlib (``pip install 'w4a16moe[plot]'``).
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or state
    except ImportError:
        raise TraceError("--plot needs matplotlib: pip install matplotlib "
                         "(or 'w4a16moe[plot]')") from None

    peak_gbps = peak_gbps if peak_gbps is not None else getattr(summaries, "peak_gbps", None)
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    kernels = sorted({s.kernel for s in summaries})
    for kernel in kernels:
        pts = [s for s in summaries if s.kernel == kernel and s.gbps == s.gbps]
        ax.scatter([s.bytes_per_call for s in pts], [s.gbps for s in pts], label=kernel)
    if peak_gbps:
        ax.axhline(peak_gbps, color="k", linestyle="--", label=f"peak {peak_gbps:.0f} GB/s")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("bytes per call (model)")
    ax.set_ylabel("achieved GB/s")
    device = getattr(summaries, "device", None)
    ax.set_title("GEMM bandwidth by shape" + (f" ({device})" if device else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise TraceError(f"{path}: cannot write the plot ({exc})") from None
