"""Data helpers: the image collator, the digits images, and streamed datasets feeding FOPTrainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, load_dataset
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification

from hf_fop import FOPTrainer
from fop_examples.data import ImageClassificationCollator, load_digits_images, prepare_stream
from trainer_helpers import lm_dataset, make_args, tiny_gpt2


def test_collator_normalises_and_converts_to_rgb():
    pixels = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    examples = [{"image": Image.fromarray(pixels, mode="L"), "label": 3}, {"image": pixels, "label": 7}]
    batch = ImageClassificationCollator(image_size=8)(examples)
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    expected = torch.tensor(pixels / 255.0 * 2.0 - 1.0, dtype=torch.float32)  # ViT mean = std = 0.5
    torch.testing.assert_close(batch["pixel_values"][0, 1], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch["pixel_values"][1], batch["pixel_values"][0])
    assert batch["labels"].tolist() == [3, 7]


def test_collator_errors_name_the_fix():
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        ImageClassificationCollator(image_size=8)([{"pixel_values": 0, "label": 1}])
    with pytest.raises(ValueError, match="image_size"):
        ImageClassificationCollator(image_size=0)


def test_digits_images_split():
    ds = load_digits_images(test_size=0.25, seed=0)
    assert len(ds["train"]) + len(ds["test"]) == 1797
    first = ds["train"][0]
    assert first["image"].size == (8, 8) and 0 <= first["label"] < 10
    assert np.asarray(first["image"]).max() <= 255
    with pytest.raises(ValueError, match="test_size"):
        load_digits_images(test_size=1.5)


def _tiny_rgb_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=10)
    return ViTForImageClassification(config)


def test_streamed_parquet_images_train_with_fop(tmp_path):
    load_digits_images()["train"].select(range(96)).to_parquet(str(tmp_path / "digits.parquet"))
    stream = load_dataset("parquet", data_files=str(tmp_path / "digits.parquet"), split="train", streaming=True)
    args = make_args(tmp_path / "out", max_steps=3, remove_unused_columns=False)
    trainer = FOPTrainer(model=_tiny_rgb_vit(), args=args, train_dataset=stream,
                         data_collator=ImageClassificationCollator(image_size=8))
    trainer.train()
    assert trainer.fop_optimizer.global_step == 3
    assert all("fop/beta" in h for h in trainer.state.log_history if "loss" in h)


def test_streamed_json_tokens_train_with_fop(tmp_path):
    lm_dataset(64).with_format(None).to_json(str(tmp_path / "tokens.jsonl"))
    stream = load_dataset("json", data_files=str(tmp_path / "tokens.jsonl"), split="train", streaming=True)
    stream = prepare_stream(stream, lambda b: {"input_ids": b["input_ids"], "labels": b["input_ids"]})
    first = next(iter(stream))
    assert isinstance(first["input_ids"], torch.Tensor) and set(first) == {"input_ids", "labels"}
    trainer = FOPTrainer(model=tiny_gpt2(), args=make_args(tmp_path / "out", max_steps=3, per_device_train_batch_size=8),
                         train_dataset=stream)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_prepare_stream_rejects_map_style():
    with pytest.raises(TypeError, match="IterableDataset"):
        prepare_stream(Dataset.from_dict({"a": [1]}), lambda b: b)


def test_chatterbot_topics_are_real_lines_labelled_by_their_topic_file():
    import os

    import chatterbot_corpus
    import yaml

    from fop_examples.data import CHATTERBOT_TOPICS, load_chatterbot_topics

    data = load_chatterbot_topics()
    assert data["train"].features["label"].names == list(CHATTERBOT_TOPICS)
    assert len(data["train"]) + len(data["test"]) > 300
    folder = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    for example in data["test"].select(range(20)):
        topic = CHATTERBOT_TOPICS[example["label"]]
        with open(os.path.join(folder, f"{topic}.yml"), encoding="utf-8") as f:
            lines = {str(x).strip() for conv in yaml.safe_load(f)["conversations"] for x in conv}
        assert example["text"] in lines  # the text is a line of the file its label names
    assert not set(data["train"]["text"]) & set(data["test"]["text"])


def test_chatterbot_dialogs_leave_out_code_and_support_logs():
    from fop_examples.data import load_chatterbot_dialogs

    data = load_chatterbot_dialogs()
    texts = list(data["train"]["text"]) + list(data["test"]["text"])
    assert 500 < len(texts) < 1500 and all(t.strip() for t in texts)
    assert not any("def quicksort" in t for t in texts)


def test_test_helpers_read_the_digits_scikit_learn_ships():
    """The worker processes' digits (read from scikit-learn's CSV without importing it) are ``load_digits``'s."""
    from sklearn.datasets import load_digits

    from trainer_helpers import load_digits_arrays

    x, y = load_digits_arrays()
    expected_x, expected_y = load_digits(return_X_y=True)
    assert np.array_equal(x, expected_x) and np.array_equal(y, expected_y)
