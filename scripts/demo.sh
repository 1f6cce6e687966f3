#!/usr/bin/env bash
# Set up a virtual environment and run the main job: LoRA on the packaged MiniLM with real sentiment data.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_venv.sh harness
rankwise demo "$@"
