"""The LightningModule: loss, AdamW with linear warmup/decay, per-task GLUE metrics, best-epoch tracking."""
from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from ..config import Config
from .metrics import epoch_scores, guard_loss, predictions, task_loss, task_metrics

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class GlueModule(L.LightningModule):
    def __init__(self, model: nn.Module, cfg: Config):
        super().__init__()
        self.model, self.cfg, self.task = model, cfg, cfg.task
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps submodule modes: dropout would be off
        self.metrics = nn.ModuleDict({s: task_metrics(cfg.task) for s in cfg.task.eval_splits})
        self.history: list[dict[str, float]] = []
        self.best: Optional[dict[str, float]] = None
        self.first_loss: Optional[float] = None
        self.interruptions: list[dict[str, Any]] = []  # signals that stopped this run mid-way (kept across resumes)
        # The training loss summed on the device since it was last read: reading it is a host sync, so it is read
        # (logged, checked for divergence) every trainer.log_every_n_steps steps and at epoch ends, never per step.
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_steps = 0
        self.strict_loading = False  # checkpoints hold only the trained tensors; the frozen base reloads from disk

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(self.task, logits, labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch), batch["labels"])
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        self._loss_steps += 1
        last_micro_batch = (batch_idx + 1) % self.cfg.data.grad_accum == 0  # the optimizer step follows it
        logs_now = self.trainer is not None and (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        if last_micro_batch and logs_now:
            self._read_loss(log=True)  # the same steps Lightning writes its logs at
        return loss

    def on_train_epoch_end(self) -> None:
        self._read_loss(log=False)

    def _read_loss(self, log: bool) -> None:
        """Log and check the mean training loss since the last read (one host sync), then start a new sum."""
        if self._loss_sum is None:
            return
        mean = self._loss_sum / self._loss_steps
        self._loss_sum, self._loss_steps = None, 0
        if log:
            self.log("train/loss", mean, on_step=True, on_epoch=False, prog_bar=True)
        self._guard(mean)

    def _guard(self, loss: torch.Tensor) -> None:
        self.first_loss = guard_loss(float(loss), self.first_loss, self.global_step)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        split = self.task.eval_splits[dataloader_idx]
        self.metrics[split].update(predictions(self(batch), self.task.is_regression), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        if self.trainer is not None and self.trainer.sanity_checking:
            for m in self.metrics.values():
                m.reset()
            return
        values = epoch_scores(self.task, dict(self.metrics.items()))
        self.log_dict({f"val/{k}": v for k, v in values.items()}, sync_dist=False)  # torchmetrics already synced
        record = {"epoch": self.current_epoch, "step": self.global_step, **values}
        self.history.append(record)
        main = self.task.main_metric
        if self.best is None or values[main] > self.best[main]:
            self.best = record
        self.log(f"val/best_{main}", self.best[main])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        # The RNG state: a run resumed mid-epoch draws the same dropout masks as one never stopped (at an epoch's
        # start the generator is reseeded from (seed, epoch) anyway).
        checkpoint["loralab"] = {"history": self.history, "best": self.best, "first_loss": self.first_loss,
                                 "interruptions": self.interruptions, "rng": torch.get_rng_state(),
                                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("loralab", {})
        self.history, self.best = list(state.get("history", [])), state.get("best")
        self.first_loss = state.get("first_loss")
        self.interruptions = list(state.get("interruptions", []))
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def on_train_epoch_start(self) -> None:
        # Dropout draws depend only on (seed, epoch): a run resumed at an epoch boundary equals an uninterrupted one.
        torch.manual_seed(self.cfg.seed * 1000 + self.current_epoch)

    def configure_optimizers(self):
        from .optim import build_optimizer, linear_warmup

        optimizer = build_optimizer(self.model, self.cfg)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": linear_warmup(optimizer, self.cfg.optim.warmup_ratio, total),
                                 "interval": "step"}}
