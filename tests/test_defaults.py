"""The defaults that ship are the defaults that were measured: ``FOPConfig()`` and ``FOPTrainingArguments`` equal, field by
field, the configuration the sensitivity benchmark runs as its default cell (scripts/benchmark_sensitivity.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench_lib import data as bdata, models as bmodels
from bench_lib.sensitivity import grid as s_grid, runner as s_runner
from hf_fop import FOPConfig, FOPTrainingArguments
from script_loader import load_script

bs = load_script("scripts", "benchmark_sensitivity")


def _differences(a: FOPConfig, b: FOPConfig) -> dict:
    """``{field: (a's value, b's value)}`` for every field where the two configs differ."""
    names = [f.name for f in dataclasses.fields(FOPConfig)]
    return {n: (getattr(a, n), getattr(b, n)) for n in names if getattr(a, n) != getattr(b, n)}


def _default_cell_configs():
    """(dataset, batch, the FOPConfig the benchmark builds for FOP at its default cell) at every batch it runs that cell,
    with the default cell the command line gives (no --default-* flags)."""
    args = bs.parse_args([])
    settings = s_grid.make_settings("full", {"lr": args.default_lr, "damping": args.default_damping, "variant": args.default_variant})
    d = settings.default
    out = []
    for dataset in settings.datasets:
        shape = (8, 8) if dataset == "digits" else (1, 22)
        data = bdata.Splits(*(torch.zeros(2, 1, *shape), torch.zeros(2, dtype=torch.long)) * 3, name=dataset, n_classes=5)
        for batch in settings.batches[dataset]:
            spec = s_grid.RunSpec("seeds", dataset, "mlp", "fop", d["variant"], batch, d["lr"], d["damping"], 1, 1)
            out.append((dataset, batch, s_runner.make_optimizer(bmodels.build_model("mlp", data, 0), spec, settings).config))
    return out


def test_fop_config_defaults_are_the_benchmark_default_cell():
    cells = _default_cell_configs()
    assert len(cells) == 6  # three batches per dataset, the whole training split last
    for dataset, batch, config in cells:
        assert _differences(config, FOPConfig()) == {}, (dataset, batch)


def test_training_arguments_defaults_are_the_benchmark_default_cell(tmp_path):
    """Every fop_* default (and the Trainer fields FOP reads) gives FOPConfig(); only learning_rate is the Trainer's own
    default (5e-5, an AdamW value), so it is set here to the benchmark's lr."""
    args = FOPTrainingArguments(str(tmp_path), learning_rate=FOPConfig().lr, use_cpu=True)
    assert _differences(args.fop_config(), FOPConfig()) == {}
    (_, _, benchmarked), *_ = _default_cell_configs()
    assert _differences(args.fop_config(), benchmarked) == {}
    assert FOPTrainingArguments(str(tmp_path), use_cpu=True).learning_rate != FOPConfig().lr  # the one exception


@pytest.mark.parametrize("field,value", [("momentum", 0.0), ("inverse_interval", 10), ("adamw_lr", None), ("projection_metric", "fisher")])
def test_a_diverging_field_is_named(field, value):
    """The comparison sees every field: a config that differs in one names it."""
    assert list(_differences(FOPConfig().replace(**{field: value}), FOPConfig())) == [field]
