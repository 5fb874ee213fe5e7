"""Scale model on paper: per-rank bytes and curvature seconds per step for ViT-B/16 and ViT-L/16 at 8-512 ranks.

Measured pieces, combined with the byte formulas of docs/distributed.md:

* the managed layers (every ``nn.Linear`` and ``nn.Conv2d``) of ViT-B/16 and
  ViT-L/16 for ImageNet-1k (224 px, 1000 classes), built from ``ViTConfig``
  on the meta device (no download, no memory): factor sizes ``d_A`` (inputs,
  + 1 for the bias) and ``d_S`` (outputs);
* CPU seconds (``time.thread_time``, 1 thread, so a loaded machine does not
  inflate them) of ``torch.linalg.eigh`` per factor size, measured up to
  ``--max_measured_dim`` and extrapolated above it by ``c d^3`` fitted on the
  measured sizes >= 512; and of one layer's FOP direction
  (``hf_fop.fop_math``: two rotations into the eigenbasis and one back, as
  ``FOP._kfac_group_step`` does), measured at every layer shape.

Per rank and optimizer step, with ``k_i`` the inverse interval:

* replicated: every rank decomposes every factor and computes every direction,
  ``sum_l (eigh(d_A) + eigh(d_S)) / k_i + dir_l``;
* specialists: layer ``l`` is computed by its owner only, with the owners
  ``hf_fop.distributed.specialists.assign_owners`` gives (greedy balance of the
  ``d^3`` cost model), and the slowest rank sets the pace:
  ``max_r sum_{l owned by r} (...)``.

Capture (building each rank's own factors from its activations) is local and
the same in both modes, so it is left out. Usage::

    OMP_NUM_THREADS=1 python scripts/scale_model.py [--ranks 8 64 512] [--inverse_interval 10] [--markdown docs/scale_model.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_fop.fop_math import rotate, unrotate  # noqa: E402
from hf_fop.distributed.specialists import assign_owners  # noqa: E402

MODELS = {
    "ViT-B/16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "ViT-L/16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


@dataclass(frozen=True)
class Layer:
    """A managed layer: ``d_a`` input-factor size (incl. bias), ``d_s`` output-factor size, ``numel`` parameters."""

    name: str
    d_a: int
    d_s: int
    numel: int


def vit_layers(name: str) -> Tuple[List[Layer], int]:
    """Managed layers of ``name`` (a key of MODELS) and its total trainable parameter count."""
    config = ViTConfig(image_size=224, patch_size=16, num_labels=1000, **MODELS[name])
    with torch.device("meta"):
        model = ViTForImageClassification(config)
    layers = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            d_a = module.weight[0].numel() + (module.bias is not None)
            layers.append(Layer(module_name, d_a, module.weight.shape[0], sum(p.numel() for p in module.parameters())))
    return layers, sum(p.numel() for p in model.parameters() if p.requires_grad)


def cpu_seconds(fn: Callable[[], object], repeats: int = 1) -> float:
    """Median thread CPU seconds of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return sorted(times)[len(times) // 2]


def spd(d: int, gen: torch.Generator) -> torch.Tensor:
    """A ``(d, d)`` symmetric positive definite matrix shaped like a K-FAC factor (a Gram matrix plus damping)."""
    x = torch.randn(d, 2 * d, generator=gen)
    return x @ x.T / (2 * d) + 1e-3 * torch.eye(d)


def eigh_model(dims: Sequence[int], max_measured: int) -> Tuple[Dict[int, float], Dict[int, bool], float]:
    """CPU seconds of ``eigh`` per size in ``dims``: measured up to ``max_measured``, else ``c d^3``.

    Returns ``(seconds per dim, measured? per dim, c)``; ``c`` is fitted (least squares on the log scale) on the
    measured sizes >= 512 plus 512, 768, 1024 when they are not in ``dims``.
    """
    gen = torch.Generator().manual_seed(0)
    fit_dims = sorted({d for d in dims if 512 <= d <= max_measured} | {d for d in (512, 768, 1024) if d <= max_measured})
    measured = {}
    for d in sorted(set(d for d in dims if d <= max_measured) | set(fit_dims)):
        matrix = spd(d, gen)
        measured[d] = cpu_seconds(lambda: torch.linalg.eigh(matrix))
    c = math.exp(sum(math.log(measured[d] / d**3) for d in fit_dims) / len(fit_dims))
    seconds = {d: measured.get(d, c * d**3) for d in dims}
    return seconds, {d: d in measured for d in dims}, c


def direction_seconds(layer: Layer, gen: torch.Generator) -> float:
    """CPU seconds of one FOP direction's rotations (g_avg and g_perp into the eigenbasis, the step back)."""
    q_a = torch.linalg.qr(torch.randn(layer.d_a, layer.d_a, generator=gen))[0]
    q_s = torch.linalg.qr(torch.randn(layer.d_s, layer.d_s, generator=gen))[0]
    g = torch.randn(layer.d_s, layer.d_a, generator=gen)
    return cpu_seconds(lambda: (rotate(g, q_s, q_a), rotate(g, q_s, q_a), unrotate(g, q_s, q_a)), repeats=3)


def rank_seconds(costs: Sequence[float], owners: Sequence[int], ranks: int) -> List[float]:
    """Per-rank curvature seconds when layer ``l`` (``costs[l]`` seconds) is computed by rank ``owners[l]`` only."""
    loads = [0.0] * ranks
    for cost, rank in zip(costs, owners):
        loads[rank] += cost
    return loads


def bytes_per_step(n: int, n_managed: int, t: int, world: int, k_i: int) -> Dict[str, float]:
    """Bytes each rank sends per step (ring model, float32) per mode; formulas in docs/distributed.md.

    ``n`` trainable parameters, ``n_managed`` of them in managed layers, ``t`` factor elements (upper triangles).
    """
    ring = (world - 1) / world
    ddp = 2 * ring * 4 * n
    replicated_grad = (world - 1) * 4 * n if world <= 4 else 2 * ring * 8 * n
    other = n - n_managed
    specialists_grad = 2 * ring * 4 * other + ring * 8 * n_managed + ring * 4 * n_managed  # AdamW, [g1; g2] RS, AG
    return {
        "ddp_adamw": ddp,
        "replicated": replicated_grad + 2 * ring * 4 * t / k_i,
        "specialists": specialists_grad + ring * 4 * t / k_i,
    }


def main(argv: Sequence[str] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--inverse_interval", type=int, default=10, help="k_i: eigendecompositions every k_i steps")
    p.add_argument("--max_measured_dim", type=int, default=1100, help="eigh is measured up to this size, fitted above")
    p.add_argument("--markdown", default=None, help="write the report to this file")
    args = p.parse_args(argv)
    for name, value in (("--inverse_interval", args.inverse_interval), ("--max_measured_dim", args.max_measured_dim)):
        if value < 1:
            p.error(f"{name} {value} is invalid: expected an integer >= 1")
    if any(w < 1 for w in args.ranks):
        p.error(f"--ranks {args.ranks} is invalid: expected integers >= 1")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    k_i = args.inverse_interval
    models = {name: vit_layers(name) for name in MODELS}
    dims = sorted({d for layers, _ in models.values() for layer in layers for d in (layer.d_a, layer.d_s)})
    eigh_s, measured, c = eigh_model(dims, args.max_measured_dim)
    lines = [
        f"_Generated by `OMP_NUM_THREADS=1 python scripts/scale_model.py --inverse_interval {k_i}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (1 torch thread, CPU seconds), "
        f"torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC._",
        "",
        "eigh CPU seconds per factor size (* = extrapolated as c d^3, c = "
        f"{c:.3g} s): " + ", ".join(f"{d}: {eigh_s[d]:.3g}{'' if measured[d] else '*'}" for d in dims),
        "",
        "| model | ranks | mode | bytes / step / rank (MB) | ratio to DDP-AdamW | curvature s / step / rank | "
        "speed-up vs replicated | owner load max/min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (layers, n) in models.items():
        n_managed = sum(layer.numel for layer in layers)
        t = sum(d * (d + 1) // 2 for layer in layers for d in (layer.d_a, layer.d_s))
        shape_seconds: Dict[Tuple[int, int], float] = {}
        for layer in layers:
            if (layer.d_a, layer.d_s) not in shape_seconds:
                shape_seconds[(layer.d_a, layer.d_s)] = direction_seconds(layer, gen)
        costs = [(eigh_s[l.d_a] + eigh_s[l.d_s]) / k_i + shape_seconds[(l.d_a, l.d_s)] for l in layers]
        replicated = sum(costs)
        for world in args.ranks:
            sent = bytes_per_step(n, n_managed, t, world, k_i)
            loads = rank_seconds(costs, assign_owners([(l.d_a, l.d_s) for l in layers], world), world)
            busy = [x for x in loads if x > 0]
            rows = (
                ("DDP + AdamW", sent["ddp_adamw"], None, ""),
                ("FOP replicated", sent["replicated"], replicated, ""),
                ("FOP specialists", sent["specialists"], max(loads),
                 f"{max(busy) / min(busy):.2f} ({len(busy)} of {world} ranks own layers)"),
            )
            for mode, nbytes, seconds, balance in rows:
                lines.append(
                    f"| {name} ({len(layers)} layers, {n / 1e6:.0f}M params) | {world} | {mode} | {nbytes / 1e6:.0f} | "
                    f"{nbytes / sent['ddp_adamw']:.2f} | {'-' if seconds is None else f'{seconds:.3f}'} | "
                    f"{'-' if seconds is None else f'{replicated / seconds:.1f}x'} | {balance} |"
                )
    text = "\n".join(lines) + "\n"
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
