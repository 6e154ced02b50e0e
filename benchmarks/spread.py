"""Run-to-run spread of ``bench.py``'s mode rows: one column per ``--json`` file, then their min-max.

    python benchmarks/bench.py --modes-only --skip-compile --json run1.json    # repeat, e.g. at other times or
    OMP_NUM_THREADS=1 python benchmarks/bench.py --modes-only --json 1t.json   # thread counts
    python benchmarks/spread.py run1.json run2.json 1t.json

Each ``bench.py`` row is already a median over rounds interleaved with the baseline in one process; on a shared
machine the ratio can still move from one run to the next, by more than the min-max within a run. This prints the
per-run ratios side by side so that a claim rests on all of them.
"""
import argparse
import json
import os

from common import table  # benchmarks/common.py, beside this file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', help='bench.py --json files with mode rows')
    args = parser.parse_args()
    ratios = {}  # (model, row, batch) -> {run: ratio}, in the first run's row order
    for path in args.runs:
        with open(path) as f:
            modes = json.load(f).get('modes')
        if not modes:
            parser.error(f'{path} has no mode rows (run bench.py without --skip-modes)')
        for r in modes:
            ratios.setdefault((r['model'], r['row'], r['batch']), {})[path] = r['ratio']
    names = [os.path.splitext(os.path.basename(p))[0] for p in args.runs]
    rows = [['model', 'row', 'batch'] + names + ['min-max']]
    for (model, row, batch), by_run in ratios.items():
        cells = [f'{by_run[p]:.2f}' if p in by_run else '-' for p in args.runs]
        rows.append([model, row, str(batch)] + cells + [f'{min(by_run.values()):.2f}-{max(by_run.values()):.2f}'])
    print(table(rows))


if __name__ == '__main__':
    main()
