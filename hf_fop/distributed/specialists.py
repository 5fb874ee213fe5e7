"""Curvature specialists (the paper's Algorithm 1): each managed layer has one owner rank.

``FOPConfig.curvature_sharding = "specialists"`` under several processes.
:func:`assign_owners` gives every managed layer an owner by a deterministic
greedy balance of its cost; :class:`SpecialistCurvature` (``opt.distributor``)
then makes the owner alone hold the layer's global factors, run its
eigendecompositions and compute its direction, and shares what every rank
needs to apply the same update:

* factors: every rank keeps local running sums ``X_r`` whose sum over ranks
  is the global factor, ``X = sum_r X_r``. On a factor step rank ``r`` adds
  ``(1 - d) c_r / n X_new_r`` (``c_r`` = 1 when it captured the layer, ``n``
  the ranks that did: the per-step mean), after decaying by ``d``. Before an
  eigendecomposition one ``reduce`` per owner (upper triangles of its layers,
  packed) gives the owner ``X``; the owner keeps ``X``, the others zero their
  copies, so the sum stays the global factor;
* directions: the owner computes each of its layers' direction in the
  eigenbasis, its stats and KL term; one ``all_reduce`` of a small
  ``(layers, 9)`` float32 table (each row nonzero on its owner only, so the
  sum is exact) gives every rank the stats and the trust-region scale; the
  owner then sends ``unrotate(scale * direction)`` ``(out, in)`` to every rank,
  one ``broadcast`` per owner of its layers' directions packed. Momentum,
  weight decay and the update run on every rank, so replicas stay bitwise
  identical;
* eigendecomposition failures: the owner retries in float64 and keeps the
  last basis as one process does; one 1-float ``all_reduce`` per
  eigendecomposition step makes every rank raise when an owner reached
  ``max_eigh_failures``;
* checkpoints: :meth:`SpecialistCurvature.make_full` (collective) sums the
  factors over ranks and broadcasts the owners' bases, so every rank holds
  the full, world-size-independent state of one process until the next
  factor update; a loaded state (any world size or mode) is localised the
  same way at that update.

Gradients: with ``DualGradientReducer(opt, owner_gradients=True)`` (FOPTrainer) each layer's g1 and g2 go to its
owner only and the AdamW parameters' gradients to everybody; otherwise (the accelerate loop, plain loops that clip
``p.grad`` themselves, K-FAC under DDP) they are reduced in full, see docs/distributed.md.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import FOPConfig
from ..curvature import CurvatureEngine, EigenBasis, KFACLayer
from ..fop_math import LayerResult, LayerStats
from ..refresh import RefreshUnit, refresh_bases, unit_layers
from .collectives import Collectives, capture_counts, pack_triangles, unpack_triangles
from .interface import CurvatureDistributor, Factors

_STATS = [f.name for f in fields(LayerStats)]
_COLUMNS = 3 + len(_STATS)  # present, damping, kl, then the stats


def layer_cost(in_dim: int, out_dim: int) -> int:
    """Owner work of one layer: eigendecompositions ``d_A^3 + d_S^3`` plus its direction ``d_out d_in (d_out + d_in)``."""
    return in_dim**3 + out_dim**3 + out_dim * in_dim * (out_dim + in_dim)


def assign_owners(shapes: Sequence[Tuple[int, int]], world_size: int) -> List[int]:
    """Owner rank of each layer ``(in_dim, out_dim)``: greedy, costliest layer first, to the least loaded rank.

    Deterministic (ties: lower layer index first, then lower rank), so every rank computes the same assignment.
    """
    if world_size < 1:
        raise ValueError(f"assign_owners: world_size must be >= 1, got {world_size}.")
    costs = [layer_cost(i, o) for i, o in shapes]
    loads = [0] * world_size
    owners = [0] * len(shapes)
    for index in sorted(range(len(shapes)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def owner_loads(shapes: Sequence[Tuple[int, int]], owners: Sequence[int], world_size: int) -> List[int]:
    """Summed :func:`layer_cost` per rank for an assignment."""
    loads = [0] * world_size
    for (i, o), rank in zip(shapes, owners):
        loads[rank] += layer_cost(i, o)
    return loads


class SpecialistCurvature(CurvatureDistributor):
    """Owners decompose and precondition their layers, every rank applies every update (see the module docstring)."""

    def __init__(self, engine: CurvatureEngine, config: FOPConfig, comm: Collectives) -> None:
        super().__init__(engine, config)
        self.comm = comm
        self.rank, self.world_size = comm.rank, comm.world_size
        shapes = [(layer.in_dim, layer.out_dim) for layer in engine.layers]
        self.owner: Dict[str, int] = {
            layer.name: rank for layer, rank in zip(engine.layers, assign_owners(shapes, self.world_size))
        }
        """Owner rank of each managed layer (the same on every rank)."""
        self.full = True
        """Every rank holds the full curvature state (after construction, loading or :meth:`make_full`)."""
        self.dirty: Set[str] = set()
        """Layers with factor updates since their owner last received the global factors."""

    @property
    def partial(self) -> bool:
        return not self.full

    def owns(self, layer: KFACLayer) -> bool:
        """Whether this rank owns ``layer`` (decomposes its factors and computes its direction)."""
        return self.owner[layer.name] == self.rank

    def _owned_by(self, rank: int, layers: List[KFACLayer]) -> List[KFACLayer]:
        return [layer for layer in layers if self.owner[layer.name] == rank]

    # ------------------------------------------------------------- factors
    def _localize(self) -> None:
        """From the full state to the owners' one: other ranks zero their copies (the sum stays the global factor)."""
        if not self.full:
            return
        for layer in self.engine.layers:
            if layer.A is not None and not self.owns(layer):
                layer.A.zero_()
                layer.S.zero_()
                layer.basis_a = layer.basis_s = None
        self.full = False

    def exchange_factors(self, new: Factors, finite: bool) -> Tuple[Factors, bool]:
        """``(factors for engine.update_factors, every rank's gradients and new factors are finite)``: this rank's share
        ``c_r / n``."""
        self._localize()
        counts, finite = capture_counts(self.comm, [layer.name for layer in self.engine.layers], new, finite)
        if not finite:
            return {}, False
        out: Factors = {}
        for layer, count in zip(self.engine.layers, counts):
            if count == 0:
                continue
            pair = new.get(layer.name)
            if pair is None:  # seen elsewhere only: decay this rank's share with a zero contribution
                pair = tuple(torch.zeros(d, d, device=layer.weight.device) for d in (layer.in_dim, layer.out_dim))
            else:
                pair = (pair[0] / count, pair[1] / count)
            out[layer.name] = pair
        self.dirty.update(out)
        return out, True

    def _send_to_owners(self, layers: List[KFACLayer]) -> None:
        """Give each owner the global factors of those of ``layers`` that changed since (one ``reduce`` of packed upper
        triangles per owner)."""
        self._localize()
        layers = [layer for layer in layers if layer.name in self.dirty and layer.A is not None]
        if not layers:
            return
        works = []
        bufs = []
        for rank in range(self.world_size):
            owned = self._owned_by(rank, layers)
            if not owned:
                continue
            buf = pack_triangles(_factor_mats(owned))
            works.append(self.comm.reduce(buf, rank))
            bufs.append((owned, buf, rank))
        for work in works:
            work.wait()
        for owned, buf, rank in bufs:
            if rank == self.rank:
                unpack_triangles(_factor_mats(owned), buf)
            else:
                for layer in owned:
                    layer.A.zero_()
                    layer.S.zero_()
        self.dirty.difference_update(layer.name for layer in layers)

    def refresh_bases(self, units: List[RefreshUnit]) -> None:
        """Owners carry out the ``units`` of their layers on the global factors; an owner's failure past the limit stops
        every rank."""
        self._send_to_owners(unit_layers(units))
        failed = 0
        error: Optional[RuntimeError] = None
        try:
            owned = [unit for unit in units if self.owns(unit.layer)]
            refresh_bases(self.engine, owned, self.config)
        except RuntimeError as err:  # max_eigh_failures reached: tell the other ranks before raising
            error = err
            limit = self.config.max_eigh_failures
            names = [i for i, layer in enumerate(self.engine.layers) if max(layer.eigh_failures.values()) >= limit]
            failed = 1 + (names[0] if names else len(self.engine.layers))
        flag = torch.tensor([float(failed)], device=self.comm.device)
        self.comm.all_reduce(flag, op=dist.ReduceOp.MAX)
        index = int(flag.item())
        if error is not None:
            raise error
        if index:
            name = self.engine.layers[index - 1].name if index <= len(self.engine.layers) else "?"
            raise RuntimeError(
                f"Eigendecomposition of layer {name!r} failed max_eigh_failures={self.config.max_eigh_failures} "
                f"times in a row on its owner rank {self.owner.get(name, '?')} (float32 and float64); every rank stops "
                "(see that rank's error). Raise damping or max_eigh_failures, or exclude the layer (exclude_modules)."
            )

    def all_finite(self, finite: bool) -> bool:
        """Whether every rank's gradients and new factors are finite (one 1-float ``all_reduce``, MIN); collective."""
        flag = torch.tensor([1.0 if finite else 0.0], device=self.comm.device)
        self.comm.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    # ----------------------------------------------------------- directions
    def share_results(self, layers: List[KFACLayer], results: Dict[str, Optional[LayerResult]]) -> Dict[str, Optional[LayerResult]]:
        """Every layer's stats, damping and KL term on every rank (one exact ``all_reduce`` of a float32 table)."""
        if not layers:  # no managed gradient this step on any rank (gradients are reduced in full)
            return {}
        table = torch.zeros(len(layers), _COLUMNS, dtype=torch.float32, device=self.comm.device)
        for i, layer in enumerate(layers):
            result = results.get(layer.name)
            if result is None:
                continue
            values = [torch.ones(()), torch.as_tensor(result.damping), result.kl if result.kl is not None else torch.zeros(())]
            values += [getattr(result.stats, f) for f in _STATS]
            table[i] = torch.stack([v.to(device=table.device, dtype=torch.float32).reshape(()) for v in values])
        self.comm.all_reduce(table)  # exact: each entry is one rank's float32 value summed with zeros
        rows = table
        present = table[:, 0].tolist()  # one host read per step
        relative = self.config.damping_mode == "relative"
        shared: Dict[str, Optional[LayerResult]] = {}
        for i, layer in enumerate(layers):
            if self.owns(layer):
                shared[layer.name] = results[layer.name]
                continue
            if present[i] == 0:  # no basis on the owner yet: identity step everywhere
                shared[layer.name] = None
                continue
            row = rows[i]
            stats = LayerStats(**{f: row[3 + j] for j, f in enumerate(_STATS)})
            damping = row[1] if relative else self.config.damping  # absolute: the float the owner used
            kl = row[2] if self.config.kl_clip is not None else None
            shared[layer.name] = LayerResult(stats, damping, kl)
        return shared

    def share_directions(self, layers: List[KFACLayer], deltas: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Every layer's direction ``(out, in)`` on every rank: one ``broadcast`` per owner of its layers', packed."""
        shared = {layer.name: deltas[layer.name] for layer in self._owned_by(self.rank, layers)}
        received = self._broadcast_from_owners(
            layers, lambda layer: deltas[layer.name].reshape(-1), lambda layer: layer.out_dim * layer.in_dim
        )
        for owned, buf in received:
            offset = 0
            for layer in owned:
                n = layer.out_dim * layer.in_dim
                shared[layer.name] = buf[offset : offset + n].view(layer.out_dim, layer.in_dim)
                offset += n
        return shared

    def _broadcast_from_owners(
        self, layers: List[KFACLayer], pack: Callable[[KFACLayer], Tensor], size: Callable[[KFACLayer], int]
    ) -> List[Tuple[List[KFACLayer], Tensor]]:
        """One ``broadcast`` per owner of its layers' ``pack(layer)`` (flat float32, ``size(layer)`` elements each),
        all in flight together; returns ``(layers, flat buffer)`` per *other* owner, after the broadcasts end."""
        pending = []
        for rank in range(self.world_size):
            owned = self._owned_by(rank, layers)
            if not owned:
                continue
            if rank == self.rank:
                buf = torch.cat([pack(layer) for layer in owned])
            else:
                buf = torch.empty(sum(size(layer) for layer in owned), dtype=torch.float32, device=self.comm.device)
            pending.append((owned, buf, rank, self.comm.broadcast(buf, rank)))
        received = []
        for owned, buf, rank, work in pending:
            work.wait()
            if rank != self.rank:
                received.append((owned, buf))
        return received

    # ----------------------------------------------------------------- state
    def make_full(self) -> None:
        """Every rank gets the global factors (``all_reduce`` of the triangles) and every basis (owners broadcast)."""
        if self.full:
            return
        layers = [layer for layer in self.engine.layers if layer.A is not None]
        if layers:
            buf = pack_triangles(_factor_mats(layers))
            self.comm.all_reduce(buf)
            unpack_triangles(_factor_mats(layers), buf)
        basis_size = lambda l: l.in_dim * l.in_dim + l.in_dim + l.out_dim * l.out_dim + l.out_dim + 2  # noqa: E731
        for owned, buf in self._broadcast_from_owners(layers, _pack_basis, basis_size):
            _unpack_bases(owned, buf)
        self.full = True
        self.dirty = set()

    def state_loaded(self) -> None:
        """A loaded state is the full one on every rank; it is localised at the next factor update."""
        self.full = True
        self.dirty = set()


def _factor_mats(layers: List[KFACLayer]) -> List[Tensor]:
    """Each layer's A then S, in order: the matrices :func:`pack_triangles` packs."""
    return [mat for layer in layers for mat in (layer.A, layer.S)]


def _pack_basis(layer: KFACLayer) -> Tensor:
    """``[q_A, eig_A, q_S, eig_S, failures A, failures S]`` flat: ``(d_A^2 + d_A + d_S^2 + d_S + 2,)``."""
    if layer.basis_a is None or layer.basis_s is None:
        raise RuntimeError(f"SpecialistCurvature: layer {layer.name!r} has factors but its owner holds no eigenbasis.")
    failures = torch.tensor([float(layer.eigh_failures["A"]), float(layer.eigh_failures["S"])], device=layer.A.device)
    return torch.cat(
        [layer.basis_a.q.reshape(-1), layer.basis_a.eigenvalues, layer.basis_s.q.reshape(-1), layer.basis_s.eigenvalues, failures]
    )


def _unpack_bases(layers: List[KFACLayer], buf: Tensor) -> None:
    """Inverse of :func:`_pack_basis` for consecutive layers."""
    offset = 0
    for layer in layers:
        bases = []
        for d in (layer.in_dim, layer.out_dim):
            q = buf[offset : offset + d * d].view(d, d).clone()
            vals = buf[offset + d * d : offset + d * d + d].clone()
            bases.append(EigenBasis(q=q, eigenvalues=vals))
            offset += d * d + d
        layer.basis_a, layer.basis_s = bases
        layer.eigh_failures = {"A": int(buf[offset]), "S": int(buf[offset + 1])}
        offset += 2
