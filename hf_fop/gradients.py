"""The two sub-batch gradients of one optimizer step: the state machine and the g1 / g1 - g2 buffers.

A step's backward passes run inside ``sub_batch(0)`` (they accumulate g1) and then ``sub_batch(1)`` (g2). When
sub-batch 1 ends, every parameter's ``p.grad`` holds ``g_avg = w1 g1 + (1 - w1) g2`` and :class:`SubBatchGradients`
keeps ``g1 - g2``; ``w1`` is given by whoever ends the sub-batch (0.5 for equal halves, a sub-batch's share of the
step's examples otherwise). A multi-process reduction installs ``g_avg`` and ``g1 - g2`` directly
(:meth:`SubBatchGradients.install_reduced`).

States: ``idle`` -> ``in0`` -> ``after0`` (-> ``in0`` again: more of g1) -> ``in1`` -> ``after1`` (-> ``in1``: more of
g2). A step taken in ``after0`` (only g1) is a K-FAC step on g1.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from .fop_math import global_norm

IDLE, IN0, AFTER0, IN1, AFTER1 = "idle", "in0", "after0", "in1", "after1"


class SubBatchGradients:
    """Sub-batch bookkeeping of one step for ``params`` (every optimised parameter); see the module docstring.

    ``managed``: the K-FAC-managed parameters, whose ``g_avg`` norm is recorded when the sub-batches end
    (``track_norm``) so that diagnostics can tell how much ``p.grad`` was scaled before ``step()``.
    """

    def __init__(self, params: Iterable[Tensor], managed: Iterable[Tensor], track_norm: bool) -> None:
        self.params: List[Tensor] = list(params)
        self.managed: List[Tensor] = list(managed)
        self.track_norm = track_norm
        self.phase = IDLE
        self.g1: Dict[Tensor, Tensor] = {}
        self.diff: Dict[Tensor, Tensor] = {}
        """``{param: g1 - g2}`` once both sub-batches ended."""
        self.avg_norm: Optional[Tensor] = None
        """Norm of the managed ``g_avg`` when the sub-batches ended (0-dim, on device), with ``track_norm``."""
        self.present: Optional[set] = None
        """``id``s of the parameters with a gradient on some rank (owner-only reductions); ``None``: ``p.grad`` says."""
        self.w1 = 0.5
        """Weight of g1 in the last ``g_avg`` installed."""

    # ------------------------------------------------------------ phases
    def begin(self, index: int) -> None:
        """Start (or continue) sub-batch ``index`` (0 gives g1, 1 gives g2)."""
        if index not in (0, 1) or isinstance(index, bool):
            raise ValueError(f"sub_batch index must be 0 (gives g1) or 1 (gives g2), got {index!r}.")
        if index == 0 and self.phase not in (IDLE, AFTER0):
            raise RuntimeError(
                f"sub_batch(0) cannot start now (state: {self.phase}): sub-batch 1 of this step was already "
                "given. Call step() (or zero_grad() to discard) before starting the next step's sub-batch 0."
            )
        if index == 1 and self.phase not in (AFTER0, AFTER1):
            raise RuntimeError(
                f"sub_batch(1) cannot start now (state: {self.phase}): run sub_batch(0) first; "
                "sub-batch 0 gives g1 and sub-batch 1 gives g2."
            )
        if index == 0 and self.phase == IDLE and any(p.grad is not None for p in self.params):
            raise RuntimeError(
                "sub_batch(0) started while parameters already hold gradients from a plain backward(); "
                "call zero_grad() first or run every backward of the step inside sub_batch()."
            )
        if index == 1:
            for p in self.params:  # continue g2 from what sub-batch 1 gave so far (None at first)
                p.grad = (self.g1[p] - self.diff[p]) if (self.phase == AFTER1 and p in self.diff) else None
        self.phase = IN0 if index == 0 else IN1

    def end(self, index: int, w1: float = 0.5) -> None:
        """Close sub-batch ``index``; after sub-batch 1, ``p.grad`` holds ``w1 g1 + (1 - w1) g2``."""
        expected = IN0 if index == 0 else IN1
        if self.phase != expected:
            raise RuntimeError(f"end_sub_batch({index}) without a matching begin_sub_batch({index}).")
        if index == 1 and not 0.0 < float(w1) < 1.0:
            raise ValueError(f"end_sub_batch(1, w1={w1!r}): the weight of g1 in g_avg must be in (0, 1).")
        if index == 0:
            for p in self.params:
                if p.grad is not None:
                    self.g1[p] = p.grad if p not in self.g1 else self.g1[p] + p.grad
                    p.grad = None
            self.phase = AFTER0
            return
        self.install_dual({p: p.grad for p in self.params if p.grad is not None}, w1)

    def install_dual(self, g2: Dict[Tensor, Tensor], w1: float) -> None:
        """``g1 - g2`` kept, ``p.grad = w1 g1 + (1 - w1) g2``; a parameter missing from one side counts as zero there.
        ``g2``'s tensors are overwritten with ``g_avg`` (they become ``p.grad``)."""
        params, firsts, seconds = [], [], []
        for p in self.params:
            a, b = self.g1.get(p), g2.get(p)
            if a is None and b is None:
                continue
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            if a.shape != b.shape:
                raise RuntimeError(
                    f"g1 and g2 differ in shape for a parameter of shape {tuple(p.shape)}: {tuple(a.shape)} vs {tuple(b.shape)}."
                )
            params.append(p)
            firsts.append(a)
            seconds.append(b)
        if params:  # g1 - g2, then g_avg = g2 + w1 (g1 - g2) written over g2 (no second new buffer per parameter)
            diffs = torch._foreach_sub(firsts, seconds)
            torch._foreach_add_(seconds, diffs, alpha=w1)  # the formula of DualGroups.diff_and_avg, bit for bit
            for p, a, d, g in zip(params, firsts, diffs, seconds):
                self.g1[p] = a
                self.diff[p] = d
                p.grad = g
        self._closed(w1)

    def install_reduced(self, diffs: Dict[Tensor, Tensor], w1: float, present: Optional[set] = None) -> None:
        """Install ``g1 - g2`` (``{param: tensor}``) when ``p.grad`` already holds ``w1 g1 + (1 - w1) g2``
        (multi-process reductions).

        ``present``: ``id``s of the parameters with a gradient on some rank, when ``p.grad`` alone cannot tell
        (gradients reduced to owners only).
        """
        self.g1 = {}
        self.diff = dict(diffs)
        self.present = present
        self._closed(w1)

    def _closed(self, w1: float) -> None:
        self.w1 = w1
        self.avg_norm = self.managed_grad_norm() if self.track_norm else None
        self.phase = AFTER1

    # -------------------------------------------------------------- step
    def for_step(self) -> Tuple[bool, Dict[Tensor, Tensor]]:
        """``(both sub-batches given, {param: g1 - g2})`` for ``step()``; with only g1, ``p.grad`` becomes g1."""
        if self.phase in (IN0, IN1):
            raise RuntimeError("step() called inside a sub_batch() block; call it after the block ends.")
        if self.phase == AFTER0:  # only one sub-batch: K-FAC on g1
            for p, g in self.g1.items():
                p.grad = g
            self.g1 = {}
        return self.phase == AFTER1, self.diff

    def has_gradient(self, params: Iterable[Tensor]) -> bool:
        """Whether any of ``params`` has a gradient here, or (owner-only reductions) on some rank."""
        params = list(params)
        if any(p.grad is not None for p in params):
            return True
        return self.present is not None and any(id(p) in self.present for p in params)

    def managed_grad_norm(self) -> Tensor:
        """Euclidean norm of the managed parameters' ``p.grad`` (0-dim float32 on device; no host sync)."""
        return global_norm([p.grad for p in self.managed if p.grad is not None])

    def discard(self) -> None:
        """Forget this step's sub-batches (``zero_grad``, a skipped step, after ``step()``)."""
        self.g1, self.diff, self.avg_norm, self.present = {}, {}, None, None
        self.phase = IDLE
