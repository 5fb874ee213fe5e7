"""Cost of an eigenbasis refresh on this machine: ``torch.linalg.eigh`` of a factor against a warm-started refresh
from the previous basis (one power iteration ``F @ Q`` and a QR, as SOAP and Distributed Shampoo do; the eigenvalue
re-estimate, another GEMM, is not counted). Process CPU seconds, best of ``--repeats``, one thread by default.

    OMP_NUM_THREADS=1 python scripts/refresh_cost.py --dims 769 1537
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def best_cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Smallest process CPU time of ``repeats`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def measure(dim: int, repeats: int, seed: int = 0) -> Dict[str, float]:
    """Seconds of eigh, of the warm start (GEMM + QR) and of its two parts, for a random factor of side ``dim``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * dim, dim, generator=gen)
    factor = x.T @ x / (4 * dim)
    _, q = torch.linalg.eigh(factor)
    out = {
        "eigh": best_cpu_seconds(lambda: torch.linalg.eigh(factor), repeats),
        "warm": best_cpu_seconds(lambda: torch.linalg.qr(factor @ q), repeats),
        "gemm": best_cpu_seconds(lambda: factor @ q, repeats),
        "qr": best_cpu_seconds(lambda: torch.linalg.qr(q), repeats),
    }
    out["eigh_over_warm"] = out["eigh"] / out["warm"]
    return out


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[769, 1537])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for dim in args.dims:
        r = measure(dim, args.repeats)
        rows.append({"dim": dim, **r})
        print(f"{dim}: eigh {r['eigh']:.3f} s, warm (GEMM + QR) {r['warm']:.3f} s (GEMM {r['gemm']:.3f}, QR {r['qr']:.3f});"
              f" eigh / warm {r['eigh_over_warm']:.2f}")
    return rows


if __name__ == "__main__":
    main()
