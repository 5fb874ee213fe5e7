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


def test_every_layer_together_runs_beside_the_staggered_capture_above_factor_interval_one():
    runs = {key: (fi, sharding, options) for key, _, fi, _, sharding, options in btc.variants([1, 10])}
    assert runs["fop_fi10_together"] == (10, "replicated", {"fop_stagger_capture": False})
    assert runs["fop_fi10_specialists_together"] == (10, "specialists", {"fop_stagger_capture": False})
    assert runs["fop_fi10"] == (10, "replicated", {}) and "fop_fi1_together" not in runs  # nothing to spread at 1
    labels = [btc.row_label(key, optimizer, fi, sharding) for key, optimizer, fi, _, sharding, _ in btc.variants([1, 10])]
    assert len(set(labels)) == len(labels)
    assert "FOP specialists, factor_interval=10, every layer's capture on one step" in labels
    assert "K-FAC specialists, factor_interval=1" in labels
