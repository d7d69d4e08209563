"""REPRODUCTION.md's comparison table: loralab's runs (best epoch per metric, median over seeds) beside the reference
scores kept in docs/reproduction/reference_scores.csv."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from loralab.analysis.comparison import comparison_markdown, read_references
from loralab.errors import AnalysisError

from conftest import REPO

REFERENCES = REPO / "docs" / "reproduction" / "reference_scores.csv"


def _run(method: str, task: str, history: list[dict], status: str = "finished") -> dict:
    return {"status": status, "method": method, "task": task, "history": history}


def test_the_committed_references_score_each_glue_column_with_one_metric() -> None:
    refs = read_references(REFERENCES)
    assert dict(zip(refs["task"], refs["metric"])) == {"sst2": "accuracy", "mrpc": "f1", "cola": "matthews",
                                                      "rte": "accuracy", "stsb": "pearson"}
    assert refs["value"].between(0, 100).all() and refs["source"].notna().all()


def test_loralab_rows_are_the_median_of_each_runs_best_epoch_for_the_reference_metric() -> None:
    refs = read_references(REFERENCES)
    runs = [
        _run("lora", "mrpc", [{"accuracy": 0.70, "f1": 0.80}, {"accuracy": 0.69, "f1": 0.86},  # best F1: epoch 2
                              {"accuracy": 0.72, "f1": 0.83}]),
        _run("lora", "mrpc", [{"accuracy": 0.75, "f1": 0.84}]),
        _run("lora", "mrpc", [{"accuracy": 0.99, "f1": 0.99}], status="running"),  # unfinished: left out
        _run("full", "cola", [{"matthews": 0.30}, {"matthews": 0.345}]),
        _run("full", "cola", [{"matthews": 0.32}]),
        _run("full", "cola", [{"matthews": float("nan")}, {"matthews": 0.10}]),  # a collapsed epoch: NaN MCC
    ]
    text = comparison_markdown(runs, refs, seeds=3)
    lines = text.splitlines()

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    assert lines[0] == "| | sst2 (acc) | mrpc (F1) | cola (MCC) | rte (acc) | stsb (Pearson) |"
    full = next(line for line in lines if line.startswith("| loralab, full fine-tuning"))
    lora = next(line for line in lines if line.startswith("| loralab, LoRA r=8 q,v"))
    assert lines.index(full) < lines.index(lora)  # the paper's row order
    assert cells(full)[1:] == ["-", "-", "32.0", "-", "-"]  # median of 34.5, 32 and 10; 3 seeds: no count shown
    assert cells(lora)[2] == "85.0 (2 seeds)"  # median of 86 (the middle epoch) and 84
    assert "| Published: DistilBERT 6L/768 (Sanh et al. 2019, DistilBERT) | 91.3 | 87.5 | 51.3 | 59.9 | 86.9 |" in lines
    assert "Sources of the reference rows:" in lines


@pytest.mark.parametrize(("rows", "tasks", "metrics", "match"), [
    (["a", "b"], ["mrpc", "mrpc"], ["f1", "accuracy"], "mrpc"),  # one task, two metrics
    (["a", "a"], ["rte", "rte"], ["accuracy", "accuracy"], "'a' scores rte twice"),  # one row, one task twice
])
def test_an_ambiguous_reference_file_is_refused(tmp_path: Path, rows, tasks, metrics, match: str) -> None:
    bad = tmp_path / "refs.csv"
    pd.DataFrame({"row": rows, "task": tasks, "metric": metrics, "value": [60, 61], "source": ["x", "y"]}).to_csv(
        bad, index=False)
    with pytest.raises(AnalysisError, match=match):
        read_references(bad)
