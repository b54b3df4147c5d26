"""Device microbenchmark: how fast can *any* kernel chain read one MoE layer's int4 weights?

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/layer_read_bound.py --out $OUT \
        [--cases qwen3-30b-a3b:1,mixtral-8x7b:4] [--no-layer]

Question (issue #4, RESULTS.md): the hybrid layer's targets ask for <= 1.3x the byte floor
(layer bytes / the 2.94 TB/s of a 2 GiB streaming read) at every M <= 64. At qwen3-30b M=1
the layer reads 19.5 MB, the floor is 6.6 us and 1.3x of it is 8.6 us, router included. Is
that reachable by a kernel that does nothing but read the same bytes with the same
dependencies, or does a read of that size not stream at 2.94 TB/s at all?

Each "read" kernel below moves exactly the bytes the floor counts for one GEMM's weights:
program ``p`` takes unit ``p // tiles`` (a routed slot or a distinct expert), loads the
unit's expert id from a device tensor (the dependent round trip every expert kernel has),
then reads ``ROWS`` rows of that expert's packed words ``[N, K/8]`` int32, ``CHUNK`` words a
row per step (``tl.range`` pipelined, ``STAGES`` steps in flight) and the rows' scales
``[N, K/G]`` (16-bit), XORs them and stores one int32. No arithmetic, no intermediate, no
top-k sum: every variant is a lower bound on a real kernel with the same launch structure.

Variants, each timed under a CUDA graph with cold L2 (weight copies rotated, each copy with
its own routing), every tile config in a sweep, the best kept:

* ``gemm1`` / ``gemm2``: one read kernel over one GEMM's slabs of the *distinct* experts
  (the floor's bytes, u experts);
* ``two_reads``: the best gemm1 read then the best gemm2 read, two dependent launches (the
  two-kernel structure of the decode and prefill paths, without the router);
* ``router_two_reads``: the library's router (``fused_topk`` on ``[M, E]`` logits) then
  the two reads of the distinct experts (ids computed beforehand: the prefill path's
  alignment kernel is left out, so this bounds that path from below);
* ``router_two_reads_slots``: the router then the two reads over the router's slots
  (``M * top_k`` units, an expert read once per slot that routes to it, as the decode
  kernels do): the decode path's launch chain;
* ``one_read``: both GEMMs' slabs of the distinct experts in one launch;
* ``torch_sum``: ``torch.sum`` over one contiguous bf16 buffer of the floor's bytes (no
  expert ids, no scattered slabs): what a library reduction reaches at this size.

With the layer also timed (``HybridW4A16MoEExperts`` path of ``w4a16moe bench``, router
included, same process, its own routing and so its own floor ``layer_floor_us``), the
records say, per (model, M): floor, each bound, the layer, and each over its floor. Every
timing holds about 1 ms of calls per graph replay (``MIN_REPLAY_US``).
``$OUT/layer_read_bound.json`` holds them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import write_records  # noqa: E402

from w4a16moe.bench.floors import layer_floor  # noqa: E402
from w4a16moe.bench.models import get_shape  # noqa: E402
from w4a16moe.bench.timing import copies_for, measure_device, time_calls  # noqa: E402
from w4a16moe.routing import fused_topk  # noqa: E402

# (ROWS, CHUNK words, num_warps); each with every STAGES of SWEEP_STAGES
SWEEP_TILES = ((8, 32, 1), (16, 32, 1), (16, 64, 1), (16, 128, 1), (16, 32, 2), (32, 32, 2),
               (32, 64, 2), (32, 128, 2), (64, 32, 4), (64, 64, 4), (128, 32, 4), (128, 16, 4),
               (256, 32, 8))
SWEEP_STAGES = (2, 4, 6)
#: a replay holds about this much work (calls repeated): the ~3 us gap between two replays
MIN_REPLAY_US = 1000.0


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _read_unit(w_ptr, s_ptr, e, tile, KW, KG, stride_we, stride_se,
               ROWS: tl.constexpr, CHUNK: tl.constexpr, KG_P2: tl.constexpr,
               STAGES: tl.constexpr):
    """XOR of rows ``tile*ROWS ..`` of expert ``e``'s words ``[N, KW]`` and scales
    ``[N, KG]`` (read as int16)."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    g = tl.arange(0, KG_P2)
    sc = tl.load(s_ptr + e * stride_se + rows[:, None] * KG + g[None, :],
                 mask=g[None, :] < KG, other=0)
    ptrs = w_ptr + e * stride_we + rows[:, None] * KW + tl.arange(0, CHUNK)[None, :]
    acc = tl.zeros([ROWS, CHUNK], dtype=tl.int32)
    for kw in tl.range(0, KW, CHUNK, num_stages=STAGES):
        acc ^= tl.load(ptrs + kw)
    return tl.reduce(tl.reduce(acc, 1, _xor), 0, _xor) ^ tl.reduce(
        tl.reduce(sc.to(tl.int32), 1, _xor), 0, _xor)


@triton.jit
def _read_slabs(w_ptr, s_ptr, ids_ptr, out_ptr, TILES, KW, KG, stride_we, stride_se,
                ROWS: tl.constexpr, CHUNK: tl.constexpr, KG_P2: tl.constexpr,
                STAGES: tl.constexpr):
    """Program ``p`` reads tile ``p % TILES`` (``ROWS`` rows) of expert ``ids[p // TILES]``:
    words ``w [E, N, KW]`` int32 and scales ``s [E, N, KG]`` 16-bit; stores one int32."""
    pid = tl.program_id(0)
    e = tl.load(ids_ptr + pid // TILES).to(tl.int64)
    r = _read_unit(w_ptr, s_ptr, e, pid % TILES, KW, KG, stride_we, stride_se,
                   ROWS, CHUNK, KG_P2, STAGES)
    tl.store(out_ptr + pid, r)


@triton.jit
def _read_both(w1_ptr, s1_ptr, w2_ptr, s2_ptr, ids_ptr, out_ptr, UNITS, TILES1, TILES2,
               KW1, KG1, KW2, KG2, stride_w1, stride_s1, stride_w2, stride_s2,
               ROWS: tl.constexpr, CHUNK: tl.constexpr, KG1_P2: tl.constexpr,
               KG2_P2: tl.constexpr, STAGES: tl.constexpr):
    """The first ``UNITS * TILES1`` programs read GEMM1 slabs as :func:`_read_slabs`, the
    rest GEMM2 slabs: both GEMMs' weights in one launch."""
    pid = tl.program_id(0)
    if pid < UNITS * TILES1:
        e = tl.load(ids_ptr + pid // TILES1).to(tl.int64)
        r = _read_unit(w1_ptr, s1_ptr, e, pid % TILES1, KW1, KG1, stride_w1, stride_s1,
                       ROWS, CHUNK, KG1_P2, STAGES)
    else:
        q = pid - UNITS * TILES1
        e = tl.load(ids_ptr + q // TILES2).to(tl.int64)
        r = _read_unit(w2_ptr, s2_ptr, e, q % TILES2, KW2, KG2, stride_w2, stride_s2,
                       ROWS, CHUNK, KG2_P2, STAGES)
    tl.store(out_ptr + pid, r)


class GemmWeights:
    """Random packed words ``[E, N, K/8]`` int32 and 16-bit scales ``[E, N, K/G]``."""

    def __init__(self, e: int, n: int, k: int, group: int, device: torch.device) -> None:
        self.n, self.kw, self.kg = n, k // 8, k // group
        self.w = torch.randint(-2**31, 2**31 - 1, (e, n, self.kw), dtype=torch.int32,
                               device=device)
        self.s = torch.randint(-2**15, 2**15 - 1, (e, n, self.kg), dtype=torch.int16,
                               device=device)

    def bytes_per_expert(self) -> int:
        return self.n * (self.kw * 4 + self.kg * 2)


def read_call(g: GemmWeights, ids: torch.Tensor, out: torch.Tensor, tile):
    rows, chunk, warps, stages = tile
    if g.n % rows or g.kw % chunk:
        return None
    tiles = g.n // rows
    grid = (ids.numel() * tiles,)

    def call():
        _read_slabs[grid](g.w, g.s, ids, out, tiles, g.kw, g.kg, g.w.stride(0), g.s.stride(0),
                          ROWS=rows, CHUNK=chunk, KG_P2=triton.next_power_of_2(g.kg),
                          STAGES=stages, num_warps=warps)
    return call


def both_call(g1: GemmWeights, g2: GemmWeights, ids: torch.Tensor, out: torch.Tensor, tile):
    rows, chunk, warps, stages = tile
    if g1.n % rows or g1.kw % chunk or g2.n % rows or g2.kw % chunk:
        return None
    t1, t2 = g1.n // rows, g2.n // rows
    grid = (ids.numel() * (t1 + t2),)

    def call():
        _read_both[grid](g1.w, g1.s, g2.w, g2.s, ids, out, ids.numel(), t1, t2, g1.kw, g1.kg,
                         g2.kw, g2.kg, g1.w.stride(0), g1.s.stride(0), g2.w.stride(0),
                         g2.s.stride(0), ROWS=rows, CHUNK=chunk,
                         KG1_P2=triton.next_power_of_2(g1.kg),
                         KG2_P2=triton.next_power_of_2(g2.kg), STAGES=stages, num_warps=warps)
    return call


def best_of(make, tiles, device, target_ms):
    """((median us, tile) of the fastest tile, {"ROWS,CHUNK,WARPS,STAGES": median us} of
    every tile timed); ``make(tile)`` gives one call per copy, or None where the tile does
    not apply."""
    best = None
    each = {}
    for tile in tiles:
        calls = make(tile)
        if calls is None:
            continue
        t = time_calls(calls, device, target_ms=target_ms, min_replay_us=MIN_REPLAY_US)
        per = t.median_us
        each[",".join(map(str, tile))] = per
        if best is None or per < best[0]:
            best = (per, tile)
    return best, each


def run_case(model: str, m: int, rates, args, device) -> dict:
    s = get_shape(model)
    h, i, e, k = s.hidden_size, s.intermediate_size, s.num_experts, s.top_k
    g1_group, g2_group = s.group_for(h), s.group_for(i)
    gen = torch.Generator(device=device)
    gen.manual_seed(1000 + m)
    probe1 = GemmWeights(1, 2 * i, h, g1_group, device)
    probe2 = GemmWeights(1, h, i, g2_group, device)
    per_expert = probe1.bytes_per_expert() + probe2.bytes_per_expert()
    del probe1, probe2
    # routing per copy: the library's router on random logits (the benchmark's Inputs)
    active = per_expert * min(m * k, e)
    n_copies = copies_for(active, per_expert * e, device, max_copies=args.max_copies)
    g1s = [GemmWeights(e, 2 * i, h, g1_group, device) for _ in range(n_copies)]
    g2s = [GemmWeights(e, h, i, g2_group, device) for _ in range(n_copies)]
    logits = [torch.randn(m, e, device=device, generator=gen) for _ in range(n_copies)]
    bias = [(torch.randn(e, device=device, generator=gen) * 0.1 if s.correction_bias else None)
            for _ in range(n_copies)]

    def route(c):
        return fused_topk(logits[c], k, renormalize=s.renormalize, scoring=s.scoring,
                          num_expert_group=s.num_expert_group, topk_group=s.topk_group,
                          correction_bias=bias[c], routed_scaling_factor=s.routed_scaling_factor)

    slot_ids = [route(c)[1].reshape(-1).to(torch.int32).contiguous() for c in range(n_copies)]
    distinct = [torch.unique(t).to(torch.int32).contiguous() for t in slot_ids]
    u = sum(d.numel() for d in distinct) / n_copies
    floor = layer_floor(s, m, rates.read_gbps, rates.matmul_tflops, u=u)
    out = torch.empty(1 << 22, dtype=torch.int32, device=device)  # big enough for any grid
    tiles = args.tiles or [(*t, st) for t, st in itertools.product(SWEEP_TILES, SWEEP_STAGES)]
    ms = args.target_ms

    def per_copy(fn):
        def make(tile):
            calls = [fn(c, tile) for c in range(n_copies)]
            return None if any(x is None for x in calls) else calls
        return make

    rec = {"model": model, "M": m, "u": u, "copies": n_copies, "floor_us": floor.us,
           "floor_bound": floor.bound, "bytes": floor.bytes, "read_gbps": rates.read_gbps}
    b1, rec["gemm1_each_tile_us"] = best_of(
        per_copy(lambda c, t: read_call(g1s[c], distinct[c], out, t)), tiles, device, ms)
    b2, rec["gemm2_each_tile_us"] = best_of(
        per_copy(lambda c, t: read_call(g2s[c], distinct[c], out, t)), tiles, device, ms)
    rec["gemm1_us"], rec["gemm1_tile"] = b1
    rec["gemm2_us"], rec["gemm2_tile"] = b2

    def chain(c, with_router, slots=False):
        ids = slot_ids[c] if slots else distinct[c]
        r1 = read_call(g1s[c], ids, out, b1[1])
        r2 = read_call(g2s[c], ids, out[1 << 21:], b2[1])

        def call():
            if with_router:
                route(c)  # the ids it returns equal slot_ids[c]; the read uses the stored copy
            r1()
            r2()
        return call

    for name, with_router, slots in (("two_reads", False, False),
                                     ("router_two_reads", True, False),
                                     ("router_two_reads_slots", True, True)):
        t = time_calls([chain(c, with_router, slots) for c in range(n_copies)], device,
                       target_ms=ms, min_replay_us=MIN_REPLAY_US)
        rec[f"{name}_us"] = t.median_us
    rt = time_calls([lambda c=c: route(c) for c in range(n_copies)], device, target_ms=ms,
                    min_replay_us=MIN_REPLAY_US)
    rec["router_us"] = rt.median_us
    flat = [torch.ones(int(floor.bytes) // 2, dtype=torch.bfloat16, device=device)
            for _ in range(n_copies)]
    ts = time_calls([lambda x=x: x.sum() for x in flat], device, target_ms=ms,
                    min_replay_us=MIN_REPLAY_US)
    rec["torch_sum_us"] = ts.median_us
    del flat
    b3, _ = best_of(per_copy(lambda c, t: both_call(g1s[c], g2s[c], distinct[c], out, t)),
                    tiles, device, ms)
    rec["one_read_us"], rec["one_read_tile"] = b3
    if args.layer:
        from w4a16moe.bench.layer import bench_layer

        lay = bench_layer(s, [m], ["hybrid"], rates=rates, check=False,
                          min_replay_us=MIN_REPLAY_US)
        if lay and lay[0].get("layer_us") is not None:
            rec["layer_us"] = lay[0]["layer_us"]
            rec["kernel_us"] = lay[0]["kernel_us"]
            rec["layer_floor_us"] = lay[0]["floor_us"]
    for key in ("gemm1", "gemm2", "two_reads", "router_two_reads", "router_two_reads_slots",
                "one_read", "torch_sum"):
        rec[f"{key}_x_floor"] = rec[f"{key}_us"] / floor.us
    if "layer_us" in rec:  # against the floor of the layer benchmark's own routing
        rec["layer_x_floor"] = rec["layer_us"] / rec["layer_floor_us"]
    return rec


def _parse_tiles(text: str) -> list[tuple[int, int, int, int]]:
    tiles = []
    for item in text.split(";"):
        parts = item.split(",")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"tile {item!r}: expected ROWS,CHUNK,WARPS,STAGES")
        tiles.append(tuple(int(p) for p in parts))
    return tiles


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(
        f"{mdl}:{m}" for mdl in ("qwen3-30b-a3b", "mixtral-8x7b")
        for m in (1, 2, 4, 8, 16, 32, 64)),
        help="model:M pairs, comma-separated")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--target-ms", type=float, default=40.0,
                    help="sampling time per measurement (default 40)")
    ap.add_argument("--max-copies", type=int, default=16)
    ap.add_argument("--tiles", type=_parse_tiles, default=None,
                    help="read tiles to time instead of the sweep, as ROWS,CHUNK,WARPS,STAGES "
                         "separated by ';' (e.g. '16,64,1,2;128,32,4,2'); every tile's GEMM "
                         "read time is recorded (gemm1_each_tile_us, gemm2_each_tile_us)")
    ap.add_argument("--no-layer", dest="layer", action="store_false",
                    help="skip timing the hybrid layer itself")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    rates = measure_device(device)
    print(f"{torch.cuda.get_device_name()}: read {rates.read_gbps:.0f} GB/s", flush=True)
    records = []
    hdr = ("model", "M", "u", "floor", "gemm1", "gemm2", "2 reads", "router+2", "1 read",
           "sum", "layer", "x floor: 2 reads / router+2 / router+2 slots / 1 read / sum / layer")
    print(" | ".join(hdr), flush=True)
    for case in args.cases.split(","):
        model, m = case.split(":")
        rec = run_case(model, int(m), rates, args, device)
        records.append(rec)
        print(f"{model} | {rec['M']} | {rec['u']:.1f} | {rec['floor_us']:.2f} | "
              f"{rec['gemm1_us']:.2f} {rec['gemm1_tile']} | {rec['gemm2_us']:.2f} "
              f"{rec['gemm2_tile']} | {rec['two_reads_us']:.2f} | "
              f"{rec['router_two_reads_us']:.2f} | {rec['one_read_us']:.2f} | "
              f"{rec['torch_sum_us']:.2f} | {rec.get('layer_us', float('nan')):.2f} | "
              f"{rec['two_reads_x_floor']:.2f} / {rec['router_two_reads_x_floor']:.2f} / "
              f"{rec['router_two_reads_slots_x_floor']:.2f} / {rec['one_read_x_floor']:.2f} / "
              f"{rec['torch_sum_x_floor']:.2f} / {rec.get('layer_x_floor', float('nan')):.2f}",
              flush=True)
    print("wrote", write_records(args.out, "layer_read_bound.json", records,
                                 read_gbps=rates.read_gbps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
