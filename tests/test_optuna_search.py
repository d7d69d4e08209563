"""Optuna hyperparameter search (issue 10): `python train.py -m hparams_search=lora_lr_dropout`.

Two workers (two processes started together) share one study through a sqlite storage; a relaunch adds trials to the
same study; a failed trial is recorded and the search goes on; the best trial's score, parameters and run are written
beside each worker's jobs. Every trial is a tiny real run (MiniLM + LoRA on 64 RTE pairs).
"""
from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, needs_glue
from sweep_helpers import TIMEOUT_S, TINY, clean_env, launch, read_summary, tail, train_cmd

optuna = pytest.importorskip("optuna", reason="the search extra is not installed (pip install -e '.[search]')")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

pytestmark = needs_glue("rte")
STUDY = "lora_lr_dropout_rte_minilm"  # the default study name: lora_lr_dropout_<task>_<model>


def search_cmd(store: Path, sweep: Path, n_trials: int, cache: Path, *extra: str) -> list[str]:
    return train_cmd("-m", "hparams_search=lora_lr_dropout", f"hydra.sweeper.n_trials={n_trials}", *TINY,
                     f"store.root={store}", f"hydra.sweep.dir={sweep}", *extra, cache=cache)


def study(store: Path) -> Any:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{store / 'optuna.db'}")


def states(store: Path) -> list[str]:
    return sorted(t.state.name for t in study(store).trials)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, token_cache: Path) -> dict[str, Any]:
    """Two processes started together, one trial each, one study in <store>/optuna.db (the default storage)."""
    tmp = tmp_path_factory.mktemp("optuna")
    store = tmp / "runs"
    sweeps = [tmp / "worker0", tmp / "worker1"]
    start = time.monotonic()
    procs = []
    for sweep in sweeps:
        log = open(tmp / f"{sweep.name}.log", "w")
        procs.append((subprocess.Popen(search_cmd(store, sweep, 1, token_cache), cwd=tmp, env=clean_env(),
                                       stdout=log, stderr=subprocess.STDOUT, text=True), log))
    outputs = []
    for proc, log in procs:
        try:
            proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        outputs.append(Path(log.name).read_text())
    wall = time.monotonic() - start
    print(f"\n[optuna] two workers x 1 trial: {wall:.1f} s")
    return {"tmp": tmp, "store": store, "sweeps": sweeps, "procs": [p for p, _ in procs], "outputs": outputs,
            "cache": token_cache, "wall_s": wall}


def test_two_workers_share_one_study(two_workers: dict[str, Any]) -> None:
    w = two_workers
    for proc, out in zip(w["procs"], w["outputs"]):
        assert proc.returncode == 0, out[-3000:]
    assert states(w["store"]) == ["COMPLETE"] * 2
    trials = study(w["store"]).trials
    assert len({(t.params["optim.lr"], t.params["lora.dropout"]) for t in trials}) == 2  # the workers did not repeat
    for t in trials:
        assert 1e-5 <= t.params["optim.lr"] <= 3e-3 and 0.0 <= t.params["lora.dropout"] <= 0.3
        assert t.params["lora.r"] in (4, 8, 16)
    # Each trial is a run in the store whose main metric is the value Optuna was told.
    for sweep in w["sweeps"]:
        rows = read_summary(sweep)
        assert len(rows) == 1 and all(r["status"] == "finished" for r in rows), rows
        by_number = {t.number: t for t in trials}
        for row in rows:
            trial = by_number[int(row["trial"])]
            assert float(row["main_value"]) == pytest.approx(trial.value)
            config = json.loads((Path(row["path"]) / "results.json").read_text())["config"]
            assert config["optim"]["lr"] == pytest.approx(trial.params["optim.lr"])
            assert config["lora"]["dropout"] == pytest.approx(trial.params["lora.dropout"])
            assert config["lora"]["r"] == trial.params["lora.r"]


def test_best_trial_lands_in_the_sweep_record(two_workers: dict[str, Any]) -> None:
    w = two_workers
    trials = {t.number: t for t in study(w["store"]).trials}
    for sweep in w["sweeps"]:
        # The study's best when this worker ended (the other worker may have finished trials later).
        record = json.loads((sweep / "best_trial.json").read_text())
        assert record["study_name"] == STUDY and record["directions"] == ["MAXIMIZE"]
        b = record["best"]
        assert trials[b["trial"]].state.name == "COMPLETE" and trials[b["trial"]].value == pytest.approx(b["value"])
        assert b["params"] == trials[b["trial"]].params
        run = json.loads((Path(b["path"]) / "results.json").read_text())
        assert run["status"] == "finished" and run["main_metric"]["value"] == pytest.approx(b["value"])
        assert run["config"]["optim"]["lr"] == pytest.approx(b["params"]["optim.lr"])
        assert b["config"]["lora"]["r"] == b["params"]["lora.r"]
        listed = read_csv(sweep / "trials.csv")
        assert [r["best"] for r in listed if int(r["trial"]) == b["trial"]] == ["True"]
        assert (sweep / "optimization_results.yaml").is_file()  # hydra-optuna-sweeper's own record
        # The best trial's row in summary.csv, when this worker ran it.
        rows = {r["trial"]: r for r in read_summary(sweep)}
        if str(b["trial"]) in rows:
            assert rows[str(b["trial"])]["best"] == "True"


def test_relaunch_resumes_the_study_and_a_failed_trial_does_not_stop_it(two_workers: dict[str, Any]) -> None:
    w = two_workers
    best_before = study(w["store"]).best_trial
    # The same search again, one more trial: the study grows from 2 to 3 trials (not a new study).
    sweep = w["tmp"] / "relaunch"
    start = time.monotonic()
    proc = launch(search_cmd(w["store"], sweep, 1, w["cache"]), cwd=w["tmp"])
    print(f"\n[optuna] relaunch, 1 trial: {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, tail(proc)
    assert states(w["store"]) == ["COMPLETE"] * 3
    record = json.loads((sweep / "best_trial.json").read_text())
    assert record["trials"]["COMPLETE"] == 3 and len(read_csv(sweep / "trials.csv")) == 3
    assert record["best"]["value"] == pytest.approx(study(w["store"]).best_value)
    assert record["best"]["value"] >= best_before.value

    # A trial that fails (a module the model does not have) is told to Optuna as failed; the search ends normally.
    sweep = w["tmp"] / "failing"
    proc = launch(search_cmd(w["store"], sweep, 1, w["cache"], "lora.target_modules=[nope]"), cwd=w["tmp"])
    assert proc.returncode == 0, tail(proc)
    assert states(w["store"]) == ["COMPLETE"] * 3 + ["FAIL"]
    rows = read_summary(sweep)
    assert [r["status"] for r in rows] == ["failed"] and "nope" in rows[0]["error"], rows
    record = json.loads((sweep / "best_trial.json").read_text())
    assert record["trials"] == {"COMPLETE": 3, "FAIL": 1, "RUNNING": 0}
    assert record["best"]["value"] == pytest.approx(study(w["store"]).best_value)


def test_search_config_composes_with_optuna_and_plain_sweeps_keep_loralab() -> None:
    from hydra import compose, initialize_config_dir

    from loralab.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        search = compose("config", overrides=["hparams_search=lora_lr_dropout"], return_hydra_config=True)
        plain = compose("config", return_hydra_config=True)
    assert search.hydra.sweeper._target_.endswith("LoralabOptunaSweeper")
    assert search.hydra.sweeper.direction == "maximize" and search.hydra.sweeper.max_failure_rate == 1.0
    assert search.hydra.sweeper.storage.startswith("sqlite:///") and search.hydra.sweeper.storage.endswith("optuna.db")
    assert plain.hydra.sweeper._target_.endswith("LoralabSweeper")
    assert REPO.joinpath("conf", "hparams_search", "lora_lr_dropout.yaml").is_file()
