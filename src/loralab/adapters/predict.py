"""Predictions of finished runs: per-split CSVs (label names, gold labels on dev) and GLUE leaderboard files."""
from __future__ import annotations

import csv
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..run.data import Encoded, PaddedBatches, encode_split, eval_batches, subsample
from ..run.metrics import predictions as logits_to_predictions
from ..run.module import MODEL_INPUTS
from ..tasks import STSB_RANGE, TASKS, leaderboard_files
from .loader import ModelBank, Source, autocast_for, pick_device, resolve_sources

SUBMISSION_ZIP = "glue_submission.zip"


@dataclass
class Predictions:
    """One split's predictions in dataset order: class ids (int64) or regression scores (float32)."""

    source: Source
    split: str
    idx: np.ndarray
    pred: np.ndarray
    label: np.ndarray
    csv_path: Path | None = None

    @property
    def has_gold(self) -> bool:
        return not self.split.startswith("test")


def predict_encoded(model: nn.Module, enc: Encoded, s: Source, tokenizer, batch_size: int,
                    device: torch.device) -> np.ndarray:
    """Predictions in the order of `enc`, batched and padded exactly as in validation during training."""
    regression = s.cfg.task.is_regression
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = PaddedBatches(enc, pad, s.cfg.data.pad_to_multiple_of, regression, s.cfg.data.padding_buckets())
    out = np.zeros(len(enc), dtype=np.float32 if regression else np.int64)
    for rows in eval_batches(enc.lengths, batch_size):
        batch = batches[rows]
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
        with torch.inference_mode(), autocast_for(s.precision, device):
            logits = model(**inputs).logits
        out[rows] = logits_to_predictions(logits, regression).cpu().numpy()
    return out


def splits_for(s: Source, split: str) -> list[str]:
    if split not in ("validation", "test"):
        raise ConfigError(f"--split={split!r} is invalid: use validation or test")
    return list(s.cfg.task.eval_splits if split == "validation" else s.cfg.task.test_splits)


def predict_source(bank: ModelBank, s: Source, split: str, batch_size: int | None = None,
                   limit: int | None = None) -> list[Predictions]:
    """Predict every dataset split of `split` (validation or test; MNLI has two of each) with one source.

    `limit` keeps a seeded subsample (the run's seed), as data.val_limit does in training.
    """
    tokenizer = bank.tokenizer(s)
    model = bank.activate(s)
    out = []
    for name in splits_for(s, split):
        enc = subsample(encode_split(tokenizer, s.cfg.task, name, s.cfg.data), limit, s.cfg.seed)
        pred = predict_encoded(model, enc, s, tokenizer, batch_size or s.cfg.data.eval_batch_size, bank.device)
        out.append(Predictions(s, name, enc.idx, pred, enc.labels))
    return out


def label_text(s: Source, values: np.ndarray) -> list[str]:
    if s.cfg.task.is_regression:
        return [f"{float(v):.6f}" for v in values]
    names = s.cfg.task.label_names
    return [names[int(v)] if 0 <= int(v) < len(names) else str(int(v)) for v in values]


def write_csv(p: Predictions, path: Path) -> Path:
    """idx, prediction (label name, or the score for STS-B) and, with gold labels, label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    order = np.argsort(p.idx, kind="stable")
    preds = label_text(p.source, p.pred[order])
    gold = label_text(p.source, p.label[order]) if p.has_gold else None
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "prediction", "label"] if gold else ["idx", "prediction"])
        for i, row in enumerate(int(x) for x in p.idx[order]):
            w.writerow([row, preds[i], gold[i]] if gold else [row, preds[i]])
    p.csv_path = path
    return path


def leaderboard_values(task: str, pred: np.ndarray, label_names: Sequence[str]) -> list[str]:
    """Prediction strings in the GLUE server's format for one task."""
    submit_as = TASKS[task].submit_as
    if submit_as == "score":
        return [f"{float(v):.3f}" for v in np.clip(pred, *STSB_RANGE)]
    if submit_as == "names":
        return [label_names[int(v)] for v in pred]
    return [str(int(v)) for v in pred]


def write_leaderboard(preds: Sequence[Predictions], out: Path) -> tuple[Path, list[str]]:
    """GLUE submission TSVs (index<TAB>prediction) in out/glue_submission/ and zipped at the zip's root.

    Returns the zip and the benchmark files still missing (the server expects all of them).
    """
    files = leaderboard_files()
    folder = out / "glue_submission"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for p in preds:
        task = p.source.cfg.task
        name = files.get((task.name, p.split))
        if name is None:
            continue
        order = np.argsort(p.idx, kind="stable")
        values = leaderboard_values(task.name, p.pred[order], task.label_names)
        with (folder / name).open("w", newline="") as f:
            f.write("index\tprediction\n")
            f.writelines(f"{int(i)}\t{v}\n" for i, v in zip(p.idx[order], values))
        written.append(name)
    zip_path = out / SUBMISSION_ZIP
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(written):
            z.write(folder / name, arcname=name)
    missing = sorted(set(files.values()) - set(written))
    return zip_path, missing


def check_one_per_task(sources: Sequence[Source]) -> None:
    seen: dict[str, str] = {}
    for s in sources:
        if s.cfg.task.name in seen:
            raise ConfigError(f"--split=test: two sources for task {s.cfg.task.name!r} ({seen[s.cfg.task.name]}, "
                              f"{s.path}); the leaderboard takes one per task, so pass one of them")
        seen[s.cfg.task.name] = str(s.path)


def predict(paths: Sequence[str | Path | Source], split: str = "validation", out: str | Path = "predictions",
            task: str | None = None, batch_size: int | None = None, device: str = "auto",
            bank: ModelBank | None = None) -> list[Predictions]:
    """Predict with every source on its own task; CSVs in out/<task>/<source>/<split>.csv (+ leaderboard for test)."""
    sources = resolve_sources(paths, task)
    for s in sources:
        splits_for(s, split)
    if split == "test":
        check_one_per_task(sources)
    bank = bank or ModelBank(pick_device(device))
    for s in sources:
        bank.add(s)
    out, results = Path(out), []
    for s in sources:
        for p in predict_source(bank, s, split, batch_size):
            write_csv(p, out / s.cfg.task.name / s.name / f"{p.split}.csv")
            results.append(p)
    return results
