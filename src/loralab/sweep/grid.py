"""A sweep's grid as Hydra parses it: the values of one sweep override, and a named sweep as a W&B sweep spec."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..config import CONF_DIR
from ..errors import ConfigError


def sweep_values(key: str, value: str) -> list:
    """Expand a Hydra sweep value (`1,2,4`, `range(1,5)`, `choice(a,b)`) with Hydra's own parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = OverridesParser.create().parse_override(f"{key}={value}")
    if not override.is_sweep_override():
        return [override.value()]
    return [v for v in override.sweep_iterator()]


def named_sweep(name: str) -> Path:
    """A sweep file: a path, or the name of one in conf/sweep/ (what `+sweep=<name>` composes)."""
    path = Path(name)
    if not path.exists():
        path = CONF_DIR / "sweep" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"SWEEP={name!r} is neither a file nor a named sweep in sweeps/: "
                          f"use e.g. sweeps/rank.yaml or one of {sorted(p.stem for p in (CONF_DIR / 'sweep').glob('*.yaml'))}")
    return path


def wandb_sweep_spec(path: Path, overrides: list[str], metric: str) -> dict[str, Any]:
    """The W&B grid sweep equivalent to a Hydra sweep file (same axes and values, same fixed overrides)."""
    doc = yaml.safe_load(path.read_text()) or {}
    params = ((doc.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    fixed = [f"{k}={v}" for k, v in doc.items() if k not in ("hydra", "defaults")]
    return {
        "program": "train.py", "method": "grid", "name": path.stem,
        "metric": {"name": "val/best_" + metric, "goal": "maximize"},
        "parameters": {k: {"values": sweep_values(k, str(v))} for k, v in params.items()},
        "command": ["${env}", "${interpreter}", "${program}", *fixed, *overrides, "${args_no_hyphens}",
                    "logger=wandb"],
    }
