"""`loralab <command>`: each command module registers its own subparser; this file only dispatches."""
from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError

# Modules exposing `register(subparsers)`; a subparser sets `func(args) -> int`.
COMMAND_MODULES = (
    "loralab.commands",
    "loralab.analysis.commands",
    "loralab.params",
    "loralab.predict",
    "loralab.merge",
    "loralab.reproduce",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralab", description="LoRA experiment sweeps: analysis and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a command module not shipped in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"loralab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
