"""The image-classification task of the two image examples (``run_image_classification.py`` with FOPTrainer and
``run_image_classification_no_trainer.py`` with a plain Accelerate loop): the same data, model and preprocessing.

:func:`load_task` reads the splits (:func:`fop_examples.common.load_splits`: scikit-learn digits offline, or
``--dataset_name`` / ``--train_file`` / ``--validation_file``, map-style or streamed), checks the columns and labels,
builds the model (``--model_name_or_path``, or a small ViT from scratch) and maps the images to
``{"pixel_values": (3, H, W) float32, "labels": int64}`` records (``with_transform`` for map-style data, a batched
``.map`` for streams), ready for ``transformers.default_data_collator``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
from datasets import Image
from PIL import Image as PILImage
from transformers import AutoModelForImageClassification, PreTrainedModel, ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from .data import load_digits_images
from .common import (
    AnyDataset,
    DataArguments,
    LabelEncoder,
    ModelArguments,
    column_names,
    from_pretrained,
    label_names,
    load_splits,
    preprocess,
    require_columns,
)


@dataclass
class ImageArguments:
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels (class ids or names)."})
    image_size: int = field(default=8, metadata={"help": "Image side (pixels) of the from-scratch ViT."})
    patch_size: int = field(default=2, metadata={"help": "Patch side (pixels) of the from-scratch ViT."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the from-scratch ViT."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Depth of the from-scratch ViT."})


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


def build_model(model_args: ModelArguments, image: ImageArguments, labels: List[str]) -> Tuple[PreTrainedModel, Any]:
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


def load_task(
    model_args: ModelArguments, data: DataArguments, image: ImageArguments, seed: int
) -> Tuple[PreTrainedModel, AnyDataset, AnyDataset]:
    """``(model, train, evaluation)``: the model and the preprocessed splits (see module docstring)."""
    train, evaluation = load_splits(data, seed, default=load_digits_images, stratify_column=image.label_column)
    require_columns(train, {"image_column": image.image_column, "label_column": image.label_column})
    names = label_names(train, image.label_column, data.class_names, data.streaming, data.num_labels)
    model, processor = build_model(model_args, image, names)
    encode = LabelEncoder(names, image.label_column)

    def transform(batch: Dict[str, List[Any]], indices: List[int]) -> Dict[str, Any]:
        images = [decode_image(v, i).convert("RGB") for v, i in zip(batch[image.image_column], indices)]
        return {
            "pixel_values": processor(images, return_tensors="np")["pixel_values"],
            "labels": np.array([encode(v, i) for v, i in zip(batch[image.label_column], indices)], dtype=np.int64),
        }

    def prepare(split: AnyDataset) -> AnyDataset:
        split = split.cast_column(image.image_column, Image(decode=False))  # decoded by transform (errors name the record)
        if data.streaming:
            return preprocess(split, transform, remove_columns=column_names(split)).with_format("torch")
        with_index = split.map(lambda b, idx: {"record_index": idx}, batched=True, with_indices=True)
        return with_index.with_transform(lambda b: transform({k: b[k] for k in b if k != "record_index"}, b["record_index"]))

    return model, prepare(train), prepare(evaluation)

