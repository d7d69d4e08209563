"""Real training: pretrained MiniLM + LoRA on real GLUE, kept short; tests share each run."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import GLUE_DIR, Compose, needs_glue
from safetensors.torch import load_file

import loralab.run.train
from loralab.config import Config
from loralab.run.data import local_split_file
from loralab.run.weights import load_tokenizer, resolve_model_path
from loralab.store import read_results, run_dir

pytestmark = needs_glue("sst2", "stsb", "cola", "rte")

# SST-2, not MRPC: short MRPC runs (600-1200 examples, 2 epochs, lr 1e-3/2e-3, seeds 0 and 1) all ended at
# 0.696-0.708 dev accuracy against a 0.684 majority class, too thin a margin for a test. This SST-2 run scored
# 0.731 / 0.714 / 0.721 (seeds 0, 1, 2) against 0.509, in ~40 s on 2 shared cores.
BINARY = ["task=sst2", "data.train_limit=400", "trainer.max_epochs=2", "optim.lr=1e-3", "data.batch_size=16"]
STSB = ["task=stsb", "data.train_limit=320", "trainer.max_epochs=2", "data.val_limit=300", "optim.lr=1e-3"]
COLA = ["task=cola", "data.train_limit=320", "trainer.max_epochs=1", "data.val_limit=300"]
# The results.json fields of issue 2.
FIELDS = ("status", "task", "model", "seed", "metrics", "main_metric", "best_epoch", "history",
          "trainable_params", "total_params", "adapter_bytes", "train_time_s", "train_samples_per_s",
          "peak_memory_mb", "precision",
          "config", "versions", "git_commit")


def majority_baseline(task: str) -> float:
    labels = pd.read_parquet(local_split_file(GLUE_DIR, task, "validation"))["label"]
    return float(labels.value_counts(normalize=True).max())


def probe_batch(cfg: Config) -> dict[str, torch.Tensor]:
    """A fixed batch of real dev pairs, padded, to compare logits on."""
    frame = pd.read_parquet(local_split_file(GLUE_DIR, cfg.task.name, "validation")).head(6)
    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model.path))
    columns = [list(frame[f]) for f in cfg.task.text_fields]
    enc = tok(*columns, padding=True, truncation=True, max_length=cfg.data.max_length, return_tensors="pt")
    return dict(enc)


def train_once(cfg: Config) -> tuple[float, Path, dict[str, Any]]:
    value = loralab.run.train.run(cfg)
    folder = run_dir(cfg)
    results = read_results(folder)
    assert results is not None and results["status"] == "finished"
    return value, folder, results


def assert_metric_range(results: dict[str, Any], keys: list[str]) -> None:
    for where in ("best", "final"):
        for k in keys:
            v = results["metrics"][where][k]
            assert isinstance(v, float) and math.isfinite(v) and -1 <= v <= 1, (where, k, v)
    for record in results["history"]:
        assert all(-1 <= record[k] <= 1 for k in keys)


@pytest.fixture(scope="module")
def binary(compose_cfg: Compose) -> dict[str, Any]:
    """The LoRA run on a binary task; the trained in-memory model's probe logits are captured at save time."""
    cfg = compose_cfg(BINARY)
    batch = probe_batch(cfg)
    captured: dict[str, torch.Tensor] = {}
    save = loralab.run.train.save_trained

    def capturing_save(model, cfg_, out):
        model.eval()
        with torch.no_grad():
            captured["logits"] = model(**batch).logits.detach().clone()
        return save(model, cfg_, out)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loralab.run.train, "save_trained", capturing_save)
        value, folder, results = train_once(cfg)
    return {"cfg": cfg, "value": value, "folder": folder, "results": results, "batch": batch, **captured}


@pytest.fixture(scope="module")
def stsb(compose_cfg: Compose) -> dict[str, Any]:
    cfg = compose_cfg(STSB)
    value, folder, results = train_once(cfg)
    return {"cfg": cfg, "value": value, "folder": folder, "results": results}


def test_lora_beats_the_majority_class(binary: dict[str, Any]) -> None:
    results, baseline = binary["results"], majority_baseline("sst2")
    assert binary["cfg"].data.val_limit is None  # the full dev split
    assert len(results["history"]) == 2  # scored after every epoch
    assert results["main_metric"]["name"] == "accuracy"
    assert results["main_metric"]["value"] == binary["value"] > baseline + 0.05, (binary["value"], baseline)


def test_results_json_has_every_field(binary: dict[str, Any]) -> None:
    r, cfg = binary["results"], binary["cfg"]
    missing = [f for f in FIELDS if f not in r]
    assert not missing, missing
    identity = (r["status"], r["task"], r["model"], r["seed"], r["method"])
    assert identity == ("finished", "sst2", "minilm", 0, "lora")
    assert set(r["metrics"]["best"]) == set(r["metrics"]["final"]) == {"accuracy"}
    best = max(r["history"], key=lambda h: h["accuracy"])
    assert r["best_epoch"] == best["epoch"] and r["metrics"]["best"]["accuracy"] == best["accuracy"]
    assert r["metrics"]["final"] == {"accuracy": r["history"][-1]["accuracy"]}
    # LoRA r=8 on query, value (6 x 2 x 8 x (384 + 384)) + classifier (384 x 2 + 2) + pooler (384^2 + 384).
    assert r["trainable_params"] == 73_728 + 770 + 147_840 == 222_338
    assert 22_000_000 < r["total_params"] < 23_500_000
    files = list((binary["folder"] / "adapter").glob("*.safetensors"))
    assert r["adapter_bytes"] == sum(f.stat().st_size for f in files) > 0
    assert r["train_time_s"] > 0 and r["train_samples_per_s"] > 0 and r["peak_memory_mb"] > 0
    assert r["config"]["lora"]["r"] == cfg.lora.r == 8 and r["config"]["task"]["name"] == "sst2"
    assert {"torch", "transformers", "peft", "lightning"} <= set(r["versions"])
    assert r["git_commit"] is None or isinstance(r["git_commit"], str)
    assert (binary["folder"] / "checkpoints" / "last.safetensors").is_file()


def test_adapter_reloads_with_identical_logits(binary: dict[str, Any]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg, adapter = binary["cfg"], binary["folder"] / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["r"] == 8 and set(conf["target_modules"]) == {"query", "value"}
    assert set(conf["modules_to_save"]) >= {"classifier", "pooler"}
    assert conf["base_model_name_or_path"] == cfg.model.path  # portable, not this machine's folder
    path = resolve_model_path(cfg.model.path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = reloaded(**binary["batch"]).logits
    assert logits.shape == (6, 2)
    torch.testing.assert_close(logits, binary["logits"], atol=1e-5, rtol=0)
    # Not trivially equal: the trained model differs from the untrained one on this batch.
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(**binary["batch"]).logits, logits, atol=1e-3)


def test_finished_run_is_skipped(binary: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    results_file = binary["folder"] / "results.json"
    before = results_file.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loralab.run.train, "train", refuse)
    monkeypatch.setattr(loralab.run.train, "preflight", refuse)
    assert loralab.run.train.run(binary["cfg"]) == binary["value"]
    assert results_file.stat().st_mtime_ns == before


def test_stsb_regression(stsb: dict[str, Any]) -> None:
    r = stsb["results"]
    assert r["main_metric"]["name"] == "pearson" and r["main_metric"]["value"] == stsb["value"]
    assert_metric_range(r, ["pearson", "spearman"])
    assert r["trainable_params"] == 73_728 + 385 + 147_840  # one regression output
    assert len(r["history"]) == 2 and all(k in r for k in FIELDS)


def test_same_seed_same_history(compose_cfg: Compose, tmp_path: Path) -> None:
    """The same config trained twice (two stores) ends with the same history and bit-identical adapters."""
    tiny = ["task=stsb", "data.train_limit=96", "data.batch_size=16", "trainer.max_epochs=2", "data.val_limit=64"]
    (_, first_folder, first), (_, folder, again) = (train_once(compose_cfg(tiny, root=tmp_path / s)) for s in "ab")
    assert folder != first_folder and folder.name == first_folder.name  # same run id, another store
    assert again["history"] == first["history"] and len(again["history"]) == 2
    first, second = (load_file(str(f / "adapter" / "adapter_model.safetensors")) for f in (first_folder, folder))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cola_matthews(compose_cfg: Compose) -> None:
    _, _, r = train_once(compose_cfg(COLA))
    assert r["main_metric"]["name"] == "matthews"
    assert set(r["metrics"]["best"]) == {"matthews", "accuracy"}
    assert_metric_range(r, ["matthews", "accuracy"])


HANGING_STEP = """
import sys, time
from loralab.config import compose
from loralab.lightning.interrupt import Interruption
from loralab.run.module import GlueModule
from loralab.run.train import run

Interruption.grace_s = 6.0  # interrupt after 6 s, kill after 12: teardown and the results write need the 6 s on a busy CI

def hang(self, batch, batch_idx):  # a first step that never returns, as a torch.compile that hangs
    print("first step", flush=True)
    while True:
        time.sleep(0.05)

GlueModule.training_step = hang
run(compose(sys.argv[1:]))
"""


def test_sigterm_ends_a_step_that_never_returns(tmp_path: Path, token_cache: Path) -> None:
    """Lightning stops at the next batch boundary on SIGTERM; a step that never reaches one is interrupted after the
    grace period, the run is recorded as interrupted and the process exits non-zero."""
    import signal
    import subprocess
    import sys
    import time

    store = tmp_path / "runs"
    cmd = [sys.executable, "-c", HANGING_STEP, "task=rte", "data.train_limit=32", "data.val_limit=16",
           f"store.root={store}", f"data.cache_dir={token_cache}", "trainer.enable_progress_bar=false"]
    with open(tmp_path / "log", "w") as log:
        # started with SIGINT ignored, as under nohup or a pytest-xdist worker: the grace-period interrupt must still land
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        deadline = time.monotonic() + 600
        while "first step" not in (tmp_path / "log").read_text() and child.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = child.wait(timeout=60)
    output = (tmp_path / "log").read_text()
    assert code != 0 and time.monotonic() - sent < 30, output[-3000:]
    (result,) = [json.loads(p.read_text()) for p in store.rglob("results.json")]
    assert result["status"] == "failed" and result["error"].startswith("interrupted"), result["error"]
