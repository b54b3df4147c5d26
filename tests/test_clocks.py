"""The SM-clock sampler of the benchmarks (w4a16moe/bench/clocks.py) and how the result
tables mark timings that ran with the clock held down."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time

import pytest
import torch

from w4a16moe.bench.clocks import (
    SLOW_CLOCK_RATIO,
    ClockSample,
    ClockSampler,
    nvml_reader,
    sample_clocks,
    slowed,
    summarize,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import make_results  # noqa: E402

MAX = 1980.0


def sample(mhz: float, reasons: int = 0, power: float = 500.0, t: float = 0.0) -> ClockSample:
    return ClockSample(t, mhz, MAX, power, reasons)


def test_summarize_counts_the_clock_not_the_cap_flag():
    # the power-cap bit is set through most of a heavy run while the clock stays near its
    # maximum; only samples whose clock is below SLOW_CLOCK_RATIO of it count as slowed, and
    # only for a slowdown reason (0x1, idle, is not one)
    near = SLOW_CLOCK_RATIO * MAX + 1
    samples = ([sample(MAX)] * 5 + [sample(near, 0x4)] * 2
               + [sample(1620.0, 0x4, 690.0), sample(1700.0, 0x4 | 0x40, 695.0),
                  sample(1750.0, 0x1)])
    s = summarize(samples)
    assert s["samples"] == 10
    assert s["slowed_fraction"] == pytest.approx(0.2)
    assert s["sm_mhz_min"] == 1620.0 and s["sm_max_mhz"] == MAX
    assert s["sm_mhz_median"] == pytest.approx((near + MAX) / 2)  # 10 samples: the middle two
    assert s["power_w_max"] == 695.0
    # reasons of the slowed samples only
    assert s["reasons"] == ["sw_power_cap", "hw_thermal_slowdown"]
    assert summarize([sample(345.0, 0x1)] * 3)["slowed_fraction"] == 0.0  # idle
    assert summarize([]) is None
    flag_only = summarize([sample(near, 0x4)] * 4)
    assert flag_only["slowed_fraction"] == 0.0 and flag_only["reasons"] == []


def test_slowed_threshold():
    assert not slowed(None)
    assert not slowed({"slowed_fraction": 0.0})
    assert slowed({"slowed_fraction": 0.1})
    assert not slowed({"slowed_fraction": 0.09})
    assert slowed({"slowed_fraction": 0.3}, fraction=0.25)


def test_sampler_collects_until_stopped():
    ticks = []
    two_read = threading.Event()

    def read() -> ClockSample:
        ticks.append(len(ticks))
        if len(ticks) >= 3:
            two_read.set()
        return sample(1700.0 if len(ticks) % 2 else MAX, 0x4, t=float(len(ticks)))

    sampler = ClockSampler(read, interval_s=0.001).start()
    assert two_read.wait(5.0)
    s = sampler.stop()
    assert s["samples"] == len(sampler.samples) >= 4  # the thread's readings and one at stop
    assert 0.0 < s["slowed_fraction"] < 1.0
    n = len(ticks)
    time.sleep(0.02)
    assert len(ticks) == n  # stopped means stopped
    with pytest.raises(RuntimeError, match="started already"):
        sampler.start()


def test_sampler_keeps_what_it_read_when_a_reading_fails():
    calls = []

    def read() -> ClockSample:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("NVML went away")
        return sample(MAX)

    sampler = ClockSampler(read, interval_s=0.001).start()
    sampler._thread.join(5.0)
    assert not sampler._thread.is_alive()  # the failing reading ended the thread
    s = sampler.stop()  # the reading at stop fails as well and is left out
    assert s["samples"] == 2 and s["slowed_fraction"] == 0.0


def test_sampler_errors():
    with pytest.raises(ValueError, match="interval_s is 0"):
        ClockSampler(lambda: sample(MAX), interval_s=0)
    with pytest.raises(RuntimeError, match="before start"):
        ClockSampler(lambda: sample(MAX)).stop()


def test_sample_clocks_context():
    with sample_clocks(None) as box:
        pass
    assert box["summary"] is None
    with sample_clocks(lambda: sample(1600.0, 0x4), interval_s=0.001) as box:
        assert box["summary"] is None  # filled in at the end
    assert box["summary"]["slowed_fraction"] == 1.0
    assert box["summary"]["reasons"] == ["sw_power_cap"]


def test_no_reader_on_a_cpu():
    assert nvml_reader("cpu") is None


def _record(**kw) -> dict:
    rec = {"kind": "layer", "section": "sweep", "model": "m", "M": 8, "path": "hybrid",
           "impl": "prefill", "kernel_us": 270.0, "layer_us": 290.0, "floor_us": 220.0,
           "x_floor": 1.23, "bf16_us": 1100.0, "speedup_vs_bf16": 4.07, "read_gbps": 2500.0,
           "rel_err": 3e-3}
    rec.update(kw)
    return rec


def test_results_tables_mark_held_clocks():
    held = summarize([sample(1620.0, 0x4)] * 3 + [sample(MAX)] * 5)
    steady = summarize([sample(MAX)] * 8)
    table = make_results.layer_table([_record(clocks=steady, layer_clocks=held)], "sweep")
    row = table.splitlines()[2]
    assert "| 270.0 | 290.0 &dagger; |" in row
    assert make_results.SLOWED_NOTE in table
    plain = make_results.layer_table([_record(clocks=steady, layer_clocks=steady),
                                      _record(clocks=None, layer_clocks=None)], "sweep")
    assert "&dagger;" not in plain and make_results.SLOWED_NOTE not in plain
    # the records keep both summaries
    report = {"records": [_record(clocks=steady, layer_clocks=held)],
              "rates": {"read_gbps": 3000.0, "matmul_tflops": 780.0}}
    rec = make_results.layer_records(report)[0]
    assert rec["layer_clocks"] == held and rec["clocks"] == steady


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("pynvml") is None,
                    reason="reads NVML on a GPU")
def test_nvml_reader_on_the_gpu():
    read = nvml_reader(torch.device("cuda"))
    assert read is not None
    s = read()
    assert 0 < s.sm_mhz <= s.sm_max_mhz and s.power_w > 0
    x = torch.randn(4096, 4096, device="cuda")
    with sample_clocks(read, interval_s=0.005) as box:
        for _ in range(50):
            x = x @ x.T / 4096
        torch.cuda.synchronize()
    assert box["summary"]["samples"] >= 2
    assert box["summary"]["sm_max_mhz"] == s.sm_max_mhz


def test_bench_table_marks_held_clocks():
    from rich.console import Console

    from w4a16moe.bench.cli import records_table

    held = summarize([sample(1620.0, 0x4)] * 3 + [sample(MAX)] * 5)
    steady = summarize([sample(MAX)] * 8)
    table = records_table([_record(clocks=steady, layer_clocks=held)])
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "290.0*" in text and "270.0*" not in text
    assert "power cap" in table.caption
    assert records_table([_record(clocks=steady, layer_clocks=steady)]).caption is None
