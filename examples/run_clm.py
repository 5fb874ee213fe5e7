"""Causal language modelling with FOPTrainer: a GPT-2-family model (AutoModelForCausalLM), perplexity as the metric.

Default (no network; 120 steps, about 1 minute on a 2-core CPU, final perplexity about 196): a small GPT-2 (GPT2Config: 2 layers, width 64, context
64) trained from scratch on the ChatterBot English dialog corpus (human-written conversations, BSD-3-Clause,
shipped by the PyPI package ``chatterbot-corpus``; code listings and the support log left out, see
``fop_examples.data.load_chatterbot_dialogs``):

    python examples/run_clm.py --output_dir out/clm_dialogs

Tokenizer: GPT-2's own tokenizer cannot be downloaded offline, so by default a byte-level BPE (GPT-2's
tokenizer algorithm, ``--bpe_vocab_size`` tokens) is trained with the ``tokenizers`` library on the
training split and saved to ``<output_dir>/tokenizer`` (reused when it exists, e.g. on resume). With
``--tokenizer_name`` or ``--model_name_or_path`` (Hub id or local folder) their tokenizer is used instead.
Texts are tokenized (batched ``map``), each document ends with the eos token, and the token stream is cut
into blocks of ``--block_size`` (the remainder of each map batch is dropped). Blank records (the empty lines of a
``.txt`` corpus or of wikitext) give no tokens and are skipped, with their count printed; a record that is not text
stops the run, naming it. GPT-2's ``Conv1D`` layers
(c_attn, c_proj, c_fc) are K-FAC/FOP-managed; the embeddings and the tied ``lm_head`` stay on AdamW.

Your data: ``--dataset_name`` or ``--train_file`` / ``--validation_file`` (txt, csv, json, jsonl, parquet)
with ``--text_column``; ``--streaming`` streams it (needs ``--max_steps``). ``--use_peft`` (``--lora_r``,
``--lora_alpha``, ``--lora_dropout``, ``--lora_target_modules``) trains LoRA adapters of a pretrained
``--model_name_or_path`` through peft (docs/finetuning.md). Two CPU processes:

    OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate_cpu_2proc.yaml \\
        examples/run_clm.py --output_dir out/clm_2proc

Prints ``final perplexity: ...`` (exp of the mean token NLL on the evaluation blocks); TensorBoard logs go to
``<output_dir>/runs``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from typing import Any, Dict, Iterable, Iterator, List, Optional

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    default_data_collator,
)

from hf_fop import FOPTrainer, FOPTrainingArguments
from fop_examples.data import load_chatterbot_dialogs
from fop_examples.metrics import compute_perplexity, token_nll
from fop_examples.common import (  # noqa: I001 (one shared module for every example)
    COMMON_DEFAULTS,
    DataArguments,
    LoraArguments,
    TextModelArguments,
    apply_lora,
    column_names,
    from_pretrained,
    load_splits,
    parse_args,
    preprocess,
    require_columns,
    train_and_report,
)


@dataclass
class LMArguments:
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int = field(default=64, metadata={"help": "Tokens per training block (and context of the from-scratch GPT-2), >= 2."})
    bpe_vocab_size: int = field(
        default=1024, metadata={"help": "Vocabulary of the byte-level BPE trained when no tokenizer is given, >= 300."}
    )
    bpe_train_samples: int = field(
        default=5000, metadata={"help": "Training examples the BPE tokenizer is trained on (the first N), >= 1."}
    )
    n_embd: int = field(default=64, metadata={"help": "Width of the from-scratch GPT-2."})
    n_layer: int = field(default=2, metadata={"help": "Depth of the from-scratch GPT-2."})
    n_head: int = field(default=4, metadata={"help": "Attention heads of the from-scratch GPT-2."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout (residual, embedding, attention) of the from-scratch GPT-2, in [0, 1)."})


DEFAULTS: Dict[str, Any] = dict(
    COMMON_DEFAULTS, output_dir="out/clm_dialogs", per_device_train_batch_size=32, per_device_eval_batch_size=64,
    num_train_epochs=10, learning_rate=0.02, fop_adamw_lr=3e-3, fop_damping=1e-2, warmup_steps=10,
    logging_steps=10, eval_strategy="epoch",
)


class LMTexts:
    """The texts of one split's ``--text_column`` for language modelling.

    Blank records (``""``, whitespace only, or missing) are normal in LM corpora (wikitext, one record per line of a
    ``.txt`` file) and give no tokens: they are skipped. A record that is not a string raises, naming it.
    """

    def __init__(self, column: str, split: str, streaming: bool) -> None:
        self.column = column
        self.split = split
        self.streaming = streaming
        self.skipped = 0
        """Blank records met by ``__call__`` (streams: so far)."""

    @staticmethod
    def is_blank(value: Any) -> bool:
        return value is None or (isinstance(value, str) and not value.strip())

    def report_blank_column(self, values: Iterable[Any]) -> None:
        """Print how many of a map-style split's records are blank (and so skipped)."""
        values = list(values)
        blank = sum(self.is_blank(v) for v in values)
        if blank:
            print(f"Skipping {blank} of {len(values)} records of the {self.split} split: empty text in column "
                  f"{self.column!r} gives no tokens.")

    def __call__(self, values: List[Any], indices: List[int]) -> List[str]:
        """The non-blank texts of a batch (record ``indices[i]`` holds ``values[i]``)."""
        kept = []
        for value, index in zip(values, indices):
            if self.is_blank(value):
                self.skipped += 1
                if self.streaming and math.log10(self.skipped).is_integer():  # a stream has no count in advance: 1, 10, 100...
                    print(f"Skipped {self.skipped} records of the {self.split} stream so far (the last: record {index}): "
                          f"empty text in column {self.column!r} gives no tokens.")
                continue
            if not isinstance(value, str):
                raise ValueError(
                    f"Record {index}: column {self.column!r} (--text_column) holds {type(value).__name__} {value!r}, "
                    "not text."
                )
            kept.append(value)
        return kept


def _texts(split: Any, column: str, limit: int) -> Iterator[str]:
    for i, example in enumerate(split):
        if i >= limit:
            return
        if example[column]:
            yield str(example[column])


def train_bpe(texts: Iterator[str], vocab_size: int, folder: str) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on ``texts``, saved to ``folder`` (``<|endoftext|>`` is bos/eos)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tokenizer(model_args: TextModelArguments, lm: LMArguments, args: FOPTrainingArguments, train: Any) -> Any:
    """The given tokenizer, or the byte-level BPE of ``<output_dir>/tokenizer`` (trained there by the main process)."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name is not None:
        return from_pretrained(AutoTokenizer, name, what="--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path")
    folder = os.path.join(args.output_dir, "tokenizer")
    with args.main_process_first(desc="train the BPE tokenizer"):
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return PreTrainedTokenizerFast.from_pretrained(folder)
        return train_bpe(_texts(train, lm.text_column, lm.bpe_train_samples), lm.bpe_vocab_size, folder)


def build(argv: Optional[List[str]] = None):
    """Parse the arguments and build ``(trainer, eval_dataset, args)``."""
    model_args, data, lm, lora, args = parse_args(
        (TextModelArguments, DataArguments, LMArguments, LoraArguments, FOPTrainingArguments), DEFAULTS, argv
    )
    if lm.block_size < 2:
        raise ValueError(f"--block_size={lm.block_size} is invalid: expected an integer >= 2.")
    if not 0.0 <= lm.dropout < 1.0:
        raise ValueError(f"--dropout={lm.dropout} is invalid: expected a probability in [0, 1).")
    if lm.bpe_vocab_size < 300 or lm.bpe_train_samples < 1:
        raise ValueError(
            f"--bpe_vocab_size={lm.bpe_vocab_size} / --bpe_train_samples={lm.bpe_train_samples} are invalid: expected "
            ">= 300 (256 bytes + merges + specials) and >= 1."
        )
    train, evaluation = load_splits(data, args.seed, default=load_chatterbot_dialogs)
    require_columns(train, {"text_column": lm.text_column})
    tokenizer = build_tokenizer(model_args, lm, args, train)
    if model_args.model_name_or_path is not None:
        model = from_pretrained(AutoModelForCausalLM, model_args.model_name_or_path)
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=lm.block_size, n_embd=lm.n_embd, n_layer=lm.n_layer, n_head=lm.n_head,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            resid_pdrop=lm.dropout, embd_pdrop=lm.dropout, attn_pdrop=lm.dropout,
        )
        model = GPT2LMHeadModel(config)
    if lora.use_peft:
        model = apply_lora(model, lora, "CAUSAL_LM")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize_and_group(texts: LMTexts, batch: Dict[str, List[Any]], indices: List[int]) -> Dict[str, Any]:
        kept = texts(batch[lm.text_column], indices)
        ids = tokenizer(kept)["input_ids"] if kept else []  # a batch of blank lines only gives no tokens
        stream = list(chain.from_iterable(x + eos for x in ids))
        usable = (len(stream) // lm.block_size) * lm.block_size
        blocks = [stream[i : i + lm.block_size] for i in range(0, usable, lm.block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    def prepare(split: Any, name: str) -> Any:
        texts = LMTexts(lm.text_column, name, data.streaming)
        if not data.streaming:  # counted here, not in map(), which a cached rerun skips
            texts.report_blank_column(split[lm.text_column])
        return preprocess(split, partial(tokenize_and_group, texts), remove_columns=column_names(split))

    trainer = FOPTrainer(
        model=model, args=args, train_dataset=prepare(train, "training"), eval_dataset=prepare(evaluation, "evaluation"),
        data_collator=default_data_collator, compute_metrics=compute_perplexity, preprocess_logits_for_metrics=token_nll,
        processing_class=tokenizer,
    )
    return trainer, trainer.eval_dataset, args


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    """Train and evaluate; returns the final metrics (``final_perplexity``, ``final_loss``...)."""
    trainer, evaluation, _ = build(argv)
    return train_and_report(trainer, evaluation, "perplexity", "causal LM")


if __name__ == "__main__":
    main(sys.argv[1:] if len(sys.argv) > 1 else None)
