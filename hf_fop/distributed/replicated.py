"""Replicated curvature: every rank keeps every factor; the ranks' factors meet only where they are read.

Each rank runs the running average on its *local* new factors, ``X_r <- d X_r + (1 - d) w_r X_new_r``, and the
factors are averaged over ranks (``X = mean_r X_r``, upper triangles, one ``all_reduce``) only before they are read:
eigendecompositions and checkpoints (:meth:`ReplicatedCurvature.make_full`). The average is linear, so
``mean_r X_r`` equals the running average of the per-step rank means that a per-step exchange gives (up to rounding:
the sums run in another order, so allclose, not bitwise). ``w_r = W c_r / n`` with ``c_r`` = 1 when this rank
captured the layer this step and ``n`` the number of ranks that did, so a layer unused on some ranks is weighted as
the per-step mean over the ranks that saw it (a rank that did not see it decays its copy with a zero contribution).

Per factor step one small ``all_reduce`` of ``L + 1`` floats (``L`` managed layers) gives ``n`` and a global
finiteness flag, so every rank takes the same skip-step decision.
"""

from __future__ import annotations

from typing import List, Sequence, Set, Tuple

import torch

from ..config import FOPConfig
from ..curvature import CurvatureEngine, KFACLayer
from ..refresh import RefreshUnit, refresh_bases, unit_layers
from .collectives import Collectives, capture_counts, pack_triangles, unpack_triangles
from .interface import CurvatureDistributor, Factors


class ReplicatedCurvature(CurvatureDistributor):
    """Every rank decomposes every factor and computes every layer's direction; factor traffic on inverse steps only."""

    def __init__(self, engine: CurvatureEngine, config: FOPConfig, comm: Collectives) -> None:
        super().__init__(engine, config)
        self.comm = comm
        self._unsynced: Set[str] = set()
        """Layers whose factors may differ across ranks (local updates since their last average)."""

    def owns(self, layer: KFACLayer) -> bool:
        return True

    @property
    def partial(self) -> bool:
        return bool(self._unsynced)

    def exchange_factors(self, new: Factors, finite: bool) -> Tuple[Factors, bool]:
        layers = self.engine.layers
        counts, finite = capture_counts(self.comm, [layer.name for layer in layers], new, finite)
        if not finite:
            return {}, False
        world_size = self.comm.world_size
        out: Factors = {}
        for layer, count in zip(layers, counts):
            if count == 0:
                continue
            pair = new.get(layer.name)
            if pair is None:  # seen elsewhere only: decay this rank's copy with a zero contribution
                pair = tuple(torch.zeros(d, d, device=layer.weight.device) for d in (layer.in_dim, layer.out_dim))
            elif count != world_size:
                pair = (pair[0] * (world_size / count), pair[1] * (world_size / count))
            out[layer.name] = pair
        self._unsynced.update(out)
        return out, True

    def refresh_bases(self, units: List[RefreshUnit]) -> None:
        """Average these layers' factors over the ranks (:meth:`_average`), then every rank decomposes them."""
        self._average(unit_layers(units))
        refresh_bases(self.engine, units, self.config)

    def make_full(self) -> None:
        """Replace every rank's factors by their mean over ranks (one ``all_reduce`` of upper triangles)."""
        self._average(self.engine.layers)

    def _average(self, layers: Sequence[KFACLayer]) -> None:
        """The mean over ranks of the factors of those ``layers`` that changed since their last average."""
        due = [layer for layer in layers if layer.name in self._unsynced and layer.A is not None]
        if not due:
            return
        mats = [mat for layer in due for mat in (layer.A, layer.S)]
        buf = pack_triangles(mats)
        self.comm.all_reduce(buf)
        buf /= self.comm.world_size
        unpack_triangles(mats, buf)
        self._unsynced.difference_update(layer.name for layer in due)

    def state_loaded(self) -> None:
        self._unsynced = set()
