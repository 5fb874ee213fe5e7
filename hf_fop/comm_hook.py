"""FOP's dual-gradient reduction as a DDP communication hook (overlaps the backward pass).

DDP hands each gradient bucket (the local, un-averaged gradients ``g_r`` of
its parameters, flattened) to the hook as soon as the bucket is ready, while
the backward pass continues. Per bucket the hook runs one collective giving
every rank the group sums (even ranks give g1, odd ranks g2), exactly as
:meth:`hf_fop.distributed.DualGradientReducer.reduce_gradients` does for the
whole model after the backward pass, and then

    g1 = sum_{r even} g_r / n_even,  g2 = sum_{r odd} g_r / n_odd,
    returns g_avg = lerp(g1, g2, 1 - w1) to DDP (so p.grad = g_avg),
    keeps g1 - g2 per parameter for the optimizer.

Same collective choice as the post-backward path: an ``all_gather`` of the
bucket for ``world_size <= 4`` (per-rank traffic ``(W - 1) n``), else one
``all_reduce`` of a ``(2, n)`` buffer with rank ``r`` writing row ``r % 2``;
the same float32 element-wise operations in the same order, so ``p.grad`` and
``g1 - g2`` are bitwise those of the post-backward path. Gradient accumulation:
all micro-batches but the last run under ``no_sync``; DDP then buckets the
accumulated ``p.grad``.

Parameters no rank used (DDP's ``find_unused_parameters``) keep
``p.grad = None`` (DDP does not write them) and get no ``g1 - g2``, as in the
post-backward path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from .distributed import DualGradientReducer


class DualGradientCommHook:
    """The DDP comm hook of one :class:`DualGradientReducer`; register with :meth:`register`."""

    def __init__(self, reducer: "DualGradientReducer") -> None:
        self.reducer = reducer
        self.diffs: Dict[Tensor, Tensor] = {}
        """``{param: g1 - g2}`` of the buckets reduced since the last :meth:`finish`."""

    def register(self, ddp: nn.Module) -> None:
        """``ddp.register_comm_hook``; raises ``RuntimeError`` when DDP refuses (a hook is already registered)."""
        ddp.register_comm_hook(None, self._hook)

    def _hook(self, state, bucket):  # noqa: ANN001, ANN202 (DDP checks real annotations; these would be strings)
        """``(state: None, bucket: dist.GradBucket) -> Future[Tensor]``: g_avg of the bucket; keeps g1 - g2."""
        red = self.reducer
        buf = bucket.buffer()
        local = buf.float()
        n = local.numel()
        size = n * local.element_size()
        red.bytes_reduced += size
        if red.world_size <= 4:
            red.wire_bytes += (red.world_size - 1) * size
            gathered = torch.empty(red.world_size * n, dtype=local.dtype, device=local.device)
            work = dist.all_gather_into_tensor(gathered, local, async_op=True)

            def sums() -> List[Tensor]:
                parts = list(gathered.view(red.world_size, n).unbind(0))
                return [_ordered_sum(parts[0::2]), _ordered_sum(parts[1::2])]
        else:
            red.wire_bytes += 2 * (red.world_size - 1) / red.world_size * 2 * size
            stacked = torch.zeros(2, n, dtype=local.dtype, device=local.device)
            stacked[red.rank % 2] = local
            work = dist.all_reduce(stacked, async_op=True)

            def sums() -> List[Tensor]:
                return [stacked[0], stacked[1]]

        params = bucket.parameters()
        dtype = buf.dtype
        w1 = red.n_even / red.world_size

        def finish(_: torch.futures.Future) -> Tensor:
            s1, s2 = sums()
            g1 = (s1 / red.n_even).to(dtype)
            g2 = (s2 / red.n_odd).to(dtype)
            diff = torch.sub(g1, g2)
            avg = torch.lerp(g1, g2, 1 - w1)
            offset = 0
            for p in params:
                self.diffs[p] = diff[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            if offset != n:
                raise RuntimeError(f"DDP bucket of {n} elements does not match its parameters ({offset} elements).")
            return avg

        return work.get_future().then(finish)

    def finish(self) -> None:
        """After the synchronised backward: hand ``g1 - g2`` to the optimizer (``p.grad`` already holds g_avg)."""
        diffs = {p: d for p, d in self.diffs.items() if p.grad is not None}
        self.diffs = {}
        self.reducer.opt.w1 = self.reducer.n_even / self.reducer.world_size
        self.reducer.opt.set_reduced_gradients(diffs)


def _ordered_sum(parts: List[Tensor]) -> Tensor:
    """Sum in list order (identical bits on every rank, and to the post-backward path's sum)."""
    out = parts[0].clone()
    for part in parts[1:]:
        out += part
    return out
