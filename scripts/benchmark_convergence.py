"""Convergence benchmark: SGD, AdamW, K-FAC and FOP on scikit-learn digits (the paper's Table 1 / Figure 2 in miniature).

For every model (a small HF ViT and an MLP) and batch size (small up to the whole
training split) every optimizer is tuned on the validation split over one shared
learning-rate grid (and one shared damping grid for K-FAC and FOP), with seed 0.
The chosen settings are rerun with more seeds; the report gives epochs and
training seconds to a target *test* accuracy (mean and std over the seeds that
reach it), final accuracies, accuracy-vs-time and accuracy-vs-damping plots, and
the beta* / eta* ablations of FOP at the largest batch size.

K-FAC is ``FOP(mode="kfac")`` fed one plain backward of the whole batch; FOP is
fed the two halves of the batch through ``opt.sub_batch(0)`` / ``opt.sub_batch(1)``.
The ablations run FOP's two-sub-batch path with ``use_beta=False`` (the K-FAC
direction) or ``use_eta=False``.

Usage::

    python scripts/benchmark_convergence.py            # full run, writes docs/
    python scripts/benchmark_convergence.py --quick --out /tmp/x
    python scripts/benchmark_convergence.py --device cuda   # larger models, longer runs

Seconds are wall-clock seconds of the training steps only (evaluation excluded),
measured with ``torch.set_num_threads(--threads)`` in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_lib.common import finite_json, write_markdown_section  # noqa: E402
from bench_lib.convergence.grid import make_settings  # noqa: E402
from bench_lib.convergence.render import plot, render_markdown  # noqa: E402
from bench_lib.convergence.runner import run_benchmark  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny grid and short runs (about 1 min on 2 CPU cores)")
    p.add_argument("--smoke", action="store_true", help="the quick run's code paths in a few seconds (for tests)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (cuda sizes up models, grid and runs)")
    p.add_argument("--out", default="docs", help="folder for the JSON and PNGs (default: docs)")
    p.add_argument("--markdown", default=None, help="markdown file to update (default: OUT/benchmarks.md)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--from-json", default=None, help="only re-render the markdown and PNGs from a saved results JSON")
    args = p.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r} is invalid: expected 'cpu' or 'cuda'.")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was given but torch.cuda.is_available() is False on this machine.")
    if args.threads < 1:
        p.error(f"--threads {args.threads} is invalid: expected an integer >= 1.")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    profile = "smoke" if args.smoke else "quick" if args.quick else ("cuda" if device.type == "cuda" else "full")
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        profile = report["meta"]["settings"]["profile"]
    else:
        report = run_benchmark(make_settings(profile), device)
        given = list(sys.argv[1:] if argv is None else argv)
        report["meta"]["command"] = " ".join(["python scripts/benchmark_convergence.py"] + given)
    suffix = "" if profile == "full" else f"_{profile}"
    files = plot(report, args.out, suffix)
    json_path = args.from_json or os.path.join(args.out, f"convergence_results{suffix}.json")
    if not args.from_json:
        with open(json_path, "w") as f:
            json.dump(finite_json(report), f, indent=1, allow_nan=False)
    md_path = args.markdown or os.path.join(args.out, "benchmarks.md")
    key = "convergence" if profile == "full" else f"convergence-{profile}"
    write_markdown_section(md_path, key, render_markdown(report, files))
    print(f"wrote {json_path}, {md_path}, " + ", ".join(files.values()))
    return report


if __name__ == "__main__":
    main()
