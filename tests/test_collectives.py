"""hf_fop.distributed.collectives, the parts that need no process group: the two groups and triangle packing."""

from __future__ import annotations

import pytest
import torch

from hf_fop.distributed.collectives import DualGroups, group_sizes, pack_triangles, unpack_triangles
from hf_fop.gradients import SubBatchGradients


@pytest.mark.parametrize("world, n_even, n_odd", [(2, 1, 1), (3, 2, 1), (5, 3, 2), (8, 4, 4)])
def test_groups_and_the_weight_of_g1(world, n_even, n_odd):
    groups = DualGroups(rank=world - 1, world_size=world)
    assert (groups.n_even, groups.n_odd) == (n_even, n_odd) == group_sizes(world)
    assert groups.w1 == n_even / world and groups.row == (world - 1) % 2
    local = [torch.randn(5) for _ in range(world)]  # each rank's gradient: g_avg is their plain mean
    diff, avg = groups.diff_and_avg(sum(local[0::2]), sum(local[1::2]), torch.float32)
    torch.testing.assert_close(avg, sum(local) / world)
    torch.testing.assert_close(diff, sum(local[0::2]) / n_even - sum(local[1::2]) / n_odd)


def test_one_process_has_no_groups():
    with pytest.raises(ValueError, match="world_size >= 2"):
        DualGroups(0, 1)


def test_triangles_round_trip_and_restore_symmetry():
    a, b = torch.randn(3, 3), torch.randn(4, 4)
    a, b = a + a.T, b + b.T
    buf = pack_triangles([a, b])
    assert buf.numel() == 6 + 10
    out = [torch.zeros(3, 3), torch.zeros(4, 4)]
    unpack_triangles(out, buf)
    assert torch.equal(out[0], a) and torch.equal(out[1], b)


@pytest.mark.parametrize("world", [2, 3])
def test_the_groups_average_as_one_process_does_bit_for_bit(world):
    """A multi-process step and a one-process step on the same g1 and g2 install the same bits of g_avg and g1 - g2
    (:meth:`DualGroups.diff_and_avg` and :meth:`SubBatchGradients.install_dual` share the formula)."""
    torch.manual_seed(world)
    groups = DualGroups(rank=0, world_size=world)
    g1, g2 = torch.randn(64, 33), torch.randn(64, 33)
    # group sums whose division by the group sizes gives g1 and g2 back exactly (powers of two and one)
    diff, avg = groups.diff_and_avg(g1 * groups.n_even, g2 * groups.n_odd, torch.float32)
    param = torch.nn.Parameter(torch.zeros(64, 33))
    local = SubBatchGradients([param], [param], track_norm=False)
    local.begin(0)
    param.grad = g1.clone()
    local.end(0)
    local.begin(1)
    param.grad = g2.clone()
    local.end(1, w1=groups.w1)
    assert torch.equal(param.grad, avg) and torch.equal(local.diff[param], diff)
