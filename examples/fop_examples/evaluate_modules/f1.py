"""Offline F1 score (binary, macro, micro or weighted), an ``evaluate.Metric`` loadable by path."""

from typing import Dict
from typing import Optional
from typing import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall), per class, then averaged (scikit-learn's definition)."
_INPUTS = """
Args:
    predictions (list of int): predicted labels, shape (N,).
    references (list of int): true labels, shape (N,).
    average (str): 'binary' (F1 of pos_label), 'macro' (unweighted mean over the classes present in predictions
        or references), 'micro' (global counts) or 'weighted' (mean weighted by each class's support).
    pos_label (int): the positive class for average='binary'.
Returns:
    {"f1": float}; a class with no true and no predicted positives has F1 0 (scikit-learn's zero_division=0).
"""
_AVERAGES = ("binary", "macro", "micro", "weighted")


class F1(evaluate.Metric):
    """F1 score with scikit-learn's ``f1_score`` semantics (``zero_division=0``)."""

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
        average: str = "binary",
        pos_label: int = 1,
        sample_weight: Optional[Sequence[float]] = None,
    ) -> Dict[str, float]:
        pred = np.asarray(predictions)
        ref = np.asarray(references)
        if pred.shape != ref.shape:
            raise ValueError(f"predictions {pred.shape} and references {ref.shape} must have the same shape.")
        if average not in _AVERAGES:
            raise ValueError(f"average={average!r} is invalid: expected one of {_AVERAGES}.")
        weight = np.ones(len(ref)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if average == "binary":
            return {"f1": _f1(pred == pos_label, ref == pos_label, weight)}
        classes = np.union1d(pred, ref)
        if average == "micro":
            tp = float(np.sum(weight * (pred == ref)))
            total = float(np.sum(weight))
            return {"f1": tp / total if total > 0 else 0.0}  # micro precision = recall = accuracy
        scores = np.array([_f1(pred == c, ref == c, weight) for c in classes])
        if average == "macro":
            return {"f1": float(scores.mean()) if len(scores) else 0.0}
        support = np.array([float(np.sum(weight * (ref == c))) for c in classes])
        return {"f1": float(np.sum(scores * support) / support.sum()) if support.sum() > 0 else 0.0}


def _f1(pred_pos: np.ndarray, true_pos: np.ndarray, weight: np.ndarray) -> float:
    """F1 of one class from boolean masks (N,), 0 when precision + recall is 0."""
    tp = float(np.sum(weight * (pred_pos & true_pos)))
    denominator = float(np.sum(weight * pred_pos) + np.sum(weight * true_pos))
    return 2.0 * tp / denominator if denominator > 0 else 0.0
