"""K-FAC factors against hand-computed A and S, and the Kronecker Fisher against torch.func where K-FAC is exact."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import gc
import weakref

import hf_fop.curvature as curvature
import hf_fop.refresh as refresh
from hf_fop import FOP, FOPConfig
from hf_fop.curvature import find_layers
from hf_fop.fop_math import kron_fisher, vec
from sync_counter import SyncCounter


def _ones_col(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _factors(opt: FOP, name: str):
    layer = next(layer for layer in opt.layers if layer.name == name)
    return layer.A, layer.S


def _oracle_S(r: torch.Tensor, n_examples: int) -> torch.Tensor:
    """r: rows of d(sum of per-example losses)/d(layer output), shape (rows, out)."""
    return r.T @ r / n_examples


class TwoLayer(nn.Module):
    def __init__(self, first: nn.Module, hidden: int, classes: int = 3):
        super().__init__()
        self.first = first
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.first(x)
        self.h = h
        if h.requires_grad:
            h.retain_grad()
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors_equal_hand_computed(bias):
    torch.manual_seed(0)
    model = TwoLayer(nn.Linear(5, 4, bias=bias), 4)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    opt = FOP(model, lr=0.0, factor_decay=0.0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    a_fac, s_fac = _factors(opt, "first")
    # oracle: per-example loss gradients w.r.t. the layer output, from the summed loss
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    a_rows = _ones_col(x) if bias else x
    assert torch.allclose(a_fac, a_rows.T @ a_rows / 12, atol=1e-6)
    assert torch.allclose(s_fac, _oracle_S(model.h.grad, 12), atol=1e-7, rtol=1e-5)


def test_conv2d_factors_equal_hand_computed():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
    model = TwoLayer(conv, 3 * 3 * 3)
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))
    opt = FOP(model, lr=0.0, factor_decay=0.0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    a_fac, s_fac = _factors(opt, "first")
    # A: explicit patches, channel-major (c, kh, kw) like weight.reshape(out, -1), plus the bias column
    xp = F.pad(x, (1, 1, 1, 1))
    rows = []
    for n in range(4):
        for i in range(3):
            for j in range(3):
                rows.append(xp[n, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(-1))
    patches = _ones_col(torch.stack(rows))
    assert torch.allclose(a_fac, patches.T @ patches / patches.shape[0], atol=1e-6)
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    r = model.h.grad.permute(0, 2, 3, 1).reshape(-1, 3)  # positions summed per example ("expand")
    assert torch.allclose(s_fac, _oracle_S(r, 4), atol=1e-7, rtol=1e-5)


def test_conv1d_factors_equal_hand_computed_and_gradient_matrix_is_transposed():
    torch.manual_seed(2)
    model = TwoLayer(Conv1D(nf=4, nx=3), 4)
    x, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    opt = FOP(model, lr=0.0, factor_decay=0.0)
    F.cross_entropy(model(x), y).backward()
    layer = next(layer for layer in opt.layers if layer.name == "first")
    assert layer.kind == "conv1d" and (layer.out_dim, layer.in_dim) == (4, 4)
    g = layer.grad_matrix(model.first.weight.grad, model.first.bias.grad)
    assert torch.equal(g[:, :3], model.first.weight.grad.T) and torch.equal(g[:, 3], model.first.bias.grad)
    w, b = layer.split_matrix(g)
    assert torch.equal(w, model.first.weight.grad) and torch.equal(b, model.first.bias.grad)
    opt.step()
    a_fac, s_fac = layer.A, layer.S
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    assert torch.allclose(a_fac, _ones_col(x).T @ _ones_col(x) / 10, atol=1e-6)
    assert torch.allclose(s_fac, _oracle_S(model.h.grad, 10), atol=1e-7, rtol=1e-5)


class SeqModel(nn.Module):
    """Token-wise Linear and a token-level classifier: every position, padded or not, gets a gradient."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.proj(x)
        self.h = h
        if h.requires_grad:
            h.retain_grad()
        return self.head(torch.tanh(h))  # (B, T, 2)


def _token_loss(logits, y, reduction="mean"):
    """Cross-entropy summed over all T positions of an example (padded ones too), mean or sum over examples."""
    per_example = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)
    return per_example.mean() if reduction == "mean" else per_example.sum()


def test_sequence_inputs_with_padding_mask():
    torch.manual_seed(3)
    model = SeqModel()
    x, y = torch.randn(5, 6, 3), torch.randint(0, 2, (5, 6))
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    mask[4, 5:] = 0
    opt = FOP(model, lr=0.0, factor_decay=0.0)
    with opt.padding_mask(mask):
        _token_loss(model(x), y).backward()
    opt.step()
    a_fac, s_fac = _factors(opt, "proj")
    real = mask.bool()
    a_rows = _ones_col(x[real])
    assert torch.allclose(a_fac, a_rows.T @ a_rows / real.sum(), atol=1e-6)
    model.zero_grad()
    _token_loss(model(x), y, reduction="sum").backward()
    assert model.h.grad[~real].abs().min() > 0  # padded positions do get a gradient: only the mask drops them
    assert torch.allclose(s_fac, _oracle_S(model.h.grad[real], 5), atol=1e-7, rtol=1e-5)
    # without a mask every token counts (K-FAC expand over all positions)
    opt.release()
    opt2 = FOP(model, lr=0.0, factor_decay=0.0)
    model.zero_grad()
    _token_loss(model(x), y).backward()
    opt2.step()
    all_rows = _ones_col(x.reshape(-1, 3))
    assert torch.allclose(_factors(opt2, "proj")[0], all_rows.T @ all_rows / 30, atol=1e-6)
    model.zero_grad()
    _token_loss(model(x), y, reduction="sum").backward()
    assert torch.allclose(_factors(opt2, "proj")[1], _oracle_S(model.h.grad.reshape(-1, 4), 5), atol=1e-7, rtol=1e-5)


def test_padding_mask_of_the_wrong_shape_raises_naming_both_shapes():
    model = SeqModel()
    opt = FOP(model)
    x, y = torch.randn(5, 6, 3), torch.randint(0, 2, (5, 6))
    with pytest.raises(ValueError, match=r"padding mask of shape \(5, 5\) does not match the \(B, T\) = \(5, 6\) of layer 'proj'"):
        with opt.padding_mask(torch.ones(5, 5)):
            _token_loss(model(x), y).backward()
    opt.zero_grad()
    with pytest.raises(ValueError, match=r"expected a \(B, T\) tensor"):
        with opt.padding_mask(torch.ones(5, 6, 1)):
            pass


def test_encoder_decoder_mask_applies_to_encoder_layers_only():
    """T5 with equal encoder and decoder lengths: the encoder's mask must not reach decoder activations."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(12)
    cfg = T5Config(vocab_size=30, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(cfg)
    ids, labels = torch.randint(1, 30, (3, 5)), torch.randint(1, 30, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 2:] = 0
    names = {
        "enc_q": "encoder.block.0.layer.0.SelfAttention.q",
        "dec_q": "decoder.block.0.layer.0.SelfAttention.q",
        "cross_k": "decoder.block.0.layer.1.EncDecAttention.k",
    }
    inputs = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, key=key: inputs.__setitem__(key, a[0].detach()))
               for key, n in names.items()]
    opt = FOP(model, lr=0.0, adamw_lr=0.0, factor_decay=0.0)
    with opt.padding_mask(mask):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    for h in handles:
        h.remove()
    real = mask.bool()
    layers = {layer.name: layer for layer in opt.layers}
    enc_rows = inputs["enc_q"][real]
    assert torch.allclose(layers[names["enc_q"]].A, enc_rows.T @ enc_rows / real.sum(), atol=1e-6)
    for key in ("dec_q", "cross_k"):  # decoder modules, cross-attention included: every position counts
        rows = inputs[key].reshape(-1, 8)
        assert inputs[key].shape[:2] == mask.shape
        assert torch.allclose(layers[names[key]].A, rows.T @ rows / 15, atol=1e-6), key


def test_factors_do_not_depend_on_micro_batch_or_sub_batch_split():
    torch.manual_seed(4)
    model = TwoLayer(nn.Linear(5, 4), 4)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    # reference: one plain backward of the whole batch
    ref = FOP(model, lr=0.0, factor_decay=0.0)
    F.cross_entropy(model(x), y).backward()
    ref.step()
    a_ref, s_ref = _factors(ref, "first")
    ref.release()
    model.zero_grad()
    # unequal sub-batches (6 and 10 examples), each accumulated over micro-batches of unequal size;
    # each sub-batch's loss is the mean over that sub-batch (sum over micro-batches / its size)
    opt = FOP(model, lr=0.0, factor_decay=0.0)
    for index, chunks in ((0, [(0, 2), (2, 6)]), (1, [(6, 9), (9, 13), (13, 16)])):
        size = chunks[-1][1] - chunks[0][0]
        for lo, hi in chunks:
            with opt.sub_batch(index):
                (F.cross_entropy(model(x[lo:hi]), y[lo:hi], reduction="sum") / size).backward()
    opt.step()
    a_fac, s_fac = _factors(opt, "first")
    assert torch.allclose(a_fac, a_ref, atol=1e-6)
    assert torch.allclose(s_fac, s_ref, atol=1e-7, rtol=1e-5)


def test_bf16_autocast_keeps_float32_factors():
    """Under bf16 autocast the second Linear's input is bf16: A and S are still exact float32 sums of those values."""
    torch.manual_seed(5)
    model = TwoLayer(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6)), 6)
    second = model.first[1]
    seen = {}
    second.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    ref = FOP(model, lr=0.0, adamw_lr=0.0, factor_decay=0.0)
    F.cross_entropy(model(x), y).backward()
    ref.step()
    a_ref, s_ref = [t.clone() for t in _factors(ref, "first.1")]
    ref.release()
    model.zero_grad()
    opt = FOP(model, lr=0.0, adamw_lr=0.0, factor_decay=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    assert seen["x"].dtype == torch.bfloat16 and model.h.dtype == torch.bfloat16
    loss.backward()
    opt.step()
    a_fac, s_fac = _factors(opt, "first.1")
    assert a_fac.dtype == torch.float32 and s_fac.dtype == torch.float32
    layer = next(layer for layer in opt.layers if layer.name == "first.1")
    assert layer.basis_a.q.dtype == torch.float32
    # A: the exact (float64) second moment of the bf16 input values; a bf16 product would be off by ~1e-2
    rows = _ones_col(seen["x"].double())
    exact = (rows.T @ rows / 32).float()
    assert torch.allclose(a_fac, exact, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a_fac, a_ref, rtol=5e-2, atol=5e-2)
    assert torch.allclose(s_fac, s_ref, rtol=5e-2, atol=5e-2 * s_ref.abs().max())


class DeepLinear(nn.Module):
    def __init__(self, dims=(4, 3, 5, 2)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _layer_grad_vec(grads, name):
    w, b = grads[f"{name}.weight"], grads[f"{name}.bias"]
    return vec(torch.cat([w, b[:, None]], dim=1))


def test_kronecker_fisher_equals_exact_empirical_fisher_deep_linear_one_datum():
    torch.manual_seed(6)
    model = DeepLinear()
    x, y = torch.randn(1, 4), torch.randn(1, 2)
    opt = FOP(model, lr=0.0, factor_decay=0.0)
    (0.5 * ((model(x) - y) ** 2).sum()).backward()
    opt.step()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p):
        out = torch.func.functional_call(model, p, (x,))
        return 0.5 * ((out - y) ** 2).sum()

    grads = torch.func.grad(loss_fn)(params)
    for i, layer in enumerate(opt.layers):
        gv = _layer_grad_vec(grads, f"layers.{i}")
        exact = torch.outer(gv, gv)
        assert torch.allclose(kron_fisher(layer.A, layer.S), exact, atol=1e-6, rtol=1e-4), layer.name


def test_mc_fisher_matches_exact_fisher_deep_linear_one_datum():
    """MC K-FAC on one datum (replicated to average the samples) vs E_{y~p}[grad grad^T] by enumeration."""
    torch.manual_seed(7)
    model = DeepLinear((3, 4, 3))
    x1 = torch.randn(1, 3)
    copies = 40000
    opt = FOP(model, lr=0.0, factor_decay=0.0, fisher_type="mc")
    logits = model(x1.expand(copies, 3))
    opt.mc_backward(logits, generator=torch.Generator().manual_seed(0))
    F.cross_entropy(logits, torch.zeros(copies, dtype=torch.long)).backward()
    opt.step()
    params = {k: v.detach() for k, v in model.named_parameters()}
    probs = torch.softmax(model(x1), -1).detach()[0]

    def loss_fn(p, c):
        out = torch.func.functional_call(model, p, (x1,))
        return F.cross_entropy(out, torch.tensor([c]))

    for i, layer in enumerate(opt.layers):
        exact = 0
        for c in range(3):
            gv = _layer_grad_vec(torch.func.grad(loss_fn)(params, c), f"layers.{i}")
            exact = exact + probs[c] * torch.outer(gv, gv)
        approx = kron_fisher(layer.A, layer.S)
        err = (approx - exact).norm() / exact.norm()
        assert err < 0.05, (layer.name, float(err))


def test_mc_fisher_requires_sampled_backward():
    model = TwoLayer(nn.Linear(3, 2), 2)
    opt = FOP(model, fisher_type="mc")
    F.cross_entropy(model(torch.randn(4, 3)), torch.zeros(4, dtype=torch.long)).backward()
    with pytest.raises(RuntimeError, match="mc_backward"):
        opt.step()


def test_capture_only_in_training_curvature_steps():
    torch.manual_seed(8)
    model = TwoLayer(nn.Linear(3, 2), 2)
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    # every layer on the factor interval's first step (the default staggered capture is tested in test_refresh.py)
    opt = FOP(model, lr=0.1, factor_interval=2, inverse_interval=2, factor_decay=0.0, stagger_capture=False)
    layer = opt.layers[0]
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    model.train()
    opt.eval()
    model(x)
    assert layer.a_sum is None, "captured outside training"
    opt.train()
    model(x)
    assert layer.a_sum is not None  # the same forward captures once every guard is off
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    a_after_first = layer.A.clone()
    assert not opt.capturing  # step 1 is not a factor step with factor_interval=2
    F.cross_entropy(model(x * 3), y).backward()
    assert layer.a_sum is None
    opt.step()
    assert torch.equal(layer.A, a_after_first)
    assert opt.capturing
    assert opt.diagnostics()["factor_updates"] == 1.0


def test_running_average_decay():
    torch.manual_seed(9)
    model = TwoLayer(nn.Linear(3, 2), 2)
    opt = FOP(model, lr=0.0, factor_decay=0.25, factor_interval=1)
    xs = [torch.randn(5, 3), torch.randn(5, 3)]
    for x in xs:
        F.cross_entropy(model(x), torch.zeros(5, dtype=torch.long)).backward()
        opt.step()
        opt.zero_grad()
    a1, a2 = (_ones_col(x).T @ _ones_col(x) / 5 for x in xs)
    assert torch.allclose(opt.layers[0].A, 0.25 * a1 + 0.75 * a2, atol=1e-6)


def test_layer_discovery_types_exclusions_and_tied_weights():
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = GPT2LMHeadModel(cfg)
    layers, skipped = find_layers(model, FOPConfig())
    names = {layer.name for layer in layers}
    assert {layer.kind for layer in layers} == {"conv1d"}
    assert any(n.endswith("attn.c_attn") for n in names)
    assert skipped["lm_head"].startswith("parameter shared")  # tied to the token embedding
    layers2, skipped2 = find_layers(model, FOPConfig(exclude_modules=("*.mlp.*",), max_factor_dim=40))
    assert all(".mlp." not in layer.name for layer in layers2)
    assert any(v == "excluded by name" for v in skipped2.values())
    assert any("max_factor_dim" in v for v in skipped2.values())  # c_attn has out_dim 48
    layers3, skipped3 = find_layers(nn.Sequential(nn.Linear(2, 2), nn.Conv2d(1, 1, 1)), FOPConfig(exclude_types=(nn.Conv2d,)))
    assert [layer.kind for layer in layers3] == ["linear"] and skipped3["1"] == "excluded by type"
    grouped, why = find_layers(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), FOPConfig())
    assert grouped == [] and "grouped" in why["0"]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_does_not_double_count(use_reentrant):
    """Recomputed forwards (gradient_checkpointing) capture each input and output gradient once."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, ckpt: bool):
            super().__init__()
            self.first, self.mid, self.head = nn.Linear(4, 4), nn.Linear(4, 5), nn.Linear(5, 3)
            self.ckpt = ckpt

        def forward(self, x):
            x = self.first(x)
            block = lambda t: torch.tanh(self.mid(t))  # noqa: E731
            h = checkpoint(block, x, use_reentrant=use_reentrant) if self.ckpt else block(x)
            return self.head(h)

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    factors = []
    for ckpt in (False, True):
        torch.manual_seed(10)
        model = Net(ckpt)
        opt = FOP(model, lr=0.0, factor_decay=0.0)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        factors.append([(layer.A, layer.S) for layer in opt.layers])
    for (a0, s0), (a1, s1) in zip(*factors):
        assert torch.allclose(a0, a1) and torch.allclose(s0, s1)


def _tiny_gpt2(seed=13):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def test_mc_fisher_samples_only_real_positions():
    """Right-padded GPT-2 batch, labels -100 on padding and on a prompt: S from the sampled loss over real positions."""
    model = _tiny_gpt2()
    ids = torch.randint(1, 11, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :2] = -100  # a prompt that is not scored
    name = "transformer.h.0.attn.c_attn"
    opt = FOP(model, lr=0.0, adamw_lr=0.0, factor_decay=0.0, fisher_type="mc")
    assert opt.engine.label_shift == 1  # GPT-2 shifts its labels inside the loss
    with opt.padding_mask(mask):
        out = model(ids, attention_mask=mask, labels=labels)
        opt.mc_backward(out.logits, generator=torch.Generator().manual_seed(3), labels=labels)
        out.loss.backward()
    opt.step()
    s_fac = next(layer for layer in opt.layers if layer.name == name).S

    # by hand: the same draws, the loss of example n = sum over its scored positions (labels shifted by one)
    module = dict(model.named_modules())[name]
    kept = {}

    def keep(m, a, output):
        output.retain_grad()
        kept["h"] = output

    handle = module.register_forward_hook(keep)
    logits = model(ids, attention_mask=mask).logits
    handle.remove()
    probs = torch.softmax(logits.detach().reshape(-1, 11), -1)
    sampled = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    scored = torch.zeros(3, 6)
    scored[:, :-1] = (labels[:, 1:] != -100).float()
    scored = scored * mask
    ce = F.cross_entropy(logits.reshape(-1, 11), sampled, reduction="none").reshape(3, 6)
    (ce * scored).sum().backward()
    rows = kept["h"].grad[mask.bool()]
    expected = rows.T @ rows / 3
    assert torch.allclose(s_fac, expected, rtol=1e-4, atol=1e-6 * expected.abs().max())


def test_mc_backward_rejects_labels_or_mask_that_do_not_fit_the_logits():
    model = _tiny_gpt2()
    ids = torch.randint(1, 11, (2, 5))
    opt = FOP(model, fisher_type="mc")
    out = model(ids)
    with pytest.raises(ValueError, match=r"labels of shape \(2, 4\) do not match the logits' positions \(2, 5\)"):
        opt.mc_backward(out.logits, labels=ids[:, :4])
    with pytest.raises(ValueError, match=r"padding mask of shape \(2, 4\) does not match the logits' \(B, T\) = \(2, 5\)"):
        with opt.padding_mask(torch.ones(2, 4)):
            opt.mc_backward(out.logits)


def _hook_count(module):
    return len(module._forward_hooks)


def test_second_fop_on_the_same_model_takes_over_the_hooks():
    torch.manual_seed(14)
    model = TwoLayer(nn.Linear(3, 4), 4)
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    first = FOP(model, lr=0.1)
    with pytest.warns(UserWarning, match="hooks of another live FOP optimizer; that optimizer is released"):
        second = FOP(model, lr=0.1)
    assert _hook_count(model.first) == 1 and _hook_count(model.head) == 1
    F.cross_entropy(model(x), y).backward()
    assert all(layer.a_sum is None for layer in first.layers)  # the first one no longer captures
    assert all(layer.a_sum is not None for layer in second.layers)
    second.step()
    with pytest.raises(RuntimeError, match="was released .*took over"):
        first.step()
    with pytest.raises(RuntimeError, match="was released"):
        first.begin_sub_batch(0)


def test_garbage_collected_fop_stops_capturing():
    model = TwoLayer(nn.Linear(3, 4), 4)
    opt = FOP(model)
    engine = weakref.ref(opt.engine)
    del opt
    gc.collect()
    assert engine() is None  # the hooks do not keep the engine alive
    assert _hook_count(model.first) == 0 and _hook_count(model.head) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing live to take over
        FOP(model)


def _first_compiled_step_captures_nothing(compiled: bool, stagger: bool) -> FOP:
    """A tiny ViT, factors every 2 steps: step 0 eager (a capture step), then steps 1-3 through ``torch.compile``
    (``aot_eager``) when ``compiled``: its first graphs are compiled on step 1, which captures nothing without
    ``stagger`` (as in a run resumed from a checkpoint taken off a capture step), and a share of the layers with it."""
    from trainer_helpers import tiny_vit

    model = tiny_vit()
    gen = torch.Generator().manual_seed(16)
    x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    opt = FOP(model, lr=0.01, factor_interval=2, inverse_interval=2, stagger_capture=stagger)
    for step in range(4):
        net = torch.compile(model, backend="aot_eager") if compiled and step == 1 else (net if step else model)
        for k in (0, 1):
            with opt.sub_batch(k):
                F.cross_entropy(net(pixel_values=x[4 * k : 4 * k + 4]).logits, y[4 * k : 4 * k + 4]).backward()
        opt.step(), opt.zero_grad()
    return opt


@pytest.mark.parametrize("stagger", [False, True], ids=["every_layer_together", "staggered"])
def test_a_model_compiled_off_a_capture_step_still_captures(stagger):
    """Dynamo does not guard on module hooks: hooks that were present only on capture steps were missing from graphs
    first compiled on a step without capture, and the run never captured again (1 factor update instead of 2,
    silently). With the staggered capture each compiled step captures its own share of the layers, as eager does."""
    torch._dynamo.reset()
    try:
        compiled = _first_compiled_step_captures_nothing(compiled=True, stagger=stagger)
    finally:
        torch._dynamo.reset()
    eager = _first_compiled_step_captures_nothing(compiled=False, stagger=stagger)
    layers = len(eager.layers)
    if stagger:  # every layer on step 0, then each on its own step of the two: step 1 or step 2 (and 3)
        assert compiled.counters["factor_updates"] == eager.counters["factor_updates"] == 4
        assert layers * 2 <= eager.counters["layer_factor_updates"] < layers * 3
    else:  # steps 0 and 2
        assert compiled.counters["factor_updates"] == eager.counters["factor_updates"] == 2
        assert eager.counters["layer_factor_updates"] == 2 * layers
    assert compiled.counters["layer_factor_updates"] == eager.counters["layer_factor_updates"]
    for a, b in zip(compiled.layers, eager.layers):
        torch.testing.assert_close(a.A, b.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.S, b.S, rtol=1e-5, atol=1e-6)


def test_release_removes_hooks_and_forbids_further_use():
    model = TwoLayer(nn.Linear(3, 4), 4)
    opt = FOP(model)
    opt.release()
    assert _hook_count(model.first) == 0
    model(torch.randn(2, 3)).sum().backward()
    assert all(layer.a_sum is None for layer in opt.layers)
    with pytest.raises(RuntimeError, match=r"was released \(release\(\) was called\)"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FOP(model)


def test_eigendecomposition_does_not_swallow_out_of_memory(monkeypatch):
    model = TwoLayer(nn.Linear(3, 4), 4)
    opt = FOP(model)
    calls = []
    oom = torch.OutOfMemoryError("injected: out of memory")

    def no_memory(mat):
        raise oom

    monkeypatch.setattr(refresh, "eigh_float32", no_memory)
    monkeypatch.setattr(refresh, "eigh_float64", lambda m: calls.append(1))
    F.cross_entropy(model(torch.randn(4, 3)), torch.zeros(4, dtype=torch.long)).backward()
    with pytest.raises(torch.OutOfMemoryError) as info:
        opt.step()
    assert info.value is oom and calls == []  # propagated unchanged, no float64 retry


def test_capture_hooks_with_a_padding_mask_do_not_synchronise(monkeypatch):
    torch.manual_seed(15)
    model = SeqModel()
    x, y = torch.randn(4, 5, 3), torch.randint(0, 2, (4, 5))
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, 3:] = 0
    opt = FOP(model, lr=0.1)
    counter = SyncCounter(monkeypatch)
    for k in (0, 1):
        with opt.sub_batch(k), opt.padding_mask(mask[2 * k : 2 * k + 2]):
            _token_loss(model(x[2 * k : 2 * k + 2]), y[2 * k : 2 * k + 2]).backward()
    assert opt.capturing and all(layer.a_sum is not None and layer.s_sums for layer in opt.layers)
    assert counter.calls == []


# ---------------------------------------------------------------- capture on a row subsample
def _masked_sequence(seed: int = 0):
    """A Linear layer's (B, T, d) input and output gradient with padding: 6 sequences of 40 tokens, 2 of 3 real."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 40, 5, generator=g)
    grad = torch.randn(6, 40, 3, generator=g)
    mask = (torch.rand(6, 40, generator=g) < 2 / 3).long()
    layer = find_layers(nn.Sequential(nn.Linear(5, 3)), FOPConfig())[0][0]
    return layer, x, grad, curvature.PaddingMask(mask)


@pytest.fixture
def no_draw_margin(monkeypatch):
    """Draw whenever a pass has more rows than ``capture_rows`` (the tiny layers here are below the margin)."""
    monkeypatch.setattr(curvature, "DRAW_MARGIN", 0.0)


def test_capture_draws_only_beyond_the_margin_of_its_width():
    """A pass of N rows of width d draws ``capture_rows`` R of them only when N > R (1 + DRAW_MARGIN / d): below, the
    capture equals reading every row; above, it is a draw (another sum, the same count)."""
    assert curvature.DRAW_MARGIN == 256
    assert not curvature._draws(4096, 256, 2048) and curvature._draws(4097, 256, 2048)
    assert not curvature._draws(2048 * 5, 64, 2048) and curvature._draws(2048 * 5 + 1, 64, 2048)
    assert not curvature._draws(10**9, 64, None) and curvature._draws(33, 64, 32, margin=0.0)
    layer, x, grad, mask = _masked_sequence(2)  # 240 rows, input width 5 + bias, output width 3
    full_a, count = curvature._input_gram(layer, x, mask)
    full_s = curvature._output_gram(layer, grad, mask)
    at = math.ceil(240 / (1 + 256 / 6))  # the smallest R whose margin covers 240 rows of width 6
    a, c = curvature._input_gram(layer, x, mask, at, torch.Generator().manual_seed(0))
    assert torch.equal(a, full_a) and float(c) == float(count)
    below, c = curvature._input_gram(layer, x, mask, at - 1, torch.Generator().manual_seed(0))
    assert not torch.allclose(below, full_a) and float(c) == float(count)
    s_at = math.ceil(240 / (1 + 256 / 3))
    assert torch.equal(curvature._output_gram(layer, grad, mask, s_at, torch.Generator().manual_seed(0)), full_s)
    assert not torch.allclose(curvature._output_gram(layer, grad, mask, s_at - 1, torch.Generator().manual_seed(0)), full_s)


def test_subsampled_capture_uses_the_drawn_rows_exactly(no_draw_margin):
    """With ``capture_rows`` R < N rows: R rows drawn with replacement with probability ``p_i`` proportional to their
    squared norm (bias column and mask included), each scaled by ``1 / sqrt(R p_i)``; A's count stays every real row.
    Checked against the same draws made by hand on the same generator."""
    layer, x, grad, mask = _masked_sequence()
    limit, n = 32, 6 * 40
    w = mask.weights.reshape(-1, 1)
    gram, count = curvature._input_gram(layer, x, mask, limit, torch.Generator().manual_seed(7))
    rows = torch.cat([x.reshape(n, 5), torch.ones(n, 1)], 1) * w
    p = rows.square().sum(1) + torch.finfo(torch.float32).tiny
    index = torch.multinomial(p, limit, replacement=True, generator=torch.Generator().manual_seed(7))
    picked = rows[index] / torch.sqrt(limit * p[index] / p.sum()).reshape(-1, 1)
    torch.testing.assert_close(gram, picked.T @ picked)
    assert float(count) == float(w.sum())
    s_gram = curvature._output_gram(layer, grad, mask, limit, torch.Generator().manual_seed(8))
    g_rows = grad.reshape(n, 3) * w
    p = g_rows.square().sum(1) + torch.finfo(torch.float32).tiny
    index = torch.multinomial(p, limit, replacement=True, generator=torch.Generator().manual_seed(8))
    picked = g_rows[index] / torch.sqrt(limit * p[index] / p.sum()).reshape(-1, 1)
    torch.testing.assert_close(s_gram, picked.T @ picked)


def test_subsampled_capture_is_unbiased_and_full_below_the_limit(no_draw_margin):
    layer, x, grad, mask = _masked_sequence(1)
    full_a, full_count = curvature._input_gram(layer, x, mask)
    full_s = curvature._output_gram(layer, grad, mask)
    same, same_count = curvature._input_gram(layer, x, mask, 240, torch.Generator().manual_seed(0))
    assert torch.equal(same, full_a) and float(same_count) == float(full_count)  # N <= R: every row, no draw
    gen = torch.Generator().manual_seed(1)
    draws = [curvature._input_gram(layer, x, mask, 24, gen) for _ in range(3000)]
    assert all(float(c) == float(full_count) for _, c in draws)
    mean_a = sum(g for g, _ in draws) / 3000
    mean_s = sum(curvature._output_gram(layer, grad, mask, 24, gen) for _ in range(3000)) / 3000
    assert ((mean_a - full_a).norm() / full_a.norm()) < 0.02
    assert ((mean_s - full_s).norm() / full_s.norm()) < 0.02


def test_subsampled_capture_draws_depend_on_the_step_only(no_draw_margin):
    """Two optimizers on the same model and data draw the same rows at every step (resume gives the same draws);
    different steps draw differently."""
    factors = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = FOP(model, lr=0.1, capture_rows=4, factor_decay=0.0, factor_interval=1)
        x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(2)), torch.arange(16) % 3
        seen = []
        for _ in range(2):
            with opt.sub_batch(0):
                F.cross_entropy(model(x[:8]), y[:8]).backward()
            with opt.sub_batch(1):
                F.cross_entropy(model(x[8:]), y[8:]).backward()
            opt.step()
            opt.zero_grad()
            seen.append(opt.layers[0].A.clone())
        factors.append(seen)
    assert torch.equal(factors[0][0], factors[1][0]) and torch.equal(factors[0][1], factors[1][1])
    assert not torch.equal(factors[0][0], factors[0][1])  # another step, other rows (lr 0.1 barely moves x's layer)


def test_capture_rows_must_be_positive():
    with pytest.raises(ValueError, match=r"FOPConfig.capture_rows=0 is invalid: expected None \(every row\) or an integer >= 1"):
        FOPConfig(capture_rows=0)


@pytest.mark.parametrize(
    "rows, cols, dtype",
    [(1024, 769, torch.float32), (1500, 256, torch.bfloat16), (2048, 300, torch.float32), (1023, 769, torch.float32),
     (4096, 100, torch.float32)],
)
def test_gram_equals_the_full_product_and_is_symmetric(rows, cols, dtype):
    # the blocked upper-triangle form (>= 1024 rows, >= 256 columns; columns not a multiple of the blocks) and the
    # one-product form below either threshold give rows^T rows: against float64, and mirrored exactly
    gen = torch.Generator().manual_seed(rows + cols)
    x = torch.randn(rows, cols + 3, generator=gen)[:, 1:-2].to(dtype)  # a strided view, as a sliced activation is
    gram = curvature._gram(x)
    ref = x.double().T @ x.double()
    assert gram.dtype == torch.float32 and gram.shape == (cols, cols)
    torch.testing.assert_close(gram.double(), ref, rtol=1e-5, atol=1e-4 * rows)
    assert torch.equal(gram, gram.T)
