"""fop_examples.common: dataset loading (map-style and streamed, local files), checks and messages."""

from __future__ import annotations

import pytest
from datasets import ClassLabel, Dataset, Features, IterableDataset, Value

from hf_fop import FOPTrainingArguments
from fop_examples.common import (
    DataArguments,
    LabelEncoder,
    check_data_args,
    column_names,
    label_names,
    load_splits,
    require_columns,
)


def _args(tmp_path, **kw):
    return FOPTrainingArguments(str(tmp_path), use_cpu=True, report_to=[], **kw)


def _parquet(path, n, offset=0):
    features = Features({"text": Value("string"), "label": ClassLabel(names=["a", "b", "c"])})
    Dataset.from_dict({"text": [f"line {offset + i}" for i in range(n)], "label": [i % 3 for i in range(n)]},
                      features=features).to_parquet(str(path))
    return str(path)


def test_streamed_files_give_a_shuffled_bounded_stream_and_a_bounded_eval(tmp_path):
    data = DataArguments(train_file=_parquet(tmp_path / "t.parquet", 50), validation_file=_parquet(tmp_path / "v.parquet", 30, 1000),
                         streaming=True, shuffle_buffer_size=8, max_train_samples=20, max_eval_samples=7)
    train, evaluation = load_splits(data, seed=0)
    assert isinstance(train, IterableDataset) and isinstance(evaluation, IterableDataset)
    seen = [e["text"] for e in train]
    assert sorted(seen) == sorted(f"line {i}" for i in range(20))  # take(max_train_samples), every example once
    assert seen != [f"line {i}" for i in range(20)]  # shuffled through the buffer
    assert [e["text"] for e in evaluation] == [f"line {1000 + i}" for i in range(7)]
    assert label_names(train, "label", None, streaming=True) == ["a", "b", "c"]  # ClassLabel kept through parquet


def test_stream_without_validation_holds_out_its_first_examples(tmp_path):
    data = DataArguments(train_file=_parquet(tmp_path / "t.parquet", 40), streaming=True, max_eval_samples=10)
    train, evaluation = load_splits(data, seed=0)
    held_out = {e["text"] for e in evaluation}
    assert held_out == {f"line {i}" for i in range(10)}
    assert not held_out & {e["text"] for e in train} and len(list(train)) == 30


def test_map_style_without_validation_is_split_stratified(tmp_path):
    data = DataArguments(train_file=_parquet(tmp_path / "t.parquet", 60), test_size=0.25, max_train_samples=30)
    train, evaluation = load_splits(data, seed=0, stratify_column="label")
    assert len(evaluation) == 15 and len(train) == 30
    assert sorted(evaluation["label"]).count(0) == 5  # stratified: 5 of each class


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(streaming=True), r"--streaming needs --max_steps > 0"),
        (dict(shuffle_buffer_size=0), r"--shuffle_buffer_size=0 is invalid"),
        (dict(max_train_samples=0), r"--max_train_samples=0 is invalid"),
        (dict(test_size=1.0), r"--test_size=1.0 is invalid"),
        (dict(validation_file="v.csv"), r"--validation_file needs --train_file"),
        (dict(num_labels=1), r"--num_labels=1 is invalid: expected an integer >= 2"),
        (dict(num_labels=3, class_names=["a", "b"]), r"--num_labels=3 and --class_names \(2 names\) disagree"),
    ],
)
def test_data_arguments_are_checked(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        check_data_args(DataArguments(**kw), _args(tmp_path).max_steps)


def test_unknown_file_format_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"Cannot tell the format of '.*data\.xlsx'"):
        load_splits(DataArguments(train_file=str(tmp_path / "data.xlsx")), seed=0)


def test_columns_and_labels_are_checked_with_the_available_names(tmp_path):
    ds = Dataset.from_dict({"sentence": ["x", "y"], "target": ["pos", "neg"]})
    with pytest.raises(ValueError, match=r"no column 'text' \(--text_column\); available columns: \['sentence', 'target'\]"):
        require_columns(ds, {"text_column": "text"})
    with pytest.raises(ValueError, match=r"has no labels: no column 'label' \(--label_column\)"):
        label_names(ds, "label", None, streaming=False)
    assert label_names(ds, "target", None, streaming=False) == ["neg", "pos"]
    stream = ds.to_iterable_dataset()
    assert column_names(stream) == ["sentence", "target"]
    with pytest.raises(ValueError, match=r"pass --class_names NAME0 NAME1 \.\.\. .*or --num_labels N"):
        label_names(stream, "target", None, streaming=True)
    assert label_names(stream, "target", None, streaming=True, num_labels=3) == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert label_names(stream, "target", ["x", "y"], streaming=True, num_labels=2) == ["x", "y"]
    classes = Dataset.from_dict({"y": [0, 1]}, features=Features({"y": ClassLabel(names=["no", "yes"])}))
    assert label_names(classes.to_iterable_dataset(), "y", None, streaming=True, num_labels=2) == ["no", "yes"]
    with pytest.raises(ValueError, match=r"--num_labels=3 disagrees with column 'y', a ClassLabel of 2 classes"):
        label_names(classes, "y", None, streaming=False, num_labels=3)
    encode = LabelEncoder(["neg", "pos"], "target")
    assert (encode("pos", 0), encode(1, 1), encode("0", 2)) == (1, 1, 0)
    with pytest.raises(ValueError, match=r"Record 4: label 2 is outside \[0, num_labels=2\)"):
        encode(2, 4)
    with pytest.raises(ValueError, match=r"Record 5: label 'meh' is not one of the classes"):
        encode("meh", 5)
    with pytest.raises(ValueError, match=r"Record 6 has no label"):
        encode(None, 6)
