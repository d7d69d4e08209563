"""Hydra's submitit launchers (SLURM and local), made safe for long sweeps.

Hydra's own launcher waits for its jobs in order and raises at the first one the cluster lost (`scancel`, a node
failure, the out-of-memory killer: submitit's UncompletedJobError). The sweep then ends while the other jobs still
run unwatched, and the lost job leaves no record (or a run stuck at "running"). These launchers wait for every job;
a lost one is recorded as a failed run in the run store, with the scheduler's reason (e.g. `state: CANCELLED`) and
linked from its job folder like any job, and is handed to the sweeper as a failed job. Launching the same sweep again
trains it (finished runs are skipped). Used by conf/hydra/launcher/slurm.yaml and local_submitit.yaml.
"""
from __future__ import annotations

import logging
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("loralab.sweep")
_COMPOSING = threading.Lock()
LOCK_WAIT_S = 120  # longest wait for a lost job's processes to die (SLURM: KillWait) before recording it


class JobLost(RuntimeError):
    """A job that ended without a result: cancelled, killed, out of memory, node failure."""


class JobVanished(RuntimeError):
    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


LIVE_STATES = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED", "STAGE_OUT",
               "SIGNALING", "PREEMPTED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
VANISH_S = 20  # a job neither sacct nor squeue knows as live for this long is lost
SQUEUE_EVERY_S = 5


def squeue_state(job_id: str) -> str | None:
    """The job's state as squeue knows it (also for jobs that ended a few minutes ago), None when it does not."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return "UNREACHABLE"  # cannot ask: treated as live
    state = out.stdout.strip().split()[0] if out.returncode == 0 and out.stdout.strip() else None
    return state


def wait_slurm_job(job: Any) -> None:
    """Wait as submitit does (until a result file appears or sacct reports an end), but give up on a job that sacct
    has never heard of and squeue no longer lists as live: submitit would wait for it forever. That happens to an
    array element cancelled before SLURM split it off the array (22.05 keeps no record of it) and to every killed
    job on a cluster without accounting. Raises JobVanished for such a job."""
    gone_since = None
    asked = float("-inf")
    while not job.done():
        now = time.monotonic()
        if now - asked >= SQUEUE_EVERY_S and str(job.state).upper() == "UNKNOWN":
            asked = now
            state = squeue_state(job.job_id)
            if state in LIVE_STATES or state == "UNREACHABLE":
                gone_since = None
            elif gone_since is None:
                gone_since = now
            elif now - gone_since >= VANISH_S:
                raise JobVanished(state or "not known to sacct or squeue: cancelled before it started, or the "
                                           "cluster keeps no accounting")
        time.sleep(1)


def record_lost_job(config: DictConfig, hydra_context: Any, overrides: List[str], idx: int, error: JobLost) -> Path:
    """Write what the job itself would have written had it lived: its run's results.json with status "failed" and
    the reason, and the job folder's link to the run. A run that finished, or failed with its own error, is left
    alone; so is a run whose lock a live process still holds after LOCK_WAIT_S. Returns the job folder."""
    from loralab.config import to_config
    from loralab.errors import ConfigError, RunBusy
    from loralab.store import RunRecord, link_job, read_results, record_invalid_job, run_dir, run_lock

    with _COMPOSING:  # the launcher waits for its jobs in threads; config composition is not thread-safe
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config.hydra.job):
            sweep_config.hydra.job.num = idx
        job_dir = Path(str(config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        try:
            cfg = to_config(sweep_config)
        except ConfigError:
            cfg = None
    job_dir.mkdir(parents=True, exist_ok=True)
    if cfg is None:  # an invalid combination that never got to say so: record it in the job folder
        raw = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config.keys() if k != "hydra"])
        record_invalid_job(job_dir, error, OmegaConf.to_container(raw, resolve=False))
        return job_dir
    folder = run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    link_job(job_dir, folder)
    # The scheduler reports a cancelled job at once, but its processes may live on until SIGKILL (SLURM's KillWait,
    # 30 s by default; submitit ignores the SIGTERM before it) and still hold the run's lock: wait for them.
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            with run_lock(folder):
                done = read_results(folder)
                if done is None or done.get("status") == "running":
                    RunRecord(cfg, folder).fail(error)
            return job_dir
        except RunBusy:
            if time.monotonic() > deadline:
                log.warning("%s is still held by a live process after %d s; leaving its record to it",
                            folder, LOCK_WAIT_S)
                return job_dir
            time.sleep(0.5)


class _WaitForEveryJob:
    """`launch` as in hydra-submitit-launcher 1.2.0, except for the wait at the end."""

    _EXECUTOR: str
    params: dict
    config: Any
    hydra_context: Any

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        assert len(job_overrides) > 0
        specific_init_keys = {"max_num_timeout"}
        init_params = {"folder": self.params["submitit_folder"],
                       **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in specific_init_keys}}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        init_keys = specific_init_keys | {"submitit_folder"}
        executor.update_parameters(**{k if k in baseparams else f"{self._EXECUTOR}_{k}": v
                                      for k, v in self.params.items() if k not in init_keys})
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            sweep_dir.chmod(int(str(self.config.hydra.sweep.mode), 8))
        job_params: List[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))

        def wait(i: int) -> JobReturn:
            try:
                if self._EXECUTOR == "slurm":
                    wait_slurm_job(jobs[i])
                return jobs[i].results()[0]
            except Exception as e:  # submitit's UncompletedJobError: cancelled, killed, node lost
                return self._lost(list(job_overrides[i]), initial_job_idx + i, jobs[i], e)

        # One waiter per job, so that lost jobs (each costs submitit a 15 s wait for a result file) overlap.
        with ThreadPoolExecutor(max_workers=min(len(jobs), 64)) as pool:
            return list(pool.map(wait, range(len(jobs))))

    def _lost(self, overrides: List[str], idx: int, job: Any, exc: Exception) -> JobReturn:
        try:
            state = exc.state if isinstance(exc, JobVanished) else job.state
        except Exception:  # the scheduler cannot be asked: the exception says what is known
            state = "UNKNOWN"
        error = JobLost(f"{self._EXECUTOR} job {job.job_id} ended without a result (state: {state}); "
                        f"its log: {job.paths.stderr}")
        log.error("job #%d (%s) lost: %s", idx, " ".join(filter_overrides(overrides)), error)
        log.debug("submitit said: %s", exc)
        job_dir = None
        try:
            job_dir = record_lost_job(self.config, self.hydra_context, overrides, idx, error)
        except Exception:  # recording must never stop the wait for the other jobs
            log.exception("could not record lost job #%d", idx)
        return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=error,
                         working_dir=None if job_dir is None else str(job_dir))


class LoralabSlurmLauncher(_WaitForEveryJob, SlurmLauncher):
    pass


class LoralabLocalLauncher(_WaitForEveryJob, LocalLauncher):
    pass
