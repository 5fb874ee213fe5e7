"""Preconditioning of one managed layer in its Kronecker eigenbasis: damping, FOP/K-FAC direction, trust region.

For a layer with eigenbases ``A = Q_A diag(a) Q_A^T`` and ``S = Q_S diag(s) Q_S^T`` the damped Fisher
``M = A (x) S + lambda I`` is diagonal after rotating a gradient ``G`` (``(out, in)``) to ``Q_S^T G Q_A``; the math
there is :mod:`hf_fop.fop_math`. This module picks lambda, rotates the layer's gradients, and bounds the step:

* :func:`rotation_dtype`: the dtype the rotations multiply in (``FOPConfig.rotation_dtype``);
* :func:`rotation_error`: the estimated relative error a low-precision rotation left in a layer's direction;
* :func:`layer_damping`: lambda, absolute or relative to the layer's mean eigenvalue;
* :func:`layer_direction`: the layer's direction in the eigenbasis with its stats and its KL term;
* :func:`kl_clip_scale`: the trust-region factor nu over all layers (FOP_SPEC, "Beyond the paper").
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .config import FOPConfig
from .curvature import KFACLayer
from .fop_math import LayerResult, fop_direction_eigen, global_square_norm, kfac_direction_eigen, rotate


AUTO_BFLOAT16_MIN_DIM = 256
"""``rotation_dtype="auto"`` rotates a layer in bfloat16 only when both its sides are at least this wide: below it,
the conversions cost more than the multiplication saves (CPU, AVX512-BF16, ``scripts/kernel_costs.py``: 2.7x faster
at 3,072 x 769, 2.0x at 256 x 257, 0.8x at 128 x 129, 0.3x at 64 x 65)."""

BFLOAT16_PROBE_WIDTH = 512
"""Side of the probe rotation (:func:`bfloat16_speedup`): a ``(512, 513)`` gradient, about 3 ms in float32 on one
thread of this project's CPUs."""

BFLOAT16_MIN_SPEEDUP = 1.25
"""On a CPU, ``rotation_dtype="auto"`` takes bfloat16 only where the probe rotation is at least this much faster in
it. The instruction set does not tell: one CPU with AVX512-BF16 rotated 2.0-3.0x faster in bfloat16 from 256 wide
up, another (AVX512-BF16, no AMX) 0.4-0.7x, i.e. slower (``scripts/kernel_costs.py``, docs/performance.md)."""

_NATIVE_BFLOAT16: Dict[torch.device, bool] = {}
"""This process's answer of :func:`native_bfloat16` per device (probed once, or pinned)."""


def resolve_rotation_dtype(
    setting: str, native_bfloat16: bool, projection_metric: str = "damped", min_dim: Optional[int] = None
) -> torch.dtype:
    """The dtype of ``FOPConfig.rotation_dtype`` ``setting`` for a layer whose narrower side is ``min_dim`` wide on a
    device that does (``native_bfloat16``) or does not multiply bfloat16 faster than float32; float32 for
    ``projection_metric="fisher"``, whose null-space test needs it."""
    if projection_metric == "fisher" or setting == "float32":
        return torch.float32
    if setting == "bfloat16":
        return torch.bfloat16
    wide = min_dim is None or min_dim >= AUTO_BFLOAT16_MIN_DIM
    return torch.bfloat16 if native_bfloat16 and wide else torch.float32


def bfloat16_speedup(device: torch.device, width: int = BFLOAT16_PROBE_WIDTH, repeats: int = 3) -> float:
    """Float32 time over bfloat16 time of one rotation (:func:`hf_fop.fop_math.rotate`, conversions included) of a
    ``(width, width + 1)`` gradient on the CPU ``device``: process CPU seconds, the best of ``repeats`` after a
    warm-up each."""
    generator = torch.Generator().manual_seed(0)
    q_s, g, q_a = (torch.randn(r, c, generator=generator).to(device) for r, c in
                   ((width, width), (width, width + 1), (width + 1, width + 1)))  # fmt: skip

    def best(dtype: torch.dtype) -> float:
        seconds = float("inf")
        for i in range(repeats + 1):
            t0 = time.process_time()
            rotate(g, q_s, q_a, dtype)
            if i:  # the first call warms up
                seconds = min(seconds, time.process_time() - t0)
        return max(seconds, 1e-9)

    return best(torch.float32) / best(torch.bfloat16)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 faster than float32 (cached per process): a CUDA device of compute
    capability 8.0 or later (tensor cores); a CPU with AVX512-BF16 or AMX tiles on which the probe rotation
    (:func:`bfloat16_speedup`) is at least :data:`BFLOAT16_MIN_SPEEDUP` times faster in bfloat16."""
    if device not in _NATIVE_BFLOAT16:
        if device.type == "cuda":
            answer = torch.cuda.get_device_capability(device)[0] >= 8
        elif device.type == "cpu":
            probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
            answer = any(getattr(torch.cpu, name, lambda: False)() for name in probes) and (
                bfloat16_speedup(device) >= BFLOAT16_MIN_SPEEDUP
            )
        else:
            answer = False
        _NATIVE_BFLOAT16[device] = answer
    return _NATIVE_BFLOAT16[device]


def timed_bfloat16_devices(config: FOPConfig, layers: List[KFACLayer]) -> List[torch.device]:
    """The CPU devices of ``layers`` on which some layer's ``rotation_dtype`` hangs on :func:`native_bfloat16`'s timing
    (:func:`resolve_rotation_dtype` differs between a fast and a slow device): where ranks must agree on the answer."""
    def hangs(layer: KFACLayer) -> bool:
        both = (resolve_rotation_dtype(config.rotation_dtype, fast, config.projection_metric,
                                       min(layer.in_dim, layer.out_dim)) for fast in (True, False))  # fmt: skip
        return len(set(both)) > 1

    return sorted({layer.weight.device for layer in layers if layer.weight.device.type == "cpu" and hangs(layer)}, key=str)


def pin_native_bfloat16(device: torch.device, answer: bool) -> None:
    """Make :func:`native_bfloat16` answer ``answer`` for ``device`` in this process (every rank takes rank 0's
    answer, so that replicated curvature computes the same directions everywhere)."""
    _NATIVE_BFLOAT16[device] = answer


def rotation_dtype(config: FOPConfig, layer: KFACLayer) -> torch.dtype:
    """The dtype ``layer``'s rotations multiply in (:func:`resolve_rotation_dtype` on its device and widths)."""
    return resolve_rotation_dtype(
        config.rotation_dtype, native_bfloat16(layer.weight.device), config.projection_metric,
        min(layer.in_dim, layer.out_dim),
    )  # fmt: skip


ROTATION_ERROR_LIMIT = 0.02
"""Largest :func:`rotation_error` of a bfloat16-rotated direction that the optimizer keeps (the direction is then
within about 2e-4 of the float32 one in cosine); a layer above it is computed again in float32."""


def rotation_error(
    layer: KFACLayer, result: LayerResult, dir_hat: Tensor, diffs: Optional[Dict[Tensor, Tensor]], dtype: torch.dtype
) -> Tensor:
    """Estimated ``||Delta_low - Delta|| / ||Delta||`` of ``layer``'s direction ``dir_hat`` (eigenbasis, lr = 1) when its
    rotations multiplied in ``dtype`` (0-dim, no host sync).

    Rounding the inputs of ``Q_S^T G Q_A`` to a unit roundoff ``u`` adds noise of about ``sqrt(3) u ||G||`` spread
    evenly over the eigenbasis (from ``G``, ``Q_S`` and ``Q_A``); ``M^-1`` then weighs each entry, so the noise of
    ``eta (M^-1 g_avg + beta M^-1 g_perp)`` is about ``|eta| sqrt(3) u sqrt((||g_avg||^2 + beta^2 ||g1 - g2||^2)
    mean(M_hat^-2))``. Small when the gradient has weight where ``M`` is small (the usual case); large when the gradient lies where ``M`` is large and ``lambda`` is small,
    where the noise would dominate the step. Against measured errors: ``tests/test_preconditioner.py`` and
    ``scripts/rotation_precision.py`` (MiniLM: largest 0.243 estimated, 0.232 measured).
    """
    s, a = layer.basis_s.eigenvalues, layer.basis_a.eigenvalues
    m_inv2 = torch.outer(s, a).add_(result.damping).reciprocal_().square_().mean()  # one (out, in) temporary
    norm2 = global_square_norm([p.grad for p in layer.params if p.grad is not None], s.device)
    if diffs is not None:  # beta* = 0 for a layer without g1 - g2
        norm2 = norm2 + result.stats.beta.square() * global_square_norm([diffs[p] for p in layer.params if p in diffs], s.device)
    u = torch.finfo(dtype).eps / 2
    noise = result.stats.eta.abs() * (3**0.5 * u) * torch.sqrt(norm2 * m_inv2)
    return noise / torch.linalg.vector_norm(dir_hat).clamp_min(torch.finfo(torch.float32).tiny)


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
    layer: KFACLayer, config: FOPConfig, diffs: Optional[Dict[Tensor, Tensor]], dtype: Optional[torch.dtype] = None
) -> Tuple[Optional[LayerResult], Optional[Tensor]]:
    """``(result, direction in the eigenbasis (out, in))`` of ``layer`` for lr = 1; ``(None, None)`` without a basis.

    ``diffs``: ``{param: g1 - g2}`` selects FOP for the layers it holds; ``None`` (or a layer it lacks) gives K-FAC's
    ``M^-1 g_avg``. The KL term (with ``kl_clip``) is ``Delta^T M Delta`` = the KL split + ``lambda ||Delta||^2``
    (rotations keep norms). The rotations multiply in ``dtype`` (default :func:`rotation_dtype`); everything else is
    float32.
    """
    if layer.basis_a is None or layer.basis_s is None:
        return None, None
    w, b = layer.weight, layer.bias
    q_s, s = layer.basis_s.q, layer.basis_s.eigenvalues
    q_a, a = layer.basis_a.q, layer.basis_a.eigenvalues
    damping = layer_damping(config, s, a)
    dtype = rotation_dtype(config, layer) if dtype is None else dtype
    g_hat = rotate(layer_gradient(layer), q_s, q_a, dtype)
    if diffs is not None and (w in diffs or (b is not None and b in diffs)):
        d_w = diffs[w] if w in diffs else torch.zeros_like(w)
        d_hat = rotate(layer.grad_matrix(d_w, diffs.get(b) if b is not None else None), q_s, q_a, dtype)
        rounding = torch.finfo(dtype).eps if dtype != g_hat.dtype else None
        dir_hat, stats = fop_direction_eigen(
            g_hat, d_hat, s, a, damping, config.eps, config.use_beta, config.use_eta, config.projection_metric, rounding
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
