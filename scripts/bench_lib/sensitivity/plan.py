"""Sensitivity benchmark, what a run costs: CPU seconds per run from a fitted model, and the plan per phase."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from .grid import VARIANTS, RunSpec, Settings, is_done, phases

COST_PER_EXAMPLE_AND_STEP: Dict[str, Tuple[Tuple[float, float], Tuple[float, float]]] = {
    "digits/mlp": ((0.0, 0.0), (1.4e-06, 0.0015)),
    "digits/cnn": ((1.4e-05, 4.5e-05), (4.9e-05, 0.0025)),
    "digits/vit": ((3.1e-05, 0.0015), (4.6e-05, 0.0069)),
    "diamonds/mlp": ((4.3e-07, 0.0), (5.1e-06, 0.0018)),
    "diamonds/cnn": ((7.5e-06, 0.0), (1.5e-05, 0.00099)),
    "diamonds/vit": ((2.2e-05, 0.0012), (2.7e-05, 0.0074)),
}
"""``"dataset/model"`` -> ((a, b) for SGD/AdamW, (a, b) for K-FAC/FOP): one epoch costs ``a * n_train + b * steps``
CPU seconds (1 thread, training and evaluation), fitted (non-negative least squares on relative errors) to the
``cpu_seconds_total`` of the non-diverged empirical-Fisher runs of the full profile run on idle cores on 2026-11-29
(docs/sensitivity_results.json; a zero: below what :data:`RUN_OVERHEAD` already covers)."""
MC_FACTOR = 1.2
"""The Monte-Carlo Fisher's extra backward pass, as a factor on K-FAC/FOP's epoch cost."""
RUN_OVERHEAD = 0.3
"""CPU seconds per run outside the epochs (model construction, final validation)."""


def estimate_cpu(spec: RunSpec, s: Settings) -> float:
    """Planned CPU seconds of ``spec`` from :data:`COST_PER_EXAMPLE_AND_STEP` (a diverged run stops earlier: an upper bound)."""
    first_order, curvature = COST_PER_EXAMPLE_AND_STEP[f"{spec.dataset}/{spec.model}"]
    a, b = first_order if spec.variant is None else curvature
    n = s.n_train[spec.dataset]
    epoch = a * n + b * (n // spec.batch)
    if spec.variant is not None and VARIANTS[spec.variant][2] == "mc":
        epoch *= MC_FACTOR
    return RUN_OVERHEAD + spec.epochs * epoch


def plan(s: Settings, results: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per phase: its runs (unique keys), how many are done, and CPU seconds measured (done) and estimated (to run).

    Done runs stored without CPU time are estimated too (``cpu_estimated_done``); the whole run's CPU seconds
    are the sum of the three, and sum / workers is its wall time on idle cores.
    """
    rows, seen = [], set()
    for phase in phases(s, results):
        row = {"phase": phase.name, "runs": 0, "done": 0, "cpu_measured": 0.0, "cpu_estimated_done": 0.0, "cpu_to_run": 0.0}
        for spec in phase.specs():
            key = spec.key()
            done = is_done(results.get(key), phase.timed, phase.traced)
            if key in seen and (done or key not in results):
                continue  # planned already (seed 0 at the largest batch is the grid's run), and not to be run again
            seen.add(key)
            row["runs"] += 1
            if not done:
                row["cpu_to_run"] += estimate_cpu(spec, s)
            elif "cpu_seconds_total" in results[key]:
                row["done"] += 1
                row["cpu_measured"] += results[key]["cpu_seconds_total"]
            else:
                row["done"] += 1
                row["cpu_estimated_done"] += estimate_cpu(spec, s)
        rows.append(row)
    return rows


def format_plan(rows: Sequence[Dict[str, Any]], workers: int) -> str:
    """The plan as text: one line per phase and the total, with the idle-core wall estimate sum(CPU s) / workers."""
    lines = [f"{'phase':<24} {'runs':>5} {'done':>5} {'CPU s done':>11} {'CPU s to run':>13}"]
    for r in rows:
        done_cpu = r["cpu_measured"] + r["cpu_estimated_done"]
        lines.append(f"{r['phase']:<24} {r['runs']:>5} {r['done']:>5} {done_cpu:>11.0f} {r['cpu_to_run']:>13.0f}")
    measured = sum(r["cpu_measured"] for r in rows)
    old = sum(r["cpu_estimated_done"] for r in rows)
    todo = sum(r["cpu_to_run"] for r in rows)
    total = measured + old + todo
    lines.append(
        f"total: {sum(r['runs'] for r in rows)} runs, {sum(r['done'] for r in rows)} done; CPU seconds: {measured:.0f} measured "
        f"+ {old:.0f} estimated for done runs stored without CPU time + {todo:.0f} estimated to run = {total:.0f} "
        f"(about {total / workers / 60:.1f} min with {workers} worker(s) on idle cores; to run: {todo / workers / 60:.1f} min)"
    )
    return "\n".join(lines)


