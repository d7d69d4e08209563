"""Launchers: the SLURM family through submitit's local executor (the same launcher code path, no cluster), several
jobs per GPU (joblib workers pinned to devices), and DDP inside runs and sweeps."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import needs_glue
from sweep_helpers import (TINY, clean_env, launch, read_summary, results_under, sweep_folders, tail,
                           train_cmd)

pytestmark = needs_glue("rte")


@pytest.mark.slow  # the same launcher code runs for real against the SLURM cluster in tests/test_slurm.py
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


def test_jobs_per_gpu_launcher_pins_each_job_to_one_device(tmp_path: Path, token_cache: Path) -> None:
    """`hydra/launcher=gpus` (joblib underneath, jobs in parallel into one sweep): with two devices and one job per
    device, every job records the device it was given, both devices are used, and two jobs never share one."""
    store = tmp_path / "runs"
    proc = launch(train_cmd("-m", "lora.r=2,4,8", *TINY, "hydra/launcher=gpus", "hydra.launcher.gpus=[0,1]",
                            "hydra.launcher.jobs_per_gpu=1", f"store.root={store}", cache=token_cache), cwd=tmp_path)
    assert proc.returncode == 0, tail(proc)
    assert "2 GPU(s) 0,1 x 1 jobs each = 2 jobs at once" in proc.stdout, tail(proc)
    (sweep,) = sweep_folders(tmp_path)  # workers resolve the same folder as the launching process
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1", "2"]
    rows = read_summary(sweep)
    assert sorted((r["status"], r["lora.r"]) for r in rows) == [("finished", "2"), ("finished", "4"), ("finished", "8")]
    assert all((sweep / job / "run" / "adapter").is_dir() for job in ("0", "1", "2"))
    spans = []
    for folder, r in results_under(store).items():
        device = r["hardware"]["cuda_visible_devices"]
        spans.append((device, r["job_started_at"], (folder / "results.json").stat().st_mtime))
    assert {d for d, _, _ in spans} == {"0", "1"}
    for a, b in itertools.combinations(spans, 2):
        if a[0] == b[0]:  # same device: one job ended before the other started
            assert a[2] <= b[1] or b[2] <= a[1], spans


# --- DDP inside runs and sweeps --------------------------------------------------------------------------------

DDP = ("task=rte", "trainer=ddp", "data.train_limit=64", "data.val_limit=33", "trainer.max_steps=2")


def assert_ddp_run(run: Path, r: int) -> None:
    """Both ranks trained this run's config, rank 0 alone wrote results and the adapter, metrics cover all examples."""
    ranks = {p.name: json.loads(p.read_text()) for p in (run / "ranks").glob("*.json")}
    assert sorted(ranks) == ["rank0.json", "rank1.json"]
    assert {x["world_size"] for x in ranks.values()} == {2} and {x["rank"] for x in ranks.values()} == {0, 1}
    assert ranks["rank0.json"]["config"] == ranks["rank1.json"]["config"]
    assert ranks["rank0.json"]["config"]["lora"]["r"] == r and ranks["rank0.json"]["run_id"] == run.name
    result = json.loads((run / "results.json").read_text())
    assert result["status"] == "finished" and result["config"]["lora"]["r"] == r
    assert sorted(p.name for p in run.rglob("results.json")) == ["results.json"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    # 33 dev examples over 2 ranks: an accuracy synchronized over exactly those 33 is a multiple of 1/33
    # (a padded sampler would count 34; a rank-local one 16 or 17).
    for record in result["history"]:
        hits = record["accuracy"] * 33
        assert abs(hits - round(hits)) < 1e-4, record


@pytest.mark.slow  # the same strategy and checks as the multirun test below, outside a sweep
def test_ddp_single_run(tmp_path: Path, token_cache: Path) -> None:
    store = tmp_path / "runs"
    proc = launch(train_cmd(*DDP, "lora.r=4", f"store.root={store}", f"hydra.run.dir={tmp_path / 'out'}",
                            cache=token_cache))
    assert proc.returncode == 0, tail(proc)
    (run,) = results_under(store)
    assert_ddp_run(run, 4)


def test_ddp_inside_a_multirun(tmp_path: Path, token_cache: Path) -> None:
    """Rank 1 gets each job's resolved config: it never runs the sweep itself (FACTS.md)."""
    store, sweep = tmp_path / "runs", tmp_path / "sweep"
    proc = launch(train_cmd("-m", *DDP, "lora.r=2,4", f"store.root={store}", f"hydra.sweep.dir={sweep}",
                            cache=token_cache))
    assert proc.returncode == 0, tail(proc)
    runs = results_under(store)
    assert len(runs) == 2
    for run, result in runs.items():
        assert_ddp_run(run, result["config"]["lora"]["r"])
    assert sorted(r["config"]["lora"]["r"] for r in runs.values()) == [2, 4]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != ".hydra") == ["0", "1"]
    assert [r["status"] for r in read_summary(sweep)] == ["finished", "finished"]
