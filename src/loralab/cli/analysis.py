"""`loralab similarity | amplification | table` subcommands (registered by loralab.cli): arguments in, a summary out;
the analysis and its files are loralab.analysis.reports'."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..analysis.reports import AmplificationReport, SimilarityReport, TableReport


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
    p.set_defaults(func=cmd_similarity)

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
    p.set_defaults(func=cmd_amplification)

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
    p.set_defaults(func=cmd_table)


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
    report: SimilarityReport | AmplificationReport | TableReport,
    config: dict,
) -> int:
    """Log the report's tables and figures to W&B when --wandb was given; 1 (after a message) when W&B fails."""
    if not args.wandb:
        return 0
    from ..analysis.wandb_log import log_analysis

    group = args.wandb_group or default_group
    frames, images = report.frames(), report.images()
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


def cmd_similarity(args: argparse.Namespace) -> int:
    """Write phi grids (JSON) and heatmaps (PNG) for two adapters; print a summary."""
    from ..analysis.reports import write_similarity

    rep = write_similarity(args.a, args.b, args.out, args.side, args.module, args.layer, args.seed)
    print(f"phi(i, j) side={args.side}: A={rep.a.path} (r={_ranks(rep, 0)}) vs B={rep.b.path} (r={_ranks(rep, 1)})")
    print(
        f"{'layer':>5}  {'module':<28} {'phi(1,1)':>8} {'phi(r1,r2)':>10} {'mean':>6} {'random':>7} {'dist':>6}"
    )
    for (lay, mod), s in rep.sims.items():
        print(
            f"{lay:>5}  {mod:<28} {s.grid[0, 0]:8.3f} {s.grid[-1, -1]:10.3f} {s.grid.mean():6.3f} "
            f"{s.random_grid.mean():7.3f} {s.distance:6.3f}"
        )
    for path in [rep.json_path, *rep.pngs]:
        print(f"wrote {path}")
    config = {"a": str(rep.a.path), "b": str(rep.b.path), "side": args.side, "seed": args.seed}
    return _to_wandb(args, "similarity", "similarity", rep.json_path.parent, rep, config)


def _ranks(rep: SimilarityReport, axis: int) -> str:
    return ",".join(map(str, sorted({s.grid.shape[axis] for s in rep.sims.values()})))


def cmd_amplification(args: argparse.Namespace) -> int:
    """Print and write the Table 7 columns for every adapted module of RUN."""
    from ..analysis.reports import write_amplification

    rep = write_amplification(args.run, args.out, args.base, not args.no_scaling, args.r, args.module, args.layer)
    print(
        f"dW = B@A{' * scaling' if rep.include_scaling else ' (no scaling)'}; "
        "||U^T W V^T||_F for top-r U,V of dW / W / random"
    )
    print(
        f"{'layer':>5}  {'module':<24} {'r':>3} {'||W||':>8} {'||dW||':>8} {'dW':>8} {'W':>8} {'random':>8} {'amp':>7}"
    )
    for row in rep.rows:
        print(
            f"{row['layer']:>5}  {row['module']:<24} {row['r']:>3} {row['norm_W']:8.3f} {row['norm_dW']:8.3f} "
            f"{row['proj_dW']:8.3f} {row['proj_W']:8.3f} {row['proj_random']:8.3f} {row['amplification']:7.2f}"
        )
    if rep.missing:
        print(f"no base weight for {len(rep.missing)} module(s), e.g. {rep.missing[0]}", file=sys.stderr)
    print(f"wrote {rep.path}")
    config = {"adapter": str(rep.adapter.path), "include_scaling": rep.include_scaling}
    return _to_wandb(args, "amplification", "amplification", rep.path.parent, rep, config)


def cmd_table(args: argparse.Namespace) -> int:
    """Write PREFIX.md/.tex/.csv from every finished results.json under DIR and print the markdown."""
    from ..analysis.reports import write_table

    rep = write_table(
        args.dir, args.out, args.layout, _split(args.rows), _split(args.cols), args.metric, args.spread, args.plots
    )
    for line in rep.warnings():
        print(line, file=sys.stderr)
    print(rep.markdown)
    print("wrote " + ", ".join(str(p) for p in rep.paths.values()), file=sys.stderr)
    config = {key: getattr(args, key) for key in ("dir", "layout", "rows", "cols", "metric", "spread")}
    return _to_wandb(args, "table", Path(args.dir).resolve().name, Path(args.out).parent, rep, config)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
