"""Sensitivity benchmark, what the runs say: stable areas per (dataset, model, optimizer variant), seed summaries
per (batch, cell), the stable area per batch size on the ladder grid's cells, and the projection metric's comparison
(FOP with the damped or the undamped Fisher in eq. 4-5, beside K-FAC)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Tuple

from ..common import mean_std
from .grid import CURVATURE, RunSpec, Settings, fisher_twin, ladder_grid_specs, reach, select_best


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
        metric_variants = s.get("metric_variants", [])
        names = [("sgd", None), ("adamw", None)] + [(o, v) for v in s["variants"] for o in CURVATURE]
        names += [("fop", v) for v in metric_variants]
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
            core = variant is None or variant in s["core_variants"] or variant in metric_variants
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
    out = {"areas": areas, "summaries": summaries, "batch_areas": batch_areas(report)}
    if s.get("metric_variants"):
        out["metric"] = {"rows": metric_rows(s, areas, summaries), "pairs": metric_pairs(report), "traces": traces(report)}
    return out


def metric_rows(s: Dict[str, Any], areas: List[Dict[str, Any]], summaries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (dataset, model) and trace variant ``v`` (``abs``, ``abs_clip``) at the largest batch: the stable areas of
    K-FAC[v], FOP[v] (damped metric) and FOP[v_fisher], and the seed summaries (epochs to target) at the default cell
    and at each one's best cell. Entries are None where the runs are missing."""
    out = []
    d = s["default"]
    for dataset, model in s["pairs"]:
        largest = s["batches"][dataset][-1]
        area = {(a["optimizer"], a["variant"]): a for a in areas if (a["dataset"], a["model"]) == (dataset, model)}
        summary = {
            (r["optimizer"], r["variant"], r["lr"], r["damping"]): r for r in summaries
            if (r["dataset"], r["model"], r["batch"]) == (dataset, model, largest)
        }
        for variant in s.get("trace_variants", []):
            row: Dict[str, Any] = {"dataset": dataset, "model": model, "variant": variant}
            for label, (name, v) in (("kfac", ("kfac", variant)), ("damped", ("fop", variant)), ("fisher", ("fop", fisher_twin(variant)))):
                a = area.get((name, v))
                row[label] = {
                    "area": a,
                    "default": summary.get((name, v, d["lr"], d["damping"])) if variant == d["variant"] else None,
                    "best": summary.get((name, v, a["best_lr"], a["best_damping"])) if a else None,
                }
            out.append(row)
    return out


def _largest_batch(s: Dict[str, Any], dataset: str, model: str) -> Tuple[int, int, float]:
    """``(largest batch, its epoch budget, target accuracy)`` of ``(dataset, model)`` in stored settings ``s``."""
    batch = s["batches"][dataset][-1]
    per = s["epochs"][dataset][model]
    return batch, per.get(str(batch), per.get(batch)), s["targets"][dataset][model]  # JSON keys are strings


def metric_pairs(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """FOP in the damped and the fisher metric cell by cell on the full grid at the largest batch (seed 0), per
    (dataset, model, trace variant): cells where both / only one / neither reach the target, diverged cells, the mean
    final test accuracy difference (fisher - damped), the mean ratio of epochs to target over the cells both reach,
    and the ratio of training CPU seconds per epoch over the cells neither diverged in (same session, same machine)."""
    s = report["meta"]["settings"]
    runs = report["runs"]
    out = []
    for dataset, model in s["pairs"]:
        batch, epochs, target = _largest_batch(s, dataset, model)
        for variant in s.get("trace_variants", []):
            pairs = []
            for lr in s["lr_grid"]:
                for damping in s["damping_grid"]:
                    key = lambda v: RunSpec("grid", dataset, model, "fop", v, batch, lr, damping, 0, epochs).key()  # noqa: E731
                    d, f = runs.get(key(variant)), runs.get(key(fisher_twin(variant)))
                    if d is not None and f is not None:
                        pairs.append((d, f))
            if not pairs:
                continue
            hit = [(reach(d, target), reach(f, target)) for d, f in pairs]
            both = [(hd[0], hf[0]) for hd, hf in hit if hd and hf]
            calm = [(d, f) for d, f in pairs if not d["diverged"] and not f["diverged"] and d.get("cpu_seconds") and f.get("cpu_seconds")]
            per_epoch = lambda rs: sum(r["cpu_seconds"][-1] for r in rs) / sum(r["epochs"][-1] for r in rs)  # noqa: E731
            out.append({
                "dataset": dataset, "model": model, "variant": variant, "cells": len(pairs),
                "both": len(both), "only_damped": sum(bool(hd) and not hf for hd, hf in hit),
                "only_fisher": sum(bool(hf) and not hd for hd, hf in hit), "neither": sum(not hd and not hf for hd, hf in hit),
                "diverged_damped": sum(d["diverged"] for d, _ in pairs), "diverged_fisher": sum(f["diverged"] for _, f in pairs),
                "acc_diff": statistics.fmean(f["final_test_acc"] - d["final_test_acc"] for d, f in pairs),
                "epochs_ratio": statistics.fmean(ef / ed for ed, ef in both) if both else math.nan,
                "fisher_faster": sum(ef < ed for ed, ef in both), "damped_faster": sum(ed < ef for ed, ef in both),
                "cpu_per_epoch_ratio": per_epoch([f for _, f in calm]) / per_epoch([d for d, _ in calm]) if calm else math.nan,
            })
    return out


def curve_mean(run: Dict[str, Any], key: str) -> float:
    """Mean over a run's evaluations of one of its ``diagnostics_curve`` values (NaN where none is finite)."""
    values = [v for v in run["diagnostics_curve"].get(key, []) if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def traces(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per (dataset, model, trace variant, lr, damping) of the trace cells: for K-FAC, FOP (damped metric) and FOP
    (fisher metric) the final test accuracy, epochs to target, and the means over the run of |beta*|, s_proj and the
    KL terms (per unit lr^2) and of the trust-region factor; None for a run missing or stored without diagnostics."""
    s = report["meta"]["settings"]
    runs = report["runs"]
    out = []
    for dataset, model in s["pairs"]:
        batch, epochs, target = _largest_batch(s, dataset, model)
        for variant in s.get("trace_variants", []):
            for lr in s["trace_lr"]:
                for damping in s["trace_damping"]:
                    row: Dict[str, Any] = {"dataset": dataset, "model": model, "variant": variant, "lr": lr, "damping": damping}
                    for label, (name, v) in (("kfac", ("kfac", variant)), ("damped", ("fop", variant)), ("fisher", ("fop", fisher_twin(variant)))):
                        run = runs.get(RunSpec("grid", dataset, model, name, v, batch, lr, damping, 0, epochs).key())
                        if run is None or "diagnostics_curve" not in run:
                            row[label] = None
                            continue
                        hit = reach(run, target)
                        row[label] = {
                            "final_test_acc": run["final_test_acc"], "diverged": run["diverged"], "epochs_to_target": hit[0] if hit else None,
                            **{k: curve_mean(run, key) for k, key in (
                                ("beta_abs", "beta_abs_mean"), ("s_proj", "s_proj_mean"), ("kl_base", "kl_base"), ("kl_cross", "kl_cross"),
                                ("kl_orth", "kl_orth"), ("kl_clip_scale", "kl_clip_scale"),
                            )},
                        }
                    out.append(row)
    return out


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
