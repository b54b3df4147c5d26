"""Turn the files a GPU run wrote under $OUT into ``benchmarks/results/<gpu>.json`` records
and the markdown tables of ``benchmarks/RESULTS.md``.

    python benchmarks/make_results.py --gpu-check OUT/gpu_check.json [--e2e OUT/e2e.json]
        [--results benchmarks/results/h100.json] [--tables tables.md]

Layer records keep the keys of the issue ({"model", "M", "path", "kernel_us", "layer_us",
"floor_us", "bf16_us", "read_gbps", "gpu", "torch", "triton", "date"}) plus what explains
them (impl, hybrid_kernel, x_floor, speedup_vs_bf16, rel_err, bytes, flops, u, copies,
section, and the SM clock during the timings: clocks, layer_clocks); end-to-end records are
kept whole. A time measured while the card held its SM clock down is marked with a dagger.
Records of the same run (same gpu and date day) replace older ones with the same key.
"""

from __future__ import annotations

import argparse
import json
import os

from w4a16moe.bench.clocks import any_held, held_note, held_time

LAYER_KEYS = ("model", "M", "path", "impl", "hybrid_kernel", "kernel_us", "layer_us",
              "floor_us", "floor_bound", "bf16_us", "read_gbps", "x_floor", "speedup_vs_bf16",
              "rel_err", "bytes", "flops", "u", "copies", "routings", "timing", "section", "gpu",
              "torch", "triton", "date", "error", "clocks", "layer_clocks")
DAGGER = " &dagger;"
SLOWED_NOTE = held_note(DAGGER.strip() + ":") + "."


def layer_records(report: dict) -> list[dict]:
    out = []
    for r in report["records"]:
        rec = {k: r.get(k) for k in LAYER_KEYS if k in r}
        rec["kind"] = "layer"
        rec["read_gbps_measured"] = report["rates"]["read_gbps"]
        rec["matmul_tflops_measured"] = report["rates"]["matmul_tflops"]
        out.append(rec)
    return out


def _key(rec: dict) -> tuple:
    return (rec.get("kind"), rec.get("model"), rec.get("M"), rec.get("path"),
            rec.get("section"), rec.get("mode"), rec.get("prompt_len"), rec.get("new_tokens"))


def merge(path: str, new: list[dict]) -> list[dict]:
    old = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    keys = {_key(r) for r in new}
    merged = [r for r in old if _key(r) not in keys] + new
    with open(path, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=1)
    return merged


def _f(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def layer_table(records: list[dict], section: str) -> str:
    rows = [r for r in records if r.get("kind") == "layer" and r.get("section") == section]
    lines = ["| model | M | path (kernel) | experts us | layer us | floor us | x floor | "
             "bf16 us | vs bf16 | GB/s | rel err |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["path"] if r.get("impl") in (None, r["path"]) else f"{r['path']} ({r['impl']})"
        lines.append(f"| {r['model']} | {r['M']} | {name} | "
                     f"{held_time(r['kernel_us'], r.get('clocks'), DAGGER)} | "
                     f"{held_time(r['layer_us'], r.get('layer_clocks'), DAGGER)} | "
                     f"{_f(r['floor_us'])} | "
                     f"{_f(r['x_floor'], '.2f')} | "
                     f"{_f(r['bf16_us'])} | {_f(r['speedup_vs_bf16'], '.2f')} | "
                     f"{_f(r['read_gbps'], '.0f')} | {_f(r.get('rel_err'), '.1e')} |")
    if any_held(rows):
        lines += ["", SLOWED_NOTE]
    return "\n".join(lines)


def e2e_table(records: list[dict]) -> str:
    lines = ["| model | mode | prompt/new | TTFT ms | TPOT ms | floor TPOT ms | bf16 TPOT ms |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in records:
        if r.get("kind") != "e2e":
            continue
        lines.append(f"| {r['model']} | {r['mode']} | {r['prompt_len']}/{r['new_tokens']} | "
                     f"{_f(r['ttft_ms'], '.2f')} | {_f(r['tpot_ms'], '.2f')} | "
                     f"{_f(r['floor_tpot_ms'], '.2f')} | {_f(r['bf16_tpot_ms'], '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu-check", required=True, help="gpu_check.json of a GPU run")
    ap.add_argument("--e2e", help="e2e.json records of `w4a16moe bench --e2e --out`")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "h100.json"))
    ap.add_argument("--tables", help="write the markdown tables here (default: stdout)")
    args = ap.parse_args(argv)
    with open(args.gpu_check, encoding="utf-8") as f:
        report = json.load(f)
    new = layer_records(report)
    if args.e2e:
        with open(args.e2e, encoding="utf-8") as f:
            new += [dict(r, kind="e2e") for r in json.load(f)]
    merged = merge(args.results, new)
    text = ("## Decode section\n\n" + layer_table(merged, "decode") + "\n\n## Sweep\n\n"
            + layer_table(merged, "sweep") + "\n\n## End to end\n\n" + e2e_table(merged) + "\n")
    if args.tables:
        with open(args.tables, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
