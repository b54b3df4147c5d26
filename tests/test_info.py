"""``w4a16moe info``: what it reports on a CPU, and on a GPU which tuned files it uses."""

from __future__ import annotations

import json
import types

import torch

from w4a16moe import info
from w4a16moe.kernels import configs as cfgmod

H100 = {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "multiprocessors": 132}


def _fake_gpu(monkeypatch, tmp_path, name, capability=(9, 0), sms=132):
    props = types.SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                  multi_processor_count=sms, total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(cfgmod, "CONFIG_DIR", tmp_path)
    cfgmod._cached_sibling.cache_clear()


def _write(path, gpu):
    path.write_text(json.dumps({"_meta": {"device": gpu["name"], "gpu": gpu}}))


def test_collect_on_a_cpu_reports_versions_and_no_tuned_files(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    got = info.collect()
    for key in ("w4a16moe", "python", "torch", "triton", "device", "triton_mode"):
        assert key in got
    assert "prefill_tiles" not in got and got["device"].startswith("cpu")


def test_tuned_files_own_borrowed_and_none(monkeypatch, tmp_path, capsys):
    _write(tmp_path / "NVIDIA_H100_80GB_HBM3.json", H100)
    _write(tmp_path / "NVIDIA_H100_80GB_HBM3_thresholds.json", H100)
    _fake_gpu(monkeypatch, tmp_path, "NVIDIA H100 80GB HBM3")
    got = info.collect()
    assert got["prefill_tiles"]["source"] == "own"
    assert got["switch_points"]["file"].endswith("NVIDIA_H100_80GB_HBM3_thresholds.json")

    _write(tmp_path / "NVIDIA_H200_thresholds.json", {**H100, "name": "NVIDIA H200"})
    _fake_gpu(monkeypatch, tmp_path, "NVIDIA H200")
    got = info.collect()
    assert got["prefill_tiles"] == {"source": "sibling", "tuned_on": H100["name"],
                                    "file": str(tmp_path / "NVIDIA_H100_80GB_HBM3.json")}
    assert got["switch_points"]["source"] == "own"
    assert info.run(types.SimpleNamespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "borrowed" in out and "NVIDIA_H100_80GB_HBM3.json" in out

    _fake_gpu(monkeypatch, tmp_path, "NVIDIA A100-SXM4-80GB", (8, 0), 108)
    got = info.collect()
    assert got["prefill_tiles"] == {"source": "none", "file": None, "tuned_on": None}
    assert info.run(types.SimpleNamespace(json=True)) == 0
    assert json.loads(capsys.readouterr().out)["switch_points"]["source"] == "none"
