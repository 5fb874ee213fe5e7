"""Smoke test of scripts/refresh_accuracy.py on the real MiniLM for a few steps: it runs, compares block-refreshed and
exact bases on the same state and reports it. (Block refresh's accuracy itself is tested in tests/test_refresh.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import refresh_accuracy  # noqa: E402


@pytest.mark.parametrize("block_refresh, extra, name", [("round", [], "run"),
                                                        ("adaptive", ["--block-tolerance", "0.07"], "run_0.07")])
def test_small_run_compares_block_and_exact_bases(tmp_path, block_refresh, extra, name):
    out = tmp_path / name  # "run_0.07": OUT.json is written as named, the dot is no suffix
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "refresh_accuracy.py"), "--steps", "3", "--batch", "8", "--block-refresh",
         block_refresh, *extra, "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["summary"] == summary
    assert summary["steps_compared"] == 2  # step 0 decomposes the first factors
    assert summary["layers_in_blocks"] == 12  # MiniLM's six 384 -> 1536 -> 384 feed-forward pairs at 1024
    assert 0.999 <= summary["cos_whole_min"] <= 1 + 1e-9 and summary["skipped_steps"] == 0
    assert summary["block_rotations"] == summary["gated_skips"] == 0  # 3 steps: no refresh after the first
    assert saved["block_refresh"] == block_refresh  # the optimizer's own settings
    text = (tmp_path / f"{name}.md").read_text()
    assert "whole-update cosine" in text and f'`block_refresh` "{block_refresh}"' in text
    if block_refresh == "adaptive":
        assert saved["block_tolerance"] == 0.07 and "`block_tolerance` 0.07" in text


def test_bad_arguments_name_the_options(capsys):
    with pytest.raises(SystemExit):
        refresh_accuracy.main(["--max-eigh-dim", "1"])
    assert "--max-eigh-dim >= 2" in capsys.readouterr().err
