"""The FOP optimizer: steps against dense references, fallbacks, faults, checkpoints, real training."""

import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import hf_fop.curvature as curvature
import hf_fop.refresh as refresh
from hf_fop import FOP
from hf_fop.fop_math import fop_direction_dense, kron_fisher, unvec, vec
from hf_fop.optimizer import decay_parameter_names
from script_loader import load_script
from sync_counter import SyncCounter

ROOT = Path(__file__).resolve().parents[1]
PAPER = dict(damping_mode="absolute", kl_clip=None)  # the paper's FOP: absolute damping, no trust region


def _ones_col(x):
    return torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)


def _lin_problem(seed=0, n=8):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    x1, x2 = torch.randn(n, 4), torch.randn(n, 4) + 0.5
    y1, y2 = torch.randn(n, 3), torch.randn(n, 3)
    return model, (x1, y1), (x2, y2)


def _mse(model, x, y):
    return 0.5 * ((model(x) - y) ** 2).sum(1).mean()


def _full_grad(model, x, y):
    model.zero_grad()
    _mse(model, x, y).backward()
    g = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).clone()
    model.zero_grad()
    return g


def _dense_reference_update(model, batches, damping, lr, grad_factor=1.0):
    """Expected new [W | b] from hand-computed factors and the dense FOP reference."""
    (x1, y1), (x2, y2) = batches
    w0 = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
    g1, g2 = _full_grad(model, x1, y1), _full_grad(model, x2, y2)
    # A over both sub-batches, S from per-example output gradients (MSE: r = out - y)
    x = torch.cat([x1, x2])
    r = torch.cat([model(x1) - y1, model(x2) - y2]).detach()
    a_fac, s_fac = _ones_col(x).T @ _ones_col(x) / len(x), r.T @ r / len(x)
    fisher = kron_fisher(a_fac, s_fac).double()
    ref_dir, ref_stats = fop_direction_dense(
        grad_factor * vec(g1).double(), grad_factor * vec(g2).double(), fisher, damping, 1e-12
    )
    return w0.double() - lr * unvec(ref_dir, (3, 5)), ref_stats, (g1 + g2) / 2


def _run_fop_step(model, batches, damping, lr, grad_factor=1.0):
    opt = FOP(model, lr=lr, damping=damping, factor_decay=0.0, momentum=0.0, **PAPER)
    for k, (x_, y_) in enumerate(batches):
        with opt.sub_batch(k):
            _mse(model, x_, y_).backward()
    avg = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).clone()
    for p in model.parameters():
        p.grad.mul_(grad_factor)  # what clip_grad_norm_ / fp16 unscaling do between backward and step
    opt.step()
    return opt, torch.cat([model.weight, model.bias[:, None]], 1).detach(), avg


@pytest.mark.parametrize("damping", [1e-3, 0.1, 3.0])
def test_fop_step_equals_dense_reference(damping):
    model, b1, b2 = _lin_problem()
    expected, ref_stats, g_avg = _dense_reference_update(model, (b1, b2), damping, lr=0.7)
    opt, w1, seen_avg = _run_fop_step(model, (b1, b2), damping, lr=0.7)
    assert torch.allclose(seen_avg, g_avg)  # p.grad holds g_avg after sub-batch 1
    assert torch.allclose(w1.double(), expected, rtol=1e-4, atol=1e-5 * (1 + expected.abs().max()))
    diag = opt.diagnostics()
    assert math.isclose(diag["/beta"], float(ref_stats.beta), rel_tol=1e-3, abs_tol=1e-6)
    assert math.isclose(diag["/eta"], float(ref_stats.eta), rel_tol=1e-4)
    assert diag["fallback"] == 0.0 and diag["step"] == 1.0


def test_gradient_scaling_after_backward_applies_to_both_sub_batch_gradients():
    """Clipping p.grad (= g_avg) by c before step(): the update and the logged beta*/s_proj are those of c*g1, c*g2."""
    model, b1, b2 = _lin_problem(3)
    expected, ref_stats, _ = _dense_reference_update(model, (b1, b2), 0.1, lr=0.7, grad_factor=0.25)
    opt, w1, _ = _run_fop_step(model, (b1, b2), 0.1, lr=0.7, grad_factor=0.25)
    assert torch.allclose(w1.double(), expected, rtol=1e-4, atol=1e-5 * (1 + expected.abs().max()))
    diag = opt.diagnostics()
    assert abs(float(ref_stats.beta)) > 1e-2  # beta* and s_proj would be off by 4x without the correction
    assert math.isclose(diag["/beta"], float(ref_stats.beta), rel_tol=1e-3)
    assert math.isclose(diag["/s_proj"], float(ref_stats.s_proj), rel_tol=1e-3)
    assert math.isclose(diag["/eta"], float(ref_stats.eta), rel_tol=1e-4)


def test_equal_sub_batches_give_exactly_the_kfac_step():
    model, (x1, y1), _ = _lin_problem(1)
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    fop = FOP(model, lr=0.5, momentum=0.9, weight_decay=0.01)
    kfac = FOP(twin, lr=0.5, momentum=0.9, weight_decay=0.01, mode="kfac")
    for _ in range(3):
        for k in (0, 1):
            with fop.sub_batch(k):
                _mse(model, x1, y1).backward()
        _mse(twin, x1, y1).backward()
        fop.step(), kfac.step()
        fop.zero_grad(), kfac.zero_grad()
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)
    assert fop.diagnostics()["beta_mean"] == 0.0 and fop.diagnostics()["eta_mean"] == 1.0
    assert kfac.diagnostics()["fallback_steps"] == 0.0  # kfac mode never "falls back"


def test_one_sub_batch_or_plain_backward_falls_back_to_kfac():
    model, (x1, y1), _ = _lin_problem(2)
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    fop, kfac = FOP(model, lr=0.5), FOP(twin, lr=0.5, mode="kfac")
    with fop.sub_batch(0):
        _mse(model, x1, y1).backward()
    _mse(twin, x1, y1).backward()
    fop.step(), kfac.step()
    assert torch.equal(model.weight, twin.weight)
    assert fop.diagnostics()["fallback"] == 1.0
    fop.zero_grad()
    _mse(model, x1, y1).backward()  # plain backward, no sub_batch
    fop.step()
    d = fop.diagnostics()
    assert d["fallback_steps"] == 2.0 and d["step"] == 2.0


def test_non_finite_gradients_skip_the_step_without_touching_state():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    opt = FOP(model, lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for k in (0, 1):
        with opt.sub_batch(k):
            F.mse_loss(model(x[4 * k : 4 * k + 4]), y[4 * k : 4 * k + 4]).backward()
    opt.step(), opt.zero_grad()
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = opt.state_dict()
    for bad in ("grad", "input"):
        for k in (0, 1):
            with opt.sub_batch(k):
                xin = x[4 * k : 4 * k + 4].clone()
                if bad == "input" and k == 1:
                    xin[0, 0] = float("inf")
                F.mse_loss(model(xin), y[4 * k : 4 * k + 4]).backward()
                if bad == "grad" and k == 0:
                    model[0].weight.grad[0, 0] = float("nan")
        opt.step(), opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(before_params, model.parameters()))
    after_state = opt.state_dict()
    for name, entry in before_state["fop"]["layers"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                assert torch.equal(value, after_state["fop"]["layers"][name][key]), (name, key)
    d = opt.diagnostics()
    assert d["skipped_steps"] == 2.0 and d["step"] == 1.0
    for k in (0, 1):
        with opt.sub_batch(k):
            F.mse_loss(model(x[4 * k : 4 * k + 4]), y[4 * k : 4 * k + 4]).backward()
    opt.step()
    assert opt.diagnostics()["step"] == 2.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_but_finite_gradients_are_not_skipped(dtype):
    """The fast finiteness check is a 2-norm, whose sum of squares overflows for finite values above ~1e19: such a
    step must still be taken (the exact max-abs decides), and a NaN among them still skips it."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    opt = FOP(model, lr=1e-40, momentum=0.0)
    x, y = torch.randn(8, 4, dtype=dtype), torch.randn(8, 2, dtype=dtype)
    for poison in (1e30, float("nan")):
        for k in (0, 1):
            with opt.sub_batch(k):
                F.mse_loss(model(x[4 * k : 4 * k + 4]), y[4 * k : 4 * k + 4]).backward()
                model[2].weight.grad.fill_(poison)  # finite in both dtypes; squared, it overflows either
        assert not torch.isfinite(torch._foreach_norm([model[2].weight.grad])[0]) or poison != poison
        opt.step(), opt.zero_grad()
    d = opt.diagnostics()
    assert d["skipped_steps"] == 1.0 and d["step"] == 1.0


def test_failed_eigendecomposition_retries_float64_then_keeps_last_basis(monkeypatch):
    model, (x1, y1), _ = _lin_problem(5)
    opt = FOP(model, lr=0.1, inverse_interval=1, max_eigh_failures=2)

    def one_step():
        _mse(model, x1, y1).backward()
        opt.step()
        opt.zero_grad()

    one_step()
    layer = opt.layers[0]

    def broken(mat):
        raise torch.linalg.LinAlgError("injected float32 failure")

    calls = []
    real64 = refresh.eigh_float64
    monkeypatch.setattr(refresh, "eigh_float32", broken)
    monkeypatch.setattr(refresh, "eigh_float64", lambda m: calls.append(1) or real64(m))
    one_step()  # float64 path succeeds
    assert len(calls) == 2 and layer.eigh_failures == {"A": 0, "S": 0}
    q_before = layer.basis_a.q.clone()
    monkeypatch.setattr(refresh, "eigh_float64", lambda m: (torch.full((m.shape[0],), float("nan")), m))
    with pytest.warns(RuntimeWarning, match="keeping the last good basis"):
        one_step()
    assert torch.equal(layer.basis_a.q, q_before) and layer.eigh_failures["A"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"layer '' failed 2 times"):
        one_step()


@pytest.mark.parametrize("extra", ["{}", '{"damping_mode": "relative", "kl_clip": 1e-4}'], ids=["default", "relative_klclip"])
def test_checkpoint_resume_is_bitwise_in_a_fresh_process(tmp_path, extra):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(
        """
        import json, sys, torch
        import torch.nn.functional as F
        from torch import nn
        from hf_fop import FOP
        mode, steps, ckpt, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
        opt = FOP(model, lr=0.1, momentum=0.9, weight_decay=1e-2, factor_interval=2, inverse_interval=4,
                  adamw_lr=1e-2, adamw_weight_decay=0.01, **extra)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        start = 0
        if mode == "resume":
            blob = torch.load(ckpt, weights_only=True)
            model.load_state_dict(blob["model"]); opt.load_state_dict(blob["opt"]); sched.load_state_dict(blob["sched"])
            start = blob["step"]
        data = torch.Generator().manual_seed(1)
        batches = [(torch.randn(16, 6, generator=data), torch.randint(0, 3, (16,), generator=data)) for _ in range(steps)]
        for step in range(start, steps):
            x, y = batches[step]
            for k in (0, 1):
                with opt.sub_batch(k):
                    F.cross_entropy(model(x[8 * k: 8 * k + 8]), y[8 * k: 8 * k + 8]).backward()
            opt.step(); sched.step(); opt.zero_grad()
            if mode == "save" and step + 1 == 5:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": 5}, ckpt)
        torch.save(model.state_dict(), ckpt + "." + mode + ".final")
        """
    ))
    ckpt = str(tmp_path / "ckpt.pt")
    for mode in ("save", "resume"):
        subprocess.run([sys.executable, str(script), mode, "11", ckpt, extra], check=True, cwd=ROOT)
    full = torch.load(ckpt + ".save.final", weights_only=True)
    resumed = torch.load(ckpt + ".resume.final", weights_only=True)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def _plain(value):
    if torch.is_tensor(value) or value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def test_state_dict_holds_only_tensors_and_plain_values_and_no_gradient_buffers():
    model, (x1, y1), (x2, y2) = _lin_problem(6)
    opt = FOP(model, momentum=0.5)
    for k, (x_, y_) in enumerate(((x1, y1), (x2, y2))):
        with opt.sub_batch(k):
            _mse(model, x_, y_).backward()
    opt.step()
    state = opt.state_dict()
    assert _plain(state)
    keys = set(state["fop"]["layers"][""])
    assert keys == {"A", "S", "q_a", "eig_a", "q_s", "eig_s", "eigh_failures_A", "eigh_failures_S"}
    assert set(state["state"][0]) == {"momentum_buffer"}
    with pytest.raises(ValueError, match="not written by hf_fop.FOP"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_model_without_manageable_layers_warns_and_runs_adamw():
    torch.manual_seed(7)
    model = nn.Sequential(nn.LayerNorm(4), nn.Embedding(5, 4))
    ref = nn.Sequential(nn.LayerNorm(4), nn.Embedding(5, 4))
    ref.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="no Linear, Conv2d or Conv1D layer"):
        opt = FOP(model, lr=1e-2, adamw_lr=None, adamw_weight_decay=0.1)
    # the Trainer's rule: LayerNorm weight and bias get no decay, the embedding does
    torch_opt = torch.optim.AdamW(
        [{"params": [ref[1].weight], "weight_decay": 0.1}, {"params": list(ref[0].parameters()), "weight_decay": 0.0}],
        lr=1e-2,
    )
    idx = torch.tensor([0, 3, 4])
    for _ in range(5):
        for m, o in ((model, opt), (ref, torch_opt)):
            (m[1](idx) * m[0](torch.ones(3, 4))).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert [g["kind"] for g in opt.param_groups] == ["adamw"]


def test_lr_scheduler_scales_both_groups():
    """A scheduler that halves both groups' lr halves the parameter update of both (same batch, twin models)."""
    model, (x1, y1), (x2, y2) = _lin_problem(8)
    deltas = []
    for factor in (1.0, 0.5):
        net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
        net[0].load_state_dict(model.state_dict())
        before = [p.detach().clone() for p in net.parameters()]
        opt = FOP(net, lr=0.2, adamw_lr=1e-3, **PAPER)  # no trust region: the update is linear in lr
        assert [g["kind"] for g in opt.param_groups] == ["kfac", "adamw"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor**s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            sched.step()
        assert [g["lr"] for g in opt.param_groups] == [0.2 * factor, 1e-3 * factor]
        for k, (x_, y_) in enumerate(((x1, y1), (x2, y2))):
            with opt.sub_batch(k):
                _mse(net, x_, y_).backward()
        opt.step()
        deltas.append([p.detach() - b for p, b in zip(net.parameters(), before)])
    for name, full, half in zip(("kfac weight", "kfac bias", "adamw weight", "adamw bias"), *deltas):
        assert full.abs().max() > 1e-5, name
        assert torch.allclose(half, 0.5 * full, rtol=1e-4, atol=1e-7), name


def test_momentum_and_decoupled_weight_decay_follow_their_formulas():
    model, (x1, y1), _ = _lin_problem(9)
    twin = nn.Linear(4, 3)
    lr, mu, wd = 0.3, 0.8, 0.05
    opt = FOP(model, lr=lr, momentum=mu, weight_decay=wd, mode="kfac")
    plain = FOP(twin, lr=lr, momentum=0.0, mode="kfac")  # gives the raw direction d_t = (p - p') / lr
    buf = None
    for step in range(3):
        twin.load_state_dict(model.state_dict())
        p0 = model.weight.detach().clone()
        for m, o in ((model, opt), (twin, plain)):
            _mse(m, x1 * (1 + step), y1).backward()
            o.step()
            o.zero_grad()
        d = (p0 - twin.weight.detach()) / lr
        buf = d if buf is None else mu * buf + d
        assert torch.allclose(model.weight, p0 * (1 - lr * wd) - lr * buf, atol=1e-6)


def test_invalid_sub_batch_usage_raises_clear_errors():
    model, (x1, y1), _ = _lin_problem(10)
    opt = FOP(model)
    with pytest.raises(ValueError, match="must be 0 .* or 1"):
        with opt.sub_batch(2):
            pass
    with pytest.raises(RuntimeError, match="run sub_batch\\(0\\) first"):
        opt.begin_sub_batch(1)
    with opt.sub_batch(0):
        _mse(model, x1, y1).backward()
    with pytest.raises(RuntimeError, match="differ in shape"):
        opt.grads.install_dual({model.weight: torch.zeros(2, 2)}, 0.5)
    opt.zero_grad()
    _mse(model, x1, y1).backward()
    with pytest.raises(RuntimeError, match="call zero_grad\\(\\) first"):
        opt.begin_sub_batch(0)
    with pytest.raises(TypeError, match="expects the model"):
        FOP(list(model.parameters()))
    with pytest.raises(TypeError, match="no field"):
        FOP(model, learning_rate=0.1)


@pytest.mark.parametrize("mode", ["fop", "kfac"])
def test_smoke_digits_training_reaches_test_accuracy(mode):
    """Smoke test (K-FAC meets the same bar): real data (scikit-learn digits), batch 512 split into two sub-batches: >= 95% test accuracy."""
    demo = load_script("examples", "digits_demo")
    torch.manual_seed(0)
    result = demo.train(mode, epochs=12, batch_size=512, lr=0.03, damping=1e-2)
    assert result["test_accuracy"] >= 0.95, result


def test_smoke_gpt2_conv1d_layers_train_and_report_per_layer_diagnostics():
    """Smoke test: GPT-2's Conv1D layers are managed, the loss falls, diagnostics are finite."""
    torch.manual_seed(11)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    opt = FOP(model, lr=0.02, damping=1e-2, adamw_lr=3e-3, **PAPER)
    ids = torch.randint(0, 40, (8, 12))
    ids[:, 1::2] = (ids[:, ::2] + 1) % 40  # every second token is predictable

    def full_loss():
        with torch.no_grad():
            return float(model(ids, labels=ids).loss)

    before = full_loss()
    for _ in range(12):
        for k in (0, 1):
            with opt.sub_batch(k):
                model(ids[4 * k : 4 * k + 4], labels=ids[4 * k : 4 * k + 4]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert full_loss() < 0.9 * before
    diag = opt.diagnostics()
    assert "transformer.h.0.attn.c_attn/beta" in diag and "lm_head/beta" not in diag
    assert diag["managed_layers"] == 8.0 and diag["fallback_steps"] == 0.0
    assert all(math.isfinite(v) for v in diag.values())


@pytest.mark.parametrize("use_eta", [True, False])
def test_fop_update_differs_from_kfac_by_the_beta_g_perp_term(use_eta):
    """Same batch, same factors: FOP's update minus K-FAC's is lr (eta* beta* M^-1 g_perp + (eta* - 1) M^-1 g_avg)."""
    model, b1, b2 = _lin_problem(12)
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    (x1, y1), (x2, y2) = b1, b2
    g1, g2 = _full_grad(model, x1, y1).double(), _full_grad(model, x2, y2).double()
    x = torch.cat([x1, x2])
    r = torch.cat([model(x1) - y1, model(x2) - y2]).detach()
    a_fac, s_fac = _ones_col(x).T @ _ones_col(x) / len(x), r.T @ r / len(x)
    damping, lr = 1e-2, 0.3
    m = kron_fisher(a_fac, s_fac).double() + damping * torch.eye(15, dtype=torch.float64)
    g_avg, g_diff = vec((g1 + g2) / 2), vec(g1 - g2)
    g_perp = g_diff - (g_diff @ m @ g_avg) / (g_avg @ m @ g_avg) * g_avg
    minv_avg, minv_perp = torch.linalg.solve(m, g_avg), torch.linalg.solve(m, g_perp)
    beta = (g_avg @ minv_perp) / (g_perp @ minv_perp)
    g_comb = g_avg + beta * g_perp
    eta = (g_avg @ torch.linalg.solve(m, g_comb)) / (g_comb @ torch.linalg.solve(m, g_comb)) if use_eta else 1.0
    expected = unvec(lr * (eta * beta * minv_perp + (eta - 1) * minv_avg), (3, 5))
    w = []
    for net, mode in ((model, "fop"), (twin, "kfac")):
        opt = FOP(net, lr=lr, damping=damping, factor_decay=0.0, momentum=0.0, mode=mode, use_eta=use_eta, **PAPER)
        for k, (x_, y_) in enumerate((b1, b2)):
            with opt.sub_batch(k):
                _mse(net, x_, y_).backward()
        opt.step()
        w.append(torch.cat([net.weight, net.bias[:, None]], 1).detach().double())
    kfac_minus_fop = w[1] - w[0]
    assert expected.abs().max() > 1e-2 * (w[1] - torch.cat([model.weight, model.bias[:, None]], 1).double()).abs().max()
    assert torch.allclose(kfac_minus_fop, expected, rtol=1e-3, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("stagger", [False, True], ids=["every_layer_together", "staggered"])
def test_layer_without_eigenbasis_takes_an_identity_preconditioned_step(stagger):
    """A layer first used on a step without curvature capture moves by lr * its gradient (momentum, decay as usual).
    The staggered capture captures a layer without factors on every step until it has them, and decomposes them on
    that step: such a layer is preconditioned from its first step."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x, use_b):
            return self.a(x) + (self.b(x) if use_b else 0)

    torch.manual_seed(16)
    model = Branchy()
    lr, mu, wd = 0.2, 0.5, 0.1
    opt = FOP(model, lr=lr, momentum=mu, weight_decay=wd, factor_interval=2, inverse_interval=2, stagger_capture=stagger)
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def step(use_b):
        for k in (0, 1):
            with opt.sub_batch(k):
                F.mse_loss(model(x[4 * k : 4 * k + 4], use_b), y[4 * k : 4 * k + 4]).backward()
        grads = (model.b.weight.grad.clone(), model.b.bias.grad.clone()) if use_b else None
        before = (model.b.weight.detach().clone(), model.b.bias.detach().clone())
        opt.step()
        opt.zero_grad()
        return grads, before

    step(False)  # step 0 captures curvature for `a` only
    assert opt.layers[1].basis_a is None and opt.capturing == stagger
    if stagger:  # step 1 is `b`'s own step (and not `a`'s): it would capture `b` anyway
        assert opt.engine.capture_only == frozenset({"b"})
        step(False)  # step 1 without `b`
        # step 2 is `a`'s step; `b`, without factors, captures on every step until it has them
        assert opt.engine.capture_only is None and opt.capturing
        step(True)
        assert opt.layers[1].basis_a is not None and opt.diagnostics()["identity_layer_steps"] == 0
        return
    (gw, gb), (w0, b0) = step(True)  # step 1: `b` has gradients but no eigenbasis
    assert torch.allclose(model.b.weight, w0 * (1 - lr * wd) - lr * gw, atol=1e-7)
    assert torch.allclose(model.b.bias, b0 - lr * gb, atol=1e-7)  # biases get no weight decay
    assert opt.diagnostics()["identity_layer_steps"] == 1.0
    step(True)  # step 2 captures `b` and decomposes: preconditioned from now on
    assert opt.layers[1].basis_a is not None
    step(True)
    assert opt.diagnostics()["identity_layer_steps"] == 1.0


class _Scaled(nn.Module):
    """Linear, LayerNorm, a free parameter (AdamW, decays) and a Linear."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2)
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)) * self.scale)


def test_weight_decay_follows_the_trainer_rule():
    """Decay hits fc1/fc2 weights (K-FAC) and `scale` (AdamW), never biases or LayerNorm parameters."""
    torch.manual_seed(17)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    lr, adamw_lr, wd, adamw_wd = 0.1, 0.05, 0.2, 0.3
    nets = []
    for decay in (True, False):
        torch.manual_seed(18)
        net = _Scaled()
        opt = FOP(net, lr=lr, adamw_lr=adamw_lr, mode="kfac", weight_decay=wd if decay else 0.0,
                  adamw_weight_decay=adamw_wd if decay else 0.0)
        p0 = {n: p.detach().clone() for n, p in net.named_parameters()}
        F.mse_loss(net(x), y).backward()
        opt.step()
        nets.append(dict(net.named_parameters()))
    decayed = {"fc1.weight": lr * wd, "fc2.weight": lr * wd, "scale": adamw_lr * adamw_wd}
    assert sorted(decay_parameter_names(_Scaled())) == sorted(decayed)
    for name, p in nets[0].items():
        expected = nets[1][name] - decayed.get(name, 0.0) * p0[name]
        assert torch.allclose(p, expected, atol=1e-7), name


def test_decay_rule_is_the_trainers():
    from transformers import Trainer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8))
    for m in (model, _Scaled()):
        assert decay_parameter_names(m) == Trainer.get_decay_parameter_names(None, m)
    opt = FOP(model)
    ours = {n for n, p in model.named_parameters() if id(p) in opt._decay}
    assert ours == {n for n in decay_parameter_names(model) if n != "lm_head.weight"}  # tied: listed once
    assert not any(n.endswith("bias") or ".ln_" in n for n in ours)


@pytest.mark.parametrize("stagger", [False, True], ids=["every_layer_together", "staggered"])
def test_non_curvature_step_synchronises_with_the_host_at_most_once(monkeypatch, stagger):
    """The finiteness check is the only value read back per step (no eigendecomposition, no logging; the staggered
    refresh would decompose a layer on step 1). Step 1 captures nothing with every layer together, and the second
    layer's factors with the staggered capture: a capture reads nothing back in one process."""
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    opt = FOP(model, lr=0.05, momentum=0.9, weight_decay=0.01, adamw_weight_decay=0.01,
              factor_interval=2, inverse_interval=2, stagger_refresh=False, stagger_capture=stagger)
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def step():
        for k in (0, 1):
            with opt.sub_batch(k):
                F.mse_loss(model(x[4 * k : 4 * k + 4]), y[4 * k : 4 * k + 4]).backward()
        opt.step()
        opt.zero_grad()

    step()  # step 0: curvature
    assert opt.capturing == stagger
    counter = SyncCounter(monkeypatch)
    step()
    monkeypatch.undo()
    assert len(counter.calls) <= 1, counter.calls
    assert opt.global_step == 2 and opt.counters["skipped_steps"] == 0
    assert opt.counters["layer_factor_updates"] == (3 if stagger else 2)


# ------------------------------------------------- trust region, relative damping
def _two_layer_problem(seed=5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x1, x2 = torch.randn(8, 4), torch.randn(8, 4) + 0.5
    y1, y2 = torch.randn(8, 2), torch.randn(8, 2)
    return model, ((x1, y1), (x2, y2))


def _layer_grad_matrices(model, x, y):
    model.zero_grad()
    _mse(model, x, y).backward()
    out = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone() for m in (model[0], model[2])]
    model.zero_grad()
    return out


@pytest.mark.parametrize("mode", ["fop", "kfac"])
@pytest.mark.parametrize("damping_mode", ["absolute", "relative"])
def test_kl_clip_scale_and_step_match_a_dense_computation(mode, damping_mode):
    """nu = min(1, sqrt(kl_clip / (lr^2 sum_l Delta_l^T M_l Delta_l))) from dense Kronecker Fishers, and W <- W - lr nu Delta."""
    model, batches = _two_layer_problem()
    lr, damping, kl_clip = 0.5, 0.05, 1e-3
    before = [torch.cat([m.weight, m.bias[:, None]], 1).detach().double().clone() for m in (model[0], model[2])]
    g1s = _layer_grad_matrices(model, *batches[0])
    g2s = _layer_grad_matrices(model, *batches[1])
    opt = FOP(model, lr=lr, damping=damping, factor_decay=0.0, momentum=0.0, kl_clip=kl_clip, mode=mode, damping_mode=damping_mode)
    if mode == "fop":
        for k, (x_, y_) in enumerate(batches):
            with opt.sub_batch(k):
                _mse(model, x_, y_).backward()
    else:
        x = torch.cat([batches[0][0], batches[1][0]])
        y = torch.cat([batches[0][1], batches[1][1]])
        _mse(model, x, y).backward()
    opt.step()
    total, deltas, lams = 0.0, [], []
    for layer, g1, g2 in zip(opt.layers, g1s, g2s):
        fisher = kron_fisher(layer.A, layer.S).double()  # the factors this step preconditioned with
        lam = damping * torch.linalg.eigvalsh(fisher).mean() if damping_mode == "relative" else damping
        lams.append(float(lam))
        g1v, g2v = vec(g1).double(), vec(g2).double()
        if mode == "kfac":
            g2v = g1v = (g1v + g2v) / 2
        delta, _ = fop_direction_dense(g1v, g2v, fisher, lam, 1e-12)
        m = fisher + lam * torch.eye(len(fisher), dtype=torch.float64)
        total += float(delta @ m @ delta)
        deltas.append(unvec(delta, g1.shape))
    nu = min(1.0, math.sqrt(kl_clip / (lr**2 * total)))
    assert nu < 0.5  # the clip is active
    diag = opt.diagnostics()
    assert math.isclose(diag["kl_clip_scale"], nu, rel_tol=2e-3)
    assert math.isclose(diag["damping_min"], min(lams), rel_tol=1e-4)
    assert math.isclose(diag["damping_max"], max(lams), rel_tol=1e-4)
    for m, w0, delta in zip((model[0], model[2]), before, deltas):
        w1 = torch.cat([m.weight, m.bias[:, None]], 1).detach().double()
        expected = w0 - lr * nu * delta
        assert torch.allclose(w1, expected, rtol=1e-3, atol=1e-5 * (1 + expected.abs().max()))


@pytest.mark.parametrize("mode", ["fop", "kfac"])
def test_kl_clip_that_never_binds_leaves_the_step_bitwise_unchanged(mode):
    runs = []
    for kl_clip in (None, 1e30):
        model, batches = _two_layer_problem(7)
        opt = FOP(model, lr=0.3, momentum=0.9, weight_decay=1e-2, inverse_interval=2, mode=mode, kl_clip=kl_clip)
        for _ in range(4):
            for k, (x_, y_) in enumerate(batches):
                with opt.sub_batch(k):
                    _mse(model, x_, y_).backward()
            opt.step(), opt.zero_grad()
        runs.append((model, opt.diagnostics()))
    (plain, d_plain), (clipped, d_clipped) = runs
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), clipped.parameters()))
    assert "kl_clip_scale" not in d_plain and d_clipped["kl_clip_scale"] == 1.0


@pytest.mark.parametrize("mode", ["fop", "kfac"])
def test_kl_clip_uses_the_scheduled_lr(mode):
    """An LR scheduler writes each step's lr into the param groups: the trust region bounds lr^2 Delta^T M Delta with
    that lr, so FOP(lr=0.4) stepped at a scheduled lr of 0.05 updates exactly as FOP(lr=0.05) does."""
    runs = []
    for config_lr in (0.4, 0.05):
        model, batches = _two_layer_problem(9)
        opt = FOP(model, lr=config_lr, kl_clip=1e-5, damping=1e-3, mode=mode)
        for group in opt.param_groups:
            group["lr"] = 0.05  # what the scheduler of a run with peak lr 0.4 writes at this step
        for k, (x_, y_) in enumerate(batches):
            with opt.sub_batch(k):
                _mse(model, x_, y_).backward()
        opt.step()
        assert opt.diagnostics()["kl_clip_scale"] < 1.0  # the clip binds, so its lr matters
        runs.append(model)
    assert all(torch.equal(p, q) for p, q in zip(runs[0].parameters(), runs[1].parameters()))


def test_kl_clip_applies_before_momentum():
    """The buffer accumulates clipped directions: a huge first step is clipped, its momentum stays bounded."""
    model, batches = _two_layer_problem(8)
    opt = FOP(model, lr=1.0, momentum=0.9, kl_clip=1e-6, damping=1e-3)
    for k, (x_, y_) in enumerate(batches):
        with opt.sub_batch(k):
            _mse(model, x_, y_).backward()
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.step()
    nu = opt.diagnostics()["kl_clip_scale"]
    assert nu < 1.0
    for p, before in zip(model.parameters(), w0):
        assert torch.allclose(opt.state[p]["momentum_buffer"], before - p.detach(), rtol=1e-4, atol=1e-6)


def test_plain_pytorch_fop_does_not_import_transformers():
    """``import hf_fop`` and a FOP step on a plain PyTorch model load no transformers module (about 2 s per process,
    e.g. every rank of a torchrun job); the weight-decay rule and Conv1D detection work without it."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        from hf_fop import FOP
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
        opt = FOP(model, weight_decay=0.1)
        model(torch.randn(8, 3)).square().mean().backward()
        opt.step()
        assert opt.counters["factor_updates"] == 1, opt.counters
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "transformers")
        assert not loaded, loaded[:5]
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_checkpoint_written_before_the_reorganisation_loads_and_continues():
    """tests/data/fop_state_df4f7d7.pt was written by hf_fop at df4f7d7 (tests/data/make_fop_state_df4f7d7.py): the
    current FOP loads it and takes the same next step (parameters, counters and diagnostics)."""
    data = torch.load(ROOT / "tests" / "data" / "fop_state_df4f7d7.pt", weights_only=False)
    model, opt, step = load_script("tests/data", "make_fop_state_df4f7d7").build()  # the same model, batches, settings
    opt.config = opt.config.replace(stagger_refresh=False)  # that version decomposed every layer at a cycle's start
    model.load_state_dict(data["model"])
    opt.load_state_dict(data["optimizer"])
    assert opt.global_step == 3 and opt.counters["factor_updates"] == 3
    step(3)
    for key, expected in data["after_next_step"].items():
        torch.testing.assert_close(model.state_dict()[key], expected, rtol=1e-5, atol=1e-6, msg=key)  # the same operations (bitwise at 1 thread)
    diag, old = opt.diagnostics(), data["diagnostics_after_next_step"]
    for key in ("step", "factor_updates", "inverse_updates", "beta_mean", "eta_mean", "kl_clip_scale", "damping_min"):
        assert diag[key] == pytest.approx(old[key], rel=1e-5), key
