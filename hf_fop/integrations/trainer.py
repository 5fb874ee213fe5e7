"""``FOPTrainer``: the transformers ``Trainer`` driving the FOP optimizer.

Routing of one optimizer step's micro-batches into FOP's two sub-batches and
the scales of each piece: :mod:`hf_fop.integrations.routing` (the same plan as the plain
Accelerate loop's): one process, the first ``ceil(n/2)`` of the window's ``n``
micro-batches form sub-batch 1 (g1), the rest sub-batch 2 (g2); ``n = 1``: the
micro-batch is split into halves; several processes: each rank's micro-batches
stay whole, even ranks give g1, odd ranks g2 (:mod:`hf_fop.distributed`),
DDP's averaging is off.

Loss scaling. Each piece's loss is the mean over its own loss items (the
Trainer's count of ``num_items_in_batch``, or examples): the piece's count is
passed as ``num_items_in_batch``, so models that honour it (ViT, GPT-2) and
models that average per call (BERT sequence classification, plain modules)
give the same value. Backward scales it by the piece's share of its
sub-batch, so each sub-batch gradient is the mean over that sub-batch (what
the curvature S needs), and ``w1`` = sub-batch 1's share of the step's
items makes ``g_avg = w_1 g1 + w_2 g2`` the mean gradient over all the step's
items: the Trainer's gradient (for a model that ignores
``num_items_in_batch`` with ``gradient_accumulation_steps > 1`` the plain
Trainer's gradient is that many times larger; FOPTrainer keeps the mean).
Clipping (``max_grad_norm``) and the logged ``grad_norm`` therefore act on
``g_avg``; FOP scales ``g1 - g2`` by the same factor. One-process K-FAC mode
keeps the Trainer's scaling. With ``W`` processes each rank's micro-batch
backpropagates its mean loss times ``W k_b / N`` (``k_b`` its items, ``N``
the step's items on all ranks): the mean over ranks is the global mean
gradient and loss, also for models whose loss ignores ``num_items_in_batch``
(transformers 5.24's ``compute_loss`` multiplies those by ``num_processes``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from accelerate.utils.memory import clear_device_cache
from torch import Tensor, nn
from transformers import Trainer
from transformers.utils import is_sagemaker_mp_enabled, logging

from .arguments import FOPTrainingArguments
from .checkpoints import CheckpointLoadingMixin
from ..distributed import DualGradientReducer, dual_gradient_reducer, world
from ..diagnostics import STAT_FIELDS
from ..optimizer import FOP
from .routing import FallbackLog, SkippedSteps, batch_size_of, is_fallback, piece_inputs, route_window, weigh

__all__ = ["DIVERGENCE_FACTOR", "FOPTrainer", "LOGGED_KEYS"]

logger = logging.get_logger(__name__)

LOGGED_KEYS: Dict[str, str] = {
    "fop/beta": "beta* (eq. 16), mean over the managed layers",
    "fop/eta": "eta* (eq. 17), mean over the managed layers",
    "fop/s_proj": "the projection coefficient s_proj (eq. 4), mean over the managed layers",
    "fop/kl_base": "KL-norm split of the step, base (K-FAC's) term, summed over layers, per unit lr^2",
    "fop/kl_cross": "KL-norm split, cross term, summed over layers, per unit lr^2",
    "fop/kl_orth": "KL-norm split, orthogonal term, summed over layers, per unit lr^2",
    "fop/kl_clip_scale": "the trust-region factor nu of the step (1: idle); with fop_kl_clip > 0",
    "fop/damping_min": "smallest lambda over the layers (differs from fop_damping with fop_damping_mode relative)",
    "fop/damping_max": "largest lambda over the layers",
    "fop/curvature_seconds": "this process's cumulative host seconds in curvature capture, factor updates and "
    "eigendecompositions",
    "fop/curvature_seconds_max": "several processes: the largest fop/curvature_seconds over the ranks",
    "fop/curvature_seconds_mean": "several processes: the mean fop/curvature_seconds over the ranks",
    "fop/skipped_steps": "steps skipped for non-finite gradients or factors (FOP's check or the fp16 scaler)",
    "fop/factor_updates": "steps that updated the factors A and S so far",
    "fop/inverse_updates": "steps that eigendecomposed the factors so far",
    "fop/identity_layer_steps": "layer steps taken without an eigenbasis yet (identity-preconditioned), summed over "
    "layers and steps",
    "fop/float32_rotations": "layer steps whose bfloat16 rotations (fop_rotation_dtype) were estimated too coarse "
    "and computed again in float32, summed over layers and steps",
    "fop/block_rotations": "this process's block rotations of factors larger than fop_max_eigh_dim so far "
    "(fop_block_refresh)",
    "fop/block_rotations_skipped": "fop_block_refresh adaptive: this process's block rotations skipped so far because "
    "the probe found the pair within fop_block_tolerance",
    "fop/fallback_fraction": "fraction of the steps so far that had one sub-batch only (K-FAC steps)",
    "fop/<layer>/beta": "per managed layer, with fop_log_per_layer: beta*; likewise /eta, /s_proj, /kl_base, "
    "/kl_cross, /kl_orth",
}
"""Every ``fop/`` key :class:`FOPTrainer` logs, with its meaning (docs/trainer.md's table is generated from it)."""
DIVERGENCE_FACTOR = 10.0
"""A logged training loss this many times the first one (or non-finite) triggers the divergence warning."""
_DIAG_AGGREGATES = {  # FOP.diagnostics() key -> logged key
    "beta_mean": "fop/beta",
    "eta_mean": "fop/eta",
    "s_proj_mean": "fop/s_proj",
    "kl_base": "fop/kl_base",
    "kl_cross": "fop/kl_cross",
    "kl_orth": "fop/kl_orth",
    "curvature_seconds": "fop/curvature_seconds",
    "skipped_steps": "fop/skipped_steps",
    "factor_updates": "fop/factor_updates",
    "inverse_updates": "fop/inverse_updates",
    "identity_layer_steps": "fop/identity_layer_steps",
    "float32_rotations": "fop/float32_rotations",
    "block_rotations": "fop/block_rotations",
    "block_rotations_skipped": "fop/block_rotations_skipped",
    "kl_clip_scale": "fop/kl_clip_scale",
    "damping_min": "fop/damping_min",
    "damping_max": "fop/damping_max",
}


@dataclass
class _Piece:
    """A forward/backward unit: a routed piece (:class:`hf_fop.integrations.routing.Piece`) with its inputs and scales.

    ``num_items is None``: the Trainer's own loss (its ``num_items_in_batch``
    and gradient-accumulation scaling), backward as is. Otherwise the loss is
    the mean over the piece's ``num_items`` loss items (passed to the model as
    ``num_items_in_batch``, so models that honour it and models that average
    per call agree), backward with ``loss_scale`` and reported with
    ``report_scale`` (:func:`hf_fop.integrations.routing.weigh`).
    """

    inputs: Mapping[str, Any]
    sub_batch: Optional[int]  # 0, 1, or None (plain backward: K-FAC, or a local multi-process batch)
    num_items: Union[None, float, Tensor] = None  # a 0-dim tensor on several processes (no host sync)
    loss_scale: Union[float, Tensor] = 1.0
    report_scale: Union[float, Tensor] = 1.0


@dataclass
class _Plan:
    schedule: List[List[_Piece]]  # pieces run at each micro-batch index
    w1: float
    distributed: bool


class FOPTrainer(CheckpointLoadingMixin, Trainer):
    """A ``Trainer`` that builds and drives :class:`hf_fop.FOP` (takes exactly ``Trainer``'s arguments).

    ``args`` must be :class:`FOPTrainingArguments` (``None`` gives its defaults).
    With ``args.fop_optimizer == "trainer"``, or when ``optimizers=`` /
    ``optimizer_cls_and_kwargs=`` is given, it behaves as a plain ``Trainer``.
    """

    use_ddp_comm_hook = True
    """Multi-process FOP: reduce g1/g2 inside DDP's backward (:mod:`hf_fop.comm_hook`); ``False`` reduces after it."""

    def __init__(self, model: Any = None, args: Optional[FOPTrainingArguments] = None, *rest: Any, **kwargs: Any) -> None:
        if args is None:
            args = FOPTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, FOPTrainingArguments):
            raise TypeError(
                f"FOPTrainer needs args=FOPTrainingArguments(...) (got {type(args).__name__}); it has the same fields "
                "as TrainingArguments plus the fop_* ones."
            )
        if args.fop_optimizer != "trainer":
            _check_parallelism_config(args.parallelism_config, "args.parallelism_config")
        super().__init__(model, args, *rest, **kwargs)
        self._check_process_group()
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
        self._skipped = SkippedSteps()
        self._fallbacks = FallbackLog("FOPTrainer")
        self._fop_hook_sync = False
        self._fop_first_loss: Optional[float] = None
        """First finite logged training loss (the divergence warning's reference)."""
        self._fop_divergence_warned = False

    # ----------------------------------------------------------- validation
    def _check_process_group(self) -> None:
        """Refuse a process group the Trainer does not use (each process would train its own unsharded copy)."""
        rank, world_size = world()
        if world_size > 1 and self.args.world_size != world_size:
            raise ValueError(
                f"FOPTrainer: this is process {rank} of a torch.distributed process group of {world_size} processes "
                f"(torchrun / accelerate launch), but the Trainer runs as a single process (args.parallel_mode="
                f"{self.args.parallel_mode.value}, args.world_size={self.args.world_size}): every process would train its "
                "own unsharded copy of the model. On CPU set use_cpu=True in the training arguments (CLI: --use_cpu, or "
                "ACCELERATE_USE_CPU=1 in the environment); on GPUs give each process its own device."
            )

    def _check_supported(self) -> None:
        args = self.args
        _check_parallelism_config(getattr(self.accelerator, "parallelism_config", None), "the accelerator's parallelism_config")
        if is_sagemaker_mp_enabled():
            raise ValueError(
                "FOPTrainer does not support SageMaker model parallelism: it runs forward and backward itself "
                "(smp_forward_backward), which FOP's sub-batch routing replaces. Use fop_optimizer='trainer'."
            )
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
        one_example = args.per_device_train_batch_size < 2 and args.gradient_accumulation_steps == 1
        if self.fop_mode == "fop" and args.world_size == 1 and one_example:
            raise ValueError(
                f"FOP needs two sub-batches per step, but per_device_train_batch_size={args.per_device_train_batch_size} "
                "with gradient_accumulation_steps=1 gives one example per step, which cannot be split: use "
                "per_device_train_batch_size >= 2, or gradient_accumulation_steps >= 2 (the first ceil(n/2) micro-batches "
                "of each window then form sub-batch 1), or fop_optimizer='kfac'."
            )

    # ------------------------------------------------------------ optimizer
    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """Build :class:`FOP` from ``args.fop_config()`` (plain Trainer behaviour when FOP is not used; the Trainer's
        own optimizer, ``fop_optimizer='trainer'``, also starts from ``args.effective_learning_rate``)."""
        if self.fop_mode is None:
            built = self.optimizer is None and self.optimizer_cls_and_kwargs is None
            optimizer = super().create_optimizer(model)
            factor = self.args.lr_batch_factor
            if built and factor != 1.0:  # fop_scale_lr_with_batch: before the scheduler reads the peak lr
                for group in optimizer.param_groups:
                    group["lr"] *= factor
            return optimizer
        if self.optimizer is None:
            opt = FOP(self.model, self.args.fop_config(), decay_parameters=self.get_decay_parameter_names(self.model))
            # several processes, FOP mode: the dual-gradient reduction (with curvature specialists, g1/g2 to each
            # layer's owner only); K-FAC: DDP averages the gradients and FOP's distributor the factors
            self.fop_reducer = dual_gradient_reducer(opt, owner_gradients=True, mode=self.fop_mode)
            self.fop_optimizer = opt
            self.optimizer = opt
        return self.optimizer

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._skipped.reset()
        self._plan = None
        self._fallbacks = FallbackLog("FOPTrainer")
        result = super().train(*args, **kwargs)
        summary = self._fallbacks.summary()
        if summary is not None:
            logger.warning(summary)
        return result

    # -------------------------------------------------------------- routing
    def _loss_is_scaled(self, num_items_in_batch: Any) -> bool:
        """The Trainer's rule: is the loss already normalised over the whole accumulated batch?"""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    @contextlib.contextmanager
    def _local_item_counts(self) -> Iterator[None]:
        """Within: the Trainer counts loss items on this process only and ``compute_loss`` does not multiply by
        ``num_processes`` (``average_tokens_across_devices`` off); FOPTrainer scales each piece itself."""
        saved = self.args.average_tokens_across_devices
        self.args.average_tokens_across_devices = False
        try:
            yield
        finally:
            self.args.average_tokens_across_devices = saved

    def _piece_counts(self, batches: List[Mapping[str, Any]], device: torch.device) -> Union[List[float], Tensor]:
        """Loss items of each batch, counted as the Trainer counts ``num_items_in_batch`` (examples if it does not).

        A host list of batch sizes when the Trainer does not count items, otherwise a float tensor ``(len(batches),)``
        on ``device`` (no host sync).
        """
        with self._local_item_counts():
            counts = [self._get_num_items_in_batch([b], device) for b in batches]
        if any(c is None for c in counts):
            return [float(batch_size_of(b)) for b in batches]
        return torch.stack([torch.as_tensor(c, device=device).float().reshape(()) for c in counts])

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> Tuple[list, Any]:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.fop_mode is not None and batch_samples:
            self._plan = self._make_plan(batch_samples, num_items_in_batch, device, self.args.gradient_accumulation_steps)
            self._micro = 0
        return batch_samples, num_items_in_batch

    def _make_plan(
        self, batches: List[Mapping[str, Any]], num_items_in_batch: Any, device: torch.device, n: Optional[int] = None
    ) -> _Plan:
        """The window's pieces (:func:`hf_fop.integrations.routing.route_window`, ``n`` = ``gradient_accumulation_steps``) and scales.

        Counts stay tensors on several processes (no host sync); one process reads them once (``tolist``).
        """
        world_size = world()[1]
        n = max(n or len(batches), len(batches))
        routed = route_window([batch_size_of(b) for b in batches], n, world_size, self.fop_mode)
        inputs = [piece_inputs(batches[p.micro_batch], p) for p in routed]
        schedule: List[List[_Piece]] = [[] for _ in batches]

        def plan(pieces: List[_Piece], w1: float, distributed: bool = False) -> _Plan:
            for routed_piece, piece in zip(routed, pieces):
                schedule[routed_piece.micro_batch].append(piece)
            return _Plan(schedule, w1, distributed)

        if world_size == 1 and (self.fop_mode == "kfac" or is_fallback(routed)):  # the Trainer's own loss and scaling
            if self.fop_mode == "fop":
                self._fallbacks.record(n)
            return plan([_Piece(x, p.sub_batch) for x, p in zip(inputs, routed)], 1.0)
        counts = self._piece_counts(inputs, device)
        total = None
        if world_size > 1 and isinstance(counts, Tensor):
            gathered = (
                isinstance(num_items_in_batch, Tensor) and num_items_in_batch.dim() == 0
                and self.args.average_tokens_across_devices
            )
            total = (num_items_in_batch.float() if gathered else counts.sum() * world_size).clamp_min(1.0)
            items: List[Any] = list(counts.unbind())
            num_items: List[Any] = [k.clamp_min(1.0) for k in items]
        else:
            items = counts.tolist() if isinstance(counts, Tensor) else counts  # the one host sync of the step
            num_items = items
            if world_size == 1 and min(items) <= 0:  # a piece without loss items: the Trainer's own loss
                return plan([_Piece(x, 0) for x in inputs], 1.0)
        weights = weigh(routed, items, world_size, total)
        pieces = [
            _Piece(x, p.sub_batch, k, scale, report)
            for x, p, k, scale, report in zip(inputs, routed, num_items, weights.loss_scales, weights.report_scales)
        ]
        return plan(pieces, weights.w1, world_size > 1)

    # ------------------------------------------------------------- training
    def training_step(self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        """Forward/backward of one micro-batch, routed into FOP's sub-batches (see module docstring)."""
        if self.fop_mode is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._plan is None or self._micro >= len(self._plan.schedule):  # called outside the Trainer's loop
            self._plan = self._make_plan([inputs], num_items_in_batch, self.args.device)
            self._micro = 0
        plan, index = self._plan, self._micro
        self._micro += 1
        if index == 0:  # discard pending sub-batch state (left by a skipped step)
            self._skipped.begin(self.fop_optimizer)
            self.fop_optimizer.zero_grad(set_to_none=True)
            scaler = self.accelerator.scaler
            if scaler is not None and self.fop_optimizer.capturing:  # S is unscaled in the hooks: capture steps only
                self.fop_optimizer.set_grad_scale(scaler.get_scale())  # the scale changes only in optimizer steps
        model.train()
        self.optimizer.train()
        self._fop_hook_sync = self._fop_uses_comm_hook(model, plan) and index == len(plan.schedule) - 1
        total: Optional[Tensor] = None
        for piece in plan.schedule[index]:
            loss = self._run_piece(model, piece, num_items_in_batch, plan)
            total = loss if total is None else total + loss
        if plan.distributed and self.fop_mode == "fop" and index == len(plan.schedule) - 1:
            self.fop_reducer.finish_hook() if self._fop_hook_sync else self.fop_reducer.reduce_gradients()
        steps = self.args.torch_empty_cache_steps  # as Trainer.training_step: once per micro-batch on these steps
        if steps is not None and self.state.global_step % steps == 0:
            clear_device_cache()
            if torch.backends.mps.is_available() and hasattr(torch.mps, "clear_graph_cache"):
                torch.mps.clear_graph_cache()
        return total

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """Owner-only gradients (curvature specialists): clip by the global norm every rank computes alike."""
        if self.fop_reducer is None or not self.fop_reducer.owner_gradients:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return self.fop_reducer.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The logged ``grad_norm``; with owner-only gradients the global one (not this rank's ``p.grad``)."""
        if grad_norm is None and self.fop_reducer is not None and self.fop_reducer.owner_gradients:
            grad_norm = self.fop_reducer.clip_grad_norm_(float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _fop_uses_comm_hook(self, model: nn.Module, plan: _Plan) -> bool:
        """Multi-process FOP: reduce g1/g2 in a DDP comm hook during the last micro-batch's backward (if possible)."""
        if not (plan.distributed and self.fop_mode == "fop" and self.use_ddp_comm_hook):
            return False
        return self.fop_reducer.attach_ddp(model)

    def _run_piece(self, model: nn.Module, piece: _Piece, num_items_in_batch: Any, plan: _Plan) -> Tensor:
        opt = self.fop_optimizer
        distributed = plan.distributed
        inputs = self._prepare_inputs(piece.inputs)
        mask = inputs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        labels = inputs.get("labels")  # before compute_loss, which may pop it
        sync = self.accelerator.no_sync(model) if distributed and self.fop_mode == "fop" and not self._fop_hook_sync else contextlib.nullcontext()
        mc = opt.config.fisher_type == "mc" and opt.capturing
        own_count = piece.num_items is not None  # FOPTrainer scales the loss itself (see _Piece)
        if piece.sub_batch is not None:
            opt.begin_sub_batch(piece.sub_batch)
        try:
            with sync, opt.padding_mask(mask), self._local_item_counts() if own_count else contextlib.nullcontext():
                if own_count:
                    count = piece.num_items
                    num_items_in_batch = count if isinstance(count, Tensor) else torch.tensor(count, device=self.args.device)
                with self.compute_loss_context_manager():
                    if mc:
                        loss, outputs = self.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
                    else:
                        loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
                if piece.num_items is None and not self._loss_is_scaled(num_items_in_batch):
                    loss = loss / self.current_gradient_accumulation_steps
                if mc:
                    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[1]
                    opt.mc_backward(logits, labels=labels if isinstance(labels, Tensor) else None, weight=piece.loss_scale)
                self.accelerator.backward(loss * piece.loss_scale if _scales(piece.loss_scale) else loss)
                if _scales(piece.report_scale):
                    loss = loss * piece.report_scale
        finally:
            if piece.sub_batch is not None:
                opt.end_sub_batch(piece.sub_batch, plan.w1)
        return loss.detach()

    # -------------------------------------------------------------- logging
    def fop_logs(self) -> Dict[str, float]:
        """FOP diagnostics of the last step as ``fop/...`` scalars (layer aggregates and counters)."""
        diag = self.fop_optimizer.diagnostics()
        out = {name: diag[key] for key, name in _DIAG_AGGREGATES.items() if key in diag}
        out["fop/fallback_fraction"] = diag["fallback_steps"] / max(diag["step"], 1.0)
        if self.args.fop_log_per_layer:
            for layer in self.fop_optimizer.layers:
                for f in STAT_FIELDS:
                    key = f"{layer.name}/{f}"
                    if key in diag:
                        out[f"fop/{key}"] = diag[key]
        return out

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """The Trainer's ``log`` with FOP diagnostics merged into training logs (those with ``loss``)."""
        if self.fop_optimizer is not None:
            self._skipped.account(self.fop_optimizer)  # log() runs between optimizer steps
            if "loss" in logs:
                logs = {**logs, **self.fop_logs()}
                comm = self.fop_optimizer.distributor.comm
                if comm is not None:  # every rank logs training losses at the same steps
                    peak, mean = comm.max_and_mean(logs["fop/curvature_seconds"])
                    logs["fop/curvature_seconds_max"], logs["fop/curvature_seconds_mean"] = peak, mean
                self._warn_if_diverging(logs)
        super().log(logs, start_time)

    def _warn_if_diverging(self, logs: Dict[str, float]) -> None:
        """Warn once when the logged loss is non-finite or ``DIVERGENCE_FACTOR`` x the first logged loss.

        Uses only values already read for logging (no extra host sync).
        """
        loss = float(logs["loss"])
        first = self._fop_first_loss
        if first is None and math.isfinite(loss):
            self._fop_first_loss = first = loss
        if self._fop_divergence_warned:
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
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Average the ranks' factors first (a collective every rank enters; ``state_dict()`` runs on rank 0 only)."""
        if self.fop_optimizer is not None:
            self.fop_optimizer.sync_curvature()
        super()._save_checkpoint(model, trial)


def _scales(factor: Union[float, Tensor]) -> bool:
    """Whether multiplying by ``factor`` can change a value (a tensor always may: comparing it would sync)."""
    return isinstance(factor, Tensor) or factor != 1.0


def _check_parallelism_config(config: Any, where: str) -> None:
    """Refuse context, sequence, tensor parallelism and FSDP-style sharding from accelerate's ``ParallelismConfig``."""
    if config is None:
        return
    sizes = {name: int(getattr(config, f"{name}_size", 1) or 1) for name in ("cp", "sp", "tp", "dp_shard")}
    used = {name: size for name, size in sizes.items() if size > 1}
    if used:
        what = ", ".join(f"{name}_size={size}" for name, size in used.items())
        raise ValueError(
            f"FOPTrainer does not support {where} with {what} (context / sequence / tensor parallelism or sharded "
            "data parallelism): FOP needs each layer's whole weight, gradient and input sequence on one process to "
            "build its Kronecker factors. Remove these sizes from parallelism_config (plain data parallelism works) "
            "or use fop_optimizer='trainer'."
        )
