"""Device A/B of the benchmark harness itself: calls per CUDA graph replay.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/graph_calls_ab.py --out $OUT \
        [--cases mixtral-8x7b:4,qwen3-30b-a3b:1] [--min-calls 1,16] [--rounds 2]

``time_calls`` captures one call per rotated weight copy in a CUDA graph and divides each
replay's time by the calls in it. Mixtral's layer has only 2 copies (one copy's active
bytes already exceed the 50 MB L2 many times), so the gap between two replays (the graph
launch on the device, two event records) is shared by 2 calls; qwen3-30b's by 11. This
script times the same layers with the copies' calls repeated in the graph (``min_calls``)
to measure that gap's share, alternating the settings in one process for ``--rounds``
rounds: the hybrid path (experts and layer time) and the bf16 baseline.
``$OUT/graph_calls_ab.json`` holds every record.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefill_rs_ab import write_records  # noqa: E402

from w4a16moe.bench.layer import bench_layer  # noqa: E402
from w4a16moe.bench.models import get_shape  # noqa: E402
from w4a16moe.bench.timing import measure_device  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mixtral-8x7b:1,mixtral-8x7b:4,mixtral-8x7b:64,"
                    "qwen3-30b-a3b:1,qwen3-30b-a3b:64")
    ap.add_argument("--min-calls", default="1,16", help="settings compared (default 1,16)")
    ap.add_argument("--paths", default="hybrid,bf16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    rates = measure_device("cuda")
    settings = [int(x) for x in args.min_calls.split(",")]
    records = []
    for case in args.cases.split(","):
        model, m = case.split(":")
        shape = get_shape(model)
        for rnd in range(args.rounds):
            for mc in settings:
                recs = bench_layer(shape, [int(m)], args.paths.split(","), rates=rates,
                                   check=False, min_calls=mc)
                for r in recs:
                    r.update(min_calls=mc, round=rnd)
                    records.append(r)
                    print(f"{model} M={m} round {rnd} min_calls={mc:3d} {r['path']:7s} "
                          f"kernel {r.get('kernel_us') or float('nan'):8.2f} layer "
                          f"{r.get('layer_us') or float('nan'):8.2f} floor {r['floor_us']:7.2f}",
                          flush=True)
                torch.cuda.empty_cache()
    print("wrote", write_records(args.out, "graph_calls_ab.json", records,
                                 read_gbps=rates.read_gbps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
