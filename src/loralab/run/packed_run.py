"""One run inside a pack (run/packed.py): its state, its schedule as Lightning derives it, and its checkpoint in the
layout Lightning writes for a solo run, so that a pack resumes a solo run's checkpoint and the other way round."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import torch
from torch import nn

from ..config import Config
from ..lightning import checkpoint_io
from ..store import RunRecord
from .data import GlueDataModule
from .train import LAST_CKPT


@dataclass
class Outcome:
    """What became of one run of a pack: finished (value = its main metric), skipped (already finished), failed
    (error), or solo (the packed layer cannot express it: `reason`; the caller trains it through the solo path)."""

    status: str
    value: Optional[float] = None
    error: Optional[BaseException] = None
    reason: Optional[str] = None


@dataclass
class Member:
    """One run inside a pack: its config, store folder, model shell, optimizer, data order and progress."""

    index: int
    cfg: Config
    folder: Path
    record: RunRecord
    started_at: float
    locks: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    shell: Optional[nn.Module] = None
    data: Optional[GlueDataModule] = None
    optimizer: Any = None
    scheduler: Any = None
    loggers: list = field(default_factory=list)
    epoch: int = 0  # the epoch in progress (0-based)
    in_epoch: int = 0  # its batches already trained
    step: int = 0  # optimizer steps done
    n_batches: int = 0
    max_epochs: float = 1
    max_steps: int = -1
    total_steps: int = 1
    history: list = field(default_factory=list)
    best: Optional[dict] = None
    first_loss: Optional[float] = None
    interruptions: list = field(default_factory=list)
    resumed_from: Optional[str] = None
    loss_sum: Optional[torch.Tensor] = None
    loss_steps: int = 0
    order: Optional[Iterator[list[int]]] = None
    dataset: Any = None
    partners: set = field(default_factory=set)  # runs it shared at least one step with
    admitted_at: float = 0.0
    # throughput, as run/train.py's Throughput callback counts it (training steps only, validation excluded)
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    steady_samples: int = 0
    steady_seconds: float = 0.0
    steps_here: int = 0
    largest: Optional[tuple[int, int]] = None
    first_step_at: Optional[float] = None

    @property
    def run_id(self) -> str:
        return self.folder.name

    @property
    def done(self) -> bool:
        return self.epoch >= self.max_epochs or (self.max_steps != -1 and self.step >= self.max_steps)


def batch_limit(n: int, limit: Any) -> int:
    """Lightning's limit_*_batches: None/1.0 all, an int a count, a float a fraction."""
    if limit is None:
        return n
    if isinstance(limit, float):
        return n if limit == 1.0 else int(n * limit)
    return min(n, int(limit))


def schedule(cfg: Config, n_batches: int) -> tuple[float, int, int]:
    """(max_epochs, max_steps, total optimizer steps) as Lightning derives them (estimated_stepping_batches)."""
    t = cfg.trainer
    max_steps = t.get("max_steps")
    max_steps = -1 if max_steps is None else int(max_steps)
    max_epochs = t.get("max_epochs")
    if max_epochs is None:
        max_epochs = 1000 if max_steps == -1 else -1
    if max_epochs == -1:
        return math.inf, max_steps, max(1, max_steps)
    total = n_batches * max(int(max_epochs), 1)
    total = min(total, max_steps) if max_steps != -1 else total
    return float(max_epochs), max_steps, max(1, total)


def lightning_checkpoint(m: Member, end_of_epoch: bool) -> dict[str, Any]:
    """A run's checkpoint in the layout Lightning writes for a solo run (run/train.py), so either path resumes it:
    trained tensors under the module's names, optimizer and schedule states, loop progress and loralab's state."""
    g, e = m.step, m.epoch
    done = m.n_batches if end_of_epoch else m.in_epoch

    def progress(total: int, current: int, keys=("ready", "completed", "started", "processed")) -> dict:
        return {"total": {k: total for k in keys}, "current": {k: current for k in keys}}

    epochs = {"ready": e + 1, "completed": e, "started": e + 1, "processed": e + int(end_of_epoch)}
    fit_loop = {
        "state_dict": {},
        "epoch_loop.state_dict": {"_batches_that_stepped": g},
        "epoch_loop.batch_progress": {**progress(g, done), "is_last_batch": end_of_epoch},
        "epoch_loop.scheduler_progress": progress(g, done, ("ready", "completed")),
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {
            "step": progress(g, done, ("ready", "completed")),
            "zero_grad": progress(g, done, ("ready", "completed", "started"))}},
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": progress(0, 0, ("ready", "completed")),
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": {**progress(0, 0), "is_last_batch": False},
        "epoch_progress": {"total": dict(epochs), "current": dict(epochs)},
    }
    idle = {"state_dict": {}, "batch_progress": {**progress(0, 0), "is_last_batch": False}}
    trained = {f"model.{n}": p.detach() for n, p in m.shell.named_parameters() if p.requires_grad}
    return {"epoch": e, "global_step": g, "pytorch-lightning_version": L.__version__, "state_dict": trained,
            "loops": {"fit_loop": fit_loop, "validate_loop": dict(idle), "test_loop": dict(idle),
                      "predict_loop": dict(idle)},
            "GlueDataModule": {"epoch": e, "done": done},  # the data position, as Lightning stores the datamodule's
            "callbacks": {}, "optimizer_states": [m.optimizer.state_dict()],
            "lr_schedulers": [m.scheduler.state_dict()],
            "loralab": {"history": m.history, "best": m.best, "first_loss": m.first_loss,
                        "interruptions": m.interruptions, "rng": torch.get_rng_state(), "cuda_rng": [],
                        "packed": True}}


def restore(m: Member, ckpt: dict[str, Any]) -> None:
    """Continue a run from its checkpoint (a pack's or a solo run's: the same layout)."""
    trained = {n for n, p in m.shell.named_parameters() if p.requires_grad}
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    missing = trained - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks trained tensors {sorted(missing)[:3]}")
    m.shell.load_state_dict({k: v for k, v in state.items() if k in trained}, strict=False)
    m.optimizer.load_state_dict(ckpt["optimizer_states"][0])
    m.scheduler.load_state_dict(ckpt["lr_schedulers"][0])
    m.step, m.epoch = int(ckpt["global_step"]), int(ckpt["epoch"])
    bp = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    if bp.get("is_last_batch", True):
        m.epoch, m.in_epoch = m.epoch + 1, 0
    else:
        m.in_epoch = int(bp["current"]["completed"])
    state = ckpt.get("loralab", {})
    m.history, m.best = list(state.get("history", [])), state.get("best")
    m.first_loss, m.interruptions = state.get("first_loss"), list(state.get("interruptions", []))


def resume_checkpoint(m: Member) -> Optional[Path]:
    """The checkpoint to continue from (checkpoint_io.resume_point where the store has it: a damaged file is set
    aside and the previous one used), or None."""
    return checkpoint_io.resume_point(m.folder / "checkpoints" / LAST_CKPT) if m.cfg.store.resume else None
