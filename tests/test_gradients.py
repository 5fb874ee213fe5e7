"""hf_fop.gradients.SubBatchGradients: g1, g1 - g2 and g_avg = w1 g1 + (1 - w1) g2 by hand, and its states."""

from __future__ import annotations

import pytest
import torch

from hf_fop.gradients import SubBatchGradients


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]


def _give(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def test_two_sub_batches_give_the_weighted_mean_and_the_difference():
    params = _params()
    grads = SubBatchGradients(params, params[:1], track_norm=True)
    g1 = [torch.randn(3, 2), torch.randn(4)]
    g2 = [torch.randn(3, 2), None]  # the second parameter unused by sub-batch 2: a zero gradient there
    grads.begin(0)
    _give(params, g1)
    grads.end(0)
    assert all(p.grad is None for p in params)
    grads.begin(1)
    _give(params, g2)
    grads.end(1, w1=0.25)
    dual, diffs = grads.for_step()
    assert dual and grads.w1 == 0.25
    torch.testing.assert_close(params[0].grad, 0.25 * g1[0] + 0.75 * g2[0])
    torch.testing.assert_close(params[1].grad, 0.25 * g1[1])
    torch.testing.assert_close(diffs[params[0]], g1[0] - g2[0])
    torch.testing.assert_close(diffs[params[1]], g1[1])
    torch.testing.assert_close(grads.avg_norm, params[0].grad.norm())  # managed parameters only


def test_sub_batch_two_can_continue_and_a_lone_first_sub_batch_is_a_kfac_step():
    params = _params()
    grads = SubBatchGradients(params, params, track_norm=False)
    a, b, c = (torch.randn(3, 2) for _ in range(3))
    grads.begin(0)
    _give(params, [a, None])
    grads.end(0)
    for part in (b, c):  # g2 accumulated over two pieces, as FOPTrainer runs them
        grads.begin(1)
        params[0].grad = part.clone() if params[0].grad is None else params[0].grad + part
        grads.end(1)
    torch.testing.assert_close(grads.diff[params[0]], a - (b + c))
    alone = SubBatchGradients(params, params, track_norm=False)
    _give(params, [None, None])
    alone.begin(0)
    _give(params, [a, None])
    alone.end(0)
    dual, diffs = alone.for_step()
    assert not dual and not diffs and torch.equal(params[0].grad, a)  # p.grad = g1


def test_reduced_gradients_keep_the_presence_set():
    params = _params()
    grads = SubBatchGradients(params, params, track_norm=False)
    _give(params, [None, torch.ones(4)])
    grads.install_reduced({params[1]: torch.zeros(4)}, w1=2 / 3, present={id(params[0]), id(params[1])})
    assert grads.w1 == 2 / 3 and grads.has_gradient([params[0]])  # another rank holds it
    grads.discard()
    assert not grads.has_gradient([params[0]]) and grads.phase == "idle"


@pytest.mark.parametrize("w1", [0.0, 1.0, 1.5])
def test_w1_outside_the_open_interval_is_refused(w1):
    params = _params()
    grads = SubBatchGradients(params, params, track_norm=False)
    grads.begin(0)
    grads.end(0)
    grads.begin(1)
    with pytest.raises(ValueError, match=r"w1=.* must be in \(0, 1\)"):
        grads.end(1, w1)
