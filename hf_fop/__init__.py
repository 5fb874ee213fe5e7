"""hf_fop: the FOP optimizer (Fisher-Orthogonal Projection, Lu & Armour, AAAI 2026) for HuggingFace."""

from .config import FOPConfig
from .optimizer import FOP

__all__ = ["FOP", "FOPConfig"]
__version__ = "0.1.0"
