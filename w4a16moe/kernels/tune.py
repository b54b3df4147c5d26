"""Tuning the prefill kernel on the running GPU, and the ``w4a16moe tune`` command.

:func:`tune_prefill` times every candidate config of both GEMMs of each model shape (GEMM1
with the fused activation, GEMM2) at each token count, under CUDA graphs, and picks per M the
``BLOCK_SIZE_M`` (shared by both GEMMs: they walk the same sorted blocks) with the smallest
GEMM1 + GEMM2 time and, for it, the fastest config of each GEMM. An ``RS`` candidate (the
Gluon kernel) is timed four times: on gathered activations and on rows in sorted order
(``SORTED_ROWS``, GEMM1 with the gather of its input), each with and without
``PREFETCH_SCALES`` (see :func:`candidate_runs`); a GEMM2 ``RS`` or ``MMA`` candidate whose
tiles leave SMs idle at that M (few touched experts) also with ``SPLIT_K`` 2, 4 and 8
(:func:`split_k_candidates`); and an ``RS`` candidate whose last round of tiles the Gluon
kernel would cut by K steps at that M's routing also with ``STREAM_K``, each of the four
ways (:func:`stream_k_candidate`). The result is the JSON table read by
:mod:`w4a16moe.kernels.configs`; ``--boundaries`` then moves where its neighbouring M buckets
hand over (:mod:`w4a16moe.kernels.boundaries`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .boundaries import DEFAULT_POINTS, DEFAULT_SEEDS


@dataclass(frozen=True)
class ModelShape:
    """The MoE shape of one model: experts, top-k, hidden size H, expert intermediate size I,
    quantization group size G."""

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    group_size: int = 128


MODEL_SHAPES: dict[str, ModelShape] = {
    "qwen3-30b-a3b": ModelShape(128, 8, 2048, 768),
    "mixtral-8x7b": ModelShape(8, 2, 4096, 14336),
    "deepseek-v2-lite": ModelShape(64, 6, 2048, 1408),
    "qwen3-235b-a22b": ModelShape(128, 8, 4096, 1536),
    "olmoe-1b-7b": ModelShape(64, 8, 2048, 1024),
}

#: token counts ``w4a16moe tune`` tunes by default: one table bucket each. A config is looked up
#: at the nearest bucket, and the best tiles change within a factor of two of M (on the H100,
#: session 22: a qwen3-30b bucket 512 made M=640 22-25 % faster than bucket 256's entries, and
#: Mixtral buckets 128 and 224 up to 32 % at M = 100-240), so the grid doubles from 4 to 4096
#: (about 1-4 minutes a token count and model on an H100)
DEFAULT_TOKENS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

#: candidate spaces, each a list of (SWAP_AB, BLOCK_SIZE_N, BLOCK_SIZE_K, num_warps, num_stages[,
#: FRAG_K[, RS[, PAIRED_STAGES[, MMA[, WORD_RING[, SCALE_ACC[, SUB_STEPS]]]]]]]) tried at every
#: BLOCK_SIZE_M (SCALE_ACC candidates only up to ``configs.SCALE_ACC_MAX_BLOCK_M``): "default" for
#: users, "quick" (the configs that won the H100 sweeps in benchmarks/notes_prefill.md) for short
#: device sessions, "midm" (the winners of the few-rows-per-expert sweeps, session 4 of the notes,
#: with and without fragment-order weight tiles; the 64-column fragment-order tile with four stages
#: that won qwen3-30b's GEMM2 at M = 16-64 in session 20) for M buckets of 1-16 rows per expert,
#: "rs" (the register-operand Gluon kernel on Hopper against the Triton tiles that won before,
#: session 7 of the notes; four consumer warpgroups on 256-row tiles since session 9; the 128-row
#: tiles that won with 256 tokens in session 10; GEMM1's 256-row tiles with BLOCK_SIZE_K 32, whose
#: 128-token version ptxas does not serialize, session 11) for large experts at M >= 1024, "rsmidm"
#: (the "midm" space plus the Gluon kernel with 16/32-token tiles, session 8; a 6-stage 128x128 tile
#: since its words come by TMA, session 9; the BLOCK_SIZE_K 128 tiles with two K steps a stage, four
#: such stages, session 19) for M = 16-256, "mma" (the ``mma.sync`` kernel of ``prefill_mma.py``, a
#: trailing MMA flag: 8-32-slot blocks, one to four groups a K step; the entries that won
#: qwen3-30b's and Mixtral's few-slots-an-expert buckets in sessions 25 and 26, down to one warp of
#: 16 weight rows; 128 rows on one-group steps for a K of an odd group count, such as
#: deepseek-v2-lite's GEMM2, K = 1408, session 27; one-warp tiles with the words' ring at any step
#: count, which won Mixtral's GEMM2 at 2-4 tokens on the H200, session 41), which "rsmidm" also
#: takes, with the paired Gluon tiles on SCALE_ACC, on eight or sixteen warps (session 45: on the
#: H200, sixteen warps with it made the 16-slot layers 4-10 % faster, either alone slower), and on
#: sixteen warps with SUB_STEPS 2 (session 46: the 32-slot tiles fit 96 registers that way;
#: Mixtral M=48-96 2-4 % faster on the H200)
SPACES: dict[str, list[tuple]] = {
    "default": list(itertools.product((True, False), (64, 128, 256), (64, 128), (4, 8),
                                      (3, 4))),
    "quick": [(True, 64, 64, 4, 4), (True, 128, 64, 8, 4), (False, 128, 64, 8, 3),
              (True, 64, 64, 8, 4), (False, 64, 64, 4, 4)],
    "midm": [(True, 64, 64, 4, 3), (True, 64, 128, 4, 3), (True, 128, 64, 4, 3),
             (True, 64, 64, 4, 4), (True, 64, 64, 4, 3, True), (True, 64, 128, 4, 3, True),
             (True, 128, 64, 4, 3, True), (True, 64, 64, 4, 4, True), (False, 128, 64, 8, 3)],
    "rs": [(True, 128, 64, 8, 6, False, True), (True, 128, 64, 8, 8, False, True),
           (True, 256, 32, 8, 8, False, True), (True, 256, 32, 8, 12, False, True),
           (True, 64, 64, 8, 6, False, True), (True, 128, 64, 16, 6, False, True),
           (True, 128, 64, 16, 4, False, True), (True, 256, 64, 16, 6, False, True),
           (True, 64, 64, 4, 4, True),
           (True, 128, 64, 8, 4), (False, 128, 64, 8, 3),
           (True, 64, 64, 8, 4, False, True), (True, 128, 64, 8, 5, False, True),
           (True, 128, 32, 8, 8, False, True)],
}
SPACES["mma"] = [(True, bn, bk, warps, 1, False, False, False, True)
                 for bn, bk, warps in ((64, 256, 4), (128, 256, 4), (32, 256, 4), (64, 512, 4),
                                       (64, 128, 4), (128, 128, 4), (32, 256, 2), (16, 256, 1),
                                       (8, 256, 1))] + [
    # one-warp tiles with the words' ring at any step count (WORD_RING): Mixtral's GEMM2 at 2-4
    # tokens (session 41)
    (True, 16, 512, 1, 1, False, False, False, True, 2),
    (True, 16, 256, 1, 1, False, False, False, True, 3)]
SPACES["rsmidm"] = SPACES["mma"] + SPACES["midm"] + [
    (True, 128, 128, 8, 4, False, True), (True, 128, 128, 8, 6, False, True),
    (True, 128, 64, 8, 6, False, True),
    (True, 256, 128, 8, 4, False, True), (True, 256, 64, 8, 6, False, True),
    (True, 64, 128, 8, 6, False, True),
    (True, 128, 128, 8, 4, False, True, True), (True, 256, 128, 8, 4, False, True, True),
    (True, 128, 128, 8, 4, False, True, True, False, None, True),
    (True, 256, 128, 8, 4, False, True, True, False, None, True),
    (True, 128, 128, 16, 4, False, True, True, False, None, True),
    (True, 256, 128, 16, 4, False, True, True, False, None, True),
    (True, 128, 128, 16, 4, False, True, True, False, None, True, 2),
    (True, 256, 128, 16, 4, False, True, True, False, None, True, 2)]
#: "auto" (the default of ``w4a16moe tune``): per M, the space that won such buckets on the
#: H100 (benchmarks/notes_prefill.md, session 9): on a Hopper GPU with Gluon "rsmidm" up to
#: this many tokens and "rs" above; on any other GPU "default" (the broadest Triton space)
AUTO_SPLIT_TOKENS = 256
#: skip candidates whose fp32 accumulators alone would need more registers per thread
MAX_ACC_REGS = 128


#: the mma kernel's 8-slot blocks are tried up to this many slots an expert on average. On the
#: H100 in session 26 they beat the table's 16-slot tiles up to about 5 (qwen3-30b M=80 4 %
#: faster, M=96 1 % slower; Mixtral M=18 5 % faster, M=20 5 % slower); after the kernel's
#: word ring and the per-block wait (sessions 30-35), on the H200, up to about 8: olmoe M=64
#: (8 slots an expert) -5 %, M=68 (8.5) +1 to +3 %; deepseek-v2-lite M=88 (8.25) -5 %;
#: qwen3-30b M=96-120 (6-7.5) -6 to -16 % (benchmarks/notes_prefill.md, session 35; the
#: table ships them there)
MMA_SMALL_BLOCK_ROWS = 8.0


#: GROUP_SIZE_M values timed where experts get more than 64 slots each (at most 64: 1 only).
#: Blocks side by side per column tile (8) share an expert's weights through L2 when it has
#: several blocks, but where an expert has about one block they read the same column tile of
#: eight experts at once. On the H200 (session 48) the H100's picks of 8 were slower than 1 at
#: 64-2048 slots an expert: Mixtral's layer at M=256-8192 mostly by 1-6 % (up to 24 % under a
#: skewed routing), deepseek-v2-lite and olmoe by 1-7 %; qwen3-235b-a22b's came out even.
LARGE_M_GROUP_SIZES = (1, 8)


def block_m_candidates(rows_per_expert: float, count: int = 2, space: str = "default"
                       ) -> tuple[int, ...]:
    """The ``count`` largest BLOCK_SIZE_M values worth trying when each expert gets
    ``rows_per_expert`` slots (at most twice that, at least 16), and 8 before them when
    ``space`` has ``MMA`` candidates and the experts get at most
    :data:`MMA_SMALL_BLOCK_ROWS` slots."""
    cands = [bm for bm in (16, 32, 64, 128, 256) if bm <= max(16, 2 * rows_per_expert)]
    out = tuple(cands[-count:])
    has_mma = any(len(entry) > 8 and entry[8] for entry in SPACES.get(space, ()))
    if has_mma and rows_per_expert <= MMA_SMALL_BLOCK_ROWS:
        out = (8, *out)
    return out


def candidate_configs(block_m: int, rows_per_expert: float, space: str = "default",
                      fused_activation: bool = False) -> list[dict]:
    """Configs of ``space`` at ``block_m`` whose accumulators fit :data:`MAX_ACC_REGS`
    (GEMM1 with the fused activation holds two); ``RS`` and ``MMA`` candidates only with tiles
    their kernel is built for (else they would time the Triton fallback under their name).
    Blocks of fewer than 16 slots take only ``MMA`` candidates (the other kernels' tiles were
    never tuned below 16). ``GROUP_SIZE_M`` is 1, and where experts get more than 64 slots
    each every tile but the mma kernel's (always 1) comes once for each of
    :data:`LARGE_M_GROUP_SIZES`."""
    from .configs import SCALE_ACC_MAX_BLOCK_M
    from .prefill_mma import mma_tiles_unsupported
    from .prefill_rs import rs_tiles_unsupported

    if space not in SPACES:
        raise ValueError(f"space is {space!r}; expected one of {sorted(SPACES)}")
    out = []
    for swap, bn, bk, warps, stages, *flags in SPACES[space]:
        acc_regs = block_m * bn * (2 if fused_activation else 1) / (32 * warps)
        if acc_regs > MAX_ACC_REGS:
            continue
        cfg = {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk,
               "GROUP_SIZE_M": 1, "num_warps": warps, "num_stages": stages, "SWAP_AB": swap}
        if flags and flags[0]:
            cfg["FRAG_K"] = True
        if len(flags) > 3 and flags[3]:
            cfg["MMA"] = True
            if len(flags) > 4 and flags[4] is not None:
                cfg["WORD_RING"] = flags[4]
            if mma_tiles_unsupported(cfg, activation=fused_activation) is not None:
                continue
        elif block_m < 16:
            continue
        if len(flags) > 1 and flags[1]:
            if rs_tiles_unsupported(cfg, fused_activation) is not None:
                continue
            cfg["RS"] = True
            if len(flags) > 2 and flags[2]:
                cfg["PAIRED_STAGES"] = True
            if len(flags) > 5 and flags[5]:
                if block_m > SCALE_ACC_MAX_BLOCK_M:
                    continue
                cfg["SCALE_ACC"] = True
                if len(flags) > 6 and flags[6] > 1:
                    cfg["SUB_STEPS"] = flags[6]
        if rows_per_expert > 64 and not cfg.get("MMA"):
            out.extend({**cfg, "GROUP_SIZE_M": group} for group in LARGE_M_GROUP_SIZES)
        else:
            out.append(cfg)
    return out


def _gluon_hopper() -> bool:
    """Whether the register-operand Gluon kernel can run on this GPU."""
    import torch

    from .prefill_rs import gluon_unsupported

    return (torch.cuda.is_available()
            and gluon_unsupported(torch.device("cuda", torch.cuda.current_device())) is None)


def resolve_space(space: str, m: int) -> str:
    """The candidate space to search at ``m`` tokens: ``space`` itself, or for ``"auto"``
    the one :data:`AUTO_SPLIT_TOKENS` and the GPU select."""
    if space == "auto":
        if _gluon_hopper():
            return "rsmidm" if m <= AUTO_SPLIT_TOKENS else "rs"
        return "default"
    if space not in SPACES:
        raise ValueError(f"space is {space!r}; expected 'auto' or one of {sorted(SPACES)}")
    return space


def rs_skip_reason(config: dict, a, weights, out, *, activation: bool,
                   a_fragment_order: bool = False) -> str | None:
    """Why an ``RS`` or ``MMA`` candidate would not run on its Gluon kernel for the
    ``prefill_gemm`` call on ``a``, ``weights`` (packed) and ``out`` (GEMM1 with the fused
    activation or not), so that timing it would time the Triton fallback: the reason, or
    None (also for configs of neither)."""
    if config.get("MMA"):
        from .prefill_mma import mma_unsupported

        return mma_unsupported(
            device=a.device, k=weights.k, n_out=weights.n // 2 if activation else weights.n,
            group_size=weights.group_size, config=config, has_perm=weights.perm is not None,
            a_fragment_order=a_fragment_order, atomic_topk_sum=False, activation=activation,
            a=a, qweight=weights.qweight)
    if not config.get("RS"):
        return None
    from .prefill_rs import rs_unsupported

    return rs_unsupported(
        device=a.device, k=weights.k, n_out=weights.n // 2 if activation else weights.n,
        group_size=weights.group_size, config=config, has_perm=weights.perm is not None,
        a_fragment_order=a_fragment_order, atomic_topk_sum=False, activation=activation,
        a=a, out=out, qweight=weights.qweight)


#: SPLIT_K values the tuner tries for a GEMM2 candidate of the Gluon kernel whose tiles at
#: the M being tuned are fewer than the GPU's SMs (:func:`split_k_candidates`)
SPLIT_K_CANDIDATES = (2, 4, 8)


#: warps an SM that the mma kernel's split tiles keep resident (128 registers a thread: 16
#: warps of 32 threads fill 64K registers); an MMA GEMM2 candidate whose tiles' warps are fewer
#: than this many an SM is also timed split (:func:`split_k_candidates`)
MMA_SPLIT_WARPS_AN_SM = 16


def split_k_candidates(valid_blocks: int, n: int, block_n: int, num_sms: int, *,
                       mma_warps: int | None = None) -> tuple[int, ...]:
    """The SPLIT_K values worth timing for a GEMM2 tile of ``block_n`` of ``n`` output
    columns when the routing fills ``valid_blocks`` aligned blocks: all of
    :data:`SPLIT_K_CANDIDATES` when the tiles (blocks x column tiles) leave SMs idle, none
    otherwise (H100, benchmarks/notes_prefill.md, session 13: splitting only paid below 132
    tiles). For the mma kernel's tiles of ``mma_warps`` warps, whose small programs share an
    SM: when their warps are fewer than one wave of :data:`MMA_SPLIT_WARPS_AN_SM` an SM (on the
    H200, Mixtral's GEMM2 at 1-4 tokens: 256-896 two-warp tiles, split in 4 up to 28 % faster a
    layer; benchmarks/notes_prefill.md, session 43)."""
    tiles = valid_blocks * -(-n // block_n)
    if mma_warps is not None:
        return (SPLIT_K_CANDIDATES if tiles * mma_warps < MMA_SPLIT_WARPS_AN_SM * num_sms
                else ())
    return SPLIT_K_CANDIDATES if tiles < num_sms else ()


def config_label(config: dict) -> str:
    """A config in one short line: ``BMxBNxBK w<warps> s<stages>``, then its kernel flags
    (``RS``, ``paired``, ``scale-acc``, ``FRAG_K``, ``SWAP_AB``), ``SUB_STEPS`` when above 1,
    ``WORD_RING``, ``SHORT_BLOCK_T`` and ``QUARTER_BLOCKS`` when set and ``GROUP_SIZE_M`` when
    not 1."""
    label = (f"{config['BLOCK_SIZE_M']}x{config['BLOCK_SIZE_N']}x{config['BLOCK_SIZE_K']} "
             f"w{config['num_warps']} s{config['num_stages']}")
    flags = [name for key, name in (("MMA", "MMA"), ("RS", "RS"), ("PAIRED_STAGES", "paired"),
                                    ("SCALE_ACC", "scale-acc"), ("FRAG_K", "FRAG_K"),
                                    ("SWAP_AB", "SWAP_AB"))
             if config.get(key)]
    if config.get("SUB_STEPS", 1) > 1:
        flags.append(f"SUB_STEPS={config['SUB_STEPS']}")
    if "WORD_RING" in config:
        flags.append(f"WORD_RING={config['WORD_RING']}")
    if "SHORT_BLOCK_T" in config:
        flags.append(f"SHORT_BLOCK_T={config['SHORT_BLOCK_T']}")
    if config.get("QUARTER_BLOCKS"):
        flags.append("QUARTER_BLOCKS")
    if config.get("GROUP_SIZE_M", 1) != 1:
        flags.append(f"GROUP_SIZE_M={config['GROUP_SIZE_M']}")
    return " ".join([label, *flags])


def stream_k_candidate_config(config: dict) -> bool:
    """Whether ``config`` can take ``STREAM_K``: an ``RS`` config (the Gluon kernel) whose
    other keys allow it (:func:`~w4a16moe.kernels.configs.stream_k_conflict`)."""
    from .configs import stream_k_conflict

    return bool(config.get("RS")) and stream_k_conflict(config) is None


def stream_k_candidate(config: dict, *, valid_blocks: int, em: int, n_out: int, k: int,
                       num_sms: int) -> bool:
    """Whether to time ``config`` also with ``STREAM_K``: an ``RS`` config with GROUP_SIZE_M
    1 and no ``SPLIT_K`` whose launch over ``valid_blocks`` aligned blocks (``em`` padded
    slots; ``n_out`` output columns, ``k`` the reduction) would cut its last round of tiles
    by K steps. Where the kernel's rule (:func:`~w4a16moe.kernels.prefill_rs.stream_k_cut_units`)
    cuts nothing, the flag runs the same tiles whole, and timing it again would only measure
    noise."""
    from .prefill_rs import stream_k_cut_units, stream_k_sizes

    if not stream_k_candidate_config(config):
        return False

    programs, _, _ = stream_k_sizes(config, em=em, n_out=n_out, k=k, activation=False,
                                    sms=num_sms)
    units = valid_blocks * (n_out // config["BLOCK_SIZE_N"])
    return stream_k_cut_units(units, k // config["BLOCK_SIZE_K"], programs) > 0


def prefetch_variants(config: dict) -> int:
    """How many ways :func:`candidate_runs` times ``config`` for its scale loads: an ``RS``
    config with and without ``PREFETCH_SCALES`` (2), except one with ``SCALE_ACC``, whose
    kernel loads a step pair's scales at its start either way (1); any other config once."""
    return 2 if config.get("RS") and not config.get("SCALE_ACC") else 1


def timed_runs(config: dict, *, splits: Iterable[int] = (), stream_k: bool = False) -> int:
    """How many runs :func:`candidate_runs` makes of ``config`` (the tuner's progress total):
    an ``RS`` candidate gathered and on sorted rows, each in :func:`prefetch_variants` ways,
    as many again with ``stream_k``, and its scale-load variants once more per ``SPLIT_K``
    value; an ``MMA`` candidate twice, gathered and on sorted rows, and once more per
    ``SPLIT_K`` value; any other once."""
    if not (config.get("RS") or config.get("MMA")):
        return 1
    ways = prefetch_variants(config)
    return 2 * ways * (2 if stream_k else 1) + ways * len(tuple(splits))


def candidate_runs(gemm: str, config: dict, *, experts, x, inter, out, blocks, topk_ids,
                   topk_weights, top_k: int, x_sorted=None, inter_sorted=None,
                   splits: Iterable[int] = (), stream_k: bool = False
                   ) -> list[tuple[dict, Callable[[], object]]]:
    """The ``(config, fn)`` pairs the tuner times for one candidate of GEMM ``gemm``
    (``"w13"``: GEMM1 with the fused SiLU on ``x`` into ``out``; ``"w2"``: GEMM2 on ``inter``
    by slot, router weight applied, into ``out``), as :func:`fused_moe_prefill` would run
    it: activations in fragment order for ``FRAG_K`` tiles. An ``RS`` config is also timed
    with ``PREFETCH_SCALES`` (not one with ``SCALE_ACC``, which ignores it), and when
    ``x_sorted``/``inter_sorted`` (``[EM, H]``/``[EM, I]``
    buffers for the blocks' positions) are given, each of those (and an ``MMA`` config) also
    with ``SORTED_ROWS``:
    GEMM1 timed with the gather of its input
    (:func:`~w4a16moe.kernels.prefill.gather_sorted_rows`) and writing sorted rows, GEMM2
    reading ``inter_sorted``. For GEMM2, each ``S`` of ``splits`` adds the RS config (with
    and without ``PREFETCH_SCALES``) or the MMA config with ``SPLIT_K`` S, timed with the
    top-k sum that adds its float32 partials
    (:func:`~w4a16moe.kernels.prefill.topk_sum`, whose ``[M, H]``
    result the run returns; the unsplit runs' top-k sum is not timed, so the split pays for
    its extra reduction). With ``stream_k``, every run but the split ones is also timed with
    ``STREAM_K`` (see :func:`stream_k_candidate`)."""
    import torch

    from .prefill import (
        _fragment_tiles,
        fragment_order_columns,
        gather_sorted_rows,
        prefill_gemm,
        topk_sum,
    )

    if gemm not in ("w13", "w2"):
        raise ValueError(f"gemm is {gemm!r}; expected 'w13' or 'w2'")
    splits = tuple(int(v) for v in splits)
    if splits and (gemm != "w2" or not (config.get("RS") or config.get("MMA"))):
        raise ValueError(f"splits={splits} for {gemm!r} with RS={config.get('RS')} and "
                         f"MMA={config.get('MMA')}; SPLIT_K applies to GEMM2 ('w2') "
                         "candidates of the Gluon kernels (RS or MMA) only")
    if stream_k and not stream_k_candidate_config(config):
        raise ValueError(f"stream_k for a config with RS={config.get('RS')}, GROUP_SIZE_M "
                         f"{config.get('GROUP_SIZE_M')}, SPLIT_K {config.get('SPLIT_K', 1)}; "
                         "STREAM_K needs the Gluon kernel (RS), GROUP_SIZE_M 1 and no SPLIT_K")
    frag = _fragment_tiles(config)
    variants = [config]
    if prefetch_variants(config) == 2:
        variants.append({**config, "PREFETCH_SCALES": True})
    split_variants = list(variants)
    if stream_k:
        variants += [{**cfg, "STREAM_K": True} for cfg in split_variants]
    runs = []
    for cfg in variants:
        common = dict(blocks=blocks, topk_ids=topk_ids, topk_weights=topk_weights,
                      top_k=top_k, config=cfg)
        if gemm == "w13":
            a = fragment_order_columns(x) if frag else x
            runs.append((cfg, functools.partial(prefill_gemm, a, experts.w13,
                                                activation="silu", out=out,
                                                a_fragment_order=frag, **common)))
        else:
            a = fragment_order_columns(inter) if frag else inter
            runs.append((cfg, functools.partial(prefill_gemm, a, experts.w2, a_is_slots=True,
                                                mul_routed_weight=True, out=out,
                                                a_fragment_order=frag, **common)))
        if not (cfg.get("RS") or cfg.get("MMA")) or x_sorted is None or inter_sorted is None:
            continue
        if gemm == "w13":
            def run_sorted(common=common):
                gather_sorted_rows(x, blocks, top_k=top_k, out=x_sorted)
                prefill_gemm(x_sorted, experts.w13, activation="silu", out=inter_sorted,
                             a_sorted=True, out_sorted=True, **common)
        else:
            def run_sorted(common=common):
                prefill_gemm(inter_sorted, experts.w2, a_is_slots=True,
                             mul_routed_weight=True, out=out, a_sorted=True, **common)
        runs.append(({**cfg, "SORTED_ROWS": True}, run_sorted))
    m = topk_ids.shape[0]
    for cfg in split_variants if splits else ():
        for split in splits:
            parts = torch.empty(split, *out.shape, dtype=torch.float32, device=out.device)
            total = torch.empty(m, out.shape[1], dtype=out.dtype, device=out.device)
            scfg = {**cfg, "SPLIT_K": split}

            def run_split(scfg=scfg, parts=parts, total=total):
                prefill_gemm(inter, experts.w2, blocks, topk_ids, topk_weights, top_k=top_k,
                             a_is_slots=True, mul_routed_weight=True, out=parts, config=scfg)
                return topk_sum(parts, top_k, total)
            runs.append((scfg, run_split))
    return runs


def random_packed_weights(num_experts: int, n: int, k: int, group_size: int, dtype, device,
                          generator=None):
    """Random :class:`PackedWeights` made directly on ``device`` (any int32 word is a valid
    packing of 8 codes), scales ~ 1/(4 sqrt(K))."""
    import torch

    from ..layout import PackedWeights

    qweight = torch.randint(-2**31, 2**31 - 1, (num_experts, n, k // 8), dtype=torch.int32,
                            device=device, generator=generator)
    scales = (torch.rand(num_experts, n, k // group_size, device=device, generator=generator)
              * 0.5 + 0.75) / (4 * math.sqrt(k))
    return PackedWeights(qweight=qweight, scales=scales.to(dtype), group_size=group_size)


def random_packed_experts(shape: ModelShape, dtype, device, seed: int = 0):
    """Random :class:`PackedExperts` of ``shape`` on ``device`` (fast for large models)."""
    import torch

    from ..layout import PackedExperts

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    e, h, i, g = shape.num_experts, shape.hidden_size, shape.intermediate_size, shape.group_size
    return PackedExperts(w13=random_packed_weights(e, 2 * i, h, g, dtype, device, gen),
                         w2=random_packed_weights(e, h, i, g, dtype, device, gen),
                         num_experts=e, hidden_size=h, intermediate_size=i, dtype=dtype)


def time_cuda_graph(fn: Callable[[], object], rep_ms: float = 20.0) -> float:
    """Median time of ``fn`` in microseconds, replayed in a CUDA graph."""
    import triton.testing

    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def check_skew(skew: object, name: str = "skew") -> float:
    """``skew`` as a float, or ValueError naming ``name`` unless it is a finite number >= 0."""
    if isinstance(skew, bool) or not isinstance(skew, (int, float)) or not (
            math.isfinite(skew) and skew >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; found {skew!r}")
    return float(skew)


def random_logits(m: int, num_experts: int, gen, skew: float = 0.0):
    """``[m, num_experts]`` float32 router logits from ``gen`` (a ``torch.Generator`` on the
    device): standard normal per token and expert, plus with ``skew`` > 0 one per-expert bias
    of standard deviation ``skew`` that every token shares (drawn after the logits, so
    ``skew`` 0 draws what it always drew)."""
    import torch

    logits = torch.randn(m, num_experts, device=gen.device, generator=gen)
    if skew:
        logits += skew * torch.randn(num_experts, device=gen.device, generator=gen)
    return logits


def random_routing(m: int, shape: ModelShape, device, seed: int = 0, skew: float = 0.0):
    """Softmax top-k routing of ``m`` tokens over random logits: (weights, ids).

    ``skew`` > 0 makes some experts popular, as trained routers do on real text: every
    token's logits get the same per-expert bias, drawn once per ``seed`` from a normal of
    standard deviation ``skew`` (the tokens' own logits have 1). ``skew`` 0 draws the same
    logits as without the bias. Mixtral's busiest expert (:func:`routing_load`) at 32-128
    tokens holds 1.25-1.5x the mean load with ``skew`` 0, about 2.1x with 0.5 and 2.7-2.9x
    with 1 (means over 40 seeds)."""
    import torch

    from ..routing import fused_topk

    skew = check_skew(skew)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return fused_topk(random_logits(m, shape.num_experts, gen, skew), shape.top_k)


def routing_load(topk_ids, num_experts: int, block_size: int | None = None) -> dict:
    """How a routing loads its experts: ``busiest`` (slots of the most loaded expert),
    ``mean`` (slots per expert that has any), ``experts`` (experts with any slot) and, given
    ``block_size``, ``blocks`` (the aligned blocks of that many slots the prefill kernels run:
    each expert's slots rounded up)."""
    import torch

    counts = torch.bincount(topk_ids.flatten().long(), minlength=num_experts)
    used = counts[counts > 0]
    load = {"busiest": int(counts.max()), "experts": int(used.numel()),
            "mean": round(float(used.float().mean()), 2) if used.numel() else 0.0}
    if block_size is not None:
        load["blocks"] = int(((used + block_size - 1) // block_size).sum())
    return load


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` (indent 1, trailing newline) through a temporary file and
    a rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


#: the fastest GEMM1 and GEMM2 candidates, each timed alone, whose pairs (of one block size)
#: :func:`tune_prefill` then times as the whole prefill layer, with the entries the layer runs
#: today: GEMMs timed alone miss what the layer adds (the PDL chain, GEMM2 waiting for its
#: blocks' GEMM1 tiles, a persistent GEMM1 grid). On the H200 (session 36) the per-GEMM picks
#: for qwen3-30b's GEMM1 at M=8-64 (8-32 output columns on one, two or four warps, 0.2-3 %
#: faster alone than the shipped 64 on four) made the layer 1-13 % slower at M=4-64; with the
#: layer check the tuner kept the shipped tiles, there and for deepseek-v2-lite M=16-64
#: (benchmarks/notes_prefill.md)
LAYER_FINALISTS = (3, 2)
#: routings (seeds 0, 1, ...) each finalist pair's layer time is the mean of
LAYER_ROUTINGS = 2

#: the layer check also times each finalist pair with ``SHORT_BLOCK_T`` (half the block) on its
#: ``RS`` configs of at least this many slots a block (:func:`short_block_pair`): whether the
#: short blocks pay depends on the routing and the tile, so the layer over several routings
#: decides. On the H200 they made Mixtral's layer 3-20 % faster at M=48-300 (session 49) and,
#: once the short loop stopped making ptxas serialize some kernels' wgmmas (session 50), the
#: other models' layers 1-9 % faster at 128-2048 tokens; where few blocks are short (uniform
#: routings at some M) up to 4 % slower (benchmarks/notes_prefill.md)
SHORT_BLOCK_MIN_M = 32
#: ... and each short pair of ``RS`` configs of at least this many slots a block again with
#: ``QUARTER_BLOCKS`` (:func:`quarter_block_pair`: blocks that fit a quarter or three quarters of
#: the tile on wgmmas of that width). On the H200 it made Mixtral's layer up to 17 % faster at
#: M=256-600 (its 128- and 256-slot tiles; -4.4 / -1.9 / -10.1 % on average at 256 / 400 / 600)
#: and olmoe's and qwen3-235b's up to 3 % at 560-1280 tokens;
#: on 32- and 64-slot tiles it was up to 5 % slower, not MMA-bound enough for what the two more K
#: loops cost (benchmarks/notes_prefill.md, session 51)
QUARTER_BLOCK_MIN_M = 128

#: ``measure(model, m, seed, (gemm1 config, gemm2 config)) -> us``: the prefill layer's time
LayerMeasure = Callable[[str, int, int, tuple[dict, dict]], float]


def short_block_pair(pair: tuple[dict, dict]) -> tuple[dict, dict] | None:
    """``pair`` with ``SHORT_BLOCK_T`` half the block on each of its ``RS`` configs of
    :data:`SHORT_BLOCK_MIN_M` slots a block or more that lacks it, or None where none
    takes it."""
    out = tuple({**c, "SHORT_BLOCK_T": c["BLOCK_SIZE_M"] // 2}
                if c.get("RS") and c["BLOCK_SIZE_M"] >= SHORT_BLOCK_MIN_M
                and "SHORT_BLOCK_T" not in c else c for c in pair)
    return None if out == tuple(pair) else out


def quarter_block_pair(pair: tuple[dict, dict]) -> tuple[dict, dict] | None:
    """``pair`` with ``QUARTER_BLOCKS`` on each of its ``RS`` configs of
    :data:`QUARTER_BLOCK_MIN_M` slots a block or more whose ``SHORT_BLOCK_T`` is half the
    block and that lacks it, or None where none takes it."""
    out = tuple({**c, "QUARTER_BLOCKS": True}
                if c.get("RS") and c["BLOCK_SIZE_M"] >= QUARTER_BLOCK_MIN_M
                and c.get("SHORT_BLOCK_T", 0) * 2 == c["BLOCK_SIZE_M"]
                and not c.get("QUARTER_BLOCKS") else c for c in pair)
    return None if out == tuple(pair) else out


def layer_finalists(ranked: dict[int, tuple[list, list]], current: tuple[dict, dict] | None,
                    counts: tuple[int, int] = LAYER_FINALISTS) -> list[tuple[dict, dict]]:
    """The config pairs to time as the whole layer: for each block size ``bm`` of ``ranked``
    (``{bm: (GEMM1 [(us, config), ...], GEMM2 [...])}``, timed alone) every pair of its
    ``counts[0]`` fastest GEMM1 and ``counts[1]`` fastest GEMM2 configs (finite times
    only), the pair of the fastest GEMMs first, each followed by its
    :func:`short_block_pair` where it has one and that pair's :func:`quarter_block_pair`
    where that has one; then ``current`` (the entries the layer runs now) unless it is one of
    them. No pair twice."""
    candidates: list[tuple[dict, dict]] = []
    for bm in sorted(ranked, key=lambda b: _fastest(ranked[b][0]) + _fastest(ranked[b][1])):
        g1 = [c for t, c in sorted(ranked[bm][0], key=lambda r: r[0]) if math.isfinite(t)]
        g2 = [c for t, c in sorted(ranked[bm][1], key=lambda r: r[0]) if math.isfinite(t)]
        for pair in ((c1, c2) for c1 in g1[:counts[0]] for c2 in g2[:counts[1]]):
            candidates.append(pair)
            if (short := short_block_pair(pair)) is not None:
                candidates.append(short)
                if (quarter := quarter_block_pair(short)) is not None:
                    candidates.append(quarter)
    if current is not None:
        candidates.append(tuple(current))
    pairs, seen = [], []
    for pair in candidates:
        key = _launch_key(pair)
        if key not in seen:
            pairs.append(pair)
            seen.append(key)
    return pairs


def _launch_key(pair) -> tuple[dict, ...]:
    """A pair of configs as the kernels launch them: ``SWAP_AB`` is dropped from ``MMA``
    entries (the mma kernel always puts the weights on the M side; the tuner's candidates
    carry it, the shipped entries do not)."""
    return tuple({k: v for k, v in c.items() if not (c.get("MMA") and k == "SWAP_AB")}
                 for c in pair)


def _fastest(timed: list) -> float:
    return min((t for t, _ in timed), default=math.inf)


def pick_layer_pair(model: str, m: int, pairs: list[tuple[dict, dict]],
                    measure: LayerMeasure, routings: int = LAYER_ROUTINGS,
                    on_pair: Callable[[tuple[dict, dict], float], None] | None = None
                    ) -> tuple[tuple[dict, dict], float]:
    """The pair of ``pairs`` whose prefill layer is fastest (``measure``, the mean over
    ``routings`` routings; the first of equal times) and that time. A pair whose layer
    fails (out of resources, a compile error) counts as infinitely slow; ``ValueError`` if
    every pair does."""
    if not pairs:
        raise ValueError(f"{model} M={m}: no config pair to time as the layer")
    best, best_us = None, math.inf
    for pair in pairs:
        try:
            us = sum(measure(model, m, seed, pair) for seed in range(routings)) / routings
        except Exception:  # noqa: BLE001 (out of resources, compile failure: not a winner)
            us = math.inf
        if on_pair is not None:
            on_pair(pair, us)
        if us < best_us:
            best, best_us = pair, us
    if best is None:
        raise ValueError(f"{model} M={m}: the prefill layer failed on every config pair")
    return best, best_us


def tune_prefill(
    models: Iterable[str] | dict[str, ModelShape],
    tokens: Iterable[int] = DEFAULT_TOKENS,
    *,
    dtype=None,
    space: str = "auto",
    out: str | os.PathLike | None = None,
    rep_ms: float = 20.0,
    on_step: Callable[[int, int, str], None] | None = None,
    layer_check: bool = True,
    skew: float = 0.0,
) -> dict:
    """Search prefill configs on the current GPU.

    Each GEMM's candidates are timed alone; then, with ``layer_check``, the pairs of the
    fastest of each (:func:`layer_finalists`) and the entries the layer runs now are timed
    as the whole prefill layer and the fastest pair is kept (:func:`pick_layer_pair`).

    Args:
        models: names from :data:`MODEL_SHAPES`, or ``{name: ModelShape}``.
        tokens: token counts M to tune (the JSON's M buckets).
        dtype: activation dtype (default bfloat16).
        space: candidate space name in :data:`SPACES`, or ``"auto"`` (per M, see
            :func:`resolve_space`).
        out: JSON file to write; an existing valid file there is merged into (its other
            entries kept).
        rep_ms: timing budget per candidate.
        on_step: ``on_step(done, total, description)`` after each timed candidate and
            each layer timing.
        layer_check: pick each bucket's pair by the layer's time (default), or by the sum
            of the two GEMMs' own times (``False``: faster, and blind to what the layer adds).
        skew: routing skew of every timed routing (:func:`random_routing`; 0: uniform).
            Recorded in the table's ``_meta`` as ``routing_skew`` when not 0.

    Returns:
        The table ``{"_meta": ..., "N,K": {"M": config}}`` (also written to ``out``).
    """
    import torch
    import triton

    from ..routing import align_block_size
    from .configs import GPU_META_KEY, get_prefill_config, gpu_traits, parse_table
    from .prefill import _fragment_tiles
    from .prefill_rs import sorted_rows_unsupported

    if not torch.cuda.is_available():
        raise ValueError("tuning needs a CUDA GPU; none is available")
    dtype = dtype or torch.bfloat16
    device = torch.device("cuda")
    shapes = _resolve_models(models)
    tokens = tuple(tokens)
    if not tokens or any(m <= 0 for m in tokens):
        raise ValueError(f"tokens are {tokens}; expected positive token counts")
    skew = check_skew(skew)

    spaces = {m: resolve_space(space, m) for m in tokens}
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    plan = []
    for name, shape in shapes.items():
        for m in tokens:
            rows = m * shape.top_k / shape.num_experts
            weights, ids = random_routing(m, shape, device, skew=skew)
            for bm in block_m_candidates(rows, space=spaces[m]):
                blocks = align_block_size(ids, bm, shape.num_experts)
                valid_blocks = int(blocks.num_tokens_post_padded.item()) // bm
                em = blocks.sorted_token_ids.numel()
                cands = {"w13": candidate_configs(bm, rows, spaces[m], True),
                         "w2": candidate_configs(bm, rows, spaces[m], False)}
                # GEMM2 RS and MMA candidates whose tiles leave SMs idle are also timed split
                # over K
                splits = [split_k_candidates(valid_blocks, shape.hidden_size,
                                             cfg["BLOCK_SIZE_N"], num_sms,
                                             mma_warps=cfg["num_warps"] if cfg.get("MMA")
                                             else None)
                          if cfg.get("RS") or cfg.get("MMA") else () for cfg in cands["w2"]]
                # RS candidates whose last round the kernel would cut: also with STREAM_K
                n_k = {"w13": (shape.intermediate_size, shape.hidden_size),
                       "w2": (shape.hidden_size, shape.intermediate_size)}
                stream_k = {gemm: [stream_k_candidate(cfg, valid_blocks=valid_blocks, em=em,
                                                      n_out=n_k[gemm][0], k=n_k[gemm][1],
                                                      num_sms=num_sms) for cfg in c]
                            for gemm, c in cands.items()}
                plan.append((name, shape, m, bm, cands, splits, stream_k,
                             (weights, ids, blocks)))
    total = 0
    for *_, cands, splits, stream_k, _ in plan:
        for gemm, c in cands.items():
            for n, cfg in enumerate(c):
                total += timed_runs(cfg, splits=splits[n] if gemm == "w2" else (),
                                    stream_k=stream_k[gemm][n])
    if layer_check:  # an estimate: a bucket's layer pairs are known once its GEMMs are timed
        total += (2 * LAYER_FINALISTS[0] * LAYER_FINALISTS[1] * len(plan)
                  + len({(name, m) for name, _, m, *_ in plan}))
    done = 0

    table: dict = {}
    meta_times: dict = {}
    meta_layer: dict = {}
    old_space = None
    if out is not None and Path(out).exists():
        try:
            with open(out, encoding="utf-8") as f:
                old = json.load(f)
            parse_table(old)
            table = {k: v for k, v in old.items() if not k.startswith("_")}
            meta_times = dict(old.get("_meta", {}).get("times_us", {}))
            meta_layer = dict(old.get("_meta", {}).get("layer_us", {}))
            old_space = old.get("_meta", {}).get("space")
        except (OSError, ValueError):
            table = {}

    results: dict[tuple[str, int], dict[int, tuple]] = {}
    experts_cache: dict[str, object] = {}
    for name, shape, m, bm, cands, w2_splits, stream_k, (weights, ids, blocks) in plan:
        if name not in experts_cache:
            experts_cache.clear()
            torch.cuda.empty_cache()
            experts_cache[name] = random_packed_experts(shape, dtype, device)
        experts = experts_cache[name]
        h, i = shape.hidden_size, shape.intermediate_size
        x = torch.randn(m, h, device=device, dtype=dtype)
        inter = torch.randn(m * shape.top_k, i, device=device, dtype=dtype)
        c2 = torch.empty(m * shape.top_k, h, device=device, dtype=dtype)
        em = blocks.sorted_token_ids.numel()
        x_sorted = torch.empty(em, h, device=device, dtype=dtype)
        inter_sorted = torch.randn(em, i, device=device, dtype=dtype)
        timed: dict[str, list[tuple[float, dict]]] = {"w13": [], "w2": []}
        for gemm in ("w13", "w2"):
            for n_cand, cand in enumerate(cands[gemm]):
                a, packed, out_t = (x, experts.w13, inter) if gemm == "w13" else (
                    inter, experts.w2, c2)
                skip = rs_skip_reason(cand, a, packed, out_t, activation=gemm == "w13",
                                      a_fragment_order=_fragment_tiles(cand))
                runs = candidate_runs(gemm, cand, experts=experts, x=x, inter=inter,
                                      out=out_t, blocks=blocks, topk_ids=ids,
                                      topk_weights=weights, top_k=shape.top_k,
                                      x_sorted=x_sorted, inter_sorted=inter_sorted,
                                      splits=w2_splits[n_cand] if gemm == "w2" else (),
                                      stream_k=stream_k[gemm][n_cand])
                for cfg, fn in runs:
                    note, why = "", skip
                    if cfg.get("SPLIT_K", 1) > 1:
                        note = f" SPLIT_K={cfg['SPLIT_K']}"
                        why = rs_skip_reason(cfg, a, packed, out_t, activation=False)
                    if cfg.get("PREFETCH_SCALES"):
                        note += " prefetched scales"
                    if cfg.get("STREAM_K"):
                        note += " stream-K"
                    if cfg.get("SORTED_ROWS"):
                        note += " sorted rows"
                        why = why or sorted_rows_unsupported(
                            x_sorted if gemm == "w13" else inter_sorted, rows=em)
                    if why is not None:  # it would time the Triton fallback as RS / MMA
                        t = math.inf
                        note += f" (skipped: {why})"
                    else:
                        try:
                            fn()
                            t = time_cuda_graph(fn, rep_ms)
                        except Exception as exc:  # out of resources, compile failure
                            t = math.inf
                            note += f" ({type(exc).__name__})"
                    done += 1
                    timed[gemm].append((t, cfg))
                    if on_step is not None:
                        on_step(done, total,
                                f"{name} M={m} {gemm} {config_label(cfg)}: {t:.1f} us{note}")
        if _fastest(timed["w13"]) < math.inf and _fastest(timed["w2"]) < math.inf:
            results.setdefault((name, m), {})[bm] = (timed["w13"], timed["w2"])

    measure = None
    if layer_check and results:
        from .boundaries import gpu_measure

        measure = gpu_measure(shapes, dtype, rep_ms=min(rep_ms, 10.0), skew=skew)
    for (name, m), per_bm in results.items():
        shape = shapes[name]
        h, i = shape.hidden_size, shape.intermediate_size
        if measure is not None:
            current = tuple(get_prefill_config(m, n, k, shape.num_experts, shape.top_k, dtype,
                                               device)
                            for n, k in ((2 * i, h), (h, i)))
            pairs = layer_finalists(per_bm, current)

            def on_pair(pair, us, name=name, m=m, current=current):
                nonlocal done
                done += 1
                if on_step is not None:
                    label = (" (the entries it runs now)"
                             if _launch_key(pair) == _launch_key(current) else "")
                    on_step(done, max(total, done),
                            f"{name} M={m} layer {config_label(pair[0])} + "
                            f"{config_label(pair[1])}: {us:.1f} us{label}")

            (c1, c2_), layer_us = pick_layer_pair(name, m, pairs, measure, on_pair=on_pair)
            meta_layer.setdefault(name, {})[str(m)] = round(layer_us, 2)
        else:
            bm = min(per_bm, key=lambda b: _fastest(per_bm[b][0]) + _fastest(per_bm[b][1]))
            c1 = min(per_bm[bm][0], key=lambda r: r[0])[1]
            c2_ = min(per_bm[bm][1], key=lambda r: r[0])[1]
        alone = {id(c): t for timed_bm in per_bm.values() for side in timed_bm
                 for t, c in side}
        for (n, k), cfg in (((2 * i, h), c1), ((h, i), c2_)):
            t = alone.get(id(cfg))  # None: the entries the layer ran before, not timed alone
            old_entry = table.get(f"{n},{k}", {}).get(str(m), {})
            if "DENSE" in old_entry:   # chosen by a layer-level measurement: keep it
                cfg = {**cfg, "DENSE": old_entry["DENSE"]}
            table.setdefault(f"{n},{k}", {})[str(m)] = cfg
            if t is None:
                meta_times.get(f"{n},{k}", {}).pop(str(m), None)
            else:
                meta_times.setdefault(f"{n},{k}", {})[str(m)] = round(t, 2)

    # where the entries came from: a merge keeps the earlier runs' account
    by_space: dict[str, list[int]] = {}
    for m, sp in spaces.items():
        by_space.setdefault(sp, []).append(m)
    provenance = ("auto: " if space == "auto" else "") + ", ".join(
        f"{sp} ({', '.join(shapes)}; M {', '.join(str(m) for m in ms)})"
        for sp, ms in by_space.items()) + (f" at routing skew {skew}" if skew else "")
    if old_space:
        provenance = f"{old_space}; then {provenance}"
    result = {"_meta": {"device": torch.cuda.get_device_name(), GPU_META_KEY: gpu_traits(),
                        "triton": triton.__version__,
                        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
                        "space": provenance, "times_us": meta_times,
                        "note": "times_us: median kernel time under CUDA graphs, random "
                                "routing; GEMM1 includes the fused SiLU*up epilogue; "
                                "layer_us: the prefill layer on the picked pair (alignment, "
                                "both GEMMs, top-k sum), the mean over routings"}}
    if meta_layer:
        result["_meta"]["layer_us"] = meta_layer
    if skew:
        result["_meta"]["routing_skew"] = skew
    result.update(dict(sorted(table.items())))
    if out is not None:
        _write_json(Path(out), result)
    return result


# --------------------------------------------------------------------------------------------
# decode / prefill threshold
# --------------------------------------------------------------------------------------------
DEFAULT_THRESHOLD_CANDIDATES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


@dataclass(frozen=True)
class ThresholdResult:
    """Measured layer times (us, per call) of the paths at each candidate M and the
    thresholds chosen from them: ``threshold`` (largest M off the prefill path) by
    :func:`select_threshold` on the faster of decode and mixed against prefill;
    ``gemm1_threshold`` (largest M whose GEMM1 runs the decode kernel) by
    :func:`select_gemm1_threshold`. ``mixed_us`` is empty where the mixed path cannot run
    its GEMM1 on the mma kernel (``gemm1_threshold`` is then ``threshold``)."""

    threshold: int
    candidates: tuple[int, ...]
    decode_us: tuple[float, ...]
    prefill_us: tuple[float, ...]
    mixed_us: tuple[float, ...] = ()
    gemm1_threshold: int | None = None


def _per_m_timings(candidates: Iterable[int], decode_us: Iterable[float],
                   other_us: Iterable[float], other: str
                   ) -> tuple[list[int], list[float], list[float]]:
    """The candidates and the decode and ``other`` path's times as lists, checked: as many of
    each (at least one), strictly increasing M >= 1, no NaN."""
    cands = [int(m) for m in candidates]
    dec = [float(t) for t in decode_us]
    oth = [float(t) for t in other_us]
    if not cands or not len(cands) == len(dec) == len(oth):
        raise ValueError(f"got {len(cands)} candidates, {len(dec)} decode and {len(oth)} "
                         f"{other} times; expected the same non-zero count")
    if any(b <= a for a, b in zip(cands, cands[1:], strict=False)) or cands[0] < 1:
        raise ValueError(f"candidates are {cands}; expected strictly increasing M >= 1")
    if any(math.isnan(t) for t in dec + oth):
        raise ValueError("timings contain NaN")
    return cands, dec, oth


def select_threshold(candidates: Iterable[int], decode_us: Iterable[float],
                     prefill_us: Iterable[float]) -> int:
    """The decode threshold (largest M that runs the decode kernel) from per-M timings.

    The candidates are walked in increasing M; at the first one where the prefill kernel is
    strictly faster the walk stops and the previous candidate is returned (0 if prefill
    already wins at the smallest M; the largest candidate if decode wins everywhere). The
    times are assumed to cross once; if they cross again above the first crossing (noise, or
    a config change of either kernel) the later candidates are ignored, so the threshold
    never exceeds a measured M where prefill won. Between two candidates nothing is known:
    the result is conservative by up to one candidate step.
    """
    cands, dec, pre = _per_m_timings(candidates, decode_us, prefill_us, "prefill")
    threshold = 0
    for m, td, tp in zip(cands, dec, pre, strict=True):
        if tp < td:
            break
        threshold = m
    return threshold


def select_gemm1_threshold(candidates: Iterable[int], decode_us: Iterable[float],
                           mixed_us: Iterable[float], threshold: int) -> int:
    """The largest M whose GEMM1 runs the decode kernel, from per-M timings of the decode and
    mixed paths: the mixed path takes the candidates at the top of the decode range
    (``<= threshold``) where it is strictly faster, walking down from ``threshold`` until
    decode wins; the result is the last candidate below them (0 when the mixed path wins down
    to the smallest), or ``threshold`` when decode wins at the top (no mixed path). As in
    :func:`select_threshold`, nothing is known between candidates: the result is conservative
    (decode) by up to one candidate step."""
    cands, dec, mix = _per_m_timings(candidates, decode_us, mixed_us, "mixed")
    inside = [j for j, m in enumerate(cands) if m <= threshold]
    result = threshold
    for j in reversed(inside):
        if not mix[j] < dec[j]:
            break
        result = cands[j - 1] if j > 0 else 0
    return result


def threshold_costs(candidates: Iterable[int], decode_us: Iterable[float],
                    prefill_us: Iterable[float]) -> dict[int, float]:
    """For each fixed threshold T in ``{0} | candidates``: the summed layer time over the
    measured M (each weighted once) when M <= T runs decode and the rest prefill, divided by
    the sum of the per-M best (1.0 = no loss)."""
    cands = [int(m) for m in candidates]
    dec = [float(t) for t in decode_us]
    pre = [float(t) for t in prefill_us]
    best = sum(min(a, b) for a, b in zip(dec, pre, strict=True))
    out = {}
    for t in [0, *cands]:
        total = sum(d if m <= t else p for m, d, p in zip(cands, dec, pre, strict=True))
        out[t] = total / best
    return out


def measure_decode_threshold(
    num_experts: int,
    top_k: int,
    hidden_size: int,
    intermediate_size: int,
    group_size: int = 128,
    *,
    dtype=None,
    candidates: Iterable[int] = DEFAULT_THRESHOLD_CANDIDATES,
    rotations: int = 8,
    rep_ms: float = 5.0,
    seed: int = 0,
    experts=None,
    on_step: Callable[[int, int, str], None] | None = None,
    skew: float = 0.0,
) -> ThresholdResult:
    """Time ``fused_moe_decode``, ``fused_moe_mixed`` (where its GEMM1 runs on the mma
    kernel: :func:`~w4a16moe.kernels.mixed.mixed_unsupported`) and ``fused_moe_prefill`` on
    the current GPU at each candidate token count and pick the thresholds
    (:class:`ThresholdResult`).

    Each timed call runs ``rotations`` layer calls back to back in one CUDA graph, each with
    its own random softmax routing, and reports the time per call: consecutive calls touch
    different experts, so at small M the weights come from HBM, not from the 50 MB L2 (the
    layer itself, ``E * 3 * H * I / 2`` bytes, is several times the L2 for every shape in
    :data:`MODEL_SHAPES`; at large M every call reads all experts). Every path runs with
    preallocated workspaces and outputs (the alignment pass is included in the prefill and
    mixed times).

    Args:
        num_experts, top_k, hidden_size, intermediate_size, group_size: the layer shape.
        dtype: activation dtype (default bfloat16).
        candidates: increasing token counts to time.
        rotations: layer calls (distinct routings) per timed graph.
        rep_ms: timing budget per measurement (``do_bench_cudagraph``'s ``rep``).
        experts: optional :class:`PackedExperts` of that shape (random ones otherwise).
        on_step: ``on_step(done, total, description)`` after each timed candidate.
        skew: routing skew of each call's logits (:func:`random_logits`; 0: uniform).
    """
    import torch

    from ..routing import fused_topk
    from .decode import DecodeWorkspace, fused_moe_decode
    from .mixed import MixedWorkspace, fused_moe_mixed, mixed_unsupported
    from .prefill import PrefillWorkspace, fused_moe_prefill

    if not torch.cuda.is_available():
        raise ValueError("measuring the decode threshold needs a CUDA GPU; none is available")
    cands = tuple(int(m) for m in candidates)
    if not cands or any(b <= a for a, b in zip(cands, cands[1:], strict=False)) or cands[0] < 1:
        raise ValueError(f"candidates are {cands}; expected strictly increasing M >= 1")
    if rotations < 1:
        raise ValueError(f"rotations is {rotations}; expected >= 1")
    skew = check_skew(skew)
    dtype = dtype or torch.bfloat16
    device = torch.device("cuda")
    shape = ModelShape(num_experts, top_k, hidden_size, intermediate_size, group_size)
    if experts is None:
        experts = random_packed_experts(shape, dtype, device, seed=seed)
    max_m = cands[-1]
    dws = DecodeWorkspace.create(experts, top_k, max_m)
    pws = PrefillWorkspace.allocate(max_m, experts, top_k)
    mws = (MixedWorkspace.create(experts, top_k, max_m, decode=dws)
           if mixed_unsupported(experts) is None else None)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    x_all = torch.randn(max_m, hidden_size, device=device, dtype=dtype, generator=gen)
    y_all = torch.empty(max_m, hidden_size, device=device, dtype=dtype)
    dec_t, pre_t, mix_t = [], [], []
    for step, m in enumerate(cands):
        x, y = x_all[:m], y_all[:m]
        routes = [fused_topk(random_logits(m, num_experts, gen, skew), top_k)
                  for _ in range(rotations)]

        def run_decode(x=x, y=y, routes=routes):
            for w, ids in routes:
                fused_moe_decode(x, experts, w, ids, out=y, workspace=dws)

        def run_prefill(x=x, y=y, routes=routes):
            for w, ids in routes:
                fused_moe_prefill(x, experts, w, ids, out=y, workspace=pws)

        def run_mixed(x=x, y=y, routes=routes):
            for w, ids in routes:
                fused_moe_mixed(x, experts, w, ids, out=y, workspace=mws)

        times = []
        for fn in (run_decode, run_prefill) + ((run_mixed,) if mws is not None else ()):
            fn()
            times.append(time_cuda_graph(fn, rep_ms) / rotations)
        dec_t.append(times[0])
        pre_t.append(times[1])
        desc = f"M={m}: decode {times[0]:.1f} us, prefill {times[1]:.1f} us"
        if mws is not None:
            mix_t.append(times[2])
            desc += f", mixed {times[2]:.1f} us"
        if on_step is not None:
            on_step(step + 1, len(cands), desc)
    if not mix_t:
        threshold = select_threshold(cands, dec_t, pre_t)
        return ThresholdResult(threshold, cands, tuple(dec_t), tuple(pre_t), (), threshold)
    threshold = select_threshold(cands, [min(d, x) for d, x in zip(dec_t, mix_t, strict=True)],
                                 pre_t)
    return ThresholdResult(threshold, cands, tuple(dec_t), tuple(pre_t), tuple(mix_t),
                           select_gemm1_threshold(cands, dec_t, mix_t, threshold))


def write_thresholds(path: str | os.PathLike, thresholds: dict[str, int],
                     meta: dict | None = None,
                     gemm1_thresholds: dict[str, int | None] | None = None) -> dict:
    """Merge ``{threshold_key: M}`` (and ``meta`` under ``"_meta"``, merged per key) into the
    thresholds JSON at ``path`` (created if missing; an unreadable file is replaced);
    ``gemm1_thresholds`` ``{threshold_key: M or None}`` into its ``"decode_gemm1"`` section
    (None: the key is removed, no mixed path). Returns the written object."""
    from ..experts import DECODE_GEMM1_SECTION

    path = Path(path)
    data: dict = {}
    if path.exists():
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if isinstance(old, dict):
                data = old
        except (OSError, ValueError):
            data = {}
    for key, value in thresholds.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"threshold of {key!r} is {value!r}; expected an int >= 0")
        data[key] = value
    if gemm1_thresholds:
        section = data.get(DECODE_GEMM1_SECTION)
        section = dict(section) if isinstance(section, dict) else {}
        for key, value in gemm1_thresholds.items():
            if value is None:
                section.pop(key, None)
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"decode GEMM1 threshold of {key!r} is {value!r}; expected an "
                                 "int >= 0 or None")
            section[key] = value
        if section:
            data[DECODE_GEMM1_SECTION] = dict(sorted(section.items()))
        else:
            data.pop(DECODE_GEMM1_SECTION, None)
    if meta:
        old_meta = data.get("_meta") if isinstance(data.get("_meta"), dict) else {}
        data["_meta"] = {**old_meta, **meta}
    ordered = {k: data[k] for k in sorted(data, key=lambda k: (not k.startswith("_"), k))}
    _write_json(path, ordered)
    return ordered


def measure_thresholds(
    models: Iterable[str] | dict[str, ModelShape],
    *,
    dtype=None,
    candidates: Iterable[int] = DEFAULT_THRESHOLD_CANDIDATES,
    out: str | os.PathLike | None = None,
    rep_ms: float = 5.0,
    on_step: Callable[[int, int, str], None] | None = None,
    skew: float = 0.0,
) -> dict[str, ThresholdResult]:
    """:func:`measure_decode_threshold` for each model shape; with ``out``, merge the results
    into that thresholds JSON (keys :func:`w4a16moe.experts.threshold_key`, timings under
    ``_meta``). Returns ``{model name: ThresholdResult}``."""
    import torch
    import triton

    from ..experts import threshold_key
    from .configs import GPU_META_KEY, gpu_traits

    shapes = _resolve_models(models)
    results: dict[str, ThresholdResult] = {}
    for name, s in shapes.items():
        def step(done, total, desc, name=name):
            if on_step is not None:
                on_step(done, total, f"{name} {desc}")

        torch.cuda.empty_cache()
        results[name] = measure_decode_threshold(
            s.num_experts, s.top_k, s.hidden_size, s.intermediate_size, s.group_size,
            dtype=dtype, candidates=candidates, rep_ms=rep_ms, on_step=step, skew=skew)
    if out is not None:
        keys = {name: threshold_key(s.num_experts, s.hidden_size, s.intermediate_size,
                                    s.top_k, s.group_size) for name, s in shapes.items()}
        timings = {keys[n]: {"model": n, "M": list(r.candidates),
                             "decode_us": [round(t, 2) for t in r.decode_us],
                             "prefill_us": [round(t, 2) for t in r.prefill_us],
                             **({"mixed_us": [round(t, 2) for t in r.mixed_us]}
                                if r.mixed_us else {})}
                   for n, r in results.items()}
        old = {}
        if Path(out).exists():
            try:
                with open(out, encoding="utf-8") as f:
                    old = json.load(f).get("_meta", {}).get("timings", {})
            except (OSError, ValueError, AttributeError):
                old = {}
        meta = {"device": torch.cuda.get_device_name(), GPU_META_KEY: gpu_traits(),
                "triton": triton.__version__,
                "torch": torch.__version__,
                "dtype": str(dtype or torch.bfloat16).removeprefix("torch."),
                "timings": {**old, **timings},
                "note": "value: largest M that runs the decode kernel (last candidate before "
                        "prefill first wins against the faster of decode and mixed); "
                        "decode_gemm1: largest M whose GEMM1 runs the decode kernel, above it "
                        "the mixed path (only where it won); layer times per call under CUDA "
                        "graphs, random routing rotated over 8 calls"
                        + (f", routing skew {skew}" if skew else "")}
        gemm1 = {keys[n]: (r.gemm1_threshold if r.gemm1_threshold is not None
                           and r.gemm1_threshold < r.threshold else None)
                 for n, r in results.items()}
        write_thresholds(out, {keys[n]: r.threshold for n, r in results.items()}, meta,
                         gemm1_thresholds=gemm1)
    return results


def _resolve_models(models: Iterable[str] | dict[str, ModelShape]) -> dict[str, ModelShape]:
    if isinstance(models, dict):
        return dict(models)
    shapes = {}
    for name in models:
        if name not in MODEL_SHAPES:
            raise ValueError(f"model is {name!r}; expected one of {sorted(MODEL_SHAPES)}")
        shapes[name] = MODEL_SHAPES[name]
    return shapes


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _parse_tokens(text: str, flag: str = "--tokens") -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} is {text!r}; expected comma-separated integers") from None
    if not vals:
        raise ValueError(f"{flag} is empty")
    return vals


@contextlib.contextmanager
def _progress(description: str, verbose: bool, time_left: bool = True):
    """A progress bar for the ``tune`` command, yielding the ``on_step(done, total,
    description)`` callback that moves it; with ``verbose`` each step's description is also
    printed above the bar (one line a timed candidate or point)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}")]
    with Progress(*columns, *([TimeRemainingColumn()] if time_left else [])) as bar:
        task = bar.add_task(description, total=None)

        def step(done: int, total: int, desc: str) -> None:
            bar.update(task, completed=done, total=total, description=desc)
            if verbose:
                bar.console.print(desc, highlight=False, markup=False, soft_wrap=True)

        yield step


def run(args) -> int:
    import torch

    from .configs import CONFIG_DIR, device_config_filename

    names = [n.strip() for n in args.model.split(",") if n.strip()]
    if names == ["all"]:
        names = list(MODEL_SHAPES)
    for n in names:
        if n not in MODEL_SHAPES:
            raise ValueError(f"--model {n!r} is unknown; expected one of "
                             f"{', '.join(MODEL_SHAPES)} or all")
    skew = check_skew(getattr(args, "skew", 0.0), "--skew")
    if not torch.cuda.is_available():
        raise ValueError("w4a16moe tune needs a CUDA GPU; none is available")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.thresholds:
        from ..experts import thresholds_path

        out = args.out or thresholds_path(torch.cuda.get_device_name())
        cands = _parse_tokens(args.candidates, "--candidates")
        with _progress("thresholds", args.verbose, time_left=False) as tstep:
            res = measure_thresholds(names, dtype=dtype, candidates=cands, out=out,
                                     rep_ms=min(args.rep_ms, 5.0), on_step=tstep,
                                     skew=skew)
        for name, r in res.items():
            mixed = ("" if r.gemm1_threshold is None or r.gemm1_threshold >= r.threshold
                     else f" (GEMM1 on the mma kernel from M={r.gemm1_threshold + 1}: mixed)")
            print(f"{name}: decode up to M={r.threshold}{mixed}")
        print(f"wrote {out}")
        return 0
    out = args.out or str(CONFIG_DIR / device_config_filename())
    if args.boundaries:
        return _run_boundaries(args, names, out, dtype, skew)
    with _progress("tuning", args.verbose) as step:
        tune_prefill(names, _parse_tokens(args.tokens), dtype=dtype, space=args.space,
                     out=out, rep_ms=args.rep_ms, on_step=step,
                     layer_check=getattr(args, "layer_check", True), skew=skew)
    print(f"wrote {out}")
    print(f"next, to move where its M buckets hand over: w4a16moe tune --model {args.model} "
          f"--boundaries --out {out}")
    return 0


def _run_boundaries(args, names: list[str], out: str, dtype, skew: float = 0.0) -> int:
    """``w4a16moe tune --boundaries``: move the handovers between the buckets of ``out``."""
    from rich.console import Console
    from rich.table import Table

    from .boundaries import gpu_measure, refine_boundaries
    from .configs import parse_table

    for flag, value in (("--points", args.points), ("--routings", args.routings)):
        if value < 1:
            raise ValueError(f"{flag} is {value}; expected at least 1")
    try:
        with open(out, encoding="utf-8") as f:
            data = json.load(f)
        parse_table(data)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--boundaries reads the config table {out}, which could not be "
                         f"used: {exc}") from None
    models = {n: MODEL_SHAPES[n] for n in names}
    with _progress("bucket handovers", args.verbose) as step:
        new, changes = refine_boundaries(
            data, models,
            measure=gpu_measure(models, dtype, rep_ms=min(args.rep_ms, 10.0), skew=skew),
            points=args.points, seeds=args.routings, on_step=step)
    table = Table(title=f"bucket handovers moved ({len(changes)})")
    for col in ("model", "buckets", "low's entries up to M", "added bucket", "times at M (us)"):
        table.add_column(col)
    for c in changes:
        times = ", ".join(f"{m}: {a:.1f} / {b:.1f}"
                          for m, a, b in zip(c.points, c.low_us, c.high_us, strict=True))
        table.add_row(c.model, f"{c.low} / {c.high}", str(c.last_low),
                      f"{c.bucket} ({c.holds}'s entries)", times)
    Console().print(table)
    if changes:
        meta = dict(new.get("_meta", {}))
        done = "; ".join(f"{c.model} bucket {c.bucket} = bucket "
                         f"{c.low if c.holds == 'low' else c.high}'s entries (M <= {c.last_low}"
                         f" on bucket {c.low}'s)" for c in changes)
        meta["space"] = (f"{meta['space']}; then " if meta.get("space") else "") + (
            f"boundaries ({done})")
        new["_meta"] = meta
        _write_json(Path(out), new)
        print(f"wrote {out}")
    else:
        print(f"every handover stays at its midpoint; {out} unchanged")
    return 0


def register(sub) -> None:
    p = sub.add_parser("tune", help="tune the prefill kernel's configs (or, with "
                                      "--thresholds, the decode/prefill switch; with "
                                      "--boundaries, where the config buckets hand over) on "
                                      "this GPU",
                       description="Time candidate prefill-kernel configs for a model's MoE "
                                   "shapes on the running GPU and write the JSON config table.")
    p.add_argument("--model", required=True,
                   help=f"model name(s), comma-separated, or 'all': {', '.join(MODEL_SHAPES)}")
    p.add_argument("--out", default=None,
                   help="JSON file to write or update (default: the package's file for this "
                        "GPU)")
    p.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)),
                   help="token counts M to tune, comma-separated (default: %(default)s)")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--space", choices=["auto", *sorted(SPACES)], default="auto",
                   help="candidate space (default: %(default)s: on a Hopper GPU the "
                        "register-operand Gluon tiles with the Triton winners and the mma.sync "
                        f"tiles, 'rsmidm' up to {AUTO_SPLIT_TOKENS} tokens and 'rs' above; "
                        "elsewhere 'default'; 'mma': the mma.sync tiles alone, 8-slot blocks "
                        f"up to {MMA_SMALL_BLOCK_ROWS} slots an expert; where experts get more "
                        "than 64 slots each, every tile but the mma kernel's is timed with "
                        "GROUP_SIZE_M " + " and ".join(map(str, LARGE_M_GROUP_SIZES)) + ")")
    p.add_argument("--rep-ms", type=float, default=20.0,
                   help="timing budget per candidate in ms (default: %(default)s)")
    p.add_argument("--no-layer-check", dest="layer_check", action="store_false",
                   help="pick each M bucket's GEMM1 and GEMM2 configs by their own times "
                        "alone; by default the pairs of the fastest few of each, and the "
                        "entries the layer runs now, are then timed as the whole prefill "
                        "layer (the PDL chain, GEMM2 waiting for GEMM1's blocks), each RS pair "
                        f"of {SHORT_BLOCK_MIN_M} slots a block or more also with "
                        "SHORT_BLOCK_T (blocks whose slots fit half a block run half-width "
                        "wgmmas) and, from "
                        f"{QUARTER_BLOCK_MIN_M} slots a block, with QUARTER_BLOCKS as well "
                        "(quarter and three-quarter widths), and the fastest pair is written")
    p.add_argument("--thresholds", action="store_true",
                   help="instead of tuning configs, measure the decode/prefill switch point "
                        "of each model, and where the mixed path (GEMM1 on the mma kernel, "
                        "GEMM2 on the decode kernel) beats decode the point it takes over, and "
                        "merge them into the thresholds JSON (default --out: the package's "
                        "<gpu>_thresholds.json)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print a line for every timed candidate: GEMM, tile, time and how "
                        "it ran (prefetched scales, sorted rows, SPLIT_K, stream-K) or why it "
                        "was skipped (with --thresholds: each M's decode, mixed and prefill "
                        "layer times); not only the progress bar")
    p.add_argument("--candidates", default=",".join(map(str, DEFAULT_THRESHOLD_CANDIDATES)),
                   help="with --thresholds: token counts to time (default: %(default)s)")
    p.add_argument("--boundaries", action="store_true",
                   help="instead of tuning configs, time the prefill layer with the entries "
                        "of each pair of neighbouring M buckets of the table (--out) at token "
                        "counts between them, and add a bucket wherever the layer is faster "
                        "with the handover away from their midpoint (the best tiles change "
                        "with the rows an expert holds, not at midpoints)")
    p.add_argument("--points", type=int, default=DEFAULT_POINTS,
                   help="with --boundaries: token counts timed between two buckets (default: "
                        "%(default)s)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="routing skew of every timed routing: each routing's logits get a "
                        "per-expert bias of this standard deviation, as trained routers favour "
                        "some experts (0: uniform, the default; 0.5 puts about twice the mean "
                        "load on Mixtral's busiest expert). Tiles whose blocks sit at the SM "
                        "count can lose 15 %% when one expert passes a block; tune for the "
                        "imbalance your traffic has")
    p.add_argument("--routings", type=int, default=DEFAULT_SEEDS,
                   help="with --boundaries: random routings each time is the mean of "
                        "(default: %(default)s)")
    p.set_defaults(func=run)
