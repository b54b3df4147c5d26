"""Device A/B: the Gluon prefill kernel with and without the CTA barrier that Triton's
shared-memory analysis puts in front of every consumer ``mbarrier.wait``
(``w4a16moe.kernels.membar``; ``prefill_rs.STRIP_WAIT_BARRIERS`` picks the version); or,
with ``--flag PAIRED_STAGES``, each shipped entry against itself with that config flag on
(two K steps a ring stage; ``ceil(num_stages / 2)`` stages keep the same steps in flight,
``--more-stages`` adds to that).

Triton's membar pass treats two ``mbarrier.wait`` on the same barrier allocation as a
conflict, so each K step of the consumer warpgroups starts with ``bar.sync 0, <consumer
threads>``. In this kernel no warp can get a phase ahead (the loader refills a stage only
after every consumer thread has released it), so the launcher compiles the kernel with those
barriers taken out of the PTX. This script measures what they cost: each case captures the
shipped table entry of each GEMM, run as the layer would (``tune.candidate_runs``), in one
CUDA graph per version and replays the two alternately.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/prefill_wait_barrier_ab.py --out $OUT
        [--flag PAIRED_STAGES [--more-stages N]] [--cases model:M,...]

Both versions first run into NaN-poisoned outputs and must agree bit for bit (the barrier
only orders warps), and the stripped one must repeat bit for bit. Each record also lists,
for every compiled kernel so far, how many waits still have their barrier (2 unstripped, 0
stripped). ``$OUT/prefill_wait_barrier_ab.json`` holds the records (``us_base``: the
shipped entry with the barriers, ``us_stripped``: without them), or
``$OUT/prefill_<flag>_ab.json`` with ``--flag`` (``us_base``: the shipped entry,
``us_stripped``: with the flag; both without the barriers, as shipped).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_flag_ab import TABLE, case_tensors  # noqa: E402
from prefill_rs_ab import write_records  # noqa: E402

from w4a16moe.kernels import configs as cfgmod  # noqa: E402
from w4a16moe.kernels import prefill_rs  # noqa: E402
from w4a16moe.kernels.membar import strip_wait_barriers  # noqa: E402
from w4a16moe.kernels.tune import (  # noqa: E402
    MODEL_SHAPES,
    candidate_runs,
    random_packed_experts,
)

DEV = torch.device("cuda")


def wait_barriers_left() -> list[int]:
    """For each compiled ``_prefill_rs_kernel`` in this process: how many of its
    ``mbarrier.wait`` still have a barrier in front (2 unstripped, 0 stripped)."""
    counts = []
    for caches in prefill_rs._prefill_rs_kernel.device_caches.values():
        for kernel in caches[0].values():
            counts.append(strip_wait_barriers(kernel.asm["ptx"])[1])
    return sorted(counts)


def capture(fn, reps: int):
    """A CUDA graph of ``reps`` calls of ``fn`` (compiled and warmed first)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    torch.cuda.synchronize()
    return graph


def replay_us(graph, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mixtral-8x7b:4,mixtral-8x7b:16,mixtral-8x7b:64,"
                    "mixtral-8x7b:1024,qwen3-30b-a3b:16,qwen3-30b-a3b:32,qwen3-30b-a3b:64,"
                    "qwen3-30b-a3b:4096",
                    help="model:M pairs (M picks the table bucket as the layer would)")
    ap.add_argument("--reps", type=int, default=20, help="calls per graph")
    ap.add_argument("--rounds", type=int, default=7, help="alternating replays of each graph")
    ap.add_argument("--flag", default=None, choices=("PAIRED_STAGES",),
                    help="A/B this config flag of each entry instead of the wait barriers")
    ap.add_argument("--more-stages", type=int, default=0,
                    help="with --flag PAIRED_STAGES: stages beyond ceil(num_stages / 2)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import triton

    if not hasattr(triton.knobs.runtime, "add_stages_inspection_hook"):
        print(f"triton {triton.__version__} has no stages inspection hook")
        return 1
    table = cfgmod.parse_table(__import__("json").loads(TABLE.read_text()))
    dtype = torch.bfloat16
    records, experts_cache = [], {}
    for case in args.cases.split(","):
        model, m = case.split(":")
        m = int(m)
        s = MODEL_SHAPES[model]
        h, i, k = s.hidden_size, s.intermediate_size, s.top_k
        if model not in experts_cache:
            experts_cache.clear()
            torch.cuda.empty_cache()
            experts_cache[model] = random_packed_experts(s, dtype, DEV, seed=5)
        experts = experts_cache[model]
        keys = ((2 * i, h), (h, i))
        g1, g2 = (table[key] for key in keys)
        bucket = min((b for b in g1 if b >= m), default=max(g1))
        bm = g1[bucket]["BLOCK_SIZE_M"]
        t = case_tensors(m, s, bm, dtype)
        inter, c2 = t["inter"], t["c2"]
        for gemm, entry in (("w13", g1[bucket]), ("w2", g2[bucket])):
            if not entry.get("RS"):
                continue
            entry = {**entry, "BLOCK_SIZE_M": bm}
            splits = (entry["SPLIT_K"],) if entry.get("SPLIT_K", 1) > 1 else ()

            common = dict(experts=experts, x=t["x"], inter=inter,
                          out=inter if gemm == "w13" else c2, blocks=t["blocks"],
                          topk_ids=t["ids"], topk_weights=t["w"], top_k=k,
                          x_sorted=t["x_sorted"], inter_sorted=t["inter_sorted"], splits=splits)

            def run_of(cfg, entry=entry, gemm=gemm, common=common):
                """The candidate run of ``cfg`` as the layer runs it (gathered or sorted,
                with the entry's scale prefetch and split-K)."""
                base = {kk: v for kk, v in cfg.items() if kk not in ("SORTED_ROWS", "SPLIT_K",
                                                                     "PREFETCH_SCALES")}
                runs = candidate_runs(gemm, base, **common)
                return next((f for c, f in runs
                             if bool(c.get("SORTED_ROWS")) == bool(entry.get("SORTED_ROWS"))
                             and bool(c.get("PREFETCH_SCALES"))
                             == bool(entry.get("PREFETCH_SCALES"))
                             and c.get("SPLIT_K", 1) == entry.get("SPLIT_K", 1)), None)
            fn = run_of(entry)
            if args.flag:
                on_entry = {**entry, args.flag: True,
                            "num_stages": -(-entry["num_stages"] // 2) + args.more_stages}
                fns = {False: fn, True: run_of(on_entry)}
            else:
                fns = {False: fn, True: fn}
            if fn is None or fns[True] is None:
                print(f"{case} {gemm}: no run for {entry}")
                continue
            if splits:
                result = None  # the run returns its top-k sum
            elif gemm == "w13":
                result = t["inter_sorted"] if entry.get("SORTED_ROWS") else inter
            else:
                result = c2

            def output(fn, result=result):
                if result is not None:
                    result.fill_(float("nan"))
                    fn()
                    torch.cuda.synchronize()
                    return result.clone()
                y = fn()
                torch.cuda.synchronize()
                return y.clone()
            graphs, outs = {}, {}
            try:
                for on in (False, True):
                    if not args.flag:
                        prefill_rs.STRIP_WAIT_BARRIERS = on
                    outs[on] = [output(fns[on]) for _ in range(2)]
                    graphs[on] = capture(fns[on], args.reps)
            except triton.runtime.errors.OutOfResources as exc:  # a flagged tile too large
                print(f"{case} {gemm}: {exc}")
                continue
            finally:
                prefill_rs.STRIP_WAIT_BARRIERS = True
            left = wait_barriers_left()

            def same(a, b):
                na, nb = torch.isnan(a), torch.isnan(b)
                return bool(torch.equal(na, nb) and not na.all()
                            and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
            identical = same(outs[False][0], outs[True][0])
            repeats = same(outs[True][0], outs[True][1])
            times = {False: [], True: []}
            for _ in range(args.rounds):
                for on in (False, True):
                    times[on].append(replay_us(graphs[on], args.reps))
            base_us, strip_us = (statistics.median(times[on]) for on in (False, True))
            rec = {"model": model, "M": m, "bucket": bucket, "gemm": gemm, "config": entry,
                   "flag": args.flag, "config_on": on_entry if args.flag else None,
                   "wait_barriers_left": left, "us_base": base_us, "us_stripped": strip_us,
                   "gain": 1 - strip_us / base_us, "bit_identical": identical,
                   "stripped_repeats": repeats, "times_base": times[False],
                   "times_stripped": times[True]}
            records.append(rec)
            print(f"{model} M={m} {gemm} {bm}x{entry['BLOCK_SIZE_N']}x{entry['BLOCK_SIZE_K']}"
                  f"s{entry['num_stages']}{' sorted' if entry.get('SORTED_ROWS') else ''}"
                  f"{' split' + str(entry['SPLIT_K']) if splits else ''}: "
                  f"base {base_us:.1f} us, {args.flag or 'stripped'}"
                  f"{' s' + str(on_entry['num_stages']) if args.flag else ''} {strip_us:.1f} us "
                  f"({100 * rec['gain']:+.1f} %)"
                  f"{'' if identical else ' DIFFERENT OUTPUT'}"
                  f"{'' if repeats else ' NOT REPEATABLE'}", flush=True)
            del graphs
    name = f"prefill_{args.flag.lower()}_ab.json" if args.flag else "prefill_wait_barrier_ab.json"
    path = write_records(args.out, name, records,
                         triton=__import__("triton").__version__)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
