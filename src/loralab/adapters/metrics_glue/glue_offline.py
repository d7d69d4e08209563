"""GLUE metric for `evaluate` that loads offline: `evaluate.load("<this file>", "mrpc")`.

Same configs and outputs as the hub's `glue` metric (evaluate-metric/glue), computed with scikit-learn and scipy:
accuracy; accuracy and f1 for mrpc/qqp; matthews_correlation for cola; pearson and spearmanr for stsb.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from loralab.tasks import TASKS

# The hub metric's configs: every GLUE task, MNLI's two dev sets by name, and HANS.
CONFIGS = (*TASKS, "mnli_matched", "mnli_mismatched", "hans")

_DESCRIPTION = "GLUE benchmark metrics (offline copy of the outputs of the hub's `glue` metric)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted label ids (float scores for stsb).
    references: gold label ids (float scores for stsb).
Returns: accuracy; accuracy and f1 (mrpc, qqp); matthews_correlation (cola); pearson and spearmanr (stsb).
"""
_CITATION = "Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding, ICLR 2019."


class GlueOffline(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIGS:
            raise KeyError(f"config_name={self.config_name!r} is not a GLUE config: use one of {', '.join(CONFIGS)}")
        dtype = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            format="numpy")

    def _compute(self, predictions: np.ndarray, references: np.ndarray) -> dict:
        name = self.config_name
        if name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if name == "stsb":
            return {"pearson": float(pearsonr(predictions, references)[0]),
                    "spearmanr": float(spearmanr(predictions, references)[0])}
        accuracy = float((predictions == references).mean())
        if name in TASKS and "f1" in TASKS[name].metrics:
            return {"accuracy": accuracy, "f1": float(f1_score(y_true=references, y_pred=predictions))}
        return {"accuracy": accuracy}
