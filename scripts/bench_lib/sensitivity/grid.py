"""Sensitivity benchmark, what runs: settings per profile, run specs and their keys, the cell rules, the phases.

A *run* is one (dataset, model, optimizer, variant, batch, lr, damping, seed, epochs); its :meth:`RunSpec.key`
names it in the JSON. The phases (:func:`phases`) list the runs in the order they are made; the seed and ladder
phases pick their cells (:func:`cells`) from the finished grids with :func:`select_best`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ..models import MODELS

CURVATURE = ("kfac", "fop")
VARIANTS = {
    # name: (damping_mode, kl_clip applied?, fisher_type, projection_metric)
    "abs": ("absolute", False, "empirical", "damped"),
    "abs_clip": ("absolute", True, "empirical", "damped"),
    "rel": ("relative", False, "empirical", "damped"),
    "rel_clip": ("relative", True, "empirical", "damped"),
    "abs_mc": ("absolute", False, "mc", "damped"),
    "rel_clip_mc": ("relative", True, "mc", "damped"),
    "abs_clip_mc": ("absolute", True, "mc", "damped"),
    "abs_fisher": ("absolute", False, "empirical", "fisher"),
    "abs_clip_fisher": ("absolute", True, "empirical", "fisher"),
}
RUN_FIELDS = (
    "kl_clip", "momentum", "adamw_weight_decay", "adamw_lr_curvature", "inverse_interval", "warmup_fraction", "evals_per_run",
    "n_train", "vit", "config",
)
"""The settings that define how one run is done (beyond its key): a resumed run must keep them; the others only choose runs."""


@dataclass
class Settings:
    """Everything that defines a benchmark run (stored in the JSON).

    ``epochs[dataset][model][batch]``: the epoch budget; ``targets[dataset][model]``:
    target test accuracy; ``batches[dataset]``: the ladder, largest last;
    ``pairs``: (dataset, model) in the order they run (cheap first);
    ``default``: the K-FAC/FOP default cell (lr, damping, variant); ``core_variants`` run first on the
    full lr x damping grid (and get seeds at their best cell), the other variants after, on the sub-grid
    ``subgrid_lr`` x ``subgrid_damping``; ``vit[dataset]``: :class:`ViTLogits` sizes. ``ladder_grid_*``: the
    ladder grid phase (seed 0 at each batch of ``ladder_grid_batch[dataset]``, smaller than the largest; empty: no
    such phase); its cells
    must lie in the largest batch's grid of every optimizer it runs, for a like-for-like stable area.
    ``metric_variants``: FOP variants with the ``"fisher"`` projection metric, run on the full grid at the largest
    batch (with seeds at their best cell and at the default cell's twin, ``default["variant"] + "_fisher"``);
    ``trace_variants``: the core variants whose K-FAC/FOP runs at the largest batch (grid and seeds) must keep their
    per-step diagnostics (beta*, KL terms; rerun otherwise), the damped side of that comparison;
    ``trace_lr`` x ``trace_damping``: the cells whose diagnostics the report tabulates.
    ``momentum``, ``adamw_lr_curvature``, ``inverse_interval``, ``kl_clip`` and the default cell are the shipped
    ``FOPConfig`` defaults (``tests/test_defaults.py``).
    """

    profile: str
    datasets: List[str]
    models: List[str]
    pairs: List[Tuple[str, str]]
    batches: Dict[str, List[int]]
    epochs: Dict[str, Dict[str, Dict[int, int]]]
    targets: Dict[str, Dict[str, float]]
    lr_grid: List[float]
    damping_grid: List[float]
    kl_clip: float
    default: Dict[str, Any]
    seeds: int
    variants: List[str]
    core_variants: List[str]
    n_train: Dict[str, int]
    subgrid_lr: List[float]
    subgrid_damping: List[float]
    vit: Dict[str, Dict[str, Any]]
    ladder_variants: List[str]
    ladder_grid_batch: Dict[str, List[int]] = field(default_factory=dict)
    ladder_grid_variants: List[str] = field(default_factory=list)
    ladder_grid_lr: List[float] = field(default_factory=list)
    ladder_grid_damping: List[float] = field(default_factory=list)
    metric_variants: List[str] = field(default_factory=list)
    trace_variants: List[str] = field(default_factory=list)
    trace_lr: List[float] = field(default_factory=list)
    trace_damping: List[float] = field(default_factory=list)
    momentum: float = 0.9
    config: Dict[str, Any] = field(default_factory=dict)
    """``FOPConfig`` overrides for every K-FAC/FOP run (``--config``), beyond the cell's own fields; empty in the
    runs the docs report (the shipped defaults)."""
    adamw_weight_decay: float = 0.01
    adamw_lr_curvature: float = 3e-3
    inverse_interval: int = 20
    warmup_fraction: float = 0.05
    evals_per_run: int = 30


def make_settings(profile: str, default: Dict[str, Any], config: Optional[Dict[str, Any]] = None) -> Settings:
    """``"full"`` (designed for < 60 min with 2 workers on 2 idle cores), ``"quick"`` (< 3 min) or ``"smoke"`` (tests);
    ``config``: :attr:`Settings.config`."""
    settings = _profile_settings(profile, default)
    overrides = dict(config or {})
    fixed = sorted(set(overrides) & set(CELL_FIELDS))
    if fixed:
        raise ValueError(f"--config {fixed}: set by each cell of the grid (lr, damping, variant); choose other fields.")
    settings.config = overrides
    return settings


CELL_FIELDS = ("lr", "damping", "mode", "damping_mode", "kl_clip", "fisher_type", "projection_metric", "momentum",
               "adamw_lr")
"""``FOPConfig`` fields the runner sets from the cell and the benchmark's fixed settings (not ``--config``'s);
``inverse_interval``, a fixed setting too, may be replaced by ``--config`` (the curvature schedule is what a speed
change varies)."""


def _profile_settings(profile: str, default: Dict[str, Any]) -> Settings:
    """The grid, budgets and fixed settings of one profile."""
    all_variants = ["abs", "abs_clip", "rel_clip", "rel", "abs_mc", "abs_clip_mc"]
    small_vit = {"hidden": 32, "layers": 2, "heads": 4}
    if profile == "full":
        return Settings(
            profile=profile,
            datasets=["digits", "diamonds"],
            models=["mlp", "cnn", "vit"],
            pairs=[("digits", "mlp"), ("diamonds", "mlp"), ("digits", "cnn"), ("diamonds", "cnn"), ("digits", "vit"), ("diamonds", "vit")],
            batches={"digits": [22, 108, 1078], "diamonds": [400, 2000, 20000]},
            epochs={
                "digits": {m: {22: 6, 108: 15, 1078: 50} for m in MODELS},
                "diamonds": {m: {400: 3, 2000: 8, 20000: 30} for m in MODELS},
            },
            targets={"digits": {"mlp": 0.93, "cnn": 0.93, "vit": 0.8}, "diamonds": {"mlp": 0.65, "cnn": 0.55, "vit": 0.55}},
            lr_grid=[1e-3, 1e-2, 1e-1, 1.0],
            damping_grid=[1e-3, 1e-2, 1e-1],
            kl_clip=1e-3,
            default=default,
            seeds=3,
            variants=all_variants,
            core_variants=["abs", "abs_clip"],
            n_train={"digits": 1078, "diamonds": 20000},
            subgrid_lr=[1e-2, 1e-1, 1.0],
            subgrid_damping=[1e-2, 1e-1],
            vit={"digits": small_vit, "diamonds": {**small_vit, "patch": [1, 11]}},
            ladder_variants=["abs"],
            ladder_grid_batch={"digits": [22, 108], "diamonds": [400, 2000]},
            ladder_grid_variants=["abs", "abs_clip"],
            ladder_grid_lr=[1e-3, 1e-2, 1e-1, 1.0],
            ladder_grid_damping=[1e-3, 1e-2, 1e-1],
            metric_variants=["abs_fisher", "abs_clip_fisher"],
            trace_variants=["abs", "abs_clip"],
            trace_lr=[1e-1],
            trace_damping=[1e-3, 1e-2, 1e-1],
        )
    if profile == "quick":
        return Settings(
            profile=profile,
            datasets=["digits", "diamonds"],
            models=["mlp", "cnn"],
            pairs=[("digits", "mlp"), ("diamonds", "mlp"), ("digits", "cnn")],
            batches={"digits": [108, 1078], "diamonds": [200, 2000]},
            epochs={"digits": {m: {108: 6, 1078: 30} for m in MODELS}, "diamonds": {m: {200: 2, 2000: 15} for m in MODELS}},
            targets={"digits": {"mlp": 0.85, "cnn": 0.85, "vit": 0.6}, "diamonds": {"mlp": 0.6, "cnn": 0.6, "vit": 0.6}},
            lr_grid=[1e-2, 1e-1],
            damping_grid=[1e-3, 1e-1],
            kl_clip=1e-3,
            default=default,
            seeds=2,
            variants=["abs", "abs_clip", "rel_clip", "abs_clip_mc"],
            core_variants=["abs", "abs_clip"],
            n_train={"digits": 1078, "diamonds": 2000},
            subgrid_lr=[1e-1],
            subgrid_damping=[1e-2],
            vit={"digits": small_vit, "diamonds": small_vit},
            ladder_variants=["abs_clip"],
            evals_per_run=10,
        )
    if profile == "smoke":
        return Settings(
            profile=profile,
            datasets=["digits"],
            models=["mlp"],
            pairs=[("digits", "mlp")],
            batches={"digits": [270, 1078]},
            epochs={"digits": {m: {270: 2, 1078: 6} for m in MODELS}},
            targets={"digits": {"mlp": 0.5, "cnn": 0.5, "vit": 0.5}},
            lr_grid=[1e-2, 1e-1],
            damping_grid=[1e-2],
            kl_clip=1e-3,
            default=default,
            seeds=2,
            variants=["abs", "abs_clip", "abs_clip_mc"],
            core_variants=["abs", "abs_clip"],
            n_train={"digits": 1078},
            subgrid_lr=[1e-1],
            subgrid_damping=[1e-2, 1e-1],
            vit={"digits": small_vit},
            ladder_variants=["abs_clip"],
            ladder_grid_batch={"digits": [270]},
            ladder_grid_variants=["abs_clip"],
            ladder_grid_lr=[1e-2, 1e-1],
            ladder_grid_damping=[1e-2],
            evals_per_run=6,
        )
    raise ValueError(f"profile={profile!r} is invalid: expected 'full', 'quick' or 'smoke'.")


@dataclass
class RunSpec:
    """One training run; ``variant`` is None for SGD/AdamW, ``damping`` None for them too."""

    phase: str
    dataset: str
    model: str
    optimizer: str
    variant: Optional[str]
    batch: int
    lr: float
    damping: Optional[float]
    seed: int
    epochs: int

    def key(self) -> str:
        name = self.optimizer if self.variant is None else f"{self.optimizer}_{self.variant}"
        return f"{self.dataset}|{self.model}|{name}|b{self.batch}|lr{self.lr:g}|d{self.damping if self.damping is None else f'{self.damping:g}'}|s{self.seed}|e{self.epochs}"


def reach(run: Dict[str, Any], target: float) -> Optional[Tuple[int, Optional[float]]]:
    """(epoch, training CPU seconds) of the first evaluation with test accuracy >= ``target``; None if never or if the run diverged.

    The CPU seconds are None for runs stored before CPU time was recorded (their wall seconds were taken on a loaded machine).
    """
    if run["diverged"]:
        return None
    cpu = run.get("cpu_seconds") or [None] * len(run["epochs"])
    for e, sec, acc in zip(run["epochs"], cpu, run["test_acc"]):
        if acc >= target:
            return e, sec
    return None


def grid_specs(s: Settings, core: bool, pairs: Sequence[Tuple[str, str]]) -> List[RunSpec]:
    """Grid at the largest batch, seed 0: SGD, AdamW and the core K-FAC/FOP variants on the full grid (``core``), or the other variants on the sub-grid."""
    specs: List[RunSpec] = []
    variants = s.core_variants if core else [v for v in s.variants if v not in s.core_variants]
    for dataset, model in pairs:
        batch = s.batches[dataset][-1]
        epochs = s.epochs[dataset][model][batch]
        if core:
            for name in ("sgd", "adamw"):
                specs += [RunSpec("grid", dataset, model, name, None, batch, lr, None, 0, epochs) for lr in s.lr_grid]
        lrs, dampings = (s.lr_grid, s.damping_grid) if core else (s.subgrid_lr, s.subgrid_damping)
        for variant in variants:
            for name in CURVATURE:
                specs += [RunSpec("grid", dataset, model, name, variant, batch, lr, d, 0, epochs) for lr in lrs for d in dampings]
    return specs


def ladder_grid_specs(s: Settings, pairs: Sequence[Tuple[str, str]], batch: Optional[Callable[[str], int]] = None) -> List[RunSpec]:
    """Seed 0 of SGD, AdamW (``ladder_grid_lr``) and K-FAC/FOP in ``ladder_grid_variants`` (``ladder_grid_lr`` x
    ``ladder_grid_damping``) at the batch ``batch(dataset)``, or by default at every batch of
    ``ladder_grid_batch[dataset]`` (none for a dataset without one).

    With ``batch`` = the largest batch these are grid runs (phase ``"grid"``): the cells the per-batch stable area compares.
    """
    specs: List[RunSpec] = []
    for dataset, model in pairs:
        batches = [batch(dataset)] if batch is not None else s.ladder_grid_batch.get(dataset, [])
        for b in batches:
            phase = "grid" if b == s.batches[dataset][-1] else "ladder_grid"
            epochs = s.epochs[dataset][model][b]
            for name in ("sgd", "adamw"):
                specs += [RunSpec(phase, dataset, model, name, None, b, lr, None, 0, epochs) for lr in s.ladder_grid_lr]
            for variant in s.ladder_grid_variants:
                for name in CURVATURE:
                    specs += [
                        RunSpec(phase, dataset, model, name, variant, b, lr, d, 0, epochs)
                        for lr in s.ladder_grid_lr for d in s.ladder_grid_damping
                    ]
    return specs


def select_best(runs: Sequence[Dict[str, Any]], target: float) -> Dict[str, Any]:
    """Fastest to target (epochs, then seconds); if none reaches it, the best final validation accuracy."""
    reached = [(reach(r, target), r) for r in runs]
    hits = [(rc, r) for rc, r in reached if rc is not None]
    if hits:
        return min(hits, key=lambda t: (t[0][0], -t[1]["final_val_acc"]))[1]
    return max(runs, key=lambda r: (r["final_val_acc"], -r["spec"]["lr"]))


def _grid_runs(results: Dict[str, Dict[str, Any]], dataset: str, model: str, optimizer: str, variant: Optional[str]) -> List[Dict[str, Any]]:
    return [
        r for r in results.values()
        if r["spec"]["phase"] == "grid" and r["spec"]["dataset"] == dataset and r["spec"]["model"] == model
        and r["spec"]["optimizer"] == optimizer and r["spec"]["variant"] == variant
    ]


def cells(
    s: Settings, results: Dict[str, Dict[str, Any]], dataset: str, model: str, variants: Sequence[str]
) -> List[Tuple[str, str, Optional[str], float, Optional[float]]]:
    """(label, optimizer, variant, lr, damping) of the cells rerun with seeds: the best of SGD, AdamW and of
    K-FAC/FOP in each of ``variants``, and the default cell.

    Before a grid has run (``--plan``), its best cell is a placeholder: the corner lr_grid[0], damping_grid[0].
    """
    target = s.targets[dataset][model]
    out = []
    for name in ("sgd", "adamw"):
        grid = _grid_runs(results, dataset, model, name, None)
        lr = select_best(grid, target)["spec"]["lr"] if grid else s.lr_grid[0]
        out.append(("best", name, None, lr, None))
    for name in CURVATURE:
        for variant in variants:
            grid = _grid_runs(results, dataset, model, name, variant)
            b = select_best(grid, target)["spec"] if grid else {"lr": s.lr_grid[0], "damping": s.damping_grid[0]}
            out.append(("best", name, variant, b["lr"], b["damping"]))
        d = s.default
        out.append(("default", name, d["variant"], d["lr"], d["damping"]))
    return out


def seed_specs(
    s: Settings, results: Dict[str, Dict[str, Any]], batches: Callable[[str], Iterable[int]], phase: str,
    pairs: Sequence[Tuple[str, str]],
) -> List[RunSpec]:
    """Seeds 0 .. seeds-1 at the cells of :func:`cells`, at the batch sizes ``batches(dataset)``.

    Seed 0 at the largest batch is the grid's own run (phase ``"grid"``). The ladder's cells are the best of
    ``ladder_variants`` and the default; the seeds' the best of every core variant and the default.
    """
    variants = s.ladder_variants if phase == "ladder" else s.core_variants
    specs = []
    for dataset, model in pairs:
        for batch in batches(dataset):
            epochs = s.epochs[dataset][model][batch]
            seen = set()
            for _, name, variant, lr, damping in cells(s, results, dataset, model, variants):
                for seed in range(s.seeds):
                    own = "grid" if seed == 0 and batch == s.batches[dataset][-1] else phase
                    spec = RunSpec(own, dataset, model, name, variant, batch, lr, damping, seed, epochs)
                    if spec.key() not in seen:
                        seen.add(spec.key())
                        specs.append(spec)
    return specs


def fisher_twin(variant: str) -> str:
    """The ``"fisher"``-metric variant of a damped-metric one (``abs_clip`` -> ``abs_clip_fisher``)."""
    twin = f"{variant}_fisher"
    if twin not in VARIANTS:
        raise ValueError(f"variant={variant!r} has no fisher-metric twin in VARIANTS.")
    return twin


def metric_grid_specs(s: Settings, pairs: Sequence[Tuple[str, str]]) -> List[RunSpec]:
    """FOP in each of ``metric_variants`` on the full lr x damping grid at the largest batch, seed 0 (phase ``"grid"``;
    K-FAC has no projection, so its damped-metric runs are the comparison)."""
    specs: List[RunSpec] = []
    for dataset, model in pairs:
        batch = s.batches[dataset][-1]
        epochs = s.epochs[dataset][model][batch]
        for variant in s.metric_variants:
            specs += [RunSpec("grid", dataset, model, "fop", variant, batch, lr, d, 0, epochs) for lr in s.lr_grid for d in s.damping_grid]
    return specs


def metric_seed_specs(s: Settings, results: Dict[str, Dict[str, Any]], pairs: Sequence[Tuple[str, str]]) -> List[RunSpec]:
    """Seeds 0 .. seeds-1 of FOP at the largest batch at the best cell of each of ``metric_variants`` and at the default
    cell with the fisher metric (seed 0 is the grid's run)."""
    specs, seen = [], set()
    for dataset, model in pairs:
        batch = s.batches[dataset][-1]
        epochs = s.epochs[dataset][model][batch]
        target = s.targets[dataset][model]
        chosen = []
        for variant in s.metric_variants:
            grid = _grid_runs(results, dataset, model, "fop", variant)
            b = select_best(grid, target)["spec"] if grid else {"lr": s.lr_grid[0], "damping": s.damping_grid[0]}
            chosen.append((variant, b["lr"], b["damping"]))
        chosen.append((fisher_twin(s.default["variant"]), s.default["lr"], s.default["damping"]))
        for variant, lr, damping in chosen:
            for seed in range(s.seeds):
                spec = RunSpec("grid" if seed == 0 else "seeds", dataset, model, "fop", variant, batch, lr, damping, seed, epochs)
                if spec.key() not in seen:
                    seen.add(spec.key())
                    specs.append(spec)
    return specs


def trace_specs(s: Settings, results: Dict[str, Dict[str, Any]], pairs: Sequence[Tuple[str, str]]) -> List[RunSpec]:
    """K-FAC and FOP in ``trace_variants`` at the largest batch: their full lr x damping grid (seed 0) and their seeds
    at the best and default cells. These runs must keep their per-step diagnostics (a stored one without them is run
    again), so that the metric comparison sets runs of the same code side by side."""
    specs = [
        sp for sp in grid_specs(s, True, pairs) if sp.optimizer in CURVATURE and sp.variant in s.trace_variants
    ]
    largest = lambda ds: [s.batches[ds][-1]]  # noqa: E731
    specs += [
        sp for sp in seed_specs(s, results, largest, "seeds", pairs)
        if sp.optimizer in CURVATURE and sp.variant in s.trace_variants and sp.seed > 0
    ]
    return specs


class Phase(NamedTuple):
    """One phase: ``specs()`` lists its runs when it starts (seeds and ladder read the best cells of finished grids);
    a stored run is run again if ``timed`` and stored without CPU time, or ``traced`` and stored without diagnostics."""

    name: str
    timed: bool
    specs: Callable[[], List[RunSpec]]
    traced: bool = False


def phases(s: Settings, results: Dict[str, Dict[str, Any]]) -> List[Phase]:
    """The phases, most important first so that a partial run stays useful.

    ``timed``: the phase's runs feed the time-to-target tables; ``traced``: the metric comparison's diagnostics.
    """
    largest = lambda ds: [s.batches[ds][-1]]  # noqa: E731
    smaller = lambda ds: s.batches[ds][:-1]  # noqa: E731
    out: List[Phase] = []
    for pair in s.pairs:  # cheap pairs first, each complete: core grid, seeds at its best and default cells, other variants, ladder
        name = f"{pair[0]}/{pair[1]}"
        out.append(Phase(f"grid {name}", False, lambda pair=pair: grid_specs(s, True, [pair])))
        out.append(Phase(f"seeds {name}", True, lambda pair=pair: seed_specs(s, results, largest, "seeds", [pair])))
        out.append(Phase(f"variants {name}", False, lambda pair=pair: grid_specs(s, False, [pair])))
        out.append(Phase(f"ladder {name}", True, lambda pair=pair: seed_specs(s, results, smaller, "ladder", [pair])))
    if s.ladder_grid_batch:  # added after the rest (issue 9): last, so that the earlier phases keep their order
        for pair in s.pairs:
            name = f"{pair[0]}/{pair[1]}"
            out.append(Phase(f"ladder grid {name}", False, lambda pair=pair: ladder_grid_specs(s, [pair])))
    if s.metric_variants:  # the projection metric (issue 18), after all of the above
        for pair in s.pairs:
            name = f"{pair[0]}/{pair[1]}"
            out.append(Phase(f"fisher grid {name}", False, lambda pair=pair: metric_grid_specs(s, [pair])))
            out.append(Phase(f"fisher seeds {name}", True, lambda pair=pair: metric_seed_specs(s, results, [pair])))
            out.append(Phase(f"traces {name}", True, lambda pair=pair: trace_specs(s, results, [pair]), traced=True))
    return out


def is_done(result: Optional[Dict[str, Any]], timed: bool, traced: bool = False) -> bool:
    """A stored run is reused unless it is missing, ``timed`` and stored without CPU time, or ``traced`` and a K-FAC/FOP
    run stored without per-step diagnostics (``diagnostics_curve``)."""
    if result is None or (timed and "cpu_seconds" not in result):
        return False
    return not traced or result["spec"]["variant"] is None or "diagnostics_curve" in result
