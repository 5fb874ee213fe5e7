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

from typing import Tuple

import torch

from ..curvature import CurvatureEngine, KFACLayer
from .collectives import Collectives, capture_counts, pack_triangles, unpack_triangles
from .interface import CurvatureDistributor, Factors


class ReplicatedCurvature(CurvatureDistributor):
    """Every rank decomposes every factor and computes every layer's direction; factor traffic on inverse steps only."""

    def __init__(self, engine: CurvatureEngine, comm: Collectives) -> None:
        super().__init__(engine)
        self.comm = comm
        self._unsynced = False
        """The ranks' factors may differ (local updates since the last average)."""

    def owns(self, layer: KFACLayer) -> bool:
        return True

    @property
    def partial(self) -> bool:
        return self._unsynced

    def exchange_factors(self, new: Factors) -> Tuple[Factors, bool]:
        layers = self.engine.layers
        counts, finite = capture_counts(self.comm, [layer.name for layer in layers], new)
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
        if out:
            self._unsynced = True
        return out, True

    def refresh_bases(self, only_missing: bool) -> None:
        """Average the factors (:meth:`make_full`), then every rank eigendecomposes every layer's."""
        self.make_full()
        self.engine.update_eigenbases(only_missing=only_missing)

    def make_full(self) -> None:
        """Replace every rank's factors by their mean over ranks (one ``all_reduce`` of upper triangles)."""
        if not self._unsynced:
            return
        mats = [mat for layer in self.engine.layers if layer.A is not None for mat in (layer.A, layer.S)]
        if mats:
            buf = pack_triangles(mats)
            self.comm.all_reduce(buf)
            buf /= self.comm.world_size
            unpack_triangles(mats, buf)
        self._unsynced = False

    def state_loaded(self) -> None:
        self._unsynced = False
