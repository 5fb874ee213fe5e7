"""Written once with hf_fop at df4f7d7 (before the package was reorganised): a checkpoint and the step after it.

Run from a checkout of that commit: ``PYTHONPATH=. python tests/data/make_fop_state_df4f7d7.py tests/data/fop_state_df4f7d7.pt``;
tests/test_optimizer.py loads the file with the current code and takes the same next step (:func:`build`).
"""

import copy
import sys
from typing import Callable, Tuple

import torch
from torch import nn

from hf_fop import FOP


def build() -> Tuple[nn.Module, FOP, Callable[[int], None]]:
    """The model, its FOP and ``step(k)``: optimizer step k on two fixed sub-batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    opt = FOP(model, lr=0.1, momentum=0.9, weight_decay=0.01, inverse_interval=2, damping_mode="relative",
              factor_interval=1, capture_rows=None)  # that version captured every row of every step
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(8)]

    def step(k: int) -> None:
        for i in range(2):
            x, y = batches[(2 * k + i) % len(batches)]
            with opt.sub_batch(i):
                nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    return model, opt, step


if __name__ == "__main__":
    model, opt, step = build()
    for k in range(3):
        step(k)
    state = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})  # before step 3 changes them
    step(3)
    state["after_next_step"] = {k: v.clone() for k, v in model.state_dict().items()}
    state["diagnostics_after_next_step"] = opt.diagnostics()
    torch.save(state, sys.argv[1])
