"""FOP math against exact references: Lemma 1, beta*/eta* as minimisers, eigenbasis == dense."""

import pytest
import torch

from hf_fop.fop_math import (
    damped_eigenvalues,
    fop_direction_dense,
    fop_direction_eigen,
    kfac_direction_eigen,
    kron_fisher,
    projection_eigen,
    rotate,
    unrotate,
    unvec,
    vec,
)

# (out, in, damping, eps): layers of different shapes and damping regimes.
CASES = [
    (3, 4, 1e-3, 1e-12),
    (5, 2, 1e-1, 1e-12),
    (6, 7, 1.0, 1e-8),
    (1, 5, 1e-2, 1e-12),
]


def _spd(n: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(n, 2 * n, generator=gen, dtype=dtype)
    return x @ x.T / (2 * n)


def _problem(out: int, inp: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    a_fac, s_fac = _spd(inp, gen, dtype), _spd(out, gen, dtype)
    g1 = torch.randn(out, inp, generator=gen, dtype=dtype)
    g2 = torch.randn(out, inp, generator=gen, dtype=dtype)
    return a_fac, s_fac, g1, g2


def _eigen_direction(a_fac, s_fac, g1, g2, damping, eps, **kw):
    ea, qa = torch.linalg.eigh(a_fac)
    es, qs = torch.linalg.eigh(s_fac)
    g_avg, g_diff = (g1 + g2) / 2, g1 - g2
    d_hat, stats = fop_direction_eigen(rotate(g_avg, qs, qa), rotate(g_diff, qs, qa), es, ea, damping, eps, **kw)
    return unrotate(d_hat, qs, qa), stats


@pytest.mark.parametrize("out,inp,damping,eps", CASES + [(4, 3, 1e-2, 0.5)])
def test_lemma1_m_orthogonality_on_the_eigenbasis_path(out, inp, damping, eps):
    """g_perp as the optimizer computes it (eigenbasis, diagonal M_hat), checked against the dense M."""
    a_fac, s_fac, g1, g2 = _problem(out, inp, seed=out * 10 + inp)
    ea, qa = torch.linalg.eigh(a_fac)
    es, qs = torch.linalg.eigh(s_fac)
    g_avg, g_diff = (g1 + g2) / 2, g1 - g2
    s_proj, g_perp_hat = projection_eigen(
        rotate(g_avg, qs, qa), rotate(g_diff, qs, qa), damped_eigenvalues(es, ea, damping), eps
    )
    g_perp = unrotate(g_perp_hat, qs, qa)
    m = kron_fisher(a_fac, s_fac) + damping * torch.eye(out * inp, dtype=torch.float64)
    # Lemma 1 with the dense M: <g_perp, g_avg>_M = eps * s_proj, and g_perp = g_diff - s_proj g_avg
    inner = vec(g_perp) @ m @ vec(g_avg)
    scale = (vec(g_diff) @ m @ vec(g_avg)).abs()
    assert torch.allclose(inner, eps * s_proj, rtol=1e-9, atol=1e-12 * scale), (float(inner), float(eps * s_proj))
    assert torch.allclose(g_perp, g_diff - s_proj * g_avg, rtol=1e-10, atol=1e-12)
    assert eps < 0.1 or (eps * s_proj).abs() > 1e-6 * scale  # the large-eps case makes the eps term visible


@pytest.mark.parametrize("out,inp,damping,eps", CASES)
def test_eigenbasis_equals_dense_reference(out, inp, damping, eps):
    a_fac, s_fac, g1, g2 = _problem(out, inp, seed=7 + out)
    ref, ref_stats = fop_direction_dense(vec(g1), vec(g2), kron_fisher(a_fac, s_fac), damping, eps)
    # the fast path runs in float32 in the optimizer: check agreement to float32 precision
    f32 = [t.float() for t in (a_fac, s_fac, g1, g2)]
    fast, stats = _eigen_direction(*f32, damping, eps)
    assert torch.allclose(vec(fast).double(), ref, rtol=2e-4, atol=2e-5 * ref.abs().max())
    for name in ("beta", "eta", "s_proj", "kl_base", "kl_cross", "kl_orth"):
        a, b = getattr(stats, name).double(), getattr(ref_stats, name)
        assert torch.allclose(a, b, rtol=2e-3, atol=1e-6 * (1 + b.abs())), name
    # and in float64 to rounding
    fast64, _ = _eigen_direction(a_fac, s_fac, g1, g2, damping, eps)
    assert torch.allclose(vec(fast64), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("out,inp,damping,eps", CASES)
def test_beta_star_minimises_quadratic_model(out, inp, damping, eps):
    a_fac, s_fac, g1, g2 = _problem(out, inp, seed=99 + inp)
    fisher = kron_fisher(a_fac, s_fac)
    m = fisher + damping * torch.eye(out * inp, dtype=torch.float64)
    minv = torch.linalg.inv(m)
    g1v, g2v = vec(g1), vec(g2)
    g_avg, g_diff, g_tot = (g1v + g2v) / 2, g1v - g2v, g1v + g2v
    s_proj = (g_diff @ m @ g_avg) / (g_avg @ m @ g_avg + eps)
    g_perp = g_diff - s_proj * g_avg

    def q_beta(beta):  # the paper's model: gradient g_tot, step M^-1 g_comb
        g_comb = g_avg + beta * g_perp
        return -(g_tot @ minv @ g_comb) + 0.5 * (g_comb @ minv @ g_comb)

    _, stats = fop_direction_dense(g1v, g2v, fisher, damping, eps)
    # independent minimiser: Newton-free fine scan around the autograd-free closed form is circular,
    # so scan a wide grid and refine by golden-section search.
    grid = torch.linspace(-50, 50, 20001, dtype=torch.float64)
    values = torch.stack([q_beta(b) for b in grid])
    best = grid[values.argmin()]
    lo, hi = best - 0.01, best + 0.01
    for _ in range(80):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if q_beta(m1) < q_beta(m2):
            hi = m2
        else:
            lo = m1
    assert torch.allclose(stats.beta, (lo + hi) / 2, atol=1e-6)
    _, fast = _eigen_direction(a_fac, s_fac, g1, g2, damping, eps)
    assert torch.allclose(fast.beta, stats.beta, rtol=1e-8)


@pytest.mark.parametrize("out,inp,damping,eps", CASES)
def test_eta_star_minimises_quadratic_model_by_autograd(out, inp, damping, eps):
    a_fac, s_fac, g1, g2 = _problem(out, inp, seed=3 * out + inp)
    _, stats = _eigen_direction(a_fac, s_fac, g1, g2, damping, eps)
    m = kron_fisher(a_fac, s_fac) + damping * torch.eye(out * inp, dtype=torch.float64)
    minv = torch.linalg.inv(m)
    g_avg = vec((g1 + g2) / 2)
    g_diff = vec(g1 - g2)
    s_proj = (g_diff @ m @ g_avg) / (g_avg @ m @ g_avg + eps)
    g_comb = g_avg + stats.beta * (g_diff - s_proj * g_avg)
    eta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([eta], lr=1, max_iter=100, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        q = -eta * (g_avg @ minv @ g_comb) + 0.5 * eta**2 * (g_comb @ minv @ g_comb)
        q.backward()
        return q

    opt.step(closure)
    assert torch.allclose(stats.eta, eta.detach(), rtol=1e-7)


def test_equal_gradients_give_exact_kfac_step():
    a_fac, s_fac, g1, _ = _problem(4, 6, seed=5, dtype=torch.float32)
    ea, qa = torch.linalg.eigh(a_fac)
    es, qs = torch.linalg.eigh(s_fac)
    g_hat = rotate(g1, qs, qa)
    fop_dir, stats = fop_direction_eigen(g_hat, torch.zeros_like(g_hat), es, ea, 1e-3, 1e-12)
    kfac_dir, kfac_stats = kfac_direction_eigen(g_hat, es, ea, 1e-3)
    assert torch.equal(fop_dir, kfac_dir)
    assert stats.beta.item() == 0.0 and stats.eta.item() == 1.0
    # and K-FAC's direction is M^-1 g (dense solve), its KL term u^T F u
    fisher = kron_fisher(a_fac.double(), s_fac.double())
    m = fisher + 1e-3 * torch.eye(24, dtype=torch.float64)
    expected = unvec(torch.linalg.solve(m, vec(g1.double())), (4, 6))
    assert torch.allclose(unrotate(kfac_dir, qs, qa).double(), expected, rtol=1e-3, atol=1e-4 * expected.abs().max())
    kl = vec(expected) @ fisher @ vec(expected)
    assert torch.allclose(kfac_stats.kl_base.double(), kl, rtol=1e-3)
    assert torch.equal(kfac_stats.kl_base, stats.kl_base)  # FOP with beta* = 0 splits the same KL norm
    assert kfac_stats.kl_cross.item() == kfac_stats.kl_orth.item() == 0.0


def test_parallel_difference_gives_zero_beta():
    """g_diff parallel to g_avg: g_perp vanishes (up to eps) and beta* = 0, eta* = 1."""
    a_fac, s_fac, g, _ = _problem(3, 5, seed=11)
    g1, g2 = 1.3 * g, 0.7 * g  # g_diff = 0.6 g = 0.6 g_avg
    d, stats = _eigen_direction(a_fac, s_fac, g1, g2, 1e-2, 0.0)
    assert stats.beta.item() == 0.0
    assert stats.eta.item() == 1.0
    assert torch.allclose(stats.s_proj, torch.tensor(0.6, dtype=torch.float64))
    e_kfac, _ = _eigen_direction(a_fac, s_fac, g, g, 1e-2, 0.0)
    assert torch.allclose(d, e_kfac)


@pytest.mark.parametrize("out,inp,damping,eps", CASES)
def test_kl_terms_split_the_update_norm(out, inp, damping, eps):
    a_fac, s_fac, g1, g2 = _problem(out, inp, seed=21 + out)
    fisher = kron_fisher(a_fac, s_fac)
    d, stats = fop_direction_dense(vec(g1), vec(g2), fisher, damping, eps)
    total = d @ fisher @ d
    assert torch.allclose(stats.kl_base + stats.kl_cross + stats.kl_orth, total, rtol=1e-9)
    _, fast = _eigen_direction(a_fac, s_fac, g1, g2, damping, eps)
    for name in ("kl_base", "kl_cross", "kl_orth"):
        assert torch.allclose(getattr(fast, name), getattr(stats, name), rtol=1e-7, atol=1e-14)


def test_switches_use_beta_and_use_eta():
    a_fac, s_fac, g1, g2 = _problem(4, 3, seed=2)
    d_nobeta, st = _eigen_direction(a_fac, s_fac, g1, g2, 1e-2, 1e-12, use_beta=False)
    d_kfac, _ = _eigen_direction(a_fac, s_fac, (g1 + g2) / 2, (g1 + g2) / 2, 1e-2, 1e-12)
    assert st.beta.item() == 0.0 and torch.allclose(d_nobeta, d_kfac)
    d_full, st_full = _eigen_direction(a_fac, s_fac, g1, g2, 1e-2, 1e-12)
    d_noeta, st_noeta = _eigen_direction(a_fac, s_fac, g1, g2, 1e-2, 1e-12, use_eta=False)
    assert st_noeta.eta.item() == 1.0
    assert torch.allclose(d_full, st_full.eta * d_noeta)


def test_damped_eigenvalues_and_vec_roundtrip():
    s, a = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0, 1.0])
    assert torch.equal(damped_eigenvalues(s, a, 0.5), torch.tensor([[3.5, 0.5, 1.5], [6.5, 0.5, 2.5]]))
    g = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(unvec(vec(g), (2, 3)), g)
    # kron_fisher acts as (A (x) S) vec(G) = vec(S G A)
    gen = torch.Generator().manual_seed(0)
    a_fac, s_fac = _spd(3, gen), _spd(2, gen)
    gd = g.double()
    assert torch.allclose(kron_fisher(a_fac, s_fac) @ vec(gd), vec(s_fac @ gd @ a_fac))


@pytest.mark.parametrize("metric", ["damped", "fisher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigenbasis_directions_leave_their_inputs_alone(metric, dtype):
    """The eigenbasis math works in buffers of its own: the rotated gradients and eigenvalues it was given (the
    optimizer reuses them) come back unchanged, and the direction is a new tensor."""
    gen = torch.Generator().manual_seed(21)
    g_avg, g_diff = torch.randn(5, 7, generator=gen, dtype=dtype), torch.randn(5, 7, generator=gen, dtype=dtype)
    s, a = torch.rand(5, generator=gen, dtype=dtype), torch.rand(7, generator=gen, dtype=dtype)
    inputs = [t.clone() for t in (g_avg, g_diff, s, a)]
    direction, _ = fop_direction_eigen(g_avg, g_diff, s, a, 1e-2, 1e-12, projection_metric=metric)
    kfac, _ = kfac_direction_eigen(g_avg, s, a, 1e-2)
    for given, kept in zip((g_avg, g_diff, s, a), inputs):
        assert torch.equal(given, kept)
    for out in (direction, kfac):
        assert all(out.data_ptr() != t.data_ptr() for t in (g_avg, g_diff, s, a))
