"""Sweeps on a real SLURM cluster (issue 10): `hydra/launcher=slurm` submits a job array with `sbatch`; a job the
cluster loses (killed while training, cancelled with `scancel`) is recorded as failed with SLURM's reason while the
others finish; launching the same sweep again trains only what is missing.

The one-node cluster comes from ../shared/slurm/slurm-up.sh (beside the repository; root only: it installs and
starts munge, MariaDB, slurmdbd, slurmctld and slurmd). Every job is a tiny real run: MiniLM + LoRA on 64 RTE pairs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, needs_glue
from sweep_helpers import TIMEOUT_S, TINY, clean_env, read_summary, train_cmd

SLURM_DIR = REPO.parent / "shared" / "slurm"
pytestmark = needs_glue("rte")


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30, check=False)
    return proc.returncode == 0 and proc.stdout.strip() in ("idle", "mix", "alloc")


@pytest.fixture(scope="session")
def slurm_cluster():
    """Bring the cluster up for the session and down at its end (left alone if it was already up)."""
    up, down = SLURM_DIR / "slurm-up.sh", SLURM_DIR / "slurm-down.sh"
    if os.geteuid() != 0:
        pytest.skip("bringing up SLURM needs root")
    if not up.is_file():
        pytest.skip(f"no SLURM bring-up script at {up}")
    was_up = _cluster_up()
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(up)], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.skip(f"SLURM bring-up failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
    print(f"\n[slurm] bring-up {time.perf_counter() - start:.1f} s (already up: {was_up})")
    yield
    if not was_up:
        subprocess.run(["bash", str(down)], capture_output=True, timeout=120, check=False)


def _array_id(sweep: Path, deadline: float, proc: subprocess.Popen) -> str:
    """The SLURM array's id, from submitit's folder for job 0 (`.submitit/<array>_0`); fails at once when the sweep
    process ended without submitting."""
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((sweep / ".submitit").glob("*_0"))
        if found:
            return found[0].name.rsplit("_", 1)[0]
        time.sleep(0.2)
    raise AssertionError(f"the sweep submitted no job array (sweep process exit code: {proc.poll()})")


def _state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def _run_status(store: Path, seed: int) -> str | None:
    for p in store.glob("rte/*/results.json"):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if r.get("seed") == seed:
            return r.get("status")
    return None


def _kill_job_processes(job: str) -> list[int]:
    """SIGKILL the job's task processes (step 0), as the out-of-memory killer would."""
    raw = subprocess.run(["squeue", "-h", "-j", job, "-o", "%A"], capture_output=True, text=True, check=True)
    out = subprocess.run(["scontrol", "listpids", raw.stdout.strip()], capture_output=True, text=True,
                         check=True).stdout  # listpids wants the element's own job id, not array_task
    pids = [int(f[0]) for f in (line.split() for line in out.splitlines()[1:]) if len(f) >= 3 and f[2] == "0"]
    for pid in pids:
        os.kill(pid, 9)
    return pids


def _wait(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return log.read_text()


@pytest.fixture(scope="module")
def lost_jobs_sweep(slurm_cluster, tmp_path_factory: pytest.TempPathFactory, token_cache: Path) -> dict[str, Any]:
    """`-m seed=0,1,2` through sbatch, two jobs at a time: job 2 is cancelled (`scancel`) while it waits for a core,
    job 0 is killed (SIGKILL, as the out-of-memory killer does) once its run is training, job 1 finishes."""
    tmp = tmp_path_factory.mktemp("slurm")
    store, sweep = tmp / "runs", tmp / "sweep"
    cores = os.cpu_count() or 1
    cpus = max(1, cores // 2)  # SLURM counts cores (CR_Core): two jobs at once, the third pending
    if cores // cpus != 2:
        pytest.skip(f"{cores} cores cannot run exactly two of these jobs at once")
    cmd = train_cmd("-m", "seed=0,1,2", *TINY, "hydra/launcher=slurm", "hydra.launcher.partition=debug",
                    "hydra.launcher.timeout_min=5", "hydra.launcher.signal_delay_s=30",
                    f"hydra.launcher.cpus_per_task={cpus}", "hydra.launcher.mem_gb=4",
                    f"store.root={store}", f"hydra.sweep.dir={sweep}", cache=token_cache)
    log = tmp / "sweep.log"
    start = time.monotonic()
    deadline = start + TIMEOUT_S
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=clean_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
    array = None
    try:
        array = _array_id(sweep, deadline, proc)
        submitted = time.monotonic() - start
        # Job 0 running, job 2 waiting for a core: cancel it. (Job 1 usually runs beside job 0, but a slurmctld
        # that has just restarted may start the array's elements one at a time: seen once in ~10 suites.)
        while [_state(f"{array}_{i}") for i in (0, 2)] != ["RUNNING", "PENDING"]:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        subprocess.run(["scancel", f"{array}_2"], check=True)
        while (status := _run_status(store, seed=0)) != "running":
            assert status is None, f"job 0's run ended ({status}) before it could be killed"
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        killed_pids = _kill_job_processes(f"{array}_0")
        killed_at = time.monotonic() - start
        output = _wait(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            if array is not None:
                subprocess.run(["scancel", array], check=False)
    wall = time.monotonic() - start
    print(f"\n[slurm] sweep with a lost job: submitted after {submitted:.1f} s, job 0 killed at {killed_at:.1f} s, "
          f"sweep over after {wall:.1f} s")
    return {"proc": proc, "output": output, "cmd": cmd, "tmp": tmp, "store": store, "sweep": sweep,
            "array": array, "killed_pids": killed_pids, "wall_s": wall}


def _rows_by_seed(sweep: Path) -> dict[str, dict[str, str]]:
    return {r["seed"]: r for r in read_summary(sweep)}


def test_lost_jobs_are_recorded_as_failed_while_the_others_finish(lost_jobs_sweep: dict[str, Any]) -> None:
    s = lost_jobs_sweep
    out = s["output"]
    assert s["killed_pids"], "no process of job 0 was found to kill"
    assert s["proc"].returncode != 0, out[-3000:]  # the sweep names its failures
    assert "2 job(s) failed" in out and "summary.csv" in out, out[-3000:]
    rows = _rows_by_seed(s["sweep"])
    assert sorted(rows) == ["0", "1", "2"], rows
    assert rows["1"]["status"] == "finished" and float(rows["1"]["main_value"]) >= 0
    # Each lost job is a failed run with SLURM's reason. A SIGKILLed step usually leaves the element FAILED, but
    # slurmctld sometimes records it as "CANCELLED by 0" (seen once in CI): either is SLURM's own word for it.
    assert rows["0"]["status"] == "failed", rows["0"]
    assert re.search(r"state: (FAILED|CANCELLED)", rows["0"]["error"]), rows["0"]
    # scancel'd while pending: CANCELLED in sacct, or no record at all when SLURM had not split it off the array yet
    assert rows["2"]["status"] == "failed", rows["2"]
    assert "state: CANCELLED" in rows["2"]["error"] or "cancelled before it started" in rows["2"]["error"], rows["2"]
    assert f"{s['array']}_0" in rows["0"]["error"] and f"{s['array']}_2" in rows["2"]["error"]
    # Recorded where the job itself would have written: the run store, linked from the job folder.
    for job, seed in (("0", 0), ("2", 2)):
        r = json.loads((s["sweep"] / job / "run" / "results.json").read_text())
        assert r["status"] == "failed" and r["seed"] == seed and r["error"].startswith("JobLost:")
        assert (s["sweep"] / job / "run").resolve().parent == (s["store"] / "rte").resolve()


def test_relaunch_trains_only_the_lost_jobs(lost_jobs_sweep: dict[str, Any]) -> None:
    s = lost_jobs_sweep
    done = s["sweep"] / "1" / "run"
    stamp = {p: p.stat().st_mtime_ns for p in (done / "results.json", done / "adapter" / "adapter_model.safetensors")}
    start = time.monotonic()
    proc = subprocess.run(s["cmd"], cwd=s["tmp"], env=clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S, check=False)
    print(f"\n[slurm] relaunch (1 skipped, 2 trained) {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = _rows_by_seed(s["sweep"])
    assert sorted(rows) == ["0", "1", "2"] and all(r["status"] == "finished" for r in rows.values()), rows
    assert all(r["error"] == "" for r in rows.values())
    for job in ("0", "1", "2"):
        r = json.loads((s["sweep"] / job / "run" / "results.json").read_text())
        assert r["status"] == "finished" and r["main_metric"]["value"] is not None
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # the finished run was not trained again
    # It went through SLURM again: a second array whose job 1 skipped and whose jobs 0 and 2 trained.
    arrays = {p.name.split("_")[0] for p in (s["sweep"] / ".submitit").glob("[0-9]*_[0-9]*")} - {s["array"]}
    assert len(arrays) == 1, arrays
    logs = {j: "".join(p.read_text() for p in (s["sweep"] / ".submitit").glob(f"{a}_{j}/*_log.*"))
            for a in arrays for j in ("0", "1", "2")}
    assert "already finished" in logs["1"] and "dev accuracy" not in logs["1"]
    assert "dev accuracy" in logs["0"] and "dev accuracy" in logs["2"]


# --- a time limit shorter than the run ---------------------------------------------------------------------------

# SLURM checks time limits every 30 s and sends the warning up to 30 s early: with a 2-minute limit and a 60 s
# signal_delay_s it comes 30-60 s into each job (with a 1-minute limit it came 8 s in, during Python's start-up, before
# anything handles it). The run trains 160 steps in fp32 on one thread (~100 s on a Xeon with AMX, ~180 s on a CPU
# without; fp32 because bf16, where the CPU has it natively, would end the run before the warning), so at least one
# warning falls mid-training. One thread for the cluster job and the local reference alike: the same arithmetic, so
# the two can be compared bit for bit.
LONG = ("task=rte", "data.train_limit=1280", "data.batch_size=16", "data.val_limit=64", "trainer.max_epochs=2",
        "optim.lr=1e-3", "trainer.precision=32-true")
STEPS_PER_EPOCH = 80


def _release_requeued(requeued: set[str]) -> None:
    """SLURM holds a requeued batch job for ~2 minutes (Reason=BeginTime); start it now, as an admin could, to keep
    the test short. The job still goes through SLURM's requeue and a fresh start."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %r"], capture_output=True, text=True, check=False).stdout
    for job, reason in (line.split(maxsplit=1) for line in out.splitlines() if line.strip()):
        if reason.strip() == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, check=False)
            requeued.add(job)


def test_time_limit_requeues_the_job_which_resumes_mid_epoch_and_ends_as_if_never_stopped(
        slurm_cluster, tmp_path: Path, token_cache: Path) -> None:
    """timeout_min=2: SLURM warns the job (SIGUSR2, signal_delay_s=60 before the limit), the run writes a mid-epoch
    checkpoint, submitit requeues the job, and the requeued job resumes there; the run's history and adapter equal
    those of the same run trained without a limit (here, at the same time, on the other core)."""
    from safetensors.torch import load_file

    env = clean_env(OMP_NUM_THREADS="1")
    cmd = train_cmd("-m", "seed=0", *LONG, "hydra/launcher=slurm", "hydra.launcher.partition=debug",
                    "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=60",
                    "hydra.launcher.max_num_timeout=30", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4",
                    f"store.root={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cache=token_cache)
    start = time.monotonic()
    with open(tmp_path / "sweep.log", "w") as out, open(tmp_path / "plain.log", "w") as plain_out:
        sweep = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        plain = subprocess.Popen(train_cmd(*LONG, f"store.root={tmp_path / 'plain'}",
                                           f"hydra.run.dir={tmp_path / 'plain_out'}", cache=token_cache),
                                 cwd=tmp_path, env=env, stdout=plain_out, stderr=subprocess.STDOUT, text=True)
        requeued: set[str] = set()
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while sweep.poll() is None and time.monotonic() < deadline:
                _release_requeued(requeued)
                time.sleep(1)
            assert plain.wait(timeout=TIMEOUT_S) == 0, (tmp_path / "plain.log").read_text()[-3000:]
            output = _wait(sweep, tmp_path / "sweep.log")
        finally:
            for proc in (sweep, plain):
                if proc.poll() is None:
                    proc.kill()
    wall = time.monotonic() - start
    assert sweep.returncode == 0, output[-3000:]
    (run,) = [p.parent for p in (tmp_path / "runs").rglob("results.json")]
    (ref,) = [p.parent for p in (tmp_path / "plain").rglob("results.json")]
    got, want = (json.loads((f / "results.json").read_text()) for f in (run, ref))
    stops = got["interruptions"]
    print(f"\n[slurm] 2-minute time limit: {len(stops)} requeue(s) at steps {[i['step'] for i in stops]}, "
          f"{got['global_steps']} steps, {wall:.0f} s")
    assert got["status"] == "finished" and len(stops) >= 1, got.get("error")
    assert all(i["signal"] == "SIGUSR2" for i in stops), stops  # SLURM's warning, as submitit asks for it
    assert any(0 < i["batch"] < STEPS_PER_EPOCH for i in stops), stops  # at least one stop fell mid-epoch
    assert got["resumed_from"] is not None
    assert got["history"] == want["history"] and got["global_steps"] == want["global_steps"] == 2 * STEPS_PER_EPOCH
    a, b = (load_file(str(f / "adapter" / "adapter_model.safetensors")) for f in (ref, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert requeued, "SLURM never held a requeued job"  # submitit's `scontrol requeue` (its log is truncated then)


# --- no cluster needed ------------------------------------------------------------------------------------------------

class _FakeJob:
    job_id = "7_2"
    state = "UNKNOWN"  # sacct has no record of it

    def __init__(self, done_after: int | None = None) -> None:
        self.calls, self.done_after = 0, done_after

    def done(self) -> bool:
        self.calls += 1
        return self.done_after is not None and self.calls > self.done_after


def test_a_job_slurm_keeps_no_record_of_is_given_up_not_awaited_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    """An array element cancelled before SLURM split it off the array never appears in sacct, and submitit would wait
    for it forever (seen with SLURM 22.05); so would it for a killed job on a cluster without accounting."""
    from hydra_plugins.loralab_sweeper import submitit_launchers as sl

    monkeypatch.setattr(sl, "VANISH_S", 0)
    monkeypatch.setattr(sl, "SQUEUE_EVERY_S", 0)
    monkeypatch.setattr(sl.time, "sleep", lambda s: None)
    answers = iter(["PENDING", None, None])
    monkeypatch.setattr(sl, "squeue_state", lambda job_id: next(answers))
    with pytest.raises(sl.JobVanished, match="not known to sacct or squeue"):
        sl.wait_slurm_job(_FakeJob())

    monkeypatch.setattr(sl, "squeue_state", lambda job_id: "RUNNING")  # live in the queue: keep waiting
    job = _FakeJob(done_after=5)
    sl.wait_slurm_job(job)
    assert job.calls == 6
