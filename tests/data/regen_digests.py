#!/usr/bin/env python3
"""Recompute the sha256 digests recorded beside the vendored reference data, from the authors' reference folder.

The data files under tests/data/ are byte-for-byte copies of ``shared/reference/`` (same relative paths). Writes:

- ``tests/data/SHA256SUMS``: sha256 of each vendored file (``cd tests/data && sha256sum -c SHA256SUMS``). A
  vendored file that differs from its ``shared/reference/`` original is an error: copy it over first.
- ``tests/data/golden/GENERATED_SHA256SUMS``: ``golden_weights.arrays_sha256`` of what the authors'
  ``make_weights.py`` returns for each manifest and salt, and for ``make_input(2, 224)``.

Usage: python tests/data/regen_digests.py [--shared PATH/TO/shared] [--data-dir tests/data] [--check]
"""
import argparse
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

DATA = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA.parent))
from golden_weights import arrays_sha256  # noqa: E402

DEFAULT_SHARED = Path(os.environ.get('SMPCONV_SHARED', DATA.parents[2] / 'shared'))
FILE_SUMS = 'SHA256SUMS'
GENERATED_SUMS = 'golden/GENERATED_SHA256SUMS'
# vendored files; the same relative path under tests/data/ and under shared/reference/
VENDORED = [
    'golden/reference_outputs.npz',
    'golden/reference_smpconv_b_manifest.json',
    'golden/reference_smpconv_t_manifest.json',
    'timm_train_args.json',
]
STATE_DICT_CASES = [(v, s) for v in ('t', 'b') for s in ('', 'model')]  # (variant, salt)
INPUT_CASE = (2, 224)  # make_input(batch, size)
GENERATED_HEADER = ('# golden_weights.arrays_sha256 of the arrays the authors\' make_weights.py returns '
                    '(tests/data/regen_digests.py)\n')


def manifest_name(variant: str) -> str:
    return f'reference_smpconv_{variant}_manifest.json'


def state_dict_label(variant: str, salt: str) -> str:
    return f'make_state_dict({manifest_name(variant)}, salt={salt!r})'


def input_label(batch: int, size: int) -> str:
    return f'make_input({batch}, {size})'


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_sums(path) -> Dict[str, str]:
    """``{name: hex digest}`` of a sha256sum-style file (``<hex>  <name>`` lines, ``#`` comments)."""
    sums = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith('#'):
            digest, name = line.split('  ', 1)
            sums[name] = digest
    return sums


def format_sums(sums: List[Tuple[str, str]], header: str = '') -> str:
    return header + ''.join(f'{digest}  {name}\n' for name, digest in sums)


def load_authors_generator(shared: Path):
    path = Path(shared) / 'reference' / 'golden' / 'make_weights.py'
    spec = importlib.util.spec_from_file_location('authors_make_weights', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compute(shared: Path, data_dir: Path = DATA) -> Dict[str, str]:
    """``{sums file relative to data_dir: its text}``, from ``shared/reference``."""
    reference = Path(shared) / 'reference'
    stale = [rel for rel in VENDORED if (data_dir / rel).read_bytes() != (reference / rel).read_bytes()]
    if stale:
        raise SystemExit(f'vendored copies differ from {reference}: {stale}; copy them over first')
    files = [(rel, file_sha256(reference / rel)) for rel in VENDORED]

    authors = load_authors_generator(shared)
    generated = []
    for variant, salt in STATE_DICT_CASES:
        sd = authors.make_state_dict(str(reference / 'golden' / manifest_name(variant)), salt)
        generated.append((state_dict_label(variant, salt), arrays_sha256(sd.items())))
    x = authors.make_input(*INPUT_CASE)
    generated.append((input_label(*INPUT_CASE), arrays_sha256([('input', x)])))
    return {FILE_SUMS: format_sums(files), GENERATED_SUMS: format_sums(generated, GENERATED_HEADER)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--shared', type=Path, default=DEFAULT_SHARED,
                        help='folder holding reference/ (default: $SMPCONV_SHARED or ../shared beside the repo)')
    parser.add_argument('--data-dir', type=Path, default=DATA,
                        help='folder of the vendored data, where the sums files go (default: %(default)s)')
    parser.add_argument('--check', action='store_true', help='write nothing; exit 1 if a recorded digest is stale')
    args = parser.parse_args(argv)

    stale = []
    for rel, text in compute(args.shared, args.data_dir).items():
        path = args.data_dir / rel
        if path.is_file() and path.read_text() == text:
            print(f'{path}: up to date')
        elif args.check:
            stale.append(rel)
            print(f'{path}: stale')
        else:
            path.write_text(text)
            print(f'{path}: written')
    return 1 if stale else 0


if __name__ == '__main__':
    sys.exit(main())
