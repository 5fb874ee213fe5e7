"""The rotation limit: what the eigenbasis rotations alone cost against a step's passes, from the shapes.

A rotation of a managed layer's ``(d_out, d_in)`` gradient into or out of its eigenbasis is two GEMMs (``Q_S^T G``,
then ``(.) Q_A``): ``2 d_in d_out (d_in + d_out)`` FLOPs, ``d_in`` with the bias column (the factor sides of
``opt.layers``). FOP does 3 per step (g_avg and g1 - g2 in, the direction out), K-FAC 2. Over the FLOPs of AdamW's
passes this is the least FOP (K-FAC) can add to AdamW's step where the rotations run at the passes' FLOP rate: the
method's own cost, which everything else (capture, refresh, coefficients) comes on top of.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

ROTATIONS: Dict[str, int] = {"kfac": 2, "fop": 3}
"""Rotations per managed layer and step: K-FAC rotates g_avg in and the direction out; FOP also rotates g1 - g2 in."""


def rotation_flops(dims: Sequence[Tuple[int, int]], rotations: int) -> int:
    """FLOPs of ``rotations`` eigenbasis rotations of every layer ``(d_in, d_out)``: ``2 d_in d_out (d_in + d_out)``
    each (``Q_S^T G`` and ``(.) Q_A``, two GEMMs)."""
    return sum(rotations * 2 * d_in * d_out * (d_in + d_out) for d_in, d_out in dims)


def rotation_limit(dims: Sequence[Tuple[int, int]], rotations: int, passes_flops: float) -> float:
    """Rotation FLOPs per step over the FLOPs of the AdamW step's passes (dimensionless)."""
    return rotation_flops(dims, rotations) / passes_flops


def counted_flops(passes: Callable[[], None]) -> float:
    """FLOPs of one call of ``passes`` by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions
    and attention, forward and backward, from the operand shapes; elementwise operators are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        passes()
    return float(counter.get_total_flops())
