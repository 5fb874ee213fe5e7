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

Under DDP the same reduction runs per gradient bucket inside the backward
pass (:mod:`hf_fop.comm_hook`, :meth:`DualGradientReducer.attach_ddp`);
:meth:`DualGradientReducer.reduce_gradients` is the post-backward path, kept
where the hook cannot be used.

Curvature factors (:class:`ReplicatedCurvature`, ``opt.distributor``): each
rank keeps running averages of its own factors; they are averaged over ranks
(upper triangles, one ``all_reduce``) only before they are read, i.e. before
eigendecompositions and checkpoints, so every rank holds identical optimizer
state where it matters (the Trainer saves rank 0's and every rank loads it).
``FOPConfig.curvature_sharding="specialists"`` installs
:class:`hf_fop.specialists.SpecialistCurvature` instead (same interface).
Default process group throughout.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .curvature import KFACLayer
from .optimizer import FOP, LayerResult
from .specialists import SpecialistCurvature

logger = logging.getLogger(__name__)


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
    """Reduces local gradients into FOP's g1/g2; owns the curvature exchange (:attr:`curvature`).

    :meth:`install` (FOP) or :meth:`install_curvature` (K-FAC, DDP averages the
    gradients) sets ``opt.distributor``; in FOP mode call
    :meth:`reduce_gradients` after the last local backward of a step, and
    :meth:`sync_factors` on every rank before reading or saving the factors.
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
        self.device = self.params[0].device
        self.hook: Optional[Any] = None
        """The :class:`hf_fop.comm_hook.DualGradientCommHook` registered by :meth:`attach_ddp`, if any."""
        self.hooked: Optional[nn.Module] = None
        self.refused: Optional[nn.Module] = None
        self.owner_gradients = False
        """Curvature specialists, FOP mode: :meth:`reduce_gradients` sends each managed layer's g1 and g2 to its
        owner only (:meth:`hf_fop.specialists.SpecialistCurvature.reduce_gradients`); ``p.grad`` of the layers
        other ranks own stays ``None``, so clip with :meth:`clip_grad_norm_` (FOPTrainer does). Set by
        :meth:`install` when the curvature is sharded and ``owner_gradients=True``."""
        self.curvature: Any = (
            SpecialistCurvature(self) if opt.config.curvature_sharding == "specialists" else ReplicatedCurvature(self)
        )
        """The curvature distribution (``opt.distributor``), installed by :meth:`install` / :meth:`install_curvature`."""

    def install(self, owner_gradients: bool = False) -> None:
        """FOP mode: the optimizer gets g1/g2 from :meth:`reduce_gradients` and factors from :attr:`curvature`.

        ``owner_gradients`` (curvature specialists only): see :attr:`owner_gradients`.
        """
        self.install_curvature()
        self.opt.w1 = self.n_even / self.world_size
        self.owner_gradients = owner_gradients and isinstance(self.curvature, SpecialistCurvature)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip every rank's gradients by the global norm of ``g_avg`` (collective); returns that norm (0-dim).

        The ``torch.nn.utils.clip_grad_norm_`` rule (``min(1, max_norm / (norm + 1e-6))``); with
        :attr:`owner_gradients` the norm comes from the owners' gradients, else from ``p.grad`` (every rank holds it).
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = self.curvature.grad_norm() if self.owner_gradients else _norm(grads, self.device)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        return norm

    def _count(self, buf: Tensor, wire_factor: float) -> None:
        size = buf.numel() * buf.element_size()
        self.bytes_reduced += size
        self.wire_bytes += wire_factor * size

    def all_reduce(self, buf: Tensor, op: Any = dist.ReduceOp.SUM) -> None:
        """In-place ``all_reduce`` of ``buf``, counted (ring: each rank sends ``2 (W - 1) / W`` x payload)."""
        self._count(buf, 2 * (self.world_size - 1) / self.world_size)
        dist.all_reduce(buf, op=op)

    def reduce(self, buf: Tensor, dst: int) -> Any:
        """Asynchronous sum of ``buf`` into rank ``dst``'s, counted (ring: ``(W - 1) / W`` x payload per rank)."""
        self._count(buf, (self.world_size - 1) / self.world_size)
        return dist.reduce(buf, dst, op=dist.ReduceOp.SUM, async_op=True)

    def broadcast(self, buf: Tensor, src: int) -> Any:
        """Asynchronous ``broadcast`` of rank ``src``'s ``buf``, counted (pipelined: ``(W - 1) / W`` x payload per rank)."""
        self._count(buf, (self.world_size - 1) / self.world_size)
        return dist.broadcast(buf, src, async_op=True)

    def capture_counts(self, new: Dict[str, Tuple[Tensor, Tensor]]) -> Tuple[List[float], bool]:
        """``(ranks that captured each managed layer this step, every rank's new factors are finite)``.

        One ``all_reduce`` of ``L + 1`` floats (``L`` managed layers) and one host read; collective.
        """
        layers = self.opt.engine.layers
        local = [f.sum() for pair in new.values() for f in pair]
        nonfinite = (~torch.isfinite(torch.stack(local).sum())).float().reshape(1) if local else torch.zeros(1, device=self.device)
        present = torch.tensor([1.0 if layer.name in new else 0.0 for layer in layers], device=self.device)
        flags = torch.cat([present.to(nonfinite.device), nonfinite])
        self.all_reduce(flags)
        values = flags.tolist()
        return values[:-1], values[-1] == 0

    def _all_gather(self, buf: Tensor) -> List[Tensor]:
        self._count(buf, self.world_size - 1)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]  # counted as all_gather: (W - 1) x payload
        dist.all_gather(out, buf)
        return out

    def reduce_gradients(self) -> None:
        """Replace each rank's local ``p.grad`` by global g1/g2 and ``p.grad = g_avg`` (via ``set_dual_gradients``).

        A parameter without a gradient on every rank keeps ``grad = None``.
        """
        if self.owner_gradients:
            self.curvature.reduce_gradients()
            return
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
            self.all_reduce(sums)
        g1_flat = sums[0, :total] / self.n_even
        g2_flat = sums[1, :total] / self.n_odd
        present = sums[:, total:].sum(0).tolist()  # one host read
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

    def attach_ddp(self, model: nn.Module) -> bool:
        """Reduce g1/g2 inside DDP's backward (:mod:`hf_fop.comm_hook`) when ``model`` allows it.

        Returns whether the hook runs; otherwise logs one line saying why and
        the caller keeps :meth:`reduce_gradients` (every micro-batch under
        ``no_sync``). Not possible: ``model`` is not a
        ``DistributedDataParallel`` module, or DDP already has a comm hook
        (e.g. accelerate's ``DistributedDataParallelKwargs(comm_hook=...)``).
        """
        from .comm_hook import DualGradientCommHook

        if self.hooked is model:
            return True
        if self.refused is model:
            return False
        self.refused = model
        say = logger.warning if self.rank == 0 else logger.debug  # one line per run, not one per rank
        if self.owner_gradients:
            say("FOP: curvature specialists reduce g1/g2 to each layer's owner after the backward pass (no DDP comm hook).")
            return False
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            say(
                f"FOP: the model is a {type(model).__name__}, not DistributedDataParallel; the dual-gradient "
                "reduction runs after the backward pass."
            )
            return False
        hook = DualGradientCommHook(self)
        try:
            hook.register(model)
        except RuntimeError as err:
            say(f"FOP: DDP refused the dual-gradient comm hook ({err}); the reduction runs after the backward pass.")
            return False
        self.hook, self.hooked, self.refused = hook, model, None
        return True

    def seconds_across_ranks(self, seconds: float) -> Tuple[float, float]:
        """``(max, mean)`` over ranks of each rank's ``seconds`` (one small ``all_gather``; collective, not counted)."""
        out = torch.empty(self.world_size, dtype=torch.float64, device=self.device)  # NCCL needs device tensors
        dist.all_gather_into_tensor(out, torch.tensor([seconds], dtype=torch.float64, device=self.device))
        peak, mean = torch.stack([out.max(), out.mean()]).tolist()  # one host read, on logging steps only
        return peak, mean

    def install_curvature(self) -> None:
        """Hand the factor exchange to the optimizer (``opt.distributor``); FOP and K-FAC modes alike."""
        self.opt.distributor = self.curvature

    def sync_factors(self) -> None:
        """Make this rank's curvature state the full, world-size-independent one (before saving; collective)."""
        self.curvature.full_state()


class ReplicatedCurvature:
    """Every rank keeps every factor; they meet only where they are read (factor traffic on inverse steps only).

    Each rank runs the running average on its *local* new factors,
    ``X_r <- d X_r + (1 - d) w_r X_new_r``, and the factors are averaged over
    ranks (``X = mean_r X_r``, upper triangles, one ``all_reduce``) only
    before they are read: eigendecompositions (:meth:`sync_factors`, called by
    ``FOP.step``) and checkpoints (FOPTrainer calls it before saving). The
    average is linear, so ``mean_r X_r`` equals the running average of the
    per-step rank means that a per-step exchange gives (up to rounding: the
    sums run in another order, so allclose, not bitwise). ``w_r = W c_r / n``
    with ``c_r`` = 1 when this rank captured the layer this step and ``n`` the
    number of ranks that did, so a layer unused on some ranks is weighted as
    the per-step mean over the ranks that saw it (a rank that did not see it
    decays its copy with a zero contribution).

    Per factor step one small ``all_reduce`` of ``L + 1`` floats (``L``
    managed layers) gives ``n`` and a global finiteness flag, so every rank
    takes the same skip-step decision.
    """

    def __init__(self, reducer: "DualGradientReducer") -> None:
        self.reducer = reducer
        self.engine = reducer.opt.engine
        self.pending = False
        """True when the ranks' factors may differ (local updates since the last sync)."""

    def exchange_factors(self, new: Dict[str, Tuple[Tensor, Tensor]]) -> Tuple[Dict[str, Tuple[Tensor, Tensor]], bool]:
        """``(factors for engine.update_factors, every rank's new factors are finite)`` from this rank's ``new``."""
        layers = self.engine.layers
        counts, finite = self.reducer.capture_counts(new)
        if not finite:
            return {}, False
        world_size = self.reducer.world_size
        out: Dict[str, Tuple[Tensor, Tensor]] = {}
        for layer, count in zip(layers, counts):
            if count == 0:
                continue
            pair = new.get(layer.name)
            if pair is None:  # seen elsewhere only: decay this rank's copy with a zero contribution
                zeros = [torch.zeros(d, d, device=layer.weight.device) for d in (layer.in_dim, layer.out_dim)]
                pair = (zeros[0], zeros[1])
            elif count != world_size:
                pair = (pair[0] * (world_size / count), pair[1] * (world_size / count))
            out[layer.name] = pair
        if out:
            self.pending = True
        return out, True

    def computes(self, layer: KFACLayer) -> bool:
        """Every rank computes every layer's direction."""
        return True

    def share_results(self, layers: List[KFACLayer], results: Dict[str, Optional[LayerResult]]) -> Dict[str, Optional[LayerResult]]:
        """Nothing to share: every rank computed ``results`` for all ``layers``."""
        return results

    def share_directions(self, layers: List[KFACLayer], deltas: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Nothing to share: every rank computed every direction."""
        return deltas

    def refresh_bases(self, only_missing: bool) -> None:
        """Average the factors (:meth:`sync_factors`), then every rank eigendecomposes every layer's; collective."""
        self.sync_factors()
        self.engine.update_eigenbases(only_missing=only_missing)

    def full_state(self) -> None:
        """Before a checkpoint: every rank's factors become the global ones (:meth:`sync_factors`); collective."""
        self.sync_factors()

    def has_gradient(self, layer: KFACLayer) -> bool:
        """Every rank holds every reduced gradient: this rank's ``p.grad`` says."""
        return layer.has_local_gradient

    def all_finite(self, finite: bool) -> bool:
        """Every rank holds the same gradients and checked the factors' finiteness globally: ``finite`` as it is."""
        return finite

    def state_loaded(self) -> None:
        """A loaded state is the same on every rank: nothing pending."""
        self.pending = False

    def sync_factors(self) -> None:
        """Replace every rank's factors by their mean over ranks (one ``all_reduce`` of upper triangles); collective."""
        if not self.pending:
            return
        layers = [layer for layer in self.engine.layers if layer.A is not None]
        pieces: List[Tensor] = []
        for layer in layers:
            for mat in (layer.A, layer.S):
                rows, cols = _triu(mat.shape[0], mat.device)
                pieces.append(mat[rows, cols])
        if pieces:
            buf = torch.cat(pieces)
            self.reducer.all_reduce(buf)
            buf /= self.reducer.world_size
            offset = 0
            for layer in layers:
                for mat in (layer.A, layer.S):
                    rows, cols = _triu(mat.shape[0], mat.device)
                    part = buf[offset : offset + rows.numel()]
                    mat[rows, cols] = part
                    mat[cols, rows] = part
                    offset += rows.numel()
        self.pending = False


def _norm(tensors: List[Tensor], device: torch.device) -> Tensor:
    """Euclidean norm over all ``tensors`` (0-dim float32; zero for none)."""
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack([n.float() for n in torch._foreach_norm(tensors)]).norm()


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
