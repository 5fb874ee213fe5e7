"""K-FAC curvature capture: which layers are managed, their factors A and S, and eigenbases.

Conventions (FOP_SPEC, per managed layer with gradient matrix ``G`` of shape
``(out, in)``, bias as the last input column):

* ``A = E[a a^T]`` over every input row seen during a curvature step:
  examples, and tokens / spatial positions of an example (K-FAC "expand",
  Eschenhagen et al. 2023). Rows excluded by a padding mask do not count.
  ``a`` carries a trailing 1 when the layer has a bias.
* Padding masks (``(B, T)``, nonzero = real token) apply to 3-D ``(B, T, d)``
  activations of Linear / Conv1D layers and must match their ``(B, T)``
  exactly (a mismatch raises naming both shapes); 2-D activations (pooled
  heads) and Conv2d count every row. They are applied by multiplying rows
  by the mask (no host synchronisation). Encoder-decoder models
  (``config.is_encoder_decoder``): the mask applies to the modules inside
  ``model.get_encoder()`` only; decoder modules (cross-attention included)
  count every position.
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
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FOPConfig
from .profiling import scope


def _conv1d_class() -> Optional[type]:
    """transformers' ``Conv1D`` (GPT-2 style layers) if its module is loaded, else ``None``.

    A model holding a ``Conv1D`` has imported ``transformers.pytorch_utils``, so looking it up in ``sys.modules``
    finds every such layer without importing transformers (about 2 s per process) for models that have none.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


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
    a_rows: Union[int, Tensor] = 0  # a 0-dim tensor once a padding mask counted the rows
    s_sums: Dict[int, Tensor] = field(default_factory=dict)
    s_examples: Dict[int, int] = field(default_factory=dict)
    outputs: List[Tuple[Tensor, int, Optional[Tensor]]] = field(default_factory=list)
    masked: bool = True
    """Whether padding masks apply to this layer (False for decoder modules of encoder-decoder models)."""

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
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
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


class PaddingMask:
    """A ``(B, T)`` padding mask prepared once for all layers: float weights and the real-row count."""

    def __init__(self, mask: Tensor) -> None:
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"padding_mask: expected a (B, T) tensor (1 = real token, 0 = padding), got {shape}.")
        self.shape = tuple(mask.shape)
        self.weights = (mask != 0).to(torch.float32)
        """``(B, T)`` float32, 1.0 for real tokens."""
        self.count = self.weights.sum()
        """Number of real tokens, a 0-dim device tensor (never read on the host)."""


def _check_mask(layer: KFACLayer, t: Tensor, mask: PaddingMask) -> None:
    if tuple(t.shape[:2]) != mask.shape:
        raise ValueError(
            f"padding mask of shape {mask.shape} does not match the (B, T) = {tuple(t.shape[:2])} of layer "
            f"{layer.name!r}'s activation of shape {tuple(t.shape)}; pass the attention mask of the sequences this "
            "forward pass processes (or none)."
        )


def _flat_rows(layer: KFACLayer, t: Tensor, mask: Optional[PaddingMask]) -> Tuple[Tensor, Optional[Tensor]]:
    """``(..., d)`` activation or gradient as rows ``(N, d)`` (a view where possible, any dtype) and the rows' mask
    weights ``(N, 1)`` (``None`` without a mask; a mask applies to ``(B, T, d)`` tensors of Linear / Conv1D layers)."""
    if mask is None or layer.kind == "conv2d" or t.dim() != 3:
        return t.reshape(-1, t.shape[-1]), None
    _check_mask(layer, t, mask)
    return t.reshape(-1, t.shape[-1]), mask.weights.reshape(-1, 1)


DRAW_MARGIN = 256
"""A capture pass of ``N`` rows of width ``d`` (bias column included) reads every row unless ``N > capture_rows (1 +
DRAW_MARGIN / d)``: drawing costs a sampler call and a few passes over the rows, which the smaller product repays only
beyond about that. CPU, one thread, drawing 2,048 rows against reading all ``N`` (``scripts/kernel_costs.py``, the
"capture pass" lines): even at ``N`` about 1.5-2x 2,048 for d = 128-256, 1.3-1.5x for 512, 1.1-1.5x for 1,024-3,072;
at d = 64 drawing still cost 1.2x more at 5x, and up to 4.3x more just above 2,048 rows. The rule errs towards reading
every row, which costs at most ``1 + DRAW_MARGIN / d`` times the product of ``capture_rows`` rows."""


def _draws(n: int, width: int, limit: Optional[int], margin: Optional[float] = None) -> bool:
    """Whether a capture pass of ``n`` rows of ``width`` columns draws ``limit`` of them: ``n > limit (1 + margin /
    width)``, ``margin`` :data:`DRAW_MARGIN` unless given."""
    margin = DRAW_MARGIN if margin is None else margin
    return limit is not None and n > limit * (1 + margin / width)


def _subsample(
    rows: Tensor, weights: Optional[Tensor], limit: Optional[int], generator: Optional[torch.Generator], bias: bool,
    margin: Optional[float] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Float32 rows with the mask applied, and the bias column (the mask weights, or ``None`` for all ones), as
    ``(rows (R, d), column (R, 1) or None)``: every row unless :func:`_draws` (with ``margin``) says to draw; then
    ``limit`` rows drawn with replacement with probability ``p_i`` proportional to their squared norm (bias column
    included), each scaled by ``1 / sqrt(R p_i)``, so that ``sum_drawn x x^T`` is an unbiased estimate of
    ``sum_all x x^T``.

    Norm-proportional sampling keeps the estimate good when a few rows carry most of the curvature (the output
    gradients of a classifier's pooled token, say); zero rows (padding) are never drawn. The rows are gathered
    before the float32 cast, so the capture's cost stops growing with the batch.
    """
    if not _draws(rows.shape[0], rows.shape[1] + int(bias), limit, margin):
        rows = rows.float()
        if weights is not None:
            rows = rows * weights
        return rows, weights
    with torch.autocast(device_type=rows.device.type, enabled=False):
        # one fused reduction (no (N, d) temporary): at 32k rows of 3,072 this is 18 ms against 270 ms for square().sum()
        square = torch.linalg.vector_norm(rows, dim=1, keepdim=True, dtype=torch.float32).square()  # (N, 1)
        if bias:
            square = square + 1.0
        if weights is not None:
            square = square * weights.square()
        # a floor keeps an all-zero batch drawable; zero rows add nothing whatever their scale, so it stays unbiased
        square = square + torch.finfo(torch.float32).tiny
        total = square.sum()
        index = torch.multinomial(square.reshape(-1), limit, replacement=True, generator=generator)
        scale = torch.rsqrt(square.index_select(0, index) * (limit / total))  # 1 / sqrt(R p_i), (R, 1)
        picked = rows.index_select(0, index).float() * scale
        column = scale if weights is None else weights.index_select(0, index) * scale
        if weights is not None:
            picked = picked * weights.index_select(0, index)
    return picked, (column if bias or weights is not None else None)


def _input_gram(
    layer: KFACLayer, x: Tensor, mask: Optional[PaddingMask], limit: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Union[int, Tensor]]:
    """``rows^T rows`` of the layer input's float32 rows (expand convention) with a bias column of ones appended,
    ``(in + 1, in + 1)`` (``(in, in)`` without bias), and the count of real rows it sums over.

    ``limit``: estimate the sum from at most that many drawn rows (:func:`_subsample`); the count is every real
    row's either way. The bias column's blocks (``rows^T 1`` and the row count) are computed from the rows as they
    are, so the rows are never copied to append a column. Padded rows are zero, bias column included, so they add
    nothing.
    """
    module = layer.module
    if layer.kind == "conv2d":
        if x.dim() == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        flat, weights = patches.transpose(1, 2).reshape(-1, patches.shape[1]), None
    else:
        flat, weights = _flat_rows(layer, x, mask)
    count: Union[int, Tensor] = flat.shape[0] if weights is None else weights.sum()
    rows, ones = _subsample(flat, weights, limit, generator, module.bias is not None)
    return (_gram(rows) if module.bias is None else _bias_gram(rows, ones)), count


def _bias_gram(rows: Tensor, ones: Optional[Tensor]) -> Tensor:
    """``[rows 1]^T [rows 1]``, ``(d + 1, d + 1)``, of float32 rows ``(R, d)`` and their bias column ``ones`` ``(R, 1)``
    (``None``: all ones), without copying the rows to append the column."""
    gram = _gram(rows)
    if ones is None:  # every row, no mask: the bias column is ones
        ones = rows.new_ones(rows.shape[0], 1)
    with torch.autocast(device_type=rows.device.type, enabled=False):
        column, corner = rows.T @ ones, ones.T @ ones  # (d, 1), (1, 1)
    return torch.cat([torch.cat([gram, column], 1), torch.cat([column.T, corner], 1)], 0)


def _output_gram(
    layer: KFACLayer, g: Tensor, mask: Optional[PaddingMask], limit: Optional[int] = None,
    generator: Optional[torch.Generator] = None, loss_scale: float = 1.0,
) -> Tensor:
    """``sum_rows s s^T`` of the output gradient's float32 rows ``(out, out)`` (padded rows zeroed, ``loss_scale``
    divided out of the rows); with ``limit``, its unbiased estimate from at most ``limit`` drawn rows
    (:func:`_subsample`)."""
    if layer.kind == "conv2d":
        if g.dim() == 3:
            g = g.unsqueeze(0)
        flat, weights = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]), None
    else:
        flat, weights = _flat_rows(layer, g, mask)
    rows, _ = _subsample(flat, weights, limit, generator, bias=False)
    if loss_scale != 1.0:
        rows = rows / loss_scale
    return _gram(rows)


GRAM_BLOCKS = 4
"""Column blocks of :func:`_gram`'s upper triangle; 4 computes 10/16 of the full product."""
GRAM_MIN_ROWS = 1024
"""Fewer rows than this: one full product (the blocked form then costs more in writes than it saves)."""


def _gram(rows: Tensor) -> Tensor:
    """``rows^T rows`` in float32, outside any autocast region: ``(n, d) -> (d, d)``, exactly symmetric.

    With at least :data:`GRAM_MIN_ROWS` rows and 256 columns only the block upper triangle is multiplied (in
    :data:`GRAM_BLOCKS` column blocks) and mirrored: 10/16 of the product's FLOPs, each entry the same dot product.
    On this project's CPU, 2,048 x 3,072 rows: 326 ms against 452 ms for one product (``scripts/kernel_costs.py``).
    """
    with torch.autocast(device_type=rows.device.type, enabled=False):
        rows = rows.float()
        n, d = rows.shape
        if n < GRAM_MIN_ROWS or d < 256:
            return rows.T @ rows
        out = rows.new_empty(d, d)
        edges = [d * i // GRAM_BLOCKS for i in range(GRAM_BLOCKS + 1)]
        for lo, hi in zip(edges[:-1], edges[1:]):
            band = rows[:, lo:hi].T @ rows[:, lo:]  # (hi - lo, d - lo): block row i from the diagonal rightwards
            out[lo:hi, lo:] = band
            out[hi:, lo:hi] = band[:, hi - lo:].T
        return out


def _batch_size(t: Tensor) -> int:
    return t.shape[0] if t.dim() >= 2 else 1


def _grad_hook(
    engine_ref: "weakref.ReferenceType[CurvatureEngine]", layer: KFACLayer, group: int, mask: Optional[PaddingMask], scale: float
) -> Callable:
    """Tensor hook on a layer output: adds the output gradient to S (holds the engine weakly)."""

    def hook(grad: Tensor) -> None:
        engine = engine_ref()
        if engine is None or engine.released is not None:
            return
        t0 = time.perf_counter()
        with scope("capture_backward"):
            engine._add_output_grad(layer, grad, group, mask, scale)
        engine.seconds += time.perf_counter() - t0

    return hook


_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ReferenceType]" = weakref.WeakKeyDictionary()
"""Managed module -> weak reference to the engine whose hooks it carries."""


def _encoder_modules(model: nn.Module) -> Optional[set]:
    """``id``s of the encoder's modules for an encoder-decoder transformers model, else ``None``."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    get_encoder = getattr(model, "get_encoder", None)
    if not callable(get_encoder):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model (config.is_encoder_decoder=True) without "
            "get_encoder(): FOP cannot tell which layers the encoder's padding mask belongs to."
        )
    return {id(m) for m in get_encoder().modules()}


def _label_shift(model: nn.Module) -> int:
    """1 when the model shifts ``labels`` inside its loss (transformers' causal-LM loss), else 0."""
    if not hasattr(model, "loss_type"):  # not a transformers PreTrainedModel
        return 0
    custom = getattr(model, "_loss_function", None)
    if custom is not None:
        return int(getattr(custom, "__name__", "") == "ForCausalLMLoss")
    # a PreTrainedModel's module imported transformers' loss table; looked up, not imported (the core imports no HF
    # library)
    loss_utils = sys.modules.get("transformers.loss.loss_utils")
    mapping = getattr(loss_utils, "LOSS_MAPPING", {})
    loss_type = model.loss_type  # same resolution as PreTrainedModel.loss_function (None -> ForCausalLM)
    return int(loss_type is None or loss_type not in mapping or loss_type == "ForCausalLM")


def _forward_hook(engine_ref: "weakref.ReferenceType[CurvatureEngine]", index: int) -> Callable:
    """Forward hook of managed layer ``index``; holds the engine weakly (a collected engine captures nothing).

    Opaque to ``torch.compile`` (``torch.compiler.disable``): a compiled model runs it eagerly between graphs instead
    of tracing the engine's Python state into guards that change every step (and recompiling). The hooks stay on the
    layers for the engine's life and do nothing off capture steps (:attr:`CurvatureEngine.capture`): dynamo does not
    guard on a module's hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so hooks added only for capture
    steps would be missing from graphs first compiled on another step (a run resumed off a capture step) and the
    curvature would silently never be captured.
    """

    @torch.compiler.disable
    def hook(module: nn.Module, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
        engine = engine_ref()
        if engine is not None:
            engine._on_forward(engine.layers[index], module, inputs, output)

    return hook


def _remove_handles(handles: List[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class CurvatureEngine:
    """Hooks on the managed layers, capture of A and S, running averages, eigenbases.

    The optimizer drives it: it sets :attr:`capture` before the forward
    passes of a curvature step, and calls :meth:`finalize_capture` and
    :meth:`update_factors` in ``step()``; eigenbases are refreshed by :mod:`hf_fop.refresh`.

    Hook lifetime: the hooks hold the engine by weak reference and are removed
    by :meth:`release` or when the engine is garbage-collected. A new engine on
    modules that still carry a live engine's hooks takes them over: the old
    engine is released (with a warning) and raises if used again.
    """

    def __init__(self, model: nn.Module, config: FOPConfig) -> None:
        self.config = config
        self.layers, self.skipped = find_layers(model, config)
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        """Where the model's (first) parameters live: the device of buffers built without a layer at hand."""
        encoder = _encoder_modules(model)
        self.encoder_decoder = encoder is not None
        """Encoder-decoder model: padding masks apply to encoder modules only, never to the logits."""
        for layer in self.layers:
            layer.masked = encoder is None or id(layer.module) in encoder
        self.label_shift = _label_shift(model)
        """Logit position t is scored against ``labels[:, t + label_shift]`` (1 for causal LMs)."""
        self._capture = False
        self.capture_only: Optional[FrozenSet[str]] = None
        """Names of the layers that capture while :attr:`capture` is true (``stagger_capture``); ``None``: every one."""
        self.enabled = True
        """False in evaluation mode (``FOP.eval()``): nothing is captured."""
        self.group = -1
        """Index of the gradient group being captured (sub-batch 0/1; -1 outside ``sub_batch``)."""
        self.padding_mask: Optional[PaddingMask] = None
        """Mask of real (1) vs padded (0) tokens for the next forward/backward (see :meth:`set_padding_mask`)."""
        self.grad_scale = 1.0
        """Loss scale of the coming backward passes (fp16 GradScaler); divided out of the captured gradients."""
        self.seconds = 0.0
        """Host wall-clock seconds spent in capture, factor updates and eigendecompositions."""
        self.block_rotations = 0
        """Block rotations carried out (:func:`hf_fop.refresh.refresh_bases`), gated ones included."""
        self.gated_skips = 0
        """Gated block rotations skipped because the basis was close enough (``block_refresh="adaptive"``)."""
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._seeded: set = set()
        self._step_seed = 0
        self.released: Optional[str] = None
        """Why the engine's hooks were removed (``None`` while it is live)."""
        self._take_over()
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)
        self._install_hooks()

    @property
    def capture(self) -> bool:
        """Whether the coming forward/backward passes belong to a curvature step (set by the optimizer).

        The hooks read it on every forward (see :func:`_forward_hook`).
        """
        return self._capture

    @capture.setter
    def capture(self, value: bool) -> None:
        self._capture = bool(value)

    # ------------------------------------------------------------ lifetime
    def _take_over(self) -> None:
        previous = []
        for layer in self.layers:
            ref = _OWNERS.get(layer.module)
            engine = ref() if ref is not None else None
            if engine is not None and engine.released is None and engine not in previous:
                previous.append(engine)
        for engine in previous:
            engine.release("a newer FOP optimizer on the same model took over its layers")
        if previous:
            warnings.warn(
                "FOP: the model's layers carried the hooks of another live FOP optimizer; that optimizer is released "
                "(it no longer captures curvature and raises if stepped). Call opt.release() on an optimizer you are "
                "done with to avoid this warning.",
                UserWarning,
                stacklevel=4,
            )
        for layer in self.layers:
            _OWNERS[layer.module] = weakref.ref(self)

    def _install_hooks(self) -> None:
        """Register the forward hooks (into the list the finalizer holds)."""
        ref = weakref.ref(self)
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(_forward_hook(ref, index)))

    def release(self, reason: str = "release() was called") -> None:
        """Remove every hook and drop pending captures; the engine cannot capture again."""
        if self.released is not None:
            return
        self._finalizer()
        self.released = reason
        self.clear_capture()
        for layer in self.layers:
            ref = _OWNERS.get(layer.module)
            if ref is not None and ref() is self:
                del _OWNERS[layer.module]

    def check_live(self) -> None:
        """Raise when the engine was released."""
        if self.released is not None:
            raise RuntimeError(
                f"This FOP optimizer was released ({self.released}): its hooks are removed and it cannot capture "
                "curvature or step. Create a new FOP for the model."
            )

    # ----------------------------------------------------------------- hooks
    def begin_step(self, step: int) -> None:
        """The coming passes belong to optimizer step ``step``: the row draws of ``capture_rows`` are seeded from it,
        so they depend on the step only (a resumed run draws the same rows; every rank draws alike)."""
        self._step_seed = (step * 0x9E3779B1 + 0x2545F491) % (2**62)
        self._seeded = set()

    def _rng(self, device: torch.device) -> torch.Generator:
        """This step's generator for ``device`` (seeded at its first use in the step)."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        if device not in self._seeded:
            generator.manual_seed(self._step_seed)
            self._seeded.add(device)
        return generator

    def set_padding_mask(self, mask: Optional[Tensor]) -> None:
        """``(B, T)`` mask (nonzero = real token) for the coming forward/backward passes; ``None`` clears it."""
        self.padding_mask = None if mask is None else PaddingMask(mask)

    def _active(self, module: nn.Module) -> bool:
        return self.released is None and self._capture and self.enabled and module.training and torch.is_grad_enabled()

    def _on_forward(self, layer: KFACLayer, module: nn.Module, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
        if not self._active(module) or not output.requires_grad:
            return
        if self.capture_only is not None and layer.name not in self.capture_only:
            return
        with scope("capture_forward"):
            self._capture_input(layer, inputs[0], output)

    def _capture_input(self, layer: KFACLayer, x: Tensor, output: Tensor) -> None:
        t0 = time.perf_counter()
        mask = self.padding_mask if layer.masked else None
        limit = self.config.capture_rows
        contrib, count = _input_gram(layer, x.detach(), mask, limit, self._rng(x.device) if limit is not None else None)
        layer.a_sum = contrib if layer.a_sum is None else layer.a_sum + contrib
        layer.a_rows = layer.a_rows + count
        group = self.group
        if self.config.fisher_type == "mc":
            layer.outputs.append((output, group, mask))
        else:
            output.register_hook(_grad_hook(weakref.ref(self), layer, group, mask, self.grad_scale))
        self.seconds += time.perf_counter() - t0

    def _add_output_grad(self, layer: KFACLayer, grad: Tensor, group: int, mask: Optional[PaddingMask], scale: float) -> None:
        limit = self.config.capture_rows
        contrib = _output_gram(layer, grad.detach(), mask, limit, self._rng(grad.device) if limit is not None else None, scale)
        layer.s_sums[group] = contrib if group not in layer.s_sums else layer.s_sums[group] + contrib
        layer.s_examples[group] = layer.s_examples.get(group, 0) + _batch_size(grad)

    def _position_weights(self, logits: Tensor, labels: Optional[Tensor], label_shift: int) -> Optional[Tensor]:
        """Weights ``logits.shape[:-1]`` (1 = position counts in the sampled loss), or ``None`` (all count)."""
        positions = tuple(logits.shape[:-1])
        weights: Optional[Tensor] = None
        mask = None if self.encoder_decoder else self.padding_mask  # the encoder's mask is not the logits'
        if mask is not None and logits.dim() == 3:
            if mask.shape != positions:
                raise ValueError(
                    f"mc_backward: padding mask of shape {mask.shape} does not match the logits' (B, T) = {positions}."
                )
            weights = mask.weights
        if labels is not None and not labels.is_floating_point() and not labels.is_complex():
            if tuple(labels.shape) != positions:
                raise ValueError(
                    f"mc_backward: labels of shape {tuple(labels.shape)} do not match the logits' positions {positions} "
                    f"(logits of shape {tuple(logits.shape)})."
                )
            valid = labels != -100
            if label_shift and valid.dim() == 2:  # causal LM: position t predicts labels[:, t + 1]
                valid = F.pad(valid[:, label_shift:], (0, label_shift), value=False)
            valid = valid.to(torch.float32)
            weights = valid if weights is None else weights * valid
        return weights

    def mc_backward(
        self,
        logits: Tensor,
        generator: Optional[torch.Generator] = None,
        labels: Optional[Tensor] = None,
        label_shift: Optional[int] = None,
        weight: Union[float, Tensor] = 1.0,
    ) -> None:
        """Monte-Carlo Fisher: sample labels from ``softmax(logits)`` and capture S from them.

        ``logits``: ``(B, C)`` or ``(B, T, C)``. The sampled loss is the sum of
        cross-entropies over the *real* positions, averaged over the ``B``
        examples, times ``weight``. Real positions: those of the current padding mask (for
        ``(B, T, C)`` logits; not for encoder-decoder models, whose mask is
        the encoder's), and, when integer ``labels`` of shape ``logits.shape[:-1]``
        are given, those whose label is not ``-100``. ``label_shift`` (default:
        1 for models with transformers' causal-LM loss, which shifts labels
        inside, else 0) pairs position ``t`` with ``labels[:, t + label_shift]``.
        Labels are drawn at every position (so a fixed ``generator`` gives the
        same draws with or without a mask). Parameter gradients are not
        touched. No-op outside curvature steps or when ``fisher_type != "mc"``.
        """
        self.check_live()
        if self.config.fisher_type != "mc" or not self.capture or not self.enabled:
            return
        t0 = time.perf_counter()
        weights = self._position_weights(logits, labels, self.label_shift if label_shift is None else label_shift)
        pending = [(layer, out, group, mask) for layer in self.layers for (out, group, mask) in layer.outputs]
        for layer in self.layers:
            layer.outputs = []
        if not pending:
            return
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        flat = logits.float().reshape(-1, logits.shape[-1])
        per_position = F.cross_entropy(flat, sampled, reduction="none")
        if weights is not None:
            per_position = per_position * weights.reshape(-1)
        loss = per_position.sum() / _batch_size(logits)
        if isinstance(weight, Tensor) or weight != 1.0:
            loss = loss * weight
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
            if layer.a_sum is None:
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
            rows = layer.a_rows.clamp_min(1) if isinstance(layer.a_rows, Tensor) else max(layer.a_rows, 1)
            new[layer.name] = (layer.a_sum / rows, s_new)
        return new

    def clear_capture(self) -> None:
        for layer in self.layers:
            layer.clear_capture()
        self.padding_mask = None

    def divide_captured_s(self, divisors: Dict[int, float]) -> None:
        """Divide the S captured so far for gradient group ``g`` (-1: outside sub-batches) by ``divisors[g]``.

        For front ends whose backward passes see another loss scale than the group's mean loss (the Accelerate loop
        captures the summed loss's gradients and divides by the squared example count here).
        """
        for layer in self.layers:
            for group, s_sum in layer.s_sums.items():
                divisor = divisors.get(group)
                if divisor is not None and divisor != 1.0:
                    s_sum.div_(divisor)

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
