"""A plain Accelerate training loop with FOP (no Trainer), shared by the tests; also a torchrun worker.

The loop is the README's "Quick start: your own Accelerate loop", optionally
with gradient clipping (``clip=True``: the tests see that clipping acts on ``g_avg``).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, NoReturn, Optional

import torch
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader

from hf_fop import FOP, FOPConfig
from hf_fop.integrations.accelerate import attach_accelerate, sub_batches
from trainer_helpers import digits_dataset, tiny_vit
from worker_exit import leave_worker

CONFIG = dict(lr=0.05, damping=1e-2, inverse_interval=2, momentum=0.5)
MAX_GRAD_NORM = 0.1  # small enough that clipping acts on every step of the tests


def accelerate_loop(
    accelerator: Accelerator,
    config: FOPConfig,
    batch: int,
    steps: int,
    examples: int = 96,
    checkpoint: Optional[str] = None,
    save_at: int = 0,
    resume: Optional[str] = None,
    clip: bool = False,
    scale: Optional[float] = None,
    data: Any = None,
    seed: Optional[int] = None,
    model_fn: Callable[[], torch.nn.Module] = tiny_vit,
) -> Dict[str, Any]:
    """Train ``model_fn()`` (on digits by default) for ``steps`` optimizer steps; returns the parameters and FOP.

    ``save_at``: ``accelerator.save_state(checkpoint)`` after that many steps.
    ``resume``: ``accelerator.load_state(resume)`` first, skipping the batches already used.
    ``scale``: a CPU ``GradScaler`` with this initial scale (what ``mixed_precision="fp16"`` sets up on a GPU).
    ``clip``: ``accelerator.clip_grad_norm_(..., MAX_GRAD_NORM)`` before each step.
    ``data``: a dataset instead of ``digits_dataset(examples)``.
    ``seed``: ``torch.manual_seed(seed)`` just before the training loop (random draws: mc Fisher).
    ``model_fn``: builds the model (default ``tiny_vit``).
    """
    if scale is not None:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    model = model_fn()
    opt = FOP(model, config)
    attach_accelerate(opt, model, accelerator)
    loader = DataLoader(digits_dataset(examples) if data is None else data, batch_size=batch, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    communicated = []
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # count the gradient buckets DDP all-reduces

        def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]  (DDP checks real annotations only)
            communicated.append(bucket.buffer().numel())
            return allreduce_hook(None, bucket)

        model.register_comm_hook(None, counting_allreduce)
    done = 0
    if resume is not None:
        accelerator.load_state(resume)
        done = opt.optimizer.global_step
        loader = accelerator.skip_first_batches(loader, done * accelerator.gradient_accumulation_steps)
    model.train()
    if seed is not None:
        torch.manual_seed(seed)
    while done < steps:
        for inputs in loader:
            with accelerator.accumulate(model):
                for piece in sub_batches(opt, inputs):
                    loss = model(**piece).loss
                    accelerator.backward(loss)
                if accelerator.sync_gradients and clip:
                    accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                done += 1
                if done == save_at:
                    accelerator.save_state(checkpoint)
                    accelerator.wait_for_everyone()
                if done == steps:
                    break
    fop = opt.optimizer
    fop.sync_curvature()  # collective: the full curvature state (ranks' factors averaged), as a checkpoint holds it
    return {
        "params": {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()},
        "layers": fop.state_dict()["fop"]["layers"],
        "counters": dict(fop.counters),
        "global_step": fop.global_step,
        "w1": fop.w1,
        "ddp_allreduced": sum(communicated),
    }


def run_worker() -> NoReturn:
    """torchrun entry: the loop on every rank, ``rank{r}.pt`` written per rank."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="fop:1", help="comma-separated MODE:ACCUM runs, one after the other")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resume", action="store_true",
                        help="also: FOP with curvature specialists 4 steps vs 2 steps, save_state, load_state, 2 more")
    opts = parser.parse_args()
    record: Dict[str, Any] = {}
    for run in opts.runs.split(","):
        mode, accum = run.split(":")
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=int(accum))  # process group already up: reused
        record[run] = accelerate_loop(accelerator, FOPConfig(mode=mode, **CONFIG), opts.batch, opts.steps)
    record["world_size"] = accelerator.num_processes
    if opts.resume:  # with curvature specialists: save_state's pre-hook gathers the owners' state on every rank
        config = FOPConfig(mode="fop", curvature_sharding="specialists", **CONFIG)
        ckpt = os.path.join(opts.out, "ckpt")
        # The uninterrupted run saves too: under several processes save_state averages the ranks' local factor
        # running sums (hf_fop.distributed.ReplicatedCurvature), which rounds differently from averaging them later.
        full_ckpt = os.path.join(opts.out, "ckpt_full")
        record["full"] = accelerate_loop(Accelerator(cpu=True), config, opts.batch, 4, checkpoint=full_ckpt, save_at=2)
        accelerate_loop(Accelerator(cpu=True), config, opts.batch, 2, checkpoint=ckpt, save_at=2)
        record["resumed"] = accelerate_loop(Accelerator(cpu=True), config, opts.batch, 4, resume=ckpt)
    torch.save(record, os.path.join(opts.out, f"rank{accelerator.process_index}.pt"))
    leave_worker()


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(540, exit=True)  # a hang (e.g. a collective one rank skipped) fails with every thread's stack, before the test's 600 s timeout
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run_worker()
