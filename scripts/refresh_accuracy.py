"""How far block refresh (``FOPConfig.max_eigh_dim``) takes FOP's step from full eigendecompositions, along a real
fine-tune.

The real pretrained all-MiniLM-L6-v2 fine-tuned on the ChatterBot topics, as ``scripts/rotation_precision.py`` does
(the same task, batches and settings). One run trains with block refresh at ``--max-eigh-dim`` (default 1024: the
1,537-wide factors of MiniLM's feed-forward layers, 12 of them, are refreshed in 4 groups; at the shipped 1600 they
would be decomposed whole), every refresh on the first step of the inverse cycle (``stagger_refresh=False``; the
staggered default spreads the units over the cycle, and the steps on which a block schedule and a full-eigh schedule
refresh a layer differ: that is a difference of timing, the staleness every schedule accepts, not of the refresh).
Beside it the script keeps **exact bases**: every layer's factors decomposed in full on the steps the full-eigh
schedule (``max_eigh_dim=None``, the same cycle) refreshes that layer, from the run's own factors. At every step, on the run's state (the same factors and sub-batch gradients), each managed layer's FOP
direction is computed through both bases: the cosine of the two whole updates (every managed layer, lr = 1, before
the trust region and momentum) and the smallest per-layer cosine. The issue's bar: the whole update within cosine
0.999 of the exact one at every step.

    python scripts/refresh_accuracy.py --steps 200 --out docs/refresh_accuracy   # batch 32: about 15 min
    python scripts/refresh_accuracy.py --steps 3 --batch 8                       # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from rotation_precision import (  # noqa: E402
    TASK_SETTINGS, batches, build_model, cosine_summary, load_task, passes, report,
)

from hf_fop import FOP, FOPConfig  # noqa: E402
from hf_fop.config import BLOCK_REFRESH  # noqa: E402
from hf_fop.curvature import EigenBasis, KFACLayer  # noqa: E402
from hf_fop.fop_math import unrotate  # noqa: E402
from hf_fop.preconditioner import layer_direction  # noqa: E402
from hf_fop.refresh import due_units, refresh_plan  # noqa: E402

Bases = Dict[str, Tuple[EigenBasis, EigenBasis]]


class ExactSchedule:
    """Full eigendecompositions of a run's factors on the steps the full-eigh schedule refreshes each layer."""

    def __init__(self, opt: FOP) -> None:
        config = opt.config.replace(max_eigh_dim=None)
        plan = refresh_plan(opt.layers, config)
        self.units, self.slots = plan.units, plan.slots
        self.k, self.stagger = config.inverse_interval, config.stagger_refresh
        self.bases: Bases = {}

    def after_step(self, step: int, layers: Sequence[KFACLayer]) -> None:
        """Decompose what the full-eigh schedule decomposes at ``step`` (the run's step just taken), from the factors
        that step left; a layer seen with factors for the first time is decomposed at once."""
        fresh = [layer.name for layer in layers if layer.A is not None and layer.name not in self.bases]
        for unit in due_units(self.units, self.slots, step, self.k, self.stagger, fresh):
            layer = unit.layer
            pair = [torch.linalg.eigh(mat) for mat in (layer.A, layer.S)]
            self.bases[layer.name] = tuple(EigenBasis(q=vecs, eigenvalues=vals.clamp_min(0.0)) for vals, vecs in pair)


def compare_directions(opt: FOP, exact: Bases) -> Dict[str, float]:
    """On ``opt``'s state before its step: cosine of the whole update through the run's (block-refreshed) bases and
    through ``exact``'s, and the smallest per-layer cosine (layers with both)."""
    _, diffs = opt.grads.for_step()
    flat: Dict[str, List[torch.Tensor]] = {"block": [], "exact": []}
    layer_cos = []
    for layer in opt.layers:
        if layer.basis_a is None or layer.name not in exact or not diffs:
            continue
        own = (layer.basis_a, layer.basis_s)
        out = {}
        for name, (basis_a, basis_s) in (("block", own), ("exact", exact[layer.name])):
            layer.basis_a, layer.basis_s = basis_a, basis_s
            _, dir_hat = layer_direction(layer, opt.config, diffs)
            out[name] = unrotate(dir_hat, basis_s.q, basis_a.q).double().reshape(-1)
            flat[name].append(out[name])
        layer.basis_a, layer.basis_s = own
        layer_cos.append(float(F.cosine_similarity(out["block"], out["exact"], dim=0)))
    if not layer_cos:
        return {}
    whole = F.cosine_similarity(torch.cat(flat["block"]), torch.cat(flat["exact"]), dim=0)
    return {"cos_whole": float(whole), "cos_min_layer": min(layer_cos)}


def run(steps: int, batch: int, max_eigh_dim: int, block_refresh: str = "sweep", block_tolerance: float = 0.01,
        seed: int = 0) -> Dict[str, Any]:  # fmt: skip
    """The block-refresh run (``FOPConfig.block_refresh``) with its exact bases beside it (see the module docstring)."""
    tokenizer, train, _ = load_task(seed)
    data = batches(tokenizer, train, batch, steps, seed)
    model = build_model(train.features["label"].num_classes, seed)
    opt = FOP(model, max_eigh_dim=max_eigh_dim, block_refresh=block_refresh, block_tolerance=block_tolerance,
              stagger_refresh=False, **TASK_SETTINGS)  # fmt: skip
    exact = ExactSchedule(opt)
    blocked = sorted({unit.layer.name for unit in opt._plan.units if unit.pair is not None})
    per_step: List[Dict[str, float]] = []
    losses = []
    for step, inputs in enumerate(data):
        losses.append(passes(model, opt, inputs))
        per_step.append(compare_directions(opt, exact.bases))
        opt.step()
        opt.zero_grad(set_to_none=True)
        exact.after_step(step, opt.layers)
        if (step + 1) % 20 == 0:
            done = [s for s in per_step if s]
            low = min((s["cos_whole"] for s in done), default=float("nan"))
            print(f"# step {step + 1}: loss {losses[-1]:.4f}, smallest whole cosine so far {low:.6f}, block rotations "
                  f"{opt.engine.block_rotations} (skipped {opt.engine.gated_skips})", file=sys.stderr, flush=True)
    compared = [s for s in per_step if s]
    summary = {
        **cosine_summary(compared),
        "steps_below_0_999": sum(s["cos_whole"] < 0.999 for s in compared),
        "layers_in_blocks": len(blocked),
        "skipped_steps": opt.counters["skipped_steps"],
        "block_rotations": opt.engine.block_rotations,
        "gated_skips": opt.engine.gated_skips,
        "last_loss": statistics.mean(losses[-max(1, steps // 10):]),
    }
    return {"steps": steps, "batch": batch, "max_eigh_dim": max_eigh_dim, "block_refresh": opt.config.block_refresh,
            "block_tolerance": opt.config.block_tolerance,
            "managed_layers": len(opt.layers),
            "layers_in_blocks": blocked, "inverse_interval": opt.config.inverse_interval, "per_step": per_step,
            "train_loss": losses, "summary": summary}  # fmt: skip


def markdown(result: Dict[str, Any]) -> str:
    s = result["summary"]
    return "\n".join([
        f"MiniLM on the ChatterBot topics, {result['steps']} steps of {result['batch']} examples, `max_eigh_dim` "
        f"{result['max_eigh_dim']} ({s['layers_in_blocks']} of {result['managed_layers']} managed layers have a factor "
        f"refreshed in blocks, `block_refresh` \"{result.get('block_refresh', 'sweep')}\""
        + (f", `block_tolerance` {result['block_tolerance']}" if result.get("block_refresh") == "adaptive" else "")
        + f"), inverse cycle "
        f"{result['inverse_interval']} steps, every refresh on its first step "
        f"({result['date']}, torch "
        f"{result['torch']}).",
        "",
        "| FOP update through block-refreshed bases against full eigendecompositions, over steps | value |",
        "|---|---|",
        f"| steps compared (with bases) | {s['steps_compared']} |",
        f"| whole-update cosine, smallest | {s['cos_whole_min']:.6f} |",
        f"| whole-update cosine, median | {s['cos_whole_median']:.6f} |",
        f"| per-layer cosine, smallest | {s['cos_min_layer_min']:.6f} |",
        f"| steps with the whole-update cosine below 0.999 | {s['steps_below_0_999']} |",
        f"| training loss, last tenth of the steps | {s['last_loss']:.4f} |",
    ] + ([f"| block rotations done (skipped by the probe) | {s['block_rotations']} ({s['gated_skips']}) |"]
         if "block_rotations" in s else []))  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="examples per step (two sub-batches), even")
    p.add_argument("--max-eigh-dim", type=int, default=1024, help="block refresh of factors larger than this")
    p.add_argument("--block-refresh", choices=BLOCK_REFRESH, default=FOPConfig().block_refresh,
                   help="FOPConfig.block_refresh: a round of disjoint pairs per cycle, or every pair (default: FOPConfig's)")
    p.add_argument("--block-tolerance", type=float, default=FOPConfig().block_tolerance,
                   help="FOPConfig.block_tolerance (block_refresh adaptive; default: FOPConfig's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 2 or args.batch % 2 or args.max_eigh_dim < 2:
        p.error(f"--steps must be >= 1, --batch even and >= 2, --max-eigh-dim >= 2 (got {args.steps}, {args.batch}, "
                f"{args.max_eigh_dim})")
    torch.set_num_threads(args.threads)
    result = run(args.steps, args.batch, args.max_eigh_dim, args.block_refresh, args.block_tolerance)
    return report(result, markdown, args.out)


if __name__ == "__main__":
    main()
