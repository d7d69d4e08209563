"""`loralab evaluate RUN`: re-score a saved adapter on its dev split with the `evaluate` library.

An independent check of the in-training torchmetrics scores in results.json: the hub's `glue` metric when the hub
is reachable, else the offline module shipped in loralab/adapters/metrics_glue/ (same outputs). Scored on the same
subsample as in training (data.val_limit, seeded with the run's seed).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..run.data import encode_split, subsample
from ..run.weights import hub_reachable
from .loader import ModelBank, pick_device, resolve_source
from .predict import predict_encoded

log = logging.getLogger("loralab")
LOCAL_METRIC = Path(__file__).parent / "metrics_glue" / "glue_offline.py"
# evaluate's glue output names -> loralab's metric names (tasks.METRICS)
METRIC_NAMES = {"matthews_correlation": "matthews", "spearmanr": "spearman", "accuracy": "accuracy", "f1": "f1",
                "pearson": "pearson"}


def load_glue_metric(task: str) -> tuple[Any, str]:
    """The `evaluate` GLUE metric for a task and where it came from ("hub" or the local module's path)."""
    import evaluate

    if hub_reachable():
        try:
            return evaluate.load("glue", task), "hub:glue"
        except (OSError, ConnectionError, FileNotFoundError) as e:  # hub up, metric not served: same outputs offline
            log.warning("evaluate.load('glue') failed (%s); using %s", e, LOCAL_METRIC)
    return evaluate.load(str(LOCAL_METRIC), task), str(LOCAL_METRIC)


def glue_scores(task: str, pred: np.ndarray, label: np.ndarray, metric: Any = None) -> dict[str, float]:
    """GLUE scores with loralab's names; undefined correlations (constant predictions) are 0, as in training."""
    metric = metric or load_glue_metric(task)[0]
    raw = metric.compute(predictions=pred.tolist(), references=label.tolist())
    return {METRIC_NAMES[k]: (0.0 if math.isnan(float(v)) else float(v)) for k, v in raw.items()}


def evaluate_run(run: str | Path, batch_size: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Re-score a run's adapter on its dev split(s); compare with results.json (the adapter is the final state)."""
    src = resolve_source(run)
    if src.results is None:
        raise ConfigError(f"RUN={str(run)!r} is a bare adapter: evaluate needs a run folder (results.json) to compare "
                          f"against; use `loralab predict {run} --task T` to score a bare adapter")
    cfg, bank = src.cfg, ModelBank(pick_device(device))
    tokenizer = bank.tokenizer(src)
    model = bank.activate(src)
    metric, metric_source = load_glue_metric(cfg.task.name)
    scores: dict[str, float] = {}
    rows: dict[str, int] = {}
    for split in cfg.task.eval_splits:
        enc = subsample(encode_split(tokenizer, cfg.task, split, cfg.data), cfg.data.val_limit, cfg.seed)
        pred = predict_encoded(model, enc, src, tokenizer, batch_size or cfg.data.eval_batch_size, bank.device)
        for name, value in glue_scores(cfg.task.name, pred, enc.labels, metric).items():
            scores[cfg.task.metric_key(name, split)] = value
        rows[split] = len(enc)
    recorded = src.results.get("metrics", {})
    final = {k: v for k, v in (recorded.get("final") or {}).items() if v is not None}
    diffs = {k: abs(scores[k] - float(final[k])) for k in scores if k in final}
    return {"run": str(src.path), "task": cfg.task.name, "metric_source": metric_source, "rows": rows,
            "val_limit": cfg.data.val_limit, "seed": cfg.seed, "device": str(bank.device), "evaluate": scores,
            "results_final": final, "results_best": recorded.get("best"), "abs_diff": diffs,
            "max_abs_diff": max(diffs.values()) if diffs else None}
