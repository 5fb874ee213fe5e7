"""What the demo's figure depends on: its main job run for several seeds and torch thread counts.

Runs ``examples/run_image_classification.py`` (the job of ``scripts/demo.sh``, on its defaults) once per seed and
thread count, each in a fresh process, and prints one row per run (final accuracy, seconds of training as the
Trainer reports them, wall seconds of the process, the machine's 1-minute load average before and after) and the
range over all runs:

    python scripts/demo_spread.py --seeds 0 1 2 --threads 1 2

``--threads t`` sets both the script's ``--num_threads t`` (torch's thread count; the demo's default is 1) and
``OMP_NUM_THREADS=t``. Arguments after ``--`` go to the example unchanged (e.g. ``-- --fop_momentum 0.9``). Writes
``<out>/demo_spread.json`` with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "run_image_classification.py")
RUNTIME = re.compile(r"'train_runtime': '?([0-9.]+)")


def run_one(seed: int, threads: int, out: str, extra: Sequence[str]) -> Dict[str, Any]:
    """One run of the demo's job in a fresh process; returns its final metrics, seconds and load averages."""
    folder = os.path.join(out, f"seed{seed}_threads{threads}")
    cmd = [sys.executable, SCRIPT, "--output_dir", folder, "--seed", str(seed), "--num_threads", str(threads),
           "--report_to", "none", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    with open(os.path.join(folder, "final_results.json")) as f:
        metrics = json.load(f)
    runtime = RUNTIME.findall(done.stdout)
    return {"seed": seed, "threads": threads, "accuracy": metrics["final_accuracy"], "loss": metrics["final_loss"],
            "train_seconds": float(runtime[-1]) if runtime else None, "wall_seconds": wall,
            "load_before": load_before, "load_after": os.getloadavg()[0], "command": cmd}


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, float]:
    """Range (min, max) and mean of the accuracy and of the seconds over ``runs``."""
    acc = [r["accuracy"] for r in runs]
    wall = [r["wall_seconds"] for r in runs]
    train = [r["train_seconds"] for r in runs if r["train_seconds"] is not None]
    out = {"runs": len(runs), "accuracy_min": min(acc), "accuracy_max": max(acc), "accuracy_mean": sum(acc) / len(acc),
           "wall_seconds_min": min(wall), "wall_seconds_max": max(wall)}
    if train:
        out.update(train_seconds_min=min(train), train_seconds_max=max(train))
    return out


def main(argv: List[str]) -> Dict[str, Any]:
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="values of --seed (model init, data order)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch / OpenMP thread counts, >= 1")
    parser.add_argument("--out", default="out/demo_spread", help="folder for the runs and demo_spread.json")
    opts = parser.parse_args(own)
    if min(opts.threads) < 1:
        parser.error(f"--threads {opts.threads} is invalid: every thread count must be an integer >= 1.")
    runs = []
    for threads in opts.threads:
        for seed in opts.seeds:
            runs.append(run_one(seed, threads, opts.out, extra))
            r = runs[-1]
            print(f"seed {seed}, {threads} thread(s): accuracy {r['accuracy']:.4f}, {r['train_seconds']} s training, "
                  f"{r['wall_seconds']:.0f} s wall", flush=True)
    summary = summarize(runs)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "demo_spread.json"), "w") as f:
        json.dump({"extra": extra, "summary": summary, "runs": runs}, f, indent=1)
    print("\n| seed | threads | final accuracy | training s | wall s | load before / after |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['seed']} | {r['threads']} | {r['accuracy']:.4f} | {r['train_seconds']} | {r['wall_seconds']:.0f} | "
              f"{r['load_before']:.1f} / {r['load_after']:.1f} |")
    print(f"\naccuracy {summary['accuracy_min']:.4f}-{summary['accuracy_max']:.4f} (mean {summary['accuracy_mean']:.4f}) "
          f"over {summary['runs']} runs; wall {summary['wall_seconds_min']:.0f}-{summary['wall_seconds_max']:.0f} s")
    return {"summary": summary, "runs": runs}


if __name__ == "__main__":
    main(sys.argv[1:])
