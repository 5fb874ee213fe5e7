"""Train a small ViT with FOPTrainer on scikit-learn's handwritten digits (offline), or fine-tune a Hub ViT.

Default (no network, about 1-3 minutes on a 2-core CPU):

    python examples/train_vit_digits.py --output_dir out/vit_digits

Every TrainingArguments flag and every FOP knob is a CLI flag (``--fop_damping 3e-3``,
``--fop_optimizer kfac`` or ``trainer`` for the baselines, ``--learning_rate``, ``--max_steps``...).
With ``--model_name_or_path`` (Hub id or local folder) a pretrained image classifier is
fine-tuned (``from_pretrained``); with ``--dataset_name`` (Hub id or local folder, e.g. an
imagefolder) that dataset replaces the digits. Two CPU processes:

    OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate_cpu_2proc.yaml \
        examples/train_vit_digits.py --output_dir out/vit_digits_2proc

TensorBoard logs (``train/fop/beta`` etc.) go to ``<output_dir>/runs``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoModelForImageClassification,
    HfArgumentParser,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from hf_fop import FOPTrainer, FOPTrainingArguments, parse_fop_args
from hf_fop.data import ImageClassificationCollator, load_digits_images
from hf_fop.metrics import compute_accuracy


@dataclass
class ScriptArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Hub id or local folder of a pretrained image classifier to fine-tune; default: a small ViT from scratch."}
    )
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Hub id or local folder of an image-classification dataset; default: scikit-learn digits."}
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Configuration name of --dataset_name."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the integer labels."})
    test_size: float = field(default=0.2, metadata={"help": "Held-out fraction when the dataset has no test split."})
    image_size: int = field(default=8, metadata={"help": "Image side (pixels) of the from-scratch ViT."})
    patch_size: int = field(default=2, metadata={"help": "Patch side (pixels) of the from-scratch ViT."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the from-scratch ViT."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Depth of the from-scratch ViT."})
    num_threads: int = field(
        default=1, metadata={"help": "torch CPU threads (a tiny model runs fastest on one; 0 keeps torch's default)."}
    )


def load_data(script: ScriptArguments) -> Tuple[DatasetDict, list]:
    """``{"train", "test"}`` splits and the label names."""
    if script.dataset_name is None:
        data = load_digits_images(test_size=script.test_size, seed=0)
    else:
        data = load_dataset(script.dataset_name, script.dataset_config_name)
        if "test" not in data:
            split = "validation" if "validation" in data else None
            data = DatasetDict(train=data["train"], test=data[split]) if split else data["train"].train_test_split(
                test_size=script.test_size, seed=0, stratify_by_column=script.label_column
            )
    feature = data["train"].features[script.label_column]
    names = list(feature.names) if hasattr(feature, "names") else sorted(set(data["train"][script.label_column]))
    return data, [str(n) for n in names]


def build_model(script: ScriptArguments, labels: list):
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if script.model_name_or_path is not None:
        model = AutoModelForImageClassification.from_pretrained(
            script.model_name_or_path, num_labels=len(labels), id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True,
        )
        processor = ViTImageProcessorPil.from_pretrained(script.model_name_or_path)
        return model, processor
    config = ViTConfig(
        image_size=script.image_size, patch_size=script.patch_size, num_channels=3, hidden_size=script.hidden_size,
        num_hidden_layers=script.num_hidden_layers, num_attention_heads=4, intermediate_size=2 * script.hidden_size,
        num_labels=len(labels), id2label=id2label, label2id=label2id,
    )
    processor = ViTImageProcessorPil(size={"height": script.image_size, "width": script.image_size})
    return ViTForImageClassification(config), processor


def main(argv: Optional[list] = None) -> float:
    parser = HfArgumentParser((ScriptArguments, FOPTrainingArguments))
    parser.set_defaults(
        output_dir="out/vit_digits", per_device_train_batch_size=128, per_device_eval_batch_size=256,
        num_train_epochs=60, learning_rate=0.005, fop_adamw_lr=3e-3, fop_damping=1e-3, warmup_steps=20,
        lr_scheduler_type="cosine", fop_inverse_interval=5, logging_steps=10, eval_strategy="epoch",
        save_strategy="no", report_to=["tensorboard"], remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, seed=0,
    )
    script, args = parse_fop_args(parser, args=argv)  # bad fop_* values: one argparse error line
    if script.num_threads > 0:
        torch.set_num_threads(script.num_threads)
    data, labels = load_data(script)
    model, processor = build_model(script, labels)
    trainer = FOPTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=ImageClassificationCollator(processor, image_column=script.image_column, label_column=script.label_column),
        compute_metrics=compute_accuracy,
    )
    trainer.train()
    accuracy = trainer.evaluate(data["test"], metric_key_prefix="test")["test_accuracy"]
    if trainer.is_world_process_zero():
        print(f"test accuracy: {accuracy:.4f} ({len(data['test'])} images, optimizer={args.fop_optimizer})")
    if torch.distributed.is_initialized():  # clean gloo shutdown under torchrun / accelerate launch
        torch.distributed.destroy_process_group()
    return accuracy


if __name__ == "__main__":
    main(sys.argv[1:] if len(sys.argv) > 1 else None)
