"""hf_fop.refresh: the staggered schedule of eigendecompositions (slots as data, then on a real optimizer)."""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hf_fop.refresh as refresh
from hf_fop import FOP
from hf_fop.refresh import refresh_slots


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


def _train(model: nn.Module, opt: FOP, steps: int, calls: List[List[str]]) -> None:
    original = opt.distributor.refresh_bases

    def record(layers):  # noqa: ANN001, ANN202
        calls.append([layer.name for layer in layers])
        return original(layers)

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
    opt = FOP(model, lr=0.1, inverse_interval=3)
    calls: List[List[str]] = []
    _train(model, opt, 7, calls)
    steps = _per_step(calls)
    names = [layer.name for layer in opt.layers]
    assert sorted(steps[0]) == sorted(names)  # first factors: every layer at once
    cost: Dict[str, int] = {layer.name: refresh.refresh_cost(layer) for layer in opt.layers}
    for cycle in (steps[1:4], steps[4:7]):
        done = [name for step in cycle for name in step]
        assert sorted(done) == sorted(names)  # each layer once per cycle of 3 steps
        assert max(sum(cost[n] for n in step) for step in cycle) < 0.5 * sum(cost.values())
    assert opt.counters["inverse_updates"] == 3  # cycles begun: steps 0, 3, 6


def test_the_costliest_refreshes_avoid_the_factor_capture_steps():
    """factor_interval 2, inverse_interval 4: steps 0, 2, ... capture the factors of every layer, so the two costliest
    layers are decomposed on the odd steps; still each layer once per cycle."""
    model = _model()
    opt = FOP(model, lr=0.1, factor_interval=2, inverse_interval=4)
    calls: List[List[str]] = []
    _train(model, opt, 9, calls)
    steps = _per_step(calls)
    cost = {layer.name: refresh.refresh_cost(layer) for layer in opt.layers}
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
