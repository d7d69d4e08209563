"""The one results collector: every results.json under a folder (a sweep, a store, a report's runs), each run once.

Hydra job folders link to their run in the store, so the walk follows links and counts a run's real folder once.
A results.json that does not parse is returned as a `damaged` record, never raised.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..store import RESULTS, flatten

DAMAGED = "damaged"


def find_results(root: Path) -> list[Path]:
    """Every results.json under root, following links (job folders link to the store), each run once."""
    seen, found = set(), []
    for dirpath, _, files in os.walk(root, followlinks=True):
        if RESULTS in files and ".hydra" not in dirpath:
            path = Path(dirpath) / RESULTS
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                found.append(path)
    return sorted(found)


def read_all(root: Path) -> list[dict[str, Any]]:
    """The records under root, each with `_path` (its folder); unreadable files as status "damaged"."""
    records = []
    for path in find_results(Path(root)):
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            record = {"status": DAMAGED, "run_id": path.parent.name,
                      "error": f"{path} does not parse ({type(e).__name__}); relaunch the run to train or repair it"}
        record["_path"] = str(path.parent)
        records.append(record)
    return records


def result_row(record: dict[str, Any]) -> dict[str, Any]:
    """One flat row: top-level fields (metrics.best.f1, main_metric.value, ...) plus config keys (lora.r, ...)."""
    row = flatten({k: v for k, v in record.items() if k not in ("config", "versions", "_path")})
    for key, value in flatten(record.get("config") or {}).items():
        row.setdefault(key, value)  # top-level fields win; they are the recorded truth
    row["path"] = record.get("_path")
    return row


def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([result_row(r) for r in records])
