"""``smpconv-timm`` command line: ``smpconv-timm flops`` (the default command)."""
import argparse
import sys
import warnings
from typing import List, Optional


def _flops(args: argparse.Namespace) -> int:
    from .flops import format_table, model_complexity, resolve_model_name
    names = [resolve_model_name(n) for n in args.models]
    results = [model_complexity(n, img_size=args.img_size, batch_size=args.batch_size) for n in names]
    print(f'fvcore FLOPs (1 multiply-add = 1 flop), params and activations; per-stage columns in GFLOPs')
    print(format_table(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import MODEL_NAMES
    parser = argparse.ArgumentParser(prog='smpconv-timm', description=__doc__)
    sub = parser.add_subparsers(dest='command')

    p = sub.add_parser('flops', help='params and fvcore FLOPs per model, with a per-stage breakdown')
    p.add_argument('models', nargs='*', default=list(MODEL_NAMES), help='smpconv model names (default: all)')
    p.add_argument('--img-size', type=int, default=224, help='input height = width (default 224)')
    p.add_argument('--batch-size', type=int, default=1)
    p.set_defaults(func=_flops)

    from .hub import add_subcommands as add_hub_subcommands
    add_hub_subcommands(sub)  # convert, publish
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    warnings.filterwarnings('ignore', message='.*torch.jit.script.*is deprecated', category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(['flops'] + list(argv if argv is not None else sys.argv[1:]))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f'smpconv-timm {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
