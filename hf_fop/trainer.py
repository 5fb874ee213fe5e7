"""Moved to :mod:`hf_fop.integrations.trainer`; this module re-exports it so that existing imports keep working."""

from .integrations.trainer import *  # noqa: F401,F403
from .integrations.trainer import __all__  # noqa: F401
