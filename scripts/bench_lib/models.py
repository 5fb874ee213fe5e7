"""The benchmarks' models, each returning logits ``(N, classes)`` from inputs ``(N, 1, H, W)``.

An MLP (tanh), a small CNN with BatchNorm (its BatchNorm parameters go to FOP's AdamW) and a small HF
``ViTForImageClassification``; on a row of features (``H = 1``) the CNN and the ViT use 1-high kernels and patches.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .data import Splits

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

