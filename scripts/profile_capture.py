"""Training CPU seconds of K-FAC and FOP on one sensitivity-benchmark pair, and where the time goes (cProfile).

Runs the sensitivity benchmark's ``train_run`` (``bench_lib.sensitivity.runner``) at the default cell (abs_clip,
lr 0.1, damping 1e-2, seed 0) at the given batch (default: the whole training split), one thread, and prints per
optimizer the training CPU seconds of
``--repeats`` runs and, from one more run under cProfile, the seconds of the operations the curvature capture and
the model share (``im2col``, ``torch.cat``, ``reshape``, the backward pass) and of the eigendecompositions::

    python scripts/profile_capture.py --dataset digits --model cnn
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_lib.data import load_dataset  # noqa: E402
from bench_lib.models import MODELS  # noqa: E402
from bench_lib.sensitivity.grid import RunSpec, make_settings  # noqa: E402
from bench_lib.sensitivity.runner import train_run  # noqa: E402

OPERATIONS = {
    "im2col": "torch._C._nn.im2col",
    "torch.cat": "torch.cat",
    "reshape": "'reshape' of 'torch._C.TensorBase'",
    "backward": "'run_backward'",
    "eigh": "linalg_eigh",
}
"""Row label -> a piece of the cProfile function name (built-ins: ``<built-in method ...>``)."""


def operation_seconds(stats: pstats.Stats) -> Dict[str, float]:
    """Internal seconds per :data:`OPERATIONS` row, summed over the matching profile entries."""
    out = {label: 0.0 for label in OPERATIONS}
    for (_, _, name), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        for label, piece in OPERATIONS.items():
            if piece in name:
                out[label] += tottime
    return out


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "diamonds"])
    p.add_argument("--model", default="cnn", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=None, help="default: the whole training split")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    settings = make_settings("full", {"lr": 0.1, "damping": 1e-2, "variant": "abs_clip"})
    data = load_dataset(args.dataset)
    batch = args.batch or len(data.y_train)
    rows = []
    for optimizer in ("kfac", "fop"):
        spec = RunSpec("profile", args.dataset, args.model, optimizer, "abs_clip", batch, 0.1, 1e-2, 0, args.epochs)
        runs = [train_run(spec, data, settings) for _ in range(args.repeats)]
        profiler = cProfile.Profile()
        profiler.enable()
        train_run(spec, data, settings)
        profiler.disable()
        row = {
            "optimizer": optimizer,
            "training_cpu_s": [round(r["cpu_seconds"][-1], 2) for r in runs],
            "final_test_acc": runs[0]["final_test_acc"],
            **{k: round(v, 2) for k, v in operation_seconds(pstats.Stats(profiler)).items()},
        }
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
