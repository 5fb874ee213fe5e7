"""The FOP optimizer: K-FAC/FOP on Linear, Conv2d and Conv1D layers, AdamW for the rest.

Usage (plain PyTorch)::

    opt = FOP(model, lr=0.05)
    with opt.sub_batch(0):
        loss_fn(model(x1), y1).backward()
    with opt.sub_batch(1):
        loss_fn(model(x2), y2).backward()
    opt.step(); opt.zero_grad()

After ``sub_batch(1)`` ends, ``p.grad`` holds ``g_avg = (g1 + g2) / 2`` for
every parameter, so gradient clipping and grad-norm logging see the mean
gradient. A factor ``c`` applied to ``p.grad`` between the backward passes and
``step()`` (clipping, fp16 unscaling) gives exactly the update of ``c g1`` and
``c g2``: FOP's direction ``eta* M^-1 (g_avg + beta* g_perp)`` does not depend
on the scale of ``g1 - g2`` (``beta* g_perp`` and ``eta*`` are invariant to it),
so ``g1 - g2`` is used as accumulated and only the logged ``beta``/``s_proj``
are corrected by ``c`` (two norms per step on device, read when logged).

Weight decay (decoupled, ``lr * weight_decay * p``) follows the ``Trainer``'s
rule (``get_decay_parameter_names``): biases and normalisation weights get
none, in the K-FAC part (where a layer's bias is the last column of its
matrix: the decay applies to the weight only) and in the AdamW part alike.

A managed layer without an eigenbasis yet (first used on a step that captured
no curvature) takes an identity-preconditioned step: ``lr`` times its mean
gradient, with momentum and weight decay as usual, counted in
``counters["identity_layer_steps"]`` (one per layer and step).

Rotations in bfloat16 (``rotation_dtype``, :func:`hf_fop.preconditioner.rotation_dtype`): a layer whose estimated
rounding error (:func:`hf_fop.preconditioner.rotation_error`) exceeds ``ROTATION_ERROR_LIMIT`` is computed again in
float32 on that step, counted in ``counters["float32_rotations"]`` (one per layer and step, on the rank that computes
the layer's direction); deciding it reads every low-precision layer's estimate in one host read per step. With
``"auto"`` on a CPU, whether bfloat16 is faster there is timed once per process
(:func:`hf_fop.preconditioner.native_bfloat16`); with several processes every rank takes rank 0's answer. The answer
is saved with the state (``state_dict()["fop"]["native_bfloat16"]``), and loading the state pins it for the process:
a resumed run keeps the dtype the run was started with.

Release: ``opt.release()`` removes the curvature hooks from the model (also
done when the optimizer is garbage-collected); a new ``FOP`` on a model whose
layers carry a live optimizer's hooks takes them over and releases that one.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .adamw import adamw_step
from .config import FOPConfig
from .curvature import CurvatureEngine, KFACLayer
from .diagnostics import StepRecord, summarize
from .distributed import make_distributor
from .fop_math import LayerResult, unrotate
from .gradients import SubBatchGradients
from .preconditioner import (
    ROTATION_ERROR_LIMIT,
    kl_clip_scale,
    layer_direction,
    layer_gradient,
    native_bfloat16,
    pin_native_bfloat16,
    rotation_dtype,
    rotation_error,
    timed_bfloat16_devices,
)
from .profiling import scope
from .refresh import due_units, refresh_plan

_COUNTERS = (
    "factor_updates", "layer_factor_updates", "inverse_updates", "skipped_steps", "fallback_steps",
    "identity_layer_steps", "float32_rotations",
)
# transformers 5.24, Trainer.get_decay_parameter_names: no decay for LayerNorm modules and these names
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_names(model: nn.Module) -> List[str]:
    """Names of the parameters that get weight decay: the rule of ``Trainer.get_decay_parameter_names``.

    The same walk as ``transformers.trainer_pt_utils.get_parameter_names(model, [nn.LayerNorm], patterns)``
    (tests check equality with the Trainer's method), written out so that ``import hf_fop`` and a plain-PyTorch
    FOP do not import transformers (about 2 s per process).
    """
    patterns = [re.compile(pattern) for pattern in _NO_DECAY_PATTERNS]

    def walk(module: nn.Module) -> List[str]:
        names = []
        for child_name, child in module.named_children():
            for name in walk(child):
                full = f"{child_name}.{name}"
                if not isinstance(child, nn.LayerNorm) and not any(pt.search(full.lower()) for pt in patterns):
                    names.append(full)
        return names + [k for k in module._parameters if not any(pt.search(k.lower()) for pt in patterns)]

    return walk(model)


class FOP(torch.optim.Optimizer):
    """Fisher-Orthogonal Projection optimizer (Lu & Armour, AAAI 2026).

    Args:
        model: the module to train. Its Linear / Conv2d / HF Conv1D layers are
            K-FAC/FOP-managed; every other trainable parameter is updated by AdamW.
        config: a :class:`FOPConfig`; keyword arguments override its fields
            (``FOP(model, lr=0.1, damping=1e-3)``).
        decay_parameters: names (as in ``model.named_parameters()``) of the
            parameters that get weight decay; ``None`` applies the Trainer's
            rule (:func:`decay_parameter_names`: not biases, not normalisation weights).

    Param groups: ``param_groups[i]["kind"]`` is ``"kfac"`` (managed layers,
    ``lr`` = eta0) or ``"adamw"``; both carry ``lr`` for LR schedulers.

    Several processes (an initialised default process group): FOP builds its curvature distributor
    (:func:`hf_fop.distributed.make_distributor`, ``config.curvature_sharding``) itself; the front ends add the
    dual-gradient reduction (:func:`hf_fop.distributed.dual_gradient_reducer`). In a plain Accelerate loop call
    :func:`hf_fop.attach_accelerate` after building FOP.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Optional[FOPConfig] = None,
        *,
        decay_parameters: Optional[Iterable[str]] = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FOP expects the model (a torch.nn.Module), got {type(model).__name__}.")
        if "accelerator" in overrides:
            raise TypeError(
                "FOP(accelerator=...) is gone: build FOP(model, ...) and then call "
                "hf_fop.attach_accelerate(opt, model, accelerator) (hf_fop.integrations.accelerate)."
            )
        config = (config or FOPConfig()).replace(**overrides) if overrides else (config or FOPConfig())
        self.config = config
        self.engine = CurvatureEngine(model, config)
        managed = {id(p) for layer in self.engine.layers for p in layer.params}
        kfac_params = [p for layer in self.engine.layers for p in layer.params]
        others = [p for p in _unique_params(model) if p.requires_grad and id(p) not in managed]
        groups: List[Dict[str, Any]] = []
        if kfac_params:
            groups.append(
                {
                    "params": kfac_params,
                    "kind": "kfac",
                    "lr": config.lr,
                    "momentum": config.momentum,
                    "weight_decay": config.weight_decay,
                }
            )
        else:
            warnings.warn(
                f"FOP found no Linear, Conv2d or Conv1D layer to manage in {type(model).__name__} "
                f"(left out: {self.engine.skipped or 'none found'}); every parameter is updated by AdamW.",
                UserWarning,
                stacklevel=2,
            )
        if others:
            groups.append(
                {
                    "params": others,
                    "kind": "adamw",
                    "lr": config.effective_adamw_lr,
                    "betas": config.adamw_betas,
                    "eps": config.adamw_eps,
                    "weight_decay": config.adamw_weight_decay,
                }
            )
        if not groups:
            raise ValueError(f"FOP got a model with no trainable parameter ({type(model).__name__}).")
        super().__init__(groups, {"lr": config.lr})
        names = set(decay_parameter_names(model) if decay_parameters is None else decay_parameters)
        self._decay = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in names}
        """``id``s of the parameters that get weight decay."""
        self.global_step = 0
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.grads = SubBatchGradients(
            (p for group in self.param_groups for p in group["params"]), kfac_params, track_norm=config.mode == "fop"
        )
        """This step's sub-batch gradients (g1, g1 - g2) and their state."""
        self.distributor = make_distributor(self.engine, config)
        """Where curvature lives across processes (:class:`hf_fop.distributed.CurvatureDistributor`)."""
        for device in timed_bfloat16_devices(config, self.engine.layers):  # one process: the probe runs here
            pin_native_bfloat16(device, self.distributor.rank0_answer(native_bfloat16(device)))
        self._plan = refresh_plan(self.engine.layers, config)
        """When each managed layer captures, and an inverse cycle's refresh work (:mod:`hf_fop.refresh`: full
        eigendecompositions and block rotations) with the step of the cycle on which each unit runs."""
        self._record = StepRecord()
        self._on_release: List[Callable[[], None]] = []
        self._schedule_capture()

    # ------------------------------------------------------------ sub-batches
    @contextlib.contextmanager
    def sub_batch(self, index: int, w1: float = 0.5) -> Iterator[None]:
        """Backward passes inside accumulate into sub-batch ``index`` (0 gives g1, 1 gives g2).

        ``w1``: weight of g1 in ``g_avg = w1 g1 + (1 - w1) g2`` once sub-batch 1 ends (its share of the examples).
        """
        self.begin_sub_batch(index)
        try:
            yield
        finally:
            self.end_sub_batch(index, w1)

    def begin_sub_batch(self, index: int) -> None:
        """Start (or continue) sub-batch ``index``; see :meth:`sub_batch`."""
        self.engine.check_live()
        self.grads.begin(index)
        self.engine.group = index

    def end_sub_batch(self, index: int, w1: float = 0.5) -> None:
        """Close sub-batch ``index``; after sub-batch 1, ``p.grad`` holds ``g_avg = w1 g1 + (1 - w1) g2``."""
        with scope("sub_batches"):
            self.grads.end(index, w1)
        self.engine.group = -1

    def set_reduced_gradients(self, diffs: Dict[Tensor, Tensor], w1: float, present: Optional[set] = None) -> None:
        """Install ``g1 - g2`` (``{param: tensor}``) when ``p.grad`` already holds ``g_avg = w1 g1 + (1 - w1) g2``
        (multi-process reductions; ``present``: ``id``s of the parameters with a gradient on some rank when ``p.grad``
        cannot tell)."""
        self.grads.install_reduced(diffs, w1, present)

    @property
    def w1(self) -> float:
        """Weight of g1 in the last ``g_avg`` installed (0.5 unless the sub-batches differ in size)."""
        return self.grads.w1

    # ---------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> None:
        """Enable curvature capture (the Trainer calls this when it trains)."""
        self.engine.enabled = mode

    def eval(self) -> None:
        """Disable curvature capture (the Trainer calls this before evaluation)."""
        self.train(False)

    def mc_backward(
        self,
        logits: Tensor,
        generator: Optional[torch.Generator] = None,
        labels: Optional[Tensor] = None,
        label_shift: Optional[int] = None,
        weight: Union[float, Tensor] = 1.0,
    ) -> None:
        """``fisher_type="mc"``: sampled-label backward for S over real positions only.

        Call it inside :meth:`padding_mask` (when there is padding) after the
        forward pass; ``labels`` (optional) excludes positions labelled ``-100``;
        ``weight`` multiplies the sampled loss (a piece's share of its sub-batch,
        as its real loss is scaled). See :meth:`CurvatureEngine.mc_backward`.
        """
        self.engine.mc_backward(logits, generator, labels, label_shift, weight)

    @contextlib.contextmanager
    def padding_mask(self, mask: Optional[Tensor]) -> Iterator[None]:
        """Forward and backward passes inside exclude padded tokens (``mask``: ``(B, T)``, nonzero = real).

        The mask applies to every managed layer's 3-D ``(B, T, d)`` activation,
        whose ``(B, T)`` must equal the mask's (else ``ValueError``); for
        encoder-decoder models to the encoder's layers only.
        """
        previous = self.engine.padding_mask
        self.engine.set_padding_mask(mask)
        try:
            yield
        finally:
            self.engine.padding_mask = previous

    def set_grad_scale(self, scale: float) -> None:
        """Loss scale (fp16 GradScaler) of the coming backward passes, divided out of S."""
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"set_grad_scale(scale={scale!r}): expected a finite number > 0.")
        self.engine.grad_scale = float(scale)

    @property
    def capturing(self) -> bool:
        """Whether the coming forward/backward passes capture curvature (a factor-update step)."""
        return self.engine.capture

    def _schedule_capture(self) -> None:
        """Which layers the coming passes capture (the same on every rank): with the staggered capture (the default,
        ``FOPConfig.staggers_capture``) those whose step of the factor interval it is and those without factors yet;
        else every layer on the interval's first step."""
        position = self.global_step % self.config.factor_interval
        if not self.config.staggers_capture:
            self.engine.capture, self.engine.capture_only = position == 0, None
        else:
            due = self._plan.capture_names[position]
            unfactored = [layer.name for layer in self.engine.layers if layer.A is None]
            if unfactored:
                due = due.union(unfactored)
            self.engine.capture = bool(due)
            self.engine.capture_only = None if len(due) == len(self.engine.layers) else due
        self.engine.begin_step(self.global_step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and discard unfinished sub-batches and curvature captures."""
        super().zero_grad(set_to_none=set_to_none)
        self._discard_step_buffers()

    def on_release(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when this optimizer is released (front ends remove their own hooks then)."""
        self._on_release.append(callback)

    def release(self) -> None:
        """Remove the curvature hooks from the model; the optimizer cannot step afterwards.

        Also happens when the optimizer is garbage-collected, or when a new
        ``FOP`` is built on the same model (which takes the hooks over).
        """
        self.engine.release()
        for callback in self._on_release:
            callback()
        self._on_release = []
        self._discard_step_buffers()

    def sync_curvature(self) -> None:
        """Make every rank's curvature state the full, world-size-independent one (collective: every rank calls it;
        before saving a checkpoint; FOPTrainer and :func:`hf_fop.attach_accelerate` do). No-op in one process."""
        self.distributor.make_full()

    def _discard_step_buffers(self) -> None:
        self.grads.discard()
        self.engine.clear_capture()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One FOP (or K-FAC) update of managed layers and AdamW update of the rest."""
        self.engine.check_live()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        dual, all_diffs = self.grads.for_step()
        use_fop = self.config.mode == "fop" and dual
        diffs = {p: all_diffs[p] for group in self._kfac_groups() for p in group["params"] if p in all_diffs} if use_fop else {}
        t0 = time.perf_counter()
        with scope("factors"):
            new_factors = self.engine.finalize_capture() if self.engine.capture else {}
        seconds_finalize = time.perf_counter() - t0
        finite = self._local_finite(diffs, new_factors)
        if self.engine.capture:  # the capture exchange carries the finiteness vote
            t0 = time.perf_counter()
            with scope("factors"):
                new_factors, finite = self.distributor.exchange_factors(new_factors, finite)
            seconds_finalize += time.perf_counter() - t0
        else:
            with scope("checks"):
                finite = self.distributor.all_finite(finite)
        if not finite:
            self.counters["skipped_steps"] += 1
            self._discard_step_buffers()
            self._schedule_capture()
            return loss
        unfactored = [layer for layer in self.engine.layers if layer.A is None]  # the same layers on every rank
        if new_factors:
            with scope("factors"):
                self.engine.update_factors(new_factors)
            self.counters["factor_updates"] += 1  # steps
            self.counters["layer_factor_updates"] += len(new_factors)  # (layer, step) pairs
        k = self.config.inverse_interval
        fresh = [layer.name for layer in unfactored if layer.A is not None]  # first factors this step: no basis yet
        due = due_units(self._plan.units, self._plan.slots, self.global_step, k, self.config.stagger_refresh, fresh)
        if due:
            self.distributor.refresh_bases(due)
        if self.global_step % k == 0 and any(layer.A is not None for layer in self.engine.layers):
            self.counters["inverse_updates"] += 1  # inverse cycles begun
        self.engine.seconds += seconds_finalize
        fallback = self.config.mode == "fop" and not dual
        if fallback:
            self.counters["fallback_steps"] += 1
        self._record = StepRecord(fallback=fallback)
        if use_fop and self.grads.avg_norm is not None:  # read only by diagnostics(): no host sync here
            with scope("checks"):
                now, then = self.grads.managed_grad_norm(), self.grads.avg_norm
            self._record.diff_ratio = torch.where(then > 0, now / then.clamp_min(torch.finfo(now.dtype).tiny), 1.0)
        for group in self.param_groups:
            if group["kind"] == "kfac":
                with scope("precondition"):
                    self._kfac_group_step(group, diffs if use_fop else None)
            else:
                with scope("adamw"):
                    adamw_step(group, self.state, self._decay)
        self.global_step += 1
        self._discard_step_buffers()
        self._schedule_capture()
        return loss

    def _kfac_groups(self) -> List[Dict[str, Any]]:
        return [group for group in self.param_groups if group["kind"] == "kfac"]

    def _local_finite(self, diffs: Dict[Tensor, Tensor], new_factors: Dict[str, Any]) -> bool:
        """Whether this rank's gradients, differences and new factors are all finite: one fused 2-norm reduction per
        dtype and one host read; only when a norm is not finite (a NaN or an inf, or finite values so large that the
        sum of squares overflows) the exact max-abs decides (on this CPU the inf-norm reduction is about 20x slower)."""
        with scope("checks"):
            by_dtype: Dict[torch.dtype, List[Tensor]] = {}
            tensors = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            tensors += list(diffs.values()) + [f for pair in new_factors.values() for f in pair]
            for t in tensors:
                by_dtype.setdefault(t.dtype, []).append(t)
            if not by_dtype:
                return True
            # NaN propagates through the norms and max
            return _finite_norms(by_dtype.values(), 2.0) or _finite_norms(by_dtype.values(), float("inf"))

    def _kfac_group_step(self, group: Dict[str, Any], diffs: Optional[Dict[Tensor, Tensor]]) -> None:
        """Precondition and apply the managed layers' updates; ``diffs`` (g1 - g2) selects FOP.

        Each layer's direction is computed where the distributor says (every
        layer here in one process or with replicated curvature; its owner
        rank with curvature specialists, which share results and directions):
        its stats and KL term first (:func:`hf_fop.preconditioner.layer_direction`),
        then the trust-region scale over all layers, then the scaled direction in
        parameter coordinates, then momentum, weight decay and the update on every
        rank. Layers without an eigenbasis yet take the identity-preconditioned step
        (their gradient, outside the trust region: it has no curvature to measure).
        """
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        in_group = {id(p) for p in group["params"]}
        distributor = self.distributor
        layers = [
            layer for layer in self.engine.layers if id(layer.weight) in in_group and self.grads.has_gradient(layer.params)
        ]
        results: Dict[str, Optional[LayerResult]] = {}
        deltas: Dict[str, Tensor] = {}
        low: Dict[str, Tuple[KFACLayer, Tensor]] = {}  # layers rotated below float32: their estimated error
        for layer in layers:
            if distributor.owns(layer):
                dtype = rotation_dtype(self.config, layer)
                results[layer.name], dir_hat = layer_direction(layer, self.config, diffs, dtype)
                if dir_hat is None:  # no basis yet: the identity step, the gradient itself
                    deltas[layer.name] = layer_gradient(layer)
                    continue
                if dtype != torch.float32:
                    low[layer.name] = (layer, rotation_error(layer, results[layer.name], dir_hat, diffs, dtype))
                # back to parameter coordinates at once (no second copy of every direction)
                deltas[layer.name] = unrotate(dir_hat, layer.basis_s.q, layer.basis_a.q, dtype)
        if low:  # one host read for every low-precision layer of the step
            errors = torch.stack([error for _, error in low.values()]).tolist()
            for (name, (layer, _)), error in zip(low.items(), errors):
                if not error <= ROTATION_ERROR_LIMIT:  # NaN included: float32 decides
                    results[name], dir_hat = layer_direction(layer, self.config, diffs, torch.float32)
                    deltas[name] = unrotate(dir_hat, layer.basis_s.q, layer.basis_a.q)
                    self.counters["float32_rotations"] += 1
        results = distributor.share_results(layers, results)
        scale = kl_clip_scale(self.config.kl_clip, [r.kl for r in results.values() if r is not None], lr)
        if scale is not None:  # the trust region scales every preconditioned direction (not identity steps)
            clipped = [deltas[l.name] for l in layers if l.name in deltas and results[l.name] is not None]
            if clipped:
                torch._foreach_mul_(clipped, scale)
        deltas = distributor.share_directions(layers, deltas)
        for layer in layers:
            if results[layer.name] is None:
                self.counters["identity_layer_steps"] += 1
            dw, db = layer.split_matrix(deltas[layer.name])
            self._apply(((layer.weight, dw), (layer.bias, db)), lr, momentum, wd)
        self._record.results = {layer.name: results[layer.name] for layer in layers if results[layer.name] is not None}
        self._record.kl_clip_scale = scale

    def _apply(self, pairs: Any, lr: float, momentum: float, wd: float) -> None:
        """``p <- p (1 - lr wd [p decays]) - lr (momentum buffer of d)`` for each ``(p, d)`` (``p`` may be None)."""
        for p, d in pairs:
            if p is None:
                continue
            d = d.to(p.dtype)
            if momentum > 0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    state["momentum_buffer"] = buf = d.clone()
                else:
                    buf.mul_(momentum).add_(d)
                d = buf
            if wd > 0 and id(p) in self._decay:
                p.mul_(1 - lr * wd)
            p.add_(d, alpha=-lr)

    # ----------------------------------------------------------- diagnostics
    def diagnostics(self) -> Dict[str, float]:
        """Scalars of the last step: counters, per layer ``{name}/beta`` etc. and aggregates
        (:func:`hf_fop.diagnostics.summarize`); ``fallback`` is 1.0 when the last step fell back to K-FAC."""
        out: Dict[str, float] = {
            "step": float(self.global_step),
            "curvature_seconds": float(self.engine.seconds),
            "managed_layers": float(len(self.engine.layers)),
            "block_rotations": float(self.engine.block_rotations),  # this process's, since it started
            "block_rotations_skipped": float(self.engine.gated_skips),
        }
        out.update({k: float(v) for k, v in self.counters.items()})
        out.update(summarize(self._record))
        return out

    # ----------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Torch optimizer state plus ``"fop"``: step, counters and curvature (tensors and plain values only)."""
        if self.distributor.partial:
            warnings.warn(
                "FOP.state_dict(): this rank's curvature state is not the full one (factors not averaged over the ranks "
                "since the last update, or layers other ranks own), so this state is partial; call sync_curvature() on "
                "every rank first (FOPTrainer and attach_accelerate do before checkpoints).",
                RuntimeWarning,
                stacklevel=2,
            )
        state = super().state_dict()
        state["fop"] = {
            "global_step": self.global_step,
            "counters": dict(self.counters),
            "curvature_seconds": float(self.engine.seconds),
            "layers": self.engine.state_dict(),
            # rotation_dtype="auto": the timed answer the rotations' dtype hangs on, so that a resumed run (on another
            # machine, or where a second timing would decide otherwise) multiplies in the same dtype
            "native_bfloat16": {
                str(device): native_bfloat16(device) for device in timed_bfloat16_devices(self.config, self.engine.layers)
            },
        }
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        fop_state = state_dict.pop("fop", None)
        if fop_state is None:
            raise ValueError("This state_dict was not written by hf_fop.FOP (no 'fop' entry).")
        super().load_state_dict(state_dict)
        self.engine.load_state_dict(fop_state["layers"])
        self.global_step = int(fop_state["global_step"])
        self.counters = {**dict.fromkeys(_COUNTERS, 0), **{k: int(v) for k, v in fop_state["counters"].items()}}
        for state in self.state.values():  # checkpoints of earlier versions hold the AdamW step as a tensor
            if torch.is_tensor(state.get("step")):
                state["step"] = int(state["step"])
        self.engine.seconds = float(fop_state.get("curvature_seconds", 0.0))
        timed = {str(device): device for device in timed_bfloat16_devices(self.config, self.engine.layers)}
        for name, answer in fop_state.get("native_bfloat16", {}).items():  # absent from checkpoints before 2026-12-07
            if name in timed:
                pin_native_bfloat16(timed[name], bool(answer))
        self.distributor.state_loaded()
        self._discard_step_buffers()
        self._record = StepRecord()
        self._schedule_capture()

    @property
    def layers(self) -> List[KFACLayer]:
        """The managed layers (name, module, curvature state)."""
        return self.engine.layers


def _finite_norms(groups: Iterable[List[Tensor]], order: float) -> bool:
    """Whether the largest ``order``-norm of the tensors of every same-dtype group is finite (one host read)."""
    norms = [torch.stack(torch._foreach_norm(ts, order)).max().float() for ts in groups]
    return bool(torch.isfinite(torch.stack(norms).max()))


def _unique_params(model: nn.Module) -> List[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
