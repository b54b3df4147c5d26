"""Decode/prefill threshold selection and the thresholds JSON (CPU: timings injected)."""

from __future__ import annotations

import argparse
import functools
import json
import math

import pytest
import torch

from w4a16moe import experts as experts_mod
from w4a16moe.experts import DECODE_GEMM1_SECTION, threshold_key
from w4a16moe.kernels import configs as cfgmod
from w4a16moe.kernels import tune
from w4a16moe.kernels.tune import (
    DEFAULT_THRESHOLD_CANDIDATES,
    MODEL_SHAPES,
    select_gemm1_threshold,
    select_threshold,
    threshold_costs,
    write_thresholds,
)

CANDS = (1, 2, 4, 8, 16, 32, 64)


@pytest.mark.parametrize(
    "decode, prefill, expected",
    [
        # one crossing between 8 and 16, and one between 16 and 32
        ((10, 11, 12, 14, 20, 40, 80), (50, 50, 51, 52, 18, 35, 45), 8),
        ((10, 11, 12, 14, 20, 40, 80), (50, 50, 51, 52, 60, 35, 45), 16),
        # decode wins everywhere: the largest candidate
        ((1, 1, 1, 1, 1, 1, 1), (2, 2, 2, 2, 2, 2, 2), 64),
        # prefill wins already at M=1
        ((5, 5, 5, 5, 5, 5, 5), (4, 9, 9, 9, 9, 9, 9), 0),
        # a tie keeps decode
        ((10, 10, 10, 10, 10, 10, 10), (20, 20, 20, 10, 10, 9, 9), 16),
        # a second crossing back to decode above the first is ignored
        ((10, 11, 12, 30, 20, 40, 80), (50, 50, 51, 29, 60, 35, 45), 4),
    ],
)
def test_select_threshold(decode, prefill, expected):
    assert select_threshold(CANDS, decode, prefill) == expected


def test_select_threshold_rejects():
    with pytest.raises(ValueError, match="got 2 candidates, 3 decode and 2 prefill"):
        select_threshold((1, 2), (1, 2, 3), (1, 2))
    with pytest.raises(ValueError, match=r"candidates are \[1, 4, 2\]; expected strictly"):
        select_threshold((1, 4, 2), (1, 1, 1), (2, 2, 2))
    with pytest.raises(ValueError, match=r"candidates are \[0, 4\]"):
        select_threshold((0, 4), (1, 1), (2, 2))
    with pytest.raises(ValueError, match="NaN"):
        select_threshold((1, 2), (1, float("nan")), (2, 2))
    with pytest.raises(ValueError, match="non-zero count"):
        select_threshold((), (), ())


def test_threshold_costs():
    cands, dec, pre = (1, 2, 4, 8), (10, 12, 20, 40), (30, 20, 15, 16)
    costs = threshold_costs(cands, dec, pre)
    best = 10 + 12 + 15 + 16
    assert costs[0] == pytest.approx((30 + 20 + 15 + 16) / best)
    assert costs[2] == pytest.approx(1.0)                  # the per-M best
    assert costs[8] == pytest.approx((10 + 12 + 20 + 40) / best)
    assert min(costs, key=costs.get) == select_threshold(cands, dec, pre) == 2


def test_write_thresholds_merges(tmp_path):
    path = tmp_path / "GPU_thresholds.json"
    path.write_text(json.dumps({"_meta": {"device": "old", "keep": 1}, "E=1": 4, "E=2": 8}))
    data = write_thresholds(path, {"E=2": 16, "E=3": 0}, {"device": "new"})
    on_disk = json.loads(path.read_text())
    assert on_disk == data
    assert on_disk["E=1"] == 4 and on_disk["E=2"] == 16 and on_disk["E=3"] == 0
    assert on_disk["_meta"] == {"device": "new", "keep": 1}
    assert list(on_disk)[0] == "_meta"
    # an unreadable file is replaced
    path.write_text("{not json")
    assert write_thresholds(path, {"E=9": 1}) == {"E=9": 1}
    with pytest.raises(ValueError, match=r"threshold of 'E=9' is -1; expected an int >= 0"):
        write_thresholds(path, {"E=9": -1})
    with pytest.raises(ValueError, match=r"threshold of 'E=9' is True"):
        write_thresholds(path, {"E=9": True})


@pytest.mark.parametrize(
    "decode, mixed, threshold, expected",
    [
        # mixed wins at the top of the decode range (M=4 and 8): GEMM1 on decode up to 2
        ((10, 20, 40, 80), (11, 21, 39, 70), 8, 2),
        # mixed wins everywhere in the range: 0 (mixed from M=1)
        ((10, 20, 40, 80), (9, 19, 39, 79), 8, 0),
        # decode wins at the top: no mixed path (the threshold itself), even where mixed won
        # lower down
        ((10, 20, 40, 80), (9, 19, 41, 81), 8, 8),
        # a tie is not a win
        ((10, 20, 40, 80), (9, 19, 40, 80), 8, 8),
        ((10, 20, 40, 80), (9, 19, 40, 79), 8, 4),
        # candidates above the decode threshold do not count
        ((10, 20, 40, 80), (9, 19, 41, 70), 4, 4),
        ((10, 20, 40, 80), (9, 19, 39, 90), 4, 0),
        # no decode range at all
        ((10, 20, 40, 80), (9, 19, 39, 79), 0, 0),
    ],
)
def test_select_gemm1_threshold(decode, mixed, threshold, expected):
    assert select_gemm1_threshold((1, 2, 4, 8), decode, mixed, threshold) == expected


def test_select_gemm1_threshold_rejects():
    with pytest.raises(ValueError, match="expected the same non-zero count"):
        select_gemm1_threshold((1, 2), (1, 2), (1,), 2)
    with pytest.raises(ValueError, match="NaN"):
        select_gemm1_threshold((1, 2), (1, 2), (1, float("nan")), 2)


def test_write_thresholds_decode_gemm1_section(tmp_path):
    """The section merges per key, None removes a key, an empty section disappears."""
    path = tmp_path / "GPU_thresholds.json"
    data = write_thresholds(path, {"E=1": 4, "E=2": 2}, gemm1_thresholds={"E=1": 0, "E=2": None})
    assert data[DECODE_GEMM1_SECTION] == {"E=1": 0}
    data = write_thresholds(path, {"E=2": 2}, gemm1_thresholds={"E=2": 1})
    assert json.loads(path.read_text())[DECODE_GEMM1_SECTION] == {"E=1": 0, "E=2": 1}
    data = write_thresholds(path, {}, gemm1_thresholds={"E=1": None, "E=2": None})
    assert DECODE_GEMM1_SECTION not in data and data["E=1"] == 4
    with pytest.raises(ValueError, match=r"decode GEMM1 threshold of 'E=1' is -2"):
        write_thresholds(path, {}, gemm1_thresholds={"E=1": -2})


def test_written_file_is_what_experts_reads(tmp_path):
    s = MODEL_SHAPES["qwen3-30b-a3b"]
    key = threshold_key(s.num_experts, s.hidden_size, s.intermediate_size, s.top_k,
                        s.group_size)
    path = tmp_path / "X_thresholds.json"
    write_thresholds(path, {key: 24}, {"timings": {key: {"M": [1, 2]}}})
    experts_mod._read_thresholds.cache_clear()
    assert experts_mod._read_thresholds(str(path)) == {key: 24}
    write_thresholds(path, {key: 24}, gemm1_thresholds={key: 1})
    experts_mod._read_thresholds.cache_clear()
    assert experts_mod._read_thresholds(str(path)) == {key: 24}
    assert experts_mod._read_thresholds(str(path), DECODE_GEMM1_SECTION) == {key: 1}
    # a malformed section is ignored with a warning naming it; the thresholds stay
    raw = json.loads(path.read_text())
    raw[DECODE_GEMM1_SECTION] = [1, 2]
    path.write_text(json.dumps(raw))
    experts_mod._read_thresholds.cache_clear()
    with pytest.warns(UserWarning, match="'decode_gemm1' section: 'decode_gemm1' is not an"):
        assert experts_mod._read_thresholds(str(path), DECODE_GEMM1_SECTION) == {}
    assert experts_mod._read_thresholds(str(path)) == {key: 24}
    experts_mod._read_thresholds.cache_clear()


@pytest.mark.parametrize("gpu", ["NVIDIA_H100_80GB_HBM3", "NVIDIA_H200"])
def test_shipped_thresholds_cover_the_model_shapes(gpu):
    """Each shipped value is what the selection gives on the timings shipped with it: the
    decode threshold on the faster of decode and mixed, the decode_gemm1 section's values
    (only where the mixed path won) on decode against mixed."""
    from w4a16moe.kernels.configs import CONFIG_DIR

    path = CONFIG_DIR / f"{gpu}_thresholds.json"
    if not path.exists():
        pytest.skip(f"no shipped {gpu} thresholds")
    data = json.loads(path.read_text())
    gemm1 = data.get(DECODE_GEMM1_SECTION, {})
    for s in MODEL_SHAPES.values():
        key = threshold_key(s.num_experts, s.hidden_size, s.intermediate_size, s.top_k,
                            s.group_size)
        assert isinstance(data[key], int) and 0 <= data[key] <= max(DEFAULT_THRESHOLD_CANDIDATES)
        t = data["_meta"]["timings"][key]
        low = t["decode_us"]
        if "mixed_us" in t:
            low = [min(d, x) for d, x in zip(t["decode_us"], t["mixed_us"], strict=True)]
            want = select_gemm1_threshold(t["M"], t["decode_us"], t["mixed_us"], data[key])
            assert gemm1.get(key, data[key]) == want
        else:
            assert key not in gemm1
        assert select_threshold(t["M"], low, t["prefill_us"]) == data[key]


def test_measure_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        tune.measure_decode_threshold(8, 2, 64, 32)


def test_cli_has_thresholds_option():
    parser = argparse.ArgumentParser()
    tune.register(parser.add_subparsers())
    args = parser.parse_args(["tune", "--model", "all", "--thresholds", "--candidates", "1,8"])
    assert args.thresholds and args.candidates == "1,8"
    assert tune._parse_tokens(args.candidates, "--candidates") == (1, 8)
    with pytest.raises(ValueError, match=r"--candidates is 'a'; expected comma-separated"):
        tune._parse_tokens("a", "--candidates")


def test_cli_verbose_option_and_config_labels():
    parser = argparse.ArgumentParser()
    tune.register(parser.add_subparsers())
    assert parser.parse_args(["tune", "--model", "all", "-v"]).verbose
    assert not parser.parse_args(["tune", "--model", "all"]).verbose
    rs = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1,
          "num_warps": 8, "num_stages": 4, "SWAP_AB": True, "RS": True,
          "PAIRED_STAGES": True, "STREAM_K": True}
    assert tune.config_label(rs) == "16x128x128 w8 s4 RS paired SWAP_AB"
    assert tune.config_label({**rs, "RS": False, "PAIRED_STAGES": False, "FRAG_K": True,
                              "SWAP_AB": False, "GROUP_SIZE_M": 8, "num_stages": 3}) == (
        "16x128x128 w8 s3 FRAG_K GROUP_SIZE_M=8")


def test_rs_candidates_only_with_tiles_the_gluon_kernel_has():
    """Every RS candidate of every space is one the Gluon kernel runs as such (an RS entry
    whose tiles it lacks would be timed on the Triton fallback under the RS name); the
    rsmidm space offers 16- and 32-token RS tiles for both GEMMs."""
    from w4a16moe.kernels.prefill_rs import rs_tiles_unsupported

    for space in tune.SPACES:
        for bm in (16, 32, 64, 128, 256):
            for fused in (True, False):
                for cfg in tune.candidate_configs(bm, 4.0, space, fused):
                    if cfg.get("RS"):
                        assert rs_tiles_unsupported(cfg, fused) is None, (space, cfg)
    for bm in (16, 32):
        for fused in (True, False):
            rs = [c for c in tune.candidate_configs(bm, 4.0, "rsmidm", fused) if c.get("RS")]
            assert len(rs) >= 2, (bm, fused)
    # 512 weight rows (GEMM1 with BLOCK_SIZE_N=256) are not a Gluon tile: skipped there
    g1 = tune.candidate_configs(16, 4.0, "rsmidm", True)
    assert not any(c.get("RS") and c["BLOCK_SIZE_N"] == 256 for c in g1)
    # SCALE_ACC: eight and sixteen warps on 16- and 32-slot blocks (valid entries), sixteen
    # also with SUB_STEPS 2; none above 64 slots
    for bm in (16, 32, 64):
        for fused in (True, False):
            sa = [c for c in tune.candidate_configs(bm, 4.0, "rsmidm", fused)
                  if c.get("SCALE_ACC")]
            assert bm == 64 or {c["num_warps"] for c in sa} == {8, 16}, (bm, fused)
            assert bm == 64 or {c["num_warps"] for c in sa if c.get("SUB_STEPS")} == {16}
            for c in sa:
                assert cfgmod.validate_config(c) == c
                label = tune.config_label(c)
                assert label.startswith(
                    f"{bm}x{c['BLOCK_SIZE_N']}x128 w{c['num_warps']} s4 RS paired scale-acc")
                assert ("SUB_STEPS=2" in label) == (c.get("SUB_STEPS") == 2), label
    assert not any(c.get("SCALE_ACC") for c in tune.candidate_configs(128, 64.0, "rsmidm"))


def test_rs_skip_reason_names_why_a_candidate_is_not_timed():
    """The tuner skips an RS candidate the Gluon kernel cannot run for the call (here: not a
    Hopper GPU; on one, e.g. a K that is not a multiple of 2 x BLOCK_SIZE_K), instead of
    timing the Triton fallback under the RS name; other configs are never skipped."""
    from w4a16moe.kernels.prefill_rs import HAVE_GLUON
    from w4a16moe.quantize import random_experts

    experts = random_experts(4, 256, 128, group_size=128, dtype=torch.float16, seed=0)
    x = torch.randn(3, 256, dtype=torch.float16)
    inter = torch.empty(6, 128, dtype=torch.float16)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
           "num_warps": 8, "num_stages": 4, "SWAP_AB": True}
    call = dict(a=x, weights=experts.w13, out=inter, activation=True)
    assert tune.rs_skip_reason(cfg, **call) is None
    reason = tune.rs_skip_reason({**cfg, "RS": True}, **call)   # tensors on the CPU
    assert reason is not None
    assert ("compute capability 9.x" if HAVE_GLUON else "gluon") in reason, reason


def test_rs_space_has_256_token_tiles():
    """The rs space offers 256-token Gluon tiles (128 weight rows) for both GEMMs."""
    for fused in (True, False):
        rs = [c for c in tune.candidate_configs(256, 1024.0, "rs", fused) if c.get("RS")]
        assert rs, fused


def test_group_sizes_timed_above_64_slots_an_expert():
    """At most 64 slots an expert every candidate has GROUP_SIZE_M 1; above, each tile but the
    mma kernel's comes with every GROUP_SIZE_M of LARGE_M_GROUP_SIZES (1 first, so a tie
    keeps the one that does not spread a column tile over experts), the rest of it equal."""
    assert tune.LARGE_M_GROUP_SIZES[0] == 1 and len(tune.LARGE_M_GROUP_SIZES) > 1
    for space, bm in (("rs", 128), ("rs", 256), ("default", 128), ("rsmidm", 64)):
        for fused in (True, False):
            small = tune.candidate_configs(bm, 64.0, space, fused)
            assert small and all(c["GROUP_SIZE_M"] == 1 for c in small), (space, bm)
            large = tune.candidate_configs(bm, 65.0, space, fused)
            tiles = [{k: v for k, v in c.items() if k != "GROUP_SIZE_M"} for c in small]
            want = [{**t, "GROUP_SIZE_M": g} for t in tiles
                    for g in ((1,) if t.get("MMA") else tune.LARGE_M_GROUP_SIZES)]
            assert large == want, (space, bm, fused)
    mma = [c for c in tune.candidate_configs(16, 100.0, "rsmidm", True) if c.get("MMA")]
    assert mma and all(c["GROUP_SIZE_M"] == 1 for c in mma)


def _fp16_case(m: int, h: int, i: int, e: int, top_k: int, group_size: int):
    """Random fp16 experts, hidden states and a routing of ``m`` tokens on the test device:
    ``(experts, x, topk_weights, topk_ids)``."""
    from conftest import DEVICE

    from w4a16moe.quantize import random_experts
    from w4a16moe.routing import fused_topk

    experts = random_experts(e, h, i, group_size=group_size, dtype=torch.float16, seed=3,
                             device=DEVICE)
    x = torch.randn(m, h, dtype=torch.float16, device=DEVICE)
    w, ids = fused_topk(torch.randn(m, e, device=DEVICE), top_k)
    return experts, x, w, ids


def test_candidate_runs_time_rs_configs_on_sorted_rows_and_with_prefetched_scales():
    """An RS candidate is timed gathered and with SORTED_ROWS (GEMM1 with its gather, writing
    sorted rows; GEMM2 reading them), each with and without PREFETCH_SCALES; all four
    compute the gathered result, bit for bit (on the CPU the same tiles run on the Triton
    kernel, on a Hopper GPU on the Gluon kernel). Other configs: one run."""
    from conftest import DEVICE

    from w4a16moe.kernels.prefill import gather_sorted_rows
    from w4a16moe.routing import align_block_size

    m, h, i, e, top_k = 9, 64, 64, 4, 2
    experts, x, w, ids = _fp16_case(m, h, i, e, top_k, group_size=32)
    rs = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
          "num_warps": 8, "num_stages": 2, "SWAP_AB": True, "RS": True}
    blocks = align_block_size(ids, 16, e)
    em, slots = blocks.sorted_token_ids.numel(), m * top_k
    pos = (blocks.sorted_token_ids < slots).nonzero().flatten()
    slot_of = blocks.sorted_token_ids[pos].long()
    inter = torch.empty(slots, i, dtype=torch.float16, device=DEVICE)
    x_sorted = torch.empty(em, h, dtype=torch.float16, device=DEVICE)
    inter_sorted = torch.full((em, i), float("nan"), dtype=torch.float16, device=DEVICE)
    kw = dict(experts=experts, x=x, blocks=blocks, topk_ids=ids, topk_weights=w,
              top_k=top_k, x_sorted=x_sorted, inter_sorted=inter_sorted)
    flags = [(False, False), (False, True), (True, False), (True, True)]

    def run_flags(runs):   # (PREFETCH_SCALES, SORTED_ROWS) of each run
        return [(bool(c.get("PREFETCH_SCALES")), bool(c.get("SORTED_ROWS"))) for c, _ in runs]

    g1 = tune.candidate_runs("w13", rs, inter=inter, out=inter, **kw)
    assert run_flags(g1) == flags
    g1[0][1]()
    want = inter.clone()
    for cfg, run in g1[1:]:
        inter.fill_(float("nan"))
        inter_sorted.fill_(float("nan"))
        run()
        if cfg.get("SORTED_ROWS"):
            assert torch.equal(inter_sorted[pos], want[slot_of]), cfg
        else:
            assert torch.equal(inter, want), cfg
    inter.copy_(want)
    inter_sorted[pos] = want[slot_of]
    out = torch.empty(slots, h, dtype=torch.float16, device=DEVICE)
    g2 = tune.candidate_runs("w2", {**rs, "BLOCK_SIZE_N": 128}, inter=inter, out=out, **kw)
    assert run_flags(g2) == flags
    g2[0][1]()
    want = out.clone()
    for cfg, run in g2[1:]:
        out.fill_(float("nan"))
        run()
        assert torch.equal(out, want), cfg
    assert torch.equal(gather_sorted_rows(x, blocks, top_k=top_k)[pos], x[slot_of // top_k])
    plain = {k: v for k, v in rs.items() if k != "RS"}
    assert len(tune.candidate_runs("w13", plain, inter=inter, out=inter, **kw)) == 1
    # SCALE_ACC ignores PREFETCH_SCALES: gathered and sorted rows only
    sa = tune.candidate_runs("w13", {**rs, "SCALE_ACC": True}, inter=inter, out=inter, **kw)
    assert run_flags(sa) == [(False, False), (False, True)]
    assert [tune.prefetch_variants(c) for c in (rs, {**rs, "SCALE_ACC": True}, plain)] == [
        2, 1, 1]
    with pytest.raises(ValueError, match="gemm is 'w3'"):
        tune.candidate_runs("w3", rs, inter=inter, out=inter, **kw)
    # SPLIT_K runs of a GEMM2 RS candidate: with and without PREFETCH_SCALES per split,
    # each the split GEMM2 and the top-k sum of its partials (on the CPU the Triton kernel
    # puts the whole sum into the first partial), close to the unsplit layer's top-k sum
    g2s = tune.candidate_runs("w2", {**rs, "BLOCK_SIZE_N": 128}, inter=inter, out=out,
                              splits=(2, 4), **kw)
    split_runs = [(c, r) for c, r in g2s if c.get("SPLIT_K")]
    assert [(c["SPLIT_K"], bool(c.get("PREFETCH_SCALES"))) for c, _ in split_runs] == [
        (2, False), (4, False), (2, True), (4, True)]
    want_sum = out.view(m, top_k, h).float().sum(1)
    got_sum = split_runs[0][1]()   # a split run returns its top-k sum
    assert ((got_sum.float() - want_sum).abs().max() / want_sum.abs().max()).item() < 2e-3
    with pytest.raises(ValueError, match="SPLIT_K applies to GEMM2"):
        tune.candidate_runs("w13", rs, inter=inter, out=inter, splits=(2,), **kw)
    # an MMA GEMM2 candidate: gathered, on sorted rows, then split (no prefetched scales)
    mma = {k: v for k, v in rs.items() if k not in ("RS", "SWAP_AB")} | {"MMA": True}
    g2m = tune.candidate_runs("w2", {**mma, "BLOCK_SIZE_N": 128}, inter=inter, out=out,
                              splits=(2, 4), **kw)
    assert [(c.get("SPLIT_K", 1), bool(c.get("SORTED_ROWS")), "PREFETCH_SCALES" in c)
            for c, _ in g2m] == [(1, False, False), (1, True, False), (2, False, False),
                                 (4, False, False)]
    got_sum = g2m[3][1]()
    assert ((got_sum.float() - want_sum).abs().max() / want_sum.abs().max()).item() < 2e-3
    with pytest.raises(ValueError, match="SPLIT_K applies to GEMM2"):
        tune.candidate_runs("w2", plain, inter=inter, out=out, splits=(2,), **kw)
    # stream_k: the four runs again with STREAM_K (never on the split runs), each within one
    # rounding of the same run without it (its cut tiles add float32 partials in another
    # order on the Gluon kernel; the Triton kernel runs the tiles whole)
    g2k = tune.candidate_runs("w2", {**rs, "BLOCK_SIZE_N": 128}, inter=inter, out=out,
                              splits=(2,), stream_k=True, **kw)
    assert [(bool(c.get("STREAM_K")), bool(c.get("PREFETCH_SCALES")),
             bool(c.get("SORTED_ROWS")), c.get("SPLIT_K", 1)) for c, _ in g2k] == [
        (False, False, False, 1), (False, False, True, 1), (False, True, False, 1),
        (False, True, True, 1), (True, False, False, 1), (True, False, True, 1),
        (True, True, False, 1), (True, True, True, 1), (False, False, False, 2),
        (False, True, False, 2)]
    for cfg, run in g2k[4:8]:
        out.fill_(float("nan"))
        run()
        assert ((out.float() - want.float()).abs().max() / want.float().abs().max()).item(
        ) < 1e-2, cfg
    for bad in (plain, {**rs, "GROUP_SIZE_M": 8}):
        with pytest.raises(ValueError, match="STREAM_K needs the Gluon kernel"):
            tune.candidate_runs("w13", bad, inter=inter, out=inter, stream_k=True, **kw)
    # the tuner's progress total counts exactly the runs candidate_runs makes
    w2 = {"BLOCK_SIZE_N": 128}
    for cfg, splits, sk in [(plain, (), False), (rs, (), False), (rs, (), True),
                            ({**rs, **w2}, (2, 4), True), ({**rs, "SCALE_ACC": True}, (), True),
                            ({**rs, **w2, "SCALE_ACC": True}, (2,), True),
                            ({**mma, **w2}, (2, 4), False)]:
        gemm = "w2" if splits else "w13"
        runs = tune.candidate_runs(gemm, cfg, inter=inter, out=out if splits else inter,
                                   splits=splits, stream_k=sk, **kw)
        assert tune.timed_runs(cfg, splits=splits, stream_k=sk) == len(runs), (cfg, splits, sk)


def test_stream_k_cut_units_is_the_kernels_rule():
    """The host's copy of the Gluon kernel's Stream-K rule: the last round's R units are cut
    when they leave each of the P programs at least SK_MIN_SAVED idle granules (two K steps
    each), (P - R) G >= SK_MIN_SAVED P; the cases of benchmarks/notes_prefill.md,
    session 21."""
    from w4a16moe.kernels.prefill_rs import SK_MIN_SAVED, stream_k_cut_units

    assert SK_MIN_SAVED == 4
    assert stream_k_cut_units(67 * 6, 16, 132) == 6    # qwen3 GEMM1, 67 experts: 6 of 132
    assert stream_k_cut_units(80 * 6, 16, 132) == 0    # 84 of 132 left: (48 * 8) < 4 * 132
    assert stream_k_cut_units(5 * 112, 32, 132) == 32  # Mixtral GEMM1, 5 blocks: 32 of 132
    assert stream_k_cut_units(6 * 112, 32, 132) == 12
    assert stream_k_cut_units(2 * 132, 16, 132) == 0   # no last round to cut
    assert stream_k_cut_units(5, 32, 80) == 5          # fewer units than programs
    assert stream_k_cut_units(5, 1, 80) == 0           # one K step: no granule to move
    assert stream_k_cut_units(0, 16, 132) == 0
    with pytest.raises(ValueError, match="units=-1, k_steps=16, programs=132"):
        stream_k_cut_units(-1, 16, 132)
    with pytest.raises(ValueError, match="programs=0"):
        stream_k_cut_units(4, 16, 0)


def test_stream_k_candidate_where_the_kernel_would_cut():
    """The tuner times a candidate with STREAM_K only where the kernel would cut its last
    round at the routing being tuned, and only RS configs with GROUP_SIZE_M 1, no SPLIT_K."""
    rs = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1,
          "num_warps": 8, "num_stages": 4, "SWAP_AB": True, "RS": True}
    qwen3_gemm1 = dict(n_out=768, k=2048, num_sms=132)    # 6 tiles a block, 16 K steps

    def cut(cfg, blocks):
        return tune.stream_k_candidate(cfg, valid_blocks=blocks, em=16 * (blocks + 10),
                                       **qwen3_gemm1)

    assert cut(rs, 67) and cut({**rs, "PREFETCH_SCALES": True}, 89)
    assert not cut(rs, 80) and not cut(rs, 88)
    assert not cut({k: v for k, v in rs.items() if k != "RS"}, 67)
    assert not cut({**rs, "GROUP_SIZE_M": 8}, 67)
    assert not cut({**rs, "SPLIT_K": 2}, 67)


def test_split_k_candidates_only_where_tiles_leave_sms_idle():
    assert tune.split_k_candidates(5, 4096, 256, 132) == tune.SPLIT_K_CANDIDATES  # 80 tiles
    assert tune.split_k_candidates(8, 4096, 256, 132) == tune.SPLIT_K_CANDIDATES  # 128
    assert tune.split_k_candidates(9, 4096, 256, 132) == ()                        # 144
    assert tune.split_k_candidates(100, 2048, 128, 132) == ()
    # the mma kernel's small tiles: while their warps are under one wave of 16 an SM
    # (Mixtral's GEMM2 on two-warp 8x32 tiles: 2 blocks at M=1, 256 tiles, 512 warps)
    mma = functools.partial(tune.split_k_candidates, n=4096, num_sms=132)
    assert mma(2, block_n=32, mma_warps=2) == tune.SPLIT_K_CANDIDATES
    assert mma(8, block_n=32, mma_warps=2) == tune.SPLIT_K_CANDIDATES    # 2048 warps
    assert mma(9, block_n=32, mma_warps=2) == ()                         # 2304
    assert mma(9, block_n=128, mma_warps=4) == tune.SPLIT_K_CANDIDATES   # 1152
    assert tune.split_k_candidates(9, 4096, 256, 132) == ()              # RS: 144 tiles


def test_auto_space_per_token_count(monkeypatch):
    """``--space auto`` (the default): the Gluon tiles on Hopper (rsmidm up to 256 tokens, rs
    above), the broad Triton space elsewhere; named spaces pass through, unknown ones fail."""
    parser = argparse.ArgumentParser()
    tune.register(parser.add_subparsers())
    assert parser.parse_args(["tune", "--model", "all"]).space == "auto"
    monkeypatch.setattr(tune, "_gluon_hopper", lambda: True)
    assert [tune.resolve_space("auto", m) for m in (16, 256, 257, 4096)] == [
        "rsmidm", "rsmidm", "rs", "rs"]
    monkeypatch.setattr(tune, "_gluon_hopper", lambda: False)
    assert {tune.resolve_space("auto", m) for m in (16, 4096)} == {"default"}
    assert tune.resolve_space("midm", 4096) == "midm"
    with pytest.raises(ValueError, match=r"space is 'bogus'; expected 'auto' or one of"):
        tune.resolve_space("bogus", 64)


def test_progress_prints_every_step_when_verbose(capsys):
    with tune._progress("tuning", True) as step:
        step(1, 2, "qwen3-30b-a3b M=4 w13 16x64x64 w4 s4: 1.0 us")
        step(2, 2, "qwen3-30b-a3b M=4 w2 16x64x64 w4 s4: 2.0 us")
    out = capsys.readouterr().out
    assert "M=4 w13 16x64x64 w4 s4: 1.0 us" in out and "M=4 w2 16x64x64 w4 s4: 2.0 us" in out


def test_mma_candidates_are_runnable_tiles_and_take_8_slot_blocks():
    """The mma space's candidates are tiles its kernel runs (per GEMM), the only candidates
    at blocks of 8 slots, and are offered on 8-slot blocks only where experts get few slots;
    rsmidm includes them."""
    from w4a16moe.kernels.prefill_mma import mma_tiles_unsupported

    for space in ("mma", "rsmidm"):
        for bm in (8, 16, 32):
            for fused in (True, False):
                cands = tune.candidate_configs(bm, 2.0, space, fused)
                mma = [c for c in cands if c.get("MMA")]
                assert mma, (space, bm, fused)
                for cfg in mma:
                    assert mma_tiles_unsupported(cfg, activation=fused) is None, cfg
                    assert cfg["GROUP_SIZE_M"] == 1
                if bm == 8:
                    assert len(mma) == len(cands), (space, cands)
    assert tune.candidate_configs(8, 2.0, "midm", True) == []
    assert tune.block_m_candidates(1.0, space="mma") == (8, 16)
    assert tune.block_m_candidates(1.0, space="rsmidm") == (8, 16)
    assert tune.block_m_candidates(4.0, space="rsmidm") == (8, 16)
    assert tune.block_m_candidates(8.0, space="rsmidm") == (8, 16)
    assert tune.block_m_candidates(9.0, space="rsmidm") == (16,)
    assert tune.block_m_candidates(1.0, space="midm") == (16,)
    # every shipped MMA entry (of every GPU's table) is among the candidates of its GEMM
    # (GEMM1: the 2I,H shapes, with the activation) at its block size, a split one's SPLIT_K
    # among the splits the tuner times
    import json

    from w4a16moe.kernels import configs as cfgmod

    tile = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages")
    gemm1 = {f"{2 * s.intermediate_size},{s.hidden_size}" for s in tune.MODEL_SHAPES.values()}
    files = [f for f in sorted(cfgmod.CONFIG_DIR.glob("*.json"))
             if not f.name.endswith(cfgmod.THRESHOLDS_SUFFIX)]
    shipped = [(shape in gemm1, cfg) for f in files
               for shape, buckets in json.loads(f.read_text()).items()
               if not shape.startswith("_") for cfg in buckets.values() if cfg.get("MMA")]
    assert len({tuple(c[k] for k in tile) for _, c in shipped}) >= 4
    assert any(cfg.get("SPLIT_K", 1) > 1 for _, cfg in shipped)
    for fused, cfg in shipped:
        cands = tune.candidate_configs(cfg["BLOCK_SIZE_M"], 1.0, "mma", fused)
        assert tuple(cfg[k] for k in tile) in {tuple(c[k] for k in tile) for c in cands}, cfg
        assert cfg.get("SPLIT_K", 1) in (1, *tune.SPLIT_K_CANDIDATES) and not (
            fused and cfg.get("SPLIT_K", 1) > 1), cfg


def test_mma_skip_reason_and_sorted_rows_run():
    """Off a GPU an MMA candidate is skipped with the kernel's reason (it would time the
    Triton fallback); it is timed gathered and on sorted rows, with the same result."""
    from conftest import DEVICE, ON_GPU

    from w4a16moe.routing import align_block_size

    m, h, i, e, top_k = 5, 256, 128, 4, 2
    experts, x, w, ids = _fp16_case(m, h, i, e, top_k, group_size=128)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1,
           "num_warps": 2, "num_stages": 1, "SWAP_AB": True, "MMA": True}
    inter = torch.empty(m * top_k, i, dtype=torch.float16, device=DEVICE)
    reason = tune.rs_skip_reason(cfg, x, experts.w13, inter, activation=True)
    assert (reason is None) == ON_GPU, reason
    blocks = align_block_size(ids, 16, e)
    em, slots = blocks.sorted_token_ids.numel(), m * top_k
    x_sorted = torch.empty(em, h, dtype=torch.float16, device=DEVICE)
    inter_sorted = torch.full((em, i), float("nan"), dtype=torch.float16, device=DEVICE)
    runs = tune.candidate_runs("w13", cfg, experts=experts, x=x, inter=inter, out=inter,
                               blocks=blocks, topk_ids=ids, topk_weights=w, top_k=top_k,
                               x_sorted=x_sorted, inter_sorted=inter_sorted)
    assert [bool(c.get("SORTED_ROWS")) for c, _ in runs] == [False, True]
    runs[0][1]()
    runs[1][1]()
    pos = (blocks.sorted_token_ids < slots).nonzero().flatten()
    slot_of = blocks.sorted_token_ids[pos].long()
    assert torch.equal(inter_sorted[pos], inter[slot_of])


def _mma(bt: int, bn: int, warps: int = 4) -> dict:
    return {"BLOCK_SIZE_M": bt, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 1,
            "num_warps": warps, "num_stages": 1, "MMA": True}


def test_layer_finalists_pair_the_fastest_of_each_block_size_and_the_current_entries():
    """The pairs timed as the layer: per block size the fastest 3 GEMM1 x 2 GEMM2 configs
    (failed candidates left out), the block size of the fastest GEMMs first, then the entries
    the layer runs now unless they are among them; no pair twice (``SWAP_AB`` on an ``MMA``
    entry does not make it another launch)."""
    a, b, c, d = _mma(8, 8, 1), _mma(8, 32, 2), _mma(8, 64), _mma(8, 128)
    g2a, g2b, g2c = _mma(8, 128), _mma(8, 64), _mma(8, 32, 2)
    s1, s2 = _mma(16, 64), _mma(16, 128)
    ranked = {16: ([(50.0, s1)], [(30.0, s2)]),
              8: ([(29.0, c), (28.5, a), (28.8, b), (31.0, d), (math.inf, _mma(8, 16, 1))],
                  [(20.0, g2b), (19.0, g2a), (25.0, g2c)])}
    pairs = tune.layer_finalists(ranked, current=(c, g2a))
    assert pairs == [(a, g2a), (a, g2b), (b, g2a), (b, g2b), (c, g2a), (c, g2b), (s1, s2)]
    # the entries run now, when not a finalist, come last; and a pair is never repeated
    now = (d, g2c)
    assert tune.layer_finalists(ranked, current=now)[-1] == now
    assert tune.layer_finalists({8: ([(1.0, a), (2.0, dict(a))], [(1.0, g2a)])},
                                current=(dict(a), dict(g2a))) == [(a, g2a)]
    assert tune.layer_finalists({8: ([(math.inf, a)], [(1.0, g2a)])}, current=None) == []
    # SWAP_AB means nothing to the mma kernel: a candidate with it is the shipped entry
    swapped = ({**a, "SWAP_AB": True}, {**g2a, "SWAP_AB": True})
    assert tune.layer_finalists({8: ([(1.0, swapped[0])], [(1.0, swapped[1])])},
                                current=(a, g2a)) == [swapped]


def _rs(bt: int, bn: int) -> dict:
    return {"BLOCK_SIZE_M": bt, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
            "num_warps": 8, "num_stages": 6, "SWAP_AB": True, "RS": True}


def test_layer_finalists_add_short_block_pairs_for_rs_tiles_of_32_slots_or_more():
    """Each finalist pair with an RS config of 32 slots a block or more is followed by the
    same pair with SHORT_BLOCK_T half the block on those configs (the others unchanged), so
    the layer over several routings decides whether the short blocks pay; 16-slot and
    non-RS pairs get none, and an entry that already has it is not repeated."""
    g1, g2 = _rs(64, 64), _rs(64, 128)
    triton_g2 = {**_rs(64, 128), "RS": False}
    pairs = tune.layer_finalists({64: ([(10.0, g1)], [(5.0, g2), (6.0, triton_g2)])},
                                 current=None)
    half = lambda c: {**c, "SHORT_BLOCK_T": 32}  # noqa: E731
    assert pairs == [(g1, g2), (half(g1), half(g2)), (g1, triton_g2), (half(g1), triton_g2)]
    assert tune.short_block_pair((_rs(16, 64), _rs(16, 128))) is None
    assert tune.short_block_pair((_mma(32, 64), triton_g2)) is None
    # the shipped entries may already have it: no second short pair, no repeat
    now = (half(g1), half(g2))
    assert tune.short_block_pair(now) is None
    assert tune.layer_finalists({64: ([(10.0, g1)], [(5.0, g2)])}, current=now) == [
        (g1, g2), now]
    assert "SHORT_BLOCK_T=32" in tune.config_label(half(g1))


def test_layer_finalists_add_quarter_block_pairs_for_rs_tiles_of_128_slots_or_more():
    """From 128 slots a block each short pair is followed by the same pair with
    QUARTER_BLOCKS on its RS configs whose SHORT_BLOCK_T is half the block; smaller blocks
    get none (slower there on the H200), nor does a pair that has it already."""
    g1, g2 = _rs(128, 64), _rs(128, 128)
    pairs = tune.layer_finalists({128: ([(10.0, g1)], [(5.0, g2)])}, current=None)
    half = lambda c: {**c, "SHORT_BLOCK_T": 64}  # noqa: E731
    quarter = lambda c: {**half(c), "QUARTER_BLOCKS": True}  # noqa: E731
    assert pairs == [(g1, g2), (half(g1), half(g2)), (quarter(g1), quarter(g2))]
    assert tune.quarter_block_pair((half(g1), half(g2))) == (quarter(g1), quarter(g2))
    # 64-slot blocks: the short pair only
    assert tune.quarter_block_pair(({**_rs(64, 64), "SHORT_BLOCK_T": 32},
                                    {**_rs(64, 128), "SHORT_BLOCK_T": 32})) is None
    assert len(tune.layer_finalists({64: ([(10.0, _rs(64, 64))], [(5.0, _rs(64, 128))])},
                                    current=None)) == 2
    # only where SHORT_BLOCK_T is half the block, and not twice
    assert tune.quarter_block_pair((g1, g2)) is None
    assert tune.quarter_block_pair((quarter(g1), quarter(g2))) is None
    assert tune.layer_finalists({128: ([(10.0, g1)], [(5.0, g2)])},
                                current=(quarter(g1), quarter(g2)))[-1] == (quarter(g1),
                                                                             quarter(g2))
    assert tune.config_label(quarter(g1)).endswith("SHORT_BLOCK_T=64 QUARTER_BLOCKS")


def test_pick_layer_pair_keeps_the_fastest_layer_not_the_fastest_gemms():
    """The pair whose layer is fastest wins even where its GEMMs alone were slower (the H200's
    qwen3-30b case of session 36); each time is the mean over the routings; a pair whose layer
    raises is skipped; every pair failing is an error naming the bucket."""
    fast_alone, shipped, other = (_mma(8, 8, 1), _mma(8, 128)), (_mma(8, 64), _mma(8, 128)), (
        _mma(8, 32, 2), _mma(8, 128))
    layer_us = {0: {8: 50.2, 64: 44.9, 32: 46.0}, 1: {8: 49.8, 64: 45.1, 32: 43.8}}
    seen = []

    def measure(model, m, seed, pair):
        seen.append((model, m, seed, pair[0]["BLOCK_SIZE_N"]))
        return layer_us[seed][pair[0]["BLOCK_SIZE_N"]]

    steps = []
    best, us = tune.pick_layer_pair("qwen3-30b-a3b", 8, [fast_alone, shipped, other], measure,
                                    on_pair=lambda pair, t: steps.append(t))
    assert best == other and us == pytest.approx(44.9)   # (46.0 + 43.8) / 2 < 45.0 (shipped)
    assert steps == pytest.approx([50.0, 45.0, 44.9])
    assert {s[2] for s in seen} == {0, 1} and len(seen) == 6
    # ties keep the first; a failing layer is not a winner
    best, _ = tune.pick_layer_pair("m", 8, [shipped, other], lambda *a: 1.0, routings=1)
    assert best == shipped

    def broken(model, m, seed, pair):
        if pair is shipped:
            raise RuntimeError("out of resources")
        return 3.0

    assert tune.pick_layer_pair("m", 8, [shipped, other], broken, routings=1) == (other, 3.0)
    with pytest.raises(ValueError, match=r"olmoe-1b-7b M=64: the prefill layer failed on"):
        tune.pick_layer_pair("olmoe-1b-7b", 64, [shipped], broken, routings=1)
    with pytest.raises(ValueError, match=r"M=64: no config pair"):
        tune.pick_layer_pair("olmoe-1b-7b", 64, [], broken)


def test_cli_layer_check_is_on_unless_turned_off():
    parser = argparse.ArgumentParser()
    tune.register(parser.add_subparsers())
    assert parser.parse_args(["tune", "--model", "all"]).layer_check
    assert not parser.parse_args(["tune", "--model", "all", "--no-layer-check"]).layer_check


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tuning needs a CUDA GPU")
def test_tune_prefill_picks_each_bucket_by_the_layer(tmp_path):
    """On a GPU: a small shape tuned at one M writes both GEMMs' entries and the picked pair's
    layer time; the layer was timed on the finalist pairs and on the entries it runs now, and
    the written file is a table the loader accepts."""
    from w4a16moe.kernels.configs import parse_table

    shape = tune.ModelShape(num_experts=8, top_k=2, hidden_size=512, intermediate_size=256)
    steps = []
    out = tmp_path / "tuned.json"
    table = tune.tune_prefill({"small": shape}, (8,), out=out, rep_ms=2.0,
                              on_step=lambda done, total, text: steps.append(text))
    layer_steps = [s for s in steps if " layer " in s]
    assert len(layer_steps) >= 2, steps
    assert sum("(the entries it runs now)" in s for s in layer_steps) <= 1
    assert set(table) >= {"512,512", "512,256"} and "8" in table["512,512"]
    assert table["512,512"]["8"]["BLOCK_SIZE_M"] == table["512,256"]["8"]["BLOCK_SIZE_M"]
    us = table["_meta"]["layer_us"]["small"]["8"]
    assert 0 < us < math.inf
    parse_table(json.loads(out.read_text()))


def test_mma_space_times_the_word_ring_tiles():
    """The ``mma`` space holds the one-warp tiles with ``WORD_RING`` (Mixtral's GEMM2 entries
    at 2-4 tokens), valid entries, labelled with their stages."""
    from w4a16moe.kernels.configs import validate_config
    from w4a16moe.kernels.tune import candidate_configs, config_label

    rings = [c for c in candidate_configs(8, 2.0, space="mma") if "WORD_RING" in c]
    assert sorted((c["BLOCK_SIZE_K"], c["WORD_RING"]) for c in rings) == [(256, 3), (512, 2)]
    for c in rings:
        assert c["MMA"] and c["num_warps"] == 1 and c["BLOCK_SIZE_N"] == 16
        assert validate_config(c) == c
        assert config_label(c).endswith(f"WORD_RING={c['WORD_RING']}")


def test_random_routing_skew_loads_some_experts_more():
    """skew 0 is the unbiased routing; a positive skew piles slots onto popular experts (the
    busiest expert's load grows, fewer experts are used), and the blocks count every
    expert's slots rounded up to the block size."""
    shape = MODEL_SHAPES["mixtral-8x7b"]
    w0, ids0 = tune.random_routing(64, shape, "cpu", seed=5)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, shape.num_experts, generator=gen)
    assert torch.equal(ids0, torch.topk(logits, shape.top_k, dim=1).indices.to(ids0.dtype))
    w1, ids1 = tune.random_routing(64, shape, "cpu", seed=5, skew=0.0)
    assert torch.equal(ids0, ids1) and torch.equal(w0, w1)

    busiest = {skew: sum(tune.routing_load(tune.random_routing(
        64, shape, "cpu", seed=s, skew=skew)[1], shape.num_experts)["busiest"]
        for s in range(20)) / 20 for skew in (0.0, 0.5, 1.0)}
    assert busiest[0.0] < busiest[0.5] < busiest[1.0]
    assert 16 < busiest[0.0] < 26 < busiest[0.5]   # uniform mean load: 16 slots

    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    assert tune.routing_load(ids, 8, block_size=2) == {
        "busiest": 4, "experts": 4, "mean": 2.0, "blocks": 2 + 1 + 1 + 1}
    for bad in (-0.5, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="skew must be a finite number >= 0"):
            tune.random_routing(4, shape, "cpu", skew=bad)


def test_cli_skew_option_and_random_logits():
    """``--skew`` (default 0) is checked before anything runs; ``random_logits`` adds one
    per-expert bias that every token shares, drawn after the logits skew 0 draws."""
    parser = argparse.ArgumentParser()
    tune.register(parser.add_subparsers())
    assert parser.parse_args(["tune", "--model", "all"]).skew == 0.0
    args = parser.parse_args(["tune", "--model", "mixtral-8x7b", "--skew", "0.5"])
    assert args.skew == 0.5
    for bad in ("-1", "nan"):
        args = parser.parse_args(["tune", "--model", "mixtral-8x7b", "--skew", bad])
        with pytest.raises(ValueError, match=r"--skew must be a finite number >= 0; found"):
            tune.run(args)
    plain = tune.random_logits(6, 8, torch.Generator().manual_seed(3))
    skewed = tune.random_logits(6, 8, torch.Generator().manual_seed(3), skew=2.0)
    assert torch.equal(plain, torch.randn(6, 8, generator=torch.Generator().manual_seed(3)))
    bias = skewed - plain
    assert torch.allclose(bias, bias[:1].expand_as(bias)) and bias.abs().max() > 0
