"""hf_fop.preconditioner against hand computations: lambda, the layer direction in the eigenbasis, the trust region."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_fop import FOP, FOPConfig
from hf_fop.fop_math import fop_direction_eigen, kfac_direction_eigen, rotate, unrotate
from hf_fop import preconditioner
from hf_fop.preconditioner import (
    BFLOAT16_MIN_SPEEDUP,
    ROTATION_ERROR_LIMIT,
    bfloat16_speedup,
    kl_clip_scale,
    layer_damping,
    layer_direction,
    layer_gradient,
    native_bfloat16,
    pin_native_bfloat16,
    resolve_rotation_dtype,
    rotation_dtype,
    rotation_error,
    timed_bfloat16_devices,
)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_direction_rotates_the_layers_gradients_and_adds_its_kl_term(dtype):
    # the rotations multiply in rotation_dtype; with bfloat16, beta* treats g_perp below its rounding as noise
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = FOP(model, lr=0.1, damping=0.05, rotation_dtype=str(dtype).split(".")[1])
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    for k in (0, 1):
        with opt.sub_batch(k):
            F.mse_loss(model(x[4 * k : 4 * k + 4]), y[4 * k : 4 * k + 4]).backward()
    layer = opt.layers[0]
    opt.engine.update_factors(opt.engine.finalize_capture())
    opt.distributor.refresh_bases(opt._plan.units)
    qs, s, qa, a = layer.basis_s.q, layer.basis_s.eigenvalues, layer.basis_a.q, layer.basis_a.eigenvalues
    g_hat = rotate(layer_gradient(layer), qs, qa, dtype)
    diffs = opt.grads.diff
    d_hat = rotate(layer.grad_matrix(diffs[layer.weight], diffs[layer.bias]), qs, qa, dtype)
    result, direction = layer_direction(layer, opt.config, diffs)
    rounding = torch.finfo(dtype).eps if dtype != torch.float32 else None
    expected, stats = fop_direction_eigen(g_hat, d_hat, s, a, 0.05, opt.config.eps, rounding=rounding)
    torch.testing.assert_close(direction, expected)
    torch.testing.assert_close(result.stats.beta, stats.beta)
    kl = stats.kl_base + stats.kl_cross + stats.kl_orth + 0.05 * expected.square().sum()
    torch.testing.assert_close(result.kl, kl)
    _, kfac = layer_direction(layer, opt.config, None)  # no g1 - g2: K-FAC's M^-1 g_avg
    torch.testing.assert_close(kfac, kfac_direction_eigen(g_hat, s, a, 0.05)[0])


@pytest.mark.parametrize(
    "setting, native, metric, min_dim, expected",
    [("auto", True, "damped", 256, torch.bfloat16), ("auto", True, "damped", 255, torch.float32),
     ("auto", False, "damped", 3072, torch.float32), ("bfloat16", False, "damped", 8, torch.bfloat16),
     ("float32", True, "damped", 3072, torch.float32), ("auto", True, "fisher", 3072, torch.float32),
     ("bfloat16", True, "fisher", 3072, torch.float32)],
)  # fmt: skip
def test_rotation_dtype_follows_the_setting_the_hardware_the_width_and_the_metric(setting, native, metric, min_dim, expected):
    assert resolve_rotation_dtype(setting, native, metric, min_dim) == expected


@pytest.fixture
def cpu_answer():
    """Restores this process's answer of ``native_bfloat16`` for the CPU after a test that pins or re-probes it."""
    cpu = torch.device("cpu")
    saved = preconditioner._NATIVE_BFLOAT16.get(cpu)
    yield cpu
    preconditioner._NATIVE_BFLOAT16.pop(cpu, None)
    if saved is not None:
        pin_native_bfloat16(cpu, saved)


def test_rotation_dtype_auto_follows_the_pinned_answer(cpu_answer):
    opt = FOP(nn.Sequential(nn.Linear(300, 256), nn.Linear(256, 10)))
    wide, narrow = opt.layers
    assert timed_bfloat16_devices(opt.config, opt.layers) == [cpu_answer]  # the wide layer hangs on the timing
    assert timed_bfloat16_devices(opt.config.replace(rotation_dtype="bfloat16"), opt.layers) == []
    assert timed_bfloat16_devices(opt.config, [narrow]) == []
    for answer, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        pin_native_bfloat16(cpu_answer, answer)
        assert (rotation_dtype(opt.config, wide), rotation_dtype(opt.config, narrow)) == (dtype, torch.float32)
        assert rotation_dtype(opt.config.replace(rotation_dtype="float32"), wide) == torch.float32


def test_a_cpu_multiplies_in_bfloat16_where_the_probe_finds_it_faster_not_where_its_instruction_set_allows(cpu_answer):
    """AVX512-BF16 alone does not make bfloat16 faster (one of this project's CPUs rotates 2x slower in it)."""
    speedup = bfloat16_speedup(cpu_answer)
    assert 0 < speedup < float("inf")
    if 0.9 * BFLOAT16_MIN_SPEEDUP < speedup < 1.1 * BFLOAT16_MIN_SPEEDUP:
        pytest.skip(f"the probe's speedup {speedup:.2f} is too close to the threshold to decide twice alike")
    preconditioner._NATIVE_BFLOAT16.pop(cpu_answer, None)  # probe afresh
    isa = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bfloat16(cpu_answer) == (isa and speedup >= BFLOAT16_MIN_SPEEDUP)


def _two_sub_batch_layer(rotation: str, case: str):
    """A 48 -> 40 Linear layer with factors and eigenbases, holding two sub-batch gradients of 64 rows each.

    ``"spread"``: factors from one batch, gradients from the next (as on every step that captures nothing), so the
    gradient has weight where the curvature is small; ``"aligned"``: the gradients of the very rows the factors came
    from, with correlated inputs and lambda = 1e-3, so the gradient lies where ``M`` is large and rounding noise
    elsewhere would dominate the step; ``"parallel"``: like ``"aligned"``, with the second sub-batch the first with its
    targets doubled, so ``g2 = 2 g1`` and ``g1 - g2`` is parallel to ``g_avg``.
    """
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(48, 40, bias=False))
    opt = FOP(model, lr=0.1, damping=1e-2 if case == "spread" else 1e-3, rotation_dtype=rotation, kl_clip=None)
    mix = torch.eye(48) if case == "spread" else torch.randn(48, 48)
    batches = [(torch.randn(128, 48) @ mix, torch.randn(128, 40)) for _ in range(2)]
    if case == "parallel":
        nn.init.zeros_(model[0].weight)  # the output is 0, so the MSE gradient is linear in the targets
        x, y = batches[1]
        batches[1] = (torch.cat([x[:64], x[:64]]), torch.cat([y[:64], 2 * y[:64]]))

    def passes(x, y):
        for k in (0, 1):
            with opt.sub_batch(k):
                F.mse_loss(model(x[64 * k : 64 * k + 64]), y[64 * k : 64 * k + 64], reduction="sum").backward()

    if case == "spread":
        passes(*batches[0])  # step 0 captures the factors and decomposes them
        opt.step()
        opt.zero_grad()
        passes(*batches[1])
    else:
        passes(*batches[1])
        opt.engine.update_factors(opt.engine.finalize_capture())
        opt.distributor.refresh_bases(opt._plan.units)
    return opt, opt.layers[0]


@pytest.mark.parametrize("case", ["spread", "aligned"])
def test_rotation_error_estimates_the_error_of_bfloat16_rotations(case):
    opt, layer = _two_sub_batch_layer("float32", case)
    diffs = opt.grads.diff
    exact, direction = layer_direction(layer, opt.config, diffs, torch.float32)
    low, low_direction = layer_direction(layer, opt.config, diffs, torch.bfloat16)
    assert low_direction.dtype == torch.float32
    actual = float((low_direction - direction).norm() / direction.norm())
    estimate = float(rotation_error(layer, low, low_direction, diffs, torch.bfloat16))
    assert 0.2 < estimate / actual < 5, (estimate, actual)
    if case == "spread":  # the usual case: bfloat16 is kept
        assert estimate < ROTATION_ERROR_LIMIT and actual < 0.01
        cos = F.cosine_similarity(low_direction.reshape(-1), direction.reshape(-1), dim=0)
        assert cos > 0.9999 and abs(float(low.stats.beta - exact.stats.beta)) < 0.01 * abs(float(exact.stats.beta))
    else:  # noise where M is small: the estimate sends the layer back to float32
        assert estimate > ROTATION_ERROR_LIMIT and actual > 0.1


@pytest.mark.parametrize("case, fallbacks", [("spread", 0), ("aligned", 1)])
def test_step_rotates_again_in_float32_where_bfloat16_would_be_noise(case, fallbacks):
    updates = {}
    for rotation in ("bfloat16", "float32"):
        opt, layer = _two_sub_batch_layer(rotation, case)
        before, count = layer.weight.detach().clone(), opt.counters["float32_rotations"]
        opt.step()
        updates[rotation] = (layer.weight.detach() - before).reshape(-1)
        assert opt.counters["float32_rotations"] - count == (fallbacks if rotation == "bfloat16" else 0)
    if fallbacks:
        assert torch.equal(updates["bfloat16"], updates["float32"])
    else:
        assert not torch.equal(updates["bfloat16"], updates["float32"])
        assert F.cosine_similarity(updates["bfloat16"], updates["float32"], dim=0) > 0.9999


def test_bfloat16_rotations_drop_a_g_perp_that_is_rounding_noise():
    # g1 - g2 parallel to g_avg: g_perp is 0 in exact arithmetic, bfloat16 rounding noise after the rotation; beta*
    # must be 0 (K-FAC's direction scaled by eta*), not the ratio of two noises
    opt, layer = _two_sub_batch_layer("bfloat16", "parallel")
    result, direction = layer_direction(layer, opt.config, opt.grads.diff)
    assert float(result.stats.beta) == 0.0
    _, kfac = layer_direction(layer, opt.config, None)
    torch.testing.assert_close(direction, kfac * result.stats.eta)


def test_rotate_in_another_dtype_returns_the_inputs_dtype():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(30, 20, generator=gen)
    q_s, q_a = (torch.linalg.qr(torch.randn(n, n, generator=gen))[0] for n in (30, 20))
    assert torch.equal(rotate(g, q_s, q_a, torch.float32), q_s.T @ g @ q_a)
    for fn, ref in ((rotate, q_s.double().T @ g.double() @ q_a.double()),
                    (unrotate, q_s.double() @ g.double() @ q_a.double().T)):  # fmt: skip
        low = fn(g, q_s, q_a, torch.bfloat16)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low.double(), ref, rtol=0, atol=0.05)
        assert (low.double() - ref).abs().max() > 1e-5  # multiplied in bfloat16


def test_rotation_error_counts_the_noise_of_the_beta_term():
    # Delta = eta (M^-1 g_avg + beta M^-1 g_perp): the rotated g1 - g2 carries noise too, weighed by beta
    opt, layer = _two_sub_batch_layer("float32", "spread")
    diffs = opt.grads.diff
    result, dir_hat = layer_direction(layer, opt.config, diffs, torch.bfloat16)
    errors = []
    for beta in (0.0, 3.0):
        stats = dataclasses.replace(result.stats, beta=torch.tensor(beta))
        errors.append(float(rotation_error(layer, dataclasses.replace(result, stats=stats), dir_hat, diffs, torch.bfloat16)))
    grad2 = sum(float(p.grad.square().sum()) for p in layer.params)
    diff2 = sum(float(diffs[p].square().sum()) for p in layer.params if p in diffs)
    assert errors[1] / errors[0] == pytest.approx(math.sqrt(1 + 9 * diff2 / grad2), rel=1e-4)


def test_the_timed_answer_is_saved_with_the_state_and_pinned_by_a_resume(cpu_answer):
    """A run resumed where the probe would decide otherwise (another machine, a timing near the threshold) keeps
    multiplying in the dtype the run started with."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 256), nn.Linear(256, 10))
    pin_native_bfloat16(cpu_answer, True)  # the machine the run started on multiplies bfloat16 faster
    first = FOP(model)
    state = first.state_dict()
    assert state["fop"]["native_bfloat16"] == {"cpu": True}
    assert FOP(nn.Sequential(nn.Linear(8, 4)), mode="kfac").state_dict()["fop"]["native_bfloat16"] == {}  # nothing timed
    first.release()
    pin_native_bfloat16(cpu_answer, False)  # the machine it resumes on does not
    resumed = FOP(model)
    assert rotation_dtype(resumed.config, resumed.layers[0]) == torch.float32
    resumed.load_state_dict(state)
    assert native_bfloat16(cpu_answer) is True
    assert rotation_dtype(resumed.config, resumed.layers[0]) == torch.bfloat16
    old = {**state, "fop": {k: v for k, v in state["fop"].items() if k != "native_bfloat16"}}
    pin_native_bfloat16(cpu_answer, False)
    resumed.load_state_dict(old)  # a checkpoint written before the answer was saved: this process's answer stays
    assert native_bfloat16(cpu_answer) is False
