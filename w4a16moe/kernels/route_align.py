"""Top-k routing and ``align_block_size`` in one program, for the prefill chain's small layers.

The prefill layer starts with two small kernels: the router (:mod:`.router`, one program a
token) and the one-program alignment (:mod:`.align`), which reads the router's ids back,
counts them with global atomics behind a CTA barrier and scatters the slots. Each is a chain
of round trips through the L2 (H200, a chain of 64 PDL dependents in one graph: router 1.8-2.0
us, alignment 1.7-2.2 us a call at qwen3-30b M=1-32), and a second alignment made the whole
layer 1.8 us longer at M=8-16 (``benchmarks/chain_small_kernels.py``, session 38). Here one
program routes the tokens and aligns the slots from registers:

* routing: :func:`.router._route_rows` on all tokens at once (:func:`tile`: the router's
  programs side by side), the same keys, selection and weights as the router kernel, so
  ``topk_ids`` are :func:`.router.topk_router`'s, and so are the ``topk_weights`` bit for
  bit where each row sits in its warps as in the router (checked on the GPU for the built-in
  models' 8, 64 and 128 experts; with other counts, e.g. 60, Triton laid a row out otherwise
  and a weight's last bit differed);
* alignment: a token's experts are the columns whose key is at least its ``top_k``-th key
  (the keys are distinct), a ``[ROWS, E]`` 0/1 matrix. Its column sums are the experts'
  counts, whose padded lengths' cumulative sum gives each run's start; its exclusive
  cumulative sum down the tokens gives, for every (token, expert), how many earlier tokens
  chose that expert: the slot's rank within the run, since a token chooses an expert at most
  once. A slot's row is its run's start plus that rank (a gather along the row); the slots
  that start a block write the block's expert. So within an expert the slots keep their flat
  order, and the outputs are :func:`w4a16moe.routing.align_block_size`'s exactly.

No global atomics and no read-back: the program's only global traffic is the logits (and the
bias) in and the outputs out. But one SM routes every token, so the program is used only up to
:data:`MAX_WARPS` warps of the router's tiles (:func:`supported`: qwen3-30b up to 4 tokens,
Mixtral up to 16); beyond, the router and the alignment run as before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align import _fill_outputs
from .pdl import gdc_launch_dependents, pdl_enabled
from .router import (
    HAVE_TOPK,
    SCORING_CODES,
    _route_rows,
    rows_per_program,
    warps_per_program,
)
from .router import MAX_EXPERTS as ROUTER_MAX_EXPERTS

#: most warps the program takes (see :func:`supported`)
MAX_WARPS = 4


@triton.jit
def _route_align_kernel(
    logits_ptr, stride_lm, bias_ptr, weights_ptr, ids_ptr, expert_map_ptr,
    sorted_ids_ptr, expert_ids_ptr, total_ptr,
    M, E, scaling, block_size, num_sorted, num_blocks,
    TOP_K: tl.constexpr, TOP_K_P2: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr,
    SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_MAP: tl.constexpr, FILL_BLOCK: tl.constexpr,
    PDL: tl.constexpr = False, BITONIC: tl.constexpr = True,
):
    """One program: ``logits [M, E]`` (``M <= ROWS``) -> ``weights [M, TOP_K]`` float32,
    ``ids [M, TOP_K]`` int32 (as :func:`.router._topk_router_kernel`), and the alignment of
    those ids to ``block_size``: ``sorted_ids [num_sorted]`` (the slots ``token * TOP_K + k``
    grouped by expert in flat order, each run padded with the sentinel ``M * TOP_K``),
    ``expert_ids [num_blocks]`` (each block's expert through ``expert_map`` when
    ``HAS_MAP``; -1 past the runs) and ``total [1]`` (the padded slot count), as
    :func:`.align._align_sort_kernel` writes them. ``PDL``: release the next kernel of the
    chain right away (it waits for this one to complete before it reads anything)."""
    if PDL:
        gdc_launch_dependents()
    rows = tl.arange(0, ROWS)
    top_i, top_w, key, kth = _route_rows(logits_ptr, stride_lm, bias_ptr, rows, M, E, scaling,
                                         TOP_K, TOP_K_P2, BLOCK_E, SCORING, HAS_BIAS,
                                         RENORMALIZE, BITONIC)
    kcols = tl.arange(0, TOP_K_P2)
    row_ok = rows < M
    out_mask = row_ok[:, None] & (kcols < TOP_K)[None, :]
    slot = rows[:, None] * TOP_K + kcols[None, :]
    tl.store(weights_ptr + slot, top_w, mask=out_mask)
    tl.store(ids_ptr + slot, top_i, mask=out_mask)
    # the alignment: chosen[t, e] = 1 where token t chose expert e
    cols = tl.arange(0, BLOCK_E)
    chosen = ((key >= kth[:, None]) & row_ok[:, None] & (cols < E)[None, :]).to(tl.int32)
    counts = tl.sum(chosen, axis=0)
    padded = (counts + block_size - 1) // block_size * block_size
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    # earlier tokens of the same expert: the slot's rank within its expert's run
    rank = tl.cumsum(chosen, axis=0) - chosen
    dest = tl.gather((ends - padded)[None, :] + rank, top_i, 1)  # [ROWS, TOP_K_P2]
    _fill_outputs(total_ptr, total, sorted_ids_ptr, num_sorted, M * TOP_K, expert_ids_ptr,
                  num_blocks, block_size, FILL_BLOCK)
    # the sentinel fill must land before this program's threads scatter over it
    tl.debug_barrier()
    tl.store(sorted_ids_ptr + dest, slot, mask=out_mask)
    starts_block = out_mask & (dest % block_size == 0)
    expert = top_i
    if HAS_MAP:
        expert = tl.load(expert_map_ptr + top_i, mask=starts_block, other=-1).to(tl.int32)
    tl.store(expert_ids_ptr + dest // block_size, expert, mask=starts_block)


def tile(num_tokens: int, num_experts: int) -> tuple[int, int]:
    """``(rows, warps)`` of the program for ``num_tokens`` tokens: the router's programs
    (:func:`.router.rows_per_program` rows on :func:`.router.warps_per_program` warps) side
    by side, as many as the tokens (rounded up to a power of two) take, so a row sits in its
    warps as in the router wherever Triton lays the wider tile out the same way (see the
    module's docstring)."""
    per_rows, per_warps = rows_per_program(num_experts), warps_per_program(num_experts)
    rows = max(triton.next_power_of_2(max(num_tokens, 1)), per_rows)
    return rows, rows // per_rows * per_warps


def supported(num_tokens: int, num_experts: int) -> bool:
    """Whether :func:`route_and_align` takes ``num_tokens`` tokens over ``num_experts``
    experts: at least one token, at most :data:`~.router.MAX_EXPERTS` experts, and
    :func:`tile` at most :data:`MAX_WARPS` warps. All tokens are routed on one SM's four
    schedulers, so beyond a warp a scheduler the program is issue-bound: the first version
    (one row a warp, up to 16 warps) made qwen3-30b's layer 0.9 / 3.7 / 8.3 / 19.4 us longer
    at M=8 / 16 / 32 / 64 (``results/h200_route_align_first_ab_session38_*``). H200, session
    38, per call in a chain of 64 (``benchmarks/chain_small_kernels.py``) against the router
    then the one-program alignment: qwen3-30b (E=128) M=1 / 2 / 4 2.93 / 2.86 / 3.11 us
    against 3.51 / 3.76 / 3.81; deepseek-v2-lite (E=64) 2.88 / 2.52 / 2.60 against 3.24 /
    3.32 / 3.40; Mixtral (E=8, four rows a warp) M=1-16 1.84-1.98 against 2.68-2.80. The
    layer (router included, ``results/h200_route_align_ab_session38_*``): qwen3-30b M=1 / 2 /
    3 / 4 -0.4 / -0.7 / -0.7 / -0.6 us, deepseek-v2-lite M=1 / 2 / 4 -0.5 / -1.0 / -0.7,
    olmoe M=2 / 4 -0.7 / -0.7, Mixtral M=1 / 2 -1.2 / -1.3 (M=4-16 under the power cap:
    even)."""
    return (1 <= num_tokens and 1 <= num_experts <= ROUTER_MAX_EXPERTS
            and tile(num_tokens, num_experts)[1] <= MAX_WARPS)


def route_and_align(
    router_logits: torch.Tensor,
    top_k: int,
    block_size: int,
    expert_map: torch.Tensor | None,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    *,
    renormalize: bool = True,
    scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route ``router_logits [M, E]`` and align the slots in one launch; returns
    ``(topk_weights float32 [M, top_k], topk_ids int32 [M, top_k])`` and fills the three
    alignment outputs in place (int32, contiguous, the shapes of
    :func:`w4a16moe.routing.align_block_size` for ``M * top_k`` slots over ``E`` experts).
    Arguments are validated by the caller (:func:`w4a16moe.routing.fused_topk_align`),
    except what the kernel needs. Like the router, the program releases its PDL dependent
    (the prefill chain's next kernel) as it starts. ``num_warps`` overrides :func:`tile`'s
    (benchmarks; the weights' last bits may then differ from the router's)."""
    m, e = router_logits.shape
    if not supported(m, e):
        raise ValueError(f"router_logits has shape {(m, e)}; one program routes and aligns as "
                         f"many tokens as {MAX_WARPS} warps of the router take (supported())")
    rows, warps = tile(m, e)
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    dev = logits.device
    weights = torch.empty(m, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(m, top_k, dtype=torch.int32, device=dev)
    bias = None
    if correction_bias is not None:
        bias = correction_bias.to(device=dev, dtype=torch.float32).contiguous()
    _route_align_kernel[(1,)](
        logits, logits.stride(0), bias if bias is not None else weights, weights, ids,
        expert_map if expert_map is not None else ids,
        sorted_token_ids, expert_ids, num_tokens_post_padded,
        m, e, float(routed_scaling_factor), block_size, sorted_token_ids.numel(),
        expert_ids.numel(),
        TOP_K=top_k, TOP_K_P2=triton.next_power_of_2(top_k),
        BLOCK_E=triton.next_power_of_2(e), ROWS=rows,
        SCORING=SCORING_CODES[scoring], HAS_BIAS=bias is not None,
        RENORMALIZE=bool(renormalize), HAS_MAP=expert_map is not None, FILL_BLOCK=1024,
        PDL=pdl_enabled(dev), BITONIC=HAVE_TOPK,
        num_warps=num_warps or warps,
    )
    return weights, ids


__all__ = ["MAX_WARPS", "route_and_align", "supported", "tile"]
