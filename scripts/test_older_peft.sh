#!/usr/bin/env bash
# The tests that compare with HF PEFT, run again against the oldest PEFT the test extra allows (0.21), beside the
# newest one the test venv has: PEFT 0.21 and 0.22 read conv layers, modules_to_save and MoE targets differently
# (src/rankwise/peft_version.py), and rankwise reads and writes for both. PEFT 0.21 goes into a folder put first on
# PYTHONPATH (its dependencies are the venv's); the test venv itself is left as it is.
#   bash scripts/test_older_peft.sh            # after `. scripts/setup_venv.sh test`
set -euo pipefail
cd "$(dirname "$0")/.."
OLDER=${PEFT_OLDER:-0.21.2}
DIR=${PEFT_OLDER_DIR:-.peft-$OLDER}
[ -f "$DIR/peft/__init__.py" ] || python -m pip install -q --no-deps --target "$DIR" "peft==$OLDER"
PYTHONPATH="$PWD/$DIR${PYTHONPATH:+:$PYTHONPATH}" python -c "import peft, sys; assert peft.__version__ == '$OLDER', peft.__version__"
mapfile -t FILES < <(grep -l "peft\." tests/test_*.py)
PYTHONPATH="$PWD/$DIR${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -q -p no:cacheprovider "${FILES[@]}"
