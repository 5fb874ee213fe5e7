"""FOP in a plain Accelerate training loop (no Trainer): the second front end.

Usage (transformers' ``run_*_no_trainer.py`` style)::

    accelerator = Accelerator(gradient_accumulation_steps=2)
    opt = FOP(model, lr=0.005)
    attach_accelerate(opt, model, accelerator)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    for batch in loader:
        with accelerator.accumulate(model):
            for piece in sub_batches(opt, batch):  # the batch itself unless it must be split
                loss = model(**piece).loss
                accelerator.backward(loss)
            opt.step(); sched.step(); opt.zero_grad()

:func:`attach_accelerate` attaches an :class:`AccelerateRouter`, which
routes every training forward/backward of the (unwrapped) model into FOP's
sub-batches by itself, with the plan of :mod:`hf_fop.integrations.routing` (the one
FOPTrainer uses; ``n = gradient_accumulation_steps``):

* one process, ``n >= 2``: the first ``ceil(n/2)`` micro-batches of the
  accumulation window form sub-batch 1 (g1), the rest sub-batch 2 (g2);
* one process, ``n = 1``: :func:`sub_batches` splits the batch into halves
  (first half g1, second half g2); without it FOP raises, since every step
  would silently be a K-FAC step;
* several processes: each rank's window stays whole; after the window's last
  backward the :class:`~hf_fop.distributed.reducer.DualGradientReducer` gives g1 from
  the even ranks and g2 from the odd ranks. DDP's gradient averaging is
  switched off for the model (what ``accelerator.no_sync`` does, for every
  micro-batch), so DDP never averages g1 into g2;
* ``mode="kfac"``: plain backward (DDP averages), factors averaged over ranks.

Scaling. ``accelerator.backward`` divides each piece's mean loss by ``n``; the
user runs that backward, so the router cannot scale the loss as FOPTrainer does
and rescales the gradients instead: between two pieces of a sub-batch with
``k_a`` and ``k_b`` examples by ``k_a / k_b``, and at the end of the sub-batch by
``n k_last / K`` (``K``: its examples). Each sub-batch gradient is then the mean
over its examples and ``w1`` = sub-batch 1's share of the examples
(:func:`hf_fop.integrations.routing.weigh`), so ``g_avg`` (what ``p.grad`` holds when the
window ends, and what ``accelerator.clip_grad_norm_`` clips) is the mean
gradient over the window's examples: accelerate's gradient for a window of
equal micro-batches. Curvature S is captured as the summed loss's (the
GradScaler's scale, fp16, and ``n k`` divided out) and divided by ``K**2``:
the same S as FOPTrainer's. ``mode="kfac"`` keeps accelerate's gradient
unchanged. The two front ends give the same parameters on the same
sub-batches (``tests/test_accelerate_loop.py``).

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
import weakref
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..distributed import DualGradientReducer, dual_gradient_reducer, world
from .routing import FallbackLog, Piece, SkippedSteps, batch_size_of, is_fallback, piece_inputs, route_micro_batch, weigh

__all__ = ["AccelerateRouter", "attach_accelerate", "router_of", "sub_batches", "unwrap_fop"]

_ROUTERS: "weakref.WeakKeyDictionary[Any, AccelerateRouter]" = weakref.WeakKeyDictionary()
"""FOP optimizer -> its router (the optimizer does not know the front end that drives it)."""


def attach_accelerate(opt: Any, model: nn.Module, accelerator: Any) -> "AccelerateRouter":
    """Drive ``opt`` (a :class:`hf_fop.FOP` built on ``model``) from a plain Accelerate loop; see the module docstring.

    Call it after creating the ``Accelerator`` and FOP, before ``accelerator.prepare``. Returns the router (also
    :func:`router_of`); ``opt.release()`` removes its hooks.
    """
    if router_of(opt) is not None:
        raise RuntimeError("attach_accelerate: this FOP optimizer is already attached to an Accelerator.")
    router = AccelerateRouter(opt, model, accelerator)
    _ROUTERS[opt] = router
    opt.on_release(router.release)
    return router


def router_of(optimizer: Any) -> Optional["AccelerateRouter"]:
    """The :class:`AccelerateRouter` attached to ``optimizer`` (FOP or accelerate's wrapper), or ``None``."""
    return _ROUTERS.get(unwrap_fop(optimizer))


def unwrap_fop(optimizer: Any) -> Any:
    """The FOP behind ``optimizer`` (accelerate's ``AcceleratedOptimizer`` or FOP itself); else ``optimizer``."""
    from ..optimizer import FOP

    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, FOP) else optimizer


def sub_batches(optimizer: Any, batch: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Pieces of ``batch`` to run forward/backward on, one after the other (:func:`hf_fop.integrations.routing.route_micro_batch`).

    Two halves along the batch dimension when FOP needs them (``mode="fop"``,
    one process, ``gradient_accumulation_steps == 1``): the first half gives
    g1, the second g2, and ``w1`` is the first half's share of the examples.
    Otherwise (accumulation window routing, several processes, K-FAC mode, or
    an optimizer that is not FOP) the batch itself, once. A batch of one
    example cannot be split: that step is a K-FAC step (a warning at the first
    one; counted in ``counters["fallback_steps"]``).
    """
    opt = unwrap_fop(optimizer)
    router = router_of(opt)
    if router is None:
        yield batch
        return
    pieces = router.route(batch)
    for index, piece in enumerate(pieces):
        router._piece = (piece, index == len(pieces) - 1)
        try:
            yield piece_inputs(batch, piece)
        finally:
            router._piece = None
    if router.accelerator.sync_gradients:
        router.close()


class AccelerateRouter:
    """Routes a plain Accelerate loop's backward passes into FOP's sub-batches (see module docstring).

    Built by :func:`attach_accelerate`; reach it with :func:`router_of`.
    Hooks: a forward pre-hook and a forward hook on ``model``, a step pre-hook
    and post-hook on the optimizer.
    """

    def __init__(self, opt: Any, model: nn.Module, accelerator: Any) -> None:
        for name in ("gradient_accumulation_steps", "sync_gradients", "unwrap_model", "num_processes"):
            if not hasattr(accelerator, name):
                raise TypeError(
                    f"attach_accelerate(opt, model, accelerator): accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__} "
                    f"(no attribute {name!r})."
                )
        _, world_size = world()
        if world_size != accelerator.num_processes:
            raise ValueError(
                f"attach_accelerate: the accelerator runs {accelerator.num_processes} processes but the default "
                f"process group has {world_size}; create the Accelerator before FOP (FOP picks its distribution from the "
                "process group when it is built)."
            )
        self.opt = opt
        self.model = model
        self.accelerator = accelerator
        self.world_size = world_size
        self.distributed = world_size > 1
        self.reducer: Optional[DualGradientReducer] = dual_gradient_reducer(opt, mode=opt.config.mode)
        """The dual-gradient reduction (FOP mode, several processes); K-FAC: DDP averages, FOP averages the factors."""
        self.fallbacks = FallbackLog("FOP (Accelerate loop)")
        """K-FAC fallback steps of this run (windows with only g1); warns at the first."""
        self._skipped = SkippedSteps()
        self._state = "idle"  # "idle" (no window), "open" (window running), "closed" (last backward done)
        self._open_group: Optional[int] = None  # sub-batch FOP currently accumulates into
        self._pieces: List[Piece] = []  # the window's pieces so far, in run order
        self._items: List[float] = []  # their examples
        self._micro = 0  # micro-batches begun in this window
        self._close_pending = False  # the window's last forward ran: close at the end of its backward
        self._close_queued = False
        self._piece: Optional[Tuple[Piece, bool]] = None  # set by sub_batches: (piece, last of its micro-batch)
        self._mask_scope = contextlib.ExitStack()  # opt.padding_mask(...) from a forward's start to its end
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
            opt.register_step_pre_hook(lambda *_: self.close()),
            opt.register_step_post_hook(lambda *_: self._after_step()),
        ]
        if self.distributed:  # every rank enters save_state: the full curvature state before it saves
            self._handles.append(accelerator.register_save_state_pre_hook(lambda *_: opt.sync_curvature()))

    # -------------------------------------------------------------- routing
    @property
    def n(self) -> int:
        """The window length: ``accelerator.gradient_accumulation_steps``."""
        return int(self.accelerator.gradient_accumulation_steps)

    def route(self, batch: Mapping[str, Any]) -> Tuple[Piece, ...]:
        """Pieces of ``batch`` as the next micro-batch of the window (:func:`hf_fop.integrations.routing.route_micro_batch`)."""
        index = self._micro if self._state == "open" else 0
        return route_micro_batch(index, batch_size_of(batch), self.n, self.world_size, self.opt.config.mode)

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
        opt, n = self.opt, self.n
        if self._piece is not None:
            piece, last_of_micro_batch = self._piece
        elif n == 1 and opt.config.mode == "fop" and not self.distributed:
            raise RuntimeError(
                "FOP needs two sub-batches per step, but gradient_accumulation_steps=1 on one process gives one batch "
                "per step: run the forward/backward as `for piece in sub_batches(opt, batch): ...` "
                "(hf_fop.integrations.accelerate.sub_batches splits the batch into halves), or use "
                "Accelerator(gradient_accumulation_steps >= 2) (the window's first half gives g1), or FOP(mode='kfac')."
            )
        else:
            (piece,), last_of_micro_batch = self.route(_inputs(args, kwargs)), True
        if self._state != "open":
            self._start_window()
        if piece.rows is None or piece.rows[0] == 0:
            self._micro += 1
        if self.distributed and opt.config.mode == "fop":
            self._switch_off_ddp_averaging()
        items = float(_examples(args, kwargs))
        group = piece.sub_batch
        if group is not None and group != self._open_group:
            if self._open_group == 0:
                self._end_group(0)
            opt.begin_sub_batch(group)
            self._open_group = group
        elif opt.config.mode == "fop" and self._pieces and self._pieces[-1].sub_batch == group and self._items[-1] != items:
            _scale_grads(opt, self._items[-1] / items)  # p.grad stays (sum of k_i grad_i) / k_last, see _end_group
        self._pieces.append(piece)
        self._items.append(items)
        if opt.capturing:  # read only by the curvature hooks: no host read of the scale on other steps
            scaler = getattr(self.accelerator, "scaler", None)
            scale = float(scaler.get_scale()) if scaler is not None else 1.0
            # accelerator.backward divides the mean loss by n, the scaler multiplies it: S sees the summed loss
            opt.engine.grad_scale = scale / (n * items)
        self._close_pending = bool(self.accelerator.sync_gradients) and last_of_micro_batch

    def _after_forward(self, module: nn.Module, args: Any, kwargs: Dict[str, Any], output: Any) -> None:
        if not self._routed(module):
            return
        if self.opt.config.fisher_type == "mc" and self.opt.capturing:
            labels = kwargs.get("labels")  # positions labelled -100 are left out of the sampled loss
            weight = self._items[-1]  # the summed sampled loss, as S sees the summed loss (grad_scale)
            self.opt.mc_backward(_logits(output), labels=labels if isinstance(labels, Tensor) else None, weight=weight)
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
        self._skipped.begin(self.opt)
        self._open_group = None
        self._pieces, self._items, self._micro = [], [], 0
        self._close_queued = False
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

    def _rescale_group(self, group: Optional[int]) -> None:
        """``p.grad`` of ``group`` (its last piece just ran) becomes its item-weighted mean gradient.

        Between pieces of a group ``p.grad = (sum_i k_i grad_i) / (n k_last)`` (accelerate divides by ``n``), so
        ``n k_last / K`` gives ``sum_i (k_i / K) grad_i``: the loss scales of :func:`hf_fop.integrations.routing.weigh`.
        """
        weights = weigh(self._pieces, self._items, self.world_size)
        last = max(i for i, piece in enumerate(self._pieces) if piece.sub_batch == group)
        if self.opt.config.mode == "fop":
            _scale_grads(self.opt, self.n * self._items[last] / weights.group_items[group])

    def _end_group(self, group: int, w1: float = 0.5) -> None:
        """Close sub-batch ``group``: its gradient becomes the item-weighted mean over its pieces (``w1``: g1's share
        of the window's items, used when sub-batch 1 closes)."""
        self._rescale_group(group)
        self.opt.end_sub_batch(group, w1)
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
        weights = weigh(self._pieces, self._items, self.world_size)
        _scale_curvature(opt, weights.group_items)
        if is_fallback(self._pieces):  # only g1: a K-FAC step on it (FOP counts the fallback)
            self._end_group(0)
            self.fallbacks.record(self.n)
        elif self._open_group == 1:
            self._end_group(1, weights.w1)
        elif self.distributed:
            self._rescale_group(None)
            if opt.config.mode == "fop":
                self.reducer.reduce_gradients()


def _inputs(args: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The model call's tensors by name (positional ones as ``"0"``, ``"1"``...)."""
    return {**{str(i): a for i, a in enumerate(args)}, **kwargs}


def _examples(args: Any, kwargs: Dict[str, Any]) -> int:
    """Examples in a model call: the leading dimension of its first batched tensor argument."""
    return batch_size_of(_inputs(args, kwargs))


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


def _scale_curvature(opt: Any, group_items: Dict[Optional[int], float]) -> None:
    """Captured S of sub-batch ``g`` (the summed loss's gradients) divided by ``K_g**2``: its mean loss's."""
    divisors = {-1 if group is None else group: items * items for group, items in group_items.items()}
    opt.engine.divide_captured_s(divisors)
