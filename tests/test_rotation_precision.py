"""scripts/rotation_precision.py on the real MiniLM for a few steps: its comparison is of the two rotation dtypes on
the same state, and its report holds together."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import rotation_precision  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("rotprec") / "run"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "rotation_precision.py"), "--steps", "3", "--batch", "8",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), out


def test_report_compares_bfloat16_with_float32_on_the_same_state(result):
    summary, out = result
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["summary"] == summary
    # step 0 decomposes the first factors, so steps 1 and 2 have eigenbases to compare in
    assert summary["steps_compared"] == 2
    # different (bfloat16 ran) and close (the bound the docs state)
    assert 0.999 < summary["cos_whole_min"] < 1.0 and summary["cos_min_layer_min"] < 1.0
    assert 0 < summary["error_max"] < 0.05 and 0 < summary["estimate_max"]
    assert summary["layer_steps"] == saved["runs"]["bfloat16"]["layer_steps"] == 3 * 38  # MiniLM: 38 managed layers
    assert 0 <= summary["bfloat16_float32_rotations"] <= summary["layer_steps"]
    for name in rotation_precision.RUNS:
        assert len(saved["runs"][name]["train_loss"]) == 3 and saved["runs"][name]["skipped_steps"] == 0
        assert 0.0 <= summary[f"{name}_accuracy"] <= 1.0
    # the control starts elsewhere: its losses differ from the float32 run's, by a drift that is reported
    assert saved["runs"]["float32_perturbed"]["train_loss"] != saved["runs"]["float32"]["train_loss"]
    assert summary["float32_perturbed_drift"] > 0 and summary["bfloat16_drift"] > 0
    assert "whole-update cosine" in out.with_suffix(".md").read_text()


def test_bad_arguments_name_the_options(capsys):
    with pytest.raises(SystemExit):
        rotation_precision.main(["--batch", "3"])
    assert "--batch even and >= 2" in capsys.readouterr().err
