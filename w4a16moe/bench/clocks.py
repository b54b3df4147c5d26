"""What the GPU's clock did while a measurement ran: its SM clock, its power draw and the
reasons it gives for holding the clock down, sampled on a host thread through NVML.

An H100 layer that streams weights at full bandwidth draws close to the card's 700 W limit,
and the card then lowers its SM clock (the software power cap) for tens to hundreds of
milliseconds at a time. In session 24 an ``nvidia-smi`` log of a Mixtral layer probe put
every Mixtral row that came out 5-20 us off its own other timing inside such a hold, in both
directions (``benchmarks/notes_prefill.md``). A record's ``clocks`` (from
:func:`sample_clocks`) says whether its timing ran under one.

NVML comes from the ``pynvml`` module (the optional ``nvidia-ml-py`` package). Without it, or
on a CPU, nothing is sampled and the summaries are None.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

#: NVML clock-event reasons that slow the SM clock (nvmlClocksEventReason*); the others
#: (idle, application clocks, sync boost, display clocks) are not slowdowns under load
SLOWDOWN_REASONS = {
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
}
SLOWDOWN_MASK = sum(SLOWDOWN_REASONS)

#: a sample is slowed when its SM clock is below this fraction of the card's maximum and
#: NVML gives one of :data:`SLOWDOWN_REASONS` (a clock that is low because the GPU idles,
#: say between a graph's capture and its replays, does not count)
SLOW_CLOCK_RATIO = 0.95
#: a timing whose samples were slowed at least this often is marked in the result tables
SLOWED_MARK_FRACTION = 0.1


@dataclass(frozen=True)
class ClockSample:
    """One NVML reading: host time (``time.monotonic``, s), SM clock and the card's maximum
    SM clock (MHz), power (W) and the clock-event reason bits."""
    t: float
    sm_mhz: float
    sm_max_mhz: float
    power_w: float
    reasons: int

    @property
    def slowed(self) -> bool:
        return (self.sm_mhz < SLOW_CLOCK_RATIO * self.sm_max_mhz
                and bool(self.reasons & SLOWDOWN_MASK))


def summarize(samples: list[ClockSample]) -> dict | None:
    """``{"samples", "sm_mhz_median", "sm_mhz_min", "sm_max_mhz", "power_w_max",
    "slowed_fraction", "reasons"}`` of ``samples`` (None when empty).

    ``slowed_fraction``: the share of samples whose SM clock is below
    :data:`SLOW_CLOCK_RATIO` of the maximum for one of :data:`SLOWDOWN_REASONS` (the
    power-cap flag alone is set through most of a heavy run while the clock stays within
    1-2 % of its maximum, so the clock decides); ``reasons``: the reasons of those samples.
    """
    if not samples:
        return None
    slow = [s for s in samples if s.slowed]
    seen = 0
    for s in slow:
        seen |= s.reasons
    return {"samples": len(samples),
            "sm_mhz_median": statistics.median(s.sm_mhz for s in samples),
            "sm_mhz_min": min(s.sm_mhz for s in samples),
            "sm_max_mhz": max(s.sm_max_mhz for s in samples),
            "power_w_max": max(s.power_w for s in samples),
            "slowed_fraction": len(slow) / len(samples),
            "reasons": [name for bit, name in SLOWDOWN_REASONS.items() if seen & bit]}


def slowed(summary: dict | None, fraction: float = SLOWED_MARK_FRACTION) -> bool:
    """Whether a :func:`summarize` result was slowed for at least ``fraction`` of it."""
    return summary is not None and summary.get("slowed_fraction", 0.0) >= fraction


def held_time(value: float | None, summary: dict | None, mark: str = "*") -> str:
    """``value`` (us) for a table, ``-`` when None, followed by ``mark`` when its timing was
    :func:`slowed` (``summary``: its record's ``clocks`` or ``layer_clocks``)."""
    if value is None:
        return "-"
    return f"{value:.1f}" + (mark if slowed(summary) else "")


def any_held(records: Iterable[dict]) -> bool:
    """Whether any of ``records`` has a :func:`slowed` timing."""
    return any(slowed(r.get("clocks")) or slowed(r.get("layer_clocks")) for r in records)


def held_note(mark: str = "*") -> str:
    """The line under a table that explains ``mark`` (see :func:`held_time`)."""
    return (f"{mark} the card held its SM clock below {SLOW_CLOCK_RATIO:.0%} of its maximum "
            f"(NVML: power cap or heat) for at least {SLOWED_MARK_FRACTION:.0%} of that "
            "timing; the record's clocks / layer_clocks give its median and lowest clock and "
            "NVML's reasons")


def nvml_reader(device: torch.device | str | int | None = None) -> Callable[[], ClockSample] | None:
    """A function that reads one :class:`ClockSample` of ``device`` (default: the current CUDA
    device), or None on a CPU, without ``pynvml`` or where NVML does not start."""
    if device is None:
        device = torch.device("cuda")
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        # CUDA_VISIBLE_DEVICES may renumber the devices: torch knows NVML's index
        to_nvml = getattr(torch.cuda, "_get_nvml_device_index", None)
        if to_nvml is not None:
            index = to_nvml(index)
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        reasons_of = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        sm_clock = pynvml.NVML_CLOCK_SM
        sm_max = float(pynvml.nvmlDeviceGetMaxClockInfo(handle, sm_clock))

        def read() -> ClockSample:
            return ClockSample(time.monotonic(),
                               float(pynvml.nvmlDeviceGetClockInfo(handle, sm_clock)), sm_max,
                               pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                               int(reasons_of(handle)))

        read()  # fail here, not on the sampling thread
    except Exception:  # noqa: BLE001 - no NVML: the timings simply go without clocks
        return None
    return read


class ClockSampler:
    """Reads ``read`` every ``interval_s`` on a daemon thread from ``start()`` to ``stop()``.

    ``stop()`` returns the :func:`summarize` of the samples (also one before the first
    interval and one at the end, so even a short timing has two). A reading that raises ends
    the sampling; what was read until then is kept.
    """

    def __init__(self, read: Callable[[], ClockSample], interval_s: float = 0.02):
        if interval_s <= 0:
            raise ValueError(f"interval_s is {interval_s}; expected a positive number")
        self.read = read
        self.interval_s = interval_s
        self.samples: list[ClockSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            try:
                self.samples.append(self.read())
            except Exception:  # noqa: BLE001 - keep what was read
                return
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> ClockSampler:
        if self._thread is not None:
            raise RuntimeError("this ClockSampler was started already; make a new one")
        self._thread = threading.Thread(target=self._run, name="clock-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict | None:
        if self._thread is None:
            raise RuntimeError("stop() before start()")
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self.samples.append(self.read())
        return summarize(self.samples)


@contextlib.contextmanager
def sample_clocks(read: Callable[[], ClockSample] | None,
                  interval_s: float = 0.02) -> Iterator[dict]:
    """``with sample_clocks(read) as clocks: ...``: afterwards ``clocks["summary"]`` holds the
    :func:`summarize` of the samples taken meanwhile (None when ``read`` is None)."""
    box: dict = {"summary": None}
    if read is None:
        yield box
        return
    sampler = ClockSampler(read, interval_s).start()
    try:
        yield box
    finally:
        box["summary"] = sampler.stop()
