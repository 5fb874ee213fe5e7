"""Convergence benchmark, what runs: the settings per profile, one run's spec, and the models at each size.

Every optimizer is tuned on one lr grid (and K-FAC/FOP on one damping grid) at seed 0 per (model, batch); the
chosen settings get more seeds, and FOP's chosen setting at the largest batch the beta*/eta* ablations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from ..data import N_CLASSES
from ..models import MLP, ViTLogits

OPTIMIZERS = ("sgd", "adamw", "kfac", "fop")
CURVATURE_OPTIMIZERS = ("kfac", "fop")
ABLATIONS = ("fop_no_beta", "fop_no_eta")



@dataclass
class Settings:
    """Everything that defines one benchmark run (stored in the JSON).

    ``epochs[model][batch]``: training epochs; ``targets[model]``: target test
    accuracy in [0, 1]; ``inverse_interval[batch]``: steps between eigendecompositions
    (factors are updated every step); ``adamw_lr_curvature``: lr of the parameters
    FOP/K-FAC leave to AdamW (ViT LayerNorms, embeddings), scheduled like the rest.
    """

    profile: str
    models: List[str]
    batch_sizes: List[int]
    epochs: Dict[str, Dict[int, int]]
    targets: Dict[str, float]
    lr_grid: List[float]
    damping_grid: List[float]
    seeds: int
    inverse_interval: Dict[int, int]
    evals_per_run: int = 150
    warmup_fraction: float = 0.05
    momentum: float = 0.9
    adamw_weight_decay: float = 0.01
    adamw_lr_curvature: float = 3e-3
    split_seed: int = 0
    ablation_seeds: int = 3


def make_settings(profile: str) -> Settings:
    """``"full"`` (about 30 min on 2 CPU cores), ``"quick"`` (about 1 min), ``"smoke"`` (the quick run's code paths
    in a few seconds, for tests) or ``"cuda"`` (sized up)."""
    full_batches = [64, 256, 1078]
    if profile == "full":
        return Settings(
            profile=profile,
            models=["mlp", "vit"],
            batch_sizes=full_batches,
            epochs={"mlp": {64: 15, 256: 40, 1078: 100}, "vit": {64: 20, 256: 50, 1078: 150}},
            targets={"mlp": 0.96, "vit": 0.93},
            lr_grid=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
            damping_grid=[1e-3, 1e-2, 1e-1, 1.0],
            seeds=3,
            inverse_interval={64: 10, 256: 10, 1078: 5},
        )
    if profile == "quick":
        return Settings(
            profile=profile,
            models=["mlp", "vit"],
            batch_sizes=[128, 1078],
            epochs={"mlp": {128: 6, 1078: 30}, "vit": {128: 4, 1078: 15}},
            targets={"mlp": 0.9, "vit": 0.5},
            lr_grid=[3e-3, 3e-2],
            damping_grid=[1e-2, 1e-1],
            seeds=2,
            inverse_interval={128: 10, 1078: 5},
            evals_per_run=10,
            ablation_seeds=1,
        )
    if profile == "smoke":
        return Settings(
            profile=profile,
            models=["mlp", "vit"],
            batch_sizes=[128, 1078],
            epochs={"mlp": {128: 4, 1078: 20}, "vit": {128: 2, 1078: 10}},
            targets={"mlp": 0.85, "vit": 0.4},
            lr_grid=[3e-3, 3e-2],
            damping_grid=[1e-1],
            seeds=1,
            inverse_interval={128: 10, 1078: 5},
            evals_per_run=5,
            ablation_seeds=1,
        )
    if profile == "cuda":
        return Settings(
            profile=profile,
            models=["mlp", "vit"],
            batch_sizes=[32, 128, 512, 1078],
            epochs={"mlp": {32: 30, 128: 60, 512: 150, 1078: 300}, "vit": {32: 60, 128: 120, 512: 300, 1078: 500}},
            targets={"mlp": 0.97, "vit": 0.95},
            lr_grid=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
            damping_grid=[1e-4, 1e-3, 1e-2, 1e-1, 1.0],
            seeds=5,
            inverse_interval={32: 10, 128: 10, 512: 5, 1078: 5},
            evals_per_run=100,
            ablation_seeds=5,
        )
    raise ValueError(f"profile={profile!r} is invalid: expected 'full', 'quick', 'smoke' or 'cuda'.")


@dataclass
class RunSpec:
    """One training run. ``optimizer`` is one of OPTIMIZERS or ABLATIONS; ``damping`` is None for SGD/AdamW."""

    model: str
    optimizer: str
    batch: int
    lr: float
    damping: Optional[float]
    seed: int
    epochs: int
    phase: str  # "grid", "seeds" or "ablation"


MODEL_SIZES = {
    # name: {"cpu": kwargs, "cuda": kwargs}
    "vit": {"cpu": dict(hidden=32, layers=2, heads=4, patch=[4, 4]), "cuda": dict(hidden=192, layers=6, heads=6, patch=[2, 2])},
    "mlp": {"cpu": dict(width=128), "cuda": dict(width=1024)},
}


def build_model(name: str, device_kind: str, seed: int) -> nn.Module:
    """Model ``name`` ("vit" or "mlp") for the 8x8 digits at the ``device_kind`` ("cpu" or "cuda") size, initialised from ``seed``."""
    if name not in MODEL_SIZES:
        raise ValueError(f"model={name!r} is invalid: expected one of {sorted(MODEL_SIZES)}.")
    if device_kind not in ("cpu", "cuda"):
        raise ValueError(f"device_kind={device_kind!r} is invalid: expected 'cpu' or 'cuda'.")
    torch.manual_seed(seed)
    kwargs = MODEL_SIZES[name][device_kind]
    return ViTLogits((8, 8), N_CLASSES, **kwargs) if name == "vit" else MLP(64, N_CLASSES, **kwargs)
