"""FOP's per-step diagnostics: what the last step computed, as plain floats (read once, when logged)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from .fop_math import LayerResult

STAT_FIELDS = ("beta", "eta", "s_proj", "kl_base", "kl_cross", "kl_orth")
"""Per-layer fields of :class:`hf_fop.fop_math.LayerStats`, in the order they are logged."""


@dataclass
class StepRecord:
    """What the last ``step()`` left for :func:`summarize` (tensors stay on the device until read)."""

    results: Dict[str, LayerResult] = field(default_factory=dict)
    """Per managed layer with an eigenbasis: stats, lambda, KL term."""
    kl_clip_scale: Optional[Tensor] = None
    """The trust-region factor nu (with ``kl_clip``)."""
    diff_ratio: Optional[Tensor] = None
    """``||g_avg at step()|| / ||g_avg when the sub-batches ended||`` (FOP steps): how much ``p.grad`` was scaled."""
    fallback: bool = False
    """The step fell back to K-FAC (FOP mode, only one sub-batch)."""


def summarize(record: StepRecord) -> Dict[str, float]:
    """Per layer ``{name}/beta`` ... and aggregates: ``beta_mean``, ``eta_mean``, ``s_proj_mean`` (means over layers),
    ``kl_base``, ``kl_cross``, ``kl_orth`` (sums over layers, per unit lr^2), ``damping_min``/``damping_max``,
    ``kl_clip_scale``; ``fallback``. One host transfer per kind of value.

    ``beta`` and ``s_proj`` are those of the gradients ``step()`` used: when ``p.grad`` was scaled by ``c`` after the
    backward passes (clipping, fp16 unscaling) ``step()`` paired ``c g_avg`` with ``g1 - g2`` as accumulated, so its
    beta is ``c`` times and its s_proj ``1/c`` times that of ``(c g1, c g2)``; eta and the KL terms are the same.
    """
    out: Dict[str, float] = {"fallback": float(record.fallback)}
    if not record.results:
        return out
    names = list(record.results)
    stacked = torch.stack(
        [torch.stack([getattr(record.results[n].stats, f).float() for f in STAT_FIELDS]) for n in names]
    )
    if record.diff_ratio is not None:
        c = record.diff_ratio.float().to(stacked.device)
        stacked[:, :3] *= torch.stack([torch.where(c > 0, 1 / c, 1.0), torch.ones_like(c), c])
    stacked = stacked.cpu()
    for i, name in enumerate(names):
        for j, f in enumerate(STAT_FIELDS):
            out[f"{name}/{f}"] = float(stacked[i, j])
    means, sums = stacked.mean(0), stacked.sum(0)
    for j, f in enumerate(STAT_FIELDS):
        out[f"{f}_mean" if j < 3 else f] = float(means[j] if j < 3 else sums[j])
    out.update(_damping_range([r.damping for r in record.results.values()]))
    if record.kl_clip_scale is not None:
        out["kl_clip_scale"] = float(record.kl_clip_scale)
    return out


def _damping_range(values: list[Union[float, Tensor]]) -> Dict[str, float]:
    """``damping_min``/``damping_max`` over the layers' lambda (floats, or 0-dim tensors read in one transfer)."""
    if not any(torch.is_tensor(v) for v in values):
        return {"damping_min": min(values), "damping_max": max(values)}
    lams = torch.stack([torch.as_tensor(v) for v in values]).float()
    low, high = torch.stack([lams.min(), lams.max()]).cpu()
    return {"damping_min": float(low), "damping_max": float(high)}
