"""Results tables: collect results.json files into a DataFrame and pivot them like the paper.

Cells show the median over seeds with spread "±h", where h is half the min-max range over
seeds (``spread="halfrange"``, the default) or the sample std (``spread="std"``).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import AnalysisError
from ..store import flatten
from ..sweep.collect import find_results

MAIN_METRIC = "main_metric.value"
PARAMS = "trainable_params"
_SKIP_TOP = {"config", "versions"}
# Never treated as an experimental axis when checking that a cell mixes configurations.
_NOT_AXES = {"seed", "run_id", "git_commit", "status", "path"}
_RESULT_FIELDS = (
    "best_epoch",
    "trainable_params",
    "total_params",
    "adapter_bytes",
    "train_time_s",
    "train_samples_per_s",
    "peak_memory_mb",
)


# ----------------------------------------------------------------------------- loading


def result_row(result: dict, path: Path | None = None) -> dict[str, object]:
    """One flat row: top-level fields (metrics.best.f1, main_metric.value, ...) plus config axes (lora.r, ...)."""
    row = flatten({k: v for k, v in result.items() if k not in _SKIP_TOP})
    for key, value in flatten(result.get("config") or {}).items():
        row.setdefault(key, value)  # top-level fields win; they are the recorded truth
    if path is not None:
        row["path"] = str(path.parent)
    return row


@dataclass
class Collected:
    """Finished runs as a DataFrame plus how many results.json files were skipped."""

    df: pd.DataFrame
    skipped: int = 0
    skipped_status: dict[str, int] = field(default_factory=dict)


def collect(root: str | Path, arg: str = "DIR") -> Collected:
    """Read every finished results.json under ``root`` into one flat DataFrame (one row per run)."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise AnalysisError(
            f"{arg}: '{root}' is not an existing folder; pass the folder holding your run folders."
        )
    rows, skipped = [], {}
    for path in find_results(root_path):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            skipped["unreadable"] = skipped.get("unreadable", 0) + 1
            continue
        status = str(result.get("status", "missing"))
        if status != "finished":
            skipped[status] = skipped.get(status, 0) + 1
            continue
        rows.append(result_row(result, path))
    return Collected(pd.DataFrame(rows), sum(skipped.values()), skipped)


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


def _semantic_key(column: str) -> bool:
    """A config key that changes what a run computes (the run id's keys), not a measured result field
    (memory, timings) nor a store/logger setting."""
    from ..store import NON_SEMANTIC

    head, _, rest = column.partition(".")
    if head not in _config_sections():
        return False
    skipped = NON_SEMANTIC.get(head, ())
    return not (head in NON_SEMANTIC and (skipped is None or rest in skipped))


def mixed_axes(df: pd.DataFrame, group_keys: Sequence[str]) -> list[str]:
    """Columns (other than seeds/ids/metrics) that vary within some group: cells mix configs."""
    result_cols = {c for c in df.columns if c.startswith(("metrics.", "main_metric.", "versions."))}
    # String columns unique to every run are ids/paths/timestamps, not axes.
    per_run = {
        c
        for c in df.columns
        if not pd.api.types.is_numeric_dtype(df[c]) and len(df) > 3 and df[c].astype(str).nunique() == len(df)
    }
    ignore = _NOT_AXES | result_cols | per_run | set(group_keys) | set(_RESULT_FIELDS)
    candidates = [
        c for c in df.columns
        if c not in ignore and _semantic_key(c) and not c.endswith((".seed", "_dir", ".dir", ".path"))
    ]
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


# ----------------------------------------------------------------------------- layouts


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


# ----------------------------------------------------------------------------- writers


def _esc_md(s: object) -> str:
    return str(s).replace("|", "\\|")


def to_markdown(table: pd.DataFrame) -> str:
    """GitHub markdown (no tabulate dependency)."""
    head = [table.index.name or "", *map(str, table.columns)]
    lines = [
        "| " + " | ".join(map(_esc_md, head)) + " |",
        "|" + "|".join(["---"] + [":---:"] * len(table.columns)) + "|",
    ]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join(_esc_md(v) for v in [idx, *row.tolist()]) + " |")
    return "\n".join(lines)


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _esc_tex(s: object) -> str:
    text = "".join(_TEX.get(ch, ch) for ch in str(s))
    return text.replace("±", r"$\pm$").replace("†", r"$^\dagger$").replace("–", "--")


def to_latex(table: pd.DataFrame, caption: str = "") -> str:
    """A booktabs tabular (wrapped in a table env with caption when given)."""
    head = [table.index.name or "", *map(str, table.columns)]
    body = [" & ".join(_esc_tex(v) for v in [idx, *row.tolist()]) + r" \\" for idx, row in table.iterrows()]
    lines = [
        r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
        r"\toprule",
        " & ".join(map(_esc_tex, head)) + r" \\",
        r"\midrule",
        *body,
        r"\bottomrule",
        r"\end{tabular}",
    ]
    if caption:
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            *lines,
            r"\caption{" + _esc_tex(caption) + "}",
            r"\end{table}",
        ]
    return "\n".join(lines)


def render(pivots: Pivot | dict[str, Pivot]) -> tuple[str, str, pd.DataFrame]:
    """Markdown, LaTeX and tidy CSV frame for one pivot or a dict of per-block pivots."""
    if isinstance(pivots, Pivot):
        return (
            to_markdown(pivots.display) + f"\n\n{pivots.caption()}\n",
            to_latex(pivots.display, pivots.caption()) + "\n",
            pivots.tidy,
        )
    md, tex, csv = [], [], []
    for name, p in pivots.items():
        md.append(f"**{name}**\n\n{to_markdown(p.display)}\n")
        tex.append(f"% {name}\n" + to_latex(p.display, f"{name}. {p.caption()}"))
        csv.append(p.tidy.assign(block=name))
    first = next(iter(pivots.values()))
    return (
        "\n".join(md) + f"\n{first.caption()}\n",
        "\n\n".join(tex) + "\n",
        pd.concat(csv, ignore_index=True),
    )


def write_outputs(pivots: Pivot | dict[str, Pivot], prefix: str | Path) -> dict[str, Path]:
    """Write PREFIX.md, PREFIX.tex, PREFIX.csv; returns the paths."""
    md, tex, csv = render(pivots)
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {ext: prefix.with_name(prefix.name + "." + ext) for ext in ("md", "tex", "csv")}
    paths["md"].write_text(md)
    paths["tex"].write_text(tex)
    csv.to_csv(paths["csv"], index=False)
    return paths


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)
