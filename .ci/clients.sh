#!/usr/bin/env bash
# The libraries people fine-tune and deploy timm models with, installed from the package index (the clients extra)
# into the project's venv and run for real: transformers (4.57.6, then the current 5.x), segmentation_models_pytorch,
# torchvision's detection models, int8 by NNCF -> OpenVINO and ONNX Runtime's quantize_static.
# SMPCONV_REQUIRE_CLIENTS=1: a missing library fails instead of skipping.
# Usage: .ci/clients.sh [PYTHON]   (default: .venv/bin/python of this repo)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-$repo/.venv/bin/python}"
cd "$repo"
versions() {
    "$python" - <<'PY'
from importlib.metadata import version
print(', '.join(f'{n} {version(n)}' for n in ('torch', 'torchvision', 'timm', 'huggingface_hub', 'transformers',
                                                'segmentation_models_pytorch', 'onnxruntime', 'openvino', 'nncf')))
PY
}
export SMPCONV_REQUIRE_CLIENTS=1
# transformers 4.x first, the release we install beside (it keeps huggingface_hub < 1.0), then the current one on top
# (an upgrade leaves no package behind that needs the newer huggingface_hub, a downgrade can)
"$python" -m pip install -q -e ".[dev,clients]" "transformers==4.57.6"
"$python" -m pip check
versions
"$python" -m pytest -q -p no:cacheprovider -m clients
"$python" -m pip install -q -U transformers
"$python" -m pip check
versions
"$python" -m pytest -q -p no:cacheprovider -m clients tests/test_transformers.py
