"""FOPConfig.projection_metric: eq. (4)-(5) in the damped M (``"damped"``) or in the undamped Kronecker Fisher F
(``"fisher"``, the paper's Lemma 1), each against a dense computation; Lemma 1 in each metric on the eigenbasis path
the optimizer runs; F's null space (beta* = 0); the step of MLP, sequence and Conv2d layers against dense oracles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_fop import FOP
from hf_fop.fop_math import (
    PROJECTION_METRICS,
    fop_direction_dense,
    fop_direction_eigen,
    kfac_direction_eigen,
    kron_fisher,
    rotate,
    unrotate,
    unvec,
    vec,
)

# (out, in, damping, eps, seed): layer shapes and damping regimes, one with an eps large enough to show in Lemma 1
CASES = [
    (3, 4, 1e-3, 1e-12, 0),
    (5, 2, 1e-1, 1e-12, 1),
    (6, 7, 1.0, 1e-8, 2),
    (4, 3, 1e-2, 0.5, 3),
]
CASE_IDS = [f"{o}x{i}-damping{d:g}-eps{e:g}" for o, i, d, e, _ in CASES]


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 2 * n, generator=gen, dtype=torch.float64)
    return x @ x.T / (2 * n)


def _problem(out: int, inp: int, seed: int):
    """Kronecker factors A ``(in, in)``, S ``(out, out)`` and two gradients ``(out, in)``, float64."""
    gen = torch.Generator().manual_seed(100 + seed)
    a_fac, s_fac = _spd(inp, gen), _spd(out, gen)
    g1, g2 = (torch.randn(out, inp, generator=gen, dtype=torch.float64) for _ in range(2))
    return a_fac, s_fac, g1, g2


def _eigen(a_fac, s_fac, g1, g2, damping, eps, metric):
    """The optimizer's path: rotate, :func:`fop_direction_eigen`, rotate back; ``(direction (out, in), stats)``."""
    ea, qa = torch.linalg.eigh(a_fac)
    es, qs = torch.linalg.eigh(s_fac)
    g_avg, g_diff = (g1 + g2) / 2, g1 - g2
    d_hat, stats = fop_direction_eigen(
        rotate(g_avg, qs, qa), rotate(g_diff, qs, qa), es.clamp_min(0), ea.clamp_min(0), damping, eps,
        projection_metric=metric,
    )
    return unrotate(d_hat, qs, qa), stats


def _metrics(a_fac, s_fac, damping):
    """Dense ``{"damped": M, "fisher": F}`` acting on ``vec`` of an ``(out, in)`` matrix."""
    fisher = kron_fisher(a_fac, s_fac)
    return {"damped": fisher + damping * torch.eye(len(fisher), dtype=fisher.dtype), "fisher": fisher}


@pytest.mark.parametrize("metric", PROJECTION_METRICS)
@pytest.mark.parametrize("out,inp,damping,eps,seed", CASES, ids=CASE_IDS)
def test_lemma1_holds_in_the_chosen_metric_on_the_eigenbasis_path(metric, out, inp, damping, eps, seed):
    """<g_perp, g_avg>_P = eps * s_proj with P the chosen metric, for the s_proj the eigenbasis path returns; and not in
    the other metric (the two projections differ on these problems)."""
    a_fac, s_fac, g1, g2 = _problem(out, inp, seed)
    _, stats = _eigen(a_fac, s_fac, g1, g2, damping, eps, metric)
    g_avg, g_diff = vec((g1 + g2) / 2), vec(g1 - g2)
    g_perp = g_diff - stats.s_proj * g_avg
    dense = _metrics(a_fac, s_fac, damping)
    other = "fisher" if metric == "damped" else "damped"
    scale = (g_diff @ dense[metric] @ g_avg).abs() + (g_avg @ dense[metric] @ g_avg) * stats.s_proj.abs()
    inner = g_perp @ dense[metric] @ g_avg
    assert torch.allclose(inner, eps * stats.s_proj, rtol=1e-9, atol=1e-12 * scale), (float(inner), float(eps * stats.s_proj))
    off = g_perp @ dense[other] @ g_avg - eps * stats.s_proj  # = +-damping <g_perp, g_avg> (Euclidean)
    assert off.abs() > 1e-6 * scale, float(off)


@pytest.mark.parametrize("metric", PROJECTION_METRICS)
@pytest.mark.parametrize("out,inp,damping,eps,seed", CASES, ids=CASE_IDS)
def test_eigenbasis_equals_dense_reference_in_each_metric(metric, out, inp, damping, eps, seed):
    a_fac, s_fac, g1, g2 = _problem(out, inp, seed)
    fisher = kron_fisher(a_fac, s_fac)
    ref, ref_stats = fop_direction_dense(vec(g1), vec(g2), fisher, damping, eps, projection_metric=metric)
    fast, stats = _eigen(a_fac, s_fac, g1, g2, damping, eps, metric)
    assert torch.allclose(vec(fast), ref, rtol=1e-9, atol=1e-12 * ref.abs().max())
    for name in ("beta", "eta", "s_proj", "kl_base", "kl_cross", "kl_orth"):
        assert torch.allclose(getattr(stats, name), getattr(ref_stats, name), rtol=1e-7, atol=1e-12), name
    f32, f32_stats = _eigen(*(t.float() for t in (a_fac, s_fac, g1, g2)), damping, eps, metric)  # the optimizer's dtype
    assert torch.allclose(vec(f32).double(), ref, rtol=2e-4, atol=2e-5 * ref.abs().max())
    assert torch.allclose(f32_stats.beta.double(), ref_stats.beta, rtol=2e-3, atol=1e-6)
    # the cases tell the metrics apart: the other metric's reference is far outside the float64 tolerance
    other, _ = fop_direction_dense(vec(g1), vec(g2), fisher, damping, eps, projection_metric=PROJECTION_METRICS[metric == "damped"])
    assert (other - ref).abs().max() > 1e-6 * ref.abs().max()


def test_beta_and_eta_keep_the_m_inverse_quadratic_models_in_the_fisher_metric():
    """With the F projection, beta* = D/E and eta* minimise the same M^-1 models as before (only g_perp changes)."""
    a_fac, s_fac, g1, g2 = _problem(4, 5, 7)
    damping, eps = 3e-2, 1e-12
    m, fisher = _metrics(a_fac, s_fac, damping).values()
    minv = torch.linalg.inv(m)
    g_avg, g_diff = vec((g1 + g2) / 2), vec(g1 - g2)
    g_perp = g_diff - (g_diff @ fisher @ g_avg) / (g_avg @ fisher @ g_avg + eps) * g_avg
    beta = (g_avg @ minv @ g_perp) / (g_perp @ minv @ g_perp)  # stationary point of -<2 g_avg, g_comb> + |g_comb|^2 / 2
    g_comb = g_avg + beta * g_perp
    eta = (g_avg @ minv @ g_comb) / (g_comb @ minv @ g_comb)
    _, stats = _eigen(a_fac, s_fac, g1, g2, damping, eps, "fisher")
    assert torch.allclose(stats.beta, beta, rtol=1e-9) and torch.allclose(stats.eta, eta, rtol=1e-9)


def test_heavy_damping_makes_the_damped_projection_euclidean_but_not_the_fisher_one():
    """The issue's point: as lambda grows, <.,.>_M / lambda tends to the Euclidean product, while <.,.>_F keeps the
    curvature's shape (its s_proj does not depend on lambda at all)."""
    a_fac, s_fac, g1, g2 = _problem(5, 4, 9)
    g_avg, g_diff = vec((g1 + g2) / 2), vec(g1 - g2)
    euclid = float((g_diff @ g_avg) / (g_avg @ g_avg))
    fisher = kron_fisher(a_fac, s_fac)
    curved = float((g_diff @ fisher @ g_avg) / (g_avg @ fisher @ g_avg))
    assert abs(euclid - curved) > 0.05
    for damping in (1e-3, 1.0, 1e6):
        _, damped = _eigen(a_fac, s_fac, g1, g2, damping, 0.0, "damped")
        _, fisher_stats = _eigen(a_fac, s_fac, g1, g2, damping, 0.0, "fisher")
        assert fisher_stats.s_proj.item() == pytest.approx(curved, rel=1e-9)
    assert damped.s_proj.item() == pytest.approx(euclid, rel=1e-5)


# ------------------------------------------------------------------ null space
NULL_SPACE = [  # (name, dtype, eps, s_0): s_0 the eigenvalue of S whose row holds g_avg
    ("exact zero, eps 0", torch.float64, 0.0, 0.0),
    ("exact zero, eps 1e-12", torch.float32, 1e-12, 0.0),
    ("within float32 eigenvalue noise", torch.float32, 1e-12, 1e-9),
]


@pytest.mark.parametrize("name,dtype,eps,s0", NULL_SPACE, ids=[n for n, *_ in NULL_SPACE])
def test_g_avg_in_the_fisher_null_space_falls_back_to_beta_zero(name, dtype, eps, s0):
    """F_hat[0, :] = s_0 a = 0 and g_avg lives in row 0: <g_avg, g_avg>_F = 0, so the F projection carries nothing:
    beta* = 0, s_proj = 0, eta* = 1, K-FAC's direction, finite even with eps = 0; the dense reference agrees."""
    s = torch.tensor([s0, 1.5, 2.0], dtype=dtype)
    a = torch.tensor([0.5, 1.0, 3.0, 0.2], dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    g_avg = torch.zeros(3, 4, dtype=dtype)
    g_avg[0] = torch.randn(4, generator=gen, dtype=dtype)
    g_diff = torch.randn(3, 4, generator=gen, dtype=dtype)
    damping = 1e-2
    direction, stats = fop_direction_eigen(g_avg, g_diff, s, a, damping, eps, projection_metric="fisher")
    kfac, _ = kfac_direction_eigen(g_avg, s, a, damping)
    assert torch.isfinite(direction).all()
    assert stats.beta.item() == 0.0 and stats.s_proj.item() == 0.0 and stats.eta.item() == 1.0
    assert torch.equal(direction, kfac)
    # without the fallback g_perp would be g_diff (s_proj = 0 / eps) and beta* = <g_avg, g_diff>_M^-1 / ||g_diff||^2_M^-1
    m_inv = 1 / (torch.outer(s, a) + damping)
    assert abs(((g_avg * m_inv * g_diff).sum() / (g_diff * m_inv * g_diff).sum()).item()) > 1e-2
    # the damped metric agrees with the fallback: M = lambda I on g_avg's row, so M-orthogonal is M^-1-orthogonal
    _, damped = fop_direction_eigen(g_avg, g_diff, s, a, damping, eps, projection_metric="damped")
    assert abs(damped.beta.item()) < 1e-5
    # dense reference in the same precision: F = diag(F_hat) in this (identity) eigenbasis
    fisher = kron_fisher(torch.diag(a), torch.diag(s))
    g1, g2 = vec(g_avg + g_diff / 2), vec(g_avg - g_diff / 2)
    ref, ref_stats = fop_direction_dense(g1, g2, fisher, damping, eps, projection_metric="fisher")
    assert ref_stats.beta.item() == 0.0 and ref_stats.s_proj.item() == 0.0
    assert torch.allclose(vec(direction), ref, rtol=1e-5)


def test_g_avg_partly_in_the_null_space_is_projected_on_its_visible_part():
    """Only the F-visible part of g_avg counts: Lemma 1 in F holds and beta* is the ordinary D/E."""
    s = torch.tensor([0.0, 1.5, 2.0], dtype=torch.float64)
    a = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    g_avg, g_diff = torch.randn(3, 3, generator=gen, dtype=torch.float64), torch.randn(3, 3, generator=gen, dtype=torch.float64)
    _, stats = fop_direction_eigen(g_avg, g_diff, s, a, 1e-2, 0.0, projection_metric="fisher")
    f_hat = torch.outer(s, a)
    assert abs(stats.beta.item()) > 1e-3
    assert (f_hat * (g_diff - stats.s_proj * g_avg) * g_avg).sum().abs() < 1e-12


def test_unknown_metric_is_named():
    g = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"projection_metric='euclidean' is invalid: expected one of \('damped', 'fisher'\)"):
        fop_direction_eigen(g, g, torch.ones(2), torch.ones(2), 1e-2, 1e-12, projection_metric="euclidean")
    with pytest.raises(ValueError, match="projection_metric='euclidean'"):
        fop_direction_dense(g.reshape(-1), g.reshape(-1), torch.eye(4), 1e-2, 1e-12, projection_metric="euclidean")


# --------------------------------------------------------- optimizer steps
class SeqModel(nn.Module):
    """Token-wise Linear layers on ``(B, T, 3)``: logits ``(B, T, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)))


def _mlp():
    """A 2-layer MLP and a draw of ``n`` examples ``(x (n, 4), y (n,))``."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return model, lambda n, g: (torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def _sequence():
    """Token-wise Linear layers and ``(x (n, 6, 3), y (n, 6))``."""
    return SeqModel(), lambda n, g: (torch.randn(n, 6, 3, generator=g), torch.randint(0, 2, (n, 6), generator=g))


def _conv():
    """Conv2d then Linear and ``(x (n, 2, 5, 5), y (n,))``."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3))
    return model, lambda n, g: (torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, mean over examples (summed over the positions of a sequence)."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1).mean()
    return F.cross_entropy(logits, y)


MODELS = {"mlp": _mlp, "sequence": _sequence, "conv2d": _conv}


@pytest.mark.parametrize("metric", PROJECTION_METRICS)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fop_step_equals_the_dense_oracle_in_each_metric(kind, metric):
    """One FOP step on two sub-batches: every layer's update is lr * (dense FOP direction from its Kronecker factors,
    projected in ``metric``); the logged beta*, eta*, s_proj are the oracle's, and Lemma 1 holds in ``metric`` for the
    logged s_proj (and fails in the other metric: the metrics give different steps here)."""
    torch.manual_seed(11)
    model, draw = MODELS[kind]()
    gen = torch.Generator().manual_seed(12)
    batches = [draw(8, gen) for _ in range(2)]
    batches[1] = (batches[1][0] + 0.5, batches[1][1])  # shifted inputs: g1 - g2 is far from parallel to g_avg
    grads = []
    for x, y in batches:  # the sub-batch gradients, by plain autograd before FOP hooks the model
        model.zero_grad()
        _loss(model(x), y).backward()
        grads.append({p: p.grad.clone() for p in model.parameters()})
    model.zero_grad()
    before = {p: p.detach().clone() for p in model.parameters()}
    lr, damping = 0.3, 0.5  # damping comparable to F's eigenvalues: the two metrics give clearly different steps
    opt = FOP(model, lr=lr, damping=damping, factor_decay=0.0, momentum=0.0, kl_clip=None, projection_metric=metric)
    for k, (x, y) in enumerate(batches):
        with opt.sub_batch(k):
            _loss(model(x), y).backward()
    opt.step()
    diag = opt.diagnostics()
    assert diag["fallback"] == 0.0 and len(opt.layers) == 2
    for layer in opt.layers:
        w, b = layer.weight, layer.bias
        g1, g2 = (layer.grad_matrix(g[w], g[b]).double() for g in grads)
        fisher = kron_fisher(layer.A, layer.S).double()  # the factors this step preconditioned with
        delta, ref = fop_direction_dense(vec(g1), vec(g2), fisher, damping, 1e-12, projection_metric=metric)
        dw, db = layer.split_matrix(unvec(-lr * delta, g1.shape).float())
        for p, d in ((w, dw), (b, db)):
            expected = before[p] + d
            assert torch.allclose(p.detach(), expected, rtol=1e-4, atol=1e-5 * (1 + expected.abs().max())), (layer.name, metric)
        for name in ("beta", "eta", "s_proj"):
            assert math.isclose(diag[f"{layer.name}/{name}"], float(getattr(ref, name)), rel_tol=2e-3, abs_tol=1e-6), name
        dense = _metrics(layer.A.double(), layer.S.double(), damping)
        g_avg, g_diff = vec((g1 + g2) / 2), vec(g1 - g2)
        s_proj = diag[f"{layer.name}/s_proj"]
        scale = (g_diff @ dense[metric] @ g_avg).abs()
        other = "fisher" if metric == "damped" else "damped"
        assert ((g_diff - s_proj * g_avg) @ dense[metric] @ g_avg).abs() < 1e-5 * scale
        assert ((g_diff - s_proj * g_avg) @ dense[other] @ g_avg).abs() > 1e-4 * scale
