"""Hydra's basic sweeper, made safe for long sweeps: one failed job never stops the others, and every sweep ends
with summary.csv beside its jobs, naming the failures. Works with any launcher (basic, joblib, submitit)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

log = logging.getLogger("loralab.sweep")


class SweepFailed(RuntimeError):
    pass


class LoralabSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int], params: Optional[dict] = None,
                 fail_on_error: bool = True) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.fail_on_error = fail_on_error

    def sweep(self, arguments: List[str]) -> Any:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from loralab.sweep.summary import failures, write_summary

        params_conf = self._parse_config()
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(params_conf), self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, launch_errors, job_idx = [], [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            try:
                results = self.launcher.launch(batch, initial_job_idx=job_idx)
                returns.append(results)
            except Exception as e:  # e.g. submitit: a job cancelled or killed on the cluster
                log.error("launcher reported a failed job in batch %d..%d: %s", job_idx, job_idx + len(batch) - 1, e)
                launch_errors.append(str(e))
            job_idx += len(batch)
        rows = write_summary(sweep_dir, mark_unfinished_failed=True)
        from loralab.analysis.wandb_log import after_sweep

        after_sweep(sweep_dir, self.config)  # logger=wandb: summary table and plots to the sweep's W&B group
        failed = failures(rows)
        failed_jobs = [r for rs in returns for r in rs if r.status == JobStatus.FAILED]
        log.info("sweep finished: %d runs, %d failed; summary: %s", len(rows), len(failed), sweep_dir / "summary.csv")
        if failed or failed_jobs or launch_errors:
            lines = [f"  {r['run_id'] or r['path']}: {r['error']}" for r in failed]
            msg = f"{len(failed) or len(failed_jobs) or len(launch_errors)} job(s) failed:\n" + "\n".join(lines)
            log.error(msg)
            if self.fail_on_error:
                raise SweepFailed(msg + f"\nThe other jobs finished; see {sweep_dir / 'summary.csv'}. "
                                        "Launch the same sweep again to rerun only what is missing.")
        return returns
