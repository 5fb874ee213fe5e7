"""Smoke test of scripts/kernel_costs.py (the kernel figures of docs/performance.md): it runs and reports every shape it
measures. Timings themselves are not checked."""

import sys
from pathlib import Path

import pytest
import torch

from hf_fop.preconditioner import BFLOAT16_PROBE_WIDTH, native_bfloat16

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import kernel_costs  # noqa: E402


def test_small_run_reports_every_kernel():
    result = kernel_costs.main(["--small", "--repeats", "1"])
    assert [(r["out"], r["in"]) for r in result["rotation"]] == list(kernel_costs.SMALL["rotations"])
    assert [(r["rows"], r["cols"]) for r in result["gram"]] == list(kernel_costs.SMALL["grams"])
    assert [r["dim"] for r in result["eigh"]] == list(kernel_costs.SMALL["eigh"])
    block = result["eigh"][0]  # 33 > 16: 5 groups, 10 rotations per sweep
    assert block["groups"] == 5 and block["sweep_ms"] == pytest.approx(10 * block["block_ms"])
    assert block["probe_ms"] > 0
    for r in result["rotation"]:
        assert r["speedup"] == pytest.approx(r["float32_ms"] / r["bfloat16_ms"])
    assert all(r["bfloat16_ms"] > 0 for r in result["gram"])
    draws = result["draw"]  # width 16: the capture draws beyond 2,048 (1 + 256 / 16) = 34,816 rows
    assert [(r["width"], r["rows"]) for r in draws] == [(16, 3072), (16, 61440)]
    assert [r["draws"] for r in draws] == [0.0, 1.0] and all(r["drawn_ms"] > 0 and r["every_ms"] > 0 for r in draws)
    (probe,) = result["auto_probe"]
    assert probe["width"] == BFLOAT16_PROBE_WIDTH and probe["speedup"] > 0
    assert probe["bfloat16"] == float(native_bfloat16(torch.device("cpu")))  # the answer "auto" uses


def test_repeats_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        kernel_costs.main(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err
