"""Pieces both benchmarks use: the lr schedule, strict JSON, the machine line, generated markdown sections, mean/std."""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
from dataclasses import fields
from typing import Any, Dict, List, Sequence, Tuple

import torch

from hf_fop import FOPConfig


def lr_factor(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warmup over ``warmup_fraction`` of ``total`` steps, then cosine decay to 0."""
    warmup = max(1, int(round(warmup_fraction * total)))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(x: torch.Tensor, y: torch.Tensor, batch: int, gen: torch.Generator) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's ``len(y) // batch`` batches ``(x[idx], y[idx])``, ``idx`` consecutive pieces of a fresh permutation
    drawn from ``gen`` (the remainder left out)."""
    perm = torch.randperm(len(y), generator=gen).to(y.device)
    return [(x[idx], y[idx]) for idx in perm[: len(y) // batch * batch].split(batch)]


def schedule_lr(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], factor: float) -> None:
    """Set each parameter group's lr to its base lr times ``factor`` (see :func:`lr_factor`)."""
    for group, lr0 in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr0 * factor


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """``(mean, sample std)`` of ``values``: std 0 for one value, both NaN for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def finite_json(obj: Any) -> Any:
    """``obj`` with floats rounded to 6 significant digits and non-finite ones replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def machine_description(device: torch.device) -> str:
    """CPU model and core count, plus the GPU name on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def write_markdown_section(path: str, key: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- {key}:begin -->`` and ``<!-- {key}:end -->`` in ``path``."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def parse_config_overrides(items: Sequence[str], flag: str = "--config") -> Dict[str, Any]:
    """``["capture_rows=256", "stagger_refresh=false"]`` -> FOPConfig overrides, typed by the fields' defaults
    (``none`` -> ``None``); an unknown field or a bad value raises ``ValueError`` naming it and the flag."""
    defaults = {f.name: getattr(FOPConfig(), f.name) for f in fields(FOPConfig)}
    out: Dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in defaults:
            raise ValueError(f"{flag} {item!r}: expected FIELD=VALUE with FIELD one of {sorted(defaults)}")
        default = defaults[name]
        if text.lower() == "none":
            value: Any = None
        elif isinstance(default, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError(f"{flag} {item!r}: {name} takes true or false")
            value = text.lower() == "true"
        elif isinstance(default, (int, float)) or default is None:
            value = float(text) if any(c in text for c in ".e") else int(text)
        else:
            value = text
        out[name] = value
    FOPConfig(**out)  # validated here, with FOPConfig's own messages
    return out
