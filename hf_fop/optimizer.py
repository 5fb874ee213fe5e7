"""The FOP optimizer: K-FAC/FOP on Linear, Conv2d and Conv1D layers, AdamW for the rest.

Usage (plain PyTorch)::

    opt = FOP(model, lr=0.05, damping=1e-3)
    with opt.sub_batch(0):
        loss_fn(model(x1), y1).backward()
    with opt.sub_batch(1):
        loss_fn(model(x2), y2).backward()
    opt.step(); opt.zero_grad()

After ``sub_batch(1)`` ends, ``p.grad`` holds ``g_avg = (g1 + g2) / 2`` for
every parameter, so gradient clipping and grad-norm logging see the mean
gradient. A factor applied to ``p.grad`` between the backward passes and
``step()`` (clipping, fp16 unscaling) is applied to ``g1 - g2`` as well.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

from .config import FOPConfig
from .curvature import CurvatureEngine, KFACLayer
from .fop_math import LayerStats, fop_direction_eigen, kfac_direction_eigen, rotate, unrotate

_IDLE, _IN0, _AFTER0, _IN1, _AFTER1 = "idle", "in0", "after0", "in1", "after1"


class FOP(torch.optim.Optimizer):
    """Fisher-Orthogonal Projection optimizer (Lu & Armour, AAAI 2026).

    Args:
        model: the module to train. Its Linear / Conv2d / HF Conv1D layers are
            K-FAC/FOP-managed; every other trainable parameter is updated by AdamW.
        config: a :class:`FOPConfig`; keyword arguments override its fields
            (``FOP(model, lr=0.1, damping=1e-3)``).

    Param groups: ``param_groups[i]["kind"]`` is ``"kfac"`` (managed layers,
    ``lr`` = eta0) or ``"adamw"``; both carry ``lr`` for LR schedulers.
    """

    def __init__(self, model: nn.Module, config: Optional[FOPConfig] = None, **overrides: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FOP expects the model (a torch.nn.Module), got {type(model).__name__}.")
        config = (config or FOPConfig()).replace(**overrides) if overrides else (config or FOPConfig())
        self.config = config
        self.engine = CurvatureEngine(model, config)
        managed = {id(p) for layer in self.engine.layers for p in layer.params}
        kfac_params = [p for layer in self.engine.layers for p in layer.params]
        others = [p for p in _unique_params(model) if p.requires_grad and id(p) not in managed]
        groups: List[Dict[str, Any]] = []
        if kfac_params:
            groups.append(
                {
                    "params": kfac_params,
                    "kind": "kfac",
                    "lr": config.lr,
                    "momentum": config.momentum,
                    "weight_decay": config.weight_decay,
                }
            )
        else:
            warnings.warn(
                f"FOP found no Linear, Conv2d or Conv1D layer to manage in {type(model).__name__} "
                f"(left out: {self.engine.skipped or 'none found'}); every parameter is updated by AdamW.",
                UserWarning,
                stacklevel=2,
            )
        if others:
            groups.append(
                {
                    "params": others,
                    "kind": "adamw",
                    "lr": config.effective_adamw_lr,
                    "betas": config.adamw_betas,
                    "eps": config.adamw_eps,
                    "weight_decay": config.adamw_weight_decay,
                }
            )
        if not groups:
            raise ValueError(f"FOP got a model with no trainable parameter ({type(model).__name__}).")
        super().__init__(groups, {"lr": config.lr})
        self._layer_params = [p for layer in self.engine.layers for p in layer.params]
        self.global_step = 0
        self.counters = {"factor_updates": 0, "inverse_updates": 0, "skipped_steps": 0, "fallback_steps": 0}
        self._phase = _IDLE
        self._g1: Dict[Tensor, Tensor] = {}
        self._diff: Dict[Tensor, Tensor] = {}
        self._avg_norm: Optional[Tensor] = None
        self.w1 = 0.5
        """Weight of g1 in ``g_avg = w1 g1 + (1 - w1) g2`` (0.5 unless groups are unequal)."""
        self.factor_reducer: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
        """Distributed hook: maps this process's new factors ``{name: (A, S)}`` to the global ones."""
        self._last_stats: Dict[str, LayerStats] = {}
        self._last_dampings: Dict[str, Any] = {}
        self._last_kl_clip_scale: Optional[Tensor] = None
        self._last_fallback = False
        self._schedule_capture()

    # ------------------------------------------------------------ sub-batches
    def _all_params(self) -> Iterator[Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    @contextlib.contextmanager
    def sub_batch(self, index: int) -> Iterator[None]:
        """Backward passes inside accumulate into sub-batch ``index`` (0 gives g1, 1 gives g2)."""
        self.begin_sub_batch(index)
        try:
            yield
        finally:
            self.end_sub_batch(index)

    def begin_sub_batch(self, index: int) -> None:
        """Start (or continue) sub-batch ``index``; see :meth:`sub_batch`."""
        if index not in (0, 1) or isinstance(index, bool):
            raise ValueError(f"sub_batch index must be 0 (gives g1) or 1 (gives g2), got {index!r}.")
        if index == 0 and self._phase not in (_IDLE, _AFTER0):
            raise RuntimeError(
                f"sub_batch(0) cannot start now (state: {self._phase}): sub-batch 1 of this step was already "
                "given. Call step() (or zero_grad() to discard) before starting the next step's sub-batch 0."
            )
        if index == 1 and self._phase not in (_AFTER0, _AFTER1):
            raise RuntimeError(
                f"sub_batch(1) cannot start now (state: {self._phase}): run sub_batch(0) first; "
                "sub-batch 0 gives g1 and sub-batch 1 gives g2."
            )
        if index == 0 and self._phase == _IDLE and any(p.grad is not None for p in self._all_params()):
            raise RuntimeError(
                "sub_batch(0) started while parameters already hold gradients from a plain backward(); "
                "call zero_grad() first or run every backward of the step inside sub_batch()."
            )
        if index == 1:
            for p in self._all_params():  # continue g2 from what sub-batch 1 gave so far (None at first)
                p.grad = (self._g1[p] - self._diff[p]) if (self._phase == _AFTER1 and p in self._diff) else None
        self._phase = _IN0 if index == 0 else _IN1
        self.engine.group = index

    def end_sub_batch(self, index: int) -> None:
        """Close sub-batch ``index``; after sub-batch 1, ``p.grad`` holds ``g_avg``."""
        expected = _IN0 if index == 0 else _IN1
        if self._phase != expected:
            raise RuntimeError(f"end_sub_batch({index}) without a matching begin_sub_batch({index}).")
        self.engine.group = -1
        if index == 0:
            for p in self._all_params():
                if p.grad is not None:
                    self._g1[p] = p.grad if p not in self._g1 else self._g1[p] + p.grad
                    p.grad = None
            self._phase = _AFTER0
            return
        self.set_dual_gradients({p: p.grad for p in self._all_params() if p.grad is not None}, keep_g1=True)

    def set_dual_gradients(
        self, g2: Dict[Tensor, Tensor], g1: Optional[Dict[Tensor, Tensor]] = None, keep_g1: bool = False
    ) -> None:
        """Install g1 and g2 (``{param: gradient}``); sets ``p.grad = w1 g1 + (1 - w1) g2``.

        Used by :meth:`end_sub_batch` and by the distributed reduction. A
        parameter missing from one side counts as a zero gradient there.
        """
        if g1 is not None:
            self._g1 = dict(g1)
        w1 = self.w1
        params, firsts, seconds = [], [], []
        for p in self._all_params():
            a, b = self._g1.get(p), g2.get(p)
            if a is None and b is None:
                continue
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            if a.shape != b.shape:
                raise RuntimeError(
                    f"g1 and g2 differ in shape for a parameter of shape {tuple(p.shape)}: "
                    f"{tuple(a.shape)} vs {tuple(b.shape)}."
                )
            params.append(p)
            firsts.append(a)
            seconds.append(b)
        if params:  # g1 - g2 and w1 g1 + (1 - w1) g2, batched with torch._foreach_*
            diffs = torch._foreach_sub(firsts, seconds)
            avgs = torch._foreach_lerp(firsts, seconds, 1 - w1)  # g1 + (1 - w1)(g2 - g1), one pass
            for p, a, d, g in zip(params, firsts, diffs, avgs):
                self._g1[p] = a
                self._diff[p] = d
                p.grad = g
        norms = torch._foreach_norm([p.grad.detach().float() for p in self._diff]) if self._diff else []
        self._avg_norm = torch.stack(norms).norm() if norms else None
        self._phase = _AFTER1
        if not keep_g1:
            self._g1 = {}

    # ---------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> None:
        """Enable curvature capture (the Trainer calls this when it trains)."""
        self.engine.enabled = mode

    def eval(self) -> None:
        """Disable curvature capture (the Trainer calls this before evaluation)."""
        self.train(False)

    def mc_backward(self, logits: Tensor, generator: Optional[torch.Generator] = None) -> None:
        """``fisher_type="mc"``: sampled-label backward for S (see :meth:`CurvatureEngine.mc_backward`)."""
        self.engine.mc_backward(logits, generator)

    @contextlib.contextmanager
    def padding_mask(self, mask: Optional[Tensor]) -> Iterator[None]:
        """Forward and backward passes inside exclude padded tokens (``mask``: ``(B, T)``, 1 = real)."""
        previous = self.engine.padding_mask
        self.engine.padding_mask = mask
        try:
            yield
        finally:
            self.engine.padding_mask = previous

    def set_grad_scale(self, scale: float) -> None:
        """Loss scale (fp16 GradScaler) of the coming backward passes, divided out of S."""
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"set_grad_scale(scale={scale!r}): expected a finite number > 0.")
        self.engine.grad_scale = float(scale)

    @property
    def capturing(self) -> bool:
        """Whether the coming forward/backward passes capture curvature (a factor-update step)."""
        return self.engine.capture

    def _schedule_capture(self) -> None:
        self.engine.capture = self.global_step % self.config.factor_interval == 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients and discard unfinished sub-batches and curvature captures."""
        super().zero_grad(set_to_none=set_to_none)
        self._discard_step_buffers()

    def _discard_step_buffers(self) -> None:
        self._g1, self._diff, self._avg_norm = {}, {}, None
        self._phase = _IDLE
        self.engine.clear_capture()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One FOP (or K-FAC) update of managed layers and AdamW update of the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._phase in (_IN0, _IN1):
            raise RuntimeError("step() called inside a sub_batch() block; call it after the block ends.")
        if self._phase == _AFTER0:  # only one sub-batch: K-FAC on g1
            for p, g in self._g1.items():
                p.grad = g
            self._g1 = {}
        dual = self._phase == _AFTER1
        use_fop = self.config.mode == "fop" and dual
        diffs = {p: self._diff[p] for p in self._layer_params if p in self._diff} if use_fop else {}
        t0 = time.perf_counter()
        new_factors = self.engine.finalize_capture() if self.engine.capture else {}
        if self.engine.capture and self.factor_reducer is not None:
            new_factors = self.factor_reducer(new_factors)
        seconds_finalize = time.perf_counter() - t0
        if not self._all_finite(diffs, new_factors):
            self.counters["skipped_steps"] += 1
            self._discard_step_buffers()
            self._schedule_capture()
            return loss
        t0 = time.perf_counter()
        if new_factors:
            self.engine.update_factors(new_factors)
            self.counters["factor_updates"] += 1
        if self.global_step % self.config.inverse_interval == 0 and any(layer.A is not None for layer in self.engine.layers):
            self.engine.update_eigenbases()
            self.counters["inverse_updates"] += 1
        elif new_factors:
            self.engine.update_eigenbases(only_missing=True)
        self.engine.seconds += seconds_finalize
        self._last_fallback = self.config.mode == "fop" and not dual
        if self._last_fallback:
            self.counters["fallback_steps"] += 1
        for group in self.param_groups:
            if group["kind"] == "kfac":
                self._kfac_group_step(group, diffs if use_fop else None, self._diff_ratio() if use_fop else None)
            else:
                self._adamw_group_step(group)
        self.global_step += 1
        self._discard_step_buffers()
        self._schedule_capture()
        return loss

    def _diff_ratio(self) -> Optional[Tensor]:
        """The factor ``p.grad`` (= g_avg) received since the sub-batches ended (clipping, fp16 unscaling).

        ``||p.grad now|| / ||g_avg||`` over all parameters, a 0-dim tensor; FOP
        applies it to ``g1 - g2``. ``None`` when there is nothing to compare.
        """
        if self._avg_norm is None:
            return None
        grads = [p.grad.detach().float() for p in self._diff if p.grad is not None]
        now = torch.stack(torch._foreach_norm(grads)).norm() if grads else self._avg_norm
        return torch.where(self._avg_norm > 0, now / self._avg_norm.clamp_min(torch.finfo(torch.float32).tiny), 1.0)

    def _all_finite(self, diffs: Dict[Tensor, Tensor], new_factors: Dict[str, Any]) -> bool:
        sums = [p.grad.float().sum() for p in self._all_params() if p.grad is not None]
        sums += [d.float().sum() for d in diffs.values()]
        sums += [f.sum() for pair in new_factors.values() for f in pair]
        return bool(torch.isfinite(torch.stack(sums).sum())) if sums else True

    def _kfac_group_step(
        self, group: Dict[str, Any], diffs: Optional[Dict[Tensor, Tensor]], diff_ratio: Optional[Tensor]
    ) -> None:
        """Precondition and apply the managed layers' updates; ``diffs`` (g1 - g2, times ``diff_ratio``) selects FOP.

        Two passes: every layer's direction first, then the trust-region scale
        (:meth:`_kl_clip_scale`), then momentum, weight decay and the update.
        """
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        in_group = {id(p) for p in group["params"]}
        stats: Dict[str, LayerStats] = {}
        dampings: Dict[str, Any] = {}
        directions: List[Any] = []
        for layer in self.engine.iter_ready():
            if id(layer.weight) not in in_group:
                continue
            w, b = layer.weight, layer.bias
            if w.grad is None and (b is None or b.grad is None):
                continue
            q_s, s = layer.basis_s.q, layer.basis_s.eigenvalues
            q_a, a = layer.basis_a.q, layer.basis_a.eigenvalues
            damping = self._layer_damping(s, a)
            g_hat = rotate(layer.grad_matrix(_grad(w), _grad(b)), q_s, q_a)
            if diffs is not None and (w in diffs or (b is not None and b in diffs)):
                d_w = diffs[w] if w in diffs else torch.zeros_like(w)
                d_hat = rotate(layer.grad_matrix(d_w, diffs.get(b) if b is not None else None), q_s, q_a)
                if diff_ratio is not None:
                    d_hat.mul_(diff_ratio)
                dir_hat, st = fop_direction_eigen(
                    g_hat, d_hat, s, a, damping, self.config.eps, self.config.use_beta, self.config.use_eta
                )
            else:
                dir_hat, st = kfac_direction_eigen(g_hat, s, a, damping)
            stats[layer.name] = st
            dampings[layer.name] = damping
            directions.append((layer, dir_hat))
        scale = self._kl_clip_scale(directions, stats, dampings, lr)
        for layer, dir_hat in directions:
            if scale is not None:
                dir_hat = dir_hat * scale
            q_s, q_a = layer.basis_s.q, layer.basis_a.q
            dw, db = layer.split_matrix(unrotate(dir_hat, q_s, q_a))
            for p, d in ((layer.weight, dw), (layer.bias, db)):
                if p is None:
                    continue
                d = d.to(p.dtype)
                if momentum > 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = buf = d.clone()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                if wd > 0:
                    p.mul_(1 - lr * wd)
                p.add_(d, alpha=-lr)
        self._last_stats = stats
        self._last_dampings = dampings
        self._last_kl_clip_scale = scale

    # ------------------------------------------------- damping, trust region
    def _layer_damping(self, s: Tensor, a: Tensor) -> Any:
        """lambda of one layer: ``damping`` (absolute), or ``damping * mean(eig A) * mean(eig S)`` (relative).

        ``s``, ``a``: eigenvalues of S ``(out,)`` and A ``(in,)``. The relative
        value is a 0-dim tensor (no host sync), recomputed from the stored
        eigenvalues, so it changes only at an eigendecomposition and a resumed
        run sees the same bits. It is floored at the smallest normal float32
        so that a layer whose factors are all zero still has ``M > 0``.
        """
        if self.config.damping_mode == "absolute":
            return self.config.damping
        mean_eig = (a.mean() * s.mean()).clamp_min(torch.finfo(torch.float32).tiny)
        return self.config.damping * mean_eig

    def _kl_clip_scale(
        self, directions: List[Any], stats: Dict[str, LayerStats], dampings: Dict[str, Any], lr: float
    ) -> Optional[Tensor]:
        """Trust-region factor ``nu = min(1, sqrt(kl_clip / (lr^2 sum_l Delta_l^T M_l Delta_l)))`` or ``None``.

        ``Delta_l`` is layer l's direction for lr = 1 (before momentum) and
        ``M_l = A (x) S + lambda_l I`` the damped curvature that preconditions it
        (as PyTorch K-FAC implementations do: their ``v . g`` is ``Delta^T M Delta``).
        ``Delta^T M Delta = kl_base + kl_cross + kl_orth + lambda ||Delta||^2``: the
        stats' KL terms plus one dot product per layer (the eigenbasis rotation
        preserves the norm). A 0-dim tensor, no host sync.
        """
        if self.config.kl_clip is None or not directions:
            return None
        terms = []
        for layer, dir_hat in directions:
            st = stats[layer.name]
            flat = dir_hat.reshape(-1)
            terms.append(st.kl_base + st.kl_cross + st.kl_orth + dampings[layer.name] * torch.dot(flat, flat))
        total = (torch.stack(terms).sum() * (lr * lr)).clamp_min(0.0)  # rounding cannot make it negative
        return torch.clamp(torch.sqrt(self.config.kl_clip / total), max=1.0)

    def _adamw_group_step(self, group: Dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        params, grads, avgs, sqs, ts = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1  # a CPU scalar: reading it back does not synchronise a GPU
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            ts.append(state["step"].item())
        if not params:
            return
        # Same element-wise operations as the per-parameter form, batched with torch._foreach_*.
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_div(sqs, [1 - beta2**t for t in ts])
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
        if wd > 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_addcdiv_(params, avgs, denoms, [-lr / (1 - beta1**t) for t in ts])

    # ----------------------------------------------------------- diagnostics
    def diagnostics(self) -> Dict[str, float]:
        """Scalars of the last step: per layer ``{name}/beta`` etc., aggregates and counters.

        ``beta``/``eta``/``s_proj`` aggregates are means over layers; ``damping_min``/``damping_max``
        the range of the layers' lambda; ``kl_clip_scale`` the trust-region factor nu (with ``kl_clip``); ``kl_*``
        are sums over layers of the KL-norm split (per unit lr^2);
        ``fallback`` is 1.0 when the last step fell back to K-FAC (one sub-batch).
        """
        out: Dict[str, float] = {
            "step": float(self.global_step),
            "curvature_seconds": float(self.engine.seconds),
            "fallback": float(self._last_fallback),
            "managed_layers": float(len(self.engine.layers)),
        }
        out.update({k: float(v) for k, v in self.counters.items()})
        if self._last_stats:
            names = list(self._last_stats)
            fields = ("beta", "eta", "s_proj", "kl_base", "kl_cross", "kl_orth")
            stacked = torch.stack([torch.stack([getattr(self._last_stats[n], f).float() for f in fields]) for n in names]).cpu()
            for i, name in enumerate(names):
                for j, f in enumerate(fields):
                    out[f"{name}/{f}"] = float(stacked[i, j])
            means = stacked.mean(0)
            sums = stacked.sum(0)
            for j, f in enumerate(fields):
                out[f"{f}_mean" if j < 3 else f] = float(means[j] if j < 3 else sums[j])
            out.update(self._damping_diagnostics())
        return out

    def _damping_diagnostics(self) -> Dict[str, float]:
        """``damping_min``/``damping_max`` over layers of the last step and ``kl_clip_scale`` (with ``kl_clip``)."""
        values = list(self._last_dampings.values())
        out: Dict[str, float] = {}
        if values and not any(torch.is_tensor(v) for v in values):
            out["damping_min"], out["damping_max"] = min(values), max(values)
        elif values:  # relative damping: 0-dim tensors on the device, read back in one transfer
            lams = torch.stack(values).float()
            out["damping_min"], out["damping_max"] = (float(v) for v in torch.stack([lams.min(), lams.max()]).cpu())
        if self._last_kl_clip_scale is not None:
            out["kl_clip_scale"] = float(self._last_kl_clip_scale)
        return out

    # ----------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Torch optimizer state plus ``"fop"``: step, counters and curvature (tensors and plain values only)."""
        state = super().state_dict()
        state["fop"] = {
            "global_step": self.global_step,
            "counters": dict(self.counters),
            "curvature_seconds": float(self.engine.seconds),
            "layers": self.engine.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        fop_state = state_dict.pop("fop", None)
        if fop_state is None:
            raise ValueError("This state_dict was not written by hf_fop.FOP (no 'fop' entry).")
        super().load_state_dict(state_dict)
        self.engine.load_state_dict(fop_state["layers"])
        self.global_step = int(fop_state["global_step"])
        self.counters = {k: int(v) for k, v in fop_state["counters"].items()}
        self.engine.seconds = float(fop_state.get("curvature_seconds", 0.0))
        self._discard_step_buffers()
        self._last_stats, self._last_dampings, self._last_kl_clip_scale = {}, {}, None
        self._schedule_capture()

    @property
    def layers(self) -> List[KFACLayer]:
        """The managed layers (name, module, curvature state)."""
        return self.engine.layers


def _grad(p: Optional[Tensor]) -> Optional[Tensor]:
    if p is None:
        return None
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _unique_params(model: nn.Module) -> List[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
