"""scripts/bench_trainer_cost.py: the exposed-communication arithmetic against hand computations."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import bench_trainer_cost as btc  # noqa: E402


def test_exposed_communication_is_n_minus_one_process_seconds_over_adamws():
    comm = {"adamw_seconds": 0.030, "fop_fi1_seconds": 0.050, "fop_fi1_nohook_seconds": 0.060}
    single = {"adamw_seconds": 0.025, "fop_fi1_seconds": 0.048, "fop_fi1_nohook_seconds": 0.048}
    rows = [("adamw", "AdamW"), ("fop_fi1", "FOP"), ("fop_fi1_nohook", "FOP post-backward")]
    out = btc.exposed_rows(comm, single, rows)
    assert [r[0] for r in out] == ["AdamW", "FOP"]  # the post-backward path has no 1-process twin
    assert out[1][1:4] == pytest.approx((0.050, 0.048, 0.002))
    assert out[0][4] == pytest.approx(1.0) and out[1][4] == pytest.approx(0.002 / 0.005)
