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
