"""Where a decode step's time goes, end to end: the GPU kernels of one compiled + CUDA-graph
decode step of a Qwen3-30B-A3B-shaped transformers model, bf16 vs int4 experts.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/e2e_profile.py --layers 8 --out $OUT

Builds the model with ``w4a16moe.integrations.e2e`` (random weights, real config with
``--layers`` layers), runs the ``-compiled`` pipeline of ``bench --e2e`` (decode step through
``torch.compile`` and captured in a CUDA graph), then replays the decode graph ``--steps``
times under ``torch.profiler`` and sums the kernels by name: microseconds per step and per
layer, launches per step. Writes ``e2e_profile.json`` and prints the top kernels per mode.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch

from w4a16moe.integrations.e2e import GreedyRunner, build_random_model, e2e_config


def profile_mode(precision: str, layers: int, steps: int, top: int) -> dict:
    config = e2e_config("qwen3-30b-a3b", num_layers=layers)
    model = build_random_model(config, precision, "cuda")
    runner = GreedyRunner(model, 64 + steps + 8, 1, cuda_graphs=True, compile=True)
    prompt = torch.randint(0, config.vocab_size, (1, 64))
    runner.generate(prompt, 4)  # compile + capture
    runner.generate(prompt, 2)  # sets the state; the decode graph is replayed below
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner._graph_decode.replay()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        t = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)
        if ev.device_type == torch.autograd.DeviceType.CUDA and t > 0:
            per_name[ev.name].append(t)
    total = sum(sum(v) for v in per_name.values()) / steps
    rows = sorted(((sum(v) / steps, len(v) / steps, k) for k, v in per_name.items()),
                  reverse=True)
    del runner, model
    torch.cuda.empty_cache()
    return {"precision": precision, "layers": layers, "steps": steps,
            "kernel_us_per_step": total, "kernel_us_per_layer": total / layers,
            "launches_per_step": sum(len(v) for v in per_name.values()) / steps,
            "kernels": [{"name": k, "us_per_step": t, "launches_per_step": n}
                        for t, n, k in rows[:top]]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    results = []
    for precision in ("bf16", "int4"):
        r = profile_mode(precision, args.layers, args.steps, args.top)
        results.append(r)
        print(f"\n{precision}: {r['kernel_us_per_step']:.1f} us of kernels per decode step "
              f"({r['kernel_us_per_layer']:.1f} us per layer incl. lm_head share), "
              f"{r['launches_per_step']:.0f} launches per step")
        for k in r["kernels"]:
            print(f"  {k['us_per_step']:8.1f} us  x{k['launches_per_step']:5.1f}  "
                  f"{k['name'][:110]}")
    with open(os.path.join(args.out, "e2e_profile.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
