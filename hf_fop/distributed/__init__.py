"""Multi-process FOP: where curvature lives across ranks, and how gradients and factors move.

* :mod:`.interface`: :class:`CurvatureDistributor`, the one interface the optimizer calls (and the one-process
  :class:`SingleProcessCurvature`);
* :mod:`.replicated`, :mod:`.specialists`: its two multi-process implementations, chosen by
  ``FOPConfig.curvature_sharding`` (:func:`make_distributor`);
* :mod:`.reducer` (with :mod:`.comm_hook`): FOP's dual-gradient reduction, even ranks give g1, odd ranks g2;
* :mod:`.collectives`: the counted collectives and the helpers all of them share.

Details, traffic and measurements: docs/distributed.md.
"""

from __future__ import annotations

from typing import Optional

from ..config import FOPConfig
from ..curvature import CurvatureEngine
from .collectives import Collectives, DualGroups, group_sizes, world
from .interface import CurvatureDistributor, SingleProcessCurvature
from .reducer import DualGradientReducer, dual_gradient_reducer
from .replicated import ReplicatedCurvature
from .specialists import SpecialistCurvature, assign_owners, layer_cost, owner_loads

__all__ = [
    "Collectives", "CurvatureDistributor", "DualGradientReducer", "DualGroups", "ReplicatedCurvature",
    "SingleProcessCurvature", "SpecialistCurvature", "assign_owners", "dual_gradient_reducer", "group_sizes",
    "layer_cost", "make_distributor", "owner_loads", "world",
]


def make_distributor(engine: CurvatureEngine, config: FOPConfig, world_size: Optional[int] = None) -> CurvatureDistributor:
    """The distributor for ``config.curvature_sharding`` in this process group (``world_size``: default group's).

    One process: :class:`SingleProcessCurvature` whatever the sharding. Buffers live on the device of the managed
    layers (of the first parameter when there are none).
    """
    world_size = world()[1] if world_size is None else world_size
    if world_size == 1:
        return SingleProcessCurvature(engine, config)
    device = engine.layers[0].weight.device if engine.layers else engine.device
    comm = Collectives(device)
    if config.curvature_sharding == "specialists":
        return SpecialistCurvature(engine, config, comm)
    return ReplicatedCurvature(engine, config, comm)
