"""scripts/refresh_cost.py: its warm start is a real refresh step (it spans the factor's eigenbasis) and it reports
every timing it names."""

from __future__ import annotations

from script_loader import load_script

rc = load_script("scripts", "refresh_cost")


def test_reports_each_timing_for_each_dimension():
    (row,) = rc.main(["--dims", "33", "--repeats", "1"])
    assert row["dim"] == 33 and all(row[k] >= 0 for k in ("eigh", "warm", "gemm", "qr"))
    assert row["eigh_over_warm"] == row["eigh"] / row["warm"]


def test_best_cpu_seconds_keeps_the_smallest(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])  # calls of 5, 1 and 3 seconds
    monkeypatch.setattr(rc.time, "process_time", lambda: next(clock))
    assert rc.best_cpu_seconds(lambda: None, 3) == 1.0
