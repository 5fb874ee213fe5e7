"""Multi-process FOP: the dual-gradient reduction and the factor averaging.

Ranks form two groups (FOP_SPEC, Algorithm 1): even ranks give g1, odd ranks
give g2. Each rank accumulates its local gradient ``g_r`` (DDP's averaging
switched off); one collective then gives every rank

    g1 = sum_{r even} g_r / n_even,   g2 = sum_{r odd} g_r / n_odd,

and ``g_avg = w1 g1 + (1 - w1) g2`` with ``w1 = n_even / world`` is the global
mean gradient ``mean_r g_r`` (what DDP would have produced), also for an odd
world size. Up to 4 ranks the collective is an ``all_gather`` of the local
gradients (per-rank traffic ``(W - 1) n``, i.e. ``W / 2`` times DDP's ring
all-reduce ``2 (W - 1) / W n``); above that, one ``all_reduce`` of a ``(2, n)``
buffer with rank ``r`` writing row ``r % 2`` (2x DDP). Every rank sums the
same tensors in the same order, so replicas stay bitwise identical.

New curvature factors are averaged over all ranks (upper triangles only, one
``all_reduce``) so every rank holds identical optimizer state (the Trainer
saves rank 0's and every rank loads it). Default process group throughout.
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
        """Payload bytes this process handed to collectives so far (gradients and factors)."""
        self.wire_bytes = 0.0
        """Bytes this process sent so far under the ring model (all_reduce: 2(W-1)/W x payload; all_gather: (W-1) x)."""

    def install(self) -> None:
        self.opt.factor_reducer = self.reduce_factors
        self.opt.w1 = self.n_even / self.world_size

    def _all_reduce(self, buf: Tensor) -> None:
        size = buf.numel() * buf.element_size()
        self.bytes_reduced += size
        self.wire_bytes += 2 * (self.world_size - 1) / self.world_size * size
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)

    def _all_gather(self, buf: Tensor) -> List[Tensor]:
        size = buf.numel() * buf.element_size()
        self.bytes_reduced += size
        self.wire_bytes += (self.world_size - 1) * size
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(out, buf)
        return out

    def reduce_gradients(self) -> None:
        """Replace each rank's local ``p.grad`` by global g1/g2 and ``p.grad = g_avg`` (via ``set_dual_gradients``).

        A parameter without a gradient on every rank keeps ``grad = None``.
        """
        sizes = [p.numel() for p in self.params]
        total = sum(sizes)
        device = self.params[0].device
        # local gradients, then one entry per parameter: 1 where this rank has a gradient
        local = torch.zeros(total + len(self.params), dtype=torch.float32, device=device)
        offset = 0
        for i, (p, n) in enumerate(zip(self.params, sizes)):
            if p.grad is not None:
                local[offset : offset + n] = p.grad.detach().reshape(-1).float()
                local[total + i] = 1.0
            offset += n
        if self.world_size <= 4:
            parts = self._all_gather(local)
            sums = torch.stack([_ordered_sum(parts[0::2]), _ordered_sum(parts[1::2])])
        else:
            sums = torch.zeros(2, local.numel(), dtype=local.dtype, device=device)
            sums[self.rank % 2] = local
            self._all_reduce(sums)
        g1_flat = sums[0, :total] / self.n_even
        g2_flat = sums[1, :total] / self.n_odd
        present = sums[:, total:].sum(0).tolist()  # the step's one host sync
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
        """Average each layer's new ``(A, S)`` over the ranks that captured it (one ``all_reduce`` of upper triangles).

        The factors are symmetric; the result is exactly symmetric.
        """
        layers = self.opt.engine.layers
        pieces: List[Tensor] = []
        for layer in layers:
            pair: Optional[Tuple[Tensor, Tensor]] = new.get(layer.name)
            for k, dim in enumerate((layer.in_dim, layer.out_dim)):
                rows, cols = _triu(dim, layer.weight.device)
                if pair is None:
                    pieces.append(torch.zeros(rows.numel(), device=layer.weight.device))
                else:
                    pieces.append(pair[k].float()[rows, cols])
        counts = torch.tensor([1.0 if layer.name in new else 0.0 for layer in layers], device=self.params[0].device)
        buf = torch.cat(pieces + [counts])
        self._all_reduce(buf)
        counts = buf[-len(layers) :].tolist()  # one host sync
        out: Dict[str, Tuple[Tensor, Tensor]] = {}
        offset = 0
        for i, layer in enumerate(layers):
            mats = []
            for dim in (layer.in_dim, layer.out_dim):
                rows, cols = _triu(dim, layer.weight.device)
                mat = torch.zeros(dim, dim, device=buf.device)
                mat[rows, cols] = buf[offset : offset + rows.numel()]
                mat[cols, rows] = buf[offset : offset + rows.numel()]
                mats.append(mat)
                offset += rows.numel()
            if counts[i] > 0:
                out[layer.name] = (mats[0] / counts[i], mats[1] / counts[i])
        return out


def _ordered_sum(parts: List[Tensor]) -> Tensor:
    """Sum in list order (identical bits on every rank)."""
    out = parts[0].clone()
    for part in parts[1:]:
        out += part
    return out


def _triu(dim: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Row and column indices of the upper triangle (diagonal included) of a ``(dim, dim)`` matrix."""
    idx = torch.triu_indices(dim, dim, device=device)
    return idx[0], idx[1]
