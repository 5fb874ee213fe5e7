"""Step time and memory of AdamW, K-FAC and FOP on a ViT (issues "Speed" and "Cost").

One *step* is a whole training iteration on a batch of ``B`` images: forward
and backward of two half batches of ``B/2`` (FOP's sub-batches) and
``optimizer.step()``. Every optimizer gets the same two half-batch backward
passes, so the ratios isolate what the optimizer adds (capture hooks,
eigendecompositions, rotations, FOP math):

* ``adamw``:  ``torch.optim.AdamW(foreach=True)``, the two half losses (each
  halved) accumulated by plain ``backward()``;
* ``kfac``:   ``FOP(mode="kfac")``, the same plain accumulated backward passes;
* ``fop``:    ``FOP(mode="fop")``, one backward inside ``sub_batch(0)`` and one
  inside ``sub_batch(1)``;
* ``adamw_full`` (headline only): AdamW with one backward of the full batch,
  to show what splitting the batch costs by itself.

Curvature interval ``k`` means ``factor_interval = inverse_interval = k`` unless ``--factor-interval F`` (a divisor
of the headline's ``k``) sets the factor interval alone: ``--interval 20 --factor-interval 10`` is the shipped
``FOPConfig`` schedule. The
reported step time of an optimizer is the median over curvature cycles of the
mean step time within the cycle (``k`` consecutive steps), so the curvature
step's capture and eigendecomposition are amortised into it; the plain
per-step median (which at ``k > 1`` only sees non-curvature steps) is kept as
``median_step_s``. Optimizers run round-robin, one step each, after one
warm-up cycle, to share the drift of a busy machine.

Subnormal floats are flushed to zero (``torch.set_flush_denormal``): after a
few K-FAC/FOP steps on random labels the attention softmax underflows into
subnormals, which x86 CPUs process about 100x slower; unflushed, that adds
up to 30% to the forward/backward time of whichever model got there first.

Memory: each optimizer trains in a fresh subprocess; peak memory is the peak
resident set size above the interpreter's size after imports (CPU), or
``torch.cuda.max_memory_allocated`` (CUDA). Optimizer-state bytes are the
tensor bytes of ``optimizer.state_dict()`` (FOP: its AdamW moments, factors A
and S, eigenbases).

``--compile`` times the headline a second time with each optimizer's model
wrapped by ``torch.compile(model, backend=--compile-backend)`` (the optimizer
itself stays eager; FOP's curvature hooks are ``torch.compiler.disable``d and
run eagerly between graphs on capture steps). Each optimizer runs in its own
spawned process (``measure_compiled``: compiled graphs and dynamo's counters
are per process, so none is shared and no ``torch._dynamo.reset()`` is
needed): the untimed warm-up cycles (compilation; ``warmup_s``) one process
after the other, then the same ``cycles`` timed cycles round-robin, one step of
each process in turn while the others wait, as the eager optimizers share one
process. Inductor's on-disk caches are shared, so an optimizer whose graphs an
earlier one (or an earlier run) compiled warms up faster. ``graphs`` counts the
graphs dynamo compiled in that optimizer's process
(``counters["stats"]["unique_graphs"]``), ``timed_graphs`` those compiled
during the timed cycles (recompiles; 0 when the warm-up compiled everything).
The results go under ``compiled`` in the JSON, next to the eager ones.

The headline's **rotation limit** (``rotation_limit_fop``, ``rotation_limit_kfac``; :mod:`bench_lib.rotations`, as
``bench_hub_widths.py`` computes it) is the FLOPs of the eigenbasis rotations per step over the FLOPs of AdamW's two
half-batch passes: the least the method's own products add where they run at the passes' FLOP rate.
``fop_over_limit`` is FOP/AdamW over ``1 + rotation_limit_fop``, checked against issue 16's "everywhere" goal (1.15).

Ends by printing one JSON line (``fop_over_adamw``, ``fop_over_kfac``,
``kfac_over_adamw`` at interval 10, ...). Usage::

    python scripts/bench_step.py --quick            # headline only, < 2 min on 2 cores
    python scripts/bench_step.py --quick --compile  # + the headline with torch.compile'd models (inductor)
    python scripts/bench_step.py --sweep --plot docs/step_time_growth.png
    python scripts/bench_step.py --device cuda --sweep   # GPU-sized defaults
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_lib.rotations import ROTATIONS, counted_flops, rotation_limit  # noqa: E402

from hf_fop import FOP  # noqa: E402

OPTIMIZERS = ("adamw", "kfac", "fop")
GOALS = {"fop_over_adamw": 1.15, "fop_over_kfac": 1.05, "fop_over_limit": 1.15, "peak_fop_over_adamw": 1.3}
"""Issue 2's headline goals (FOP/AdamW <= 1.15, FOP/K-FAC <= 1.05, peak memory FOP/AdamW <= 1.3) and issue 16's
"everywhere" goal at the headline's shape: FOP/AdamW <= 1.15 (1 + FOP's rotation limit)."""


@dataclass(frozen=True)
class Shape:
    """ViT size and batch of one measurement point (images are ``image x image``, 3 channels)."""

    hidden: int
    layers: int
    batch: int
    image: int = 32
    patch: int = 4

    def label(self) -> str:
        return f"hidden={self.hidden} layers={self.layers} batch={self.batch} image={self.image}/{self.patch}"


# Sizes per device: (headline shape, batch sweep, width sweep, steps knobs).
PRESETS: Dict[str, Dict[str, Any]] = {
    "cpu": {
        "shape": Shape(hidden=128, layers=4, batch=64),
        "batches": (32, 64, 128, 256),
        "widths": (64, 128, 192, 256),
        "cycles": 8,
        "sweep_cycles": 1,
    },
    "cuda": {
        "shape": Shape(hidden=384, layers=6, batch=512),
        "batches": (128, 256, 512, 1024, 2048),
        "widths": (192, 384, 576, 768, 1024),
        "cycles": 20,
        "sweep_cycles": 4,
    },
}
QUICK = {"cycles": 3}
SMOKE = {"shape": Shape(hidden=32, layers=1, batch=8, image=16, patch=8), "cycles": 2, "interval": 2}


def build_model(shape: Shape, device: torch.device, seed: int = 0) -> nn.Module:
    """A randomly initialised ``ViTForImageClassification`` (10 classes), in train mode."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=shape.image,
        patch_size=shape.patch,
        num_channels=3,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=max(1, shape.hidden // 32),
        intermediate_size=4 * shape.hidden,
        num_labels=10,
    )
    return ViTForImageClassification(config).to(device).train()


def make_batch(shape: Shape, device: torch.device, seed: int = 1) -> Tuple[Tensor, Tensor]:
    """Synthetic images ``(B, 3, image, image)`` and labels ``(B,)`` (timing does not depend on content)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.batch, 3, shape.image, shape.image, generator=gen)
    y = torch.randint(0, 10, (shape.batch,), generator=gen)
    return x.to(device), y.to(device)


def make_optimizer(
    kind: str, model: nn.Module, interval: int, factor_interval: Optional[int] = None
) -> torch.optim.Optimizer:
    """``adamw``/``adamw_full``: torch AdamW (foreach); ``kfac``/``fop``: :class:`FOP` with eigenbases every
    ``interval`` steps and factors every ``factor_interval`` (default: ``interval``)."""
    if kind in ("adamw", "adamw_full"):
        return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    factor_interval = interval if factor_interval is None else factor_interval
    return FOP(
        model, lr=1e-2, damping=1e-2, mode=kind, factor_interval=factor_interval, inverse_interval=interval, adamw_lr=1e-3,
        damping_mode="absolute", kl_clip=None, momentum=0.0,  # the setting the timings in docs/performance.md were taken with
    )


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(pixel_values=x).logits, y)


def make_step(kind: str, model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], None]:
    """The forward/backward passes of one step (the optimizer step is timed separately)."""
    half = x.shape[0] // 2
    halves = ((x[:half], y[:half]), (x[half:], y[half:]))
    if kind == "adamw_full":
        return lambda: _loss(model, x, y).backward()
    if kind == "fop":
        assert isinstance(opt, FOP)

        def fop_passes() -> None:
            for i, (xh, yh) in enumerate(halves):
                with opt.sub_batch(i):
                    _loss(model, xh, yh).backward()

        return fop_passes

    def accumulated_passes() -> None:
        for xh, yh in halves:
            (_loss(model, xh, yh) / 2).backward()

    return accumulated_passes


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``opt.state_dict()`` (nested dicts and lists included)."""

    def walk(obj: Any) -> int:
        if isinstance(obj, Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return walk(opt.state_dict())


@dataclass
class Runner:
    """One optimizer on its own copy of the model, with its per-step timings."""

    kind: str
    model: nn.Module
    opt: torch.optim.Optimizer
    passes: Callable[[], None]
    passes_s: List[float] = field(default_factory=list)
    step_s: List[float] = field(default_factory=list)
    eigh_s: List[float] = field(default_factory=list)
    captured: List[bool] = field(default_factory=list)
    """Per timed step: whether its passes captured curvature (some layer's factors; FOP and K-FAC only)."""

    def run_step(self, sync: Callable[[], None], record: bool) -> None:
        capturing = bool(getattr(self.opt, "capturing", False))
        sync()
        t0 = time.perf_counter()
        self.passes()
        sync()
        t1 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if record:
            self.passes_s.append(t1 - t0)
            self.step_s.append(t2 - t1)
            self.captured.append(capturing)


def _timed_eigenbases(runner: Runner) -> None:
    """Record the seconds of each eigendecomposition pass of a FOP runner (timing wrapper only)."""
    distributor = runner.opt.distributor  # type: ignore[attr-defined]
    original = distributor.refresh_bases

    def timed(*args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        original(*args, **kwargs)
        runner.eigh_s.append(time.perf_counter() - t0)

    distributor.refresh_bases = timed


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _cycle_means(values: Sequence[float], interval: int) -> List[float]:
    return [sum(values[i : i + interval]) / interval for i in range(0, len(values) - interval + 1, interval)]


def _summary(r: Runner, interval: int) -> Dict[str, float]:
    """Seconds per step (cycle medians, see the module docstring), state bytes and, for FOP, its curvature counts
    of one runner after its timed steps."""
    totals = [a + b for a, b in zip(r.passes_s, r.step_s)]
    res = {
        "step_s": statistics.median(_cycle_means(totals, interval)),
        "median_step_s": statistics.median(totals),
        "passes_s": statistics.median(_cycle_means(r.passes_s, interval)),
        "opt_step_s": statistics.median(_cycle_means(r.step_s, interval)),
        "state_bytes": float(state_bytes(r.opt)),
    }
    if isinstance(r.opt, FOP):
        # the steps that captured some layer's factors (every factor_interval-th step, or every step with the
        # default staggered capture, each capturing its share of the layers) and the others
        cap = [i for i in range(len(totals)) if r.captured[i]]
        plain = [i for i in range(len(totals)) if not r.captured[i]] or cap
        res["passes_capture_s"] = statistics.median(r.passes_s[i] for i in cap)
        res["passes_plain_s"] = statistics.median(r.passes_s[i] for i in plain)
        res["opt_step_curvature_s"] = statistics.median(r.step_s[i] for i in cap)
        res["opt_step_plain_s"] = statistics.median(r.step_s[i] for i in plain)
        res["eigh_s"] = statistics.median(r.eigh_s[1:] or r.eigh_s)
        diag = r.opt.diagnostics()
        res["skipped_steps"] = diag["skipped_steps"]
        res["inverse_updates"] = diag["inverse_updates"]
        res["factor_updates"] = diag["factor_updates"]
        res["layer_factor_updates"] = diag["layer_factor_updates"]
    else:
        res["passes_plain_s"] = statistics.median(r.passes_s)
        res["opt_step_plain_s"] = statistics.median(r.step_s)
    return res


def _make_runner(
    kind: str, shape: Shape, interval: int, factor_interval: int, device: torch.device, x: Tensor, y: Tensor,
    compile_backend: Union[str, Callable[..., Any], None] = None,
) -> Runner:
    """A fresh model and optimizer; the passes call ``torch.compile(model, backend=compile_backend)`` if given
    (the optimizer holds the eager model, whose modules carry its hooks)."""
    model = build_model(shape, device)
    opt = make_optimizer(kind, model, interval, factor_interval)
    forward: nn.Module = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    runner = Runner(kind, model, opt, make_step(kind, forward, opt, x, y))
    if isinstance(opt, FOP):
        _timed_eigenbases(runner)
    return runner


def measure(
    shape: Shape, kinds: Sequence[str], interval: int, cycles: int, device: torch.device,
    factor_interval: Optional[int] = None,
) -> Dict[str, Dict[str, float]]:
    """Round-robin timing of ``kinds`` on ``shape``: one warm-up cycle, then ``cycles`` cycles of ``interval`` steps
    (eigenbases every ``interval`` steps, factors every ``factor_interval``, default ``interval``)."""
    factor_interval = interval if factor_interval is None else factor_interval
    x, y = make_batch(shape, device)
    runners = [_make_runner(kind, shape, interval, factor_interval, device, x, y) for kind in kinds]
    sync = _sync_fn(device)
    for step in range(interval * (cycles + 1)):
        for runner in runners:
            runner.run_step(sync, record=step >= interval)
    return {r.kind: _summary(r, interval) for r in runners}


class CompiledRunner:
    """One optimizer on a ``torch.compile(model, backend=backend)``'d model, alone in its process (dynamo's graph
    counters are per process): an untimed warm-up cycle, then timed steps."""

    def __init__(self, kind: str, shape: Shape, interval: int, factor_interval: int, device: torch.device,
                 backend: Union[str, Callable[..., Any]]) -> None:  # fmt: skip
        from torch._dynamo.utils import counters

        self.counters = counters
        counters.clear()
        x, y = make_batch(shape, device)
        self.interval = interval
        self.sync = _sync_fn(device)
        self.runner = _make_runner(kind, shape, interval, factor_interval, device, x, y, backend)
        self.warmup_s = 0.0
        self.warm_graphs = 0
        self.started: List[float] = []  # wall clock (epoch seconds) at each timed step's start

    def warm_up(self) -> float:
        """The untimed warm-up cycle (compiles); its seconds."""
        t0 = time.perf_counter()
        for _ in range(self.interval):
            self.runner.run_step(self.sync, record=False)
        self.warmup_s = time.perf_counter() - t0
        self.warm_graphs = self.counters["stats"]["unique_graphs"]
        return self.warmup_s

    def step(self) -> None:
        self.started.append(time.time())
        self.runner.run_step(self.sync, record=True)

    def summary(self) -> Dict[str, float]:
        """:func:`_summary` plus ``warmup_s``, ``graphs`` (graphs dynamo compiled in this process), ``timed_graphs``
        (of those, compiled after the warm-up cycle: recompiles), ``timed_steps``, ``pid`` and ``step_started`` (the
        wall clock at each timed step's start, epoch seconds: the order of the processes' steps)."""
        res = _summary(self.runner, self.interval)
        graphs = self.counters["stats"]["unique_graphs"]
        res.update(warmup_s=self.warmup_s, graphs=graphs, timed_graphs=graphs - self.warm_graphs,
                   timed_steps=len(self.runner.step_s), pid=os.getpid(), step_started=self.started)  # fmt: skip
        return res


def _compiled_child(conn: Any, kind: str, shape: Shape, interval: int, factor_interval: int, device: str,
                    backend: str, threads: int, flush_denormal: bool) -> None:  # fmt: skip
    """A child process of :func:`measure_compiled`: one :class:`CompiledRunner`, driven by the parent's commands
    (``"warm_up"``, ``"step"``, ``"summary"``), each answered on ``conn``."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)
    runner = CompiledRunner(kind, shape, interval, factor_interval, torch.device(device), backend)
    actions = {"warm_up": runner.warm_up, "step": runner.step, "summary": runner.summary}
    while True:
        command = conn.recv()
        if command == "exit":
            break
        conn.send(actions[command]())


def measure_compiled(
    shape: Shape, kinds: Sequence[str], interval: int, cycles: int, device: torch.device, backend: str,
    factor_interval: Optional[int] = None, flush_denormal: bool = True,
) -> Dict[str, Dict[str, float]]:
    """:func:`measure` with each model ``torch.compile``d by ``backend``, each optimizer in its own process (a
    :class:`CompiledRunner`; spawned, so that no compiled graph or dynamo counter is shared): the warm-up cycles one
    process after the other, then the ``cycles`` timed cycles round-robin, one step of each process in turn (the
    others wait for the parent), as :func:`measure` does in one process. The children take this process's torch
    thread count and ``flush_denormal`` (``torch.set_flush_denormal``)."""
    import multiprocessing

    factor_interval = interval if factor_interval is None else factor_interval
    context = multiprocessing.get_context("spawn")
    children = []
    try:
        for kind in kinds:
            parent, child = context.Pipe()
            process = context.Process(target=_compiled_child, args=(
                child, kind, shape, interval, factor_interval, str(device), backend, torch.get_num_threads(),
                flush_denormal))  # fmt: skip
            process.start()
            children.append((kind, parent, process))
        for _, conn, _ in children:
            conn.send("warm_up")
            conn.recv()
        for _ in range(interval * cycles):
            for _, conn, _ in children:
                conn.send("step")
                conn.recv()
        out = {}
        for kind, conn, _ in children:
            conn.send("summary")
            out[kind] = conn.recv()
        return out
    finally:
        for _, conn, process in children:
            if process.is_alive():
                try:
                    conn.send("exit")
                except (BrokenPipeError, OSError):
                    pass
                process.join(timeout=30)
                if process.is_alive():
                    process.terminate()


def rotation_limits(shape: Shape, device: torch.device) -> Dict[str, float]:
    """``rotation_limit_<kind>``: K-FAC's and FOP's rotation FLOPs per step over the FLOPs of AdamW's two half-batch
    passes at ``shape`` (:mod:`bench_lib.rotations`; the managed layers' sides from a FOP on the same model)."""
    model = build_model(shape, device)
    x, y = make_batch(shape, device)
    flops = counted_flops(make_step("adamw", model, make_optimizer("adamw", model, 1), x, y))
    fop = make_optimizer("fop", model, 1)
    assert isinstance(fop, FOP)
    dims = [(layer.in_dim, layer.out_dim) for layer in fop.layers]
    fop.release()
    return {f"rotation_limit_{kind}": rotation_limit(dims, count, flops) for kind, count in ROTATIONS.items()}


def ratios(point: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    t = {k: v["step_s"] for k, v in point.items()}
    out = {
        "fop_over_adamw": t["fop"] / t["adamw"],
        "fop_over_kfac": t["fop"] / t["kfac"],
        "kfac_over_adamw": t["kfac"] / t["adamw"],
    }
    if "adamw_full" in t:
        out["fop_over_adamw_full"] = t["fop"] / t["adamw_full"]
        out["adamw_halves_over_full"] = t["adamw"] / t["adamw_full"]
    return out


# ------------------------------------------------------------------ memory
def _proc_status_bytes(field_name: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (per address space, unlike ``ru_maxrss``,
    which Linux carries over from the parent across fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def peak_and_state(opt: torch.optim.Optimizer, device: torch.device, base: int) -> Dict[str, float]:
    """Peak memory since ``base`` (CPU: ``VmHWM`` minus the resident bytes ``base``; CUDA: max allocated) and the
    optimizer's state bytes, after training."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _proc_status_bytes("VmHWM") - base
    return {"peak_bytes": float(peak), "state_bytes": float(state_bytes(opt))}


def memory_child(
    kind: str, shape: Shape, interval: int, device: torch.device, factor_interval: Optional[int] = None
) -> Dict[str, float]:
    """Train ``kind`` for one curvature cycle plus two steps in this process; peak bytes and state bytes."""
    base = _proc_status_bytes("VmRSS") if device.type == "cpu" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x, y = make_batch(shape, device)
    model = build_model(shape, device)
    opt = make_optimizer(kind, model, interval, factor_interval)
    passes = make_step(kind, model, opt, x, y)
    for _ in range(interval + 2):
        passes()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return peak_and_state(opt, device, base)


def measure_memory(
    shape: Shape, interval: int, device: torch.device, threads: int, factor_interval: Optional[int] = None
) -> Dict[str, Dict[str, float]]:
    """Run :func:`memory_child` for each optimizer in a fresh interpreter."""
    out = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for kind in OPTIMIZERS:
        cmd = [
            sys.executable, __file__, "--memory-child", kind, "--device", device.type, "--threads", str(threads),
            "--hidden", str(shape.hidden), "--layers", str(shape.layers), "--batch", str(shape.batch),
            "--image", str(shape.image), "--patch", str(shape.patch), "--interval", str(interval),
        ] + (["--factor-interval", str(factor_interval)] if factor_interval is not None else [])  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory run of {kind} failed:\n{done.stderr[-2000:]}")
        out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# -------------------------------------------------------------------- plot
def plot_sweep(sweep: Dict[str, List[Dict[str, Any]]], intervals: Sequence[int], path: Path, title: str) -> None:
    """Top: ms per step vs batch size and vs width at the largest interval. Bottom: FOP/AdamW and
    FOP/K-FAC at every interval, with the goals as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_of = {"batch": "batch size (images per step)", "hidden": "ViT hidden width"}
    k_top = max(intervals)
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for col, (key, xlabel) in enumerate(axes_of.items()):
        ax = axes[0][col]
        rows = [p for p in sweep[key] if p["interval"] == k_top]
        xs = [p[key] for p in rows]
        for kind, style in zip(OPTIMIZERS, ("o-", "s--", "^-")):
            ax.plot(xs, [1e3 * p["times"][kind]["step_s"] for p in rows], style, label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"ms per step (interval {k_top})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        ax = axes[1][col]
        for k, color in zip(intervals, ("tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple")):
            rows = [p for p in sweep[key] if p["interval"] == k]
            xs = [p[key] for p in rows]
            ax.plot(xs, [p["fop_over_adamw"] for p in rows], "o-", color=color, label=f"FOP/AdamW, interval {k}")
            ax.plot(xs, [p["fop_over_kfac"] for p in rows], "s--", color=color, label=f"FOP/K-FAC, interval {k}")
        for goal in (GOALS["fop_over_adamw"], GOALS["fop_over_kfac"]):
            ax.axhline(goal, color="black", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step-time ratio (goals dotted: 1.15, 1.05)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- markdown
def markdown(result: Dict[str, Any]) -> str:
    """Markdown tables of a result (headline, memory, sweep) as written in docs/performance.md."""
    lines = [f"Headline: ViT {result['shape']}, {result['params']} parameters, curvature interval "
             f"{result['interval']} (factors every {result.get('factor_interval', result['interval'])}), "
             f"{result['cycles']} timed cycles; {result['machine']}; {result['date']}.", "",
             "| optimizer | ms/step | fwd+bwd ms | opt.step ms | median single step ms | state MiB |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for kind, t in result["times"].items():
        lines.append(f"| {kind} | {1e3 * t['step_s']:.1f} | {1e3 * t['passes_s']:.1f} | {1e3 * t['opt_step_s']:.1f} | "
                     f"{1e3 * t['median_step_s']:.1f} | {t['state_bytes'] / 2**20:.2f} |")  # fmt: skip
    lines += ["", "| ratio | value | goal | met |", "|---|---|---|---|"]
    for key in ("fop_over_adamw", "fop_over_kfac", "kfac_over_adamw", "fop_over_adamw_full", "adamw_halves_over_full",
                "rotation_limit_fop", "rotation_limit_kfac", "fop_over_limit", "peak_fop_over_adamw",
                "peak_kfac_over_adamw", "state_fop_over_adamw"):  # fmt: skip
        if key in result:
            goal = GOALS.get(key)
            over = f"no (+{100 * (result[key] / goal - 1):.0f}%)" if goal is not None else ""
            met = "" if goal is None else ("yes" if result[key] <= goal else over)
            lines.append(f"| {key} | {result[key]:.3f} | {'' if goal is None else f'<= {goal}'} | {met} |")
    if "compiled" in result:
        comp = result["compiled"]
        lines += ["", f"Compiled (`torch.compile(model, backend=\"{comp['backend']}\")`, each optimizer in its own "
                  "process, round-robin; warm-up = the untimed first cycle, with the compilation):", "",
                  "| optimizer | eager ms/step | compiled ms/step | compiled/eager | warm-up s | graphs | "
                  "graphs compiled in timed cycles |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for kind, t in comp["times"].items():
            eager = result["times"][kind]["step_s"]
            lines.append(f"| {kind} | {1e3 * eager:.1f} | {1e3 * t['step_s']:.1f} | {t['step_s'] / eager:.3f} | "
                         f"{t['warmup_s']:.1f} | {t['graphs']} | {t['timed_graphs']} |")  # fmt: skip
        lines += ["", "| ratio | eager | compiled |", "|---|---|---|"]
        for key in ("fop_over_adamw", "fop_over_kfac", "kfac_over_adamw"):
            lines.append(f"| {key} | {result[key]:.3f} | {comp[key]:.3f} |")
    if "memory" in result:
        lines += ["", "| optimizer | peak MiB | state MiB |", "|---|---|---|"]
        for kind, m in result["memory"].items():
            lines.append(f"| {kind} | {m['peak_bytes'] / 2**20:.1f} | {m['state_bytes'] / 2**20:.2f} |")
    for key, points in result.get("sweep", {}).items():
        lines += ["", f"| {key} | interval | AdamW ms | K-FAC ms | FOP ms | FOP/AdamW | FOP/K-FAC | K-FAC/AdamW |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for pt in points:
            t = pt["times"]
            lines.append(f"| {pt[key]} | {pt['interval']} | {1e3 * t['adamw']['step_s']:.0f} | "
                         f"{1e3 * t['kfac']['step_s']:.0f} | {1e3 * t['fop']['step_s']:.0f} | {pt['fop_over_adamw']:.3f} | "
                         f"{pt['fop_over_kfac']:.3f} | {pt['kfac_over_adamw']:.3f} |")  # fmt: skip
    return "\n".join(lines)


# -------------------------------------------------------------------- main
def _positive(name: str) -> Callable[[str], int]:
    """argparse type: an integer >= 1, with an error naming ``--name``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} must be an integer >= 1, got {text!r}")
        if value < 1:
            raise argparse.ArgumentTypeError(f"--{name} must be an integer >= 1, got {text}")
        return value

    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="headline point only, few cycles (< 2 min on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="tiny model, seconds; for tests")
    p.add_argument("--sweep", action="store_true", help="also the growth curves over batch size and width")
    p.add_argument("--intervals", type=_positive("intervals"), nargs="+", default=[1, 5, 10])
    p.add_argument("--interval", type=_positive("interval"), default=10, help="curvature interval of the headline")
    p.add_argument("--factor-interval", type=_positive("factor-interval"),
                   help="factor interval of the headline, a divisor of --interval (default: --interval); "
                   "--interval 20 --factor-interval 10 is the shipped schedule")  # fmt: skip
    p.add_argument("--hidden", type=_positive("hidden"))
    p.add_argument("--layers", type=_positive("layers"))
    p.add_argument("--batch", type=_positive("batch"))
    p.add_argument("--image", type=_positive("image"))
    p.add_argument("--patch", type=_positive("patch"))
    p.add_argument("--cycles", type=_positive("cycles"), help="timed curvature cycles per point")
    p.add_argument("--sweep-cycles", type=_positive("sweep-cycles"), help="minimum timed cycles per sweep point")
    p.add_argument("--threads", type=_positive("threads"), default=1, help="torch.set_num_threads")
    p.add_argument("--keep-denormals", action="store_true", help="do not flush subnormal floats (see the docstring)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--compile", action="store_true",
                   help="also time the headline with torch.compile'd models (AdamW, K-FAC, FOP; not the sweep); "
                   "a cold inductor compile takes minutes on a CPU")
    p.add_argument("--compile-backend", metavar="NAME",
                   help="torch.compile backend of --compile (default: inductor; aot_eager compiles fast, for tests)")
    p.add_argument("--plot", type=Path, help="PNG of the sweep (needs --sweep)")
    p.add_argument("--json-out", type=Path, help="also write the full results here")
    p.add_argument("--markdown", type=Path, metavar="JSON", help="print the tables of a saved --json-out and exit")
    p.add_argument("--memory-child", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.batch is not None and args.batch % 2:
        p.error(f"--batch must be even (two sub-batches), got {args.batch}")
    if args.factor_interval is not None and (args.smoke or args.interval % args.factor_interval):
        p.error(f"--factor-interval ({args.factor_interval}) must divide --interval ({args.interval}) and cannot be "
                "combined with --smoke")
    if args.plot and not (args.sweep or args.markdown):
        p.error("--plot needs --sweep (or --markdown JSON of a sweep)")
    if args.compile_backend is not None:
        if not args.compile:
            p.error("--compile-backend needs --compile")
        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.compile_backend not in backends:
            p.error(f"--compile-backend must be one of {', '.join(backends)}; got {args.compile_backend!r}")
    elif args.compile:
        args.compile_backend = "inductor"
    return args


def resolve(args: argparse.Namespace) -> Tuple[Shape, int, int, int]:
    """Headline shape, headline interval, cycles and sweep cycles after presets, --quick/--smoke and overrides."""
    preset = dict(PRESETS[args.device])
    interval = args.interval
    if args.quick:
        preset.update(QUICK)
    if args.smoke:
        preset.update(SMOKE)
        interval = SMOKE["interval"]
        preset["sweep_cycles"] = SMOKE["cycles"]
    base: Shape = preset["shape"]
    shape = Shape(
        hidden=args.hidden or base.hidden,
        layers=args.layers or base.layers,
        batch=args.batch or base.batch,
        image=args.image or base.image,
        patch=args.patch or base.patch,
    )
    if shape.image % shape.patch:
        raise SystemExit(f"--image ({shape.image}) must be a multiple of --patch ({shape.patch})")
    return shape, interval, args.cycles or preset["cycles"], args.sweep_cycles or preset["sweep_cycles"]


def _plot_title(result: Dict[str, Any]) -> str:
    shape = result["shape"]
    return (f"{result['machine']}; {result['date']}; ViT {shape['layers']} layers, {shape['image']}px images; "
            f"batch sweep at width {shape['hidden']}, width sweep at batch {shape['batch']}")  # fmt: skip


def _sweep_cycles(minimum: int, interval: int, smoke: bool) -> int:
    """Cycles per sweep point: at least ``minimum`` and at least 10 timed steps (smoke: ``minimum``)."""
    return minimum if smoke else max(minimum, -(-10 // interval))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.markdown:
        saved = json.loads(args.markdown.read_text())
        print(markdown(saved))
        if args.plot and "sweep" in saved:
            intervals = sorted({p["interval"] for p in saved["sweep"]["batch"]})
            plot_sweep(saved["sweep"], intervals, args.plot, _plot_title(saved))
        return {}
    torch.set_num_threads(args.threads)
    # Trained attention sharpens and its softmax underflows into subnormal floats, which
    # x86 CPUs process ~100x slower; that would time the trajectory, not the optimizer.
    torch.set_flush_denormal(not args.keep_denormals)
    device = torch.device(args.device)
    shape, interval, cycles, sweep_cycles = resolve(args)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, shape, interval, device, args.factor_interval)))
        return {}
    t_start = time.perf_counter()
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads"
    )
    factor_interval = args.factor_interval or interval
    print(f"# {machine}; torch {torch.__version__}; {shape.label()}; interval {interval}, factor interval "
          f"{factor_interval}", file=sys.stderr)  # fmt: skip
    head = measure(shape, ("adamw", "adamw_full", "kfac", "fop"), interval, cycles, device, factor_interval)
    result: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "device": device.type,
        "threads": args.threads,
        "load_avg_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "shape": shape.__dict__,
        "params": sum(p.numel() for p in build_model(shape, torch.device("cpu")).parameters()),
        "interval": interval,
        "factor_interval": factor_interval,
        "cycles": cycles,
        "times": head,
    }
    result.update(ratios(head))
    result.update(rotation_limits(shape, device))
    result["fop_over_limit"] = result["fop_over_adamw"] / (1 + result["rotation_limit_fop"])
    for kind, res in head.items():
        print(f"# {kind:10s} {1e3 * res['step_s']:8.1f} ms/step (passes {1e3 * res['passes_s']:.1f}, "
              f"opt.step {1e3 * res['opt_step_s']:.1f})", file=sys.stderr)  # fmt: skip
    print(f"# rotation limit FOP {result['rotation_limit_fop']:.3f}, K-FAC {result['rotation_limit_kfac']:.3f}: "
          f"FOP/AdamW {result['fop_over_adamw']:.3f} = {result['fop_over_limit']:.3f} x (1 + limit)", file=sys.stderr)
    if args.compile:
        compiled = measure_compiled(shape, OPTIMIZERS, interval, cycles, device, args.compile_backend, factor_interval,
                                    flush_denormal=not args.keep_denormals)  # fmt: skip
        result["compiled"] = {"backend": args.compile_backend, "times": compiled, **ratios(compiled)}
        for kind, res in compiled.items():
            print(f"# compiled {kind:10s} {1e3 * res['step_s']:8.1f} ms/step (eager {1e3 * head[kind]['step_s']:.1f}), "
                  f"warm-up {res['warmup_s']:.1f} s, {res['graphs']} graphs", file=sys.stderr)  # fmt: skip
    if not args.no_memory:
        mem = measure_memory(shape, interval, device, args.threads, factor_interval)
        result["memory"] = mem
        result["peak_fop_over_adamw"] = mem["fop"]["peak_bytes"] / mem["adamw"]["peak_bytes"]
        result["peak_kfac_over_adamw"] = mem["kfac"]["peak_bytes"] / mem["adamw"]["peak_bytes"]
        result["state_fop_over_adamw"] = mem["fop"]["state_bytes"] / mem["adamw"]["state_bytes"]
    if args.sweep:
        preset = PRESETS[args.device] if not args.smoke else {"batches": (4, 8), "widths": (16, 32)}
        sweep: Dict[str, List[Dict[str, Any]]] = {"batch": [], "hidden": []}
        for key, values in (("batch", preset["batches"]), ("hidden", preset["widths"])):
            for value in values:
                point_shape = Shape(**{**shape.__dict__, key: value})
                for k in args.intervals:
                    times = measure(point_shape, OPTIMIZERS, k, _sweep_cycles(sweep_cycles, k, args.smoke), device)
                    sweep[key].append({key: value, "interval": k, "times": times, **ratios(times)})
                    r = sweep[key][-1]
                    print(f"# {key}={value} k={k}: fop/adamw {r['fop_over_adamw']:.3f} fop/kfac "
                          f"{r['fop_over_kfac']:.3f} kfac/adamw {r['kfac_over_adamw']:.3f}", file=sys.stderr)  # fmt: skip
        result["sweep"] = sweep
        if args.plot:
            plot_sweep(sweep, args.intervals, args.plot, _plot_title(result))
    result["goals"] = {
        k: {"goal": v, "value": result[k], "met": result[k] <= v} for k, v in GOALS.items() if k in result
    }
    result["seconds"] = time.perf_counter() - t_start
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
