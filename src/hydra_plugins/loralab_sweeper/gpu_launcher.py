"""Several jobs per GPU, one GPU per job: Hydra's joblib launcher with each worker pinned to one GPU.

`python train.py -m lora.r=4,8,16,32 trainer=gpu hydra/launcher=gpus hydra.launcher.jobs_per_gpu=4` runs
len(gpus) x jobs_per_gpu jobs at once. A worker process claims one slot the first time it runs a job (a lock file in
the sweep folder, held for the worker's life and dropped by the OS when it dies) and keeps it: slot k uses GPU
gpus[k % len(gpus)], set as CUDA_VISIBLE_DEVICES before the job touches CUDA, so a worker never moves between GPUs
and at most jobs_per_gpu jobs share one. Results and summary.csv are exactly as with any launcher; each run records
the devices it was given (results.json: hardware.cuda_visible_devices).
"""

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.config import JobLibLauncherConf
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

log = logging.getLogger("loralab.sweep")
SLOTS = ".gpu_slots"
_held: dict[str, Any] = {}  # this worker process's slot: {"dir": slots folder, "file": open lock file, "gpu": id}


@dataclass
class GpuLauncherConf(JobLibLauncherConf):
    _target_: str = "hydra_plugins.loralab_sweeper.gpu_launcher.LoralabGpuLauncher"
    gpus: Optional[List[str]] = None  # ids as CUDA_VISIBLE_DEVICES takes them; null: the visible ones, else all
    jobs_per_gpu: int = 1


ConfigStore.instance().store(group="hydra/launcher", name="gpus_schema", node=GpuLauncherConf, provider="loralab")


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every device torch counts."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in (x.strip() for x in env.split(",")) if g and g != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def claim_slot(slots_dir: Path, gpus: Sequence[str], jobs_per_gpu: int) -> str:
    """This worker's GPU: the first free slot, locked for the rest of the worker's life."""
    if _held.get("dir") == slots_dir:
        return _held["gpu"]
    if "file" in _held:  # a worker reused by another sweep of this process: give up the old slot
        _held.pop("file").close()
    slots_dir.mkdir(parents=True, exist_ok=True)
    for k in range(len(gpus) * jobs_per_gpu):
        fh = open(slots_dir / f"slot{k}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        _held.update(dir=slots_dir, file=fh, gpu=str(gpus[k % len(gpus)]))
        return _held["gpu"]
    raise RuntimeError(f"all {len(gpus) * jobs_per_gpu} GPU slots in {slots_dir} are held: more workers than "
                       f"len(gpus) x jobs_per_gpu")


@dataclass
class PinnedTask:
    """The sweep's task function, run with CUDA_VISIBLE_DEVICES set to this worker's GPU."""

    task: Callable[[Any], Any]
    gpus: List[str]
    jobs_per_gpu: int
    slots_dir: Path

    def __call__(self, cfg: Any) -> Any:
        os.environ["CUDA_VISIBLE_DEVICES"] = claim_slot(self.slots_dir, self.gpus, self.jobs_per_gpu)
        return self.task(cfg)


class LoralabGpuLauncher(JoblibLauncher):
    def __init__(self, gpus: Optional[List[Any]] = None, jobs_per_gpu: int = 1, **joblib: Any) -> None:
        super().__init__(**joblib)
        if jobs_per_gpu < 1:
            raise ValueError(f"hydra.launcher.jobs_per_gpu={jobs_per_gpu} is invalid: it is the number of jobs sharing "
                             f"one GPU, at least 1; e.g. hydra.launcher.jobs_per_gpu=4")
        self.gpus = None if gpus is None else [str(g) for g in gpus]
        self.jobs_per_gpu = jobs_per_gpu

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.task_function is not None
        gpus = self.gpus if self.gpus is not None else visible_gpus()
        if not gpus:
            log.warning("hydra/launcher=gpus: no GPU visible (CUDA_VISIBLE_DEVICES, torch) and hydra.launcher.gpus "
                        "is unset: running %d jobs at once, unpinned", self.jobs_per_gpu)
            self.joblib["n_jobs"] = self.jobs_per_gpu
            return super().launch(job_overrides, initial_job_idx)
        self.joblib["n_jobs"] = len(gpus) * self.jobs_per_gpu
        log.info("%d GPU(s) %s x %d jobs each = %d jobs at once", len(gpus), ",".join(gpus), self.jobs_per_gpu,
                 self.joblib["n_jobs"])
        task = self.task_function
        slots = Path(str(self.config.hydra.sweep.dir)).resolve() / SLOTS  # jobs may chdir into their folders
        self.task_function = PinnedTask(task, gpus, self.jobs_per_gpu, slots)
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            self.task_function = task
