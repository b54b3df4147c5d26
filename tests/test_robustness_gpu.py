"""GPU robustness: CUDA graph replays, flat memory, deterministic-mode batch invariance.

Skipped without CUDA. Each test runs the public :class:`HybridW4A16MoEExperts` in bf16 and
fp16:

* one CUDA graph captured once and replayed 1000 times with new activations and new routing
  copied into its static inputs, each replay equal to an eager call on the same inputs
  (bitwise in the deterministic mode; within rounding otherwise, where split-K atomics add
  in any order), and nothing allocated while capturing or inside a forward after
  :meth:`reserve`;
* 10 000 calls at varying M leave ``torch.cuda.memory_allocated`` where it was after a
  warm-up, with the workspaces allocated once;
* ``deterministic=True``: every row of any batch (sizes 1 .. 4096, random compositions and
  positions, duplicated tokens) is bitwise equal to that token's row computed in a batch of
  4096, on a small layer and on the Qwen3-30B-A3B layer shape.
"""

from __future__ import annotations

import random

import pytest
import torch

from w4a16moe import HybridW4A16MoEExperts
from w4a16moe.bench.layer import fast_random_experts
from w4a16moe.bench.models import MoEShape, get_shape
from w4a16moe.reference import moe_reference
from w4a16moe.routing import fused_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.float16: 2.0**-7, torch.bfloat16: 2.0**-5}
# a small layer: H, I multiples of 8, I not a power of two, G = 128; not in the thresholds
# table, so the default threshold (32 tokens) splits decode and prefill
SMALL = MoEShape("small", num_experts=16, top_k=4, hidden_size=256, intermediate_size=384)
SHAPES = {"small": SMALL, "qwen3-30b-a3b": get_shape("qwen3-30b-a3b")}
ALLOCS = "allocation.all.allocated"


def _experts(shape: MoEShape, dtype: torch.dtype, seed: int = 0):
    return fast_random_experts(shape, dtype, torch.device("cuda"), seed)


def _batch(shape: MoEShape, m: int, dtype: torch.dtype, gen: torch.Generator):
    x = torch.randn(m, shape.hidden_size, device="cuda", generator=gen).to(dtype)
    logits = torch.randn(m, shape.num_experts, device="cuda", generator=gen)
    tw, ti = fused_topk(logits, shape.top_k)
    return x, tw, ti


def _excess(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """max(|out - ref| / bound) on the device (<= 1 is within rounding), no host sync."""
    ref = ref.float()
    bound = TOL[dtype] * (ref.abs() + ref.abs().max()) + 1e-30
    return ((out.float() - ref).abs() / bound).max()


# ------------------------------------------------------------------------------------------
# CUDA graphs
# ------------------------------------------------------------------------------------------
def _capture(fn) -> tuple[torch.cuda.CUDAGraph, int]:
    """Capture ``fn`` in a new graph; return it and the allocations made while capturing."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()[ALLOCS]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph, torch.cuda.memory_stats()[ALLOCS] - before


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("m", [4, 96])  # default mode: the decode kernel, then the prefill one
def test_graph_capture_once_replay_1000_times(m, deterministic, dtype):
    shape = SMALL
    moe = HybridW4A16MoEExperts(_experts(shape, dtype), shape.top_k,
                                deterministic=deterministic)
    moe.reserve(m)
    gen = torch.Generator(device="cuda").manual_seed(m)
    sx, stw, sti = _batch(shape, m, dtype, gen)
    sout = torch.empty(m, shape.hidden_size, dtype=dtype, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            moe(sx, stw, sti, out=sout)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    # a forward after reserve() allocates nothing, eager or captured
    before = torch.cuda.memory_stats()[ALLOCS]
    moe(sx, stw, sti, out=sout)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()[ALLOCS] == before, "an eager forward allocated"
    # a capture itself may allocate (torch registers the RNG state with a new graph): the
    # forward's capture must allocate no more than capturing an in-place op does
    _, idle = _capture(lambda: sout.mul_(1))
    graph, allocs = _capture(lambda: moe(sx, stw, sti, out=sout))
    _, idle_after = _capture(lambda: sout.mul_(1))
    assert allocs <= max(idle, idle_after), (f"the captured forward allocated {allocs} blocks "
                                             f"(an idle capture: {idle}, {idle_after})")

    mismatches = torch.zeros((), dtype=torch.int64, device="cuda")
    worst = torch.zeros((), device="cuda")
    nonfinite = torch.zeros((), dtype=torch.int64, device="cuda")
    for _ in range(1000):
        x, tw, ti = _batch(shape, m, dtype, gen)
        sx.copy_(x)
        stw.copy_(tw)
        sti.copy_(ti)
        graph.replay()
        eager = moe(x, tw, ti)
        if deterministic:
            mismatches += (sout != eager).sum()
        else:
            worst = torch.maximum(worst, _excess(sout, eager, dtype))
        nonfinite += (~torch.isfinite(sout)).sum()
    torch.cuda.synchronize()
    assert nonfinite.item() == 0
    assert mismatches.item() == 0, f"{mismatches.item()} elements differ from eager"
    assert worst.item() <= 1.0, f"replays differ from eager by {worst.item():.2f}x the bound"
    # and the last replay against the reference
    ref = moe_reference(sx, moe.experts, stw, sti, round_intermediate=True)
    assert _excess(sout, ref, dtype).item() <= 1.0


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deterministic", [False, True])
def test_memory_flat_over_10000_calls(deterministic):
    shape, dtype, max_m = SMALL, torch.bfloat16, 80
    moe = HybridW4A16MoEExperts(_experts(shape, dtype), shape.top_k,
                                deterministic=deterministic)
    moe.reserve(max_m)
    gen = torch.Generator(device="cuda").manual_seed(1)
    pool = {m: _batch(shape, m, dtype, gen) for m in range(1, max_m + 1)}
    outs = {m: torch.empty(m, shape.hidden_size, dtype=dtype, device="cuda") for m in pool}
    for args in pool.values():  # warm-up: every M once (compiles every config)
        moe(*args)
    torch.cuda.synchronize()
    workspaces = (moe._decode_ws, moe._prefill_ws)
    base = torch.cuda.memory_allocated()
    allocs = torch.cuda.memory_stats()[ALLOCS]
    rng = random.Random(0)
    for _ in range(500):  # with out=: no allocation at all
        m = rng.randint(1, max_m)
        moe(*pool[m], out=outs[m])
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()[ALLOCS] == allocs, "forward(out=...) allocated"
    for _ in range(10_000):
        m = rng.randint(1, max_m)
        moe(*pool[m])
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == base
    assert (moe._decode_ws, moe._prefill_ws) == workspaces, "workspaces were reallocated"


# ------------------------------------------------------------------------------------------
# deterministic mode
# ------------------------------------------------------------------------------------------
BATCH_SIZES = [1, 2, 3, 7, 16, 64, 257, 1024, 4096]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_deterministic_mode_batch_invariant(name, dtype):
    shape = SHAPES[name]
    ex = _experts(shape, dtype, seed=7)
    moe = HybridW4A16MoEExperts(ex, shape.top_k, deterministic=True)
    default = HybridW4A16MoEExperts(ex, shape.top_k)
    gen = torch.Generator(device="cuda").manual_seed(11)
    total = 4096
    x, tw, ti = _batch(shape, total, dtype, gen)
    full = moe(x, tw, ti)
    assert torch.equal(full, moe(x, tw, ti)), "two runs differ"
    assert _excess(full, default(x, tw, ti), dtype).item() <= 1.0
    probe = torch.arange(16, device="cuda")
    ref = moe_reference(x[probe], ex, tw[probe], ti[probe], round_intermediate=True)
    assert _excess(full[probe], ref, dtype).item() <= 1.0

    rng = torch.Generator(device="cpu").manual_seed(5)
    for size in BATCH_SIZES:
        for trial in range(3):
            if trial == 2:   # duplicates: the same tokens several times in one batch
                idx = torch.randint(0, 8, (size,), generator=rng)
            else:            # random tokens in random order
                idx = torch.randperm(total, generator=rng)[:size]
            idx = idx.cuda()
            got = moe(x[idx], tw[idx], ti[idx])
            bad = (got != full[idx]).any(dim=1)
            assert not bad.any(), (f"batch of {size} (trial {trial}): {int(bad.sum())} tokens "
                                   f"differ from the batch of {total}")
    # the forced decode path is atomic-free and batch invariant on its own
    dec_full = moe(x[:257], tw[:257], ti[:257], path="decode")
    for size in (1, 5, 64):
        idx = torch.randperm(257, generator=rng)[:size].cuda()
        got = moe(x[idx], tw[idx], ti[idx], path="decode")
        assert torch.equal(got, dec_full[idx]), f"decode path: batch of {size} differs"
    assert _excess(dec_full, full[:257], dtype).item() <= 1.0
