"""`loralab collect` (rebuild a sweep's summary.csv) and `loralab wandb-sweep` (a Hydra sweep as a W&B sweep)."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .config import CONF_DIR, ConfigError


def collect(args: argparse.Namespace) -> int:
    from .summary import failures, write_summary

    root = Path(args.dir)
    if not root.is_dir():
        raise ConfigError(f"DIR={args.dir!r} is not a folder: pass a sweep folder (multirun/...) or a run store (runs/)")
    rows = write_summary(root, mark_unfinished_failed=args.mark_failed)
    failed = failures(rows)
    print(f"{len(rows)} runs ({len(rows) - len(failed)} finished, {len(failed)} not) -> {root / 'summary.csv'}")
    for r in failed:
        print(f"  {r['status']}: {r['run_id'] or r['path']}: {r['error']}")
    return 0


def sweep_values(key: str, value: str) -> list:
    """Expand a Hydra sweep value (`1,2,4`, `range(1,5)`, `choice(a,b)`) with Hydra's own parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(f"{key}={value}")
    if not override.is_sweep_override():
        return [override.value()]
    return [v for v in override.sweep_iterator()]


def wandb_sweep(args: argparse.Namespace) -> int:
    path = Path(args.sweep)
    if not path.exists():
        path = CONF_DIR / "sweep" / f"{args.sweep}.yaml"
    if not path.exists():
        raise ConfigError(f"SWEEP={args.sweep!r} is neither a file nor a named sweep in sweeps/: "
                          f"use e.g. sweeps/rank.yaml or one of {sorted(p.stem for p in (CONF_DIR / 'sweep').glob('*.yaml'))}")
    doc = yaml.safe_load(path.read_text()) or {}
    params = ((doc.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    fixed = [f"{k}={v}" for k, v in doc.items() if k not in ("hydra", "defaults")]
    spec = {
        "program": "train.py", "method": "grid", "name": path.stem,
        "metric": {"name": "val/best_" + args.metric, "goal": "maximize"},
        "parameters": {k: {"values": sweep_values(k, str(v))} for k, v in params.items()},
        "command": ["${env}", "${interpreter}", "${program}", *fixed, *args.overrides, "${args_no_hyphens}",
                    "logger=wandb"],
    }
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
