"""HybridW4A16MoEExperts: both paths against the reference, threshold choice, annotations."""

import json
import warnings

import pytest
import torch
from conftest import DEVICE, ON_GPU

from w4a16moe import HybridW4A16MoEExperts, random_experts
from w4a16moe import experts as experts_mod
from w4a16moe.reference import moe_reference
from w4a16moe.routing import fused_topk, max_num_tokens_padded

DTYPES = [torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def _layer(e=5, h=64, i=96, g=32, symmetric=True, act_order=False, dtype=torch.float16,
           seed=0):
    return random_experts(e, h, i, group_size=g, symmetric=symmetric, act_order=act_order,
                          dtype=dtype, device=DEVICE, seed=seed)


def _routing(m, e, top_k):
    logits = torch.randn(m, e, device=DEVICE)
    return fused_topk(logits, top_k)


def _check(out, ref, dtype):
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.abs().max().item() + 1e-6
    tol = 2e-2 if dtype == torch.float16 else 4e-2
    assert err <= tol * scale, f"max abs err {err} vs scale {scale}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric,act_order", [(True, False), (False, True)])
@pytest.mark.parametrize("m", [1, 5])
def test_forced_paths_agree_with_reference(dtype, symmetric, act_order, m):
    ex = _layer(symmetric=symmetric, act_order=act_order, dtype=dtype)
    moe = HybridW4A16MoEExperts(ex, top_k=2)
    x = torch.randn(m, ex.hidden_size, device=DEVICE, dtype=dtype)
    tw, ti = _routing(m, ex.num_experts, 2)
    ref = moe_reference(x, ex, tw, ti, round_intermediate=True)
    outs = {}
    for path in ("decode", "prefill"):
        outs[path] = moe(x, tw, ti, path=path)
        _check(outs[path], ref, dtype)
    _check(outs["decode"], outs["prefill"].float(), dtype)


def test_threshold_picks_path_and_argument_overrides():
    ex = _layer()
    moe = HybridW4A16MoEExperts(ex, top_k=2, decode_threshold=3)
    assert moe.choose_path(1) == "decode"
    assert moe.choose_path(3) == "decode"
    assert moe.choose_path(4) == "prefill"
    default = HybridW4A16MoEExperts(ex, top_k=2)
    if not ON_GPU:  # no measured threshold exists for a CPU
        assert default.decode_threshold == experts_mod.DEFAULT_DECODE_THRESHOLD


def test_hybrid_auto_path_matches_reference_on_both_sides():
    ex = _layer(e=4, h=64, i=64)
    moe = HybridW4A16MoEExperts(ex, top_k=2, decode_threshold=2, activation="gelu")
    for m in (2, 3):
        x = torch.randn(m, 64, device=DEVICE, dtype=torch.float16)
        tw, ti = _routing(m, 4, 2)
        ref = moe_reference(x, ex, tw, ti, activation="gelu", round_intermediate=True)
        out = torch.full((m, 64), float("nan"), device=DEVICE, dtype=torch.float16)
        moe(x, tw, ti, out=out)
        _check(out, ref, torch.float16)


def test_forward_logits_routes_like_fused_topk():
    ex = _layer(e=4)
    moe = HybridW4A16MoEExperts(ex, top_k=2)
    x = torch.randn(3, 64, device=DEVICE, dtype=torch.float16)
    logits = torch.randn(3, 4, device=DEVICE)
    tw, ti = fused_topk(logits, 2, renormalize=False)
    ref = moe_reference(x, ex, tw, ti, round_intermediate=True)
    _check(moe.forward_logits(x, logits, renormalize=False), ref, torch.float16)


def test_expert_map_and_router_weight_on_input():
    ex = _layer(e=3)
    # 6 global experts; this rank holds globals 1, 3, 4 as locals 0, 1, 2
    emap = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32, device=DEVICE)
    moe = HybridW4A16MoEExperts(ex, top_k=1, expert_map=emap, apply_router_weight_on_input=True)
    x = torch.randn(6, 64, device=DEVICE, dtype=torch.float16)
    tw, ti = _routing(6, 6, 1)
    ref = moe_reference(x, ex, tw, ti, expert_map=emap, apply_router_weight_on_input=True,
                        round_intermediate=True)
    for path in ("decode", "prefill"):
        _check(moe(x, tw, ti, path=path), ref, torch.float16)


def test_zero_tokens():
    moe = HybridW4A16MoEExperts(_layer(), top_k=2)
    x = torch.empty(0, 64, device=DEVICE, dtype=torch.float16)
    ti = torch.empty(0, 2, dtype=torch.int32, device=DEVICE)
    tw = torch.empty(0, 2, device=DEVICE)
    assert moe(x, tw, ti).shape == (0, 64)


def test_workspaces_are_reused():
    moe = HybridW4A16MoEExperts(_layer(), top_k=2, decode_threshold=2)
    moe.reserve(6)
    dws, pws = moe._decode_ws, moe._prefill_ws
    for m in (1, 2, 4, 6):
        x = torch.randn(m, 64, device=DEVICE, dtype=torch.float16)
        tw, ti = _routing(m, 5, 2)
        moe(x, tw, ti)
    assert moe._decode_ws is dws and moe._prefill_ws is pws


def test_reserve_makes_room_for_sorted_rows(monkeypatch):
    """With SORTED_ROWS configs (the rows of the aligned blocks, padding included, live in the
    prefill workspace) reserve() sizes the workspace for them: later calls replace no
    buffer, and the results match the reference."""
    from w4a16moe.kernels import configs as cfgmod
    from w4a16moe.kernels import prefill as prefill_mod

    def sorted_config(*args, **kwargs):
        return {**cfgmod.INTERPRETER_CONFIG, "SORTED_ROWS": True}

    monkeypatch.setattr(cfgmod, "get_prefill_config", sorted_config)
    monkeypatch.setattr(prefill_mod, "get_prefill_config", sorted_config)
    moe = HybridW4A16MoEExperts(_layer(), top_k=2, decode_threshold=2)
    moe.reserve(6)
    assert moe._prefill_ws.intermediate.shape[0] > 12   # room for the padded positions
    _assert_calls_keep_prefill_buffers(moe, (3, 6))


def _assert_calls_keep_prefill_buffers(moe, token_counts):
    """Layer calls of ``token_counts`` tokens match the reference and replace no buffer of
    the reserved prefill workspace."""
    pws = moe._prefill_ws
    ptrs = (pws.intermediate.data_ptr(), pws.gemm2_out.data_ptr())
    for m in token_counts:
        x = torch.randn(m, 64, device=DEVICE, dtype=torch.float16)
        tw, ti = _routing(m, 5, 2)
        ref = moe_reference(x, moe.experts, tw, ti, round_intermediate=True)
        _check(moe(x, tw, ti), ref, torch.float16)
    assert moe._prefill_ws is pws
    assert (pws.intermediate.data_ptr(), pws.gemm2_out.data_ptr()) == ptrs


def test_reserve_makes_room_for_a_smaller_calls_sorted_rows(monkeypatch):
    """A smaller call may take a table bucket with SORTED_ROWS that the reserved size's
    bucket lacks (the H100 table: Mixtral buckets 3 and 4 sort, bucket 8 does not), and its
    padded blocks need more rows than the reserved size's slots. reserve() scans every token
    count, so no later call replaces a buffer (inside a CUDA graph that would leave the
    graphs captured before it pointing at freed memory); each count is scanned once, for
    every module of the same configs."""
    from w4a16moe.kernels import configs as cfgmod
    from w4a16moe.kernels import prefill as prefill_mod

    looked_up = []

    def small_m_sorts(m, *args, **kwargs):
        looked_up.append(m)
        return {**cfgmod.INTERPRETER_CONFIG, "SORTED_ROWS": m <= 3}

    monkeypatch.setattr(cfgmod, "get_prefill_config", small_m_sorts)
    monkeypatch.setattr(prefill_mod, "get_prefill_config", small_m_sorts)
    moe = HybridW4A16MoEExperts(_layer(), top_k=2, decode_threshold=1)
    moe.reserve(6)
    assert sorted(set(looked_up)) == [1, 2, 3, 4, 5, 6]
    bm = cfgmod.INTERPRETER_CONFIG["BLOCK_SIZE_M"]
    rows = moe._prefill_ws.intermediate.shape[0]
    assert rows >= max_num_tokens_padded(3 * 2, bm, 5) > 6 * 2
    _assert_calls_keep_prefill_buffers(moe, (3, 6, 2))
    looked_up.clear()
    moe.reserve(8)   # grows: scans only the new counts
    assert sorted(set(looked_up)) == [7, 8]
    looked_up.clear()
    other = HybridW4A16MoEExperts(_layer(), top_k=2, decode_threshold=1)  # the next layer
    other.reserve(8)   # its configs are the first module's: nothing is looked up again
    assert looked_up == []
    assert other._prefill_ws.intermediate.shape[0] == moe._prefill_ws.intermediate.shape[0]
    HybridW4A16MoEExperts(_layer(), top_k=1, decode_threshold=1).reserve(2)  # other configs
    assert sorted(set(looked_up)) == [1, 2]


def test_module_to_rebuilds_packed_experts():
    ex = random_experts(3, 64, 64, group_size=32, dtype=torch.float16, seed=1)
    moe = HybridW4A16MoEExperts(ex, top_k=1)
    moe = moe.to(DEVICE)
    assert moe.experts.device.type == torch.device(DEVICE).type
    assert moe.experts.w13.qweight is moe.w13_qweight
    names = {n for n, _ in moe.named_buffers()}
    assert {"w13_qweight", "w13_scales", "w2_qweight", "w2_scales"} <= names


def test_bad_arguments():
    ex = _layer()
    with pytest.raises(ValueError, match="activation"):
        HybridW4A16MoEExperts(ex, top_k=2, activation="relu")
    with pytest.raises(ValueError, match="top_k"):
        HybridW4A16MoEExperts(ex, top_k=9)
    with pytest.raises(ValueError, match="PackedExperts"):
        HybridW4A16MoEExperts(object(), top_k=1)
    moe = HybridW4A16MoEExperts(ex, top_k=2)
    x = torch.randn(2, 64, device=DEVICE, dtype=torch.float16)
    tw, ti = _routing(2, 5, 2)
    with pytest.raises(ValueError, match="path"):
        moe(x, tw, ti, path="gpu")


def test_thresholds_file_read_and_malformed_file_warns(tmp_path, monkeypatch):
    good = tmp_path / "good.json"
    key = experts_mod.threshold_key(5, 64, 96, 2, 32)
    good.write_text(json.dumps({key: 12, "_comment": "measured"}))
    experts_mod._read_thresholds.cache_clear()
    assert experts_mod._read_thresholds(str(good)) == {key: 12}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert experts_mod._read_thresholds(str(bad)) == {}
    assert any("bad.json" in str(w.message) for w in caught)
    assert experts_mod._read_thresholds(str(tmp_path / "missing.json")) == {}


def test_gpu_without_thresholds_borrows_a_siblings(tmp_path, monkeypatch):
    """A GPU with no thresholds file uses those of a GPU of the same compute capability and
    multiprocessor count (warning once), not DEFAULT_DECODE_THRESHOLD; another GPU does not."""
    from w4a16moe.kernels import configs as cfgmod

    ex = random_experts(5, 64, 96, group_size=32, dtype=torch.float16, device=DEVICE, seed=3)
    key = experts_mod.threshold_key(5, 64, 96, 2, 32)
    h100 = {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "multiprocessors": 132}
    (tmp_path / "NVIDIA_H100_80GB_HBM3_thresholds.json").write_text(
        json.dumps({"_meta": {"gpu": h100}, key: 6}))
    monkeypatch.setattr(cfgmod, "CONFIG_DIR", tmp_path)
    for fn in (cfgmod._warn_borrowed, cfgmod._cached_sibling, experts_mod._read_thresholds):
        fn.cache_clear()
    cuda = torch.device("cuda")
    monkeypatch.setattr(cfgmod, "gpu_traits", lambda device=None: {**h100, "name": "NVIDIA H200"})
    with pytest.warns(RuntimeWarning, match="no tuned decode thresholds for NVIDIA H200"):
        assert experts_mod.measured_decode_threshold(ex, 2, cuda) == 6
    monkeypatch.setattr(cfgmod, "gpu_traits", lambda device=None: {**h100, "name": "A100",
                                                                    "capability": [8, 0]})
    assert experts_mod.measured_decode_threshold(ex, 2, cuda) is None


@pytest.mark.parametrize("m,path,name", [(1, "decode", "fused_moe_wvsplitk_int4"),
                                         (3, "prefill", "hybrid_triton_moe")])
def test_every_gemm_is_annotated(m, path, name):
    ex = _layer(e=5, h=64, i=96)
    moe = HybridW4A16MoEExperts(ex, top_k=2)
    x = torch.randn(m, 64, device=DEVICE, dtype=torch.float16)
    tw, ti = _routing(m, 5, 2)
    with torch.profiler.profile() as prof:
        moe(x, tw, ti, path=path)
    names = [evt.name for evt in prof.events()]
    assert f"{name} {m}x192x64 E=5 top_k=2" in names  # GEMM1: N = 2I, K = H
    assert f"{name} {m}x64x96 E=5 top_k=2" in names   # GEMM2: N = H, K = I
