"""Results tables: collect results.json files into a DataFrame and pivot them like the paper.

Cells show the median over seeds with spread "±h", where h is half the min-max range over
seeds (``spread="halfrange"``, the default) or the sample std (``spread="std"``).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import AnalysisError
from ..store import is_semantic
from ..sweep.collect import read_all, runs_frame

MAIN_METRIC = "main_metric.value"
PARAMS = "trainable_params"


# ----------------------------------------------------------------------------- loading


@dataclass
class Collected:
    """Finished runs as a DataFrame plus how many results.json files were skipped, by status."""

    df: pd.DataFrame
    skipped_status: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_status.values())


def collect(root: str | Path, arg: str = "DIR", only: Collection[str] | None = None) -> Collected:
    """Every finished results.json under ``root`` (or those whose run id is in ``only``) as one flat DataFrame (one
    row per run)."""
    if not Path(root).is_dir():
        raise AnalysisError(
            f"{arg}: '{root}' is not an existing folder; pass the folder holding your run folders."
        )
    records = [r for r in read_all(Path(root)) if only is None or r.get("run_id") in only]
    finished = [r for r in records if r.get("status") == "finished"]
    skipped = Counter(str(r.get("status", "missing")) for r in records if r.get("status") != "finished")
    return Collected(runs_frame(finished), dict(skipped))


def resolve_metric(df: pd.DataFrame, metric: str | None) -> str:
    """Column for ``metric``: None/'main' -> main_metric.value; 'f1' -> metrics.best.f1 if present."""
    if metric in (None, "", "main"):
        metric = MAIN_METRIC
    for cand in (metric, f"metrics.best.{metric}", f"metrics.{metric}"):
        if cand in df.columns:
            return cand
    known = sorted(c for c in df.columns if c.startswith("metrics.best.")) + [MAIN_METRIC]
    raise AnalysisError(f"--metric: '{metric}' not found in results; available: {', '.join(known)}.")


def is_percent_metric(column: str) -> bool:
    """Quality metrics (fractions in results.json) are shown x100 like the paper."""
    return column == MAIN_METRIC or column.startswith("metrics.")


# ----------------------------------------------------------------------------- formatting


def format_count(n: float) -> str:
    """Parameter count like the paper: 0.3M, 74.5K, 125M."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.1f}{suffix}" if v < 100 else f"{v:.0f}{suffix}"
    return f"{int(n)}"


def format_cell(median: float, spread: float, n: int) -> str:
    """'85.2 ±0.4' (spread omitted for a single seed); '–' for an empty cell."""
    if n == 0 or median is None or math.isnan(median):
        return "–"
    if n < 2 or math.isnan(spread):
        return f"{median:.1f}"
    return f"{median:.1f} ±{spread:.1f}"


# ----------------------------------------------------------------------------- pivot


@dataclass
class Pivot:
    """Aggregated pivot: numeric frames indexed by row/column labels plus the display table."""

    median: pd.DataFrame
    spread: pd.DataFrame
    count: pd.DataFrame
    params: pd.DataFrame
    display: pd.DataFrame
    metric: str
    spread_kind: str
    percent: bool
    mixed: list[str]  # config axes that vary inside a cell (cells mix configurations)
    tidy: pd.DataFrame  # long form: row/col keys, median, spread, n, params

    def caption(self) -> str:
        unit = " (%)" if self.percent else ""
        how = "half the min-max range" if self.spread_kind == "halfrange" else "std"
        return f"{self.metric}{unit}: median over seeds ± {how}."


def format_value(v: object) -> str:
    """Axis value as text; 8.0 -> '8' (NaN-padded int columns come back as floats), NaN -> '–'."""
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v.is_integer():
            return str(int(v))
    return str(v)


def _label(df: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    return df[list(keys)].map(format_value).agg(" / ".join, axis=1)


def _spread(values: pd.Series, kind: str) -> float:
    if len(values) < 2:
        return float("nan")
    if kind == "std":
        return float(values.std(ddof=1))
    return float((values.max() - values.min()) / 2.0)


@functools.cache
def _config_sections() -> frozenset[str]:
    from dataclasses import fields

    from ..config import Config

    return frozenset(f.name for f in fields(Config))


def is_axis(column: str) -> bool:
    """A config key that enters the run id (not a measured result field, nor seeds, which cells aggregate over)."""
    head = column.partition(".")[0]
    return head in _config_sections() and is_semantic(column) and column.rpartition(".")[2] != "seed"


def mixed_axes(df: pd.DataFrame, group_keys: Sequence[str]) -> list[str]:
    """Config axes that vary within some group: those cells mix configurations."""
    candidates = [c for c in df.columns if c not in group_keys and is_axis(c)]
    if not candidates:
        return []
    varying = df.groupby(list(group_keys), dropna=False)[candidates].agg(lambda s: s.astype(str).nunique())
    return sorted(c for c in candidates if (varying[c] > 1).any())


def pivot(
    df: pd.DataFrame,
    rows: Sequence[str],
    cols: Sequence[str],
    metric: str | None = None,
    spread: str = "halfrange",
    percent: bool | None = None,
    params_tol: float = 0.02,
) -> Pivot:
    """Median-over-seeds pivot of ``metric`` with rows/cols chosen from dotted config keys.

    Trainable params go in a "# Params" column when constant along each row (within
    ``params_tol`` relative), else into the column header when constant per column, else in cells.
    """
    if df.empty:
        raise AnalysisError("no finished runs found; check DIR or wait for runs to finish.")
    for key in [*rows, *cols]:
        if key not in df.columns:
            raise AnalysisError(
                f"--rows/--cols: axis '{key}' not found in results; available: {', '.join(sorted(df.columns))}."
            )
    col = resolve_metric(df, metric)
    percent = is_percent_metric(col) if percent is None else percent
    scale = 100.0 if percent else 1.0
    work = df.assign(
        _row=_label(df, rows), _col=_label(df, cols), _v=pd.to_numeric(df[col], errors="coerce") * scale
    )
    work = work.dropna(subset=["_v"])
    if work.empty:
        raise AnalysisError(f"--metric: no finished run has a value for '{col}'.")
    has_params = PARAMS in work.columns
    tidy_rows = []
    for (r, c), g in work.groupby(["_row", "_col"], sort=False):
        tidy_rows.append(
            {
                **{k: format_value(g[k].iloc[0]) for k in dict.fromkeys([*rows, *cols])},
                "row": r,
                "col": c,
                "median": float(g["_v"].median()),
                "spread": _spread(g["_v"], spread),
                "n": len(g),
                "params": float(pd.to_numeric(g[PARAMS]).median()) if has_params else float("nan"),
            }
        )
    tidy = pd.DataFrame(tidy_rows)
    row_order = _order(work, rows, "_row")
    col_order = _order(work, cols, "_col")
    frames = {
        k: tidy.pivot(index="row", columns="col", values=k).reindex(index=row_order, columns=col_order)
        for k in ("median", "spread", "n", "params")
    }
    count = frames["n"].fillna(0).astype(int)
    display = _display(frames["median"], frames["spread"], count, frames["params"], params_tol)
    display.index.name = " / ".join(rows)
    tidy = tidy.drop(columns=["row", "col"])
    return Pivot(
        median=frames["median"],
        spread=frames["spread"],
        count=count,
        params=frames["params"],
        display=display,
        metric=col,
        spread_kind=spread,
        percent=percent,
        mixed=mixed_axes(work.drop(columns=["_row", "_col", "_v"]), [*rows, *cols]),
        tidy=tidy,
    )


def _order(work: pd.DataFrame, keys: Sequence[str], label: str) -> list[str]:
    """Labels sorted by their underlying values (numbers numerically), not as strings."""
    first = work.drop_duplicates(label)
    sort_cols = [
        pd.to_numeric(first[k], errors="coerce")
        if pd.to_numeric(first[k], errors="coerce").notna().all()
        else first[k].astype(str)
        for k in keys
    ]
    tmp = pd.DataFrame({f"k{i}": s.values for i, s in enumerate(sort_cols)})
    tmp[label] = first[label].values
    return tmp.sort_values([f"k{i}" for i in range(len(keys))], kind="stable")[label].tolist()


def _constant(values: Iterable[float], tol: float) -> bool:
    vals = [v for v in values if not math.isnan(v)]
    return bool(vals) and (max(vals) - min(vals)) <= tol * max(abs(max(vals)), 1.0)


def _display(
    median: pd.DataFrame, spread: pd.DataFrame, count: pd.DataFrame, params: pd.DataFrame, tol: float
) -> pd.DataFrame:
    cells = pd.DataFrame(
        [
            [format_cell(median.at[r, c], spread.at[r, c], count.at[r, c]) for c in median.columns]
            for r in median.index
        ],
        index=median.index,
        columns=median.columns,
    )
    if params.isna().all().all():
        return cells
    if all(_constant(params.loc[r], tol) for r in params.index):
        cells.insert(
            0,
            "# Params",
            [format_count(float(np.nanmedian(params.loc[r].astype(float)))) for r in params.index],
        )
        return cells
    if all(_constant(params[c], tol) for c in params.columns):
        cells.columns = [
            f"{c} ({format_count(float(np.nanmedian(params[c].astype(float))))})" for c in params.columns
        ]
        return cells
    for r in cells.index:
        for c in median.columns:
            if count.at[r, c] > 0:
                cells.at[r, c] = f"{cells.at[r, c]} [{format_count(params.at[r, c])}]"
    return cells


def add_average(p: Pivot) -> Pivot:
    """Append an 'Avg.' column (mean of the row's medians; '†' marks rows with missing cells)."""
    means = p.median.mean(axis=1, skipna=True)
    complete = p.median.notna().all(axis=1)
    p.display["Avg."] = [
        "–" if math.isnan(m) else f"{m:.1f}" + ("" if ok else "†") for m, ok in zip(means, complete)
    ]
    return p
