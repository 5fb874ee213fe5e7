"""Train a small ViT with FOP in a plain Accelerate loop (no Trainer) on scikit-learn's handwritten digits (offline).

The same task as ``run_image_classification.py`` (the ``FOPTrainer`` example), written
like transformers' ``run_*_no_trainer.py`` scripts. One process (CPU or one GPU):

    python examples/run_image_classification_no_trainer.py --output_dir out/vit_digits_nt

Several processes (FOP gives g1 on even ranks, g2 on odd ranks):

    OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate_cpu_2proc.yaml \\
        examples/run_image_classification_no_trainer.py --cpu --output_dir out/vit_digits_nt_2proc
    accelerate launch --config_file examples/accelerate_multi_gpu.yaml \\
        examples/run_image_classification_no_trainer.py --output_dir out/vit_digits_nt_gpus

``--fop_optimizer kfac`` or ``adamw`` runs the baselines with the same loop. With
``--gradient_accumulation_steps 1`` on one process FOP splits every batch into two
halves (``hf_fop.accelerate_loop.sub_batches``); with 2 or more, the first half of
each accumulation window gives g1. ``--with_tracking`` writes TensorBoard logs
(loss, lr, ``fop/beta`` ...) to ``<output_dir>/runs``. Prints the final test accuracy.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil, get_scheduler

from hf_fop import FOP, FOPConfig
from hf_fop.accelerate_loop import sub_batches
from hf_fop.data import ImageClassificationCollator, load_digits_images
from hf_fop.metrics import Accuracy

_FOP_LOG_KEYS = ("beta_mean", "eta_mean", "s_proj_mean", "kl_base", "kl_cross", "kl_orth", "fallback_steps", "skipped_steps")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="out/vit_digits_no_trainer", help="Checkpoints, TensorBoard logs and the final model.")
    p.add_argument("--per_device_train_batch_size", type=int, default=128, help="Training batch per process and micro-batch.")
    p.add_argument("--per_device_eval_batch_size", type=int, default=256, help="Evaluation batch per process.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step (window).")
    p.add_argument("--learning_rate", type=float, default=0.005, help="Learning rate eta0 of the K-FAC/FOP layers (AdamW's lr with --fop_optimizer adamw).")
    p.add_argument("--fop_optimizer", choices=("fop", "kfac", "adamw"), default="fop", help="Optimizer: FOP, K-FAC, or torch AdamW.")
    p.add_argument("--fop_damping", type=float, default=1e-3, help="Damping lambda of K-FAC/FOP.")
    p.add_argument("--fop_adamw_lr", type=float, default=3e-3, help="AdamW lr of the parameters FOP does not manage (LayerNorm, embeddings).")
    p.add_argument("--fop_inverse_interval", type=int, default=5, help="Steps between eigendecompositions of the factors.")
    p.add_argument("--fop_factor_interval", type=int, default=1, help="Steps between curvature captures.")
    p.add_argument("--weight_decay", type=float, default=0.0, help="Weight decay (every optimizer).")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping of g_avg (0 disables).")
    p.add_argument("--num_train_epochs", type=int, default=60, help="Epochs (unless --max_train_steps is given).")
    p.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    p.add_argument("--lr_scheduler_type", default="cosine", help="transformers.get_scheduler name (linear, cosine, constant...).")
    p.add_argument("--num_warmup_steps", type=int, default=20, help="Warmup optimizer steps.")
    p.add_argument("--checkpointing_steps", default=None, help="Save accelerator state every N steps (an integer), or 'epoch'.")
    p.add_argument("--resume_from_checkpoint", default=None, help="A step_N / epoch_N folder written by --checkpointing_steps.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the model init, the shuffling and dropout.")
    p.add_argument("--with_tracking", action="store_true", help="Log to TensorBoard (accelerator.init_trackers).")
    p.add_argument("--image_size", type=int, default=8, help="Image side (pixels) of the ViT.")
    p.add_argument("--patch_size", type=int, default=2, help="Patch side (pixels).")
    p.add_argument("--hidden_size", type=int, default=64, help="ViT width.")
    p.add_argument("--num_hidden_layers", type=int, default=2, help="ViT depth.")
    p.add_argument("--test_size", type=float, default=0.2, help="Held-out fraction of the digits.")
    p.add_argument("--cpu", action="store_true", help="Train on CPU even when a GPU is present (needed for CPU multi-process runs).")
    p.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (0 keeps torch's default).")
    args = p.parse_args(argv)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "num_train_epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} is invalid: expected an integer >= 1.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps={args.max_train_steps} is invalid: expected an integer >= 1.")
    cs = args.checkpointing_steps
    if cs is not None and cs != "epoch" and not (cs.isdigit() and int(cs) >= 1):
        raise ValueError(f"--checkpointing_steps={cs!r} is invalid: expected an integer >= 1 or 'epoch'.")
    return args


def build_model(args: argparse.Namespace, labels: List[str]) -> ViTForImageClassification:
    """The small from-scratch ViT of ``run_image_classification.py``."""
    config = ViTConfig(
        image_size=args.image_size, patch_size=args.patch_size, num_channels=3, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=4, intermediate_size=2 * args.hidden_size,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={v: k for k, v in enumerate(labels)},
    )
    return ViTForImageClassification(config)


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module, accelerator: Accelerator) -> torch.optim.Optimizer:
    if args.fop_optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    config = FOPConfig(
        lr=args.learning_rate, damping=args.fop_damping, mode=args.fop_optimizer, adamw_lr=args.fop_adamw_lr,
        inverse_interval=args.fop_inverse_interval, factor_interval=args.fop_factor_interval,
        weight_decay=args.weight_decay, adamw_weight_decay=args.weight_decay,
    )
    return FOP(model, config, accelerator=accelerator)


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
    args = parse_args(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.cpu,
        # a seeded sampler: the shuffle order is a function of (seed, epoch), so a resumed run sees the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with="tensorboard" if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "runs")),
    )
    set_seed(args.seed)
    data = load_digits_images(test_size=args.test_size, seed=0)
    labels = [str(n) for n in data["train"].features["label"].names]
    processor = ViTImageProcessorPil(size={"height": args.image_size, "width": args.image_size})
    collator = ImageClassificationCollator(processor)
    train_loader = DataLoader(data["train"], shuffle=True, collate_fn=collator, batch_size=args.per_device_train_batch_size)
    eval_loader = DataLoader(data["test"], collate_fn=collator, batch_size=args.per_device_eval_batch_size)
    model = build_model(args, labels)
    optimizer = build_optimizer(args, model, accelerator)

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
    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    if args.with_tracking:
        accelerator.init_trackers("run_image_classification_no_trainer", {k: v for k, v in vars(args).items() if v is not None})
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
            start_epoch, skip_batches = divmod(batches, len(train_loader))
        else:
            raise ValueError(f"--resume_from_checkpoint={args.resume_from_checkpoint!r}: expected a step_N or epoch_N folder.")

    model.train()
    for epoch in range(start_epoch, num_epochs):
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
    accelerator.print(
        f"test accuracy: {accuracy:.4f} ({len(data['test'])} images, optimizer={args.fop_optimizer}, steps={completed}, "
        f"processes={accelerator.num_processes})"
    )
    accelerator.end_training()
    if torch.distributed.is_initialized():  # clean gloo shutdown under torchrun / accelerate launch
        torch.distributed.destroy_process_group()
    return accuracy


if __name__ == "__main__":
    main(sys.argv[1:])
