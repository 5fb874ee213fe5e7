"""Two sensitivity-benchmark results side by side: did a configuration change (``--config``) move the stable areas
or the default cell?

    python scripts/compare_sensitivity.py docs/sensitivity_results.json \\
        docs/sensitivity_capture2048/sensitivity_results.json [--out comparison.md]

Prints markdown: for every K-FAC/FOP (dataset, model, variant) the stable area of the largest batch's grid and,
per batch of the ladder grid, reached / cells (diverged) in A and in B, the rows that differ marked; then the
default cell's epochs to target (mean of the seeds that reach it; reached / seeds) at every batch. Only what both
results hold is compared; a run that is missing in one of them is left out, and the counts say how many.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_lib.sensitivity.analysis import analyse  # noqa: E402

Key = Tuple[Any, ...]


def _label(optimizer: str, variant: Optional[str]) -> str:
    return f"{optimizer}[{variant}]" if variant else optimizer


def _config(report: Dict[str, Any]) -> str:
    config = report["meta"].get("settings", {}).get("config") or {}
    return " ".join(f"{k}={v}" for k, v in config.items()) or "shipped defaults"


def area_rows(a: Dict[str, Any], b: Dict[str, Any], batches: Dict[str, List[int]]) -> List[Tuple[Key, str, str]]:
    """``(key, A's text, B's text)`` per curvature (dataset, model, optimizer, variant, batch); batch ``None`` is the
    largest batch's full grid (``batches``: the settings' batch ladder per dataset)."""
    analysis_batches = batches
    def table(analysis: Dict[str, Any]) -> Dict[Key, str]:
        out: Dict[Key, str] = {}
        for r in analysis["areas"]:
            if r["optimizer"] in ("kfac", "fop") and r["complete"]:
                out[(r["dataset"], r["model"], _label(r["optimizer"], r["variant"]), None)] = (
                    f"{r['reached']}/{r['cells']} ({r['diverged']})")
        largest = {d: max(b) for d, b in analysis_batches.items()}
        for r in analysis["batch_areas"]:
            if r["optimizer"] in ("kfac", "fop") and r["cells"] == r["expected"] and r["batch"] != largest[r["dataset"]]:
                out[(r["dataset"], r["model"], _label(r["optimizer"], r["variant"]), r["batch"])] = (
                    f"{r['reached']}/{r['cells']} ({r['diverged']})")
        return out

    ta, tb = table(a), table(b)
    return [(k, ta[k], tb[k]) for k in ta if k in tb]


def default_rows(a: Dict[str, Any], b: Dict[str, Any]) -> List[Tuple[Key, str, str]]:
    """``(key, A's text, B's text)`` of the default cell per (dataset, model, optimizer, batch)."""
    def table(analysis: Dict[str, Any]) -> Dict[Key, str]:
        out: Dict[Key, str] = {}
        for s in analysis["summaries"]:
            if s["is_default"] and s["optimizer"] in ("kfac", "fop"):
                epochs = s["epochs_to_target"]
                text = "-" if epochs is None else f"{epochs[0]:.1f} +- {epochs[1]:.1f}"
                out[(s["dataset"], s["model"], _label(s["optimizer"], s["variant"]), s["batch"])] = (
                    f"{text} ({s['reached']}/{s['seeds']})")
        return out

    ta, tb = table(a), table(b)
    return [(k, ta[k], tb[k]) for k in ta if k in tb]


def render(report_a: Dict[str, Any], report_b: Dict[str, Any], name_a: str, name_b: str) -> str:
    a, b = analyse(report_a), analyse(report_b)
    areas, defaults = area_rows(a, b, report_a["meta"]["settings"]["batches"]), default_rows(a, b)
    changed = sum(x != y for _, x, y in areas)
    lines = [
        f"A: `{name_a}` ({_config(report_a)}, {len(report_a['runs'])} runs); "
        f"B: `{name_b}` ({_config(report_b)}, {len(report_b['runs'])} runs).",
        "",
        f"Stable area, reached / cells (diverged), K-FAC and FOP: {len(areas)} rows both hold, {changed} differ (**bold**). "
        "Batch 'grid' is the largest batch's full grid; the others are the ladder grid's smaller batches.",
        "",
        "| dataset | model | optimizer | batch | A | B |",
        "|---|---|---|---|---|---|",
    ]
    for (dataset, model, opt, batch), x, y in sorted(areas, key=lambda r: tuple(str(v) for v in r[0])):
        mark = "**" if x != y else ""
        lines.append(f"| {dataset} | {model} | {opt} | {'grid' if batch is None else batch} | {mark}{x}{mark} | {mark}{y}{mark} |")
    lines += ["", "Default cell, epochs to target (mean +- std over the seeds that reach it; reached / seeds):", "",
              "| dataset | model | optimizer | batch | A | B |", "|---|---|---|---|---|---|"]
    for (dataset, model, opt, batch), x, y in sorted(defaults, key=lambda r: tuple(str(v) for v in r[0])):
        lines.append(f"| {dataset} | {model} | {opt} | {batch} | {x} | {y} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="results JSON A (e.g. docs/sensitivity_results.json)")
    p.add_argument("b", type=Path, help="results JSON B (a run with --config)")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    args = p.parse_args(argv)
    for f in (args.a, args.b):
        if not f.is_file():
            p.error(f"no such results file: {f}")
    text = render(json.loads(args.a.read_text()), json.loads(args.b.read_text()), str(args.a), str(args.b))
    print(text)
    if args.out:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
