"""Each GLUE task's official metrics on torchmetrics (synchronized across DDP ranks by torchmetrics itself)."""
from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import Accuracy, BinaryF1Score, MatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from ..config import TaskConfig


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
