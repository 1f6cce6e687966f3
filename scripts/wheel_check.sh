#!/usr/bin/env bash
# The package as `pip install rankwise` gives it: build the wheel and sdist, install the wheel ALONE (no
# extras) into a clean venv, and check the library (save -> load -> export_peft on a tiny model), every CLI
# subcommand's --help, and the one-line "install rankwise[harness]" message; then the same venv with the
# sdist instead. Also: LICENSE in both archives, py.typed in the wheel. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m build --sdist --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/rankwise-*.whl) sdist=$(ls "$work"/dist/rankwise-*.tar.gz)
python - "$wheel" "$sdist" <<'PY'
import sys, tarfile, zipfile
wheel = zipfile.ZipFile(sys.argv[1]).namelist()
sdist = tarfile.open(sys.argv[2]).getnames()
assert "rankwise/py.typed" in wheel, "py.typed missing from the wheel"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel), "LICENSE missing from the wheel"
assert any(n.endswith("/LICENSE") for n in sdist), "LICENSE missing from the sdist"
PY
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
pip_q() { "$py" -m pip install -q "$@" >"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }; }
pip_q "torch==2.13.0"      # CPU torch, as scripts/setup_venv.sh installs it
pip_q "$wheel"             # the wheel alone: its declared dependencies, no extras

smoke() {  # the library on a tiny model, the CLI without the harness extra
  noise=$(cd "$work" && "$py" -c "import rankwise" 2>&1)   # e.g. torch's 'Failed to initialize NumPy' warning
  [ -z "$noise" ] || { echo "import rankwise printed: $noise"; exit 1; }
  (cd "$work" && "$py" - <<'PY'
import tempfile, torch
import rankwise
torch.manual_seed(0)
def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
model = tiny()
rankwise.attach(model, rankwise.LoraConfig(r=2, alpha=4, target_modules=["0", "2"]))
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
x = torch.randn(5, 8)
for _ in range(3):
    model(x).pow(2).mean().backward(); opt.step(); opt.zero_grad(); rankwise.step(model, opt)
out = tempfile.mkdtemp()
rankwise.save(model, out + "/adapter")
loaded = rankwise.load(tiny(), out + "/adapter")
assert torch.equal(loaded(x), model(x)), "save -> load changed the outputs"
rankwise.export_peft(model, out + "/peft")
print("wheel-alone library: save, load, export_peft ok")
PY
  )
  rw="$work/venv/bin/rankwise"
  "$rw" --help >/dev/null
  for cmd in finetune compare methods tasks export import demo; do "$rw" "$cmd" --help >/dev/null; done
  for cmd in methods tasks; do
    set +e; err=$("$rw" "$cmd" 2>&1 >/dev/null); rc=$?; set -e
    [ "$rc" = 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] && [[ "$err" == *"rankwise[harness]"* ]] \
      || { echo "rankwise $cmd without the harness extra: rc=$rc, stderr: $err"; exit 1; }
  done
  echo "wheel-alone CLI: --help of every subcommand, one-line extra message ok"
}
smoke
"$py" -m pip uninstall -q -y rankwise
pip_q "$sdist"             # the sdist, built again from source
smoke
echo "wheel and sdist: ok"
