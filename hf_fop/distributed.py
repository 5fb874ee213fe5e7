"""Multi-process FOP: the dual-gradient reduction and the factor averaging.

Ranks form two groups (FOP_SPEC, Algorithm 1): even ranks give g1, odd ranks
give g2. Each rank accumulates its local gradient ``g_r`` (DDP's averaging
switched off); one ``all_reduce`` of a ``(2, n)`` buffer, rank ``r`` writing
row ``r % 2``, then gives

    g1 = sum_{r even} g_r / n_even,   g2 = sum_{r odd} g_r / n_odd,

and ``g_avg = w1 g1 + (1 - w1) g2`` with ``w1 = n_even / world`` is the global
mean gradient ``mean_r g_r`` (what DDP would have produced), also for an odd
world size. New curvature factors are averaged over all ranks so every rank
holds identical optimizer state (the Trainer saves rank 0's and every rank
loads it). Both reductions use the default process group.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .optimizer import FOP


def world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def group_sizes(world_size: int) -> Tuple[int, int]:
    """``(n_even, n_odd)``: ranks giving g1 and g2. Needs ``world_size >= 2``."""
    if world_size < 2:
        raise ValueError(f"The dual-gradient reduction needs world_size >= 2, got {world_size}.")
    return (world_size + 1) // 2, world_size // 2


class DualGradientReducer:
    """All-reduces local gradients into FOP's g1/g2 and averages curvature factors.

    ``install(opt)`` sets ``opt.factor_reducer``; after the last local
    backward of a step call :meth:`reduce_gradients`.
    """

    def __init__(self, opt: FOP) -> None:
        self.rank, self.world_size = world()
        self.n_even, self.n_odd = group_sizes(self.world_size)
        self.opt = opt
        self.params: List[Tensor] = [p for group in opt.param_groups for p in group["params"]]
        self.bytes_reduced = 0
        """Payload bytes this process handed to ``all_reduce`` so far (gradients and factors)."""

    def install(self) -> None:
        self.opt.factor_reducer = self.reduce_factors
        self.opt.w1 = self.n_even / self.world_size

    def _all_reduce(self, buf: Tensor) -> None:
        self.bytes_reduced += buf.numel() * buf.element_size()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)

    def reduce_gradients(self) -> None:
        """Replace each rank's local ``p.grad`` by global g1/g2 and ``p.grad = g_avg`` (via ``set_dual_gradients``).

        A parameter without a gradient on every rank keeps ``grad = None``.
        """
        sizes = [p.numel() for p in self.params]
        total = sum(sizes)
        dtype = torch.float32
        device = self.params[0].device
        # row r%2: local gradients; last len(params) entries: 1 where this rank has a gradient
        buf = torch.zeros(2, total + len(self.params), dtype=dtype, device=device)
        row = buf[self.rank % 2]
        offset = 0
        for i, (p, n) in enumerate(zip(self.params, sizes)):
            if p.grad is not None:
                row[offset : offset + n] = p.grad.detach().reshape(-1).to(dtype)
                row[total + i] = 1.0
            offset += n
        self._all_reduce(buf)
        g1_flat = buf[0, :total] / self.n_even
        g2_flat = buf[1, :total] / self.n_odd
        present = buf[:, total:].sum(0)
        g1: Dict[Tensor, Tensor] = {}
        g2: Dict[Tensor, Tensor] = {}
        offset = 0
        for i, (p, n) in enumerate(zip(self.params, sizes)):
            if present[i] > 0:
                g1[p] = g1_flat[offset : offset + n].view_as(p).to(p.dtype)
                g2[p] = g2_flat[offset : offset + n].view_as(p).to(p.dtype)
            p.grad = None
            offset += n
        self.opt.w1 = self.n_even / self.world_size
        self.opt.set_dual_gradients(g2, g1=g1)

    def reduce_factors(self, new: Dict[str, Tuple[Tensor, Tensor]]) -> Dict[str, Tuple[Tensor, Tensor]]:
        """Average each layer's new ``(A, S)`` over the ranks that captured it (one ``all_reduce``)."""
        layers = self.opt.engine.layers
        pieces: List[Tensor] = []
        for layer in layers:
            pair: Optional[Tuple[Tensor, Tensor]] = new.get(layer.name)
            for k, dim in enumerate((layer.in_dim, layer.out_dim)):
                if pair is None:
                    pieces.append(torch.zeros(dim * dim, device=layer.weight.device))
                else:
                    pieces.append(pair[k].reshape(-1).float())
        counts = torch.tensor([1.0 if layer.name in new else 0.0 for layer in layers], device=self.params[0].device)
        buf = torch.cat(pieces + [counts])
        self._all_reduce(buf)
        counts = buf[-len(layers) :]
        out: Dict[str, Tuple[Tensor, Tensor]] = {}
        offset = 0
        for i, layer in enumerate(layers):
            mats = []
            for dim in (layer.in_dim, layer.out_dim):
                mats.append(buf[offset : offset + dim * dim].view(dim, dim))
                offset += dim * dim
            if counts[i] > 0:
                out[layer.name] = (mats[0] / counts[i], mats[1] / counts[i])
        return out
