"""Where neighbouring config buckets hand over (w4a16moe.kernels.boundaries)."""

from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch

from w4a16moe.kernels import tune
from w4a16moe.kernels.boundaries import (
    best_split,
    boundary_bucket,
    gpu_measure,
    nearest_bucket,
    points_between,
    refine_boundaries,
)
from w4a16moe.kernels.configs import lookup_config
from w4a16moe.kernels.tune import ModelShape

SHAPE = ModelShape(num_experts=8, top_k=2, hidden_size=256, intermediate_size=128)
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
         "num_warps": 4, "num_stages": 2, "SWAP_AB": True}
LARGE = {**SMALL, "BLOCK_SIZE_M": 64, "GROUP_SIZE_M": 8}


def small_table(low=256, high=1024):
    return {"_meta": {"space": "by hand"},
            "256,256": {str(low): dict(SMALL), str(high): dict(LARGE)},
            "256,128": {str(low): dict(SMALL), str(high): dict(LARGE)}}


def test_nearest_bucket_is_the_lookup_rule():
    assert nearest_bucket((256, 1024), 640) == 256     # a tie goes to the smaller bucket
    assert nearest_bucket((256, 1024), 641) == 1024
    assert nearest_bucket((16, 32, 64), 1) == 16


def test_points_between():
    assert points_between(1024, 2048) == (1280, 1536, 1792)
    assert points_between(4, 8, 3) == (5, 6, 7)
    assert points_between(4, 6, 3) == (5,)
    assert points_between(4, 5, 3) == ()
    with pytest.raises(ValueError, match="expected 0 < low < high"):
        points_between(8, 8)
    with pytest.raises(ValueError, match="count is 0"):
        points_between(4, 8, 0)


@pytest.mark.parametrize("low,high", [(256, 1024), (16, 32), (1, 2), (3, 4), (4, 8), (5, 12)])
def test_boundary_bucket_hands_over_after_last_low(low, high):
    """Every handover between two buckets: with the added bucket, the lookup reads low's
    entries up to last_low and high's above (and None exactly where the midpoint does)."""
    for last_low in range(low, high):
        placed = boundary_bucket(low, high, last_low)
        buckets = {low: "low", high: "high"}
        if placed is not None:
            bucket, holds = placed
            assert low < bucket < high, (last_low, placed)
            buckets[bucket] = holds
        for m in range(max(1, low - 3), high + 4):
            want = "low" if m <= last_low else "high"
            assert buckets[nearest_bucket(buckets, m)] == want, (last_low, placed, m)


def test_boundary_bucket_rejects_a_handover_outside_the_pair():
    with pytest.raises(ValueError, match="last_low is 1024; expected 256 <= last_low < 1024"):
        boundary_bucket(256, 1024, 1024)


def test_best_split():
    pts = (448, 640, 832)
    # high's entries win from 640 on; the midpoint (640, a tie) gives 640 to low's
    assert best_split(pts, (448, 640, 832), (470, 584, 700), low=256, high=1024) == 544
    # high's entries win only at 832: the midpoint already hands over there
    assert best_split(pts, (448, 640, 832), (470, 650, 700), low=256, high=1024) is None
    # low's entries win everywhere: hand over halfway from the last point to high
    assert best_split(pts, (400, 500, 600), (470, 650, 700), low=256, high=1024) == 928
    # high's win everywhere: halfway from low to the first point
    assert best_split(pts, (500, 700, 900), (470, 650, 700), low=256, high=1024) == 352
    # a gain below min_gain moves nothing
    assert best_split(pts, (448, 640, 832), (470, 635, 700), low=256, high=1024,
                      min_gain=0.01) is None
    with pytest.raises(ValueError, match="expected one time per point"):
        best_split(pts, (1, 2), (1, 2, 3), low=256, high=1024)
    with pytest.raises(ValueError, match="not ascending strictly between 256 and 1024"):
        best_split((256, 640), (1, 2), (1, 2), low=256, high=1024)


def fake_measure(calls):
    """Small tiles cost 1 us a token, large ones 0.6 us a token + 200: they cross at 500."""
    def measure(model, m, seed, configs):
        calls.append((model, m, seed, configs[0]["BLOCK_SIZE_M"]))
        return float(m) if configs[0]["BLOCK_SIZE_M"] == 16 else 0.6 * m + 200
    return measure


def test_refine_boundaries_adds_the_bucket_that_moves_the_handover(tmp_path):
    table = small_table()
    before = copy.deepcopy(table)
    calls, steps = [], []
    new, changes = refine_boundaries(table, {"toy": SHAPE}, measure=fake_measure(calls),
                                     on_step=lambda *a: steps.append(a))
    assert table == before                       # the input is not changed
    assert len(calls) == 3 * 2 * 2               # 3 points, 2 routings, both buckets' entries
    assert [s[:2] for s in steps] == [(i, 6) for i in range(1, 7)]
    assert steps[-1][2] == ("toy M=832 (between buckets 256 and 1024), mean of 2 of 2 "
                            "routings: 832.0 us with bucket 256's entries, 699.2 with 1024's")
    assert {seed for *_, seed, _ in calls} == {448, 1448, 640, 1640, 832, 1832}
    (c,) = changes
    assert (c.model, c.low, c.high, c.points) == ("toy", 256, 1024, (448, 640, 832))
    assert c.low_us == (448.0, 640.0, 832.0)
    assert c.last_low == 544 and (c.bucket, c.holds) == (833, "high")
    assert new["256,256"]["833"] == LARGE and new["256,128"]["833"] == LARGE
    assert new["_meta"] == table["_meta"]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(new))
    for m, want in ((544, SMALL), (545, LARGE), (256, SMALL), (2000, LARGE)):
        for n, k in ((256, 256), (256, 128)):
            assert lookup_config(path, m, n, k, 8, 2) == want, (m, n, k)


def test_refine_boundaries_leaves_midpoints_that_hold():
    calls = []
    new, changes = refine_boundaries(small_table(), {"toy": SHAPE},
                                     measure=fake_measure(calls), min_gain=0.5)
    assert changes == [] and new == small_table()
    # neighbours with the same entries are not timed at all
    same = small_table()
    for key in ("256,256", "256,128"):
        same[key]["1024"] = dict(SMALL)
    calls.clear()
    assert refine_boundaries(same, {"toy": SHAPE}, measure=fake_measure(calls))[1] == []
    assert calls == []


def test_refine_boundaries_needs_both_gemms_entries():
    table = small_table()
    del table["256,128"]
    with pytest.raises(ValueError, match=r"model 'toy': the table has no entries for "
                                         r"\['256,128'\]"):
        refine_boundaries(table, {"toy": SHAPE}, measure=fake_measure([]))


def test_cli_boundaries_options(tmp_path):
    parser = argparse.ArgumentParser()
    tune.register(parser.add_subparsers())
    args = parser.parse_args(["tune", "--model", "olmoe-1b-7b", "--boundaries", "--points",
                              "5", "--routings", "1"])
    assert args.boundaries and args.points == 5 and args.routings == 1
    args.points = 0
    with pytest.raises(ValueError, match="--points is 0; expected at least 1"):
        tune._run_boundaries(args, ["olmoe-1b-7b"], str(tmp_path / "t.json"), torch.bfloat16)
    args.points = 3
    with pytest.raises(ValueError, match=r"--boundaries reads the config table .*t\.json"):
        tune._run_boundaries(args, ["olmoe-1b-7b"], str(tmp_path / "t.json"), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times the layer on a GPU")
def test_refine_boundaries_on_the_gpu():
    """The real measure: finite times for both buckets' entries at every point, and any added
    bucket makes the lookup hand over where the change says."""
    models = {"toy": SHAPE}
    measure = gpu_measure(models, rep_ms=2.0)
    t = measure("toy", 40, 0, (SMALL, LARGE))
    assert math.isfinite(t) and t > 0
    new, changes = refine_boundaries(small_table(16, 64), models, measure=measure,
                                     points=3, seeds=1, min_gain=0.0)
    for c in changes:
        assert 16 < c.bucket < 64 and all(math.isfinite(v) for v in c.low_us + c.high_us)
        buckets = {int(b) for b in new["256,256"]}
        for m in range(16, 65):
            want = SMALL if m <= c.last_low else LARGE
            assert new["256,256"][str(nearest_bucket(buckets, m))] == want
