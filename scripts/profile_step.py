"""Where a K-FAC/FOP step's time goes: torch.profiler over one curvature cycle, split by phase.

Phases: the ``fop::<phase>`` profiler scopes the optimizer runs its work in (:mod:`hf_fop.profiling`):
``capture_forward`` / ``capture_backward`` (the curvature hooks, ``a a^T`` and ``s s^T`` sums), ``sub_batches`` (g1,
g1 - g2, g_avg), ``factors`` (this step's factors and the running averages), ``refresh`` (eigendecompositions),
``precondition`` (rotations and FOP/K-FAC math, the update), ``adamw`` (the AdamW part), ``checks`` (finiteness,
norms); ``passes`` is everything else: forward and backward of the two half batches.

Within each phase, self CPU (or CUDA) time is further split by operator class
(``mm`` = matrix products: rotations and factor sums; ``eigh``; ``elementwise``;
``other``). Prints a table and one JSON line; milliseconds are per step,
averaged over one cycle of ``--interval`` steps after a warm-up cycle.

    python scripts/profile_step.py --mode fop --interval 10
    python scripts/profile_step.py --mode fop --interval 20 --factor-interval 10   # the shipped schedule
    python scripts/profile_step.py --compare-math REV   # + hf_fop/fop_math.py at git REV vs now
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import PRESETS, Shape, build_model, make_batch, make_optimizer, make_step  # noqa: E402

from fop_phases import PHASES, split_by_phase  # noqa: E402

from hf_fop import FOP  # noqa: E402


def compare_math(rev: str, opt: FOP, repeats: int = 30) -> Dict[str, Dict[str, float]]:
    """ms per step of the FOP / K-FAC eigenbasis math over ``opt``'s layer shapes: git ``rev`` vs working tree.

    Both versions run interleaved on the same random rotated gradients and eigenvalues (medians).
    """
    from hf_fop import fop_math

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:hf_fop/fop_math.py"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    old = types.ModuleType("fop_math_at_rev")
    sys.modules[old.__name__] = old
    exec(compile(source, f"{rev}:hf_fop/fop_math.py", "exec"), old.__dict__)
    gen = torch.Generator().manual_seed(0)
    cases = [
        [torch.randn(layer.out_dim, layer.in_dim, generator=gen) for _ in range(2)]
        + [torch.rand(layer.out_dim, generator=gen), torch.rand(layer.in_dim, generator=gen)]
        for layer in opt.layers
    ]
    calls = {
        "fop_direction_eigen": lambda m, c: m.fop_direction_eigen(c[0], c[1], c[2], c[3], 1e-2, 1e-12),
        "kfac_direction_eigen": lambda m, c: m.kfac_direction_eigen(c[0], c[2], c[3], 1e-2),
    }
    out: Dict[str, Dict[str, float]] = {}
    for name, call in calls.items():
        times: Dict[str, list] = {rev: [], "working tree": []}
        for i in range(repeats):  # alternate the order: the second one reuses the first one's freed memory
            for label, module in ((rev, old), ("working tree", fop_math))[:: 1 if i % 2 else -1]:
                t0 = time.perf_counter()
                for case in cases:
                    call(module, case)
                times[label].append(time.perf_counter() - t0)
        out[name] = {label: 1e3 * statistics.median(v) for label, v in times.items()}
        print(f"# {name:22s} {rev}: {out[name][rev]:.2f} ms/step   working tree: {out[name]['working tree']:.2f} ms/step",
              file=sys.stderr)  # fmt: skip
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--mode", choices=("fop", "kfac"), default="fop")
    p.add_argument("--interval", type=int, default=10, help="inverse interval (steps per profiled cycle)")
    p.add_argument("--factor-interval", type=int,
                   help="factor interval, a divisor of --interval (default: --interval); --interval 20 "
                   "--factor-interval 10 is the shipped schedule")  # fmt: skip
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compare-math", metavar="REV", help="also time hf_fop/fop_math.py at git REV against now")
    args = p.parse_args(argv)
    if args.interval < 1:
        p.error(f"--interval must be >= 1, got {args.interval}")
    if args.factor_interval is not None and (args.factor_interval < 1 or args.interval % args.factor_interval):
        p.error(f"--factor-interval must be a divisor of --interval ({args.interval}) and >= 1, got {args.factor_interval}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    base: Shape = PRESETS[args.device]["shape"]
    shape = Shape(hidden=args.hidden or base.hidden, layers=args.layers or base.layers, batch=args.batch or base.batch)
    x, y = make_batch(shape, device)
    model = build_model(shape, device)
    opt = make_optimizer(args.mode, model, args.interval, args.factor_interval)
    assert isinstance(opt, FOP)
    # K-FAC: plain accumulated backward passes, as in bench_step.py.
    passes = make_step("fop" if args.mode == "fop" else "kfac", model, opt, x, y)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        passes()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.interval):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.interval):
            step()
        sync()
    table = split_by_phase(prof, args.interval, device.type == "cuda")
    total = sum(sum(v.values()) for v in table.values())
    classes = ("mm", "eigh", "elementwise", "other")
    print(f"# {args.mode} on {shape.label()}, inverse interval {args.interval}, factor interval "
          f"{opt.config.factor_interval}, {args.threads} thread(s); ms per step",
          file=sys.stderr)  # fmt: skip
    print(f"# {'phase':24s}" + "".join(f"{c:>12s}" for c in classes) + f"{'total':>10s}{'share':>8s}", file=sys.stderr)
    for phase in PHASES:
        row = table.get(phase, {})
        t = sum(row.values())
        print(f"# {phase:24s}" + "".join(f"{row.get(c, 0.0):12.2f}" for c in classes)
              + f"{t:10.2f}{100 * t / total:7.1f}%", file=sys.stderr)  # fmt: skip
    result = {"mode": args.mode, "shape": shape.__dict__, "interval": args.interval,
              "factor_interval": opt.config.factor_interval, "factor_updates": opt.counters["factor_updates"],
              "layer_factor_updates": opt.counters["layer_factor_updates"], "layers": len(opt.engine.layers),
              "ms_per_step": table,
              "total_ms_per_step": total}  # fmt: skip
    if args.compare_math:
        result["compare_math"] = compare_math(args.compare_math, opt)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
