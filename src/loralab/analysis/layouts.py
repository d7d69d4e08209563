"""The paper's table layouts (Tables 2, 5 and 6) and its row and column order, over `tables.pivot`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

from ..errors import AnalysisError
from .tables import Pivot, add_average, format_value, pivot

# The paper's order: GLUE columns as in Table 2, baselines above LoRA.
PAPER_TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb", "wnli")
PAPER_METHODS = ("full", "bitfit", "head", "lora")


def paper_order(p: Pivot, rows: Sequence[str], cols: Sequence[str]) -> Pivot:
    """Reorder a pivot's rows and columns to ``rows``/``cols`` (labels not listed keep their place at the end)."""
    row_order = [r for r in rows if r in p.median.index] + [r for r in p.median.index if r not in rows]
    col_order = [c for c in cols if c in p.median.columns] + [c for c in p.median.columns if c not in cols]
    for name in ("median", "spread", "count", "params"):
        setattr(p, name, getattr(p, name).reindex(index=row_order, columns=col_order))
    extra = [c for c in p.display.columns if c not in p.median.columns]  # "# Params"
    p.display = p.display.reindex(index=row_order, columns=[*extra, *col_order])
    return p


def table2(df: pd.DataFrame, metric: str | None = None, spread: str = "halfrange") -> Pivot:
    """Paper Table 2: rows = methods, columns = tasks (headed with each task's metric), with # Params and Avg."""
    p = paper_order(pivot(df, ["method"], ["task"], metric, spread), PAPER_METHODS, PAPER_TASKS)
    if metric in (None, "", "main") and "main_metric.name" in df.columns:
        names = df.groupby("task")["main_metric.name"].agg(lambda s: "/".join(sorted(set(map(str, s)))))
        p.display.columns = [f"{c} ({names[c]})" if c in names else c for c in p.display.columns]
    return add_average(p)


def table5(df: pd.DataFrame, metric: str | None = None, spread: str = "halfrange") -> Pivot:
    """Paper Table 5: which weights to adapt at an equal budget; columns = target modules (r)."""
    lora = _lora_only(df)
    label = lora["lora.target_modules"].map(format_value) + " (r=" + lora["lora.r"].map(format_value) + ")"
    lora = lora.assign(**{"weight type": label})
    p = pivot(lora, ["task"], ["weight type"], metric, spread)
    return paper_order(p, list(p.median.index), by_module_count(p.median.columns))


def table6(df: pd.DataFrame, metric: str | None = None, spread: str = "halfrange") -> dict[str, Pivot]:
    """Paper Table 6: per task, rows = weight type, columns = r."""
    lora = _lora_only(df)
    pivots = {}
    for task, g in lora.groupby("task", sort=True):
        p = pivot(g, ["lora.target_modules"], ["lora.r"], metric, spread)
        pivots[str(task)] = paper_order(p, by_module_count(p.median.index), list(p.median.columns))
    return pivots


# W_q, W_k, W_v, W_o in BERT and Llama-style names: the order the paper lists weight types in.
_QKVO = ("query", "q_proj", "key", "k_proj", "value", "v_proj", "attention.output.dense", "o_proj")


def by_module_count(labels: Iterable[str]) -> list[str]:
    """Weight-type labels as the paper lists them: fewer adapted module types first, then q, k, v, o order
    (q; k; v; o; q,k; q,v; q,k,v,o). A label may carry a suffix such as " (r=8)"."""

    def key(label: str) -> tuple:
        modules = str(label).split(" (")[0].split(",")
        return len(modules), [_QKVO.index(m) if m in _QKVO else len(_QKVO) for m in modules]

    return sorted(labels, key=key)


def _lora_only(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        raise AnalysisError("no finished runs found; check DIR or wait for runs to finish.")
    lora = df[df["method"] == "lora"] if "method" in df.columns else df
    missing = [k for k in ("lora.r", "lora.target_modules") if k not in lora.columns]
    if lora.empty or missing:
        raise AnalysisError(
            "this layout needs finished LoRA runs with lora.r and lora.target_modules in their config."
        )
    return lora


LAYOUTS = {"table2": table2, "table5": table5, "table6": table6}
