#!/usr/bin/env bash
# Set up a virtual environment and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_venv.sh test
python -m pytest -q "$@"
