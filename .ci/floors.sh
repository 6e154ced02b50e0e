#!/usr/bin/env bash
# The declared minimum versions (pyproject.toml [project].dependencies, read here so they cannot drift) installed
# in a fresh venv, then the README's test command there. Only what truly needs newer releases is deselected, each
# with its reason printed. Exits non-zero on any failure.
# Usage: .ci/floors.sh [VENV]   (default: /tmp/floor-venv, recreated)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${TMPDIR:-/tmp}/floor-venv}"
cd "$repo"

# every dependency must be 'name>=minimum': pinned to 'name==minimum'; torchvision (needed by timm) is the release
# built for the torch minimum (torchvision 0.N+15 goes with torch 2.N)
pins_text="$(python3 - <<'PY'
import re, sys
try:
    import tomllib
except ImportError:  # python < 3.11
    import tomli as tomllib
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
for dep in deps:
    m = re.fullmatch(r'([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][A-Za-z0-9_.]*)', dep.strip())
    if m is None:
        sys.exit(f'error: dependency {dep!r} is not of the form name>=minimum')
    name, version = m.groups()
    print(f'{name}=={version}')
    if name == 'torch':
        major, minor = (int(x) for x in version.split('.')[:2])
        if major != 2:
            sys.exit(f'error: no torchvision mapping for torch {version}')
        print(f'torchvision==0.{minor + 15}.*')
PY
)"
mapfile -t pins <<< "$pins_text"
echo "floors: ${pins[*]}"

if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
    echo "error: $venv exists and is not a venv" >&2; exit 1
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "${pins[@]}" -e ".[dev]"
# the installed versions must be the minimums themselves
"$venv/bin/python" - "${pins[@]}" <<'PY'
import sys
from importlib.metadata import version
from packaging.specifiers import SpecifierSet
bad = []
for pin in sys.argv[1:]:
    name, want = pin.split('==')
    got = version(name)
    ok = got.split('+')[0] in SpecifierSet(f'=={want}')  # '+cu121': a local build of that release
    print(f'{name} {got}' + ('' if ok else f'  <- wanted {want}'))
    bad += [] if ok else [name]
if bad:
    sys.exit(f'error: not installed at the minimum: {bad}')
PY

# ONNX export (torch.onnx.export(dynamo=True)) needs torch >= 2.5: torch 2.4's dynamo exporter (torch.onnx.dynamo_export)
# rejects every aten op with current onnxscript ("Unsupported FX nodes"); the models themselves work on torch 2.4
deselect=()
if "$venv/bin/python" -c 'import sys, torch; from packaging.version import Version
sys.exit(Version(torch.__version__).release >= (2, 5))'; then
    echo "floors: deselected tests/test_reparam.py::test_onnx_export and tests/test_int8.py (ONNX export needs torch >= 2.5)"
    deselect+=(--deselect tests/test_reparam.py::test_onnx_export --deselect tests/test_int8.py)
fi
"$venv/bin/python" -m pytest -q -p no:cacheprovider -rfEs -m 'not slow' "${deselect[@]}"
