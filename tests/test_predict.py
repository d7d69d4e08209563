"""Predictions, GLUE leaderboard files, `evaluate` re-scoring and adapter swapping, on tiny real runs."""
from __future__ import annotations

import csv
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from loralab.config import ConfigError
from loralab.adapters.evaluate import LOCAL_METRIC, evaluate_run, glue_scores
from loralab.tasks import leaderboard_files
from loralab.adapters.loader import ModelBank, pick_device, resolve_source, resolve_sources
from loralab.adapters.predict import Predictions, leaderboard_values, predict, predict_source, write_leaderboard
from loralab.adapters.swap import swap_vs_reload

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "glue")
WNLI_TEST_ROWS = 146  # the official GLUE test size
VAL_LIMIT = 32


# ---------------------------------------------------------------- no training needed

def test_leaderboard_formats_follow_the_glue_server():
    assert leaderboard_values("rte", np.array([0, 1]), ["entailment", "not_entailment"]) == ["entailment",
                                                                                              "not_entailment"]
    assert leaderboard_values("qnli", np.array([1]), ["entailment", "not_entailment"]) == ["not_entailment"]
    assert leaderboard_values("mnli", np.array([2]), ["entailment", "neutral", "contradiction"]) == ["contradiction"]
    for task in ("cola", "sst2", "mrpc", "qqp", "wnli"):
        assert leaderboard_values(task, np.array([1, 0]), ["a", "b"]) == ["1", "0"]
    assert leaderboard_values("stsb", np.array([-0.4, 2.5, 7.0], dtype=np.float32), []) == ["0.000", "2.500", "5.000"]
    assert set(leaderboard_files().values()) == {"CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv",
                                               "MNLI-m.tsv", "MNLI-mm.tsv", "QNLI.tsv", "RTE.tsv", "WNLI.tsv"}


def test_offline_metric_module_matches_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    pred, gold = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert str(LOCAL_METRIC).endswith("glue_offline.py") and LOCAL_METRIC.exists()
    assert glue_scores("cola", pred, gold)["matthews"] == pytest.approx(matthews_corrcoef(gold, pred))
    mrpc = glue_scores("mrpc", pred, gold)
    assert mrpc["accuracy"] == pytest.approx((pred == gold).mean()) and mrpc["f1"] == pytest.approx(f1_score(gold, pred))
    assert set(glue_scores("rte", pred, gold)) == {"accuracy"}
    x, y = rng.normal(size=200).astype(np.float32), rng.normal(size=200).astype(np.float32)
    stsb = glue_scores("stsb", x, y)
    assert stsb["pearson"] == pytest.approx(pearsonr(x, y)[0], abs=1e-5)
    assert stsb["spearman"] == pytest.approx(spearmanr(x, y)[0], abs=1e-5)
    assert glue_scores("stsb", np.ones(5, np.float32), np.arange(5, dtype=np.float32))["pearson"] == 0.0


def test_bad_sources_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="neither a run folder"):
        resolve_source(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "package:x"}))
    with pytest.raises(ConfigError, match="--task is missing"):
        resolve_source(tmp_path)


def test_cli_registers_predict_and_evaluate():
    from loralab.cli import build_parser

    args = build_parser().parse_args(["predict", "a", "b", "--split", "test", "--timing"])
    assert args.sources == ["a", "b"] and args.split == "test" and args.timing
    assert build_parser().parse_args(["evaluate", "r"]).run == "r"


# ---------------------------------------------------------------- tiny real runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """sst2 and wnli (two 2-class heads: one base) and stsb (a 1-output head: a second base)."""
    if not Path(GLUE_DIR).is_dir():
        pytest.skip(f"no GLUE mirror at {GLUE_DIR} (set GLUE_DIR)")
    os.environ["GLUE_DIR"] = GLUE_DIR
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from loralab.config import compose
    from loralab.store import run_dir
    from loralab.run.train import run

    root = tmp_path_factory.mktemp("runs")
    out = {}
    for task in ("sst2", "wnli", "stsb"):
        cfg = compose([f"task={task}", "data.train_limit=32", "data.batch_size=16", "trainer.max_steps=2",
                       f"data.val_limit={VAL_LIMIT}", "trainer.enable_progress_bar=false", f"store.root={root}",
                       "store.checkpoint_every_n_epochs=100"])
        run(cfg)
        out[task] = run_dir(cfg)
    return out


def _gold_names(task: str) -> set[str]:
    from loralab.config import compose

    return set(compose([f"task={task}"]).task.label_names)


def test_test_split_predictions_and_leaderboard_zip(runs, tmp_path):
    (p,) = predict([runs["wnli"]], split="test", out=tmp_path, device="cpu")
    rows = list(csv.DictReader(p.csv_path.open()))
    assert p.split == "test" and list(rows[0]) == ["idx", "prediction"]
    assert sorted(int(r["idx"]) for r in rows) == list(range(WNLI_TEST_ROWS))
    assert {r["prediction"] for r in rows} <= _gold_names("wnli")
    # STS-B's test split is 1.4k rows: its file format is checked on made-up scores instead
    stsb = resolve_source(runs["stsb"])
    fake = Predictions(stsb, "test", np.array([2, 0, 1]), np.array([5.7, -0.2, 3.14159], np.float32), -np.ones(3))
    zip_path, missing = write_leaderboard([p, fake], tmp_path)
    with zipfile.ZipFile(zip_path) as z:
        assert sorted(z.namelist()) == ["STS-B.tsv", "WNLI.tsv"]
        wnli = z.read("WNLI.tsv").decode().splitlines()
        assert z.read("STS-B.tsv").decode() == "index\tprediction\n0\t0.000\n1\t3.142\n2\t5.000\n"
    assert wnli[0] == "index\tprediction" and len(wnli) == WNLI_TEST_ROWS + 1
    assert {line.split("\t")[1] for line in wnli[1:]} <= {"0", "1"}
    assert "RTE.tsv" in missing and "WNLI.tsv" not in missing and "STS-B.tsv" not in missing


def test_a_hydra_job_folder_loads_the_run_it_links(runs, tmp_path):
    """`loralab predict <job folder>`: the job folder links its run in the store; every loader follows the link."""
    from loralab.analysis.adapter_weights import adapter_dir
    from loralab.store import link_job

    job = tmp_path / "multirun" / "2026-12-04" / "0"
    link_job(job, runs["wnli"])
    source = resolve_source(job)
    assert source.path == runs["wnli"] and source.results["status"] == "finished"
    assert adapter_dir(job) == runs["wnli"] / "adapter"
    (p,) = predict([job], split="validation", out=tmp_path / "job", device="cpu")
    (q,) = predict([runs["wnli"]], split="validation", out=tmp_path / "run", device="cpu")
    assert p.csv_path.read_text() == q.csv_path.read_text()


def test_test_split_refuses_two_sources_for_one_task(runs, tmp_path):
    with pytest.raises(ConfigError, match="one per task"):
        predict([runs["wnli"], runs["wnli"] / "adapter"], split="test", out=tmp_path)


def test_validation_csv_has_gold_labels_and_bare_adapters_work(runs, tmp_path):
    import shutil

    (p,) = predict([runs["wnli"]], split="validation", out=tmp_path / "run", device="cpu")
    rows = list(csv.DictReader(p.csv_path.open()))
    assert len(rows) == 71 and list(rows[0]) == ["idx", "prediction", "label"]
    assert {r["prediction"] for r in rows} | {r["label"] for r in rows} <= _gold_names("wnli")
    bare = shutil.copytree(runs["wnli"] / "adapter", tmp_path / "wnli_adapter")  # no results.json beside it
    with pytest.raises(ConfigError, match="--task is missing"):
        predict([bare], out=tmp_path / "bare")
    (q,) = predict([bare], split="validation", task="wnli", out=tmp_path / "bare", device="cpu")
    assert q.source.results is None and q.csv_path.read_text() == p.csv_path.read_text()


@pytest.mark.parametrize("task", ["sst2", "wnli", "stsb"])
def test_evaluate_matches_in_training_scores(runs, task):
    report = evaluate_run(runs[task], device="cpu")
    assert report["rows"] == {"validation": VAL_LIMIT}
    assert set(report["evaluate"]) == set(report["results_final"]) and report["max_abs_diff"] is not None
    assert report["max_abs_diff"] < 1e-4


def test_swapped_adapters_predict_like_each_adapter_alone(runs):
    sources = resolve_sources([runs["sst2"], runs["wnli"], runs["stsb"]])
    shared = ModelBank(pick_device("cpu"))
    for s in sources:
        shared.add(s)
    assert shared.bases == 2  # sst2 + wnli on one base, stsb (1 output) on its own
    swapped = {s.name: predict_source(shared, s, "validation", limit=VAL_LIMIT)[0].pred for s in reversed(sources)}
    for s in sources:
        alone = ModelBank(pick_device("cpu"))
        pred = predict_source(alone, resolve_sources([s.path])[0], "validation", limit=VAL_LIMIT)[0].pred
        assert alone.bases == 1 and len(pred) == VAL_LIMIT
        np.testing.assert_allclose(swapped[s.name], pred, rtol=0, atol=1e-6)
    assert swapped[sources[2].name].dtype == np.float32  # stsb kept its regression head


def test_swap_vs_reload_reports_times_sizes_and_equal_merged_logits(runs):
    t = swap_vs_reload([runs["sst2"], runs["wnli"]], device="cpu", repeats=2)
    assert t["bases"] == 1 and len(t["tasks"]) == 2
    for r in t["tasks"]:
        assert r["swap_s"] > 0 and r["reload_merged_s"] > 0 and r["adapter_load_s"] > 0
        assert 0 < r["adapter_bytes"] < r["merged_bytes"] / 10
        assert r["max_abs_logit_diff"] < 1e-4
