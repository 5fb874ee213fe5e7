"""Image classification with FOPTrainer: a small ViT on scikit-learn's handwritten digits (offline), or a Hub model/dataset.

Default (no network, about 1-3 minutes on a 2-core CPU; the main job of ``scripts/demo.sh``):

    python examples/run_image_classification.py --output_dir out/vit_digits

Data: scikit-learn's digits (1,797 8x8 handwritten digits, UCI, shipped with scikit-learn) unless
``--dataset_name`` (Hub id or local folder, e.g. an imagefolder) or ``--train_file`` / ``--validation_file``
(an image folder, or parquet/json with an image column) is given. ``--model_name_or_path`` (Hub id or local
folder) fine-tunes a pretrained image classifier. ``--streaming`` reads the data as a stream (needs
``--max_steps``). Every TrainingArguments flag and every FOP knob is a flag (``--fop_damping 3e-3``,
``--fop_optimizer kfac|trainer`` for the baselines). Two CPU processes:

    OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate_cpu_2proc.yaml \\
        examples/run_image_classification.py --output_dir out/vit_digits_2proc

Prints ``final accuracy: ...``; TensorBoard logs (``train/fop/beta``...) go to ``<output_dir>/runs``.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
from datasets import Image
from PIL import Image as PILImage
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from hf_fop import FOPTrainer, FOPTrainingArguments
from hf_fop.data import load_digits_images
from hf_fop.metrics import compute_classification_metrics
from hf_fop.scripts_common import (  # noqa: I001 (one shared module for every example)
    COMMON_DEFAULTS,
    DataArguments,
    LabelEncoder,
    ModelArguments,
    from_pretrained,
    column_names,
    label_names,
    load_splits,
    parse_args,
    preprocess,
    require_columns,
    train_and_report,
)


@dataclass
class ImageArguments:
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels (class ids or names)."})
    image_size: int = field(default=8, metadata={"help": "Image side (pixels) of the from-scratch ViT."})
    patch_size: int = field(default=2, metadata={"help": "Patch side (pixels) of the from-scratch ViT."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the from-scratch ViT."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Depth of the from-scratch ViT."})


DEFAULTS: Dict[str, Any] = dict(
    COMMON_DEFAULTS, output_dir="out/vit_digits", per_device_train_batch_size=128, per_device_eval_batch_size=256,
    num_train_epochs=60, learning_rate=0.005, fop_adamw_lr=3e-3, fop_damping=1e-3, warmup_steps=20,
    fop_inverse_interval=5, logging_steps=10, eval_strategy="epoch", remove_unused_columns=False,
)


def decode_image(value: Any, index: int) -> PILImage.Image:
    """A PIL image from a datasets Image value (PIL, ``{"bytes", "path"}``) or an array; names the record if unreadable."""
    try:
        if isinstance(value, PILImage.Image):
            return value
        if isinstance(value, dict):
            source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
            image = PILImage.open(source)
            image.load()
            return image
        return PILImage.fromarray(np.asarray(value))
    except Exception as err:
        where = value.get("path") if isinstance(value, dict) and value.get("path") else "in memory"
        raise ValueError(f"Record {index}: unreadable image ({where}): {err}") from None


def build_model(model_args: ModelArguments, image: ImageArguments, labels: List[str]):
    """``(model, processor)``: the pretrained classifier of ``--model_name_or_path``, or a small ViT from scratch."""
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if model_args.model_name_or_path is not None:
        model = from_pretrained(
            AutoModelForImageClassification, model_args.model_name_or_path, num_labels=len(labels),
            id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True,
        )
        processor = from_pretrained(ViTImageProcessorPil, model_args.model_name_or_path)
        return model, processor
    config = ViTConfig(
        image_size=image.image_size, patch_size=image.patch_size, num_channels=3, hidden_size=image.hidden_size,
        num_hidden_layers=image.num_hidden_layers, num_attention_heads=4, intermediate_size=2 * image.hidden_size,
        num_labels=len(labels), id2label=id2label, label2id=label2id,
    )
    processor = ViTImageProcessorPil(size={"height": image.image_size, "width": image.image_size})
    return ViTForImageClassification(config), processor


def build(argv: Optional[List[str]] = None):
    """Parse the arguments and build ``(trainer, eval_dataset, args)``."""
    model_args, data, image, args = parse_args((ModelArguments, DataArguments, ImageArguments, FOPTrainingArguments), DEFAULTS, argv)
    train, evaluation = load_splits(data, args.seed, default=load_digits_images, stratify_column=image.label_column)
    require_columns(train, {"image_column": image.image_column, "label_column": image.label_column})
    names = label_names(train, image.label_column, data.class_names, data.streaming)
    model, processor = build_model(model_args, image, names)
    encode = LabelEncoder(names, image.label_column)

    def transform(batch: Dict[str, List[Any]], indices: List[int]) -> Dict[str, Any]:
        images = [decode_image(v, i).convert("RGB") for v, i in zip(batch[image.image_column], indices)]
        return {
            "pixel_values": processor(images, return_tensors="np")["pixel_values"],
            "labels": np.array([encode(v, i) for v, i in zip(batch[image.label_column], indices)], dtype=np.int64),
        }

    def prepare(split):
        split = split.cast_column(image.image_column, Image(decode=False))  # decoded by transform (errors name the record)
        if data.streaming:
            return preprocess(split, transform, remove_columns=column_names(split)).with_format("torch")
        with_index = split.map(lambda b, idx: {"record_index": idx}, batched=True, with_indices=True)
        return with_index.with_transform(lambda b: transform({k: b[k] for k in b if k != "record_index"}, b["record_index"]))

    trainer = FOPTrainer(
        model=model, args=args, train_dataset=prepare(train), eval_dataset=prepare(evaluation),
        compute_metrics=compute_classification_metrics,
    )
    return trainer, trainer.eval_dataset, args


def main(argv: Optional[List[str]] = None) -> float:
    """Train and evaluate; returns the final accuracy."""
    trainer, evaluation, _ = build(argv)
    return train_and_report(trainer, evaluation, "accuracy", "images")["final_accuracy"]


if __name__ == "__main__":
    main(sys.argv[1:] if len(sys.argv) > 1 else None)
