"""Import a repository script (``scripts/`` or ``examples/``) as a module, for the tests of that script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_script(folder: str, name: str) -> ModuleType:
    """Execute ``ROOT/<folder>/<name>.py`` afresh as module ``name``, registered in ``sys.modules`` (dataclasses resolve
    annotations through it); the folder goes on ``sys.path`` so that the script's imports of its siblings work."""
    where = str(ROOT / folder)
    if where not in sys.path:
        sys.path.insert(0, where)
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
