"""``w4a16moe profile-bandwidth TRACE [TRACE ...]``: per-shape time and GB/s of the annotated
GEMM regions in torch profiler traces and vLLM ``profiler_out_*.txt`` tables."""

from __future__ import annotations

import argparse
import json
import sys

from .bandwidth import (
    DEFAULT_PATTERNS,
    BytesModel,
    TraceError,
    bandwidth_cache_path,
    render_table,
    summarize_traces,
    write_csv,
    write_plot,
)

_DESCRIPTION = f"""\
Summarise the GEMM regions annotated in torch profiler output, per kernel and shape: calls,
total/mean/median/p90 GPU time, bytes moved per call (model below), achieved GB/s, % of the
GPU's streaming bandwidth and share of all GPU time.

TRACE is a Chrome trace (.json or .json.gz, one per rank, from export_chrome_trace or
tensorboard_trace_handler), a key_averages table (vLLM's profiler_out_<rank>.txt), or a
directory of them (its traces, or its tables when it has no trace). Regions are named
'<kernel> MxNxK E=E top_k=k' or '<kernel> MxNxK'; by default the kernels
{', '.join(DEFAULT_PATTERNS)} are matched.

GPU time of a region is the time of the kernels launched inside it (linked through CUDA
runtime correlation ids), else its GPU annotation span; traces without GPU events fall back to
CPU time, and say so. Bytes of one call: u*N*K*bits/8 + u*N*ceil(K/G)*(2 + zero bytes)
+ M*K*2 + M*top_k*N*2, u = E*(1-(1-top_k/E)^M) expected distinct experts (the input of
the second GEMM of a layer counts M*top_k rows).

The peak defaults to the streaming bandwidth measured by w4a16moe on the trace's GPU, stored
in {bandwidth_cache_path()} as {{"<gpu name>": GB/s}}.
"""


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return v


def _progress_callback(console):
    """A rich progress bar by bytes read (the compressed position for .gz), or None when
    stderr is not a terminal."""
    if not console.is_terminal:
        return None, None
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                        transient=True)
    tasks: dict[str, int] = {}

    def update(path: str, done: int, total: int) -> None:
        if path not in tasks:
            tasks[path] = progress.add_task(path.rsplit("/", 1)[-1], total=total)
        progress.update(tasks[path], completed=done)

    return progress, update


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    err = Console(stderr=True)
    try:
        model = BytesModel(weight_bits=args.weight_bits, group_size=args.group_size,
                           act_bytes=args.act_bytes, zero_bytes=args.zero_point_bytes)
        progress, update = (None, None) if args.no_progress else _progress_callback(err)
        if progress is not None:
            with progress:
                summaries = summarize_traces(
                    args.traces, args.pattern, model=model, peak_gbps=args.peak_gbps,
                    skip_unparsed=args.skip_unparsed, by_trace=args.by_trace,
                    on_progress=update)
        else:
            summaries = summarize_traces(
                args.traces, args.pattern, model=model, peak_gbps=args.peak_gbps,
                skip_unparsed=args.skip_unparsed, by_trace=args.by_trace)
        if args.csv:
            try:
                write_csv(summaries, args.csv)
            except OSError as exc:
                raise TraceError(f"{args.csv}: cannot write CSV ({exc.strerror or exc})"
                                 ) from None
        if args.plot:
            write_plot(summaries, args.plot)
    except (TraceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(summaries.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        out = Console()
        render_table(summaries, out if out.is_terminal else Console(width=250))
    return 0


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "profile-bandwidth",
        help="per-shape GPU time and GB/s of annotated GEMMs in profiler traces",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", metavar="TRACE",
                   help="Chrome trace (.json/.json.gz), profiler_out_*.txt table, or directory")
    p.add_argument("--pattern", action="append", metavar="NAME_REGEX",
                   help="regex that must fully match the kernel part of a region name (text "
                        "before the first space); repeatable; replaces the defaults")
    p.add_argument("--weight-bits", type=int, default=4, metavar="BITS",
                   help="bits per weight (default 4)")
    p.add_argument("--group-size", type=int, default=128, metavar="G",
                   help="K values per scale group; 0 for per channel (default 128)")
    p.add_argument("--act-bytes", type=int, default=2, metavar="BYTES",
                   help="bytes per activation and per scale (default 2: fp16/bf16)")
    p.add_argument("--zero-point-bytes", type=float, default=0.0, metavar="BYTES",
                   help="bytes per zero point per (row, group): 0 symmetric (default), 1 for "
                        "w4a16moe's uint8 zeros, 0.5 for packed GPTQ/AWQ zeros")
    p.add_argument("--peak-gbps", type=_positive_float, default=None, metavar="GBPS",
                   help="streaming bandwidth of the GPU in GB/s, for the %% peak column")
    p.add_argument("--csv", metavar="FILE", help="also write the summary as CSV")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", metavar="PNG",
                   help="plot GB/s against bytes per call (needs matplotlib)")
    p.add_argument("--by-trace", action="store_true",
                   help="one row per trace file instead of merging ranks")
    p.add_argument("--skip-unparsed", action="store_true",
                   help="leave out matching regions whose shape cannot be parsed (else error)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``profile-bandwidth`` on its own (``python -m w4a16moe.profiling.cli TRACE``)."""
    parser = argparse.ArgumentParser(prog="w4a16moe")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["profile-bandwidth", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
