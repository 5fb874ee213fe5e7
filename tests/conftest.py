"""Test ordering for the parallel run (scripts/test.sh: pytest-xdist, ``--dist loadgroup``).

Workers take tests in collection order, so the long ones (multi-process launches, the pretrained fine-tune) are
collected first and the short ones fill the end: both workers finish at about the same time. Only the order changes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List

import pytest

# the examples' support package (fop_examples) lives beside the scripts, as in transformers' examples; the benchmarks'
# (bench_lib) beside theirs
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

# child processes (examples, scripts, launchers) import this tree's hf_fop, not whatever an install left on the path
_ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join([_ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))

LONG_MODULES = ("test_distributed.py", "test_examples.py", "test_accelerate_loop.py")
"""Modules made mostly of real 2- and 3-process runs."""


def _rank(item: pytest.Item) -> int:
    if item.get_closest_marker("slow") is not None:
        return 0
    return 1 if item.fspath.basename in LONG_MODULES else 2


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: List[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: the order inside each rank is the files' own
