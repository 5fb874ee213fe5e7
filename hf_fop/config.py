"""Validated hyperparameters of the FOP optimizer.

Every field is checked in ``__post_init__``; an invalid value raises
``ValueError`` naming the field, the value and the valid range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Tuple

from .fop_math import PROJECTION_METRICS

MODES = ("fop", "kfac")
FISHER_TYPES = ("empirical", "mc")
DAMPING_MODES = ("absolute", "relative")
CURVATURE_SHARDINGS = ("replicated", "specialists")
ROTATION_DTYPES = ("auto", "float32", "bfloat16")
BLOCK_REFRESH = ("sweep", "round", "adaptive")


def _fail(name: str, value: Any, valid: str) -> None:
    raise ValueError(f"FOPConfig.{name}={value!r} is invalid: expected {valid}.")


def _check_real(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> None:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    valid = f"a number in {lo}{low}, {high}{hi}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, value, valid)
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        _fail(name, value, valid)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(name, value, f"an integer >= {low}")


FACTOR_INTERVAL_CAP = 10
"""Longest default factor interval (steps between factor captures)."""


def default_factor_interval(inverse_interval: int) -> int:
    """Factor interval when none is given: the largest divisor of ``inverse_interval`` that is at most
    :data:`FACTOR_INTERVAL_CAP` (20 -> 10, 5 -> 5, 12 -> 6, 1 -> 1), so every inverse cycle captures factors; 1 for
    an invalid ``inverse_interval`` (which :class:`FOPConfig` then rejects by name)."""
    if isinstance(inverse_interval, bool) or not isinstance(inverse_interval, int) or inverse_interval < 1:
        return 1
    return max(d for d in range(1, min(inverse_interval, FACTOR_INTERVAL_CAP) + 1) if inverse_interval % d == 0)


@dataclass
class FOPConfig:
    """Hyperparameters of :class:`hf_fop.FOP`.

    Learning rates are per optimizer step; ``damping`` is the lambda of
    ``M = A (x) S + lambda * I`` in the units of the per-example Fisher.
    The defaults are the configuration the sensitivity benchmark measures as
    its default cell (docs/benchmarks.md; ``tests/test_defaults.py`` fails when
    the two differ).
    """

    lr: float = 0.1
    """eta0: learning rate of the K-FAC/FOP-managed layers."""
    damping: float = 1e-2
    """lambda added to the Kronecker Fisher of every managed layer (see ``damping_mode``)."""
    mode: str = "fop"
    """``"fop"`` (Fisher-orthogonal projection) or ``"kfac"`` (plain K-FAC on the same engine)."""
    fisher_type: str = "empirical"
    """``"empirical"`` (training backward) or ``"mc"`` (labels sampled from the model)."""
    momentum: float = 0.9
    """Heavy-ball momentum on the preconditioned direction of managed layers (0 turns it off)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of managed layers' weights (multiplied by the lr; biases get none)."""
    factor_decay: float = 0.95
    """Running-average decay of the A and S factors (0 keeps only the newest)."""
    factor_interval: Optional[int] = None
    """Steps between factor (A, S) captures; ``None`` (default): :func:`default_factor_interval` of
    ``inverse_interval``, 10 with the default 20. With ``capture_rows`` 2048 this is the schedule at which a large-batch
    fine-tune pays little more than the method's own rotations (docs/performance.md); the paper refreshed its
    curvature at most every 5 steps (``fop_curvature_schedule='paper'``)."""
    inverse_interval: int = 20
    """Steps between eigendecompositions of a layer's factors; a multiple of ``factor_interval``."""
    eps: float = 1e-12
    """epsilon of eq. (4), the projection coefficient's denominator."""
    use_eta: bool = True
    """Scale each layer's step by eta* (eq. 17); ``False`` fixes eta* = 1."""
    use_beta: bool = True
    """Add beta* g_perp (eq. 6); ``False`` fixes beta* = 0 (K-FAC direction)."""
    adamw_lr: Optional[float] = 3e-3
    """Learning rate of the AdamW-managed parameters (norms, embeddings); ``None`` uses ``lr``."""
    adamw_betas: Tuple[float, float] = (0.9, 0.999)
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 0.0
    """Decoupled weight decay of the AdamW part, except biases and normalisation weights (the Trainer's rule)."""
    max_factor_dim: int = 8192
    """Layers whose A or S would be larger than this (per side) go to AdamW."""
    exclude_modules: Tuple[str, ...] = ()
    """fnmatch patterns of qualified module names left to AdamW."""
    exclude_types: Tuple[type, ...] = field(default_factory=tuple)
    """Module classes left to AdamW."""
    max_eigh_failures: int = 3
    """Consecutive failed eigendecompositions of one factor before raising."""
    kl_clip: Optional[float] = 1e-3
    """Trust region (our addition, not in the paper): scale all managed layers' updates by
    ``nu = min(1, sqrt(kl_clip / (lr^2 sum_l Delta_l^T M_l Delta_l)))`` before momentum; ``None`` disables it
    (the paper's setting)."""
    damping_mode: str = "absolute"
    """``"absolute"``: lambda = ``damping`` for every layer; ``"relative"``: each layer's lambda is
    ``damping * mean eigenvalue of A (x) S`` (= mean(eig A) * mean(eig S)) of its current eigendecomposition."""
    capture_rows: Optional[int] = 2048
    """Curvature capture reads at most this many rows (tokens, positions) of each managed layer's input and output
    gradient per forward/backward pass, drawn at random (an unbiased estimate of A and S), once a pass has enough rows
    for drawing to pay: more than ``capture_rows (1 + 256 / d)`` for a side of width ``d``
    (:data:`hf_fop.curvature.DRAW_MARGIN`); ``None`` reads every row. Caps the capture's cost, about ``capture_rows
    (d^2 + 256 d)`` per side and pass, when the batch grows."""
    stagger_refresh: bool = True
    """Spread each inverse cycle's eigendecompositions over its ``inverse_interval`` steps, about ``1/k`` of the work
    per step (:mod:`hf_fop.refresh`), so that no step is much longer than the others; ``False`` decomposes every
    layer on the cycle's first step."""
    stagger_capture: Optional[bool] = None
    """Spread each factor interval's captures over its ``factor_interval`` steps: each layer captures on its own step
    of the interval (all layers on their first step, until they have factors), the steps balanced by the capture's
    cost ``rows (d_A^2 + d_S^2)`` (:mod:`hf_fop.refresh`), so that no step pays for every layer's capture (the longest
    step of a small batch, where a capture costs about as much as the passes). Every layer still updates its factors
    once per ``factor_interval`` steps. ``None`` (default): on with ``fisher_type="empirical"``, off with ``"mc"``,
    where every step that captures any layer runs a sampled backward (with the stagger, every step); see
    :attr:`staggers_capture`."""
    max_eigh_dim: Optional[int] = 1600
    """Largest eigendecomposition of a refresh after a layer's first: a factor larger than this is refreshed in blocks
    from its previous eigenbasis (warm-started block Jacobi, :mod:`hf_fop.refresh`), a handful of products and eigh of
    at most this size, spread over the inverse cycle, so that no step pays for a whole ``eigh`` of a 3,072-wide factor
    (seconds on a CPU); ``None``: every refresh is a full ``eigh`` (the paper's). With the default, the 3,072-wide
    factors of BERT-, ViT- and GPT-2-sized models are refreshed in 4 groups (6 block rotations with an eigh of at most
    1,537 each; MiniLM's 1,537 are decomposed whole)."""
    block_refresh: str = "adaptive"
    """How much of a block-refreshed factor (larger than ``max_eigh_dim``) each inverse cycle rotates, of its ``p``
    groups' ``p (p - 1) / 2`` pairs: ``"sweep"`` every pair (one block Jacobi sweep, about twice an ``eigh``'s work);
    ``"round"`` one round of disjoint pairs, the rounds taking turns, every pair once in ``p - 1`` cycles (``p`` for
    odd ``p``): for a 3,072-wide factor in 4 groups 2 rotations of 6, for a basis that lags further behind the factor;
    ``"adaptive"`` (default) the round, and every other pair whose stored eigenbasis a random probe finds off by more
    than ``block_tolerance`` (:func:`hf_fop.refresh.pair_error`): sweeps while the factors move fast, rounds once they
    settle. Along 200 steps of a MiniLM fine-tune (docs/performance.md) FOP's update stayed within cosine 0.9995 of
    full eigendecompositions with adaptive refresh (45% of the sweeps' rotations), 0.99999 with sweeps, 0.989 with
    rounds."""
    block_tolerance: float = 0.05
    """``block_refresh="adaptive"``: a pair outside the cycle's round is rotated where the spectral norm of ``E``, the
    relative error of the damped factor in the pair's stored eigenbasis, is above this (a probe of a few power
    iterations, :func:`hf_fop.refresh.pair_error`); 0: every pair every cycle (a sweep)."""
    curvature_sharding: str = "replicated"
    """Several processes: ``"replicated"`` (every rank decomposes every factor and computes every layer's direction)
    or ``"specialists"`` (each layer's owner rank alone does, :mod:`hf_fop.distributed.specialists`). Ignored in one process."""
    projection_metric: str = "damped"
    """The metric in which ``g1 - g2`` is made orthogonal to ``g_avg`` (eq. 4-5): ``"damped"`` (``M = F + lambda I``,
    the preconditioner's) or ``"fisher"`` (the undamped Kronecker ``F`` of the paper's Lemma 1; ``beta* = 0`` where
    ``g_avg`` is in ``F``'s null space). ``beta*`` and ``eta*`` use ``M^-1`` either way (docs/projection_metric.md)."""
    rotation_dtype: str = "auto"
    """Input dtype of the rotations into and out of each layer's eigenbasis, the GEMMs that are most of a step's
    optimizer time (they accumulate in float32; every other part of the step is float32): ``"bfloat16"`` (about 3x
    faster where the hardware multiplies it natively; the direction is within about 1e-5 of the float32 one in
    cosine, docs/performance.md), ``"float32"``, or ``"auto"``: bfloat16 for layers at least 256 wide on both sides
    on CUDA devices of compute capability 8.0 and later, and on CPUs with AVX512-BF16 or AMX where a probe rotation,
    timed once per process, is at least 1.25x faster in bfloat16 (some such CPUs are slower in it; the answer is saved
    with the optimizer's state, and a resumed run keeps it); else float32. ``projection_metric="fisher"`` always
    rotates its gradients in float32 (its null-space test needs the precision)."""

    def __post_init__(self) -> None:
        _check_real("lr", self.lr, 0.0, math.inf, False, True)
        _check_real("damping", self.damping, 0.0, math.inf, True, True)
        if self.mode not in MODES:
            _fail("mode", self.mode, f"one of {MODES}")
        if self.fisher_type not in FISHER_TYPES:
            _fail("fisher_type", self.fisher_type, f"one of {FISHER_TYPES}")
        _check_real("momentum", self.momentum, 0.0, 1.0, False, True)
        _check_real("weight_decay", self.weight_decay, 0.0, math.inf, False, True)
        _check_real("factor_decay", self.factor_decay, 0.0, 1.0, False, True)
        _check_int("inverse_interval", self.inverse_interval, 1)
        self._factor_interval_given = self.factor_interval is not None  # not a field: replace() re-derives it if not
        if self.factor_interval is None:
            self.factor_interval = default_factor_interval(self.inverse_interval)
        _check_int("factor_interval", self.factor_interval, 1)
        if self.inverse_interval % self.factor_interval != 0:
            _fail(
                "inverse_interval",
                self.inverse_interval,
                f"a positive multiple of factor_interval={self.factor_interval} (or set factor_interval to one of its "
                "divisors, or leave it unset for the largest divisor up to 10)",
            )
        _check_real("eps", self.eps, 0.0, math.inf, False, True)
        for name in ("use_eta", "use_beta"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if self.adamw_lr is not None:
            _check_real("adamw_lr", self.adamw_lr, 0.0, math.inf, False, True)
        betas = tuple(self.adamw_betas)
        if len(betas) != 2:
            _fail("adamw_betas", self.adamw_betas, "a pair (beta1, beta2), each in [0, 1)")
        for b in betas:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
                _fail("adamw_betas", self.adamw_betas, "a pair (beta1, beta2), each in [0, 1)")
        self.adamw_betas = (float(betas[0]), float(betas[1]))
        _check_real("adamw_eps", self.adamw_eps, 0.0, math.inf, True, True)
        _check_real("adamw_weight_decay", self.adamw_weight_decay, 0.0, math.inf, False, True)
        _check_int("max_factor_dim", self.max_factor_dim, 1)
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = (self.exclude_modules,)
        self.exclude_modules = tuple(self.exclude_modules)
        if not all(isinstance(p, str) for p in self.exclude_modules):
            _fail("exclude_modules", self.exclude_modules, "a sequence of fnmatch patterns (str)")
        if isinstance(self.exclude_types, type):
            self.exclude_types = (self.exclude_types,)
        self.exclude_types = tuple(self.exclude_types)
        if not all(isinstance(t, type) for t in self.exclude_types):
            _fail("exclude_types", self.exclude_types, "a sequence of module classes")
        _check_int("max_eigh_failures", self.max_eigh_failures, 1)
        if self.kl_clip is not None:
            try:
                _check_real("kl_clip", self.kl_clip, 0.0, math.inf, True, True)
            except ValueError:
                _fail("kl_clip", self.kl_clip, "None (no trust region) or a number in (0, inf), e.g. 1e-3")
        if self.damping_mode not in DAMPING_MODES:
            _fail("damping_mode", self.damping_mode, f"one of {DAMPING_MODES}")
        if self.capture_rows is not None:
            try:
                _check_int("capture_rows", self.capture_rows, 1)
            except ValueError:
                _fail("capture_rows", self.capture_rows, "None (every row) or an integer >= 1, e.g. 1024")
        if not isinstance(self.stagger_refresh, bool):
            _fail("stagger_refresh", self.stagger_refresh, "True or False")
        if self.stagger_capture is not None and not isinstance(self.stagger_capture, bool):
            _fail("stagger_capture", self.stagger_capture, "None (on unless fisher_type='mc'), True or False")
        if self.max_eigh_dim is not None:
            try:
                _check_int("max_eigh_dim", self.max_eigh_dim, 2)
            except ValueError:
                _fail("max_eigh_dim", self.max_eigh_dim, "None (full eigendecompositions) or an integer >= 2, e.g. 1600")
        if self.curvature_sharding not in CURVATURE_SHARDINGS:
            _fail("curvature_sharding", self.curvature_sharding, f"one of {CURVATURE_SHARDINGS}")
        if self.projection_metric not in PROJECTION_METRICS:
            _fail("projection_metric", self.projection_metric, f"one of {PROJECTION_METRICS}")
        if self.block_refresh not in BLOCK_REFRESH:
            _fail("block_refresh", self.block_refresh, f"one of {BLOCK_REFRESH}")
        _check_real("block_tolerance", self.block_tolerance, 0.0, math.inf, False, True)
        if self.rotation_dtype not in ROTATION_DTYPES:
            _fail("rotation_dtype", self.rotation_dtype, f"one of {ROTATION_DTYPES}")

    @property
    def effective_adamw_lr(self) -> float:
        return self.lr if self.adamw_lr is None else self.adamw_lr

    @property
    def staggers_capture(self) -> bool:
        """Whether the layers capture on their own steps of the factor interval (``stagger_capture`` resolved)."""
        return self.fisher_type != "mc" if self.stagger_capture is None else self.stagger_capture

    def replace(self, **changes: Any) -> "FOPConfig":
        """A validated copy with ``changes`` applied (unknown names raise ``TypeError``). A ``factor_interval`` that was
        never given follows a changed ``inverse_interval`` (:func:`default_factor_interval`)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"FOPConfig has no field(s) {sorted(unknown)}; valid fields: {sorted(known)}")
        values = asdict(self)
        values["exclude_types"] = self.exclude_types
        if "inverse_interval" in changes and "factor_interval" not in changes and not self._factor_interval_given:
            values["factor_interval"] = None
        values.update(changes)
        return FOPConfig(**values)
