#!/usr/bin/env bash
# Set up (idempotent) and run the main job on its embedded default (no network, no Hub):
# FOPTrainer trains a small ViT on scikit-learn's digits and prints the test accuracy.
# Extra arguments go to examples/run_image_classification.py (e.g. --fop_optimizer kfac, --streaming --max_steps 300).
# One interpreter for set-up and run: scripts/python_env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PYTHON" examples/run_image_classification.py --output_dir out/vit_digits "$@"
