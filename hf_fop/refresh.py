"""Eigenbasis refresh: the eigendecompositions of the K-FAC factors, their fault handling, and when each layer's
are due.

* :func:`refresh_layers` decomposes ``A`` and ``S`` of the given layers: ``torch.linalg.eigh`` in float32, then
  float64; when both fail the last good basis stays (a warning), and after ``max_eigh_failures`` failures in a row
  it raises naming the layer.
* :func:`refresh_slots` staggers the refresh: over an inverse cycle of ``k`` steps each layer is decomposed on one
  step, its slot, chosen so that every step gets about ``1/k`` of the cycle's work (cost ``d_A^3 + d_S^3``, greedy,
  costliest first, the factor-capture steps last among equals). No step then pays for every layer at once; with ``k = 1`` every layer is due every step, as
  without staggering. A layer's first factors are decomposed at once, whatever its slot.

Cost on this project's 2-core CPU (torch 2.13, 2 threads, idle): ``eigh`` of 385: 6 ms, 769: 28 ms, 1537: 158 ms,
3073: 1.2 s. A warm-started refresh (one power iteration and QR from the previous basis) costs a ``d^3`` GEMM plus a
QR, about as much as ``eigh`` on a CPU, so the refresh is amortised (the inverse interval) and spread (the slots)
instead.
"""

from __future__ import annotations

import time
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .curvature import CurvatureEngine, EigenBasis, KFACLayer
from .profiling import scope


def eigh_float32(mat: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` in float32: ``(eigenvalues (n,), eigenvectors (n, n))``."""
    return torch.linalg.eigh(mat.float())


def eigh_float64(mat: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` in float64, results cast to float32."""
    vals, vecs = torch.linalg.eigh(mat.double())
    return vals.float(), vecs.float()


def refresh_layers(engine: CurvatureEngine, layers: Sequence[KFACLayer], max_failures: int) -> None:
    """Eigendecompose ``A`` and ``S`` of every layer in ``layers`` (each must have factors); see the module docstring.

    Host seconds go to ``engine.seconds``.
    """
    t0 = time.perf_counter()
    with scope("refresh"):
        for layer in layers:
            layer.basis_a = _decompose(layer, "A", layer.A, layer.basis_a, max_failures)
            layer.basis_s = _decompose(layer, "S", layer.S, layer.basis_s, max_failures)
    engine.seconds += time.perf_counter() - t0


def _decompose(layer: KFACLayer, which: str, mat: Tensor, last: Optional[EigenBasis], max_failures: int) -> EigenBasis:
    for solver in (eigh_float32, eigh_float64):
        try:
            vals, vecs = solver(mat)
        except torch.linalg.LinAlgError:  # anything else (out of memory, device errors) propagates
            continue
        if torch.isfinite(vals).all() and torch.isfinite(vecs).all():
            layer.eigh_failures[which] = 0
            return EigenBasis(q=vecs.contiguous(), eigenvalues=vals.clamp_min(0.0))
    layer.eigh_failures[which] += 1
    if layer.eigh_failures[which] >= max_failures:
        raise RuntimeError(
            f"Eigendecomposition of factor {which} of layer {layer.name!r} failed "
            f"{layer.eigh_failures[which]} times in a row (float32 and float64); raise damping or "
            f"max_eigh_failures={max_failures}, or exclude the layer (exclude_modules)."
        )
    warnings.warn(
        f"Eigendecomposition of factor {which} of layer {layer.name!r} failed in float32 and float64; "
        "keeping the last good basis.",
        RuntimeWarning,
        stacklevel=4,
    )
    if last is not None:
        return last
    # No good basis yet: the diagonal approximation of the factor.
    diag = torch.nan_to_num(torch.diagonal(mat).float(), nan=0.0, posinf=0.0).clamp_min(0.0)
    return EigenBasis(q=torch.eye(mat.shape[0], device=mat.device), eigenvalues=diag)


def refresh_cost(layer: KFACLayer) -> int:
    """Work of one layer's refresh, ``d_A^3 + d_S^3`` (eigh is cubic)."""
    return layer.in_dim**3 + layer.out_dim**3


def refresh_slots(costs: Sequence[int], k: int, capture_every: int = 1) -> List[int]:
    """Slot in ``[0, k)`` of each layer: greedy, costliest first, to the least-loaded slot (ties: a slot that is not a
    capture step, i.e. ``slot % capture_every != 0``, then the lower slot; layers by lower index). A capture step
    already pays for the factors of every layer, so the costliest decompositions go to the other steps. Deterministic
    and independent of the world size, so every distribution refreshes a layer on the same step as one process does
    (with curvature specialists a step's layers may belong to different owners)."""
    for name, value in (("k", k), ("capture_every", capture_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"refresh_slots: {name}={value!r} is invalid: expected an integer >= 1 (steps per "
                             f"{'inverse cycle' if name == 'k' else 'factor capture'}).")
    slots = [0] * len(costs)
    loads = [0] * k
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        slot = min(range(k), key=lambda s: (loads[s], s % capture_every == 0, s))
        slots[i] = slot
        loads[slot] += costs[i]
    return slots


def due_layers(
    layers: Sequence[KFACLayer], slots: Sequence[int], step: int, k: int, stagger: bool, fresh: Sequence[str] = ()
) -> List[KFACLayer]:
    """Layers to decompose at ``step`` (the same on every rank): those with factors whose turn it is (their slot is
    ``step % k`` with ``stagger``; every layer on a cycle's first step without), and the ``fresh`` ones (names of the
    layers that got their first factors this step)."""
    fresh = set(fresh)
    out = []
    for layer, slot in zip(layers, slots):
        if layer.A is None:
            continue
        turn = slot == step % k if stagger else step % k == 0
        if turn or layer.name in fresh:
            out.append(layer)
    return out
