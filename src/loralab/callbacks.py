"""Lightning callbacks for what a run records: training throughput and peak memory."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: "5" resets the process's peak RSS (VmHWM), so each job of a sweep measures its own peak
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Peak GPU memory allocated when on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Throughput(L.Callback):
    """Training samples/s over training batches only (data loading included, validation excluded).

    `steady_samples_per_s` leaves out the first `warmup` steps (compilation, allocator and cache warm-up)."""

    def __init__(self, warmup: int = 5) -> None:
        self.warmup, self.steps = warmup, 0
        self.steady_samples, self.steady_seconds = 0, 0.0
        self.samples = 0
        self.tokens = 0  # padded tokens actually processed (what the FLOPs are spent on)
        self.seconds = 0.0
        self.first_step_at: Optional[float] = None
        self._mark: Optional[float] = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        n = len(batch["labels"]) * trainer.world_size
        if self._mark is not None:
            self.seconds += now - self._mark
            if self.steps >= self.warmup:
                self.steady_seconds += now - self._mark
                self.steady_samples += n
        self._mark = now
        self.steps += 1
        self.samples += n
        self.tokens += batch["input_ids"].numel() * trainer.world_size

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def steady_samples_per_s(self) -> float:
        return self.steady_samples / self.steady_seconds if self.steady_seconds else self.samples_per_s
