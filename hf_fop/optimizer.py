"""The FOP optimizer: K-FAC/FOP on Linear, Conv2d and Conv1D layers, AdamW for the rest.

Usage (plain PyTorch)::

    opt = FOP(model, lr=0.05, damping=1e-3)
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
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .config import FOPConfig
from .curvature import CurvatureEngine, KFACLayer
from .fop_math import LayerStats, fop_direction_eigen, kfac_direction_eigen, rotate, unrotate

_IDLE, _IN0, _AFTER0, _IN1, _AFTER1 = "idle", "in0", "after0", "in1", "after1"
_COUNTERS = ("factor_updates", "inverse_updates", "skipped_steps", "fallback_steps", "identity_layer_steps")
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
        accelerator: an ``accelerate.Accelerator`` to train with in a plain
            Accelerate loop: FOP then routes the accumulation window into its
            sub-batches and reduces across processes by itself
            (:mod:`hf_fop.accelerate_loop`). Not needed with ``FOPTrainer``.

    Param groups: ``param_groups[i]["kind"]`` is ``"kfac"`` (managed layers,
    ``lr`` = eta0) or ``"adamw"``; both carry ``lr`` for LR schedulers.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Optional[FOPConfig] = None,
        *,
        decay_parameters: Optional[Iterable[str]] = None,
        accelerator: Any = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FOP expects the model (a torch.nn.Module), got {type(model).__name__}.")
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
        self._layer_params = [p for layer in self.engine.layers for p in layer.params]
        names = set(decay_parameter_names(model) if decay_parameters is None else decay_parameters)
        self._decay = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in names}
        """``id``s of the parameters that get weight decay."""
        self.global_step = 0
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self._phase = _IDLE
        self._g1: Dict[Tensor, Tensor] = {}
        self._diff: Dict[Tensor, Tensor] = {}
        self._avg_norm: Optional[Tensor] = None
        """Norm of the managed layers' g_avg when the sub-batches ended (FOP mode; for the logged values)."""
        self._diff_ratio: Optional[Tensor] = None
        """``||g_avg at step()|| / ||g_avg when the sub-batches ended||`` of the last FOP step (0-dim, on device)."""
        self.w1 = 0.5
        """Weight of g1 in ``g_avg = w1 g1 + (1 - w1) g2`` (0.5 unless groups are unequal)."""
        self.distributor: Optional[Any] = None
        """Multi-process curvature (:class:`hf_fop.distributed.ReplicatedCurvature` or
        :class:`hf_fop.specialists.SpecialistCurvature`); ``None``: one process. Collectives, every rank calls them:
        ``exchange_factors(new) -> (factors to update with, all ranks finite)`` on factor steps,
        ``refresh_bases(only_missing)`` for eigendecompositions, ``share_results(layers, results)`` and
        ``share_directions(layers, deltas)`` in the step, ``all_finite(this rank's gradients are finite)`` before
        it; local: ``computes(layer)`` (this rank computes the
        layer's direction), ``has_gradient(layer)`` (the layer has a gradient on some rank), ``state_loaded()`` after :meth:`load_state_dict`, ``pending`` (this rank's curvature
        state is not the full one)."""
        self._last_stats: Dict[str, LayerStats] = {}
        self._last_dampings: Dict[str, Any] = {}
        self._last_kl_clip_scale: Optional[Tensor] = None
        self._last_fallback = False
        self._schedule_capture()
        self.accelerate_router: Optional[Any] = None
        """The :class:`hf_fop.accelerate_loop.AccelerateRouter` when built with ``accelerator=``."""
        if accelerator is not None:
            from .accelerate_loop import AccelerateRouter

            self.accelerate_router = AccelerateRouter(self, model, accelerator)

    # ------------------------------------------------------------ sub-batches
    def _all_params(self) -> Iterator[Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    @contextlib.contextmanager
    def sub_batch(self, index: int) -> Iterator[None]:
        """Backward passes inside accumulate into sub-batch ``index`` (0 gives g1, 1 gives g2)."""
        self.begin_sub_batch(index)
        try:
            yield
        finally:
            self.end_sub_batch(index)

    def begin_sub_batch(self, index: int) -> None:
        """Start (or continue) sub-batch ``index``; see :meth:`sub_batch`."""
        self.engine.check_live()
        if index not in (0, 1) or isinstance(index, bool):
            raise ValueError(f"sub_batch index must be 0 (gives g1) or 1 (gives g2), got {index!r}.")
        if index == 0 and self._phase not in (_IDLE, _AFTER0):
            raise RuntimeError(
                f"sub_batch(0) cannot start now (state: {self._phase}): sub-batch 1 of this step was already "
                "given. Call step() (or zero_grad() to discard) before starting the next step's sub-batch 0."
            )
        if index == 1 and self._phase not in (_AFTER0, _AFTER1):
            raise RuntimeError(
                f"sub_batch(1) cannot start now (state: {self._phase}): run sub_batch(0) first; "
                "sub-batch 0 gives g1 and sub-batch 1 gives g2."
            )
        if index == 0 and self._phase == _IDLE and any(p.grad is not None for p in self._all_params()):
            raise RuntimeError(
                "sub_batch(0) started while parameters already hold gradients from a plain backward(); "
                "call zero_grad() first or run every backward of the step inside sub_batch()."
            )
        if index == 1:
            for p in self._all_params():  # continue g2 from what sub-batch 1 gave so far (None at first)
                p.grad = (self._g1[p] - self._diff[p]) if (self._phase == _AFTER1 and p in self._diff) else None
        self._phase = _IN0 if index == 0 else _IN1
        self.engine.group = index

    def end_sub_batch(self, index: int) -> None:
        """Close sub-batch ``index``; after sub-batch 1, ``p.grad`` holds ``g_avg``."""
        expected = _IN0 if index == 0 else _IN1
        if self._phase != expected:
            raise RuntimeError(f"end_sub_batch({index}) without a matching begin_sub_batch({index}).")
        self.engine.group = -1
        if index == 0:
            for p in self._all_params():
                if p.grad is not None:
                    self._g1[p] = p.grad if p not in self._g1 else self._g1[p] + p.grad
                    p.grad = None
            self._phase = _AFTER0
            return
        self.set_dual_gradients({p: p.grad for p in self._all_params() if p.grad is not None}, keep_g1=True)

    def set_dual_gradients(
        self, g2: Dict[Tensor, Tensor], g1: Optional[Dict[Tensor, Tensor]] = None, keep_g1: bool = False
    ) -> None:
        """Install g1 and g2 (``{param: gradient}``); sets ``p.grad = w1 g1 + (1 - w1) g2``.

        Used by :meth:`end_sub_batch` and by the distributed reduction. A
        parameter missing from one side counts as a zero gradient there.
        """
        if g1 is not None:
            self._g1 = dict(g1)
        w1 = self.w1
        params, firsts, seconds = [], [], []
        for p in self._all_params():
            a, b = self._g1.get(p), g2.get(p)
            if a is None and b is None:
                continue
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            if a.shape != b.shape:
                raise RuntimeError(
                    f"g1 and g2 differ in shape for a parameter of shape {tuple(p.shape)}: "
                    f"{tuple(a.shape)} vs {tuple(b.shape)}."
                )
            params.append(p)
            firsts.append(a)
            seconds.append(b)
        if params:  # g1 - g2 and w1 g1 + (1 - w1) g2, batched with torch._foreach_*
            diffs = torch._foreach_sub(firsts, seconds)
            avgs = torch._foreach_lerp(firsts, seconds, 1 - w1)  # g1 + (1 - w1)(g2 - g1), one pass
            for p, a, d, g in zip(params, firsts, diffs, avgs):
                self._g1[p] = a
                self._diff[p] = d
                p.grad = g
        self._avg_norm = self._managed_grad_norm() if self.config.mode == "fop" else None
        self._phase = _AFTER1
        if not keep_g1:
            self._g1 = {}

    def set_reduced_gradients(self, diffs: Dict[Tensor, Tensor]) -> None:
        """Install ``g1 - g2`` (``{param: tensor}``) when ``p.grad`` already holds ``g_avg`` (the DDP comm hook)."""
        self._g1 = {}
        self._diff = dict(diffs)
        self._avg_norm = self._managed_grad_norm() if self.config.mode == "fop" else None
        self._phase = _AFTER1

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
        self.engine.capture = self.global_step % self.config.factor_interval == 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and discard unfinished sub-batches and curvature captures."""
        super().zero_grad(set_to_none=set_to_none)
        self._discard_step_buffers()

    def release(self) -> None:
        """Remove the curvature hooks from the model; the optimizer cannot step afterwards.

        Also happens when the optimizer is garbage-collected, or when a new
        ``FOP`` is built on the same model (which takes the hooks over).
        """
        self.engine.release()
        if self.accelerate_router is not None:
            self.accelerate_router.release()
        self._discard_step_buffers()

    def _discard_step_buffers(self) -> None:
        self._g1, self._diff, self._avg_norm = {}, {}, None
        self._phase = _IDLE
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
        if self._phase in (_IN0, _IN1):
            raise RuntimeError("step() called inside a sub_batch() block; call it after the block ends.")
        if self._phase == _AFTER0:  # only one sub-batch: K-FAC on g1
            for p, g in self._g1.items():
                p.grad = g
            self._g1 = {}
        dual = self._phase == _AFTER1
        use_fop = self.config.mode == "fop" and dual
        diffs = {p: self._diff[p] for p in self._layer_params if p in self._diff} if use_fop else {}
        t0 = time.perf_counter()
        new_factors = self.engine.finalize_capture() if self.engine.capture else {}
        factors_finite = True
        if self.engine.capture and self.distributor is not None:
            new_factors, factors_finite = self.distributor.exchange_factors(new_factors)
        seconds_finalize = time.perf_counter() - t0
        if not factors_finite or not self._all_finite(diffs, new_factors):
            self.counters["skipped_steps"] += 1
            self._discard_step_buffers()
            self._schedule_capture()
            return loss
        t0 = time.perf_counter()
        fresh = [layer for layer in self.engine.layers if layer.A is None]  # the same layers on every rank
        if new_factors:
            self.engine.update_factors(new_factors)
            self.counters["factor_updates"] += 1
        inverse = self.global_step % self.config.inverse_interval == 0 and any(layer.A is not None for layer in self.engine.layers)
        if inverse or any(layer.A is not None for layer in fresh):  # fresh: first factors this step, no basis yet
            self._refresh_bases(only_missing=not inverse)
        if inverse:
            self.counters["inverse_updates"] += 1
        self.engine.seconds += seconds_finalize
        self._last_fallback = self.config.mode == "fop" and not dual
        if self._last_fallback:
            self.counters["fallback_steps"] += 1
        self._diff_ratio = None
        if use_fop and self._avg_norm is not None:  # read only by diagnostics(): no host sync here
            now = self._managed_grad_norm()
            self._diff_ratio = torch.where(self._avg_norm > 0, now / self._avg_norm.clamp_min(torch.finfo(now.dtype).tiny), 1.0)
        for group in self.param_groups:
            if group["kind"] == "kfac":
                self._kfac_group_step(group, diffs if use_fop else None)
            else:
                self._adamw_group_step(group)
        self.global_step += 1
        self._discard_step_buffers()
        self._schedule_capture()
        return loss

    def _managed_grad_norm(self) -> Tensor:
        """Euclidean norm of the managed layers' ``p.grad`` (0-dim float32 tensor on device; no host sync)."""
        grads = [p.grad for p in self._layer_params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.stack([n.float() for n in torch._foreach_norm(grads)]).norm()

    def _refresh_bases(self, only_missing: bool) -> None:
        """Eigendecompose the factors (``only_missing``: of layers without a basis); the distributor decides where."""
        if self.distributor is not None:
            self.distributor.refresh_bases(only_missing)
        else:
            self.engine.update_eigenbases(only_missing=only_missing)

    def _all_finite(self, diffs: Dict[Tensor, Tensor], new_factors: Dict[str, Any]) -> bool:
        """One fused max-abs reduction per dtype over gradients, differences and new factors; one host read."""
        by_dtype: Dict[torch.dtype, List[Tensor]] = {}
        tensors = [p.grad for p in self._all_params() if p.grad is not None] + list(diffs.values())
        tensors += [f for pair in new_factors.values() for f in pair]
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        if not by_dtype:
            return True if self.distributor is None else self.distributor.all_finite(True)
        maxima = [torch.stack(torch._foreach_norm(ts, float("inf"))).max().float() for ts in by_dtype.values()]
        finite = bool(torch.isfinite(torch.stack(maxima).max()))  # NaN propagates through max: one sync per step
        return finite if self.distributor is None else self.distributor.all_finite(finite)

    def _kfac_group_step(self, group: Dict[str, Any], diffs: Optional[Dict[Tensor, Tensor]]) -> None:
        """Precondition and apply the managed layers' updates; ``diffs`` (g1 - g2) selects FOP.

        Each layer's direction is computed where the distributor says (every
        layer here in one process or with replicated curvature; its owner
        rank with curvature specialists, which share results and directions):
        its stats and KL term first (:meth:`_layer_result`), then the
        trust-region scale over all layers (:meth:`_kl_clip_scale`), then the
        scaled direction in parameter coordinates, then momentum, weight decay
        and the update on every rank. Layers without an eigenbasis yet take
        the identity-preconditioned step (their gradient, outside the trust
        region: it has no curvature to measure).
        """
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        in_group = {id(p) for p in group["params"]}
        distributor = self.distributor
        layers = [
            layer for layer in self.engine.layers if id(layer.weight) in in_group
            and (distributor.has_gradient(layer) if distributor is not None else layer.has_local_gradient)
        ]
        results: Dict[str, Optional[LayerResult]] = {}
        dir_hats: Dict[str, Tensor] = {}
        for layer in layers:
            if distributor is None or distributor.computes(layer):
                results[layer.name], dir_hat = self._layer_result(layer, diffs)
                if dir_hat is not None:
                    dir_hats[layer.name] = dir_hat
        if distributor is not None:
            results = distributor.share_results(layers, results)
        scale = self._kl_clip_scale([r.kl for r in results.values() if r is not None], lr)
        deltas: Dict[str, Tensor] = {}
        for layer in layers:
            if layer.name in dir_hats:
                dir_hat = dir_hats[layer.name] if scale is None else dir_hats[layer.name] * scale
                deltas[layer.name] = unrotate(dir_hat, layer.basis_s.q, layer.basis_a.q)
            elif distributor is None or distributor.computes(layer):  # identity step: the gradient itself
                deltas[layer.name] = layer.grad_matrix(_grad(layer.weight), _grad(layer.bias))
        if distributor is not None:
            deltas = distributor.share_directions(layers, deltas)
        for layer in layers:
            if results[layer.name] is None:
                self.counters["identity_layer_steps"] += 1
            dw, db = layer.split_matrix(deltas[layer.name])
            self._apply(((layer.weight, dw), (layer.bias, db)), lr, momentum, wd)
        done = [(layer.name, results[layer.name]) for layer in layers if results[layer.name] is not None]
        self._last_stats = {name: r.stats for name, r in done}
        self._last_dampings = {name: r.damping for name, r in done}
        self._last_kl_clip_scale = scale

    def _layer_result(self, layer: KFACLayer, diffs: Optional[Dict[Tensor, Tensor]]) -> Tuple[Optional["LayerResult"], Optional[Tensor]]:
        """``(stats, damping and KL term, direction in the eigenbasis (out, in))``; ``(None, None)`` without a basis."""
        if layer.basis_a is None or layer.basis_s is None:
            return None, None
        w, b = layer.weight, layer.bias
        q_s, s = layer.basis_s.q, layer.basis_s.eigenvalues
        q_a, a = layer.basis_a.q, layer.basis_a.eigenvalues
        damping = self._layer_damping(s, a)
        g_hat = rotate(layer.grad_matrix(_grad(w), _grad(b)), q_s, q_a)
        if diffs is not None and (w in diffs or (b is not None and b in diffs)):
            d_w = diffs[w] if w in diffs else torch.zeros_like(w)
            d_hat = rotate(layer.grad_matrix(d_w, diffs.get(b) if b is not None else None), q_s, q_a)
            dir_hat, st = fop_direction_eigen(
                g_hat, d_hat, s, a, damping, self.config.eps, self.config.use_beta, self.config.use_eta,
                self.config.projection_metric,
            )
        else:
            dir_hat, st = kfac_direction_eigen(g_hat, s, a, damping)
        kl = None
        if self.config.kl_clip is not None:  # Delta^T M Delta = the KL split + lambda ||Delta||^2 (rotation keeps norms)
            flat = dir_hat.reshape(-1)
            kl = st.kl_base + st.kl_cross + st.kl_orth + damping * torch.dot(flat, flat)
        return LayerResult(st, damping, kl), dir_hat

    # ------------------------------------------------- damping, trust region
    def _layer_damping(self, s: Tensor, a: Tensor) -> Any:
        """lambda of one layer: ``damping`` (absolute), or ``damping * mean(eig A) * mean(eig S)`` (relative).

        ``s``, ``a``: eigenvalues of S ``(out,)`` and A ``(in,)``. The relative
        value is a 0-dim tensor (no host sync), recomputed from the stored
        eigenvalues, so it changes only at an eigendecomposition and a resumed
        run sees the same bits. It is floored at the smallest normal float32
        so that a layer whose factors are all zero still has ``M > 0``.
        """
        if self.config.damping_mode == "absolute":
            return self.config.damping
        mean_eig = (a.mean() * s.mean()).clamp_min(torch.finfo(torch.float32).tiny)
        return self.config.damping * mean_eig

    def _kl_clip_scale(self, terms: List[Tensor], lr: float) -> Optional[Tensor]:
        """Trust-region factor ``nu = min(1, sqrt(kl_clip / (lr^2 sum_l Delta_l^T M_l Delta_l)))`` or ``None``.

        ``terms``: per layer ``Delta_l^T M_l Delta_l`` (0-dim, :meth:`_layer_result`), ``Delta_l`` the layer's
        direction for lr = 1 (before momentum) and ``M_l = A (x) S + lambda_l I`` the damped curvature that
        preconditions it (as PyTorch K-FAC implementations do: their ``v . g`` is ``Delta^T M Delta``),
        computed as ``kl_base + kl_cross + kl_orth + lambda ||Delta||^2``. A 0-dim tensor, no host sync.
        """
        if self.config.kl_clip is None or not terms:
            return None
        total = (torch.stack(terms).sum() * (lr * lr)).clamp_min(0.0)  # rounding cannot make it negative
        return torch.clamp(torch.sqrt(self.config.kl_clip / total), max=1.0)

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

    def _adamw_group_step(self, group: Dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        params, grads, avgs, sqs, ts = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0  # a Python int: no tensor to read back
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            ts.append(state["step"])
        if not params:
            return
        # Same element-wise operations as the per-parameter form, batched with torch._foreach_*.
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_div(sqs, [1 - beta2**t for t in ts])
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        decayed = [p for p in params if id(p) in self._decay]
        if wd > 0 and decayed:
            torch._foreach_mul_(decayed, 1 - lr * wd)
        torch._foreach_addcdiv_(params, avgs, denoms, [-lr / (1 - beta1**t) for t in ts])

    # ----------------------------------------------------------- diagnostics
    def diagnostics(self) -> Dict[str, float]:
        """Scalars of the last step: per layer ``{name}/beta`` etc., aggregates and counters.

        ``beta``/``eta``/``s_proj`` aggregates are means over layers; ``damping_min``/``damping_max``
        the range of the layers' lambda; ``kl_clip_scale`` the trust-region factor nu (with ``kl_clip``); ``kl_*``
        are sums over layers of the KL-norm split (per unit lr^2);
        ``fallback`` is 1.0 when the last step fell back to K-FAC (one sub-batch).
        ``beta`` and ``s_proj`` are those of the gradients ``step()`` used:
        when ``p.grad`` was scaled by ``c`` after the backward passes (clipping,
        fp16 unscaling), of ``c g1`` and ``c g2``.
        """
        out: Dict[str, float] = {
            "step": float(self.global_step),
            "curvature_seconds": float(self.engine.seconds),
            "fallback": float(self._last_fallback),
            "managed_layers": float(len(self.engine.layers)),
        }
        out.update({k: float(v) for k, v in self.counters.items()})
        if self._last_stats:
            names = list(self._last_stats)
            fields = ("beta", "eta", "s_proj", "kl_base", "kl_cross", "kl_orth")
            stacked = torch.stack([torch.stack([getattr(self._last_stats[n], f).float() for f in fields]) for n in names])
            if self._diff_ratio is not None:
                # step() paired c g_avg with g1 - g2 as accumulated: its beta is c times, its s_proj 1/c times
                # that of (c g1, c g2); eta and the KL terms are the same
                c = self._diff_ratio.float().to(stacked.device)
                stacked[:, :3] *= torch.stack([torch.where(c > 0, 1 / c, 1.0), torch.ones_like(c), c])
            stacked = stacked.cpu()
            for i, name in enumerate(names):
                for j, f in enumerate(fields):
                    out[f"{name}/{f}"] = float(stacked[i, j])
            means = stacked.mean(0)
            sums = stacked.sum(0)
            for j, f in enumerate(fields):
                out[f"{f}_mean" if j < 3 else f] = float(means[j] if j < 3 else sums[j])
            out.update(self._damping_diagnostics())
        return out

    def _damping_diagnostics(self) -> Dict[str, float]:
        """``damping_min``/``damping_max`` over layers of the last step and ``kl_clip_scale`` (with ``kl_clip``)."""
        values = list(self._last_dampings.values())
        out: Dict[str, float] = {}
        if values and not any(torch.is_tensor(v) for v in values):
            out["damping_min"], out["damping_max"] = min(values), max(values)
        elif values:  # relative damping: 0-dim tensors on the device, read back in one transfer
            lams = torch.stack(values).float()
            out["damping_min"], out["damping_max"] = (float(v) for v in torch.stack([lams.min(), lams.max()]).cpu())
        if self._last_kl_clip_scale is not None:
            out["kl_clip_scale"] = float(self._last_kl_clip_scale)
        return out

    # ----------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Torch optimizer state plus ``"fop"``: step, counters and curvature (tensors and plain values only)."""
        if self.distributor is not None and self.distributor.pending:
            warnings.warn(
                "FOP.state_dict(): this rank's curvature state is not the full one (factors not averaged over the ranks "
                "since the last update, or layers other ranks own), so this state is partial; call sync_factors() on "
                "every rank first (FOPTrainer does before checkpoints).",
                RuntimeWarning,
                stacklevel=2,
            )
        state = super().state_dict()
        state["fop"] = {
            "global_step": self.global_step,
            "counters": dict(self.counters),
            "curvature_seconds": float(self.engine.seconds),
            "layers": self.engine.state_dict(),
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
        if self.distributor is not None:
            self.distributor.state_loaded()
        self._discard_step_buffers()
        self._last_stats, self._last_dampings, self._last_kl_clip_scale = {}, {}, None
        self._diff_ratio = None
        self._schedule_capture()

    @property
    def layers(self) -> List[KFACLayer]:
        """The managed layers (name, module, curvature state)."""
        return self.engine.layers


@dataclass
class LayerResult:
    """What every rank needs of one layer's direction besides the direction itself (shared by the distributor)."""

    stats: LayerStats
    damping: Any
    """lambda: a float (absolute damping) or a 0-dim tensor (relative)."""
    kl: Optional[Tensor]
    """``Delta^T M Delta`` of the layer's direction for lr = 1 (0-dim), ``None`` without ``kl_clip``."""


def _grad(p: Optional[Tensor]) -> Optional[Tensor]:
    if p is None:
        return None
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _unique_params(model: nn.Module) -> List[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
