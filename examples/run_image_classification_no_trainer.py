"""Image classification with FOP in a plain Accelerate loop (no Trainer): a small ViT on scikit-learn's digits
(offline), or a Hub / local model and dataset.

The same task as ``run_image_classification.py`` (the ``FOPTrainer`` example; the data, model and preprocessing
are shared through ``fop_examples.image_classification``), written like transformers' ``run_*_no_trainer.py`` scripts.
One process (CPU or one GPU):

    python examples/run_image_classification_no_trainer.py --output_dir out/vit_digits_nt

Several processes (FOP gives g1 on even ranks, g2 on odd ranks):

    OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate_cpu_2proc.yaml \\
        examples/run_image_classification_no_trainer.py --cpu --output_dir out/vit_digits_nt_2proc
    accelerate launch --config_file examples/accelerate_multi_gpu.yaml \\
        examples/run_image_classification_no_trainer.py --output_dir out/vit_digits_nt_gpus

Data: scikit-learn's digits unless ``--dataset_name`` (Hub id or local folder, e.g. an imagefolder) or
``--train_file`` / ``--validation_file`` (an image folder, or parquet/json with an image column) is given;
``--streaming`` reads it as a stream (``--shuffle_buffer_size``; needs ``--max_train_steps``);
``--max_train_samples`` keeps the first N training examples. ``--model_name_or_path`` (Hub id or local folder)
fine-tunes a pretrained image classifier. ``--fop_optimizer kfac`` or ``adamw`` runs the baselines with the same
loop. With ``--gradient_accumulation_steps 1`` on one process FOP splits every batch into two halves
(``hf_fop.integrations.accelerate.sub_batches``); with 2 or more, the first ceil(n/2) micro-batches of each window give g1.
``--with_tracking`` writes TensorBoard logs (loss, lr, ``fop/beta`` ...) to ``<output_dir>/runs``. Prints the final
test accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import HfArgumentParser, default_data_collator, get_scheduler

from hf_fop import FOP, FOPConfig
from hf_fop import attach_accelerate, sub_batches
from fop_examples.image_classification import ImageArguments, load_task
from fop_examples.metrics import Accuracy
from fop_examples.common import DataArguments, ModelArguments, check_data_args

_FOP_LOG_KEYS = ("beta_mean", "eta_mean", "s_proj_mean", "kl_base", "kl_cross", "kl_orth", "fallback_steps", "skipped_steps")


def parse_args(argv: Optional[List[str]] = None) -> Tuple[ModelArguments, DataArguments, ImageArguments, argparse.Namespace]:
    """The model, data and image flags of ``run_image_classification.py`` (the same dataclasses) plus this loop's."""
    p = HfArgumentParser((ModelArguments, DataArguments, ImageArguments), description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="out/vit_digits_no_trainer", help="Checkpoints, TensorBoard logs and the final model.")
    p.add_argument("--per_device_train_batch_size", type=int, default=128, help="Training batch per process and micro-batch.")
    p.add_argument("--per_device_eval_batch_size", type=int, default=256, help="Evaluation batch per process.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step (window).")
    p.add_argument("--learning_rate", type=float, default=0.005, help="Learning rate eta0 of the K-FAC/FOP layers (AdamW's lr with --fop_optimizer adamw).")
    p.add_argument("--fop_optimizer", choices=("fop", "kfac", "adamw"), default="fop", help="Optimizer: FOP, K-FAC, or torch AdamW.")
    p.add_argument("--fop_damping", type=float, default=3e-3, help="Damping lambda of K-FAC/FOP (as run_image_classification.py).")
    p.add_argument("--fop_adamw_lr", type=float, default=3e-3, help="AdamW lr of the parameters FOP does not manage (LayerNorm, embeddings).")
    p.add_argument("--fop_inverse_interval", type=int, default=5, help="Steps between eigendecompositions of the factors.")
    p.add_argument("--fop_momentum", type=float, default=0.0, help="Heavy-ball momentum of K-FAC/FOP (the lr and damping here were tuned without it).")
    p.add_argument("--fop_factor_interval", type=int, default=1, help="Steps between curvature captures.")
    p.add_argument("--weight_decay", type=float, default=0.0, help="Weight decay (every optimizer).")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping of g_avg (0 disables).")
    p.add_argument("--num_train_epochs", type=int, default=60, help="Epochs (unless --max_train_steps is given).")
    p.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs; required with --streaming.")
    p.add_argument("--lr_scheduler_type", default="cosine", help="transformers.get_scheduler name (linear, cosine, constant...).")
    p.add_argument("--num_warmup_steps", type=int, default=20, help="Warmup optimizer steps.")
    p.add_argument("--checkpointing_steps", default=None, help="Save accelerator state every N steps (an integer), or 'epoch'.")
    p.add_argument("--resume_from_checkpoint", default=None, help="A step_N / epoch_N folder written by --checkpointing_steps.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the model init, the shuffling and dropout.")
    p.add_argument("--with_tracking", action="store_true", help="Log to TensorBoard (accelerator.init_trackers).")
    p.add_argument("--cpu", action="store_true", help="Train on CPU even when a GPU is present (needed for CPU multi-process runs).")
    model_args, data, image, args = p.parse_args_into_dataclasses(args=argv)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "num_train_epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} is invalid: expected an integer >= 1.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps={args.max_train_steps} is invalid: expected an integer >= 1.")
    check_data_args(data, args.max_train_steps or 0, "max_train_steps")
    cs = args.checkpointing_steps
    if cs is not None and cs != "epoch" and not (cs.isdigit() and int(cs) >= 1):
        raise ValueError(f"--checkpointing_steps={cs!r} is invalid: expected an integer >= 1 or 'epoch'.")
    if cs == "epoch" and data.streaming:
        raise ValueError("--checkpointing_steps=epoch needs epochs: a streamed dataset has none; give a number of steps.")
    return model_args, data, image, args


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module, accelerator: Accelerator) -> torch.optim.Optimizer:
    if args.fop_optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    config = FOPConfig(
        lr=args.learning_rate, damping=args.fop_damping, mode=args.fop_optimizer, adamw_lr=args.fop_adamw_lr,
        inverse_interval=args.fop_inverse_interval, factor_interval=args.fop_factor_interval, momentum=args.fop_momentum,
        weight_decay=args.weight_decay, adamw_weight_decay=args.weight_decay,
    )
    opt = FOP(model, config)
    attach_accelerate(opt, model, accelerator)
    return opt


def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Accuracy over ``loader`` gathered from every process (duplicates of the last batch dropped)."""
    model.eval()
    metric = Accuracy()
    for batch in loader:
        with torch.no_grad():
            logits = model(**batch).logits
        predictions, references = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        metric.add_batch(predictions=predictions.cpu(), references=references.cpu())
    model.train()
    return float(metric.compute()["accuracy"])


def main(argv: Optional[List[str]] = None) -> float:
    model_args, data, image, args = parse_args(argv)
    if model_args.num_threads > 0:
        torch.set_num_threads(model_args.num_threads)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.cpu,
        # a seeded sampler: the shuffle order is a function of (seed, epoch), so a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with="tensorboard" if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "runs")),
    )
    set_seed(args.seed)
    model, train, evaluation = load_task(model_args, data, image, args.seed)
    # a stream is shuffled by its buffer (--shuffle_buffer_size) and sharded across processes by accelerate
    train_loader = DataLoader(
        train, shuffle=not data.streaming, collate_fn=default_data_collator, batch_size=args.per_device_train_batch_size
    )
    eval_loader = DataLoader(evaluation, collate_fn=default_data_collator, batch_size=args.per_device_eval_batch_size)
    optimizer = build_optimizer(args, model, accelerator)

    if data.streaming:
        max_train_steps = args.max_train_steps
    else:
        updates_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    # accelerate steps a prepared scheduler once per process per optimizer step (transformers' scripts do the same)
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    if data.streaming:  # epochs are passes over the stream, as many as max_train_steps needs
        updates_per_epoch, epochs = 0, itertools.count()
    else:
        updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
        epochs = iter(range(math.ceil(max_train_steps / updates_per_epoch)))
    if args.with_tracking:
        config = {**asdict(model_args), **asdict(data), **asdict(image), **vars(args)}
        accelerator.init_trackers(
            "run_image_classification_no_trainer", {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        )
    fop = getattr(optimizer, "optimizer", None)
    fop = fop if isinstance(fop, FOP) else None

    completed, start_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        accelerator.print(f"Resumed from checkpoint: {args.resume_from_checkpoint}")
        accelerator.load_state(args.resume_from_checkpoint)
        name = os.path.basename(os.path.normpath(args.resume_from_checkpoint))
        if name.startswith("epoch_"):
            start_epoch = int(name[len("epoch_") :]) + 1
            completed = start_epoch * updates_per_epoch
        elif name.startswith("step_"):
            completed = int(name[len("step_") :])
            batches = completed * args.gradient_accumulation_steps
            # a stream's length is unknown: its batches already used are skipped within the first pass
            start_epoch, skip_batches = (0, batches) if data.streaming else divmod(batches, len(train_loader))
        else:
            raise ValueError(f"--resume_from_checkpoint={args.resume_from_checkpoint!r}: expected a step_N or epoch_N folder.")

    model.train()
    for epoch in itertools.islice(epochs, start_epoch, None):
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip_batches) if epoch == start_epoch and skip_batches else train_loader
        window_loss = 0.0
        for batch in loader:
            with accelerator.accumulate(model):
                for piece in sub_batches(optimizer, batch):
                    loss = model(**piece).loss
                    accelerator.backward(loss)
                    share = len(piece["labels"]) / len(batch["labels"])
                    window_loss += loss.detach().item() * share / args.gradient_accumulation_steps
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            completed += 1
            if args.with_tracking:
                logs: Dict[str, Any] = {"train/loss": window_loss, "train/learning_rate": scheduler.get_last_lr()[0]}
                if fop is not None:
                    diag = fop.diagnostics()
                    logs.update({f"train/fop/{k}": diag[k] for k in _FOP_LOG_KEYS if k in diag})
                accelerator.log(logs, step=completed)
            window_loss = 0.0
            if args.checkpointing_steps not in (None, "epoch") and completed % int(args.checkpointing_steps) == 0:
                accelerator.save_state(os.path.join(args.output_dir, f"step_{completed}"))
            if completed >= max_train_steps:
                break
        if args.checkpointing_steps == "epoch":
            accelerator.save_state(os.path.join(args.output_dir, f"epoch_{epoch}"))
        if completed >= max_train_steps:
            break
        accuracy = evaluate(model, eval_loader, accelerator)
        accelerator.print(f"epoch {epoch}: eval accuracy {accuracy:.4f} (step {completed})")
        if args.with_tracking:
            accelerator.log({"eval/accuracy": accuracy}, step=completed)

    accuracy = evaluate(model, eval_loader, accelerator)
    if args.with_tracking:
        accelerator.log({"eval/accuracy": accuracy}, step=completed)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output_dir)
    images = f"{len(evaluation)} images" if not data.streaming else "streamed images"
    accelerator.print(
        f"test accuracy: {accuracy:.4f} ({images}, optimizer={args.fop_optimizer}, steps={completed}, "
        f"processes={accelerator.num_processes})"
    )
    accelerator.end_training()
    if torch.distributed.is_initialized():  # clean gloo shutdown under torchrun / accelerate launch
        torch.distributed.destroy_process_group()
    return accuracy


if __name__ == "__main__":
    main(sys.argv[1:])
