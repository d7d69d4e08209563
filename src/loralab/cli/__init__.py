"""`loralab <command>`: each command module registers its subparsers; this file dispatches and reports errors."""
from __future__ import annotations

import argparse
import sys

from ..errors import LoralabError, report
from . import adapters, analysis, params, reproduce, runs

COMMANDS = (runs, analysis, params, adapters, reproduce)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralab", description="LoRA experiment sweeps: analysis and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LoralabError as e:
        return report(f"loralab {args.command}", e)


if __name__ == "__main__":
    sys.exit(main())
