#!/usr/bin/env bash
# timm's own model test suite (tests/test_models.py from the sdist of the installed timm) on smpconv_*.
# Usage: .ci/timm_model_tests.sh [PYTHON]   (default: .venv/bin/python of this repo)
# TIMM_SDIST=/path/to/timm-X.tar.gz uses a local sdist (must be the installed version) instead of downloading it.
# Tests listed in .ci/timm_suite_deselect.txt (with reasons) are deselected by name.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-$repo/.venv/bin/python}"
[[ "$python" == /* ]] || python="$PWD/$python"  # absolute, not resolved: a venv's python is a symlink
deselect_file="$repo/.ci/timm_suite_deselect.txt"

version="$("$python" -c 'import timm; print(timm.__version__)')"
work="$(mktemp -d "${TMPDIR:-/tmp}/timm-suite.XXXXXX")"
trap 'rm -rf "$work"' EXIT

sdist="${TIMM_SDIST:-}"
if [[ -z "$sdist" ]]; then
    "$python" -m pip download -q --no-binary :all: --no-deps "timm==$version" -d "$work/dl"
    sdist="$(ls "$work"/dl/timm-*.tar.gz)"
fi
case "$(basename "$sdist")" in
    "timm-$version.tar.gz") ;;
    *) echo "error: $sdist is not the sdist of the installed timm $version" >&2; exit 1 ;;
esac
# tests/ plus timm's pyproject.toml (its pytest markers); the timm package itself is the installed one
tar -xzf "$sdist" -C "$work" --strip-components=1 "timm-$version/tests" "timm-$version/pyproject.toml"
suite="$work/tests/test_models.py"

# smpconv joins the model modules with forward_intermediates / FeatureGetterNet support
"$python" - "$suite" <<'PY'
import sys
path = sys.argv[1]
src = open(path).read()
anchor = 'FEAT_INTER_FILTERS = ['
if src.count(anchor) != 1:
    sys.exit(f'error: {anchor!r} found {src.count(anchor)} times in {path}; timm changed its test suite')
open(path, 'w').write(src.replace(anchor, anchor + "\n    'smpconv',", 1))
PY

args=()
names=()
while IFS= read -r line; do
    [[ -z "${line// }" || "$line" == \#* ]] && continue
    name="${line%% -- *}"
    if [[ "$name" == "$line" || -z "${line#* -- }" || "$name" == *" "* ]]; then
        echo "error: $deselect_file: '$line' is not '<test name> -- <reason>'" >&2; exit 1
    fi
    names+=("$name")
    args+=(--deselect "tests/test_models.py::$name[")
done < "$deselect_file"

cd "$work"  # rootdir = $work (timm's pyproject.toml), so the node ids are tests/test_models.py::...
pytest=("$python" -m pytest tests/test_models.py -c pyproject.toml -p smpconv_timm -p no:cacheprovider -k smpconv)

# the models must be collected: both variants, the same tests for each, forward_intermediates among them
"${pytest[@]}" --collect-only -q > collected.txt || { cat collected.txt; exit 1; }
"$python" - collected.txt "${names[@]}" <<'PY'
import re, sys
ids = [l.strip() for l in open(sys.argv[1]) if l.startswith('tests/test_models.py::')]
deselect = set(sys.argv[2:])
per_model = {}
for i in ids:
    m = re.fullmatch(r'tests/test_models\.py::(\w+)\[(?:.*-)?(smpconv_\w+?)(?:\.\w+)?\]', i)
    if m is None:
        sys.exit(f'error: unexpected test id {i}')
    per_model.setdefault(m.group(2), set()).add(m.group(1))
tests = per_model.get('smpconv_t', set())
if sorted(per_model) != ['smpconv_b', 'smpconv_t'] or per_model['smpconv_b'] != tests:
    sys.exit(f'error: expected the same tests for smpconv_t and smpconv_b, got {per_model}')
if 'test_model_forward_intermediates' not in tests:
    sys.exit('error: test_model_forward_intermediates not collected: the FEAT_INTER_FILTERS patch had no effect')
n_run = sum(not any(i.startswith(f'tests/test_models.py::{d}[') for d in deselect) for i in ids)
print(f'collected {len(ids)} tests on smpconv_t / smpconv_b ({len(tests)} test functions each), '
      f'{len(ids) - n_run} deselected, {n_run} to run')
for name in sorted(deselect - tests):
    print(f'note: {name} (deselect list) is not collected here')
PY

"${pytest[@]}" -q -rfE --durations=10 "${args[@]}"
