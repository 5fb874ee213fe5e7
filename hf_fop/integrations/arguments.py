"""``FOPTrainingArguments``: ``TrainingArguments`` plus typed ``fop_*`` fields.

Every field carries help text, so ``HfArgumentParser`` exposes it as a CLI
flag (``--fop_damping 1e-3``). Invalid values raise ``ValueError`` at
construction, naming the field and its valid range; :func:`parse_fop_args`
reports them on the command line as one argparse error line. The FOP learning rate
eta0 is the Trainer's ``learning_rate`` (scheduled as usual); ``weight_decay``,
``adam_beta1/2`` and ``adam_epsilon`` configure FOP's AdamW-managed parameters.
Every default gives :class:`FOPConfig`'s default except ``learning_rate``, whose
default (5e-5) is the Trainer's AdamW value: set it (``FOPConfig().lr`` is 0.1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

from transformers import HfArgumentParser, TrainingArguments

from ..config import FACTOR_INTERVAL_CAP, FOPConfig, default_factor_interval

__all__ = [
    "CURVATURE_SCHEDULES", "FOPTrainingArguments", "OPTIMIZER_CHOICES", "PAPER_MAX_CURVATURE_INTERVAL", "paper_curvature_interval",
    "parse_fop_args",
]

OPTIMIZER_CHOICES = ("fop", "kfac", "trainer")
_CONFIG_DEFAULTS = FOPConfig()
CURVATURE_SCHEDULES = ("fixed", "paper")


@dataclass
class FOPTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the FOP optimizer's hyperparameters as ``fop_*`` fields."""

    fop_optimizer: str = field(
        default="fop",
        metadata={
            "help": "Optimizer: 'fop' (Fisher-orthogonal projection), 'kfac' (K-FAC on the same engine) or "
            "'trainer' (the Trainer's own optimizer selected by --optim, e.g. AdamW), so one script runs every baseline.",
            "choices": list(OPTIMIZER_CHOICES),
        },
    )
    fop_damping: float = field(
        default=_CONFIG_DEFAULTS.damping,
        metadata={"help": "Damping lambda added to each layer's Kronecker Fisher (times its mean eigenvalue with fop_damping_mode relative); > 0."},
    )
    fop_fisher_type: str = field(
        default=_CONFIG_DEFAULTS.fisher_type,
        metadata={"help": "Fisher for the S factor: 'empirical' (training labels) or 'mc' (labels sampled from the model).", "choices": ["empirical", "mc"]},
    )
    fop_momentum: float = field(default=_CONFIG_DEFAULTS.momentum, metadata={"help": "Heavy-ball momentum of the managed layers' direction, in [0, 1); 0 turns it off."})
    fop_factor_decay: float = field(default=_CONFIG_DEFAULTS.factor_decay, metadata={"help": "Running-average decay of the A and S factors, in [0, 1)."})
    fop_factor_interval: Optional[int] = field(
        default=None,
        metadata={"help": "Optimizer steps between factor (A, S) captures, >= 1; default: the largest divisor of "
                  f"fop_inverse_interval up to {FACTOR_INTERVAL_CAP} ({_CONFIG_DEFAULTS.factor_interval} with the default "
                  "inverse interval; or the fop_curvature_schedule's)."},
    )
    fop_inverse_interval: Optional[int] = field(
        default=None,
        metadata={"help": "Optimizer steps between eigendecompositions, a positive multiple of fop_factor_interval; "
                  f"default {_CONFIG_DEFAULTS.inverse_interval} (or the fop_curvature_schedule's)."},
    )
    fop_eps: float = field(default=_CONFIG_DEFAULTS.eps, metadata={"help": "Epsilon of the projection coefficient's denominator (eq. 4), >= 0."})
    fop_use_eta: bool = field(default=_CONFIG_DEFAULTS.use_eta, metadata={"help": "Scale each layer's step by eta* (eq. 17)."})
    fop_use_beta: bool = field(default=_CONFIG_DEFAULTS.use_beta, metadata={"help": "Add beta* g_perp to the mean gradient (eq. 6)."})
    fop_adamw_lr: Optional[float] = field(
        default=_CONFIG_DEFAULTS.adamw_lr,
        metadata={"help": "Peak learning rate of the AdamW-managed parameters (norms, embeddings), >= 0; None: learning_rate."},
    )
    fop_max_factor_dim: int = field(
        default=_CONFIG_DEFAULTS.max_factor_dim, metadata={"help": "Layers with a factor side larger than this go to AdamW, >= 1."}
    )
    fop_exclude_modules: List[str] = field(
        default_factory=list,
        metadata={"help": "fnmatch patterns of module names left to AdamW (e.g. 'classifier' 'lm_head')."},
    )
    fop_max_eigh_failures: int = field(
        default=_CONFIG_DEFAULTS.max_eigh_failures, metadata={"help": "Consecutive failed eigendecompositions of one factor before raising, >= 1."}
    )
    fop_log_per_layer: bool = field(
        default=False, metadata={"help": "Also log per-layer beta/eta/s_proj/KL terms under fop/<layer>/... ."}
    )
    fop_kl_clip: float = field(
        default=_CONFIG_DEFAULTS.kl_clip or 0.0,
        metadata={"help": "Trust region: bound lr^2 * sum_l Delta_l^T M_l Delta_l of each step by this; > 0, or 0 for none (the paper)."},
    )
    fop_damping_mode: str = field(
        default=_CONFIG_DEFAULTS.damping_mode,
        metadata={
            "help": "'absolute' (lambda = fop_damping) or 'relative' (each layer's lambda = fop_damping * mean eigenvalue of its A (x) S).",
            "choices": ["absolute", "relative"],
        },
    )
    fop_capture_rows: int = field(
        default=_CONFIG_DEFAULTS.capture_rows or 0,
        metadata={"help": "Curvature capture reads at most this many rows (tokens) of each managed layer's input and "
                  "output gradient per forward/backward, drawn at random (unbiased), so its cost stops growing with "
                  "the batch; a pass of at most N (1 + 256 / width) rows is read whole (drawing would cost more); 0 "
                  "reads every row. >= 0."},
    )
    fop_stagger_refresh: bool = field(
        default=_CONFIG_DEFAULTS.stagger_refresh,
        metadata={"help": "Spread each inverse cycle's eigendecompositions over its fop_inverse_interval steps (no step "
                  "pays for every layer at once); false decomposes every layer on the cycle's first step."},
    )
    fop_stagger_capture: Optional[bool] = field(
        default=_CONFIG_DEFAULTS.stagger_capture,
        metadata={"help": "Spread each factor interval's captures over its fop_factor_interval steps, each layer on its "
                  "own step (balanced by cost), so no step pays for every layer's capture; false captures every layer "
                  "on the interval's first step. Unset: on, except with fop_fisher_type mc (a sampled backward on "
                  "every capture step)."},
    )
    fop_max_eigh_dim: int = field(
        default=_CONFIG_DEFAULTS.max_eigh_dim or 0,
        metadata={"help": "Largest eigendecomposition of a refresh after a layer's first: larger factors are refreshed "
                  "in blocks from their previous eigenbasis (warm-started block Jacobi), spread over the inverse cycle, "
                  "so no step pays for a whole eigh of a 3,072-wide factor; 0: every refresh a full eigh. 0 or >= 2."},
    )
    fop_block_refresh: str = field(
        default=_CONFIG_DEFAULTS.block_refresh,
        metadata={
            "help": "Per inverse cycle, how much of a factor larger than fop_max_eigh_dim is rotated: 'sweep' (every "
            "pair of its groups each cycle, about twice an eigh's work), 'round' (one round of disjoint pairs, every "
            "pair once in p - 1 cycles: 2 block rotations of a 3,072-wide factor's 6, for a basis that lags further "
            "behind) or 'adaptive' (the round, and every other pair that a probe finds off by more than "
            "fop_block_tolerance: sweeps while the factors move fast, rounds once they settle).",
            "choices": ["sweep", "round", "adaptive"],
        },
    )
    fop_block_tolerance: float = field(
        default=_CONFIG_DEFAULTS.block_tolerance,
        metadata={"help": "fop_block_refresh 'adaptive': a pair outside the cycle's round is rotated where the "
                  "relative error of the damped factor in its stored eigenbasis (spectral norm, from a probe) is above "
                  "this; 0: every pair, a sweep. >= 0."},
    )
    fop_curvature_sharding: str = field(
        default=_CONFIG_DEFAULTS.curvature_sharding,
        metadata={
            "help": "Several processes: 'replicated' (every rank decomposes every factor) or 'specialists' (each "
            "managed layer's owner rank alone decomposes its factors and computes its direction; the paper's Algorithm 1).",
            "choices": ["replicated", "specialists"],
        },
    )
    fop_projection_metric: str = field(
        default=_CONFIG_DEFAULTS.projection_metric,
        metadata={
            "help": "Metric of FOP's projection of g1 - g2 (eq. 4-5): 'damped' (M = F + damping I, the preconditioner's) "
            "or 'fisher' (the undamped Kronecker Fisher F of the paper's Lemma 1; beta* = 0 where g_avg is in F's null space).",
            "choices": ["damped", "fisher"],
        },
    )
    fop_rotation_dtype: str = field(
        default=_CONFIG_DEFAULTS.rotation_dtype,
        metadata={
            "help": "Input dtype of the rotations into and out of each layer's eigenbasis (float32 accumulation; the "
            "rest of the step is float32): 'bfloat16' (about 3x faster where the hardware multiplies it natively), "
            "'float32', or 'auto' (bfloat16 for layers >= 256 wide on both sides, on CUDA compute capability >= 8.0, and "
            "on CPUs with AVX512-BF16 or AMX where a probe rotation timed at start is >= 1.25x faster in bfloat16).",
            "choices": ["auto", "float32", "bfloat16"],
        },
    )
    fop_scale_lr_with_batch: Optional[int] = field(
        default=None,
        metadata={
            "help": "Linear learning-rate scaling (Goyal et al. 2017): the optimizer's peak learning rate (and "
            "fop_adamw_lr) is learning_rate times global_batch / this base batch, global_batch = "
            "per_device_train_batch_size * gradient_accumulation_steps * world_size (learning_rate itself stays as "
            "given; see effective_learning_rate). >= 1; default: no scaling."
        },
    )
    fop_curvature_schedule: str = field(
        default="fixed",
        metadata={
            "help": "'fixed': fop_factor_interval / fop_inverse_interval as given (or their defaults). 'paper': both "
            "from the global batch, growing with it up to the paper's limit of one curvature update every 5 steps "
            "(table: hf_fop.integrations.arguments.paper_curvature_interval); do not give the intervals then.",
            "choices": list(CURVATURE_SCHEDULES),
        },
    )

    def __post_init__(self) -> None:
        if self.deepspeed and self.fop_optimizer != "trainer":
            # before TrainingArguments.__post_init__, which fails with an import error when deepspeed is missing
            raise ValueError(
                "FOPTrainingArguments.deepspeed is set, but FOP does not support DeepSpeed yet: DeepSpeed owns the "
                "optimizer step and gradient reduction, which FOP's dual-gradient reduction replaces. Remove "
                "deepspeed=... or set fop_optimizer='trainer'."
            )
        super().__post_init__()
        if self.fop_optimizer not in OPTIMIZER_CHOICES:
            raise ValueError(
                f"FOPTrainingArguments.fop_optimizer={self.fop_optimizer!r} is invalid: expected one of {OPTIMIZER_CHOICES}."
            )
        self.fop_exclude_modules = list(self.fop_exclude_modules or [])
        self._check_large_batch_recipe()
        self.fop_config()  # validates every fop_* field

    @property
    def global_train_batch_size(self) -> int:
        """Examples per optimizer step over all processes: per_device * gradient_accumulation_steps * world_size."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    def _check_large_batch_recipe(self) -> None:
        """``fop_scale_lr_with_batch`` and ``fop_curvature_schedule``: valid, and no interval given with 'paper'."""
        base = self.fop_scale_lr_with_batch
        if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base < 1):
            raise ValueError(
                f"FOPTrainingArguments.fop_scale_lr_with_batch={base!r} is invalid: expected an integer >= 1 (the batch "
                "size the learning rate was tuned at), or None for no scaling."
            )
        if self.fop_curvature_schedule not in CURVATURE_SCHEDULES:
            raise ValueError(
                f"FOPTrainingArguments.fop_curvature_schedule={self.fop_curvature_schedule!r} is invalid: expected one "
                f"of {CURVATURE_SCHEDULES}."
            )
        given = [f"fop_{name}={value}" for name, value in (("factor_interval", self.fop_factor_interval),
                                                          ("inverse_interval", self.fop_inverse_interval)) if value is not None]
        if self.fop_curvature_schedule == "paper" and given:
            raise ValueError(
                f"FOPTrainingArguments: fop_curvature_schedule='paper' sets both curvature intervals from the global batch, "
                f"but {' and '.join(given)} was given too: drop {' and '.join(g.split('=')[0] for g in given)}, or use "
                "fop_curvature_schedule='fixed' to keep your intervals."
            )

    @property
    def lr_batch_factor(self) -> float:
        """``global_train_batch_size / fop_scale_lr_with_batch`` (1.0 without scaling)."""
        base = self.fop_scale_lr_with_batch
        return 1.0 if base is None else self.global_train_batch_size / base

    @property
    def effective_learning_rate(self) -> float:
        """The optimizer's peak learning rate: ``learning_rate`` times :attr:`lr_batch_factor`."""
        return self.learning_rate * self.lr_batch_factor

    @property
    def curvature_intervals(self) -> Tuple[int, int]:
        """``(factor interval, inverse interval)`` the optimizer uses: the schedule's, the given ones, or the defaults."""
        if self.fop_curvature_schedule == "paper":
            interval = paper_curvature_interval(self.global_train_batch_size)
            return interval, interval
        inverse = _CONFIG_DEFAULTS.inverse_interval if self.fop_inverse_interval is None else self.fop_inverse_interval
        factor = default_factor_interval(inverse) if self.fop_factor_interval is None else self.fop_factor_interval
        return factor, inverse

    def fop_config(self) -> FOPConfig:
        """The validated :class:`FOPConfig` these arguments describe (eta0 = :attr:`effective_learning_rate`)."""
        factor_interval, inverse_interval = self.curvature_intervals
        scale = self.lr_batch_factor
        values = dict(
            lr=self.effective_learning_rate,
            damping=self.fop_damping,
            mode="kfac" if self.fop_optimizer == "kfac" else "fop",
            fisher_type=self.fop_fisher_type,
            momentum=self.fop_momentum,
            weight_decay=self.weight_decay,
            factor_decay=self.fop_factor_decay,
            factor_interval=factor_interval,
            inverse_interval=inverse_interval,
            eps=self.fop_eps,
            use_eta=self.fop_use_eta,
            use_beta=self.fop_use_beta,
            adamw_lr=None if self.fop_adamw_lr is None else self.fop_adamw_lr * scale,
            adamw_betas=(self.adam_beta1, self.adam_beta2),
            adamw_eps=self.adam_epsilon,
            adamw_weight_decay=self.weight_decay,
            max_factor_dim=self.fop_max_factor_dim,
            exclude_modules=tuple(self.fop_exclude_modules),
            max_eigh_failures=self.fop_max_eigh_failures,
            kl_clip=None if self.fop_kl_clip == 0 else self.fop_kl_clip,
            damping_mode=self.fop_damping_mode,
            curvature_sharding=self.fop_curvature_sharding,
            capture_rows=None if self.fop_capture_rows == 0 else self.fop_capture_rows,
            stagger_refresh=self.fop_stagger_refresh,
            stagger_capture=self.fop_stagger_capture,
            max_eigh_dim=None if self.fop_max_eigh_dim == 0 else self.fop_max_eigh_dim,
            block_refresh=self.fop_block_refresh,
            block_tolerance=self.fop_block_tolerance,
            projection_metric=self.fop_projection_metric,
            rotation_dtype=self.fop_rotation_dtype,
        )
        try:
            return FOPConfig(**values)
        except ValueError as err:
            raise ValueError(_rename_config_error(str(err))) from None


_TRAINER_NAMES = {
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "adamw_weight_decay": "weight_decay",
    "adamw_betas": "adam_beta1/adam_beta2",
    "adamw_eps": "adam_epsilon",
    "mode": "fop_optimizer",
}


def _rename_config_error(message: str) -> str:
    """``FOPConfig.damping=...`` -> ``FOPTrainingArguments.fop_damping=...`` (the name the user typed)."""
    prefix = "FOPConfig."
    if not message.startswith(prefix):
        return message
    name = message[len(prefix) :].split("=", 1)[0]
    return f"FOPTrainingArguments.{_TRAINER_NAMES.get(name, 'fop_' + name)}" + message[len(prefix) + len(name) :]


PAPER_MAX_CURVATURE_INTERVAL = 5
"""The paper's limit: curvature (factors and inverse) refreshed at least once every 5 optimizer steps."""


def paper_curvature_interval(global_batch: int) -> int:
    """Curvature interval (steps) of the ``paper`` schedule for a global batch (examples per step).

    The interval grows by one step per doubling of the batch from 512 on and stops at the paper's limit of 5:

    ============  =====  =====  ======  ======  =======
    global batch  <=511  <1024  <2048   <4096   >=4096
    interval        1      2      3       4       5
    ============  =====  =====  ======  ======  =======
    """
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global_batch={global_batch!r} is invalid: expected an integer >= 1 (examples per step).")
    doublings = 0
    while global_batch >= 512 * 2**doublings and doublings < PAPER_MAX_CURVATURE_INTERVAL - 1:
        doublings += 1
    return 1 + doublings


_FIELD_ERROR = re.compile(r"^FOPTrainingArguments\.([A-Za-z0-9_/]+)(.*)$", re.DOTALL)


def parse_fop_args(parser: HfArgumentParser, args: Optional[Sequence[str]] = None, **kwargs: Any) -> Tuple[Any, ...]:
    """``parser.parse_args_into_dataclasses(args, **kwargs)``, with invalid ``FOPTrainingArguments`` values reported
    like argparse's own errors: one line ``<prog>: error: argument --fop_damping: ...`` on stderr and exit status 2
    (a plain ``HfArgumentParser`` lets the ``ValueError`` from the dataclass surface as a traceback).
    """
    try:
        return parser.parse_args_into_dataclasses(args, **kwargs)
    except ValueError as err:
        match = _FIELD_ERROR.match(str(err))
        if match is None:
            raise
        name, rest = match.groups()
        parser.exit(2, f"{parser.prog}: error: argument --{name}: {name}{rest}\n")
