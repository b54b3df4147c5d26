"""`w4a16moe profile`: profiles the hybrid layer and summarises its annotated GEMMs."""

import json

import pytest
import torch

from w4a16moe.cli import main

TINY = {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
        "hidden_size": 128, "moe_intermediate_size": 128, "num_hidden_layers": 1,
        "hidden_act": "silu", "norm_topk_prob": True}


def test_profile_writes_trace_and_summarises_both_paths(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    trace = tmp_path / "trace.json.gz"
    dtype = "bf16" if torch.cuda.is_available() else "fp16"
    rc = main(["profile", "--config", str(cfg), "--tokens", "1,3", "--decode-threshold", "1",
               "--iters", "2", "--trace", str(trace), "--dtype", dtype, "--json"])
    assert rc == 0
    assert trace.exists() and trace.stat().st_size > 0
    rows = json.loads(capsys.readouterr().out)["summaries"]
    names = {(r["kernel"], r["m"], r["n"], r["k"]) for r in rows}
    # M=1 ran the decode kernel, M=3 the prefill kernel; two GEMMs each
    assert ("fused_moe_wvsplitk_int4", 1, 256, 128) in names
    assert ("fused_moe_wvsplitk_int4", 1, 128, 128) in names
    assert ("hybrid_triton_moe", 3, 256, 128) in names
    assert ("hybrid_triton_moe", 3, 128, 128) in names
    assert all(r["calls"] == 2 for r in rows)


def test_profile_rejects_bad_tokens(capsys):
    assert main(["profile", "--tokens", "1,x"]) == 1
    assert "--tokens" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only message")
def test_profile_without_gpu_or_interpreter_says_why(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["profile", "--tokens", "1"]) == 1
    assert "need a GPU" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    """``python -m w4a16moe`` is the ``w4a16moe`` command (for a checkout that is not
    installed, e.g. ``PYTHONPATH=. python3 -m w4a16moe tune ...`` on a GPU machine)."""
    import subprocess
    import sys

    import w4a16moe

    run = subprocess.run([sys.executable, "-m", "w4a16moe", "--version"], capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert w4a16moe.__version__ in run.stdout
    run = subprocess.run([sys.executable, "-m", "w4a16moe", "tune", "--help"],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "--model" in run.stdout
