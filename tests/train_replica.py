"""timm train.py's argument handling, rebuilt from its recorded interface (not a test module).

``tests/data/timm_train_args.json`` records every argparse destination of timm's train.py with its flags,
default, nargs and type (``tests/data/regen_train_args.py`` regenerates it from a timm checkout's train.py).
``build_parsers`` rebuilds train.py's two parsers from it and ``parse_train_args`` replays train.py's
``_parse_args``: the ``-c/--config`` parser first, the YAML mapping through ``parser.set_defaults(**cfg)``, then
the main parser on the remaining command line. Tests read what train.py would run with from the Namespace this
returns, without train.py (it is not in the timm wheel) and without reading data.
"""
import argparse
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import yaml
from timm.utils import ParseKwargs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'train_configs'
TRAIN_ARGS_JSON = ROOT / 'tests' / 'data' / 'timm_train_args.json'

_TYPES = {'int': int, 'float': float, 'str': str, None: None}


def train_args_json() -> Path:
    """The recorded train.py interface (vendored test data)."""
    if not TRAIN_ARGS_JSON.is_file():
        raise FileNotFoundError(f'timm train.py interface missing: {TRAIN_ARGS_JSON}')
    return TRAIN_ARGS_JSON


def load_args(path) -> dict:
    with open(path) as f:
        return json.load(f)['args']


def build_parsers(path) -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(config_parser, parser) as train.py builds them, from the recorded interface."""
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE')
    parser = argparse.ArgumentParser(description='PyTorch ImageNet Training')
    for dest, spec in load_args(path).items():
        flags, default, nargs, type_ = spec['flags'], spec['default'], spec['nargs'], _TYPES[spec['type']]
        if not flags:  # the deprecated positional data dir
            parser.add_argument(dest, nargs=nargs, default=default, type=type_)
        elif nargs == 0:
            parser.add_argument(*flags, dest=dest, action='store_true', default=default)
        elif isinstance(default, dict):  # --model-kwargs / --opt-kwargs key=value pairs
            parser.add_argument(*flags, dest=dest, nargs=nargs, default=default, action=ParseKwargs)
        else:
            parser.add_argument(*flags, dest=dest, nargs=nargs, default=default, type=type_)
    return config_parser, parser


def parse_train_args(path, argv: Sequence[str]) -> argparse.Namespace:
    """The Namespace train.py's ``_parse_args`` returns for ``argv`` (config file applied)."""
    config_parser, parser = build_parsers(path)
    args_config, remaining = config_parser.parse_known_args(list(argv))
    if args_config.config:
        with open(args_config.config) as f:
            parser.set_defaults(**yaml.safe_load(f))
    return parser.parse_args(remaining)


def header_command(config: Path) -> List[str]:
    """The launch command in a config's top comment block, joined across ``\\`` continuations."""
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith('#'):
            break
        lines.append(line[1:].strip())
    first = next(i for i, line in enumerate(lines) if line.startswith(('torchrun ', 'python train.py ')))
    command = []
    for line in lines[first:]:
        command.append(line.rstrip('\\').strip())
        if not line.endswith('\\'):
            break
    return ' '.join(command).split()


def train_py_argv(command: List[str]) -> Tuple[Optional[int], List[str]]:
    """(processes per node or None, the arguments after train.py) of a launch command."""
    nproc = None
    for word in command:
        if word.startswith('--nproc_per_node='):
            nproc = int(word.split('=', 1)[1])
    return nproc, command[command.index('train.py') + 1:]
