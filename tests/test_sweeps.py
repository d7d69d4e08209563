"""Sweeps that never lose work (issue 3): resume after a kill, skip finished runs, failure isolation, summary.csv,
named sweeps, one folder per sweep, joblib, DDP inside sweeps, W&B offline.

Every run here is a real `python train.py` subprocess on tiny real GLUE runs, as a researcher would launch it.
"""
from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, needs_glue
from safetensors.torch import load_file
from sweep_helpers import (
    TIMEOUT_S,
    TINY,
    clean_env,
    finished_runs,
    launch,
    read_summary,
    results_under,
    sweep_folders,
    tail,
    train_cmd,
)

from loralab import cli
from loralab.sweep.grid import sweep_values
from loralab.config import CONF_DIR, compose
from loralab.sweep.summary import SUMMARY

pytestmark = needs_glue("rte")

SWEEPS = CONF_DIR / "sweep"  # a link to sweeps/


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


# --- a sweep with one invalid job: shared by the failure, summary, collect and skip tests ---------------------------

@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory: pytest.TempPathFactory, token_cache: Path) -> dict[str, Any]:
    """`-m lora.r=2,0,4`: r=0 is invalid, the other two train."""
    tmp = tmp_path_factory.mktemp("failing_sweep")
    store, sweep = tmp / "runs", tmp / "sweep"
    proc = launch(train_cmd("-m", "lora.r=2,0,4", *TINY, f"store.root={store}", f"hydra.sweep.dir={sweep}",
                            cache=token_cache))
    return {"proc": proc, "store": store, "sweep": sweep, "tmp": tmp}


def test_failed_job_does_not_stop_the_sweep(failing_sweep: dict[str, Any]) -> None:
    proc, sweep = failing_sweep["proc"], failing_sweep["sweep"]
    assert proc.returncode != 0, tail(proc)
    runs = finished_runs(failing_sweep["store"])
    assert sorted(r["config"]["lora"]["r"] for r in runs) == [2, 4], tail(proc)  # one finished run per valid value
    assert all(r["task"] == "rte" and r["global_steps"] == 2 and 0 <= r["main_metric"]["value"] <= 1 for r in runs)
    rows = read_summary(sweep)
    assert sorted(r["status"] for r in rows) == ["failed", "finished", "finished"]
    failed = next(r for r in rows if r["status"] == "failed")
    assert "lora.r" in failed["error"] and failed["lora.r"] == "0"
    # The output names the failure and where the rest went.
    assert "1 job(s) failed" in proc.stdout and "lora.r" in proc.stdout and SUMMARY in proc.stdout, tail(proc)


def test_summary_matches_run_folders(failing_sweep: dict[str, Any]) -> None:
    sweep = failing_sweep["sweep"]
    results = results_under(sweep)
    rows = read_summary(sweep)
    assert len(rows) == len(results) == 3
    for row in rows:
        r = results[Path(row["path"]).resolve()]
        assert row["status"] == r["status"] and row["lora.r"] == str(r["config"]["lora"]["r"])
        if r["status"] == "finished":
            assert float(row["main_value"]) == r["main_metric"]["value"]
            assert 0 <= r["main_metric"]["value"] <= 1
            assert int(row["trainable_params"]) == r["trainable_params"] > 0
        else:
            assert row["main_value"] == ""
    before = (sweep / SUMMARY).read_bytes()
    (sweep / SUMMARY).unlink()
    assert cli.main(["collect", str(sweep)]) == 0
    assert (sweep / SUMMARY).read_bytes() == before


def test_collect_lists_a_killed_run_as_not_finished(failing_sweep: dict[str, Any], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep killed midway: one job linked to a finished run, one whose run still says "running"."""
    finished = next(iter(results_under(failing_sweep["store"])))
    killed_run = tmp_path / "runs" / "rte" / "killed-run"
    killed_run.mkdir(parents=True)
    running = {**json.loads((finished / "results.json").read_text()), "status": "running", "run_id": "killed-run"}
    for key in ("metrics", "main_metric", "history"):
        running.pop(key)
    (killed_run / "results.json").write_text(json.dumps(running))
    sweep = tmp_path / "sweep"
    for job, run in (("0", finished), ("1", killed_run)):
        (sweep / job).mkdir(parents=True)
        (sweep / job / "run").symlink_to(run, target_is_directory=True)

    assert cli.main(["collect", str(sweep)]) == 0
    assert "2 runs (1 finished, 1 not)" in capsys.readouterr().out
    assert {r["run_id"]: r["status"] for r in read_summary(sweep)}["killed-run"] == "running"

    assert cli.main(["collect", str(sweep), "--mark-failed"]) == 0
    assert "failed: killed-run" in capsys.readouterr().out
    row = {r["run_id"]: r for r in read_summary(sweep)}["killed-run"]
    assert row["status"] == "failed" and "killed" in row["error"]
    assert json.loads((killed_run / "results.json").read_text())["status"] == "failed"
    assert json.loads((finished / "results.json").read_text())["status"] == "finished"


def test_finished_sweep_launched_again_trains_nothing(failing_sweep: dict[str, Any], token_cache: Path) -> None:
    store = failing_sweep["store"]
    files = [p for run in results_under(store) for p in (run / "results.json", run / "adapter" /
                                                          "adapter_model.safetensors")]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    values = sorted(r["main_metric"]["value"] for r in finished_runs(store))
    sweep2 = failing_sweep["tmp"] / "sweep_again"
    proc = launch(train_cmd("-m", "lora.r=2,4", *TINY, f"store.root={store}", f"hydra.sweep.dir={sweep2}",
                            cache=token_cache))
    assert proc.returncode == 0, tail(proc)
    assert len(re.findall(r"\bskip .*already finished", proc.stdout)) == 2, tail(proc)
    assert "dev accuracy" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    rows = read_summary(sweep2)
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert sorted(float(r["main_value"]) for r in rows) == values


# --- resume -------------------------------------------------------------------------------------------------------

RESUME = ("task=rte", "data.train_limit=64", "data.batch_size=16", "data.val_limit=32", "trainer.max_epochs=2",
          "optim.lr=2e-3")


@pytest.mark.slow  # by default tests/test_faults.py resumes epoch-end and mid-epoch checkpoints bit for bit
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path, token_cache: Path) -> None:
    """SIGKILL after the first epoch's checkpoint; the relaunch resumes and ends bit-identical to a run never killed."""
    plain = launch(train_cmd(*RESUME, f"store.root={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'out_a'}",
                             cache=token_cache))
    assert plain.returncode == 0, tail(plain)
    (run_a, a), = results_under(tmp_path / "a").items()

    store = tmp_path / "b"
    cmd = train_cmd(*RESUME, f"store.root={store}", f"hydra.run.dir={tmp_path / 'out_b'}", cache=token_cache)
    with open(tmp_path / "killed.log", "w") as log:  # a file, not a pipe: a full pipe would stall the child
        child = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
        ckpt = store / "rte" / run_a.name / "checkpoints" / "last.safetensors"
        deadline = time.monotonic() + TIMEOUT_S
        while not ckpt.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        still_running = child.poll() is None
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert ckpt.exists() and still_running, (tmp_path / "killed.log").read_text()[-3000:]
    run_b = ckpt.parents[1]
    assert json.loads((run_b / "results.json").read_text())["status"] == "running"

    again = launch(train_cmd(*RESUME, f"store.root={store}", f"hydra.run.dir={tmp_path / 'out_b2'}",
                             cache=token_cache))
    assert again.returncode == 0, tail(again)
    assert "resuming" in again.stdout, tail(again)
    b = json.loads((run_b / "results.json").read_text())
    assert b["status"] == "finished" and b["resumed_from"] == str(ckpt)
    assert len(b["history"]) == 2 and b["global_steps"] == a["global_steps"] == 8
    assert b["history"] == a["history"] and b["metrics"] == a["metrics"] and b["best_epoch"] == a["best_epoch"]
    ta, tb = adapter_tensors(run_a), adapter_tensors(run_b)
    assert ta.keys() == tb.keys()
    diff = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    assert diff == 0, f"the resumed adapter differs from the uninterrupted one by up to {diff:.2e}"
    assert any(v.abs().sum() > 0 for k, v in tb.items() if "lora_B" in k)  # B starts at zero: it trained


# --- named sweeps -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,key,count", [("rank", "lora.r", 6), ("alpha", "lora.alpha", 6),
                                            ("alpha_tied", "lora.r", 6), ("quant", "quant", 4),
                                            ("targets", "lora.target_modules", 7), ("targets_budget", "lora", 7),
                                            ("seeds", "seed", 5), ("memory", "memory quant", 7 * 3)])
def test_named_sweep_grid(name: str, key: str, count: int) -> None:
    """`key`: the swept axes, space-separated; `count`: the jobs of their cross product."""
    params = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    assert list(params) == key.split()
    jobs = 1
    for axis in params:
        values = sweep_values(axis, str(params[axis]))
        assert len(values) == len({str(v) for v in values})
        jobs *= len(values)
    assert jobs == count


def test_every_named_sweep_is_listed_here() -> None:
    assert {p.stem for p in SWEEPS.glob("*.yaml")} == {"rank", "alpha", "alpha_tied", "quant", "targets",
                                                       "targets_budget", "seeds", "memory"}


def test_alpha_tied_composes_alpha_twice_r() -> None:
    for r in (4, 64):
        cfg = compose(["+sweep=alpha_tied", f"lora.r={r}"])
        assert cfg.lora.r == r and cfg.lora.alpha == 2 * r


def test_named_sweep_launches_one_job_per_value(tmp_path: Path, token_cache: Path) -> None:
    """`-m +sweep=alpha_tied` really expands to 6 jobs with alpha = 2r; an invalid batch size fails every job
    before any model loads, so nothing trains."""
    sweep = tmp_path / "sweep"
    proc = launch(train_cmd("-m", "+sweep=alpha_tied", "task=mrpc", "data.batch_size=0",
                            f"store.root={tmp_path / 'runs'}", f"hydra.sweep.dir={sweep}", cache=token_cache))
    assert proc.returncode != 0 and "6 job(s) failed" in proc.stdout, tail(proc)
    jobs = sorted(results_under(sweep).values(), key=lambda r: r["config"]["lora"]["r"])
    assert [r["config"]["lora"]["r"] for r in jobs] == [1, 2, 4, 8, 16, 64]
    assert all(r["config"]["lora"]["alpha"] == 2 * r["config"]["lora"]["r"] for r in jobs)
    assert all(r["status"] == "failed" and "data.batch_size" in r["error"] for r in jobs)
    assert not (tmp_path / "runs").exists()


def test_wandb_sweep_file(tmp_path: Path) -> None:
    out = tmp_path / "wandb-rank.yaml"
    assert cli.main(["wandb-sweep", "rank", "task=mrpc", "--out", str(out)]) == 0
    spec = yaml.safe_load(out.read_text())
    assert spec["method"] == "grid" and spec["program"] == "train.py"
    assert spec["parameters"] == {"lora.r": {"values": [1, 2, 4, 8, 16, 64]}}
    assert "task=mrpc" in spec["command"] and "logger=wandb" in spec["command"]


# --- one folder per sweep, launchers --------------------------------------------------------------------------

def test_sweeps_started_together_never_share_a_folder(tmp_path: Path, token_cache: Path) -> None:
    """Two sweeps launched at once with the default sweep dir (multirun/<date>/<time>_<uid>, relative to the cwd).
    Their jobs fail fast (lora.r=0), which still leaves a summary.csv."""
    cmds = [train_cmd("-m", f"lora.r=0,{bad}", "task=rte", f"store.root={tmp_path / 'runs'}", cache=token_cache)
            for bad in (-1, -2)]
    procs = [subprocess.Popen(c, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]
    outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs), outs
    folders = sweep_folders(tmp_path)
    assert len(folders) == 2, (folders, outs)
    assert all(re.fullmatch(r"\d{2}-\d{2}-\d{2}_[0-9a-f]{6}", f.name) for f in folders)
    # Start-up time varies, so the two may or may not share a second; their random suffixes always differ.
    assert len({f.name.split("_")[1] for f in folders}) == 2
    bads = []
    for f in folders:
        rows = read_summary(f)
        assert [r["status"] for r in rows] == ["failed", "failed"]
        bads.append(sorted(int(r["lora.r"]) for r in rows))
    assert sorted(bads) == [[-2, 0], [-1, 0]]


# --- W&B offline ------------------------------------------------------------------------------------------------

FAKE_KEY = "loralab-test-secret-" + "0123456789abcdef" * 2


def leet_records(offline_run: Path) -> list[dict[str, Any]]:
    """Read an offline run back from disk without a server (wandb 0.31: `wandb leet inspect --json`)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline_run)],
                         capture_output=True, text=True, timeout=300, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_wandb_offline_run_reads_back_and_keeps_the_key_out(tmp_path: Path, token_cache: Path) -> None:
    """Offline W&B with a (fake) key in the environment: the run is readable from disk, the key is written nowhere."""
    store, out = tmp_path / "runs", tmp_path / "out"
    env = clean_env(WANDB_MODE="offline", WANDB_API_KEY=FAKE_KEY, NETRC=str(tmp_path / "no-netrc"),
                    WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
                    WANDB_DATA_DIR=str(tmp_path / "wandb-data"))
    proc = launch(train_cmd(*TINY, "lora.r=4", "logger=wandb", "trainer.log_every_n_steps=1",
                            f"store.root={store}", f"hydra.run.dir={out}", cache=token_cache), env=env)
    assert proc.returncode == 0, tail(proc)
    (run, result), = results_under(store).items()
    (offline,) = (run / "wandb").glob("offline-run-*")
    records = leet_records(offline)
    config = {k: v for rec in records if rec["type"] == "run" for k, v in rec["run"]["config"]["update"].items()}
    history = [rec["history"]["item"] for rec in records if rec["type"] == "history"]
    summary = {k: v for rec in records if rec["type"] == "summary" for k, v in rec["summary"]["update"].items()}
    assert config["lora.r"] == 4 and config["task.name"] == "rte"
    assert any(math.isfinite(h["train/loss"]) for h in history if "train/loss" in h), history
    assert summary["main_metric.name"] == "accuracy"
    assert summary["main_metric.value"] == result["main_metric"]["value"]
    leaks = [p for p in [*run.rglob("*"), *out.rglob("*")] if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks and FAKE_KEY not in proc.stdout


def test_a_run_held_by_a_live_process_is_not_trained_twice(tmp_path):
    """An orphaned parallel worker still training a run must not share it with a relaunch; a dead one releases it."""
    import subprocess
    import sys

    from loralab.store import RunBusy, run_lock

    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from loralab.store import run_lock\n"
        f"with run_lock(Path({str(folder)!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy, match="another live process"):
            with run_lock(folder):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(folder):  # the killed holder's lock is gone
        pass
