"""Prefill kernel (grouped int4 GEMM over aligned blocks) against the reference MoE.

On a CPU machine these run under the Triton interpreter (fp16 only: the interpreter's bf16
arithmetic is wrong); on a GPU the bf16 cases run too. Shapes stay tiny: each interpreted
(program x K step) costs ~5 ms.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import DEVICE, ON_GPU

from w4a16moe.kernels import configs as cfgmod
from w4a16moe.kernels import prefill as prefill_mod
from w4a16moe.kernels.prefill import (
    PrefillWorkspace,
    dense_path_supported,
    dequantize_dense,
    fragment_order_columns,
    fused_moe_prefill,
    gather_sorted_rows,
    prefill_gemm,
)
from w4a16moe.quantize import random_experts
from w4a16moe.reference import moe_reference
from w4a16moe.routing import align_block_size, fused_topk

DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not ON_GPU, reason="bf16 arithmetic is wrong under the Triton interpreter"))]
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
# a config whose BLOCK_SIZE_K (64) spans two groups of 32 (the per-column group path)
WIDE_K = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 2,
          "num_warps": 4, "num_stages": 2}


def make_case(m, h, i, e, top_k, *, group_size=32, symmetric=True, act_order=False,
              dtype=torch.float16, seed=0):
    experts = random_experts(e, h, i, group_size=group_size, symmetric=symmetric,
                             act_order=act_order, dtype=dtype, device=DEVICE, seed=seed)
    x = torch.randn(m, h, dtype=dtype, device=DEVICE)
    weights, ids = fused_topk(torch.randn(m, e, device=DEVICE), top_k)
    return experts, x, weights, ids


def run_and_compare(experts, x, weights, ids, *, dtype=torch.float16, expert_map=None,
                    activation="silu", on_input=False, configs=None, atomic=False,
                    workspace=None):
    m, h = x.shape
    out = torch.full((m, h), float("nan"), dtype=dtype, device=DEVICE)
    got = fused_moe_prefill(x, experts, weights, ids, activation=activation,
                            apply_router_weight_on_input=on_input, expert_map=expert_map,
                            out=out, configs=configs, atomic_topk_sum=atomic,
                            workspace=workspace)
    assert got.data_ptr() == out.data_ptr()
    ref = moe_reference(x, experts, weights, ids, activation=activation,
                        apply_router_weight_on_input=on_input, expert_map=expert_map,
                        round_intermediate=True)
    assert torch.isfinite(got).all(), "unwritten (NaN) output rows"
    err = ((got.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("e,top_k", [(1, 1), (3, 2), (5, 3)])
def test_basic(m, e, top_k, dtype):
    experts, x, w, ids = make_case(m, 64, 32, e, top_k, dtype=dtype, seed=m * 10 + e)
    run_and_compare(experts, x, w, ids, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,h,i", [(32, 96, 64), (64, 64, 64), (128, 128, 128),
                                            (-1, 72, 40), (-1, 96, 80)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_group_sizes(group_size, h, i, symmetric, dtype):
    experts, x, w, ids = make_case(9, h, i, 3, 2, group_size=group_size, symmetric=symmetric,
                                   dtype=dtype, seed=group_size + h)
    run_and_compare(experts, x, w, ids, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order(symmetric, dtype):
    experts, x, w, ids = make_case(11, 64, 64, 4, 2, act_order=True, symmetric=symmetric,
                                   dtype=dtype, seed=3)
    run_and_compare(experts, x, w, ids, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_activations(activation, dtype):
    experts, x, w, ids = make_case(10, 64, 32, 3, 2, dtype=dtype, seed=5)
    run_and_compare(experts, x, w, ids, dtype=dtype, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 3])
def test_router_weight_on_input(top_k, dtype):
    experts, x, w, ids = make_case(8, 64, 32, 4, top_k, dtype=dtype, seed=6)
    run_and_compare(experts, x, w, ids, dtype=dtype, on_input=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_map(dtype):
    """Expert parallel: 6 global experts, 3 on this rank; remote ones contribute zero."""
    m, h, i = 13, 64, 32
    local = random_experts(3, h, i, group_size=32, dtype=dtype, device=DEVICE, seed=7)
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32, device=DEVICE)
    x = torch.randn(m, h, dtype=dtype, device=DEVICE)
    w, ids = fused_topk(torch.randn(m, 6, device=DEVICE), 2)
    got = run_and_compare(local, x, w, ids, dtype=dtype, expert_map=expert_map)
    # tokens routed only to remote experts get exactly zero
    remote = (expert_map[ids.long()] < 0).all(dim=1)
    assert torch.equal(got[remote], torch.zeros_like(got[remote]))


def test_all_experts_remote():
    experts, x, w, ids = make_case(5, 64, 32, 2, 1, seed=8)
    expert_map = torch.tensor([-1, -1], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(x, float("nan"))
    fused_moe_prefill(x, experts, w, ids, expert_map=expert_map, out=out)
    assert torch.equal(out, torch.zeros_like(out))


def test_duplicate_experts():
    """The same expert twice in one token's top-k: both slots count."""
    experts, x, w, _ = make_case(6, 64, 32, 3, 2, seed=9)
    ids = torch.tensor([[1, 1], [0, 0], [2, 1], [2, 2], [0, 1], [1, 1]], dtype=torch.int32,
                       device=DEVICE)
    run_and_compare(experts, x, w, ids)


@pytest.mark.parametrize("config", [
    WIDE_K,
    {**WIDE_K, "SWAP_AB": False},
    {**cfgmod.INTERPRETER_CONFIG, "DEQUANT": 0},
    {**cfgmod.INTERPRETER_CONFIG, "SWAP_AB": False, "DEQUANT": 1},
], ids=["wide-k", "no-swap", "int-convert", "no-swap-exp"])
def test_configs(config):
    experts, x, w, ids = make_case(9, 96, 64, 3, 2, symmetric=False, seed=10)
    run_and_compare(experts, x, w, ids, configs=(config, config))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,h,i,symmetric,act_order,config", [
    (32, 96, 64, False, False, {**cfgmod.INTERPRETER_CONFIG, "FRAG_K": True}),
    (32, 96, 64, True, False, {**WIDE_K, "SWAP_AB": True, "FRAG_K": True}),
    (64, 128, 128, False, False, {**WIDE_K, "BLOCK_SIZE_K": 128, "FRAG_K": True}),
    (128, 128, 128, True, True, {**WIDE_K, "FRAG_K": True}),
    (-1, 72, 40, False, False, {**WIDE_K, "FRAG_K": True}),
    (32, 96, 64, False, False, {**WIDE_K, "SWAP_AB": False, "FRAG_K": True}),
], ids=["g32-bk32", "g32-bk64-sym", "g64-bk128", "g128-act-order", "per-channel-ragged",
        "no-swap-ignored"])
def test_fragment_order_tiles(group_size, h, i, symmetric, act_order, config, dtype):
    """FRAG_K (weight tiles and activations both read in fragment order) against the
    reference: every group mode, zeros, act-order, a ragged K tail."""
    experts, x, w, ids = make_case(9, h, i, 3, 2, group_size=group_size, symmetric=symmetric,
                                   act_order=act_order, dtype=dtype, seed=12)
    run_and_compare(experts, x, w, ids, dtype=dtype, configs=(config, config))


def test_fragment_order_columns_is_its_own_inverse():
    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 64)
    y = fragment_order_columns(x)
    # position 8i + 2c + p holds column 8c + 2i + p: position 2 (i=0, c=1) holds column 8
    assert y[0, 2].item() == 8 and y[0, 8].item() == 2 and y[0, 33].item() == 33
    assert torch.equal(fragment_order_columns(y), x)
    with pytest.raises(ValueError, match="multiple of 32 columns"):
        fragment_order_columns(torch.zeros(2, 48))


@pytest.mark.parametrize("frag", [True, False])
def test_activations_and_output_in_fragment_order(frag):
    """prefill_gemm reading ``a`` stored in fragment order, and writing its output that way,
    gives the plain result (with or without fragment-order weight tiles)."""
    experts, x, w, ids = make_case(6, 128, 64, 4, 2, symmetric=False, seed=13)
    blocks = align_block_size(ids, 16, 4)
    cfg = {**cfgmod.INTERPRETER_CONFIG, "FRAG_K": frag}
    ref = prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2, activation="silu",
                       config={**cfg, "FRAG_K": False})
    got = prefill_gemm(fragment_order_columns(x), experts.w13, blocks, ids, w, top_k=2,
                       activation="silu", config=cfg, a_fragment_order=True)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-3, rtol=2e-3)
    out = prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2, activation="silu",
                       config=cfg, out_fragment_order=True)
    torch.testing.assert_close(fragment_order_columns(out).float(), ref.float(), atol=2e-3,
                               rtol=2e-3)
    with pytest.raises(ValueError, match="a_fragment_order=True with K=72"):
        e2, x2, w2_, ids2 = make_case(6, 72, 64, 4, 2, group_size=-1, seed=14)
        prefill_gemm(x2, e2.w13, align_block_size(ids2, 16, 4), ids2, w2_, top_k=2,
                     config=cfg, a_fragment_order=True)
    with pytest.raises(ValueError, match="out_fragment_order=True with 40 output columns"):
        e3, x3, w3, ids3 = make_case(6, 64, 40, 4, 2, group_size=-1, seed=15)
        prefill_gemm(x3, e3.w13, align_block_size(ids3, 16, 4), ids3, w3, top_k=2,
                     activation="silu", config=cfg, out_fragment_order=True)


def test_gather_sorted_rows():
    """Row p of the gather is the activation of slot sorted_token_ids[p] (by token, or by
    slot); padding positions in the blocks are zero; rows after the used blocks are left as
    they are."""
    experts, x, w, ids = make_case(11, 64, 32, 4, 3, seed=31)
    blocks = align_block_size(ids, 16, 4)
    sorted_ids = blocks.sorted_token_ids.long()
    em = sorted_ids.numel()
    out = torch.full((em + 5, 64), 7.0, dtype=x.dtype, device=DEVICE)
    got = gather_sorted_rows(x, blocks, top_k=3, out=out)
    assert got.data_ptr() == out.data_ptr()
    valid = sorted_ids < 33
    npp = int(blocks.num_tokens_post_padded.item())
    assert npp < em and torch.equal(out[:em][valid], x[sorted_ids[valid] // 3])
    pad = out[:npp][~valid[:npp]]
    assert pad.numel() and torch.equal(pad, torch.zeros_like(pad))
    assert (out[npp:] == 7).all()
    slots = torch.randn(33, 64, dtype=x.dtype, device=DEVICE)
    by_slot = gather_sorted_rows(slots, blocks, top_k=3, a_is_slots=True)
    assert torch.equal(by_slot[valid], slots[sorted_ids[valid]])
    xt = x.t().contiguous().t()   # column-major: any strides are read
    assert torch.equal(gather_sorted_rows(xt, blocks, top_k=3)[valid], x[sorted_ids[valid] // 3])
    with pytest.raises(ValueError, match=r"out has shape \(4, 64\)"):
        gather_sorted_rows(x, blocks, top_k=3, out=out[:4])


@pytest.mark.parametrize("frag", [False, True])
def test_sorted_rows_match_the_gathered_gemms(frag):
    """prefill_gemm on activations in sorted order (a_sorted) and writing its output so
    (out_sorted) gives, position for position, the gathered result bit for bit; remote
    experts' rows stay zero."""
    m, top_k, e = 10, 2, 4
    experts, x, w, ids = make_case(m, 64, 32, e, top_k, symmetric=False, seed=32)
    expert_map = torch.tensor([0, -1, 1, 2], dtype=torch.int32, device=DEVICE)
    local = experts.select_experts(torch.tensor([0, 2, 3], device=DEVICE))
    blocks = align_block_size(ids, 16, e, expert_map)
    cfg = {**cfgmod.INTERPRETER_CONFIG, "FRAG_K": frag}
    xa = fragment_order_columns(x) if frag else x
    sorted_ids = blocks.sorted_token_ids.long()
    em, slots = sorted_ids.numel(), m * top_k
    pos = (sorted_ids < slots).nonzero().flatten()
    # GEMM1: gathered vs sorted in, sorted out
    ref1 = prefill_gemm(xa, local.w13, blocks, ids, w, top_k=top_k, activation="silu",
                        config=cfg, a_fragment_order=frag)
    x_sorted = gather_sorted_rows(xa, blocks, top_k=top_k)
    out1 = torch.full((em, 32), float("nan"), dtype=x.dtype, device=DEVICE)
    prefill_gemm(x_sorted, local.w13, blocks, ids, w, top_k=top_k, activation="silu",
                 config=cfg, a_fragment_order=frag, a_sorted=True, out_sorted=True, out=out1)
    assert torch.equal(out1[pos], ref1[sorted_ids[pos]])
    # GEMM2: its sorted input from GEMM1's sorted output
    ref2 = prefill_gemm(ref1, local.w2, blocks, ids, w, top_k=top_k, a_is_slots=True,
                        mul_routed_weight=True, config=cfg)
    got2 = prefill_gemm(out1, local.w2, blocks, ids, w, top_k=top_k, a_is_slots=True,
                        mul_routed_weight=True, config=cfg, a_sorted=True)
    assert torch.equal(got2, ref2)
    remote = expert_map[ids.reshape(-1).long()] < 0
    assert remote.any() and torch.equal(got2[remote], torch.zeros_like(got2[remote]))


@pytest.mark.parametrize("sorted1,sorted2,atomic", [
    (True, False, False), (False, True, False), (True, True, False), (True, True, True)])
def test_sorted_rows_layer(sorted1, sorted2, atomic):
    """SORTED_ROWS on GEMM1's and/or GEMM2's config: the layer against the reference, with
    and without a workspace (whose buffers then hold the sorted rows)."""
    experts, x, w, ids = make_case(13, 64, 32, 3, 2, symmetric=False, seed=33)
    cfg1 = {**cfgmod.INTERPRETER_CONFIG, "SORTED_ROWS": sorted1}
    cfg2 = {**cfgmod.INTERPRETER_CONFIG, "SORTED_ROWS": sorted2}
    plain = run_and_compare(experts, x, w, ids, atomic=atomic,
                            configs=(cfgmod.INTERPRETER_CONFIG, cfgmod.INTERPRETER_CONFIG))
    got = run_and_compare(experts, x, w, ids, configs=(cfg1, cfg2), atomic=atomic)
    if not atomic:
        assert torch.equal(got, plain)
    em = align_block_size(ids, 16, 3).sorted_token_ids.numel()
    for sorted_block in (0, 16):
        ws = PrefillWorkspace.allocate(13, experts, top_k=2, sorted_block=sorted_block)
        ptrs = (ws.intermediate.data_ptr(), ws.gemm2_out.data_ptr())
        got_ws = run_and_compare(experts, x, w, ids, configs=(cfg1, cfg2), atomic=atomic,
                                 workspace=ws)
        if not atomic:
            assert torch.equal(got_ws, plain)
        # sized for the blocks: nothing replaced; else the first call grew the buffers
        assert ws.intermediate.shape[0] >= em and ws.gemm2_out.shape[0] >= em
        same = ptrs == (ws.intermediate.data_ptr(), ws.gemm2_out.data_ptr())
        assert same == (sorted_block == 16)
        again = run_and_compare(experts, x, w, ids, configs=(cfg1, cfg2), atomic=atomic,
                                workspace=ws)
        assert ws.intermediate.shape[0] >= em
        if not atomic:
            assert torch.equal(again, plain)


def test_topk_sum_adds_split_partials_in_a_fixed_order():
    """topk_sum over [S, M*top_k, N] partial sums: for each slot k the S partials in ascending
    order, all in fp32, rounded once (the same bits as that loop in torch)."""
    torch.manual_seed(5)
    m, top_k, n, splits = 5, 3, 200, 4
    parts = torch.randn(splits, m * top_k, n, device=DEVICE)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
    prefill_mod.topk_sum(parts, top_k, out)
    acc = torch.zeros(m, n, device=DEVICE)
    for k in range(top_k):
        for s in range(splits):
            acc = acc + parts[s].view(m, top_k, n)[:, k]
    assert torch.equal(out, acc.half())
    # one partial: the same as the 2-D form
    two_d = torch.empty_like(out)
    prefill_mod.topk_sum(parts[0], top_k, two_d)
    prefill_mod.topk_sum(parts[:1], top_k, out)
    assert torch.equal(out, two_d)
    with pytest.raises(ValueError, match=r"expected \[15, N\] \(or \[S >= 1, 15, N\]\)"):
        prefill_mod.topk_sum(parts[:, :14], top_k, out)
    with pytest.raises(ValueError, match=r"expected \[M \* top_k, N\] or \[S, M \* top_k, N\]"):
        prefill_mod.topk_sum(parts[None], top_k, out)


def test_topk_sum_sets_the_counts_it_is_given_to_zero():
    """``topk_sum(..., zero_counts=c)`` (how ``fused_moe_prefill`` resets GEMM2's per-block
    counts) zeroes every count, more than one kernel block of them, with the sum unchanged;
    counts that are not contiguous int32 are refused."""
    torch.manual_seed(6)
    m, top_k, n = 3, 2, 40
    parts = torch.randn(m * top_k, n, device=DEVICE)
    want = torch.empty(m, n, device=DEVICE)
    prefill_mod.topk_sum(parts, top_k, want)
    counts = torch.arange(1, 150, dtype=torch.int32, device=DEVICE)  # 149 > BLOCK_N (64)
    out = torch.empty(m, n, device=DEVICE)
    prefill_mod.topk_sum(parts, top_k, out, zero_counts=counts)
    assert torch.equal(out, want) and not counts.any()
    with pytest.raises(ValueError, match="zero_counts has dtype torch.int64"):
        prefill_mod.topk_sum(parts, top_k, out, zero_counts=counts.long())
    with pytest.raises(ValueError, match=r"\(contiguous: False\)"):
        prefill_mod.topk_sum(parts, top_k, out, zero_counts=counts[::2])


def test_split_k_gemm_on_the_triton_kernel():
    """A SPLIT_K config where the Gluon kernel does not run (here: no Hopper GPU, or the
    interpreter): the float32 partials hold the whole sum in the first and zeros in the
    others; a wrong output buffer and a split GEMM1 are refused by name."""
    experts, x, w, ids = make_case(9, 64, 64, 3, 2, seed=35)
    blocks = align_block_size(ids, 16, 3)
    inter = torch.randn(18, 64, dtype=x.dtype, device=DEVICE)
    common = dict(blocks=blocks, topk_ids=ids, topk_weights=w, top_k=2, a_is_slots=True,
                  mul_routed_weight=True)
    whole = prefill_gemm(inter, experts.w2, config=cfgmod.INTERPRETER_CONFIG, **common)
    cfg = {**cfgmod.INTERPRETER_CONFIG, "SPLIT_K": 4}
    parts = prefill_gemm(inter, experts.w2, config=cfg, **common)
    assert parts.shape == (4, 18, 64) and parts.dtype == torch.float32
    assert torch.equal(parts[1:], torch.zeros_like(parts[1:]))
    err = ((parts[0] - whole.float()).abs().max() / whole.float().abs().max()).item()
    assert err < 1e-3
    with pytest.raises(ValueError, match=r"expected \(4, 18, 64\), torch.float32 .*SPLIT_K=4"):
        prefill_gemm(inter, experts.w2, config=cfg, out=torch.empty(18, 64, dtype=x.dtype),
                     **common)
    with pytest.raises(ValueError, match="config has SPLIT_K=4.*activation='silu'"):
        prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2, activation="silu", config=cfg)


@pytest.mark.parametrize("atomic", [False, True])
def test_split_k_layer(atomic):
    """SPLIT_K on GEMM2's config: the layer against the reference with and without a
    workspace (whose partial-sum buffer grows once if it was not sized for the split); on
    GEMM1's config it is ignored (its activation needs whole sums), and the atomic top-k sum
    does not split."""
    experts, x, w, ids = make_case(11, 64, 64, 3, 2, symmetric=False, seed=36)
    base = cfgmod.INTERPRETER_CONFIG
    split = {**base, "SPLIT_K": 2}
    plain = run_and_compare(experts, x, w, ids, configs=(base, base), atomic=atomic)
    got = run_and_compare(experts, x, w, ids, configs=(split, split), atomic=atomic)
    if atomic:
        assert torch.equal(got, plain)
    for numel in (0, 2 * 22 * 64):
        ws = PrefillWorkspace.allocate(11, experts, top_k=2, split_partials=numel)
        first = ws.split_partials
        again = run_and_compare(experts, x, w, ids, configs=(base, split), atomic=atomic,
                                workspace=ws)
        assert torch.equal(again, got)
        if not atomic:
            assert ws.split_partials is not None and ws.split_partials.numel() >= 2 * 22 * 64
            assert (ws.split_partials is first) == (numel > 0)


def test_sorted_rows_validation():
    experts, x, w, ids = make_case(4, 64, 32, 3, 2, seed=34)
    blocks = align_block_size(ids, 16, 3)
    em = blocks.sorted_token_ids.numel()
    with pytest.raises(ValueError, match=rf"expected at least \({em}, 64\) with a_sorted"):
        prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2, a_sorted=True)
    with pytest.raises(ValueError, match="atomic_topk_sum and out_sorted"):
        prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2,
                     atomic_topk_sum=True, out_sorted=True)
    with pytest.raises(ValueError, match=rf"expected at least \({em}, 32\)"):
        prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2, activation="silu",
                     out_sorted=True, out=torch.empty(8, 32, dtype=x.dtype, device=DEVICE))
    with pytest.raises(ValueError, match="SORTED_ROWS is 1"):
        cfgmod.validate_config({**WIDE_K, "SORTED_ROWS": 1})


def test_fragment_order_needs_wide_k():
    with pytest.raises(ValueError, match="FRAG_K needs BLOCK_SIZE_K >= 32"):
        cfgmod.validate_config({**WIDE_K, "BLOCK_SIZE_K": 16, "FRAG_K": True})


def test_fragment_order_needs_one_warpgroup():
    """More than 4 warps with fragment-order tiles gave sporadic wrong elements on the H100
    (Triton 3.6): both the config-file validator and the launcher refuse it."""
    with pytest.raises(ValueError, match="FRAG_K needs num_warps <= 4"):
        cfgmod.validate_config({**WIDE_K, "num_warps": 8, "FRAG_K": True})
    experts, x, w, ids = make_case(3, 64, 32, 2, 1)
    blocks = align_block_size(ids, 16, 2)
    with pytest.raises(ValueError, match="FRAG_K needs num_warps <= 4"):
        prefill_gemm(x, experts.w13, blocks, ids, w, top_k=1, activation="silu",
                     config={**WIDE_K, "BLOCK_SIZE_M": 16, "num_warps": 8, "FRAG_K": True})


@pytest.mark.skipif(not ON_GPU, reason="a compiled-kernel race check: GPU only")
def test_shipped_fragment_order_configs_repeat_bit_for_bit():
    """Every FRAG_K entry of the shipped H100 table, run 8 times on NaN-poisoned outputs at a
    shape with many blocks, gives the same bits each time and matches the plain-order tile
    within rounding (an unsynchronised pipeline shows up as runs that differ)."""
    table = json.loads((cfgmod.CONFIG_DIR / "NVIDIA_H100_80GB_HBM3.json").read_text())
    seen = set()
    for shape, buckets in table.items():
        if shape.startswith("_"):
            continue
        for cfg in buckets.values():
            if cfg.get("FRAG_K") and cfg.get("SWAP_AB"):
                seen.add(tuple(sorted(cfg.items())))
    assert seen, "the shipped table has FRAG_K entries"
    e, h, i, top_k, m = 16, 1024, 512, 4, 512
    experts, x, w, ids = make_case(m, h, i, e, top_k, group_size=128, dtype=torch.bfloat16,
                                   seed=21)
    x_frag = fragment_order_columns(x)

    def repeats(like, cfg, blocks, **kwargs):
        """8 fragment-order runs of one GEMM, each into a fresh NaN-poisoned output."""
        outs = [torch.full_like(like, float("nan")) for _ in range(8)]
        for out in outs:
            prefill_gemm(blocks=blocks, topk_ids=ids, topk_weights=w, top_k=top_k,
                         config=cfg, a_fragment_order=True, out=out, **kwargs)
        return outs

    for items in sorted(seen):
        cfg = dict(items)
        blocks = align_block_size(ids, cfg["BLOCK_SIZE_M"], e)
        plain = prefill_gemm(x, experts.w13, blocks, ids, w, top_k=top_k, activation="silu",
                             config={**cfg, "FRAG_K": False})
        runs = repeats(plain, cfg, blocks, a=x_frag, weights=experts.w13, activation="silu")
        # GEMM2's path (activations indexed by slot, no activation function)
        plain2 = prefill_gemm(plain, experts.w2, blocks, ids, w, top_k=top_k, a_is_slots=True,
                              mul_routed_weight=True, config={**cfg, "FRAG_K": False})
        runs2 = repeats(plain2, cfg, blocks, a=fragment_order_columns(plain), weights=experts.w2,
                        a_is_slots=True, mul_routed_weight=True)
        for got, ref in ((runs, plain), (runs2, plain2)):
            for r in got[1:]:
                assert torch.equal(r, got[0]), f"{cfg}: runs differ"
            err = (got[0].float() - ref.float()).abs().max() / ref.float().abs().max()
            assert err.item() < 1e-2, f"{cfg}: {err.item():.2e} from the plain-order tile"


def test_ragged_k_per_channel_wide_block():
    """Per-channel groups with K=72 not a multiple of BLOCK_SIZE_K=64 (masked K tail)."""
    experts, x, w, ids = make_case(7, 72, 40, 3, 2, group_size=-1, symmetric=False, seed=11)
    run_and_compare(experts, x, w, ids, configs=(WIDE_K, WIDE_K))


def test_atomic_topk_sum():
    experts, x, w, ids = make_case(9, 64, 32, 3, 3, seed=12)
    run_and_compare(experts, x, w, ids, atomic=True)


def test_workspace_reuse():
    experts, x, w, ids = make_case(33, 64, 32, 3, 2, seed=13)
    ws = PrefillWorkspace.allocate(33, experts, top_k=2)
    run_and_compare(experts, x, w, ids, workspace=ws)
    inter_ptr = ws.intermediate.data_ptr()
    run_and_compare(experts, x[:7], w[:7], ids[:7], workspace=ws)
    assert ws.intermediate.data_ptr() == inter_ptr
    with pytest.raises(ValueError, match="workspace.intermediate"):
        small = PrefillWorkspace.allocate(4, experts, top_k=2)
        fused_moe_prefill(x, experts, w, ids, workspace=small)


def test_workspace_holds_the_alignment(monkeypatch):
    """With a workspace the align_block_size outputs are views of its buffers (no
    allocation), for local experts under an expert_map too; too-small buffers fall back."""
    experts, x, w, ids = make_case(20, 64, 32, 6, 2, seed=17)
    expert_map = torch.tensor([0, -1, 1, 2, -1, -1], dtype=torch.int32, device=DEVICE)
    local = experts.select_experts(torch.tensor([0, 2, 3], device=DEVICE))
    ws = PrefillWorkspace.allocate(20, local, top_k=2, num_global_experts=6)
    for t in (ws.sorted_ids, ws.expert_ids, ws.num_post_padded, ws.align_scratch):
        t.fill_(-7)
    seen = []
    real = prefill_mod.align_block_size

    def spy(*args, **kwargs):
        seen.append(kwargs.get("out"))
        return real(*args, **kwargs)

    monkeypatch.setattr(prefill_mod, "align_block_size", spy)
    run_and_compare(local, x, w, ids, expert_map=expert_map, workspace=ws)
    assert seen[-1] is not None
    assert seen[-1].sorted_token_ids.data_ptr() == ws.sorted_ids.data_ptr()
    bm = cfgmod.INTERPRETER_CONFIG["BLOCK_SIZE_M"] if not ON_GPU else None
    if bm is not None:
        ref = align_block_size(ids, bm, 6, expert_map)
        n = ref.sorted_token_ids.numel()
        assert torch.equal(ws.sorted_ids[:n], ref.sorted_token_ids)
        assert torch.equal(ws.expert_ids[: n // bm], ref.expert_ids)
    # sized for the 3 local experts only: the 6 global ones do not fit, it allocates
    small = PrefillWorkspace.allocate(20, local, top_k=2)
    assert small.align_views(40, 16, 6) is None and small.align_views(40, 16, 3) is not None
    run_and_compare(local, x, w, ids, expert_map=expert_map, workspace=small)
    assert seen[-1] is None


def test_empty_batch_launches_nothing(monkeypatch):
    experts, x, w, ids = make_case(0, 64, 32, 3, 2, seed=14)

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("kernel launched for M=0")

    monkeypatch.setattr(prefill_mod, "_prefill_kernel", NoLaunch())
    out = fused_moe_prefill(x, experts, w, ids)
    assert out.shape == (0, 64)
    blocks = align_block_size(ids, 16, 3)
    got = prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2)
    assert got.shape == (0, 64)


def test_prefill_gemm_slots_and_remote_rows():
    """GEMM2 alone: rows indexed by slot, routed weight on the output, remote rows zero."""
    m, top_k, e, k = 10, 2, 4, 64
    experts = random_experts(e, 96, k, group_size=32, dtype=torch.float16, device=DEVICE,
                             seed=15)
    w2 = experts.w2  # [E, 96, 64]
    n = w2.n
    a = torch.randn(m * top_k, k, dtype=torch.float16, device=DEVICE)
    weights, ids = fused_topk(torch.randn(m, e, device=DEVICE), top_k)
    expert_map = torch.tensor([0, -1, 1, 2], dtype=torch.int32, device=DEVICE)
    local = w2.select_experts(torch.tensor([0, 2, 3]))
    # no config given: BLOCK_SIZE_M follows the blocks (32), whatever the table says
    blocks = align_block_size(ids, 32, e, expert_map)
    out = torch.full((m * top_k, n), float("nan"), dtype=torch.float16, device=DEVICE)
    prefill_gemm(a, local, blocks, ids, weights, top_k=top_k, mul_routed_weight=True,
                 a_is_slots=True, out=out)
    dense = w2.dequantize(torch.float32)
    flat_ids = ids.reshape(-1).long()
    ref = torch.einsum("sk,snk->sn", a.float(), dense[flat_ids]) * weights.reshape(-1, 1)
    ref[flat_ids == 1] = 0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)
    assert torch.equal(out[flat_ids == 1], torch.zeros_like(out[flat_ids == 1]))


def test_validation_errors():
    experts, x, w, ids = make_case(4, 64, 32, 3, 2, seed=16)
    blocks = align_block_size(ids, 16, 3)
    with pytest.raises(ValueError, match="a has dtype"):
        prefill_gemm(x.float(), experts.w13, blocks, ids, w, top_k=2)
    with pytest.raises(ValueError, match=r"a has shape \(4, 32\)"):
        prefill_gemm(x[:, :32], experts.w13, blocks, ids, w, top_k=2)
    with pytest.raises(ValueError, match="BLOCK_SIZE_M=32"):
        cfg = {**cfgmod.INTERPRETER_CONFIG, "BLOCK_SIZE_M": 32}
        prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2, config=cfg)
    with pytest.raises(ValueError, match="topk_weights has shape"):
        prefill_gemm(x, experts.w13, blocks, ids, None, top_k=2, mul_routed_weight=True)
    with pytest.raises(ValueError, match="out has shape"):
        prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2,
                     out=torch.empty(8, 5, dtype=x.dtype, device=DEVICE))
    with pytest.raises(ValueError, match="activation is"):
        fused_moe_prefill(x, experts, w, ids, activation="relu")
    with pytest.raises(ValueError, match="hidden_states has dtype"):
        fused_moe_prefill(x.float(), experts, w, ids)
    with pytest.raises(ValueError, match="config lacks"):
        prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2, config={"BLOCK_SIZE_M": 16})


# -- config loader ------------------------------------------------------------------------
GOOD = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
        "num_warps": 4, "num_stages": 3}


def test_interpreter_or_cpu_gets_the_small_config():
    cfg = cfgmod.get_prefill_config(100, 256, 128, 8, 2, torch.float16, "cpu")
    assert cfg == cfgmod.INTERPRETER_CONFIG


def test_lookup_nearest_bucket(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"_meta": {"x": 1}, "256,128": {
        "16": {**GOOD, "BLOCK_SIZE_M": 16}, "1024": {**GOOD, "SWAP_AB": False, "DEQUANT": 1}}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cfgmod.lookup_config(path, 20, 256, 128, 8, 2)["BLOCK_SIZE_M"] == 16
        big = cfgmod.lookup_config(path, 5000, 256, 128, 8, 2)
        assert big["SWAP_AB"] is False and big["DEQUANT"] == 1
        # shape not in the file: heuristic, silently
        assert cfgmod.lookup_config(path, 20, 512, 128, 8, 2) == cfgmod.heuristic_config(
            20, 512, 128, 8, 2)


@pytest.mark.parametrize("text,problem", [
    ("{not json", "Expecting"),
    (json.dumps([1, 2]), "top level"),
    (json.dumps({"256": {"16": GOOD}}), "not 'N,K'"),
    (json.dumps({"256,128": {"16": {**GOOD, "BLOCK_SIZE_N": 100}}}), "power of two"),
    (json.dumps({"256,128": {"16": {**GOOD, "num_warps": "4"}}}), "positive int"),
    (json.dumps({"256,128": {"x": GOOD}}), "not an integer M"),
    (json.dumps({"256,128": {"16": {"BLOCK_SIZE_M": 16}}}), "lacks"),
    (json.dumps({"256,128": {"16": {**GOOD, "DEQUANT": 5}}}), "DEQUANT"),
])
def test_malformed_file_warns_and_falls_back(tmp_path, text, problem):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.warns(RuntimeWarning, match=problem) as rec:
        cfg = cfgmod.lookup_config(path, 64, 256, 128, 8, 2)
    assert str(path) in str(rec[0].message)
    assert cfg == cfgmod.heuristic_config(64, 256, 128, 8, 2)


H100 = {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "multiprocessors": 132}
H200 = {"name": "NVIDIA H200", "capability": [9, 0], "multiprocessors": 132}


def _fake_gpu(monkeypatch, tmp_path, traits):
    """Config lookups as on a GPU with ``traits``, the package's files being ``tmp_path``'s."""
    monkeypatch.setattr(cfgmod, "_interpreted", lambda device: False)
    monkeypatch.setattr(cfgmod, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(cfgmod, "gpu_traits", lambda device=None: dict(traits))
    for fn in (cfgmod._warn_missing, cfgmod._warn_borrowed, cfgmod._cached_sibling):
        fn.cache_clear()


def _tuned(path, gpu, body):
    path.write_text(json.dumps({"_meta": {"device": gpu and gpu["name"], "gpu": gpu}, **body}))
    return path


def test_unknown_gpu_warns_and_falls_back(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch, tmp_path, {"name": "Mystery GPU", "capability": [8, 0],
                                      "multiprocessors": 108})
    _tuned(tmp_path / "NVIDIA_H100_80GB_HBM3.json", H100, {"1536,2048": {"16": GOOD}})
    with pytest.warns(RuntimeWarning, match="Mystery_GPU.json"):
        cfg = cfgmod.get_prefill_config(4096, 1536, 2048, 128, 8, torch.bfloat16, DEVICE)
    assert cfg == cfgmod.heuristic_config(4096, 1536, 2048, 128, 8)


def test_sibling_file_needs_the_same_capability_and_multiprocessors(tmp_path):
    h100 = _tuned(tmp_path / "NVIDIA_H100_80GB_HBM3.json", H100, {})
    h100_t = _tuned(tmp_path / "NVIDIA_H100_80GB_HBM3_thresholds.json", H100, {})
    pcie = {"name": "NVIDIA H100 PCIe", "capability": [9, 0], "multiprocessors": 114}
    _tuned(tmp_path / "NVIDIA_H100_PCIe.json", pcie, {})
    _tuned(tmp_path / "Old_GPU.json", None, {})  # no GPU record: never borrowed
    (tmp_path / "Broken_GPU.json").write_text("{not json")
    assert cfgmod.sibling_file(H200, config_dir=tmp_path) == h100
    assert cfgmod.sibling_file(H200, cfgmod.THRESHOLDS_SUFFIX, tmp_path) == h100_t
    assert cfgmod.sibling_file({**pcie, "name": "Other PCIe"}, config_dir=tmp_path) == (
        tmp_path / "NVIDIA_H100_PCIe.json")
    assert cfgmod.sibling_file({**H200, "capability": [10, 0]}, config_dir=tmp_path) is None
    assert cfgmod.sibling_file({**H200, "multiprocessors": 144}, config_dir=tmp_path) is None
    assert cfgmod.sibling_file(H100, config_dir=tmp_path) is None  # not itself


def test_gpu_without_files_borrows_a_siblings_table(monkeypatch, tmp_path):
    """An H200 (no file of its own) runs the H100's tuned entries, and says so once; its own
    file, once there, wins; with borrowing off it gets the heuristic."""
    _fake_gpu(monkeypatch, tmp_path, H200)
    tuned = {**GOOD, "BLOCK_SIZE_M": 32}
    h100 = _tuned(tmp_path / "NVIDIA_H100_80GB_HBM3.json", H100, {"1536,2048": {"64": tuned}})
    with pytest.warns(RuntimeWarning, match="NVIDIA H200.*NVIDIA H100 80GB HBM3") as rec:
        cfg = cfgmod.get_prefill_config(64, 1536, 2048, 128, 8, torch.bfloat16, DEVICE)
    assert cfg == tuned and str(h100) in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert cfgmod.get_prefill_config(64, 1536, 2048, 128, 8, torch.bfloat16, DEVICE) == tuned
    monkeypatch.setattr(cfgmod, "BORROW_SIBLING_FILES", False)
    with pytest.warns(RuntimeWarning, match="NVIDIA_H200.json"):
        cfg = cfgmod.get_prefill_config(64, 1536, 2048, 128, 8, torch.bfloat16, DEVICE)
    assert cfg == cfgmod.heuristic_config(64, 1536, 2048, 128, 8)
    monkeypatch.setattr(cfgmod, "BORROW_SIBLING_FILES", True)
    own = {**GOOD, "BLOCK_SIZE_M": 64}
    _tuned(tmp_path / "NVIDIA_H200.json", H200, {"1536,2048": {"64": own}})
    assert cfgmod.get_prefill_config(64, 1536, 2048, 128, 8, torch.bfloat16, DEVICE) == own


def test_shipped_files_record_their_gpu():
    """Every shipped tuned file names the GPU it was tuned on, with what makes a sibling."""
    files = sorted(cfgmod.CONFIG_DIR.glob("*.json"))
    assert files
    for f in files:
        gpu = json.loads(f.read_text())["_meta"]["gpu"]
        assert f.name == cfgmod.gpu_file_name(gpu["name"], cfgmod.THRESHOLDS_SUFFIX if
                                              f.name.endswith("_thresholds.json") else ".json")
        assert len(gpu["capability"]) == 2 and gpu["multiprocessors"] > 0, f.name


@pytest.mark.parametrize("m,top_k,e", [(1, 8, 128), (64, 8, 128), (4096, 8, 128),
                                       (4096, 2, 8), (100000, 6, 64)])
def test_heuristic_configs_are_valid(m, top_k, e):
    cfg = cfgmod.heuristic_config(m, 1536, 2048, e, top_k)
    assert cfgmod.validate_config(cfg) == cfg


def test_shipped_config_files_parse():
    # <gpu>_thresholds.json beside them is the decode threshold table (tests/test_tune.py)
    files = sorted(f for f in cfgmod.CONFIG_DIR.glob("*.json")
                   if not f.name.endswith("_thresholds.json"))
    assert files
    for f in files:
        table = cfgmod.parse_table(json.loads(f.read_text()))
        assert table, f"{f.name} holds no shapes"


# --------------------------------------------------------------------------------------------
# dense path: dequantize + torch._grouped_mm (selected by "DENSE" in GEMM1's config)

DENSE_CFG = {**cfgmod.INTERPRETER_CONFIG, "DENSE": True}


@pytest.mark.parametrize("group_size,k,symmetric", [(32, 96, True), (64, 128, False),
                                                    (128, 256, True), (-1, 72, False)])
def test_dequantize_dense_matches_layout(group_size, k, symmetric):
    experts = random_experts(3, k, max(32, group_size), group_size=group_size,
                             symmetric=symmetric,
                             dtype=torch.float16, device=DEVICE, seed=k)
    w = experts.w13                                   # [3, 2I, k]
    out = torch.full((3, w.n, k), float("nan"), dtype=torch.float16, device=DEVICE)
    got = dequantize_dense(w, out)
    assert got is out
    assert torch.equal(got, w.dequantize(torch.float32).to(torch.float16))


def test_dequantize_dense_rejects():
    experts = random_experts(2, 64, 32, group_size=32, act_order=True, dtype=torch.float16,
                             device=DEVICE, seed=1)
    with pytest.raises(ValueError, match="perm; dequantize_dense needs"):
        dequantize_dense(experts.w13)
    plain = random_experts(2, 64, 32, group_size=32, dtype=torch.float16, device=DEVICE, seed=1)
    with pytest.raises(ValueError, match=r"out has shape \(2, 64, 64\).*expected contiguous "
                                         r"\(2, 64, 64\), torch.float16"):
        dequantize_dense(plain.w13, torch.empty(2, 64, 64, dtype=torch.float32, device=DEVICE))


@pytest.mark.parametrize("m,e,top_k,on_input,activation", [
    (9, 3, 2, False, "silu"), (17, 4, 3, True, "gelu"), (5, 2, 1, False, "gelu_tanh"),
    (1, 4, 2, False, "silu")])
def test_dense_path_matches_reference(m, e, top_k, on_input, activation, monkeypatch):
    # the dense path runs torch._grouped_mm, whose CUDA kernels take bf16 only
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    experts, x, w, ids = make_case(m, 64, 32, e, top_k, symmetric=not on_input, seed=m + 40,
                                   dtype=dtype)
    assert dense_path_supported(experts, None, x.device)

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the fused GEMM kernel ran on the dense path")

    monkeypatch.setattr(prefill_mod, "_prefill_kernel", NoLaunch())
    run_and_compare(experts, x, w, ids, on_input=on_input, activation=activation,
                    configs=(DENSE_CFG, cfgmod.INTERPRETER_CONFIG), dtype=dtype)
    ws = PrefillWorkspace.allocate(m, experts, top_k, dense=True)
    ws.dense_weights.fill_(float("nan"))
    run_and_compare(experts, x, w, ids, on_input=on_input, activation=activation,
                    configs=(DENSE_CFG, cfgmod.INTERPRETER_CONFIG), workspace=ws, dtype=dtype)
    assert not torch.isnan(ws.dense_weights).all()


def test_dense_flag_ignored_where_unsupported():
    """expert_map or act-order: the fused kernel runs despite DENSE."""
    experts, x, w, ids = make_case(8, 64, 32, 4, 2, act_order=True, seed=50)
    assert not dense_path_supported(experts, None, x.device)
    run_and_compare(experts, x, w, ids, configs=(DENSE_CFG, cfgmod.INTERPRETER_CONFIG))
    experts, x, w, ids = make_case(8, 64, 32, 4, 2, seed=51)
    expert_map = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEVICE)
    assert not dense_path_supported(experts, expert_map, x.device)
    run_and_compare(experts, x, w, ids, expert_map=expert_map,
                    configs=(DENSE_CFG, cfgmod.INTERPRETER_CONFIG))


def test_dense_key_in_config_table():
    assert cfgmod.validate_config({**cfgmod.INTERPRETER_CONFIG, "DENSE": True})["DENSE"] is True
    with pytest.raises(ValueError, match=r"DENSE is 1; expected one of \[True, False\]"):
        cfgmod.validate_config({**cfgmod.INTERPRETER_CONFIG, "DENSE": 1})


def test_word_ring_key_in_config_table():
    """``WORD_RING`` (the mma kernel's ring stages) on MMA entries only, 0, 2 or 3."""
    mma = {**cfgmod.INTERPRETER_CONFIG, "BLOCK_SIZE_M": 8, "BLOCK_SIZE_N": 16,
           "BLOCK_SIZE_K": 512, "num_warps": 1, "MMA": True}
    for stages in (0, 2, 3):
        assert cfgmod.validate_config({**mma, "WORD_RING": stages})["WORD_RING"] == stages
    with pytest.raises(ValueError, match=r"WORD_RING is 4; expected one of \[0, 2, 3\]"):
        cfgmod.validate_config({**mma, "WORD_RING": 4})
    with pytest.raises(ValueError, match="WORD_RING is 2 without MMA; expected it only on MMA"):
        cfgmod.validate_config({**cfgmod.INTERPRETER_CONFIG, "WORD_RING": 2})
    with pytest.raises(ValueError, match="bucket '2': WORD_RING is True"):
        cfgmod.parse_table({"4096,14336": {"2": {**mma, "WORD_RING": True}}})


def test_scale_acc_key_in_config_table():
    """``SCALE_ACC`` (scales on the Gluon kernel's accumulator) on RS entries of at most 64
    slots a block only."""
    rs = {**cfgmod.INTERPRETER_CONFIG, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128,
          "num_warps": 8, "SWAP_AB": True, "RS": True}
    for bm in (16, 32, 64):
        cfg = cfgmod.validate_config({**rs, "BLOCK_SIZE_M": bm, "SCALE_ACC": True})
        assert cfg["SCALE_ACC"] is True
    with pytest.raises(ValueError, match=r"SCALE_ACC needs RS and BLOCK_SIZE_M <= 64; found "
                                         r"RS=True, BLOCK_SIZE_M=128"):
        cfgmod.validate_config({**rs, "BLOCK_SIZE_M": 128, "SCALE_ACC": True})
    with pytest.raises(ValueError, match="SCALE_ACC needs RS .* found RS=None"):
        cfgmod.validate_config({**cfgmod.INTERPRETER_CONFIG, "SCALE_ACC": True})
    with pytest.raises(ValueError, match=r"SCALE_ACC is 1; expected one of \[True, False\]"):
        cfgmod.validate_config({**rs, "SCALE_ACC": 1})
    # SUB_STEPS: with SCALE_ACC, at least 32 columns a wgmma
    cfg = cfgmod.validate_config({**rs, "BLOCK_SIZE_K": 64, "SCALE_ACC": True, "SUB_STEPS": 2})
    assert cfg["SUB_STEPS"] == 2 and cfgmod.scale_acc_wgmmas(cfg) == 2
    assert cfgmod.scale_acc_wgmmas({**rs, "SUB_STEPS": 2}) == 0
    assert cfgmod.scale_acc_wgmmas({**rs, "SCALE_ACC": True}) == 1
    with pytest.raises(ValueError, match=r"SUB_STEPS 2 needs SCALE_ACC and BLOCK_SIZE_K / "
                       r"SUB_STEPS >= 32; found SCALE_ACC=None, BLOCK_SIZE_K=64"):
        cfgmod.validate_config({**rs, "BLOCK_SIZE_K": 64, "SUB_STEPS": 2})
    with pytest.raises(ValueError, match=r"found SCALE_ACC=True, BLOCK_SIZE_K=32"):
        cfgmod.validate_config({**rs, "BLOCK_SIZE_K": 32, "SCALE_ACC": True, "SUB_STEPS": 2})
    with pytest.raises(ValueError, match=r"SUB_STEPS is 4; expected one of \[1, 2\]"):
        cfgmod.validate_config({**rs, "SCALE_ACC": True, "SUB_STEPS": 4})


def test_deterministic_configs_take_no_token_tile_below_16(monkeypatch):
    """The deterministic mode's configs: the reference token count's, with ``BLOCK_SIZE_M``
    following the batch only for ``SWAP_AB`` pairs and never below
    ``DETERMINISTIC_MIN_BLOCK_M`` (the tables' 8-slot mma entries gave the Triton kernel
    8-token tiles, and a batch of 1 then differed in a last bit from one of 4096 on the
    H200); GEMM2's token tile is GEMM1's; no ``RS`` or ``DENSE``."""
    experts = random_experts(8, 256, 128, group_size=128, dtype=torch.float16, device=DEVICE,
                             seed=1)

    def table(m, n, k, e, top_k, dtype, device, swap=True):
        if m < 256:  # an 8-slot mma entry
            return {"BLOCK_SIZE_M": 8, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 256,
                    "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 1, "MMA": True}
        return {"BLOCK_SIZE_M": 32 if m < 4096 else 128, "BLOCK_SIZE_N": 128,
                "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1 if m < 4096 else 8, "num_warps": 8,
                "num_stages": 3, "SWAP_AB": swap, "RS": True, "DENSE": m >= 4096}

    monkeypatch.setattr(prefill_mod, "get_prefill_config", table)
    for m, want in ((1, 16), (7, 16), (300, 32), (4096, 128), (None, 32)):
        cfg1, cfg2 = prefill_mod.deterministic_prefill_configs(experts, 2, num_tokens=m)
        assert cfg1["BLOCK_SIZE_M"] == cfg2["BLOCK_SIZE_M"] == want, (m, cfg1, cfg2)
        assert not any(c.get("RS") or c.get("DENSE") for c in (cfg1, cfg2))
    monkeypatch.setattr(prefill_mod, "get_prefill_config",
                        lambda *a: table(*a, swap=False))
    for m in (1, 4096):  # tokens on the MMA's M side: the reference tile for every batch
        cfg1, _ = prefill_mod.deterministic_prefill_configs(experts, 2, num_tokens=m)
        assert cfg1["BLOCK_SIZE_M"] == 32
