"""Device probe: when and where each program of the ``mma.sync`` prefill GEMMs runs.

    PYTHONPATH=. python3 benchmarks/prefill_timeline_probe.py --out $OUT \\
        [--model qwen3-30b-a3b] [--m 8,16,64] [--experts 33,34,40] [--calls 5] \\
        [--switch ROTATE_K_STEPS=True] [--graph]

The layer (shipped configs) runs eagerly with ``prefill_mma.TIMELINE`` set: each program of
each mma launch writes its SM, its start and end on the GPU's nanosecond clock
(``%globaltimer``) and its SM cycles. From those the probe tells, per GEMM:

* the launch's span and how many programs ran at once (the first wave: programs that
  started within 2 us of the first; three a SM where registers allow three: the kernel with
  the clock reads can take more registers than without, so each record says how many);
* how long a program of the first wave took, and how long one that started later took;
* when the first wave was done, how many programs were left then, and how those were spread
  over the SMs (the last round's programs alone on their SM, or stacked);
* the bandwidth over the launch, by 2-us bins: each program with work reading its weight
  bytes evenly over its run (the first wave, the staggered middle, the drain).

M tokens are routed at random (``tune.random_routing``), or with ``--experts`` to exactly u
distinct experts as ``prefill_rounds_probe.py`` does, so the last round's size is set. Two
weight copies alternate; the first call of each case compiles and is not recorded.

With ``--graph`` the layer runs as it does in a model: captured in a CUDA graph (one a weight
copy; each call copies its routing into the graph's inputs and replays it), so GEMM2 is
launched as GEMM1's programmatic dependent with no host gap between them. Then each case also
gets a ``layer`` record on one time axis: when GEMM1's last program ended, when GEMM2's
programs started (how many before GEMM1 was done) and ended, and the programs with work of
each GEMM running by 2-us bin (a GEMM2 program's run includes its wait for GEMM1).
``$OUT/prefill_timeline_probe.json`` holds the summaries (medians over the calls) and the raw
timeline of each GEMM's first recorded call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_mma_ab import add_switch_argument, apply_switches  # noqa: E402
from prefill_rounds_probe import routing as exact_routing  # noqa: E402
from prefill_rs_ab import write_records  # noqa: E402

from w4a16moe.kernels import prefill_mma  # noqa: E402
from w4a16moe.kernels.prefill import PrefillWorkspace, fused_moe_prefill  # noqa: E402
from w4a16moe.kernels.tune import MODEL_SHAPES, random_packed_experts, random_routing  # noqa: E402

DEV = torch.device("cuda")
#: programs that start within this many ns of a launch's first are its first wave
FIRST_WAVE_NS = 2000
#: programs shorter than this many ns had no block to work on (the grid covers every block
#: the routing could need; those past the padded count exit at once, about 200 ns)
EMPTY_NS = 1000
#: width of the bins of :func:`bandwidth_bins`
BIN_NS = 2000


def program_bytes(fact: dict) -> float:
    """The weight bytes one program with work reads (``TIMELINE``'s launch facts): its rows'
    int4 codes over the whole K, their 16-bit scales and 8-bit zero points."""
    rows = fact["config"]["BLOCK_SIZE_N"] * (2 if fact["activation"] else 1)
    groups = fact["k"] // fact["group_size"]
    return rows * (fact["k"] / 2 + groups * (3 if fact["has_zeros"] else 2))


def bandwidth_bins(start: list[int], end: list[int], bytes_per_program: float,
                   bin_ns: int = BIN_NS, span: tuple[int, int] | None = None) -> list[dict]:
    """Programs running and bytes read per ``bin_ns`` bin from the first start on (or over
    ``span``, (t0, t1) in ns: another launch's axis), each program's ``bytes_per_program``
    spread evenly over its run: ``{"t_us", "running", "tb_s"}`` (``running`` the average
    count of programs in the bin)."""
    t0, t1 = span if span is not None else (min(start), max(end))
    bins = [{"t_us": b * bin_ns / 1e3, "running": 0.0, "tb_s": 0.0}
            for b in range((t1 - t0 + bin_ns - 1) // bin_ns)]
    for s, e in zip(start, end, strict=True):
        s, e = s - t0, e - t0
        for b in range(s // bin_ns, min(len(bins), -(-e // bin_ns))):
            lo, hi = b * bin_ns, (b + 1) * bin_ns
            overlap = max(0, min(hi, e) - max(lo, s))
            if overlap and e > s:
                bins[b]["running"] += overlap / bin_ns
                bins[b]["tb_s"] += bytes_per_program * overlap / (e - s) / bin_ns / 1e3
    return bins


def summarize(timeline: torch.Tensor, bytes_per_program: float | None = None) -> dict:
    """What one launch's ``[programs, 4]`` timeline (SM, start ns, end ns, cycles) says;
    with ``bytes_per_program`` (the weight bytes a program with work reads,
    :func:`program_bytes`) also the bandwidth over the launch of the programs with work
    (:func:`bandwidth_bins`)."""
    sm, start, end, cycles = (timeline[:, j].tolist() for j in range(4))
    if min(start) < 0:
        raise RuntimeError("a program did not write its timeline row")
    t0 = min(start)
    dur = [(e - s) / 1e3 for s, e in zip(start, end, strict=True)]
    work = [i for i in range(len(start)) if end[i] - start[i] >= EMPTY_NS]
    extra = {}
    if bytes_per_program is not None and work:
        span_ns = max(end) - t0
        extra = {"weight_tb_s": len(work) * bytes_per_program / span_ns / 1e3,
                 "bins": bandwidth_bins([start[i] for i in work], [end[i] for i in work],
                                        bytes_per_program)}
    first = [i for i, s in enumerate(start) if s - t0 < FIRST_WAVE_NS]
    later = [i for i, s in enumerate(start) if s - t0 >= FIRST_WAVE_NS]
    first_done = max(end[i] for i in first)
    left = [i for i in later if start[i] >= first_done] if later else []
    per_sm: dict[int, int] = {}
    for i in left:
        per_sm[sm[i]] = per_sm.get(sm[i], 0) + 1
    stacked = {n: sum(1 for c in per_sm.values() if c == n) for n in sorted(set(per_sm.values()))}
    sms = len(set(sm))
    return {
        "programs": len(start), "sms": sms, "span_us": (max(end) - t0) / 1e3,
        "first_wave": len(first), "first_wave_per_sm": len(first) / sms,
        "first_program_us": statistics.median(dur[i] for i in first),
        "first_wave_done_us": (first_done - t0) / 1e3,
        "first_wave_ends_us": [(min(end[i] for i in first) - t0) / 1e3,
                               (statistics.median(end[i] for i in first) - t0) / 1e3],
        "later": len(later),
        "later_program_us": statistics.median(dur[i] for i in later) if later else None,
        "after_first_wave": len(left),
        "after_first_wave_program_us": (statistics.median(dur[i] for i in left)
                                        if left else None),
        "after_first_wave_sms_by_count": {str(k): v for k, v in stacked.items()},
        "cycles_per_program": statistics.median(cycles),
        "with_work": len(work), **extra,
    }


def layer_overlap(gemm1: torch.Tensor, gemm2: torch.Tensor, bin_ns: int = BIN_NS) -> dict:
    """GEMM1's and GEMM2's timelines of one graph replay on one time axis (from GEMM1's
    first start): when GEMM1's last program ended, when GEMM2's programs started (how many
    before GEMM1 was done) and ended, and each GEMM's programs with work running by
    ``bin_ns`` bin (``running`` as :func:`bandwidth_bins` counts it)."""
    s1, e1 = gemm1[:, 1].tolist(), gemm1[:, 2].tolist()
    s2, e2 = gemm2[:, 1].tolist(), gemm2[:, 2].tolist()
    if min(s1 + s2) < 0:
        raise RuntimeError("a program did not write its timeline row")
    t0 = min(s1)
    gemm1_end = max(e1)
    work2 = [i for i in range(len(s2)) if e2[i] - s2[i] >= EMPTY_NS]
    span = (t0, max(e1 + e2))
    running = {}
    for name, st, en in (("gemm1", s1, e1), ("gemm2", s2, e2)):
        work = [i for i in range(len(st)) if en[i] - st[i] >= EMPTY_NS]
        running[name] = [b["running"] for b in bandwidth_bins(
            [st[i] for i in work], [en[i] for i in work], 0.0, bin_ns, span=span)]
    bins = [{"t_us": b * bin_ns / 1e3, "gemm1": r1, "gemm2": r2}
            for b, (r1, r2) in enumerate(zip(running["gemm1"], running["gemm2"], strict=True))]
    return {
        "gemm1_end_us": (gemm1_end - t0) / 1e3,
        "gemm2_first_start_us": (min(s2) - t0) / 1e3,
        "gemm2_started_before_gemm1_end": sum(1 for v in s2 if v < gemm1_end),
        "gemm2_with_work_started_before_gemm1_end": sum(1 for i in work2 if s2[i] < gemm1_end),
        "gemm2_with_work": len(work2),
        "gemm2_end_us": (max(e2) - t0) / 1e3,
        "running_bins": bins,
    }


def _median_summary(summaries: list[dict]) -> dict:
    """Numbers as their median over the calls (counts as the lower median); anything else
    (``bins``, the SM counts) as the first call has it."""
    out = {}
    for key, value in summaries[0].items():
        values = [s[key] for s in summaries]
        if all(isinstance(v, int) for v in values):  # counts stay counts
            out[key] = statistics.median_low(values)
        elif all(isinstance(v, (int, float)) for v in values):
            out[key] = statistics.median(values)
        else:
            out[key] = value
    return out


def _eager_calls(x, copies, ws, routing, calls: int):
    """The layer launched eagerly ``calls + 1`` times (the first, which compiles, not
    recorded): yields each recorded call's ``TIMELINE`` launches."""
    for call in range(calls + 1):
        w, ids = routing(call)
        prefill_mma.TIMELINE = [] if call else None
        try:
            fused_moe_prefill(x, copies[call % 2], w, ids, workspace=ws)
            torch.cuda.synchronize()
            launches = prefill_mma.TIMELINE or []
        finally:
            prefill_mma.TIMELINE = None
        if call:
            yield launches


def _graph_calls(x, copies, ws, routing, calls: int):
    """The layer captured in one CUDA graph a weight copy (after an eager call that
    compiles), each call's routing copied into the graphs' inputs before its replay: yields
    each call's ``TIMELINE`` launches (the tensors the captured kernels write)."""
    w, ids = routing(0)
    prefill_mma.TIMELINE = []
    try:
        fused_moe_prefill(x, copies[0], w, ids, workspace=ws)
        torch.cuda.synchronize()
        graphs = []
        for copy in copies:
            prefill_mma.TIMELINE = []
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fused_moe_prefill(x, copy, w, ids, workspace=ws)
            graphs.append((graph, prefill_mma.TIMELINE))
    finally:
        prefill_mma.TIMELINE = None
    for call in range(1, calls + 1):
        w_new, ids_new = routing(call)
        w.copy_(w_new)
        ids.copy_(ids_new)
        graph, launches = graphs[call % 2]
        for _, timeline in launches:  # captured unfilled: -1 tells a row never written
            timeline.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        yield launches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--m", default="8,16,64", help="token counts, comma-separated")
    ap.add_argument("--experts", default="",
                    help="route --m's first value to exactly these many distinct experts "
                         "each (comma-separated) instead of at random")
    ap.add_argument("--calls", type=int, default=5, help="recorded calls a case")
    ap.add_argument("--graph", action="store_true",
                    help="replay the layer from CUDA graphs (GEMM2 a programmatic dependent of "
                         "GEMM1, as in a model) instead of launching it eagerly")
    add_switch_argument(ap)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    apply_switches(ap, args.switch, protected=("TIMELINE",))
    s = MODEL_SHAPES[args.model]
    copies = [random_packed_experts(s, torch.bfloat16, DEV, seed=11 + c) for c in range(2)]
    ms = [int(v) for v in args.m.split(",")]
    cases = ([(ms[0], int(u)) for u in args.experts.split(",")] if args.experts
             else [(m, None) for m in ms])
    gen = torch.Generator(device=DEV).manual_seed(0)
    records = []
    for m, u in cases:
        x = torch.randn(m, s.hidden_size, dtype=torch.bfloat16, device=DEV)
        ws = PrefillWorkspace.allocate(m, copies[0], s.top_k)
        runs: dict[str, list[dict]] = {}
        raw: dict[str, list] = {}
        facts: dict[str, dict] = {}
        overlaps: list[dict] = []

        def routing(call: int, m: int = m, u: int | None = u):
            if u is None:
                return random_routing(m, s, DEV, seed=100 * m + call)
            subset = torch.randperm(s.num_experts, device=DEV, generator=gen)[:u]
            return exact_routing(m, s.top_k, subset)

        calls = (_graph_calls if args.graph else _eager_calls)(x, copies, ws, routing,
                                                               args.calls)
        for launches in calls:
            if args.graph and len(launches) == 2:
                overlaps.append(layer_overlap(launches[0][1].cpu(), launches[1][1].cpu()))
            for j, (fact, timeline) in enumerate(launches):
                name = f"gemm{j + 1}"
                runs.setdefault(name, []).append(
                    summarize(timeline.cpu(), bytes_per_program=program_bytes(fact)))
                facts[name] = fact
                if name not in raw:
                    raw[name] = timeline.cpu().tolist()
        if not runs:
            print(f"M={m}: no mma launch (the table's configs are not MMA here)")
            continue
        for name, summaries in runs.items():
            rec = {"model": args.model, "m": m, "experts": u, "gemm": name, **facts[name],
                   "calls": len(summaries), **_median_summary(summaries),
                   "timeline": raw[name]}
            records.append(rec)
            print(f"M={m:>4} u={u or '-':>4} {name} ({rec.get('registers')} registers): "
                  f"{rec['programs']} programs on "
                  f"{rec['sms']} SMs, span {rec['span_us']:.1f} us; first wave "
                  f"{rec['first_wave']} ({rec['first_wave_per_sm']:.2f} a SM), a program "
                  f"{rec['first_program_us']:.1f} us, done at {rec['first_wave_done_us']:.1f}"
                  f" us; later {rec['later']} (a program {rec['later_program_us'] or 0:.1f} "
                  f"us), {rec['after_first_wave']} started after the first wave "
                  f"(a program {rec['after_first_wave_program_us'] or 0:.1f} us, SMs by "
                  f"count {rec['after_first_wave_sms_by_count']})", flush=True)
            if rec.get("bins"):
                print(f"    {rec['with_work']} with work, weights at "
                      f"{rec['weight_tb_s']:.2f} TB/s over the span; by "
                      f"{BIN_NS / 1e3:g}-us bin (first call), programs running / TB/s: "
                      + " ".join(f"{b['running']:.0f}/{b['tb_s']:.1f}" for b in rec["bins"]),
                      flush=True)
        if overlaps:
            rec = {"model": args.model, "m": m, "experts": u, "gemm": "layer",
                   "calls": len(overlaps), **_median_summary(overlaps)}
            records.append(rec)
            print(f"M={m:>4} u={u or '-':>4} layer (graph): GEMM1 ends at "
                  f"{rec['gemm1_end_us']:.1f} us; GEMM2's first program starts at "
                  f"{rec['gemm2_first_start_us']:.1f} us, "
                  f"{rec['gemm2_with_work_started_before_gemm1_end']} of its "
                  f"{rec['gemm2_with_work']} with work before GEMM1's end; GEMM2 ends at "
                  f"{rec['gemm2_end_us']:.1f} us; running GEMM1/GEMM2 by "
                  f"{BIN_NS / 1e3:g}-us bin (first call): "
                  + " ".join(f"{b['gemm1']:.0f}/{b['gemm2']:.0f}" for b in rec["running_bins"]),
                  flush=True)
    write_records(args.out, "prefill_timeline_probe.json", records, model=args.model,
                  switches=args.switch, graph=args.graph)
    return 0


if __name__ == "__main__":
    sys.exit(main())
