"""REPRODUCTION.md's comparison table: loralab's Table 2 runs beside reference scores kept as data (a CSV of
rows, tasks, metrics and values in percent, each with its source)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from statistics import median

import pandas as pd

from ..errors import AnalysisError
from .layouts import PAPER_METHODS, PAPER_TASKS

METHOD_ROWS = {"full": "full fine-tuning", "bitfit": "BitFit", "head": "head only", "lora": "LoRA r=8 q,v"}
METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "matthews": "MCC", "pearson": "Pearson", "spearman": "Spearman"}
REFERENCE_COLUMNS = ("row", "task", "metric", "value", "source")


def read_references(path: Path) -> pd.DataFrame:
    """The reference scores; every task is scored with one metric, which the comparison uses for loralab too."""
    refs = pd.read_csv(path)
    missing = [c for c in REFERENCE_COLUMNS if c not in refs.columns]
    if missing:
        raise AnalysisError(f"{path}: columns {missing} missing; it needs {', '.join(REFERENCE_COLUMNS)}")
    doubled = refs[refs.duplicated(["row", "task"])]
    if not doubled.empty:
        raise AnalysisError(f"{path}: row {doubled['row'].iloc[0]!r} scores {doubled['task'].iloc[0]} twice; keep one")
    if not pd.api.types.is_numeric_dtype(refs["value"]):
        raise AnalysisError(f"{path}: column value must hold numbers (percent), found {refs['value'].tolist()[:3]}")
    metrics = refs.groupby("task")["metric"].unique()
    mixed = {task: list(m) for task, m in metrics.items() if len(m) > 1}
    if mixed:
        raise AnalysisError(f"{path}: one metric per task, found {mixed}; score each task with one metric")
    return refs


def best_value(result: Mapping, metric: str) -> float | None:
    """The highest dev value of ``metric`` over the run's epochs, in percent (Table 2's best epoch is chosen by the
    task's main metric: for MRPC's F1 this may be another epoch)."""
    values = [h[metric] for h in result.get("history", []) if math.isfinite(h.get(metric, math.nan))]
    return 100 * max(values) if values else None


def comparison_markdown(results: Iterable[Mapping], refs: pd.DataFrame, seeds: int = 3) -> str:
    """Rows: loralab's methods (median over seeds of each run's best epoch; a cell with other than ``seeds`` runs
    says how many), then each reference row in file order; columns: the tasks the references score, with their
    metric."""
    task_metric = dict(zip(refs["task"], refs["metric"]))
    tasks = [t for t in PAPER_TASKS if t in task_metric]
    runs: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r.get("status") == "finished" and r.get("task") in task_metric:
            value = best_value(r, task_metric[r["task"]])
            if value is not None:
                runs.setdefault((r["method"], r["task"]), []).append(value)
    header = [f"{t} ({METRIC_NAMES.get(task_metric[t], task_metric[t])})" for t in tasks]
    lines = ["| | " + " | ".join(header) + " |", "|---|" + ":---:|" * len(tasks)]
    for method in [m for m in PAPER_METHODS if any(k[0] == m for k in runs)]:
        cells = []
        for t in tasks:
            values = runs.get((method, t), [])
            n = "" if len(values) in (0, seeds) else f" ({len(values)} seed{'s' if len(values) > 1 else ''})"
            cells.append(f"{median(values):.1f}{n}" if values else "-")
        lines.append(f"| loralab, {METHOD_ROWS.get(method, method)} (median over seeds) | " + " | ".join(cells) + " |")
    for row, group in refs.groupby("row", sort=False):
        values = dict(zip(group["task"], group["value"]))
        lines.append(f"| {row} | " + " | ".join(f"{values[t]:.1f}" if t in values else "-" for t in tasks) + " |")
    notes = []
    for row, group in refs.groupby("row", sort=False):
        sources = list(dict.fromkeys(group["source"]))
        text = sources[0] if len(sources) == 1 else "; ".join(f"{t}: {s}" for t, s in zip(group["task"], group["source"]))
        notes.append(f"- {row}: {text}")
    return "\n".join(lines + ["", "Sources of the reference rows:", *notes])
