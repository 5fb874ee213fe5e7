"""Sensitivity benchmark, how a run is made: the optimizer of a cell, one training run, the worker pool and the
resumable JSON (rewritten after every finished run)."""

from __future__ import annotations

import datetime
import json
import math
import multiprocessing
import os
import time
from dataclasses import asdict
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hf_fop import FOP

from ..common import epoch_batches, finite_json, lr_factor, machine_description, schedule_lr
from ..data import Splits, load_dataset
from ..models import build_model
from .grid import RUN_FIELDS, VARIANTS, RunSpec, Settings, is_done, phases
from .plan import format_plan, plan

def make_optimizer(model: nn.Module, spec: RunSpec, s: Settings) -> torch.optim.Optimizer:
    """The optimizer of ``spec``: SGD (momentum), AdamW, or K-FAC/FOP with the cell's lr, damping and variant and the
    benchmark's fixed settings; every ``FOPConfig`` field not set here keeps its shipped default."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=s.momentum)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=s.adamw_weight_decay)
    damping_mode, clip, fisher, metric = VARIANTS[spec.variant or ""]
    fixed = {"inverse_interval": s.inverse_interval}  # the benchmark's fixed settings that ``--config`` may replace
    return FOP(
        model,
        lr=spec.lr,
        damping=spec.damping,
        mode=spec.optimizer,
        damping_mode=damping_mode,
        kl_clip=s.kl_clip if clip else None,
        fisher_type=fisher,
        projection_metric=metric,
        momentum=s.momentum,
        adamw_lr=s.adamw_lr_curvature,
        **{**fixed, **s.config},
    )


TRACED = ("beta_mean", "beta_abs_mean", "s_proj_mean", "eta_mean", "kl_base", "kl_cross", "kl_orth", "kl_clip_scale")
"""The K-FAC/FOP diagnostics a run keeps at every evaluation (``diagnostics_curve``): layer means of beta*, |beta*|,
s_proj and eta*, the KL terms summed over layers (per unit lr^2) and the trust-region factor."""


def traced_diagnostics(opt: FOP) -> Dict[str, float]:
    """:data:`TRACED` of the last step (``beta_abs_mean`` from the per-layer ``<layer>/beta``); absent keys are NaN."""
    d = opt.diagnostics()
    betas = [abs(v) for k, v in d.items() if k.endswith("/beta")]
    d["beta_abs_mean"] = sum(betas) / len(betas) if betas else math.nan
    return {k: d.get(k, math.nan) for k in TRACED}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 5000) -> float:
    """Accuracy in [0, 1] of ``model`` on ``(x, y)`` (in chunks, eval mode)."""
    correct = 0
    for i in range(0, len(y), chunk):
        correct += int((model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum())
    return correct / len(y)


def train_run(spec: RunSpec, data: Splits, s: Settings) -> Dict[str, Any]:
    """Train one fresh model; returns the curve and final accuracies.

    The curve: ``epochs``, ``test_acc``, ``seconds`` (training wall time) and ``cpu_seconds`` (training CPU
    time of this process, ``time.process_time``; the one to compare on a shared machine), and for K-FAC/FOP
    ``diagnostics_curve`` (:data:`TRACED` of the epoch's last step, per evaluation). ``cpu_seconds_total``
    is the whole run's CPU time (model, training, evaluations): what the run costs a core.
    """
    cpu_start = time.process_time()
    model = build_model(spec.model, data, spec.seed, s.vit.get(spec.dataset))
    n = len(data.y_train)
    steps_per_epoch = n // spec.batch
    opt = make_optimizer(model, spec, s)
    total = steps_per_epoch * spec.epochs
    base = [g["lr"] for g in opt.param_groups]
    eval_every = max(1, spec.epochs // s.evals_per_run)
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    mc_gen = torch.Generator().manual_seed(20_000 + spec.seed)
    fop = isinstance(opt, FOP)
    dual = fop and spec.optimizer == "fop"
    mc = fop and opt.config.fisher_type == "mc"
    diverged_loss = 4 * math.log(data.n_classes)
    out: Dict[str, Any] = {"spec": asdict(spec), "epochs": [], "seconds": [], "cpu_seconds": [], "test_acc": [], "diverged": False}
    if fop:
        out["diagnostics_curve"] = {k: [] for k in TRACED}
    step, seconds, cpu = 0, 0.0, 0.0
    for epoch in range(1, spec.epochs + 1):
        batches = epoch_batches(data.x_train, data.y_train, spec.batch, gen)
        model.train()
        losses = []
        t0, c0 = time.perf_counter(), time.process_time()
        for x, y in batches:
            schedule_lr(opt, base, lr_factor(step, total, s.warmup_fraction))
            pieces = [(x[: len(y) // 2], y[: len(y) // 2], 0), (x[len(y) // 2 :], y[len(y) // 2 :], 1)] if dual else [(x, y, None)]
            loss_sum = 0.0
            for xs, ys, k in pieces:
                if k is not None:
                    opt.begin_sub_batch(k)
                logits = model(xs)
                loss = F.cross_entropy(logits, ys)
                if mc:
                    opt.mc_backward(logits, mc_gen)
                loss.backward()
                if k is not None:
                    opt.end_sub_batch(k)
                loss_sum = loss_sum + loss.detach() * len(ys)
            opt.step()
            opt.zero_grad()
            losses.append(loss_sum / len(y))
            step += 1
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        train_loss = torch.stack(losses).mean().item()
        if not math.isfinite(train_loss) or train_loss > diverged_loss:
            out["diverged"] = True
        if epoch % eval_every == 0 or epoch == spec.epochs or out["diverged"]:
            if fop:
                opt.eval()
            model.eval()
            acc = evaluate(model, data.x_test, data.y_test) if not out["diverged"] else 0.0
            if fop:
                opt.train()
            out["epochs"].append(epoch)
            out["seconds"].append(round(seconds, 4))
            out["cpu_seconds"].append(round(cpu, 4))
            out["test_acc"].append(acc)
            if fop:
                for k, v in traced_diagnostics(opt).items():
                    out["diagnostics_curve"][k].append(v)
        if out["diverged"]:
            break
    model.eval()
    out["final_test_acc"] = out["test_acc"][-1]
    out["final_val_acc"] = evaluate(model, data.x_val, data.y_val) if not out["diverged"] else 0.0
    out["seconds_total"] = round(seconds, 4)
    out["cpu_seconds_total"] = round(time.process_time() - cpu_start, 4)
    if fop:
        d = opt.diagnostics()
        out["diagnostics"] = {k: d[k] for k in ("kl_clip_scale", "damping_min", "damping_max", "beta_mean", "skipped_steps") if k in d and math.isfinite(d[k])}
    return out


_DATA: Dict[str, Splits] = {}
_SETTINGS: Optional[Settings] = None


def _worker_init(settings: Settings) -> None:
    global _SETTINGS
    torch.set_num_threads(1)
    _SETTINGS = settings


def _run_one(spec: RunSpec) -> Dict[str, Any]:
    assert _SETTINGS is not None
    if spec.dataset not in _DATA:
        _DATA[spec.dataset] = load_dataset(spec.dataset, _SETTINGS.n_train.get(spec.dataset))
    return train_run(spec, _DATA[spec.dataset], _SETTINGS)


def save_report(path: str, report: Dict[str, Any]) -> None:
    """Write ``report`` to ``path`` as strict JSON, atomically (a killed run leaves the previous file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(finite_json(report), f, indent=0, allow_nan=False)
    os.replace(tmp, path)


def load_report(s: Settings, json_path: str) -> Dict[str, Any]:
    """The stored report at ``json_path`` (or an empty one); raises if it was written with other :data:`RUN_FIELDS`."""
    if not os.path.exists(json_path):
        return {"meta": {}, "runs": {}}
    with open(json_path) as f:
        report = json.load(f)
    stored = report["meta"].get("settings", {})
    new = json.loads(json.dumps(finite_json(asdict(s))))
    written_before = {"config": {}}  # fields added later: a report without them was written with their default
    changed = [k for k in RUN_FIELDS if stored.get(k, written_before.get(k)) != new[k]]
    if changed:
        raise ValueError(f"{json_path} was written with other {changed}; use another --out or delete it.")
    return report


def run_benchmark(s: Settings, json_path: str, workers: int, progress: bool = True) -> Dict[str, Any]:
    """Run (or continue) every phase; the JSON at ``json_path`` is rewritten after each finished run."""
    report = load_report(s, json_path)
    report["meta"].update(
        settings=asdict(s), machine=machine_description(torch.device("cpu")), torch=torch.__version__, workers=workers
    )
    results: Dict[str, Dict[str, Any]] = report["runs"]
    print(format_plan(plan(s, results), workers), flush=True)
    report["meta"]["runs_this_session"] = 0
    report["meta"]["load_average_at_start"] = round(os.getloadavg()[0], 2)
    t_start = time.perf_counter()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        tqdm = None
    bar = tqdm(total=0, desc="runs", unit="run", disable=not progress or tqdm is None, dynamic_ncols=True) if tqdm else None
    pool = multiprocessing.get_context("spawn").Pool(workers, _worker_init, (s,)) if workers > 1 else None
    if pool is None:
        _worker_init(s)
        torch.set_num_threads(1)
    cpu_done = 0.0
    try:
        for i, phase in enumerate(phases(s, results)):
            todo = [sp for sp in phase.specs() if not is_done(results.get(sp.key()), phase.timed, phase.traced)]
            if bar is not None:  # the runs left as far as known now (later seeds/ladder cells are placeholders until their grid ran)
                bar.total = bar.n + sum(r["runs"] - r["done"] for r in plan(s, results)[i:])
                bar.set_description(phase.name)
                bar.refresh()
            runner = pool.imap_unordered(_run_one, todo) if pool else map(_run_one, todo)
            for result in runner:
                spec = RunSpec(**result["spec"])
                results[spec.key()] = result
                cpu_done += result["cpu_seconds_total"]
                report["meta"]["date_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                report["meta"]["wall_seconds_this_session"] = round(time.perf_counter() - t_start, 1)
                report["meta"]["cpu_seconds_this_session"] = round(cpu_done, 1)
                report["meta"]["runs_this_session"] += 1
                report["meta"]["load_average_last"] = round(os.getloadavg()[0], 2)
                save_report(json_path, report)
                if bar is not None:
                    bar.set_postfix_str(f"{cpu_done:.0f} CPU s", refresh=False)
                    bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    return report

