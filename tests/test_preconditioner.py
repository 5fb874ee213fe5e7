"""hf_fop.preconditioner against hand computations: lambda, the layer direction in the eigenbasis, the trust region."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hf_fop import FOP, FOPConfig
from hf_fop.fop_math import fop_direction_eigen, kfac_direction_eigen, rotate
from hf_fop.preconditioner import kl_clip_scale, layer_damping, layer_direction, layer_gradient


def test_relative_damping_is_the_mean_eigenvalue_of_the_kronecker_product():
    s, a = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])
    assert layer_damping(FOPConfig(damping=0.1), s, a) == 0.1
    torch.testing.assert_close(layer_damping(FOPConfig(damping=0.1, damping_mode="relative"), s, a), torch.tensor(0.1 * 2 * 4))
    zero = layer_damping(FOPConfig(damping=0.1, damping_mode="relative"), torch.zeros(2), torch.zeros(3))
    assert zero > 0  # floored: M stays positive for a layer without curvature


def test_kl_clip_scale_is_min_one_sqrt_clip_over_lr2_sum():
    terms = [torch.tensor(2.0), torch.tensor(6.0)]
    torch.testing.assert_close(kl_clip_scale(1e-3, terms, 0.1), torch.tensor(math.sqrt(1e-3 / (0.01 * 8.0))))
    assert float(kl_clip_scale(1e3, terms, 0.1)) == 1.0 and kl_clip_scale(None, terms, 0.1) is None


def test_layer_direction_rotates_the_layers_gradients_and_adds_its_kl_term():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = FOP(model, lr=0.1, damping=0.05)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    for k in (0, 1):
        with opt.sub_batch(k):
            F.mse_loss(model(x[4 * k : 4 * k + 4]), y[4 * k : 4 * k + 4]).backward()
    layer = opt.layers[0]
    opt.engine.update_factors(opt.engine.finalize_capture())
    opt.distributor.refresh_bases([layer])
    qs, s, qa, a = layer.basis_s.q, layer.basis_s.eigenvalues, layer.basis_a.q, layer.basis_a.eigenvalues
    g_hat = rotate(layer_gradient(layer), qs, qa)
    diffs = opt.grads.diff
    d_hat = rotate(layer.grad_matrix(diffs[layer.weight], diffs[layer.bias]), qs, qa)
    result, direction = layer_direction(layer, opt.config, diffs)
    expected, stats = fop_direction_eigen(g_hat, d_hat, s, a, 0.05, opt.config.eps)
    torch.testing.assert_close(direction, expected)
    torch.testing.assert_close(result.stats.beta, stats.beta)
    kl = stats.kl_base + stats.kl_cross + stats.kl_orth + 0.05 * expected.square().sum()
    torch.testing.assert_close(result.kl, kl)
    _, kfac = layer_direction(layer, opt.config, None)  # no g1 - g2: K-FAC's M^-1 g_avg
    torch.testing.assert_close(kfac, kfac_direction_eigen(g_hat, s, a, 0.05)[0])
