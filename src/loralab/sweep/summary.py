"""summary.csv: one row per run of a sweep (its axes, metrics and costs), rebuilt from the run folders at any time."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..store import atomic_write, flatten, is_semantic, mark_failed
from .collect import read_all

SUMMARY = "summary.csv"
COST_FIELDS = ("trainable_params", "total_params", "adapter_bytes", "train_time_s", "train_samples_per_s",
               "peak_memory_mb", "best_epoch")
# Measured memory beside `loralab params`' estimate (run/train.py). measured_memory_mb: the training steps' peak minus
# the process's memory before the model was built (RSS on CPU, so it includes autograd temporaries and allocator
# slack); estimated_seen_memory_mb: the estimate of the training tensors at the largest micro-batch the run really
# saw; estimated_peak_memory_mb: the same at data.max_length (an upper bound under dynamic padding) with its parts.
MEMORY_FIELDS = ("measured_memory_mb", "estimated_seen_memory_mb", "estimated_peak_memory_mb",
                 "memory_estimate.weights_mb", "memory_estimate.gradients_mb", "memory_estimate.optimizer_mb",
                 "memory_estimate.activations_mb", "memory_estimate_seen.activations_mb", "memory_baseline_mb",
                 "steady_samples_per_s")
DIED = "the job ended without a result (killed, cancelled or out of memory); launch the sweep again to resume it"


def swept_axes(records: list[dict]) -> list[str]:
    """Config keys that enter the run id and whose value differs between runs: the axes of the sweep."""
    flats = [flatten(r.get("config") or {}) for r in records]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if is_semantic(k) and len({str(f.get(k)) for f in flats}) > 1]


def summary_rows(records: list[dict]) -> list[dict[str, Any]]:
    axes = swept_axes(records)
    metric_keys = sorted({k for r in records for k in ((r.get("metrics") or {}).get("best") or {})})
    rows = []
    for r in records:
        flat, config = flatten({k: v for k, v in r.items() if k != "config"}), flatten(r.get("config") or {})
        rows.append({"run_id": r.get("run_id"), "status": r.get("status"), "task": r.get("task"), "seed": r.get("seed"),
                     **{a: config.get(a) for a in axes}, "main_metric": flat.get("main_metric.name"),
                     "main_value": flat.get("main_metric.value"),
                     **{f"best.{m}": flat.get(f"metrics.best.{m}") for m in metric_keys},
                     **{c: flat.get(c) for c in (*COST_FIELDS, *MEMORY_FIELDS)},
                     "error": r.get("error"), "path": r["_path"]})
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Rows as CSV (columns in first-seen order), written atomically."""
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(k for r in rows for k in r)) or None, dtype=object)
    return atomic_write(Path(path), lambda tmp: frame.to_csv(tmp, index=False) if rows else tmp.write_text(""))


def write_summary(sweep_dir: Path, mark_unfinished_failed: bool = False) -> list[dict[str, Any]]:
    """Write summary.csv in sweep_dir from the runs under it; at the end of a sweep, runs still "running"
    belong to jobs that died without a word (killed, cancelled, out of memory) and are recorded as failed."""
    sweep_dir = Path(sweep_dir)
    if mark_unfinished_failed:
        for record in read_all(sweep_dir):
            mark_failed(Path(record["_path"]), DIED)
    rows = summary_rows(read_all(sweep_dir))
    write_csv(rows, sweep_dir / SUMMARY)
    return rows


def failures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] != "finished"]
