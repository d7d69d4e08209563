"""Weights & Biases for training runs: one W&B group per sweep, run names from the overrides, tags from the axes.

Offline automatically when no API key is configured; the key itself is never written anywhere by loralab.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from ..config import Config, as_dict
from ..store import flatten, is_semantic, run_id

log = logging.getLogger("loralab")


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def resolve_mode(explicit: Optional[str] = None) -> str:
    return explicit or os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")


def wandb_mode(cfg: Config) -> str:
    return resolve_mode(cfg.logger.mode)


def hydra_context() -> tuple[Optional[str], list[str]]:
    """(sweep folder name, this job's overrides) when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, []
    hc = HydraConfig.get()
    sweep = Path(hc.sweep.dir).name if hc.mode.name == "MULTIRUN" else None
    return sweep, list(hc.overrides.task)


def wandb_logger(cfg: Config, folder: Path):
    from lightning.pytorch.loggers import WandbLogger

    sweep, overrides = hydra_context()
    mode = wandb_mode(cfg)
    # The overrides that change what the run computes (the run id's keys), not where it keeps its files.
    shown = [o for o in overrides
             if not o.startswith(("logger", "hydra.")) and is_semantic(o.lstrip("+~").split("=")[0])]
    logger = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, save_dir=str(folder),
                         group=sweep or f"{cfg.task.name}-single", name=" ".join(shown) or run_id(cfg),
                         tags=[o.lstrip("+~")[:64] for o in shown][:64], mode=mode, config=flatten(as_dict(cfg)),
                         job_type="train")
    if mode == "offline":
        why = "logger.mode/WANDB_MODE" if (cfg.logger.mode or os.environ.get("WANDB_MODE")) else "no API key"
        log.info("W&B is offline (%s): upload later with `wandb sync %s/wandb/offline-run-*`", why, folder)
    return logger


def log_summary(results: dict[str, Any]) -> None:
    """Put results.json's metrics and costs in the W&B run summary (when a run is active)."""
    import wandb

    if wandb.run is None:
        return
    keep = {k: v for k, v in results.items() if k not in ("config", "history", "versions")}
    wandb.run.summary.update(flatten(keep))


def finish() -> None:
    """Close the active W&B run so the next job of a multirun starts its own (Lightning would reuse it)."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
