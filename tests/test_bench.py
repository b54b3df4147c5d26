"""The benchmark harness on the CPU: floors, config parsing, baselines, records, CLI fallback."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from w4a16moe.bench import baseline
from w4a16moe.bench.cli import append_records, parse_ms, records_table
from w4a16moe.bench.cli import register as register_bench
from w4a16moe.bench.floors import (
    distinct_experts,
    expected_experts,
    layer_bytes,
    layer_floor,
    layer_flops,
)
from w4a16moe.bench.layer import RECORD_KEYS, LayerCopies, bench_layer, fast_random_experts
from w4a16moe.bench.models import MODELS, MoEShape, get_shape, shape_from_config
from w4a16moe.bench.paths import PATHS, PathSpec, get_path
from w4a16moe.bench.timing import DeviceRates, copies_for, time_calls
from w4a16moe.quantize import random_experts
from w4a16moe.reference import moe_reference
from w4a16moe.routing import fused_topk

QWEN3 = MODELS["qwen3-30b-a3b"]
MIXTRAL = MODELS["mixtral-8x7b"]
TINY = MoEShape("tiny", num_experts=8, top_k=2, hidden_size=256, intermediate_size=128)
RATES = DeviceRates("test", read_gbps=1000.0, matmul_tflops=100.0, read_method="fixed",
                    matmul_method="fixed")


# -- models ----------------------------------------------------------------------------------
def test_builtin_shapes_match_the_hf_configs():
    s = get_shape("Qwen3-30B-A3B")
    assert (s.num_experts, s.top_k, s.hidden_size, s.intermediate_size, s.num_layers) == \
        (128, 8, 2048, 768, 48)
    assert (MIXTRAL.num_experts, MIXTRAL.top_k, MIXTRAL.hidden_size,
            MIXTRAL.intermediate_size, MIXTRAL.num_layers) == (8, 2, 4096, 14336, 32)
    ds = MODELS["deepseek-v2-lite"]
    assert (ds.num_experts, ds.top_k, ds.intermediate_size, ds.num_shared_experts,
            ds.num_layers, ds.num_moe_layers, ds.renormalize) == (64, 6, 1408, 2, 27, 26, False)
    big = MODELS["qwen3-235b-a22b"]
    assert (big.num_experts, big.top_k, big.hidden_size, big.intermediate_size,
            big.num_layers) == (128, 8, 4096, 1536, 94)
    ol = MODELS["olmoe-1b-7b"]
    assert (ol.num_experts, ol.top_k, ol.hidden_size, ol.intermediate_size, ol.num_layers,
            ol.renormalize) == (64, 8, 2048, 1024, 16, False)
    with pytest.raises(ValueError, match="unknown model 'llama'"):
        get_shape("llama")


def test_shape_validation():
    with pytest.raises(ValueError, match="top_k=9 exceeds num_experts=8"):
        MoEShape("x", num_experts=8, top_k=9, hidden_size=256, intermediate_size=128)
    with pytest.raises(ValueError, match="intermediate_size=100 is not a multiple of 8"):
        MoEShape("x", num_experts=8, top_k=2, hidden_size=256, intermediate_size=100)
    assert TINY.group_for(256) == 128 and TINY.scaled(group_size=64).group_for(128) == 64
    assert MoEShape("x", 8, 2, 256, 72).group_for(72) == 72  # G does not divide: per channel


def _write(tmp_path, cfg, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("cfg,expected", [
    ({"model_type": "qwen3_moe", "hidden_size": 2048, "num_experts": 128,
      "num_experts_per_tok": 8, "moe_intermediate_size": 768, "num_hidden_layers": 48,
      "norm_topk_prob": True, "hidden_act": "silu", "decoder_sparse_step": 1,
      "mlp_only_layers": [], "intermediate_size": 6144},
     dict(num_experts=128, top_k=8, intermediate_size=768, renormalize=True,
          num_moe_layers=48)),
    ({"model_type": "qwen2_moe", "hidden_size": 2048, "num_experts": 60,
      "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "num_hidden_layers": 24,
      "shared_expert_intermediate_size": 5632, "mlp_only_layers": [0, 1],
      "decoder_sparse_step": 1},
     dict(num_experts=60, top_k=4, intermediate_size=1408, renormalize=False,
          num_moe_layers=22, num_shared_experts=1, shared_intermediate_size=5632)),
    ({"model_type": "mixtral", "hidden_size": 4096, "num_local_experts": 8,
      "num_experts_per_tok": 2, "intermediate_size": 14336, "num_hidden_layers": 32},
     dict(num_experts=8, top_k=2, intermediate_size=14336, renormalize=True)),
    ({"model_type": "deepseek_v2", "hidden_size": 2048, "n_routed_experts": 64,
      "num_experts_per_tok": 6, "moe_intermediate_size": 1408, "intermediate_size": 10944,
      "num_hidden_layers": 27, "n_shared_experts": 2, "first_k_dense_replace": 1,
      "moe_layer_freq": 1, "norm_topk_prob": False, "topk_method": "greedy", "n_group": 1,
      "topk_group": 1, "scoring_func": "softmax", "routed_scaling_factor": 1.0},
     dict(num_experts=64, top_k=6, intermediate_size=1408, renormalize=False,
          num_moe_layers=26, num_shared_experts=2, num_expert_group=None, scoring="softmax")),
    ({"model_type": "deepseek_v3", "hidden_size": 7168, "n_routed_experts": 256,
      "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
      "n_shared_experts": 1, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
      "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
      "routed_scaling_factor": 2.5},
     dict(num_experts=256, top_k=8, num_moe_layers=58, num_expert_group=8, topk_group=4,
          correction_bias=True, scoring="sigmoid", routed_scaling_factor=2.5)),
    ({"model_type": "olmoe", "hidden_size": 2048, "num_experts": 64, "num_experts_per_tok": 8,
      "intermediate_size": 1024, "num_hidden_layers": 16, "norm_topk_prob": False},
     dict(num_experts=64, top_k=8, intermediate_size=1024, renormalize=False)),
    ({"model_type": "granitemoe", "hidden_size": 1024, "num_local_experts": 32,
      "num_experts_per_tok": 8, "intermediate_size": 512, "num_hidden_layers": 24},
     dict(num_experts=32, top_k=8, intermediate_size=512, renormalize=True)),
])
def test_shape_from_config(tmp_path, cfg, expected):
    shape = shape_from_config(_write(tmp_path, cfg))
    for key, value in expected.items():
        assert getattr(shape, key) == value, key
    assert shape.hidden_size == cfg["hidden_size"]
    # a directory holding config.json works too
    assert shape_from_config(tmp_path) == shape


def test_shape_from_config_errors(tmp_path):
    with pytest.raises(ValueError, match="model_type 'llama' is not a supported MoE model"):
        shape_from_config(_write(tmp_path, {"model_type": "llama", "hidden_size": 4096}))
    with pytest.raises(ValueError, match="lacks 'num_local_experts'"):
        shape_from_config(_write(tmp_path, {"model_type": "mixtral", "hidden_size": 4096,
                                            "num_experts_per_tok": 2, "num_hidden_layers": 2,
                                            "intermediate_size": 512}))
    with pytest.raises(ValueError, match="lacks 'moe_intermediate_size'"):
        shape_from_config(_write(tmp_path, {"model_type": "qwen3_moe", "hidden_size": 2048,
                                            "num_experts": 8, "num_experts_per_tok": 2,
                                            "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="hidden_act 'relu2' is not supported"):
        shape_from_config(_write(tmp_path, {"model_type": "olmoe", "hidden_size": 64,
                                            "num_experts": 8, "num_experts_per_tok": 2,
                                            "num_hidden_layers": 2, "intermediate_size": 64,
                                            "hidden_act": "relu2"}))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        shape_from_config(bad)
    with pytest.raises(FileNotFoundError):
        shape_from_config(tmp_path / "missing.json")


def test_shape_from_multimodal_text_config(tmp_path):
    cfg = {"model_type": "some_vlm", "text_config": {
        "model_type": "qwen3_moe", "hidden_size": 512, "num_experts": 16,
        "num_experts_per_tok": 4, "moe_intermediate_size": 256, "num_hidden_layers": 4}}
    shape = shape_from_config(_write(tmp_path, cfg), name="vlm")
    assert (shape.name, shape.num_experts, shape.intermediate_size) == ("vlm", 16, 256)


# -- floors ----------------------------------------------------------------------------------
def test_expected_experts():
    assert expected_experts(128, 8, 1) == pytest.approx(8.0)
    assert expected_experts(128, 8, 2) == pytest.approx(15.5)  # 128 * (1 - (120/128)^2)
    assert expected_experts(8, 2, 0) == 0.0
    assert expected_experts(8, 2, 10**6) == pytest.approx(8.0)


def test_distinct_experts():
    ids = torch.tensor([[0, 3], [3, 5], [0, 7]])
    assert distinct_experts(ids) == 4
    emap = torch.tensor([0, -1, -1, 1, -1, -1, -1, -1], dtype=torch.int32)
    assert distinct_experts(ids, emap) == 2


def test_layer_bytes_by_hand():
    # qwen3 M=1, u=8. GEMM1: 8*1536*2048/2 + 8*1536*16*2 + 2048*2 + 8*768*2
    g1 = 12_582_912 + 393_216 + 4_096 + 12_288
    # GEMM2: 8*2048*768/2 + 8*2048*6*2 + 8*768*2 + 2048*2
    g2 = 6_291_456 + 196_608 + 12_288 + 4_096
    assert layer_bytes(QWEN3, 1) == pytest.approx(g1 + g2) == 19_496_960
    assert layer_bytes(QWEN3, 1, zeros=True) == 19_496_960 + 8 * 1536 * 16 + 8 * 2048 * 6
    # the same layer with bf16 weights
    assert layer_bytes(QWEN3, 1, u=8, weight_format="bf16") == \
        8 * 1536 * 2048 * 2 + 4_096 + 12_288 + 8 * 2048 * 768 * 2 + 12_288 + 4_096
    # mixtral M=1, u=2
    assert layer_bytes(MIXTRAL, 1) == 121_176_064 + 60_620_800
    with pytest.raises(ValueError, match="weight_format"):
        layer_bytes(QWEN3, 1, weight_format="fp8")


def test_layer_flops_and_floor():
    assert layer_flops(QWEN3, 1) == 2 * 8 * (1536 * 2048 + 768 * 2048) == 75_497_472
    fl = layer_floor(QWEN3, 1, read_gbps=2940.0, matmul_tflops=790.0)
    assert fl.memory_us == pytest.approx(19_496_960 / 2.94e12 * 1e6)
    assert fl.compute_us == pytest.approx(75_497_472 / 790e12 * 1e6)
    assert fl.us == fl.memory_us and fl.bound == "memory"
    big = layer_floor(QWEN3, 8192, read_gbps=2940.0, matmul_tflops=790.0)
    assert big.bound == "compute"
    assert big.us == pytest.approx(2 * 8192 * 8 * 4_718_592 / 790e12 * 1e6)
    with pytest.raises(ValueError, match="positive measured rates"):
        layer_floor(QWEN3, 1, 0.0, 790.0)


# -- baselines -------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [baseline.bf16_grouped_mm, baseline.bf16_bmm,
                                baseline.bf16_expert_loop])
@pytest.mark.parametrize("m", [1, 5])
def test_baselines_match_reference(fn, m):
    experts = random_experts(8, 64, 32, group_size=32, dtype=torch.bfloat16, seed=3)
    w13, w2 = experts.dequantize(torch.float32)
    weights = (w13.to(torch.bfloat16), w2.to(torch.bfloat16))
    x = torch.randn(m, 64).to(torch.bfloat16)
    tw, ti = fused_topk(torch.randn(m, 8), 2)
    out = fn(x, weights, tw, ti, activation="silu")
    assert out.shape == (m, 64) and out.dtype == torch.bfloat16
    ref = moe_reference(x, experts, tw, ti)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 2e-2
    oracle = baseline.dense_reference(x, *weights, tw, ti)
    assert (oracle - ref).norm() / ref.norm() < 1e-2


def test_baseline_rejects_bad_shapes():
    w13, w2 = torch.zeros(4, 16, 32), torch.zeros(4, 32, 8)
    with pytest.raises(ValueError, match="hidden_states has shape"):
        baseline.bf16_expert_loop(torch.zeros(2, 16), (w13, w2), torch.ones(2, 1),
                                  torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="w2 has shape"):
        baseline.bf16_bmm(torch.zeros(2, 32), (w13, torch.zeros(4, 32, 9)), torch.ones(2, 1),
                          torch.zeros(2, 1, dtype=torch.int32))


# -- paths, copies, timing -------------------------------------------------------------------
def test_path_registry(monkeypatch):
    assert {"decode", "prefill", "hybrid", "bf16", "reference"} <= set(PATHS)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "need a GPU" in PATHS["decode"].unavailable("cpu")
    assert PATHS["bf16"].unavailable("cpu") is None
    adhoc = get_path("mine=w4a16moe.reference:moe_reference")
    assert adhoc.name == "mine" and adhoc.resolve() is moe_reference
    missing = PathSpec("nope", "w4a16moe.no_such_module:fn")
    assert "cannot import" in missing.unavailable("cuda")
    with pytest.raises(ValueError, match="unknown path 'fast'"):
        get_path("fast")
    with pytest.raises(ValueError, match="exactly one of target or variants"):
        PathSpec("bad")


def test_fast_random_experts_are_valid():
    e = fast_random_experts(TINY, torch.float16, torch.device("cpu"), seed=1)
    assert e.w13.qweight.shape == (8, 256, 32) and e.w2.scales.shape == (8, 256, 1)
    assert e.dtype == torch.float16
    lc = LayerCopies(TINY, torch.bfloat16, torch.device("cpu"))
    assert lc.exact
    w13, w2 = lc.bf16(0)
    assert torch.equal(w13, lc.int4(0).w13.dequantize(torch.float32).to(torch.bfloat16))
    assert lc.copy_bytes("int4") == lc.int4(0).nbytes
    assert copies_for(1e6, 1e9, torch.device("cpu")) == 1


def test_time_calls_cpu():
    x = torch.randn(64, 64)
    t = time_calls([lambda: x @ x, lambda: x @ x], "cpu", target_ms=5)
    assert t.method == "cpu" and t.median_us > 0 and t.calls_per_rep == 2 and t.reps >= 3
    with pytest.raises(ValueError, match="calls is empty"):
        time_calls([], "cpu")
    with pytest.raises(ValueError, match="min_calls is 0"):
        time_calls([lambda: x @ x], "cpu", min_calls=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_time_calls_repeats_calls_in_the_graph():
    x = torch.randn(256, 256, device="cuda")
    calls = [lambda: x @ x, lambda: x @ x]
    assert time_calls(calls, "cuda", target_ms=5).calls_per_rep == 2
    assert time_calls(calls, "cuda", target_ms=5, min_calls=5).calls_per_rep == 6
    t = time_calls(calls, "cuda", target_ms=5, min_replay_us=500.0, max_repeat=8)
    assert t.method == "cuda_graph" and 2 < t.calls_per_rep <= 16 and t.median_us > 0


# -- bench_layer records ---------------------------------------------------------------------
def test_bench_layer_records():
    steps = []
    recs = bench_layer(TINY, [3, 1], ["bf16", "bf16-loop", "reference"], "bf16", "cpu",
                       rates=RATES, target_ms=2, on_step=steps.append)
    assert [(r["M"], r["path"]) for r in recs] == [
        (1, "bf16"), (1, "bf16-loop"), (1, "reference"),
        (3, "bf16"), (3, "bf16-loop"), (3, "reference")]
    assert len(steps) == 6
    for r in recs:
        assert set(RECORD_KEYS) <= set(r)
        assert r["error"] is None and r["kernel_us"] > 0 and r["layer_us"] > 0
        assert r["timing"] == "cpu" and r["device"] == "cpu" and r["model"] == "tiny"
        assert r["bf16_us"] == next(x["kernel_us"] for x in recs
                                    if x["M"] == r["M"] and x["path"] == "bf16")
        assert r["floor_us"] == pytest.approx(layer_floor(TINY, r["M"], 1000.0, 100.0,
                                                          u=r["u"]).us)
        assert r["rel_err"] < (1e-5 if r["path"] == "reference" else 2e-2)
        assert r["impl"] in ("bf16-grouped", "bf16-loop", "reference")
        assert r["clocks"] is None and r["layer_clocks"] is None  # no NVML on a CPU
    json.dumps(recs)  # records are JSON-serialisable


def test_bench_layer_reports_a_failing_path():
    def broken(x, w, tw, ti, *, activation):
        raise RuntimeError("kernel exploded")

    PATHS["broken-test"] = PathSpec("broken-test", broken, weights="bf16")
    try:
        logs = []
        recs = bench_layer(TINY, [2], ["broken-test", "hybrid-missing=no.such:fn"], "bf16",
                           "cpu", rates=RATES, target_ms=1, log=logs.append)
    finally:
        del PATHS["broken-test"]
    assert len(recs) == 1 and recs[0]["kernel_us"] is None
    assert "kernel exploded" in recs[0]["error"]
    assert any("skipping path hybrid-missing" in m for m in logs)


# -- CLI -------------------------------------------------------------------------------------
def test_parse_ms():
    assert parse_ms("1,2,4,8") == [1, 2, 4, 8]
    assert parse_ms("1..16,3") == [1, 2, 3, 4, 8, 16]
    for bad in ("0", "a", ""):
        with pytest.raises(ValueError):
            parse_ms(bad)


def test_append_records(tmp_path):
    path = str(tmp_path / "r" / "results.json")
    assert append_records(path, [{"M": 1}]) == 1
    assert append_records(path, [{"M": 2}, {"M": 4}]) == 3
    assert [r["M"] for r in json.load(open(path))] == [1, 2, 4]
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        append_records(str(tmp_path / "bad.json"), [])


def _bench_args(argv):
    parser = argparse.ArgumentParser(prog="w4a16moe")
    register_bench(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_cli_cpu_fallback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = _write(tmp_path, {"model_type": "mixtral", "hidden_size": 256, "num_local_experts": 4,
                            "num_experts_per_tok": 2, "intermediate_size": 128,
                            "num_hidden_layers": 2})
    out = tmp_path / "res.json"
    args = _bench_args(["--config", str(cfg), "--m", "1,2", "--device", "cpu", "--json",
                        "--target-ms", "2", "--out", str(out)])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    recs = json.loads(captured.out)
    assert {r["path"] for r in recs} == {"bf16"}  # decode/prefill/hybrid need a GPU here
    assert "need a GPU" in captured.err
    assert len(json.load(open(out))) == 2
    # the readable table
    args = _bench_args(["--config", str(cfg), "--m", "1", "--device", "cpu", "--target-ms", "2",
                        "--paths", "bf16,reference"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "kernel us" in text and "reference" in text


def test_records_table_and_plot(tmp_path):
    recs = bench_layer(TINY, [1, 2], ["bf16", "reference"], "bf16", "cpu", rates=RATES,
                       target_ms=1, layer_time=False)
    assert records_table(recs).row_count == 4
    assert records_table(recs).caption is None  # no clocks on a CPU: nothing marked
    pytest.importorskip("matplotlib")
    from w4a16moe.bench.plot import plot_records

    png = plot_records(recs, tmp_path / "t.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no records with layer_us"):
        plot_records(recs, tmp_path / "u.png", metric="layer_us")


def test_time_path_cycles_weights_under_more_routings():
    """With more routings than weight copies (MIN_ROUTINGS on a GPU), call i runs on copy
    i % copies, so every path sees the same routings while consecutive calls still take
    different copies."""
    from w4a16moe.bench import layer as layer_mod

    class Copies:
        asked: list[int] = []

        def weights(self, kind, i):
            self.asked.append(i)
            return i

    class Inp:
        x = topk_weights = topk_ids = None

    seen = []
    spec = dataclasses.replace(layer_mod.get_path("reference"), graph_safe=False)
    layer_mod._time_path(spec, lambda x, w, tw, ti, activation: seen.append(w), Copies(),
                         [Inp() for _ in range(5)], "silu", False, torch.device("cpu"), 1.0,
                         n_weights=2)
    assert Copies.asked == [0, 1, 0, 1, 0]
    assert seen[:5] == [0, 1, 0, 1, 0]
    assert layer_mod.MIN_ROUTINGS >= 2


def test_int4_paths_are_checked_against_their_own_weights_on_a_cpu():
    """On a CPU a large layer's float copies are random fill-ins, not the int4 weights
    dequantized (exact dequantization there is slow): the int4 paths must then be checked
    against the int4 weights and the float paths against the fill-ins, each close to its
    own oracle (before, the int4 paths were measured against the fill-ins: rel err ~1e2)."""
    big = MoEShape("big", num_experts=8, top_k=2, hidden_size=1024, intermediate_size=768)
    assert not LayerCopies(big, torch.bfloat16, torch.device("cpu")).exact
    recs = bench_layer(big, [1], ["bf16-loop", "reference"], "bf16", "cpu", rates=RATES,
                       target_ms=1, layer_time=False)
    errs = {r["path"]: r["rel_err"] for r in recs}
    assert errs["bf16-loop"] < 2e-2 and errs["reference"] < 2e-2, errs
