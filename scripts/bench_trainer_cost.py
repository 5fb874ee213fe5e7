"""Cost of FOPTrainer: communication per optimizer step (2 processes) and Trainer overhead (1 process).

1. Bytes communicated per optimizer step with 2 CPU processes (gloo,
   torchrun), same model and batch: FOP (dual-gradient all_gather in its DDP
   comm hook, or after the backward pass; factor averaging on inverse steps and
   a small count/finiteness all_reduce on capture steps, every step with the default staggered capture) against the Trainer's
   AdamW (DDP gradient buckets, counted with a DDP comm hook), and the median
   and mean seconds per optimizer step after 3 warm-up steps, for both curvature shardings (replicated, specialists), FOP
   and K-FAC. "Sent" is the bytes each rank sends
   under the ring model (all_reduce: 2(W-1)/W x payload, all_gather: (W-1) x
   payload); "payload" is what is handed to the collectives. Goal: FOP <= 2x
   (issue 8: <= 2.05x at factor interval 1).
2. Wall time per optimizer step of FOPTrainer against a plain PyTorch loop
   that drives the same FOP optimizer directly on the same batches (1 process).
   Goal: <= 1.05x.

Usage (prints a Markdown table; the numbers in docs/trainer.md come from it):

    OMP_NUM_THREADS=1 python scripts/bench_trainer_cost.py [--steps 30] [--factor_intervals 1 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification, default_data_collator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hf_fop import FOP, FOPTrainer, FOPTrainingArguments  # noqa: E402
from hf_fop.distributed import world  # noqa: E402


def make_model(hidden: int) -> ViTForImageClassification:
    """The example's ViT: 8x8 RGB digits, patches 2x2, 2 layers."""
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=hidden, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=2 * hidden, num_labels=10)
    return ViTForImageClassification(config)


class DigitsTensors(torch.utils.data.Dataset):
    """Digits held as tensors (``pixel_values (3, 8, 8)``, ``labels``): data loading stays out of the timings."""

    def __init__(self, n: int) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        reps = -(-n // len(y))
        x, y = np.tile(x, (reps, 1))[:n], np.tile(y, reps)[:n]
        self.x = torch.tensor(np.repeat((x / 8.0 - 1.0).astype(np.float32).reshape(-1, 1, 8, 8), 3, axis=1))
        self.y = torch.tensor(y, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def make_data(n: int) -> DigitsTensors:
    return DigitsTensors(n)


def make_args(out: str, optimizer: str, steps: int, batch: int, factor_interval: int, **extra: Any) -> FOPTrainingArguments:
    values: Dict[str, Any] = dict(
        output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=0.02 if optimizer != "trainer" else 1e-3, lr_scheduler_type="constant", logging_steps=10**6,
        save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0, fop_optimizer=optimizer,
        fop_damping=1e-2, fop_factor_interval=factor_interval, fop_inverse_interval=max(5, factor_interval),
        train_sampling_strategy="sequential", max_grad_norm=1.0,
    )
    values.update(extra)
    return FOPTrainingArguments(**values)


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.times: List[float] = []

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if not self.times:
            self.times.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.times.append(time.perf_counter())


class DDPByteCounter(TrainerCallback):
    """Registers a DDP comm hook that counts the gradient bytes DDP all-reduces."""

    def __init__(self, trainer: FOPTrainer) -> None:
        self.trainer = trainer
        self.bytes = 0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        model = self.trainer.model_wrapped
        # FOP registers its own dual-gradient hook (counted by its collectives); DDP takes one hook only
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and self.trainer.fop_mode != "fop":
            def hook(state_, bucket):  # noqa: ANN001
                self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
                return allreduce_hook(state_, bucket)

            model.register_comm_hook(None, hook)


def variants(factor_intervals: List[int]) -> List[Tuple[str, str, int, bool, str, Dict[str, Any]]]:
    """``(key, fop_optimizer, factor interval, comm hook, curvature sharding, more arguments)`` of each measured run.

    At factor intervals above 1 FOP runs again with every layer capturing on the interval's first step
    (``fop_stagger_capture=False``, key suffix ``_together``) against the default staggered capture, whose every step
    exchanges capture counts."""
    first = factor_intervals[0]
    plain: Dict[str, Any] = {}
    together = {"fop_stagger_capture": False}
    out = [("adamw", "trainer", 1, True, "replicated", plain)]
    out += [(f"fop_fi{fi}", "fop", fi, True, "replicated", plain) for fi in factor_intervals]
    out += [(f"fop_fi{fi}_together", "fop", fi, True, "replicated", together) for fi in factor_intervals if fi > 1]
    out += [(f"fop_fi{first}_nohook", "fop", first, False, "replicated", plain)]
    out += [(f"fop_fi{fi}_specialists", "fop", fi, True, "specialists", plain) for fi in factor_intervals]
    out += [(f"fop_fi{fi}_specialists_together", "fop", fi, True, "specialists", together)
            for fi in factor_intervals if fi > 1]
    out += [(f"kfac_fi{first}_{sharding}", "kfac", first, True, sharding, plain) for sharding in ("replicated", "specialists")]
    return out


def worker(opts: argparse.Namespace) -> None:
    """One rank of the 2-process communication measurement."""
    import torch.distributed as dist

    out = tempfile.mkdtemp()
    result: Dict[str, float] = {}
    for name, optimizer, fi, hook, sharding, options in variants(opts.factor_intervals):
        extra = {"fop_inverse_interval": opts.inverse_interval} if opts.inverse_interval else {}
        args = make_args(out, optimizer, opts.steps, opts.batch, fi, fop_curvature_sharding=sharding, **extra, **options)
        trainer = FOPTrainer(model=make_model(opts.hidden), args=args, train_dataset=make_data(opts.batch * 2 * opts.steps))
        trainer.use_ddp_comm_hook = hook
        counter = DDPByteCounter(trainer)
        clock = StepClock()
        trainer.add_callback(counter)
        trainer.add_callback(clock)
        trainer.train()
        result[name + "_seconds"] = per_step(clock.times, 3)
        result[name + "_mean_seconds"] = float(np.mean(np.diff(clock.times)[3:]))
        rank, world_size = world()
        opt = trainer.fop_optimizer
        comm = opt.distributor.comm if opt is not None else None  # FOP's gradient and factor traffic
        payload = counter.bytes + (comm.bytes_reduced if comm is not None else 0)
        wire = 2 * (world_size - 1) / world_size * counter.bytes + (comm.wire_bytes if comm is not None else 0)
        result[name] = wire / opts.steps
        result[name + "_payload"] = payload / opts.steps
        result[name + "_ddp"] = counter.bytes / opts.steps
        if comm is not None:  # each rank's cumulative curvature seconds (capture, factors, its eigendecompositions)
            peak, mean = comm.max_and_mean(opt.engine.seconds)
            result[name + "_curv_max"], result[name + "_curv_mean"] = peak / opts.steps, mean / opts.steps
    if rank == 0:
        with open(opts.result, "w") as f:
            json.dump(result, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def communication(opts: argparse.Namespace, nproc: int) -> Dict[str, float]:
    """The worker's results (rank 0) from ``nproc`` processes under torchrun, each with local batch ``opts.batch``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = os.path.join(tempfile.mkdtemp(), "comm.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", __file__,
           "--worker", "--result", result, "--steps", str(opts.steps), "--batch", str(opts.batch),
           "--hidden", str(opts.hidden), "--inverse_interval", str(opts.inverse_interval),
           "--factor_intervals", *map(str, opts.factor_intervals)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(result) as f:
        return json.load(f)


def row_label(key: str, optimizer: str, factor_interval: int, sharding: str) -> str:
    """The table label of a :func:`variants` run."""
    if optimizer == "trainer":
        return "Trainer AdamW (DDP)"
    name = f"K-FAC {sharding}" if optimizer == "kfac" else "FOP specialists" if sharding == "specialists" else "FOP"
    label = f"{name}, factor_interval={factor_interval}"
    if key.endswith("_nohook"):
        label += ", post-backward reduction"
    if key.endswith("_together"):
        label += ", every layer's capture on one step"
    return label


def exposed_rows(comm: Dict[str, float], single: Dict[str, float], rows: List[Tuple[str, str]]) -> List[Tuple[str, float, float, float, float]]:
    """``(label, N-process s, 1-process s, exposed s, exposed / DDP-AdamW's exposed)`` per variant of ``rows``.

    ``comm`` / ``single``: the worker's results with N processes and with 1 (``<key>_seconds``: median seconds per
    step). Variants that only exist with several processes (``nohook``: the post-backward reduction) are left out.
    """
    base = comm["adamw_seconds"] - single["adamw_seconds"]
    out = []
    for key, label in rows:
        if "nohook" in key:  # one process has no reduction path to choose
            continue
        exposed = comm[key + "_seconds"] - single[key + "_seconds"]
        out.append((label, comm[key + "_seconds"], single[key + "_seconds"], exposed, exposed / base))
    return out


def exposed_communication(opts: argparse.Namespace, comm: Dict[str, float], rows: List[Tuple[str, str]]) -> None:
    """Print each variant's exposed communication: its N-process minus its 1-process median seconds per step.

    Same model, same local batch per process, so the difference is what communication (and waiting for the slowest
    rank) adds to a step; in one process FOP splits the local batch into its two sub-batches, as each rank's
    batch is one sub-batch under N processes. ``ratio`` divides by DDP-AdamW's exposed seconds.
    """
    single = communication(opts, 1)
    print(f"\n| exposed communication | {opts.nproc}-process s / step | 1-process s / step | exposed s / step | ratio to AdamW |")
    print("|---|---|---|---|---|")
    for label, many, one, exposed, ratio in exposed_rows(comm, single, rows):
        print(f"| {label} | {many:.4f} | {one:.4f} | {exposed:.4f} | {ratio:.2f} |")


def plain_loop_times(opts: argparse.Namespace, fi: int) -> List[float]:
    """The same FOP steps without the Trainer: halves of each batch as the two sub-batches, clipping at 1.0."""
    model = make_model(opts.hidden)
    model.train()
    args = make_args(tempfile.mkdtemp(), "fop", opts.steps, opts.batch, fi)
    opt = FOP(model, args.fop_config())
    loader = torch.utils.data.DataLoader(
        make_data(opts.batch * opts.steps), batch_size=opts.batch, shuffle=False, collate_fn=default_data_collator
    )
    times = [time.perf_counter()]
    for batch in loader:
        half = batch["labels"].shape[0] // 2
        for index, part in enumerate((slice(0, half), slice(half, None))):
            with opt.sub_batch(index):
                model(pixel_values=batch["pixel_values"][part], labels=batch["labels"][part]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter())
    return times


def trainer_times(opts: argparse.Namespace, fi: int) -> List[float]:
    args = make_args(tempfile.mkdtemp(), "fop", opts.steps, opts.batch, fi)
    clock = StepClock()
    trainer = FOPTrainer(model=make_model(opts.hidden), args=args, train_dataset=make_data(opts.batch * opts.steps),
                         callbacks=[clock])
    trainer.train()
    return clock.times


def per_step(times: List[float], warmup: int) -> float:
    """Median seconds per step after ``warmup`` steps."""
    return float(np.median(np.diff(times)[warmup:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--factor_intervals", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--inverse_interval", type=int, default=0,
                        help="fop_inverse_interval of the communication runs (default: max(5, factor interval))")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timing runs per variant")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the communication measurement")
    parser.add_argument("--only_communication", action="store_true", help="skip the 1-process Trainer overhead part")
    parser.add_argument("--exposed", action="store_true",
                        help="also run 1 process with the same local batch: exposed communication = N-process minus "
                             "1-process seconds per step, per variant, against DDP-AdamW's (issue 8 goal: FOP <= 1.3x)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts)
        return
    torch.set_num_threads(1)
    n_params = sum(p.numel() for p in make_model(opts.hidden).parameters())
    print(f"# FOPTrainer cost: ViT hidden={opts.hidden} ({n_params:,} parameters), batch {opts.batch}, "
          f"{opts.steps} steps, torch {torch.__version__}, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}")
    comm = communication(opts, opts.nproc)
    print(f"\n| {opts.nproc} processes | sent bytes / step per rank | ratio to AdamW | payload bytes / step | DDP bucket bytes "
          "| s / step (median) | s / step (mean) | curvature s / step, max / mean over ranks |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(key, row_label(key, optimizer, fi, sharding)) for key, optimizer, fi, _, sharding, _ in variants(opts.factor_intervals)]
    for key, label in rows:
        curv = f"{comm[key + '_curv_max']:.4f} / {comm[key + '_curv_mean']:.4f}" if key + "_curv_max" in comm else "-"
        print(f"| {label} | {comm[key]:,.0f} | {comm[key] / comm['adamw']:.2f} | {comm[key + '_payload']:,.0f} | "
              f"{comm[key + '_ddp']:,.0f} | {comm[key + '_seconds']:.4f} | {comm[key + '_mean_seconds']:.4f} | {curv} |")
    if opts.exposed:
        exposed_communication(opts, comm, rows)
    if opts.only_communication:
        return
    print("\n| 1 process | plain loop s/step | FOPTrainer s/step | ratio |\n|---|---|---|---|")
    warmup = 3
    for fi in opts.factor_intervals:
        plain, trainer = [], []
        for _ in range(opts.repeats):  # alternate to spread machine noise over both
            plain.append(per_step(plain_loop_times(opts, fi), warmup))
            trainer.append(per_step(trainer_times(opts, fi), warmup))
        p, t = float(np.median(plain)), float(np.median(trainer))
        print(f"| factor_interval={fi} | {p:.4f} | {t:.4f} | {t / p:.3f} |")


if __name__ == "__main__":
    main()
