"""Tests of scripts/benchmark_convergence.py and its parts (scripts/bench_lib/convergence): its pieces against oracles, and a ``--smoke`` run (the ``--quick`` code paths, smaller)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sklearn.datasets import load_digits

from bench_lib import common as bcommon, data as bdata
from bench_lib.convergence import analysis as c_analysis, grid as c_grid, render as c_render, runner as c_runner
from script_loader import load_script

bc = load_script("scripts", "benchmark_convergence")


# ------------------------------------------------------------------ pieces
def test_digits_splits_are_disjoint_fixed_and_standardised():
    a, b = bdata.load_digits_splits(0), bdata.load_digits_splits(0)
    assert a.sizes() == {"train": 1078, "val": 359, "test": 360}
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (1078, 1, 8, 8) and a.y_train.dtype == torch.int64
    rows = torch.cat([a.x_train, a.x_val, a.x_test]).reshape(-1, 64)
    original = torch.from_numpy(load_digits().data)
    assert rows.shape[0] == original.shape[0]  # a partition: every example in exactly one split
    assert torch.unique(rows, dim=0).shape[0] == torch.unique(original, dim=0).shape[0]
    assert abs(a.x_train.mean().item()) < 1e-4 and abs(a.x_train.std().item() - 1) < 1e-3
    assert set(a.y_train.tolist()) == set(range(10))
    c = bdata.load_digits_splits(1)
    assert not torch.equal(a.y_test, c.y_test)


@pytest.mark.parametrize("name", ["vit", "mlp"])
def test_models_give_logits_and_are_seeded(name):
    x = torch.randn(5, 1, 8, 8)
    m1, m2 = c_grid.build_model(name, "cpu", 3), c_grid.build_model(name, "cpu", 3)
    assert m1(x).shape == (5, 10)
    assert torch.equal(m1(x), m2(x))
    assert not torch.equal(m1(x), c_grid.build_model(name, "cpu", 4)(x))


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="model='cnn'"):
        c_grid.build_model("cnn", "cpu", 0)
    with pytest.raises(ValueError, match="device_kind='tpu'"):
        c_grid.build_model("mlp", "tpu", 0)


def test_lr_factor_warmup_then_cosine():
    total, frac = 100, 0.05  # 5 warmup steps
    assert [bcommon.lr_factor(i, total, frac) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert bcommon.lr_factor(5, total, frac) == pytest.approx(1.0)
    mid = 5 + (total - 5) / 2
    assert bcommon.lr_factor(int(mid), total, frac) == pytest.approx(0.5 * (1 + math.cos(math.pi * (int(mid) - 5) / 95)))
    values = [bcommon.lr_factor(i, total, frac) for i in range(5, total)]
    assert all(x >= y for x, y in zip(values, values[1:]))
    assert bcommon.lr_factor(total, total, frac) == pytest.approx(0.0, abs=1e-12)


def test_reach_select_and_summarize():
    run = {"epochs": [1, 2, 3], "seconds": [0.5, 1.0, 1.5], "test_acc": [0.5, 0.91, 0.95],
           "final_test_acc": 0.95, "final_val_acc": 0.9, "final_val_loss": 0.3, "total_seconds": 1.5}
    assert c_analysis.reach(run, 0.9) == (2, 1.0)
    assert c_analysis.reach(run, 0.96) is None
    other = {**run, "test_acc": [0.2, 0.4, 0.6], "final_test_acc": 0.6, "final_val_acc": 0.5, "final_val_loss": 0.2,
             "total_seconds": 2.5}
    assert c_analysis.select_best([other, run]) is run  # higher val acc wins
    tie = {**run, "final_val_loss": 0.1}
    assert c_analysis.select_best([run, tie]) is tie  # equal val acc: lower val loss wins
    s = c_analysis.summarize([run, {**run, "test_acc": [0.92, 0.93, 0.94], "final_test_acc": 0.94}, other], 0.9)
    assert s["seeds"] == 3 and s["reached"] == 2
    assert s["epochs_mean"] == pytest.approx(1.5) and s["epochs_std"] == pytest.approx(math.sqrt(0.5))
    assert s["seconds_mean"] == pytest.approx(0.75)
    assert s["final_test_acc_mean"] == pytest.approx((0.95 + 0.94 + 0.6) / 3)
    assert c_render._fmt_reach(s).endswith("(2/3 seeds)")
    assert c_render._fmt_reach(c_analysis.summarize([other], 0.9)) == "-"


def test_markdown_section_replaces_only_its_block(tmp_path):
    path = tmp_path / "bench.md"
    path.write_text("# Benchmarks\n\nnarrative before\n")
    bcommon.write_markdown_section(str(path), "convergence", "table v1")
    path.write_text(path.read_text() + "\nnarrative after\n")
    bcommon.write_markdown_section(str(path), "convergence", "table v2")
    text = path.read_text()
    assert "table v1" not in text and text.count("table v2") == 1
    assert "narrative before" in text and "narrative after" in text
    assert text.index("narrative before") < text.index("table v2") < text.index("narrative after")
    bcommon.write_markdown_section(str(path), "other", "x")
    assert "table v2" in path.read_text() and "<!-- other:begin -->\nx\n<!-- other:end -->" in path.read_text()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="profile='huge'"):
        c_grid.make_settings("huge")
    with pytest.raises(SystemExit):
        bc.parse_args(["--device", "tpu"])
    with pytest.raises(SystemExit):
        bc.parse_args(["--threads", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bc.parse_args(["--device", "cuda"])
    s = c_grid.make_settings("quick")
    data = bdata.load_digits_splits(0)
    with pytest.raises(ValueError, match="batch=2000"):
        c_runner.train_run(c_grid.RunSpec("mlp", "sgd", 2000, 0.1, None, 0, 1, "grid"), data, s, torch.device("cpu"))


def test_kfac_plain_backward_matches_fop_without_beta_on_sub_batches():
    """The benchmark's K-FAC (one backward of the batch) and FOP with beta = 0 (two halves) take the same steps."""
    s = c_grid.make_settings("quick")
    data = bdata.load_digits_splits(0)
    runs = [
        c_runner.train_run(c_grid.RunSpec("mlp", name, 128, 0.03, 0.1, 0, 2, "grid"), data, s, torch.device("cpu"))
        for name in ("kfac", "fop_no_beta")
    ]
    assert runs[0].test_acc == runs[1].test_acc
    assert runs[0].final_val_loss == pytest.approx(runs[1].final_val_loss, rel=1e-4)
    assert runs[0].train_loss == pytest.approx(runs[1].train_loss, rel=1e-4)
    assert runs[1].diagnostics["beta_mean"] == 0.0


def test_paired_damping_counts_and_leaves_out_failed_pairs():
    settings = {"models": ["m"], "batch_sizes": [8], "lr_grid": [1.0, 2.0, 3.0], "damping_grid": [0.1]}

    def run(opt, lr, acc):
        return {"spec": {"phase": "grid", "model": "m", "batch": 8, "lr": lr, "damping": 0.1, "optimizer": opt},
                "final_test_acc": acc, "diverged": acc < 0.2}

    accs = {1.0: (0.85, 0.90), 2.0: (0.55, 0.50), 3.0: (0.10, 0.12)}  # (kfac, fop)
    runs = [run("kfac", lr, k) for lr, (k, _) in accs.items()] + [run("fop", lr, f) for lr, (_, f) in accs.items()]
    (row,) = c_analysis.paired_damping({"meta": {"settings": settings}, "runs": runs})
    assert row["pairs"] == 3 and row["both_failed"] == 1
    assert row["fop_better"] == 1 and row["kfac_better"] == 1
    assert row["mean_diff"] == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------- smoke run
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    report = bc.main(["--smoke", "--out", str(out)])
    return out, report


@pytest.mark.xdist_group("convergence_smoke")  # one smoke run, one worker
def test_smoke_run_writes_json_markdown_and_pngs(smoke_run):
    out, _ = smoke_run
    data = json.loads((out / "convergence_results_smoke.json").read_text())
    s = data["meta"]["settings"]
    assert s["profile"] == "smoke" and data["meta"]["machine"] and data["meta"]["date_utc"]
    assert "--smoke" in data["meta"]["command"]
    assert len(data["table"]) == len(s["models"]) * len(s["batch_sizes"]) * len(c_grid.OPTIMIZERS)
    for row in data["table"]:
        assert row["seeds"] == s["seeds"]
        assert 0.0 <= row["final_test_acc_mean"] <= 1.0
        assert (row["damping"] is None) == (row["optimizer"] in ("sgd", "adamw"))
        assert row["lr"] in s["lr_grid"]
    grid = [r for r in data["runs"] if r["spec"]["phase"] == "grid"]
    n_cells = len(s["models"]) * len(s["batch_sizes"])
    assert len(grid) == n_cells * len(s["lr_grid"]) * (2 + 2 * len(s["damping_grid"]))
    for r in data["runs"]:
        assert all(0.0 <= a <= 1.0 for a in r["test_acc"]) and 0.0 <= r["final_val_acc"] <= 1.0
        assert r["seconds"] == sorted(r["seconds"]) and r["seconds"][0] > 0
    assert {a["variant"] for a in data["ablations"]} == {"fop", "fop_no_beta", "fop_no_eta"}
    assert len(data["damping_sweep"]) == n_cells * 2 * len(s["damping_grid"])
    md = (out / "benchmarks.md").read_text()
    assert "<!-- convergence-smoke:begin -->" in md and "<!-- convergence-smoke:end -->" in md
    assert "| batch | sgd | adamw | kfac | fop |" in md and "Ablations at batch 1078" in md
    for name in ("convergence_time_smoke.png", "convergence_damping_smoke.png"):
        raw = (out / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 10_000


@pytest.mark.xdist_group("convergence_smoke")  # one smoke run, one worker
def test_smoke_run_adamw_and_fop_learn(smoke_run):
    _, report = smoke_run
    chance = 0.1
    for row in report["table"]:
        if row["model"] == "mlp" and row["optimizer"] in ("adamw", "fop", "kfac"):
            assert row["final_test_acc_mean"] > 0.85, row
        if row["model"] == "vit" and row["optimizer"] in ("adamw", "fop"):
            assert row["final_test_acc_mean"] > chance + 0.2, row


@pytest.mark.xdist_group("convergence_smoke")  # one smoke run, one worker
def test_from_json_rerenders_markdown_and_plots(smoke_run, tmp_path):
    out, _ = smoke_run
    bc.main(["--from-json", str(out / "convergence_results_smoke.json"), "--out", str(tmp_path)])
    again = (tmp_path / "benchmarks.md").read_text().splitlines()
    first = (out / "benchmarks.md").read_text().splitlines()
    assert len(again) == len(first)
    assert [l for l in again if l.startswith("|")][:3] == [l for l in first if l.startswith("|")][:3]
    assert (tmp_path / "convergence_time_smoke.png").exists() and (tmp_path / "convergence_damping_smoke.png").exists()
    assert not (tmp_path / "convergence_results_smoke.json").exists()  # the source JSON is not rewritten elsewhere
