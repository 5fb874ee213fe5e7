"""hf_fop.distributed.collectives, the parts that need no process group: the two groups and triangle packing."""

from __future__ import annotations

import pytest
import torch

from hf_fop.distributed.collectives import DualGroups, group_sizes, pack_triangles, unpack_triangles


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
