"""Moved to :mod:`hf_fop.integrations.routing`; this module re-exports it so that existing imports keep working."""

from .integrations.routing import *  # noqa: F401,F403
from .integrations.routing import __all__  # noqa: F401
