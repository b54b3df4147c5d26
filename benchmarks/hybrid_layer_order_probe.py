"""Probe: is the hybrid path's layer time above the prefill path's (same kernels) a cost of
the hybrid module or of when it is measured? ``bench_layer`` on the same shape and M with
the paths in both orders, several times, in one process.

    PYTHONPATH=. python3 benchmarks/hybrid_layer_order_probe.py --out $OUT \
        [--model mixtral-8x7b] [--ms 8,16,64] [--repeats 2] [--paths prefill,hybrid]

``--paths`` gives the paths of one pass in the order ``gpu_check.py`` runs them (e.g.
``decode,prefill,hybrid,bf16``); each repeat then runs them in that order and reversed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from w4a16moe.bench.layer import bench_layer
from w4a16moe.bench.models import get_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--ms", default="8,16,64")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--paths", default="prefill,hybrid",
                    help="comma-separated paths of one pass, in order (default: %(default)s)")
    args = ap.parse_args()
    shape = get_shape(args.model)
    ms = [int(v) for v in args.ms.split(",")]
    rows = []
    paths = tuple(args.paths.split(","))
    for rep in range(args.repeats):
        for order in (paths, paths[::-1]):
            stamps: list[float] = []
            recs = bench_layer(shape, ms, list(order), check=False,
                               on_step=lambda label, stamps=stamps: stamps.append(time.time()))
            for r, stamp in zip(recs, stamps, strict=True):
                rows.append(dict(repeat=rep, order="->".join(order), M=r["M"], path=r["path"],
                                 kernel_us=r["kernel_us"], layer_us=r["layer_us"], done_at=stamp))
                clock = time.strftime("%H:%M:%S", time.gmtime(stamp))
                print(f"{clock}.{int(stamp * 1000) % 1000:03d} rep {rep} "
                      f"{'->'.join(order):30s} M={r['M']:3d} {r['path']:8s} kernel "
                      f"{r['kernel_us']:8.1f} layer {r['layer_us']:8.1f} "
                      f"(layer - kernel {r['layer_us'] - r['kernel_us']:5.1f})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hybrid_layer_order_probe.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
