"""Tests of scripts/profile_capture.py: the cProfile rows it reports."""

from __future__ import annotations

import cProfile
import pstats

import torch

from script_loader import load_script

pc = load_script("scripts", "profile_capture")


def test_operation_seconds_sums_the_matching_profile_entries_per_row(monkeypatch):
    x = torch.randn(512, 256)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(50):
        torch.cat([x, x], 1)
        x.T.reshape(-1)
        torch.stack([x, x])
    profiler.disable()
    stats = pstats.Stats(profiler)
    got = pc.operation_seconds(stats)
    assert set(got) == set(pc.OPERATIONS)
    cat = sum(v[2] for k, v in stats.stats.items() if k[2] == "<built-in method torch.cat>")
    assert got["torch.cat"] == cat > 0 and got["reshape"] > 0
    assert got["im2col"] == got["eigh"] == got["backward"] == 0.0  # not called
    monkeypatch.setattr(pc, "OPERATIONS", {"torch": "<built-in method torch."})  # a row matching two functions
    both = sum(v[2] for k, v in stats.stats.items() if k[2] in ("<built-in method torch.cat>", "<built-in method torch.stack>"))
    assert pc.operation_seconds(stats)["torch"] == both > cat
