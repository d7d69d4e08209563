"""`loralab collect` (rebuild a sweep's summary.csv) and `loralab wandb-sweep` (a Hydra sweep as a W&B sweep)."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..sweep.grid import named_sweep, wandb_sweep_spec
from ..sweep.summary import failures, write_summary


def collect(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        raise ConfigError(f"DIR={args.dir!r} is not a folder: pass a sweep folder (multirun/...) or a run store (runs/)")
    rows = write_summary(root, mark_unfinished_failed=args.mark_failed)
    failed = failures(rows)
    print(f"{len(rows)} runs ({len(rows) - len(failed)} finished, {len(failed)} not) -> {root / 'summary.csv'}")
    for r in failed:
        print(f"  {r['status']}: {r['run_id'] or r['path']}: {r['error']}")
    return 0


def wandb_sweep(args: argparse.Namespace) -> int:
    path = named_sweep(args.sweep)
    spec = wandb_sweep_spec(path, list(args.overrides), args.metric)
    out = Path(args.out or f"wandb-{path.stem}.yaml")
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"wrote {out}: run `wandb sweep {out}` then `wandb agent <sweep id>`")
    return 0


def register(sub) -> None:
    p = sub.add_parser("collect", help="rebuild summary.csv from the run folders under DIR")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--mark-failed", action="store_true",
                   help="record runs still marked running as failed (only when no job of the sweep is alive)")
    p.set_defaults(func=collect)
    p = sub.add_parser("wandb-sweep", help="write the W&B sweep file equivalent to a named Hydra sweep")
    p.add_argument("sweep", metavar="SWEEP", help="sweeps/<name>.yaml or <name>")
    p.add_argument("overrides", nargs="*", help="fixed overrides added to every run, e.g. task=mrpc")
    p.add_argument("--metric", default="accuracy", help="main metric name to maximize (val/best_<metric>)")
    p.add_argument("--out", default=None)
    p.set_defaults(func=wandb_sweep)
