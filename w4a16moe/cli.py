"""The ``w4a16moe`` command line: ``w4a16moe COMMAND --help`` explains each command."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand modules; each defines ``register(subparsers)`` adding one parser whose
#: ``func(args) -> int`` runs the command. Modules import torch lazily inside ``func``.
COMMAND_MODULES = (
    "w4a16moe.info",
    "w4a16moe.formats.cli",
    "w4a16moe.bench.cli",
    "w4a16moe.profiling.cli",
    "w4a16moe.profile",
    "w4a16moe.kernels.tune",
    "w4a16moe.generate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="w4a16moe",
        description="Fast Mixture-of-Experts layers with int4 expert weights (W4A16) in Triton.",
        epilog="Run 'w4a16moe COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"w4a16moe {__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
