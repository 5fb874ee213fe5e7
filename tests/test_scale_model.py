"""scripts/scale_model.py: the layer inventory, owner balance and byte formulas against hand computations."""

from __future__ import annotations

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import scale_model as sm  # noqa: E402


def test_vit_b16_has_the_published_shape():
    layers, n = sm.vit_layers("ViT-B/16")
    # patch embedding, 12 x (q, k, v, o, fc1, fc2), classifier
    assert len(layers) == 1 + 12 * 6 + 1
    assert 86_000_000 < n < 87_000_000  # ViT-B/16 with a 1000-class head: 86.6M
    by_name = {layer.name: layer for layer in layers}
    patch = by_name["vit.embeddings.patch_embeddings.projection"]
    assert (patch.d_a, patch.d_s) == (3 * 16 * 16 + 1, 768)
    fc1 = by_name["vit.layers.0.mlp.fc1"]
    assert (fc1.d_a, fc1.d_s, fc1.numel) == (769, 3072, 768 * 3072 + 3072)
    assert (by_name["classifier"].d_a, by_name["classifier"].d_s) == (769, 1000)


def test_rank_seconds_sum_each_owners_layers():
    assert sm.rank_seconds([5.0, 4.0, 3.0, 1.0], [0, 1, 1, 3], 4) == [5.0, 7.0, 0.0, 1.0]


def test_bytes_per_step_follow_the_ring_formulas():
    n, managed, t, k_i = 1000, 800, 3000, 10
    w2 = sm.bytes_per_step(n, managed, t, 2, k_i)
    assert w2["ddp_adamw"] == 2 * 0.5 * 4 * n
    assert w2["replicated"] == 1 * 4 * n + 2 * 0.5 * 4 * t / k_i  # all_gather below 5 ranks
    assert w2["specialists"] == pytest.approx(2 * 0.5 * 4 * 200 + 0.5 * 12 * managed + 0.5 * 4 * t / k_i)
    w8 = sm.bytes_per_step(n, managed, t, 8, k_i)
    ring = 7 / 8
    assert w8["replicated"] == pytest.approx(2 * ring * 8 * n + 2 * ring * 4 * t / k_i)  # (2, n) all_reduce
    # specialists: 1.5x DDP's gradient bytes on managed layers, half the replicated factor bytes
    assert w8["specialists"] == pytest.approx(2 * ring * 4 * 200 + 1.5 * 2 * ring * 4 * managed + ring * 4 * t / k_i)


def test_eigh_model_measures_small_sizes_and_extrapolates_cubically():
    seconds, measured, c = sm.eigh_model([64, 512, 600, 1200], max_measured=600)
    assert measured == {64: True, 512: True, 600: True, 1200: False}
    assert seconds[1200] == pytest.approx(c * 1200**3)
    assert c == pytest.approx(math.sqrt(seconds[512] / 512**3 * seconds[600] / 600**3))  # fitted on 512 and 600
    assert 0 < seconds[64] < seconds[600]
