"""``FOPTrainer``: the transformers ``Trainer`` driving the FOP optimizer.

Routing of one optimizer step's micro-batches (``n`` = micro-batches of the
step, normally ``gradient_accumulation_steps``) into FOP's two sub-batches:

* one process, ``n`` even: the first ``n/2`` micro-batches form sub-batch 1
  (g1), the last ``n/2`` sub-batch 2 (g2);
* one process, ``n`` odd (including 1): every micro-batch is split into two
  halves along the batch dimension; first halves form sub-batch 1, second
  halves sub-batch 2 (second halves run after the step's last first half);
* several processes: each rank's micro-batches stay whole; even ranks give
  g1, odd ranks g2 (:mod:`hf_fop.distributed`), DDP's averaging is off.

Loss scaling. Each piece's loss is the mean over its own loss items (the
Trainer's count of ``num_items_in_batch``, or examples): the piece's count is
passed as ``num_items_in_batch``, so models that honour it (ViT, GPT-2) and
models that average per call (BERT sequence classification, plain modules)
give the same value. Backward scales it by the piece's share of its
sub-batch, so each sub-batch gradient is the mean over that sub-batch (what
the curvature S needs), and ``opt.w1`` = sub-batch 1's share of the step's
items makes ``g_avg = w_1 g1 + w_2 g2`` the mean gradient over all the step's
items: the Trainer's gradient (for a model that ignores
``num_items_in_batch`` with ``gradient_accumulation_steps > 1`` the plain
Trainer's gradient is that many times larger; FOPTrainer keeps the mean).
Clipping (``max_grad_norm``) and the logged ``grad_norm`` therefore act on
``g_avg``; FOP scales ``g1 - g2`` by the same factor. K-FAC mode and
multi-process pieces keep the Trainer's scaling unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Trainer
from transformers.utils import logging

from .arguments import FOPTrainingArguments
from .distributed import DualGradientReducer, world
from .optimizer import FOP

logger = logging.get_logger(__name__)

_DIAG_AGGREGATES = {
    "beta_mean": "beta",
    "eta_mean": "eta",
    "s_proj_mean": "s_proj",
    "kl_base": "kl_base",
    "kl_cross": "kl_cross",
    "kl_orth": "kl_orth",
    "curvature_seconds": "curvature_seconds",
    "skipped_steps": "skipped_steps",
    "factor_updates": "factor_updates",
    "inverse_updates": "inverse_updates",
    "kl_clip_scale": "kl_clip_scale",
    "damping_min": "damping_min",
    "damping_max": "damping_max",
}
DIVERGENCE_FACTOR = 10.0
"""A logged training loss this many times the first one (or non-finite) triggers the divergence warning."""
_PER_LAYER_FIELDS = ("beta", "eta", "s_proj", "kl_base", "kl_cross", "kl_orth")


@dataclass
class _Piece:
    """A forward/backward unit: (part of) a micro-batch routed to one sub-batch.

    ``num_items is None``: the Trainer's own loss (its ``num_items_in_batch``
    and gradient-accumulation scaling), backward as is. Otherwise the loss is
    the mean over the piece's ``num_items`` loss items (passed to the model as
    ``num_items_in_batch``, so models that honour it and models that average
    per call agree), backward with ``loss_scale`` = piece items / sub-batch
    items (each sub-batch gradient is its mean), and ``report_scale`` = piece
    items / step items for the loss the Trainer logs.
    """

    inputs: Mapping[str, Any]
    sub_batch: Optional[int]  # 0, 1, or None (plain backward: K-FAC, or a local multi-process batch)
    num_items: Optional[float] = None
    loss_scale: float = 1.0
    report_scale: float = 1.0


@dataclass
class _Plan:
    schedule: List[List[_Piece]]  # pieces run at each micro-batch index
    w1: float
    distributed: bool


def batch_size_of(inputs: Mapping[str, Any]) -> int:
    """Leading dimension of the first tensor with at least one dimension in ``inputs``."""
    for value in inputs.values():
        if isinstance(value, Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise ValueError(f"Cannot find a batch dimension in the inputs (keys: {sorted(inputs)}): no tensor in the batch.")


def split_batch(inputs: Mapping[str, Any], first: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Split every tensor whose leading dim is the batch size into ``[:first]`` and ``[first:]``."""
    size = batch_size_of(inputs)
    a: Dict[str, Any] = {}
    b: Dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == size:
            a[key], b[key] = value[:first], value[first:]
        else:
            a[key] = b[key] = value
    return a, b


class FOPTrainer(Trainer):
    """A ``Trainer`` that builds and drives :class:`hf_fop.FOP` (takes exactly ``Trainer``'s arguments).

    ``args`` must be :class:`FOPTrainingArguments` (``None`` gives its defaults).
    With ``args.fop_optimizer == "trainer"``, or when ``optimizers=`` /
    ``optimizer_cls_and_kwargs=`` is given, it behaves as a plain ``Trainer``.
    """

    def __init__(self, model: Any = None, args: Optional[FOPTrainingArguments] = None, *rest: Any, **kwargs: Any) -> None:
        if args is None:
            args = FOPTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, FOPTrainingArguments):
            raise TypeError(
                f"FOPTrainer needs args=FOPTrainingArguments(...) (got {type(args).__name__}); it has the same fields "
                "as TrainingArguments plus the fop_* ones."
            )
        super().__init__(model, args, *rest, **kwargs)
        user_optimizer = self.optimizer is not None or self.optimizer_cls_and_kwargs is not None
        self.fop_mode: Optional[str] = None
        """``"fop"``, ``"kfac"``, or ``None`` when the Trainer's own optimizer is used."""
        if args.fop_optimizer != "trainer" and user_optimizer:
            logger.warning(
                "FOPTrainer: an optimizer was given (optimizers= or optimizer_cls_and_kwargs=); it is used as by a plain "
                "Trainer and FOP is not used."
            )
        elif args.fop_optimizer != "trainer":
            self.fop_mode = args.fop_optimizer
            self._check_supported()
        self.fop_optimizer: Optional[FOP] = None
        """The raw FOP optimizer (``trainer.optimizer`` is accelerate's wrapper around it)."""
        self.fop_reducer: Optional[DualGradientReducer] = None
        self._plan: Optional[_Plan] = None
        self._micro = 0
        self._step_marker: Optional[Tuple[int, int]] = None

    # ----------------------------------------------------------- validation
    def _check_supported(self) -> None:
        args = self.args
        if self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False) or bool(getattr(args, "fsdp", None)):
            raise ValueError(
                "FOPTrainer does not support FSDP yet: FOP needs each layer's full weight and gradient to build its "
                "Kronecker factors. Remove the fsdp settings or use fop_optimizer='trainer'."
            )
        if self.is_deepspeed_enabled or bool(getattr(args, "deepspeed", None)):
            raise ValueError(
                "FOPTrainer does not support DeepSpeed yet: DeepSpeed owns the optimizer step and gradient reduction, "
                "which FOP's dual-gradient reduction replaces. Remove the deepspeed config or use fop_optimizer='trainer'."
            )
        if args.n_gpu > 1:
            raise ValueError(
                f"FOPTrainer does not support torch.nn.DataParallel (n_gpu={args.n_gpu}): launch one process per device "
                "with torchrun or accelerate launch instead."
            )
        if (
            self.fop_mode == "fop"
            and args.world_size == 1
            and args.per_device_train_batch_size < 2
            and args.gradient_accumulation_steps % 2 == 1
        ):
            raise ValueError(
                f"FOP needs two sub-batches per step, but per_device_train_batch_size="
                f"{args.per_device_train_batch_size} with gradient_accumulation_steps={args.gradient_accumulation_steps} "
                "(odd) cannot be split: use per_device_train_batch_size >= 2, or an even gradient_accumulation_steps "
                "(the first half of the micro-batches then forms sub-batch 1), or fop_optimizer='kfac'."
            )

    # ------------------------------------------------------------ optimizer
    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """Build :class:`FOP` from ``args.fop_config()`` (plain Trainer behaviour when FOP is not used)."""
        if self.fop_mode is None:
            return super().create_optimizer(model)
        if self.optimizer is None:
            opt = FOP(self.model, self.args.fop_config())
            _, world_size = world()
            if world_size > 1:
                self.fop_reducer = DualGradientReducer(opt)
                if self.fop_mode == "fop":
                    self.fop_reducer.install()
                else:  # K-FAC: DDP averages the gradients; only the factors need averaging
                    opt.factor_reducer = self.fop_reducer.reduce_factors
            self.fop_optimizer = opt
            self.optimizer = opt
        return self.optimizer

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._step_marker = None
        self._plan = None
        return super().train(*args, **kwargs)

    # -------------------------------------------------------------- routing
    def _loss_is_scaled(self, num_items_in_batch: Any) -> bool:
        """The Trainer's rule: is the loss already normalised over the whole accumulated batch?"""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def _items(self, batches: List[Mapping[str, Any]], device: torch.device) -> float:
        """Loss items of ``batches`` counted as the Trainer counts ``num_items_in_batch`` (examples if it does not)."""
        count = self._get_num_items_in_batch(list(batches), device)
        if count is None:
            return float(sum(batch_size_of(b) for b in batches))
        return float(count.sum()) if isinstance(count, Tensor) else float(count)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> Tuple[list, Any]:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.fop_mode is not None and batch_samples:
            self._plan = self._make_plan(batch_samples, num_items_in_batch, device)
            self._micro = 0
        return batch_samples, num_items_in_batch

    def _make_plan(self, batches: List[Mapping[str, Any]], num_items_in_batch: Any, device: torch.device) -> _Plan:
        n = len(batches)
        distributed = world()[1] > 1
        if self.fop_mode == "kfac" or distributed:
            return _Plan([[_Piece(b, None)] for b in batches], 0.5, distributed)
        plain = _Plan([[_Piece(b, 0)] for b in batches], 1.0, False)  # K-FAC fallback (one sub-batch)
        if n % 2 == 0:
            groups = [list(batches[: n // 2]), list(batches[n // 2 :])]
        else:
            sizes = [batch_size_of(b) for b in batches]
            if min(sizes) < 2:
                logger.warning(
                    f"FOPTrainer: a micro-batch of size {min(sizes)} cannot be split into two sub-batches; this step is a "
                    "K-FAC step (counted in fop/fallback_fraction)."
                )
                return plain
            halves = [split_batch(b, s // 2) for b, s in zip(batches, sizes)]
            groups = [[h[0] for h in halves], [h[1] for h in halves]]
        items = [[self._items([b], device) for b in group] for group in groups]
        group_items = [sum(x) for x in items]
        total = sum(group_items)
        if min(min(x) for x in items) <= 0:
            return plain
        pieces = [
            [_Piece(b, j, k, k / group_items[j], k / total) for b, k in zip(groups[j], items[j])] for j in (0, 1)
        ]
        if n % 2 == 0:
            schedule = [[p] for p in pieces[0] + pieces[1]]
        else:
            schedule = [[p] for p in pieces[0]]
            schedule[-1] = schedule[-1] + pieces[1]
        return _Plan(schedule, group_items[0] / total, False)

    # ------------------------------------------------------------- training
    def _account_skipped_step(self) -> None:
        """Count the last started step as skipped if ``FOP.step`` never ran for it (fp16 overflow)."""
        opt = self.fop_optimizer
        if self._step_marker is not None:
            step, skipped = self._step_marker
            if opt.global_step == step and opt.counters["skipped_steps"] == skipped:
                opt.counters["skipped_steps"] += 1
            self._step_marker = None

    def _begin_step(self) -> None:
        """Discard pending sub-batch state (left by a skipped step) and mark the step's start."""
        opt = self.fop_optimizer
        self._account_skipped_step()
        opt.zero_grad(set_to_none=True)
        self._step_marker = (opt.global_step, opt.counters["skipped_steps"])

    def training_step(self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        """Forward/backward of one micro-batch, routed into FOP's sub-batches (see module docstring)."""
        if self.fop_mode is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._plan is None or self._micro >= len(self._plan.schedule):  # called outside the Trainer's loop
            self._plan = self._make_plan([inputs], num_items_in_batch, self.args.device)
            self._micro = 0
        plan, index = self._plan, self._micro
        self._micro += 1
        if index == 0:
            self._begin_step()
            if not plan.distributed:  # multi-process: DualGradientReducer sets w1
                self.fop_optimizer.w1 = plan.w1
        model.train()
        self.optimizer.train()
        total: Optional[Tensor] = None
        for piece in plan.schedule[index]:
            loss = self._run_piece(model, piece, num_items_in_batch, plan.distributed)
            total = loss if total is None else total + loss
        if plan.distributed and self.fop_mode == "fop" and index == len(plan.schedule) - 1:
            self.fop_reducer.reduce_gradients()
        return total

    def _run_piece(self, model: nn.Module, piece: _Piece, num_items_in_batch: Any, distributed: bool) -> Tensor:
        opt = self.fop_optimizer
        inputs = self._prepare_inputs(piece.inputs)
        mask = inputs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        sync = self.accelerator.no_sync(model) if distributed and self.fop_mode == "fop" else contextlib.nullcontext()
        mc = opt.config.fisher_type == "mc" and opt.capturing
        scaler = self.accelerator.scaler
        if scaler is not None:  # read by the forward hooks: set before the forward pass
            opt.set_grad_scale(float(scaler.get_scale()))
        if piece.sub_batch is not None:
            opt.begin_sub_batch(piece.sub_batch)
        try:
            with sync, opt.padding_mask(mask):
                if piece.num_items is not None:
                    num_items_in_batch = torch.tensor(piece.num_items, device=self.args.device)
                with self.compute_loss_context_manager():
                    if mc:
                        loss, outputs = self.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
                    else:
                        loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
                if piece.num_items is None and not self._loss_is_scaled(num_items_in_batch):
                    loss = loss / self.current_gradient_accumulation_steps
                if mc:
                    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[1]
                    opt.mc_backward(logits)
                self.accelerator.backward(loss * piece.loss_scale if piece.loss_scale != 1.0 else loss)
                if piece.report_scale != 1.0:
                    loss = loss * piece.report_scale
        finally:
            if piece.sub_batch is not None:
                opt.end_sub_batch(piece.sub_batch)
        return loss.detach()

    # -------------------------------------------------------------- logging
    def fop_logs(self) -> Dict[str, float]:
        """FOP diagnostics of the last step as ``fop/...`` scalars (layer aggregates and counters)."""
        diag = self.fop_optimizer.diagnostics()
        out = {f"fop/{name}": diag[key] for key, name in _DIAG_AGGREGATES.items() if key in diag}
        out["fop/fallback_fraction"] = diag["fallback_steps"] / max(diag["step"], 1.0)
        if self.args.fop_log_per_layer:
            for layer in self.fop_optimizer.layers:
                for f in _PER_LAYER_FIELDS:
                    key = f"{layer.name}/{f}"
                    if key in diag:
                        out[f"fop/{key}"] = diag[key]
        return out

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """The Trainer's ``log`` with FOP diagnostics merged into training logs (those with ``loss``)."""
        if self.fop_optimizer is not None:
            self._account_skipped_step()  # log() runs between optimizer steps
            if "loss" in logs:
                logs = {**logs, **self.fop_logs()}
                self._warn_if_diverging(logs)
        super().log(logs, start_time)

    def _warn_if_diverging(self, logs: Dict[str, float]) -> None:
        """Warn once when the logged loss is non-finite or ``DIVERGENCE_FACTOR`` x the first logged loss.

        Uses only values already read for logging (no extra host sync).
        """
        loss = float(logs["loss"])
        first = getattr(self, "_fop_first_loss", None)
        if first is None and math.isfinite(loss):
            self._fop_first_loss = first = loss
        if getattr(self, "_fop_divergence_warned", False):
            return
        if math.isfinite(loss) and (first is None or loss <= DIVERGENCE_FACTOR * max(first, 1e-8)):
            return
        self._fop_divergence_warned = True
        args = self.args
        clip = "set fop_kl_clip (e.g. 1e-3; now 0: off)" if not args.fop_kl_clip else f"lower fop_kl_clip (now {args.fop_kl_clip})"
        logger.warning(
            f"FOP training looks divergent at step {self.state.global_step}: loss {loss:.4g} vs {first if first is not None else float('nan'):.4g} "
            f"at the first log (KL terms per unit lr^2: {sum(logs.get(f'fop/{k}', 0.0) for k in ('kl_base', 'kl_cross', 'kl_orth')):.3g}). "
            f"Lower learning_rate (now {args.learning_rate}), raise fop_damping (now {args.fop_damping}, "
            f"mode {args.fop_damping_mode}), or {clip}."
        )

    # ---------------------------------------------------------- checkpoints
    def _needs_key_conversion(self, folder: str, target: nn.Module) -> bool:
        """The checkpoint stores tensor names the in-memory model does not have (ViT in transformers 5.x)."""
        keys = _checkpoint_keys(folder)
        return (
            isinstance(target, PreTrainedModel)
            and not self.is_fsdp_enabled
            and not self.is_deepspeed_enabled
            and keys is not None
            and not keys <= set(target.state_dict())
        )

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the Trainer's loader, or the name-converting one when names differ."""
        best = self.state.best_model_checkpoint
        if best is not None and self._needs_key_conversion(best, self.model):
            logger.info(f"Loading best model from {best} (score: {self.state.best_metric}), converting key names.")
            self._load_from_checkpoint(best)
            return
        super()._load_best_model()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """Load model weights; converts checkpoint key names like ``from_pretrained`` when they differ (ViT)."""
        target = self.model if model is None else model
        if self._needs_key_conversion(resume_from_checkpoint, target):
            loaded = type(target).from_pretrained(resume_from_checkpoint, config=target.config)
            target.load_state_dict(loaded.state_dict(), strict=True)  # raises on any name still missing
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def _checkpoint_keys(folder: str) -> Optional[set]:
    """Tensor names stored in a checkpoint folder's safetensors weights (``None`` if not safetensors)."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return set(f.keys())
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    return None
