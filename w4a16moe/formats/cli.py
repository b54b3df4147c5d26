"""``w4a16moe convert CHECKPOINT OUT``: pack the experts of a quantized MoE checkpoint."""

from __future__ import annotations

import json


def _int_list(text: str | None) -> list[int] | None:
    """``"0,2,5-7"`` -> ``[0, 2, 5, 6, 7]``."""
    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"{text!r} is not a list of indices like 0,2,5-7") from None
    return out


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def run(args) -> int:
    from .checkpoint import convert_checkpoint

    report = convert_checkpoint(
        args.checkpoint, args.out, progress=not args.json and not args.quiet,
        device=args.device, dtype=args.dtype, layers=_int_list(args.layers),
        experts=_int_list(args.experts), quantize_unquantized=args.quantize_unquantized)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    sizes = report.group_sizes()
    table = Table(title=f"{report.checkpoint} -> {report.out_file}", show_header=False)
    rows = [
        ("family", report.family),
        ("format", report.source_format),
        ("layers", f"{len(report.layers)} MoE layers converted"),
        ("experts", f"{report.num_experts} per layer" if report.experts is None
         else f"{len(report.experts)} of {report.num_experts}: {report.experts}"),
        ("sizes", f"H={report.hidden_size} I={report.intermediate_size}"),
        ("group size", ", ".join("per channel" if g in (report.hidden_size,
                                                         report.intermediate_size)
                                 else str(g) for g in sizes)),
        ("act-order", str(any(v["act_order"] for v in report.layers.values()))),
        ("zero points", str(any(v["zeros"] for v in report.layers.values()))),
        ("dtype", report.dtype),
        ("bytes read", _human(report.bytes_in)),
        ("bytes written", _human(report.bytes_out)),
        ("skipped", str(len(report.skipped))),
        ("quantized here", str(len(report.quantized_here))),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console = Console()
    console.print(table)
    for s in report.skipped[:20]:
        console.print(f"[yellow]skipped[/] {s.module}: {s.reason}")
    for s in report.not_experts[:20]:
        console.print(f"[dim]not an expert[/] {s.module}: {s.reason}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="pack the experts of a GPTQ / AWQ / compressed-tensors MoE checkpoint",
        description="Read the expert weights of a quantized Hugging Face MoE checkpoint "
                    "(GPTQ v1/v2, AWQ GEMM, compressed-tensors pack-quantized; Qwen3-MoE, "
                    "Qwen2-MoE, Mixtral, DeepSeek-V2/V3, OLMoE, Granite-MoE) and write them in "
                    "the w4a16moe packed layout to one safetensors file.")
    p.add_argument("checkpoint", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("out", help="output file (.safetensors)")
    p.add_argument("--layers", help="MoE layers to convert, e.g. 0,2,5-7 (default: all)")
    p.add_argument("--experts", help="expert indices to keep, e.g. 0-63 (default: all)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"),
                   help="scale dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="device to convert on (default: cpu)")
    p.add_argument("--quantize-unquantized", action="store_true",
                   help="quantize experts stored unquantized (round to nearest) instead of "
                        "skipping their layers")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
