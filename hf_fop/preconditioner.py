"""Preconditioning of one managed layer in its Kronecker eigenbasis: damping, FOP/K-FAC direction, trust region.

For a layer with eigenbases ``A = Q_A diag(a) Q_A^T`` and ``S = Q_S diag(s) Q_S^T`` the damped Fisher
``M = A (x) S + lambda I`` is diagonal after rotating a gradient ``G`` (``(out, in)``) to ``Q_S^T G Q_A``; the math
there is :mod:`hf_fop.fop_math`. This module picks lambda, rotates the layer's gradients, and bounds the step:

* :func:`layer_damping`: lambda, absolute or relative to the layer's mean eigenvalue;
* :func:`layer_direction`: the layer's direction in the eigenbasis with its stats and its KL term;
* :func:`kl_clip_scale`: the trust-region factor nu over all layers (FOP_SPEC, "Beyond the paper").
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .config import FOPConfig
from .curvature import KFACLayer
from .fop_math import LayerResult, fop_direction_eigen, kfac_direction_eigen, rotate


def layer_damping(config: FOPConfig, s: Tensor, a: Tensor) -> Union[float, Tensor]:
    """lambda of one layer: ``damping`` (absolute), or ``damping * mean(eig A) * mean(eig S)`` (relative).

    ``s``, ``a``: eigenvalues of S ``(out,)`` and A ``(in,)``. The relative value is a 0-dim tensor (no host sync),
    recomputed from the stored eigenvalues, so it changes only at an eigendecomposition and a resumed run sees the same
    bits. It is floored at the smallest normal float32 so that a layer whose factors are all zero still has ``M > 0``.
    """
    if config.damping_mode == "absolute":
        return config.damping
    mean_eig = (a.mean() * s.mean()).clamp_min(torch.finfo(torch.float32).tiny)
    return config.damping * mean_eig


def layer_gradient(layer: KFACLayer) -> Tensor:
    """The layer's ``p.grad`` as its ``(out, in)`` float32 matrix (bias as the last column; missing ones as zeros)."""
    return layer.grad_matrix(_grad(layer.weight), _grad(layer.bias))


def layer_direction(
    layer: KFACLayer, config: FOPConfig, diffs: Optional[Dict[Tensor, Tensor]]
) -> Tuple[Optional[LayerResult], Optional[Tensor]]:
    """``(result, direction in the eigenbasis (out, in))`` of ``layer`` for lr = 1; ``(None, None)`` without a basis.

    ``diffs``: ``{param: g1 - g2}`` selects FOP for the layers it holds; ``None`` (or a layer it lacks) gives K-FAC's
    ``M^-1 g_avg``. The KL term (with ``kl_clip``) is ``Delta^T M Delta`` = the KL split + ``lambda ||Delta||^2``
    (rotations keep norms).
    """
    if layer.basis_a is None or layer.basis_s is None:
        return None, None
    w, b = layer.weight, layer.bias
    q_s, s = layer.basis_s.q, layer.basis_s.eigenvalues
    q_a, a = layer.basis_a.q, layer.basis_a.eigenvalues
    damping = layer_damping(config, s, a)
    g_hat = rotate(layer_gradient(layer), q_s, q_a)
    if diffs is not None and (w in diffs or (b is not None and b in diffs)):
        d_w = diffs[w] if w in diffs else torch.zeros_like(w)
        d_hat = rotate(layer.grad_matrix(d_w, diffs.get(b) if b is not None else None), q_s, q_a)
        dir_hat, stats = fop_direction_eigen(
            g_hat, d_hat, s, a, damping, config.eps, config.use_beta, config.use_eta, config.projection_metric
        )
    else:
        dir_hat, stats = kfac_direction_eigen(g_hat, s, a, damping)
    kl = None
    if config.kl_clip is not None:
        flat = dir_hat.reshape(-1)
        kl = stats.kl_base + stats.kl_cross + stats.kl_orth + damping * torch.dot(flat, flat)
    return LayerResult(stats, damping, kl), dir_hat


def kl_clip_scale(kl_clip: Optional[float], terms: List[Tensor], lr: float) -> Optional[Tensor]:
    """Trust-region factor ``nu = min(1, sqrt(kl_clip / (lr^2 sum_l Delta_l^T M_l Delta_l)))``, or ``None``.

    ``terms``: per layer ``Delta_l^T M_l Delta_l`` (0-dim, :func:`layer_direction`), ``Delta_l`` the layer's direction
    for lr = 1 (before momentum) and ``M_l`` the damped curvature that preconditions it (as PyTorch K-FAC
    implementations do: their ``v . g`` is ``Delta^T M Delta``); ``lr`` the step's scheduled learning rate. A 0-dim
    tensor, no host sync.
    """
    if kl_clip is None or not terms:
        return None
    total = (torch.stack(terms).sum() * (lr * lr)).clamp_min(0.0)  # rounding cannot make it negative
    return torch.clamp(torch.sqrt(kl_clip / total), max=1.0)


def _grad(p: Optional[Tensor]) -> Optional[Tensor]:
    if p is None:
        return None
    return p.grad if p.grad is not None else torch.zeros_like(p)
