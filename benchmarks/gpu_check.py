#!/usr/bin/env python3
"""One GPU session: the test suite, the L2-rotation check and the layer benchmarks.

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--quick] [--no-tests] [--no-rotation]
        [--no-bench] [--no-sweep] [--models qwen3-30b-a3b,mixtral-8x7b] [--budget-s 500]

Sections (each can be turned off):
  tests     ``python3 -m pytest -q tests -x`` in a subprocess; pass/fail counts.
  rotation  cold (weights rotated over copies) vs warm (one copy) timing of the same graph:
            a layer whose weights fit the L2 must run clearly faster warm.
  bench     per model: M = 1, 2, 4, 8 with every path that imports (decode, mixed, prefill,
            hybrid, bf16); when the hybrid path exists also the sweep M = 1..8192 (mixed up
            to M = 8).
  robustness  ``benchmarks/robustness_bench.py``: the deterministic mode's cost.
  e2e       ``w4a16moe bench --e2e`` (Qwen3-30B-A3B config, 48 layers): TTFT / TPOT of
            bf16 and int4 with CUDA graphs and torch.compile + CUDA graphs (~5 min: a
            10-minute slot holds it only without the tests, so run it as a second call).
Writes ``$OUT/gpu_check.json`` (all records, rates, test counts), ``$OUT/gpu_check.log``,
``$OUT/robustness.json``, ``$OUT/e2e.json`` and
``$OUT/layer.png`` (if matplotlib is present), and prints a short table last. Sections past
``--budget-s`` seconds are skipped (noted), so the run ends well inside a 10-minute slot.

On a freshly started machine (empty Triton cache) compiling every kernel the tests use takes
longer than the tests' default slot (it ran past 420 s on the H100 once the config table had
its mid-M buckets; 80 s with a warm cache), so use three calls there: the tests alone
(``--no-rotation --no-bench --no-robustness --no-e2e --tests-timeout-s 560``), then
``--no-tests --no-e2e``, then the e2e section (``--no-tests --no-rotation --no-bench
--no-robustness``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DECODE_MS = [1, 2, 4, 8]
SWEEP_MS = [2**i for i in range(14)]  # 1 .. 8192
#: the decode kernel is timed in the sweep up to this M (it is meant for few tokens)
DECODE_SWEEP_MAX_M = 256
#: the mixed path (GEMM1 on the mma tiles, GEMM2 on the decode kernel) is a few-token path:
#: the sweep times it up to here
MIXED_SWEEP_MAX_M = 8


class Log:
    def __init__(self, path: str) -> None:
        self.f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in main

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def run_subprocess(cmd: list[str], timeout_s: int) -> tuple[str, int, float]:
    """Run ``cmd`` from the repo root with the package importable and the kernels compiled
    (not interpreted): ``(stdout + stderr, returncode (-1 on timeout), seconds)``."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the GPU runs the kernels natively
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        text += f"\nTIMEOUT after {timeout_s} s"
        rc = -1
    return text, rc, round(time.perf_counter() - t0, 1)


def run_tests(log: Log, out_dir: str, timeout_s: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "tests", "-p", "no:cacheprovider"]
    text, rc, seconds = run_subprocess(cmd, timeout_s)
    with open(os.path.join(out_dir, "pytest.log"), "w", encoding="utf-8") as f:
        f.write(text)
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "xfailed", "xpassed")}
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    if summary:
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)",
                                  summary[-1]):
            counts["error" if word.startswith("error") else word] += int(n)
    failures = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    result = {"returncode": rc, "seconds": seconds, **counts,
              "failures": failures[:20], "summary": summary[-1] if summary else text[-300:]}
    log(f"tests: rc={rc} {result['summary']}")
    for ln in failures[:10]:
        log(f"  {ln}")
    return result


def run_script(log: Log, name: str, cmd: list[str], timeout_s: int) -> dict:
    """Run one benchmark script in a subprocess (its own CUDA context), log the end of its
    output and return ``{"returncode", "seconds"}``."""
    log(f"{name}: {' '.join(cmd)}")
    text, rc, seconds = run_subprocess(cmd, timeout_s)
    for line in text.splitlines()[-40:]:
        log(f"  {line}")
    return {"returncode": rc, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="qwen3 only, M=1,8, no sweep, shorter sampling")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--no-rotation", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="run the M = 1..8192 sweep even without the hybrid path")
    ap.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--paths", default=None,
                    help="override the path list (default: what imports of decode, prefill, "
                         "hybrid, bf16)")
    ap.add_argument("--budget-s", type=float, default=500.0,
                    help="skip sections that would start after this many seconds")
    ap.add_argument("--tests-timeout-s", type=int, default=420,
                    help="the suite takes ~150 s with a warm Triton cache, ~400 s cold")
    ap.add_argument("--no-e2e", action="store_true",
                    help="skip the end-to-end transformers run (bench --e2e, ~5 min)")
    ap.add_argument("--e2e-modes", default="bf16-graphs,bf16-compiled,int4-graphs,int4-compiled")
    ap.add_argument("--e2e-timeout-s", type=int, default=420)
    ap.add_argument("--no-robustness", action="store_true",
                    help="skip the deterministic-mode cost benchmark")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "out")))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gpu_check.log"))
    t_start = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - t_start

    report: dict = {"sections_skipped": []}
    if not args.no_tests:
        report["tests"] = run_tests(log, args.out, args.tests_timeout_s)

    import torch

    from w4a16moe.bench.layer import bench_layer, cold_vs_warm
    from w4a16moe.bench.models import MoEShape, get_shape
    from w4a16moe.bench.paths import PATHS
    from w4a16moe.bench.timing import as_device, measure_device, rotation_probe

    if not torch.cuda.is_available():
        log("no CUDA device: this script is for the GPU (the tests section ran above)")
        return 1
    device = as_device("cuda")
    rates = measure_device(device)
    report["rates"] = rates.as_dict()
    report["versions"] = {"torch": torch.__version__,
                          "triton": __import__("triton").__version__}
    log(f"{rates.device}: read {rates.read_gbps:.0f} GB/s ({rates.read_method}); matmul "
        f"{rates.matmul_tflops:.0f} TFLOP/s ({rates.matmul_method})  [{elapsed():.0f} s]")

    candidates = (args.paths.split(",") if args.paths
                  else ["decode", "mixed", "prefill", "hybrid", "bf16"])
    paths = []
    for name in candidates:
        reason = PATHS[name].unavailable("cuda") if name in PATHS else None
        if reason:
            log(f"path {name}: unavailable ({reason})")
        else:
            paths.append(name)
    log(f"paths: {paths}")
    target = 100.0 if args.quick else 150.0

    if not args.no_rotation:
        small = MoEShape("rotation-8x2", num_experts=8, top_k=2, hidden_size=2048,
                         intermediate_size=1024)
        checks = [(small, "bf16-grouped")]
        if "decode" in paths:
            checks.append((get_shape("qwen3-30b-a3b"), "decode"))
        report["rotation"] = []
        probe = rotation_probe(device, target_ms=target)
        report["rotation"].append(dict(probe, path="stream (torch.sum)"))
        log(f"rotation probe: {probe['nbytes'] / 2**20:.0f} MiB read, {probe['copies']} copies: "
            f"cold {probe['cold_gbps']:.0f} GB/s, warm {probe['warm_gbps']:.0f} GB/s "
            f"(cold/warm time x{probe['ratio']:.2f})")
        for shape, path in checks:
            try:
                r = cold_vs_warm(shape, 1, path, device=device, target_ms=target)
            except Exception as exc:  # noqa: BLE001 - report and go on
                log(f"rotation {shape.name}/{path}: {type(exc).__name__}: {exc}")
                continue
            report["rotation"].append(r)
            log(f"rotation {shape.name} M=1 {path}: {r['active_mib']:.0f} MiB active, "
                f"{r['copies']} copies: cold {r['cold_us']:.1f} us ({r['cold_gbps']:.0f} GB/s)"
                f", warm {r['warm_us']:.1f} us ({r['warm_gbps']:.0f} GB/s), "
                f"cold/warm x{r['ratio']:.2f}  [{elapsed():.0f} s]")

    records: list[dict] = []
    models = ["qwen3-30b-a3b"] if args.quick else args.models.split(",")
    plan = []
    if not args.no_bench:
        for model in models:
            plan.append((model, [1, 8] if args.quick else DECODE_MS, paths, "decode"))
        if ("hybrid" in paths or args.sweep) and not (args.quick or args.no_sweep):
            for model in models:
                plan.append((model, SWEEP_MS, paths, "sweep"))
    for model, ms, ps, section in plan:
        if elapsed() > args.budget_s:
            report["sections_skipped"].append(f"{section} {model}")
            log(f"budget: skipping {section} {model}")
            continue
        shape = get_shape(model)
        t0 = time.perf_counter()
        recs = bench_layer(shape, ms, ps, "bf16", device, rates=rates, target_ms=target,
                           max_m=({"decode": DECODE_SWEEP_MAX_M, "mixed": MIXED_SWEEP_MAX_M}
                                  if section == "sweep" else None),
                           log=lambda msg: log(f"  {msg}"))
        for r in recs:
            r["section"] = section
        records.extend(recs)
        log(f"bench {section} {model}: {len(recs)} records in {time.perf_counter() - t0:.0f} s "
            f"[{elapsed():.0f} s]")
    report["records"] = records

    if not args.no_robustness:
        report["robustness"] = run_script(
            log, "robustness", [sys.executable, os.path.join(ROOT, "benchmarks",
                                                            "robustness_bench.py"),
                                "--out", os.path.join(args.out, "robustness.json"),
                                "--target-ms", "50"], 300)
    if not args.no_e2e:
        report["e2e"] = run_script(
            log, "e2e", [sys.executable, "-m", "w4a16moe.bench.cli", "--e2e", "--e2e-modes",
                         args.e2e_modes, "--out", os.path.join(args.out, "e2e.json")],
            args.e2e_timeout_s)

    with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    if records:
        try:
            from w4a16moe.bench.plot import plot_records

            plot_records(records, os.path.join(args.out, "layer.png"))
        except ImportError as exc:
            log(f"no plot: {exc}")

    # the full table goes to the log file; the short one (decode section, a few sweep
    # points) is printed last
    short_ms = {1, 8, 64, 512, 4096, 8192}
    lines = [f"{'model':15} {'M':>5} {'path':22} {'kernel':>9} {'layer':>9} {'floor':>8} "
             f"{'xfloor':>6} {'bf16':>9} {'vs bf16':>7} {'GB/s':>6} {'err':>8}"]
    short = list(lines)

    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    from w4a16moe.bench.clocks import any_held, held_note, held_time

    for r in records:
        name = r["path"] if r["impl"] == r["path"] else f"{r['path']}({r['impl']})"
        if r.get("error"):
            line = f"{r['model'][:15]:15} {r['M']:>5} {name[:22]:22} ERROR {r['error'][:60]}"
        else:
            line = (f"{r['model'][:15]:15} {r['M']:>5} {name[:22]:22} "
                    f"{held_time(r['kernel_us'], r.get('clocks')):>9} "
                    f"{held_time(r['layer_us'], r.get('layer_clocks')):>9} {f(r['floor_us']):>8} "
                    f"{f(r['x_floor'], '.2f'):>6} "
                    f"{f(r['bf16_us']):>9} {f(r['speedup_vs_bf16'], '.2f'):>7} "
                    f"{f(r['read_gbps'], '.0f'):>6} {f(r['rel_err'], '.1e'):>8}")
        lines.append(line)
        if r.get("section") == "decode" or r["M"] in short_ms:
            short.append(line)
    if any_held(records):
        lines.append(held_note())
        short.append(held_note())
    log.f.write("\nall records:\n" + "\n".join(lines) + "\n\n")
    log("")
    if "tests" in report:
        t = report["tests"]
        log(f"tests: {t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
            f"{t['skipped']} skipped ({t['seconds']} s, rc {t['returncode']})")
    for r in report.get("rotation", []):
        log(f"L2 rotation {r.get('model', '')} {r['path']}: cold {r['cold_us']:.1f} us, warm "
            f"{r['warm_us']:.1f} us (x{r['ratio']:.2f})")
    for line in short:
        log(line)
    if report["sections_skipped"]:
        log(f"skipped for time: {report['sections_skipped']}")
    for name in ("robustness", "e2e"):
        if name in report:
            log(f"{name}: rc {report[name]['returncode']} in {report[name]['seconds']} s")
    log(f"done in {elapsed():.0f} s; results in {args.out}")
    log.f.close()
    failed = report.get("tests", {}).get("returncode", 0) not in (0, 5)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
