"""Does a long large-M run slow itself down? Experts and layer timings, alternated, with clocks.

    PYTHONPATH=. python benchmarks/clock_drift_probe.py [--model mixtral-8x7b] [--m 8192]

``gpu_check.py`` times a path's experts (routing given) and then its layer (router included)
back to back, each for ~200 ms of CUDA-graph replays, path after path. At Mixtral M=8192 the
hybrid layer came out 0.6-0.8 ms above its experts time in sessions 11-14, far more than the
router's ~3 us. This probe times the same hybrid experts call and the same layer call
alternately (A B A B ...), several rounds, while ``nvidia-smi`` samples the SM clock, power
and temperature every 100 ms: if the gap follows the order (whatever runs later is slower)
and the clock falls, it is the GPU's clock, not the code. Writes ``clock_drift_probe.json``
and the raw ``clocks.csv`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import time

import torch

from w4a16moe.bench.adapters import hybrid_moe
from w4a16moe.bench.layer import Inputs, fast_random_experts
from w4a16moe.bench.models import get_shape
from w4a16moe.bench.timing import time_calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--target-ms", type=float, default=200.0,
                    help="replay time per measurement (gpu_check uses 200)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    shape = get_shape(args.model)
    experts = fast_random_experts(shape, torch.bfloat16, device, seed=0)
    inp = Inputs(shape, args.m, torch.bfloat16, device, seed=1)

    def experts_call():
        return hybrid_moe(inp.x, experts, inp.topk_weights, inp.topk_ids,
                          activation=shape.activation)

    def layer_call():
        tw, ti = inp.route()
        return hybrid_moe(inp.x, experts, tw, ti, activation=shape.activation)

    clocks_path = os.path.join(args.out, "clocks.csv")
    with open(clocks_path, "w") as f:
        smi = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,"
             "clocks_throttle_reasons.active", "--format=csv,noheader", "-lms", "100"],
            stdout=f, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        rows = []
        t0 = time.time()
        for r in range(args.rounds):
            for name, fn in (("experts", experts_call), ("layer", layer_call)):
                start = time.time() - t0
                t = time_calls([fn], device, target_ms=args.target_ms)
                rows.append(dict(round=r, call=name, median_us=t.median_us, p10_us=t.p10_us,
                                 p90_us=t.p90_us, reps=t.reps, start_s=start,
                                 end_s=time.time() - t0))
                print(f"round {r} {name:8} {t.median_us:9.1f} us (p10 {t.p10_us:.1f}, p90 "
                      f"{t.p90_us:.1f}, {t.reps} reps) at {start:5.1f}-{time.time() - t0:5.1f} s",
                      flush=True)
    finally:
        smi.terminate()
        smi.wait()
    with open(clocks_path) as f:
        samples = [row for row in csv.reader(f) if len(row) >= 4]
    sm = [float(row[1].split()[0]) for row in samples if row[1].strip()[0].isdigit()]
    if sm:
        print(f"SM clock over the run: min {min(sm):.0f} MHz, max {max(sm):.0f} MHz, "
              f"{len(sm)} samples")
    with open(os.path.join(args.out, "clock_drift_probe.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(device), model=args.model, m=args.m,
                       rounds=rows, clock_samples=samples), f, indent=1)


if __name__ == "__main__":
    main()
