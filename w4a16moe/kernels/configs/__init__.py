"""Tuned launch configurations of the prefill kernel, one JSON file per GPU name.

File ``<torch.cuda.get_device_name() with spaces as underscores>.json`` in this directory::

    {
      "_meta": {...},                           # optional, ignored (keys starting with "_")
      "N,K": {                                  # weight rows N (2I for w13) and reduction K
        "256": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64,
                "GROUP_SIZE_M": 8, "num_warps": 4, "num_stages": 4},
        "4096": {...}                           # keyed by the token count M (nearest wins)
      }
    }

Entries may also hold ``"SWAP_AB"`` (boolean), ``"DEQUANT"`` (0, 1 or 2), ``"FRAG_K"``
(boolean: weight tiles in fragment order, see ``common.fragment_order``), ``"RS"``
(boolean: the register-operand Gluon kernel of ``prefill_rs`` on Hopper), ``"SORTED_ROWS"``
``"PREFETCH_SCALES"``, ``"PAIRED_STAGES"``, ``"STREAM_K"`` and ``"SCALE_ACC"`` (booleans for
that kernel), ``"SUB_STEPS"`` (1 or 2, with ``SCALE_ACC``), ``"SHORT_BLOCK_T"`` (16, 32, 64
or 128, below ``BLOCK_SIZE_M``) and ``"QUARTER_BLOCKS"`` (boolean, with ``SHORT_BLOCK_T`` half
the block; see :data:`OPTIONAL_KEYS`),
``"SPLIT_K"`` (1, 2, 4 or 8, GEMM2 entries: K split over that many programs) and
``"DENSE"`` (boolean, read from GEMM1's entry: dequantize + ``torch._grouped_mm`` for the
whole layer).
A missing file, an unknown shape or a malformed file (which warns, naming the file and the
problem) fall back to :func:`heuristic_config`; nothing here raises for a bad file.

A GPU without its own files borrows those of a *sibling*: a GPU of the same compute
capability and multiprocessor count, recorded under ``"_meta": {"gpu": {...}}`` of each file
(:func:`tuned_file`; it warns once, naming both GPUs). The tiles fit the same SMs: a 132-SM
Hopper card without files runs the H100's table instead of the generic heuristic. The H200
has its own files: its thresholds, and a table that began as a copy of the H100's with the
entries measured on the H200 changed (its ``_meta`` says which). The H100's table still
holds a few entries measured on an H200 before that (sessions 35 and 41; its ``_meta`` says
which).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps",
               "num_stages")
#: optional keys and their allowed values: SWAP_AB puts the weight tile on the wgmma M side;
#: DEQUANT 0 int->float conversion, 1 exponent trick in Triton ops, 2 the same in PTX;
#: FRAG_K builds the weight tile in fragment order (BLOCK_SIZE_K >= 32, num_warps <= 4:
#: with two warpgroups per program Triton 3.6 gave sporadic wrong elements on the H100,
#: see benchmarks/notes_prefill.md, session 5);
#: DENSE (GEMM1's entry only) runs the layer as dequantize-to-16-bit + torch._grouped_mm
#: where that measured faster (few large experts at large M; see kernels/prefill.py)
#: RS runs the register-operand Gluon kernel on Hopper (kernels/prefill_rs.py): SWAP_AB
#: tiles on two or four consumer warpgroups (num_warps 8 or 16), activations in natural
#: order (no FRAG_K); where that kernel does not apply (other GPUs, no Gluon, unsupported
#: options) the same tiles run on the Triton kernel
#: SORTED_ROWS: this GEMM reads its activations as rows in sorted order (``prefill_gemm``'s
#: a_sorted), which the Gluon kernel loads with one TMA copy per K step instead of gathering
#: them row by row: on GEMM1's entry the layer first copies the hidden states into that order
#: (``gather_sorted_rows``), on GEMM2's GEMM1 writes its output so (see fused_moe_prefill)
#: PREFETCH_SCALES (RS entries): the Gluon kernel loads each step pair's scales one loop
#: iteration ahead, hiding their latency at the cost of a few registers (faster for some
#: tiles, slower for others: benchmarks/notes_prefill.md, session 12); the Triton kernel
#: ignores it
#: SPLIT_K (GEMM2 entries): K split into that many ranges, each range of each tile one
#: program of the Gluon kernel, float32 partial sums added by the top-k sum; for few tokens,
#: whose few experts make fewer tiles than the GPU has SMs (benchmarks/notes_prefill.md,
#: session 13); where the Gluon kernel does not run, the Triton kernel writes the whole sum
#: into the first partial
#: PAIRED_STAGES (RS entries): each ring stage of the Gluon kernel holds two K steps
#: (num_stages counts such pairs), so every weight row is read in runs of BLOCK_SIZE_K / 2
#: bytes instead of BLOCK_SIZE_K / 4: HBM streams 64-byte runs at about two thirds of the
#: rate of 128-byte ones (benchmarks/notes_prefill.md, session 19); the Triton kernel
#: ignores it
#: STREAM_K (RS entries, GROUP_SIZE_M 1, no SPLIT_K): the Gluon kernel's programs take whole
#: tiles round by round, then split the last round's tiles by K steps (Stream-K) when that
#: round would leave SMs idle long enough to pay for it; a tile split between programs is
#: summed from float32 partials by the program that completes it (benchmarks/notes_prefill.md,
#: session 21); the Triton kernel ignores it
#: SCALE_ACC (RS entries, BLOCK_SIZE_M <= 64): the Gluon kernel multiplies each K step's
#: float32 partial sum by the step's scales instead of every dequantized value pair (the
#: operand is the exact ``v - z``; 14 % fewer instructions in the 16-slot tiles' loop), and
#: waits for each step's wgmma: on sixteen warps, 4-10 % faster 16-slot layers on the H200
#: (benchmarks/notes_prefill.md, session 45); PREFETCH_SCALES does not apply to it; the
#: Triton kernel ignores it
#: SUB_STEPS (SCALE_ACC entries, BLOCK_SIZE_K >= 64): each K step as that many wgmmas of
#: BLOCK_SIZE_K / SUB_STEPS columns into the step's partial sum, each from an operand of
#: that width: half the operand registers, so that 32-slot tiles fit sixteen warps
#: (benchmarks/notes_prefill.md, session 46); the Triton kernel ignores it
#: SHORT_BLOCK_T (RS entries, below BLOCK_SIZE_M): a block whose real slots all lie in its
#: first SHORT_BLOCK_T positions (an expert's last or only block, part empty) runs
#: SHORT_BLOCK_T-column wgmmas on those alone, from the same staged tiles: it costs its
#: dequantization and SHORT_BLOCK_T / BLOCK_SIZE_M of the multiply-adds of a full block (on
#: the H200, Mixtral's 64-slot tiles ran a third slower than 32-slot ones on the same eight
#: blocks: benchmarks/notes_prefill.md, session 49; tried at large M in session 24, not taken
#: then); the short blocks' K loop retires each step's wgmma before the next (so the full
#: loop keeps its registers: session 50); a STREAM_K launch that cuts runs its pieces on all
#: columns; the Triton kernel ignores it
#: QUARTER_BLOCKS (with SHORT_BLOCK_T half of a BLOCK_SIZE_M of 32 or more): two more widths
#: for such blocks, a quarter of the block and three quarters (a half-width and a
#: quarter-width wgmma from the same operand registers, so one dequantization): the
#: multiply-adds follow the block's real slots to a quarter of the tile instead of a half
#: (benchmarks/notes_prefill.md, session 51); the Triton kernel ignores it
#: MMA: the ``mma.sync`` kernel of :mod:`~w4a16moe.kernels.prefill_mma` (weights streamed into
#: registers in a K order where each lane owns whole words; blocks of 8-32 slots, K steps of
#: BLOCK_SIZE_K = 128, 256 or 512 columns; GROUP_SIZE_M and num_stages are not used); where it
#: cannot run, the Triton kernel runs the same entry
#: WORD_RING (MMA entries): stages of that kernel's ``cp.async`` ring of weight words (2 or 3:
#: one or two K steps ahead in shared memory; 0: two steps ahead in registers), in place of
#: its rule by step count (``prefill_mma.word_ring_stages``); for Mixtral's 56-step GEMM2 at
#: 2-4 tokens, where how many one-warp programs fit an SM at once sets the time
#: (benchmarks/notes_prefill.md, session 41)
OPTIONAL_KEYS = {"SWAP_AB": (True, False), "DEQUANT": (0, 1, 2), "FRAG_K": (True, False),
                 "DENSE": (True, False), "RS": (True, False), "MMA": (True, False),
                 "SORTED_ROWS": (True, False),
                 "PREFETCH_SCALES": (True, False), "SPLIT_K": (1, 2, 4, 8),
                 "PAIRED_STAGES": (True, False), "STREAM_K": (True, False),
                 "SCALE_ACC": (True, False), "SUB_STEPS": (1, 2), "WORD_RING": (0, 2, 3),
                 "SHORT_BLOCK_T": (16, 32, 64, 128), "QUARTER_BLOCKS": (True, False)}
#: SCALE_ACC: the largest BLOCK_SIZE_M (a second float32 accumulator for the step's partial
#: sum must fit the consumer's registers next to the tile's)
SCALE_ACC_MAX_BLOCK_M = 64

#: FRAG_K configs run on one warpgroup of the Triton kernel (see OPTIONAL_KEYS)
MAX_FRAG_WARPS = 4
#: RS configs: the Gluon kernel's two or four consumer warpgroups
RS_WARPS = (8, 16)

#: file name suffixes: prefill configs, and the decode/prefill thresholds of
#: :mod:`w4a16moe.experts`
CONFIGS_SUFFIX = ".json"
THRESHOLDS_SUFFIX = "_thresholds.json"
#: ``_meta`` key of a tuned file naming the GPU it was tuned on:
#: ``{"name": ..., "capability": [major, minor], "multiprocessors": n}``
GPU_META_KEY = "gpu"
#: let a GPU without its own files use a sibling's (:func:`tuned_file`); benchmarks turn it
#: off to time the heuristic fallback
BORROW_SIBLING_FILES = True

#: the one config used under the Triton interpreter (CPU): small blocks keep tests fast
INTERPRETER_CONFIG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32,
                      "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 1}


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def validate_config(config: object) -> dict:
    """Check one config entry; return a clean copy or raise ValueError saying what is wrong."""
    if not isinstance(config, dict):
        raise ValueError(f"config is {type(config).__name__}; expected an object")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"config lacks {missing}")
    unknown = [k for k in config if k not in CONFIG_KEYS and k not in OPTIONAL_KEYS]
    if unknown:
        raise ValueError(f"config has unknown keys {unknown}")
    out: dict = {}
    for key in CONFIG_KEYS:
        v = config[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{key} is {v!r}; expected a positive int")
        out[key] = v
    for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps"):
        if not _is_pow2(out[key]):
            raise ValueError(f"{key} is {out[key]}; expected a power of two")
    if out["BLOCK_SIZE_K"] < 16:
        raise ValueError(f"BLOCK_SIZE_K is {out['BLOCK_SIZE_K']}; expected >= 16")
    if config.get("FRAG_K") is True and out["BLOCK_SIZE_K"] < 32:
        raise ValueError(f"FRAG_K needs BLOCK_SIZE_K >= 32; found {out['BLOCK_SIZE_K']}")
    rs = config.get("RS") is True
    if rs and (config.get("FRAG_K") is True or config.get("SWAP_AB", True) is not True
               or out["num_warps"] not in RS_WARPS):
        raise ValueError(f"RS needs SWAP_AB, num_warps in {RS_WARPS} and no FRAG_K; found "
                         f"SWAP_AB={config.get('SWAP_AB', True)}, num_warps="
                         f"{out['num_warps']}, FRAG_K={config.get('FRAG_K')}")
    if rs and config.get("MMA") is True:
        raise ValueError("RS and MMA name two different kernels; expected at most one")
    if config.get("FRAG_K") is True and out["num_warps"] > MAX_FRAG_WARPS:
        raise ValueError(f"FRAG_K needs num_warps <= {MAX_FRAG_WARPS} (one warpgroup); found "
                         f"{out['num_warps']}: with more warps the compiled kernel gave wrong "
                         "results on the H100 (Triton 3.6)")
    for key, allowed in OPTIONAL_KEYS.items():
        if key in config:
            v = config[key]
            if type(v) is not type(allowed[0]) or v not in allowed:
                raise ValueError(f"{key} is {v!r}; expected one of {list(allowed)}")
            out[key] = v
    if "WORD_RING" in out and out.get("MMA") is not True:
        raise ValueError(f"WORD_RING is {out['WORD_RING']} without MMA; expected it only on "
                         "MMA entries (the stages of that kernel's ring of weight words)")
    if out.get("SCALE_ACC") and (out.get("RS") is not True
                                 or out["BLOCK_SIZE_M"] > SCALE_ACC_MAX_BLOCK_M):
        raise ValueError(f"SCALE_ACC needs RS and BLOCK_SIZE_M <= {SCALE_ACC_MAX_BLOCK_M}; "
                         f"found RS={out.get('RS')}, BLOCK_SIZE_M={out['BLOCK_SIZE_M']}")
    if out.get("SUB_STEPS", 1) > 1 and (not out.get("SCALE_ACC")
                                         or out["BLOCK_SIZE_K"] // out["SUB_STEPS"] < 32):
        raise ValueError(f"SUB_STEPS {out['SUB_STEPS']} needs SCALE_ACC and BLOCK_SIZE_K / "
                         f"SUB_STEPS >= 32; found SCALE_ACC={out.get('SCALE_ACC')}, "
                         f"BLOCK_SIZE_K={out['BLOCK_SIZE_K']}")
    if out.get("STREAM_K") and (why := stream_k_conflict(out)) is not None:
        raise ValueError(why)
    if "SHORT_BLOCK_T" in out and (out.get("RS") is not True
                                   or out["SHORT_BLOCK_T"] >= out["BLOCK_SIZE_M"]):
        raise ValueError(f"SHORT_BLOCK_T needs RS and a BLOCK_SIZE_M above it; found "
                         f"SHORT_BLOCK_T={out['SHORT_BLOCK_T']}, RS={out.get('RS')}, "
                         f"BLOCK_SIZE_M={out['BLOCK_SIZE_M']}")
    if out.get("QUARTER_BLOCKS") and (out.get("SHORT_BLOCK_T", 0) * 2 != out["BLOCK_SIZE_M"]
                                      or out["BLOCK_SIZE_M"] < 32):
        raise ValueError(f"QUARTER_BLOCKS needs SHORT_BLOCK_T half of a BLOCK_SIZE_M of 32 or "
                         f"more; found SHORT_BLOCK_T={out.get('SHORT_BLOCK_T')}, "
                         f"BLOCK_SIZE_M={out['BLOCK_SIZE_M']}")
    return out


def scale_acc_wgmmas(config: dict) -> int:
    """The Gluon kernel's ``SCALE_ACC`` for ``config``: 0 without the config key, else the
    wgmmas a K step is cut into (``SUB_STEPS``, default 1)."""
    return config.get("SUB_STEPS", 1) if config.get("SCALE_ACC") else 0


def short_block_rows(config: dict) -> int:
    """The Gluon kernel's ``SHORT_T`` for ``config``: its ``SHORT_BLOCK_T``, or 0 without the
    key or where the entry runs at a ``BLOCK_SIZE_M`` not above it (GEMM2's entry runs at
    GEMM1's block size)."""
    short = config.get("SHORT_BLOCK_T", 0)
    return short if short < config["BLOCK_SIZE_M"] else 0


def quarter_block_rows(config: dict) -> int:
    """The Gluon kernel's ``QUARTER_T`` for ``config``: a quarter of its ``BLOCK_SIZE_M`` with
    ``QUARTER_BLOCKS`` where its ``SHORT_T`` (:func:`short_block_rows`) is half of it, else
    0 (GEMM2's entry runs at GEMM1's block size)."""
    bt = config["BLOCK_SIZE_M"]
    if config.get("QUARTER_BLOCKS") and short_block_rows(config) * 2 == bt and bt >= 32:
        return bt // 4
    return 0


def stream_k_conflict(config: dict) -> str | None:
    """Why ``STREAM_K`` cannot go with ``config``'s other keys (it needs GROUP_SIZE_M 1 and
    no SPLIT_K: its programs already share a tile's K steps), or None if it can."""
    group, split = config.get("GROUP_SIZE_M", 1), config.get("SPLIT_K", 1)
    if group == 1 and split == 1:
        return None
    return (f"STREAM_K needs GROUP_SIZE_M 1 and no SPLIT_K; found GROUP_SIZE_M {group}, "
            f"SPLIT_K {split}")


def parse_table(data: object) -> dict[tuple[int, int], dict[int, dict]]:
    """Parse a config file's JSON object into ``{(N, K): {M: config}}``; ValueError if bad."""
    if not isinstance(data, dict):
        raise ValueError(f"top level is {type(data).__name__}; expected an object")
    table: dict[tuple[int, int], dict[int, dict]] = {}
    for shape, buckets in data.items():
        if shape.startswith("_"):
            continue
        parts = shape.split(",")
        try:
            n, k = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"key {shape!r} is not 'N,K'") from None
        if not isinstance(buckets, dict) or not buckets:
            raise ValueError(f"entry {shape!r} is not a non-empty object of M buckets")
        parsed: dict[int, dict] = {}
        for m, cfg in buckets.items():
            try:
                m_int = int(m)
            except ValueError:
                raise ValueError(f"entry {shape!r}: bucket {m!r} is not an integer M") from None
            try:
                parsed[m_int] = validate_config(cfg)
            except ValueError as exc:
                raise ValueError(f"entry {shape!r}, bucket {m!r}: {exc}") from None
        table[(n, k)] = parsed
    return table


@functools.lru_cache(maxsize=32)
def _load_table(path: str, mtime_ns: int) -> dict[tuple[int, int], dict[int, dict]]:
    """Read and parse ``path`` (cached per file version); warn and return {} when bad."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return parse_table(data)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"ignoring prefill config file {path}: {exc}; using heuristic configs",
                      RuntimeWarning, stacklevel=3)
        return {}


def device_config_filename(device: torch.device | str | int | None = None) -> str:
    """``NVIDIA_H100_80GB_HBM3.json`` for the GPU ``device``."""
    return gpu_file_name(torch.cuda.get_device_name(device))


def gpu_file_name(gpu_name: str, suffix: str = CONFIGS_SUFFIX) -> str:
    """The file name of a GPU's tuned file: its name, spaces and slashes as underscores."""
    return gpu_name.replace(" ", "_").replace("/", "_") + suffix


def gpu_traits(device: torch.device | str | int | None = None) -> dict:
    """What a tuned file records of its GPU (``_meta`` key :data:`GPU_META_KEY`): name,
    compute capability and multiprocessor count."""
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": [props.major, props.minor],
            "multiprocessors": props.multi_processor_count}


def recorded_gpu(path: str | os.PathLike) -> dict | None:
    """The ``_meta`` GPU record of a tuned file (:data:`GPU_META_KEY`), or None (no record,
    unreadable file)."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f).get("_meta", {})
        gpu = meta.get(GPU_META_KEY)
        if (isinstance(gpu, dict) and isinstance(gpu.get("name"), str)
                and isinstance(gpu.get("capability"), list)
                and isinstance(gpu.get("multiprocessors"), int)):
            return gpu
    except (OSError, ValueError, AttributeError):
        pass
    return None


def sibling_file(traits: dict, suffix: str = CONFIGS_SUFFIX,
                 config_dir: str | os.PathLike | None = None) -> Path | None:
    """A tuned file in ``config_dir`` (default :data:`CONFIG_DIR`; name ending in
    ``suffix``) of another GPU with the compute capability and multiprocessor count of
    ``traits`` (:func:`gpu_traits`); the first by file name, or None. Files without a GPU
    record never match."""
    for path in sorted(Path(config_dir or CONFIG_DIR).glob("*" + suffix)):
        if suffix == CONFIGS_SUFFIX and path.name.endswith(THRESHOLDS_SUFFIX):
            continue
        gpu = recorded_gpu(path)
        if (gpu is not None and gpu["name"] != traits["name"]
                and list(gpu["capability"]) == list(traits["capability"])
                and gpu["multiprocessors"] == traits["multiprocessors"]):
            return path
    return None


@functools.lru_cache(maxsize=64)
def _cached_sibling(name: str, capability: tuple[int, int], multiprocessors: int, suffix: str,
                    config_dir: str) -> Path | None:
    traits = {"name": name, "capability": list(capability), "multiprocessors": multiprocessors}
    return sibling_file(traits, suffix, config_dir)


@functools.lru_cache(maxsize=64)
def _warn_borrowed(name: str, path: str, what: str) -> None:
    gpu = recorded_gpu(Path(path)) or {}
    cap = ".".join(str(v) for v in gpu.get("capability", []))
    warnings.warn(f"no tuned {what} for {name}; using {path}, tuned on {gpu.get('name')} "
                  f"(same compute capability {cap} and {gpu.get('multiprocessors')} "
                  "multiprocessors). Run 'w4a16moe tune' on this GPU to make its own.",
                  RuntimeWarning, stacklevel=4)


def resolve_tuned_file(device: torch.device | str | int | None = None,
                       suffix: str = CONFIGS_SUFFIX,
                       config_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """``(path, source)`` of the tuned file (``suffix``: :data:`CONFIGS_SUFFIX` or
    :data:`THRESHOLDS_SUFFIX`) for ``device``: ``"own"``, its own file; ``"sibling"``, with
    :data:`BORROW_SIBLING_FILES`, a sibling GPU's (:func:`sibling_file`); ``"none"``, its
    own path, which does not exist (the callers fall back and say so)."""
    t = gpu_traits(device)
    config_dir = Path(config_dir or CONFIG_DIR)
    own = config_dir / gpu_file_name(t["name"], suffix)
    if own.exists():
        return own, "own"
    if BORROW_SIBLING_FILES:
        sibling = _cached_sibling(t["name"], tuple(t["capability"]), t["multiprocessors"],
                                  suffix, str(config_dir))
        if sibling is not None:
            return sibling, "sibling"
    return own, "none"


def tuned_file(device: torch.device | str | int | None = None,
               suffix: str = CONFIGS_SUFFIX,
               config_dir: str | os.PathLike | None = None) -> Path:
    """The path of :func:`resolve_tuned_file`, warning once per GPU and file kind when it
    is a sibling's."""
    path, source = resolve_tuned_file(device, suffix, config_dir)
    if source == "sibling":
        _warn_borrowed(gpu_traits(device)["name"], str(path),
                       "decode thresholds" if suffix == THRESHOLDS_SUFFIX
                       else "prefill configs")
    return path


def _interpreted(device: torch.device) -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda"


def heuristic_config(m: int, n: int, k: int, num_experts: int, top_k: int) -> dict:
    """Config for shapes without a tuned entry, from the rows per expert ``m*top_k/E``.

    From the H100 tuning (benchmarks/notes_prefill.md): BLOCK_SIZE_M 32 up to ~24 rows per
    expert, 64 up to 64 rows, then 128; the weight tile on the wgmma M side (SWAP_AB) with
    BLOCK_SIZE_N 64, BLOCK_SIZE_K 64, 4 warps, 4 stages won GEMM1 (w13, fused activation) at
    every size. GEMM2 prefers 128x128 tiles with 8 warps at large M; a tuned file knows.
    """
    rows = m * top_k / max(num_experts, 1)
    if rows <= 4:
        bm = 16
    elif rows <= 24:
        bm = 32
    elif rows <= 64:
        bm = 64
    else:
        bm = 128
    return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64,
            "GROUP_SIZE_M": 1 if rows <= 64 else 8, "num_warps": 4, "num_stages": 4,
            "SWAP_AB": True}


@functools.lru_cache(maxsize=32)
def _warn_missing(path: str) -> None:
    warnings.warn(f"no tuned prefill configs for this GPU (no file {path}); using heuristic "
                  "configs. Run 'w4a16moe tune --model NAME' to make one.", RuntimeWarning,
                  stacklevel=4)


def lookup_config(path: str | os.PathLike, m: int, n: int, k: int, num_experts: int,
                  top_k: int) -> dict:
    """The entry of ``"n,k"`` in the config file ``path`` whose M bucket is nearest ``m``
    (ties: the smaller bucket); :func:`heuristic_config` when the file is missing (warns once
    per file), malformed (warns once per file version) or lacks the shape."""
    path = Path(path)
    table: dict = {}
    if path.exists():
        table = _load_table(str(path), path.stat().st_mtime_ns)
    else:
        _warn_missing(str(path))
    buckets = table.get((n, k))
    if buckets:
        best = min(buckets, key=lambda b: (abs(b - m), b))
        return dict(buckets[best])
    return heuristic_config(m, n, k, num_experts, top_k)


def get_prefill_config(m: int, n: int, k: int, num_experts: int, top_k: int,
                       dtype: torch.dtype, device: torch.device | str,
                       config_file: str | os.PathLike | None = None) -> dict:
    """Launch config of one prefill GEMM: ``m`` tokens, weights ``[num_experts, n, k]``.

    Under the Triton interpreter (or on a CPU tensor) returns :data:`INTERPRETER_CONFIG`.
    Otherwise :func:`lookup_config` in ``config_file`` (default: :func:`tuned_file`, this
    directory's file for the GPU, or a sibling GPU's). ``dtype`` is accepted for future
    per-dtype tables (fp16 and bf16 share one today).
    """
    device = torch.device(device)
    if _interpreted(device):
        return dict(INTERPRETER_CONFIG)
    if config_file is None:
        config_file = tuned_file(device)
    return lookup_config(config_file, m, n, k, num_experts, top_k)


__all__ = ["BORROW_SIBLING_FILES", "CONFIGS_SUFFIX", "CONFIG_DIR", "CONFIG_KEYS",
           "GPU_META_KEY", "INTERPRETER_CONFIG", "THRESHOLDS_SUFFIX", "device_config_filename",
           "get_prefill_config", "gpu_file_name", "gpu_traits", "heuristic_config",
           "lookup_config", "parse_table", "recorded_gpu", "resolve_tuned_file",
           "quarter_block_rows", "short_block_rows", "sibling_file", "stream_k_conflict",
           "tuned_file", "validate_config"]
