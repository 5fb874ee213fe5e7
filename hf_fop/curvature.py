"""K-FAC curvature capture: which layers are managed, their factors A and S, and eigenbases.

Conventions (FOP_SPEC, per managed layer with gradient matrix ``G`` of shape
``(out, in)``, bias as the last input column):

* ``A = E[a a^T]`` over every input row seen during a curvature step:
  examples, and tokens / spatial positions of an example (K-FAC "expand",
  Eschenhagen et al. 2023). Rows excluded by a padding mask do not count.
  ``a`` carries a trailing 1 when the layer has a bias.
* ``S = E_n[sum_r s_nr s_nr^T]``, ``s_nr`` the gradient of example ``n``'s
  loss w.r.t. the layer output at position ``r``. The engine sees gradients
  of a *mean* loss, so within one gradient group (a sub-batch, or one
  process's batch) of ``B`` examples it rescales: ``S_group = B * sum g g^T``.
  Groups combine weighted by their example counts. Gradient accumulation
  over micro-batches of one group is covered as long as the group's loss is
  the mean over the group's examples (as with ``loss / k`` per micro-batch).
  The example count is the leading (batch) dimension of the layer output.
* Factors are float32 whatever the autocast or parameter dtype.
"""

from __future__ import annotations

import fnmatch
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FOPConfig

try:  # GPT-2 style layers; transformers is a dependency but keep the engine importable without it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]


@dataclass
class EigenBasis:
    """Eigendecomposition of one factor: ``factor = q @ diag(eigenvalues) @ q.T``."""

    q: Tensor
    eigenvalues: Tensor


@dataclass
class KFACLayer:
    """One managed module and its curvature state."""

    name: str
    module: nn.Module
    kind: str  # "linear", "conv2d" or "conv1d"
    in_dim: int  # including the bias column
    out_dim: int
    A: Optional[Tensor] = None
    S: Optional[Tensor] = None
    basis_a: Optional[EigenBasis] = None
    basis_s: Optional[EigenBasis] = None
    eigh_failures: Dict[str, int] = field(default_factory=lambda: {"A": 0, "S": 0})
    # capture accumulators of the current step (transient, never saved)
    a_sum: Optional[Tensor] = None
    a_rows: int = 0
    s_sums: Dict[int, Tensor] = field(default_factory=dict)
    s_examples: Dict[int, int] = field(default_factory=dict)
    outputs: List[Tuple[Tensor, int, Optional[Tensor]]] = field(default_factory=list)

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.module.bias

    @property
    def params(self) -> List[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def grad_matrix(self, weight_grad: Tensor, bias_grad: Optional[Tensor]) -> Tensor:
        """Gradient as an ``(out, in)`` float32 matrix, bias as the last column."""
        if self.kind == "conv1d":
            w = weight_grad.T
        else:
            w = weight_grad.reshape(self.out_dim, -1)
        w = w.float()
        if self.bias is None:
            return w
        b = torch.zeros(self.out_dim, device=w.device) if bias_grad is None else bias_grad.float()
        return torch.cat([w, b.reshape(-1, 1)], dim=1)

    def split_matrix(self, mat: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Inverse of :meth:`grad_matrix`: ``(weight-shaped, bias or None)``."""
        n_w = self.in_dim - (1 if self.bias is not None else 0)
        w = mat[:, :n_w]
        w = w.T if self.kind == "conv1d" else w.reshape(self.weight.shape)
        b = mat[:, n_w] if self.bias is not None else None
        return w, b

    def clear_capture(self) -> None:
        self.a_sum = None
        self.a_rows = 0
        self.s_sums = {}
        self.s_examples = {}
        self.outputs = []


def _layer_kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    return None


def find_layers(model: nn.Module, config: FOPConfig) -> Tuple[List[KFACLayer], Dict[str, str]]:
    """Managed layers of ``model`` and, for every candidate left out, the reason."""
    owners: Dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    layers: List[KFACLayer] = []
    skipped: Dict[str, str] = {}
    for name, module in model.named_modules():
        kind = _layer_kind(module)
        if kind is None:
            continue
        if config.exclude_types and isinstance(module, config.exclude_types):
            skipped[name] = "excluded by type"
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in config.exclude_modules):
            skipped[name] = "excluded by name"
            continue
        params = [module.weight] + ([module.bias] if module.bias is not None else [])
        if not all(p.requires_grad for p in params):
            skipped[name] = "frozen parameters"
            continue
        if any(owners.get(id(p), 0) > 1 for p in params):
            skipped[name] = "parameter shared with another module (tied weights)"
            continue
        if kind == "conv2d" and (module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)):
            skipped[name] = "grouped, non-zero-padded or string-padded convolution"
            continue
        has_bias = module.bias is not None
        if kind == "conv1d":
            in_dim, out_dim = module.weight.shape[0], module.weight.shape[1]
        else:
            out_dim = module.weight.shape[0]
            in_dim = module.weight[0].numel()
        in_dim += int(has_bias)
        if max(in_dim, out_dim) > config.max_factor_dim:
            skipped[name] = f"factor dimension {max(in_dim, out_dim)} > max_factor_dim={config.max_factor_dim}"
            continue
        layers.append(KFACLayer(name=name, module=module, kind=kind, in_dim=in_dim, out_dim=out_dim))
    return layers, skipped


def _input_rows(layer: KFACLayer, x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Layer input as float32 rows ``(rows, in)`` (expand convention), bias column appended."""
    module = layer.module
    if layer.kind == "conv2d":
        if x.dim() == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        rows = _masked_rows(x, mask)
    rows = rows.float()
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def _masked_rows(t: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``(..., d)`` to ``(rows, d)``; a ``(B, T)`` mask drops padded positions of ``(B, T, d)``."""
    if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask.to(torch.bool)]
    return t.reshape(-1, t.shape[-1])


def _output_rows(layer: KFACLayer, g: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Output gradient as float32 rows ``(rows, out)``."""
    if layer.kind == "conv2d":
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).float()
    return _masked_rows(g, mask).float()


def _gram(rows: Tensor) -> Tensor:
    """``rows^T rows`` in float32, outside any autocast region: ``(n, d) -> (d, d)``."""
    with torch.autocast(device_type=rows.device.type, enabled=False):
        rows = rows.float()
        return rows.T @ rows


def _batch_size(t: Tensor) -> int:
    return t.shape[0] if t.dim() >= 2 else 1


def eigh_float32(mat: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` in float32: ``(eigenvalues (n,), eigenvectors (n, n))``."""
    return torch.linalg.eigh(mat.float())


def eigh_float64(mat: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` in float64, results cast to float32."""
    vals, vecs = torch.linalg.eigh(mat.double())
    return vals.float(), vecs.float()


class CurvatureEngine:
    """Hooks on the managed layers, capture of A and S, running averages, eigenbases.

    The optimizer drives it: it sets :attr:`capture` before the forward
    passes of a curvature step, and calls :meth:`finalize_capture`,
    :meth:`update_factors` and :meth:`update_eigenbases` in ``step()``.
    """

    def __init__(self, model: nn.Module, config: FOPConfig) -> None:
        self.config = config
        self.layers, self.skipped = find_layers(model, config)
        self.capture = False
        """Set by the optimizer: the coming forward/backward passes belong to a curvature step."""
        self.enabled = True
        """False in evaluation mode (``FOP.eval()``): nothing is captured."""
        self.group = -1
        """Index of the gradient group being captured (sub-batch 0/1; -1 outside ``sub_batch``)."""
        self.padding_mask: Optional[Tensor] = None
        """``(B, T)`` mask of real (1) vs padded (0) tokens for the next forward/backward."""
        self.grad_scale = 1.0
        """Loss scale of the coming backward passes (fp16 GradScaler); divided out of the captured gradients."""
        self.seconds = 0.0
        """Host wall-clock seconds spent in capture, factor updates and eigendecompositions."""
        self._handles = [layer.module.register_forward_hook(self._make_forward_hook(layer)) for layer in self.layers]

    # ----------------------------------------------------------------- hooks
    def _active(self, module: nn.Module) -> bool:
        return self.capture and self.enabled and module.training and torch.is_grad_enabled()

    def _make_forward_hook(self, layer: KFACLayer) -> Callable:
        def hook(module: nn.Module, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
            if not self._active(module) or not output.requires_grad:
                return
            t0 = time.perf_counter()
            mask = self.padding_mask
            rows = _input_rows(layer, inputs[0].detach(), mask)
            contrib = _gram(rows)
            layer.a_sum = contrib if layer.a_sum is None else layer.a_sum + contrib
            layer.a_rows += rows.shape[0]
            group = self.group
            if self.config.fisher_type == "mc":
                layer.outputs.append((output, group, mask))
            else:
                output.register_hook(self._make_grad_hook(layer, group, mask, self.grad_scale))
            self.seconds += time.perf_counter() - t0

        return hook

    def _make_grad_hook(self, layer: KFACLayer, group: int, mask: Optional[Tensor], scale: float) -> Callable:
        def hook(grad: Tensor) -> None:
            t0 = time.perf_counter()
            self._add_output_grad(layer, grad, group, mask, scale)
            self.seconds += time.perf_counter() - t0

        return hook

    def _add_output_grad(self, layer: KFACLayer, grad: Tensor, group: int, mask: Optional[Tensor], scale: float) -> None:
        rows = _output_rows(layer, grad.detach(), mask)
        if scale != 1.0:
            rows = rows / scale
        contrib = _gram(rows)
        layer.s_sums[group] = contrib if group not in layer.s_sums else layer.s_sums[group] + contrib
        layer.s_examples[group] = layer.s_examples.get(group, 0) + _batch_size(grad)

    def mc_backward(self, logits: Tensor, generator: Optional[torch.Generator] = None) -> None:
        """Monte-Carlo Fisher: sample labels from ``softmax(logits)`` and capture S from them.

        ``logits``: ``(B, C)`` or ``(B, T, C)``. The sampled loss is the sum of
        cross-entropies over positions, averaged over the ``B`` examples.
        Parameter gradients are not touched. No-op outside curvature steps or
        when ``fisher_type != "mc"``.
        """
        if self.config.fisher_type != "mc" or not self.capture or not self.enabled:
            return
        pending = [(layer, out, group, mask) for layer in self.layers for (out, group, mask) in layer.outputs]
        for layer in self.layers:
            layer.outputs = []
        if not pending:
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        flat = logits.float().reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(flat, sampled, reduction="sum") / _batch_size(logits)
        grads = torch.autograd.grad(loss, [out for _, out, _, _ in pending], retain_graph=True, allow_unused=True)
        for (layer, out, group, mask), grad in zip(pending, grads):
            if grad is not None:
                self._add_output_grad(layer, grad, group, mask, 1.0)
        self.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------- factors
    def finalize_capture(self) -> Dict[str, Tuple[Tensor, Tensor]]:
        """This step's factors ``{name: (A_new (in, in), S_new (out, out))}`` from the accumulators.

        Layers that saw no input (unused this step) are left out. Raises when
        the ``mc`` Fisher was selected but :meth:`mc_backward` was not called.
        """
        new: Dict[str, Tuple[Tensor, Tensor]] = {}
        for layer in self.layers:
            if layer.a_sum is None or layer.a_rows == 0:
                continue
            if not layer.s_sums:
                if self.config.fisher_type == "mc":
                    raise RuntimeError(
                        f"fisher_type='mc' but no sampled backward reached layer {layer.name!r}: call "
                        "opt.mc_backward(logits) after the forward pass of every curvature step "
                        "(FOPTrainer does this for you), or use fisher_type='empirical'."
                    )
                continue
            total = sum(layer.s_examples.values())
            s_new = sum(layer.s_sums[g] * (layer.s_examples[g] ** 2) for g in layer.s_sums) / total
            new[layer.name] = (layer.a_sum / layer.a_rows, s_new)
        return new

    def clear_capture(self) -> None:
        for layer in self.layers:
            layer.clear_capture()
        self.padding_mask = None

    def update_factors(self, new: Dict[str, Tuple[Tensor, Tensor]]) -> None:
        """Running averages ``X <- decay X + (1 - decay) X_new`` (the first update takes ``X_new``)."""
        t0 = time.perf_counter()
        decay = self.config.factor_decay
        for layer in self.layers:
            if layer.name not in new:
                continue
            a_new, s_new = new[layer.name]
            if layer.A is None:
                layer.A, layer.S = a_new.clone(), s_new.clone()
            else:
                layer.A.mul_(decay).add_(a_new, alpha=1 - decay)
                layer.S.mul_(decay).add_(s_new, alpha=1 - decay)
        self.seconds += time.perf_counter() - t0

    def update_eigenbases(self, only_missing: bool = False) -> None:
        """Eigendecompose every A and S: float32, then float64, else keep the last good basis.

        ``only_missing``: only layers that have factors but no basis yet.
        """
        t0 = time.perf_counter()
        for layer in self.layers:
            if layer.A is None or (only_missing and layer.basis_a is not None):
                continue
            layer.basis_a = self._decompose(layer, "A", layer.A, layer.basis_a)
            layer.basis_s = self._decompose(layer, "S", layer.S, layer.basis_s)
        self.seconds += time.perf_counter() - t0

    def _decompose(self, layer: KFACLayer, which: str, mat: Tensor, last: Optional[EigenBasis]) -> EigenBasis:
        for solver in (eigh_float32, eigh_float64):
            try:
                vals, vecs = solver(mat)
            except RuntimeError:
                continue
            if torch.isfinite(vals).all() and torch.isfinite(vecs).all():
                layer.eigh_failures[which] = 0
                return EigenBasis(q=vecs.contiguous(), eigenvalues=vals.clamp_min(0.0))
        layer.eigh_failures[which] += 1
        if layer.eigh_failures[which] >= self.config.max_eigh_failures:
            raise RuntimeError(
                f"Eigendecomposition of factor {which} of layer {layer.name!r} failed "
                f"{layer.eigh_failures[which]} times in a row (float32 and float64); raise damping or "
                f"max_eigh_failures={self.config.max_eigh_failures}, or exclude the layer (exclude_modules)."
            )
        warnings.warn(
            f"Eigendecomposition of factor {which} of layer {layer.name!r} failed in float32 and float64; "
            "keeping the last good basis.",
            RuntimeWarning,
            stacklevel=3,
        )
        if last is not None:
            return last
        # No good basis yet: the diagonal approximation of the factor.
        diag = torch.nan_to_num(torch.diagonal(mat).float(), nan=0.0, posinf=0.0).clamp_min(0.0)
        return EigenBasis(q=torch.eye(mat.shape[0], device=mat.device), eigenvalues=diag)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Dict[str, object]]:
        out: Dict[str, Dict[str, object]] = {}
        for layer in self.layers:
            entry: Dict[str, object] = {"eigh_failures_A": layer.eigh_failures["A"], "eigh_failures_S": layer.eigh_failures["S"]}
            for key, value in (("A", layer.A), ("S", layer.S)):
                if value is not None:
                    entry[key] = value.clone()
            for key, basis in (("a", layer.basis_a), ("s", layer.basis_s)):
                if basis is not None:
                    entry[f"q_{key}"] = basis.q.clone()
                    entry[f"eig_{key}"] = basis.eigenvalues.clone()
            out[layer.name] = entry
        return out

    def load_state_dict(self, state: Dict[str, Dict[str, object]]) -> None:
        names = {layer.name for layer in self.layers}
        if set(state) != names:
            raise ValueError(
                "FOP state does not match the model's managed layers: "
                f"missing {sorted(names - set(state))}, unexpected {sorted(set(state) - names)}."
            )
        for layer in self.layers:
            entry = state[layer.name]
            device = layer.weight.device

            def get(key: str) -> Optional[Tensor]:
                value = entry.get(key)
                return None if value is None else value.to(device=device, dtype=torch.float32).clone()

            layer.A, layer.S = get("A"), get("S")
            qa, ea, qs, es = get("q_a"), get("eig_a"), get("q_s"), get("eig_s")
            layer.basis_a = EigenBasis(qa, ea) if qa is not None else None
            layer.basis_s = EigenBasis(qs, es) if qs is not None else None
            layer.eigh_failures = {"A": int(entry.get("eigh_failures_A", 0)), "S": int(entry.get("eigh_failures_S", 0))}
            layer.clear_capture()

    def iter_ready(self) -> Iterator[KFACLayer]:
        """Layers with an eigenbasis (ready to precondition)."""
        return (layer for layer in self.layers if layer.basis_a is not None and layer.basis_s is not None)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
