"""scripts/batched_layer_math.py: the stacked path computes the optimizer's directions (so the timing compares equal
work), the layer shapes are the model's, and a smoke run's JSON contract. Not a timing test."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import batched_layer_math as blm  # noqa: E402


def test_stacked_directions_equal_the_per_layer_ones():
    shapes = [(8, 9)] * 3 + [(16, 9), (8, 17)]
    cases = blm.make_cases(shapes, torch.device("cpu"))
    want = blm.per_layer(cases)
    for got in (blm.stacked(cases), blm.stacked(cases, {
            shape: (torch.stack([cases[i]["qs"] for i in idx]), torch.stack([cases[i]["qa"] for i in idx]))
            for shape, idx in blm.groups_by_shape(cases).items()})):  # fmt: skip
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_layer_shapes_are_the_vits_managed_layers():
    shapes = blm.layer_shapes(blm.Shape(hidden=32, layers=1, batch=2))
    # patch embedding (3*4*4 + bias -> 32), q, k, v, attention output, FFN up and down, classifier (10 classes)
    assert sorted(shapes) == sorted([(32, 49), (32, 33), (32, 33), (32, 33), (32, 33), (128, 33), (32, 129), (10, 33)])


def test_smoke_run_reports_every_path(capsys):
    result = blm.main(["--hidden", "32", "--layers", "1", "--repeats", "2"])
    assert set(result["ms"]) == {"per_layer", "stacked", "stacked_prebuilt", "rotations_only"}
    assert result["layers"] == 8 and result["groups"] == 5
    assert result["stacked_over_per_layer"] == result["ms"]["stacked"] / result["ms"]["per_layer"]
    assert '"stacked_over_per_layer"' in capsys.readouterr().out
