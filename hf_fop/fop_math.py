"""The FOP direction of one layer (FOP_SPEC eq. 3-7, 13, 16-18), as pure functions.

Two implementations of the same math:

* :func:`fop_direction_eigen` works in the Kronecker eigenbasis of
  ``M = A (x) S + lambda I``, where ``M`` is diagonal: ``M_hat[i, j] = s_i a_j + lambda``.
  Every inner product is an elementwise sum. This is what the optimizer runs.
* :func:`fop_direction_dense` builds nothing implicit: it takes the dense
  Fisher ``F`` (``n x n``) and vectors, and solves with ``M = F + lambda I``. It
  is the reference the fast version is tested against.

The projection of eq. (4)-(5) runs in one of :data:`PROJECTION_METRICS`:
``"damped"`` (``<.,.>_M``) or ``"fisher"`` (``<.,.>_F``, the undamped Kronecker
Fisher ``F_hat[i, j] = s_i a_j`` of the paper's Lemma 1). Both coefficients,
``beta*`` and ``eta*``, use ``M^-1`` in either case: they come from the
quadratic model of the step ``M^-1 g_comb`` that is actually taken.

The coefficients minimise the spec's local quadratic models (step
``Delta = -eta * M^-1 g_comb``):

* ``beta*`` minimises ``q(beta) = -<g_tot, g_comb(beta)>_{M^-1} + 1/2 ||g_comb(beta)||^2_{M^-1}``
  with ``g_tot = g1 + g2 = 2 g_avg`` (the paper's summed-loss gradient), giving ``beta* = D / E``;
* ``eta*`` minimises ``q(eta) = -eta <g_avg, g_comb>_{M^-1} + eta^2/2 ||g_comb||^2_{M^-1}``,
  giving ``eta* = <g_avg, g_comb>_{M^-1} / ||g_comb||^2_{M^-1}`` (1 when beta* = 0).

Shapes: a layer gradient is a matrix ``(out, in)`` (bias as the last input
column); ``s`` has shape ``(out,)`` and ``a`` shape ``(in,)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor


@dataclass
class LayerStats:
    """Per-layer scalars of one FOP step (0-dim tensors, kept on device until read).

    ``kl_base + kl_cross + kl_orth = ||F^1/2 Delta||^2`` for ``Delta = eta* M^-1 g_comb``
    (per unit learning rate squared), split as in the paper's KL-norm analysis.
    """

    beta: Tensor
    eta: Tensor
    s_proj: Tensor
    kl_base: Tensor
    kl_cross: Tensor
    kl_orth: Tensor


@dataclass
class LayerResult:
    """What every rank needs of one layer's step besides its direction (curvature specialists share it)."""

    stats: LayerStats
    damping: Union[float, Tensor]
    """lambda: a float (absolute damping) or a 0-dim tensor (relative)."""
    kl: Optional[Tensor]
    """``Delta^T M Delta`` of the layer's direction for lr = 1 (0-dim), ``None`` without a trust region."""


def rotate(g: Tensor, q_s: Tensor, q_a: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``Q_S^T G Q_A``: ``(out, in)`` gradient into the Kronecker eigenbasis. ``dtype`` (e.g. ``torch.bfloat16``):
    multiply the three in that dtype and return the product in ``g``'s dtype; ``None`` multiplies as given."""
    if dtype is None or dtype == g.dtype:
        return q_s.T @ g @ q_a
    return (q_s.to(dtype).T @ g.to(dtype) @ q_a.to(dtype)).to(g.dtype)


def unrotate(g_hat: Tensor, q_s: Tensor, q_a: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``Q_S G_hat Q_A^T``: back from the eigenbasis, shape ``(out, in)``; ``dtype`` as in :func:`rotate`."""
    if dtype is None or dtype == g_hat.dtype:
        return q_s @ g_hat @ q_a.T
    return (q_s.to(dtype) @ g_hat.to(dtype) @ q_a.to(dtype).T).to(g_hat.dtype)


def damped_eigenvalues(s: Tensor, a: Tensor, damping: float) -> Tensor:
    """``M_hat[i, j] = s_i a_j + lambda``, shape ``(out, in)``."""
    return torch.outer(s, a) + damping


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """``(x * y).sum()`` for same-shaped tensors, without the temporary product."""
    return torch.dot(x.reshape(-1), y.reshape(-1))


def _zero_if_tiny(num: Tensor, den: Tensor, scale: Tensor) -> Tensor:
    """``num / den``, or 0 where ``den`` is rounding noise relative to ``scale``."""
    tiny = torch.finfo(den.dtype).eps ** 2 * scale + torch.finfo(den.dtype).tiny
    return torch.where(den > tiny, num / torch.where(den > tiny, den, torch.ones_like(den)), torch.zeros_like(den))


PROJECTION_METRICS = ("damped", "fisher")
"""The metric of the projection, eq. (4)-(5): ``"damped"`` ``M = F + lambda I``, ``"fisher"`` the undamped ``F``."""


def projection_eigen(
    g_avg_hat: Tensor, g_diff_hat: Tensor, p_hat: Tensor, eps: float, scratch: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Eq. (4)-(5) in the eigenbasis: ``(s_proj, g_perp_hat)`` in the metric ``P`` that is diagonal there
    (``p_hat``, shape ``(out, in)``: ``M_hat`` or ``F_hat``). ``scratch``: an ``(out, in)`` buffer for ``P g_avg``
    (overwritten), to spare a fresh allocation.

    Lemma 1: ``<g_perp, g_avg>_P = eps * s_proj``.
    """
    p_avg = torch.mul(g_avg_hat, p_hat, out=scratch) if scratch is not None else g_avg_hat * p_hat  # P g_avg
    s_proj = _dot(g_diff_hat, p_avg) / (_dot(g_avg_hat, p_avg) + eps)
    return s_proj, torch.addcmul(g_diff_hat, g_avg_hat, s_proj, value=-1)


def in_fisher_range(n_f: Tensor, f_max: Tensor, n_euclid: Tensor) -> Tensor:
    """Whether ``g_avg`` is visible to ``F``: ``<g_avg, g_avg>_F > eps_mach * max eig(F) * ||g_avg||^2`` (0-dim bool).

    ``n_f``: ``<g_avg, g_avg>_F``; ``f_max``: ``F``'s largest eigenvalue; ``n_euclid``: ``||g_avg||^2``. At or below
    that bound ``g_avg`` lies in ``F``'s null space (e.g. a dead unit, a constant-zero input) or within float
    eigenvalue noise of it, and so does ``<g_diff, g_avg>_F`` (Cauchy-Schwarz): eq. (4) would divide noise by
    ``eps``. ``g_avg = 0`` is out of range.
    """
    return n_f > torch.finfo(n_f.dtype).eps * f_max * n_euclid


def fisher_projection_eigen(
    g_avg_hat: Tensor, g_diff_hat: Tensor, f_hat: Tensor, f_max: Tensor, eps: float, scratch: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Eq. (4)-(5) in the undamped ``F`` (``f_hat[i, j] = s_i a_j``, ``f_max`` its largest entry): ``(s_proj,
    g_perp_hat, visible)``. Where ``g_avg`` is not visible to ``F`` (:func:`in_fisher_range`), ``s_proj = 0`` and
    ``g_perp = g_diff`` (the caller then takes ``beta* = 0``). ``scratch``: as in :func:`projection_eigen`.

    Lemma 1: ``<g_perp, g_avg>_F = eps * s_proj`` (on the fallback both sides are 0 up to ``F``'s noise).
    """
    f_avg = torch.mul(g_avg_hat, f_hat, out=scratch) if scratch is not None else g_avg_hat * f_hat  # F g_avg
    n_f = _dot(g_avg_hat, f_avg)
    visible = in_fisher_range(n_f, f_max, _dot(g_avg_hat, g_avg_hat))
    s_proj = torch.where(visible, _dot(g_diff_hat, f_avg) / (n_f + eps), torch.zeros_like(n_f))
    return s_proj, torch.addcmul(g_diff_hat, g_avg_hat, s_proj, value=-1), visible


def fop_direction_eigen(
    g_avg_hat: Tensor,
    g_diff_hat: Tensor,
    s: Tensor,
    a: Tensor,
    damping: float,
    eps: float,
    use_beta: bool = True,
    use_eta: bool = True,
    projection_metric: str = "damped",
    rounding: Optional[float] = None,
) -> Tuple[Tensor, LayerStats]:
    """FOP direction ``eta* M^-1 g_comb`` in the eigenbasis (shape ``(out, in)``) and its stats.

    ``g_avg_hat`` and ``g_diff_hat`` are ``g_avg`` and ``g1 - g2`` already
    rotated by :func:`rotate`; ``s``/``a`` are the eigenvalues of S and A (>= 0,
    as the optimizer clamps them). ``projection_metric`` (one of
    :data:`PROJECTION_METRICS`) is the metric of eq. (4)-(5); with ``"fisher"``,
    ``beta* = 0`` where :func:`in_fisher_range` says ``g_avg`` is in F's null space.
    ``rounding``: relative precision of the rotated inputs when it is coarser than their dtype's (the epsilon of
    bfloat16 when :func:`rotate` multiplied in it): ``beta* = 0`` where ``||g_perp|| <= 4 rounding (||g_avg||^2 +
    ||g1 - g2||^2)^1/2`` (Euclidean, which the rotations keep), as ``g_perp`` is then rounding noise. Real sub-batch
    gradients have ``||g_perp||`` of the order of ``||g1 - g2||``; the test matters when ``g1 - g2`` is parallel to
    ``g_avg``, where ``M^-1`` would otherwise blow the noise up into a step.
    """
    if projection_metric not in PROJECTION_METRICS:
        raise ValueError(f"projection_metric={projection_metric!r} is invalid: expected one of {PROJECTION_METRICS}.")
    # Four (out, in) buffers, each written in place once its last reader is done (F_hat is recomputed into one when
    # needed, a cheap outer product): a fresh large tensor costs about as much as a product written into it.
    m_inv = torch.outer(s, a).add_(damping)  # M_hat until the projection is done, then M^-1 in place
    scratch = torch.empty_like(g_avg_hat)
    if projection_metric == "damped":
        s_proj, g_perp = projection_eigen(g_avg_hat, g_diff_hat, m_inv, eps, scratch)
        visible = None
    else:
        f_hat = torch.outer(s, a, out=scratch)  # F g_avg is then written over it
        s_proj, g_perp, visible = fisher_projection_eigen(g_avg_hat, g_diff_hat, f_hat, s.max() * a.max(), eps, scratch)
    m_inv.reciprocal_()  # one division pass, then products
    u = g_avg_hat * m_inv  # M^-1 g_avg
    w = torch.mul(g_perp, m_inv, out=scratch)  # M^-1 g_perp
    n_avg = _dot(g_avg_hat, u)
    d = _dot(g_avg_hat, w)
    e = _dot(g_perp, w)
    zero = torch.zeros_like(n_avg)
    # ||g_diff||^2_{M^-1} = e + 2 s_proj d + s_proj^2 n_avg (g_diff = g_perp + s_proj g_avg): the scale of rounding noise
    n_diff = e + 2 * s_proj * d + s_proj * s_proj * n_avg
    beta = _zero_if_tiny(d, e, n_avg + n_diff) if use_beta else zero
    if rounding is not None and use_beta:
        size = _dot(g_avg_hat, g_avg_hat) + _dot(g_diff_hat, g_diff_hat)
        beta = torch.where(_dot(g_perp, g_perp) > (4 * rounding) ** 2 * size, beta, zero)
    if visible is not None:  # F's null space: no F-orthogonal information, K-FAC's direction
        beta = torch.where(visible, beta, zero)
    if use_eta:
        eta = _zero_if_tiny(n_avg + beta * d, n_avg + 2 * beta * d + beta * beta * e, n_avg)
    else:
        eta = torch.ones_like(n_avg)
    eta2 = eta * eta
    f_u = torch.outer(s, a, out=m_inv).mul_(u)  # F M^-1 g_avg, in M^-1's buffer (done with)
    kl_base, kl_cross = eta2 * _dot(f_u, u), 2 * eta2 * beta * _dot(f_u, w)
    f_w = torch.outer(s, a, out=f_u).mul_(w)  # F M^-1 g_perp
    kl_orth = eta2 * beta * beta * _dot(f_w, w)
    stats = LayerStats(beta=beta, eta=eta, s_proj=s_proj, kl_base=kl_base, kl_cross=kl_cross, kl_orth=kl_orth)
    return u.addcmul_(w, beta).mul_(eta), stats  # eta (M^-1 g_avg + beta M^-1 g_perp), in u's buffer


def kfac_direction_eigen(g_avg_hat: Tensor, s: Tensor, a: Tensor, damping: float) -> Tuple[Tensor, LayerStats]:
    """K-FAC direction ``M^-1 g_avg`` in the eigenbasis, with the stats of beta = 0, eta = 1."""
    m_inv = torch.outer(s, a).add_(damping).reciprocal_()
    u = g_avg_hat * m_inv  # the same u as fop_direction_eigen's, bit for bit
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    kl_base = _dot(torch.outer(s, a, out=m_inv).mul_(u), u)  # F M^-1 g_avg in M^-1's buffer
    return u, LayerStats(beta=zero, eta=torch.ones_like(zero), s_proj=zero, kl_base=kl_base, kl_cross=zero, kl_orth=zero)


def fop_direction_dense(
    g1: Tensor,
    g2: Tensor,
    fisher: Tensor,
    damping: float,
    eps: float,
    w1: float = 0.5,
    projection_metric: str = "damped",
) -> Tuple[Tensor, LayerStats]:
    """Reference FOP direction from a dense Fisher.

    ``g1``, ``g2``: flat gradients ``(n,)``; ``fisher``: ``(n, n)`` undamped
    Fisher; ``g_avg = w1 g1 + (1 - w1) g2``; ``projection_metric``: eq. (4)-(5)
    in ``M = fisher + damping I`` (``"damped"``) or in ``fisher`` (``"fisher"``,
    with ``beta* = 0`` where :func:`in_fisher_range` fails). Returns
    ``eta* M^-1 g_comb`` ``(n,)`` and the stats, computed with explicit solves.
    """
    if projection_metric not in PROJECTION_METRICS:
        raise ValueError(f"projection_metric={projection_metric!r} is invalid: expected one of {PROJECTION_METRICS}.")
    m = fisher + damping * torch.eye(fisher.shape[0], dtype=fisher.dtype, device=fisher.device)
    g_avg = w1 * g1 + (1 - w1) * g2
    g_diff = g1 - g2
    metric = m if projection_metric == "damped" else fisher
    n_p = g_avg @ metric @ g_avg
    visible = projection_metric == "damped" or bool(in_fisher_range(n_p, torch.linalg.eigvalsh(fisher).max(), g_avg @ g_avg))
    s_proj = (g_diff @ metric @ g_avg) / (n_p + eps) if visible else torch.zeros_like(n_p)
    g_perp = g_diff - s_proj * g_avg
    minv_avg = torch.linalg.solve(m, g_avg)
    minv_perp = torch.linalg.solve(m, g_perp)
    d = g_avg @ minv_perp
    e = g_perp @ minv_perp
    n_diff = g_diff @ torch.linalg.solve(m, g_diff)
    beta = _zero_if_tiny(d, e, g_avg @ minv_avg + n_diff) if visible else torch.zeros_like(d)
    g_comb = g_avg + beta * g_perp
    minv_comb = torch.linalg.solve(m, g_comb)
    eta = (g_avg @ minv_comb) / (g_comb @ minv_comb)
    base = eta * minv_avg
    orth = eta * beta * minv_perp
    stats = LayerStats(
        beta=beta,
        eta=eta,
        s_proj=s_proj,
        kl_base=base @ fisher @ base,
        kl_cross=2 * base @ fisher @ orth,
        kl_orth=orth @ fisher @ orth,
    )
    return eta * minv_comb, stats


def kron_fisher(a_factor: Tensor, s_factor: Tensor) -> Tensor:
    """Dense ``A (x) S`` acting on the column-major ``vec`` of an ``(out, in)`` matrix."""
    return torch.kron(a_factor, s_factor)


def vec(g: Tensor) -> Tensor:
    """Column-major vectorisation of ``(out, in)``, matching :func:`kron_fisher`."""
    return g.T.reshape(-1)


def unvec(v: Tensor, shape: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`vec`."""
    return v.reshape(shape[1], shape[0]).T


def global_norm(tensors: List[Tensor], device: Optional[torch.device] = None) -> Tensor:
    """Euclidean norm over all ``tensors`` together (0-dim float32, no host sync; zero for none, on ``device``)."""
    if not tensors:
        return torch.zeros((), device=device)
    return torch.stack([n.float() for n in torch._foreach_norm(tensors)]).norm()


def global_square_norm(tensors: List[Tensor], device: Optional[torch.device] = None) -> Tensor:
    """Squared Euclidean norm over all ``tensors`` together (0-dim float32; zero for none, on ``device``)."""
    if not tensors:
        return torch.zeros((), device=device)
    return (torch.stack([n.float() for n in torch._foreach_norm(tensors)]) ** 2).sum()
