"""Attribute torch.profiler events to FOP's phases (the ``fop::<phase>`` scopes of :mod:`hf_fop.profiling`).

Shared by ``scripts/profile_step.py`` and ``scripts/bench_hub_widths.py``. An operator belongs to the innermost
``fop::<phase>`` scope around it; operators outside every scope go to ``outside`` (``"passes"``: the model's own
forward and backward). Times are self times (CPU, or device time with ``use_cuda``), so the Python glue between
operators is in no phase.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Optional

from hf_fop.profiling import PHASES as FOP_PHASES

PHASES = FOP_PHASES + ("passes",)
SCOPES = {f"fop::{phase}": phase for phase in FOP_PHASES}
MM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::baddbmm"}
EIGH_OPS = {"aten::linalg_eigh", "aten::_linalg_eigh"}
ELEMENTWISE_OPS = {
    "aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::sub", "aten::div", "aten::div_", "aten::sum",
    "aten::outer", "aten::where", "aten::lerp_", "aten::addcmul_", "aten::addcdiv_", "aten::sqrt_", "aten::norm",
    "aten::linalg_vector_norm", "aten::copy_", "aten::cat", "aten::clone", "aten::zeros_like", "aten::fill_",
    "aten::_foreach_mul_", "aten::_foreach_add_", "aten::_foreach_lerp_", "aten::_foreach_addcmul_",
    "aten::_foreach_addcdiv_", "aten::_foreach_sqrt", "aten::_foreach_div_", "aten::_foreach_add",
    "aten::isfinite", "aten::stack", "aten::clamp_min", "aten::mm_backward",
}  # fmt: skip


def op_class(name: str) -> str:
    """``mm`` (matrix products), ``eigh``, ``elementwise`` or ``other`` for an ``aten::`` operator name."""
    if name in MM_OPS:
        return "mm"
    if name in EIGH_OPS:
        return "eigh"
    if name in ELEMENTWISE_OPS or name.startswith("aten::_foreach"):
        return "elementwise"
    return "other"


def _is_marker(name: str, within: Optional[str]) -> bool:
    return name in SCOPES or name.startswith("ProfilerStep") or name == "[memory]" or name == within


def split_by_phase(
    prof: Any, steps: int, use_cuda: bool, within: Optional[str] = None, outside: str = "passes"
) -> Dict[str, Dict[str, float]]:
    """``{phase: {op class: ms per step}}`` from the profiler's event tree (self times divided by ``steps``).

    ``within``: the name of a ``record_function`` scope; only operators inside it count (``None``: all).
    """
    out: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for ev in prof.events():
        if _is_marker(ev.name, within):
            continue
        phase: Optional[str] = None
        inside = within is None
        parent = ev.cpu_parent
        while parent is not None:
            if phase is None and parent.name in SCOPES:
                phase = SCOPES[parent.name]
            inside = inside or parent.name == within
            parent = parent.cpu_parent
        if not inside:
            continue
        self_us = ev.self_device_time_total if use_cuda else ev.self_cpu_time_total
        out[phase or outside][op_class(ev.name)] += self_us / 1e3 / steps
    return {p: dict(v) for p, v in out.items()}


def count_ops(prof: Any, name: str, within: Optional[str] = None) -> int:
    """How many calls of operator ``name`` the profile holds (inside scope ``within`` when given)."""
    count = 0
    for ev in prof.events():
        if ev.name != name:
            continue
        parent = ev.cpu_parent
        inside = within is None
        while parent is not None and not inside:
            inside = parent.name == within
            parent = parent.cpu_parent
        count += int(inside)
    return count
