"""hf_fop.integrations.routing as data: window plans, weights, the fallback log and skipped-step bookkeeping (hand-computed cases)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hf_fop import FOP
from hf_fop.integrations.routing import (
    FallbackLog,
    Piece,
    SkippedSteps,
    first_half,
    is_fallback,
    piece_inputs,
    route_micro_batch,
    route_window,
    weigh,
)

PLANS = [
    # (sizes, n, world_size, mode) -> pieces
    (([8, 8], 2, 1, "fop"), (Piece(0, 0), Piece(1, 1))),
    (([8, 8, 8], 3, 1, "fop"), (Piece(0, 0), Piece(1, 0), Piece(2, 1))),  # odd n: g1 gets the extra micro-batch
    (([8] * 4, 4, 1, "fop"), (Piece(0, 0), Piece(1, 0), Piece(2, 1), Piece(3, 1))),
    (([2] * 5, 5, 1, "fop"), (Piece(0, 0), Piece(1, 0), Piece(2, 0), Piece(3, 1), Piece(4, 1))),
    (([1, 1, 1], 3, 1, "fop"), (Piece(0, 0), Piece(1, 0), Piece(2, 1))),  # batches of one: whole, no split needed
    (([8], 1, 1, "fop"), (Piece(0, 0, (0, 4)), Piece(0, 1, (4, 8)))),
    (([7], 1, 1, "fop"), (Piece(0, 0, (0, 3)), Piece(0, 1, (3, 7)))),  # odd batch: the second half has the extra row
    (([2], 1, 1, "fop"), (Piece(0, 0, (0, 1)), Piece(0, 1, (1, 2)))),
    (([1], 1, 1, "fop"), (Piece(0, 0),)),  # cannot be split: K-FAC on g1
    (([8], 4, 1, "fop"), (Piece(0, 0),)),  # an epoch's short last window: first half only
    (([8, 8, 4], 4, 1, "fop"), (Piece(0, 0), Piece(1, 0), Piece(2, 1))),  # short, but reaches the second half
    (([8, 8], 2, 2, "fop"), (Piece(0, None), Piece(1, None))),  # several processes: local, reduced across ranks
    (([1], 1, 3, "fop"), (Piece(0, None),)),
    (([8, 8], 2, 1, "kfac"), (Piece(0, None), Piece(1, None))),
    (([8], 1, 1, "kfac"), (Piece(0, None),)),
]


@pytest.mark.parametrize("call,expected", PLANS, ids=[f"{c[0]}-n{c[1]}-w{c[2]}-{c[3]}" for c, _ in PLANS])
def test_window_plans(call, expected):
    assert route_window(*call) == expected


def test_fallback_windows_are_those_without_g2():
    assert [is_fallback(route_window(*call)) for call, _ in PLANS] == [
        False, False, False, False, False, False, False, False, True, True, False, False, False, False, False
    ]


def test_first_half_and_micro_batch_routing_agree_with_the_window_plan():
    assert [first_half(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 1, 2, 2, 3, 4]
    for n in (2, 3, 4, 5):  # the Accelerate loop routes one micro-batch at a time: the same plan
        online = tuple(p for k in range(n) for p in route_micro_batch(k, 8, n))
        assert online == route_window([8] * n)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: route_window([8, 8, 8], 2), "window of n=2"),
        (lambda: route_micro_batch(0, 0, 2), "size=0"),
        (lambda: route_micro_batch(0, 8, 0), "n=0"),
        (lambda: route_micro_batch(-1, 8, 2), "index=-1"),
        (lambda: route_micro_batch(0, 8, 2, world_size=0), "world_size=0"),
        (lambda: route_micro_batch(0, 8, 2, mode="adamw"), "mode='adamw'"),
        (lambda: weigh(route_window([8, 8]), [8.0]), "2 pieces but 1 item counts"),
    ],
)
def test_invalid_arguments_name_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_weights_of_an_odd_window_with_unequal_items():
    w = weigh(route_window([8, 8, 8], 3), [3.0, 5.0, 4.0])  # loss items (e.g. label tokens) of the three pieces
    assert w.loss_scales == (3 / 8, 5 / 8, 1.0)  # each sub-batch gradient: the mean over its own items
    assert w.report_scales == (3 / 12, 5 / 12, 4 / 12)  # the logged loss: the mean over the window's items
    assert w.group_items == {0: 8.0, 1: 4.0}
    assert w.w1 == 8 / 12


def test_weights_of_split_halves_and_of_a_fallback_window():
    halves = weigh(route_window([7], 1), [3.0, 4.0])
    assert halves.loss_scales == (1.0, 1.0) and halves.w1 == 3 / 7
    single = weigh(route_window([8, 8], 4), [8.0, 8.0])  # g1 only
    assert single.loss_scales == (0.5, 0.5) and single.w1 == 0.5 and single.group_items == {0: 16.0}


def test_local_pieces_are_scaled_to_the_global_mean():
    pieces = route_window([8, 8], 2, world_size=2)
    own = weigh(pieces, [2.0, 6.0], world_size=2)  # N = 2 x this rank's 8 items
    assert own.loss_scales == (0.25, 0.75) and own.report_scales == (0.25, 0.75)
    gathered = weigh(pieces, [2.0, 6.0], world_size=2, total=20.0)  # N counted on all ranks
    assert gathered.loss_scales == (0.2, 0.6)


def test_tensor_counts_stay_tensors():
    counts = torch.tensor([2.0, 6.0])
    w = weigh(route_window([8, 8], 2, world_size=2), list(counts.unbind()), world_size=2, total=torch.tensor(20.0))
    assert all(isinstance(s, torch.Tensor) for s in w.loss_scales)
    torch.testing.assert_close(torch.stack(w.loss_scales), torch.tensor([0.2, 0.6]))


def test_piece_inputs_take_the_rows_of_batched_tensors_only():
    batch = {"x": torch.arange(7), "mask": torch.ones(7, 2), "table": torch.zeros(3), "name": "digits"}
    first, second = (piece_inputs(batch, p) for p in route_window([7], 1))
    assert first["x"].tolist() == [0, 1, 2] and second["x"].tolist() == [3, 4, 5, 6]
    assert first["mask"].shape == (3, 2) and second["mask"].shape == (4, 2)
    assert first["table"] is batch["table"] and second["name"] == "digits"
    whole = route_window([7], 2)[0]
    assert piece_inputs(batch, whole) is batch


def test_fallback_log_warns_once_and_counts():
    log = FallbackLog("who")
    assert log.summary() is None
    with pytest.warns(UserWarning, match="who: an optimizer step had only FOP's first sub-batch .*n=1"):
        log.record(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log.record(4)  # no second warning
    assert log.count == 2 and "who: 2 optimizer step(s)" in log.summary()


def test_skipped_steps_count_windows_whose_step_never_ran():
    opt = FOP(nn.Linear(3, 2))
    skipped = SkippedSteps()
    skipped.begin(opt)  # window 1: its step is skipped (fp16 overflow: FOP.step never runs)
    skipped.begin(opt)  # window 2 starts: window 1 is counted
    assert opt.counters["skipped_steps"] == 1
    opt.step()  # window 2 steps
    skipped.account(opt)
    assert opt.counters["skipped_steps"] == 1 and opt.global_step == 1
    skipped.begin(opt)
    opt.counters["skipped_steps"] += 1  # FOP skipped the step itself (non-finite values): counted once
    skipped.begin(opt)
    assert opt.counters["skipped_steps"] == 2
    skipped.reset()
    skipped.account(opt)
    assert opt.counters["skipped_steps"] == 2
