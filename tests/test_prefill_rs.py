"""The register-operand Gluon prefill kernel (``RS`` configs, kernels/prefill_rs.py).

The kernel itself runs only on a Hopper GPU with Gluon (the Triton interpreter cannot run
Gluon): there it is checked against the Triton kernel with the same tiles and against the
float32 reference, repeated bit for bit into NaN-poisoned outputs. On any other machine the
config rules and the fallback (the same tiles on the Triton kernel) are checked.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from conftest import DEVICE, ON_GPU

from w4a16moe.kernels import configs as cfgmod
from w4a16moe.kernels import prefill_rs
from w4a16moe.kernels.prefill import fused_moe_prefill, gather_sorted_rows, prefill_gemm
from w4a16moe.kernels.tune import random_logits
from w4a16moe.quantize import random_experts
from w4a16moe.reference import moe_reference
from w4a16moe.routing import align_block_size, fused_topk

ON_HOPPER = (ON_GPU and prefill_rs.HAVE_GLUON
             and torch.cuda.get_device_capability()[0] == 9)
hopper_only = pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel needs an sm_90 GPU")


def rs_config(bm=128, bn=128, bk=64, stages=6, warps=8):
    return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 8,
            "num_warps": warps, "num_stages": stages, "SWAP_AB": True, "RS": True}


def triton_tiles(cfg):
    """The same tiles on the Triton kernel (what the launcher falls back to), without the
    Gluon kernel's keys that need ``RS``."""
    return {k: v for k, v in cfg.items()
            if k not in ("RS", "SCALE_ACC", "SUB_STEPS", "SHORT_BLOCK_T", "QUARTER_BLOCKS")}


def make_case(m, h, i, e, top_k, *, symmetric=True, dtype=torch.bfloat16, seed=0):
    experts = random_experts(e, h, i, group_size=128, symmetric=symmetric, dtype=dtype,
                             device=DEVICE, seed=seed)
    x = torch.randn(m, h, dtype=dtype, device=DEVICE)
    weights, ids = fused_topk(torch.randn(m, e, device=DEVICE), top_k)
    return experts, x, weights, ids


def gemm_bits_with_and_without(flag_configs, *, bm, bn, bk, stages, dtype, symmetric,
                               sorted_rows, seed, gemms=("gemm1", "gemm2")):
    """For each of ``gemms`` (``"gemm1"``: w13 with SiLU on a 300-token case; ``"gemm2"``:
    w2 on GEMM1's output; ``"gemm2_split"``: the same with SPLIT_K 2, float32 partials), the
    outputs of the RS config ``bm x n x bk`` in ``stages`` stages changed by each function
    of ``flag_configs`` (config -> config), NaN-poisoned first (NaN read back as 7). GEMM2
    reads the intermediate of the first GEMM1 variant. Returns ``{gemm: [outputs]}``."""
    e, h, i, top_k, m = 8, 1024, 512, 2, 300
    experts, x, w, ids = make_case(m, h, i, e, top_k, symmetric=symmetric, dtype=dtype,
                                   seed=seed)
    blocks = align_block_size(ids, bm, e)
    em, slots = blocks.sorted_token_ids.numel(), m * top_k
    common = dict(blocks=blocks, topk_ids=ids, topk_weights=w, top_k=top_k)
    results = {}
    for gemm in gemms:
        n_out = bn // 2 if gemm == "gemm1" else bn
        outs = []
        for change in flag_configs:
            cfg = change(rs_config(bm, n_out, bk, stages))
            if gemm == "gemm1":
                a = gather_sorted_rows(x, blocks, top_k=top_k) if sorted_rows else x
                out = torch.full((em if sorted_rows else slots, i), float("nan"), dtype=dtype,
                                 device=DEVICE)
                prefill_gemm(a, experts.w13, activation="silu", config=cfg, out=out,
                             a_sorted=sorted_rows, out_sorted=sorted_rows, **common)
                if not outs:
                    inter = out
            elif gemm == "gemm2":
                out = torch.full((slots, h), float("nan"), dtype=dtype, device=DEVICE)
                prefill_gemm(inter, experts.w2, a_is_slots=True, mul_routed_weight=True,
                             config=cfg, out=out, a_sorted=sorted_rows, **common)
            else:
                out = torch.full((2, slots, h), float("nan"), device=DEVICE)
                prefill_gemm(inter, experts.w2, a_is_slots=True, mul_routed_weight=True,
                             config={**cfg, "SPLIT_K": 2}, out=out, a_sorted=sorted_rows,
                             **common)
            outs.append(out.nan_to_num(nan=7.0))
        results[gemm] = outs
    return results


def test_rs_config_rules():
    base = rs_config()
    assert cfgmod.validate_config(base)["RS"] is True
    for bad in ({**base, "FRAG_K": True}, {**base, "num_warps": 4},
                {**base, "SWAP_AB": False}):
        with pytest.raises(ValueError, match=r"RS needs SWAP_AB, num_warps in \(8, 16\) and no"):
            cfgmod.validate_config(bad)
    assert cfgmod.validate_config({**base, "PREFETCH_SCALES": True})["PREFETCH_SCALES"] is True
    with pytest.raises(ValueError, match=r"PREFETCH_SCALES is 1; expected one of \[True, False\]"):
        cfgmod.validate_config({**base, "PREFETCH_SCALES": 1})


def test_rs_tiles_for_sixteen_warps():
    """Four consumer warpgroups need 64 weight rows each."""
    assert prefill_rs.rs_tiles_unsupported(rs_config(16, 256, 128, 4, 16), False) is None
    assert prefill_rs.rs_tiles_unsupported(rs_config(16, 128, 128, 4, 16), True) is None
    assert "16 consumer warps" in prefill_rs.rs_tiles_unsupported(
        rs_config(16, 128, 64, 4, 16), False)


def test_rs_tiles_for_256_tokens():
    """256-token tiles: one 64x256 accumulator per warpgroup (8 warps, 128 weight rows),
    BLOCK_SIZE_K at most 64."""
    assert prefill_rs.rs_tiles_unsupported(rs_config(256, 128, 64, 5), False) is None
    assert prefill_rs.rs_tiles_unsupported(rs_config(256, 64, 32, 8), True) is None
    for cfg, act in ((rs_config(256, 256, 64, 4), False), (rs_config(256, 128, 128, 4), False),
                     (rs_config(256, 256, 64, 4, 16), False), (rs_config(256, 128, 64, 4), True)):
        assert "BLOCK_SIZE_M=256 needs 8 consumer warps" in prefill_rs.rs_tiles_unsupported(
            cfg, act)


def test_rs_unsupported_names_the_reason():
    experts, x, w, ids = make_case(4, 256, 128, 2, 1, dtype=torch.float16)
    out = torch.empty(4, 128, dtype=x.dtype, device=DEVICE)
    kw = dict(device=x.device, k=256, n_out=128, group_size=128, has_perm=False,
              atomic_topk_sum=False, activation=True, a=x, out=out,
              qweight=experts.w13.qweight)
    if not ON_HOPPER:
        assert prefill_rs.rs_unsupported(config=rs_config(bn=64), a_fragment_order=False,
                                         **kw) is not None
        return
    assert prefill_rs.rs_unsupported(config=rs_config(bn=64), a_fragment_order=False,
                                     **kw) is None
    assert "natural order" in prefill_rs.rs_unsupported(config=rs_config(bn=64),
                                                        a_fragment_order=True, **kw)
    assert "tiles" in prefill_rs.rs_unsupported(config=rs_config(bn=64, bk=128),
                                                a_fragment_order=False, **kw)


@pytest.mark.skipif(ON_HOPPER, reason="checks the fallback off Hopper")
def test_rs_config_falls_back_to_the_triton_kernel():
    """Off Hopper an RS config runs its tiles on the Triton kernel: the same bits as that
    config without RS."""
    dtype = torch.float16
    experts, x, w, ids = make_case(5, 128, 128, 3, 2, dtype=dtype)
    cfg = rs_config(bm=16, bn=32, bk=32, stages=1)
    blocks = align_block_size(ids, 16, 3)
    got = prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2, activation="silu", config=cfg)
    want = prefill_gemm(x, experts.w13, blocks, ids, w, top_k=2, activation="silu",
                        config=triton_tiles(cfg))
    assert torch.equal(got, want)


def repeat_runs(runs, like, **kwargs):
    outs = []
    for _ in range(runs):
        out = torch.full_like(like, float("nan"))
        prefill_gemm(out=out, **kwargs)
        outs.append(out)
    return outs


@hopper_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tiles", [(128, 128, 64, 6), (64, 128, 64, 4), (128, 256, 32, 8),
                                   (16, 128, 128, 4), (32, 256, 64, 6), (16, 256, 128, 4, 16),
                                   (64, 256, 64, 6, 16), (256, 128, 64, 5)])
@pytest.mark.parametrize("m", [1, 37, 300])
def test_rs_gemms_match_the_triton_kernel(dtype, symmetric, tiles, m):
    """GEMM1 (fused SiLU*up, its output also in fragment order) and GEMM2 (router weight,
    rows by slot) on the Gluon kernel: equal to the Triton kernel's same tiles within
    rounding, and the same bits on every run."""
    bm, bn, bk, stages, *warps = tiles
    warps = warps[0] if warps else 8
    # K of both GEMMs a multiple of 2 * BLOCK_SIZE_K (GEMM2's K = i)
    e, h, i, top_k = 8, 512, 512 if bk == 128 else 384, 2
    experts, x, w, ids = make_case(m, h, i, e, top_k, symmetric=symmetric, dtype=dtype,
                                   seed=m)
    blocks = align_block_size(ids, bm, e)
    inter = torch.randn(m * top_k, i, dtype=dtype, device=DEVICE)
    for gemm in ("gemm1", "gemm1 out frag", "gemm2"):
        cfg = rs_config(bm, bn if gemm == "gemm2" else bn // 2, bk, stages, warps)
        if gemm.startswith("gemm1"):
            kw = dict(a=x, weights=experts.w13, activation="silu",
                      out_fragment_order=gemm.endswith("frag"))
            like = torch.empty(m * top_k, i, dtype=dtype, device=DEVICE)
        else:
            kw = dict(a=inter, weights=experts.w2, a_is_slots=True, mul_routed_weight=True)
            like = torch.empty(m * top_k, h, dtype=dtype, device=DEVICE)
        assert prefill_rs.rs_unsupported(
            device=x.device, k=kw["weights"].k, n_out=like.shape[1], group_size=128,
            config=cfg, has_perm=False, a_fragment_order=False, atomic_topk_sum=False,
            activation=gemm.startswith("gemm1"), a=kw["a"], out=like,
            qweight=kw["weights"].qweight) is None
        common = dict(blocks=blocks, topk_ids=ids, topk_weights=w, top_k=top_k, **kw)
        runs = repeat_runs(3, like, config=cfg, **common)
        want = repeat_runs(1, like, config=triton_tiles(cfg), **common)[0]
        assert torch.isfinite(runs[0]).all(), f"{gemm}: unwritten output"
        for r in runs[1:]:
            assert torch.equal(r, runs[0]), f"{gemm} {cfg}: runs differ"
        err = ((runs[0].float() - want.float()).abs().max()
               / want.float().abs().max().clamp_min(1e-30)).item()
        assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3), f"{gemm}: {err:.2e}"


@hopper_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_tma", [True, False])
@pytest.mark.parametrize("tiles", [(128, 128, 64, 6), (64, 256, 64, 6, 16), (16, 128, 128, 4),
                                   (128, 256, 32, 8), (256, 128, 64, 5), (256, 128, 32, 8)])
def test_rs_sorted_rows_equal_the_gathered_gemms(dtype, weight_tma, tiles, monkeypatch):
    """Activations in sorted order read by TMA (a_sorted) and the output written in sorted
    order (out_sorted), with the words by TMA or by cp.async: the same bits, position for
    position, as the gathered GEMMs on the Gluon kernel; remote experts' rows zero."""
    monkeypatch.setattr(prefill_rs, "WEIGHT_TMA", weight_tma)
    bm, bn, bk, stages, *warps = tiles
    warps = warps[0] if warps else 8
    e, h, i, top_k, m = 8, 512, 512 if bk == 128 else 384, 2, 300
    experts, x, w, ids = make_case(m, h, i, e, top_k, symmetric=False, dtype=dtype, seed=41)
    expert_map = torch.tensor([0, 1, 2, 3, -1, -1, 4, 5], dtype=torch.int32, device=DEVICE)
    local = experts.select_experts(torch.tensor([0, 1, 2, 3, 6, 7], device=DEVICE))
    blocks = align_block_size(ids, bm, e, expert_map)
    sorted_ids = blocks.sorted_token_ids.long()
    em, slots = sorted_ids.numel(), m * top_k
    pos = (sorted_ids < slots).nonzero().flatten()
    cfg1, cfg2 = rs_config(bm, bn // 2, bk, stages, warps), rs_config(bm, bn, bk, stages, warps)
    x_sorted = gather_sorted_rows(x, blocks, top_k=top_k)
    assert prefill_rs.sorted_rows_unsupported(x_sorted, rows=em) is None
    common = dict(blocks=blocks, topk_ids=ids, topk_weights=w, top_k=top_k)
    ref1 = prefill_gemm(x, local.w13, activation="silu", config=cfg1, **common)
    for _ in range(2):
        out1 = torch.full((em, i), float("nan"), dtype=dtype, device=DEVICE)
        prefill_gemm(x_sorted, local.w13, activation="silu", config=cfg1, a_sorted=True,
                     out_sorted=True, out=out1, **common)
        assert torch.equal(out1[pos], ref1[sorted_ids[pos]])
    want = prefill_gemm(x, local.w13, activation="silu", config=triton_tiles(cfg1), **common)
    err = ((ref1.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3), f"GEMM1 {err:.2e}"
    ref2 = prefill_gemm(ref1, local.w2, a_is_slots=True, mul_routed_weight=True, config=cfg2,
                        **common)
    for _ in range(2):
        got2 = torch.full((slots, h), float("nan"), dtype=dtype, device=DEVICE)
        prefill_gemm(out1, local.w2, a_is_slots=True, mul_routed_weight=True, config=cfg2,
                     a_sorted=True, out=got2, **common)
        assert torch.equal(got2, ref2)
    remote = expert_map[ids.reshape(-1).long()] < 0
    assert remote.any() and torch.equal(got2[remote], torch.zeros_like(got2[remote]))


@hopper_only
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_rs_gemm1_activations(activation):
    """The other fused activations of GEMM1 on the Gluon kernel against the Triton kernel."""
    e, h, i, top_k, m = 8, 512, 384, 2, 100
    experts, x, w, ids = make_case(m, h, i, e, top_k, seed=5)
    cfg = rs_config(128, 64, 64, 6)
    blocks = align_block_size(ids, 128, e)
    got = prefill_gemm(x, experts.w13, blocks, ids, w, top_k=top_k, activation=activation,
                       config=cfg)
    want = prefill_gemm(x, experts.w13, blocks, ids, w, top_k=top_k, activation=activation,
                        config=triton_tiles(cfg))
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err < 2e-2, f"{activation}: {err:.2e}"


@hopper_only
@pytest.mark.parametrize("on_input,sorted_rows", [(False, False), (True, False),
                                                  (False, True), (True, True)])
def test_rs_layer_with_expert_map(on_input, sorted_rows):
    """The whole prefill layer with an RS GEMM2 (and an RS GEMM1) against the float32
    reference, with experts of another rank (-1 blocks write zero rows); with
    ``sorted_rows`` both GEMMs read their activations in sorted order (SORTED_ROWS)."""
    e, h, i, top_k, m = 8, 512, 256, 2, 200
    experts, x, w, ids = make_case(m, h, i, e, top_k, symmetric=False, seed=3)
    expert_map = torch.tensor([0, 1, 2, 3, -1, -1, 4, 5], dtype=torch.int32, device=DEVICE)
    local = random_experts(6, h, i, group_size=128, symmetric=False, dtype=torch.bfloat16,
                           device=DEVICE, seed=4)
    cfg1, cfg2 = rs_config(128, 64, 64, 6), rs_config(128, 128, 64, 6)
    if sorted_rows:
        cfg1, cfg2 = {**cfg1, "SORTED_ROWS": True}, {**cfg2, "SORTED_ROWS": True}
    assert_layer_with_expert_map(x, local, w, ids, expert_map, (cfg1, cfg2), on_input)


def assert_layer_with_expert_map(x, local, w, ids, expert_map, configs, on_input):
    """The prefill layer on ``configs`` with ``expert_map`` writes every element of a
    NaN-poisoned output and matches the float32 reference."""
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=DEVICE)
    got = fused_moe_prefill(x, local, w, ids, expert_map=expert_map, out=out,
                            configs=configs, apply_router_weight_on_input=on_input)
    ref = moe_reference(x, local, w, ids, expert_map=expert_map,
                        apply_router_weight_on_input=on_input, round_intermediate=True)
    assert torch.isfinite(got).all()
    err = ((got.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, f"relative error {err:.2e}"


@hopper_only
def test_shipped_rs_configs_repeat_bit_for_bit():
    """Every RS entry of the shipped tables (the H100's and the H200's), run 8 times on
    NaN-poisoned outputs at a shape with many blocks (GEMM1 and GEMM2 paths), gives the same
    bits each time and matches the Triton kernel's same tiles within rounding. A SPLIT_K entry
    runs its GEMM2 on a K the split divides (its float32 partials summed before the
    comparison) and its GEMM1 without the split, as the layer does."""
    seen = {tuple(sorted(cfg.items())) for table in shipped_tables().values()
            for buckets in table.values() for cfg in buckets.values() if cfg.get("RS")}
    assert seen, "the shipped table has RS entries"
    e, h, top_k, m = 16, 1024, 4, 512
    cases = {}
    for i in (512, 4096):   # GEMM2's K: 4096 lets SPLIT_K up to 8 run on the Gluon kernel
        experts, x, w, ids = make_case(m, h, i, e, top_k, seed=21)
        cases[i] = (experts, x, w, ids, torch.randn(m * top_k, i, dtype=x.dtype,
                                                    device=DEVICE))
    for items in sorted(seen):
        cfg = dict(items)
        split = cfg.pop("SPLIT_K", 1)
        experts, x, w, ids, inter = cases[512 if split == 1 else 4096]
        i = inter.shape[1]
        blocks = align_block_size(ids, cfg["BLOCK_SIZE_M"], e)
        for kw, shape in ((dict(a=x, weights=experts.w13, activation="silu"), None),
                          (dict(a=inter, weights=experts.w2, a_is_slots=True,
                                mul_routed_weight=True), split)):
            split_here = shape is not None and shape > 1
            width = h if shape is not None else i
            like = torch.empty(m * top_k, width, dtype=x.dtype, device=DEVICE)
            common = dict(blocks=blocks, topk_ids=ids, topk_weights=w, top_k=top_k, **kw)
            if split_here:
                parts_like = torch.empty(split, m * top_k, width, device=DEVICE)
                runs = repeat_runs(8, parts_like, config={**cfg, "SPLIT_K": split}, **common)
            else:
                runs = repeat_runs(8, like, config=cfg, **common)
            want = repeat_runs(1, like, config=triton_tiles(cfg), **common)[0]
            for r in runs[1:]:
                assert torch.equal(r, runs[0]), f"{cfg} SPLIT_K={split}: runs differ"
            got = runs[0].sum(0) if split_here else runs[0].float()
            err = (got - want.float()).abs().max() / want.float().abs().max()
            assert err.item() < 2e-2, f"{cfg}: {err.item():.2e} from the Triton kernel"


@hopper_only
@pytest.mark.parametrize("group_size,scale_acc", [(g, s) for g in (32, 64, 128) for s in (0, 1, 2)
                                                  if not (g == 32 and s == 2)])
def test_rs_scale_loads_for_every_group_size(group_size, scale_acc):
    """The three ways the kernel loads a loop iteration's scales (one load when both K steps
    share a group, one 32-bit load of two adjacent groups when G == BLOCK_SIZE_K, two loads
    otherwise: here a sliced, odd-strided scale tensor), asymmetric, against the Triton
    kernel's same tiles; with ``SCALE_ACC`` (``scale_acc`` > 0: that many wgmmas a K step,
    ``SUB_STEPS``) each step's scales on its partial sum (a group of one or two steps)."""
    e, h, i, top_k, m = 8, 512, 256, 2, 37
    experts = random_experts(e, h, i, group_size=group_size, symmetric=False,
                             dtype=torch.bfloat16, device=DEVICE, seed=5)
    x = torch.randn(m, h, dtype=torch.bfloat16, device=DEVICE)
    w, ids = fused_topk(torch.randn(m, e, device=DEVICE), top_k)
    bk = min(group_size, 64)
    cfg = {**rs_config(16, 128, bk, 4), "SCALE_ACC": scale_acc > 0,
           "SUB_STEPS": max(scale_acc, 1)}
    blocks = align_block_size(ids, 16, e)
    like = torch.empty(m * top_k, i, dtype=torch.bfloat16, device=DEVICE)
    w13 = experts.w13
    variants = [w13]
    if group_size == bk:   # the same scales in a wider buffer: rows no longer 4-byte paired
        wide = torch.zeros(e, w13.n, w13.scales.shape[2] + 1, dtype=w13.scales.dtype,
                           device=DEVICE)
        wide[:, :, :-1] = w13.scales
        variants.append(dataclasses.replace(w13, scales=wide[:, :, :-1]))
    for weights in variants:
        common = dict(a=x, weights=weights, activation="silu", blocks=blocks, topk_ids=ids,
                      topk_weights=w, top_k=top_k)
        runs = repeat_runs(2, like, config=cfg, **common)
        want = repeat_runs(1, like, config=triton_tiles(cfg), **common)[0]
        assert torch.equal(runs[0], runs[1])
        err = ((runs[0].float() - want.float()).abs().max()
               / want.float().abs().max()).item()
        assert err < 2e-2, f"G={group_size} strides {weights.scales.stride()}: {err:.2e}"


@hopper_only
@pytest.mark.parametrize("dtype,symmetric", [(torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("tiles", [(16, 256, 128, 4), (32, 256, 128, 4), (128, 128, 64, 6),
                                   (256, 128, 64, 5)])
@pytest.mark.parametrize("sorted_rows", [False, True])
def test_rs_prefetched_scales_give_the_same_bits(dtype, symmetric, tiles, sorted_rows):
    """PREFETCH_SCALES (each step pair's scales and zeros loaded one loop iteration ahead,
    the last pair's load repeated) only moves loads: both GEMMs give the same bits as
    without it, over many K steps and several tiles per program."""
    bm, bn, bk, stages = tiles
    outs = gemm_bits_with_and_without(
        [lambda c: c, lambda c: {**c, "PREFETCH_SCALES": True}], bm=bm, bn=bn, bk=bk,
        stages=stages, dtype=dtype, symmetric=symmetric, sorted_rows=sorted_rows, seed=43)
    for gemm, (off, on) in outs.items():
        assert torch.equal(off, on), f"{gemm} {tiles} sorted={sorted_rows}"


@hopper_only
@pytest.mark.parametrize("dtype,symmetric", [(torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("tiles", [(16, 256, 128, 4), (64, 128, 64, 4)])
@pytest.mark.parametrize("sorted_rows,prefetch,weight_tma",
                         [(False, False, True), (True, True, True), (False, True, False)])
def test_rs_paired_stages_give_the_same_bits(dtype, symmetric, tiles, sorted_rows, prefetch,
                                             weight_tma, monkeypatch):
    """PAIRED_STAGES (two K steps a ring stage: the loader copies 2 * BLOCK_SIZE_K columns
    at once and the consumer takes each step from its half of the stage) runs the same
    arithmetic in the same order: both GEMMs give the same bits as without it, with
    gathered or sorted activations, prefetched scales, the words by TMA or by cp.async,
    many K steps and several tiles per program; split-K GEMM2 too."""
    monkeypatch.setattr(prefill_rs, "WEIGHT_TMA", weight_tma)
    bm, bn, bk, stages = tiles

    def paired(cfg):  # two steps a stage: half the stages keep the same steps in flight
        return {**cfg, "PAIRED_STAGES": True, "num_stages": stages // 2 + 1}
    prefetched = {"PREFETCH_SCALES": prefetch}
    outs = gemm_bits_with_and_without(
        [lambda c: {**c, **prefetched}, lambda c: paired({**c, **prefetched})], bm=bm, bn=bn,
        bk=bk, stages=stages, dtype=dtype, symmetric=symmetric, sorted_rows=sorted_rows,
        seed=53, gemms=("gemm1", "gemm2", "gemm2_split"))
    for gemm, (off, on) in outs.items():
        assert torch.equal(off, on), f"{gemm} {tiles} sorted={sorted_rows}"
    # and through the layer, against the reference
    experts, x, w, ids = make_case(300, 1024, 512, 8, 2, symmetric=symmetric, dtype=dtype,
                                   seed=53)
    cfg1 = {**rs_config(bm, bn // 2, bk, stages // 2 + 1), "PAIRED_STAGES": True}
    cfg2 = {**rs_config(bm, bn, bk, stages // 2 + 1), "PAIRED_STAGES": True}
    y = fused_moe_prefill(x, experts, w, ids, configs=(cfg1, cfg2))
    ref = moe_reference(x, experts, w, ids, round_intermediate=True)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, f"layer {tiles}: {err:.2e}"


@hopper_only
@pytest.mark.parametrize("dtype,symmetric", [(torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("tiles", [(16, 256, 128, 4, True), (32, 256, 128, 4, True),
                                   (16, 128, 64, 6, False), (64, 128, 64, 4, False)])
@pytest.mark.parametrize("sorted_rows,prefetch", [(False, False), (True, True)])
def test_rs_scales_on_the_accumulator(dtype, symmetric, tiles, sorted_rows, prefetch):
    """SCALE_ACC: each K step's exact ``v - z`` operand into a fresh float32 partial sum,
    scaled into the tile's sum once its wgmma is retired. Both GEMMs (GEMM2 also split in K)
    equal the plain kernel's same tiles within one rounding of the weights (no longer
    rounded to 16 bits after scaling; an element one kernel leaves unwritten reads 7 and
    fails that), the same bits on every run; the layer at least as close to the float32
    reference as without it. With ``SUB_STEPS`` 2 (on sixteen warps where the tiles allow
    them: up to 32 slots and 256 weight rows; else the launcher would run the Triton kernel)
    each step's two half-width wgmmas run the same K16 wgmma instructions in the same order
    into the partial: the same bits as one wgmma a step."""
    bm, bn, bk, stages, paired = tiles

    def plain(cfg):
        return {**cfg, "PAIRED_STAGES": paired, "PREFETCH_SCALES": prefetch}

    def scaled(cfg):
        return {**plain(cfg), "SCALE_ACC": True}

    def halves(cfg):
        out = {**scaled(cfg), "SUB_STEPS": 2, "num_warps": 16 if bm <= 32 and bn >= 256 else 8}
        # the Gluon kernel's own tiles (GEMM1's configs: half the output columns, gate + up)
        activation = cfg["BLOCK_SIZE_N"] < bn
        assert prefill_rs.rs_tiles_unsupported(out, activation=activation) is None, out
        return out
    outs = gemm_bits_with_and_without(
        [plain, scaled, scaled, halves], bm=bm, bn=bn, bk=bk, stages=stages, dtype=dtype,
        symmetric=symmetric, sorted_rows=sorted_rows, seed=71,
        gemms=("gemm1", "gemm2", "gemm2_split"))
    for gemm, (off, on, again, half) in outs.items():
        assert torch.equal(on, again), f"{gemm} {tiles}: runs differ"
        assert torch.equal(on, half), f"{gemm} {tiles}: SUB_STEPS 2 differs"
        err = ((on.float() - off.float()).abs().max() / off.float().abs().max()).item()
        assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3), f"{gemm} {tiles}: {err:.2e}"
    experts, x, w, ids = make_case(300, 1024, 512, 8, 2, symmetric=symmetric, dtype=dtype,
                                   seed=71)
    ref = moe_reference(x, experts, w, ids, round_intermediate=True)
    errs = []
    for change in (plain, scaled):
        cfg1, cfg2 = change(rs_config(bm, bn // 2, bk, stages)), change(rs_config(bm, bn, bk,
                                                                                 stages))
        y = fused_moe_prefill(x, experts, w, ids, configs=(cfg1, cfg2))
        errs.append(((y.float() - ref).norm() / ref.norm()).item())
    assert errs[1] < 2e-2 and errs[1] <= 1.05 * errs[0], f"layer {tiles}: {errs}"


@hopper_only
@pytest.mark.parametrize("dtype,symmetric", [(torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("tiles", [(16, 256, 128, 4), (16, 128, 64, 6), (32, 256, 128, 4)])
@pytest.mark.parametrize("splits", [2, 8])
@pytest.mark.parametrize("sorted_rows,prefetch", [(False, False), (True, True)])
def test_rs_split_k_partials_add_up(dtype, symmetric, tiles, splits, sorted_rows, prefetch):
    """SPLIT_K on GEMM2: each program one K range of one tile; the float32 partials add up
    to the unsplit GEMM (which rounds once to the 16-bit dtype), every element is written,
    and the same bits come back on every run; through the layer, the reference's answer."""
    bm, bn, bk, stages = tiles
    e, h, i, top_k, m = 8, 512, 2048, 2, 5
    experts, x, w, ids = make_case(m, h, i, e, top_k, symmetric=symmetric, dtype=dtype,
                                   seed=47)
    blocks = align_block_size(ids, bm, e)
    slots = m * top_k
    inter = torch.randn(slots, i, dtype=dtype, device=DEVICE)
    a = gather_sorted_rows(inter, blocks, top_k=1) if sorted_rows else inter
    common = dict(blocks=blocks, topk_ids=ids, topk_weights=w, top_k=top_k, a_is_slots=True,
                  mul_routed_weight=True, a_sorted=sorted_rows)
    cfg = {**rs_config(bm, bn, bk, stages), "PREFETCH_SCALES": prefetch}
    whole = prefill_gemm(a, experts.w2, config=cfg, **common)
    parts = []
    for _ in range(2):
        out = torch.full((splits, slots, h), float("nan"), device=DEVICE)
        prefill_gemm(a, experts.w2, config={**cfg, "SPLIT_K": splits}, out=out, **common)
        parts.append(out)
    assert torch.isfinite(parts[0]).all(), "unwritten partial sums"
    assert torch.equal(parts[0], parts[1])
    total = parts[0].sum(0)
    err = ((total - whole.float()).abs().max() / whole.float().abs().max()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), f"{tiles} S={splits}: {err:.2e}"
    # the layer with the split GEMM2 (GEMM1 with the same token tile) against the reference
    cfg1 = rs_config(bm, 128, 64, 6)
    y = fused_moe_prefill(x, experts, w, ids, configs=(cfg1, {**cfg, "SPLIT_K": splits}))
    ref = moe_reference(x, experts, w, ids, round_intermediate=True)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, f"layer {tiles} S={splits}: {err:.2e}"


def test_sorted_rows_rules():
    """TMA reads sorted rows only from a 2-D tensor with enough rows, unit columns and a
    16-byte aligned base and row stride (else prefill_gemm runs the Triton kernel)."""
    a = torch.zeros(64, 256, dtype=torch.bfloat16)
    assert prefill_rs.sorted_rows_unsupported(a, rows=64) is None
    assert "at least 65 rows" in prefill_rs.sorted_rows_unsupported(a, rows=65)
    assert "16-byte" in prefill_rs.sorted_rows_unsupported(a[:, 1:], rows=8)
    assert "16-byte" in prefill_rs.sorted_rows_unsupported(a[:, ::2], rows=8)


def test_weight_tma_rules_and_descriptor():
    """TMA reads the words only from a 16-byte aligned base with 16-byte strides; the
    descriptor's box is one K step of a tile in the kernel's row order."""
    if not prefill_rs.HAVE_GLUON:
        pytest.skip("triton.experimental.gluon is not available")
    q = torch.zeros(4, 64, 32, dtype=torch.int32)  # E=4, N_w=64 (gate 32 + up 32), K=256
    assert prefill_rs.weight_tma_unsupported(q) is None
    shifted = torch.zeros(q.numel() + 1, dtype=torch.int32)[1:].view_as(q)
    assert "aligned" in prefill_rs.weight_tma_unsupported(shifted)
    odd = torch.zeros(4, 64, 33, dtype=torch.int32)[:, :, :32]  # rows 132 bytes apart
    assert "strides" in prefill_rs.weight_tma_unsupported(odd)
    d = prefill_rs.weight_descriptor(q, n_out=32, up_offset=32, activation=True,
                                     block_n_out=16, block_k=128)
    assert list(d.shape) == [4, 4, 2, 8, 32] and list(d.block_shape) == [1, 2, 2, 8, 16]
    assert list(d.strides) == [2048, 256, 1024, 32, 1]
    # element (e, b, h, j, w) of the view is word w of weight row 8b + j + h * up_offset
    view = q.as_strided(d.shape, d.strides)
    q.copy_(torch.arange(q.numel(), dtype=torch.int32).view_as(q))
    assert view[2, 3, 1, 5, 7].item() == q[2, 8 * 3 + 5 + 32, 7].item()
    d2 = prefill_rs.weight_descriptor(q, n_out=64, up_offset=0, activation=False,
                                      block_n_out=32, block_k=64)
    assert list(d2.shape) == [4, 8, 1, 8, 32] and list(d2.block_shape) == [1, 4, 1, 8, 8]


@hopper_only
@pytest.mark.parametrize("tiles", [(16, 128, 128, 4), (32, 256, 64, 6), (128, 128, 64, 6),
                                   (64, 128, 32, 8)])
def test_rs_weight_tma_matches_cp_async(tiles, monkeypatch):
    """The words read with TMA (the default) or cp.asynced by the loader warp: the same bits,
    for GEMM1 (gate and up rows interleaved by the descriptor's view) and GEMM2, with zeros;
    a qweight whose base is not 16-byte aligned falls back to cp.async."""
    bm, bn, bk, stages = tiles
    e, h, i, top_k, m = 8, 512, 512, 2, 200
    experts, x, w, ids = make_case(m, h, i, e, top_k, symmetric=False, seed=11)
    blocks = align_block_size(ids, bm, e)
    inter = torch.randn(m * top_k, i, dtype=x.dtype, device=DEVICE)
    # the same words at a base 4 bytes past a 16-byte boundary (TMA not allowed)
    w13 = experts.w13
    buf = torch.empty(w13.qweight.numel() + 1, dtype=torch.int32, device=DEVICE)
    shifted = buf[1:].view_as(w13.qweight)
    shifted.copy_(w13.qweight)
    assert prefill_rs.weight_tma_unsupported(shifted)
    for name, kw, width in (
            ("gemm1", dict(a=x, weights=w13, activation="silu"), i),
            ("gemm1 unaligned", dict(a=x, weights=dataclasses.replace(w13, qweight=shifted),
                                     activation="silu"), i),
            ("gemm2", dict(a=inter, weights=experts.w2, a_is_slots=True,
                           mul_routed_weight=True), h)):
        cfg = rs_config(bm, bn // 2 if name.startswith("gemm1") else bn, bk, stages)
        like = torch.empty(m * top_k, width, dtype=x.dtype, device=DEVICE)
        common = dict(blocks=blocks, topk_ids=ids, topk_weights=w, top_k=top_k, config=cfg,
                      **kw)
        monkeypatch.setattr(prefill_rs, "WEIGHT_TMA", True)
        with_tma = repeat_runs(2, like, **common)
        monkeypatch.setattr(prefill_rs, "WEIGHT_TMA", False)
        cp_async = repeat_runs(1, like, **common)[0]
        assert torch.isfinite(with_tma[0]).all(), f"{name}: unwritten output"
        assert torch.equal(with_tma[0], with_tma[1]), f"{name} {cfg}: runs differ"
        assert torch.equal(with_tma[0], cp_async), f"{name} {cfg}: TMA != cp.async"


def shipped_tables() -> dict:
    """Every shipped prefill table (the H100's, the H200's), parsed, by file name."""
    return {path.name: cfgmod.parse_table(json.loads(path.read_text()))
            for path in sorted(cfgmod.CONFIG_DIR.glob("*.json"))
            if not path.name.endswith(cfgmod.THRESHOLDS_SUFFIX)}


def shipped_rs_variants():
    """The distinct ways the shipped tables run the Gluon kernel: (config tiles,
    activation, a_sorted, out_sorted, mul_routed_weight) over the built-in models' entries."""
    from w4a16moe.kernels.tune import MODEL_SHAPES

    tables = shipped_tables()
    assert {"NVIDIA_H100_80GB_HBM3.json", "NVIDIA_H200.json"} <= set(tables)
    variants = set()
    for table, shape in ((t, s) for t in tables.values() for s in MODEL_SHAPES.values()):
        h, i = shape.hidden_size, shape.intermediate_size
        gemm1, gemm2 = table.get((2 * i, h), {}), table.get((h, i), {})
        for m, cfg in gemm1.items():
            nxt = gemm2.get(m, {})
            if cfg.get("RS"):
                variants.add((tuple(sorted(cfg.items())), True, bool(cfg.get("SORTED_ROWS")),
                              bool(nxt.get("SORTED_ROWS")), False))
        for cfg in gemm2.values():
            if cfg.get("RS"):
                variants.add((tuple(sorted(cfg.items())), False, bool(cfg.get("SORTED_ROWS")),
                              False, True))
    return sorted(variants)


#: shipped variants (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, num_stages, activation,
#: a_sorted) whose wgmmas ptxas serializes, kept because they measured faster than their
#: BLOCK_SIZE_K 32 version: qwen3-30b-a3b GEMM1 bucket 2048, 563 vs 583 us per layer
#: (benchmarks/results/h100_prefill_table_ab_qwen3_2048_bk32.json)
KNOWN_SERIALIZED = {(128, 128, 64, 6, True, False)}


def test_shipped_rs_configs_keep_their_wgmmas_async():
    """ptxas keeps the wgmmas of the shipped RS configs asynchronous (compiled as the
    launcher compiles them, the waits' barriers stripped): it serializes them for
    want of registers (C7512: each wgmma then finishes before the next step's dequantization
    starts, as with the 128-token x 256-row tiles of BLOCK_SIZE_K 64) only for the variants
    measured and kept so. A kernel change that costs registers shows up here. Compiled ahead
    of time for sm_90 with Triton's ptxas; runs without a GPU."""
    if not prefill_rs.HAVE_GLUON:
        pytest.skip("triton.experimental.gluon is not available")
    from rs_aot import ptxas_reports

    variants = [dict(config=dict(items), activation=activation, a_sorted=a_sorted,
                     out_sorted=out_sorted, mul_routed_weight=routed)
                for items, activation, a_sorted, out_sorted, routed in shipped_rs_variants()]
    assert len(variants) >= 10
    serialized = set()
    for v, result in zip(variants, ptxas_reports(variants), strict=True):
        report = result["ptxas"]
        assert "Used" in report, report
        # the launcher's compile hook takes out the barrier in front of each of the two
        # consumer waits of the unrolled K loop (w4a16moe.kernels.membar; with SUB_STEPS
        # each step's parts wait on their stage each; with STREAM_K the pieces' K loop and
        # with SHORT_BLOCK_T the short blocks', with QUARTER_BLOCKS the quarter and
        # three-quarter blocks' have them too) and nothing else; every write
        # of the epilogue's scratch still follows a barrier
        cfg = v["config"]
        loops = (1 + bool(cfg.get("STREAM_K")) + bool(cfg.get("SHORT_BLOCK_T"))
                 + 2 * bool(cfg.get("QUARTER_BLOCKS")))
        waits = 2 * cfg.get("SUB_STEPS", 1) * loops
        assert (result["stripped"], result["left"]) == (waits, 0), (v, result)
        assert result["unguarded"] == [], (v, result["unguarded"])
        if "wgmma.mma_async instructions are serialized" in report:
            cfg = v["config"]
            serialized.add((cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"],
                            cfg["num_stages"], v["activation"], v["a_sorted"]))
    assert serialized == KNOWN_SERIALIZED


def sk_config(bm, bn, bk, stages, paired):
    """An RS config with STREAM_K (GROUP_SIZE_M 1, as it needs)."""
    cfg = {**rs_config(bm, bn, bk, stages), "GROUP_SIZE_M": 1, "STREAM_K": True}
    return {**cfg, "PAIRED_STAGES": True} if paired else cfg


def test_stream_k_config_rules():
    """STREAM_K needs GROUP_SIZE_M 1 and no SPLIT_K (its programs already share a tile's
    K steps); the rules name what they found."""
    cfg = sk_config(16, 128, 128, 4, True)
    assert cfgmod.validate_config(cfg)["STREAM_K"] is True
    with pytest.raises(ValueError, match="STREAM_K needs GROUP_SIZE_M 1 and no SPLIT_K; "
                                         "found GROUP_SIZE_M 8, SPLIT_K 1"):
        cfgmod.validate_config({**cfg, "GROUP_SIZE_M": 8})
    with pytest.raises(ValueError, match="found GROUP_SIZE_M 1, SPLIT_K 2"):
        cfgmod.validate_config({**cfg, "SPLIT_K": 2})
    with pytest.raises(ValueError, match=r"STREAM_K is 1; expected one of \[True, False\]"):
        cfgmod.validate_config({**cfg, "STREAM_K": 1})


def test_stream_k_compiles_with_async_wgmmas():
    """The Stream-K partitions compile for sm_90 as the launcher compiles them: the two
    consumer-wait barriers of each of their two K loops (whole units when the launch cuts
    nothing, pieces when it does) stripped and no other, every shared-memory write of the
    epilogue behind a barrier, the wgmmas asynchronous. Runs without a GPU."""
    if not prefill_rs.HAVE_GLUON:
        pytest.skip("triton.experimental.gluon is not available")
    from rs_aot import ptxas_reports

    variants = [dict(config=sk_config(16, 128, 128, 4, True), activation=True, a_sorted=False,
                     out_sorted=False, mul_routed_weight=False),
                dict(config={**sk_config(32, 256, 128, 4, True), "PREFETCH_SCALES": True},
                     activation=False, a_sorted=False, out_sorted=False,
                     mul_routed_weight=True),
                dict(config=sk_config(64, 64, 64, 4, False), activation=True, a_sorted=True,
                     out_sorted=True, mul_routed_weight=False)]
    for v, result in zip(variants, ptxas_reports(variants), strict=True):
        assert "Used" in result["ptxas"], result["ptxas"]
        assert (result["stripped"], result["left"]) == (4, 0), (v, result)
        assert result["unguarded"] == [], (v, result["unguarded"])
        assert "wgmma.mma_async instructions are serialized" not in result["ptxas"], v


@hopper_only
@pytest.mark.parametrize("dtype,symmetric", [(torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("tiles", [(16, 256, 128, 4, True), (32, 256, 128, 4, True),
                                   (64, 128, 64, 4, False)])
@pytest.mark.parametrize("m", [1, 37, 300])
@pytest.mark.parametrize("sorted_rows", [False, True])
@pytest.mark.parametrize("scale_acc", [False, True])
def test_rs_stream_k_matches_and_repeats(dtype, symmetric, tiles, m, sorted_rows, scale_acc):
    """STREAM_K: whole tiles round by round, then the last round's tiles split by K steps
    over the programs, a tile cut between programs summed from float32 partials by the
    program that completes it. Both GEMMs equal the same tiles without it within one
    rounding (the float32 sums come in another order), every element is written, the bits
    repeat on every run (the partials are summed in program order, whichever finishes last)
    and the tile counters reset themselves. K is long enough (32 and 16 steps of 128) for the
    split to pay, so m=1 (fewer tiles than SMs) cuts every tile; at m=37 and 300 the last
    round is split or not depending on its size. With and without SCALE_ACC."""
    bm, bn, bk, stages, paired = tiles
    e, h, i, top_k = 8, 4096, 2048, 2
    experts, x, w, ids = make_case(m, h, i, e, top_k, symmetric=symmetric, dtype=dtype,
                                   seed=61 + m)
    blocks = align_block_size(ids, bm, e)
    em, slots = blocks.sorted_token_ids.numel(), m * top_k
    common = dict(blocks=blocks, topk_ids=ids, topk_weights=w, top_k=top_k)
    for gemm in ("gemm1", "gemm2"):
        n_out = bn // 2 if gemm == "gemm1" else bn
        outs = []
        sk = {**sk_config(bm, n_out, bk, stages, paired), "SCALE_ACC": scale_acc}
        for cfg in [sk] * 3 + [{**sk, "STREAM_K": False}]:
            if gemm == "gemm1":
                a = gather_sorted_rows(x, blocks, top_k=top_k) if sorted_rows else x
                out = torch.full((em if sorted_rows else slots, i), float("nan"), dtype=dtype,
                                 device=DEVICE)
                prefill_gemm(a, experts.w13, activation="silu", config=cfg, out=out,
                             a_sorted=sorted_rows, out_sorted=sorted_rows, **common)
                inter = out
            else:
                out = torch.full((slots, h), float("nan"), dtype=dtype, device=DEVICE)
                prefill_gemm(inter, experts.w2, a_is_slots=True, mul_routed_weight=True,
                             config=cfg, out=out, a_sorted=sorted_rows, **common)
            outs.append(out)
        *runs, plain = outs
        valid = slice(None) if not (sorted_rows and gemm == "gemm1") else (
            blocks.sorted_token_ids < slots)
        assert torch.isfinite(runs[0][valid]).all(), f"{gemm}: unwritten elements"
        assert all(torch.equal(runs[0][valid], r[valid]) for r in runs[1:]), f"{gemm}: runs"
        got, want = runs[0][valid].float(), plain[valid].float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-2, f"{gemm} {tiles} m={m}: {err:.2e}"


@hopper_only
@pytest.mark.parametrize("on_input", [False, True])
def test_rs_stream_k_layer_with_expert_map(on_input):
    """The whole prefill layer on STREAM_K configs against the float32 reference, with
    experts of another rank (-1 blocks: one piece writes the zero rows): 2 tokens, whose
    few tiles are all cut, and 200, whose last round is not."""
    e, h, i, top_k = 8, 2048, 1024, 2
    expert_map = torch.tensor([0, 1, 2, 3, -1, -1, 4, 5], dtype=torch.int32, device=DEVICE)
    local = random_experts(6, h, i, group_size=128, symmetric=False, dtype=torch.bfloat16,
                           device=DEVICE, seed=6)
    cfg1, cfg2 = sk_config(16, 64, 128, 4, True), sk_config(32, 128, 64, 4, False)
    _, x200, w200, ids200 = make_case(200, h, i, e, top_k, symmetric=False, seed=5)
    ids2 = torch.tensor([[0, 4], [5, 1]], dtype=ids200.dtype, device=DEVICE)  # two on rank -1
    for x, w, ids in ((x200[:2], w200[:2], ids2), (x200, w200, ids200),
                      (x200[:2], w200[:2], ids2)):
        assert_layer_with_expert_map(x, local, w, ids, expert_map, (cfg1, cfg2), on_input)


def routing_that_cuts(cfg, *, e, h, i, top_k, sms, tries=200):
    """(ids, weights, blocks) of a random routing of ``e`` experts on which a ``STREAM_K``
    GEMM2 launch of ``cfg`` (``h`` outputs, K ``i``) cuts its last round, by the host's copy
    of the kernel's rule: logits biased per expert (as a trained router's are) until the
    busiest experts pass a block multiple (:func:`~w4a16moe.kernels.tune.random_logits`
    with skew 1)."""
    bm, bn, bk = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    for attempt in range(tries):
        m = (bm * e // top_k) * (1 + attempt % 3) // 2 + attempt
        w, ids = fused_topk(random_logits(m, e, gen, skew=1.0), top_k)
        blocks = align_block_size(ids, bm, e)
        units = int(blocks.num_tokens_post_padded.item()) // bm * (h // bn)
        programs, _, _ = prefill_rs.stream_k_sizes(cfg, em=blocks.sorted_token_ids.numel(),
                                                   n_out=h, k=i, activation=False, sms=sms)
        if prefill_rs.stream_k_cut_units(units, i // bk, programs):
            return ids, w, blocks
    raise AssertionError(f"no routing of {tries} cuts a STREAM_K launch of {cfg}")


@hopper_only
def test_shipped_stream_k_entries_cut_and_repeat():
    """Every shipped RS entry with STREAM_K, as the layer runs it (sorted rows where the entry
    says so) on a GEMM2 routing whose last round the kernel cuts into K pieces: every element
    written, the bits the same on every run, and within one rounding of the same tiles
    without STREAM_K."""
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    seen = {tuple(sorted(cfg.items())) for table in shipped_tables().values()
            for buckets in table.values() for cfg in buckets.values()
            if cfg.get("RS") and cfg.get("STREAM_K")}
    assert seen, "the shipped tables have STREAM_K RS entries"
    e, h, i, top_k = 8, 4096, 2048, 2
    experts = random_experts(e, h, i, group_size=128, symmetric=True, dtype=torch.bfloat16,
                             device=DEVICE, seed=17)
    for items in sorted(seen):
        cfg = dict(items)
        ids, w, blocks = routing_that_cuts(cfg, e=e, h=h, i=i, top_k=top_k, sms=sms)
        slots = ids.numel()
        inter = torch.randn(slots, i, dtype=torch.bfloat16, device=DEVICE)
        sorted_rows = bool(cfg.get("SORTED_ROWS"))
        a = gather_sorted_rows(inter, blocks, top_k=top_k, a_is_slots=True) if sorted_rows \
            else inter
        like = torch.empty(slots, h, dtype=torch.bfloat16, device=DEVICE)
        common = dict(a=a, weights=experts.w2, blocks=blocks, topk_ids=ids, topk_weights=w,
                      top_k=top_k, a_is_slots=True, mul_routed_weight=True, a_sorted=sorted_rows)
        runs = repeat_runs(3, like, config=cfg, **common)
        plain = repeat_runs(1, like, config={**cfg, "STREAM_K": False}, **common)[0]
        assert torch.isfinite(runs[0]).all(), f"{cfg}: unwritten elements"
        assert all(torch.equal(runs[0], r) for r in runs[1:]), f"{cfg}: runs differ"
        err = ((runs[0].float() - plain.float()).abs().max() / plain.float().abs().max()).item()
        assert err < 1e-2, f"{cfg}: {err:.2e} from the same tiles without STREAM_K"


@hopper_only
@pytest.mark.parametrize("tiles_a_block", [1, 2])
def test_rs_stream_k_whole_rounds_are_the_plain_kernel_bit_for_bit(tiles_a_block):
    """When the units are a multiple of the programs (one token on each of as many experts
    as the GPU has SMs, 1 or 2 output tiles a block), there is no last round to cut: every
    program runs whole units, so STREAM_K gives the plain kernel's bits."""
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    e = m = sms
    h, i = 128 * tiles_a_block, 2048
    experts = random_experts(e, h, i, group_size=128, symmetric=True, dtype=torch.bfloat16,
                             device=DEVICE, seed=9)
    ids = torch.arange(m, device=DEVICE, dtype=torch.int32).view(m, 1)
    w = torch.rand(m, 1, device=DEVICE)
    inter = torch.randn(m, i, dtype=torch.bfloat16, device=DEVICE)
    blocks = align_block_size(ids, 16, e)
    cfg = sk_config(16, 128, 128, 4, True)
    units = m * tiles_a_block
    programs, _, _ = prefill_rs.stream_k_sizes(cfg, em=blocks.sorted_token_ids.numel(),
                                               n_out=h, k=i, activation=False, sms=sms)
    assert (programs, prefill_rs.stream_k_cut_units(units, i // 128, programs)) == (sms, 0)
    outs = []
    for stream_k in (True, False):
        out = torch.full((m, h), float("nan"), dtype=torch.bfloat16, device=DEVICE)
        prefill_gemm(inter, experts.w2, blocks=blocks, topk_ids=ids, topk_weights=w, top_k=1,
                     a_is_slots=True, mul_routed_weight=True,
                     config={**cfg, "STREAM_K": stream_k}, out=out)
        outs.append(out)
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


@hopper_only
def test_reserve_sizes_the_stream_k_scratch(monkeypatch):
    """``HybridW4A16MoEExperts.reserve(m)`` allocates the Stream-K scratch that the shipped
    table's ``STREAM_K`` entries need for up to ``m`` tokens (qwen3-30b's GEMM1 at M = 16-128),
    so a graph captured afterwards never has to grow it."""
    from w4a16moe.experts import HybridW4A16MoEExperts
    from w4a16moe.kernels.prefill import layer_configs
    from w4a16moe.routing import max_num_tokens_padded

    monkeypatch.setattr(prefill_rs, "_STREAM_K_SCRATCH", {})
    e, h, i, top_k = 128, 2048, 768, 8
    experts = random_experts(e, h, i, group_size=128, symmetric=True, dtype=torch.bfloat16,
                             device=DEVICE, seed=7)
    moe = HybridW4A16MoEExperts(experts, top_k)
    cfg1 = layer_configs(experts, top_k, 128)[0]
    if not (cfg1.get("RS") and cfg1.get("STREAM_K")):
        pytest.skip("this GPU's table has no STREAM_K entry for qwen3-30b's GEMM1")
    moe.reserve(128)
    partials, counters = prefill_rs._STREAM_K_SCRATCH[torch.cuda.current_device()]
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    em = max_num_tokens_padded(128 * top_k, cfg1["BLOCK_SIZE_M"], e)
    _, elems, units = prefill_rs.stream_k_sizes(cfg1, em=em, n_out=i, k=h, activation=True,
                                                sms=sms)
    assert partials.numel() >= elems and counters.numel() >= units
    assert not counters.any()


def test_short_block_config_rules():
    """SHORT_BLOCK_T needs an RS entry and a BLOCK_SIZE_M above it; the rules name what they
    found. It goes with STREAM_K (a launch that cuts runs its pieces on all columns)."""
    cfg = {**rs_config(64, 64, 128, 6), "SHORT_BLOCK_T": 32}
    assert cfgmod.validate_config(cfg)["SHORT_BLOCK_T"] == 32
    assert cfgmod.validate_config({**cfg, "GROUP_SIZE_M": 1, "STREAM_K": True})["STREAM_K"]
    with pytest.raises(ValueError, match="SHORT_BLOCK_T needs RS and a BLOCK_SIZE_M above it; "
                                         "found SHORT_BLOCK_T=64, RS=True, BLOCK_SIZE_M=64"):
        cfgmod.validate_config({**cfg, "SHORT_BLOCK_T": 64})
    with pytest.raises(ValueError, match="found SHORT_BLOCK_T=32, RS=None"):
        cfgmod.validate_config({k: v for k, v in cfg.items() if k != "RS"})
    with pytest.raises(ValueError, match=r"SHORT_BLOCK_T is 48; expected one of \[16, 32"):
        cfgmod.validate_config({**cfg, "SHORT_BLOCK_T": 48})
    # what the kernel is compiled with: none without the key or at a block size not above it
    # (GEMM2's entry runs at GEMM1's BLOCK_SIZE_M)
    assert cfgmod.short_block_rows(cfg) == 32
    assert cfgmod.short_block_rows({**cfg, "BLOCK_SIZE_M": 32}) == 0
    assert cfgmod.short_block_rows(rs_config(64, 64, 128, 6)) == 0


def test_quarter_block_config_rules():
    """QUARTER_BLOCKS needs SHORT_BLOCK_T half of a block of 32 slots or more (its quarter is
    a wgmma of 8 columns or more); the kernel gets a quarter of the block only where the
    entry runs at a block size twice its SHORT_BLOCK_T."""
    cfg = {**rs_config(64, 64, 128, 6), "SHORT_BLOCK_T": 32, "QUARTER_BLOCKS": True}
    assert cfgmod.validate_config(cfg)["QUARTER_BLOCKS"] is True
    assert cfgmod.validate_config({**cfg, "GROUP_SIZE_M": 1, "STREAM_K": True})["STREAM_K"]
    with pytest.raises(ValueError, match="QUARTER_BLOCKS needs SHORT_BLOCK_T half of a "
                                         "BLOCK_SIZE_M of 32 or more; found SHORT_BLOCK_T=16, "
                                         "BLOCK_SIZE_M=64"):
        cfgmod.validate_config({**cfg, "SHORT_BLOCK_T": 16})
    with pytest.raises(ValueError, match="found SHORT_BLOCK_T=None, BLOCK_SIZE_M=64"):
        cfgmod.validate_config({k: v for k, v in cfg.items() if k != "SHORT_BLOCK_T"})
    with pytest.raises(ValueError, match=r"QUARTER_BLOCKS is 1; expected one of \[True, False"):
        cfgmod.validate_config({**cfg, "QUARTER_BLOCKS": 1})
    cfgmod.validate_config({**cfg, "BLOCK_SIZE_M": 32, "SHORT_BLOCK_T": 16})
    assert cfgmod.quarter_block_rows(cfg) == 16
    assert cfgmod.quarter_block_rows({**cfg, "QUARTER_BLOCKS": False}) == 0
    # GEMM2's entry at GEMM1's block size: a quarter only where SHORT_BLOCK_T is its half
    assert cfgmod.quarter_block_rows({**cfg, "BLOCK_SIZE_M": 128}) == 0
    assert cfgmod.quarter_block_rows({**cfg, "BLOCK_SIZE_M": 32}) == 0
    assert cfgmod.quarter_block_rows({**cfg, "BLOCK_SIZE_M": 32, "SHORT_BLOCK_T": 16}) == 8
    assert cfgmod.quarter_block_rows({**cfg, "BLOCK_SIZE_M": 16, "SHORT_BLOCK_T": 8}) == 0


#: tiles the short blocks are checked on: (BLOCK_SIZE_M, weight rows, BLOCK_SIZE_K, stages,
#: SHORT_BLOCK_T, flags): the H200's Mixtral tiles of 64 slots (PREFETCH_SCALES), of 32 on
#: sixteen warps (SCALE_ACC, SUB_STEPS 2, paired stages), a 128-slot tile, and the 64-slot
#: sixteen-warp tile of the small experts' GEMM2 (whose wgmmas ptxas serialized before the
#: short loop waited for each step's: session 50)
SHORT_TILES = [(64, 128, 128, 6, 32, {"PREFETCH_SCALES": True}),
               (32, 256, 128, 4, 16, {"SCALE_ACC": True, "SUB_STEPS": 2, "PAIRED_STAGES": True,
                                      "num_warps": 16}),
               (128, 128, 64, 6, 64, {}),
               (64, 256, 64, 6, 32, {"num_warps": 16})]
#: a tile compiled ahead of time only: the eight-warp 32-slot GEMM1 of 256 weight rows and
#: 128-column K steps, which ptxas serialized with a second loop keeping wgmmas in flight
#: (the tuner's short pair that ran 21 % slower in session 49)
SHORT_AOT_TILES = [(32, 256, 128, 6, 16, {"PREFETCH_SCALES": True})]


def short_block_config(tiles, n_out, *, stream_k=False):
    """The RS config of ``tiles`` (:data:`SHORT_TILES`) for ``n_out`` output columns a tile,
    without SHORT_BLOCK_T; with ``stream_k`` STREAM_K (GROUP_SIZE_M 1)."""
    bm, _, bk, stages, _, flags = tiles
    cfg = {**rs_config(bm, n_out, bk, stages), **flags}
    return {**cfg, "GROUP_SIZE_M": 1, "STREAM_K": True} if stream_k else cfg


def test_short_blocks_compile_with_async_wgmmas():
    """With SHORT_BLOCK_T the consumer has a second K loop for the short blocks, and with
    QUARTER_BLOCKS two more (quarter and three-quarter blocks): it compiles for sm_90 with
    those loops' wait barriers stripped as well (and those of the pieces' loop with
    STREAM_K), every scratch write behind a barrier, the wgmmas of every loop asynchronous
    and no more bytes spilled than without the keys (the short loops retire each step's
    wgmmas, or keep fewer columns in flight than the full loop: three-quarter blocks on eight
    warps, so they need no registers the full loop does not). Runs without a GPU."""
    if not prefill_rs.HAVE_GLUON:
        pytest.skip("triton.experimental.gluon is not available")
    from rs_aot import ptxas_reports

    variants = []
    for tiles in SHORT_TILES + SHORT_AOT_TILES:
        rows, short = tiles[1], tiles[4]
        for cfg, activation in (({**short_block_config(tiles, rows // 2), "SORTED_ROWS": True},
                                 True),
                                (short_block_config(tiles, rows, stream_k=True), False)):
            for extra in ({}, {"SHORT_BLOCK_T": short},
                          {"SHORT_BLOCK_T": short, "QUARTER_BLOCKS": True}):
                variants.append(dict(config={**cfg, **extra}, activation=activation,
                                     a_sorted=activation, out_sorted=activation,
                                     mul_routed_weight=not activation))
    results = ptxas_reports(variants)
    # each with-key variant against the plain one before it
    checks = [(variants[j + d], results[j + d], results[j])
              for j in range(0, len(variants), 3) for d in (1, 2)]
    for v, result, plain in checks:
        cfg = v["config"]
        loops = 2 + 2 * bool(cfg.get("QUARTER_BLOCKS")) + bool(cfg.get("STREAM_K"))
        assert "Used" in result["ptxas"], result["ptxas"]
        assert (result["stripped"], result["left"]) == (
            2 * cfg.get("SUB_STEPS", 1) * loops, 0), (v, result)
        assert result["unguarded"] == [], (v, result["unguarded"])
        assert "wgmma.mma_async instructions are serialized" not in result["ptxas"], v
        spilled = [int(re.search(r"(\d+) bytes spill stores", r["ptxas"]).group(1))
                   for r in (result, plain)]
        # (up to 8 bytes more: a value kept across the loops, as the 64-slot GEMM1 on
        # sixteen warps has (4 bytes); the full loop's wgmmas in flight on the short loop had
        # cost 32-40 bytes on the 128-slot tiles. The SCALE_ACC loops on sixteen warps, 96
        # registers, spill more with a third loop: the 32-slot GEMM2 with STREAM_K, 40 -> 60
        # bytes, shipped so, measured faster, and 68 with the quarter loops. Where the pieces'
        # loop of STREAM_K spills hundreds of bytes already, the quarter loops add up to 16:
        # 784 -> 800, 252 -> 268)
        if not (cfg.get("SCALE_ACC") and cfg.get("STREAM_K")):
            allowed = 16 if cfg.get("QUARTER_BLOCKS") and spilled[1] > 100 else 8
            assert spilled[0] <= spilled[1] + allowed, (v, spilled)


def routing_with_counts(counts, top_k, e, seed):
    """(weights, ids) of ``counts[j]`` slots on expert j, shuffled into tokens of ``top_k``
    (a token may repeat an expert: the GEMMs treat slots independently)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.repeat_interleave(torch.arange(e), torch.tensor(counts))
    ids = ids[torch.randperm(ids.numel(), generator=gen)].view(-1, top_k)
    w = torch.rand(ids.shape, generator=gen) + 0.1
    return (w / w.sum(1, keepdim=True)).to(DEVICE), ids.to(torch.int32).to(DEVICE)


@hopper_only
@pytest.mark.parametrize("dtype,symmetric", [(torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("tiles", SHORT_TILES, ids=lambda t: f"{t[0]}x{t[1]}x{t[2]}/{t[4]}")
@pytest.mark.parametrize("sorted_rows", [False, True])
@pytest.mark.parametrize("stream_k", [False, True])
def test_rs_short_blocks_give_the_same_bits(dtype, symmetric, tiles, sorted_rows, stream_k):
    """SHORT_BLOCK_T runs the blocks whose real slots fit in their first SHORT_BLOCK_T
    positions on SHORT_BLOCK_T-column wgmmas, and QUARTER_BLOCKS (SHORT_BLOCK_T half the
    block) those that fit a quarter on quarter-width ones and those that fit three quarters
    on a half- and a quarter-width wgmma from the same operand: each output column is the same
    sum in the same order, so the layer gives the same bits as without them (NaN-poisoned
    outputs, so an unwritten element fails), on every run, and matches the float32
    reference. The routing puts experts on every side of the rules: whole blocks, a last
    block of 1 slot, of exactly a quarter, half and three quarters of the block, of one
    more each, and an empty expert. With STREAM_K on both GEMMs the launches that cut run
    every block on all its columns, the others take the short paths."""
    bm, rows, short = tiles[0], tiles[1], tiles[4]
    assert 2 * short == bm  # the tiles QUARTER_BLOCKS applies to
    q = bm // 4
    e, h, i, top_k = 12, 1024, 1024, 2
    counts = [2 * bm + 3, q, q + 1, short, short + 1, 3 * q, 3 * q + 1, bm + 1, 0, 2 * bm, 2,
              5]
    if sum(counts) % top_k:
        counts[-1] += 1
    experts = random_experts(e, h, i, group_size=128, symmetric=symmetric, dtype=dtype,
                             device=DEVICE, seed=61)
    w, ids = routing_with_counts(counts, top_k, e, seed=61)
    x = torch.randn(ids.shape[0], h, dtype=dtype, device=DEVICE)
    flags = {"SORTED_ROWS": sorted_rows}
    cfg1 = {**short_block_config(tiles, rows // 2, stream_k=stream_k), **flags}
    cfg2 = {**short_block_config(tiles, rows, stream_k=stream_k), **flags}
    for cfg, activation in ((cfg1, True), (cfg2, False)):
        assert prefill_rs.rs_tiles_unsupported(cfg, activation) is None, cfg
    outs = []
    quarter = {"SHORT_BLOCK_T": short, "QUARTER_BLOCKS": True}
    for extra in ({}, {"SHORT_BLOCK_T": short}, quarter, quarter):
        y = torch.full((ids.shape[0], h), float("nan"), dtype=dtype, device=DEVICE)
        fused_moe_prefill(x, experts, w, ids, out=y,
                          configs=({**cfg1, **extra}, {**cfg2, **extra}))
        outs.append(y)
    assert not outs[1].isnan().any() and not outs[2].isnan().any()
    assert torch.equal(outs[0], outs[1]), f"{tiles} sorted={sorted_rows}: short path differs"
    assert torch.equal(outs[0], outs[2]), f"{tiles} sorted={sorted_rows}: quarters differ"
    assert torch.equal(outs[2], outs[3]), f"{tiles}: runs differ"
    ref = moe_reference(x, experts, w, ids, round_intermediate=True)
    err = ((outs[1].float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, f"layer {tiles}: {err:.2e}"
