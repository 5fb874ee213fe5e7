"""Offline perplexity from per-token negative log-likelihoods, an ``evaluate.Metric`` loadable by path.

The Hub's ``perplexity`` metric downloads a model and scores texts; this one scores the tokens the
Trainer already evaluated: ``exp(mean NLL)`` over every token (natural log).
"""

from typing import Dict
from typing import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Perplexity = exp(mean over tokens of the negative log-likelihood, natural log)."
_INPUTS = """
Args:
    predictions (list of float): negative log-likelihood of each evaluated token (nats, >= 0), shape (T,).
Returns:
    {"perplexity": float, "mean_nll": float, "tokens": int}
"""


class Perplexity(evaluate.Metric):
    """Token-level perplexity: ``exp(sum(nll) / T)``."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("float64")}),
        )

    def _compute(self, predictions: Sequence[float]) -> Dict[str, float]:
        nll = np.asarray(predictions, dtype=np.float64)
        if nll.size == 0:
            raise ValueError("Perplexity of zero tokens is undefined: no token was evaluated.")
        if not np.all(np.isfinite(nll)) or np.any(nll < 0):
            raise ValueError("Perplexity expects finite per-token negative log-likelihoods >= 0.")
        mean = float(nll.mean())
        return {"perplexity": float(np.exp(mean)), "mean_nll": mean, "tokens": int(nll.size)}
