"""profile-bandwidth: trace/table readers, GPU time attribution, bytes model and the CLI."""

import csv
import gzip
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from w4a16moe import cli
from w4a16moe.profiling.annotate import DECODE_KERNEL_NAME, PREFILL_KERNEL_NAME, annotate_gemm
from w4a16moe.profiling.bandwidth import (
    BytesModel,
    load_peak_bandwidth,
    parse_region_name,
    render_table,
    save_peak_bandwidth,
    summarize_traces,
)
from w4a16moe.profiling.traces import TraceError, read_key_averages_tables

FIXTURES = Path(__file__).parent / "fixtures"
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    """Never read the developer's ~/.cache/w4a16moe/bandwidth.json."""
    monkeypatch.setenv("W4A16MOE_BANDWIDTH_FILE", str(tmp_path / "no-such-bandwidth.json"))


def _main(argv, monkeypatch):
    """The real CLI entry point with this command registered."""
    if "w4a16moe.profiling.cli" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES",
                            cli.COMMAND_MODULES + ("w4a16moe.profiling.cli",))
    return cli.main(argv)


def _write(path: Path, doc, gz: bool = False) -> Path:
    data = json.dumps(doc, indent=1).encode()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- GPU fixture

D1 = "fused_moe_wvsplitk_int4 4x1536x2048 E=128 top_k=8"  # w13 of a decode step
D2 = "fused_moe_wvsplitk_int4 4x2048x768 E=128 top_k=8"  # w2 of the same layer
P1 = "hybrid_triton_moe 512x1536x2048 E=128 top_k=8"  # only a GPU annotation span
P2 = "hybrid_triton_moe 64x1536x2048 E=128 top_k=8"  # no GPU work at all (graph capture)


def _x(cat, name, pid, tid, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur,
            "args": args}


def gpu_trace() -> dict:
    """A trace shaped like kineto's CUDA output: CPU process 100 / thread 100, GPU pid 0
    stream 7. GPU time per region (hand-made numbers):
      D1 at ts 1000-1050: cudaLaunchKernel corr 1 (kernel 20 us) + cuLaunchKernelEx corr 2
         (kernel 5 us) = 25 us
      D1 at ts 2000-2040: cudaLaunchKernel corr 3 (kernel 30 us) + cudaMemsetAsync corr 6
         (memset 2 us) = 32 us
      D2 at ts 1100-1130: a launch without args.correlation, linked by ac2g flow id 4 to a
         kernel without one either: 10 us
      P1 at ts 3000-3100: no launch inside; its gpu_user_annotation span lasts 80 us
      P2 at ts 4000-4010: nothing linked, no GPU span: left out with a note
      outside any region: kernel corr 5 (100 us), and a launch on another thread
    All GPU work: 20 + 5 + 30 + 2 + 10 + 100 = 167 us.
    """
    cpu, gpu = 100, 0
    ev = [
        {"ph": "M", "name": "process_name", "pid": cpu, "tid": 0, "args": {"name": "python"}},
        _x("user_annotation", D1, cpu, cpu, 1000.0, 50.0, **{"External id": 1}),
        _x("cpu_op", "aten::empty", cpu, cpu, 1002.0, 3.0),
        _x("cuda_runtime", "cudaLaunchKernel", cpu, cpu, 1010.0, 6.0, correlation=1),
        _x("cuda_driver", "cuLaunchKernelEx", cpu, cpu, 1030.0, 4.0, correlation=2),
        _x("user_annotation", D2, cpu, cpu, 1100.0, 30.0),
        _x("cuda_runtime", "cudaLaunchKernel", cpu, cpu, 1105.0, 5.0),
        {"ph": "s", "id": 4, "pid": cpu, "tid": cpu, "ts": 1105.0, "cat": "ac2g",
         "name": "ac2g"},
        _x("user_annotation", D1, cpu, cpu, 2000.0, 40.0),
        _x("cuda_runtime", "cudaLaunchKernel", cpu, cpu, 2010.0, 5.0, correlation=3),
        _x("cuda_runtime", "cudaMemsetAsync", cpu, cpu, 2020.0, 3.0, correlation=6),
        _x("cuda_runtime", "cudaLaunchKernel", cpu, cpu, 2500.0, 5.0, correlation=5),
        _x("cuda_runtime", "cudaLaunchKernel", cpu, 101, 3050.0, 5.0, correlation=77),
        _x("user_annotation", P1, cpu, cpu, 3000.0, 100.0),
        _x("user_annotation", P2, cpu, cpu, 4000.0, 10.0),
        _x("kernel", "wvsplitk_gemv", gpu, 7, 1020.0, 20.0, correlation=1, device=0),
        _x("kernel", "wvsplitk_gemv", gpu, 7, 1040.0, 5.0, correlation=2, device=0),
        _x("kernel", "wvsplitk_gemv", gpu, 7, 1120.0, 10.0, device=0),
        {"ph": "f", "id": 4, "pid": gpu, "tid": 7, "ts": 1120.0, "cat": "ac2g",
         "name": "ac2g", "bp": "e"},
        _x("kernel", "wvsplitk_gemv", gpu, 7, 2030.0, 30.0, correlation=3, device=0),
        _x("gpu_memset", "Memset (Device)", gpu, 7, 2060.0, 2.0, correlation=6, device=0),
        _x("kernel", "attention", gpu, 7, 2600.0, 100.0, correlation=5, device=0),
        _x("gpu_user_annotation", P1, gpu, 7, 3010.0, 80.0, device=0),
    ]
    return {"schemaVersion": 1, "deviceProperties": [{"id": 0, "name": H100}],
            "traceEvents": ev, "traceName": "gpu"}


# bytes of one D1 call (M=4, N=1536, K=2048, E=128, top_k=8, G=128, bf16):
#   u = 128 * (1 - (1 - 8/128)^4) = 128 * (1 - 0.9375^4) = 128 * 0.2275238037109375
#     = 29.123046875 expected distinct experts
#   weights u*1536*2048/2 = 45_806_592, scales u*1536*16*2 = 1_431_456,
#   input 4*2048*2 = 16_384, output 4*8*1536*2 = 98_304   -> 47_352_736 bytes
U4 = 29.123046875
D1_BYTES = 47_352_736
# D2 (M=4, N=2048, K=768), the second GEMM (D1 has N = 2*768, K = 2048 = D2's N):
#   weights u*2048*768/2 = 22_903_296, scales u*2048*6*2 = 715_728,
#   input 4*8 rows * 768 * 2 = 49_152, output 4*8*2048*2 = 131_072   -> 23_799_248 bytes
D2_BYTES = 23_799_248


def test_bytes_model_matches_hand_arithmetic():
    model = BytesModel()
    assert model.expected_experts(4, 128, 8) == pytest.approx(U4, rel=1e-12)
    assert model.gemm_bytes(4, 1536, 2048, 128, 8) == pytest.approx(D1_BYTES, rel=1e-12)
    assert model.gemm_bytes(4, 2048, 768, 128, 8, input_rows=32) == pytest.approx(D2_BYTES)
    # dense 16x4096x4096, per channel scales, uint8 zeros:
    # 4096*4096/2 + 4096*1*(2+1) + 16*4096*2 + 16*4096*2 = 8_388_608 + 12_288 + 262_144
    dense = BytesModel(group_size=0, zero_bytes=1).gemm_bytes(16, 4096, 4096)
    assert dense == 8_388_608 + 12_288 + 262_144
    # M=1 touches exactly top_k experts; M=0 touches none
    assert model.expected_experts(1, 64, 6) == pytest.approx(6)
    assert model.expected_experts(0, 64, 6) == 0
    # K not a multiple of G: ceil(200/128) = 2 groups
    assert BytesModel().gemm_bytes(1, 8, 200, 1, 1) == 8 * 200 / 2 + 8 * 2 * 2 + 200 * 2 + 8 * 2
    with pytest.raises(ValueError, match="group_size is -1"):
        BytesModel(group_size=-1)


def test_region_names_parse():
    assert parse_region_name(D1) == parse_region_name(D1 + "  ")
    r = parse_region_name("x 1x2x3")
    assert (r.kernel, r.m, r.n, r.k, r.num_experts, r.top_k) == ("x", 1, 2, 3, None, None)
    for bad in ("x 1x2", "x 1x2x3 E=4", "x 1x2x3 E=4 top_k=5", "x"):
        with pytest.raises(ValueError):
            parse_region_name(bad)


@pytest.mark.parametrize("gz", [False, True])
def test_gpu_trace_attribution(tmp_path, gz):
    path = _write(tmp_path / "rank0.pt.trace.json", gpu_trace(), gz)
    out = summarize_traces([str(path)], peak_gbps=3000.0)
    assert [(s.kernel, s.shape, s.source) for s in out] == [
        (PREFILL_KERNEL_NAME, "512x1536x2048 E=128 top_k=8", "gpu span"),
        (DECODE_KERNEL_NAME, "4x1536x2048 E=128 top_k=8", "kernels"),
        (DECODE_KERNEL_NAME, "4x2048x768 E=128 top_k=8", "kernels"),
    ]
    p1, d1, d2 = out
    assert out.device == H100
    # D1: calls 25 and 32 us: total 57, mean 28.5, median 28.5, p90 = 25 + 0.9 * 7 = 31.3
    assert (d1.calls, d1.total_us, d1.mean_us, d1.median_us) == (2, 57.0, 28.5, 28.5)
    assert d1.p90_us == pytest.approx(31.3)
    assert d1.bytes_per_call == pytest.approx(D1_BYTES)
    assert d1.gbps == pytest.approx(D1_BYTES / 28.5e-6 / 1e9)  # 1661.5 GB/s
    assert d1.peak_pct == pytest.approx(100 * D1_BYTES / 28.5e-6 / 1e9 / 3000)
    assert d1.share_pct == pytest.approx(100 * 57 / 167)
    assert d1.input_rows == 4 and d1.notes == []
    # D2 linked through flow events; input counted as M*top_k = 32 rows
    assert (d2.calls, d2.total_us, d2.input_rows) == (1, 10.0, 32)
    assert d2.bytes_per_call == pytest.approx(D2_BYTES)
    assert d2.gbps == pytest.approx(D2_BYTES / 10e-6 / 1e9)  # 2379.9 GB/s
    assert any("second GEMM" in n for n in d2.notes)
    # P1: its gpu_user_annotation span
    assert (p1.calls, p1.total_us, p1.share_pct) == (1, 80.0, pytest.approx(100 * 80 / 167))
    # P2 left out, and said so
    assert any(P2 in n and "no GPU work" in n for n in out.notes)


def test_ranks_merge_or_split(tmp_path):
    a = _write(tmp_path / "rank0.json", gpu_trace())
    b = _write(tmp_path / "rank1.json", gpu_trace(), gz=True)
    merged = summarize_traces([str(a), str(b)])
    d1 = next(s for s in merged if s.shape.startswith("4x1536"))
    assert (d1.calls, d1.total_us, d1.traces) == (4, 114.0, 2)
    assert d1.share_pct == pytest.approx(100 * 114 / 334)
    split = summarize_traces([str(a), str(b)], by_trace=True)
    assert len(split) == 2 * len(merged)
    # a directory stands for its traces
    assert [s.calls for s in summarize_traces([str(tmp_path)])] == [s.calls for s in merged]


def test_thread_ids_written_differently_fall_back_to_the_process(tmp_path):
    doc = gpu_trace()
    for e in doc["traceEvents"]:
        if e.get("cat") == "user_annotation":
            e["tid"] = "main"  # no runtime call on this "thread": match on the pid
    out = summarize_traces([str(_write(tmp_path / "t.json", doc))])
    assert next(s for s in out if s.shape.startswith("4x1536")).total_us == 57.0


# --------------------------------------------------------------------------- CPU traces


def _profile_cpu(repeat: int = 3, **kwargs):
    x = torch.randn(32, 32)
    with profile(activities=[ProfilerActivity.CPU], **kwargs) as prof:
        for _ in range(repeat):
            with annotate_gemm(DECODE_KERNEL_NAME, 1, 32, 32, 8, 2):
                y = x @ x
            with annotate_gemm(PREFILL_KERNEL_NAME, 64, 32, 32, 8, 2):
                y = torch.relu(y @ x)
    return prof


def _cpu_trace(path: Path, repeat: int = 3) -> list[dict]:
    """Profile on CPU, export the trace to ``path`` (torch compresses a .gz path) and the
    key_averages table next to it; returns the trace's events."""
    prof = _profile_cpu(repeat)
    prof.export_chrome_trace(str(path))
    (path.parent / "table.txt").write_text(prof.key_averages().table(row_limit=-1))
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


@pytest.mark.parametrize("name", ["cpu.json", "cpu.json.gz"])
def test_real_cpu_trace_falls_back_to_cpu_time(tmp_path, name):
    path = tmp_path / name
    events = _cpu_trace(path)
    out = summarize_traces([str(path)])
    durs = {}
    for e in events:
        if e.get("cat") == "user_annotation":
            durs.setdefault(e["name"], []).append(e["dur"])
    assert {f"{s.kernel} {s.shape}" for s in out} == set(durs)
    for s in out:
        d = sorted(durs[f"{s.kernel} {s.shape}"])
        assert s.source == "cpu" and s.calls == 3
        assert s.total_us == pytest.approx(sum(d))
        assert s.median_us == pytest.approx(d[1])
        assert s.peak_pct is None
    assert any("CPU duration" in n for n in out.notes)


def test_tensorboard_trace_handler_directory(tmp_path, monkeypatch, capsys):
    from torch.profiler import tensorboard_trace_handler

    for rank in (0, 1):
        _profile_cpu(2, on_trace_ready=tensorboard_trace_handler(
            str(tmp_path), worker_name=f"rank{rank}", use_gzip=True))
    (tmp_path / "profiler_out_0.txt").write_text("(the same run as a table)")
    names = sorted(os.listdir(tmp_path))
    assert sum(n.endswith(".pt.trace.json.gz") for n in names) == 2, names
    assert _main(["profile-bandwidth", str(tmp_path), "--json"], monkeypatch) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(s["kernel"], s["calls"], s["traces"]) for s in doc["summaries"]] in (
        [(DECODE_KERNEL_NAME, 4, 2), (PREFILL_KERNEL_NAME, 4, 2)],
        [(PREFILL_KERNEL_NAME, 4, 2), (DECODE_KERNEL_NAME, 4, 2)])
    assert any("profiler_out table(s) describe the same run" in n for n in doc["notes"])


def test_real_cpu_key_averages_table(tmp_path):
    _cpu_trace(tmp_path / "cpu.json", repeat=2)
    (table,) = read_key_averages_tables(str(tmp_path / "table.txt"))
    assert table.device is None and "CPU" in table.totals_us
    out = summarize_traces([str(tmp_path / "table.txt")])
    assert sorted((s.kernel, s.calls, s.source) for s in out) == [
        (DECODE_KERNEL_NAME, 2, "cpu"), (PREFILL_KERNEL_NAME, 2, "cpu")]


# --------------------------------------------------------------------------- vLLM table


def test_vllm_profiler_out_table():
    out = summarize_traces([str(FIXTURES / "profiler_out_0.txt")])
    assert [(s.kernel, s.shape, s.source) for s in out] == [
        ("fused_moe_gptq_awq", "2x1536x2048 E=128 top_k=8", "table"),
        ("fused_moe_gptq_awq", "2x2048x768 E=128 top_k=8", "table"),
    ]
    g1, g2 = out
    # first GEMM: CUDA total of the CPU annotation row (kernels under it): 2.400 ms, 48 calls
    assert (g1.calls, g1.total_us, g1.mean_us, g1.median_us) == (48, 2400.0, 50.0, None)
    # u = 128 * (1 - 0.9375^2) = 15.5; weights 15.5*1536*2048/2 = 24_379_392,
    # scales 15.5*1536*16*2 = 761_856, input 2*2048*2 = 8_192, output 2*8*1536*2 = 49_152
    assert g1.bytes_per_call == pytest.approx(25_198_592)
    assert g1.gbps == pytest.approx(25_198_592 / 50e-6 / 1e9)  # 503.97 GB/s
    assert g1.share_pct == pytest.approx(100 * 2400 / 12000)  # of "Self CUDA time total"
    # the second GEMM reported as 16x2048x768 top_k=1 is normalised to M=2, top_k=8;
    # input 16 rows: weights 15.5*2048*768/2 = 12_189_696, scales 15.5*2048*6*2 = 380_928,
    # input 16*768*2 = 24_576, output 2*8*2048*2 = 65_536
    assert (g2.calls, g2.total_us, g2.input_rows) == (48, 960.0, 16)
    assert g2.bytes_per_call == pytest.approx(12_660_736)
    assert any("normalised to M=2 tokens, top_k=8" in n for n in g2.notes)
    # the name torch cut at 55 characters is reported, not guessed
    assert any("top_k=..." in n and "55-character" in n for n in out.notes)


def test_table_parser_reads_columns_by_position():
    (t,) = read_key_averages_tables(str(FIXTURES / "profiler_out_0.txt"))
    assert t.device == "CUDA" and t.totals_us == {"CPU": 25000.0, "CUDA": 12000.0}
    row = t.rows[2]
    assert row.name == "fused_moe_gptq_awq 2x1536x2048 E=128 top_k=8"
    assert (row.calls, row.self_cpu_us, row.cpu_total_us, row.device_total_us) == (
        48, 1200.0, 2400.0, 2400.0)


# --------------------------------------------------------------------------- output, peak


def test_peak_from_the_measured_bandwidth_file(tmp_path, monkeypatch):
    cache = tmp_path / "bw.json"
    monkeypatch.setenv("W4A16MOE_BANDWIDTH_FILE", str(cache))
    assert load_peak_bandwidth(H100) == (None, None)
    save_peak_bandwidth(H100, 2940.0)
    save_peak_bandwidth("NVIDIA A100-SXM4-80GB", 1800.0)
    assert json.loads(cache.read_text()) == {H100: 2940.0, "NVIDIA A100-SXM4-80GB": 1800.0}
    out = summarize_traces([str(_write(tmp_path / "t.json", gpu_trace()))])
    assert out.peak_gbps == 2940.0 and H100 in out.peak_source
    d1 = next(s for s in out if s.shape.startswith("4x1536"))
    assert d1.peak_pct == pytest.approx(100 * d1.gbps / 2940)
    cache.write_text("[1, 2]")
    out = summarize_traces([str(_write(tmp_path / "t.json", gpu_trace()))])
    assert out.peak_gbps is None and any("ignored" in n for n in out.notes)


def test_cli_table_csv_json(tmp_path, monkeypatch, capsys):
    trace = _write(tmp_path / "t.json", gpu_trace())
    csv_path = tmp_path / "out.csv"
    assert _main(["profile-bandwidth", str(trace), "--csv", str(csv_path), "--peak-gbps",
                  "3000", "--no-progress"], monkeypatch) == 0
    text = capsys.readouterr().out
    assert DECODE_KERNEL_NAME in text and "1661.5" in text and "% peak" in text
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["m"] for r in rows] == ["512", "4", "4"]
    assert float(rows[1]["gbps"]) == pytest.approx(D1_BYTES / 28.5e-6 / 1e9)
    assert _main(["profile-bandwidth", str(trace), "--json", "--zero-point-bytes", "1"],
                 monkeypatch) == 0
    doc = json.loads(capsys.readouterr().out)
    d1 = doc["summaries"][1]
    # uint8 zeros add u*N*K/G = 29.123046875*1536*16 = 715_728 bytes
    assert d1["bytes_per_call"] == pytest.approx(D1_BYTES + 715_728)
    assert doc["device"] == H100


def test_render_table_prints_notes():
    from rich.console import Console

    out = summarize_traces([str(FIXTURES / "profiler_out_0.txt")], peak_gbps=1000)
    console = Console(width=250, record=True)
    render_table(out, console)
    text = console.export_text()
    assert "[1] reported as 16x2048x768 top_k=1" in text
    assert "peak bandwidth 1000 GB/s (given)" in text
    assert "note: left out 2 region call(s)" in text


def test_plot(tmp_path, monkeypatch, capsys):
    trace = _write(tmp_path / "t.json", gpu_trace())
    png = tmp_path / "bw.png"
    with monkeypatch.context() as mp:
        for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
            mp.setitem(sys.modules, mod, None)  # as if not installed
        mp.setitem(sys.modules, "matplotlib", None)
        assert _main(["profile-bandwidth", str(trace), "--plot", str(png)], monkeypatch) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --plot needs matplotlib") and err.count("\n") == 1
    assert not png.exists()
    pytest.importorskip("matplotlib")
    assert _main(["profile-bandwidth", str(trace), "--plot", str(png), "--peak-gbps", "3000"],
                 monkeypatch) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- errors


def _error(argv, monkeypatch, capsys) -> str:
    assert _main(["profile-bandwidth", "--no-progress", *argv], monkeypatch) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def test_error_malformed_json(tmp_path, monkeypatch, capsys):
    p = tmp_path / "bad.json"
    p.write_text('{"traceEvents": [{"ph": "X", "name": "a"} {"ph": "X"}]}')
    assert "malformed JSON at character 42" in _error([str(p)], monkeypatch, capsys)
    p.write_text('{"traceEvents": [{"ph": "X", "name": "a"}]} trailing')
    assert "extra data" in _error([str(p)], monkeypatch, capsys)
    p.write_text('{"schemaVersion": 1}')
    assert "without a 'traceEvents' array" in _error([str(p)], monkeypatch, capsys)
    p.write_text("hello")
    assert "neither a Chrome trace" in _error([str(p)], monkeypatch, capsys)
    p.write_text("")
    assert "empty file" in _error([str(p)], monkeypatch, capsys)
    assert "no such file" in _error([str(tmp_path / "missing.json")], monkeypatch, capsys)


def test_progress_and_early_errors(tmp_path):
    """on_progress reports bytes read from disk (compressed bytes for .gz) up to the size;
    a malformed event early in a large file fails without reading the rest."""
    doc = gpu_trace()
    doc["traceEvents"] += [_x("cpu_op", "aten::add", 100, 100, float(i), 1.0, pad="y" * 200)
                           for i in range(20000)]  # ~6 MB: several 1 MiB chunks
    for gz in (False, True):
        p = _write(tmp_path / "t.json", doc, gz)
        seen = []
        summarize_traces([str(p)], on_progress=lambda *a, _seen=seen: _seen.append(a))
        size = os.path.getsize(p)
        assert len(seen) >= (2 if gz else 5) and seen[-1] == (str(p), size, size)
        assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)
    text = json.dumps(doc, indent=1)
    p = tmp_path / "bad.json"
    p.write_text(text.replace('"cat": "cpu_op"', '"cat": cpu_op', 1))
    seen = []
    with pytest.raises(TraceError, match="malformed JSON at character"):
        summarize_traces([str(p)], on_progress=lambda *a: seen.append(a[1]))
    assert max(seen) < os.path.getsize(p) / 2


def test_error_truncated_json_and_gzip(tmp_path, monkeypatch, capsys):
    full = json.dumps(gpu_trace()).encode()
    p = tmp_path / "cut.json"
    p.write_bytes(full[: len(full) // 2])
    assert "the trace is truncated" in _error([str(p)], monkeypatch, capsys)
    z = gzip.compress(full)
    p = tmp_path / "cut.json.gz"
    p.write_bytes(z[: len(z) - 20])
    assert "truncated gzip stream" in _error([str(p)], monkeypatch, capsys)
    p.write_bytes(z[:10] + bytes(b ^ 0x55 for b in z[10:40]) + z[40:])
    assert "corrupt gzip data" in _error([str(p)], monkeypatch, capsys)


def test_error_no_matching_regions(tmp_path, monkeypatch, capsys):
    doc = gpu_trace()
    p = _write(tmp_path / "t.json", doc)
    err = _error([str(p), "--pattern", "nothing_like_this"], monkeypatch, capsys)
    assert "no region named" in err and "nothing_like_this" in err
    assert "invalid --pattern regex" in _error([str(p), "--pattern", "("], monkeypatch, capsys)
    # the same regions found with a custom pattern
    assert _main(["profile-bandwidth", str(p), "--json", "--pattern", "fused_moe_wv.*"],
                 monkeypatch) == 0
    assert len(json.loads(capsys.readouterr().out)["summaries"]) == 2


def test_api_raises_trace_error(tmp_path):
    p = _write(tmp_path / "t.json", gpu_trace())
    with pytest.raises(TraceError, match="no region named"):
        summarize_traces([str(p)], patterns=["other"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="directory holds no"):
        summarize_traces([str(tmp_path / "empty")])


def test_error_unexpected_shape(tmp_path, monkeypatch, capsys):
    doc = gpu_trace()
    doc["traceEvents"].append(_x("user_annotation", "hybrid_triton_moe 12x34 E=1 top_k=1",
                                 100, 100, 5000.0, 1.0))
    p = _write(tmp_path / "t.json", doc)
    err = _error([str(p)], monkeypatch, capsys)
    assert "'hybrid_triton_moe 12x34 E=1 top_k=1' has no shape" in err
    assert "--skip-unparsed" in err
    assert _main(["profile-bandwidth", str(p), "--skip-unparsed", "--json"], monkeypatch) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("hybrid_triton_moe 12x34" in n for n in notes)


def test_error_bad_table(tmp_path, monkeypatch, capsys):
    text = (FIXTURES / "profiler_out_0.txt").read_text().replace("      48  \n", "     4x8  \n", 1)
    p = tmp_path / "profiler_out_1.txt"
    p.write_text(text)
    assert "'# of Calls' holds '4x8'" in _error([str(p)], monkeypatch, capsys)


# --------------------------------------------------------------------------- big trace


def test_large_trace_streams_in_bounded_memory(tmp_path):
    """~50 MB of trace: peak traced memory stays within twice the file size (json.load
    alone needs several times the size), and the summary is exact."""
    path = tmp_path / "big.json"
    # events as kineto writes them (one field per line, indented; a kernel event carries
    # a dozen args and, for templated CUDA code, a name of a thousand characters or more),
    # from templates: json.dumps per event would dominate the test's time
    kname = ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_"
             "tn_align8<cute::tuple<int, int, int>, cute::Layout<cute::Shape<int, int>>>>("
             + ", ".join(f"cutlass::gemm::GemmParams<{i}>" for i in range(40)) + ")")
    region = """  {
    "ph": "X", "cat": "user_annotation", "name": "RNAME",
    "pid": 1, "tid": 1,
    "ts": %.3f, "dur": 50.000,
    "args": {
      "External id": %d, "Record function id": 0, "Ev Idx": %d
    }
  }""".replace("RNAME", D1)
    op = """  {
    "ph": "X", "cat": "cpu_op", "name": "aten::empty",
    "pid": 1, "tid": 1,
    "ts": %.3f, "dur": 2.000,
    "args": {
      "External id": %d, "Record function id": 0, "Sequence number": 0,
      "Fwd thread id": 0, "Ev Idx": %d
    }
  }"""
    launch = """  {
    "ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel",
    "pid": 1, "tid": 1,
    "ts": %.3f, "dur": 5.000,
    "args": {
      "External id": %d, "cbid": 211, "correlation": %d
    }
  }"""
    kernel = """  {
    "ph": "X", "cat": "kernel", "name": "KNAME",
    "pid": 0, "tid": 7,
    "ts": %.3f, "dur": %.3f,
    "args": {
      "External id": %d, "queued": 0, "device": 0, "context": 1,
      "stream": 7, "correlation": %d,
      "registers per thread": 64, "shared memory": 16384,
      "blocks per SM": 2.000000, "warps per SM": 16.000000,
      "grid": [264, 1, 1], "block": [256, 1, 1],
      "est. achieved occupancy %%": 25
    }
  }""".replace("KNAME", kname)
    flows = """  {
    "ph": "f", "id": %d, "pid": 0, "tid": 7, "ts": %.3f,
    "cat": "ac2g", "name": "ac2g", "bp": "e"
  }"""
    n = 0
    with open(path, "w") as f:
        f.write('{\n  "schemaVersion": 1,\n  "deviceProperties": [{"id": 0, "name": "GPU"}],\n'
                '  "traceEvents": [\n')
        while f.tell() < 50_000_000:
            lines = []
            for _ in range(1000):
                ts = 100.0 * n
                lines += [region % (ts, n, n), op % (ts + 1, n, n), launch % (ts + 10, n, n),
                          kernel % (ts + 20, 1 + n % 4, n, n), flows % (n, ts + 20)]
                n += 1
            f.write(",\n".join(lines) + ",\n")
        f.write('  {"ph": "X", "cat": "Trace", "name": "PyTorch Profiler (0)", "pid": "Spans",'
                ' "tid": "PyTorch Profiler", "ts": 0, "dur": %.1f}\n  ],\n'
                '  "traceName": "big.json"\n}\n' % (100.0 * n))
    size = os.path.getsize(path)
    assert size > 49_000_000
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        out = summarize_traces([str(path)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    (s,) = out
    # kernel times cycle 1, 2, 3, 4 us (n is a multiple of 4): mean 2.5, p90 4
    assert s.calls == n and s.total_us == pytest.approx(2.5 * n)
    assert (s.median_us, s.p90_us, s.share_pct) == (2.5, 4.0, pytest.approx(100.0))
    assert s.source == "kernels" and out.device == "GPU"
    assert peak < 2 * size, f"peak {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB trace"
    print(f"{size / 1e6:.0f} MB trace, {n} regions: {elapsed:.1f} s, peak {peak / 1e6:.0f} MB")


def test_h100_trace_from_w4a16moe_profile_checked_by_hand():
    """A trace captured on the H100 by `w4a16moe profile --tokens 1,8,512 --iters 5`
    (qwen3-30b-a3b shape, bf16). Checked by hand once from the raw events: the five
    `fused_moe_wvsplitk_int4 1x1536x2048 E=128 top_k=8` regions each launch one
    `_decode_gemm1_kernel` (cuLaunchKernelEx -> kernel by correlation id) of 9.536, 9.152,
    9.376, 9.345 and 9.441 us: total 46.85 us, mean 9.37 us. Bytes by DESIGN section 7 with
    u = 128 * (1 - (1 - 8/128)^1) = 8 experts: 8*1536*2048/2 + 8*1536*(2048/128)*2
    + 1*2048*2 + 1*8*1536*2 = 12_582_912 + 393_216 + 4_096 + 24_576 = 13_004_800 bytes,
    i.e. 13_004_800 / 9.37 us = 1388 GB/s."""
    from pathlib import Path

    from w4a16moe.profiling import summarize_traces

    trace = Path(__file__).parent / "fixtures" / "h100_profile_trace.json.gz"
    rows = summarize_traces([str(trace)], peak_gbps=3078.0)
    assert rows.device == "NVIDIA H100 80GB HBM3"
    by_shape = {(r.kernel, r.m, r.n, r.k): r for r in rows}
    assert len(by_shape) == 6  # two GEMMs at each of M = 1, 8, 512
    r = by_shape[("fused_moe_wvsplitk_int4", 1, 1536, 2048)]
    assert r.source == "kernels"
    assert r.calls == 5
    assert r.total_us == pytest.approx(46.85, abs=1e-3)
    assert r.mean_us == pytest.approx(9.37, abs=1e-3)
    assert r.bytes_per_call == pytest.approx(13_004_800)
    assert r.gbps == pytest.approx(13_004_800 / 9.37e3, rel=1e-4)
    assert r.peak_pct == pytest.approx(100 * r.gbps / 3078.0, rel=1e-6)
    # M=512 ran the prefill kernel; its second GEMM reads M*top_k rows
    assert by_shape[("hybrid_triton_moe", 512, 2048, 768)].input_rows == 4096
    assert rows[0].kernel == "hybrid_triton_moe" and rows[0].m == 512  # largest total first
