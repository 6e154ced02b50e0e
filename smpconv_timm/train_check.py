"""Checks for timm ``train.py`` config files: keys that name no argument, ill-typed values, unknown models.

timm's train.py reads ``--config`` with ``parser.set_defaults(**yaml.safe_load(f))``. argparse keeps a
default whose key names no argument without a word, so a misspelt key (``warmup_epoch: 10``) silently
does nothing and the run trains with another recipe. Two ways to catch that:

- ``validate_train_config(path, interface)``: check a YAML file against train.py's interface without
  running anything. ``interface`` is the ``ArgumentParser`` itself, a path to a ``train.py`` (its module
  level builds the parser; ``main()`` is not run) or a JSON description ``{"args": {dest: {"flags",
  "default", "nargs", "type"}}}``.
- When this module is imported as a device module by timm's train.py (``device_modules:
  [smpconv_timm.train_check]``), ``check_running_train_script()`` runs at import: train.py has parsed its
  arguments but not yet built the model or read any data. It raises ``TrainConfigError`` naming every
  config key that is no train.py argument, every config value of the wrong type (where the command line
  does not override it) and a ``model`` that timm does not know. Anywhere else (no train.py ``__main__``)
  it does nothing. ``import smpconv_timm`` does not import this module: the installed package registers the
  models as soon as train.py imports timm, long before train.py parses its arguments.

Both also refuse a RandAugment policy (``aa``) that can ask Pillow to posterize to 0 bits where the
installed Pillow (>= 13) raises for it: the run would die in a data-loader worker minutes in.
"""
import argparse
import difflib
import json
import os
import runpy
import sys
from typing import Any, Dict, List, Mapping, Optional, Union

__all__ = ['TrainConfigError', 'load_interface', 'config_problems', 'validate_train_config',
           'check_running_train_script']

_TYPES = {'int': int, 'float': float, 'str': str}


class TrainConfigError(ValueError):
    """A timm train.py config that would not train what it says."""


def _spec_from_action(action: argparse.Action) -> Dict[str, Any]:
    type_ = action.type if action.type in (int, float, str) else None
    nargs = action.nargs
    if nargs is None and isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        nargs = 0
    return {
        'flags': list(action.option_strings),
        'default': action.default,
        'nargs': nargs,
        'type': type_.__name__ if type_ else None,
    }


def load_interface(source: Union[str, os.PathLike, argparse.ArgumentParser, Mapping]) -> Dict[str, Dict[str, Any]]:
    """train.py's arguments as ``{dest: {'flags', 'default', 'nargs', 'type'}}``.

    ``source``: an ``ArgumentParser``; a ``train.py`` path (its module level runs to build ``parser``, its
    ``main()`` does not); a JSON file or mapping holding ``{"args": {...}}`` in that form.
    """
    if isinstance(source, argparse.ArgumentParser):
        return {a.dest: _spec_from_action(a) for a in source._actions
                if a.dest != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)}
    if isinstance(source, Mapping):
        args = source.get('args', source)
        return {dest: dict(spec) for dest, spec in args.items()}
    path = os.fspath(source)
    if path.endswith('.py'):
        namespace = runpy.run_path(path, run_name='_timm_train_interface')
        parser = namespace.get('parser')
        if not isinstance(parser, argparse.ArgumentParser):
            raise ValueError(f'{path} defines no module-level argparse parser named `parser`')
        return load_interface(parser)
    with open(path) as f:
        return load_interface(json.load(f))


def _is_flag(spec: Mapping) -> bool:
    return spec.get('nargs') == 0


def _type_ok(value: Any, type_name: Optional[str], in_list: bool = False) -> bool:
    if type_name is None:
        return True
    if isinstance(value, bool):
        return False  # YAML true / false is no number and no string here
    if isinstance(value, str) and type_name != 'str':
        if in_list:
            return False  # only a whole string default is converted, not the items of a list
        try:
            _TYPES[type_name](value)  # argparse converts a string default with the argument's type (`4e-3`
        except ValueError:            # is a string to PyYAML)
            return False
        return True
    if type_name == 'float':
        return isinstance(value, (int, float))
    return isinstance(value, _TYPES[type_name])


def _value_problem(key: str, value: Any, spec: Mapping) -> Optional[str]:
    nargs, type_name = spec.get('nargs'), spec.get('type')
    if value is None:
        if spec.get('default') is None:
            return None
        return f'{key!r}: null, but train.py expects a value (default {spec.get("default")!r})'
    if _is_flag(spec):
        return None if isinstance(value, bool) else f'{key!r}: {value!r} is not true / false (an on/off flag)'
    if isinstance(spec.get('default'), dict):  # --model-kwargs / --opt-kwargs: key=value pairs
        return None if isinstance(value, dict) else f'{key!r}: {value!r} is not a mapping'
    if nargs in ('+', '*') or isinstance(nargs, int):
        if not isinstance(value, (list, tuple)):
            return f'{key!r}: {value!r} is not a list (train.py takes {nargs} values)'
        if isinstance(nargs, int) and len(value) != nargs:
            return f'{key!r}: {len(value)} values, train.py takes exactly {nargs}'
        if nargs == '+' and not value:
            return f'{key!r}: an empty list, train.py takes one or more values'
        bad = [v for v in value if not _type_ok(v, type_name, in_list=True)]
        return f'{key!r}: {bad!r} not of type {type_name}' if bad else None
    if isinstance(value, (list, tuple, dict)):
        return f'{key!r}: {value!r} is not a single value'
    if not _type_ok(value, type_name):
        return f'{key!r}: {value!r} is not of type {type_name}'
    return None


def _model_problem(key: str, name: Any) -> Optional[str]:
    if not isinstance(name, str) or not name:
        return f'{key!r}: {name!r} is no model name'
    from timm.models import is_model, list_models
    from timm.models import parse_model_name
    source, arch = parse_model_name(name)
    if source is not None:
        return None  # hf-hub: / local-dir: models are resolved by timm at create time
    if is_model(arch):
        return None
    close = difflib.get_close_matches(arch.split('.')[0], list_models(), n=3)
    hint = f'; did you mean {", ".join(close)}?' if close else ''
    return (f'{key!r}: {name!r} is not a registered timm model (is the module that registers it in '
            f'device_modules?){hint}')


def _pillow_rejects_zero_bits() -> bool:
    from PIL import Image, ImageOps
    try:
        ImageOps.posterize(Image.new('RGB', (1, 1)), 0)
    except ValueError:
        return True  # Pillow >= 13; older releases return a black image
    return False


def _augment_problem(key: str, aa: Any) -> Optional[str]:
    """RandAugment strings whose posterize can ask for 0 bits, which Pillow >= 13 refuses mid-epoch."""
    if not isinstance(aa, str) or not aa.startswith('rand'):
        return None
    from timm.data.auto_augment import rand_augment_transform
    try:
        ops = rand_augment_transform(aa, hparams={'translate_const': 100, 'img_mean': (124, 116, 104)}).ops
    except Exception as e:  # timm raises assorted errors for a malformed string
        return f'{key!r}: {aa!r} is not a RandAugment string timm can parse ({type(e).__name__}: {e})'
    for op in ops:
        if not op.name.startswith('Posterize'):
            continue
        upper = op.magnitude_max or 10
        m, std = op.magnitude, op.magnitude_std
        if std == float('inf'):  # uniform in [0, m]
            lo, hi = 0., m
        else:  # gauss(m, std), 6 sigma either side (std 0: m itself)
            lo, hi = m - 6 * std, m + 6 * std
        lo, hi = max(0., min(lo, upper)), max(0., min(hi, upper))  # clipped to [0, upper] as timm does
        levels = [lo + (hi - lo) * i / 200 for i in range(201)]
        if min(op.level_fn(m, op.hparams)[0] for m in levels) < 1 and _pillow_rejects_zero_bits():
            return (f'{key!r}: {aa!r} can draw {op.name} with 0 bits (magnitude clipped at {upper}), which the '
                    f'installed Pillow rejects: the data loader would crash mid-epoch. Keep the magnitude '
                    f'off that end (e.g. -mmax9 for an increasing policy) or install pillow<13 (older Pillow returns a '
                    f'black image)')
    return None


def config_problems(
        cfg: Mapping[str, Any],
        interface: Union[Mapping, argparse.ArgumentParser, str, os.PathLike],
        check_model: bool = True,
) -> List[str]:
    """Every problem of a train.py config mapping: keys that name no argument, ill-typed values, unknown model."""
    args = load_interface(interface)
    problems = []
    for key, value in cfg.items():
        spec = args.get(key)
        if spec is None:
            close = difflib.get_close_matches(str(key), list(args), n=1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
            problems.append(f'{key!r} is not a train.py argument{hint}')
            continue
        problem = _value_problem(key, value, spec)
        if problem:
            problems.append(problem)
    if 'aa' in cfg and 'aa' in args:
        problem = _augment_problem('aa', cfg['aa'])
        if problem:
            problems.append(problem)
    if check_model and 'model' in cfg and 'model' in args:
        problem = _model_problem('model', cfg['model'])
        if problem:
            problems.append(problem)
    return problems


def validate_train_config(
        path: Union[str, os.PathLike],
        interface: Union[Mapping, argparse.ArgumentParser, str, os.PathLike],
        check_model: bool = True,
) -> Dict[str, Any]:
    """Load a train.py YAML config and raise ``TrainConfigError`` naming each bad key; return the mapping.

    ``check_model`` needs the module that registers the model imported (``import smpconv_timm`` for ours).
    """
    import yaml
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise TrainConfigError(f'{os.fspath(path)}: a train.py config is a YAML mapping of argument names')
    problems = config_problems(cfg, interface, check_model=check_model)
    if problems:
        raise TrainConfigError(_report(os.fspath(path), problems))
    return cfg


def _report(config: str, problems: List[str], tail: str = '') -> str:
    return '\n'.join([f'train.py config {config}:'] + [f'  - {p}' for p in problems] + ([tail] if tail else []))


# ---------------------------------------------------------------------------------------------------------
# The check that runs inside timm's train.py

_UNSET = object()


def _train_script_parsers():
    """(config_parser, parser) of a timm train.py running as ``__main__``, else None."""
    main = sys.modules.get('__main__')
    parser = getattr(main, 'parser', None)
    config_parser = getattr(main, 'config_parser', None)
    if not (isinstance(parser, argparse.ArgumentParser) and isinstance(config_parser, argparse.ArgumentParser)):
        return None
    if 'device_modules' not in {a.dest for a in parser._actions}:
        return None
    if 'config' not in {a.dest for a in config_parser._actions}:
        return None
    return config_parser, parser


def _import_other_device_modules(names) -> None:
    import importlib
    for name in names or ():
        if name not in sys.modules:
            importlib.import_module(name)  # train.py imports them right after us; the order is all that changes


def check_running_train_script() -> None:
    """Inside timm's train.py (device module import): raise ``TrainConfigError`` for a config it would ignore.

    train.py has parsed its arguments and not yet created the model or read data. No-op elsewhere.
    """
    parsers = _train_script_parsers()
    if parsers is None:
        return
    config_parser, parser = parsers
    args_config, remaining = config_parser.parse_known_args()
    config = getattr(args_config, 'config', '') or '(no --config)'
    cfg = dict(parser._defaults)  # train.py's only set_defaults() call is the config's mapping
    actions = {a.dest: a for a in parser._actions}

    # which arguments did the command line give? Pre-set every dest: argparse fills only missing ones.
    given = argparse.Namespace(**{dest: _UNSET for dest in actions})
    given, _ = parser.parse_known_args(remaining, namespace=given)
    on_command_line = {dest for dest in actions if getattr(given, dest) is not _UNSET}

    interface = load_interface(parser)
    problems = config_problems(
        {k: v for k, v in cfg.items() if k not in on_command_line}, interface, check_model=False)

    if 'aa' in on_command_line:  # a RandAugment policy the installed Pillow would crash on mid-epoch
        problem = _augment_problem('--aa', given.aa)
        if problem:
            problems.append(problem)
    model = getattr(given, 'model') if 'model' in on_command_line else actions['model'].default
    problem = _model_problem('--model' if 'model' in on_command_line else 'model', model)
    if problem:
        modules = getattr(given, 'device_modules') if 'device_modules' in on_command_line else cfg.get('device_modules')
        _import_other_device_modules(modules)
        problem = _model_problem('--model' if 'model' in on_command_line else 'model', model)
    if problem:
        problems.append(problem)
    if problems:
        raise TrainConfigError(_report(
            config, problems, "Stopped by smpconv_timm (a train.py device module) before the model was created or "
            "any data read; train.py itself ignores config keys it has no argument for."))


check_running_train_script()
