"""Data helpers for FOPTrainer users: image-classification batches and streamed datasets.

* :class:`ImageClassificationCollator` turns examples holding PIL images
  (``load_dataset("imagefolder")``, Hub image datasets, streamed or not) into
  ``{"pixel_values": (B, 3, H, W) float32, "labels": (B,) int64}`` with
  ``ViTImageProcessorPil`` (no torchvision needed). Use it with
  ``remove_unused_columns=False`` so the Trainer keeps the image column.
* :func:`load_digits_images`: scikit-learn's 8x8 digits (real data shipped with
  the package) as a ``DatasetDict`` of PIL images, for offline examples.
* :func:`load_chatterbot_topics` / :func:`load_chatterbot_dialogs`: real human-written
  dialog text (ChatterBot corpus, BSD-3) for the offline text and language-model examples.
* :func:`prepare_stream`: a streamed ``IterableDataset`` mapped to model
  inputs in torch format (streaming datasets have no ``with_transform``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, IterableDataset, Value
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


# ------------------------------------------------------------- real text shipped in a package
CHATTERBOT_TOPICS = ("food", "history", "literature", "money", "movies", "politics", "science", "sports")
"""Topic files of the ChatterBot English corpus used as classes by the text-classification example."""
CHATTERBOT_EXCLUDED = ("coding", "tech_support")
"""Files left out of the language-modelling corpus: code listings and a large, recently added support log."""


def _chatterbot_conversations(language: str = "english") -> Dict[str, List[List[str]]]:
    """``{file stem: [conversation: [line, ...]]}`` of the ChatterBot corpus (package ``chatterbot-corpus``)."""
    import glob
    import os

    import yaml

    try:
        import chatterbot_corpus
    except ImportError as err:
        raise ImportError(
            "The offline text example needs the ChatterBot corpus: pip install chatterbot-corpus (or pip install -e '.[test]')."
        ) from err
    folder = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", language)
    out: Dict[str, List[List[str]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.yml"))):
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f)
        stem = os.path.splitext(os.path.basename(path))[0]
        out[stem] = [[str(line).strip() for line in conv if str(line).strip()] for conv in content["conversations"]]
    return out


def load_chatterbot_topics(categories: Sequence[str] = CHATTERBOT_TOPICS, test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """Topic classification on the ChatterBot English corpus: ``{"train", "test"}`` with ``text`` and ``label``.

    Source: the ChatterBot dialog corpus (Gunther Cox and contributors, BSD-3-Clause licence), shipped by the PyPI
    package ``chatterbot-corpus``: short human-written dialog lines filed by the corpus authors under a topic
    (``food.yml``, ``sports.yml``...). Each distinct line is an example, its file is the label; a line filed under
    several topics is dropped (ambiguous). The split is stratified by label.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size={test_size!r} is invalid: expected a fraction in (0, 1).")
    corpus = _chatterbot_conversations()
    unknown = sorted(set(categories) - set(corpus))
    if unknown:
        raise ValueError(f"ChatterBot categories {unknown} do not exist; available: {sorted(corpus)}.")
    seen: Dict[str, set] = {}
    for label, name in enumerate(categories):
        for conversation in corpus[name]:
            for line in conversation:
                seen.setdefault(line, set()).add(label)
    rows = sorted((text, next(iter(labels))) for text, labels in seen.items() if len(labels) == 1)
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(categories))})
    ds = Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}, features=features)
    return ds.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def load_chatterbot_dialogs(test_size: float = 0.1, seed: int = 0) -> DatasetDict:
    """The ChatterBot English corpus as language-modelling text: ``{"train", "test"}`` with a ``text`` column.

    One record per conversation (its lines joined by newlines), every topic file except
    :data:`CHATTERBOT_EXCLUDED`. Source and licence: see :func:`load_chatterbot_topics`.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size={test_size!r} is invalid: expected a fraction in (0, 1).")
    corpus = _chatterbot_conversations()
    texts = ["\n".join(conv) for name in sorted(corpus) if name not in CHATTERBOT_EXCLUDED for conv in corpus[name] if conv]
    return Dataset.from_dict({"text": texts}).train_test_split(test_size=test_size, seed=seed)

