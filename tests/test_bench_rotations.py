"""scripts/bench_lib/rotations.py: the rotation limit's arithmetic by hand."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench_lib import rotations  # noqa: E402


def test_rotation_limit_of_one_bert_base_attention_layer_by_hand():
    dims = [(769, 768)]  # a 768 -> 768 Linear with bias: A is 769 x 769, S 768 x 768
    one_rotation = 2 * 769 * 768 * (769 + 768)  # Q_S^T G: 2 * 768^2 * 769, then (.) Q_A: 2 * 768 * 769^2
    assert one_rotation == 2 * 768 * 768 * 769 + 2 * 768 * 769 * 769
    passes = 6.0 * 2048 * 769 * 768  # the layer's forward+backward at 2k tokens
    assert rotations.rotation_flops(dims, rotations.ROTATIONS["fop"]) == 3 * one_rotation
    assert rotations.rotation_limit(dims, rotations.ROTATIONS["fop"], passes) == pytest.approx(3 * one_rotation / passes)
    assert rotations.rotation_limit(dims, rotations.ROTATIONS["kfac"], passes) == pytest.approx(2 * one_rotation / passes)
    assert 3 * one_rotation / passes == pytest.approx(3 * 2 * 1537 / (6 * 2048))  # = 0.75: d_in + d_out over 2 T


def test_counted_flops_of_a_matrix_product_and_its_backward_by_hand():
    x = torch.randn(16, 8)
    w = torch.randn(8, 4, requires_grad=True)

    def passes() -> None:
        (x @ w).sum().backward()

    # forward 2 * 16 * 8 * 4; backward: only w's gradient (x needs none), x^T (16 x 8)^T @ (16 x 4), the same count
    assert rotations.counted_flops(passes) == 2 * (2 * 16 * 8 * 4)
