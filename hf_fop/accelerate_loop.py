"""FOP in a plain Accelerate training loop (no Trainer): the second front end.

Usage (transformers' ``run_*_no_trainer.py`` style)::

    accelerator = Accelerator(gradient_accumulation_steps=2)
    opt = FOP(model, accelerator=accelerator, lr=0.005, damping=1e-3)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    for batch in loader:
        with accelerator.accumulate(model):
            for piece in sub_batches(opt, batch):  # the batch itself unless it must be split
                loss = model(**piece).loss
                accelerator.backward(loss)
            opt.step(); sched.step(); opt.zero_grad()

``FOP(..., accelerator=...)`` attaches an :class:`AccelerateRouter`, which
routes every training forward/backward of the (unwrapped) model into FOP's
sub-batches by itself:

* one process, ``gradient_accumulation_steps = n >= 2``: the first
  ``ceil(n/2)`` micro-batches of the accumulation window form sub-batch 1
  (g1), the rest sub-batch 2 (g2);
* one process, ``n = 1``: :func:`sub_batches` splits the batch into halves
  (first half g1, second half g2); without it FOP raises, since every step
  would silently be a K-FAC step;
* several processes: each rank's window stays whole; after the window's last
  backward the :class:`~hf_fop.distributed.DualGradientReducer` gives g1 from
  the even ranks and g2 from the odd ranks. DDP's gradient averaging is
  switched off for the model (what ``accelerator.no_sync`` does, for every
  micro-batch), so DDP never averages g1 into g2;
* ``mode="kfac"``: plain backward (DDP averages), factors averaged over ranks.

Scaling. ``accelerator.backward`` divides each micro-batch loss by ``n``. At the
end of the window's last backward the router rescales each sub-batch gradient
to the mean of its micro-batch losses' gradients (times ``n / c_j`` for ``c_j``
micro-batches) and sets ``w1`` to sub-batch 1's share (micro-batch counts, or
example counts of the two halves), so ``g_avg`` (what ``p.grad`` holds when the
window ends, and what ``accelerator.clip_grad_norm_`` clips) is the mean
gradient of the window: accelerate's gradient for a full window. Curvature S is
captured with the same scaling divided out (and the GradScaler's scale, fp16).
``mode="kfac"`` keeps accelerate's gradient unchanged. The routing is the
:class:`FOPTrainer`'s for even ``n``, for ``n = 1`` and for several processes,
and the two front ends then give the same parameters on the same sub-batches
(``tests/test_accelerate_loop.py``). For odd ``n >= 3`` the Trainer splits
every micro-batch in halves; here whole micro-batches are routed (g1 gets the
extra one, ``w1 = ceil(n/2) / n``), since accelerate hands over one micro-batch
at a time.

``AcceleratedOptimizer.step``/``zero_grad`` act only when accelerate syncs
(the window's last micro-batch), so FOP steps once per window. A window whose
step never ran (fp16 overflow; the loop's ``zero_grad`` discards it) is counted
in ``counters["skipped_steps"]``. ``accelerator.save_state``/``load_state``
checkpoint FOP with the rest (its state is full and identical on every rank).

An ``attention_mask`` keyword argument of the model call (``model(**batch)``)
keeps padded tokens out of the curvature, as in FOPTrainer.

Requirements: one training forward of the model per micro-batch (piece), and
the window's last backward passes through the model's output. Evaluation
(``model.eval()`` or ``torch.no_grad()``) is not routed. With DDP's averaging
off, DDP does not broadcast module buffers either (BatchNorm running statistics
stay per rank, as under FOPTrainer). ``fisher_type="mc"``:
the router runs the sampled-label backward on the output's ``logits`` after
each forward of a curvature step.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .distributed import DualGradientReducer, world

__all__ = ["AccelerateRouter", "sub_batches", "unwrap_fop"]


def unwrap_fop(optimizer: Any) -> Any:
    """The FOP behind ``optimizer`` (accelerate's ``AcceleratedOptimizer`` or FOP itself); else ``optimizer``."""
    from .optimizer import FOP

    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, FOP) else optimizer


def sub_batches(optimizer: Any, batch: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Pieces of ``batch`` to run forward/backward on, one after the other.

    Two halves along the batch dimension when FOP needs them (``mode="fop"``,
    one process, ``gradient_accumulation_steps == 1``): the first half gives
    g1, the second g2, and ``w1`` is the first half's share of the examples.
    Otherwise (accumulation window routing, several processes, K-FAC mode, or
    an optimizer that is not FOP) the batch itself, once. A batch of one
    example cannot be split: that step is a K-FAC step (a warning; counted in
    ``counters["fallback_steps"]``).
    """
    from .trainer import batch_size_of, split_batch

    opt = unwrap_fop(optimizer)
    router: Optional[AccelerateRouter] = getattr(opt, "accelerate_router", None)
    if router is None or not router.splits_batches():
        yield batch
        return
    size = batch_size_of(batch)
    if size < 2:
        warnings.warn(
            f"sub_batches: a batch of size {size} cannot be split into FOP's two sub-batches; this step is a K-FAC step.",
            UserWarning,
            stacklevel=2,
        )
        pieces: List[Mapping[str, Any]] = [batch]
    else:
        pieces = list(split_batch(batch, size // 2))
    for index, piece in enumerate(pieces):
        router._piece = (index, float(batch_size_of(piece)), index == len(pieces) - 1)
        try:
            yield piece
        finally:
            router._piece = None
    router.close()


class AccelerateRouter:
    """Routes a plain Accelerate loop's backward passes into FOP's sub-batches (see module docstring).

    Built by ``FOP(model, accelerator=...)``; reach it as ``fop.accelerate_router``.
    Hooks: a forward pre-hook and a forward hook on ``model``, a step pre-hook
    and post-hook on the optimizer.
    """

    def __init__(self, opt: Any, model: nn.Module, accelerator: Any) -> None:
        for name in ("gradient_accumulation_steps", "sync_gradients", "unwrap_model", "num_processes"):
            if not hasattr(accelerator, name):
                raise TypeError(
                    f"FOP(accelerator=...) expects an accelerate.Accelerator, got {type(accelerator).__name__} "
                    f"(no attribute {name!r})."
                )
        _, world_size = world()
        if world_size != accelerator.num_processes:
            raise ValueError(
                f"FOP(accelerator=...): the accelerator runs {accelerator.num_processes} processes but the default "
                f"process group has {world_size}; create the Accelerator before FOP."
            )
        self.opt = opt
        self.model = model
        self.accelerator = accelerator
        self.distributed = world_size > 1
        self.reducer: Optional[DualGradientReducer] = None
        """The dual-gradient reduction (several processes)."""
        if self.distributed:
            self.reducer = DualGradientReducer(opt)
            if opt.config.mode == "fop":
                self.reducer.install()
            else:  # K-FAC: DDP averages the gradients; only the factors need averaging
                self.reducer.install_curvature()
        self._state = "idle"  # "idle" (no window), "open" (window running), "closed" (last backward done)
        self._open_group: Optional[int] = None  # sub-batch FOP currently accumulates into
        self._counts: Dict[int, int] = {}  # micro-batches (pieces) per gradient group of this window
        self._weights: Dict[int, float] = {}  # group weights for w1 (micro-batch counts, or half sizes)
        self._marker: Optional[Tuple[int, int]] = None  # (global_step, skipped_steps) at the window's start
        self._close_pending = False  # the window's last forward ran: close at the end of its backward
        self._close_queued = False
        self._piece: Optional[Tuple[int, float, bool]] = None  # set by sub_batches: (index, examples, is last)
        self._mask_scope = contextlib.ExitStack()  # opt.padding_mask(...) from a forward's start to its end
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
            opt.register_step_pre_hook(lambda *_: self.close()),
            opt.register_step_post_hook(lambda *_: self._after_step()),
        ]
        if self.reducer is not None:  # every rank enters save_state: average the ranks' factors before it saves
            self._handles.append(accelerator.register_save_state_pre_hook(lambda *_: self.reducer.sync_factors()))

    # -------------------------------------------------------------- queries
    def splits_batches(self) -> bool:
        """Whether :func:`sub_batches` splits: ``mode="fop"``, one process, ``gradient_accumulation_steps == 1``."""
        return (
            self.opt.config.mode == "fop" and not self.distributed and self.accelerator.gradient_accumulation_steps == 1
        )

    # ---------------------------------------------------------------- hooks
    def _routed(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self.opt.engine.enabled

    def _before_forward(self, module: nn.Module, args: Any, kwargs: Dict[str, Any]) -> None:
        if not self._routed(module):
            return
        mask = kwargs.get("attention_mask")  # padded tokens stay out of the curvature, as in FOPTrainer
        self._mask_scope.close()  # a previous forward that raised left its mask set
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        self._mask_scope.enter_context(self.opt.padding_mask(mask))
        if self._state != "open":
            self._start_window()
        opt = self.opt
        n = int(self.accelerator.gradient_accumulation_steps)
        piece = self._piece
        last = bool(self.accelerator.sync_gradients) and (piece is None or piece[2])
        if self.distributed and opt.config.mode == "fop":
            self._switch_off_ddp_averaging()
        if self.distributed or opt.config.mode == "kfac":
            group, weight = -1, 1.0
        elif piece is not None:
            group, weight = piece[0], piece[1]
        elif n == 1:
            raise RuntimeError(
                "FOP needs two sub-batches per step, but gradient_accumulation_steps=1 on one process gives one batch "
                "per step: run the forward/backward as `for piece in sub_batches(opt, batch): ...` "
                "(hf_fop.accelerate_loop.sub_batches splits the batch into halves), or use "
                "Accelerator(gradient_accumulation_steps >= 2) (the window's first half gives g1), or FOP(mode='kfac')."
            )
        else:
            k = sum(self._counts.values())
            group, weight = (0 if k < (n + 1) // 2 else 1), 1.0
        if group != self._open_group and group >= 0:
            if self._open_group == 0:
                self._end_group(0)
            opt.begin_sub_batch(group)
            self._open_group = group
        self._counts[group] = self._counts.get(group, 0) + 1
        self._weights[group] = self._weights.get(group, 0.0) + weight
        if opt.capturing:  # read only by the curvature hooks: no host read of the scale on other steps
            scaler = getattr(self.accelerator, "scaler", None)
            scale = float(scaler.get_scale()) if scaler is not None else 1.0
            opt.engine.grad_scale = scale / n  # accelerator.backward divides the loss by n; the scaler multiplies it
        self._close_pending = last

    def _after_forward(self, module: nn.Module, args: Any, kwargs: Dict[str, Any], output: Any) -> None:
        if not self._routed(module):
            return
        if self.opt.config.fisher_type == "mc" and self.opt.capturing:
            labels = kwargs.get("labels")  # positions labelled -100 are left out of the sampled loss
            self.opt.mc_backward(_logits(output), labels=labels if isinstance(labels, Tensor) else None)
        self._mask_scope.close()  # the layers' backward hooks kept their own reference to the mask
        if not self._close_pending:
            return
        self._close_pending = False
        self._close_queued = False
        tensors = [t for t in _tensors(output) if t.requires_grad]
        for t in tensors:
            t.register_hook(self._queue_close)

    def _queue_close(self, grad: Tensor) -> None:
        """Runs when backward reaches the model's output: close the window once that backward has finished."""
        if not self._close_queued:
            self._close_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.close)

    def _after_step(self) -> None:
        self._state = "idle"

    # --------------------------------------------------------------- window
    def _start_window(self) -> None:
        """Start a window; count the last one as skipped if its step never ran (the loop's ``zero_grad`` discarded it)."""
        opt = self.opt
        if self._marker is not None and self._state == "closed":
            step, skipped = self._marker
            if opt.global_step == step and opt.counters["skipped_steps"] == skipped:
                opt.counters["skipped_steps"] += 1
        self._open_group = None
        self._counts, self._weights = {}, {}
        self._close_queued = False
        self._marker = (opt.global_step, opt.counters["skipped_steps"])
        self._state = "open"

    def _switch_off_ddp_averaging(self) -> None:
        """Several processes, FOP mode: DDP must not average the local gradients (g1 into g2).

        Runs inside ``DistributedDataParallel.forward`` (the model's own forward
        pre-hook), where torch records the running DDP module, before DDP
        decides after the forward whether the backward all-reduces. The same
        switch as ``accelerator.no_sync(model)``, for every micro-batch: the
        gradients stay local and the DualGradientReducer combines them.
        """
        ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        if ddp is not None and ddp.module is self.model:
            ddp.require_backward_grad_sync = False

    def _end_group(self, group: int) -> None:
        """Close sub-batch ``group``: its gradient becomes the mean over its micro-batches."""
        n = int(self.accelerator.gradient_accumulation_steps)
        _scale_grads(self.opt, n / self._counts[group])
        self.opt.end_sub_batch(group)
        self._open_group = None

    def release(self) -> None:
        """Remove the router's model and optimizer hooks (called by ``FOP.release()``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def close(self) -> None:
        """End the window: sub-batch gradients installed (``p.grad = g_avg``), curvature scaled, ranks reduced.

        Runs at the end of the window's last backward, or at the latest in
        ``step()``; a no-op when no window is open.
        """
        if self._state != "open":
            return
        self._state = "closed"
        self._close_pending = False
        opt = self.opt
        _scale_curvature(opt, self._counts)
        if self._open_group == 1:
            c0, c1 = self._weights.get(0, 0.0), self._weights[1]
            opt.w1 = c0 / (c0 + c1)
            self._end_group(1)
        elif self._open_group == 0:  # only g1: a K-FAC step on it (FOP counts the fallback)
            self._end_group(0)
        elif self.distributed and opt.config.mode == "fop":
            n = int(self.accelerator.gradient_accumulation_steps)
            _scale_grads(opt, n / self._counts.get(-1, n))
            self.reducer.reduce_gradients()


def _logits(output: Any) -> Tensor:
    """The logits of a model output: ``output["logits"]`` (``ModelOutput``, dict) or the output tensor itself."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    raise TypeError(
        f"fisher_type='mc' samples labels from the model's logits, but the output ({type(output).__name__}) is neither "
        "a tensor nor has a 'logits' entry; use fisher_type='empirical' or return logits."
    )


def _tensors(output: Any) -> List[Tensor]:
    """Tensors in a model output (tensor, tuple/list, mapping or ``ModelOutput``)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _tensors(v)]
    return []


def _scale_grads(opt: Any, factor: float) -> None:
    """``p.grad *= factor`` for every parameter of ``opt`` that has a gradient."""
    if factor == 1.0:
        return
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


def _scale_curvature(opt: Any, counts: Dict[int, int]) -> None:
    """Captured S of gradient group ``g`` divided by ``counts[g]**2`` (its micro-batch gradients -> its mean's)."""
    for layer in opt.engine.layers:
        for group, s_sum in layer.s_sums.items():
            c = counts.get(group, 1)
            if c != 1:
                s_sum.div_(c * c)
