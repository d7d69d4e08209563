"""Figures: subspace-similarity heatmaps (paper Figs. 3/4) and metric trade-off plots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..store import atomic_write
from .tables import PARAMS, format_value, is_percent_metric, resolve_metric

if TYPE_CHECKING:
    from .adapter_weights import Key
    from .subspace import Similarity


def _ticks(n: int, most: int = 5) -> np.ndarray:
    """0-based positions of 1-based tick labels 1, 1+step, ... (the paper labels ranks from 1)."""
    step = max(1, math.ceil(n / most))
    return np.arange(0, n, step)


def _heatmap(
    ax: plt.Axes, grid: np.ndarray, title: str, i_label: str | None, j_label: str
) -> matplotlib.image.AxesImage:
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    ti, tj = _ticks(grid.shape[0]), _ticks(grid.shape[1])
    ax.set_yticks(ti, [str(t + 1) for t in ti])
    ax.set_xticks(tj, [str(t + 1) for t in tj])
    if i_label:
        ax.set_ylabel(i_label)
    ax.set_xlabel(j_label)
    ax.set_title(title, fontsize=9)
    return im


def plot_similarity(
    grid: np.ndarray,
    path: str | Path,
    title: str = "",
    i_label: str = "i",
    j_label: str = "j",
) -> Path:
    """One phi(i, j) heatmap: i on the y-axis, j on the x-axis, colorbar fixed to [0, 1]."""
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = _heatmap(ax, np.asarray(grid), title, i_label, j_label)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_similarity_panels(
    grids: Mapping[str, np.ndarray],
    path: str | Path,
    suptitle: str = "",
    i_label: str = "i",
    j_label: str = "j",
    ncols: int = 4,
) -> Path:
    """Several phi heatmaps (e.g. one per layer, plus the random baseline), up to ``ncols`` per row,
    sharing one [0, 1] colorbar."""
    n = len(grids)
    cols = min(n, ncols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.4 * cols + 1.0, 2.6 * rows + 0.4), squeeze=False, layout="constrained"
    )
    im = None
    for k, (ax, (title, grid)) in enumerate(zip(axes.flat, grids.items())):
        im = _heatmap(ax, np.asarray(grid), title, i_label if k % cols == 0 else None, j_label)
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def similarity_figures(sims: Mapping[Key, Similarity], out: Path, side: str) -> list[Path]:
    """One figure per module, ``OUT/similarity_<module>.png``: a panel per layer plus the random baseline of the
    first layer."""
    by_module: dict[str, list[tuple[int, Similarity]]] = {}
    for (lay, mod), s in sims.items():
        by_module.setdefault(mod, []).append((lay, s))
    paths = []
    for mod, items in by_module.items():
        panels = {f"layer {lay}": s.grid for lay, s in items}
        panels["random"] = items[0][1].random_grid
        name = mod.replace(".", "_").replace("/", "_")
        paths.append(
            plot_similarity_panels(
                panels,
                out / f"similarity_{name}.png",
                suptitle=f"{mod} (side {side}): phi(i, j)",
                i_label="i (1st adapter)",
                j_label="j (2nd adapter)",
            )
        )
    return paths


def pareto_front(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """Mask of points not dominated by another (lower-or-equal x and higher-or-equal y, one strictly)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    mask = np.ones(len(x), dtype=bool)
    for k in range(len(x)):
        better = (x <= x[k]) & (y >= y[k]) & ((x < x[k]) | (y > y[k]))
        mask[k] = not better.any()
    return mask


def _aggregate(df: pd.DataFrame, x: str, metric: str, hue: str | None) -> pd.DataFrame:
    """Median and min/max of metric over seeds per (hue, x)."""
    col = resolve_metric(df, metric)
    scale = 100.0 if is_percent_metric(col) else 1.0
    keys = [k for k in (hue, x) if k]
    work = df.assign(
        _v=pd.to_numeric(df[col], errors="coerce") * scale, _x=pd.to_numeric(df[x], errors="coerce")
    )
    work = work.dropna(subset=["_v", "_x"])
    agg = work.groupby(keys, dropna=False).agg(
        x=("_x", "median"), y=("_v", "median"), lo=("_v", "min"), hi=("_v", "max")
    )
    return agg.reset_index()


def _metric_label(df: pd.DataFrame, metric: str | None) -> str:
    col = resolve_metric(df, metric)
    return f"{col} (%)" if is_percent_metric(col) else col


def _facets(df: pd.DataFrame, facet: str | None, width: float = 4.6) -> tuple[plt.Figure, list, list]:
    """One panel per value of ``facet`` (e.g. task): metrics of different tasks are never pooled."""
    groups = list(df.groupby(facet, sort=True)) if facet and facet in df.columns else [("", df)]
    fig, axes = plt.subplots(
        1, len(groups), figsize=(width * len(groups), 3.6), squeeze=False, layout="constrained"
    )
    return fig, list(axes[0]), groups


def plot_metric_vs(
    df: pd.DataFrame,
    x: str,
    path: str | Path,
    metric: str | None = None,
    hue: str | None = None,
    facet: str | None = "task",
    logx: bool = True,
) -> Path:
    """Median metric (min-max error bars over seeds) against a numeric axis such as ``lora.r``; a panel per ``facet``."""
    fig, axes, groups = _facets(df, facet)
    for ax, (name, part) in zip(axes, groups):
        agg = _aggregate(part, x, metric, hue)
        lines = agg.groupby(hue, dropna=False) if hue else [("", agg)]
        for label, g in lines:
            g = g.sort_values("x")
            ax.errorbar(
                g["x"],
                g["y"],
                yerr=[g["y"] - g["lo"], g["hi"] - g["y"]],
                marker="o",
                capsize=3,
                label=format_value(label[0] if isinstance(label, tuple) else label),
            )
        if logx and (agg["x"] > 0).all():
            ax.set_xscale("log", base=2)
        ticks = sorted(agg["x"].unique())
        ax.set_xticks(ticks, [format_value(float(t)) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(x)
        ax.set_ylabel(_metric_label(df, metric))
        if hue:
            ax.legend(title=hue, fontsize=8)
        ax.set_title(format_value(name[0] if isinstance(name, tuple) else name), fontsize=10)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_pareto(
    df: pd.DataFrame,
    path: str | Path,
    x: str = PARAMS,
    metric: str | None = None,
    label: str | None = "method",
    facet: str | None = "task",
) -> Path:
    """Median metric per configuration against cost ``x`` (trainable_params, peak_memory_mb), Pareto front in red."""
    fig, axes, groups = _facets(df, facet, width=5.2)
    for ax, (name, part) in zip(axes, groups):
        agg = _aggregate(part.assign(_cfg=_config_label(part, label)), x, metric, "_cfg")
        front = pareto_front(agg["x"], agg["y"])
        ax.scatter(agg["x"], agg["y"], c=np.where(front, "tab:red", "tab:blue"), zorder=3)
        for _, row in agg.iterrows():
            ax.annotate(
                str(row["_cfg"]), (row["x"], row["y"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        pf = agg[front].sort_values("x")
        ax.step(pf["x"], pf["y"], where="post", color="tab:red", alpha=0.7, label="Pareto front")
        if (agg["x"] > 0).all() and agg["x"].max() > 10 * agg["x"].min():
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(_metric_label(df, metric))
        ax.legend(fontsize=8)
        ax.set_title(format_value(name[0] if isinstance(name, tuple) else name), fontsize=10)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _config_label(df: pd.DataFrame, label: str | None) -> pd.Series:
    """Point label: ``label`` column plus LoRA targets/r when present (one point per configuration)."""
    parts = [df[label].map(format_value)] if label and label in df.columns else []
    for key, fmt in (("lora.target_modules", "{}"), ("lora.r", "r={}")):
        if key in df.columns and "method" in df.columns:
            parts.append(
                df[key]
                .where(df["method"] == "lora")
                .map(lambda v, f=fmt: "" if pd.isna(v) else f.format(format_value(v)))
            )
    if not parts:
        return pd.Series(["run"] * len(df), index=df.index)
    out = parts[0]
    for p in parts[1:]:
        out = out.str.cat(p, sep=" ").str.strip()
    return out


def trade_off_plots(df: pd.DataFrame, prefix: str | Path, metric: str | None = None) -> dict[str, Path]:
    """The standard figures of a set of runs: metric vs LoRA rank (``PREFIX_rank.png``, LoRA runs), vs trainable
    parameters (``PREFIX_params.png``) and vs peak memory (``PREFIX_memory.png``), each where the columns exist."""
    prefix = Path(prefix)
    out: dict[str, Path] = {}
    lora = df[df["method"] == "lora"] if "method" in df.columns else df
    if "lora.r" in lora.columns and not lora.empty:
        out["rank"] = plot_metric_vs(
            lora,
            "lora.r",
            prefix.with_name(prefix.name + "_rank.png"),
            metric,
            hue="lora.target_modules" if "lora.target_modules" in lora else None,
        )
    for key, x in (("params", PARAMS), ("memory", "peak_memory_mb")):
        if x in df.columns and df[x].notna().any():
            out[key] = plot_pareto(df, prefix.with_name(f"{prefix.name}_{key}.png"), x, metric)
    return out


def _save(fig: plt.Figure, path: str | Path) -> Path:
    try:
        return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
