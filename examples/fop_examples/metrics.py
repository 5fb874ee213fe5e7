"""Offline metrics through ``evaluate`` and the ``compute_metrics`` helpers the example scripts share.

``evaluate.load("accuracy")`` fetches its script from the Hub; this module's
:class:`Accuracy` works offline and online alike, instantiated directly
(``Accuracy()``) or loaded by path (``evaluate.load(fop_examples.metrics.__file__)``).
F1 and perplexity live one per file in ``hf_fop/evaluate_modules/`` and are
loaded by path through :func:`load_metric`. Imports are one per line because
evaluate's loader parses them naively.

``compute_metrics`` helpers for the Trainer:

* :func:`compute_accuracy`: accuracy of ``argmax(logits)``;
* :func:`compute_classification_metrics`: accuracy and macro F1;
* :func:`token_nll` (``preprocess_logits_for_metrics``) + :func:`compute_perplexity`
  for causal language models.
"""

import functools
import os
from typing import Any
from typing import Dict
from typing import Optional
from typing import Sequence

import datasets
import evaluate
import numpy as np
import torch

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


_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluate_modules")
METRIC_NAMES = ("accuracy", "f1", "perplexity")


@functools.lru_cache(maxsize=None)
def load_metric(name: str) -> evaluate.EvaluationModule:
    """``evaluate.load`` of the project's offline module ``name`` (one of :data:`METRIC_NAMES`), by file path."""
    if name not in METRIC_NAMES:
        raise ValueError(f"metric {name!r} is unknown: expected one of {METRIC_NAMES}.")
    path = os.path.abspath(__file__) if name == "accuracy" else os.path.join(_MODULES_DIR, f"{name}.py")
    return evaluate.load(path)


def _logits_and_labels(eval_pred: Any) -> tuple:
    logits, labels = eval_pred[0], eval_pred[1]
    if isinstance(logits, tuple):
        logits = logits[0]
    return np.asarray(logits), np.asarray(labels)


def compute_classification_metrics(eval_pred: Any) -> Dict[str, float]:
    """``compute_metrics``: accuracy and macro F1 of ``argmax(logits (N, C))`` against ``labels (N,)``."""
    logits, labels = _logits_and_labels(eval_pred)
    predictions = np.argmax(logits, axis=-1).tolist()
    references = labels.tolist()
    out = dict(load_metric("accuracy").compute(predictions=predictions, references=references))
    out.update(load_metric("f1").compute(predictions=predictions, references=references, average="macro"))
    return out


def token_nll(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics`` of a causal LM: per-token NLL ``(B, T-1)``, -1 where the label is ignored.

    Position t predicts ``labels[:, t + 1]`` (the shift HF causal LMs apply); ``-100`` labels are ignored. Returning
    the NLL instead of the logits ``(B, T, V)`` keeps evaluation memory independent of the vocabulary.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    valid = shift_labels != -100
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.clamp_min(0).reshape(-1), reduction="none"
    ).view_as(shift_labels)
    return torch.where(valid, nll, torch.full_like(nll, -1.0))


def compute_perplexity(eval_pred: Any) -> Dict[str, float]:
    """``compute_metrics`` after :func:`token_nll`: perplexity over every evaluated token (negative entries skipped)."""
    nll = np.asarray(eval_pred[0], dtype=np.float64)
    return dict(load_metric("perplexity").compute(predictions=nll[nll >= 0].tolist()))
