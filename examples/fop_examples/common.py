"""Code shared by the ``examples/run_*.py`` scripts: argument dataclasses, dataset loading (map-style or
streamed), column and label checks, pretrained loading with a clear offline message, and the final report.

The scripts follow transformers' ``examples/pytorch`` layout: ``HfArgumentParser`` over
:class:`ModelArguments` (:class:`TextModelArguments` for text), :class:`DataArguments`, one script-specific dataclass and
:class:`hf_fop.FOPTrainingArguments`, so every field is a ``--flag`` with ``--help`` text.

Streaming (``--streaming``): ``load_dataset(..., streaming=True)`` gives ``IterableDataset`` splits; the
script's preprocessing runs through the same batched ``.map(..., remove_columns=...)`` as for map-style
data; the training stream is shuffled with a buffer (``--shuffle_buffer_size``); evaluation reads a bounded
``.take(--max_eval_samples)`` of the validation stream; ``--max_steps`` is required. Under several processes
accelerate's dispatcher gives every rank different examples of each global batch (rank 0 reads the stream
and sends each rank its slice), so the scripts do NOT also call ``split_dataset_by_node``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from datasets import ClassLabel, Dataset, DatasetDict, IterableDataset, load_dataset
from transformers import HfArgumentParser, set_seed

from hf_fop import parse_fop_args

AnyDataset = Union[Dataset, IterableDataset]

FILE_BUILDERS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text", "text": "text"}
"""File extension -> ``load_dataset`` builder for ``--train_file`` / ``--validation_file`` (a folder: imagefolder)."""
VALIDATION_SPLITS = ("validation", "test", "valid", "eval")
"""Split names taken as the evaluation split, in this order of preference."""


@dataclass
class ModelArguments:
    """Which pretrained model to start from."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Hub id or local folder (written by save_pretrained) of the pretrained model; default: the script's offline default."},
    )
    num_threads: int = field(
        default=1, metadata={"help": "torch CPU threads (tiny models run fastest on one); 0 keeps torch's default."}
    )


@dataclass
class TextModelArguments(ModelArguments):
    """Which pretrained model and tokenizer to start from (the text scripts)."""

    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Hub id or local folder of the tokenizer; default: --model_name_or_path's."}
    )


@dataclass
class DataArguments:
    """Where the data comes from and how much of it is used."""

    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "Hub id or local folder of a dataset (load_dataset); default: the script's offline default."}
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Configuration name of --dataset_name."})
    train_file: Optional[str] = field(
        default=None,
        metadata={"help": "Training data file (csv, tsv, json, jsonl, parquet, txt) or an image folder; replaces --dataset_name."},
    )
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "Validation data file or image folder, same format as --train_file."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset (load_dataset(..., streaming=True)) instead of downloading it; needs --max_steps."},
    )
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "Examples in the shuffle buffer of the streamed training set (>= 1)."}
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Use only the first N training examples (debugging, quick runs); >= 1."}
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Evaluate on at most N examples (>= 1); with --streaming the default is 512 (a bounded take())."},
    )
    test_size: float = field(
        default=0.2,
        metadata={"help": "Fraction held out for evaluation when map-style data has no validation split, in (0, 1). "
                  "A streamed dataset without validation split holds out its first --max_eval_samples examples."},
    )
    class_names: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Class names in label-id order (classification). Needed with --streaming (or --num_labels) when the label column "
                  "is not a ClassLabel; string labels are mapped to their position in this list."},
    )
    num_labels: Optional[int] = field(
        default=None,
        metadata={"help": "Number of classes N >= 2 (classification), instead of --class_names when the labels are the "
                  "ids 0..N-1: the classes are named LABEL_0 ... LABEL_<N-1>, as transformers names them."},
    )


@dataclass
class LoraArguments:
    """LoRA adapters through peft, with the flag names of transformers' and TRL's scripts (text scripts)."""

    use_peft: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters (peft) instead of the whole model: the pretrained weights stay frozen; FOP "
                  "manages the adapters' lora_A / lora_B Linear layers and the task head peft trains."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r (>= 1): lora_A is r x in, lora_B is out x r."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling alpha (> 0): the adapter's output is scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' input, in [0, 1)."})
    lora_target_modules: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Names of the modules that get adapters (e.g. query value); default: peft's choice for the "
                  "model type (query, value for BERT; c_attn for GPT-2)."},
    )


def apply_lora(model: Any, lora: LoraArguments, task_type: str) -> Any:
    """``peft.get_peft_model(model, LoraConfig(...))`` for ``--use_peft`` (``task_type``: ``"SEQ_CLS"``, ``"CAUSAL_LM"``).

    Only the adapters (and, for ``SEQ_CLS``, the classification head) keep ``requires_grad``; FOP skips frozen layers.
    """
    if lora.lora_r < 1:
        raise ValueError(f"--lora_r={lora.lora_r} is invalid: expected an integer >= 1.")
    if not lora.lora_alpha > 0:
        raise ValueError(f"--lora_alpha={lora.lora_alpha} is invalid: expected a number > 0.")
    if not 0.0 <= lora.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout={lora.lora_dropout} is invalid: expected a probability in [0, 1).")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("--use_peft needs the peft package: pip install peft (or pip install -e '.[test]').") from err
    config = LoraConfig(task_type=task_type, r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=lora.lora_target_modules)
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        if lora.lora_target_modules is None and "target_modules" in str(err):
            raise ValueError(
                f"peft has no default LoRA target modules for model type {model.config.model_type!r}: name them with "
                "--lora_target_modules (e.g. q_proj v_proj)."
            ) from None
        raise
    trainable, total = model.get_nb_trainable_parameters()
    print(f"LoRA (r={lora.lora_r}, alpha={lora.lora_alpha:g}) on {sorted(model.peft_config['default'].target_modules)}: "
          f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%).")
    return model


STREAM_EVAL_DEFAULT = 512


def parse_args(
    dataclass_types: Sequence[type], defaults: Mapping[str, Any], argv: Optional[Sequence[str]] = None
) -> Tuple[Any, ...]:
    """``HfArgumentParser(dataclass_types)`` with script ``defaults``; the last type must be FOPTrainingArguments.

    Also applies ``--num_threads``, checks the streaming arguments (:func:`check_data_args`) and seeds every RNG
    with ``--seed`` (so a model built from scratch starts from the same weights in every run and process).
    """
    parser = HfArgumentParser(tuple(dataclass_types))
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.set_defaults(**_script_defaults(defaults, argv))
    parsed = parse_fop_args(parser, args=argv)  # bad fop_* value: argparse error
    for obj in parsed:
        if isinstance(obj, ModelArguments) and obj.num_threads > 0:
            torch.set_num_threads(obj.num_threads)
        if isinstance(obj, DataArguments):
            check_data_args(obj, parsed[-1].max_steps)
    set_seed(parsed[-1].seed)
    return parsed


def _script_defaults(defaults: Mapping[str, Any], argv: Sequence[str]) -> Dict[str, Any]:
    """``defaults`` without the script's curvature intervals when the command line asks for
    ``--fop_curvature_schedule paper``, which sets both from the global batch (an interval given with it is an error)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--fop_curvature_schedule")
    schedule = pre.parse_known_args(argv)[0].fop_curvature_schedule
    if schedule != "paper":
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k not in ("fop_factor_interval", "fop_inverse_interval")}


def check_data_args(data: DataArguments, max_steps: int, max_steps_flag: str = "max_steps") -> None:
    """Field-named errors for invalid data arguments; ``--streaming`` requires ``max_steps > 0`` (``--max_steps_flag``)."""
    if data.streaming and max_steps <= 0:
        raise ValueError(
            f"--streaming needs --{max_steps_flag} > 0: a streamed dataset has no length, so the number of epochs "
            f"cannot be counted (got {max_steps_flag}={max_steps})."
        )
    if data.shuffle_buffer_size < 1:
        raise ValueError(f"--shuffle_buffer_size={data.shuffle_buffer_size} is invalid: expected an integer >= 1.")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(data, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name}={value} is invalid: expected an integer >= 1 (or leave it unset).")
    if not 0.0 < data.test_size < 1.0:
        raise ValueError(f"--test_size={data.test_size} is invalid: expected a fraction in (0, 1).")
    if data.num_labels is not None:
        if data.num_labels < 2:
            raise ValueError(f"--num_labels={data.num_labels} is invalid: expected an integer >= 2 (classes).")
        if data.class_names and len(data.class_names) != data.num_labels:
            raise ValueError(
                f"--num_labels={data.num_labels} and --class_names ({len(data.class_names)} names) disagree: give one of them."
            )
    if data.validation_file is not None and data.train_file is None:
        raise ValueError("--validation_file needs --train_file (the training data of the same format).")


# ------------------------------------------------------------------ loading
def _builder_for(path: str) -> str:
    if os.path.isdir(path):
        return "imagefolder"
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    if ext not in FILE_BUILDERS:
        raise ValueError(
            f"Cannot tell the format of {path!r}: expected a file ending in one of {sorted(FILE_BUILDERS)} or an image folder."
        )
    return FILE_BUILDERS[ext]


def _load_files(data: DataArguments) -> Any:
    builder = _builder_for(data.train_file)
    if data.validation_file is not None and _builder_for(data.validation_file) != builder:
        raise ValueError(f"--train_file ({builder}) and --validation_file must have the same format.")
    if builder == "imagefolder":
        train = load_dataset("imagefolder", data_dir=data.train_file, split="train", streaming=data.streaming)
        out = {"train": train}
        if data.validation_file is not None:
            out["validation"] = load_dataset(
                "imagefolder", data_dir=data.validation_file, split="train", streaming=data.streaming
            )
        return out
    files = {"train": data.train_file}
    if data.validation_file is not None:
        files["validation"] = data.validation_file
    extra = {"delimiter": "\t"} if data.train_file.lower().endswith(".tsv") else {}
    return load_dataset(builder, data_files=files, streaming=data.streaming, **extra)


def load_splits(
    data: DataArguments, seed: int, default: Optional[Callable[[], DatasetDict]] = None, stratify_column: Optional[str] = None
) -> Tuple[AnyDataset, AnyDataset]:
    """``(train, eval)`` splits from ``--train_file`` / ``--dataset_name`` / the script's offline ``default``.

    Map-style data without a validation split is split ``test_size`` (stratified by ``stratify_column`` when it is a
    ClassLabel); a streamed one holds out its first ``max_eval_samples`` examples. The training stream is shuffled
    with ``shuffle_buffer_size``; the evaluation stream is bounded by ``take(max_eval_samples)``.
    """
    if data.train_file is not None:
        raw = _load_files(data)
    elif data.dataset_name is not None:
        raw = load_dataset(data.dataset_name, data.dataset_config_name, streaming=data.streaming)
    elif default is not None:
        raw = default()
        if data.streaming:  # the offline default read as a stream, through the same code path as a Hub stream
            raw = {name: split.to_iterable_dataset(num_shards=1) for name, split in raw.items()}
    else:
        raise ValueError("No data: give --dataset_name or --train_file.")
    if "train" not in raw:
        raise ValueError(f"The dataset has no 'train' split (splits: {sorted(raw)}).")
    train = raw["train"]
    eval_name = next((name for name in VALIDATION_SPLITS if name in raw), None)
    n_eval = data.max_eval_samples or (STREAM_EVAL_DEFAULT if data.streaming else None)
    if data.streaming:
        if eval_name is None:
            evaluation, train = train.take(n_eval), train.skip(n_eval)
        else:
            evaluation = raw[eval_name]
        evaluation = evaluation.take(n_eval)
        if data.max_train_samples is not None:
            train = train.take(data.max_train_samples)
        train = train.shuffle(seed=seed, buffer_size=data.shuffle_buffer_size)
        return train, evaluation
    if eval_name is None:
        feature = train.features.get(stratify_column) if stratify_column else None
        stratify = stratify_column if isinstance(feature, ClassLabel) else None
        try:
            split = train.train_test_split(test_size=data.test_size, seed=seed, stratify_by_column=stratify)
        except ValueError as err:  # a class too small to stratify: plain random split
            if stratify is None:
                raise
            print(f"Held-out split not stratified by {stratify!r} ({err})")
            split = train.train_test_split(test_size=data.test_size, seed=seed)
        train, evaluation = split["train"], split["test"]
    else:
        evaluation = raw[eval_name]
    if data.max_train_samples is not None:
        train = train.select(range(min(data.max_train_samples, len(train))))
    if n_eval is not None:
        evaluation = evaluation.select(range(min(n_eval, len(evaluation))))
    return train, evaluation


def column_names(dataset: AnyDataset) -> List[str]:
    """Columns of a map-style or streamed dataset (a stream without declared features is peeked at)."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    if getattr(dataset, "features", None) is not None:
        return list(dataset.features)
    return list(next(iter(dataset)).keys())


def require_columns(dataset: AnyDataset, columns: Mapping[str, Optional[str]], what: str = "The dataset") -> None:
    """Raise naming the ``--flag``, the missing column and the available ones (``columns``: flag -> column)."""
    available = column_names(dataset)
    for flag, column in columns.items():
        if column is not None and column not in available:
            raise ValueError(f"{what} has no column {column!r} (--{flag}); available columns: {available}.")


def label_names(
    dataset: AnyDataset, label_column: str, given: Optional[Sequence[str]], streaming: bool, num_labels: Optional[int] = None
) -> List[str]:
    """Class names in id order: ``--class_names``, else the ClassLabel's names, else ``LABEL_i`` for ``--num_labels``,
    else (map-style) the sorted values."""
    available = column_names(dataset)
    if label_column not in available:
        raise ValueError(
            f"The dataset has no labels: no column {label_column!r} (--label_column); available columns: {available}."
        )
    if given:
        return [str(n) for n in given]
    features = getattr(dataset, "features", None)
    feature = features.get(label_column) if features is not None else None
    if isinstance(feature, ClassLabel):
        if num_labels is not None and num_labels != feature.num_classes:
            raise ValueError(
                f"--num_labels={num_labels} disagrees with column {label_column!r}, a ClassLabel of {feature.num_classes} "
                f"classes {feature.names}: leave --num_labels out."
            )
        return list(feature.names)
    if num_labels is not None:
        return [f"LABEL_{i}" for i in range(num_labels)]
    if streaming:
        raise ValueError(
            f"Column {label_column!r} of the streamed dataset is not a ClassLabel, so its classes cannot be read without "
            "reading the whole stream: pass --class_names NAME0 NAME1 ... (in label-id order), or --num_labels N when "
            "the labels are the ids 0..N-1."
        )
    values = [v for v in dataset[label_column] if v is not None]
    if not values:
        raise ValueError(f"The dataset has no labels: column {label_column!r} holds no value.")
    return [str(v) for v in sorted(set(values))]


class LabelEncoder:
    """Maps raw label values (class ids or class names) to ids in ``[0, num_labels)``, naming any bad record."""

    def __init__(self, names: Sequence[str], label_column: str) -> None:
        self.names = list(names)
        self.label_column = label_column
        self._ids = {name: i for i, name in enumerate(self.names)}

    def __call__(self, value: Any, index: int) -> int:
        if value is None:
            raise ValueError(f"Record {index} has no label (column {self.label_column!r} is empty).")
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            if value not in self._ids:
                raise ValueError(f"Record {index}: label {value!r} is not one of the classes {self.names}.")
            return self._ids[value]
        label = int(value)
        if not 0 <= label < len(self.names):
            raise ValueError(
                f"Record {index}: label {label} is outside [0, num_labels={len(self.names)}) (classes {self.names})."
            )
        return label


def preprocess(dataset: AnyDataset, function: Callable[..., Dict[str, Any]], remove_columns: Sequence[str]) -> AnyDataset:
    """``dataset.map(function, batched=True, with_indices=True, remove_columns=...)`` for map-style and streamed data.

    ``function(batch: dict of column lists, indices: list of int)`` returns model-input columns; the indices
    let it name a bad record.
    """
    return dataset.map(function, batched=True, with_indices=True, remove_columns=list(remove_columns))


# ------------------------------------------------------------------ models
def from_pretrained(loader: Any, name: str, what: str = "--model_name_or_path", **kwargs: Any) -> Any:
    """``loader.from_pretrained(name, **kwargs)`` with a clear message when ``name`` cannot be found."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as err:
        if os.path.isdir(name):
            raise
        raise ValueError(
            f"{what} {name!r} could not be found: it is not a local folder, and it could not be loaded from the Hugging "
            "Face Hub (the machine may be offline, or the id may be wrong). Pass a folder written by save_pretrained, or "
            f"check the id and the network. Cause: {str(err).splitlines()[0]}"
        ) from None


def set_pad_token(tokenizer: Any, model_config: Any) -> None:
    """Give a tokenizer without a pad token its eos token as pad token (and the model config its id), saying so."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(
            "The tokenizer has no pad token and no eos token to pad with: dynamic padding needs one. Add a pad token "
            "(tokenizer.add_special_tokens({'pad_token': '[PAD]'}) and resize the embeddings) or use another tokenizer."
        )
    tokenizer.pad_token = tokenizer.eos_token
    model_config.pad_token_id = tokenizer.pad_token_id
    print(f"The tokenizer has no pad token: using its eos token {tokenizer.eos_token!r} (id {tokenizer.pad_token_id}) as pad token.")


# ------------------------------------------------------------------ run
def train_and_report(trainer: Any, eval_dataset: AnyDataset, metric: str, describe: str) -> Dict[str, float]:
    """Train (resuming from ``--resume_from_checkpoint`` if given), evaluate, print ``final <metric>``, return the metrics.

    The metrics are also written to ``<output_dir>/final_results.json``.
    """
    args = trainer.args
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate(eval_dataset, metric_key_prefix="final")
    trainer.save_metrics("final", metrics)  # <output_dir>/final_results.json (main process)
    if trainer.is_world_process_zero():
        print(f"final {metric}: {metrics[f'final_{metric}']:.4f} ({describe}, optimizer={args.fop_optimizer}, "
              f"global batch {args.global_train_batch_size}, lr {args.learning_rate:g})")
    if torch.distributed.is_initialized():  # clean gloo shutdown under torchrun / accelerate launch
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


COMMON_DEFAULTS: Dict[str, Any] = dict(
    report_to=["tensorboard"],
    use_cpu=not torch.cuda.is_available(),
    dataloader_num_workers=0,
    seed=0,
    save_strategy="no",
    lr_scheduler_type="cosine",
    fop_momentum=0.0,  # the examples' learning rates and dampings were tuned, and their README figures measured, without it
    # and with curvature every step from every row, eigenbases every 5 steps: on these small models curvature is cheap
    fop_factor_interval=1,
    fop_inverse_interval=5,
    fop_capture_rows=0,
)
"""TrainingArguments defaults every example shares (each script adds its own)."""
