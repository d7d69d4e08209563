"""The GLUE task table: one row per task, the only place GLUE facts live.

Columns, label names (in label-id order), official metrics, the metric that picks the best epoch, dev and test splits,
and the GLUE server's submission file per test split. Rows are in the LoRA paper's Table 2 column order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")
STSB_RANGE = (0.0, 5.0)  # STS-B similarity scores


@dataclass(frozen=True)
class Task:
    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]  # () for a regression task
    metrics: tuple[str, ...]
    main_metric: str
    leaderboard: dict[str, str]  # test split -> the GLUE server's file for it
    eval_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)
    # What the GLUE server reads: label names (the inference tasks), label ids, or the STS-B score.
    submit_as: str = "ids"
    note: str = field(default="", compare=False)

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
         "accuracy_matched", {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
         eval_splits=("validation_matched", "validation_mismatched"), test_splits=("test_matched", "test_mismatched"),
         submit_as="names", note="natural language inference"),
    Task("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy", {"test": "SST-2.tsv"},
         note="sentiment of movie-review sentences"),
    Task("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), "accuracy",
         {"test": "MRPC.tsv"}, note="paraphrase detection"),
    Task("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews", "accuracy"), "matthews",
         {"test": "CoLA.tsv"}, note="grammatical acceptability"),
    Task("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "accuracy",
         {"test": "QNLI.tsv"}, submit_as="names", note="question answering as inference"),
    Task("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), "accuracy",
         {"test": "QQP.tsv"}, note="duplicate questions"),
    Task("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "accuracy",
         {"test": "RTE.tsv"}, submit_as="names", note="textual entailment"),
    Task("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearman"), "pearson", {"test": "STS-B.tsv"},
         submit_as="score", note="sentence similarity, a regression on 0..5"),
    Task("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "accuracy",
         {"test": "WNLI.tsv"}, note="Winograd inference"),
)}
GLUE_TASKS = tuple(TASKS)


def leaderboard_files() -> dict[tuple[str, str], str]:
    """(task, test split) -> submission file, for every task (AX.tsv, the diagnostic set, is not written)."""
    return {(t.name, split): name for t in TASKS.values() for split, name in t.leaderboard.items()}
