"""Data helpers for FOPTrainer users: image-classification batches and streamed datasets.

* :class:`ImageClassificationCollator` turns examples holding PIL images
  (``load_dataset("imagefolder")``, Hub image datasets, streamed or not) into
  ``{"pixel_values": (B, 3, H, W) float32, "labels": (B,) int64}`` with
  ``ViTImageProcessorPil`` (no torchvision needed). Use it with
  ``remove_unused_columns=False`` so the Trainer keeps the image column.
* :func:`load_digits_images`: scikit-learn's 8x8 digits (real data shipped with
  the package) as a ``DatasetDict`` of PIL images, for offline examples.
* :func:`prepare_stream`: a streamed ``IterableDataset`` mapped to model
  inputs in torch format (streaming datasets have no ``with_transform``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, IterableDataset
from PIL import Image as PILImage
from transformers import ViTImageProcessorPil


class ImageClassificationCollator:
    """Collates ``{image_column: PIL image, label_column: int}`` examples into ViT inputs.

    Args:
        processor: an image processor (default ``ViTImageProcessorPil`` at ``image_size``).
        image_size: side of the square output image when ``processor`` is None (pixels).
        image_column / label_column: dataset column names.
        mode: PIL mode images are converted to (``"RGB"``: 3 channels, what Hub ViTs expect).
    """

    def __init__(
        self,
        processor: Optional[Any] = None,
        image_size: int = 224,
        image_column: str = "image",
        label_column: str = "label",
        mode: str = "RGB",
    ) -> None:
        if processor is None:
            if not isinstance(image_size, int) or image_size < 1:
                raise ValueError(f"image_size={image_size!r} is invalid: expected an integer >= 1 (pixels).")
            processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
        self.processor = processor
        self.image_column = image_column
        self.label_column = label_column
        self.mode = mode

    def __call__(self, examples: List[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("ImageClassificationCollator got an empty list of examples.")
        missing = [c for c in (self.image_column, self.label_column) if c not in examples[0]]
        if missing:
            raise KeyError(
                f"ImageClassificationCollator: examples lack column(s) {missing} (they have {sorted(examples[0])}); "
                "set image_column/label_column, and remove_unused_columns=False in the training arguments."
            )
        images = [_to_pil(e[self.image_column]).convert(self.mode) for e in examples]
        batch = self.processor(images, return_tensors="pt")
        labels = torch.tensor([int(e[self.label_column]) for e in examples], dtype=torch.long)
        return {"pixel_values": batch["pixel_values"], "labels": labels}


def _to_pil(image: Any) -> PILImage.Image:
    if isinstance(image, PILImage.Image):
        return image
    if isinstance(image, dict) and image.get("bytes") is not None:  # undecoded datasets Image feature
        import io

        return PILImage.open(io.BytesIO(image["bytes"]))
    return PILImage.fromarray(np.asarray(image))


def load_digits_images(test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn digits (1,797 8x8 gray images, 10 classes) as ``{"train", "test"}`` with PIL images.

    Pixel values 0..16 are scaled to 0..255. The split is stratified by label.
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size={test_size!r} is invalid: expected a fraction in (0, 1).")
    digits = load_digits()
    images = [PILImage.fromarray((img * 255.0 / 16.0).round().astype(np.uint8), mode="L") for img in digits.images]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    ds = Dataset.from_dict({"image": images, "label": digits.target.astype(np.int64).tolist()}, features=features)
    return ds.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def prepare_stream(
    stream: IterableDataset,
    transform: Callable[[Dict[str, List[Any]]], Dict[str, Any]],
    remove_columns: Optional[Sequence[str]] = None,
    batch_size: int = 256,
) -> IterableDataset:
    """``stream.map(transform, batched=True)`` in torch format, dropping ``remove_columns`` (default: all inputs).

    ``transform`` maps a dict of column lists to a dict of model-input lists /
    arrays. Accelerate shards the stream across processes itself: do not also
    call ``split_dataset_by_node``. Train with ``max_steps`` set.
    """
    if not isinstance(stream, IterableDataset):
        raise TypeError(
            f"prepare_stream expects a datasets.IterableDataset (load_dataset(..., streaming=True)), got "
            f"{type(stream).__name__}; use Dataset.with_transform for map-style datasets."
        )
    if remove_columns is None:
        remove_columns = list(stream.column_names or [])
    mapped = stream.map(transform, batched=True, batch_size=batch_size, remove_columns=list(remove_columns))
    return mapped.with_format("torch")
