"""Data and models of the convergence benchmark (``scripts/benchmark_convergence.py``).

Data: scikit-learn's digits (1797 grey 8x8 images, 10 classes), split into
train / validation / test with a fixed seed and standardised with the
training split's pixel mean and std. Models: a small HF ``ViTForImageClassification``
(2x2 patches of the 8x8 image) and an MLP, both returning logits ``(B, 10)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch
from torch import Tensor, nn

N_CLASSES = 10
N_VAL = 359  # leaves an even training split (1078) so "batch = dataset" halves exactly
N_TEST = 360


@dataclass
class DigitsSplits:
    """Tensors ``x_*``: ``(N, 1, 8, 8)`` float32 standardised pixels; ``y_*``: ``(N,)`` int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device) -> "DigitsSplits":
        return DigitsSplits(**{k: v.to(device) for k, v in self.__dict__.items()})

    def sizes(self) -> Dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def load_digits_splits(seed: int = 0) -> DigitsSplits:
    """Fixed (by ``seed``) permutation of sklearn digits into 1078 / 359 / 360 examples."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    y = data.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    test_idx, val_idx = perm[:N_TEST], perm[N_TEST : N_TEST + N_VAL]
    train_idx = perm[N_TEST + N_VAL :]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    xt = torch.from_numpy((x - mean) / std).unsqueeze(1)  # (N, 1, 8, 8)
    yt = torch.from_numpy(y)
    pick = lambda idx: (xt[idx].contiguous(), yt[idx].contiguous())  # noqa: E731
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pick(train_idx), pick(val_idx), pick(test_idx)
    return DigitsSplits(x_tr, y_tr, x_va, y_va, x_te, y_te)


class ViTLogits(nn.Module):
    """``transformers.ViTForImageClassification`` on ``(B, 1, 8, 8)`` images, returning logits ``(B, 10)``."""

    def __init__(self, hidden: int, layers: int, heads: int, patch: int = 2) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=8,
            patch_size=patch,
            num_channels=1,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=2 * hidden,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=N_CLASSES,
        )
        self.vit = ViTForImageClassification(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(pixel_values=x).logits


class MLP(nn.Module):
    """Flattened 64 pixels -> ``width`` -> ``width`` -> 10 logits, tanh activations."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, width),
            nn.Tanh(),
            nn.Linear(width, width),
            nn.Tanh(),
            nn.Linear(width, N_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


MODEL_SIZES = {
    # name: {"cpu": kwargs, "cuda": kwargs}
    "vit": {"cpu": dict(hidden=32, layers=2, heads=4, patch=4), "cuda": dict(hidden=192, layers=6, heads=6, patch=2)},
    "mlp": {"cpu": dict(width=128), "cuda": dict(width=1024)},
}


def build_model(name: str, device_kind: str, seed: int) -> nn.Module:
    """Model ``name`` ("vit" or "mlp") at the ``device_kind`` ("cpu" or "cuda") size, initialised from ``seed``."""
    if name not in MODEL_SIZES:
        raise ValueError(f"model={name!r} is invalid: expected one of {sorted(MODEL_SIZES)}.")
    if device_kind not in ("cpu", "cuda"):
        raise ValueError(f"device_kind={device_kind!r} is invalid: expected 'cpu' or 'cuda'.")
    torch.manual_seed(seed)
    kwargs = MODEL_SIZES[name][device_kind]
    return ViTLogits(**kwargs) if name == "vit" else MLP(**kwargs)
