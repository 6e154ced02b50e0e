"""``smpconv-timm`` command line: ``flops`` (the default command: params and fvcore FLOPs), ``show`` (SMP points
and kernels) and ``erf`` (effective receptive fields). Publishing weights is ``hub/publish.py`` in the repository."""
import argparse
import sys
import warnings
from typing import List, Optional


def _flops(args: argparse.Namespace) -> int:
    from .flops import format_table, model_complexity, resolve_model_name
    names = [resolve_model_name(n) for n in args.models]
    results = [model_complexity(n, img_size=args.img_size, batch_size=args.batch_size) for n in names]
    print('fvcore FLOPs (1 multiply-add = 1 flop), params and activations; per-stage columns in GFLOPs')
    print(format_table(results))
    return 0


def _show(args: argparse.Namespace) -> int:
    from .viz import show
    try:
        data = show(args.source, args.output, layers=args.layers, channels=args.channels)
    except (ImportError, OSError) as e:  # matplotlib missing; weights that cannot be downloaded
        print(f'smpconv-timm show: error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {args.output}')
    print('layer  kernel  points  radius px (min / mean / max)  mean |w| (min / max)  channels drawn')
    for d in data:
        print(f'{d.name}  {d.kernel_size}x{d.kernel_size}  {d.n_points}  '
              f'{d.radii.min():.3f} / {d.radii.mean():.3f} / {d.radii.max():.3f}  '
              f'{d.magnitude.min():.4g} / {d.magnitude.max():.4g}  {" ".join(map(str, d.channels))}')
    return 0


def _erf(args: argparse.Namespace) -> int:
    from .viz import erf
    try:
        result = erf(args.models, args.images, args.output, size=args.img_size, pretrained=args.pretrained)
    except (ImportError, OSError) as e:  # matplotlib missing; weights that cannot be downloaded
        print(f'smpconv-timm erf: error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {args.output} ({result.n_images} images, {args.img_size}x{args.img_size})')
    print('fraction of the input area holding 50% / 90% of the ERF mass: fewest pixels | square around the centre')
    for label, f in zip(result.labels, result.fractions):
        print(f'{label}: pixels {f["pixels_50"]:.4f} / {f["pixels_90"]:.4f} | '
              f'square {f["square_50"]:.4f} / {f["square_90"]:.4f}')
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

    p = sub.add_parser('show', help='draw the SMP points of layers over their kernel grids, next to dense kernels')
    p.add_argument('source', help='checkpoint file (release or timm train.py), hf-hub:<repo>, model name with a '
                                  'pretrained tag (smpconv_t.in1k) or bare model name (random init)')
    p.add_argument('-o', '--output', default='smp_points.png', help='PNG to write (default smp_points.png)')
    p.add_argument('--layers', nargs='+', default=None,
                   help='SMP layers by index or module name, e.g. 0 stages.1.blocks.0 (default: first of each stage)')
    p.add_argument('--channels', type=int, default=4, help='dense kernels drawn per layer (default 4)')
    p.set_defaults(func=_show)

    p = sub.add_parser('erf', help='effective receptive fields of models side by side, with their mass fractions')
    p.add_argument('models', nargs='+', help='timm model names, hf-hub:<repo> ids or smpconv checkpoint files')
    p.add_argument('--images', required=True, help='folder of PNG / JPEG images')
    p.add_argument('-o', '--output', default='erf.png', help='PNG to write (default erf.png)')
    p.add_argument('--img-size', type=int, default=224, help='input height = width (default 224)')
    p.add_argument('--pretrained', action='store_true',
                   help='pretrained weights for bare model names too (tagged names and hf-hub ids always have them)')
    p.set_defaults(func=_erf)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    warnings.filterwarnings('ignore', message='.*torch.jit.script.*is deprecated', category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(['flops'] + list(argv if argv is not None else sys.argv[1:]))
    return run_command(args, 'smpconv-timm')


def run_command(args: argparse.Namespace, prog: str) -> int:
    """Run a parsed subcommand (``args.func``); a ValueError, FileNotFoundError or RuntimeError becomes one
    ``<prog> <command>: error: ...`` line on stderr and exit status 2."""
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f'{prog} {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
