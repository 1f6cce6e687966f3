#!/usr/bin/env bash
# Set up a virtual environment and run the test suite (what CI runs). With no arguments it then runs the
# checks beyond pytest: the type check, the strict docs build and the wheel/sdist in a clean venv.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_venv.sh test
python -m pytest -q "$@"   # includes tests/test_examples.py: every script in examples/ on a tiny model
[ $# -eq 0 ] || exit 0
step() { local t0=$SECONDS; "$@"; echo "[$(( SECONDS - t0 )) s] $*"; }
step bash scripts/test_older_peft.sh              # the tests that compare with PEFT, again on PEFT 0.21
step mypy                                          # src/rankwise and src/rankwise_harness, configured in pyproject.toml
step env NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$(mktemp -d)"   # broken link/ref/docstring fails
step bash scripts/wheel_check.sh                   # the wheel alone, then the sdist, in a clean venv
