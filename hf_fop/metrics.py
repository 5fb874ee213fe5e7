"""Offline accuracy metric: an ``evaluate.Metric`` that needs no Hub download.

``evaluate.load("accuracy")`` fetches its script from the Hub; this module
works offline and online alike, instantiated directly (``Accuracy()``) or
loaded by path (``evaluate.load(hf_fop.metrics.__file__)``). Imports are one
per line because evaluate's loader parses them naively.
"""

from typing import Any
from typing import Dict
from typing import Optional
from typing import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their reference label (optionally weighted)."
_INPUTS = """
Args:
    predictions (list of int): predicted labels, shape (N,).
    references (list of int): true labels, shape (N,).
    normalize (bool): True (default) returns the fraction correct, False the count (or weight sum).
    sample_weight (list of float, optional): weight of each example, shape (N,).
Returns:
    {"accuracy": float}
"""


class Accuracy(evaluate.Metric):
    """Classification accuracy, the same definition as the Hub's ``accuracy`` metric."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(
        self,
        predictions: Sequence[int],
        references: Sequence[int],
        normalize: bool = True,
        sample_weight: Optional[Sequence[float]] = None,
    ) -> Dict[str, float]:
        pred = np.asarray(predictions)
        ref = np.asarray(references)
        if pred.shape != ref.shape:
            raise ValueError(f"predictions {pred.shape} and references {ref.shape} must have the same shape.")
        weight = np.ones(len(ref)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weight.shape != ref.shape:
            raise ValueError(f"sample_weight {weight.shape} must have the shape of references {ref.shape}.")
        correct = float(np.sum(weight * (pred == ref)))
        if not normalize:
            return {"accuracy": correct}
        total = float(np.sum(weight))
        if total <= 0:
            raise ValueError("Accuracy of zero examples (or zero total sample_weight) is undefined.")
        return {"accuracy": correct / total}


def compute_accuracy(eval_pred: Any) -> Dict[str, float]:
    """``compute_metrics`` for the Trainer: argmax of the logits ``(N, C)`` against the labels ``(N,)``."""
    logits, labels = eval_pred[0], eval_pred[1]
    if isinstance(logits, tuple):
        logits = logits[0]
    predictions = np.argmax(np.asarray(logits), axis=-1)
    return Accuracy().compute(predictions=predictions.tolist(), references=np.asarray(labels).tolist())
