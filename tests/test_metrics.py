"""The offline accuracy metric against scikit-learn, loaded directly and by path, inside compute_metrics."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
from sklearn.metrics import accuracy_score

import hf_fop.metrics as metrics_module
from hf_fop import FOPTrainer
from hf_fop.metrics import Accuracy, compute_accuracy
from trainer_helpers import digits_dataset, make_args, tiny_vit


def test_accuracy_matches_sklearn():
    g = np.random.default_rng(0)
    pred, ref, w = g.integers(0, 4, 200), g.integers(0, 4, 200), g.random(200)
    metric = Accuracy()
    assert metric.compute(predictions=pred, references=ref)["accuracy"] == pytest.approx(accuracy_score(ref, pred))
    assert metric.compute(predictions=pred, references=ref, sample_weight=w)["accuracy"] == pytest.approx(
        accuracy_score(ref, pred, sample_weight=w)
    )
    assert metric.compute(predictions=pred, references=ref, normalize=False)["accuracy"] == (pred == ref).sum()


def test_accuracy_accumulates_batches():
    metric = Accuracy()
    metric.add_batch(predictions=[0, 1, 2], references=[0, 1, 1])
    metric.add_batch(predictions=[3], references=[3])
    assert metric.compute()["accuracy"] == pytest.approx(0.75)


def test_loadable_by_path_with_evaluate_load():
    metric = evaluate.load(metrics_module.__file__)
    assert metric.compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])["accuracy"] == pytest.approx(0.75)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="sample_weight"):
        Accuracy().compute(predictions=[1, 0], references=[1, 0], sample_weight=[1.0])
    with pytest.raises(ValueError, match="undefined"):
        Accuracy().compute(predictions=[1], references=[1], sample_weight=[0.0])


def test_compute_metrics_in_trainer_evaluate(tmp_path):
    eval_data = digits_dataset(40, 300)
    trainer = FOPTrainer(
        model=tiny_vit(), args=make_args(tmp_path, max_steps=1), train_dataset=digits_dataset(32),
        eval_dataset=eval_data, compute_metrics=compute_accuracy,
    )
    result = trainer.evaluate()
    logits = trainer.predict(eval_data).predictions
    expected = accuracy_score(eval_data[:]["labels"].numpy(), logits.argmax(-1))
    assert result["eval_accuracy"] == pytest.approx(expected)
