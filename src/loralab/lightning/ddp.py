"""DDP that is safe inside sweeps: ranks 1..n-1 get this job's resolved config, not the command line.

Lightning's default DDP launcher starts the other ranks by re-running `sys.argv`. Inside a Hydra multirun that
makes every extra rank run the whole sweep, and with a search sweeper the ranks train different hyperparameters
(FACTS.md). Here the launcher writes nothing new: it starts `python -m loralab.cli.ddp_worker <run>/config.json`, the
exact config rank 0 trains (`loralab.cli.ddp_worker`). Launchers that start one process per rank themselves (SLURM
tasks_per_node) bypass it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies import DDPStrategy

from ..config import Config, as_dict
from ..store import write_json

CONFIG_FILE = "config.json"
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


class ConfigHandoffLauncher(_SubprocessScriptLauncher):
    def __init__(self, config_file: Path, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config_file = config_file

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        env = self.cluster_environment
        os.environ.update(MASTER_ADDR=env.main_address, MASTER_PORT=str(env.main_port),
                          NODE_RANK=str(env.node_rank()), LOCAL_RANK=str(env.local_rank()),
                          WORLD_SIZE=str(self.num_processes * self.num_nodes))
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            cmd = [sys.executable, "-m", "loralab.cli.ddp_worker", str(self.config_file)]
            self.procs.append(subprocess.Popen(cmd, env=child_env, cwd=os.getcwd()))


class ConfigHandoffDDP(DDPStrategy):
    def __init__(self, config_file: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config_file = config_file

    def finish(self, ok: bool = True) -> None:
        """After the job's last collective: wait for (or, after an error, kill) the ranks this process started,
        then leave the process as it was, so the next job of a multirun can start its own ranks."""
        import torch.distributed as dist

        if isinstance(self._launcher, ConfigHandoffLauncher):
            for proc in self._launcher.procs:
                if not ok:
                    proc.kill()
                proc.wait()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key in _DDP_ENV:
            os.environ.pop(key, None)

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = ConfigHandoffLauncher(self.config_file, self.cluster_environment, self.num_processes,
                                               self.num_nodes)


def handoff_strategy(strategy, cfg: Config, folder: Path):
    """Replace a plain "ddp" strategy name by the config-handoff one (writing the config the ranks will read)."""
    if not isinstance(strategy, str) or not strategy.startswith("ddp") or strategy.startswith(
            ("ddp_spawn", "ddp_fork", "ddp_notebook")):
        return strategy
    path = folder / CONFIG_FILE
    if is_rank_zero():
        write_json(path, as_dict(cfg))
    return ConfigHandoffDDP(path, find_unused_parameters=strategy.endswith("find_unused_parameters_true"))
