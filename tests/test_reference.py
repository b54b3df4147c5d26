"""The reference MoE (the oracle of every kernel test) against a per-token, per-k loop."""

from __future__ import annotations

import math

import pytest
import torch

from w4a16moe.quantize import random_experts
from w4a16moe.reference import activation_and_mul, check_routing, moe_reference
from w4a16moe.routing import fused_topk

H, I = 64, 32


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    """Activations written from their formulas (not through torch.nn.functional)."""
    if activation == "silu":
        return g / (1 + torch.exp(-g))
    if activation == "gelu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


def moe_by_loops(x, experts, topk_weights, topk_ids, activation="silu", on_input=False,
                 expert_map=None):
    """out[m] = sum_k w * W2[e] @ (act(gate) * up), one (token, k) at a time in float64."""
    w13, w2 = experts.dequantize(torch.float64)
    inter = experts.intermediate_size
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for m in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[m, k])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            weight = float(topk_weights[m, k])
            xm = x[m].double() * (weight if on_input else 1.0)
            h = w13[e] @ xm
            y = w2[e] @ (_act(h[:inter], activation) * h[inter:])
            out[m] += y if on_input else weight * y
    return out


def _routing(m, num_global, top_k):
    ids = torch.stack([torch.randperm(num_global)[:top_k] for _ in range(m)])
    weights = torch.rand(m, top_k) + 0.1
    return weights, ids.to(torch.int32)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("on_input", [False, True])
def test_matches_loop_float64(activation, on_input):
    ex = random_experts(6, H, I, group_size=32, symmetric=False, act_order=True,
                        dtype=torch.float16, seed=3)
    x = torch.randn(9, H)
    tw, ti = _routing(9, 6, 3)
    out = moe_reference(x, ex, tw, ti, activation=activation,
                        apply_router_weight_on_input=on_input, compute_dtype=torch.float64)
    assert out.dtype == torch.float64 and out.shape == (9, H)
    expected = moe_by_loops(x, ex, tw, ti, activation, on_input)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out32 = moe_reference(x, ex, tw, ti, activation=activation,
                          apply_router_weight_on_input=on_input)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), expected, rtol=1e-4, atol=1e-5)


def test_expert_map_with_missing_experts():
    ex = random_experts(3, H, I, group_size=32, dtype=torch.bfloat16, seed=4)   # local experts
    expert_map = torch.tensor([2, -1, 0, -1, 1, -1, -1, -1], dtype=torch.int32)  # 8 global
    x = torch.randn(12, H)
    tw, ti = _routing(12, 8, 2)
    ti[0] = torch.tensor([1, 3])           # a token whose experts are all elsewhere
    out = moe_reference(x, ex, tw, ti, expert_map=expert_map, compute_dtype=torch.float64)
    torch.testing.assert_close(out, moe_by_loops(x, ex, tw, ti, expert_map=expert_map),
                               rtol=1e-12, atol=1e-12)
    assert (out[0] == 0).all()
    out64 = moe_reference(x, ex, tw, ti.long(), expert_map=expert_map.long(),
                          compute_dtype=torch.float64)
    assert torch.equal(out, out64)


def test_top_k_1_and_single_expert():
    ex = random_experts(1, H, I, group_size=-1, dtype=torch.float16, seed=5)
    x = torch.randn(4, H)
    tw = torch.rand(4, 1)
    ti = torch.zeros(4, 1, dtype=torch.int32)
    out = moe_reference(x, ex, tw, ti, compute_dtype=torch.float64)
    torch.testing.assert_close(out, moe_by_loops(x, ex, tw, ti), rtol=1e-12, atol=1e-12)
    # with one expert and top_k = 1 the layer is a weighted dense MLP
    w13, w2 = ex.dequantize(torch.float64)
    dense = (activation_and_mul(x.double() @ w13[0].T) @ w2[0].T) * tw.double()
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)


def test_duplicate_experts_in_a_row_count_twice():
    ex = random_experts(4, H, I, group_size=32, symmetric=False, dtype=torch.float16, seed=6)
    x = torch.randn(3, H)
    ti = torch.tensor([[2, 2], [0, 0], [1, 3]], dtype=torch.int32)
    tw = torch.tensor([[0.25, 0.5], [1.0, 1.0], [0.5, 0.5]])
    out = moe_reference(x, ex, tw, ti, compute_dtype=torch.float64)
    torch.testing.assert_close(out, moe_by_loops(x, ex, tw, ti), rtol=1e-12, atol=1e-12)
    single = moe_reference(x[:1], ex, torch.tensor([[0.75]]), ti[:1, :1],
                           compute_dtype=torch.float64)
    torch.testing.assert_close(out[:1], single, rtol=1e-12, atol=1e-12)


def test_with_fused_topk_routing_and_half_inputs():
    ex = random_experts(8, H, I, group_size=32, dtype=torch.bfloat16, seed=7)
    x = torch.randn(10, H).to(torch.bfloat16)
    tw, ti = fused_topk(torch.randn(10, 8), 2)
    out = moe_reference(x, ex, tw, ti, compute_dtype=torch.float64)
    torch.testing.assert_close(out, moe_by_loops(x, ex, tw, ti), rtol=1e-12, atol=1e-12)
    rounded = moe_reference(x, ex, tw, ti, round_intermediate=True).double()
    assert not torch.equal(rounded, out)                  # the bf16 rounding happened ...
    scale = float(out.abs().max())
    assert float((rounded - out).abs().max()) <= 2**-7 * scale   # ... and it is small


def test_no_tokens():
    ex = random_experts(2, H, I, group_size=32, seed=8)
    out = moe_reference(torch.zeros(0, H), ex, torch.zeros(0, 2),
                        torch.zeros(0, 2, dtype=torch.int32))
    assert out.shape == (0, H)


def test_activation_and_mul():
    gu = torch.randn(5, 2 * I, dtype=torch.float64)
    for act in ("silu", "gelu", "gelu_tanh"):
        expected = _act(gu[:, :I], act) * gu[:, I:]
        torch.testing.assert_close(activation_and_mul(gu, act), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"activation is 'relu'; expected one of"):
        activation_and_mul(gu, "relu")
    with pytest.raises(ValueError, match=r"gate_up has shape \(5, 7\); expected an even last"):
        activation_and_mul(gu[:, :7])


def _good_inputs():
    ex = random_experts(4, H, I, group_size=32, seed=9)
    tw, ti = _routing(3, 4, 2)
    return ex, torch.randn(3, H), tw, ti


BAD_INPUTS = [
    (lambda a: a.update(x=torch.randn(3, H + 8)), r"hidden_states has shape \(3, 72\); expected "
                                                  r"\[M, 64\]"),
    (lambda a: a.update(x=torch.randn(H)), r"hidden_states has shape \(64,\)"),
    (lambda a: a.update(x=torch.ones(3, H, dtype=torch.int32)), r"hidden_states has dtype "
                                                                r"torch.int32"),
    (lambda a: a.update(ti=a["ti"][:2]), r"topk_ids has shape \(2, 2\); expected \[3, top_k\]"),
    (lambda a: a.update(tw=a["tw"][:, :1]), r"topk_weights has shape \(3, 1\); expected \(3, 2\)"),
    (lambda a: a.update(ti=a["ti"].float()), r"topk_ids has dtype torch.float32"),
    (lambda a: a.update(tw=a["ti"].clone()), r"topk_weights has dtype torch.int32"),
    (lambda a: a.update(x=torch.randn(3, H, device="meta")),
     r"hidden_states is on meta; expected cpu \(the experts' device\)"),
    (lambda a: a.update(em=torch.zeros(4, 4, dtype=torch.int32)), r"expert_map has shape"),
    (lambda a: a.update(em=torch.zeros(4)), r"expert_map has shape \(4,\) and dtype torch.float32"),
    (lambda a: a["ti"].__setitem__((1, 1), 4), r"topk_ids range over \[0, 4\]; expected ids in "
                                               r"\[0, 4\)"),
    (lambda a: a["ti"].__setitem__((1, 1), -1), r"topk_ids range over \[-1, \d\]"),
    (lambda a: a.update(em=torch.tensor([0, 1, 4, -1], dtype=torch.int32)),
     r"expert_map ranges over \[-1, 4\]; expected local ids in \[0, 4\) or -1"),
    (lambda a: a.update(em=torch.tensor([0, 1, -2, 3], dtype=torch.int32)),
     r"expert_map ranges over \[-2, 3\]"),
    (lambda a: a.update(em=torch.tensor([0, 1], dtype=torch.int32)),
     r"topk_ids range over .*expected ids in \[0, 2\)"),
    (lambda a: a.update(kw={"compute_dtype": torch.float16}), r"compute_dtype is torch.float16"),
    (lambda a: a.update(kw={"activation": "relu"}), r"activation is 'relu'"),
]


@pytest.mark.parametrize("change, match", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_rejects(change, match):
    ex, x, tw, ti = _good_inputs()
    ti[1, 1] = 3 if ti[1, 0] != 3 else 0   # make sure the id-range edits below change the range
    args = {"x": x, "tw": tw, "ti": ti, "em": None, "kw": {}}
    change(args)
    with pytest.raises(ValueError, match=match):
        moe_reference(args["x"], ex, args["tw"], args["ti"], expert_map=args["em"], **args["kw"])


def test_check_routing_returns_global_count_and_reads_nothing(monkeypatch):
    ex, x, tw, ti = _good_inputs()
    monkeypatch.setattr(torch.Tensor, "item", lambda *a: (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda *a: (_ for _ in ()).throw(AssertionError))
    assert check_routing(x, ex, tw, ti, None) == 4
    assert check_routing(x, ex, tw, ti, torch.zeros(9, dtype=torch.int32)) == 9
