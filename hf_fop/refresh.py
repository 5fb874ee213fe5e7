"""Eigenbasis refresh: the eigendecompositions of the K-FAC factors, their fault handling, and when each part of the
work is due.

* :func:`refresh_bases` carries out :class:`RefreshUnit` s: a full ``torch.linalg.eigh`` of a factor (float32, then
  float64; when both fail the last good basis stays, a warning, and after ``max_eigh_failures`` failures in a row it
  raises naming the layer), or one **block rotation** of a factor larger than ``FOPConfig.max_eigh_dim``.
* Block refresh (warm-started cyclic block Jacobi): a big factor's eigenvectors ``Q (n, n)`` are split into ``p``
  groups of consecutive columns (:func:`block_bounds`); a block rotation of the groups ``(i, j)`` takes their columns
  ``Q_ij (n, m)``, decomposes the projected factor ``Q_ij^T F Q_ij (m, m) = V diag(w) V^T`` and sets
  ``Q_ij <- Q_ij V``, eigenvalues ``w``. ``Q`` stays orthonormal (each rotation rescales its columns to unit norm, where
  float32 rounding would otherwise accumulate sweep after sweep) and every rotation lowers the off-diagonal mass of
  ``Q^T F Q``; one rotation per pair of groups is one sweep, ``p (p - 1) / 2`` units, each a ``2 n^2 m + 4 n m^2``
  flop product plus an eigh of ``m <= max_eigh_dim``. ``FOPConfig.block_refresh="sweep"`` runs a sweep per inverse
  cycle; ``"round"`` one round of disjoint pairs (:func:`block_rounds`, ``p / 2`` units), the rounds taking turns
  cycle by cycle, a sweep every ``p - 1`` cycles; ``"adaptive"`` (the default) the round, and each other pair whose
  columns a random probe finds off (:func:`pair_error` above ``FOPConfig.block_tolerance``, about 5% of a rotation's
  time on a CPU): a sweep while the factor moves fast, a round once it settles. Started from
  the previous basis (the factor moves little per cycle) a sweep keeps the basis near the exact one, a round less
  near (``tests/test_refresh.py``, ``scripts/refresh_accuracy.py``); a factor's first basis is a full eigh.
* :func:`refresh_slots` staggers the work: over an inverse cycle of ``k`` steps each unit runs on one step, its slot,
  chosen so that every step gets about ``1/k`` of the cycle's work (:func:`unit_cost`, greedy, costliest first, the
  steps starting with their capture's cost, :func:`capture_cost`). No step then pays for every layer at once, and
  with block refresh no step pays for a whole big factor's ``eigh`` either; with ``k = 1`` everything is due every
  step. A layer's first factors are decomposed at once (one full eigh standing for all of its units), whatever its
  slots.
* :func:`capture_slots` staggers the captures the same way (``FOPConfig.stagger_capture``, the default): each layer
  captures on its own step of the factor interval, balanced by :func:`capture_cost`.

Cost on this project's 2-core CPU (torch 2.13, one thread, ``OMP_NUM_THREADS=1 python scripts/kernel_costs.py``,
2026-12-06 15:30 UTC): ``eigh`` of 3,073 3.65 s; one block rotation of it in 4 groups (``m`` = 1,537) 1.28 s, so
its sweep of 6 is 7.7 s, about twice the ``eigh``: block refresh buys even steps with about twice the refresh work
of the large factors (``max_eigh_dim=None`` when that matters more).
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import FrozenSet, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .config import BLOCK_REFRESH, FOPConfig
from .curvature import CurvatureEngine, EigenBasis, KFACLayer
from .profiling import scope

EIGH_FLOPS_PER_CUBE = 12
"""Cost of ``eigh`` of ``d`` in float32 GEMM flops, over ``d^3``: 8-12 on this CPU (``scripts/kernel_costs.py``:
3,073 in 3.65-5.3 s against about 64 Gflop/s GEMMs); it weighs eigh against the block rotations' products and the
capture in :func:`unit_cost` and :func:`refresh_slots`."""


@dataclass(frozen=True, eq=False)
class RefreshUnit:
    """One piece of an inverse cycle's refresh work.

    ``pair`` ``None``: full eigendecompositions of ``factors`` (``"A"`` and/or ``"S"``) of ``layer``; otherwise one
    block rotation of the groups ``pair = (i, j)`` of its single factor (see the module docstring)."""

    layer: KFACLayer
    factors: Tuple[str, ...]
    pair: Optional[Tuple[int, int]] = None
    round: Optional[int] = None
    """``FOPConfig.block_refresh="round"``: the round of :func:`block_rounds` the pair belongs to; the unit runs in the
    inverse cycles ``c`` with ``c % rounds == round`` (``None``: every cycle)."""
    rounds: int = 1
    """Number of rounds of the factor's pairs (:func:`block_rounds`)."""
    adaptive: bool = False
    """``FOPConfig.block_refresh="adaptive"``: due every cycle, outside its round's cycles gated."""
    gated: bool = False
    """Rotate only where :func:`pair_error` is above ``FOPConfig.block_tolerance`` (set by :func:`due_units`)."""

    def in_round(self, cycle: int) -> bool:
        """Whether inverse cycle ``cycle`` (``global_step // inverse_interval``) is one of the unit's round's."""
        return self.round is None or cycle % self.rounds == self.round

    def due_in_cycle(self, cycle: int) -> bool:
        """Whether the unit runs (or, gated, is checked) in inverse cycle ``cycle``."""
        return self.adaptive or self.in_round(cycle)


def factor_dim(layer: KFACLayer, which: str) -> int:
    """Size of factor ``which`` (``"A"``: ``in_dim``, ``"S"``: ``out_dim``)."""
    return layer.in_dim if which == "A" else layer.out_dim


def block_bounds(n: int, max_eigh_dim: Optional[int]) -> Optional[List[int]]:
    """Column bounds ``[0, ..., n]`` of the ``p >= 3`` groups of a factor of size ``n`` refreshed in blocks: the fewest
    groups with any two of them at most ``max_eigh_dim`` columns; ``None`` when ``n <= max_eigh_dim`` (or it is
    ``None``): one full eigh."""
    if max_eigh_dim is None or n <= max_eigh_dim:
        return None
    p = 3
    while 2 * math.ceil(n / p) > max_eigh_dim:
        p += 1
    return [(g * n) // p for g in range(p + 1)]


def block_rounds(groups: int) -> List[List[Tuple[int, int]]]:
    """Every pair of ``groups`` (>= 2) once, in rounds of disjoint pairs (round-robin, circle method): ``groups - 1``
    rounds of ``groups / 2`` pairs for an even count, ``groups`` rounds of ``(groups - 1) / 2`` for an odd one."""
    players = list(range(groups)) + ([None] if groups % 2 else [])
    n = len(players)
    rounds = []
    for r in range(n - 1):
        order = [players[0]] + [players[1 + (i + r) % (n - 1)] for i in range(n - 1)]
        pairs = [(order[i], order[n - 1 - i]) for i in range(n // 2)]
        rounds.append(sorted((min(i, j), max(i, j)) for i, j in pairs if i is not None and j is not None))
    return rounds


def refresh_units(
    layers: Sequence[KFACLayer], max_eigh_dim: Optional[int], block_refresh: str = "sweep"
) -> List[RefreshUnit]:
    """The refresh work of the inverse cycles, layer by layer: one unit with the full eigendecompositions of the
    layer's factors up to ``max_eigh_dim``, then one unit per pair of groups of each larger factor; with
    ``block_refresh="round"`` each pair unit carries its round (:func:`block_rounds`) and runs only in that round's
    cycles; with ``"adaptive"`` the units of a sweep, in a sweep's order, each carrying its round: due every cycle,
    gated outside its round's (:func:`due_units`). With ``max_eigh_dim`` ``None`` (or no larger factor) that is one
    unit per layer with both factors."""
    if block_refresh not in BLOCK_REFRESH:
        raise ValueError(f"block_refresh={block_refresh!r} is invalid: expected one of {BLOCK_REFRESH}.")
    units = []
    for layer in layers:
        bounds = {which: block_bounds(factor_dim(layer, which), max_eigh_dim) for which in ("A", "S")}
        full = tuple(which for which in ("A", "S") if bounds[which] is None)
        if full:
            units.append(RefreshUnit(layer, full))
        for which in ("A", "S"):
            if bounds[which] is None:
                continue
            groups = len(bounds[which]) - 1
            pairs = list(itertools.combinations(range(groups), 2))
            rounds = block_rounds(groups) if block_refresh != "sweep" else []
            if block_refresh == "sweep":
                units += [RefreshUnit(layer, (which,), pair) for pair in pairs]
            elif block_refresh == "round":
                units += [RefreshUnit(layer, (which,), pair, r, len(rounds))
                          for r, members in enumerate(rounds) for pair in members]  # fmt: skip
            else:  # adaptive: a sweep's units in a sweep's order, each knowing its round
                round_of = {pair: r for r, members in enumerate(rounds) for pair in members}
                units += [RefreshUnit(layer, (which,), pair, round_of[pair], len(rounds), True) for pair in pairs]
    return units


def unit_cost(unit: RefreshUnit, max_eigh_dim: Optional[int]) -> int:
    """Work of one unit in float32 GEMM flops: ``EIGH_FLOPS_PER_CUBE d^3`` per full eigh; ``2 n^2 m + 4 n m^2`` and an
    eigh of ``m`` for a block rotation of ``m`` columns of a factor of size ``n`` (:func:`block_rotation`)."""
    if unit.pair is None:
        return sum(EIGH_FLOPS_PER_CUBE * factor_dim(unit.layer, which) ** 3 for which in unit.factors)
    n = factor_dim(unit.layer, unit.factors[0])
    bounds = block_bounds(n, max_eigh_dim)
    m = sum(bounds[g + 1] - bounds[g] for g in unit.pair)
    return 2 * n * n * m + 4 * n * m * m + EIGH_FLOPS_PER_CUBE * m**3


def capture_cost(layers: Sequence[KFACLayer], rows: Optional[int], passes: int = 2) -> int:
    """Flops of one capture step's factor products, ``2 rows (d_A^2 + d_S^2)`` per layer and pass (two sub-batches);
    ``rows`` ``None`` (every row: unknown before the batch comes) counts 2,048."""
    rows = 2048 if rows is None else rows
    return sum(2 * rows * passes * (layer.in_dim**2 + layer.out_dim**2) for layer in layers)


def eigh_float32(mat: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` in float32: ``(eigenvalues (n,), eigenvectors (n, n))``."""
    return torch.linalg.eigh(mat.float())


def eigh_float64(mat: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` in float64, results cast to float32."""
    vals, vecs = torch.linalg.eigh(mat.double())
    return vals.float(), vecs.float()


def refresh_bases(engine: CurvatureEngine, units: Sequence[RefreshUnit], config: FOPConfig) -> None:
    """Carry out ``units`` (each layer must have factors) under ``config`` (``max_eigh_failures``, ``max_eigh_dim``,
    ``block_tolerance``); see the module docstring. A block rotation of a factor that has no basis yet is a full eigh; a
    gated one whose :func:`pair_error` is at most ``block_tolerance`` is skipped (``engine.gated_skips``; the rotations
    done: ``engine.block_rotations``). Host seconds go to ``engine.seconds``."""
    max_failures, max_eigh_dim = config.max_eigh_failures, config.max_eigh_dim
    t0 = time.perf_counter()
    with scope("refresh"):
        for unit in units:
            layer = unit.layer
            for which in unit.factors:
                mat, last = (layer.A, layer.basis_a) if which == "A" else (layer.S, layer.basis_s)
                if unit.pair is None or last is None:
                    basis = _decompose(layer, which, mat, last, max_failures)
                else:
                    bounds = block_bounds(mat.shape[0], max_eigh_dim)
                    if unit.gated:
                        other = layer.basis_s if which == "A" else layer.basis_a
                        shift = factor_shift(config, last, other)
                        if pair_error(mat, last, bounds, unit.pair, shift) <= config.block_tolerance:
                            engine.gated_skips += 1
                            continue
                    engine.block_rotations += 1
                    basis = block_rotation(mat, last, bounds, unit.pair)
                    if basis is None:
                        _failed(layer, which, max_failures)
                        basis = last
                    else:
                        layer.eigh_failures[which] = 0
                if which == "A":
                    layer.basis_a = basis
                else:
                    layer.basis_s = basis
    engine.seconds += time.perf_counter() - t0


def unit_layers(units: Sequence[RefreshUnit]) -> List[KFACLayer]:
    """The layers of ``units``, each once, in order."""
    return list({id(unit.layer): unit.layer for unit in units}.values())


def _solve(mat: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """``eigh`` of ``mat`` in float32, else float64; ``None`` when both fail or give non-finite results."""
    for solver in (eigh_float32, eigh_float64):
        try:
            vals, vecs = solver(mat)
        except torch.linalg.LinAlgError:  # anything else (out of memory, device errors) propagates
            continue
        if torch.isfinite(vals).all() and torch.isfinite(vecs).all():
            return vals, vecs
    return None


def _decompose(layer: KFACLayer, which: str, mat: Tensor, last: Optional[EigenBasis], max_failures: int) -> EigenBasis:
    solved = _solve(mat)
    if solved is not None:
        layer.eigh_failures[which] = 0
        return EigenBasis(q=solved[1].contiguous(), eigenvalues=solved[0].clamp_min(0.0))
    _failed(layer, which, max_failures)
    if last is not None:
        return last
    # No good basis yet: the diagonal approximation of the factor.
    diag = torch.nan_to_num(torch.diagonal(mat).float(), nan=0.0, posinf=0.0).clamp_min(0.0)
    return EigenBasis(q=torch.eye(mat.shape[0], device=mat.device), eigenvalues=diag)


def _pair_columns(basis: EigenBasis, bounds: Sequence[int], pair: Tuple[int, int]) -> Tuple[List[Tuple[int, int]], Tensor]:
    """Column ranges of the groups ``pair`` and their eigenvectors side by side, ``(n, m)`` (slices copy 5-7x faster
    than an index)."""
    spans = [(bounds[g], bounds[g + 1]) for g in pair]
    return spans, torch.cat([basis.q[:, lo:hi] for lo, hi in spans], 1)


def block_rotation(mat: Tensor, basis: EigenBasis, bounds: Sequence[int], pair: Tuple[int, int]) -> Optional[EigenBasis]:
    """``basis`` of the symmetric ``mat (n, n)`` with the columns of the groups ``pair`` (column ranges from ``bounds``)
    rotated to diagonalise ``mat`` on their span: ``Q_ij <- Q_ij V`` (columns rescaled to unit norm), eigenvalues ``w``
    (ascending within the pair), where ``Q_ij^T mat Q_ij = V diag(w) V^T``. A new basis (``basis`` is not changed); ``None`` when the pair's eigh
    fails in float32 and float64."""
    spans, q_pair = _pair_columns(basis, bounds, pair)
    projected = q_pair.T @ (mat.float() @ q_pair)  # (m, m)
    solved = _solve(0.5 * (projected + projected.T))
    if solved is None:
        return None
    vals, vecs = solved
    rotated = q_pair @ vecs
    # unit columns: float32 rounding leaves most of its drift from orthonormality in the column norms, and without
    # this it accumulates, sweep after sweep, over a long run (tests/test_refresh.py)
    rotated /= torch.linalg.vector_norm(rotated, dim=0, keepdim=True)
    q, eigenvalues, start = basis.q.clone(), basis.eigenvalues.clone(), 0
    for lo, hi in spans:
        q[:, lo:hi] = rotated[:, start : start + hi - lo]
        eigenvalues[lo:hi] = vals[start : start + hi - lo].clamp_min(0.0)
        start += hi - lo
    return EigenBasis(q=q, eigenvalues=eigenvalues)


PROBES = 8
"""Probe vectors of :func:`pair_error`."""
PROBE_ITERATIONS = 2
"""Block power iterations of :func:`pair_error`: ``(PROBE_ITERATIONS + 1) (n^2 + 2 n m) PROBES`` flops per pair, against
the rotation's ``2 n^2 m + 4 n m^2`` and an eigh of ``m``."""


def factor_shift(config: FOPConfig, basis: EigenBasis, other: Optional[EigenBasis]) -> float:
    """The damping one factor sees: the layer's ``lambda`` damps ``s_i a_j``, so a factor sees ``lambda / mean(eig
    other factor)``: ``damping / mean(eig other)`` in absolute mode (``0`` without the other factor's basis or with
    its eigenvalues all 0), ``damping * mean(eig)`` of ``basis``'s own factor in relative mode
    (:func:`hf_fop.preconditioner.layer_damping`)."""
    if config.damping_mode == "relative":
        return config.damping * float(basis.eigenvalues.mean())
    mean_other = float(other.eigenvalues.mean()) if other is not None else 0.0
    return config.damping / mean_other if mean_other > 0.0 else 0.0


def pair_error(mat: Tensor, basis: EigenBasis, bounds: Sequence[int], pair: Tuple[int, int], shift: float,
               probes: int = PROBES, iterations: int = PROBE_ITERATIONS) -> float:  # fmt: skip
    """How far ``basis`` is from diagonalising the symmetric ``mat (n, n)`` on the columns of the groups ``pair``: an
    estimate (from below) of the spectral norm of ``E = D^-1/2 Q_ij^T (mat + shift I) Q_ij D^-1/2 - I``,
    ``D = diag(w) + shift I`` (``w``: the stored eigenvalues of those columns), by ``iterations`` steps of block power
    iteration on ``probes`` vectors from a fixed seed (the same answer on every rank and after a resume). ``E = 0``
    for an exact basis; the basis preconditions a vector ``g`` in the span of those columns, ``(mat + shift I)^-1 g``,
    with a relative error of at most about ``||E||`` in the metric of the damped factor, and gradients lie where the
    factor has just moved, which is where ``E`` is largest: a worst case, not an average."""
    spans, q_pair = _pair_columns(basis, bounds, pair)
    vals = torch.cat([basis.eigenvalues[lo:hi] for lo, hi in spans])
    scale = (vals.double() + shift).clamp_min(torch.finfo(torch.float32).tiny).rsqrt().float()[:, None]  # D^-1/2
    generator = torch.Generator(device="cpu").manual_seed(1 + pair[0] * 1009 + pair[1])
    z = torch.linalg.qr(torch.randn(q_pair.shape[1], probes, generator=generator, dtype=torch.float64))[0]
    z = z.float().to(q_pair.device)  # (m, probes), orthonormal columns
    mat = mat.float()
    for i in range(iterations + 1):
        y = q_pair @ (scale * z)  # (n, probes)
        image = scale * (q_pair.T @ (mat @ y + shift * y)) - z  # E z
        if i < iterations:
            z = torch.linalg.qr(image)[0]
    return float(torch.linalg.vector_norm(image, dim=0).max())


def _failed(layer: KFACLayer, which: str, max_failures: int) -> None:
    """Count a failed decomposition of factor ``which``: raise at ``max_failures`` in a row, else warn."""
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
        stacklevel=5,
    )


def refresh_slots(
    costs: Sequence[int], k: int, capture_every: int = 1, start: Optional[Sequence[int]] = None
) -> List[int]:
    """Slot in ``[0, k)`` of each unit of work: greedy, costliest first, to the least-loaded slot (ties: a slot that is
    not a capture step, i.e. ``slot % capture_every != 0``, then the lower slot; units by lower index). ``start``
    (``k`` loads, in the units' cost units; zeros by default) is what each step already pays: the captures of the
    layers that capture on it (:func:`refresh_plan`), so the costliest refresh work goes to the other steps. Deterministic
    and independent of the world size, so every distribution refreshes a unit on the same step as one process does
    (with curvature specialists a step's units may belong to different owners)."""
    for name, value in (("k", k), ("capture_every", capture_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"refresh_slots: {name}={value!r} is invalid: expected an integer >= 1 (steps per "
                             f"{'inverse cycle' if name == 'k' else 'factor capture'}).")
    if start is not None and len(start) != k:
        raise ValueError(f"refresh_slots: start has {len(start)} loads, expected k={k}.")
    slots = [0] * len(costs)
    loads = list(start) if start is not None else [0] * k
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        slot = min(range(k), key=lambda s: (loads[s], s % capture_every == 0, s))
        slots[i] = slot
        loads[slot] += costs[i]
    return slots


def capture_slots(layers: Sequence[KFACLayer], config: FOPConfig) -> List[int]:
    """Step of the factor interval (in ``[0, factor_interval)``) on which each layer captures: 0 for every layer
    unless ``stagger_capture``, else spread greedily by each layer's :func:`capture_cost` (as :func:`refresh_slots`)."""
    if not config.staggers_capture or config.factor_interval == 1:
        return [0] * len(layers)
    return refresh_slots([capture_cost([layer], config.capture_rows) for layer in layers], config.factor_interval)


@dataclass(frozen=True)
class RefreshPlan:
    """An optimizer's schedule of curvature work for its managed layers, fixed at construction (the same on every
    rank): :func:`refresh_plan`."""

    units: List[RefreshUnit]
    """An inverse cycle's refresh work (:func:`refresh_units` at ``max_eigh_dim``)."""
    slots: List[int]
    """Step of the inverse cycle (``[0, inverse_interval)``) on which each unit runs."""
    capture_slots: List[int]
    """Step of the factor interval (``[0, factor_interval)``) on which each layer captures (:func:`capture_slots`)."""
    capture_names: Tuple[FrozenSet[str], ...]
    """For each step of the factor interval, the names of the layers that capture on it."""


def refresh_plan(layers: Sequence[KFACLayer], config: FOPConfig) -> RefreshPlan:
    """The :class:`RefreshPlan` of ``layers`` under ``config``: each layer's capture slot, and each refresh unit's slot
    (:func:`refresh_slots`, each step starting with the :func:`capture_cost` of the layers that capture on it, at
    ``capture_rows``)."""
    units = refresh_units(layers, config.max_eigh_dim, config.block_refresh)
    costs = [unit_cost(unit, config.max_eigh_dim) for unit in units]
    f, k = config.factor_interval, config.inverse_interval
    per_layer = [capture_cost([layer], config.capture_rows) for layer in layers]
    captures = capture_slots(layers, config)
    start = [sum(c for c, slot in zip(per_layer, captures) if slot == s % f) for s in range(k)]
    capture_every = 1 if config.staggers_capture else f
    # the units of every cycle first, then each round's on top of them: every cycle's steps balanced alike
    slots = [0] * len(units)
    every = [i for i, unit in enumerate(units) if unit.round is None or unit.adaptive]
    for i, slot in zip(every, refresh_slots([costs[i] for i in every], k, capture_every, start=start)):
        slots[i] = slot
        start[slot] += costs[i]
    for r in sorted({unit.round for unit in units if unit.round is not None}):
        members = [i for i, unit in enumerate(units) if unit.round == r and not unit.adaptive]
        for i, slot in zip(members, refresh_slots([costs[i] for i in members], k, capture_every, start=start)):
            slots[i] = slot
    names = tuple(frozenset(l.name for l, slot in zip(layers, captures) if slot == s) for s in range(f))
    return RefreshPlan(units, slots, captures, names)


def due_units(
    units: Sequence[RefreshUnit], slots: Sequence[int], step: int, k: int, stagger: bool, fresh: Sequence[str] = ()
) -> List[RefreshUnit]:
    """Units to carry out at ``step`` (the same on every rank): those of layers with factors whose turn it is (their
    slot is ``step % k`` with ``stagger``; every unit on a cycle's first step without; a round's units only in its
    cycles, :meth:`RefreshUnit.due_in_cycle`; an adaptive unit outside its round's cycles as a ``gated`` copy), and
    for each ``fresh`` layer
    (names of the layers that got their first factors this step) one full eigh of both factors instead of its units."""
    fresh = set(fresh)
    done: set = set()
    out: List[RefreshUnit] = []
    for unit, slot in zip(units, slots):
        layer = unit.layer
        if layer.A is None:
            continue
        if layer.name in fresh:  # one full eigh stands for all of its units
            if layer.name not in done:
                done.add(layer.name)
                out.append(RefreshUnit(layer, ("A", "S")))
            continue
        if ((slot == step % k) if stagger else (step % k == 0)) and unit.due_in_cycle(step // k):
            out.append(unit if unit.in_round(step // k) else replace(unit, gated=True))
    return out
