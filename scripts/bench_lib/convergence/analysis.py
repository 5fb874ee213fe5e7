"""Convergence benchmark, what the runs say: time to target, the chosen settings and their seed statistics, the
damping sweep, the ablations, and FOP against K-FAC cell by cell."""

from __future__ import annotations

import datetime
import math
import statistics
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..common import machine_description, mean_std
from .grid import ABLATIONS, CURVATURE_OPTIMIZERS, OPTIMIZERS, Settings

def reach(result: Dict[str, Any], target: float) -> Optional[Tuple[int, float]]:
    """(epoch, training seconds) of the first evaluation with test accuracy >= ``target``, else None."""
    for e, sec, acc in zip(result["epochs"], result["seconds"], result["test_acc"]):
        if acc >= target:
            return e, sec
    return None


def select_best(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The run with the highest final validation accuracy (ties: lower validation loss)."""
    return max(runs, key=lambda r: (r["final_val_acc"], -r["final_val_loss"]))


def summarize(runs: Sequence[Dict[str, Any]], target: float) -> Dict[str, Any]:
    """Time-to-target and final accuracy statistics over the seeds of one chosen setting."""
    reached = [reach(r, target) for r in runs]
    hit = [x for x in reached if x is not None]
    ep_mean, ep_std = mean_std([float(e) for e, _ in hit])
    sec_mean, sec_std = mean_std([sec for _, sec in hit])
    acc_mean, acc_std = mean_std([r["final_test_acc"] for r in runs])
    return {
        "seeds": len(runs),
        "reached": len(hit),
        "epochs_mean": ep_mean,
        "epochs_std": ep_std,
        "seconds_mean": sec_mean,
        "seconds_std": sec_std,
        "final_test_acc_mean": acc_mean,
        "final_test_acc_std": acc_std,
        "total_seconds_mean": statistics.fmean(r["total_seconds"] for r in runs),
    }


def build_report(s: Settings, runs: List[Dict[str, Any]], device: torch.device, wall: float) -> Dict[str, Any]:
    """Selections, Table-1 summaries, damping sweeps and ablations from the raw ``runs``."""
    table: List[Dict[str, Any]] = []
    damping_sweep: List[Dict[str, Any]] = []
    ablations: List[Dict[str, Any]] = []
    for model in s.models:
        for batch in s.batch_sizes:
            for opt_name in OPTIMIZERS:
                grid = [
                    r for r in runs
                    if r["spec"]["phase"] == "grid" and r["spec"]["model"] == model
                    and r["spec"]["batch"] == batch and r["spec"]["optimizer"] == opt_name
                ]
                best = select_best(grid)
                seeds = [r for r in runs if _same_setting(r, best["spec"])]
                table.append(
                    {"model": model, "batch": batch, "optimizer": opt_name, "lr": best["spec"]["lr"],
                     "damping": best["spec"]["damping"], **summarize(seeds, s.targets[model])}
                )
                if opt_name in CURVATURE_OPTIMIZERS:
                    for d in s.damping_grid:
                        at_d = select_best([r for r in grid if r["spec"]["damping"] == d])
                        damping_sweep.append(
                            {"model": model, "batch": batch, "optimizer": opt_name, "damping": d,
                             "lr": at_d["spec"]["lr"], "final_val_acc": at_d["final_val_acc"],
                             "final_test_acc": at_d["final_test_acc"], "diverged": at_d["diverged"]}
                        )
        largest = max(s.batch_sizes)
        fop_best = select_best(
            [r for r in runs if r["spec"]["phase"] == "grid" and r["spec"]["model"] == model
             and r["spec"]["batch"] == largest and r["spec"]["optimizer"] == "fop"]
        )["spec"]
        for name in ("fop",) + ABLATIONS:
            same = [r for r in runs if _same_setting(r, fop_best, None if name == "fop" else name)]
            if name == "fop":
                same = same[: s.ablation_seeds]
            diag = {k: statistics.fmean(r["diagnostics"].get(k, math.nan) for r in same) for k in ("beta_mean", "eta_mean")}
            ablations.append(
                {"model": model, "batch": largest, "variant": name, "lr": fop_best["lr"],
                 "damping": fop_best["damping"], **summarize(same, s.targets[model]), **diag}
            )
    return {
        "meta": {
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_description(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "wall_seconds": wall,
            "train_cpu_over_wall": sum(r["cpu_seconds"][-1] for r in runs) / max(1e-9, sum(r["seconds"][-1] for r in runs)),
            "settings": asdict(s),
        },
        "table": table,
        "damping_sweep": damping_sweep,
        "ablations": ablations,
        "runs": runs,
    }


PAIR_MARGIN = 1.0  # percentage points
FAILED_ACC = 0.2  # a final test accuracy below this counts as a failed (diverged or stuck) run


def paired_damping(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per model and damping: FOP vs K-FAC grid runs paired on (batch, lr), final test accuracy differences."""
    s = report["meta"]["settings"]
    grid = {
        (r["spec"]["model"], r["spec"]["batch"], r["spec"]["lr"], r["spec"]["damping"], r["spec"]["optimizer"]): r
        for r in report["runs"]
        if r["spec"]["phase"] == "grid" and r["spec"]["optimizer"] in CURVATURE_OPTIMIZERS
    }
    rows = []
    for model in s["models"]:
        for d in s["damping_grid"]:
            diffs, both_failed = [], 0
            for batch in s["batch_sizes"]:
                for lr in s["lr_grid"]:
                    k, f = grid[(model, batch, lr, d, "kfac")], grid[(model, batch, lr, d, "fop")]
                    if max(k["final_test_acc"], f["final_test_acc"]) < FAILED_ACC:
                        both_failed += 1
                    else:
                        diffs.append(100 * (f["final_test_acc"] - k["final_test_acc"]))
            rows.append(
                {"model": model, "damping": d, "pairs": len(diffs) + both_failed, "both_failed": both_failed,
                 "mean_diff": statistics.fmean(diffs) if diffs else math.nan,
                 "fop_better": sum(x > PAIR_MARGIN for x in diffs), "kfac_better": sum(x < -PAIR_MARGIN for x in diffs)}
            )
    return rows


def _same_setting(run: Dict[str, Any], spec: Dict[str, Any], optimizer: Optional[str] = None) -> bool:
    sp = run["spec"]
    return (
        sp["model"] == spec["model"]
        and sp["batch"] == spec["batch"]
        and sp["optimizer"] == (optimizer or spec["optimizer"])
        and sp["lr"] == spec["lr"]
        and sp["damping"] == spec["damping"]
        and sp["phase"] in (("grid", "seeds") if optimizer is None else ("ablation",))
    )
