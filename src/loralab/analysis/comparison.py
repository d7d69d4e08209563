"""REPRODUCTION.md's comparison table: loralab's Table 2 runs beside reference scores kept as data (a CSV of
rows, tasks, metrics and values in percent, each with its source)."""

from __future__ import annotations

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
    metrics = refs.groupby("task")["metric"].unique()
    mixed = {task: list(m) for task, m in metrics.items() if len(m) > 1}
    if mixed:
        raise AnalysisError(f"{path}: one metric per task, found {mixed}; score each task with one metric")
    return refs


def best_value(result: Mapping, metric: str) -> float | None:
    """The run's best epoch for ``metric`` (as Table 2 reports the best epoch), in percent."""
    values = [h[metric] for h in result.get("history", []) if metric in h]
    return 100 * max(values) if values else None


def comparison_markdown(results: Iterable[Mapping], refs: pd.DataFrame) -> str:
    """Rows: loralab's methods (median over seeds of each run's best epoch), then each reference row in file order;
    columns: the tasks the references score, each with its metric."""
    task_metric = dict(zip(refs["task"], refs["metric"]))
    tasks = [t for t in PAPER_TASKS if t in task_metric]
    seeds: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r.get("status") == "finished" and r.get("task") in task_metric:
            value = best_value(r, task_metric[r["task"]])
            if value is not None:
                seeds.setdefault((r["method"], r["task"]), []).append(value)
    header = [f"{t} ({METRIC_NAMES.get(task_metric[t], task_metric[t])})" for t in tasks]
    lines = ["| | " + " | ".join(header) + " |", "|---|" + ":---:|" * len(tasks)]
    for method in [m for m in PAPER_METHODS if any(k[0] == m for k in seeds)]:
        cells = []
        for t in tasks:
            values = seeds.get((method, t), [])
            n = "" if len(values) in (0, 3) else f" ({len(values)} seed{'s' if len(values) > 1 else ''})"
            cells.append(f"{median(values):.1f}{n}" if values else "-")
        lines.append(f"| loralab, {METHOD_ROWS.get(method, method)} (median of 3 seeds) | " + " | ".join(cells) + " |")
    for row, group in refs.groupby("row", sort=False):
        values = dict(zip(group["task"], group["value"]))
        lines.append(f"| {row} | " + " | ".join(f"{values[t]:.1f}" if t in values else "-" for t in tasks) + " |")
    notes = []
    for row, group in refs.groupby("row", sort=False):
        sources = list(dict.fromkeys(group["source"]))
        text = sources[0] if len(sources) == 1 else "; ".join(f"{t}: {s}" for t, s in zip(group["task"], group["source"]))
        notes.append(f"- {row}: {text}")
    return "\n".join(lines + ["", "Sources of the reference rows:", *notes])
