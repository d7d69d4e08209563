"""`loralab similarity | amplification | table` subcommands (registered by loralab.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AnalysisError

if TYPE_CHECKING:
    import pandas as pd

Handler = Callable[[argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the analysis subcommands to the loralab CLI."""
    p = subparsers.add_parser(
        "similarity", help="subspace similarity phi(i, j) between two LoRA adapters (paper §7.2)"
    )
    p.add_argument("a", metavar="A", help="run folder or peft adapter folder")
    p.add_argument("b", metavar="B", help="run folder or peft adapter folder")
    p.add_argument(
        "--module", help="module name or suffix, e.g. query or attention.self.value (default: all)"
    )
    p.add_argument("--layer", type=int, help="layer index (default: all)")
    p.add_argument(
        "--side",
        choices=["A", "B"],
        default="A",
        help="A: right singular vectors of lora_A (paper); B: left singular vectors of lora_B",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random Gaussian baseline")
    p.add_argument("--out", default="analysis/similarity", help="output folder (default: %(default)s)")
    _wandb_flags(p, "similarity")
    p.set_defaults(func=_guard(cmd_similarity, "similarity"))

    p = subparsers.add_parser(
        "amplification", help="feature amplification ||dW|| / ||U^T W V^T|| (paper §7.3, Table 7)"
    )
    p.add_argument("run", metavar="RUN", help="run folder or peft adapter folder")
    p.add_argument(
        "--base", help="base model folder with model.safetensors (default: from adapter_config.json)"
    )
    p.add_argument("--no-scaling", action="store_true", help="use dW = B@A without the alpha/r factor")
    p.add_argument("--r", type=int, help="number of top singular directions (default: the LoRA rank)")
    p.add_argument("--module", help="module name or suffix (default: all)")
    p.add_argument("--layer", type=int, help="layer index (default: all)")
    p.add_argument("--out", default="analysis/amplification", help="output folder (default: %(default)s)")
    _wandb_flags(p, "amplification")
    p.set_defaults(func=_guard(cmd_amplification, "amplification"))

    p = subparsers.add_parser("table", help="results table (median over seeds) from results.json files")
    p.add_argument("dir", metavar="DIR", help="folder searched recursively for results.json")
    p.add_argument(
        "--rows", default="lora.target_modules", help="comma-separated row axes (default: %(default)s)"
    )
    p.add_argument("--cols", default="lora.r", help="comma-separated column axes (default: %(default)s)")
    p.add_argument("--metric", help="metric name, e.g. accuracy or f1 (default: each run's main metric)")
    p.add_argument(
        "--spread",
        choices=["halfrange", "std"],
        default="halfrange",
        help="± shows half the min-max range over seeds or their std (default: %(default)s)",
    )
    p.add_argument(
        "--layout", choices=["table2", "table5", "table6"], help="paper layout (overrides --rows/--cols)"
    )
    p.add_argument(
        "--out", default="analysis/table", help="output prefix for .md/.tex/.csv (default: %(default)s)"
    )
    p.add_argument(
        "--plots", action="store_true", help="also plot metric vs r, vs trainable params and vs peak memory"
    )
    _wandb_flags(p, "the name of DIR (a sweep folder's name is its W&B group)")
    p.set_defaults(func=_guard(cmd_table, "table"))


def _wandb_flags(p: argparse.ArgumentParser, default_group: str) -> None:
    p.add_argument(
        "--wandb",
        action="store_true",
        help="also log the tables (wandb.Table) and figures (wandb.Image) to a W&B run with job_type=analysis "
        "(offline without an API key, like training runs)",
    )
    p.add_argument("--wandb-group", help=f"W&B group of that run (default: {default_group})")
    p.add_argument("--wandb-project", default="loralab", help="W&B project (default: %(default)s)")


def _to_wandb(
    args: argparse.Namespace,
    name: str,
    default_group: str,
    folder: Path,
    frames: dict,
    images: dict[str, Path],
    config: dict,
) -> int:
    """Log `frames` and `images` to W&B when --wandb was given; 1 (after a message) when W&B fails."""
    if not args.wandb:
        return 0
    from ..analysis.wandb_log import log_analysis

    group = args.wandb_group or default_group
    try:
        run = log_analysis(
            group, folder, frames, images, name=f"{name} {group}", project=args.wandb_project, config=config
        )
    except Exception as exc:  # noqa: BLE001 - the files are written; say what failed instead of a traceback
        print(
            f"loralab {name}: W&B logging failed ({type(exc).__name__}: {exc}); the files above are written",
            file=sys.stderr,
        )
        return 1
    print(
        f"logged {len(frames)} table(s) and {len(images)} figure(s) to W&B group {group!r}: {run}",
        file=sys.stderr,
    )
    return 0


def _guard(fn: Handler, name: str) -> Handler:
    """Turn AnalysisError into a one-line message and exit code 2 (no traceback)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except AnalysisError as exc:
            print(f"loralab {name}: error: {exc}", file=sys.stderr)
            return 2

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _out_dir(value: str) -> Path:
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise AnalysisError(f"--out: '{value}' exists and is not a folder; pass a folder path.")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- similarity


def cmd_similarity(args: argparse.Namespace) -> int:
    """Write phi grids (JSON) and heatmaps (PNG) for two adapters; print a summary."""
    from ..analysis import subspace

    a1 = subspace.load_adapter(args.a, "A")
    a2 = subspace.load_adapter(args.b, "B")
    sims = subspace.compare(a1, a2, side=args.side, module=args.module, layer=args.layer, seed=args.seed)
    if not sims:
        common = sorted({m for _, m in set(a1.pairs) & set(a2.pairs)})
        raise AnalysisError(
            f"no (layer, module) shared by A and B matches --module {args.module} --layer {args.layer}; "
            f"shared modules: {', '.join(common) or 'none'}."
        )
    out = _out_dir(args.out)
    payload = {
        "a": str(a1.path),
        "b": str(a2.path),
        "side": args.side,
        "seed": args.seed,
        "definition": "phi(i,j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j); U from "
        + ("right singular vectors of lora_A" if args.side == "A" else "left singular vectors of lora_B"),
        "results": [{"layer": lay, "module": mod, **s.to_dict()} for (lay, mod), s in sims.items()],
    }
    json_path = out / "similarity.json"
    json_path.write_text(json.dumps(payload, indent=1))
    pngs = _similarity_pngs(sims, out, args.side)
    print(f"phi(i, j) side={args.side}: A={a1.path} (r={_rank(sims, 0)}) vs B={a2.path} (r={_rank(sims, 1)})")
    print(
        f"{'layer':>5}  {'module':<28} {'phi(1,1)':>8} {'phi(r1,r2)':>10} {'mean':>6} {'random':>7} {'dist':>6}"
    )
    for (lay, mod), s in sims.items():
        print(
            f"{lay:>5}  {mod:<28} {s.grid[0, 0]:8.3f} {s.grid[-1, -1]:10.3f} {s.grid.mean():6.3f} "
            f"{s.random_grid.mean():7.3f} {s.distance:6.3f}"
        )
    print(f"wrote {json_path}")
    for p in pngs:
        print(f"wrote {p}")
    import pandas as pd

    summary = pd.DataFrame(
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
            for (lay, mod), s in sims.items()
        ]
    )
    return _to_wandb(
        args,
        "similarity",
        "similarity",
        out,
        {"similarity/summary": summary},
        {f"similarity/{p.stem}": p for p in pngs},
        {"a": str(a1.path), "b": str(a2.path), "side": args.side, "seed": args.seed},
    )


def _rank(sims: dict, axis: int) -> str:
    ranks = sorted({s.grid.shape[axis] for s in sims.values()})
    return ",".join(map(str, ranks))


def _similarity_pngs(sims: dict, out: Path, side: str) -> list[Path]:
    """One figure per module: a panel per layer plus the random baseline of the first layer."""
    from ..analysis import plots

    by_module: dict[str, list] = {}
    for (lay, mod), s in sims.items():
        by_module.setdefault(mod, []).append((lay, s))
    paths = []
    for mod, items in by_module.items():
        panels = {f"layer {lay}": s.grid for lay, s in items}
        panels["random"] = items[0][1].random_grid
        name = mod.replace(".", "_").replace("/", "_")
        paths.append(
            plots.plot_similarity_panels(
                panels,
                out / f"similarity_{name}.png",
                suptitle=f"{mod} (side {side}): phi(i, j)",
                i_label="i (1st adapter)",
                j_label="j (2nd adapter)",
            )
        )
    return paths


# ----------------------------------------------------------------------------- amplification


def cmd_amplification(args: argparse.Namespace) -> int:
    """Print and write the Table 7 columns for every adapted module of RUN."""
    from ..analysis import subspace

    adapter = subspace.load_adapter(args.run, "RUN")
    keys = subspace.select(adapter.pairs, args.module, args.layer)
    if not keys:
        raise AnalysisError(
            f"--module/--layer: nothing in {adapter.path} matches; modules: "
            f"{', '.join(sorted({m for _, m in adapter.pairs}))}."
        )
    weights = subspace.base_weights(adapter, keys, args.base)
    missing = [k for k in keys if k not in weights]
    if len(missing) == len(keys):
        raise AnalysisError(
            f"--base: no base weight found for {missing[0]} and others; check the base model path."
        )
    include = not args.no_scaling
    picked = subspace.Adapter(adapter.path, adapter.config, {k: adapter.pairs[k] for k in keys})
    rows = subspace.amplification_table(picked, weights, include_scaling=include, r=args.r)
    out = _out_dir(args.out)
    path = out / "amplification.json"
    path.write_text(
        json.dumps(
            {
                "adapter": str(adapter.path),
                "base_model": adapter.base_model,
                "include_scaling": include,
                "note": "dW = B@A"
                + (" * scaling (alpha/r, or alpha/sqrt(r) with rsLoRA)" if include else " (no alpha/r)"),
                "missing": [list(k) for k in missing],
                "rows": rows,
            },
            indent=1,
        )
    )
    print(
        f"dW = B@A{' * scaling' if include else ' (no scaling)'}; ||U^T W V^T||_F for top-r U,V of dW / W / random"
    )
    print(
        f"{'layer':>5}  {'module':<24} {'r':>3} {'||W||':>8} {'||dW||':>8} {'dW':>8} {'W':>8} {'random':>8} {'amp':>7}"
    )
    for row in rows:
        print(
            f"{row['layer']:>5}  {row['module']:<24} {row['r']:>3} {row['norm_W']:8.3f} {row['norm_dW']:8.3f} "
            f"{row['proj_dW']:8.3f} {row['proj_W']:8.3f} {row['proj_random']:8.3f} {row['amplification']:7.2f}"
        )
    if missing:
        print(f"no base weight for {len(missing)} module(s), e.g. {missing[0]}", file=sys.stderr)
    print(f"wrote {path}")
    import pandas as pd

    return _to_wandb(
        args,
        "amplification",
        "amplification",
        out,
        {"amplification/table": pd.DataFrame(rows)},
        {},
        {"adapter": str(adapter.path), "include_scaling": include},
    )


# ----------------------------------------------------------------------------- table


def cmd_table(args: argparse.Namespace) -> int:
    """Write PREFIX.md/.tex/.csv from every finished results.json under DIR and print the markdown."""
    from ..analysis import tables

    data = tables.collect(args.dir, "DIR")
    if data.skipped:
        detail = ", ".join(f"{n} {s}" for s, n in sorted(data.skipped_status.items()))
        print(f"skipped {data.skipped} unfinished result(s): {detail}", file=sys.stderr)
    if data.df.empty:
        raise AnalysisError(
            f"DIR: no finished results.json under '{args.dir}'; point it at your runs folder."
        )
    if args.layout:
        pivots = getattr(tables, args.layout)(data.df, args.metric, args.spread)
    else:
        pivots = tables.pivot(data.df, _split(args.rows), _split(args.cols), args.metric, args.spread)
    for p in pivots.values() if isinstance(pivots, dict) else [pivots]:
        if p.mixed:
            tables.warn(
                f"cells mix runs that differ in {', '.join(p.mixed)}; add them to --rows/--cols or filter DIR."
            )
    paths = tables.write_outputs(pivots, args.out)
    print(tables.render(pivots)[0])
    if args.plots:
        paths.update(_table_plots(data.df, args))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    name = args.layout or "table"
    if isinstance(pivots, dict):
        frames = {f"table/{name}/{block}": p.display for block, p in pivots.items()}
    else:
        frames = {f"table/{name}": pivots.display}
    frames[f"table/{name}_tidy"] = tables.render(pivots)[2]
    images = {f"table/metric_vs_{k.removesuffix('_png')}": p for k, p in paths.items() if k.endswith("_png")}
    return _to_wandb(
        args,
        "table",
        Path(args.dir).resolve().name,
        Path(args.out).parent,
        frames,
        images,
        {
            "dir": str(args.dir),
            "layout": args.layout,
            "rows": args.rows,
            "cols": args.cols,
            "metric": args.metric,
            "spread": args.spread,
        },
    )


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _table_plots(df: pd.DataFrame, args: argparse.Namespace) -> dict[str, Path]:
    from ..analysis import plots

    return {f"{k}_png": p for k, p in plots.trade_off_plots(df, args.out, args.metric).items()}
