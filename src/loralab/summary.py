"""Sweep summaries: one row per run (swept axes, metrics, costs), rebuilt from run folders at any time."""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .store import RESULTS, write_json

SUMMARY = "summary.csv"
RUN_LINK = "run"  # in each Hydra job folder: a link to the run's folder in the store
# Config sections that never make a run different from another (where and how it is recorded).
_NOT_AXES = ("store.", "logger.", "data.dir", "data.cache_dir", "trainer.enable_progress_bar")
COST_FIELDS = ("trainable_params", "total_params", "adapter_bytes", "train_time_s", "train_samples_per_s",
               "peak_memory_mb", "best_epoch")
# Measured memory beside `loralab params`' estimate (train.py). measured_memory_mb: the training steps' peak minus the
# process's memory before the model was built (RSS on CPU, so it includes autograd temporaries and allocator slack);
# estimated_seen_memory_mb: the estimate of the training tensors at the largest micro-batch the run really saw;
# estimated_peak_memory_mb: the same at data.max_length (an upper bound under dynamic padding) with its parts.
MEMORY_FIELDS = ("measured_memory_mb", "estimated_seen_memory_mb", "estimated_peak_memory_mb",
                 "memory_estimate.weights_mb", "memory_estimate.gradients_mb", "memory_estimate.optimizer_mb",
                 "memory_estimate.activations_mb", "memory_estimate_seen.activations_mb", "memory_baseline_mb",
                 "steady_samples_per_s")


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


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return out


def load_rows(paths: Iterable[Path]) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        r["_path"] = str(p.parent)
        rows.append(r)
    return rows


def swept_axes(rows: list[dict]) -> list[str]:
    """Config keys whose value differs between runs: the axes of the sweep."""
    flats = [flatten(r.get("config", {})) for r in rows]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if not k.startswith(_NOT_AXES) and len({str(f.get(k)) for f in flats}) > 1]


def _dotted(r: dict, key: str) -> Any:
    for part in key.split("."):
        r = r.get(part) if isinstance(r, dict) else None
    return r


def summary_rows(rows: list[dict]) -> list[dict[str, Any]]:
    axes = swept_axes(rows)
    metric_keys = sorted({k for r in rows for k in ((r.get("metrics") or {}).get("best") or {})})
    out = []
    for r in rows:
        flat = flatten(r.get("config", {}))
        main = r.get("main_metric") or {}
        row = {"run_id": r.get("run_id"), "status": r.get("status"), "task": r.get("task"), "seed": r.get("seed"),
               **{a: flat.get(a) for a in axes}, "main_metric": main.get("name"), "main_value": main.get("value"),
               **{f"best.{m}": ((r.get("metrics") or {}).get("best") or {}).get(m) for m in metric_keys},
               **{c: r.get(c) for c in COST_FIELDS}, **{c: _dotted(r, c) for c in MEMORY_FIELDS},
               "error": r.get("error"), "path": r["_path"]}
        out.append(row)
    return out


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_summary(sweep_dir: Path, mark_unfinished_failed: bool = False) -> list[dict[str, Any]]:
    """Write summary.csv in sweep_dir from the runs under it; at the end of a sweep, runs still "running"
    belong to jobs that died without a word (killed, cancelled, out of memory) and are recorded as failed."""
    sweep_dir = Path(sweep_dir)
    paths = find_results(sweep_dir)
    if mark_unfinished_failed:
        for p in paths:
            r = json.loads(p.read_text())
            if r.get("status") == "running":
                r.update(status="failed", error="the job ended without a result (killed, cancelled or out of memory); "
                                                "launch the sweep again to resume it")
                write_json(p, r)
    rows = summary_rows(load_rows(paths))
    tmp = sweep_dir / f".{SUMMARY}.tmp"
    tmp.write_text(to_csv(rows))
    os.replace(tmp, sweep_dir / SUMMARY)
    return rows


def failures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] != "finished"]
