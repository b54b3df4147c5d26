"""``w4a16moe profile``: run the hybrid experts layer under torch.profiler, write the trace and
print the per-shape bandwidth summary of its annotated GEMMs."""

from __future__ import annotations

import os
import sys

_DESCRIPTION = """\
Run the int4 experts layer (HybridW4A16MoEExperts, random weights of a model's shape) for each
token count under torch.profiler, write the Chrome trace (.json.gz) and print what
'w4a16moe profile-bandwidth' reports for it: per GEMM shape, calls, GPU time, bytes, GB/s and
% of the GPU's streaming bandwidth.

The layer runs eagerly (profiler regions are not recorded inside CUDA graph replays), after
warm-up calls that are not recorded. Needs a GPU; with TRITON_INTERPRET=1 it runs on the CPU
for small shapes (--config of a small model) and reports CPU time.
"""


def _parse_tokens(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--tokens {text!r}: expected comma-separated integers") from None
    if not values or any(v < 0 for v in values):
        raise ValueError(f"--tokens {text!r}: expected non-negative integers")
    return values


def profile_layer(shape, tokens: list[int], trace_path: str, *, dtype=None, device=None,
                  iters: int = 5, warmup: int = 2, decode_threshold: int | None = None,
                  seed: int = 0):
    """Profile the hybrid layer of ``shape`` (a ``bench.models.MoEShape``) at each token count;
    returns the :func:`~w4a16moe.profiling.summarize_traces` summary of the written trace."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .experts import HybridW4A16MoEExperts
    from .profiling import summarize_traces
    from .quantize import random_experts

    if iters < 1:
        raise ValueError(f"iters is {iters}; expected >= 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton kernels need a GPU; set TRITON_INTERPRET=1 to run them on "
                         "the CPU (slow: use a small --config)")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float16)
    experts = random_experts(shape.num_experts, shape.hidden_size, shape.intermediate_size,
                             group_size=shape.group_size, dtype=dtype, device=device, seed=seed)
    moe = HybridW4A16MoEExperts(experts, shape.top_k, activation=shape.activation,
                                decode_threshold=decode_threshold)
    moe.reserve(max(tokens))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inputs = []
    for m in tokens:
        x = (torch.randn(m, shape.hidden_size, generator=gen) * 0.5).to(device, dtype)
        logits = torch.randn(m, shape.num_experts, generator=gen).to(device)
        inputs.append((x, logits))

    def run_all() -> None:
        for x, logits in inputs:
            moe.forward_logits(x, logits, renormalize=shape.renormalize, scoring=shape.scoring)

    for _ in range(warmup):
        run_all()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(iters):
            run_all()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
    prof.export_chrome_trace(trace_path)
    return summarize_traces([trace_path])


def run(args) -> int:
    import json

    import torch
    from rich.console import Console

    from .bench.models import get_shape, shape_from_config
    from .profiling import render_table

    shape = shape_from_config(args.config) if args.config else get_shape(args.model)
    tokens = _parse_tokens(args.tokens)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.dtype]
    console = Console(stderr=args.json)
    with console.status(f"profiling {shape.name} at M={','.join(map(str, tokens))}"):
        rows = profile_layer(shape, tokens, args.trace, dtype=dtype, device=args.device,
                             iters=args.iters, decode_threshold=args.decode_threshold)
    if args.json:
        print(json.dumps(rows.to_json(), indent=2))
    else:
        out = Console()
        render_table(rows, out if out.is_terminal else Console(width=250))
        out.print(f"trace written to {args.trace}")
    return 0


def register(sub) -> None:
    import argparse

    p = sub.add_parser("profile", help="profile the int4 experts layer and summarise its GEMMs",
                       description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default="qwen3-30b-a3b",
                       help="built-in model shape (default: qwen3-30b-a3b; see 'bench --help')")
    which.add_argument("--config", help="a transformers config.json of an MoE model instead")
    p.add_argument("--tokens", default="1,8,512",
                   help="comma-separated token counts M (default: 1,8,512)")
    p.add_argument("--trace", default="w4a16moe_trace.json.gz",
                   help="where to write the Chrome trace (default: w4a16moe_trace.json.gz)")
    p.add_argument("--iters", type=int, default=5, help="recorded calls per M (default: 5)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default=None,
                   help="activation dtype (default: bf16 on a GPU, fp16 on the CPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    p.add_argument("--decode-threshold", type=int, default=None,
                   help="largest M for the decode kernel (default: measured per GPU)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["profile", *sys.argv[1:]]))
