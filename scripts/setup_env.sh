#!/usr/bin/env bash
# Installs hf_fop and everything its demo, tests and benchmarks need, into the interpreter scripts/python_env.sh picks
# ($PYTHON, else the active virtual environment, else .venv when the system Python is externally managed, else python3).
# torch is pinned to the CPU build that lies on this machine's disk; plain
# `pip install torch` would fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "torch==2.13.0" || "$PYTHON" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
"$PYTHON" -m pip install -q -e ".[test,bench]"
