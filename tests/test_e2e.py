"""End-to-end benchmark code (integrations/e2e.py) with a tiny Qwen3-MoE config.

The CUDA-graph modes and the real 48-layer model run on the GPU (the integrator's benchmark);
here the eager modes run on ``conftest.DEVICE``: in fp16 under the Triton interpreter on the
CPU, in bf16 (the benchmark's GPU dtype) with the compiled kernels on a GPU.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DEVICE, ON_GPU

pytest.importorskip("transformers")

from w4a16moe.integrations.e2e import (  # noqa: E402
    COMPILE_KWARGS,
    CUDA_ONLY_MODES,
    MODES,
    QWEN3_30B_A3B,
    RECORD_KEYS,
    GreedyRunner,
    bench_e2e,
    build_random_model,
    compile_kwargs,
    compile_options_from_args,
    decode_bytes,
    e2e_config,
    format_records,
    parse_cases,
    parse_modes,
    run_e2e,
)
from w4a16moe.integrations.transformers import W4A16Experts, find_moe_blocks  # noqa: E402

TINY = dict(QWEN3_30B_A3B, vocab_size=96, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=64, max_window_layers=2, bos_token_id=1, eos_token_id=2)


def test_e2e_config():
    cfg = e2e_config("qwen3-30b-a3b")
    assert cfg.model_type == "qwen3_moe"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
            cfg.moe_intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.vocab_size) == (48, 2048, 128, 8, 768, 32, 4, 128, 151936)
    assert cfg.norm_topk_prob is True
    assert e2e_config("Qwen3-30B-A3B", num_layers=4).num_hidden_layers == 4
    with pytest.raises(ValueError, match="neither a built-in config"):
        e2e_config("no-such-model")
    with pytest.raises(ValueError, match="num_layers is 0"):
        e2e_config("qwen3-30b-a3b", num_layers=0)


def test_config_from_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "quantization_config": {}}))
    cfg = e2e_config(str(tmp_path), num_layers=1)
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 1


def test_decode_bytes_counts_active_experts():
    cfg = e2e_config(TINY)
    bf16 = build_random_model(cfg, "bf16", "cpu", torch.float16, group_size=32)
    int4 = build_random_model(cfg, "int4", "cpu", torch.float16, group_size=32)
    assert all(isinstance(r.experts, W4A16Experts)
               for r in find_moe_blocks(int4, include_swapped=True))
    b, q = decode_bytes(bf16, context=10), decode_bytes(int4, context=10)
    e, k, h, i, layers = 8, 2, 64, 32, 2
    assert b["experts"] == layers * k * 3 * h * i * 2  # two active fp16 experts per layer
    groups = 3 * h * i // 32  # one fp16 scale per 32 weights
    assert q["experts"] == layers * k * (3 * h * i // 2 + groups * 2)
    assert b["non_expert"] == q["non_expert"]
    emb = 96 * 64 * 2
    total = sum(p.numel() * p.element_size() for p in bf16.parameters())
    assert b["non_expert"] == total - emb - layers * e * 3 * h * i * 2
    assert b["kv_cache"] == 10 * layers * 2 * 16 * 2 * 2  # ctx x layers x (K+V) x heads x dim
    assert b["total"] == b["non_expert"] + b["experts"] + b["kv_cache"]


def test_bench_e2e_eager(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    records = run_e2e(TINY, 2, parse_cases("4/3,5/1"), ("bf16-eager", "int4-eager"),
                      out=str(out), device=DEVICE, dtype=dtype, group_size=32,
                      read_gbps=20.0, decode_threshold=1)
    assert json.loads(out.read_text()) == records
    printed = capsys.readouterr().out
    assert "int4-eager" in printed and "4/3" in printed and "appended 4 records" in printed
    assert [(r["mode"], r["prompt_len"], r["new_tokens"]) for r in records] == [
        ("bf16-eager", 4, 3), ("int4-eager", 4, 3), ("bf16-eager", 5, 1), ("int4-eager", 5, 1)]
    for r in records:
        assert set(RECORD_KEYS) <= set(r) and "error" not in r, r
        assert r["ttft_ms"] > 0 and r["floor_tpot_ms"] > 0
        assert r["bf16_ttft_ms"] == records[0 if r["new_tokens"] == 3 else 2]["ttft_ms"]
        assert r["model"] == "qwen3_moe (2 layers)" and r["read_gbps"] == 20.0
    assert records[0]["tpot_ms"] > 0 and records[1]["tpot_ms"] > 0
    assert records[2]["tpot_ms"] is None and records[3]["tpot_ms"] is None
    assert records[1]["bf16_tpot_ms"] == records[0]["tpot_ms"]
    # int4 experts read fewer bytes per token than fp16 ones
    assert records[1]["floor_tpot_ms"] < records[0]["floor_tpot_ms"]
    assert records[1]["floor_tpot_ms"] == pytest.approx(records[1]["decode_bytes"] / 20e9 * 1e3)
    assert format_records(records).splitlines()[0] == records[0]["model"] + " on " + \
        records[0]["gpu"]


def test_bench_e2e_rejects():
    with pytest.raises(ValueError, match="need a CUDA device"):
        bench_e2e(TINY, modes=("int4-graphs",), device="cpu", read_gbps=1.0)
    with pytest.raises(ValueError, match="expected a non-empty subset"):
        bench_e2e(TINY, modes=("int8-eager",), device="cpu", read_gbps=1.0)
    with pytest.raises(ValueError, match="reduce-overhead"):
        bench_e2e(TINY, modes=("int4-compiled",), device="cpu", read_gbps=1.0,
                  compile_options={"mode": "reduce-overhead"})
    assert set(MODES) == {f"{p}-{k}" for p in ("bf16", "int4")
                          for k in ("eager", "graphs", "compiled")}
    assert set(CUDA_ONLY_MODES) == {"bf16-graphs", "int4-graphs"}
    with pytest.raises(ValueError, match="expected PROMPT/NEW"):
        parse_cases("128x128")
    assert parse_modes(" int4-compiled,bf16-compiled ") == ["int4-compiled", "bf16-compiled"]
    with pytest.raises(ValueError, match="comma-separated subset"):
        parse_modes("int4-compiled,int4-fast")


# --------------------------------------------------------------------------------------------
# -compiled modes
# --------------------------------------------------------------------------------------------
#: the runner pipeline under torch.compile without inductor's code generation (fast on the
#: CPU: no C++ compiler run); the inductor numerics are checked by test_inductor_int4_logits
FAST_COMPILE = {"backend": "aot_eager"}


def test_compile_kwargs():
    kw = compile_kwargs()
    assert kw["fullgraph"] is True and kw["dynamic"] is False
    assert kw.get("options", {}) == COMPILE_KWARGS["options"]
    assert compile_kwargs({"backend": "aot_eager"})["backend"] == "aot_eager"
    # a mode and options together: the mode's inductor options are folded in
    both = compile_kwargs({"mode": "max-autotune-no-cudagraphs"})
    assert "mode" not in both and both["options"]["max_autotune"] is True
    assert compile_kwargs({"mode": "default", "options": {"epilogue_fusion": False}}) == {
        "fullgraph": True, "dynamic": False,
        "options": {**COMPILE_KWARGS["options"], "epilogue_fusion": False}}
    for bad, match in (({"mode": "reduce-overhead"}, "captures its own"),
                       ({"mode": "max-autotune"}, "captures its own"),
                       ({"options": {"triton.cudagraphs": True}}, "captures its own"),
                       ({"fullgraph": False}, "fullgraph=True"),
                       ({"dynamic": True}, "dynamic=False"),
                       ({"prefill": True}, "compile option 'prefill'")):
        with pytest.raises(ValueError, match=match):
            compile_kwargs(bad)
    assert compile_options_from_args() is None
    assert compile_options_from_args("max-autotune-no-cudagraphs",
                                     '{"coordinate_descent_tuning": false}', True) == {
        "mode": "max-autotune-no-cudagraphs",
        "options": {"coordinate_descent_tuning": False}, "prefill": True}
    with pytest.raises(ValueError, match="not JSON"):
        compile_options_from_args(options_json="{bad")
    with pytest.raises(ValueError, match="captures its own"):
        compile_options_from_args("reduce-overhead")


@pytest.mark.parametrize("precision", ["int4", "bf16"])
def test_compiled_runner_matches_eager(precision):
    # fullgraph=True: any graph break inside the model (our module included) is an error
    cfg = e2e_config(TINY, num_layers=1)
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    model = build_random_model(cfg, precision, DEVICE, dtype, group_size=32, seed=3,
                               decode_threshold=1)
    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    want, _ = GreedyRunner(model, 7).generate(ids, 3)
    torch._dynamo.reset()
    try:
        for opts, calls in ((FAST_COMPILE, 2), ({**FAST_COMPILE, "prefill": True}, 1)):
            runner = GreedyRunner(model, 7, cuda_graphs=ON_GPU, compile=True,
                                  compile_options=opts)
            for _ in range(calls):  # a second call replays (graphs) / reuses compiled code
                got, timing = runner.generate(ids, 3)
                assert torch.equal(got.cpu(), want.cpu()), (opts, got, want)
                assert timing.decode_steps == 2
            assert runner.compile_prefill is opts.get("prefill", False)
    finally:
        torch._dynamo.reset()


def _has_cpp_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not ON_GPU and not _has_cpp_compiler(),
                    reason="inductor on the CPU needs a C++ compiler (none on PATH)")
def test_inductor_int4_logits():
    # the real -compiled pipeline (inductor code generation) once: logits of the compiled
    # int4 model equal the eager ones within fp16 / bf16 rounding of the fused non-expert ops
    cfg = e2e_config(TINY, num_layers=1)
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    model = build_random_model(cfg, "int4", DEVICE, dtype, group_size=32, seed=5,
                               decode_threshold=1)
    ids = torch.randint(0, cfg.vocab_size, (1, 3), device=DEVICE)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = model(ids).logits.float()
            got = torch.compile(model, **compile_kwargs())(ids).logits.float()
    finally:
        torch._dynamo.reset()
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


def test_bench_e2e_compiled():
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    records = bench_e2e(TINY, modes=("bf16-compiled", "int4-eager", "int4-compiled"),
                        num_layers=1, cases=[(4, 3)], device=DEVICE, dtype=dtype,
                        group_size=32, read_gbps=20.0, decode_threshold=1,
                        compile_options=FAST_COMPILE)
    by = {r["mode"]: r for r in records}
    assert list(by) == ["bf16-compiled", "int4-eager", "int4-compiled"]
    for mode in ("bf16-compiled", "int4-compiled"):
        r = by[mode]
        assert "error" not in r, r
        assert r["tpot_ms"] > 0 and r["ttft_ms"] > 0 and r["compile_s"] >= 0
        assert r["compile"]["backend"] == "aot_eager" and r["compile"]["fullgraph"] is True
        assert r["compile"]["prefill"] is False
    # the bf16 baseline of a compiled int4 record is the bf16-compiled one of the same run
    assert by["int4-compiled"]["bf16_tpot_ms"] == by["bf16-compiled"]["tpot_ms"]
    assert by["int4-eager"]["bf16_tpot_ms"] is None  # bf16-eager was not run
    assert "compile" not in by["int4-eager"]


def test_bench_cli_e2e_options():
    import argparse

    from w4a16moe.bench.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["bench", "--e2e", "--e2e-modes", "bf16-compiled,int4-compiled",
                            "--compile-mode", "max-autotune-no-cudagraphs",
                            "--compile-prefill"])
    assert ns.e2e and ns.e2e_modes == "bf16-compiled,int4-compiled"
    assert compile_options_from_args(ns.compile_mode, ns.compile_options,
                                     ns.compile_prefill) == {
        "mode": "max-autotune-no-cudagraphs", "prefill": True}
