"""Routing: fused_topk against a plain loop implementation; align_block_size invariants,
edge cases and that it never synchronises with the host."""

from __future__ import annotations

import math

import pytest
import torch

from w4a16moe.bench.timing import capture_graph
from w4a16moe.routing import AlignedBlocks, align_block_size, fused_topk, max_num_tokens_padded

# --------------------------------------------------------------------------------------------
# fused_topk


def topk_by_loops(logits, top_k, renormalize=True, scoring="softmax", num_expert_group=None,
                  topk_group=None, correction_bias=None, routed_scaling_factor=1.0):
    """One token at a time in Python floats: score, (bias), group filter, pick, weight."""
    ids_out, weights_out = [], []
    e = logits.shape[1]
    bias = correction_bias.tolist() if correction_bias is not None else [0.0] * e
    for row in logits.double().tolist():
        if scoring == "softmax":
            mx = max(row)
            ex = [math.exp(v - mx) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        choice = [s + b for s, b in zip(scores, bias, strict=True)]
        eligible = list(range(e))
        if num_expert_group and num_expert_group > 1:
            size = e // num_expert_group
            group_score = []
            for g in range(num_expert_group):
                members = sorted(choice[g * size:(g + 1) * size], reverse=True)
                if correction_bias is not None:          # DeepSeek-V3: sum of the best two
                    group_score.append(sum(members[:2]))
                else:                                    # DeepSeek-V2: the best expert
                    group_score.append(members[0])
            best_groups = sorted(range(num_expert_group), key=lambda g: -group_score[g])
            keep = set(best_groups[:topk_group])
            eligible = [x for x in range(e) if x // size in keep]
        ids = sorted(eligible, key=lambda x: -choice[x])[:top_k]
        w = [scores[x] for x in ids]                     # weights: unbiased scores
        if renormalize:
            w = [v / sum(w) for v in w]
        ids_out.append(ids)
        weights_out.append([v * routed_scaling_factor for v in w])
    return torch.tensor(weights_out, dtype=torch.float64), torch.tensor(ids_out)


def _check_topk(logits, top_k, **kw):
    w, ids = fused_topk(logits, top_k, **kw)
    ref_w, ref_ids = topk_by_loops(logits, top_k, **kw)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (logits.shape[0], top_k)
    assert ids.tolist() == ref_ids.reshape(w.shape).tolist()
    torch.testing.assert_close(w.double(), ref_w.reshape(w.shape), rtol=2e-6, atol=1e-7)
    return w, ids


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("e, top_k", [(8, 1), (8, 2), (16, 6), (4, 4)])
def test_fused_topk_plain(scoring, renormalize, e, top_k):
    logits = torch.randn(19, e) * 2
    w, _ = _check_topk(logits, top_k, renormalize=renormalize, scoring=scoring)
    if renormalize:
        torch.testing.assert_close(w.sum(-1), torch.ones(19))


def test_fused_topk_half_precision_logits_and_scaling():
    logits = torch.randn(7, 8).to(torch.bfloat16)
    _check_topk(logits, 2, routed_scaling_factor=2.5)
    _check_topk(logits, 3, renormalize=False, scoring="sigmoid", routed_scaling_factor=0.5)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("e, groups, topk_group, top_k", [(16, 4, 2, 4), (32, 8, 3, 6),
                                                          (8, 8, 4, 2)])
def test_grouped_topk_deepseek_v2(renormalize, e, groups, topk_group, top_k):
    logits = torch.randn(23, e) * 2
    _check_topk(logits, top_k, renormalize=renormalize, scoring="softmax",
                num_expert_group=groups, topk_group=topk_group)


@pytest.mark.parametrize("e, groups, topk_group, top_k", [(16, 4, 2, 4), (32, 8, 4, 8),
                                                          (16, 2, 1, 3)])
def test_grouped_topk_deepseek_v3(e, groups, topk_group, top_k):
    logits = torch.randn(23, e) * 2
    bias = torch.randn(e) * 0.3
    w, ids = _check_topk(logits, top_k, renormalize=True, scoring="sigmoid",
                         num_expert_group=groups, topk_group=topk_group, correction_bias=bias,
                         routed_scaling_factor=2.5)
    # the bias must matter in this data, or the test would not tell biased from unbiased
    _, unbiased = fused_topk(logits, top_k, scoring="sigmoid", num_expert_group=groups,
                             topk_group=topk_group)
    assert not torch.equal(ids, unbiased)


def test_correction_bias_without_groups():
    logits = torch.randn(11, 8)
    bias = torch.randn(8)
    _check_topk(logits, 2, scoring="sigmoid", correction_bias=bias, renormalize=False)


def test_group_score_sum_of_top2_versus_max_by_hand():
    # sigmoid(0) = 0.5 for every expert; the bias sets the choice scores directly.
    # groups of two: A = (0.9, 0.0) max 0.9 / top-2 sum 0.9; B = (0.6, 0.55) max 0.6 / sum 1.15
    choice = torch.tensor([0.9, 0.0, 0.6, 0.55, 0.1, 0.1, 0.2, 0.1])
    logits = torch.zeros(1, 8)
    w, ids = fused_topk(logits, 2, renormalize=False, scoring="sigmoid", num_expert_group=4,
                        topk_group=1, correction_bias=choice - 0.5)
    assert ids.tolist() == [[2, 3]]                 # V3: group B wins on its top-2 sum
    assert w.tolist() == [[0.5, 0.5]]               # weights are the unbiased scores
    # V2 style (max) on the same choice scores picks group A
    logits = torch.logit(choice.clamp(1e-4, 1 - 1e-4)).unsqueeze(0)
    _, ids = fused_topk(logits, 2, renormalize=False, scoring="sigmoid", num_expert_group=4,
                        topk_group=1)
    assert ids.tolist() == [[0, 1]]


def test_grouped_topk_never_picks_masked_experts_with_negative_scores():
    # all biased scores are negative: a 0-filled mask would let masked experts win
    logits = torch.randn(9, 16)
    bias = torch.full((16,), -2.0)
    _, ids = fused_topk(logits, 4, scoring="sigmoid", num_expert_group=4, topk_group=1,
                        correction_bias=bias)
    groups = (ids // 4).tolist()
    assert all(len(set(row)) == 1 for row in groups)
    _check_topk(logits, 4, scoring="sigmoid", num_expert_group=4, topk_group=1,
                correction_bias=bias)


def test_fused_topk_no_tokens():
    w, ids = fused_topk(torch.randn(0, 8), 2)
    assert w.shape == ids.shape == (0, 2)
    w, ids = fused_topk(torch.randn(0, 8), 2, scoring="sigmoid", num_expert_group=4,
                        topk_group=2, correction_bias=torch.zeros(8))
    assert w.shape == (0, 2)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.randn(8), 2), {}, r"router_logits has shape \(8,\); expected \[M, E\]"),
        ((torch.randn(3, 8), 0), {}, r"top_k is 0; expected an int with 1 <= top_k <= E=8"),
        ((torch.randn(3, 8), 9), {}, r"top_k is 9"),
        ((torch.randn(3, 8), 2.0), {}, r"top_k is 2.0"),
        ((torch.randn(3, 8), 2), {"scoring": "relu"}, r"scoring is 'relu'; expected one of"),
        ((torch.randn(3, 8), 2), {"num_expert_group": 3, "topk_group": 1},
         r"E=8 is not divisible by num_expert_group=3"),
        ((torch.randn(3, 8), 2), {"num_expert_group": 4}, r"topk_group is None; expected 1..4"),
        ((torch.randn(3, 8), 2), {"num_expert_group": 4, "topk_group": 5}, r"topk_group is 5"),
        ((torch.randn(3, 8), 2), {"num_expert_group": 0, "topk_group": 1},
         r"num_expert_group is 0"),
        ((torch.randn(3, 8), 5), {"num_expert_group": 4, "topk_group": 2},
         r"top_k is 5; expected <= topk_group \* E / num_expert_group = 4"),
        ((torch.randn(3, 8), 2), {"correction_bias": torch.zeros(7)},
         r"correction_bias has shape \(7,\); expected \(8,\)"),
        ((torch.randn(3, 8), 2), {"correction_bias": torch.zeros(8, device="meta")},
         r"correction_bias is on meta; expected cpu"),
    ],
)
def test_fused_topk_rejects(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fused_topk(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# align_block_size


def check_aligned(topk_ids, block_size, num_experts, out: AlignedBlocks, expert_map=None):
    """Every invariant the prefill kernel relies on, checked with plain Python."""
    flat = topk_ids.reshape(-1).tolist()
    slots = len(flat)
    sorted_ids = out.sorted_token_ids.tolist()
    expert_ids = out.expert_ids.tolist()
    total = out.num_tokens_post_padded.tolist()
    assert out.sorted_token_ids.dtype == out.expert_ids.dtype == torch.int32
    assert out.num_tokens_post_padded.dtype == torch.int32 and len(total) == 1
    total = total[0]
    assert len(sorted_ids) == max_num_tokens_padded(slots, block_size, num_experts)
    assert len(sorted_ids) % block_size == 0
    assert len(expert_ids) == len(sorted_ids) // block_size

    counts = [flat.count(x) for x in range(num_experts)]
    assert total == sum(-(-c // block_size) * block_size for c in counts)

    used = sorted_ids[:total]
    assert sorted(x for x in used if x != slots) == list(range(slots))   # each slot once
    assert all(x == slots for x in sorted_ids[total:])                   # padding = M*top_k
    runs: dict[int, list[int]] = {}
    for b in range(total // block_size):
        block = used[b * block_size:(b + 1) * block_size]
        real = [x for x in block if x != slots]
        assert real, f"block {b} holds only padding"
        experts_here = {flat[x] for x in real}
        assert len(experts_here) == 1, f"block {b} mixes experts {experts_here}"
        g = experts_here.pop()
        local = int(expert_map[g]) if expert_map is not None else g
        assert expert_ids[b] == local
        runs.setdefault(g, []).extend(block)
    assert all(x == -1 for x in expert_ids[total // block_size:])
    for g, run in runs.items():
        real = [x for x in run if x != slots]
        assert real == sorted(real)                     # slot order kept within an expert
        assert run == real + [slots] * (len(run) - len(real))   # padding at the run's end
        assert len(runs[g]) == -(-counts[g] // block_size) * block_size
    return total


@pytest.mark.parametrize(
    "m, top_k, num_experts, block_size",
    [(1, 1, 1, 1), (1, 2, 8, 16), (5, 2, 4, 4), (33, 4, 8, 16), (64, 8, 16, 64),
     (7, 3, 64, 2), (16, 2, 3, 1), (100, 1, 2, 32), (3, 4, 4, 128)],
)
def test_align_block_size_invariants(m, top_k, num_experts, block_size):
    topk_ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(m)])
    out = align_block_size(topk_ids.to(torch.int32), block_size, num_experts)
    check_aligned(topk_ids, block_size, num_experts, out)
    out64 = align_block_size(topk_ids, block_size, num_experts)
    assert all(torch.equal(a, b) for a, b in zip(out, out64, strict=True))


def test_align_block_size_skewed_and_duplicate_ids():
    topk_ids = torch.tensor([[3, 3], [3, 0], [3, 3], [0, 3], [3, 3]], dtype=torch.int32)
    out = align_block_size(topk_ids, 4, 6)
    assert check_aligned(topk_ids, 4, 6, out) == 12       # expert 3: 8 slots, expert 0: 2 -> 4
    assert out.sorted_token_ids[:12].tolist() == [3, 6, 10, 10, 0, 1, 2, 4, 5, 7, 8, 9]
    assert out.expert_ids.tolist()[:4] == [0, 3, 3, -1]


def test_align_block_size_expert_map():
    num_experts = 8
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1, -1, 3], dtype=torch.int32)
    topk_ids = torch.stack([torch.randperm(num_experts)[:3] for _ in range(20)])
    out = align_block_size(topk_ids, 4, num_experts, expert_map=expert_map)
    total = check_aligned(topk_ids, 4, num_experts, out, expert_map=expert_map)
    used = out.expert_ids[: total // 4].tolist()
    assert -1 in used and set(used) <= {-1, 0, 1, 2, 3}
    out64 = align_block_size(topk_ids, 4, num_experts, expert_map=expert_map.long())
    assert torch.equal(out64.expert_ids, out.expert_ids)


@pytest.mark.parametrize("top_k", [1, 4])
def test_align_block_size_no_tokens(top_k):
    out = align_block_size(torch.zeros(0, top_k, dtype=torch.int32), 16, 4)
    assert out.num_tokens_post_padded.tolist() == [0]
    assert (out.sorted_token_ids == 0).all()              # sentinel M * top_k = 0
    assert (out.expert_ids == -1).all()
    check_aligned(torch.zeros(0, top_k, dtype=torch.int32), 16, 4, out)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.zeros(4, dtype=torch.int32), 16, 4), {},
         r"topk_ids has shape \(4,\); expected \[M, top_k\]"),
        ((torch.zeros(2, 2), 16, 4), {}, r"topk_ids has dtype torch.float32; expected"),
        ((torch.zeros(2, 2, dtype=torch.int32), 0, 4), {}, r"block_size is 0; expected"),
        ((torch.zeros(2, 2, dtype=torch.int32), 16.0, 4), {}, r"block_size is 16.0"),
        ((torch.zeros(2, 2, dtype=torch.int32), 16, 0), {}, r"num_experts is 0; expected a pos"),
        ((torch.zeros(0, 2, dtype=torch.int32), 16, 0), {}, r"num_experts is 0"),
        ((torch.zeros(2, 2, dtype=torch.int32), 16, 4),
         {"expert_map": torch.zeros(3, dtype=torch.int32)},
         r"expert_map has shape \(3,\); expected \(4,\)"),
        ((torch.zeros(2, 2, dtype=torch.int32), 16, 4), {"expert_map": torch.zeros(4)},
         r"expert_map has dtype torch.float32"),
        ((torch.zeros(2, 2, dtype=torch.int32), 16, 4),
         {"expert_map": torch.zeros(4, dtype=torch.int32, device="meta")},
         r"expert_map is on meta; expected cpu \(the device of topk_ids\)"),
    ],
)
def test_align_block_size_rejects(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        align_block_size(*args, **kwargs)


def test_max_num_tokens_padded():
    assert max_num_tokens_padded(10, 4, 3) == 20          # 10 + 3*3 = 19 -> 20
    assert max_num_tokens_padded(0, 16, 4) == 64
    assert max_num_tokens_padded(8, 1, 100) == 8


# --------------------------------------------------------------------------------------------
# no host synchronisation


def test_align_block_size_runs_on_meta_tensors():
    topk_ids = torch.empty(33, 4, dtype=torch.int32, device="meta")
    expert_map = torch.empty(8, dtype=torch.int32, device="meta")
    out = align_block_size(topk_ids, 16, 8, expert_map=expert_map)
    size = max_num_tokens_padded(132, 16, 8)
    assert out.sorted_token_ids.device.type == "meta"
    assert out.sorted_token_ids.shape == (size,) and out.expert_ids.shape == (size // 16,)
    assert out.num_tokens_post_padded.shape == (1,)


def _forbid_host_reads(monkeypatch):
    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name} was called")
        return fail

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy",
                 "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))


@pytest.mark.parametrize("with_map", [False, True])
def test_routing_reads_nothing_back(monkeypatch, with_map):
    logits = torch.randn(21, 8)
    expert_map = torch.tensor([0, 1, -1, -1, 2, 3, -1, 4], dtype=torch.int32)
    _forbid_host_reads(monkeypatch)
    w, ids = fused_topk(logits, 2, num_expert_group=4, topk_group=2, scoring="sigmoid",
                        correction_bias=torch.zeros(8))
    out = align_block_size(ids, 8, 8, expert_map=expert_map if with_map else None)
    monkeypatch.undo()
    check_aligned(ids, 8, 8, out, expert_map=expert_map if with_map else None)
    # the guard itself works
    _forbid_host_reads(monkeypatch)
    with pytest.raises(AssertionError, match="host synchronisation"):
        ids.max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for graph capture")
def test_routing_under_cuda_graph_capture():
    logits = torch.randn(37, 16, device="cuda")
    expert_map = torch.arange(16, device="cuda", dtype=torch.int32) % 5 - 1
    bias = torch.randn(16, device="cuda")

    def step():
        w, ids = fused_topk(logits, 4, scoring="sigmoid", num_expert_group=4, topk_group=2,
                            correction_bias=bias)
        return ids, align_block_size(ids, 16, 16, expert_map=expert_map)

    graph, (ids, out) = capture_graph(step)
    logits.copy_(torch.randn(37, 16, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    eager_ids, eager = step()
    assert torch.equal(ids, eager_ids)
    assert all(torch.equal(a, b) for a, b in zip(out, eager, strict=True))
    check_aligned(ids.cpu(), 16, 16, AlignedBlocks(*(t.cpu() for t in out)), expert_map.cpu())
