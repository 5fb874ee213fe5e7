"""Cost of the step's big kernels on this machine, one thread, process CPU seconds (best of ``--repeats``):

* a rotation ``Q_S^T G Q_A`` (:func:`hf_fop.fop_math.rotate`) of an ``(out, in)`` gradient in float32 and with
  bfloat16 inputs (conversions included): what ``FOPConfig.rotation_dtype`` trades, and where ``"auto"``'s
  256-wide floor comes from;
* the capture's Gram ``rows^T rows`` (:func:`hf_fop.curvature._gram`, block upper triangle) against one full
  product, and one product of the rows in bfloat16 (conversion included; float32 result);
* ``torch.linalg.eigh`` of a factor of side ``d`` (float32), and where ``d > max_eigh_dim`` one block rotation of
  the block refresh (:func:`hf_fop.refresh.block_rotation`, the first and last groups), the sweep it is one of
  (that time the number of pairs) and the probe that decides whether an adaptive refresh rotates that pair
  (:func:`hf_fop.refresh.pair_error`);
* one capture pass (:func:`hf_fop.curvature._subsample` and the Gram, bias column included) that draws 2,048 rows of
  ``N`` against one that reads all ``N``, for row widths ``d`` and ``N / 2048``: where drawing starts to pay, which
  ``hf_fop.curvature.DRAW_MARGIN`` (``N > 2048 (1 + 256 / d)``) follows;
* the probe ``rotation_dtype="auto"`` times on a CPU (:func:`hf_fop.preconditioner.bfloat16_speedup`) and the answer
  it gives here.

    OMP_NUM_THREADS=1 python scripts/kernel_costs.py            # the shapes of docs/performance.md, about 1 min
    OMP_NUM_THREADS=1 python scripts/kernel_costs.py --small    # tiny shapes, seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_fop.config import FOPConfig  # noqa: E402
from hf_fop.curvature import EigenBasis, _bias_gram, _draws, _gram, _subsample  # noqa: E402
from hf_fop.fop_math import rotate  # noqa: E402
from hf_fop.preconditioner import BFLOAT16_PROBE_WIDTH, bfloat16_speedup, native_bfloat16  # noqa: E402
from hf_fop.refresh import block_bounds, block_rotation, pair_error  # noqa: E402

ROTATIONS = ((64, 65), (128, 129), (256, 257), (384, 385), (768, 769), (3072, 769), (768, 3073))
GRAMS = ((2048, 3072), (2048, 768), (512, 3072))
EIGH = (769, 3073)
DRAW_ROWS = 2048
DRAWS = {"widths": (64, 128, 256, 512, 1024, 3072), "ratios": (1.1, 1.5, 2.0, 3.0, 5.0)}
SMALL = {"rotations": ((16, 17), (32, 33)), "grams": ((1024, 256),), "eigh": (33,), "max_eigh_dim": 16,
         "draws": {"widths": (16,), "ratios": (1.5, 30.0)}}


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Smallest process CPU milliseconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return 1e3 * best


def _bfloat16_gram(x: Tensor) -> Tensor:
    """``x^T x`` of ``x (n, d)`` rounded to bfloat16, as float32 ``(d, d)``."""
    low = x.bfloat16()
    return (low.T @ low).float()


def _capture_pass(rows: Tensor, limit: Optional[int], generator: torch.Generator) -> None:
    """One input capture pass as :func:`hf_fop.curvature._input_gram` runs it without a mask: the rows (``limit`` of
    them drawn whatever their number, or all) and their Gram with the bias column."""
    picked, column = _subsample(rows, None, limit, generator, bias=True, margin=0.0)
    _bias_gram(picked, column)


def measure_draws(widths: Sequence[int], ratios: Sequence[float], repeats: int) -> List[Dict[str, float]]:
    """Per row width ``d`` (bias column included) and ``N / 2048``: ms of a pass that draws 2,048 of ``N`` rows against
    one that reads all ``N``, and whether :func:`hf_fop.curvature._draws` draws there."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for d in widths:
        for ratio in ratios:
            n = int(DRAW_ROWS * ratio)
            rows = torch.randn(n, d - 1, generator=gen)
            drawn = best_ms(lambda: _capture_pass(rows, DRAW_ROWS, gen), repeats)
            every = best_ms(lambda: _capture_pass(rows, None, gen), repeats)
            out.append({"width": d, "rows": n, "ratio": ratio, "drawn_ms": drawn, "every_ms": every,
                        "draws": float(_draws(n, d, DRAW_ROWS))})  # fmt: skip
    return out


def measure(rotations: Sequence[Tuple[int, int]], grams: Sequence[Tuple[int, int]], eigh: Sequence[int],
            repeats: int, max_eigh_dim: Optional[int]) -> Dict[str, List[Dict[str, float]]]:  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    out: Dict[str, List[Dict[str, float]]] = {"rotation": [], "gram": [], "eigh": [], "auto_probe": [
        {"width": BFLOAT16_PROBE_WIDTH, "speedup": bfloat16_speedup(cpu, repeats=repeats),
         "bfloat16": float(native_bfloat16(cpu))}]}
    for rows, cols in rotations:
        g = torch.randn(rows, cols, generator=gen)
        q_s, q_a = (torch.linalg.qr(torch.randn(n, n, generator=gen))[0] for n in (rows, cols))
        f32 = best_ms(lambda: rotate(g, q_s, q_a), repeats)
        bf16 = best_ms(lambda: rotate(g, q_s, q_a, torch.bfloat16), repeats)
        speedup = f32 / bf16 if bf16 > 0 else float("inf")
        out["rotation"].append({"out": rows, "in": cols, "float32_ms": f32, "bfloat16_ms": bf16, "speedup": speedup})
    for n, d in grams:
        x = torch.randn(n, d, generator=gen)
        full = best_ms(lambda: x.T @ x, repeats)
        blocked = best_ms(lambda: _gram(x), repeats)
        bf16 = best_ms(lambda: _bfloat16_gram(x), repeats)
        out["gram"].append({"rows": n, "cols": d, "full_ms": full, "blocked_ms": blocked, "bfloat16_ms": bf16})
    for d in eigh:
        x = torch.randn(4 * d, d, generator=gen)
        factor = x.T @ x / (4 * d)
        entry = {"dim": d, "ms": best_ms(lambda: torch.linalg.eigh(factor), repeats)}
        bounds = block_bounds(d, max_eigh_dim)
        if bounds is not None:
            vals, vecs = torch.linalg.eigh(factor)
            basis, groups = EigenBasis(q=vecs, eigenvalues=vals), len(bounds) - 1
            block = best_ms(lambda: block_rotation(factor, basis, bounds, (0, groups - 1)), repeats)
            probe = best_ms(lambda: pair_error(factor, basis, bounds, (0, groups - 1), 1e-3), repeats)
            pairs = groups * (groups - 1) // 2
            entry.update(max_eigh_dim=max_eigh_dim, groups=groups, block_ms=block, sweep_ms=pairs * block,
                         probe_ms=probe)  # fmt: skip
        out["eigh"].append(entry)
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Dict[str, float]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes (seconds)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-eigh-dim", type=int, default=FOPConfig().max_eigh_dim,
                   help="block refresh of factors larger than this (default: FOPConfig's; --small: 16)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    shapes = SMALL if args.small else {"rotations": ROTATIONS, "grams": GRAMS, "eigh": EIGH, "draws": DRAWS}
    max_eigh_dim = SMALL["max_eigh_dim"] if args.small else args.max_eigh_dim
    result = measure(shapes["rotations"], shapes["grams"], shapes["eigh"], args.repeats, max_eigh_dim)
    result["draw"] = measure_draws(shapes["draws"]["widths"], shapes["draws"]["ratios"], args.repeats)
    for r in result["rotation"]:
        print(f"rotate {r['out']} x {r['in']}: float32 {r['float32_ms']:.1f} ms, bfloat16 {r['bfloat16_ms']:.1f} ms "
              f"({r['speedup']:.2f}x)")  # fmt: skip
    for r in result["gram"]:
        print(f"gram {r['rows']} x {r['cols']}: one product {r['full_ms']:.1f} ms, block triangle {r['blocked_ms']:.1f} ms, "
              f"bfloat16 {r['bfloat16_ms']:.1f} ms")
    for r in result["eigh"]:
        block = (f"; block refresh ({r['groups']} groups): one rotation {r['block_ms']:.0f} ms, sweep "
                 f"{r['sweep_ms']:.0f} ms, the adaptive refresh's probe of a pair {r['probe_ms']:.1f} ms"
                 if "block_ms" in r else "")
        print(f"eigh {r['dim']}: {r['ms']:.0f} ms{block}")
    for r in result["draw"]:
        print(f"capture pass, width {r['width']}, {r['rows']} rows ({r['ratio']:g}x {DRAW_ROWS}): drawing {DRAW_ROWS} "
              f"{r['drawn_ms']:.2f} ms, every row {r['every_ms']:.2f} ms ({r['drawn_ms'] / r['every_ms']:.2f}x); "
              f"the capture {'draws' if r['draws'] else 'reads every row'}")
    for r in result["auto_probe"]:
        print(f"rotation_dtype='auto' probe ({r['width']} x {r['width'] + 1}): bfloat16 {r['speedup']:.2f}x as fast; "
              f"wide layers rotate in {'bfloat16' if r['bfloat16'] else 'float32'} in this process")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
