#!/usr/bin/env bash
# The package as users get it: sdist built, wheel built from the sdist, the wheel installed (not editable) in a fresh
# venv next to transformers 4.57.6, then
#   - the models found without an import: a fresh interpreter imports nothing at start, `import timm` registers them,
#     SMPCONV_AUTOLOAD=0 does not;
#   - the sdist's own test suite (`-m "not slow"`) against the installed wheel (its hf-hub: and local-dir: tests
#     use no `import smpconv_timm`);
#   - co-installation: resolver dry runs with transformers==4.57.6 and the current transformers, and both really
#     installed with `import transformers` and the models working after each.
# Usage: .ci/wheel.sh [PYTHON]   (PYTHON: the interpreter that builds; default .venv/bin/python of this repo)
# TIMM_REPO=/path/to/pytorch-image-models (a checkout at the installed timm's tag) also runs timm's own
# validate.py, benchmark.py and train.py on the models, unmodified, with no wrapper.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-$repo/.venv/bin/python}"
[[ "$python" == /* ]] || python="$PWD/$python"
work="$(mktemp -d "${TMPDIR:-/tmp}/smpconv-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT

"$python" -m pip install -q build
"$python" -m build -q --outdir "$work/dist" "$repo"  # the sdist, then the wheel built from it
sdist="$(ls "$work"/dist/smpconv_timm-*.tar.gz)"
wheel="$(ls "$work"/dist/smpconv_timm-*.whl)"
echo "built $(basename "$sdist") and $(basename "$wheel")"

venv="$work/venv"
python3 -m venv "$venv"
py="$venv/bin/python"
# an existing transformers 4.x environment: installing the wheel must keep its huggingface_hub < 1.0
"$venv/bin/pip" install -q "transformers==4.57.6"
"$venv/bin/pip" install -q "$wheel[dev]"
"$venv/bin/pip" check

cd "$work"  # no checkout on the path: what follows sees the installed package only
"$py" - <<'PY'
import subprocess, sys
from importlib.metadata import version
from packaging.version import Version
hub = version('huggingface_hub')
print(f'installed beside transformers {version("transformers")}: huggingface_hub {hub}, timm {version("timm")}, '
      f'torch {version("torch")}')
assert Version(hub) < Version('1.0'), f'installing the wheel moved huggingface_hub to {hub}'

def fresh(code, **env):
    import os
    environ = {k: v for k, v in os.environ.items() if not k.startswith('SMPCONV_')}
    return subprocess.run([sys.executable, '-c', code], env=dict(environ, **env), capture_output=True, text=True,
                          check=True).stdout.strip()

start = fresh('import sys; print(sorted({"torch", "timm", "smpconv_timm"} & set(sys.modules)))')
assert start == '[]', f'imported at start: {start}'
found = fresh('import sys, timm, transformers; m = timm.create_model("smpconv_t"); '
              'import smpconv_timm; print(type(m).__module__, smpconv_timm.__file__)')
assert found.startswith('smpconv_timm.smpconv ') and 'site-packages' in found, found
assert fresh('import timm; print(timm.is_model("smpconv_t"))', SMPCONV_AUTOLOAD='0') == 'False'
print(f'found without an import: {found}; SMPCONV_AUTOLOAD=0 keeps them out')
PY

# the sdist's tests, run against the installed wheel: -P keeps the unpacked source off sys.path
tar -xzf "$sdist" -C "$work"
src="$(ls -d "$work"/smpconv_timm-*/)"
(cd "$src" && "$py" -P -c 'import smpconv_timm, sys; p = smpconv_timm.__file__
sys.exit(0 if "site-packages" in p else f"the sdist tests would import {p}, not the installed wheel")')
(cd "$src" && "$py" -P -m pytest -q -p no:cacheprovider -m 'not slow')

if [[ -n "${TIMM_REPO:-}" ]]; then
    "$repo/.ci/timm_scripts.sh" "$py" "$TIMM_REPO"
fi

# co-installation, resolver only, from nothing: with transformers 4.57.6 and with the current transformers
for spec in "transformers==4.57.6" "transformers"; do
    out="$("$venv/bin/pip" install --dry-run --ignore-installed -q --report - "$spec" "$wheel" 2>/dev/null |
           "$py" -c 'import json, sys
r = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in json.load(sys.stdin)["install"]}
print(" ".join(f"{n} {r[n]}" for n in ("transformers", "huggingface-hub", "timm", "smpconv-timm")))')"
    echo "resolves with $spec: $out"
done
# ... and the current transformers really installed over 4.57.6: both still work
"$venv/bin/pip" install -q -U transformers
"$venv/bin/pip" check
"$py" -c 'import timm, transformers, huggingface_hub
m = timm.create_model("smpconv_t")
print(f"transformers {transformers.__version__}, huggingface_hub {huggingface_hub.__version__}: smpconv_t found")'
