"""Property tests (hypothesis) of the public experts API against the reference.

Random layers (E, top_k, H, I multiples of 8 that are not powers of two, G per group or per
channel, sym/asym, act-order, expert_map, activations, router weight on input or output),
random routing and M including 0 and 1, through :class:`HybridW4A16MoEExperts` with each path
forced and in the deterministic mode, compared with :func:`moe_reference` in float64.

On the CPU (Triton interpreter, fp16 only: the interpreter's bf16 arithmetic is wrong) the
shapes stay tiny and each test draws 10-25 examples; on a GPU the same tests run fp16 and
bf16 with larger shapes and M (there the cost is Triton compiling each new combination of
constexpr options, ~1 s each, so the counts stay modest). The examples are derandomized (the
same every run, so CI time is stable); ``W4A16MOE_FUZZ_EXAMPLES=N`` draws N fresh random
examples per test for a longer fuzzing session.
Failures found by these tests are kept as regular tests at the end of this file.

Tolerance: the kernels round the GEMM1 output to the activation dtype (the reference does too,
``round_intermediate=True``), the prefill kernel also rounds each dequantized weight to the
activation dtype, and both round the output; ``|out - ref| <= tol * (|ref| + max|ref|)`` with
tol = 2^-7 (fp16) / 2^-5 (bf16) leaves room for those roundings and a one-ulp flip of the
intermediate, while a wrong group, slot, shift or expert is off by tens of percent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE, ON_GPU
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from w4a16moe import HybridW4A16MoEExperts
from w4a16moe.quantize import random_experts
from w4a16moe.reference import ACTIVATIONS, moe_reference
from w4a16moe.routing import fused_topk

DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]
TOL = {torch.float16: 2.0**-7, torch.bfloat16: 2.0**-5}
_FUZZ = int(os.environ.get("W4A16MOE_FUZZ_EXAMPLES", "0"))


def _settings(cpu_examples: int, gpu_examples: int):
    n = _FUZZ or (gpu_examples if ON_GPU else cpu_examples)
    return settings(max_examples=n, deadline=None, derandomize=not _FUZZ,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], print_blob=True)


# sizes: multiples of 8, not powers of two, K a multiple of G; per channel (G = K) any size
if ON_GPU:
    DIMS = {-1: [40, 120, 328], 32: [96, 480], 64: [320], 128: [384, 1152]}
    MS = [0, 1, 2, 5, 13, 33, 100, 257]
else:  # each interpreted (program x K step) costs ~5 ms: tiny layers, few slots
    DIMS = {-1: [40, 56, 72], 32: [96]}  # G = 64/128: the GPU run, and test_decode/prefill
    MS = [0, 1, 2, 3, 5]
MAX_EXPERTS, MAX_TOP_K = (8, 4) if ON_GPU else (4, 3)


@dataclass(frozen=True)
class Case:
    """One random layer + batch."""

    num_experts: int
    num_global: int        # == num_experts without an expert_map
    use_map: bool
    top_k: int
    hidden: int
    inter: int
    group: int             # -1: per channel
    symmetric: bool
    act_order: bool
    activation: str
    on_input: bool
    m: int
    ids_int64: bool
    weights_dtype: str     # "fp32" or "act" (the activation dtype)
    dtype: torch.dtype
    seed: int

    def build(self):
        """(experts, expert_map or None, x, topk_weights, topk_ids) on DEVICE."""
        ex = random_experts(self.num_experts, self.hidden, self.inter, group_size=self.group,
                            symmetric=self.symmetric, act_order=self.act_order,
                            dtype=self.dtype, device=DEVICE, seed=self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        emap = None
        if self.use_map:
            chosen = torch.randperm(self.num_global, generator=gen)[: self.num_experts]
            emap = torch.full((self.num_global,), -1, dtype=torch.int32)
            emap[chosen] = torch.arange(self.num_experts, dtype=torch.int32)
            emap = emap.to(DEVICE)
        x = torch.randn(self.m, self.hidden, generator=gen).to(self.dtype).to(DEVICE)
        logits = torch.randn(self.m, self.num_global, generator=gen).to(DEVICE)
        tw, ti = fused_topk(logits, self.top_k)
        if self.ids_int64:
            ti = ti.long()
        if self.weights_dtype == "act":
            tw = tw.to(self.dtype)
        return ex, emap, x, tw, ti


@st.composite
def cases(draw, dtypes=tuple(DTYPES)) -> Case:
    e = draw(st.integers(1, MAX_EXPERTS))
    use_map = draw(st.integers(0, 3)) == 0
    num_global = e + draw(st.integers(0, 3)) if use_map else e
    top_k = draw(st.integers(1, min(num_global, MAX_TOP_K)))
    group = draw(st.sampled_from(sorted(DIMS)))
    hidden = draw(st.sampled_from(DIMS[group]))
    inter = draw(st.sampled_from(DIMS[group]))
    return Case(num_experts=e, num_global=num_global, use_map=use_map, top_k=top_k,
                hidden=hidden, inter=inter, group=group, symmetric=draw(st.booleans()),
                act_order=draw(st.integers(0, 3)) == 0,
                activation=draw(st.sampled_from(ACTIVATIONS)), on_input=draw(st.booleans()),
                m=draw(st.sampled_from(MS)), ids_int64=draw(st.booleans()),
                weights_dtype=draw(st.sampled_from(["fp32", "act"])),
                dtype=draw(st.sampled_from(list(dtypes))), seed=draw(st.integers(0, 2**16)))


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                             what: str) -> None:
    assert out.dtype == dtype and out.shape == ref.shape, what
    out = out.double()
    assert torch.isfinite(out).all(), f"{what}: NaN/inf in the output (unwritten rows?)"
    if ref.numel() == 0:
        return
    tol = TOL[dtype]
    bound = tol * (ref.abs() + ref.abs().max())
    err = (out - ref).abs()
    worst = (err / bound.clamp_min(1e-30)).max().item()
    assert worst <= 1.0, (f"{what}: max error {err.max().item():.3e} is {worst:.2f}x the "
                          f"bound (max|ref| {ref.abs().max().item():.3e})")


def _module(case: Case, ex, emap, deterministic: bool) -> HybridW4A16MoEExperts:
    return HybridW4A16MoEExperts(ex, case.top_k, activation=case.activation,
                                 apply_router_weight_on_input=case.on_input, expert_map=emap,
                                 deterministic=deterministic)


def _reference(case: Case, ex, emap, x, tw, ti) -> torch.Tensor:
    return moe_reference(x, ex, tw, ti, activation=case.activation,
                         apply_router_weight_on_input=case.on_input, expert_map=emap,
                         compute_dtype=torch.float64, round_intermediate=True)


# ------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@_settings(cpu_examples=25, gpu_examples=30)
@given(case=cases(), deterministic=st.booleans())
def test_both_paths_match_reference(case: Case, deterministic: bool):
    """Each forced path (and the automatic choice) agrees with the float64 reference; rows of
    tokens whose experts are all remote are exactly zero; a NaN-poisoned ``out`` is fully
    written."""
    ex, emap, x, tw, ti = case.build()
    moe = _module(case, ex, emap, deterministic)
    ref = _reference(case, ex, emap, x, tw, ti)
    for path in ("decode", "prefill", None):
        out = torch.full((case.m, case.hidden), float("nan"), dtype=case.dtype, device=DEVICE)
        got = moe(x, tw, ti, path=path, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert_matches_reference(got, ref, case.dtype, f"path={path} {case}")
        if emap is not None and case.m:
            remote = (emap.long()[ti.long()] < 0).all(dim=1)
            assert (got[remote] == 0).all(), "tokens routed only to remote experts"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@_settings(cpu_examples=10, gpu_examples=12)
@given(case=cases(), data=st.data())
def test_deterministic_mode_is_batch_invariant(case: Case, data):
    """deterministic=True: a token's output is bitwise the same alone, inside the whole batch,
    inside a sub-batch in another order, and on a second run (each forced path separately)."""
    ex, emap, x, tw, ti = case.build()
    moe = _module(case, ex, emap, deterministic=True)
    for path in ("prefill", "decode"):
        full = moe(x, tw, ti, path=path)
        if path == "prefill" or ON_GPU:  # (the interpreter runs programs in a fixed order)
            again = moe(x, tw, ti, path=path)
            assert torch.equal(full, again), f"{path}: run-to-run differs"
        if case.m == 0:
            continue
        order = data.draw(st.permutations(range(case.m)), label="order")
        size = data.draw(st.integers(1, case.m), label="sub-batch size")
        idx = torch.tensor(order[:size], device=DEVICE)
        sub = moe(x[idx], tw[idx], ti[idx], path=path)
        assert torch.equal(sub, full[idx]), f"{path}: sub-batch {order[:size]} differs"
        j = order[0]
        alone = moe(x[j:j + 1], tw[j:j + 1], ti[j:j + 1], path=path)
        assert torch.equal(alone, full[j:j + 1]), f"{path}: token {j} alone differs"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@_settings(cpu_examples=10, gpu_examples=10)
@given(case=cases(), renormalize=st.booleans(), scoring=st.sampled_from(["softmax", "sigmoid"]))
def test_forward_logits_matches_reference(case: Case, renormalize: bool, scoring: str):
    """Routing from router logits (fused_topk) followed by the experts, against the reference
    fed with the same routing."""
    ex, emap, x, _, _ = case.build()
    moe = _module(case, ex, emap, deterministic=False)
    logits = torch.randn(case.m, case.num_global, device=DEVICE)
    tw, ti = fused_topk(logits, case.top_k, renormalize=renormalize, scoring=scoring)
    ref = _reference(case, ex, emap, x, tw, ti)
    got = moe.forward_logits(x, logits, renormalize=renormalize, scoring=scoring)
    assert_matches_reference(got, ref, case.dtype, f"forward_logits {case}")


# ------------------------------------------------------------------------------------------
# failures found by the properties, kept as regular tests
# ------------------------------------------------------------------------------------------
# None in the kernels' numerics so far (CPU: ~100 examples over three runs of different
# sizes; H100: fp16 and bf16). The boundary gaps found while writing these tests (a top_k
# other than the module's accepted, layouts accepted by one path and rejected by the
# other, unchecked expert_map values) are regular tests in tests/test_validation.py.
