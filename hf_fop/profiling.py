"""Names of FOP's phases as ``torch.profiler`` scopes, so that a profile says where a step's time goes.

Every phase runs inside ``record_function(f"fop::{phase}")``; :mod:`torch.profiler` attributes the operators inside to
it (``scripts/profile_step.py`` and ``scripts/bench_hub_widths.py`` read them). Outside a profiler a scope costs about
a microsecond.
"""

from __future__ import annotations

from torch.profiler import record_function

PHASES = (
    "capture_forward",  # A: input rows a a^T, in each managed layer's forward hook
    "capture_backward",  # S: output-gradient rows s s^T, in the backward hook
    "sub_batches",  # closing a sub-batch: g1, g1 - g2, g_avg
    "factors",  # this step's factors from the captures, their exchange across ranks, the running averages
    "refresh",  # eigendecompositions (eigenbasis refresh)
    "precondition",  # rotations into and out of the eigenbases, FOP/K-FAC coefficients, trust region, the update
    "adamw",  # the AdamW update of the other parameters
    "checks",  # the finiteness check of gradients and factors
)
"""Phases in the order a step runs them (forward and backward of the model itself are outside every scope)."""


def scope(phase: str) -> record_function:
    """``record_function("fop::<phase>")``, a context manager (``phase`` one of :data:`PHASES`)."""
    return record_function(f"fop::{phase}")
