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
* checkpoints: :meth:`SpecialistCurvature.full_state` (collective) sums the
  factors over ranks and broadcasts the owners' bases, so every rank holds
  the full, world-size-independent state of one process until the next
  factor update; a loaded state (any world size or mode) is localised the
  same way at that update.

Gradients: with ``DualGradientReducer.install(owner_gradients=True)`` (FOPTrainer)
:meth:`SpecialistCurvature.reduce_gradients` sends each layer's g1 and g2 to its
owner only and the AdamW parameters' gradients to everybody; otherwise (the
accelerate loop, plain loops that clip ``p.grad`` themselves, K-FAC under
DDP) they are reduced in full, see docs/distributed.md.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .curvature import EigenBasis, KFACLayer
from .fop_math import LayerStats
from .optimizer import LayerResult

if TYPE_CHECKING:  # pragma: no cover
    from .distributed import DualGradientReducer

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


class SpecialistCurvature:
    """``opt.distributor`` with curvature specialists: owners decompose and precondition, everybody applies."""

    def __init__(self, reducer: "DualGradientReducer") -> None:
        self.reducer = reducer
        self.opt = reducer.opt
        self.engine = reducer.opt.engine
        self.rank, self.world_size = reducer.rank, reducer.world_size
        shapes = [(layer.in_dim, layer.out_dim) for layer in self.engine.layers]
        self.owner: Dict[str, int] = {
            layer.name: rank for layer, rank in zip(self.engine.layers, assign_owners(shapes, self.world_size))
        }
        """Owner rank of each managed layer (the same on every rank)."""
        self.full = True
        """Every rank holds the full curvature state (after construction, loading or :meth:`full_state`)."""
        self.dirty = False
        """Factor updates since the owners last received the global factors."""
        self.present: Optional[set] = None
        """``id``s of the parameters with a gradient on some rank, from the last owner-only reduction."""

    @property
    def pending(self) -> bool:
        """This rank's curvature state is not the full one (see :meth:`full_state`)."""
        return not self.full

    def computes(self, layer: KFACLayer) -> bool:
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
            if layer.A is not None and not self.computes(layer):
                layer.A.zero_()
                layer.S.zero_()
                layer.basis_a = layer.basis_s = None
        self.full = False

    def exchange_factors(self, new: Dict[str, Tuple[Tensor, Tensor]]) -> Tuple[Dict[str, Tuple[Tensor, Tensor]], bool]:
        """``(factors for engine.update_factors, every rank's new factors are finite)``: this rank's share ``c_r / n``."""
        self._localize()
        counts, finite = self.reducer.capture_counts(new)
        if not finite:
            return {}, False
        out: Dict[str, Tuple[Tensor, Tensor]] = {}
        for layer, count in zip(self.engine.layers, counts):
            if count == 0:
                continue
            pair = new.get(layer.name)
            if pair is None:  # seen elsewhere only: decay this rank's share with a zero contribution
                pair = tuple(torch.zeros(d, d, device=layer.weight.device) for d in (layer.in_dim, layer.out_dim))
            else:
                pair = (pair[0] / count, pair[1] / count)
            out[layer.name] = pair
        if out:
            self.dirty = True
        return out, True

    def sync_factors(self) -> None:
        """Give each owner the global factors of its layers (one ``reduce`` of packed upper triangles per owner)."""
        self._localize()
        if not self.dirty:
            return
        layers = [layer for layer in self.engine.layers if layer.A is not None]
        works = []
        bufs = []
        for rank in range(self.world_size):
            owned = self._owned_by(rank, layers)
            if not owned:
                continue
            buf = _pack_triangles(owned)
            works.append(self.reducer.reduce(buf, rank))
            bufs.append((owned, buf, rank))
        for work in works:
            work.wait()
        for owned, buf, rank in bufs:
            if rank == self.rank:
                _unpack_triangles(owned, buf)
            else:
                for layer in owned:
                    layer.A.zero_()
                    layer.S.zero_()
        self.dirty = False

    def refresh_bases(self, only_missing: bool) -> None:
        """Owners eigendecompose their layers' global factors; an owner's failure past the limit stops every rank."""
        self.sync_factors()
        failed = 0
        error: Optional[RuntimeError] = None
        try:
            self.engine.update_eigenbases(only_missing=only_missing, select=self.computes)
        except RuntimeError as err:  # max_eigh_failures reached: tell the other ranks before raising
            error = err
            limit = self.opt.config.max_eigh_failures
            names = [i for i, layer in enumerate(self.engine.layers) if max(layer.eigh_failures.values()) >= limit]
            failed = 1 + (names[0] if names else len(self.engine.layers))
        flag = torch.tensor([float(failed)], device=self.reducer.device)
        self.reducer.all_reduce(flag, op=dist.ReduceOp.MAX)
        index = int(flag.item())
        if error is not None:
            raise error
        if index:
            name = self.engine.layers[index - 1].name if index <= len(self.engine.layers) else "?"
            raise RuntimeError(
                f"Eigendecomposition of layer {name!r} failed max_eigh_failures={self.opt.config.max_eigh_failures} "
                f"times in a row on its owner rank {self.owner.get(name, '?')} (float32 and float64); every rank stops "
                "(see that rank's error). Raise damping or max_eigh_failures, or exclude the layer (exclude_modules)."
            )

    # ------------------------------------------------------------ gradients
    def reduce_gradients(self) -> None:
        """Owner-only dual-gradient reduction (FOP, ``reducer.owner_gradients``); collective.

        One ``all_reduce`` of the presence flags; the AdamW parameters' local gradients are summed over ranks
        (``all_reduce``, divided by W: ``g_avg`` as DDP gives it); each owner gets its layers' sums per group from
        one ``reduce`` of a ``(2, n_o)`` buffer (rank r writes row r % 2), then ``g1 = row 0 / n_even``,
        ``g2 = row 1 / n_odd``, ``p.grad = lerp(g1, g2, 1 - w1)`` and keeps ``g1 - g2``. ``p.grad`` of the layers
        other ranks own is ``None``. A parameter without a gradient on every rank keeps ``None``.
        """
        red = self.reducer
        managed = {id(p) for layer in self.engine.layers for p in layer.params}
        present = torch.tensor([0.0 if p.grad is None else 1.0 for p in red.params], device=red.device)
        red.all_reduce(present)
        seen = {id(p) for p, count in zip(red.params, present.tolist()) if count > 0}
        self.present = seen
        rest = [p for p in red.params if id(p) in seen and id(p) not in managed]
        if rest:
            flat = torch.cat([_local_grad(p) for p in rest])
            red.all_reduce(flat)
            flat /= self.world_size
            _scatter(rest, flat)
        pending = []
        for rank in range(self.world_size):
            params = [p for layer in self._owned_by(rank, self.engine.layers) for p in layer.params if id(p) in seen]
            if not params:
                continue
            buf = torch.zeros(2, sum(p.numel() for p in params), dtype=torch.float32, device=red.device)
            buf[self.rank % 2] = torch.cat([_local_grad(p) for p in params])
            pending.append((rank, params, buf, red.reduce(buf, rank)))
        w1 = red.n_even / self.world_size
        diffs: Dict[Tensor, Tensor] = {}
        for rank, params, buf, work in pending:
            work.wait()
            if rank != self.rank:
                for p in params:
                    p.grad = None
                continue
            g1, g2 = buf[0] / red.n_even, buf[1] / red.n_odd
            diff, avg = torch.sub(g1, g2), torch.lerp(g1, g2, 1 - w1)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = avg[offset : offset + n].view_as(p).to(p.dtype)
                diffs[p] = diff[offset : offset + n].view_as(p).to(p.dtype)
                offset += n
        for p in red.params:
            if id(p) not in seen:
                p.grad = None
        self.opt.w1 = w1
        self.opt.set_reduced_gradients(diffs)

    def grad_norm(self) -> Tensor:
        """Norm of ``g_avg`` over all parameters with owner-only gradients (0-dim; the same bits on every rank).

        The owners' squared norms are summed over ranks (one 1-float ``all_reduce``); the AdamW parameters'
        gradients are the same on every rank and added locally.
        """
        managed = {id(p) for layer in self.engine.layers for p in layer.params}
        owned = [p.grad for layer in self.engine.layers if self.computes(layer) for p in layer.params if p.grad is not None]
        rest = [p.grad for p in self.reducer.params if id(p) not in managed and p.grad is not None]
        square = _square_norm(owned, self.reducer.device).reshape(1)
        self.reducer.all_reduce(square)
        return torch.sqrt(square[0] + _square_norm(rest, self.reducer.device))

    def has_gradient(self, layer: KFACLayer) -> bool:
        """Whether ``layer`` has a gradient on some rank (the same answer on every rank)."""
        if self.present is None:  # gradients reduced in full: every rank holds them
            return layer.has_local_gradient
        return any(id(p) in self.present for p in layer.params)

    def all_finite(self, finite: bool) -> bool:
        """Whether every rank's gradients and new factors are finite (one 1-float ``all_reduce``, MIN); collective."""
        flag = torch.tensor([1.0 if finite else 0.0], device=self.reducer.device)
        self.reducer.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    # ----------------------------------------------------------- directions
    def share_results(self, layers: List[KFACLayer], results: Dict[str, Optional[LayerResult]]) -> Dict[str, Optional[LayerResult]]:
        """Every layer's stats, damping and KL term on every rank (one exact ``all_reduce`` of a float32 table)."""
        if not layers:  # no managed gradient this step on any rank (gradients are reduced in full)
            return {}
        table = torch.zeros(len(layers), _COLUMNS, dtype=torch.float32, device=self.reducer.device)
        for i, layer in enumerate(layers):
            result = results.get(layer.name)
            if result is None:
                continue
            values = [torch.ones(()), torch.as_tensor(result.damping), result.kl if result.kl is not None else torch.zeros(())]
            values += [getattr(result.stats, f) for f in _STATS]
            table[i] = torch.stack([v.to(device=table.device, dtype=torch.float32).reshape(()) for v in values])
        self.reducer.all_reduce(table)  # exact: each entry is one rank's float32 value summed with zeros
        rows = table
        present = table[:, 0].tolist()  # one host read per step
        relative = self.opt.config.damping_mode == "relative"
        shared: Dict[str, Optional[LayerResult]] = {}
        for i, layer in enumerate(layers):
            if self.computes(layer):
                shared[layer.name] = results[layer.name]
                continue
            if present[i] == 0:  # no basis on the owner yet: identity step everywhere
                shared[layer.name] = None
                continue
            row = rows[i]
            stats = LayerStats(**{f: row[3 + j] for j, f in enumerate(_STATS)})
            damping = row[1] if relative else self.opt.config.damping  # absolute: the float the owner used
            kl = row[2] if self.opt.config.kl_clip is not None else None
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
                buf = torch.empty(sum(size(layer) for layer in owned), dtype=torch.float32, device=self.reducer.device)
            pending.append((owned, buf, rank, self.reducer.broadcast(buf, rank)))
        received = []
        for owned, buf, rank, work in pending:
            work.wait()
            if rank != self.rank:
                received.append((owned, buf))
        return received

    # ----------------------------------------------------------------- state
    def full_state(self) -> None:
        """Every rank gets the global factors (``all_reduce`` of the triangles) and every basis (owners broadcast)."""
        if self.full:
            return
        layers = [layer for layer in self.engine.layers if layer.A is not None]
        if layers:
            buf = _pack_triangles(layers)
            self.reducer.all_reduce(buf)
            _unpack_triangles(layers, buf)
        basis_size = lambda l: l.in_dim * l.in_dim + l.in_dim + l.out_dim * l.out_dim + l.out_dim + 2  # noqa: E731
        for owned, buf in self._broadcast_from_owners(layers, _pack_basis, basis_size):
            _unpack_bases(owned, buf)
        self.full = True
        self.dirty = False

    def state_loaded(self) -> None:
        """A loaded state is the full one on every rank; it is localised at the next factor update."""
        self.full = True
        self.dirty = False


def _local_grad(p: Tensor) -> Tensor:
    """This rank's gradient of ``p`` as float32, flat (zeros without one)."""
    if p.grad is None:
        return torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    return p.grad.detach().reshape(-1).float()


def _scatter(params: List[Tensor], flat: Tensor) -> None:
    """``p.grad`` of each parameter from its slice of ``flat``, in the parameter's dtype."""
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()


def _square_norm(tensors: List[Tensor], device: torch.device) -> Tensor:
    """Squared Euclidean norm over ``tensors`` (0-dim float32; zero for none)."""
    if not tensors:
        return torch.zeros((), device=device)
    return (torch.stack([n.float() for n in torch._foreach_norm(tensors)]) ** 2).sum()


def _pack_triangles(layers: List[KFACLayer]) -> Tensor:
    """Upper triangles (diagonal included) of each layer's A then S, concatenated: ``(sum d (d + 1) / 2,)``."""
    pieces = []
    for layer in layers:
        for mat in (layer.A, layer.S):
            idx = torch.triu_indices(mat.shape[0], mat.shape[0], device=mat.device)
            pieces.append(mat[idx[0], idx[1]])
    return torch.cat(pieces)


def _unpack_triangles(layers: List[KFACLayer], buf: Tensor) -> None:
    """Write :func:`_pack_triangles`'s layout back into A and S (both triangles)."""
    offset = 0
    for layer in layers:
        for mat in (layer.A, layer.S):
            idx = torch.triu_indices(mat.shape[0], mat.shape[0], device=mat.device)
            part = buf[offset : offset + idx.shape[1]]
            mat[idx[0], idx[1]] = part
            mat[idx[1], idx[0]] = part
            offset += idx.shape[1]


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
