"""The collectives FOP's distribution uses, counted, and the small helpers every part of it shares.

Default process group throughout. Byte counts follow the ring model: an ``all_reduce`` of ``n`` bytes sends
``2 (W - 1) / W n`` per rank, a ``reduce`` or a pipelined ``broadcast`` ``(W - 1) / W n``, an ``all_gather`` of ``n``
bytes per rank ``(W - 1) n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class DualGroups:
    """FOP's two gradient groups (FOP_SPEC, Algorithm 1): even ranks give g1, odd ranks give g2.

    With ``S_1``/``S_2`` the sums of the local gradients over the even/odd ranks, ``g1 = S_1 / n_even``,
    ``g2 = S_2 / n_odd`` and ``g_avg = w1 g1 + (1 - w1) g2`` with ``w1 = n_even / W`` is the mean over all ranks (what
    DDP would average), also for an odd world size.
    """

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise ValueError(f"The dual-gradient reduction needs world_size >= 2, got {self.world_size}.")

    @property
    def n_even(self) -> int:
        """Ranks giving g1."""
        return (self.world_size + 1) // 2

    @property
    def n_odd(self) -> int:
        """Ranks giving g2."""
        return self.world_size // 2

    @property
    def w1(self) -> float:
        """Weight of g1 in g_avg: ``n_even / W``."""
        return self.n_even / self.world_size

    @property
    def row(self) -> int:
        """Which group this rank's gradient belongs to (0: g1, 1: g2)."""
        return self.rank % 2

    def diff_and_avg(self, sum_even: Tensor, sum_odd: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(g1 - g2, g_avg)`` in ``dtype`` from the two float32 group sums (same shape; the same bits on every rank)."""
        g1 = (sum_even / self.n_even).to(dtype)
        g2 = (sum_odd / self.n_odd).to(dtype)
        diff = torch.sub(g1, g2)
        return diff, torch.add(g2, diff, alpha=self.w1)  # g2 + w1 (g1 - g2), as SubBatchGradients.install_dual


def group_sizes(world_size: int) -> Tuple[int, int]:
    """``(n_even, n_odd)``: ranks giving g1 and g2. Needs ``world_size >= 2``."""
    groups = DualGroups(0, world_size)
    return groups.n_even, groups.n_odd


class Collectives:
    """Counted wrappers around ``torch.distributed`` (default group): every byte FOP hands to a collective."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.world_size = world()
        self.device = device
        """Where buffers are built (NCCL needs device tensors)."""
        self.bytes_reduced = 0
        """Payload bytes this process handed to collectives so far (gradients and factors)."""
        self.wire_bytes = 0.0
        """Bytes this process sent so far under the ring model (see the module docstring)."""

    def count(self, buf: Tensor, wire_factor: float) -> None:
        """Add ``buf``'s bytes to :attr:`bytes_reduced` and ``wire_factor`` times them to :attr:`wire_bytes`."""
        size = buf.numel() * buf.element_size()
        self.bytes_reduced += size
        self.wire_bytes += wire_factor * size

    def all_reduce(self, buf: Tensor, op: Any = dist.ReduceOp.SUM) -> None:
        """In-place ``all_reduce`` of ``buf``."""
        self.count(buf, 2 * (self.world_size - 1) / self.world_size)
        dist.all_reduce(buf, op=op)

    def all_reduce_async(self, buf: Tensor) -> Any:
        """Asynchronous in-place sum of ``buf`` over ranks; returns the work handle."""
        self.count(buf, 2 * (self.world_size - 1) / self.world_size)
        return dist.all_reduce(buf, async_op=True)

    def reduce(self, buf: Tensor, dst: int) -> Any:
        """Asynchronous sum of ``buf`` into rank ``dst``'s; returns the work handle."""
        self.count(buf, (self.world_size - 1) / self.world_size)
        return dist.reduce(buf, dst, op=dist.ReduceOp.SUM, async_op=True)

    def broadcast(self, buf: Tensor, src: int) -> Any:
        """Asynchronous ``broadcast`` of rank ``src``'s ``buf``; returns the work handle."""
        self.count(buf, (self.world_size - 1) / self.world_size)
        return dist.broadcast(buf, src, async_op=True)

    def all_gather(self, buf: Tensor, async_op: bool = False) -> Tuple[Tensor, Any]:
        """Every rank's ``buf`` stacked: ``((W, *buf.shape), work handle or None)``."""
        self.count(buf, self.world_size - 1)
        out = torch.empty(self.world_size * buf.numel(), dtype=buf.dtype, device=buf.device)  # gloo wants it flat
        work = dist.all_gather_into_tensor(out, buf.contiguous().reshape(-1), async_op=async_op)
        return out.view(self.world_size, *buf.shape), work

    def rank0_answer(self, answer: bool) -> bool:
        """Rank 0's ``answer`` on every rank (one 1-byte ``broadcast``; not counted: set-up, once)."""
        buf = torch.tensor([answer], dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, 0)
        return bool(buf.item())

    def max_and_mean(self, value: float) -> Tuple[float, float]:
        """``(max, mean)`` over ranks of each rank's ``value`` (one small ``all_gather``; not counted: diagnostics)."""
        out = torch.empty(self.world_size, dtype=torch.float64, device=self.device)
        dist.all_gather_into_tensor(out, torch.tensor([value], dtype=torch.float64, device=self.device))
        peak, mean = torch.stack([out.max(), out.mean()]).tolist()  # one host read, on logging steps only
        return peak, mean


def dual_sums(comm: Collectives, groups: DualGroups, local: Tensor, async_op: bool = False) -> Tuple[Any, Any]:
    """Start the collective that gives every rank both group sums of ``local`` (flat float32).

    Up to 4 ranks an ``all_gather`` (per-rank traffic ``(W - 1) n``, ``W / 2`` times DDP's ring all-reduce), above that
    one ``all_reduce`` of a ``(2, n)`` buffer with this rank's row ``rank % 2`` written (2x DDP). Returns
    ``(work handle or None, finish)``; ``finish()`` gives ``(sum_even, sum_odd)`` once the work is done. The sums run
    in rank order, so every rank gets the same bits.
    """
    if groups.world_size <= 4:
        gathered, work = comm.all_gather(local, async_op=async_op)

        def finish() -> Tuple[Tensor, Tensor]:
            parts = list(gathered.unbind(0))
            return ordered_sum(parts[0::2]), ordered_sum(parts[1::2])

        return work, finish
    stacked = torch.zeros(2, local.numel(), dtype=local.dtype, device=local.device)
    stacked[groups.row] = local
    if async_op:
        work = comm.all_reduce_async(stacked)
    else:
        comm.all_reduce(stacked)
        work = None
    return work, lambda: (stacked[0], stacked[1])


def ordered_sum(parts: Sequence[Tensor]) -> Tensor:
    """Sum in list order (identical bits on every rank)."""
    out = parts[0].clone()
    for part in parts[1:]:
        out += part
    return out


def pack_triangles(mats: Sequence[Tensor]) -> Tensor:
    """Upper triangles (diagonal included) of square ``mats``, concatenated: ``(sum d (d + 1) / 2,)``."""
    pieces = []
    for mat in mats:
        idx = torch.triu_indices(mat.shape[0], mat.shape[0], device=mat.device)
        pieces.append(mat[idx[0], idx[1]])
    return torch.cat(pieces)


def unpack_triangles(mats: Sequence[Tensor], buf: Tensor) -> None:
    """Write :func:`pack_triangles`'s layout back into ``mats`` (both triangles), in place."""
    offset = 0
    for mat in mats:
        idx = torch.triu_indices(mat.shape[0], mat.shape[0], device=mat.device)
        part = buf[offset : offset + idx.shape[1]]
        mat[idx[0], idx[1]] = part
        mat[idx[1], idx[0]] = part
        offset += idx.shape[1]


def capture_counts(comm: Collectives, layer_names: Sequence[str], new: Any, finite: bool) -> Tuple[List[float], bool]:
    """``(ranks that captured each layer this step, every rank's answer is finite)`` (collective).

    ``new``: this rank's ``{layer name: (A_new, S_new)}``; ``finite``: whether this rank's gradients and ``new`` are
    finite. One ``all_reduce`` of ``L + 1`` floats and one host read: a capture step's only exchange before the
    factors themselves, and its finiteness vote.
    """
    flags = torch.tensor([1.0 if name in new else 0.0 for name in layer_names] + [0.0 if finite else 1.0], device=comm.device)
    comm.all_reduce(flags)
    values = flags.tolist()
    return values[:-1], values[-1] == 0
