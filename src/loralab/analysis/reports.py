"""The analyses behind `loralab similarity | amplification | table` (and `loralab reproduce`): read adapters or runs,
compute, write the result files and return what was found, for the caller to print or log."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import AnalysisError
from ..store import write_text
from . import plots
from .adapter_weights import Adapter, Key, base_weights, load_adapter, select
from .layouts import LAYOUTS
from .render import render, write_outputs
from .subspace import Similarity, amplification_table, compare
from .tables import Collected, Pivot, collect, pivot


def out_folder(value: str | Path) -> Path:
    """The --out folder, made when missing."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise AnalysisError(f"--out: '{value}' exists and is not a folder; pass a folder path.")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- similarity


@dataclass
class SimilarityReport:
    a: Adapter
    b: Adapter
    side: str
    sims: dict[Key, Similarity]
    json_path: Path
    pngs: list[Path]

    def summary(self) -> pd.DataFrame:
        """One row per (layer, module): ranks, phi at (1, 1) and (r1, r2), mean phi and its random baseline."""
        return pd.DataFrame(
            [
                {
                    "layer": lay,
                    "module": mod,
                    "r1": s.grid.shape[0],
                    "r2": s.grid.shape[1],
                    "phi_1_1": float(s.grid[0, 0]),
                    "phi_r1_r2": float(s.grid[-1, -1]),
                    "phi_mean": float(s.grid.mean()),
                    "random_mean": float(s.random_grid.mean()),
                    "distance": float(s.distance),
                }
                for (lay, mod), s in self.sims.items()
            ]
        )

    def frames(self) -> dict[str, pd.DataFrame]:
        return {"similarity/summary": self.summary()}

    def images(self) -> dict[str, Path]:
        return {f"similarity/{p.stem}": p for p in self.pngs}


def write_similarity(
    a: str | Path,
    b: str | Path,
    out: str | Path,
    side: str = "A",
    module: str | None = None,
    layer: int | None = None,
    seed: int = 0,
) -> SimilarityReport:
    """phi grids of two adapters: OUT/similarity.json and a heatmap per module (OUT/similarity_<module>.png)."""
    a1, a2 = load_adapter(a, "A"), load_adapter(b, "B")
    sims = compare(a1, a2, side=side, module=module, layer=layer, seed=seed)
    if not sims:
        common = sorted({m for _, m in set(a1.pairs) & set(a2.pairs)})
        raise AnalysisError(
            f"no (layer, module) shared by A and B matches --module {module} --layer {layer}; "
            f"shared modules: {', '.join(common) or 'none'}."
        )
    folder = out_folder(out)
    payload = {
        "a": str(a1.path),
        "b": str(a2.path),
        "side": side,
        "seed": seed,
        "definition": "phi(i,j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j); U from "
        + ("right singular vectors of lora_A" if side == "A" else "left singular vectors of lora_B"),
        "results": [{"layer": lay, "module": mod, **s.to_dict()} for (lay, mod), s in sims.items()],
    }
    json_path = write_text(folder / "similarity.json", json.dumps(payload, indent=1))
    return SimilarityReport(a1, a2, side, sims, json_path, plots.similarity_figures(sims, folder, side))


# ----------------------------------------------------------------------------- amplification


@dataclass
class AmplificationReport:
    adapter: Adapter
    rows: list[dict]
    missing: list[Key]  # adapted modules without a base weight
    include_scaling: bool
    path: Path

    def frames(self) -> dict[str, pd.DataFrame]:
        return {"amplification/table": pd.DataFrame(self.rows)}

    def images(self) -> dict[str, Path]:
        return {}


def write_amplification(
    run: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    include_scaling: bool = True,
    r: int | None = None,
    module: str | None = None,
    layer: int | None = None,
) -> AmplificationReport:
    """Table 7's columns for every adapted module of RUN (or those ``module``/``layer`` pick): OUT/amplification.json."""
    adapter = load_adapter(run, "RUN")
    keys = select(adapter.pairs, module, layer)
    if not keys:
        raise AnalysisError(
            f"--module/--layer: nothing in {adapter.path} matches; modules: "
            f"{', '.join(sorted({m for _, m in adapter.pairs}))}."
        )
    weights = base_weights(adapter, keys, base)
    missing = [k for k in keys if k not in weights]
    if len(missing) == len(keys):
        raise AnalysisError(
            f"--base: no base weight found for {missing[0]} and others; check the base model path."
        )
    rows = amplification_table(adapter.only(keys), weights, include_scaling=include_scaling, r=r)
    payload = {
        "adapter": str(adapter.path),
        "base_model": adapter.base_model,
        "include_scaling": include_scaling,
        "note": "dW = B@A"
        + (" * scaling (alpha/r, or alpha/sqrt(r) with rsLoRA)" if include_scaling else " (no alpha/r)"),
        "missing": [list(k) for k in missing],
        "rows": rows,
    }
    path = write_text(out_folder(out) / "amplification.json", json.dumps(payload, indent=1))
    return AmplificationReport(adapter, rows, missing, include_scaling, path)


# ----------------------------------------------------------------------------- table


@dataclass
class TableReport:
    name: str  # the layout, or "table"
    data: Collected
    pivots: Pivot | dict[str, Pivot]
    markdown: str
    tidy: pd.DataFrame
    paths: dict[str, Path]  # md, tex, csv and, with plots, rank_png, params_png, memory_png

    def warnings(self) -> list[str]:
        """Runs left out, and cells that mix configurations."""
        out = []
        if self.data.skipped:
            detail = ", ".join(f"{n} {s}" for s, n in sorted(self.data.skipped_status.items()))
            out.append(f"skipped {self.data.skipped} unfinished result(s): {detail}")
        for p in self.pivots.values() if isinstance(self.pivots, dict) else [self.pivots]:
            if p.mixed:
                out.append(
                    f"warning: cells mix runs that differ in {', '.join(p.mixed)}; "
                    "add them to --rows/--cols or filter DIR."
                )
        return out

    def frames(self) -> dict[str, pd.DataFrame]:
        if isinstance(self.pivots, dict):
            frames = {f"table/{self.name}/{block}": p.display for block, p in self.pivots.items()}
        else:
            frames = {f"table/{self.name}": self.pivots.display}
        return {**frames, f"table/{self.name}_tidy": self.tidy}

    def images(self) -> dict[str, Path]:
        return {f"table/metric_vs_{k.removesuffix('_png')}": p for k, p in self.paths.items() if k.endswith("_png")}


def write_table(
    root: str | Path,
    prefix: str | Path,
    layout: str | None = None,
    rows: Sequence[str] = ("lora.target_modules",),
    cols: Sequence[str] = ("lora.r",),
    metric: str | None = None,
    spread: str = "halfrange",
    with_plots: bool = False,
    only: Collection[str] | None = None,
) -> TableReport:
    """Median-over-seeds table of every finished run under ROOT, or of the run ids in ``only`` (a paper ``layout`` or
    ``rows`` x ``cols``): PREFIX.md/.tex/.csv and, ``with_plots``, the metric's trade-off figures
    PREFIX_{rank,params,memory}.png."""
    data = collect(root, "DIR", only)
    if data.df.empty:
        skipped = f" ({data.skipped} unfinished)" if data.skipped else ""
        raise AnalysisError(f"DIR: no finished results.json under '{root}'{skipped}; point it at your runs folder.")
    if layout:
        pivots = LAYOUTS[layout](data.df, metric, spread)
    else:
        pivots = pivot(data.df, list(rows), list(cols), metric, spread)
    rendered = render(pivots)
    paths = write_outputs(rendered, prefix)
    if with_plots:
        paths.update({f"{k}_png": p for k, p in plots.trade_off_plots(data.df, prefix, metric).items()})
    return TableReport(layout or "table", data, pivots, rendered[0], rendered[2], paths)
