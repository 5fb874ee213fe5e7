"""scripts/demo_spread.py: the demo's job for several seeds and thread counts, summarised as a range.

Each run is a real process of examples/run_image_classification.py (a tiny ViT for 2 steps); the test checks the
figures against the runs' own final_results.json, and that --seed and --threads reach the runs.
"""

from __future__ import annotations

import json

import pytest

from script_loader import load_script

TINY = ["--", "--max_steps", "2", "--hidden_size", "16", "--num_hidden_layers", "1", "--patch_size", "4",
        "--per_device_train_batch_size", "32", "--eval_strategy", "no"]


@pytest.mark.slow
def test_spread_reports_each_runs_own_figures_and_their_range(tmp_path, capsys):
    spread = load_script("scripts", "demo_spread")
    out = tmp_path / "spread"
    result = spread.main(["--seeds", "0", "1", "0", "--threads", "2", "--out", str(out), *TINY])
    runs = result["runs"]
    assert [(r["seed"], r["threads"]) for r in runs] == [(0, 2), (1, 2), (0, 2)]
    for r in runs:
        saved = json.loads((out / f"seed{r['seed']}_threads{r['threads']}" / "final_results.json").read_text())
        assert (r["accuracy"], r["loss"]) == (saved["final_accuracy"], saved["final_loss"])
        assert r["train_seconds"] is not None and 0 < r["train_seconds"] < r["wall_seconds"]
        assert r["command"][r["command"].index("--num_threads") + 1] == "2"
    assert runs[0]["loss"] == runs[2]["loss"] != runs[1]["loss"]  # a seed repeats its run exactly; another seed differs
    summary = result["summary"]
    accuracies = [r["accuracy"] for r in runs]
    assert (summary["accuracy_min"], summary["accuracy_max"]) == (min(accuracies), max(accuracies))
    assert summary["wall_seconds_max"] == max(r["wall_seconds"] for r in runs)
    assert json.loads((out / "demo_spread.json").read_text())["summary"] == summary
    assert f"accuracy {min(accuracies):.4f}-{max(accuracies):.4f}" in capsys.readouterr().out


def test_bad_thread_count_is_named(tmp_path):
    with pytest.raises(SystemExit):
        load_script("scripts", "demo_spread").main(["--threads", "0", "--out", str(tmp_path), *TINY])
