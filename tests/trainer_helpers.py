"""Tiny models, datasets and arguments shared by the FOPTrainer tests (real libraries, no mocks)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from typing import Any, Callable, Dict, Iterator, List, NoReturn

import numpy as np
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

from hf_fop import FOPTrainingArguments


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    """ViT on 8x8 one-channel images, 2x2... patches of 4x4, 1 layer, hidden 16, 10 classes."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=10,
    )
    return ViTForImageClassification(config)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 with Conv1D layers: vocab 32, 1 layer, width 16, context 16."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def load_digits_arrays() -> tuple:
    """scikit-learn's digits ``(x (1797, 64) float64, y (1797,) int64)``, read from the CSV that scikit-learn ships
    (what ``load_digits(return_X_y=True)`` returns) without importing scikit-learn: ~1 s less per worker process."""
    root = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    raw = np.loadtxt(os.path.join(root, "datasets", "data", "digits.csv.gz"), delimiter=",")
    return raw[:, :-1], raw[:, -1].astype(np.int64)


def digits_dataset(n: int = 256, offset: int = 0) -> Dataset:
    """Real scikit-learn digits as ``pixel_values (1, 8, 8)`` in [0, 1] and ``labels``."""
    x, y = load_digits_arrays()
    x = (x[offset : offset + n] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return Dataset.from_dict({"pixel_values": x, "labels": y[offset : offset + n].astype(np.int64)}).with_format("torch")


def lm_dataset(n: int = 64, length: int = 12, seed: int = 0) -> Dataset:
    """Token sequences with a learnable rule (next token = previous + 1 mod 32); labels = input_ids."""
    g = np.random.default_rng(seed)
    start = g.integers(0, 32, size=(n, 1))
    ids = (start + np.arange(length)[None, :]) % 32
    return Dataset.from_dict({"input_ids": ids, "labels": ids.copy()}).with_format("torch")


def cls_text_dataset(n: int = 64, length: int = 8, seed: int = 0) -> Dataset:
    """Padded token sequences for BERT classification: label = whether token 5 occurs."""
    g = np.random.default_rng(seed)
    ids = g.integers(6, 32, size=(n, length))
    lengths = g.integers(3, length + 1, size=n)
    labels = g.integers(0, 2, size=n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids[labels == 1, 1] = 5
    ids = ids * mask
    return Dataset.from_dict({"input_ids": ids, "attention_mask": mask, "labels": labels}).with_format("torch")


def make_args(output_dir: Any, **overrides: Any) -> FOPTrainingArguments:
    """Small, deterministic CPU arguments (no reporting, no checkpoints unless asked)."""
    values: Dict[str, Any] = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=16,
        max_steps=4,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        fop_damping=1e-2,
        fop_inverse_interval=1,
    )
    values.update(overrides)
    return FOPTrainingArguments(**values)


def single_thread_env() -> Dict[str, str]:
    """Environment for child processes: one BLAS thread, repo root on the path."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def _in_log(frame: Any) -> bool:
    """Whether ``frame`` runs inside ``FOPTrainer.log`` (logging steps may read from the device)."""
    while frame is not None:
        if frame.f_code.co_name == "log" and frame.f_code.co_filename.endswith("trainer.py"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def count_glue_syncs(step: Callable[[], int]) -> Iterator[Dict[int, List[str]]]:
    """Record tensor-to-host reads (``Tensor.item``, ``tolist``, ``bool()``, ...) made from hf_fop/integrations/trainer.py
    and hf_fop/distributed/ outside ``FOPTrainer.log`` (logging steps are exempt), as
    ``{step(): ["file:line method", ...]}`` (file relative to the package). A read inside torch (e.g. in
    ``GradScaler.get_scale``) is attributed to the first caller outside torch. Wraps the real methods."""
    import hf_fop

    package = os.path.dirname(os.path.abspath(hf_fop.__file__))
    distributed = os.path.join(package, "distributed")
    glue = {os.path.join(package, "integrations", "trainer.py")}
    glue |= {os.path.join(distributed, name) for name in os.listdir(distributed) if name.endswith(".py")}
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    syncs: Dict[int, List[str]] = {}
    originals = {name: torch.Tensor.__dict__.get(name) for name in SYNC_METHODS}

    def counting(name: str) -> Callable:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, **k):  # noqa: ANN001, ANN202
            frame = sys._getframe(1)
            while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(torch_dir):
                frame = frame.f_back
            if frame is not None and os.path.abspath(frame.f_code.co_filename) in glue and not _in_log(frame):
                where = f"{os.path.relpath(frame.f_code.co_filename, package)}:{frame.f_lineno} {name}"
                syncs.setdefault(step(), []).append(where)
            return original(self, *a, **k)

        return counted

    for name in SYNC_METHODS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield syncs
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def run_worker(argv: Any = None) -> NoReturn:
    """Entry point of the multi-process tests (started by torchrun / accelerate launch).

    Trains a tiny ViT with FOPTrainer on digits and writes, per rank,
    ``rank{r}.pt``: parameters, curvature state, log history, optimizer step.
    """
    import argparse
    import json

    import torch.distributed as dist

    from hf_fop import FOPTrainer
    from worker_exit import leave_worker

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--optimizer", default="fop")
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--model", choices=["vit", "bert"], default="vit", help="bert: a loss that ignores num_items_in_batch")
    parser.add_argument("--no_cpu", action="store_true", help="leave use_cpu=False (a user script without the CPU flag)")
    parser.add_argument("--factor_interval", type=int, default=1)
    parser.add_argument("--count_syncs", action="store_true", help="record the glue's host syncs per step")
    parser.add_argument("--no_comm_hook", action="store_true", help="FOPTrainer.use_ddp_comm_hook = False")
    parser.add_argument("--stream", action="store_true", help="train on the digits streamed from a local parquet file")
    parser.add_argument(
        "--interleave", action="store_true",
        help="reorder each group of 4 batches as 0, 2, 1, 3 (one process then sees what 2 ranks x 2 micro-batches see)",
    )
    parser.add_argument("--sharding", default="replicated", help="fop_curvature_sharding")
    opts = parser.parse_args(argv)
    save = dict(save_strategy="steps", save_steps=opts.save_steps) if opts.save_steps else {}
    if opts.fsdp:
        save["fsdp"] = "full_shard"
    args = make_args(
        opts.out, max_steps=opts.steps, per_device_train_batch_size=opts.batch, gradient_accumulation_steps=opts.accum,
        train_sampling_strategy="sequential", fop_optimizer=opts.optimizer, fop_inverse_interval=2, fop_momentum=0.5,
        use_cpu=not opts.no_cpu, fop_factor_interval=opts.factor_interval, fop_curvature_sharding=opts.sharding, **save,
    )
    data = digits_dataset(opts.examples) if opts.model == "vit" else cls_text_dataset(opts.examples)
    if opts.interleave:
        b = opts.batch
        order = [i for start in range(0, opts.examples, 4 * b) for k in (0, 2, 1, 3) for i in range(start + k * b, start + (k + 1) * b)]
        data = data.select(order)
    if opts.stream:
        from datasets import load_dataset

        path = os.path.join(opts.out, f"digits-{os.environ.get('RANK', '0')}.parquet")  # one file per process: no race
        data.to_parquet(path)
        data = load_dataset("parquet", data_files=path, split="train", streaming=True).with_format("torch")
    model = tiny_vit() if opts.model == "vit" else tiny_bert(dropout=0.0)
    trainer = FOPTrainer(model=model, args=args, train_dataset=data)
    trainer.use_ddp_comm_hook = not opts.no_comm_hook
    with count_glue_syncs(lambda: trainer.state.global_step) if opts.count_syncs else contextlib.nullcontext({}) as syncs:
        trainer.train(resume_from_checkpoint=opts.resume)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    opt = trainer.fop_optimizer
    pending = opt is not None and opt.distributor.partial
    if opt is not None:
        opt.sync_curvature()  # collective, every rank: local factor averages become the global ones
    record = {
        "pending_before_sync": pending,
        "comm_hook": trainer.fop_reducer is not None and trainer.fop_reducer.hook is not None,
        "world_size": world_size,
        "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "layers": opt.state_dict()["fop"]["layers"] if opt is not None else {},
        "log": json.dumps(trainer.state.log_history),
        "w1": opt.w1 if opt is not None else None,
        "bytes_reduced": opt.distributor.comm.bytes_reduced if opt is not None and opt.distributor.comm is not None else 0,
        "syncs": syncs,
    }
    torch.save(record, os.path.join(opts.out, f"rank{rank}.pt"))
    leave_worker()


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(540, exit=True)  # a hang (e.g. a collective one rank skipped) fails with every thread's stack, before the tests' 600 s timeout (generous: a loaded 2-core machine runs these 2-10x slower)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run_worker()
