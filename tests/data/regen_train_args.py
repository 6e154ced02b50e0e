#!/usr/bin/env python3
"""Regenerate tests/data/timm_train_args.json, timm train.py's argument interface, from a timm checkout's train.py.

train.py's module level builds its parser (``main()`` is not run; the installed timm must import what it needs):
``smpconv_timm.train_check.load_interface`` reads every argparse destination with its flags, default, nargs and
type. The timm version in ``source`` comes from ``timm/version.py`` beside train.py, or ``--timm-version``.

Usage: python tests/data/regen_train_args.py PATH/TO/pytorch-image-models/train.py [-o tests/data/timm_train_args.json]
"""
import argparse
import ast
import json
import sys
from pathlib import Path

from smpconv_timm.train_check import load_interface

DEFAULT_OUT = Path(__file__).resolve().parent / 'timm_train_args.json'
SOURCE = ('train.py of the timm repository (pytorch-image-models), version {version} tree; '
          'argparse destinations with their defaults')


def checkout_version(train_py: Path) -> str:
    """``__version__`` of ``timm/version.py`` beside train.py, read without importing it."""
    version_py = train_py.resolve().parent / 'timm' / 'version.py'
    if not version_py.is_file():
        raise SystemExit(f'{version_py} not found: pass --timm-version')
    for node in ast.parse(version_py.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '__version__' for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f'no __version__ in {version_py}: pass --timm-version')


def interface_json(train_py: Path, version: str) -> str:
    """The file's text: ``{"source", "args": {dest: {"flags", "default", "nargs", "type"}}}``, indent 1."""
    doc = {'source': SOURCE.format(version=version), 'args': load_interface(str(train_py))}
    return json.dumps(doc, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('train_py', type=Path, help="timm's train.py (from the pytorch-image-models repository)")
    parser.add_argument('-o', '--output', type=Path, default=DEFAULT_OUT, help='default: %(default)s')
    parser.add_argument('--timm-version', help='timm version of that train.py (default: its checkout\'s)')
    args = parser.parse_args(argv)

    version = args.timm_version or checkout_version(args.train_py)
    text = interface_json(args.train_py, version)
    old = args.output.read_text() if args.output.is_file() else None
    args.output.write_text(text)
    print(f'{args.output}: {"unchanged" if text == old else "written"} ({len(json.loads(text)["args"])} arguments)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
