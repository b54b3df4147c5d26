"""A/B on a GPU without tuned files of its own (e.g. an H200): the hybrid layer with a
sibling GPU's tuned prefill table and decode thresholds (``configs.tuned_file``: same compute
capability and multiprocessor count, e.g. the H100's) against the fallback without them
(``heuristic_config`` and ``DEFAULT_DECODE_THRESHOLD``). ``bench_layer`` (CUDA graphs, cold
L2), the two settings alternated ``--repeats`` times in one process.

    PYTHONPATH=. python3 benchmarks/sibling_files_ab.py --out $OUT \
        [--models qwen3-30b-a3b,mixtral-8x7b] [--ms 1,2,4,8,16,32,64,128,256,1024,4096]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import warnings

import torch

from w4a16moe.bench.layer import bench_layer
from w4a16moe.bench.models import get_shape
from w4a16moe.kernels import configs as cfgmod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--ms", default="1,2,4,8,16,32,64,128,256,1024,4096")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    traits = cfgmod.gpu_traits()
    files = {s: [str(v) for v in cfgmod.resolve_tuned_file(None, s)]
             for s in (cfgmod.CONFIGS_SUFFIX, cfgmod.THRESHOLDS_SUFFIX)}
    res = {"gpu": traits, "files_with_borrowing": files, "torch": torch.__version__,
           "rows": []}
    print(f"{traits}: files (path, source) with borrowing: {files}", flush=True)
    times: dict[tuple, list[float]] = {}
    paths: dict[tuple, str] = {}
    for name in args.models.split(","):
        shape = get_shape(name)
        for rep in range(args.repeats):
            for borrow in (False, True):
                cfgmod.BORROW_SIBLING_FILES = borrow
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    recs = bench_layer(shape, ms, ["hybrid"], check=False)
                for r in recs:
                    key = (name, r["M"], borrow)
                    times.setdefault(key, []).append(r["layer_us"])
                    paths[key] = r.get("hybrid_kernel", "")
                    res["rows"].append(dict(model=name, M=r["M"], repeat=rep, borrow=borrow,
                                            layer_us=r["layer_us"], record=r))
                    print(f"{name} M={r['M']:5d} rep {rep} borrow={borrow!s:5} layer "
                          f"{r['layer_us']:9.1f} us ({paths[key]})", flush=True)
    cfgmod.BORROW_SIBLING_FILES = True
    print("\nmodel M heuristic_us sibling_us change")
    summary = []
    for name in args.models.split(","):
        for m in ms:
            a = statistics.median(times[(name, m, False)])
            b = statistics.median(times[(name, m, True)])
            summary.append(dict(model=name, M=m, heuristic_us=a, sibling_us=b,
                                change=b / a - 1, heuristic_path=paths[(name, m, False)],
                                sibling_path=paths[(name, m, True)]))
            print(f"{name} {m} {a:.1f} {b:.1f} {100 * (b / a - 1):+.1f}% "
                  f"({paths[(name, m, False)]} / {paths[(name, m, True)]})")
    res["summary"] = summary
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sibling_files_ab.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
