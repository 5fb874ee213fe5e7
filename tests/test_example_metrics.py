"""The offline accuracy metric against scikit-learn, loaded directly and by path, inside compute_metrics."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

import fop_examples.metrics as metrics_module
from hf_fop import FOPTrainer
from fop_examples.metrics import Accuracy, compute_accuracy
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


# ------------------------------------------------------------------ F1, perplexity, compute_metrics helpers
@pytest.mark.parametrize("average", ["binary", "macro", "micro", "weighted"])
def test_f1_loaded_by_path_matches_sklearn(average):
    from sklearn.metrics import f1_score

    from fop_examples.metrics import load_metric

    g = np.random.default_rng(1)
    classes = 2 if average == "binary" else 5
    pred, ref, w = g.integers(0, classes, 300), g.integers(0, classes, 300), g.random(300)
    f1 = load_metric("f1")
    assert isinstance(f1, evaluate.EvaluationModule) and f1.name == "f1"
    assert f1.compute(predictions=pred, references=ref, average=average)["f1"] == pytest.approx(f1_score(ref, pred, average=average))
    assert f1.compute(predictions=pred, references=ref, average=average, sample_weight=w)["f1"] == pytest.approx(
        f1_score(ref, pred, average=average, sample_weight=w)
    )
    assert f1.compute(predictions=[3, 3], references=[1, 1], average="macro")["f1"] == 0.0  # zero_division=0


def test_perplexity_is_exp_of_the_mean_token_nll_of_a_causal_lm():
    from fop_examples.metrics import compute_perplexity, load_metric, token_nll
    from trainer_helpers import lm_dataset, tiny_gpt2

    model = tiny_gpt2().eval()
    batch = lm_dataset(6, length=10)[:]
    labels = batch["labels"].clone()
    labels[0, 5:] = -100  # ignored positions
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], labels=labels)
    nll = token_nll(out.logits, labels)
    assert nll.shape == (6, 9) and (nll[0, 4:] == -1).all()
    metrics = compute_perplexity((nll.numpy(), labels.numpy()))
    assert metrics["tokens"] == 6 * 9 - 5
    assert metrics["perplexity"] == pytest.approx(float(torch.exp(out.loss)), rel=1e-5)  # the model's own mean loss
    with pytest.raises(ValueError, match="zero tokens"):
        load_metric("perplexity").compute(predictions=[])


def test_classification_metrics_are_accuracy_and_macro_f1():
    from sklearn.metrics import f1_score

    from fop_examples.metrics import compute_classification_metrics

    g = np.random.default_rng(2)
    logits, labels = g.normal(size=(50, 4)), g.integers(0, 4, 50)
    out = compute_classification_metrics((logits, labels))
    pred = logits.argmax(-1)
    assert out["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert out["f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
