"""``w4a16moe bench``: time the MoE layer paths on one model shape at several token counts."""

from __future__ import annotations

import json
import os
import sys

GPU_DEFAULT_MS = (1, 2, 4, 8)
CPU_DEFAULT_MS = (1, 2, 4)


def parse_ms(text: str) -> list[int]:
    """``"1,2,4,8"`` or ``"1..8192"`` (powers of two from the first to the last) or a mix."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ".." in part:
                lo, hi = (int(v) for v in part.split(".."))
                m = lo
                while m <= hi:
                    out.append(m)
                    m *= 2
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--m {text!r}: expected integers like 1,2,4,8 or 1..8192") from None
    if not out or min(out) < 1:
        raise ValueError(f"--m {text!r}: expected positive token counts")
    return sorted(set(out))


def append_records(path: str, records: list[dict]) -> int:
    """Append ``records`` to the JSON list in ``path`` (created if missing); returns the new
    total. Written to a temporary file and renamed."""
    existing: list = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                existing = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); expected a list of "
                                 "records") from None
        if isinstance(existing, dict) and isinstance(existing.get("records"), list):
            existing = existing["records"]
        if not isinstance(existing, list):
            raise ValueError(f"{path} holds a {type(existing).__name__}; expected a JSON list "
                             "of records")
    existing.extend(records)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(existing, f, indent=1)
    os.replace(tmp, path)
    return len(existing)


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def records_table(records: list[dict], title: str | None = None):
    """A rich Table of the records: M, path, kernel/layer/floor us, x floor, bf16 us,
    speedup, GB/s, relative error. A time measured while the card held its SM clock down
    (see :mod:`.clocks`) carries a ``*``, explained in the caption."""
    from rich.table import Table

    from .clocks import any_held, held_note, held_time

    table = Table(title=title, header_style="bold")
    if any_held(records):
        table.caption = held_note()
    for col in ("M", "path", "kernel us", "layer us", "floor us", "x floor", "bf16 us",
                "vs bf16", "GB/s", "rel err"):
        table.add_column(col, justify="left" if col == "path" else "right")
    last_m = None
    for r in records:
        if last_m is not None and r["M"] != last_m:
            table.add_section()
        last_m = r["M"]
        name = r["path"] if r.get("impl") in (None, r["path"]) else f"{r['path']} ({r['impl']})"
        if r.get("error"):
            table.add_row(str(r["M"]), name, f"[red]{r['error'][:60]}[/red]", *["-"] * 7)
            continue
        err = r.get("rel_err")
        err_s = "-" if err is None else (f"{err:.1e}" if err <= 3e-2 else f"[red]{err:.1e}[/red]")
        table.add_row(str(r["M"]), name, held_time(r["kernel_us"], r.get("clocks")),
                      held_time(r.get("layer_us"), r.get("layer_clocks")),
                      _fmt(r.get("floor_us")), _fmt(r.get("x_floor"), ".2f"),
                      _fmt(r.get("bf16_us")), _fmt(r.get("speedup_vs_bf16"), ".2f"),
                      _fmt(r.get("read_gbps"), ".0f"), err_s)
    return table


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .layer import bench_layer, cold_vs_warm
    from .models import DEFAULT_MODEL, get_shape, shape_from_config
    from .paths import PATHS, default_paths, get_path
    from .timing import as_device, measure_device

    if args.e2e:
        from ..integrations.e2e import (
            MODES,
            compile_options_from_args,
            parse_cases,
            parse_modes,
            run_e2e,
        )

        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
        modes = parse_modes(args.e2e_modes) if args.e2e_modes else MODES
        run_e2e(args.config or args.model or DEFAULT_MODEL, args.num_layers,
                parse_cases(args.cases), modes, out=args.out, as_json=args.json,
                device=args.device, dtype=dtype,
                compile_options=compile_options_from_args(args.compile_mode,
                                                          args.compile_options,
                                                          args.compile_prefill))
        return 0
    err = Console(stderr=True)
    out = Console() if sys.stdout.isatty() else Console(width=130)
    device = as_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    shape = shape_from_config(args.config) if args.config else get_shape(args.model or
                                                                          DEFAULT_MODEL)
    ms = parse_ms(args.m) if args.m else list(GPU_DEFAULT_MS if device.type == "cuda"
                                              else CPU_DEFAULT_MS)
    if args.paths:
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        for p in paths:
            get_path(p)  # unknown names fail here, before any measurement
    else:
        paths = default_paths(device.type)
    skipped = [n for n, p in PATHS.items() if p.default and n not in paths
               and p.unavailable(device.type)]
    if not args.json:
        err.print(f"[bold]{shape.describe()}[/bold]")
        for name in skipped:
            err.print(f"note: path {name} skipped: {PATHS[name].unavailable(device.type)}")
    if device.type == "cpu" and any(PATHS[n].needs_triton for n in skipped):
        err.print("note: the Triton kernels need a GPU; on this CPU only the torch paths are "
                  "timed (TRITON_INTERPRET=1 runs the kernels, slowly, for tests).")

    with err.status("measuring read bandwidth and matmul rate", spinner="dots"):
        rates = measure_device(device, dtype=torch.float16 if args.dtype == "fp16"
                               else torch.bfloat16)
    if not args.json:
        err.print(f"{rates.device}: read {rates.read_gbps:.0f} GB/s ({rates.read_method}); "
                  f"matmul {rates.matmul_tflops:.1f} TFLOP/s ({rates.matmul_method})")
    total = len(ms) * len(paths)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err, transient=True, disable=args.json) as progress:
        task = progress.add_task("bench", total=total)

        def step(label: str) -> None:
            progress.update(task, advance=1, description=label)

        records = bench_layer(shape, ms, paths, args.dtype, device, rates=rates,
                              max_copies=args.max_copies, target_ms=args.target_ms,
                              check=not args.no_check, layer_time=not args.no_layer,
                              on_step=step, log=lambda msg: progress.console.print(msg))
    warm = None
    if args.cold_warm:
        warm = cold_vs_warm(shape, ms[0], args.cold_warm, args.dtype, device)
    if args.out:
        n = append_records(args.out, records)
        if not args.json:
            err.print(f"appended {len(records)} records to {args.out} ({n} in all)")
    if args.plot:
        from .plot import plot_records

        try:
            err.print(f"wrote {plot_records(records, args.plot)}")
        except ImportError as exc:
            err.print(f"[yellow]no plot: {exc}[/yellow]")
    if args.json:
        payload = records if warm is None else {"records": records, "cold_vs_warm": warm}
        print(json.dumps(payload, indent=1))
        return 0
    timing = records[0]["timing"] if records else "-"
    out.print(records_table(records, title=f"{shape.name} on {rates.device} ({args.dtype}, "
                                           f"{timing})"))
    if warm:
        out.print(f"L2 rotation check ({warm['path']}, M={warm['M']}, "
                  f"{warm['active_mib']:.0f} MiB active, {warm['copies']} copies): cold "
                  f"{warm['cold_us']:.1f} us, warm {warm['warm_us']:.1f} us "
                  f"(x{warm['ratio']:.2f})")
    return 0


def register(sub) -> None:
    from .models import MODELS

    p = sub.add_parser(
        "bench", help="time the MoE layer paths (int4 kernels, bf16 baseline) per token count",
        description="Time each path on one MoE layer shape at several token counts: kernel "
                    "time (experts only), layer time (routing included), the floor (bytes / "
                    "measured bandwidth, flops / measured matmul rate) and the bf16 baseline. "
                    "GPU: CUDA graphs with weights rotated over copies so the L2 does not "
                    "hold them. CPU: the torch paths only, timed with perf_counter.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", choices=sorted(MODELS), default=None,
                     help="built-in layer shape (default qwen3-30b-a3b)")
    src.add_argument("--config", metavar="CONFIG_JSON",
                     help="a transformers config.json (or its directory) to take the shape from")
    p.add_argument("--m", metavar="LIST", help="token counts: 1,2,4,8 or 1..8192 (powers of 2); "
                   f"default {','.join(map(str, GPU_DEFAULT_MS))} on a GPU, "
                   f"{','.join(map(str, CPU_DEFAULT_MS))} on a CPU")
    p.add_argument("--paths", metavar="LIST",
                   help="comma-separated paths: decode, prefill, hybrid, bf16, bf16-grouped, "
                        "bf16-bmm, bf16-loop, reference, or NAME=module:function "
                        "(default: decode,prefill,hybrid,bf16 where available)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                   help="activation and scale dtype (default bf16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--json", action="store_true", help="print the records as JSON only")
    p.add_argument("--plot", metavar="PNG", help="write a log-log plot of time vs M")
    p.add_argument("--out", metavar="JSON", help="append the records to this JSON list file")
    p.add_argument("--max-copies", type=int, default=64,
                   help="most weight copies rotated to defeat the L2 (default 64)")
    p.add_argument("--target-ms", type=float, default=None,
                   help="sampling time per measurement (default 200 ms GPU, 50 ms CPU)")
    p.add_argument("--no-check", action="store_true",
                   help="skip comparing each path's output with the fp32 oracle")
    p.add_argument("--no-layer", action="store_true",
                   help="time the experts only, not routing + experts")
    p.add_argument("--cold-warm", metavar="PATH",
                   help="also time PATH at the first M with rotated vs one weight copy "
                        "(shows the L2 rotation works)")
    e2e = p.add_argument_group("end to end (--e2e)")
    e2e.add_argument("--e2e", action="store_true",
                     help="instead of one layer, generate with a whole transformers model of the "
                          "model's real config and random weights: TTFT and TPOT of bf16 and "
                          "int4, eager, with CUDA graphs and torch.compile + CUDA graphs, "
                          "against the TPOT floor")
    e2e.add_argument("--cases", default="128/128,512/1",
                     help="PROMPT/NEW token pairs for --e2e (default: 128/128,512/1)")
    e2e.add_argument("--num-layers", type=int, default=None,
                     help="override the layer count for --e2e (a smaller model)")
    e2e.add_argument("--e2e-modes", metavar="LIST", default=None,
                     help="modes for --e2e: bf16-eager,bf16-graphs,bf16-compiled,int4-eager,"
                          "int4-graphs,int4-compiled (default: all). -compiled: torch.compile "
                          "(fullgraph, static shapes) + CUDA graphs")
    e2e.add_argument("--compile-mode", default=None,
                     help="torch.compile mode of the -compiled modes (default: inductor's "
                          "default with coordinate_descent_tuning; "
                          "max-autotune-no-cudagraphs is accepted but autotunes every GEMM)")
    e2e.add_argument("--compile-options", metavar="JSON", default=None,
                     help='inductor options for -compiled, e.g. '
                          '\'{"coordinate_descent_tuning": true}\'')
    e2e.add_argument("--compile-prefill", action="store_true",
                     help="-compiled modes compile the prefill too (default: the decode step "
                          "only; the prefill runs the eager forward in a CUDA graph). Each "
                          "prompt length is one more whole-model compilation")
    p.set_defaults(func=run)


if __name__ == "__main__":  # python -m w4a16moe.bench.cli ...
    import argparse

    parser = argparse.ArgumentParser(prog="w4a16moe")
    register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(ns.func(ns))
