"""``w4a16moe info``: versions, device, and how Triton kernels will run here."""

from __future__ import annotations

import json
import os
import platform


def triton_mode() -> str:
    """``"native"`` when kernels compile for a GPU, ``"interpreted"`` under TRITON_INTERPRET=1,
    ``"unavailable"`` when neither works (CPU-only machine without the interpreter)."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreted"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "unavailable"
    return "native" if torch.cuda.is_available() else "unavailable"


def tuned_files(device=None) -> dict[str, dict]:
    """Which shipped tuned files the GPU uses: ``prefill_tiles`` and ``switch_points``, each
    ``{"source": "own" | "sibling" | "none", "file": path or None, "tuned_on": GPU name}``
    (see :func:`w4a16moe.kernels.configs.resolve_tuned_file`)."""
    from .kernels import configs

    out = {}
    for key, suffix in (("prefill_tiles", configs.CONFIGS_SUFFIX),
                        ("switch_points", configs.THRESHOLDS_SUFFIX)):
        path, source = configs.resolve_tuned_file(device, suffix)
        gpu = configs.recorded_gpu(path) if source != "none" else None
        out[key] = {"source": source, "file": None if source == "none" else str(path),
                    "tuned_on": gpu["name"] if gpu else None}
    return out


def _describe_tuned(entry: dict) -> str:
    if entry["source"] == "own":
        return f"{os.path.basename(entry['file'])} (tuned on this GPU)"
    if entry["source"] == "sibling":
        return (f"{os.path.basename(entry['file'])} (borrowed: tuned on {entry['tuned_on']}, "
                "same compute capability and SM count)")
    return "none (heuristic; 'w4a16moe tune' makes one)"


def collect() -> dict[str, object]:
    import torch

    from . import __version__

    info: dict[str, object] = {"w4a16moe": __version__, "python": platform.python_version(),
                               "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    for mod in ("numpy", "safetensors", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
        info.update(tuned_files())
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, "\
                         f"{os.cpu_count()} cores)"
    info["triton_mode"] = triton_mode()
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in info.items():
        if isinstance(value, dict):
            value = _describe_tuned(value)
        table.add_row(key, "-" if value is None else str(value))
    Console().print(table)
    if info["triton_mode"] == "unavailable":
        print("\nNo GPU: set TRITON_INTERPRET=1 to run the Triton kernels on the CPU "
              "(slow; meant for tests on small shapes).")
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, device, and whether Triton runs natively",
                       description="Print library versions, the device, and whether Triton "
                                   "kernels run natively on a GPU or under the interpreter.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
