"""hf_fop: the FOP optimizer (Fisher-Orthogonal Projection, Lu & Armour, AAAI 2026) for HuggingFace."""

from typing import Any

from .config import FOPConfig
from .optimizer import FOP

__all__ = [
    "FOP", "FOPConfig", "FOPTrainer", "FOPTrainingArguments", "attach_accelerate", "parse_fop_args", "sub_batches",
]
__version__ = "0.1.0"

_LAZY = {
    "FOPTrainer": ".integrations.trainer",
    "FOPTrainingArguments": ".integrations.arguments",
    "parse_fop_args": ".integrations.arguments",
    "attach_accelerate": ".integrations.accelerate",
    "sub_batches": ".integrations.accelerate",
}


def __getattr__(name: str) -> Any:
    """Import the front ends (transformers, accelerate) on first use (keeps ``import hf_fop`` light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
