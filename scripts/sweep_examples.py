"""Grid of learning rate x damping for one example script; prints a markdown table of the final metrics.

The figures of the README section "Fine-tuning at large batch" come from this script, e.g.:

    OMP_NUM_THREADS=1 python scripts/sweep_examples.py run_clm --lr 0.01 0.03 0.1 --damping 1e-3 1e-2 \\
        -- --max_steps 40 --per_device_train_batch_size 64

Arguments after ``--`` go to the example script unchanged (each run gets its own ``--output_dir``).
Also writes ``<out>/sweep_<script>.json`` with every run's final metrics, the last logged FOP diagnostics
and the wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))  # the examples' support package, fop_examples
METRICS = {"run_image_classification": "accuracy", "run_text_classification": "accuracy", "run_clm": "perplexity"}


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_one(name: str, lr: float, damping: float, out: str, extra: List[str]) -> Dict[str, Any]:
    """One training run of example ``name``; returns its final metrics, last FOP diagnostics and seconds."""
    from fop_examples.common import train_and_report

    example = load_example(name)
    argv = ["--output_dir", os.path.join(out, f"{name}_lr{lr:g}_d{damping:g}"), "--learning_rate", str(lr),
            "--fop_damping", str(damping), "--report_to", "none", *extra]
    start = time.perf_counter()
    trainer, evaluation, _ = example.build(argv)
    metrics = train_and_report(trainer, evaluation, METRICS[name], name)
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    diag = {k: v for k, v in (logs[-1] if logs else {}).items() if k.startswith("fop/")}
    return {"lr": lr, "damping": damping, "seconds": seconds, "first_loss": logs[0]["loss"] if logs else None,
            "last_loss": logs[-1]["loss"] if logs else None, **metrics, **diag}


def main(argv: List[str]) -> List[Dict[str, Any]]:
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", choices=sorted(METRICS))
    parser.add_argument("--lr", type=float, nargs="+", required=True, help="learning rates (eta0)")
    parser.add_argument("--damping", type=float, nargs="+", required=True, help="damping values lambda")
    parser.add_argument("--out", default="out/sweep", help="folder for the runs and the JSON summary")
    opts = parser.parse_args(own)
    rows = [run_one(opts.script, lr, d, opts.out, extra) for lr in opts.lr for d in opts.damping]
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, f"sweep_{opts.script}.json"), "w") as f:
        json.dump({"script": opts.script, "extra": extra, "runs": rows}, f, indent=1)
    metric = METRICS[opts.script]
    print(f"\n| lr | damping | first loss | last loss | final {metric} | eval loss | fop/eta | fop/kl_base | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        value = r[f"final_{metric}"]
        print(f"| {r['lr']:g} | {r['damping']:g} | {r['first_loss']:.3f} | {r['last_loss']:.3f} | {value:.4f} | "
              f"{r['final_loss']:.4f} | {r.get('fop/eta', math.nan):.3f} | {r.get('fop/kl_base', math.nan):.3g} | {r['seconds']:.0f} |")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
