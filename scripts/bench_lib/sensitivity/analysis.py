"""Sensitivity benchmark, what the runs say: stable areas per (dataset, model, optimizer variant), seed summaries
per (batch, cell), and the stable area per batch size on the ladder grid's cells."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..common import mean_std
from .grid import CURVATURE, RunSpec, Settings, ladder_grid_specs, reach, select_best

def analyse(report: Dict[str, Any]) -> Dict[str, Any]:
    """Stable areas per (dataset, model, optimizer variant) and seed summaries per (batch, cell).

    ``sub_reached`` / ``sub_cells``: the stable area on the sub-grid that every variant ran (lr only for SGD/AdamW),
    so that the core and the other variants compare on the same cells. ``seconds_to_target``: training CPU seconds,
    over the seeds that reach the target and were stored with CPU time (``timed``).
    """
    s = report["meta"]["settings"]
    runs = list(report["runs"].values())
    areas, summaries = [], []
    for dataset, model in s["pairs"]:
        target = s["targets"][dataset][model]
        names = [("sgd", None), ("adamw", None)] + [(o, v) for v in s["variants"] for o in CURVATURE]
        for name, variant in names:
            grid = [
                r for r in runs if r["spec"]["phase"] == "grid" and r["spec"]["dataset"] == dataset
                and r["spec"]["model"] == model and r["spec"]["optimizer"] == name and r["spec"]["variant"] == variant
            ]
            if not grid:
                continue
            ok = [r for r in grid if reach(r, target) is not None]
            diverged = [r for r in grid if r["diverged"]]
            best = select_best(grid, target)
            core = variant is None or variant in s["core_variants"]
            lrs, dampings = (s["lr_grid"], s["damping_grid"]) if core else (s["subgrid_lr"], s["subgrid_damping"])
            have = {(r["spec"]["lr"], r["spec"]["damping"]) for r in grid}
            expected = {(lr, d) for lr in lrs for d in ([None] if variant is None else dampings)}
            sub = [r for r in grid if r["spec"]["lr"] in s["subgrid_lr"] and (variant is None or r["spec"]["damping"] in s["subgrid_damping"])]
            areas.append({
                "dataset": dataset, "model": model, "optimizer": name, "variant": variant, "complete": expected <= have,
                "cells": len(grid), "reached": len(ok), "stable_area": len(ok) / len(grid), "diverged": len(diverged),
                "sub_cells": len(sub), "sub_reached": sum(reach(r, target) is not None for r in sub),
                "best_lr": best["spec"]["lr"], "best_damping": best["spec"]["damping"],
            })
        for batch in s["batches"][dataset]:
            groups: Dict[Tuple, List[Dict[str, Any]]] = {}
            for r in runs:
                sp = r["spec"]
                if sp["phase"] in ("grid", "ladder_grid") or sp["dataset"] != dataset or sp["model"] != model or sp["batch"] != batch:
                    continue
                groups.setdefault((sp["optimizer"], sp["variant"], sp["lr"], sp["damping"]), []).append(r)
            if batch == s["batches"][dataset][-1]:  # seed 0 of the grid is the first seed
                for r in runs:
                    sp = r["spec"]
                    key = (sp["optimizer"], sp["variant"], sp["lr"], sp["damping"])
                    if sp["phase"] == "grid" and sp["dataset"] == dataset and sp["model"] == model and key in groups:
                        groups[key].append(r)
            d = s["default"]
            for (name, variant, lr, damping), rs in sorted(groups.items(), key=lambda t: str(t[0])):
                hits = [reach(r, target) for r in rs]
                got = [h for h in hits if h is not None]
                timed = [h[1] for h in got if h[1] is not None]
                summaries.append({
                    "dataset": dataset, "model": model, "batch": batch, "optimizer": name, "variant": variant,
                    "lr": lr, "damping": damping, "seeds": len(rs), "reached": len(got), "timed": len(timed),
                    "is_default": name in CURVATURE and variant == d["variant"] and lr == d["lr"] and damping == d["damping"],
                    "epochs_to_target": mean_std([h[0] for h in got]), "seconds_to_target": mean_std(timed),
                    "final_test_acc": mean_std([r["final_test_acc"] for r in rs]),
                    "diverged": sum(r["diverged"] for r in rs),
                })
    return {"areas": areas, "summaries": summaries, "batch_areas": batch_areas(report)}


def batch_areas(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Stable area per batch size on the ladder grid's cells, like for like: per (dataset, model, optimizer variant),
    each of the ladder grid's batches and the largest batch (the grid's runs at the same cells), seed 0.

    ``cells``: the runs found of ``expected`` (a partial run lacks some); ``reached``: those reaching the target;
    ``diverged``: those that diverged.
    """
    s = report["meta"]["settings"]
    settings = Settings(**{k: v for k, v in s.items() if k in Settings.__dataclass_fields__})
    settings.pairs = [tuple(p) for p in s["pairs"]]
    settings.batches = s["batches"]
    settings.epochs = {ds: {m: {int(b): e for b, e in per.items()} for m, per in models.items()} for ds, models in s["epochs"].items()}
    runs = report["runs"]
    out = []
    for dataset, model in settings.pairs:
        if dataset not in settings.ladder_grid_batch:
            continue
        target = s["targets"][dataset][model]
        for batch in [*settings.ladder_grid_batch[dataset], settings.batches[dataset][-1]]:
            groups: Dict[Tuple[str, Optional[str]], List[RunSpec]] = {}
            for spec in ladder_grid_specs(settings, [(dataset, model)], lambda ds: batch):
                groups.setdefault((spec.optimizer, spec.variant), []).append(spec)
            for (name, variant), specs in groups.items():
                found = [runs[sp.key()] for sp in specs if sp.key() in runs]
                out.append({
                    "dataset": dataset, "model": model, "batch": batch, "optimizer": name, "variant": variant,
                    "expected": len(specs), "cells": len(found), "reached": sum(reach(r, target) is not None for r in found),
                    "diverged": sum(bool(r["diverged"]) for r in found),
                })
    return out
