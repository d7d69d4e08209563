"""Lightning callbacks for what a run records: training throughput and peak memory."""
from __future__ import annotations

import ctypes
import gc
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc malloc_trim), so that a job of a sweep that runs in
    the same process as earlier jobs starts from a lower, measurable baseline instead of reusing their free heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_mb(key: str) -> Optional[float]:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_now_mb() -> dict[str, float]:
    """What is in use now: the process's resident set size (VmRSS) and, with CUDA, GPU memory allocated."""
    return {"rss": _proc_status_mb("VmRSS") or 0.0,
            "cuda": torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0}


def baseline_mb(before: dict[str, float]) -> float:
    """A memory_now_mb() reading in the unit peak_memory_mb() reports (GPU allocations on CUDA, else process RSS)."""
    return before["cuda" if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0 else "rss"]


def reset_peak_memory(release: bool = True) -> None:
    if release:
        release_memory()
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
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory(L.Callback):
    """The peak of training alone and of the whole fit. Validation runs larger batches (data.eval_batch_size) without
    gradients and can peak higher than a small training micro-batch: its peak is read and reset around it, so
    `train_peak_mb` is what training steps needed (weights, gradients, optimizer states, activations, temporaries)."""

    def __init__(self) -> None:
        self.train_peak_mb = 0.0
        self.run_peak_mb = 0.0

    def _training_part(self) -> None:
        peak = peak_memory_mb()
        self.train_peak_mb = max(self.train_peak_mb, peak)
        self.run_peak_mb = max(self.run_peak_mb, peak)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._training_part()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.run_peak_mb = max(self.run_peak_mb, peak_memory_mb())
        reset_peak_memory()  # the heap validation freed is released, so training's peak starts from what it holds

    def on_train_end(self, trainer, pl_module) -> None:
        self._training_part()


class Throughput(L.Callback):
    """Training samples/s over training batches only (data loading included, validation excluded).

    `steady_samples_per_s` leaves out the first `warmup` steps (compilation, allocator and cache warm-up)."""

    def __init__(self, warmup: int = 5) -> None:
        self.warmup, self.steps = warmup, 0
        self.steady_samples, self.steady_seconds = 0, 0.0
        self.samples = 0
        self.tokens = 0  # padded tokens actually processed (what the FLOPs are spent on)
        self.largest_batch: Optional[tuple[int, int]] = None  # (micro-batch, padded length) of the most tokens
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
        shape = tuple(batch["input_ids"].shape)
        if self.largest_batch is None or shape[0] * shape[1] > self.largest_batch[0] * self.largest_batch[1]:
            self.largest_batch = (int(shape[0]), int(shape[1]))

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def steady_samples_per_s(self) -> float:
        return self.steady_samples / self.steady_seconds if self.steady_seconds else self.samples_per_s
