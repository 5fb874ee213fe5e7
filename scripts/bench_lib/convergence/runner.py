"""Convergence benchmark, how runs are made: the optimizer of a spec, one training run (only the steps timed),
and the driver (grid, seeds, ablations)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hf_fop import FOP

from ..common import epoch_batches, lr_factor, schedule_lr
from ..data import DigitsSplits, load_digits_splits
from .analysis import build_report, select_best
from .grid import ABLATIONS, CURVATURE_OPTIMIZERS, OPTIMIZERS, RunSpec, Settings, build_model

DIVERGED_LOSS = 4 * math.log(10)  # four times the loss of a uniform prediction over the 10 classes


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
        batches = epoch_batches(data.x_train, data.y_train, spec.batch, gen)
        model.train()
        losses = []
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for x, y in batches:
            schedule_lr(opt, base_lrs, lr_factor(step, total_steps, s.warmup_fraction))
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
