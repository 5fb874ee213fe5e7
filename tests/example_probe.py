"""Runs an example script with each rank's micro-batches recorded (started by the multi-process example tests).

    python tests/example_probe.py OUT SCRIPT [script arguments...]
    accelerate launch --config_file examples/accelerate_cpu_2proc.yaml tests/example_probe.py OUT SCRIPT ...

Writes ``OUT/rank{r}.pt``: the ``input_ids`` of every micro-batch the rank trained on (in order), the final
metrics and the final parameters.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(out: str, name: str, argv: list) -> None:
    import torch

    from fop_examples.common import train_and_report

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    trainer, evaluation, args = module.build(argv)
    seen = []
    train_step = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        seen.append(inputs["input_ids"].detach().cpu().clone())
        return train_step(model, inputs, num_items_in_batch)

    trainer.training_step = recording_step
    rank, world = args.process_index, args.world_size
    metrics = train_and_report(trainer, evaluation, "loss", name)
    params = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"batches": seen, "metrics": metrics, "params": params, "world_size": world}, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
