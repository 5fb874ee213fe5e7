"""The package's architecture as data: every module's layer, imports that point down only, no cycle, and a core that
imports no HuggingFace library (read from the source with ``ast``); and the public names, old module paths included."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_fop"

LAYERS: Dict[str, float] = {
    # core: pure math and state, then the optimizer that orchestrates them
    "fop_math": 0,
    "profiling": 0,
    "config": 0.5,  # validates against fop_math's PROJECTION_METRICS
    "curvature": 1,
    "refresh": 1.5,
    "preconditioner": 2,
    "gradients": 2,
    "adamw": 2,
    "diagnostics": 2,
    # distribution behind one interface (knows the core's parts, never the optimizer)
    "distributed.collectives": 3.0,
    "distributed.interface": 3.1,
    "distributed.comm_hook": 3.1,
    "distributed.replicated": 3.2,
    "distributed.specialists": 3.2,
    "distributed.reducer": 3.3,
    "distributed": 3.4,
    "optimizer": 4,
    # the HuggingFace front ends
    "integrations": 5.0,
    "integrations.routing": 5.0,
    "integrations.arguments": 5.0,
    "integrations.checkpoints": 5.0,
    "integrations.accelerate": 5.1,
    "integrations.trainer": 5.1,
    # the package's face and the re-exports of moved modules
    "trainer": 6,
    "arguments": 6,
    "routing": 6,
    "accelerate_loop": 6,
    "specialists": 6,
    "": 7,
}
"""Module (dotted, relative to hf_fop; "" is hf_fop/__init__) -> layer. An import must point to a lower layer."""

CORE_MAX_LAYER = 4
HF_LIBRARIES = {"transformers", "accelerate", "datasets", "evaluate", "peft", "safetensors"}


def _modules() -> Dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: Set[str]) -> Dict[str, Set[str]]:
    """``{"package": intra-package modules imported, "external": top-level external packages}``, anywhere in the file
    (function-level imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    base = here if is_package else here[:-1]
    inside: Set[str] = set()
    external: Set[str] = set()

    def resolve(dotted: str) -> None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        inside.add(dotted)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "hf_fop" or alias.name.startswith("hf_fop."):
                    resolve(alias.name[len("hf_fop.") :] if "." in alias.name else "")
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
                if module == "hf_fop" or module.startswith("hf_fop."):
                    prefix = module[len("hf_fop.") :] if "." in module else ""
                    for alias in node.names:
                        resolve(f"{prefix}.{alias.name}".strip("."))
                else:
                    external.add(module.split(".")[0])
                continue
            anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            prefix = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                resolve(f"{prefix}.{alias.name}".strip("."))
    inside.discard(name)
    return {"package": inside, "external": external}


GRAPH = {name: _imports(name, path, set(_modules())) for name, path in _modules().items()}


def test_every_module_has_a_layer():
    assert set(GRAPH) == set(LAYERS), (
        f"modules without a layer: {sorted(set(GRAPH) - set(LAYERS))}; layers without a module: "
        f"{sorted(set(LAYERS) - set(GRAPH))} (place new modules in tests/test_architecture.py's LAYERS)"
    )


def test_imports_point_down_only():
    upward = [
        f"{src or 'hf_fop'} (layer {LAYERS[src]}) imports {dst or 'hf_fop'} (layer {LAYERS[dst]})"
        for src, deps in GRAPH.items()
        for dst in deps["package"]
        if LAYERS[dst] >= LAYERS[src]
    ]
    assert not upward, upward


def test_no_import_cycle():
    """Depth-first search for a back edge (independent of the layer numbers, in case two share one)."""
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]["package"]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(m or "hf_fop" for m in cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_core_imports_no_huggingface_library():
    core = [name for name in GRAPH if LAYERS[name] <= CORE_MAX_LAYER]
    assert "optimizer" in core and "distributed.reducer" in core
    offending = {name: sorted(GRAPH[name]["external"] & HF_LIBRARIES) for name in core}
    assert not {k: v for k, v in offending.items() if v}, offending


@pytest.mark.parametrize(
    "old, new, names",
    [
        ("trainer", "integrations.trainer", ["FOPTrainer"]),
        ("arguments", "integrations.arguments", ["FOPTrainingArguments", "parse_fop_args"]),
        ("routing", "integrations.routing", ["route_window", "weigh"]),
        ("accelerate_loop", "integrations.accelerate", ["attach_accelerate", "sub_batches", "router_of"]),
        ("specialists", "distributed.specialists", ["SpecialistCurvature", "assign_owners", "layer_cost", "owner_loads"]),
    ],
)
def test_modules_that_moved_keep_their_old_import_paths(old, new, names):
    """The public API stays: code written against a module's old path gets the same objects from the new one."""
    import importlib

    before, after = importlib.import_module(f"hf_fop.{old}"), importlib.import_module(f"hf_fop.{new}")
    for name in names:
        assert getattr(before, name) is getattr(after, name), (old, name)


def test_the_package_exports_the_documented_names():
    import hf_fop

    for name in ("FOP", "FOPConfig", "FOPTrainer", "FOPTrainingArguments", "attach_accelerate", "sub_batches"):
        assert getattr(hf_fop, name).__name__ == name
