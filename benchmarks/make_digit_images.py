"""Write scikit-learn's 8x8 digits as PNG files: a small set of real images for ``smpconv-timm erf``.

    python benchmarks/make_digit_images.py OUT_DIR [--count N]

Grey levels 0..16 are scaled to 0..255; ``smpconv-timm erf`` resizes them (bicubic) to the model input.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir')
    parser.add_argument('--count', type=int, default=8, help='number of images, the first N digits (default 8)')
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    for i in range(args.count):
        image = (digits.images[i] / 16. * 255.).round().astype(np.uint8)
        Image.fromarray(image).save(out / f'digit_{i:03d}_label{digits.target[i]}.png')
    print(f'wrote {args.count} images to {out}')


if __name__ == '__main__':
    main()
