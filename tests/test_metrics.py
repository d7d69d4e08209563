"""GLUE metrics on torchmetrics match scikit-learn/scipy; each task gets the metric keys it declares."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from loralab.config import CONF_DIR, compose
from loralab.run.metrics import metric, predictions, task_metrics

TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))


def chunked_value(name: str, num_labels: int, preds: torch.Tensor, target: torch.Tensor) -> float:
    """Update in uneven chunks, as validation batches do, then compute once."""
    m = metric(name, num_labels)
    cuts = [7, 100, 333]
    for p, t in zip(torch.tensor_split(preds, cuts), torch.tensor_split(target, cuts), strict=True):
        m.update(p, t)
    return float(m.compute())


def labels(n: int, num_labels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_labels, (n,), generator=g)
    # Correlated with the target so that the scores are far from 0 and from each other.
    flip = torch.rand(n, generator=g) < 0.35
    preds = torch.where(flip, torch.randint(0, num_labels, (n,), generator=g), target)
    return preds, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_sklearn(seed: int) -> None:
    preds, target = labels(500, 2, seed)
    p, t = preds.numpy(), target.numpy()
    assert chunked_value("accuracy", 2, preds, target) == pytest.approx(accuracy_score(t, p), abs=1e-5)
    assert chunked_value("f1", 2, preds, target) == pytest.approx(f1_score(t, p, pos_label=1), abs=1e-5)
    assert chunked_value("matthews", 2, preds, target) == pytest.approx(matthews_corrcoef(t, p), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_metrics_match_sklearn(seed: int) -> None:
    preds, target = labels(600, 3, seed)
    p, t = preds.numpy(), target.numpy()
    acc = chunked_value("accuracy", 3, preds, target)
    assert acc == pytest.approx(accuracy_score(t, p), abs=1e-5)
    assert 0.5 < acc < 1  # micro accuracy, not a per-class average
    assert chunked_value("matthews", 3, preds, target) == pytest.approx(matthews_corrcoef(t, p), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlations_match_scipy(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(500, generator=g) * 5
    preds = target + torch.randn(500, generator=g) * 1.5
    p, t = preds.double().numpy(), target.double().numpy()
    assert chunked_value("pearson", 1, preds, target) == pytest.approx(pearsonr(p, t)[0], abs=1e-5)
    assert chunked_value("spearman", 1, preds, target) == pytest.approx(spearmanr(p, t)[0], abs=1e-5)


def test_unknown_metric_is_refused() -> None:
    with pytest.raises(KeyError, match="bleu"):
        metric("bleu", 2)


def test_predictions_argmax_and_regression() -> None:
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]], dtype=torch.bfloat16)
    assert predictions(logits, regression=False).tolist() == [1, 0, 1]
    scores = predictions(torch.tensor([[1.5], [-0.25]], dtype=torch.bfloat16), regression=True)
    assert scores.dtype == torch.float32 and scores.shape == (2,) and scores.tolist() == [1.5, -0.25]


@pytest.mark.parametrize("task", TASKS)
def test_task_metrics_have_the_declared_keys(task: str) -> None:
    cfg = compose([f"task={task}"]).task
    collection = task_metrics(cfg)
    assert set(collection.keys()) == set(cfg.metrics)
    assert cfg.main_metric in cfg.metric_keys()
    # A perfect prediction scores 1 on every metric (regression: perfectly correlated scores).
    target = torch.rand(64) * 5 if cfg.is_regression else torch.arange(64) % cfg.num_labels
    collection.update(target.clone(), target)
    assert all(float(v) == pytest.approx(1.0) for v in collection.compute().values())


def test_official_metric_per_task() -> None:
    main = {t: compose([f"task={t}"]).task.main_metric for t in TASKS}
    assert main["cola"] == "matthews" and main["stsb"] == "pearson" and main["mnli"] == "accuracy_matched"
    assert set(compose(["task=mrpc"]).task.metrics) == {"accuracy", "f1"}
    assert set(compose(["task=stsb"]).task.metrics) == {"pearson", "spearman"}


def test_mnli_metric_keys_carry_the_split() -> None:
    task = compose(["task=mnli"]).task
    assert task.metric_keys() == ["accuracy_matched", "accuracy_mismatched"]
    assert task.metric_key("accuracy", "validation_mismatched") == "accuracy_mismatched"
    assert compose(["task=sst2"]).task.metric_keys() == ["accuracy"]
