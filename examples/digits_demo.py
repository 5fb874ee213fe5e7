"""Plain-PyTorch FOP demo on real data: scikit-learn's handwritten digits (no network needed).

Trains the same MLP with FOP, K-FAC (same engine, ``mode="kfac"``) and AdamW at a
large batch, each batch split into two sub-batches for FOP, and prints test accuracy.

    python examples/digits_demo.py                 # all three optimizers
    python examples/digits_demo.py --optimizer fop --batch-size 1024 --epochs 30
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hf_fop import FOP


def load_digits_split(seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Digits as float tensors, standardised: ``x (n, 64)``, ``y (n,)``; 80/20 train/test split by ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    mean, std = x[n_test:].mean(0), x[n_test:].std(0) + 1e-3
    x = (x - mean) / std
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return acc


def train(
    optimizer: str = "fop",
    epochs: int = 20,
    batch_size: int = 512,
    lr: float | None = None,
    damping: float = 1e-2,
    seed: int = 0,
) -> Dict[str, float]:
    """Train one optimizer; returns ``{"test_accuracy", "seconds", "final_loss"}``."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    model = make_model(seed)
    if optimizer in ("fop", "kfac"):
        opt = FOP(model, lr=lr if lr is not None else 0.03, damping=damping, mode=optimizer,
                  adamw_lr=3e-3, factor_interval=1, inverse_interval=5)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr if lr is not None else 3e-3)
    else:
        raise ValueError(f"optimizer={optimizer!r}: expected 'fop', 'kfac' or 'adamw'.")
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        perm = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            if len(idx) < 2:
                continue
            if isinstance(opt, FOP):
                half = len(idx) // 2
                for k, part in enumerate((idx[:half], idx[half:])):
                    with opt.sub_batch(k):
                        loss = F.cross_entropy(model(x_train[part]), y_train[part])
                        loss.backward()
            else:
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
            opt.step()
            opt.zero_grad()
    seconds = time.perf_counter() - start
    return {"test_accuracy": accuracy(model, x_test, y_test), "seconds": seconds, "final_loss": float(loss.detach())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=["fop", "kfac", "adamw", "all"], default="all")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    names = ["fop", "kfac", "adamw"] if args.optimizer == "all" else [args.optimizer]
    for name in names:
        res = train(name, args.epochs, args.batch_size, damping=args.damping, seed=args.seed)
        print(f"{name:6s} test accuracy {res['test_accuracy']:.4f}  final loss {res['final_loss']:.4f}  "
              f"{res['seconds']:.1f} s  (batch {args.batch_size}, {args.epochs} epochs)")


if __name__ == "__main__":
    main()
