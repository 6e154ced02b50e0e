#!/usr/bin/env bash
# timm's own validate.py, benchmark.py and train.py, unmodified, on the smpconv models of an installed smpconv-timm:
# no `import smpconv_timm`, no wrapper, no --device-modules for the models (train.py gets the config check module).
# A tiny ImageFolder of random images (2 classes, 64 x 64) is made for it. The scripts are not in timm's wheel or
# sdist: give a checkout of the timm repository (pytorch-image-models), at or near the installed timm's version.
# Usage: .ci/timm_scripts.sh PYTHON TIMM_REPO
set -euo pipefail
python="$1"
timm_repo="$(cd "$2" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/timm-scripts.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"  # nothing of the checkout on the path

"$python" - <<'PY'
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for split in ('train', 'val'):
    for label in ('a', 'b'):
        for i in range(4):
            path = f'data/{split}/{label}/{i}.png'
            __import__('os').makedirs(__import__('os').path.dirname(path), exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
PY
small=(--device cpu --model smpconv_t --num-classes 2 --img-size 64 --model-kwargs 'depths=(1,1,1,1)' 'dims=(16,16,16,16)'
       'kernel_sizes=(7,7,5,5)')

echo "== timm benchmark.py (inference, then --reparam)"
for extra in "" "--reparam"; do
    "$python" "$timm_repo/benchmark.py" "${small[@]}" --bench inference -b 2 --num-warm-iter 1 --num-bench-iter 5 \
        $extra > bench.log 2>&1 || { cat bench.log; exit 1; }
    grep -q "\"infer_samples_per_sec\"" bench.log || { cat bench.log; exit 1; }
done
echo "== timm train.py (1 epoch, with the config check module)"
"$python" "$timm_repo/train.py" --data-dir data "${small[@]}" -b 4 --epochs 1 --workers 0 --output out \
    --experiment run --device-modules smpconv_timm.train_check > train.log 2>&1 || { cat train.log; exit 1; }
checkpoint="$(ls out/run/model_best.pth.tar)"
echo "== timm validate.py (the checkpoint train.py wrote, then --reparam)"
for extra in "" "--reparam"; do
    "$python" "$timm_repo/validate.py" --data-dir data/val "${small[@]}" --checkpoint "$checkpoint" -b 4 --workers 0 \
        $extra > validate.log 2>&1 || { cat validate.log; exit 1; }
    grep -q "\"top1\"" validate.log || { cat validate.log; exit 1; }
done
echo "timm's benchmark.py, train.py and validate.py ran on smpconv_t with no import or wrapper"
