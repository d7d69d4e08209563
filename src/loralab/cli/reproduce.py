"""`loralab reproduce`: REPRODUCTION.md's sweeps, tables and figures from one command."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.reproduction import PARTS, REPO, Paths, reproduce, train_command
from ..errors import ConfigError


def cmd_reproduce(args: argparse.Namespace) -> int:
    names = args.only.split(",") if args.only else list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise ConfigError(f"--only: unknown part(s) {unknown}; choose from {', '.join(PARTS)} (comma-separated)")
    if not args.analysis_only and not (REPO / "train.py").exists():
        raise ConfigError(f"train.py not found in {REPO}; run `loralab reproduce` from a loralab checkout")
    paths = Paths(Path(args.root), Path(args.docs), Path(args.report), tuple(args.set))
    if args.dry_run:
        for name in names:
            for sweep in PARTS[name].sweeps:
                print(f"# {name}/{sweep.name}: {len(sweep.jobs())} runs")
                print(" ".join(train_command(sweep, paths)[1:]))
        return 0
    reproduce(names, paths, args.analysis_only)
    return 0


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="run REPRODUCTION.md's sweeps and analyses and rewrite its tables")
    p.add_argument("--only", help=f"comma-separated parts (default: all of {', '.join(PARTS)})")
    p.add_argument("--root", default="docs/reproduction/runs",
                   help="run stores, kept in the repository as data (default: %(default)s)")
    p.add_argument("--docs", default="docs/reproduction", help="tables and figures (default: %(default)s)")
    p.add_argument("--report", default="REPRODUCTION.md", help="report whose blocks are rewritten (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override added to every run, e.g. --set trainer.max_epochs=1 for a quick pass "
                        "(changes the run ids: these runs never mix with the full ones)")
    p.add_argument("--analysis-only", action="store_true", help="skip training; rebuild tables from finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the sweeps and their run counts; run nothing")
    p.set_defaults(func=cmd_reproduce)
