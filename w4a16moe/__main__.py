"""``python -m w4a16moe``: the ``w4a16moe`` command (see :mod:`w4a16moe.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
