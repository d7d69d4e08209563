"""A GLUE task's training loss, its divergence guard and its official metrics on torchmetrics (synchronized across DDP
ranks by torchmetrics itself): one definition for the Lightning module and the packed trainer."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import Accuracy, BinaryF1Score, MatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from ..config import TaskConfig
from ..errors import DivergedError


def metric(name: str, num_labels: int):
    binary = num_labels == 2
    if name == "accuracy":
        return Accuracy(task="binary") if binary else Accuracy(task="multiclass", num_classes=num_labels)
    if name == "f1":  # GLUE's F1 is binary F1 of the positive class (label 1)
        return BinaryF1Score()
    if name == "matthews":
        return MatthewsCorrCoef(task="binary") if binary else MatthewsCorrCoef(task="multiclass", num_classes=num_labels)
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        return SpearmanCorrCoef()
    raise KeyError(name)


def task_metrics(task: TaskConfig) -> MetricCollection:
    return MetricCollection({m: metric(m, task.num_labels) for m in task.metrics})


def predictions(logits: torch.Tensor, regression: bool) -> torch.Tensor:
    """Class ids, or the regression score, from logits (in fp32 whatever the autocast dtype)."""
    logits = logits.float()
    return logits.squeeze(-1) if regression else logits.argmax(-1)


def task_loss(task: TaskConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MSE for regression, cross-entropy otherwise, in fp32 whatever the autocast dtype."""
    logits = logits.float()
    if task.is_regression:
        return nn.functional.mse_loss(logits.squeeze(-1), labels)
    return nn.functional.cross_entropy(logits, labels)


def guard_loss(value: float, first: Optional[float], step: int) -> float:
    """Raise DivergedError when a mean training loss is not finite or is 100x the first one read (or 100);
    returns the first loss (``value`` itself when there was none yet)."""
    first = value if first is None else first
    if not math.isfinite(value) or value > 100 * max(first, 1.0):
        raise DivergedError(f"training loss {value} at step {step} is not finite or diverged (first loss {first}); "
                            f"lower optim.lr or check the data")
    return first


def epoch_scores(task: TaskConfig, collections: dict[str, MetricCollection]) -> dict[str, float]:
    """Every split's metrics under the task's metric keys (the collections are reset). Constant predictions leave
    MCC and correlations undefined (NaN): scored 0."""
    values: dict[str, float] = {}
    for split, collection in collections.items():
        for name, v in collection.compute().items():
            values[task.metric_key(name, split)] = float(v)
        collection.reset()
    return {k: (0.0 if math.isnan(v) else v) for k, v in values.items()}
