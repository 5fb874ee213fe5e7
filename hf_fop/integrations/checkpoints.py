"""Model-weight loading for resumed Trainer runs: checkpoint key names and tied weights (nothing FOP-specific).

Two gaps of transformers' ``Trainer`` when it resumes a run (``resume_from_checkpoint``) or loads the best model
(``load_best_model_at_end``), checked with transformers 5.24 and still present in 5.25:

* ViT's ``save_pretrained`` writes legacy tensor names (``vit.encoder.layer.0.attention.attention.key.weight``) while
  the in-memory model uses new ones (``vit.layers.0.attention.k_proj.weight``); ``Trainer._load_from_checkpoint``
  loads the file without converting them, warns, and resumes with the encoder NOT restored. ``from_pretrained``
  converts them, so :class:`CheckpointLoadingMixin` loads through it when the names differ.
* a tied tensor (GPT-2's ``lm_head.weight`` = ``transformer.wte.weight``) is stored once, so the Trainer warns that
  the other name is missing although both are restored; the mixin leaves tied names out of that warning.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

__all__ = ["CheckpointLoadingMixin"]

logger = logging.get_logger(__name__)


class CheckpointLoadingMixin:
    """``Trainer`` mixin (put it before ``Trainer`` in the bases): converting loader and tied-weight-aware warning."""

    def _needs_key_conversion(self, folder: str, target: nn.Module) -> bool:
        """The checkpoint stores tensor names the in-memory model does not have (ViT in transformers 5.x)."""
        keys = _checkpoint_keys(folder)
        return (
            isinstance(target, PreTrainedModel)
            and not self.is_fsdp_enabled
            and not self.is_deepspeed_enabled
            and keys is not None
            and not keys <= set(target.state_dict())
        )

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the Trainer's loader, or the name-converting one when names differ."""
        best = self.state.best_model_checkpoint
        if best is not None and self._needs_key_conversion(best, self.model):
            logger.info(f"Loading best model from {best} (score: {self.state.best_metric}), converting key names.")
            self._load_from_checkpoint(best)
            return
        super()._load_best_model()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """Load model weights; converts checkpoint key names like ``from_pretrained`` when they differ (ViT)."""
        target = self.model if model is None else model
        if self._needs_key_conversion(resume_from_checkpoint, target):
            loaded = type(target).from_pretrained(resume_from_checkpoint, config=target.config)
            target.load_state_dict(loaded.state_dict(), strict=True)  # raises on any name still missing
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """The Trainer's missing/unexpected-keys warning, without tied weights (GPT-2's ``lm_head.weight``).

        ``save_pretrained`` stores a tied tensor once (``transformer.wte.weight``); loading that one restores both
        names, which share the tensor, so the second name "missing" from the file is not lost.
        """
        tied = set(_tied_missing_keys(self.model, list(load_result.missing_keys)))
        if tied:
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied])
        super()._issue_warnings_after_load(load_result)


def _tied_missing_keys(model: nn.Module, missing: List[str]) -> List[str]:
    """Names in ``missing`` that share their tensor with a name that was loaded (tied weights, e.g. GPT-2's lm_head)."""
    aliases: Dict[int, List[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        aliases.setdefault(id(tensor), []).append(name)
    group_of = {name: aliases[id(tensor)] for name, tensor in named}
    lost = set(missing)
    return [k for k in missing if any(other not in lost for other in group_of.get(k, []))]


def _checkpoint_keys(folder: str) -> Optional[set]:
    """Tensor names stored in a checkpoint folder's safetensors weights (``None`` if not safetensors)."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return set(f.keys())
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    return None
