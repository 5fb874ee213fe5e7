"""Routing of an accumulation window into FOP's two sub-batches: one implementation, two front ends.

:class:`hf_fop.FOPTrainer` and the plain Accelerate loop (:mod:`hf_fop.integrations.accelerate`) both call this
module; they differ only in how they run the pieces (the Trainer scales each piece's loss before its
backward; the Accelerate loop, where the user calls ``accelerator.backward``, rescales the gradients
between pieces and at the end of the window).

Plan semantics (both front ends). A window is the ``n`` micro-batches of one optimizer step, ``n`` =
``gradient_accumulation_steps``; micro-batch ``k`` is the ``k``-th of its window (``0 <= k < n``):

* one process, ``n >= 2``: micro-batches stay whole; micro-batch ``k`` goes to sub-batch 1 (g1) when
  ``k < ceil(n/2)``, else to sub-batch 2 (g2) (odd ``n``: g1 gets the extra one);
* one process, ``n = 1``: the micro-batch of ``B`` examples is split along the batch dimension into rows
  ``[0, B//2)`` (g1) and ``[B//2, B)`` (g2); ``B = 1`` cannot be split: the step is a K-FAC step on g1;
* several processes: micro-batches stay whole and local (sub-batch ``None``); the
  :class:`~hf_fop.distributed.DualGradientReducer` makes g1 from the even ranks and g2 from the odd ones;
* ``mode="kfac"``: every micro-batch whole, plain backward (sub-batch ``None``).

A window whose plan has no g2 piece (a batch of one example with ``n = 1``, or an epoch's last window
shorter than ``ceil(n/2) + 1`` micro-batches) is a K-FAC step on g1: a fallback, counted by FOP in
``counters["fallback_steps"]`` and by :class:`FallbackLog` (one warning per run).

Weights. Piece ``p`` has ``k_p`` loss items (FOPTrainer: the Trainer's ``num_items_in_batch`` count, label
tokens or examples; the Accelerate loop: examples). Its loss (the mean over its items) is scaled by
``k_p / K_j`` (``K_j``: the items of its sub-batch), so each sub-batch gradient is the mean over that
sub-batch, and ``w1 = K_1 / (K_1 + K_2)``: ``g_avg = w1 g1 + (1 - w1) g2`` is the mean gradient over all the
window's items. A local piece (several processes) is scaled by ``W k_p / N`` (``W`` ranks, ``N`` the step's
items on all ranks, by default ``W`` times this rank's), so the mean over ranks is the global mean.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor

Number = Union[float, Tensor]
"""A count or scale: a Python number, or a 0-dim tensor (kept on the device: no host sync)."""

__all__ = [
    "FallbackLog", "Piece", "SkippedSteps", "Weights", "batch_size_of", "first_half", "is_fallback", "piece_inputs",
    "route_micro_batch", "route_window", "weigh",
]


@dataclass(frozen=True)
class Piece:
    """One forward/backward unit: micro-batch ``micro_batch`` of the window, or rows ``rows = (start, stop)`` of it.

    ``sub_batch``: 0 (gives g1), 1 (gives g2), or ``None`` (plain backward: K-FAC, or a rank's local window).
    """

    micro_batch: int
    sub_batch: Optional[int]
    rows: Optional[Tuple[int, int]] = None


def _check(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"routing: {name}={value!r} is invalid: expected an integer >= {low}.")


def first_half(n: int) -> int:
    """Micro-batches of a window of ``n`` (``n >= 2``) that go to sub-batch 1: ``ceil(n / 2)``."""
    _check("n", n, 1)
    return (n + 1) // 2


def route_micro_batch(index: int, size: int, n: int, world_size: int = 1, mode: str = "fop") -> Tuple[Piece, ...]:
    """Pieces of micro-batch ``index`` (``size`` examples) of a window of ``n``, in run order (see module docstring)."""
    _check("index", index, 0)
    _check("size", size, 1)
    _check("n", n, 1)
    _check("world_size", world_size, 1)
    if mode not in ("fop", "kfac"):
        raise ValueError(f"routing: mode={mode!r} is invalid: expected 'fop' or 'kfac'.")
    if mode == "kfac" or world_size > 1:
        return (Piece(index, None),)
    if n >= 2:
        return (Piece(index, 0 if index < first_half(n) else 1),)
    if size < 2:  # cannot be split: a K-FAC step on g1
        return (Piece(index, 0),)
    half = size // 2
    return (Piece(index, 0, (0, half)), Piece(index, 1, (half, size)))


def route_window(sizes: Sequence[int], n: Optional[int] = None, world_size: int = 1, mode: str = "fop") -> Tuple[Piece, ...]:
    """Pieces of a window whose micro-batches have ``sizes`` examples (``n``: the window length, default ``len(sizes)``)."""
    n = len(sizes) if n is None else n
    if len(sizes) > n:
        raise ValueError(f"routing: a window of n={n} micro-batches got {len(sizes)}.")
    return tuple(p for k, size in enumerate(sizes) for p in route_micro_batch(k, size, n, world_size, mode))


def batch_size_of(inputs: Mapping[str, Any]) -> int:
    """Leading dimension of the first tensor with at least one dimension in ``inputs``."""
    for value in inputs.values():
        if isinstance(value, Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise ValueError(f"Cannot find a batch dimension in the inputs (keys: {sorted(inputs)}): no tensor in the batch.")


def piece_inputs(inputs: Mapping[str, Any], piece: Piece) -> Mapping[str, Any]:
    """The piece's part of its micro-batch: rows ``[start, stop)`` of every tensor whose leading dim is the batch size."""
    if piece.rows is None:
        return inputs
    size = batch_size_of(inputs)
    start, stop = piece.rows
    return {
        key: value[start:stop] if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == size else value
        for key, value in inputs.items()
    }


def is_fallback(pieces: Sequence[Piece]) -> bool:
    """Whether a FOP window gives only g1 (a K-FAC step): some piece goes to g1 and none to g2."""
    groups = {p.sub_batch for p in pieces}
    return 0 in groups and 1 not in groups


@dataclass(frozen=True)
class Weights:
    """Scales of a window's pieces (see module docstring).

    ``loss_scales[p]``: factor on piece ``p``'s mean loss before backward (``k_p / K_j``, or ``W k_p / N``).
    ``report_scales[p]``: factor giving the window's mean loss (``k_p / (all items)``, or ``W k_p / N``).
    ``group_items``: ``K_j`` per sub-batch (``None``: a local window). ``w1``: ``K_1 / (K_1 + K_2)`` (0.5 without g2).
    """

    loss_scales: Tuple[Number, ...]
    report_scales: Tuple[Number, ...]
    group_items: Dict[Optional[int], Number]
    w1: Number


def weigh(pieces: Sequence[Piece], items: Sequence[Number], world_size: int = 1, total: Optional[Number] = None) -> Weights:
    """Weights of ``pieces`` holding ``items`` loss items each (numbers or 0-dim tensors, > 0 for sub-batch pieces).

    ``total``: the step's items on all ranks, for local pieces (default ``world_size`` times this window's).
    """
    if len(items) != len(pieces):
        raise ValueError(f"routing: {len(pieces)} pieces but {len(items)} item counts.")
    group_items: Dict[Optional[int], Number] = {}
    for piece, k in zip(pieces, items):
        group_items[piece.sub_batch] = k if piece.sub_batch not in group_items else group_items[piece.sub_batch] + k
    window = sum(items[1:], items[0]) if items else 0.0
    everywhere = window * world_size if total is None else total
    loss: List[Number] = []
    report: List[Number] = []
    for piece, k in zip(pieces, items):
        if piece.sub_batch is None:
            loss.append(world_size * k / everywhere)
            report.append(world_size * k / everywhere)
        else:
            loss.append(k / group_items[piece.sub_batch])
            report.append(k / window)
    w1: Number = group_items[0] / (group_items[0] + group_items[1]) if 0 in group_items and 1 in group_items else 0.5
    return Weights(tuple(loss), tuple(report), group_items, w1)


class FallbackLog:
    """Counts the K-FAC fallback steps of a run; warns once, at the first one, with the fix."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.count = 0

    def record(self, n: int) -> None:
        """One more window with only g1 (``n``: the window length)."""
        self.count += 1
        if self.count == 1:
            warnings.warn(
                f"{self.who}: an optimizer step had only FOP's first sub-batch (a batch of one example cannot be split "
                f"into two sub-batches, or an epoch's last accumulation window ended before its second half, window "
                f"n={n}) and is a K-FAC step; later ones are counted in counters['fallback_steps'] (fop/fallback_fraction). "
                "Use batches of at least 2 examples and a dataset whose batches fill every window (e.g. drop_last).",
                UserWarning,
                stacklevel=3,
            )

    def summary(self) -> Optional[str]:
        """The run's count in one line (``None`` if there was no fallback)."""
        if not self.count:
            return None
        return (
            f"{self.who}: {self.count} optimizer step(s) of this run had only one sub-batch (a batch of size 1 that "
            "cannot be split, or a short last window) and were K-FAC steps (see fop/fallback_fraction); use batches of "
            "at least 2 (e.g. dataloader_drop_last=True) to avoid it."
        )


class SkippedSteps:
    """Counts a started step whose ``FOP.step`` never ran (fp16 overflow; its window was discarded) as skipped."""

    def __init__(self) -> None:
        self._marker: Optional[Tuple[int, int]] = None

    def begin(self, opt: Any) -> None:
        """A window starts: account for the previous one, remember where this one started."""
        self.account(opt)
        self._marker = (opt.global_step, opt.counters["skipped_steps"])

    def account(self, opt: Any) -> None:
        """``counters["skipped_steps"] += 1`` if neither a step nor a skip happened since :meth:`begin`."""
        if self._marker is not None:
            if (opt.global_step, opt.counters["skipped_steps"]) == self._marker:
                opt.counters["skipped_steps"] += 1
            self._marker = None

    def reset(self) -> None:
        self._marker = None
