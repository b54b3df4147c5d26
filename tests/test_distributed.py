"""Tensor and expert parallelism (w4a16moe.distributed).

Two kinds of tests:

* Sharding math, in one process and without kernels: the sum over ranks of the plain-torch
  reference on each rank's shard equals the reference on the unsharded experts (float64, so
  any wrong row, column, group or permutation shows up as an O(1) error), plus shapes,
  expert ranges and maps, checkpoint loading and the error messages.
* The real thing: 2-4 processes (``torch.multiprocessing.spawn``, a free TCP port; gloo on
  CPU, or NCCL with one GPU per process when enough GPUs are present) each run
  :class:`ParallelHybridMoE` with the decode or prefill kernel forced (Triton interpreter on
  CPU, fp16, tiny shapes) and the all-reduce; every rank's output must equal the
  single-process reference and be bit-identical across ranks.

Tolerance of the spawned tests: as in test_decode.py (``|out - ref| <= tol * |ref| + tol *
max|ref|``), with tol = 2^-9 times the world size: each rank's partial sum is rounded to fp16
(half an ulp of a partial, which can exceed the total when partials cancel), and the fp16
all-reduce rounds up to ``ws - 1`` more times. A wrong shard or a missed expert is off by tens
of percent.
"""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import DEVICE, ON_GPU

from w4a16moe.distributed import (
    ParallelHybridMoE,
    ShardedExperts,
    expert_range,
    intermediate_indices,
    load_checkpoint_sharded,
    make_expert_map,
    shard_experts,
    tp_plan,
)
from w4a16moe.experts import HybridW4A16MoEExperts
from w4a16moe.quantize import random_experts
from w4a16moe.reference import moe_reference

H = 64
DTYPE = torch.float16


def _routing(m: int, num_experts: int, top_k: int, gen: torch.Generator):
    logits = torch.randn(m, num_experts, generator=gen)
    weights, ids = torch.topk(logits.softmax(dim=-1), top_k, dim=-1)
    return weights.contiguous(), ids.to(torch.int32).contiguous()


def _experts(e: int, i: int, g: int, sym: bool, act: bool, seed: int = 7):
    return random_experts(e, H, i, group_size=g, symmetric=sym, act_order=act, dtype=DTYPE,
                          seed=seed)


# ---------------------------------------------------------------------------------------------
# expert ranges and maps
# ---------------------------------------------------------------------------------------------
def test_expert_range_examples():
    assert [expert_range(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [expert_range(5, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert [expert_range(128, r, 4) for r in range(4)] == [(0, 32), (32, 64), (64, 96),
                                                          (96, 128)]
    assert [expert_range(2, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]


@pytest.mark.parametrize("num_experts", [0, 1, 5, 8, 13, 128])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 16])
def test_expert_range_partition(num_experts, world_size):
    ranges = [expert_range(num_experts, r, world_size) for r in range(world_size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_experts
    for (_, end), (start, _) in zip(ranges[:-1], ranges[1:], strict=True):
        assert end == start  # contiguous, no gap, no overlap
    sizes = [end - start for start, end in ranges]
    extra = num_experts % world_size
    assert sizes == [num_experts // world_size + (r < extra) for r in range(world_size)]


def test_expert_range_errors():
    with pytest.raises(ValueError, match="rank is 2; expected 0 <= rank < world_size=2"):
        expert_range(5, 2, 2)
    with pytest.raises(ValueError, match="world_size is 0"):
        expert_range(5, 0, 0)
    with pytest.raises(ValueError, match="num_experts is -1"):
        expert_range(-1, 0, 1)


def test_expert_map():
    maps = [make_expert_map(5, r, 3) for r in range(3)]
    assert maps[0].tolist() == [0, 1, -1, -1, -1]
    assert maps[1].tolist() == [-1, -1, 0, 1, -1]
    assert maps[2].tolist() == [-1, -1, -1, -1, 0]
    assert all(m.dtype == torch.int32 for m in maps)
    # every global expert is local on exactly one rank
    assert (torch.stack(maps) >= 0).sum(0).tolist() == [1] * 5


def test_ep_shards_hold_their_experts():
    ex = _experts(5, 64, 32, sym=False, act=True)
    for ws in (2, 3):
        for r in range(ws):
            sh = shard_experts(ex, r, ws, mode="ep")
            start, end = expert_range(5, r, ws)
            assert sh.mode == "ep" and (sh.rank, sh.world_size) == (r, ws)
            assert sh.num_local_experts == end - start and sh.num_global_experts == 5
            assert torch.equal(sh.expert_map, make_expert_map(5, r, ws))
            for name in ("w13", "w2"):
                got, full = getattr(sh.experts, name), getattr(ex, name)
                for part in ("qweight", "scales", "zeros", "perm"):
                    assert torch.equal(getattr(got, part), getattr(full, part)[start:end])
                # owns its storage: the unsharded experts can be freed
                assert got.qweight.untyped_storage().data_ptr() != \
                    full.qweight.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------------
# sharding math (reference only, float64)
# ---------------------------------------------------------------------------------------------
def _sum_of_shards(ex, x, w, ids, ws, mode, on_input=False):
    total = 0
    for r in range(ws):
        sh = shard_experts(ex, r, ws, mode)
        total = total + moe_reference(x, sh.experts, w, ids, expert_map=sh.expert_map,
                                      apply_router_weight_on_input=on_input,
                                      compute_dtype=torch.float64)
    return total


# (E, I, G, world_size, symmetric, act_order): whole groups per rank, act-order w2, a slice
# inside one group (G=64 > I/ws=32), per channel (G=-1: G = K), three ranks, eight ranks
TP_CASES = [
    (3, 64, 32, 1, False, True),
    (4, 64, 32, 2, True, False),
    (5, 128, 32, 4, False, True),
    (4, 64, 64, 2, False, True),
    (3, 128, -1, 4, True, True),
    (5, 96, 32, 3, True, True),
    (4, 256, 64, 8, False, True),
]


@pytest.mark.parametrize("e,i,g,ws,sym,act", TP_CASES)
def test_tp_shards_sum_to_full_layer(e, i, g, ws, sym, act):
    gen = torch.Generator().manual_seed(3)
    ex = _experts(e, i, g, sym, act)
    x = torch.randn(6, H, generator=gen, dtype=torch.float64)
    w, ids = _routing(6, e, 2, gen)
    ref = moe_reference(x, ex, w, ids, compute_dtype=torch.float64)
    for on_input in (False, True):
        ref = moe_reference(x, ex, w, ids, compute_dtype=torch.float64,
                            apply_router_weight_on_input=on_input)
        total = _sum_of_shards(ex, x, w, ids, ws, "tp", on_input)
        torch.testing.assert_close(total, ref, rtol=1e-9, atol=1e-9)
    # shapes: all experts, I/ws intermediates, no w2 permutation left
    plan = tp_plan(i, ex.w2.group_size, ws)
    for r in range(ws):
        local = shard_experts(ex, r, ws, "tp").experts
        assert local.num_experts == e and local.intermediate_size == i // ws
        assert local.w13.qweight.shape == (e, 2 * i // ws, H // 8)
        assert local.w2.qweight.shape == (e, H, i // ws // 8)
        assert local.w2.group_size == plan.local_group_size
        assert local.w2.perm is None
        assert (local.w13.perm is None) == (not act)
        assert (local.w13.zeros is None) == sym


def test_tp_act_order_rows_follow_w2_perm():
    """With act-order w2, rank r's GEMM1 rows are the intermediates its w2 columns read."""
    ex = _experts(3, 64, 32, sym=True, act=True)
    seen = []
    for r in range(2):
        idx = intermediate_indices(ex, r, 2)
        assert torch.equal(idx, ex.w2.perm[:, r * 32:(r + 1) * 32].long())
        local = shard_experts(ex, r, 2, "tp").experts
        w13_full = ex.w13.dequantize(torch.float64)
        w13_local = local.w13.dequantize(torch.float64)
        for e in range(3):
            assert torch.equal(w13_local[e, :32], w13_full[e, idx[e]])
            assert torch.equal(w13_local[e, 32:], w13_full[e, 64 + idx[e]])
        seen.append(idx)
    # together the ranks cover every intermediate of every expert once
    assert torch.equal(torch.cat(seen, dim=1).sort(dim=1).values,
                       torch.arange(64).expand(3, -1))


def test_ep_shards_sum_to_full_layer():
    gen = torch.Generator().manual_seed(4)
    ex = _experts(5, 64, 32, sym=False, act=True)
    x = torch.randn(7, H, generator=gen, dtype=torch.float64)
    w, ids = _routing(7, 5, 3, gen)
    ref = moe_reference(x, ex, w, ids, compute_dtype=torch.float64)
    for ws in (2, 3, 7):  # 7 > E: two ranks hold no expert
        torch.testing.assert_close(_sum_of_shards(ex, x, w, ids, ws, "ep"), ref,
                                   rtol=1e-12, atol=1e-12)


def test_world_size_one():
    """EP over one rank is a copy; TP over one rank is the same layer, with an act-order w2's
    permutation folded into the order of w13's rows (checked by the TP_CASES above)."""
    ex = _experts(3, 64, 32, sym=False, act=True)
    _assert_same_experts(shard_experts(ex, 0, 1, "ep").experts, ex)
    ex = _experts(3, 64, 32, sym=False, act=False)
    _assert_same_experts(shard_experts(ex, 0, 1, "tp").experts, ex)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_tp_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"intermediate_size I=64 is not divisible by "
                                         r"world_size=3"):
        shard_experts(_experts(2, 64, 32, True, False), 0, 3, "tp")
    with pytest.raises(ValueError, match=r"I/world_size = 48/4 = 12 is not a multiple of 8"):
        shard_experts(_experts(2, 48, -1, True, False), 0, 4, "tp")
    with pytest.raises(ValueError, match=r"I/world_size = 96/2 = 48 is neither a multiple nor "
                                         r"a divisor of w2's group_size 32"):
        shard_experts(_experts(2, 96, 32, True, True), 1, 2, "tp")
    with pytest.raises(ValueError, match=r"I/world_size = 384/4 = 96 is neither a multiple "
                                         r"nor a divisor of w2's group_size 128"):
        tp_plan(384, 128, 4)
    assert tp_plan(1536, 128, 4).local_group_size == 128
    assert tp_plan(256, 128, 4).local_group_size == 64


def test_argument_errors():
    ex = _experts(2, 64, 32, True, False)
    with pytest.raises(ValueError, match="mode is 'dp'; expected one of"):
        shard_experts(ex, 0, 2, "dp")
    with pytest.raises(ValueError, match="rank is 2; expected 0 <= rank < world_size=2"):
        shard_experts(ex, 2, 2, "ep")
    with pytest.raises(ValueError, match="experts is a Tensor; expected PackedExperts"):
        shard_experts(torch.zeros(2), 0, 2)
    with pytest.raises(ValueError, match="expert_map is given with mode='tp'"):
        ShardedExperts(ex, make_expert_map(2, 0, 1), "tp", 0, 1)
    with pytest.raises(ValueError, match="expert_map maps 1 global experts to this rank; "
                                         "expected 2"):
        ShardedExperts(ex, make_expert_map(2, 0, 2), "ep", 0, 2)
    sharded = shard_experts(ex, 0, 2, "ep")
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        ParallelHybridMoE(sharded, top_k=1)


# ---------------------------------------------------------------------------------------------
# world_size 1: no communication, no process group
# ---------------------------------------------------------------------------------------------
def test_world_size_one_layer_matches_hybrid():
    gen = torch.Generator().manual_seed(5)
    ex = _experts(4, 64, 32, sym=True, act=False).to(DEVICE)
    x = torch.randn(3, H, generator=gen).to(DEVICE, DTYPE)
    w, ids = (t.to(DEVICE) for t in _routing(3, 4, 2, gen))
    layer = ParallelHybridMoE(shard_experts(ex, 0, 1, "tp"), top_k=2)
    plain = HybridW4A16MoEExperts(ex, 2)
    assert layer.world_size == 1 and "world_size=1" in repr(layer)
    # the same kernel on the same weights: bit-identical under the interpreter; on a GPU the
    # split-K partial sums are added with fp32 atomics in any order, so allow an fp16 ulp
    tol = 2.0**-10 if ON_GPU else 0.0
    torch.testing.assert_close(layer(x, w, ids, path="decode"),
                               plain(x, w, ids, path="decode"), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _assert_same_experts(a, b):
    assert (a.num_experts, a.hidden_size, a.intermediate_size, a.dtype) == \
        (b.num_experts, b.hidden_size, b.intermediate_size, b.dtype)
    for name in ("w13", "w2"):
        pa, pb = getattr(a, name), getattr(b, name)
        assert pa.group_size == pb.group_size
        for part in ("qweight", "scales", "zeros", "perm"):
            ta, tb = getattr(pa, part), getattr(pb, part)
            assert (ta is None) == (tb is None), f"{name}.{part}"
            if ta is not None:
                assert torch.equal(ta, tb), f"{name}.{part}"


def test_load_checkpoint_sharded(tmp_path):
    from formats_helpers import build

    from w4a16moe.formats import load_checkpoint

    path = str(tmp_path / "ckpt")
    build(path, "gptq", e=5, h=H, i=64, g=32, sym=False, act=True, layers=2)
    full = load_checkpoint(path)
    assert sorted(full) == [0, 1]
    for ws in (2, 3):
        for r in range(ws):
            got = load_checkpoint_sharded(path, r, ws, "ep")
            assert sorted(got) == [0, 1]
            for layer in (0, 1):
                want = shard_experts(full[layer], r, ws, "ep")
                assert got[layer].mode == "ep"
                assert torch.equal(got[layer].expert_map, want.expert_map)
                _assert_same_experts(got[layer].experts, want.experts)
    for r in range(2):  # chunks of 2, 2 and 1 experts
        got = load_checkpoint_sharded(path, r, 2, "tp", experts_per_read=2, layers=[1])
        assert sorted(got) == [1]
        assert got[1].mode == "tp" and got[1].expert_map is None
        _assert_same_experts(got[1].experts, shard_experts(full[1], r, 2, "tp").experts)
    with pytest.raises(ValueError, match="I=64 is not divisible by world_size=3"):
        load_checkpoint_sharded(path, 0, 3, "tp")


def test_concat_fills_missing_zeros_and_perm():
    """TP checkpoint loading concatenates chunks of experts that may differ in having zero
    points or permutations: the missing ones mean zero point 8 and the identity."""
    from w4a16moe.distributed import _concat

    a = _experts(2, 64, 32, sym=True, act=False, seed=1)
    b = _experts(3, 64, 32, sym=False, act=True, seed=2)
    both = _concat([a, b])
    assert both.num_experts == 5 and both.w13.zeros is not None and both.w2.perm is not None
    for got, want in zip(both.dequantize(torch.float64),
                         (torch.cat([x, y]) for x, y in zip(a.dequantize(torch.float64),
                                                            b.dequantize(torch.float64),
                                                            strict=True)), strict=True):
        assert torch.equal(got, want)


def test_load_checkpoint_sharded_rank_without_experts(tmp_path):
    from formats_helpers import build

    path = str(tmp_path / "ckpt")
    build(path, "gptq", e=2, h=H, i=64, g=32, layers=1)
    got = load_checkpoint_sharded(path, 3, 4, "ep")[0]
    assert got.num_local_experts == 0 and got.expert_map.tolist() == [-1, -1]
    assert got.experts.w13.qweight.shape == (0, 128, H // 8)


# ---------------------------------------------------------------------------------------------
# several processes (gloo), kernels forced to each path
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, cases: list[dict]) -> None:
    torch.set_num_threads(1)
    if ON_GPU:  # one GPU per process, NCCL
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if ON_GPU else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        for case in cases:
            _run_case(rank, world_size, device, **case)
    finally:
        dist.destroy_process_group()


def _run_case(rank: int, world_size: int, device: torch.device, *, mode: str, e: int, i: int,
              g: int, sym: bool, act: bool, top_k: int, paths: dict[str, int],
              on_input: bool = False) -> None:
    """Every rank builds the same experts and inputs (same seeds), runs its shard with each
    forced path and checks the all-reduced output against the unsharded reference."""
    ex = _experts(e, i, g, sym, act).to(device)
    layer = ParallelHybridMoE(shard_experts(ex, rank, world_size, mode), top_k,
                              apply_router_weight_on_input=on_input)
    for path, m in paths.items():
        gen = torch.Generator().manual_seed(100 + m)
        x = torch.randn(m, H, generator=gen).to(device, DTYPE)
        w, ids = (t.to(device) for t in _routing(m, e, top_k, gen))
        out = layer(x, w, ids, path=path)
        ref = moe_reference(x, ex, w, ids, apply_router_weight_on_input=on_input,
                            compute_dtype=torch.float64, round_intermediate=True)
        what = f"rank {rank}/{world_size} {mode} E={e} I={i} G={g} sym={sym} act={act} {path}"
        assert out.shape == (m, H) and out.dtype == DTYPE, what
        assert torch.isfinite(out).all(), what
        tol = 2.0**-9 * world_size
        bound = tol * ref.abs() + tol * ref.abs().max().clamp_min(1e-30)
        worst = ((out.double() - ref).abs() / bound).max().item()
        assert worst <= 1.0, f"{what}: error exceeds the bound by {worst:.2f}x"
        # the all-reduce leaves the same bits on every rank
        outs = [torch.empty_like(out) for _ in range(world_size)]
        dist.all_gather(outs, out)
        for r, o in enumerate(outs):
            assert torch.equal(o, out), f"{what}: rank {r} differs"


def _spawn(world_size: int, cases: list[dict]) -> None:
    mp.spawn(_entry, args=(world_size, _free_port(), cases), nprocs=world_size, join=True)


both = {"decode": 2, "prefill": 5}

SPAWN_CASES = {
    "tp-2": (2, [
        # act-order w2: GEMM1 rows follow w2's perm
        dict(mode="tp", e=4, i=64, g=32, sym=True, act=True, top_k=2, paths=both),
        # each rank's slice inside one group of 64: per-channel local w2; weights on input
        dict(mode="tp", e=4, i=64, g=64, sym=False, act=False, top_k=2, on_input=True,
             paths=both),
    ]),
    "tp-4": (4, [
        dict(mode="tp", e=4, i=128, g=32, sym=False, act=True, top_k=2,
             paths={"decode": 2, "prefill": 4}),
    ]),
    "ep-2": (2, [
        # 5 experts over 2 ranks: 3 + 2
        dict(mode="ep", e=5, i=64, g=32, sym=True, act=False, top_k=2, paths=both),
        dict(mode="ep", e=5, i=64, g=32, sym=False, act=True, top_k=3, on_input=True,
             paths=both),
        # 1 expert over 2 ranks: rank 1 holds none and adds zeros
        dict(mode="ep", e=1, i=64, g=32, sym=True, act=False, top_k=1, paths={"decode": 2}),
    ]),
    "ep-3": (3, [
        # 5 experts over 3 ranks: 2 + 2 + 1
        dict(mode="ep", e=5, i=64, g=64, sym=False, act=True, top_k=2, paths=both),
    ]),
}


@pytest.mark.skipif(not dist.is_available() or not (dist.is_nccl_available() if ON_GPU
                                                     else dist.is_gloo_available()),
                    reason="torch.distributed with gloo (CPU) / NCCL (GPU) is not available")
@pytest.mark.parametrize("name", list(SPAWN_CASES))
def test_parallel_layer_matches_reference(name):
    world_size, cases = SPAWN_CASES[name]
    if ON_GPU and torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs (one per process); "
                    f"{torch.cuda.device_count()} present")
    assert ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"
    _spawn(world_size, cases)
