"""The SLURM launcher family, tested through submitit's local executor (the same launcher code path, no cluster)."""
from __future__ import annotations

from sweep_helpers import TINY, clean_env, launch, read_summary, tail, train_cmd


def test_submitit_local_sweep_writes_results_and_summary(tmp_path):
    sweep = tmp_path / "sweep"
    proc = launch(train_cmd("-m", "hydra/launcher=local_submitit", *TINY, "lora.r=2,4",
                            f"store.root={tmp_path / 'runs'}", f"hydra.sweep.dir={sweep}", cache=tmp_path / "cache"),
                  env=clean_env())
    assert proc.returncode == 0, tail(proc)
    rows = read_summary(sweep)
    assert sorted(r["lora.r"] for r in rows) == ["2", "4"]
    assert all(r["status"] == "finished" for r in rows)
    assert (sweep / ".submitit").is_dir()  # the jobs really went through submitit


def test_slurm_launcher_config_composes_with_one_task_per_rank():
    from hydra import compose, initialize_config_dir

    from loralab.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.partition=debug"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.partition == "debug" and launcher.tasks_per_node == 2
    assert launcher.signal_delay_s < launcher.timeout_min * 60
