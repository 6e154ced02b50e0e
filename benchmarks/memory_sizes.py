"""Resident memory of eval across many input sizes: SMPConv against ConvNeXt of the same size.

    python benchmarks/memory_sizes.py                           # smpconv_t (train form, deploy) vs convnext_tiny
    python benchmarks/memory_sizes.py --sizes 96 400 20 --dtype bfloat16

Each model runs in a fresh process: batch 1 at ``--sizes`` (start, stop, count: evenly spaced, rounded to 8 px),
in that order, then in that order again; the table gives the resident set size (RSS) after the model's first call
at the first size, after the first pass and after the second, and the growth from the first call to the end.
Eval caches that are kept per input geometry (prepacked weights, kernel algorithm choices) are bounded by
``smpconv_timm.config.set_eval_cache_mb`` (``SMPCONV_EVAL_CACHE_MB``); the growth beyond them is the allocator's
and oneDNN's, as for any model.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from common import machine_line, table  # benchmarks/common.py, beside this file

HERE = Path(__file__).resolve().parent


def _rss_mb() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    raise RuntimeError('no VmRSS in /proc/self/status')


def worker(name: str, form: str, sizes: List[int], dtype: str) -> Dict[str, float]:
    """One model in this process: RSS (MB) after the first call, after each pass over ``sizes``."""
    import torch
    import timm
    import smpconv_timm  # noqa: F401
    from timm.utils import reparameterize_model
    torch.manual_seed(0)
    model = timm.create_model(name).eval().to(memory_format=torch.channels_last)
    if form == 'deploy':
        model = reparameterize_model(model)
    autocast = dtype == 'bfloat16'

    def run(size: int) -> None:
        x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast('cpu', torch.bfloat16, enabled=autocast):
            model(x)

    run(sizes[0])
    out = {'first': _rss_mb()}
    for p in ('pass 1', 'pass 2'):
        for s in sizes:
            run(s)
        out[p] = _rss_mb()
    return out


def measure(name: str, form: str, sizes: List[int], dtype: str) -> Dict[str, float]:
    code = (f'import json, sys; sys.path.insert(0, {str(HERE)!r}); import memory_sizes as m; '
            f'print(json.dumps(m.worker({name!r}, {form!r}, {sizes!r}, {dtype!r})))')
    out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='smpconv_t', choices=['smpconv_t', 'smpconv_b'])
    parser.add_argument('--sizes', type=int, nargs=3, default=[96, 400, 20], metavar=('START', 'STOP', 'COUNT'))
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'], help='bfloat16: autocast')
    parser.add_argument('--json', help='also write the results here')
    args = parser.parse_args(argv)
    start, stop, count = args.sizes
    sizes = [int(round((start + (stop - start) * i / max(1, count - 1)) / 8) * 8) for i in range(count)]
    baseline = {'smpconv_t': 'convnext_tiny', 'smpconv_b': 'convnext_base'}[args.model]
    print(f'{machine_line()}\n# eval bs 1, {args.dtype}, sizes {sizes} twice\n', flush=True)
    rows = [['model', 'form', 'RSS after first call MB', 'after pass 1', 'after pass 2', 'growth MB']]
    results = []
    for name, form in ((baseline, 'train form'), (args.model, 'train form'), (args.model, 'deploy')):
        r = measure(name, form, sizes, args.dtype)
        results.append(dict(model=name, form=form, **r))
        rows.append([name, form, f'{r["first"]:.0f}', f'{r["pass 1"]:.0f}', f'{r["pass 2"]:.0f}',
                     f'{r["pass 2"] - r["first"]:.0f}'])
        print(f'  {name} {form}: +{r["pass 2"] - r["first"]:.0f} MB', file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(sizes=sizes, dtype=args.dtype, results=results), f, indent=1)


if __name__ == '__main__':
    main()
