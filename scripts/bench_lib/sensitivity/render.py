"""Sensitivity benchmark, what the reader sees: the heat maps (final test accuracy over lr x damping) and the
generated markdown (stable areas, per-batch areas, epochs and CPU seconds to the target)."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .grid import CURVATURE

def _name(optimizer: str, variant: Optional[str]) -> str:
    return optimizer if variant is None else f"{optimizer}[{variant}]"


def plot_heatmaps(report: Dict[str, Any], out_dir: str, suffix: str) -> List[str]:
    """One PNG per (dataset, model): final test accuracy over lr x damping, one panel per K-FAC/FOP variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["meta"]["settings"]
    runs = [r for r in report["runs"].values() if r["spec"]["phase"] == "grid"]
    lrs = sorted(set(s["lr_grid"]) | set(s["subgrid_lr"]))  # the axes: the full grid and the sub-grid
    dampings = sorted(set(s["damping_grid"]) | set(s["subgrid_damping"]))
    paths = []
    for dataset, model in s["pairs"]:
        target = s["targets"][dataset][model]
        panels = [(o, v) for v in s["variants"] for o in CURVATURE] + [("fop", v) for v in s.get("metric_variants", [])]
        panels = [p for p in panels if any(r["spec"]["dataset"] == dataset and r["spec"]["model"] == model and (r["spec"]["optimizer"], r["spec"]["variant"]) == p for r in runs)]
        if not panels:
            continue
        cols = 2
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows + 0.6), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, (name, variant) in zip(axes.flat, panels):
            grid = np.full((len(dampings), len(lrs)), np.nan)
            for r in runs:
                sp = r["spec"]
                if sp["dataset"] == dataset and sp["model"] == model and sp["optimizer"] == name and sp["variant"] == variant:
                    grid[dampings.index(sp["damping"]), lrs.index(sp["lr"])] = r["final_test_acc"]
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    if np.isfinite(grid[i, j]):
                        mark = "*" if grid[i, j] >= target else ""
                        ax.text(j, i, f"{grid[i, j]:.2f}{mark}", ha="center", va="center", fontsize=7,
                                color="white" if grid[i, j] < 0.6 else "black")
            ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], fontsize=7)
            ax.set_yticks(range(len(dampings)), [f"{v:g}" for v in dampings], fontsize=7)
            ax.set_xlabel("lr", fontsize=7)
            ax.set_ylabel("damping", fontsize=7)
            ax.set_title(_name(name, variant), fontsize=8)
        fig.suptitle(f"{dataset} / {model}: final test accuracy, batch {s['batches'][dataset][-1]} (* reaches {target:.0%})", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"sensitivity_{dataset}_{model}{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(ms: Sequence[float], digits: int = 1) -> str:
    m, sd = ms
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def batch_area_lines(s: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The table of the stable area per batch size (empty without a ladder grid)."""
    if not rows:
        return []
    damping = f" x damping {s['ladder_grid_damping']}" if s["ladder_grid_variants"] else ""
    epochs = ", ".join(
        f"{ds} {b}: {sorted({per.get(str(b), per.get(b)) for per in s['epochs'][ds].values()})}"
        for ds, batches in s["ladder_grid_batch"].items() for b in batches
    )
    n = 1 + max(len(batches) for batches in s["ladder_grid_batch"].values())
    columns = [f"batch {i + 1} of {n}: stable area" for i in range(n)]
    columns[0], columns[-1] = "smallest batch: stable area", "largest batch: stable area"
    lines = [
        "",
        f"Stable area per batch size (seed 0), like for like: the same cells, lr {s['ladder_grid_lr']}{damping} "
        f"(lr only for SGD and AdamW), at the ladder grid's batches ({s['ladder_grid_batch']}; epochs per model: {epochs}) "
        "and at the largest batch (the grid's runs at these cells). Cells: reached / run (diverged).",
        "",
        "| dataset | model | optimizer | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * n,
    ]
    by_key: Dict[Tuple, Dict[int, Dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((r["dataset"], r["model"], r["optimizer"], r["variant"]), {})[r["batch"]] = r
    for (dataset, model, name, variant), per in by_key.items():
        cells = []
        for batch in sorted(per):
            r = per[batch]
            if r["cells"] == 0:
                cells.append(f"b{batch}: not run")
                continue
            part = "" if r["cells"] == r["expected"] else f", partial: {r['cells']} of {r['expected']} cells"
            cells.append(f"b{batch}: {r['reached']}/{r['cells']} ({r['reached'] / r['cells']:.0%}; {r['diverged']} diverged{part})")
        lines.append(f"| {dataset} | {model} | {_name(name, variant)} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: Dict[str, Any], analysis: Dict[str, Any], pngs: Sequence[str], md_dir: str) -> str:
    s = report["meta"]["settings"]
    m = report["meta"]
    d = s["default"]
    timed = sum("cpu_seconds_total" in r for r in report["runs"].values())
    cpu = sum(r.get("cpu_seconds_total", 0.0) for r in report["runs"].values())
    lines = [
        f"### Generated tables and heat maps ({s['profile']} profile, written by the script)",
        "",
        f"Command: `{m.get('command', 'python scripts/benchmark_sensitivity.py')}`; machine: {m['machine']} "
        f"torch {m['torch']}, {m['workers']} worker process(es) of 1 thread; "
        f"last result {m.get('date_utc', '?')}; {len(report['runs'])} runs in the JSON, {timed} of them with CPU time: "
        f"{cpu:.0f} CPU seconds in all ({cpu / 120:.1f} min for 2 workers on 2 idle cores). The last session: "
        f"{m.get('runs_this_session', '?')} runs, {m.get('cpu_seconds_this_session', '?')} CPU s in them, "
        f"{m.get('wall_seconds_this_session', '?')} s wall; 1-minute load average {m.get('load_average_at_start', '?')} "
        f"at its start and {m.get('load_average_last', '?')} at its last run (2 = both cores busy).",
        "",
        f"Grid at the largest batch (seed 0): lr {s['lr_grid']} x damping {s['damping_grid']} for the core K-FAC/FOP "
        f"variants {s['core_variants']}, the sub-grid lr {s['subgrid_lr']} x damping {s['subgrid_damping']} for the others, "
        f"lr only for SGD (momentum {s['momentum']}) and AdamW. Variants: `abs` = absolute damping, no trust region "
        f"(the paper's setting and this project's previous configuration); `rel` = relative damping; `_clip` = "
        f"kl_clip {s['kl_clip']:g}; `_mc` = Monte-Carlo Fisher. Default cell: {d['variant']}, lr {d['lr']:g}, "
        f"damping {d['damping']:g}. Stable area = fraction of the grid cells whose test accuracy reaches the target "
        f"within the epoch budget (targets: {s['targets']})."
        + (f" Every K-FAC/FOP run with the `FOPConfig` overrides {s['config']} (`--config`)." if s.get("config") else ""),
        "",
        "| dataset | model | optimizer | stable area | on the sub-grid | diverged cells | best cell (lr, damping) |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in analysis["areas"]:
        lines.append(
            f"| {a['dataset']} | {a['model']} | {_name(a['optimizer'], a['variant'])} | {a['reached']}/{a['cells']} "
            f"({a['stable_area']:.0%}){'' if a['complete'] else ' (partial grid)'} | {a['sub_reached']}/{a['sub_cells']} | "
            f"{a['diverged']} | {a['best_lr']:g}, {a['best_damping'] if a['best_damping'] is None else format(a['best_damping'], 'g')} |"
        )
    lines += batch_area_lines(s, analysis.get("batch_areas", []))
    lines += [
        "",
        "Epochs and training CPU seconds to the target (mean ± std over the seeds that reach it; CPU seconds of one "
        "thread, `time.process_time`, so that other jobs on the machine do not inflate them), per batch size; the "
        "rows are each optimizer's best grid cell at the largest batch and the default cell.",
        "",
        "| dataset | model | batch | optimizer | lr | damping | reached | epochs to target | CPU s to target | final test acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in analysis["summaries"]:
        if r["seeds"] < 2:
            continue
        tag = " (default)" if r["is_default"] else ""
        damping = "-" if r["damping"] is None else f"{r['damping']:g}"
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['batch']} | {_name(r['optimizer'], r['variant'])}{tag} | {r['lr']:g} | {damping} | "
            f"{r['reached']}/{r['seeds']} | {_fmt(r['epochs_to_target'])} | {_fmt(r['seconds_to_target'], 2)}"
            f"{'' if r['timed'] == r['reached'] else ' (' + str(r['timed']) + ' timed)'} | "
            f"{_fmt(r['final_test_acc'], 3)} |"
        )
    lines += metric_lines(s, analysis.get("metric"))
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, md_dir)})" for p in pngs]
    return "\n".join(lines)


def _area(a: Optional[Dict[str, Any]]) -> str:
    return "-" if a is None else f"{a['reached']}/{a['cells']} ({a['stable_area']:.0%}; {a['diverged']} div.)"


def _epochs(r: Optional[Dict[str, Any]], cell: bool = False) -> str:
    """Epochs to target of a seed summary: ``mean ± std (reached/seeds)``, with its cell when ``cell``."""
    if r is None:
        return "-"
    where = f"lr {r['lr']:g}, λ {r['damping']:g}: " if cell else ""
    return f"{where}{_fmt(r['epochs_to_target'])} ({r['reached']}/{r['seeds']})"


def _num(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def metric_lines(s: Dict[str, Any], metric: Optional[Dict[str, Any]]) -> List[str]:
    """The projection metric's tables (empty for a JSON without the fisher variants)."""
    if not metric:
        return []
    d = s["default"]
    lines = [
        "",
        "Projection metric (eq. 4-5 in the damped `M = F + λI`, FOP's default, or in the undamped Kronecker `F`, "
        "variants `_fisher`), largest batch: stable area on the full lr x damping grid (seed 0; reached / cells, "
        "diverged cells), and epochs to the target (mean ± std over the seeds that reach it; reached / seeds) at the "
        f"default cell (lr {d['lr']:g}, damping {d['damping']:g}) and at each optimizer's best cell. K-FAC has no "
        "projection: its runs serve both metrics.",
        "",
        "| dataset | model | variant | K-FAC area | FOP damped area | FOP fisher area | K-FAC default | FOP damped default "
        "| FOP fisher default | K-FAC best | FOP damped best | FOP fisher best |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in metric["rows"]:
        parts = [_area(r[k]["area"]) for k in ("kfac", "damped", "fisher")]
        parts += [_epochs(r[k]["default"]) for k in ("kfac", "damped", "fisher")]
        parts += [_epochs(r[k]["best"], cell=True) for k in ("kfac", "damped", "fisher")]
        lines.append(f"| {r['dataset']} | {r['model']} | {r['variant']} | " + " | ".join(parts) + " |")
    lines += [
        "",
        "FOP damped against FOP fisher cell by cell (the full grid, largest batch, seed 0): cells reaching the target "
        "in both / only damped / only fisher / neither, diverged cells (damped / fisher), mean final test accuracy "
        "difference fisher - damped (points), mean ratio fisher / damped of the epochs to target over the cells both "
        "reach (with the cells where each is faster), and the ratio of training CPU seconds per epoch over the cells "
        "neither diverged in.",
        "",
        "| dataset | model | variant | both / only damped / only fisher / neither | diverged damped / fisher "
        "| acc fisher - damped | epochs fisher / damped (faster: fisher, damped) | CPU s per epoch fisher / damped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in metric.get("pairs", []):
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['variant']} | {r['both']} / {r['only_damped']} / {r['only_fisher']} / "
            f"{r['neither']} | {r['diverged_damped']} / {r['diverged_fisher']} | {100 * r['acc_diff']:+.2f} | "
            f"{_num(r['epochs_ratio'])} ({r['fisher_faster']}, {r['damped_faster']}) | {_num(r['cpu_per_epoch_ratio'])} |"
        )
    lines += [
        "",
        "What the projection does at low and high damping (seed 0, lr " + ", ".join(f"{x:g}" for x in s["trace_lr"])
        + "): means over the run's steps of the layer mean of |beta*| and of s_proj, the share of the FOP terms in "
        "the step's KL norm, (kl_cross + kl_orth) / (kl_base + kl_cross + kl_orth) from the run means (per unit lr², "
        "summed over layers), K-FAC's kl_base, and the trust-region factor nu (`_clip` only; 1 = idle). "
        "Final test accuracy K-FAC / FOP damped / FOP fisher; * reaches the target.",
        "",
        "| dataset | model | variant | lr | damping | final acc K-FAC / damped / fisher | mean abs beta* damped / fisher "
        "| mean s_proj damped / fisher | FOP KL share damped / fisher | K-FAC kl_base | nu K-FAC / damped / fisher |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in metric["traces"]:
        runs = [r[k] for k in ("kfac", "damped", "fisher")]

        def acc(x: Optional[Dict[str, Any]]) -> str:
            if x is None:
                return "-"
            return f"{x['final_test_acc']:.3f}{'*' if x['epochs_to_target'] is not None else ''}{' div.' if x['diverged'] else ''}"

        def share(x: Optional[Dict[str, Any]]) -> str:
            if x is None:
                return "-"
            total = x["kl_base"] + x["kl_cross"] + x["kl_orth"]
            return _num((x["kl_cross"] + x["kl_orth"]) / total if total > 0 else math.nan, 2)

        fop = runs[1:]
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['variant']} | {r['lr']:g} | {r['damping']:g} | "
            + " / ".join(acc(x) for x in runs) + " | "
            + " / ".join("-" if x is None else _num(x["beta_abs"]) for x in fop) + " | "
            + " / ".join("-" if x is None else _num(x["s_proj"]) for x in fop) + " | "
            + " / ".join(share(x) for x in fop) + " | "
            + ("-" if runs[0] is None else _num(runs[0]["kl_base"])) + " | "
            + " / ".join("-" if x is None else _num(x["kl_clip_scale"], 2) for x in runs) + " |"
        )
    return lines


