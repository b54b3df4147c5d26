"""End-to-end benchmark code (integrations/e2e.py) with a tiny Qwen3-MoE config.

The CUDA-graph modes and the real 48-layer model run on the GPU (the integrator's benchmark);
here the eager modes run on ``conftest.DEVICE``: in fp16 under the Triton interpreter on the
CPU, in bf16 (the benchmark's GPU dtype) with the compiled kernels on a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEVICE, ON_GPU

pytest.importorskip("transformers")

from w4a16moe.integrations.e2e import (  # noqa: E402
    MODES,
    QWEN3_30B_A3B,
    RECORD_KEYS,
    bench_e2e,
    build_random_model,
    decode_bytes,
    e2e_config,
    format_records,
    parse_cases,
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
    assert set(MODES) == {"bf16-eager", "bf16-graphs", "int4-eager", "int4-graphs"}
    with pytest.raises(ValueError, match="expected PROMPT/NEW"):
        parse_cases("128x128")
