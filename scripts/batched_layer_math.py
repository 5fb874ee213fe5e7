"""Does stacking same-shape layers pay? FOP's per-step layer math, one layer at a time against stacked by shape.

Issue 16 asks for "layers with the same shapes stacked and processed by batched operations in the step (rotations,
coefficients, KL terms)" so that the step's cost does not grow with the number of small kernels. This measures it
before building it into :mod:`hf_fop.preconditioner`: for every managed layer of a model, random gradients
``g_avg``, ``g1 - g2`` ``(out, in)`` and random orthonormal eigenbases, it times

* ``per_layer``: what the optimizer does, :func:`hf_fop.fop_math.rotate` of both gradients,
  :func:`hf_fop.fop_math.fop_direction_eigen` (direction and its KL terms) and :func:`hf_fop.fop_math.unrotate`,
  layer by layer;
* ``stacked``: the same math on the layers grouped by shape, each group's tensors stacked (``torch.stack`` of the
  gradients and the bases, as a step would have to do) and processed by batched products and reductions;
* ``stacked_prebuilt``: the same with the stacked bases built once outside the timing (what keeping every basis
  stacked in the optimizer state would give);
* ``rotations_only``: the rotation products alone, per layer, the part no batching removes.

Both paths compute the same directions (the smoke test checks them against each other). Prints a table and one
JSON line (ms per step, medians over ``--repeats``)::

    OMP_NUM_THREADS=1 python scripts/batched_layer_math.py            # bench_step.py's ViT (hidden 128, 4 layers)
    OMP_NUM_THREADS=1 python scripts/batched_layer_math.py --hidden 384 --layers 6
    python scripts/batched_layer_math.py --device cuda                # where per-kernel launch costs are larger
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import Shape, build_model  # noqa: E402

from hf_fop import FOPConfig  # noqa: E402
from hf_fop.curvature import find_layers  # noqa: E402
from hf_fop.fop_math import fop_direction_eigen, rotate, unrotate  # noqa: E402

DAMPING, EPS = 1e-3, 1e-12
Case = Dict[str, Tensor]


def make_cases(shapes: Sequence[Tuple[int, int]], device: torch.device, seed: int = 0) -> List[Case]:
    """Per layer ``(out, in)``: gradients ``g``, ``d`` ``(out, in)``, bases ``qs (out, out)``, ``qa (in, in)``,
    eigenvalues ``s (out,)``, ``a (in,)``."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for out, inp in shapes:
        case = {
            "g": torch.randn(out, inp, generator=gen), "d": torch.randn(out, inp, generator=gen),
            "qs": torch.linalg.qr(torch.randn(out, out, generator=gen))[0],
            "qa": torch.linalg.qr(torch.randn(inp, inp, generator=gen))[0],
            "s": torch.rand(out, generator=gen), "a": torch.rand(inp, generator=gen),
        }  # fmt: skip
        cases.append({k: v.to(device) for k, v in case.items()})
    return cases


def per_layer(cases: Sequence[Case]) -> List[Tensor]:
    """Directions in parameter coordinates, one layer at a time (hf_fop's functions)."""
    out = []
    for c in cases:
        g_hat, d_hat = rotate(c["g"], c["qs"], c["qa"]), rotate(c["d"], c["qs"], c["qa"])
        direction, _ = fop_direction_eigen(g_hat, d_hat, c["s"], c["a"], DAMPING, EPS)
        out.append(unrotate(direction, c["qs"], c["qa"]))
    return out


def groups_by_shape(cases: Sequence[Case]) -> Dict[Tuple[int, int], List[int]]:
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, c in enumerate(cases):
        groups.setdefault(tuple(c["g"].shape), []).append(i)
    return groups


def _bdot(x: Tensor, y: Tensor) -> Tensor:
    """Per-slice ``(x * y).sum()`` of ``(L, out, in)`` tensors: ``(L,)``."""
    return torch.bmm(x.reshape(x.shape[0], 1, -1), y.reshape(y.shape[0], -1, 1)).reshape(-1)


def stacked_direction(g: Tensor, d: Tensor, qs: Tensor, qa: Tensor, s: Tensor, a: Tensor) -> Tensor:
    """:func:`fop_direction_eigen` (damped metric, beta* and eta*, KL terms) and both rotations on ``L`` stacked
    layers: ``g``, ``d`` ``(L, out, in)``, ``qs (L, out, out)``, ``qa (L, in, in)``, ``s (L, out)``, ``a (L, in)``."""
    qs_t = qs.transpose(1, 2)
    g_hat, d_hat = qs_t @ g @ qa, qs_t @ d @ qa
    f_hat = s.unsqueeze(-1) * a.unsqueeze(-2)
    m_hat = f_hat + DAMPING
    m_inv = m_hat.reciprocal()
    p_avg = g_hat * m_hat
    s_proj = _bdot(d_hat, p_avg) / (_bdot(g_hat, p_avg) + EPS)
    g_perp = d_hat - g_hat * s_proj.view(-1, 1, 1)
    u, w = g_hat * m_inv, g_perp * m_inv
    n_avg, cross, e = _bdot(g_hat, u), _bdot(g_hat, w), _bdot(g_perp, w)
    beta = torch.where(e > 0, cross / e, torch.zeros_like(e))
    eta = (n_avg + beta * cross) / (n_avg + 2 * beta * cross + beta * beta * e)
    direction = (u + w * beta.view(-1, 1, 1)) * eta.view(-1, 1, 1)
    f_u, f_w = f_hat * u, f_hat * w
    _kl = (_bdot(f_u, u), _bdot(f_u, w), _bdot(f_w, w))  # the KL terms the optimizer reads (computed, not used here)
    return qs @ direction @ qa.transpose(1, 2)


def stacked(cases: Sequence[Case], prebuilt: Optional[Dict[Tuple[int, int], Tuple[Tensor, Tensor]]] = None) -> List[Tensor]:
    """Directions by shape groups; ``prebuilt``: stacked bases per shape (else stacked here, per call)."""
    out: List[Optional[Tensor]] = [None] * len(cases)
    for shape, index in groups_by_shape(cases).items():
        group = [cases[i] for i in index]
        stack = lambda key: torch.stack([c[key] for c in group])  # noqa: E731
        qs, qa = prebuilt[shape] if prebuilt is not None else (stack("qs"), stack("qa"))
        result = stacked_direction(stack("g"), stack("d"), qs, qa, stack("s"), stack("a"))
        for j, i in enumerate(index):
            out[i] = result[j]
    return out  # type: ignore[return-value]


def rotations_only(cases: Sequence[Case]) -> None:
    for c in cases:
        rotate(c["g"], c["qs"], c["qa"]), rotate(c["d"], c["qs"], c["qa"]), unrotate(c["g"], c["qs"], c["qa"])


def median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def layer_shapes(shape: Shape) -> List[Tuple[int, int]]:
    """``(out, in)`` of every managed layer of bench_step's ViT at ``shape`` (bias as a column)."""
    with torch.device("meta"):
        layers, _ = find_layers(build_model(shape, torch.device("meta")), FOPConfig())
    return [(layer.out_dim, layer.in_dim) for layer in layers]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.hidden < 32 or args.layers < 1 or args.repeats < 1:
        p.error("--hidden must be >= 32, --layers and --repeats >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shapes = layer_shapes(Shape(hidden=args.hidden, layers=args.layers, batch=2))
    cases = make_cases(shapes, device)
    prebuilt = {shape: (torch.stack([cases[i]["qs"] for i in index]), torch.stack([cases[i]["qa"] for i in index]))
                for shape, index in groups_by_shape(cases).items()}  # fmt: skip
    ms = {
        "per_layer": median_ms(lambda: per_layer(cases), args.repeats, sync),
        "stacked": median_ms(lambda: stacked(cases), args.repeats, sync),
        "stacked_prebuilt": median_ms(lambda: stacked(cases, prebuilt), args.repeats, sync),
        "rotations_only": median_ms(lambda: rotations_only(cases), args.repeats, sync),
    }
    result = {"device": args.device, "threads": args.threads, "hidden": args.hidden, "layers": len(shapes),
              "groups": len(groups_by_shape(cases)), "ms": ms,
              "stacked_over_per_layer": ms["stacked"] / ms["per_layer"],
              "prebuilt_over_per_layer": ms["stacked_prebuilt"] / ms["per_layer"]}  # fmt: skip
    print(f"# {len(shapes)} layers in {result['groups']} shape groups, hidden {args.hidden}, {args.device}, "
          f"{args.threads} thread(s); ms per step (median of {args.repeats})", file=sys.stderr)  # fmt: skip
    for name, value in ms.items():
        print(f"# {name:18s} {value:8.2f}", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
