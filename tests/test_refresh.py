"""hf_fop.refresh: the staggered schedule of the refresh work (slots as data, then on a real optimizer) and the block
refresh of large factors (warm-started block Jacobi) against exact eigendecompositions."""

from __future__ import annotations

import itertools
import math
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_fop.refresh as refresh
from hf_fop import FOP, FOPConfig
from hf_fop.curvature import EigenBasis
from hf_fop.refresh import (
    EIGH_FLOPS_PER_CUBE,
    block_bounds,
    block_rotation,
    block_rounds,
    due_units,
    factor_shift,
    pair_error,
    refresh_slots,
    refresh_units,
    unit_cost,
)


@pytest.mark.parametrize(
    "costs, k, slots",
    [
        ([8, 1, 1, 1], 1, [0, 0, 0, 0]),  # one slot: everything every step
        ([8, 1, 1, 1], 2, [0, 1, 1, 1]),  # the big one alone, the small ones together
        ([5, 5, 5, 5], 4, [0, 1, 2, 3]),
        ([1, 2, 3, 4, 5, 6], 3, [0, 1, 2, 2, 1, 0]),  # 6 + 1 | 5 + 2 | 4 + 3: loads 7, 7, 7
        ([3, 3], 5, [0, 1]),  # fewer layers than steps: some steps refresh nothing
    ],
)
def test_slots_balance_the_cost_greedily(costs, k, slots):
    assert refresh_slots(costs, k) == slots
    assert refresh_slots(costs, k, capture_every=1) == slots  # every step captures: no slot is preferred


@pytest.mark.parametrize(
    "costs, k, capture_every, slots",
    [
        ([8, 1, 1, 1], 2, 2, [1, 0, 0, 0]),  # step 0 captures: the big one goes to step 1
        ([9, 8, 1, 1], 4, 2, [1, 3, 0, 2]),  # the two big ones on the non-capture steps 1 and 3
        ([5, 5, 5, 5, 5], 4, 2, [1, 3, 0, 2, 1]),  # equal loads: the fifth goes to the first non-capture step
        ([1, 2, 3, 4, 5, 6], 3, 3, [1, 2, 0, 0, 2, 1]),  # 6 + 1 | 5 + 2 | 4 + 3 as before, the costliest off step 0
    ],
)
def test_slots_keep_the_costliest_refreshes_off_the_capture_steps(costs, k, capture_every, slots):
    assert refresh_slots(costs, k, capture_every) == slots


def test_slots_reject_a_bad_cycle_length():
    with pytest.raises(ValueError, match=r"k=0 is invalid: expected an integer >= 1"):
        refresh_slots([1], 0)
    with pytest.raises(ValueError, match=r"capture_every=0 is invalid: expected an integer >= 1"):
        refresh_slots([1], 2, 0)


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4), nn.Linear(4, 3))


def _fop_step(model: nn.Module, opt: FOP, x: torch.Tensor, y: torch.Tensor) -> None:
    """One FOP step on ``(x, y)``: its two halves as the sub-batches (cross-entropy)."""
    half = x.shape[0] // 2
    for k in (0, 1):
        with opt.sub_batch(k):
            F.cross_entropy(model(x[half * k : half * (k + 1)]), y[half * k : half * (k + 1)]).backward()
    opt.step()
    opt.zero_grad()


def _train(model: nn.Module, opt: FOP, steps: int, calls: List[List[str]]) -> None:
    original = opt.distributor.refresh_bases

    def record(units):  # noqa: ANN001, ANN202
        calls.append([unit.layer.name for unit in units])
        return original(units)

    opt.distributor.refresh_bases = record
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        for k in (0, 1):
            with opt.sub_batch(k):
                F.cross_entropy(model(x[4 * k : 4 * k + 4]), y[4 * k : 4 * k + 4]).backward()
        calls.append(["step"])
        opt.step()
        opt.zero_grad()


def _per_step(calls: List[List[str]]) -> List[List[str]]:
    """Layers decomposed in each step (the record has a "step" marker before each optimizer step)."""
    steps: List[List[str]] = []
    for entry in calls:
        if entry == ["step"]:
            steps.append([])
        else:
            steps[-1].extend(entry)
    return steps


def test_staggered_refresh_decomposes_each_layer_once_per_cycle_and_spreads_the_work():
    model = _model()
    opt = FOP(model, lr=0.1, inverse_interval=3, factor_interval=1)  # every step captures: the slots weigh the same
    calls: List[List[str]] = []
    _train(model, opt, 7, calls)
    steps = _per_step(calls)
    names = [layer.name for layer in opt.layers]
    assert sorted(steps[0]) == sorted(names)  # first factors: every layer at once
    cost: Dict[str, int] = {unit.layer.name: unit_cost(unit, None) for unit in opt._plan.units}
    for cycle in (steps[1:4], steps[4:7]):
        done = [name for step in cycle for name in step]
        assert sorted(done) == sorted(names)  # each layer once per cycle of 3 steps
        assert max(sum(cost[n] for n in step) for step in cycle) < 0.5 * sum(cost.values())
    assert opt.counters["inverse_updates"] == 3  # cycles begun: steps 0, 3, 6


def test_the_costliest_refreshes_avoid_the_factor_capture_steps():
    """factor_interval 2, inverse_interval 4, every layer capturing together: steps 0, 2, ... capture the factors of
    every layer, so the two costliest layers are decomposed on the odd steps; still each layer once per cycle. (The
    staggered capture spreads the captures instead: its refresh slots start from each step's capture load, below.)"""
    model = _model()
    opt = FOP(model, lr=0.1, factor_interval=2, inverse_interval=4, stagger_capture=False)
    calls: List[List[str]] = []
    _train(model, opt, 9, calls)
    steps = _per_step(calls)
    cost = {unit.layer.name: unit_cost(unit, None) for unit in opt._plan.units}
    costliest = sorted(cost, key=cost.get)[-2:]
    for cycle_start in (1, 5):
        cycle = steps[cycle_start : cycle_start + 4]
        assert sorted(n for step in cycle for n in step) == sorted(cost)
        for offset, step in enumerate(cycle):
            if (cycle_start + offset) % 2 == 0:  # a capture step
                assert not set(step) & set(costliest), (cycle_start + offset, step)


def test_stagger_off_decomposes_every_layer_at_the_cycle_start():
    model = _model()
    opt = FOP(model, lr=0.1, inverse_interval=3, stagger_refresh=False)
    calls: List[List[str]] = []
    _train(model, opt, 7, calls)
    steps = _per_step(calls)
    assert [len(step) for step in steps] == [4, 0, 0, 4, 0, 0, 4]


def test_with_a_cycle_of_one_step_stagger_changes_nothing():
    runs = []
    for stagger in (True, False):
        model = _model()
        _train(model, FOP(model, lr=0.1, inverse_interval=1, momentum=0.9, stagger_refresh=stagger), 4, [])
        runs.append(model)
    assert all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), runs[1].parameters()))


# ---------------------------------------------------------------- block refresh of large factors


@pytest.mark.parametrize(
    "n, max_eigh_dim, bounds",
    [
        (3073, 1600, [0, 768, 1536, 2304, 3073]),  # BERT's 3,072 + bias (the default): 4 groups, pairs <= 1,537
        (3072, 1600, [0, 768, 1536, 2304, 3072]),
        (3072, 2048, [0, 1024, 2048, 3072]),
        (1600, 1600, None),  # not larger than the limit: one full eigh
        (1537, 1600, None),  # MiniLM's 1,536 + bias
        (3073, None, None),  # block refresh off
        (10, 6, [0, 2, 5, 7, 10]),  # 3 groups would pair 4 + 4 > 6
        (7, 6, [0, 2, 4, 7]),  # never fewer than 3 groups (2 would be the whole factor)
    ],
)
def test_block_bounds_as_data(n, max_eigh_dim, bounds):
    assert block_bounds(n, max_eigh_dim) == bounds
    if bounds is not None:
        sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
        assert max(a + b for a, b in itertools.combinations(sizes, 2)) <= max_eigh_dim


def test_units_split_only_the_factors_larger_than_max_eigh_dim():
    model = nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 3))  # factors: A 6, S 40 | A 41, S 3
    opt = FOP(model, lr=0.1, max_eigh_dim=16, block_refresh="sweep")
    units = [(unit.layer.name, unit.factors, unit.pair) for unit in opt._plan.units]
    first, second = (layer.name for layer in opt.layers)
    assert block_bounds(40, 16) == [0, 8, 16, 24, 32, 40] and block_bounds(41, 16) == [0, 6, 13, 20, 27, 34, 41]
    assert units == ([(first, ("A",), None)] + [(first, ("S",), p) for p in itertools.combinations(range(5), 2)]
                     + [(second, ("S",), None)] + [(second, ("A",), p) for p in itertools.combinations(range(6), 2)])
    assert all(unit.round is None and unit.due_in_cycle(7) for unit in opt._plan.units)
    assert [(u.layer.name, u.factors, u.pair) for u in refresh_units(opt.layers, None)] == [
        (first, ("A", "S"), None), (second, ("A", "S"), None)]
    # by rounds: the same pairs, each with its round of block_rounds (5 groups: 5 rounds; 6 groups: 5 rounds)
    rounds = refresh_units(opt.layers, 16, "round")
    want = ([(first, ("A",), None, None, 1)]
            + [(first, ("S",), p, r, 5) for r, pairs in enumerate(block_rounds(5)) for p in pairs]
            + [(second, ("S",), None, None, 1)]
            + [(second, ("A",), p, r, 5) for r, pairs in enumerate(block_rounds(6)) for p in pairs])
    assert [(u.layer.name, u.factors, u.pair, u.round, u.rounds) for u in rounds] == want
    assert [u.due_in_cycle(6) for u in rounds[1:5]] == [False, False, True, True]  # cycle 6: round 1 of 5
    with pytest.raises(ValueError, match=r"block_refresh='jacobi' is invalid: expected one of \('sweep', 'round', "):
        refresh_units(opt.layers, 16, "jacobi")
    # adaptive: a sweep's units in a sweep's order, each with its round, due every cycle; due_units gates the units
    # outside their round's cycles
    adaptive = refresh_units(opt.layers, 16, "adaptive")
    round_of = {(u.layer.name, u.pair): u.round for u in rounds}
    assert [(u.layer.name, u.factors, u.pair) for u in adaptive] == units
    assert all(u.adaptive and u.due_in_cycle(6) and u.round == round_of[(u.layer.name, u.pair)] and u.rounds == 5
               for u in adaptive if u.pair is not None)  # fmt: skip
    assert not any(u.adaptive or u.gated for u in rounds + opt._plan.units)
    for layer in opt.layers:  # factors present: due_units considers the layer
        layer.A = torch.zeros(layer.in_dim, layer.in_dim)
    due = due_units(adaptive, [0] * len(adaptive), step=6 * 4, k=4, stagger=False)  # cycle 6
    assert [u.gated for u in due] == [u.pair is not None and u.round != 1 for u in adaptive]
    assert [(u.layer, u.pair, u.round) for u in due] == [(u.layer, u.pair, u.round) for u in adaptive]


@pytest.mark.parametrize("groups", range(2, 10))
def test_block_rounds_hold_every_pair_once_in_rounds_of_disjoint_pairs(groups):
    rounds = block_rounds(groups)
    assert len(rounds) == (groups - 1 if groups % 2 == 0 else groups)
    assert all(len(pairs) == groups // 2 for pairs in rounds)
    assert sorted(p for pairs in rounds for p in pairs) == list(itertools.combinations(range(groups), 2))
    for pairs in rounds:  # disjoint: no group twice in a round
        members = [g for pair in pairs for g in pair]
        assert len(set(members)) == len(members)
    assert block_rounds(4) == [[(0, 3), (1, 2)], [(0, 1), (2, 3)], [(0, 2), (1, 3)]]  # a 3,072-wide factor's


class _FactorLayer:
    """What :func:`refresh_units` reads of a layer whose A factor alone is ``n`` wide (S is 1 wide)."""

    def __init__(self, n: int) -> None:
        self.in_dim, self.out_dim, self.name = n, 1, "factor"


def _spd(n: int, rows: int, gen: torch.Generator, mix: torch.Tensor) -> torch.Tensor:
    """A factor as the capture estimates one: ``X^T X / rows`` of correlated rows ``X (rows, n)`` (float64)."""
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64) @ mix.T
    return x.T @ x / rows


def _mixing(n: int, gen: torch.Generator) -> torch.Tensor:
    """Correlations with a power-law spectrum, like real layers' inputs."""
    decay = torch.arange(1, n + 1, dtype=torch.float64) ** -0.7
    return torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n) * decay[None, :]


def _sweep(mat: torch.Tensor, basis: EigenBasis, max_eigh_dim: int) -> EigenBasis:
    bounds = block_bounds(mat.shape[0], max_eigh_dim)
    for pair in itertools.combinations(range(len(bounds) - 1), 2):
        basis = block_rotation(mat, basis, bounds, pair)
    return basis


def _preconditioned(basis: EigenBasis, g: torch.Tensor, damping: float) -> torch.Tensor:
    """``(F + damping I)^-1 g`` through ``basis``: ``Q diag(1 / (w + damping)) Q^T g`` for the columns of ``g``."""
    q, w = basis.q.double(), basis.eigenvalues.double()
    return q @ ((q.T @ g) / (w[:, None] + damping))


def test_block_sweeps_converge_to_the_exact_eigendecomposition():
    """Cyclic block Jacobi from an arbitrary orthonormal basis of a fixed factor: the off-diagonal of ``Q^T F Q``
    vanishes and the eigenvalues become ``eigh``'s."""
    gen = torch.Generator().manual_seed(0)
    n = 60
    mat = _spd(n, 200, gen, _mixing(n, gen)).float()
    q0, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    basis = EigenBasis(q=q0, eigenvalues=torch.zeros(n))
    offs = []
    for _ in range(6):
        basis = _sweep(mat, basis, 24)
        rotated = basis.q.T @ mat @ basis.q
        offs.append(((rotated - torch.diag(torch.diagonal(rotated))).norm() / rotated.norm()).item())
    assert offs[-1] < 1e-5 < offs[0], offs
    assert all(b <= a * 1.01 + 1e-6 for a, b in zip(offs, offs[1:])), offs  # never worse (to float32 rounding)
    exact = torch.linalg.eigvalsh(mat.double())
    torch.testing.assert_close(basis.eigenvalues.double().sort().values, exact, rtol=1e-4, atol=1e-6 * exact.max().item())
    torch.testing.assert_close(basis.q.T @ basis.q, torch.eye(n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n, max_eigh_dim", [(96, 48), (200, 80)])
def test_one_sweep_from_the_previous_basis_keeps_the_preconditioner_exact(n, max_eigh_dim):
    """The refresh's use: the factor moved by one capture (running average, decay 0.95, of estimates from about n
    rows); one sweep from the last basis gives ``(F + lambda I)^-1 g`` within cosine 0.999 of the exact eigenbasis'
    for gradients in the data's directions (lambda 1e-3 of the mean eigenvalue), where keeping the old basis is off by
    2-5%."""
    gen = torch.Generator().manual_seed(1)
    mix = _mixing(n, gen)
    old = _spd(n, n + n // 3, gen, mix)
    new = 0.95 * old + 0.05 * _spd(n, n + n // 3, gen, mix)
    w_old, q_old = torch.linalg.eigh(old.float())
    stale = EigenBasis(q=q_old, eigenvalues=w_old)
    swept = _sweep(new.float(), stale, max_eigh_dim)
    w_new, q_new = torch.linalg.eigh(new)
    exact = EigenBasis(q=q_new, eigenvalues=w_new)
    grads = mix @ torch.randn(n, 64, generator=gen, dtype=torch.float64)
    damping = 1e-3 * w_new.mean().item()
    want = _preconditioned(exact, grads, damping)
    cos = {name: F.cosine_similarity(_preconditioned(b, grads, damping), want, dim=0).min().item()
           for name, b in (("swept", swept), ("stale", stale))}
    assert cos["swept"] >= 0.999, cos
    assert 1 - cos["swept"] < 0.05 * (1 - cos["stale"]), cos


def _moving_factor(n: int, max_eigh_dim: int, names: tuple, block_refresh: str) -> tuple:
    """Start of a moving-factor test: generator, mixing, an ``n``-wide factor, its exact basis under each name, the
    group bounds and the factor's pair units under ``block_refresh``."""
    gen = torch.Generator().manual_seed(1)
    mix = _mixing(n, gen)
    factor = _spd(n, n + n // 3, gen, mix)
    w, q = torch.linalg.eigh(factor.float())
    bases = dict.fromkeys(names, EigenBasis(q=q, eigenvalues=w))
    units = [u for u in refresh_units([_FactorLayer(n)], max_eigh_dim, block_refresh) if u.pair is not None]
    return gen, mix, factor, bases, block_bounds(n, max_eigh_dim), units


def test_rounds_track_a_moving_factor_less_closely_than_sweeps_but_far_better_than_a_stale_basis():
    """A 96-wide factor in 4 groups (3 rounds of 2 pairs), moved every cycle as the capture moves it (running average,
    decay 0.95): refreshed by one round per cycle, the rounds taking turns (``block_refresh="round"``), ``(F + lambda
    I)^-1 g`` stays within cosine 0.99 of the exact eigenbasis' at every cycle after the first three; by a sweep per
    cycle within 0.9995; the basis of cycle 0, never refreshed, falls below 0.7."""
    n, max_eigh_dim = 96, 48
    gen, mix, factor, bases, bounds, units = _moving_factor(n, max_eigh_dim, ("sweep", "round", "stale"), "round")
    cos: Dict[str, List[float]] = {name: [] for name in bases}
    for cycle in range(1, 21):
        factor = 0.95 * factor + 0.05 * _spd(n, n + n // 3, gen, mix)
        bases["sweep"] = _sweep(factor.float(), bases["sweep"], max_eigh_dim)
        for unit in units:
            if unit.due_in_cycle(cycle):
                bases["round"] = block_rotation(factor.float(), bases["round"], bounds, unit.pair)
        w_new, q_new = torch.linalg.eigh(factor)
        grads = mix @ torch.randn(n, 64, generator=gen, dtype=torch.float64)
        damping = 1e-3 * w_new.mean().item()
        want = _preconditioned(EigenBasis(q=q_new, eigenvalues=w_new), grads, damping)
        for name, basis in bases.items():
            cos[name].append(F.cosine_similarity(_preconditioned(basis, grads, damping), want, dim=0).min().item())
    assert [len(u.pair) for u in units] == [2] * 6 and {u.rounds for u in units} == {3}
    assert min(cos["round"][3:]) >= 0.99 and min(cos["sweep"][3:]) >= 0.9995, cos
    assert min(cos["stale"][3:]) < 0.7 and max(cos["stale"][3:]) < min(cos["round"][3:]), cos


def test_pair_error_against_the_dense_whitened_factor():
    """:func:`pair_error` estimates ``||E||_2`` for ``E = D^-1/2 Q_ij^T (F + shift) Q_ij D^-1/2 - I`` from below: 0 (to
    float32 rounding, relative to the smallest ``w + shift``) for the exact eigendecomposition; exactly ``|1 / (1 +
    eps) - 1|`` when the stored eigenvalues are ``(1 + eps)`` times the true ones (shift 0); for a stale basis the dense
    ``||E||_2`` with enough power iterations, at least 80% of it with the default 2, larger without damping than with
    it; only the pair's columns count."""
    gen = torch.Generator().manual_seed(4)
    n, max_eigh_dim = 60, 30
    mix = _mixing(n, gen)
    old = _spd(n, 90, gen, mix).float()
    new = 0.9 * old + 0.1 * _spd(n, 90, gen, mix).float()
    bounds = block_bounds(n, max_eigh_dim)  # 4 groups of 15
    w, q = torch.linalg.eigh(new)
    exact = EigenBasis(q=q, eigenvalues=w.clamp_min(0))
    for shift, rounding in ((0.0, 5e-2), (1e-3, 1e-4), (1.0, 1e-5)):  # eigenvalues 1.7e-7 to 1.1
        assert pair_error(new, exact, bounds, (0, 2), shift) < rounding
    eps = 0.05
    scaled = EigenBasis(q=q, eigenvalues=exact.eigenvalues * (1 + eps))
    assert pair_error(new, scaled, bounds, (1, 3), 0.0) == pytest.approx(eps / (1 + eps), rel=1e-3)
    w_old, q_old = torch.linalg.eigh(old)
    stale = EigenBasis(q=q_old, eigenvalues=w_old.clamp_min(0))
    pair, shift = (1, 2), 1e-2 * w_old.mean().item()
    cols = torch.cat([torch.arange(bounds[g], bounds[g + 1]) for g in pair])
    inv_sqrt = torch.diag((stale.eigenvalues[cols].double() + shift).rsqrt())
    q_p = q_old[:, cols].double()
    e = inv_sqrt @ q_p.T @ (new.double() + shift * torch.eye(n, dtype=torch.float64)) @ q_p @ inv_sqrt
    dense = torch.linalg.matrix_norm(e - torch.eye(len(cols), dtype=torch.float64), ord=2).item()
    assert pair_error(new, stale, bounds, pair, shift, iterations=30) == pytest.approx(dense, rel=1e-3)
    assert 0.8 * dense < pair_error(new, stale, bounds, pair, shift) <= dense * (1 + 1e-4)
    assert pair_error(new, stale, bounds, pair, 0.0) > pair_error(new, stale, bounds, pair, shift) > 0.01
    # a basis exact on groups 1 and 2 only: that pair reads 0, a pair with a stale group does not
    mixed = block_rotation(new, stale, bounds, pair)
    assert pair_error(new, mixed, bounds, pair, shift) < 1e-3 < pair_error(new, mixed, bounds, (0, 1), shift)


def test_factor_shift_is_the_damping_one_factor_sees():
    """``lambda`` damps ``s_i a_j``: a factor sees ``lambda / mean(eig other)``; absolute mode ``damping / mean(eig
    other)`` (0 without the other basis or with its eigenvalues all 0), relative ``damping * mean(eig own)``."""
    own = EigenBasis(q=torch.eye(3), eigenvalues=torch.tensor([1.0, 2.0, 6.0]))  # mean 3
    other = EigenBasis(q=torch.eye(2), eigenvalues=torch.tensor([0.5, 1.5]))  # mean 1
    zero = EigenBasis(q=torch.eye(2), eigenvalues=torch.zeros(2))
    absolute, relative = FOPConfig(damping=0.2), FOPConfig(damping=0.2, damping_mode="relative")
    assert factor_shift(absolute, own, other) == pytest.approx(0.2)
    assert factor_shift(absolute, other, own) == pytest.approx(0.2 / 3)
    assert factor_shift(absolute, own, None) == factor_shift(absolute, own, zero) == 0.0
    assert factor_shift(relative, own, other) == factor_shift(relative, own, None) == pytest.approx(0.6)


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_factor_shift_times_the_other_factors_mean_is_the_layers_damping(mode):
    """The shift restates the preconditioner's damping convention (refresh sits below the preconditioner): per
    factor, ``shift * mean(eig other) = lambda`` of :func:`hf_fop.preconditioner.layer_damping`, whichever factor."""
    from hf_fop.preconditioner import layer_damping

    config = FOPConfig(damping=0.03, damping_mode=mode)
    gen = torch.Generator().manual_seed(4)
    s_basis = EigenBasis(q=torch.eye(5), eigenvalues=torch.rand(5, generator=gen) + 0.1)
    a_basis = EigenBasis(q=torch.eye(4), eigenvalues=torch.rand(4, generator=gen) + 0.1)
    damping = float(layer_damping(config, s_basis.eigenvalues, a_basis.eigenvalues))
    for own, other in ((s_basis, a_basis), (a_basis, s_basis)):
        assert factor_shift(config, own, other) * float(other.eigenvalues.mean()) == pytest.approx(damping, rel=1e-6)


def test_adaptive_refresh_sweeps_while_the_factor_moves_and_rounds_once_it_settles():
    """A 96-wide factor in 4 groups moved fast for 6 cycles (running average, decay 0.9), then slowly (decay 0.999),
    refreshed as ``block_refresh="adaptive"`` does it (its round every cycle, any other pair whose :func:`pair_error`
    is above the tolerance 0.01): while the factor moves every pair is over the tolerance and the basis is the
    sweep's, bit for bit; once it settles (after a cycle or two) only the round's pairs rotate. ``(F + lambda I)^-1
    g`` stays within cosine 0.999 of the exact eigenbasis' at every cycle, where rounds alone fall below it while the
    factor moves."""
    n, max_eigh_dim, tolerance = 96, 48, 0.01
    gen, mix, factor, bases, bounds, units = _moving_factor(n, max_eigh_dim, ("adaptive", "round", "sweep"), "adaptive")
    cos: Dict[str, List[float]] = {name: [] for name in bases}
    rotated: List[int] = []
    for cycle in range(1, 16):
        decay = 0.9 if cycle <= 6 else 0.999
        factor = decay * factor + (1 - decay) * _spd(n, n + n // 3, gen, mix)
        w_new, q_new = torch.linalg.eigh(factor)
        damping = 1e-3 * w_new.mean().item()
        bases["sweep"] = _sweep(factor.float(), bases["sweep"], max_eigh_dim)
        rotated.append(0)
        for unit in units:
            if unit.in_round(cycle):
                bases["round"] = block_rotation(factor.float(), bases["round"], bounds, unit.pair)
            if unit.in_round(cycle) or pair_error(factor.float(), bases["adaptive"], bounds, unit.pair, damping) > tolerance:
                bases["adaptive"] = block_rotation(factor.float(), bases["adaptive"], bounds, unit.pair)
                rotated[-1] += 1
        if cycle <= 6:
            assert torch.equal(bases["adaptive"].q, bases["sweep"].q), cycle
        grads = mix @ torch.randn(n, 64, generator=gen, dtype=torch.float64)
        want = _preconditioned(EigenBasis(q=q_new, eigenvalues=w_new), grads, damping)
        for name, basis in bases.items():
            cos[name].append(F.cosine_similarity(_preconditioned(basis, grads, damping), want, dim=0).min().item())
    assert rotated[:6] == [6] * 6 and rotated[-6:] == [2] * 6, rotated
    assert min(cos["adaptive"]) >= 0.999 and min(cos["round"][:6]) < 0.99, cos


def _counting_wide_run(block_refresh: str, tolerance: float, steps: int, **options) -> tuple:
    model = _wide_model()
    opt = FOP(model, lr=0.05, max_eigh_dim=16, inverse_interval=4, factor_interval=2, block_refresh=block_refresh,
              block_tolerance=tolerance, **options)  # fmt: skip
    _train(model, opt, steps, [])
    return model, opt


def test_adaptive_refresh_is_a_sweep_at_tolerance_zero_and_rounds_at_a_huge_tolerance():
    """In the optimizer, ``block_refresh="adaptive"`` with ``block_tolerance=0`` rotates every pair every cycle on a
    sweep's slots: bitwise the parameters of ``"sweep"``; with a huge tolerance only the round's pairs: bitwise those
    of ``"round"`` (refresh at the cycle start, where the slots of the two plans do not matter); in between it skips
    some gated pairs and rotates others."""
    steps = 21  # 5 cycles after the first
    sweep, _ = _counting_wide_run("sweep", 0.01, steps)
    zero, opt_zero = _counting_wide_run("adaptive", 0.0, steps)
    assert all(torch.equal(p, r) for p, r in zip(sweep.parameters(), zero.parameters()))
    assert opt_zero.engine.gated_skips == 0
    pairs = sum(u.pair is not None for u in opt_zero._plan.units)  # 10 + 15
    assert opt_zero.engine.block_rotations == 5 * pairs
    rounds, _ = _counting_wide_run("round", 0.01, steps, stagger_refresh=False)
    huge, opt_huge = _counting_wide_run("adaptive", 1e30, steps, stagger_refresh=False)
    assert all(torch.equal(p, r) for p, r in zip(rounds.parameters(), huge.parameters()))
    in_rounds = 5 * (2 + 3)  # a round of the 5-group factor has 2 pairs, of the 6-group one 3
    assert opt_huge.engine.block_rotations == in_rounds and opt_huge.engine.gated_skips == 5 * pairs - in_rounds
    _, opt_mid = _counting_wide_run("adaptive", 0.05, steps)
    assert in_rounds < opt_mid.engine.block_rotations < 5 * pairs
    assert opt_mid.engine.block_rotations + opt_mid.engine.gated_skips == 5 * pairs


def test_a_block_rotation_touches_only_its_pair_and_reports_a_failed_eigh(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    n = 30
    mat = _spd(n, 50, gen, _mixing(n, gen)).float()
    q0, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    before = EigenBasis(q=q0, eigenvalues=torch.arange(n, dtype=torch.float32))
    bounds = block_bounds(n, 16)  # [0, 7, 15, 22, 30]
    after = block_rotation(mat, before, bounds, (1, 3))
    cols = list(range(7, 15)) + list(range(22, 30))
    others = [c for c in range(n) if c not in cols]
    assert torch.equal(after.q[:, others], q0[:, others]) and torch.equal(after.eigenvalues[others], before.eigenvalues[others])
    assert torch.equal(before.q, q0)  # a new basis; the old one is unchanged
    rotated = after.q[:, cols].T @ mat @ after.q[:, cols]
    torch.testing.assert_close(rotated, torch.diag(after.eigenvalues[cols]), atol=1e-5, rtol=0)
    # the span of the pair's columns is kept: the other columns stay orthogonal to it
    torch.testing.assert_close(after.q.T @ after.q, torch.eye(n), atol=2e-6, rtol=0)

    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise torch.linalg.LinAlgError("no convergence")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    assert block_rotation(mat, before, bounds, (0, 1)) is None


def _orthonormality_error(basis: EigenBasis) -> float:
    q = basis.q.double()
    return (q.T @ q - torch.eye(q.shape[0], dtype=torch.float64)).abs().max().item()


def test_block_rotations_keep_unit_columns_so_rounding_does_not_accumulate():
    """Float32 rounding drifts ``Q`` from orthonormality sweep after sweep, mostly in the column norms (n = 512, 300
    sweeps of a moving factor: 1.1e-4 in the norms, 3.3e-5 between columns, growing). Each rotation rescales its
    columns to unit norm: a basis whose columns are 1e-3 off is repaired by one sweep, and over 1,000 cycles of a
    moving factor (running average of fresh estimates, the optimizer's use) the norms stay at rounding and the
    columns' inner products grow only as a random walk does (1.8e-5 after 300 sweeps, 3.2e-5 after 1,000, 6e-5
    after 3,000 at n = 48), every rotation still diagonalising the factor on its pair."""
    gen = torch.Generator().manual_seed(5)
    n, max_eigh_dim = 48, 16
    mix = _mixing(n, gen)
    mat = _spd(n, 2 * n, gen, mix)
    w, q = torch.linalg.eigh(mat.float())
    bent = EigenBasis(q=q * (1 + 1e-3 * torch.rand(n, generator=gen)), eigenvalues=w)
    assert _orthonormality_error(bent) > 5e-4
    fixed = _sweep(mat.float(), bent, max_eigh_dim)
    assert _orthonormality_error(fixed) < 2e-6, _orthonormality_error(fixed)
    rotated = fixed.q.double().T @ mat @ fixed.q.double()
    torch.testing.assert_close(torch.diagonal(rotated), fixed.eigenvalues.double(), rtol=1e-4, atol=1e-6 * w.max().item())
    basis, norms, errors = EigenBasis(q=q, eigenvalues=w), [], []
    for _ in range(1000):
        mat = 0.95 * mat + 0.05 * _spd(n, n, gen, mix)
        basis = _sweep(mat.float(), basis, max_eigh_dim)
        norms.append((basis.q.double().norm(dim=0) - 1).abs().max().item())
        errors.append(_orthonormality_error(basis))
    assert max(norms) < 1e-6, max(norms)
    assert max(errors) < 1e-4, (errors[:3], errors[-3:])


def test_block_unit_cost_counts_the_rotation_products_and_the_pair_eigh():
    layer = nn.Linear(99, 9)  # A is 100 x 100: with max_eigh_dim 70 three groups [0, 33, 66, 100]
    model = nn.Sequential(layer)
    opt = FOP(model, lr=0.1, max_eigh_dim=70, block_refresh="sweep")
    units = [u for u in opt._plan.units if u.pair is not None]
    assert [(u.factors, u.pair) for u in units] == [(("A",), (0, 1)), (("A",), (0, 2)), (("A",), (1, 2))]
    n, m = 100, 33 + 34  # groups 0 (33 columns) and 2 (34)
    assert unit_cost(units[1], 70) == 2 * n * n * m + 4 * n * m * m + EIGH_FLOPS_PER_CUBE * m**3


def _wide_model() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3))


@pytest.mark.parametrize("stagger", [False, True], ids=["every_layer_together", "staggered_capture"])
def test_block_refresh_in_the_optimizer_bounds_every_later_eigh_and_runs_each_pair_once_per_cycle(monkeypatch, stagger):
    sizes: List[List[int]] = []
    original = refresh.eigh_float32

    def recording(mat):  # noqa: ANN001, ANN202
        sizes[-1].append(mat.shape[0])
        return original(mat)

    monkeypatch.setattr(refresh, "eigh_float32", recording)
    model = _wide_model()
    opt = FOP(model, lr=0.1, max_eigh_dim=16, inverse_interval=4, factor_interval=2, stagger_capture=stagger,
              block_refresh="sweep")
    calls: List[List[str]] = []
    original_refresh = opt.distributor.refresh_bases

    def record(units):  # noqa: ANN001, ANN202
        sizes.append([])
        calls.append([(unit.layer.name, unit.factors, unit.pair) for unit in units])
        return original_refresh(units)

    opt.distributor.refresh_bases = record
    _train(model, opt, 9, [])
    # first factors: full eigh of every factor and none of their block units (with the staggered capture step 0 is
    # some units' slot)
    assert sorted(sizes[0]) == [3, 7, 40, 41] and len(calls[0]) == 2
    assert max(max(s) for s in sizes[1:]) <= 16
    first_cycle = [entry for step in calls[1:] for entry in step][: len(opt._plan.units)]
    everything = [(u.layer.name, u.factors, u.pair) for u in opt._plan.units]
    done = [entry for step in calls[1:] for entry in step]
    assert sorted(map(repr, done)) == sorted(map(repr, everything * 2))  # steps 1-8: two cycles, each unit once each
    assert first_cycle  # the refresh ran
    assert opt.counters["skipped_steps"] == 0
    for layer in opt.layers:
        for basis in (layer.basis_a, layer.basis_s):
            torch.testing.assert_close(basis.q.T @ basis.q, torch.eye(basis.q.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("stagger", [False, True], ids=["refresh_at_cycle_start", "staggered_refresh"])
def test_round_refresh_in_the_optimizer_runs_one_round_of_each_factor_per_cycle(stagger):
    """``block_refresh="round"``: in inverse cycle ``c`` each big factor rotates the pairs of round ``c % rounds`` of
    :func:`block_rounds` (the 40- and 41-wide factors in 5 and 6 groups: 5 rounds each), every other unit runs every
    cycle, and 5 cycles rotate every pair once; the bases stay orthonormal."""
    model = _wide_model()
    opt = FOP(model, lr=0.1, max_eigh_dim=16, inverse_interval=4, factor_interval=2, block_refresh="round",
              stagger_refresh=stagger)
    done: Dict[int, List[tuple]] = {}
    original = opt.distributor.refresh_bases

    def record(units):  # noqa: ANN001, ANN202
        done.setdefault(opt.global_step // 4, []).extend((u.layer.name, u.factors, u.pair) for u in units)
        return original(units)

    opt.distributor.refresh_bases = record
    _train(model, opt, 24, [])
    groups = {(layer.name, which): len(block_bounds(dim, 16)) - 1 for layer in opt.layers
              for which, dim in (("A", layer.in_dim), ("S", layer.out_dim)) if dim > 16}  # fmt: skip
    assert sorted(groups.values()) == [5, 6]
    whole = [(u.layer.name, u.factors, None) for u in opt._plan.units if u.pair is None]
    for cycle in range(1, 6):
        pairs = {key: sorted(p for name, factors, p in done[cycle] if p is not None and (name, factors[0]) == key)
                 for key in groups}  # fmt: skip
        assert pairs == {key: block_rounds(g)[cycle % 5] for key, g in groups.items()}, cycle
        assert sorted(e for e in done[cycle] if e[2] is None) == sorted(whole)
    rotated = sorted((name, factors, p) for cycle in range(1, 6) for name, factors, p in done[cycle] if p is not None)
    assert rotated == sorted((u.layer.name, u.factors, u.pair) for u in opt._plan.units if u.pair is not None)
    for layer in opt.layers:
        for basis in (layer.basis_a, layer.basis_s):
            torch.testing.assert_close(basis.q.T @ basis.q, torch.eye(basis.q.shape[0]), atol=1e-5, rtol=0)


def test_round_units_are_balanced_over_the_cycle_on_top_of_the_units_of_every_cycle():
    """Each round's units are slotted greedily (:func:`refresh_slots`) onto the loads that the captures and the units
    of every cycle leave, so that each cycle's steps are balanced with what they already carry: here a 16 + 16 full
    eigh every cycle and one pair of a 17- and a 20-wide factor per round go to three different steps."""
    torch.manual_seed(0)  # A 16 and S 16 decomposed each cycle; A 17 and S 20 in 3 groups (3 rounds of one pair)
    model = nn.Sequential(nn.Linear(15, 16), nn.Tanh(), nn.Linear(16, 20))
    opt = FOP(model, lr=0.1, max_eigh_dim=16, inverse_interval=4, factor_interval=2, block_refresh="round",
              capture_rows=8)  # captures of 8 rows: the refresh sets the loads
    plan, config = opt._plan, opt.config
    costs = [unit_cost(unit, 16) for unit in plan.units]
    capture = [refresh.capture_cost([layer], config.capture_rows) for layer in opt.layers]
    base = [sum(c for c, slot in zip(capture, plan.capture_slots) if slot == s % 2) for s in range(4)]
    every = [i for i, unit in enumerate(plan.units) if unit.round is None]
    assert [plan.slots[i] for i in every] == refresh_slots([costs[i] for i in every], 4, 1, start=list(base))
    for i in every:
        base[plan.slots[i]] += costs[i]
    for r in range(3):
        members = [i for i, unit in enumerate(plan.units) if unit.round == r]
        assert len(members) == 2
        assert [plan.slots[i] for i in members] == refresh_slots([costs[i] for i in members], 4, 1, start=base)
        assert len({plan.slots[i] for i in members + every}) == 3, r


def _kfac_direction(q_s: torch.Tensor, s: torch.Tensor, q_a: torch.Tensor, a: torch.Tensor, grad: torch.Tensor,
                    damping: float) -> torch.Tensor:
    """``(S (x) A + damping)^-1 grad`` through eigenbases: ``Q_S [(Q_S^T G Q_A) / (s a^T + damping)] Q_A^T``."""
    return q_s @ ((q_s.T @ grad @ q_a) / (s[:, None] * a[None, :] + damping)) @ q_a.T


def test_block_refresh_keeps_the_preconditioner_of_a_training_run_exact():
    """Training with block refresh (max_eigh_dim 16: the 40- and 41-wide factors in 5 and 6 groups), every refresh on
    the cycle's first step: after each of 6 cycles the layers' K-FAC directions of random gradients through the block
    bases are within cosine 0.999 of those through the exact eigendecompositions of the same factors (the refresh
    that full eigh would have done on that step), and the bases have moved (the factors changed)."""
    model = _wide_model()
    damping = 1e-2
    opt = FOP(model, lr=0.05, damping=damping, max_eigh_dim=16, inverse_interval=4, factor_interval=2,
              stagger_refresh=False, block_refresh="sweep")
    gen = torch.Generator().manual_seed(5)
    cos: List[float] = []
    first = {layer.name: layer for layer in opt.layers}
    start = {}
    for step in range(24):
        _fop_step(model, opt, torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen))
        if step == 0:
            start = {name: layer.basis_s.q.clone() for name, layer in first.items()}
        if step % 4 == 0 and step > 0:  # a refresh step: compare with exact eigendecompositions of these factors
            for layer in opt.layers:
                s, q_s = torch.linalg.eigh(layer.S)
                a, q_a = torch.linalg.eigh(layer.A)
                grad = torch.randn(layer.out_dim, layer.in_dim, generator=gen)
                want = _kfac_direction(q_s, s.clamp_min(0), q_a, a.clamp_min(0), grad, damping)
                got = _kfac_direction(layer.basis_s.q, layer.basis_s.eigenvalues, layer.basis_a.q,
                                      layer.basis_a.eigenvalues, grad, damping)
                cos.append(F.cosine_similarity(got.reshape(-1), want.reshape(-1), dim=0).item())
    assert len(cos) == 10 and min(cos) >= 0.999, cos
    moved = [(layer.basis_s.q - start[layer.name]).abs().max().item() for layer in opt.layers]
    assert min(moved) > 1e-3, moved


@pytest.mark.parametrize("block_refresh", ["sweep", "round", "adaptive"])
def test_block_refresh_resumes_bitwise(tmp_path, block_refresh):
    """10 steps straight against 5 steps, a checkpoint (through a file), and 5 more in a new model and optimizer:
    block rotations continue from the saved bases on the same slots (and rounds), so the parameters are bitwise
    equal."""

    def batches():  # noqa: ANN202
        g = torch.Generator().manual_seed(7)
        return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(10)]

    def train(model, opt, data):  # noqa: ANN001, ANN202
        for x, y in data:
            for k in (0, 1):
                with opt.sub_batch(k):
                    F.cross_entropy(model(x[8 * k : 8 * k + 8]), y[8 * k : 8 * k + 8]).backward()
            opt.step()
            opt.zero_grad()

    options = dict(lr=0.05, max_eigh_dim=16, inverse_interval=4, factor_interval=2, block_refresh=block_refresh)
    data = batches()
    straight = _wide_model()
    train(straight, FOP(straight, **options), data)
    first = _wide_model()
    opt = FOP(first, **options)
    train(first, opt, data[:5])
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = _wide_model()
    resumed.load_state_dict(saved["model"])
    opt2 = FOP(resumed, **options)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, data[5:])
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


@pytest.mark.parametrize(
    "costs, k, capture_every, start, slots",
    [
        ([5, 5, 5, 5, 5], 4, 2, [0, 0, 0, 0], [1, 3, 0, 2, 1]),  # no capture load: as the tie rule alone
        ([5, 5, 5, 5, 5], 4, 2, [8, 0, 8, 0], [1, 3, 1, 3, 0]),  # a capture step weighs 8: the third and fourth go elsewhere
        ([5, 5, 5, 5, 5], 4, 1, [8, 8, 8, 8], [0, 1, 2, 3, 0]),  # every step captures: the load is the same everywhere
    ],
)
def test_slots_count_the_capture_steps_own_cost(costs, k, capture_every, start, slots):
    assert refresh_slots(costs, k, capture_every, start=start) == slots


def test_the_capture_cost_counts_rows_times_the_factor_sides():
    model = _wide_model()  # factors 7 and 40, 41 and 3
    opt = FOP(model, lr=0.1)
    assert refresh.capture_cost(opt.layers, 100) == 2 * 100 * 2 * (7**2 + 40**2 + 41**2 + 3**2)
    assert refresh.capture_cost(opt.layers, None) == refresh.capture_cost(opt.layers, 2048)


def test_in_the_optimizer_no_refresh_lands_on_a_capture_step_when_capturing_costs_more():
    """Tiny layers: a capture of up to 2,048 rows costs far more than their eigendecompositions, so with factors every
    2 steps (every layer together) and eigenbases every 4 every layer is decomposed on the odd steps (step 0 aside:
    first factors)."""
    model = _model()
    opt = FOP(model, lr=0.1, factor_interval=2, inverse_interval=4, stagger_capture=False)
    calls: List[List[str]] = []
    _train(model, opt, 9, calls)
    steps = _per_step(calls)
    assert all(not steps[i] for i in (2, 4, 6, 8)), steps
    assert sorted(n for step in steps[1:5] for n in step) == sorted(layer.name for layer in opt.layers)


# ------------------------------------------------------------------ staggered capture
def _captures_per_step(model: nn.Module, opt: FOP, steps: int) -> List[List[str]]:
    """Names of the layers whose factors each step updated (from ``update_factors``), training on fixed batches."""
    seen: List[List[str]] = []
    original = opt.engine.update_factors

    def record(new):  # noqa: ANN001, ANN202
        seen[-1].extend(new)
        return original(new)

    opt.engine.update_factors = record
    g = torch.Generator().manual_seed(8)
    for _ in range(steps):
        seen.append([])
        _fop_step(model, opt, torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
    return seen


def test_capture_slots_spread_the_layers_by_their_capture_cost():
    opt = FOP(_model(), lr=0.1, factor_interval=3, inverse_interval=6, stagger_capture=True, capture_rows=8)
    layers = opt.layers  # A/S sides 7/16, 17/12, 13/4, 5/3: capture costs 2 * 8 * 2 * (d_A^2 + d_S^2)
    costs = [32 * (a * a + s * s) for a, s in ((7, 16), (17, 12), (13, 4), (5, 3))]
    assert [refresh.capture_cost([layer], 8) for layer in layers] == costs
    assert refresh.capture_slots(layers, opt.config) == refresh_slots(costs, 3) == [1, 0, 2, 2]
    assert opt._plan.capture_slots == [1, 0, 2, 2]
    names = [layer.name for layer in layers]
    assert opt._plan.capture_names == ({names[1]}, {names[0]}, {names[2], names[3]})
    assert refresh.capture_slots(layers, opt.config.replace(stagger_capture=False)) == [0, 0, 0, 0]
    assert refresh.capture_slots(layers, opt.config.replace(factor_interval=1, inverse_interval=6)) == [0, 0, 0, 0]
    # the refresh's slots start from each step's capture load (k = 6 steps: capture slots repeat every 3)
    start = [costs[1], costs[0], costs[2] + costs[3]] * 2
    plan = refresh.refresh_plan(layers, opt.config)
    assert plan.slots == refresh_slots([unit_cost(u, opt.config.max_eigh_dim) for u in plan.units], 6, 1, start=start)


def test_under_the_staggered_capture_no_step_is_avoided_for_refresh():
    """Two equal layers, factors and eigenbases every 2 steps: each step captures one layer (equal loads), so the
    first refresh unit ties between the steps and takes the lower one; with every layer capturing together the tie
    avoids the capture step (the refresh goes to step 1 first)."""
    def opt(stagger: bool) -> FOP:
        model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))
        return FOP(model, lr=0.1, factor_interval=2, inverse_interval=2, stagger_capture=stagger, capture_rows=8)

    staggered = opt(True)
    assert sorted(refresh.capture_slots(staggered.layers, staggered.config)) == [0, 1]
    assert staggered._plan.slots == [0, 1]
    assert opt(False)._plan.slots == [1, 0]


def test_staggered_capture_updates_each_layer_once_per_interval_on_its_slot():
    model = _model()
    opt = FOP(model, lr=0.1, factor_interval=3, inverse_interval=6, stagger_capture=True)
    seen = _captures_per_step(model, opt, 10)
    names = [layer.name for layer in opt.layers]
    slots = dict(zip(names, refresh.capture_slots(opt.layers, opt.config)))
    assert sorted(seen[0]) == sorted(names)  # no factors yet: every layer captures on the first step
    for step in range(1, 10):
        assert sorted(seen[step]) == sorted(n for n in names if slots[n] == step % 3), step
    assert len(set(slots.values())) == 3  # 4 layers over 3 steps: no step captures every layer
    assert opt.counters["factor_updates"] == 10  # every step captured some layer


def test_staggered_capture_with_a_factor_interval_of_one_is_the_plain_schedule():
    runs = []
    for stagger in (False, True):
        model = _model()
        opt = FOP(model, lr=0.1, factor_interval=1, inverse_interval=3, stagger_capture=stagger)
        runs.append((_captures_per_step(model, opt, 5), [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_staggered_capture_resumes_bitwise():
    """8 steps straight against 4, state_dicts into a new model and optimizer, and 4 more: the same layers capture on
    the same steps, so the parameters are bitwise equal."""
    options = dict(lr=0.1, factor_interval=3, inverse_interval=6, stagger_capture=True)
    straight = _model()
    opt = FOP(straight, **options)
    seen = _captures_per_step(straight, opt, 8)
    first = _model()
    opt1 = FOP(first, **options)
    head = _captures_per_step(first, opt1, 4)
    state, weights = opt1.state_dict(), {k: v.clone() for k, v in first.state_dict().items()}
    opt1.release()
    second = _model()
    second.load_state_dict(weights)
    opt2 = FOP(second, **options)
    opt2.load_state_dict(state)
    assert head == seen[:4]
    tail: List[List[str]] = []
    original = opt2.engine.update_factors
    opt2.engine.update_factors = lambda new: (tail[-1].extend(new), original(new))[1]
    g = torch.Generator().manual_seed(8)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(8)]
    for x, y in batches[4:]:  # the batch stream of _captures_per_step, continued at step 4
        tail.append([])
        _fop_step(second, opt2, x, y)
    assert tail == seen[4:]
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), second.parameters()))
