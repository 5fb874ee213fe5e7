"""FOP's dual-gradient reduction as a DDP communication hook (overlaps the backward pass).

DDP hands each gradient bucket (the local, un-averaged gradients ``g_r`` of its parameters, flattened) to the hook as
soon as the bucket is ready, while the backward pass continues. Per bucket the hook starts the collective of
:func:`hf_fop.distributed.collectives.dual_sums` (the one the post-backward path uses), and when it ends returns
``g_avg`` to DDP (so ``p.grad = g_avg``) and keeps ``g1 - g2`` per parameter for the optimizer
(:meth:`DualGradientCommHook.take_diffs`). The element-wise operations are the post-backward path's, so ``p.grad`` and
``g1 - g2`` are bitwise the same. Gradient accumulation: all micro-batches but the last run under ``no_sync``; DDP
then buckets the accumulated ``p.grad``.

Parameters no rank used (DDP's ``find_unused_parameters``) keep ``p.grad = None`` (DDP does not write them) and get no
``g1 - g2``, as in the post-backward path.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

from .collectives import Collectives, DualGroups, dual_sums


class DualGradientCommHook:
    """A DDP comm hook giving ``g_avg`` to DDP and keeping ``g1 - g2``; register with :meth:`register`."""

    def __init__(self, comm: Collectives, groups: DualGroups) -> None:
        self.comm = comm
        self.groups = groups
        self.diffs: Dict[Tensor, Tensor] = {}
        """``{param: g1 - g2}`` of the buckets reduced since the last :meth:`take_diffs`."""

    def register(self, ddp: nn.Module) -> None:
        """``ddp.register_comm_hook``; raises ``RuntimeError`` when DDP refuses (a hook is already registered)."""
        ddp.register_comm_hook(None, self._hook)

    def _hook(self, state, bucket):  # noqa: ANN001, ANN202 (DDP checks real annotations; these would be strings)
        """``(state: None, bucket: dist.GradBucket) -> Future[Tensor]``: g_avg of the bucket; keeps g1 - g2."""
        buf = bucket.buffer()
        work, sums = dual_sums(self.comm, self.groups, buf.float(), async_op=True)
        params = bucket.parameters()
        n = buf.numel()

        def finish(_: torch.futures.Future) -> Tensor:
            diff, avg = self.groups.diff_and_avg(*sums(), buf.dtype)
            offset = 0
            for p in params:
                self.diffs[p] = diff[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            if offset != n:
                raise RuntimeError(f"DDP bucket of {n} elements does not match its parameters ({offset} elements).")
            return avg

        return work.get_future().then(finish)

    def take_diffs(self) -> Dict[Tensor, Tensor]:
        """``g1 - g2`` of the parameters DDP wrote (``p.grad`` not ``None``), since the last call."""
        diffs = {p: d for p, d in self.diffs.items() if p.grad is not None}
        self.diffs = {}
        return diffs
