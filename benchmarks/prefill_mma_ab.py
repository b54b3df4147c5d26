"""Layer paths for A/Bs of the ``mma.sync`` prefill kernel (``MMA`` configs) against the
shipped hybrid layer, through ``w4a16moe bench``'s ad-hoc paths (weights rotated, CUDA graphs,
router included, checked against the float32 oracle)::

    PYTHONPATH=.:benchmarks w4a16moe bench --model qwen3-30b-a3b --m 8,16,32,64 \\
        --paths hybrid,mma_a=prefill_mma_ab:mma_a,mma_b=prefill_mma_ab:mma_b

A candidate config table against the shipped one: ``--paths prefill,mma_table=prefill_mma_ab:
table_layer`` with ``W4A16MOE_AB_TABLE`` naming the candidate file (session 25's run:
``benchmarks/results/h100_prefill_mma_table_ab_*_session25.json``).

Each ``mma_*`` path runs :func:`~w4a16moe.kernels.prefill.fused_moe_prefill` with both GEMMs on the
mma kernel: blocks of 8, 16 or 32 slots by the expected slots an expert (``BLOCK_T``), GEMM1
writing its output in sorted order for GEMM2 (``SORTED_ROWS``). The variants differ in the
weight rows a program takes (16-row slabs a warp, warps a program)."""

from __future__ import annotations

import functools
from unittest import mock

from w4a16moe.kernels import prefill as prefill_mod
from w4a16moe.kernels.prefill import (
    PrefillWorkspace,
    fused_moe_prefill,
    fused_moe_prefill_from_logits,
)


def block_slots(m: int, top_k: int, num_experts: int) -> int:
    """Slots a block: 8 up to ~2.5 slots an expert on average, 16 up to 6, else 32 (session
    25's split; session 26 found 8-slot blocks faster up to about 5 slots an expert:
    ``tune.MMA_SMALL_BLOCK_ROWS``)."""
    avg = m * top_k / num_experts
    return 8 if avg <= 2.5 else 16 if avg <= 6 else 32


def step_columns(k: int, groups: int) -> int:
    """BLOCK_SIZE_K: ``groups`` groups of 128 a K step, fewer where K is not a multiple."""
    while groups > 1 and k % (128 * groups):
        groups //= 2
    return 128 * groups


def mma_configs(m: int, top_k: int, num_experts: int, hidden: int, inter: int, *,
                g1_out: int, g1_warps: int, g2_rows: int, g2_warps: int, groups: int = 1,
                bt: int | None = None) -> tuple[dict, dict]:
    bt = bt or block_slots(m, top_k, num_experts)
    # the activations of a step take (bt / 8) * groups * 16 registers: at most 64
    groups = min(groups, max(1, 4 // (bt // 8)))
    base = {"BLOCK_SIZE_M": bt, "GROUP_SIZE_M": 1, "num_stages": 1, "MMA": True}
    return ({**base, "BLOCK_SIZE_N": g1_out, "num_warps": g1_warps,
             "BLOCK_SIZE_K": step_columns(hidden, groups)},
            {**base, "BLOCK_SIZE_N": g2_rows, "num_warps": g2_warps,
             "BLOCK_SIZE_K": step_columns(inter, groups), "SORTED_ROWS": True})


@functools.lru_cache(maxsize=8)
def prefill_workspace(experts, m: int, top_k: int) -> PrefillWorkspace:
    """One workspace per experts object (hashed by identity), token count and top-k."""
    return PrefillWorkspace.allocate(m, experts, top_k)


def shipped_layer(hidden_states, experts, topk_weights, topk_ids, *, activation="silu",
                  configs=None):
    """The shipped prefill layer (``fused_moe_prefill``) on a cached workspace; ``configs``
    (GEMM1's, GEMM2's) instead of the table's."""
    m, top_k = topk_ids.shape
    return fused_moe_prefill(hidden_states, experts, topk_weights, topk_ids,
                             activation=activation, configs=configs,
                             workspace=prefill_workspace(experts, m, top_k))


def _run(hidden_states, experts, topk_weights, topk_ids, *, activation="silu", **tiles):
    m, top_k = topk_ids.shape
    cfgs = mma_configs(m, top_k, experts.num_experts, experts.hidden_size,
                       experts.intermediate_size, **tiles)
    return shipped_layer(hidden_states, experts, topk_weights, topk_ids,
                         activation=activation, configs=cfgs)


#: the tile variants timed in session 25: name -> (GEMM1 features, GEMM1 warps, GEMM2 rows,
#: GEMM2 warps, groups a K step, what it is)
VARIANTS = {
    "mma_a": (32, 4, 64, 4, 1, "one slab a warp on 4 warps (GEMM1 64 rows, GEMM2 64 rows)"),
    "mma_b": (64, 4, 128, 4, 1, "two slabs a warp on 4 warps (GEMM1 and GEMM2 128 rows)"),
    "mma_c": (16, 2, 32, 2, 1, "small programs: 2 warps of one slab"),
    "mma_d": (8, 1, 16, 1, 1, "one warp a program, one slab"),
    "mma_g2": (32, 4, 64, 4, 2, "mma_a's tiles, K steps of two groups (128-byte row runs)"),
    "mma_g4": (32, 4, 64, 4, 4, "mma_a's tiles, four groups a step where K allows"),
    "mma_g2c": (16, 2, 32, 2, 2, "mma_c's programs, two groups a step"),
    "mma_g4d": (8, 1, 16, 1, 4, "one-warp programs, four groups a step where K allows"),
    "mma_g2s": (64, 4, 128, 4, 2, "mma_b's tiles, two groups a step (the shipped entries)"),
}


def _variant(name: str):
    g1_out, g1_warps, g2_rows, g2_warps, groups, what = VARIANTS[name]

    def path(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
        return _run(hidden_states, experts, topk_weights, topk_ids, activation=activation,
                    g1_out=g1_out, g1_warps=g1_warps, g2_rows=g2_rows, g2_warps=g2_warps,
                    groups=groups)

    path.__name__ = path.__qualname__ = name
    path.__doc__ = f"Both GEMMs on the mma kernel: {what}."
    return path


mma_a, mma_b, mma_c, mma_d = (_variant(n) for n in ("mma_a", "mma_b", "mma_c", "mma_d"))
mma_g2, mma_g4, mma_g2c, mma_g4d, mma_g2s = (
    _variant(n) for n in ("mma_g2", "mma_g4", "mma_g2c", "mma_g4d", "mma_g2s"))


def ship_g1_mma_g2(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
    """The shipped GEMM1 entry, GEMM2 on the mma kernel (64 rows, 4 warps, two groups a
    step) with GEMM1's block size."""
    from w4a16moe.kernels.prefill import layer_configs

    m, top_k = topk_ids.shape
    cfg1, _ = layer_configs(experts, top_k, m)
    cfg2 = mma_configs(m, top_k, experts.num_experts, experts.hidden_size,
                       experts.intermediate_size, g1_out=32, g1_warps=4, g2_rows=64,
                       g2_warps=4, groups=2, bt=cfg1["BLOCK_SIZE_M"])[1]
    cfg1 = {**cfg1, "SORTED_ROWS": cfg1.get("SORTED_ROWS", False)}
    return shipped_layer(hidden_states, experts, topk_weights, topk_ids,
                         activation=activation, configs=(cfg1, cfg2))


def _table_layer(file, hidden_states, experts, topk_weights, topk_ids, activation: str):
    """The prefill layer on the config table ``file`` (the shipped format)."""
    from w4a16moe.kernels.configs import get_prefill_config

    m, top_k = topk_ids.shape
    i, h = experts.intermediate_size, experts.hidden_size
    cfgs = tuple(get_prefill_config(m, n, k, experts.num_experts, top_k, experts.dtype,
                                    experts.device, config_file=file)
                 for n, k in ((2 * i, h), (h, i)))
    return shipped_layer(hidden_states, experts, topk_weights, topk_ids,
                         activation=activation, configs=cfgs)


def table_layer(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
    """The prefill layer on the config table in ``$W4A16MOE_AB_TABLE`` (a candidate file in
    the shipped format), to A/B it against the shipped table's ``prefill``/``hybrid`` paths."""
    import os

    return _table_layer(os.environ["W4A16MOE_AB_TABLE"], hidden_states, experts,
                        topk_weights, topk_ids, activation)


#: session 35's changes to the H100 table, undone: per shape, each bucket it changed and the
#: bucket whose entry it held before (None: a bucket session 35 added)
SESSION35_TABLE_UNDO = {
    "2048,2048": {"64": "67", "67": None},     # olmoe-1b-7b GEMM1
    "2048,1024": {"64": "67", "67": None},     # olmoe-1b-7b GEMM2
    "2816,2048": {"64": "112"},                # deepseek-v2-lite GEMM1
    "2048,1408": {"64": "112"},                # deepseek-v2-lite GEMM2
    "1536,2048": {"112": "128"},               # qwen3-30b-a3b GEMM1
    "2048,768": {"112": "128"},                # qwen3-30b-a3b GEMM2
}


def table_before_session35() -> dict:
    """The shipped H100 table with :data:`SESSION35_TABLE_UNDO` applied: its entries as
    session 34 left them (b26b9a0's file, ``_meta`` aside)."""
    import copy
    import json

    from w4a16moe.kernels.configs import CONFIG_DIR

    table = json.loads((CONFIG_DIR / "NVIDIA_H100_80GB_HBM3.json").read_text())
    before = copy.deepcopy(table)
    for shape, undo in SESSION35_TABLE_UNDO.items():
        for bucket, source in undo.items():
            if source is None:
                del before[shape][bucket]
            else:
                before[shape][bucket] = copy.deepcopy(table[shape][source])
    return before


@functools.cache
def _table_before_session35_file() -> str:
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(table_before_session35(), f)
    return f.name


def _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation: str,
                  configs=None, **switches):
    """The shipped prefill layer (on ``configs`` if given) with the module switches
    ``prefill_mma.<name>`` set to the given values while it launches (restored after)."""
    from w4a16moe.kernels import prefill_mma

    with mock.patch.multiple(prefill_mma, **switches):
        return shipped_layer(hidden_states, experts, topk_weights, topk_ids,
                             activation=activation, configs=configs)


def add_switch_argument(parser) -> None:
    """``--switch NAME=VALUE`` (repeatable) on a probe's command line: see
    :func:`apply_switches`."""
    parser.add_argument("--switch", action="append", default=[], metavar="NAME=VALUE",
                        help="set a module switch of w4a16moe.kernels.prefill_mma (a Python "
                             "literal) first, e.g. --switch WORD_RING_STAGES=0; repeatable")


def apply_switches(parser, items: list[str], protected: tuple[str, ...] = ()) -> None:
    """Set each ``NAME=VALUE`` of ``items`` as ``prefill_mma.NAME`` (the value a Python
    literal); ``parser.error`` for a name that is no upper-case switch of the module or is
    one of ``protected`` (those the probe sets itself)."""
    import ast

    from w4a16moe.kernels import prefill_mma

    for item in items:
        name, _, value = item.partition("=")
        if not name.isupper() or not hasattr(prefill_mma, name) or name in protected:
            parser.error(f"--switch {item!r}: prefill_mma has no switch {name!r} to set")
        setattr(prefill_mma, name, ast.literal_eval(value))


def prefill_wait_first(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
    """The shipped prefill layer with GEMM2's mma programs waiting for GEMM1 before any load
    (``prefill_mma.GEMM2_WEIGHTS_BEFORE_WAIT`` off while it launches)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         GEMM2_WEIGHTS_BEFORE_WAIT=False)


def prefill_reload_past_last(hidden_states, experts, topk_weights, topk_ids, *,
                             activation="silu"):
    """The shipped prefill layer with the mma kernel's reloads past the last K step done
    (the last step loaded again) rather than predicated off
    (``prefill_mma.PREDICATED_RELOADS`` off while it launches)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         PREDICATED_RELOADS=False)


def prefill_words_in_registers(hidden_states, experts, topk_weights, topk_ids, *,
                               activation="silu"):
    """The shipped prefill layer with every mma program's words two steps ahead in registers
    (``prefill_mma.WORD_RING_STAGES`` 0 while it launches): the layer before the ring."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         WORD_RING_STAGES=0)


def _ring_everywhere(stages: int):
    def path(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
        return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                             WORD_RING_STAGES=stages, WORD_RING_MAX_STEPS=1 << 30,
                             WORD_RING_MIN_BLOCK_K=0)
    path.__name__ = path.__qualname__ = f"prefill_word_ring{stages}"
    path.__doc__ = (f"The shipped prefill layer with every mma program's words through a "
                    f"``cp.async`` ring of {stages} stages, however many K steps it has.")
    return path


def prefill_word_ring_max8(hidden_states, experts, topk_weights, topk_ids, *,
                           activation="silu"):
    """The shipped prefill layer with session 30's first gate of the words' ring: programs
    of at most 8 K steps of any width (the shipped gate: 16 steps of at least 256 columns)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         WORD_RING_MAX_STEPS=8, WORD_RING_MIN_BLOCK_K=0)


def prefill_activations_at_step(hidden_states, experts, topk_weights, topk_ids, *,
                                activation="silu"):
    """The shipped prefill layer with the 8-slot mma programs loading their activations at
    their step instead of two steps ahead in registers (``prefill_mma.ACTIVATIONS_AHEAD`` off
    while it launches: 104 registers a thread instead of 168 on the shipped 4-warp tiles)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         ACTIVATIONS_AHEAD=False)


def prefill_ring_whole_runs(hidden_states, experts, topk_weights, topk_ids, *,
                            activation="silu"):
    """The shipped prefill layer with the words' ring copying whole 128-byte runs of a row
    (``prefill_mma.RING_COPIES_WHOLE_RUNS`` on while it launches: 8 lanes a row, the ring's
    barriers warp barriers)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         RING_COPIES_WHOLE_RUNS=True)


def prefill_ring_pieces(hidden_states, experts, topk_weights, topk_ids, *,
                        activation="silu"):
    """The shipped prefill layer with each lane of the words' ring copying the 16-byte pieces
    it reads back (``prefill_mma.RING_COPIES_WHOLE_RUNS`` off while it launches)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         RING_COPIES_WHOLE_RUNS=False)


def prefill_rotated_k(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
    """The shipped prefill layer with each mma program walking its K steps from step ``pid %
    steps`` round (``prefill_mma.ROTATE_K_STEPS`` on while it launches; shipped on since
    session 32, whose A/B ran it against the layer before)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         ROTATE_K_STEPS=True)


def prefill_unrotated_k(hidden_states, experts, topk_weights, topk_ids, *,
                        activation="silu"):
    """The shipped prefill layer with every mma program walking its K steps from the first
    (``prefill_mma.ROTATE_K_STEPS`` off while it launches: the layer before session 32)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         ROTATE_K_STEPS=False)


def prefill_gemm2_waits_per_block(hidden_states, experts, topk_weights, topk_ids, *,
                                  activation="silu"):
    """The shipped prefill layer with GEMM2's programs waiting for their own block's GEMM1
    tiles (``prefill_mma.GEMM2_WAITS_PER_BLOCK`` on while it launches; shipped on since
    session 33)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         GEMM2_WAITS_PER_BLOCK=True)


def prefill_gemm1_persistent(hidden_states, experts, topk_weights, topk_ids, *,
                             activation="silu"):
    """The shipped prefill layer with GEMM2 waiting per block and GEMM1 on a persistent grid
    (``prefill_mma.GEMM1_PERSISTENT`` on while it launches; shipped on since session 34)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         GEMM2_WAITS_PER_BLOCK=True, GEMM1_PERSISTENT=True)


def prefill_gemm1_persistent_everywhere(hidden_states, experts, topk_weights, topk_ids, *,
                                        activation="silu"):
    """:func:`prefill_gemm1_persistent` also on layers of fewer tokens or experts than
    ``prefill_mma.GEMM1_PERSISTENT_MIN_TOKENS`` and ``..._MIN_EXPERTS`` (qwen3-30b M=2,
    Mixtral)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         GEMM2_WAITS_PER_BLOCK=True, GEMM1_PERSISTENT=True,
                         GEMM1_PERSISTENT_MIN_TOKENS=1, GEMM1_PERSISTENT_MIN_EXPERTS=1)


def prefill_gemm2_waits_per_block_to_64_tokens(hidden_states, experts, topk_weights,
                                               topk_ids, *, activation="silu"):
    """:func:`prefill_gemm1_persistent` with the per-block wait (and so the persistent GEMM1)
    up to 64 tokens (``prefill_mma.GEMM2_WAITS_MAX_TOKENS`` 64 while it launches; shipped
    since session 35)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         GEMM2_WAITS_PER_BLOCK=True, GEMM1_PERSISTENT=True,
                         GEMM2_WAITS_MAX_TOKENS=64)


def _with_gates(hidden_states, experts, topk_weights, topk_ids, activation: str, *,
                chain_tokens: int | None = None, waits_tokens: int | None = None,
                one_program_slots: int | None = None,
                chain_one_program_slots: int | None = None, table: str | None = None):
    """The shipped prefill layer (with ``table``, on that config file) with the token gates
    of session 35 set while it launches: ``pdl.PREFILL_MAX_TOKENS`` (``chain_tokens``),
    ``prefill_mma.GEMM2_WAITS_MAX_TOKENS`` (``waits_tokens``; it carries the persistent
    GEMM1), ``align.SINGLE_PROGRAM_SLOTS`` (``one_program_slots``: the one-program
    alignment's bound outside the PDL chain) and ``align.SINGLE_PROGRAM_CHAIN_SLOTS``
    (``chain_one_program_slots``: inside it); None keeps the shipped value."""
    from contextlib import ExitStack

    from w4a16moe.kernels import align, pdl, prefill_mma

    gates = ((pdl, "PREFILL_MAX_TOKENS", chain_tokens),
             (prefill_mma, "GEMM2_WAITS_MAX_TOKENS", waits_tokens),
             (align, "SINGLE_PROGRAM_SLOTS", one_program_slots),
             (align, "SINGLE_PROGRAM_CHAIN_SLOTS", chain_one_program_slots))
    with ExitStack() as stack:
        for module, name, value in gates:
            if value is not None:
                stack.enter_context(mock.patch.object(module, name, value))
        if table is not None:
            return _table_layer(table, hidden_states, experts, topk_weights, topk_ids,
                                activation)
        return shipped_layer(hidden_states, experts, topk_weights, topk_ids,
                             activation=activation)


def prefill_gemm2_waits_per_block_to_96_tokens(hidden_states, experts, topk_weights,
                                               topk_ids, *, activation="silu"):
    """The shipped layer with the per-block wait up to 96 tokens (in session 35's first runs,
    with the PDL chain still stopping at 64 tokens, this changed no launch past 64)."""
    return _with_gates(hidden_states, experts, topk_weights, topk_ids, activation,
                       waits_tokens=96)


def prefill_gemm2_waits_per_block_to_48_tokens(hidden_states, experts, topk_weights,
                                               topk_ids, *, activation="silu"):
    """The shipped layer with the per-block wait only up to 48 tokens (the gate of sessions
    33-34)."""
    return _with_gates(hidden_states, experts, topk_weights, topk_ids, activation,
                       waits_tokens=48)


def prefill_chain_to_256_tokens(hidden_states, experts, topk_weights, topk_ids, *,
                                activation="silu"):
    """The shipped layer with the PDL chain up to 256 tokens."""
    return _with_gates(hidden_states, experts, topk_weights, topk_ids, activation,
                       chain_tokens=256)


def prefill_chain_to_256_tokens_waits_to_96(hidden_states, experts, topk_weights, topk_ids,
                                            *, activation="silu"):
    """The shipped layer with the PDL chain up to 256 tokens and the per-block wait up to
    96."""
    return _with_gates(hidden_states, experts, topk_weights, topk_ids, activation,
                       chain_tokens=256, waits_tokens=96)


def prefill_chain_to_128_tokens(hidden_states, experts, topk_weights, topk_ids, *,
                                activation="silu"):
    """The shipped layer with the PDL chain up to 128 tokens."""
    return _with_gates(hidden_states, experts, topk_weights, topk_ids, activation,
                       chain_tokens=128)


def prefill_chain_and_waits_to_128_tokens(hidden_states, experts, topk_weights, topk_ids,
                                          *, activation="silu"):
    """The shipped layer with the PDL chain and the per-block wait up to 128 tokens."""
    return _with_gates(hidden_states, experts, topk_weights, topk_ids, activation,
                       chain_tokens=128, waits_tokens=128)


def prefill_chain_and_waits_to_64_tokens(hidden_states, experts, topk_weights, topk_ids,
                                         *, activation="silu"):
    """The shipped layer with the PDL chain and the per-block wait only up to 64 tokens
    (the gates after session 35's first commit)."""
    return _with_gates(hidden_states, experts, topk_weights, topk_ids, activation,
                       chain_tokens=64, waits_tokens=64)


def prefill_session34_layer(hidden_states, experts, topk_weights, topk_ids, *,
                            activation="silu"):
    """The prefill layer as session 34 left it: its config table
    (:func:`table_before_session35`; session 35's A/B named b26b9a0's file in
    ``$W4A16MOE_AB_TABLE``, the same entries), the PDL chain up to 64 tokens and the
    per-block wait up to 48 (the alignment's bound in the chain changes nothing there: 64
    tokens of a built-in model are at most 512 slots)."""
    return _with_gates(hidden_states, experts, topk_weights, topk_ids, activation,
                       chain_tokens=64, waits_tokens=48, table=_table_before_session35_file())


def prefill_table_before_session35(hidden_states, experts, topk_weights, topk_ids, *,
                                   activation="silu"):
    """The shipped layer on the H100 table's entries as session 34 left them
    (:func:`table_before_session35`): session 35's table A/B, for a GPU that has not run it."""
    return _table_layer(_table_before_session35_file(), hidden_states, experts, topk_weights,
                        topk_ids, activation)


def prefill_align_one_program_to_1024_slots(hidden_states, experts, topk_weights, topk_ids,
                                            *, activation="silu"):
    """The shipped layer with the one-program alignment up to 1024 slots on every launch
    (session 35's A/B; since then the default in the PDL chain,
    ``align.SINGLE_PROGRAM_CHAIN_SLOTS``, so this differs from the shipped layer only past
    the chain's 120 tokens)."""
    return _with_gates(hidden_states, experts, topk_weights, topk_ids, activation,
                       one_program_slots=1024)


def prefill_align_three_kernels_past_512_slots(hidden_states, experts, topk_weights,
                                               topk_ids, *, activation="silu"):
    """The shipped layer with the alignment's three kernels past 512 slots in the PDL chain
    too (``align.SINGLE_PROGRAM_CHAIN_SLOTS`` 512 while it launches: the layer before
    session 35's change)."""
    return _with_gates(hidden_states, experts, topk_weights, topk_ids, activation,
                       chain_one_program_slots=512)


def prefill_gemm1_program_a_tile(hidden_states, experts, topk_weights, topk_ids, *,
                                 activation="silu"):
    """The shipped prefill layer with GEMM2 waiting per block and GEMM1 on a grid of one
    program a tile, sized for the most blocks the routing could need
    (``prefill_mma.GEMM1_PERSISTENT`` off while it launches: the layer of session 33)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         GEMM2_WAITS_PER_BLOCK=True, GEMM1_PERSISTENT=False)


def prefill_gemm2_waits_for_gemm1(hidden_states, experts, topk_weights, topk_ids, *,
                                  activation="silu"):
    """The shipped prefill layer with GEMM2's programs waiting for all of GEMM1
    (``griddepcontrol.wait``; ``prefill_mma.GEMM2_WAITS_PER_BLOCK`` off while it launches: the
    layer before session 33)."""
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         GEMM2_WAITS_PER_BLOCK=False)


def _topk_sum_tiles(block_n: int, warps: int):
    def path(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
        with mock.patch.multiple(prefill_mod, TOPK_SUM_BLOCK_N=block_n, TOPK_SUM_WARPS=warps):
            return shipped_layer(hidden_states, experts, topk_weights, topk_ids,
                                 activation=activation)

    path.__name__ = path.__qualname__ = f"prefill_topk_sum_{block_n}_columns"
    path.__doc__ = (f"The shipped prefill layer with {block_n}-column top-k sum programs on "
                    f"{warps} warp(s) while it launches (``prefill.TOPK_SUM_BLOCK_N`` and "
                    "``TOPK_SUM_WARPS``; 1024 on 4 before session 39, 256 on 1 since).")
    return path


prefill_topk_sum_256_columns = _topk_sum_tiles(256, 1)
prefill_topk_sum_512_columns = _topk_sum_tiles(512, 2)
prefill_topk_sum_1024_columns = _topk_sum_tiles(1024, 4)


def _route_align_layer(enabled: bool, hidden_states, experts, router_logits, *,
                       activation="silu", top_k: int, **routing):
    """The shipped layer from the router logits
    (:func:`~w4a16moe.kernels.prefill.fused_moe_prefill_from_logits`) with
    ``prefill.ROUTE_ALIGN`` = ``enabled`` while it launches."""
    with mock.patch.object(prefill_mod, "ROUTE_ALIGN", enabled):
        return fused_moe_prefill_from_logits(
            hidden_states, experts, router_logits, top_k, activation=activation,
            workspace=prefill_workspace(experts, hidden_states.shape[0], top_k), **routing)


def prefill_route_align(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
    """The shipped layer; its layer time routes the logits and aligns the slots in one
    program (``fused_topk_align``, session 38) where it can. Against
    :func:`prefill_route_then_align` (the router, then the one-program alignment, the layer
    before session 38). The other paths of this module time their layer as ``shipped_layer``
    does, after ``fused_topk``, so their A/Bs against ``shipped_layer`` stay like for like."""
    return shipped_layer(hidden_states, experts, topk_weights, topk_ids, activation=activation)


def prefill_route_then_align(hidden_states, experts, topk_weights, topk_ids, *,
                             activation="silu"):
    """:func:`prefill_route_align` with ``prefill.ROUTE_ALIGN`` off: the router, then the
    layer's own alignment."""
    return shipped_layer(hidden_states, experts, topk_weights, topk_ids, activation=activation)


prefill_route_align.from_logits = functools.partial(_route_align_layer, True)
prefill_route_then_align.from_logits = functools.partial(_route_align_layer, False)


def _one_slab_configs(experts, top_k: int, m: int) -> tuple[dict, dict]:
    """The shipped table's configs with each 4-warp ``MMA`` entry of two 16-row slabs a warp
    cut to one (``BLOCK_SIZE_N`` halved: twice the programs, a third fewer registers)."""
    from w4a16moe.kernels.prefill import layer_configs

    out = []
    for cfg, gate in zip(layer_configs(experts, top_k, m), (2, 1), strict=True):
        rows = gate * cfg["BLOCK_SIZE_N"]
        if cfg.get("MMA") and cfg["num_warps"] == 4 and rows == 2 * 16 * 4:
            cfg = {**cfg, "BLOCK_SIZE_N": cfg["BLOCK_SIZE_N"] // 2}
        out.append(cfg)
    return tuple(out)


def prefill_one_slab(hidden_states, experts, topk_weights, topk_ids, *, activation="silu"):
    """The shipped prefill layer with its 4-warp mma tiles of two slabs a warp cut to one
    (:func:`_one_slab_configs`)."""
    m, top_k = topk_ids.shape
    return shipped_layer(hidden_states, experts, topk_weights, topk_ids,
                         activation=activation, configs=_one_slab_configs(experts, top_k, m))


def prefill_one_slab_activations_at_step(hidden_states, experts, topk_weights, topk_ids, *,
                                         activation="silu"):
    """:func:`prefill_one_slab` with :func:`prefill_activations_at_step`'s loads (72
    registers a thread on GEMM1's one-slab 4-warp tile)."""
    m, top_k = topk_ids.shape
    return _shipped_with(hidden_states, experts, topk_weights, topk_ids, activation,
                         configs=_one_slab_configs(experts, top_k, m), ACTIVATIONS_AHEAD=False)


prefill_word_ring2 = _ring_everywhere(2)
prefill_word_ring3 = _ring_everywhere(3)
prefill_word_ring4 = _ring_everywhere(4)


__all__ = ["VARIANTS", "add_switch_argument", "apply_switches", "block_slots", "mma_a", "mma_b",
           "mma_c", "mma_configs", "mma_d", "mma_g2", "mma_g2c", "mma_g2s", "mma_g4", "mma_g4d",
           "prefill_activations_at_step", "prefill_one_slab",
           "prefill_one_slab_activations_at_step", "prefill_reload_past_last",
           "prefill_ring_pieces", "prefill_ring_whole_runs", "prefill_rotated_k",
           "prefill_route_align", "prefill_route_then_align",
           "prefill_topk_sum_1024_columns", "prefill_topk_sum_256_columns",
           "prefill_topk_sum_512_columns",
           "prefill_unrotated_k", "prefill_wait_first", "prefill_word_ring2",
           "prefill_word_ring3", "prefill_word_ring4", "prefill_word_ring_max8",
           "prefill_words_in_registers", "prefill_workspace", "ship_g1_mma_g2", "shipped_layer",
           "step_columns", "table_layer"]
