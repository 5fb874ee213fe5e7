"""docs/trainer.md documents every ``fop_*`` argument and every logged ``fop/`` key (scripts/gen_trainer_docs.py)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from script_loader import load_script
from trainer_helpers import digits_dataset, make_args, tiny_vit

from hf_fop import FOPTrainer, FOPTrainingArguments
from hf_fop.integrations.trainer import LOGGED_KEYS

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "trainer.md").read_text()


def documented_key(key: str) -> str:
    """The LOGGED_KEYS entry a logged key falls under (per-layer keys: ``fop/<layer>/beta``)."""
    if key in LOGGED_KEYS:
        return key
    return "fop/<layer>/beta" if re.fullmatch(r"fop/.+/(beta|eta|s_proj|kl_base|kl_cross|kl_orth)", key) else key


def test_generated_tables_are_up_to_date():
    assert load_script("scripts", "gen_trainer_docs").main(["--check"]) == 0


def test_every_fop_argument_is_documented():
    names = [f.name for f in dataclasses.fields(FOPTrainingArguments) if f.name.startswith("fop_")]
    assert len(names) >= 20
    missing = [name for name in names if f"`--{name}`" not in DOC]
    assert not missing, missing


def test_every_key_a_run_logs_is_documented(tmp_path):
    """A run that logs every single-process key: per-layer values, the trust region, relative damping."""
    args = make_args(tmp_path, max_steps=2, fop_log_per_layer=True, fop_damping_mode="relative")
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(64))
    trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry if k.startswith("fop/")}
    assert "fop/kl_clip_scale" in logged and any(k.endswith("/beta") and k != "fop/beta" for k in logged)
    undocumented = sorted(k for k in logged if documented_key(k) not in LOGGED_KEYS)
    assert not undocumented, undocumented
    assert all(f"`{key}`" in DOC for key in LOGGED_KEYS)
