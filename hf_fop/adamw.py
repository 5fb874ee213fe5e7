"""The AdamW update of the parameters FOP does not precondition (norms, embeddings, tokens, excluded layers)."""

from __future__ import annotations

from typing import Any, Dict, Set

import torch
from torch import Tensor


def adamw_step(group: Dict[str, Any], state: Dict[Tensor, Dict[str, Any]], decay: Set[int]) -> None:
    """One AdamW step of ``group``'s parameters with a gradient (``torch.optim.AdamW``'s rule, decoupled decay).

    ``state``: the optimizer's per-parameter state (``step`` as a Python int, ``exp_avg``, ``exp_avg_sq``);
    ``decay``: ``id``s of the parameters that get weight decay. The same element-wise operations as the
    per-parameter form, batched with ``torch._foreach_*``.
    """
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    params, grads, avgs, sqs, ts = [], [], [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        entry = state[p]
        if not entry:
            entry["step"] = 0  # a Python int: no tensor to read back
            entry["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            entry["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        entry["step"] += 1
        params.append(p)
        grads.append(p.grad)
        avgs.append(entry["exp_avg"])
        sqs.append(entry["exp_avg_sq"])
        ts.append(entry["step"])
    if not params:
        return
    torch._foreach_lerp_(avgs, grads, 1 - beta1)
    torch._foreach_mul_(sqs, beta2)
    torch._foreach_addcmul_(sqs, grads, grads, value=1 - beta2)
    denoms = torch._foreach_div(sqs, [1 - beta2**t for t in ts])
    torch._foreach_sqrt_(denoms)
    torch._foreach_add_(denoms, eps)
    decayed = [p for p in params if id(p) in decay]
    if wd > 0 and decayed:
        torch._foreach_mul_(decayed, 1 - lr * wd)
    torch._foreach_addcdiv_(params, avgs, denoms, [-lr / (1 - beta1**t) for t in ts])
