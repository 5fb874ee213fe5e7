"""Moved to :mod:`hf_fop.distributed.specialists`; this module re-exports it so that existing imports keep working."""

from .distributed.specialists import SpecialistCurvature, assign_owners, layer_cost, owner_loads  # noqa: F401
