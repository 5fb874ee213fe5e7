"""The dual-gradient reduction: each rank's local gradients become FOP's global g1 and g2 (FOP mode, W >= 2).

Ranks form two groups (FOP_SPEC, Algorithm 1): even ranks give g1, odd ranks give g2
(:class:`~hf_fop.distributed.collectives.DualGroups`). Each rank accumulates its local gradient ``g_r`` (DDP's
averaging switched off); one collective (:func:`~hf_fop.distributed.collectives.dual_sums`) then gives every rank both
group sums, and ``g_avg = w1 g1 + (1 - w1) g2`` is the global mean gradient (what DDP would have produced). Every rank
sums the same tensors in the same order, so replicas stay bitwise identical.

Three ways to run it, all ending in ``opt.set_reduced_gradients``:

* :meth:`DualGradientReducer.reduce_gradients` after the window's last backward (every parameter, one collective);
* inside DDP's backward, per gradient bucket (:meth:`DualGradientReducer.attach_ddp`, :mod:`.comm_hook`), then
  :meth:`DualGradientReducer.finish_hook`;
* owner-only (curvature specialists, ``owner_gradients=True``): each managed layer's g1 and g2 go to its owner rank
  only (one ``reduce`` per owner); the AdamW parameters' gradients are averaged everywhere. ``p.grad`` of layers other
  ranks own stays ``None``, so clip with :meth:`DualGradientReducer.clip_grad_norm_` (FOPTrainer does).

K-FAC mode needs none of this: DDP averages the gradients and the optimizer's curvature distributor averages the
factors. :func:`dual_gradient_reducer` is the one call a front end makes.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

from ..curvature import CurvatureEngine
from ..fop_math import global_norm, global_square_norm
from .collectives import Collectives, DualGroups, dual_sums
from .comm_hook import DualGradientCommHook
from .interface import CurvatureDistributor
from .specialists import SpecialistCurvature

logger = logging.getLogger(__name__)


class DualGradientSink(Protocol):
    """What the reduction needs of the optimizer (:class:`hf_fop.FOP` is one)."""

    param_groups: List[Dict[str, Any]]
    distributor: CurvatureDistributor
    engine: CurvatureEngine

    def set_reduced_gradients(self, diffs: Dict[Tensor, Tensor], w1: float, present: Optional[set] = None) -> None: ...


def dual_gradient_reducer(opt: DualGradientSink, owner_gradients: bool = False, mode: str = "fop") -> Optional["DualGradientReducer"]:
    """The reduction a front end needs for ``opt``: a :class:`DualGradientReducer` in FOP mode under several
    processes, else ``None`` (one process; or K-FAC, where DDP averages the gradients)."""
    if opt.distributor.comm is None or mode != "fop":
        return None
    return DualGradientReducer(opt, owner_gradients=owner_gradients)


class DualGradientReducer:
    """Reduces local gradients into FOP's g1/g2 and installs them in the optimizer (see the module docstring).

    ``owner_gradients`` takes effect with curvature specialists only (``opt.distributor`` a
    :class:`~hf_fop.distributed.specialists.SpecialistCurvature`).
    """

    def __init__(self, opt: DualGradientSink, owner_gradients: bool = False) -> None:
        comm: Optional[Collectives] = opt.distributor.comm
        if comm is None:
            raise ValueError("DualGradientReducer needs several processes (an initialised process group with W >= 2).")
        self.opt = opt
        self.comm = comm
        self.groups = DualGroups(comm.rank, comm.world_size)
        self.params: List[Tensor] = [p for group in opt.param_groups for p in group["params"]]
        self.owners: Optional[SpecialistCurvature] = (
            opt.distributor if owner_gradients and isinstance(opt.distributor, SpecialistCurvature) else None
        )
        """The specialists whose owners alone receive their layers' g1/g2 (``None``: gradients reduced in full)."""
        self.hook: Optional[DualGradientCommHook] = None
        """The DDP comm hook registered by :meth:`attach_ddp`, if any."""
        self._hooked: Optional[nn.Module] = None
        self._refused: Optional[nn.Module] = None

    @property
    def owner_gradients(self) -> bool:
        """Whether managed layers' gradients go to their owners only (see the module docstring)."""
        return self.owners is not None

    @property
    def bytes_reduced(self) -> int:
        """Payload bytes this process handed to collectives so far (gradients and factors)."""
        return self.comm.bytes_reduced

    @property
    def wire_bytes(self) -> float:
        """Bytes this process sent so far under the ring model."""
        return self.comm.wire_bytes

    # ------------------------------------------------------------ reduction
    def reduce_gradients(self) -> None:
        """Replace each rank's local ``p.grad`` by ``g_avg`` and hand ``g1 - g2`` to the optimizer (collective).

        A parameter without a gradient on every rank keeps ``grad = None``.
        """
        if self.owners is not None:
            self._reduce_to_owners()
            return
        sizes = [p.numel() for p in self.params]
        total = sum(sizes)
        # local gradients, then one entry per parameter: 1 where this rank has a gradient
        local = torch.zeros(total + len(self.params), dtype=torch.float32, device=self.comm.device)
        offset = 0
        for i, (p, n) in enumerate(zip(self.params, sizes)):
            if p.grad is not None:
                local[offset : offset + n] = p.grad.detach().reshape(-1).float()
                local[total + i] = 1.0
            offset += n
        _, sums = dual_sums(self.comm, self.groups, local)
        sum_even, sum_odd = sums()
        present = (sum_even[total:] + sum_odd[total:]).tolist()  # one host read
        dtypes = {p.dtype for p in self.params}
        # the usual case, one dtype: g1 - g2 and g_avg of every parameter in two element-wise passes
        whole = self.groups.diff_and_avg(sum_even[:total], sum_odd[:total], dtypes.pop()) if len(dtypes) == 1 else None
        diffs: Dict[Tensor, Tensor] = {}
        offset = 0
        for i, (p, n) in enumerate(zip(self.params, sizes)):
            part = slice(offset, offset + n)
            offset += n
            if present[i] == 0:
                p.grad = None
                continue
            if whole is not None:
                diff, avg = whole[0][part], whole[1][part]
            else:
                diff, avg = self.groups.diff_and_avg(sum_even[part], sum_odd[part], p.dtype)
            p.grad = avg.view_as(p)
            diffs[p] = diff.view_as(p)
        self.opt.set_reduced_gradients(diffs, self.groups.w1)

    def _reduce_to_owners(self) -> None:
        """Owner-only reduction (curvature specialists, see the module docstring); collective.

        One ``all_reduce`` of the presence flags; the AdamW parameters' local gradients are summed over ranks and
        divided by W (``g_avg`` as DDP gives it); each owner gets its layers' group sums from one ``reduce`` of a
        ``(2, n_o)`` buffer (rank r writes row r % 2).
        """
        owners, comm, groups = self.owners, self.comm, self.groups
        layers = self.opt.engine.layers
        managed = {id(p) for layer in layers for p in layer.params}
        present = torch.tensor([0.0 if p.grad is None else 1.0 for p in self.params], device=comm.device)
        comm.all_reduce(present)
        seen = {id(p) for p, count in zip(self.params, present.tolist()) if count > 0}
        rest = [p for p in self.params if id(p) in seen and id(p) not in managed]
        if rest:
            flat = torch.cat([_local_grad(p) for p in rest])
            comm.all_reduce(flat)
            flat /= comm.world_size
            offset = 0
            for p in rest:
                p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
        pending = []
        for rank in range(comm.world_size):
            params = [p for layer in layers if owners.owner[layer.name] == rank for p in layer.params if id(p) in seen]
            if not params:
                continue
            buf = torch.zeros(2, sum(p.numel() for p in params), dtype=torch.float32, device=comm.device)
            buf[groups.row] = torch.cat([_local_grad(p) for p in params])
            pending.append((rank, params, buf, comm.reduce(buf, rank)))
        diffs: Dict[Tensor, Tensor] = {}
        for rank, params, buf, work in pending:
            work.wait()
            if rank != comm.rank:
                for p in params:
                    p.grad = None
                continue
            diff, avg = groups.diff_and_avg(buf[0], buf[1], torch.float32)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = avg[offset : offset + n].view_as(p).to(p.dtype)
                diffs[p] = diff[offset : offset + n].view_as(p).to(p.dtype)
                offset += n
        for p in self.params:
            if id(p) not in seen:
                p.grad = None
        self.opt.set_reduced_gradients(diffs, groups.w1, present=seen)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip every rank's gradients by the global norm of ``g_avg`` (collective); returns that norm (0-dim).

        The ``torch.nn.utils.clip_grad_norm_`` rule (``min(1, max_norm / (norm + 1e-6))``); with owner-only gradients
        the owners' squared norms are summed over ranks (one 1-float ``all_reduce``) and the AdamW parameters' (the
        same on every rank) added locally, else the norm of ``p.grad`` (every rank holds it).
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.owners is None:
            total = global_norm(grads, self.comm.device)
        else:
            layers = self.opt.engine.layers
            managed = {id(p) for layer in layers for p in layer.params}
            owned = [p.grad for layer in layers if self.owners.owns(layer) for p in layer.params if p.grad is not None]
            rest = [p.grad for p in self.params if id(p) not in managed and p.grad is not None]
            square = global_square_norm(owned, self.comm.device).reshape(1)
            self.comm.all_reduce(square)
            total = torch.sqrt(square[0] + global_square_norm(rest, self.comm.device))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        return total

    # ----------------------------------------------------------------- DDP
    def attach_ddp(self, model: nn.Module) -> bool:
        """Reduce g1/g2 inside DDP's backward (:mod:`.comm_hook`) when ``model`` allows it.

        Returns whether the hook runs (then call :meth:`finish_hook` after the synchronised backward); otherwise logs
        one line saying why and the caller keeps :meth:`reduce_gradients` (every micro-batch under ``no_sync``). Not
        possible: owner-only gradients, ``model`` is not a ``DistributedDataParallel`` module, or DDP already has a
        comm hook (e.g. accelerate's ``DistributedDataParallelKwargs(comm_hook=...)``).
        """
        if self._hooked is model:
            return True
        if self._refused is model:
            return False
        self._refused = model
        say = logger.warning if self.comm.rank == 0 else logger.debug  # one line per run, not one per rank
        if self.owners is not None:
            say("FOP: curvature specialists reduce g1/g2 to each layer's owner after the backward pass (no DDP comm hook).")
            return False
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            say(
                f"FOP: the model is a {type(model).__name__}, not DistributedDataParallel; the dual-gradient "
                "reduction runs after the backward pass."
            )
            return False
        hook = DualGradientCommHook(self.comm, self.groups)
        try:
            hook.register(model)
        except RuntimeError as err:
            say(f"FOP: DDP refused the dual-gradient comm hook ({err}); the reduction runs after the backward pass.")
            return False
        self.hook, self._hooked, self._refused = hook, model, None
        return True

    def finish_hook(self) -> None:
        """After the synchronised backward of a hooked DDP model: hand ``g1 - g2`` to the optimizer."""
        if self.hook is None:
            raise RuntimeError("finish_hook() without a registered comm hook: call attach_ddp(model) first.")
        self.opt.set_reduced_gradients(self.hook.take_diffs(), self.groups.w1)


def _local_grad(p: Tensor) -> Tensor:
    """This rank's gradient of ``p`` as float32, flat (zeros without one)."""
    if p.grad is None:
        return torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    return p.grad.detach().reshape(-1).float()
