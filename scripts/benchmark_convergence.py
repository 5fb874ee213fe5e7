"""Convergence benchmark: SGD, AdamW, K-FAC and FOP on scikit-learn digits (the paper's Table 1 / Figure 2 in miniature).

For every model (a small HF ViT and an MLP) and batch size (small up to the whole
training split) every optimizer is tuned on the validation split over one shared
learning-rate grid (and one shared damping grid for K-FAC and FOP), with seed 0.
The chosen settings are rerun with more seeds; the report gives epochs and
training seconds to a target *test* accuracy (mean and std over the seeds that
reach it), final accuracies, accuracy-vs-time and accuracy-vs-damping plots, and
the beta* / eta* ablations of FOP at the largest batch size.

K-FAC is ``FOP(mode="kfac")`` fed one plain backward of the whole batch; FOP is
fed the two halves of the batch through ``opt.sub_batch(0)`` / ``opt.sub_batch(1)``.
The ablations run FOP's two-sub-batch path with ``use_beta=False`` (the K-FAC
direction) or ``use_eta=False``.

Usage::

    python scripts/benchmark_convergence.py            # full run, writes docs/
    python scripts/benchmark_convergence.py --quick --out /tmp/x
    python scripts/benchmark_convergence.py --device cuda   # larger models, longer runs

Seconds are wall-clock seconds of the training steps only (evaluation excluded),
measured with ``torch.set_num_threads(--threads)`` in one process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convergence_models import DigitsSplits, build_model, load_digits_splits  # noqa: E402

from hf_fop import FOP  # noqa: E402

OPTIMIZERS = ("sgd", "adamw", "kfac", "fop")
CURVATURE_OPTIMIZERS = ("kfac", "fop")
ABLATIONS = ("fop_no_beta", "fop_no_eta")
DIVERGED_LOSS = 4 * math.log(10)  # four times the loss of a uniform prediction over the 10 classes


@dataclass
class Settings:
    """Everything that defines one benchmark run (stored in the JSON).

    ``epochs[model][batch]``: training epochs; ``targets[model]``: target test
    accuracy in [0, 1]; ``inverse_interval[batch]``: steps between eigendecompositions
    (factors are updated every step); ``adamw_lr_curvature``: lr of the parameters
    FOP/K-FAC leave to AdamW (ViT LayerNorms, embeddings), scheduled like the rest.
    """

    profile: str
    models: List[str]
    batch_sizes: List[int]
    epochs: Dict[str, Dict[int, int]]
    targets: Dict[str, float]
    lr_grid: List[float]
    damping_grid: List[float]
    seeds: int
    inverse_interval: Dict[int, int]
    evals_per_run: int = 150
    warmup_fraction: float = 0.05
    momentum: float = 0.9
    adamw_weight_decay: float = 0.01
    adamw_lr_curvature: float = 3e-3
    split_seed: int = 0
    ablation_seeds: int = 3


def make_settings(profile: str) -> Settings:
    """``"full"`` (about 30 min on 2 CPU cores), ``"quick"`` (about 1 min), ``"smoke"`` (the quick run's code paths
    in a few seconds, for tests) or ``"cuda"`` (sized up)."""
    full_batches = [64, 256, 1078]
    if profile == "full":
        return Settings(
            profile=profile,
            models=["mlp", "vit"],
            batch_sizes=full_batches,
            epochs={"mlp": {64: 15, 256: 40, 1078: 100}, "vit": {64: 20, 256: 50, 1078: 150}},
            targets={"mlp": 0.96, "vit": 0.93},
            lr_grid=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
            damping_grid=[1e-3, 1e-2, 1e-1, 1.0],
            seeds=3,
            inverse_interval={64: 10, 256: 10, 1078: 5},
        )
    if profile == "quick":
        return Settings(
            profile=profile,
            models=["mlp", "vit"],
            batch_sizes=[128, 1078],
            epochs={"mlp": {128: 6, 1078: 30}, "vit": {128: 4, 1078: 15}},
            targets={"mlp": 0.9, "vit": 0.5},
            lr_grid=[3e-3, 3e-2],
            damping_grid=[1e-2, 1e-1],
            seeds=2,
            inverse_interval={128: 10, 1078: 5},
            evals_per_run=10,
            ablation_seeds=1,
        )
    if profile == "smoke":
        return Settings(
            profile=profile,
            models=["mlp", "vit"],
            batch_sizes=[128, 1078],
            epochs={"mlp": {128: 4, 1078: 20}, "vit": {128: 2, 1078: 10}},
            targets={"mlp": 0.85, "vit": 0.4},
            lr_grid=[3e-3, 3e-2],
            damping_grid=[1e-1],
            seeds=1,
            inverse_interval={128: 10, 1078: 5},
            evals_per_run=5,
            ablation_seeds=1,
        )
    if profile == "cuda":
        return Settings(
            profile=profile,
            models=["mlp", "vit"],
            batch_sizes=[32, 128, 512, 1078],
            epochs={"mlp": {32: 30, 128: 60, 512: 150, 1078: 300}, "vit": {32: 60, 128: 120, 512: 300, 1078: 500}},
            targets={"mlp": 0.97, "vit": 0.95},
            lr_grid=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
            damping_grid=[1e-4, 1e-3, 1e-2, 1e-1, 1.0],
            seeds=5,
            inverse_interval={32: 10, 128: 10, 512: 5, 1078: 5},
            evals_per_run=100,
            ablation_seeds=5,
        )
    raise ValueError(f"profile={profile!r} is invalid: expected 'full', 'quick', 'smoke' or 'cuda'.")


@dataclass
class RunSpec:
    """One training run. ``optimizer`` is one of OPTIMIZERS or ABLATIONS; ``damping`` is None for SGD/AdamW."""

    model: str
    optimizer: str
    batch: int
    lr: float
    damping: Optional[float]
    seed: int
    epochs: int
    phase: str  # "grid", "seeds" or "ablation"


@dataclass
class RunResult:
    """Curves are sampled every ``eval_every`` epochs: ``epochs[i]``, ``seconds[i]`` (cumulative
    wall-clock training seconds), ``cpu_seconds[i]`` (the same in process CPU time), ``test_acc[i]``;
    ``final_*`` are measured after the last epoch. A run stops early (``diverged``) once the
    training loss is non-finite or above ``DIVERGED_LOSS``."""

    spec: Dict[str, Any]
    epochs: List[int] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    cpu_seconds: List[float] = field(default_factory=list)
    test_acc: List[float] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    final_val_acc: float = 0.0
    final_test_acc: float = 0.0
    final_val_loss: float = math.inf
    diverged: bool = False
    total_seconds: float = 0.0
    diagnostics: Dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------- training
def make_optimizer(model: nn.Module, spec: RunSpec, s: Settings) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` with the benchmark's fixed settings (momentum, intervals)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=s.momentum)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=s.adamw_weight_decay)
    extra: Dict[str, Any] = {}
    if spec.optimizer == "fop_no_beta":
        extra["use_beta"] = False
    elif spec.optimizer == "fop_no_eta":
        extra["use_eta"] = False
    elif spec.optimizer not in CURVATURE_OPTIMIZERS:
        raise ValueError(f"optimizer={spec.optimizer!r} is invalid: expected one of {OPTIMIZERS + ABLATIONS}.")
    assert spec.damping is not None
    return FOP(
        model,
        lr=spec.lr,
        damping=spec.damping,
        mode="kfac" if spec.optimizer == "kfac" else "fop",
        momentum=s.momentum,
        factor_interval=1,
        inverse_interval=s.inverse_interval[spec.batch],
        adamw_lr=s.adamw_lr_curvature,
        damping_mode="absolute",  # the paper's setting, as in the results in docs/benchmarks.md
        kl_clip=None,
        **extra,
    )


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warmup over ``warmup_fraction`` of ``total`` steps, then cosine decay to 0."""
    warmup = max(1, int(round(warmup_fraction * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` on ``(x, y)``."""
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return acc, loss if math.isfinite(loss) else math.inf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(spec: RunSpec, data: DigitsSplits, s: Settings, device: torch.device) -> RunResult:
    """Train one fresh model per ``spec``; only the training steps are timed."""
    model = build_model(spec.model, device.type, spec.seed).to(device)
    opt = make_optimizer(model, spec, s)
    n = len(data.y_train)
    if not 2 <= spec.batch <= n:
        raise ValueError(f"batch={spec.batch} is invalid: expected an integer in [2, {n}] (training split size).")
    steps_per_epoch = n // spec.batch
    total_steps = steps_per_epoch * spec.epochs
    base_lrs = [g["lr"] for g in opt.param_groups]
    eval_every = max(1, spec.epochs // s.evals_per_run)
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    dual = spec.optimizer in ("fop",) + ABLATIONS
    result = RunResult(spec=asdict(spec))
    step, seconds, cpu = 0, 0.0, 0.0
    for epoch in range(1, spec.epochs + 1):
        perm = torch.randperm(n, generator=gen).to(device)
        model.train()
        losses = []
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(steps_per_epoch):
            idx = perm[i * spec.batch : (i + 1) * spec.batch]
            x, y = data.x_train[idx], data.y_train[idx]
            factor = lr_factor(step, total_steps, s.warmup_fraction)
            for g, lr0 in zip(opt.param_groups, base_lrs):
                g["lr"] = lr0 * factor
            if dual:
                h = spec.batch // 2
                with opt.sub_batch(0):
                    l1 = F.cross_entropy(model(x[:h]), y[:h])
                    l1.backward()
                with opt.sub_batch(1):
                    l2 = F.cross_entropy(model(x[h:]), y[h:])
                    l2.backward()
                loss = (l1.detach() * h + l2.detach() * (spec.batch - h)) / spec.batch
            else:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
            step += 1
        _sync(device)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        train_loss = torch.stack(losses).mean().item()
        if not math.isfinite(train_loss) or train_loss > DIVERGED_LOSS:
            result.diverged = True
        if epoch % eval_every == 0 or epoch == spec.epochs or result.diverged:
            if isinstance(opt, FOP):
                opt.eval()
            model.eval()
            acc, _ = evaluate(model, data.x_test, data.y_test)
            if isinstance(opt, FOP):
                opt.train()
            result.epochs.append(epoch)
            result.seconds.append(seconds)
            result.cpu_seconds.append(cpu)
            result.test_acc.append(acc)
            result.train_loss.append(train_loss if math.isfinite(train_loss) else float("inf"))
        if result.diverged:
            break
    model.eval()
    result.final_val_acc, result.final_val_loss = evaluate(model, data.x_val, data.y_val)
    result.final_test_acc = result.test_acc[-1]
    result.total_seconds = seconds
    if isinstance(opt, FOP):
        diag = opt.diagnostics()
        keep = ("beta_mean", "eta_mean", "s_proj_mean", "kl_base", "kl_cross", "kl_orth", "skipped_steps", "curvature_seconds")
        result.diagnostics = {k: diag[k] for k in keep if k in diag and math.isfinite(diag[k])}
    return result


# ---------------------------------------------------------------- analysis
def reach(result: Dict[str, Any], target: float) -> Optional[Tuple[int, float]]:
    """(epoch, training seconds) of the first evaluation with test accuracy >= ``target``, else None."""
    for e, sec, acc in zip(result["epochs"], result["seconds"], result["test_acc"]):
        if acc >= target:
            return e, sec
    return None


def select_best(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The run with the highest final validation accuracy (ties: lower validation loss)."""
    return max(runs, key=lambda r: (r["final_val_acc"], -r["final_val_loss"]))


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: Sequence[Dict[str, Any]], target: float) -> Dict[str, Any]:
    """Time-to-target and final accuracy statistics over the seeds of one chosen setting."""
    reached = [reach(r, target) for r in runs]
    hit = [x for x in reached if x is not None]
    ep_mean, ep_std = _mean_std([float(e) for e, _ in hit])
    sec_mean, sec_std = _mean_std([sec for _, sec in hit])
    acc_mean, acc_std = _mean_std([r["final_test_acc"] for r in runs])
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


def _fmt_reach(summary: Dict[str, Any]) -> str:
    if summary["reached"] == 0:
        return "-"
    text = (
        f"{summary['epochs_mean']:.1f} ± {summary['epochs_std']:.1f} / "
        f"{summary['seconds_mean']:.2f} ± {summary['seconds_std']:.2f}"
    )
    if summary["reached"] < summary["seeds"]:
        text += f" ({summary['reached']}/{summary['seeds']} seeds)"
    return text


def _fmt_acc(summary: Dict[str, Any]) -> str:
    return f"{100 * summary['final_test_acc_mean']:.1f} ± {100 * summary['final_test_acc_std']:.1f}"


# ----------------------------------------------------------------- driver
def run_benchmark(s: Settings, device: torch.device, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Grid (seed 0) -> choice on validation -> more seeds -> ablations. Returns the JSON-ready report."""
    data = load_digits_splits(s.split_seed).to(device)
    runs: List[Dict[str, Any]] = []
    started = time.perf_counter()
    load_start = _loadavg()

    def do(spec: RunSpec) -> Dict[str, Any]:
        res = asdict(train_run(spec, data, s, device))
        runs.append(res)
        log(
            f"[{time.perf_counter() - started:7.1f}s] {spec.phase:8s} {spec.model} b={spec.batch:5d} "
            f"{spec.optimizer:11s} lr={spec.lr:<6g} damping={spec.damping!s:<6} seed={spec.seed} "
            f"val={res['final_val_acc']:.3f} test={res['final_test_acc']:.3f} "
            f"{res['total_seconds']:.2f}s{' DIVERGED' if res['diverged'] else ''}"
        )
        return res

    chosen: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for model in s.models:
        for batch in s.batch_sizes:
            epochs = s.epochs[model][batch]
            key = f"{model}/{batch}"
            chosen[key] = {}
            for opt_name in OPTIMIZERS:
                dampings = s.damping_grid if opt_name in CURVATURE_OPTIMIZERS else [None]
                grid = [
                    do(RunSpec(model, opt_name, batch, lr, d, 0, epochs, "grid")) for d in dampings for lr in s.lr_grid
                ]
                best = select_best(grid)
                chosen[key][opt_name] = best
                for seed in range(1, s.seeds):
                    spec = RunSpec(**{**best["spec"], "seed": seed, "phase": "seeds"})
                    do(spec)
    # ablations at the largest batch, FOP's chosen setting
    largest = max(s.batch_sizes)
    for model in s.models:
        fop_best = chosen[f"{model}/{largest}"]["fop"]["spec"]
        for name in ABLATIONS:
            for seed in range(s.ablation_seeds):
                do(RunSpec(**{**fop_best, "optimizer": name, "seed": seed, "phase": "ablation"}))
    report = build_report(s, runs, device, time.perf_counter() - started)
    report["meta"]["loadavg_1min_start_end"] = [load_start, _loadavg()]
    return report


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


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


def machine_description(device: torch.device) -> str:
    """CPU model and core count, plus the GPU name on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


# ------------------------------------------------------------------ output
def write_markdown_section(path: str, key: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- {key}:begin -->`` and ``<!-- {key}:end -->`` in ``path``."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


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


def _fmt_float(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def render_markdown(report: Dict[str, Any], files: Dict[str, str]) -> str:
    """Generated tables (Table-1 style, ablations, damping sweep) and the run's command/machine/date."""
    meta, s = report["meta"], report["meta"]["settings"]
    lines = [
        f"_Generated by `scripts/benchmark_convergence.py` (profile `{s['profile']}`)._",
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s); date {meta['date_utc']}",
        f"- Total wall time of the benchmark: {meta['wall_seconds'] / 60:.1f} min. Process CPU time / wall time "
        f"of the timed training steps: {meta['train_cpu_over_wall']:.2f} (1.00 = a whole core per thread; lower "
        f"means the machine was shared); 1-min load average at start / end: {meta['loadavg_1min_start_end']}",
        f"- Grid (seed 0, chosen on validation accuracy after the last epoch): lr in {s['lr_grid']}, "
        f"damping (K-FAC, FOP) in {s['damping_grid']}; {s['seeds']} seeds for the chosen settings.",
        "- Targets (test accuracy): " + ", ".join(f"{m}: {100 * t:.0f}%" for m, t in s["targets"].items()),
        "- Epochs per run: " + "; ".join(
            f"{m}: " + ", ".join(f"batch {b}: {e}" for b, e in eps.items()) for m, eps in s["epochs"].items()
        ),
        "",
    ]
    for model in s["models"]:
        target = s["targets"][model]
        lines += [
            f"#### {model}: epochs / seconds to {100 * target:.0f}% test accuracy (mean ± std over seeds that reach it)",
            "",
            "| batch | " + " | ".join(OPTIMIZERS) + " |",
            "|---|" + "---|" * len(OPTIMIZERS),
        ]
        for batch in s["batch_sizes"]:
            rows = {r["optimizer"]: r for r in report["table"] if r["model"] == model and r["batch"] == batch}
            lines.append(f"| {batch} | " + " | ".join(_fmt_reach(rows[o]) for o in OPTIMIZERS) + " |")
        lines += [
            "",
            f"#### {model}: final test accuracy % (mean ± std) and chosen setting",
            "",
            "| batch | " + " | ".join(OPTIMIZERS) + " |",
            "|---|" + "---|" * len(OPTIMIZERS),
        ]
        for batch in s["batch_sizes"]:
            rows = {r["optimizer"]: r for r in report["table"] if r["model"] == model and r["batch"] == batch}
            cells = []
            for o in OPTIMIZERS:
                r = rows[o]
                setting = f"lr={r['lr']:g}" + (f", λ={r['damping']:g}" if r["damping"] is not None else "")
                cells.append(f"{_fmt_acc(r)} ({setting})")
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"#### {model}: training seconds of a whole run (mean over seeds; every optimizer runs the same epochs)",
            "",
            "| batch | " + " | ".join(OPTIMIZERS) + " | FOP / K-FAC | FOP / AdamW |",
            "|---|" + "---|" * (len(OPTIMIZERS) + 2),
        ]
        for batch in s["batch_sizes"]:
            rows = {r["optimizer"]: r for r in report["table"] if r["model"] == model and r["batch"] == batch}
            sec = {o: rows[o]["total_seconds_mean"] for o in OPTIMIZERS}
            lines.append(
                f"| {batch} | " + " | ".join(f"{sec[o]:.2f}" for o in OPTIMIZERS)
                + f" | {sec['fop'] / sec['kfac']:.2f} | {sec['fop'] / sec['adamw']:.2f} |"
            )
        lines.append("")
    largest = max(s["batch_sizes"])
    lines += [
        f"#### Ablations at batch {largest} (FOP's chosen lr and damping; {s['ablation_seeds']} seeds)",
        "",
        "| model | variant | epochs / seconds to target | final test acc % | mean beta* (last step) | mean eta* (last step) |",
        "|---|---|---|---|---|---|",
    ]
    names = {"fop": "FOP (beta*, eta*)", "fop_no_beta": "beta = 0 (K-FAC direction)", "fop_no_eta": "eta* off (eta = 1)"}
    for a in report["ablations"]:
        lines.append(
            f"| {a['model']} | {names[a['variant']]} | {_fmt_reach(a)} | {_fmt_acc(a)} | "
            f"{_fmt_float(a['beta_mean'])} | {_fmt_float(a['eta_mean'])} |"
        )
    lines += [
        "",
        "#### Final test accuracy % against damping (seed 0, best lr on validation per damping)",
        "",
        "| model | batch | optimizer | " + " | ".join(f"λ={d:g}" for d in s["damping_grid"]) + " |",
        "|---|---|---|" + "---|" * len(s["damping_grid"]),
    ]
    for model in s["models"]:
        for batch in s["batch_sizes"]:
            for o in CURVATURE_OPTIMIZERS:
                pts = [p for p in report["damping_sweep"] if p["model"] == model and p["batch"] == batch and p["optimizer"] == o]
                cells = [f"{100 * p['final_test_acc']:.1f}" + (" (div.)" if p["diverged"] else "") for p in pts]
                lines.append(f"| {model} | {batch} | {o} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "#### FOP minus K-FAC, same (lr, damping, seed 0), over the lr grid and all batch sizes",
        "",
        "Final test accuracy difference in percentage points; 'FOP better' / 'K-FAC better' count the pairs "
        f"that differ by more than {PAIR_MARGIN:g} point(s) (one test example is {100 / 360:.2f} point); pairs where "
        f"both runs end below {100 * FAILED_ACC:.0f}% (diverged or stuck) are counted apart and left out of the mean.",
        "",
        "| model | damping | pairs | both failed | mean FOP - K-FAC (others) | FOP better | K-FAC better |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in paired_damping(report):
        lines.append(
            f"| {row['model']} | {row['damping']:g} | {row['pairs']} | {row['both_failed']} | {row['mean_diff']:+.1f} | "
            f"{row['fop_better']} | {row['kfac_better']} |"
        )
    lines += ["", "Plots: " + ", ".join(f"`{os.path.basename(p)}`" for p in files.values()), ""]
    return "\n".join(lines)


def plot(report: Dict[str, Any], out_dir: str, suffix: str) -> Dict[str, str]:
    """Accuracy-vs-time (rows: models, columns: batch sizes) and accuracy-vs-damping PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["meta"]["settings"]
    colors = {"sgd": "tab:gray", "adamw": "tab:blue", "kfac": "tab:orange", "fop": "tab:red"}
    models, batches = s["models"], s["batch_sizes"]
    fig, axes = plt.subplots(len(models), len(batches), figsize=(4 * len(batches), 3.2 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for o in OPTIMIZERS:
                row = next(r for r in report["table"] if r["model"] == model and r["batch"] == batch and r["optimizer"] == o)
                spec = {"model": model, "batch": batch, "optimizer": o, "lr": row["lr"], "damping": row["damping"]}
                seeds = [r for r in report["runs"] if _same_setting(r, spec)]
                n = min(len(r["test_acc"]) for r in seeds)
                t = [statistics.fmean(r["seconds"][k] for r in seeds) for k in range(n)]
                acc = [statistics.fmean(r["test_acc"][k] for r in seeds) for k in range(n)]
                ax.plot(t, acc, color=colors[o], label=o)
            ax.axhline(s["targets"][model], color="k", lw=0.8, ls="--")
            ax.set_title(f"{model}, batch {batch}")
            ax.set_xlabel("training seconds")
            ax.set_ylabel("test accuracy")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right")
    fig.tight_layout()
    time_path = os.path.join(out_dir, f"convergence_time{suffix}.png")
    fig.savefig(time_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(models), len(batches), figsize=(4 * len(batches), 3.2 * len(models)), squeeze=False)
    lr_colors = {lr: plt.cm.plasma(k / max(1, len(s["lr_grid"]) - 1) * 0.85) for k, lr in enumerate(s["lr_grid"])}
    for i, model in enumerate(models):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for o, ls in (("kfac", "--"), ("fop", "-")):
                for lr in s["lr_grid"]:
                    pts = sorted(
                        (r["spec"]["damping"], r["final_test_acc"]) for r in report["runs"]
                        if r["spec"]["phase"] == "grid" and r["spec"]["model"] == model and r["spec"]["batch"] == batch
                        and r["spec"]["optimizer"] == o and r["spec"]["lr"] == lr
                    )
                    label = f"{o} lr={lr:g}" if (i, j) == (0, 0) else None
                    ax.plot([d for d, _ in pts], [a for _, a in pts], ls, marker="o", ms=3, color=lr_colors[lr], label=label)
            ax.set_xscale("log")
            ax.set_xlabel("damping λ")
            ax.set_ylabel("final test accuracy (seed 0)")
            ax.set_ylim(0, 1)
            ax.set_title(f"{model}, batch {batch}: K-FAC -- , FOP —")
            ax.grid(alpha=0.3)
    fig.legend(loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    damping_path = os.path.join(out_dir, f"convergence_damping{suffix}.png")
    fig.savefig(damping_path, dpi=110)
    plt.close(fig)
    return {"time": time_path, "damping": damping_path}


def finite_json(obj: Any) -> Any:
    """``obj`` with floats rounded to 6 significant digits and non-finite ones replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny grid and short runs (about 1 min on 2 CPU cores)")
    p.add_argument("--smoke", action="store_true", help="the quick run's code paths in a few seconds (for tests)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (cuda sizes up models, grid and runs)")
    p.add_argument("--out", default="docs", help="folder for the JSON and PNGs (default: docs)")
    p.add_argument("--markdown", default=None, help="markdown file to update (default: OUT/benchmarks.md)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--from-json", default=None, help="only re-render the markdown and PNGs from a saved results JSON")
    args = p.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r} is invalid: expected 'cpu' or 'cuda'.")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was given but torch.cuda.is_available() is False on this machine.")
    if args.threads < 1:
        p.error(f"--threads {args.threads} is invalid: expected an integer >= 1.")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    profile = "smoke" if args.smoke else "quick" if args.quick else ("cuda" if device.type == "cuda" else "full")
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        profile = report["meta"]["settings"]["profile"]
    else:
        report = run_benchmark(make_settings(profile), device)
        given = list(sys.argv[1:] if argv is None else argv)
        report["meta"]["command"] = " ".join(["python scripts/benchmark_convergence.py"] + given)
    suffix = "" if profile == "full" else f"_{profile}"
    files = plot(report, args.out, suffix)
    json_path = args.from_json or os.path.join(args.out, f"convergence_results{suffix}.json")
    if not args.from_json:
        with open(json_path, "w") as f:
            json.dump(finite_json(report), f, indent=1, allow_nan=False)
    md_path = args.markdown or os.path.join(args.out, "benchmarks.md")
    key = "convergence" if profile == "full" else f"convergence-{profile}"
    write_markdown_section(md_path, key, render_markdown(report, files))
    print(f"wrote {json_path}, {md_path}, " + ", ".join(files.values()))
    return report


if __name__ == "__main__":
    main()
