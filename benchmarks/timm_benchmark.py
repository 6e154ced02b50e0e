"""timm's own ``benchmark.py`` on smpconv_t / smpconv_b and the ConvNeXt of the same size, as a table of ratios.

timm's ``benchmark.py`` lives in the timm repository, not the wheel. Point ``--benchmark-py`` at a copy; it runs
unmodified and as it is (the installed package registers the models when timm is imported), one process per
measurement:

    python benchmarks/timm_benchmark.py --benchmark-py path/to/pytorch-image-models/benchmark.py

Per model pair, batch size and setting, the baseline and ours (and ours with ``--reparam`` for inference) run
one after the other, ``--rounds`` times; the table gives the median ``step_time`` that benchmark.py reports and
its ratio to the baseline's. Settings: fp32 NCHW (benchmark.py's default), fp32 ``--channels-last`` and
``--amp --amp-dtype bfloat16`` (NCHW). Nothing here is timed by us: every number is benchmark.py's.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

from bench import BASELINES  # benchmarks/bench.py, beside this file
from common import machine_line, table

SETTINGS = {
    'fp32 NCHW': [],
    'fp32 channels-last': ['--channels-last'],
    'bf16 AMP': ['--amp', '--amp-dtype', 'bfloat16'],
}
# (benchmark.py --bench, batch size)
MEASUREMENTS = (('inference', 1), ('inference', 16), ('train', 8))


def run_benchmark(benchmark_py: str, model: str, bench: str, batch: int, flags: Sequence[str], device: str,
                  warm: int, iters: int) -> Dict:
    """One unmodified benchmark.py run in a fresh process; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'result.json')
        cmd = [sys.executable, benchmark_py, '--model', model, '--bench', bench,
               '-b', str(batch), '--device', device, '--num-warm-iter', str(warm), '--num-bench-iter', str(iters),
               '--no-retry', '--results-file', out, '--results-format', 'json', *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}')
        with open(out) as f:
            result = json.load(f)
    if 'error' in result:
        raise RuntimeError(f'benchmark.py reported an error for {model} ({bench}, bs {batch}): {result["error"]}')
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--benchmark-py', required=True, help="timm's benchmark.py (from the timm repository)")
    parser.add_argument('--models', nargs='+', default=list(BASELINES), choices=list(BASELINES))
    parser.add_argument('--settings', nargs='+', default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--rounds', type=int, default=2, help='baseline / ours alternations per row (median)')
    parser.add_argument('--warm', type=int, default=3, help="benchmark.py's --num-warm-iter")
    parser.add_argument('--iters', type=int, default=10, help="benchmark.py's --num-bench-iter")
    parser.add_argument('--json', help='also write the results here')
    args = parser.parse_args(argv)
    if not os.path.isfile(args.benchmark_py):
        parser.error(f'--benchmark-py {args.benchmark_py}: no such file (it is in the timm repository, not the wheel)')

    print(f'{machine_line(args.device)}\n# benchmark.py --num-warm-iter {args.warm} --num-bench-iter {args.iters}, '
          f'median of {args.rounds} rounds\n', flush=True)

    rows = [['model', 'bench', 'setting', 'batch', 'baseline ms/step', 'ours', 'ours --reparam']]
    results = []
    for name in args.models:
        base = BASELINES[name]
        for setting in args.settings:
            for bench, batch in MEASUREMENTS:
                prefix = 'infer' if bench == 'inference' else 'train'
                variants = {base: [], name: []}
                if bench == 'inference':
                    variants[name + ' --reparam'] = ['--reparam']
                times = {v: [] for v in variants}
                for _ in range(args.rounds):
                    for variant, extra in variants.items():
                        r = run_benchmark(args.benchmark_py, variant.split()[0], bench, batch,
                                          SETTINGS[setting] + extra, args.device, args.warm, args.iters)
                        times[variant].append(r[f'{prefix}_step_time'])
                ms = {v: statistics.median(t) for v, t in times.items()}
                ratio = lambda v: f'{ms[v]:.1f} ms ({ms[v] / ms[base]:.2f}x)' if v in ms else '-'
                rows.append([name, bench, setting, str(batch), f'{ms[base]:.1f}', ratio(name), ratio(name + ' --reparam')])
                results.append(dict(model=name, baseline=base, bench=bench, setting=setting, batch=batch, times=times,
                                    median_ms=ms))
                print(' | '.join(rows[-1]), flush=True)
    print('\n' + table(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
