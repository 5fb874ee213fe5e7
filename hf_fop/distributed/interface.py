"""The curvature distributor: where each managed layer's curvature lives, and how its direction reaches every rank.

One interface (:class:`CurvatureDistributor`), three implementations chosen by
:func:`hf_fop.distributed.make_distributor` from ``FOPConfig.curvature_sharding`` and the process group:

* :class:`SingleProcessCurvature`: one process, nothing to exchange;
* :class:`hf_fop.distributed.replicated.ReplicatedCurvature`: every rank holds every factor and computes every
  layer's direction;
* :class:`hf_fop.distributed.specialists.SpecialistCurvature`: each layer has one owner rank (the paper's
  "curvature specialist") that alone decomposes its factors and computes its direction.

The optimizer owns its distributor and calls it at fixed points of ``step()``; a distributor knows the curvature
engine, the config and the collectives, never the optimizer. Collective methods must be called on every rank.
Gradients are not its business: :class:`hf_fop.distributed.reducer.DualGradientReducer` moves them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Tuple

from torch import Tensor

from ..config import FOPConfig
from ..curvature import CurvatureEngine, KFACLayer
from ..fop_math import LayerResult
from ..refresh import RefreshUnit, refresh_bases

Factors = Dict[str, Tuple[Tensor, Tensor]]
"""``{layer name: (A (in, in), S (out, out))}``."""


class CurvatureDistributor(ABC):
    """Where curvature lives across ranks (see the module docstring)."""

    comm = None
    """The :class:`~hf_fop.distributed.collectives.Collectives` of a multi-process distributor; ``None`` in one process."""

    def __init__(self, engine: CurvatureEngine, config: FOPConfig) -> None:
        self.engine = engine
        self.config = config

    @abstractmethod
    def owns(self, layer: KFACLayer) -> bool:
        """Whether this rank computes ``layer``'s direction (local)."""

    @abstractmethod
    def exchange_factors(self, new: Factors, finite: bool) -> Tuple[Factors, bool]:
        """``(factors to give engine.update_factors, every rank's gradients and new factors are finite)`` given this
        rank's ``new`` factors and its answer ``finite`` (collective; on a capture step it stands in for
        :meth:`all_finite`)."""

    @abstractmethod
    def refresh_bases(self, units: List[RefreshUnit]) -> None:
        """Carry out the refresh ``units`` (the same list on every rank, :mod:`hf_fop.refresh`) where this
        distribution keeps the bases (collective)."""

    def share_results(self, layers: List[KFACLayer], results: Dict[str, Optional[LayerResult]]) -> Dict[str, Optional[LayerResult]]:
        """Every layer's :class:`LayerResult` on every rank, from the ranks that own them (collective)."""
        return results

    def share_directions(self, layers: List[KFACLayer], deltas: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Every layer's direction ``(out, in)`` on every rank, from the ranks that own them (collective)."""
        return deltas

    def rank0_answer(self, answer: bool) -> bool:
        """Rank 0's ``answer`` on every rank (collective): for set-up decisions that every rank must share."""
        return answer if self.comm is None else self.comm.rank0_answer(answer)

    def all_finite(self, finite: bool) -> bool:
        """Whether every rank's gradients and new factors are finite, given this rank's answer (collective)."""
        return finite

    @property
    def partial(self) -> bool:
        """This rank's curvature state is not the full, world-size-independent one (see :meth:`make_full`)."""
        return False

    def make_full(self) -> None:
        """Make every rank hold the full curvature state, as one process would (collective; before saving)."""

    def state_loaded(self) -> None:
        """A loaded state dict (full, the same on every rank) was just installed."""


class SingleProcessCurvature(CurvatureDistributor):
    """One process: this rank owns every layer and decomposes every factor."""

    def owns(self, layer: KFACLayer) -> bool:
        return True

    def exchange_factors(self, new: Factors, finite: bool) -> Tuple[Factors, bool]:
        return new, finite

    def refresh_bases(self, units: List[RefreshUnit]) -> None:
        refresh_bases(self.engine, units, self.config)
