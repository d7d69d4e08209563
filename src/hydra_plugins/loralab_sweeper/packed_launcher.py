"""Packed sweeps: the jobs of a sweep that share a frozen base train together in one process (loralab.run.packed).

`python train.py -m lora.r=4,8,16 seed=0,1 hydra/launcher=packed` groups the jobs by shared base
(loralab.sweep.packing), trains each group `pack_size` runs at a time (a finished run's slot goes to the next job),
and runs every job the packed layer cannot express (DoRA, full fine-tuning, quantized, compiled, DDP, ...) through
the normal solo path, saying which and why. Each job gets its Hydra folder, `run` link and JobReturn as with Hydra's
basic launcher, so loralab's sweeper records failures and writes summary.csv unchanged.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import open_dict

log = logging.getLogger("loralab.sweep")


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.loralab_sweeper.packed_launcher.PackedLauncher"
    pack_size: Optional[int] = None  # runs trained at once; null: as many as fit the device's memory (at most 16)
    pad_slack: Any = "auto"  # float|null|"auto": see conf/hydra/launcher/packed.yaml


ConfigStore.instance().store(group="hydra/launcher", name="packed_schema", node=PackedLauncherConf, provider="loralab")


class LinkRun:
    """The task of a packed job inside Hydra's run_job: make its folder (configs, logs) and link its run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, cfg: Any) -> None:
        from loralab.store import link_job

        link_job(Path(HydraConfig.get().runtime.output_dir), self.folder)


class PackedLauncher(BasicLauncher):
    def __init__(self, pack_size: Optional[int] = None, pad_slack: Any = "auto") -> None:
        super().__init__()
        if not (pad_slack is None or pad_slack == "auto" or (isinstance(pad_slack, (int, float)) and pad_slack >= 0)):
            raise ValueError(f"hydra.launcher.pad_slack={pad_slack!r} is invalid: use a fraction >= 0 (e.g. 0.1), "
                             f"null (one pass, padded to the widest) or auto")
        self.pad_slack = pad_slack
        if pack_size is not None and int(pack_size) < 1:
            raise ValueError(f"hydra.launcher.pack_size={pack_size} is invalid: it is the number of runs trained at "
                             f"once, at least 1 (or null: as many as fit the device)")
        self.pack_size = None if pack_size is None else int(pack_size)

    def _run(self, sweep_config: Any, task: Any) -> JobReturn:
        assert self.hydra_context is not None
        ret = run_job(hydra_context=self.hydra_context, task_function=task, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from loralab.config import to_config
        from loralab.errors import LoralabError
        from loralab.run.packed import train_pack
        from loralab.store import read_results, run_dir
        from loralab.sweep.packing import auto_pack_size, group

        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs, typed = [], []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)
            try:
                cfg = to_config(sweep_config)
            except LoralabError:
                cfg = None  # the solo path records the invalid job
            typed.append(cfg)
        # Invalid and finished jobs take the solo path (it records or skips them); the rest are grouped.
        candidates = [i for i, c in enumerate(typed) if c is not None and not (
            c.store.skip_finished and (read_results(run_dir(c)) or {}).get("status") == "finished")]
        packs, reasons = group([typed[i] for i in candidates])
        solo = {candidates[k]: why for k, why in reasons.items()}
        for i, why in solo.items():
            log.info("job #%d trains solo: %s", initial_job_idx + i, why)
        returns: List[Optional[JobReturn]] = [None] * len(configs)
        for pack in packs:
            jobs = [candidates[k] for k in pack]
            cfgs = [typed[i] for i in jobs]
            for i in jobs:
                returns[i] = self._run(configs[i], LinkRun(run_dir(typed[i])))
            size = self.pack_size or auto_pack_size(cfgs[0])
            log.info("packing %d jobs (%s) %d at a time on one frozen base", len(jobs),
                     ", ".join(f"#{initial_job_idx + i}" for i in jobs), size)
            for i, outcome in zip(jobs, train_pack(cfgs, size, self.pad_slack)):
                ret = returns[i]
                if outcome.status == "solo":
                    log.info("job #%d trains solo: %s", initial_job_idx + i, outcome.reason)
                    returns[i] = None
                    solo[i] = outcome.reason
                elif outcome.status == "failed":
                    ret.status, ret._return_value = JobStatus.FAILED, outcome.error
                else:
                    ret.status, ret._return_value = JobStatus.COMPLETED, outcome.value
        for i, sweep_config in enumerate(configs):
            if returns[i] is None:
                returns[i] = self._run(sweep_config, self.task_function)
        return returns  # type: ignore[return-value]
