"""Analysis results to W&B: tables as wandb.Table and figures as wandb.Image, in a job_type="analysis" run of the
sweep's W&B group (offline without an API key, like training runs)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..lightning.tracking import resolve_mode

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("loralab")


def _table_frame(df: "pd.DataFrame") -> "pd.DataFrame":
    """A frame wandb.Table accepts: row labels as a column, text column names, one type per column, None for NaN."""
    import pandas as pd

    if df.index.name is not None or not isinstance(df.index, pd.RangeIndex):
        df = df.reset_index()
    df = df.copy()
    df.columns = [str(c) for c in df.columns]
    for c in df.columns:
        if not pd.api.types.is_numeric_dtype(df[c]):
            df[c] = [None if v is None or (isinstance(v, float) and v != v) else str(v) for v in df[c]]
    return df.astype(object).where(df.notna(), None)


def log_analysis(group: str, folder: Path, tables: Optional[dict[str, Any]] = None,
                 images: Optional[dict[str, Path]] = None, *, name: Optional[str] = None, project: str = "loralab",
                 entity: Optional[str] = None, mode: Optional[str] = None,
                 config: Optional[dict[str, Any]] = None) -> Path:
    """One W&B run with job_type="analysis" in `group`: each DataFrame as a wandb.Table, each PNG as a wandb.Image.

    Offline without an API key (like training runs); the run's files go under `folder`/wandb/. Returns the run folder.
    """
    import wandb

    mode = resolve_mode(mode)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, entity=entity, group=group, job_type="analysis", name=name or f"{group} analysis",
                     dir=str(folder), mode=mode, config=config or {}, reinit="create_new")
    try:
        payload: dict[str, Any] = {k: wandb.Table(dataframe=_table_frame(df)) for k, df in (tables or {}).items()}
        payload.update({k: wandb.Image(str(p), caption=Path(p).stem) for k, p in (images or {}).items()})
        run.log(payload)
        run_folder = Path(run.dir).parent
    finally:
        run.finish()
    if mode == "offline":
        log.info("W&B analysis run is offline: upload it with `wandb sync %s`", run_folder)
    return run_folder


def log_sweep_summary(sweep_dir: Path, group: Optional[str] = None, *, project: str = "loralab",
                      entity: Optional[str] = None, mode: Optional[str] = None) -> Optional[Path]:
    """A sweep's summary.csv as a wandb.Table and its metric-vs-rank / vs-params / vs-memory plots as wandb.Image, in
    a job_type="analysis" run of the sweep's W&B group (the sweep folder's name, as its training runs use)."""
    import pandas as pd

    from ..sweep.summary import SUMMARY
    from . import plots, tables

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / SUMMARY).exists():
        log.warning("no %s in %s: nothing to log to W&B (run `loralab collect %s`)", SUMMARY, sweep_dir, sweep_dir)
        return None
    frames = {"sweep/summary": pd.read_csv(sweep_dir / SUMMARY)}
    data = tables.collect(sweep_dir, "sweep_dir")
    images = {}
    if not data.df.empty:
        pngs = plots.trade_off_plots(data.df, sweep_dir / "analysis" / "sweep")
        images = {f"sweep/metric_vs_{k}": p for k, p in pngs.items()}
    group = group or sweep_dir.name
    return log_analysis(group, sweep_dir, frames, images, name=f"{group} summary", project=project, entity=entity,
                        mode=mode, config={"sweep_dir": str(sweep_dir), "runs": len(frames["sweep/summary"]),
                                           "finished": len(data.df)})


def after_sweep(sweep_dir: Path, config: Any) -> None:
    """The sweeper's hook after summary.csv: with logger.wandb on, log the sweep's analysis to W&B. Never fails the
    sweep (its runs are already recorded); a W&B problem is logged as a warning."""
    from omegaconf import OmegaConf

    if not OmegaConf.select(config, "logger.wandb", default=False):
        return
    try:
        log_sweep_summary(Path(sweep_dir), project=OmegaConf.select(config, "logger.project", default="loralab"),
                          entity=OmegaConf.select(config, "logger.entity", default=None),
                          mode=OmegaConf.select(config, "logger.mode", default=None))
    except Exception as e:  # noqa: BLE001 - analysis logging must not turn a finished sweep into a failed one
        log.warning("W&B: the sweep summary was not logged (%s: %s); the runs and %s are unaffected",
                    type(e).__name__, e, Path(sweep_dir) / "summary.csv")
