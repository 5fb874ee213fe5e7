"""Moved to :mod:`hf_fop.integrations.accelerate`; this module re-exports it so that existing imports keep working."""

from .integrations.accelerate import *  # noqa: F401,F403
from .integrations.accelerate import __all__  # noqa: F401
