"""Analysis to W&B (issue 5): a sweep launched with logger=wandb ends with a job_type=analysis run in the sweep's group
holding summary.csv as a wandb.Table and the metric-vs-rank / vs-params plots as wandb.Image; `loralab table` and
`loralab similarity` do the same with --wandb. All offline, read back from disk with `wandb leet inspect --json`, with
a (fake) API key in the environment that must not be written anywhere."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, needs_glue
from omegaconf import OmegaConf
from sweep_helpers import TINY, clean_env, launch, read_summary, tail, train_cmd

from loralab.analysis.wandb_log import after_sweep

FAKE_KEY = "loralab-analysis-secret-" + "fedcba9876543210" * 2


def leet_records(offline_run: Path) -> list[dict[str, Any]]:
    """Every record of an offline run, read from disk without a server (wandb 0.31: `wandb leet inspect --json`)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline_run)],
                         capture_output=True, text=True, timeout=300, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def analysis_run(folder: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(run record, logged history item, offline run folder) of the single W&B run under folder/wandb/."""
    (offline,) = (folder / "wandb").glob("offline-run-*")
    records = leet_records(offline)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    history = {k: v for r in records if r["type"] == "history" for k, v in r["history"]["item"].items()}
    return run, history, offline


def logged(history: dict[str, Any], kind: str) -> dict[str, Path]:
    """Keys logged as `kind` ("table-file" for wandb.Table, "image-file" for wandb.Image) -> their path in the run."""
    return {k.removesuffix("._type"): Path(history[k.removesuffix("._type") + ".path"])
            for k, v in history.items() if k.endswith("._type") and v == kind}


def table_rows(offline: Path, rel: Path) -> tuple[list[str], list[list[Any]]]:
    data = json.loads((offline / "files" / rel).read_text())
    return data["columns"], data["data"]


@pytest.fixture(scope="module")
def wandb_sweep(tmp_path_factory: pytest.TempPathFactory, token_cache: Path) -> dict[str, Any]:
    """`python train.py -m lora.r=2,4 logger=wandb` (tiny RTE runs), offline with a fake key in the environment."""
    tmp = tmp_path_factory.mktemp("wandb_sweep")
    env = clean_env(WANDB_MODE="offline", WANDB_API_KEY=FAKE_KEY, NETRC=str(tmp / "no-netrc"),
                    WANDB_CONFIG_DIR=str(tmp / "wandb-config"), WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
                    WANDB_DATA_DIR=str(tmp / "wandb-data"))
    store, sweep = tmp / "runs", tmp / "sweep"
    proc = launch(train_cmd("-m", "lora.r=2,4", "logger=wandb", *TINY, f"store.root={store}",
                            f"hydra.sweep.dir={sweep}", cache=token_cache), env=env)
    return {"proc": proc, "tmp": tmp, "store": store, "sweep": sweep, "env": env, "outputs": [proc.stdout]}


def cli(fixture: dict[str, Any], *args: str) -> subprocess.CompletedProcess:
    loralab = Path(sys.executable).with_name("loralab")  # the installed command
    proc = subprocess.run([str(loralab), *args], cwd=fixture["tmp"], env=fixture["env"],
                          capture_output=True, text=True, timeout=600, check=False)
    fixture["outputs"] += [proc.stdout, proc.stderr]
    return proc


@needs_glue("rte")
def test_sweep_logs_summary_table_and_plots_in_its_group(wandb_sweep: dict[str, Any]) -> None:
    proc, sweep = wandb_sweep["proc"], wandb_sweep["sweep"]
    assert proc.returncode == 0, tail(proc)
    run, history, offline = analysis_run(sweep)
    assert run["job_type"] == "analysis" and run["run_group"] == sweep.name
    tables, images = logged(history, "table-file"), logged(history, "image-file")
    assert set(tables) == {"sweep/summary"}
    assert {"sweep/metric_vs_rank", "sweep/metric_vs_params"} <= set(images)
    assert all((offline / "files" / p).is_file() for p in [*tables.values(), *images.values()])
    columns, rows = table_rows(offline, tables["sweep/summary"])
    summary = read_summary(sweep)
    assert len(rows) == len(summary) == 2 and columns == list(summary[0])
    assert sorted(row[columns.index("lora.r")] for row in rows) == [2, 4]
    # The training runs of the sweep are in the same W&B group.
    for job in ("0", "1"):
        train_run, _, _ = analysis_run((sweep / job / "run").resolve())
        assert train_run["run_group"] == sweep.name and train_run["job_type"] == "train"


@needs_glue("rte")
def test_table_and_similarity_log_to_wandb(wandb_sweep: dict[str, Any]) -> None:
    assert wandb_sweep["proc"].returncode == 0, tail(wandb_sweep["proc"])
    tmp, sweep = wandb_sweep["tmp"], wandb_sweep["sweep"]
    proc = cli(wandb_sweep, "table", str(sweep), "--plots", "--out", str(tmp / "table" / "t"), "--wandb")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("| lora.target_modules")  # W&B's messages stay off stdout
    run, history, offline = analysis_run(tmp / "table")
    assert run["job_type"] == "analysis" and run["run_group"] == sweep.name  # default group: the sweep's
    tables, images = logged(history, "table-file"), logged(history, "image-file")
    assert set(tables) == {"table/table", "table/table_tidy"}
    assert {"table/metric_vs_rank", "table/metric_vs_params"} <= set(images)
    columns, rows = table_rows(offline, tables["table/table"])
    assert columns[0] == "lora.target_modules" and len(rows) == 1

    r2, r4 = sorted((sweep / job / "run").resolve() for job in ("0", "1"))
    proc = cli(wandb_sweep, "similarity", str(r2), str(r4), "--module", "query", "--out", str(tmp / "sim"),
               "--wandb", "--wandb-group", "phi-check")
    assert proc.returncode == 0, proc.stderr
    run, history, offline = analysis_run(tmp / "sim")
    assert run["job_type"] == "analysis" and run["run_group"] == "phi-check"
    tables, images = logged(history, "table-file"), logged(history, "image-file")
    assert set(tables) == {"similarity/summary"} and set(images) == {"similarity/similarity_attention_self_query"}
    columns, rows = table_rows(offline, tables["similarity/summary"])
    assert len(rows) == 6 and {"layer", "module", "phi_1_1", "random_mean"} <= set(columns)  # one row per layer


@needs_glue("rte")
def test_the_api_key_is_written_nowhere(wandb_sweep: dict[str, Any]) -> None:
    """Runs after the tests above in file order; also checks what they wrote (tables, heatmaps, their W&B runs)."""
    tmp = wandb_sweep["tmp"]
    assert list(tmp.rglob("offline-run-*")), "no W&B run was written"
    leaks = [p for p in tmp.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks
    assert not [out for out in wandb_sweep["outputs"] if FAKE_KEY in out]


def test_no_wandb_run_unless_the_sweep_used_the_wandb_logger(tmp_path: Path) -> None:
    (tmp_path / "summary.csv").write_text("run_id,status\nx,finished\n")
    after_sweep(tmp_path, OmegaConf.create({"logger": {"wandb": False}}))
    assert not (tmp_path / "wandb").exists()


def test_a_wandb_problem_never_fails_the_sweep(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's runs are recorded before the hook runs: a W&B failure is a warning, not a failed sweep."""
    import loralab.analysis.wandb_log

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(loralab.analysis.wandb_log, "log_sweep_summary", broken)
    after_sweep(tmp_path, OmegaConf.create({"logger": {"wandb": True, "project": "p", "entity": None, "mode": None}}))
    assert "W&B is down" in caplog.text and "summary was not logged" in caplog.text


def test_the_sweeper_calls_the_hook() -> None:
    """The hook is one call in loralab's sweeper, after summary.csv is written (kept small: others edit the sweeper)."""
    source = (REPO / "src" / "hydra_plugins" / "loralab_sweeper" / "loralab_sweeper.py").read_text()
    assert source.index("write_summary(sweep_dir") < source.index("after_sweep(sweep_dir, self.config)")
