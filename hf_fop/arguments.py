"""Moved to :mod:`hf_fop.integrations.arguments`; this module re-exports it so that existing imports keep working."""

from .integrations.arguments import *  # noqa: F401,F403
from .integrations.arguments import __all__  # noqa: F401
