"""Real images through timm's unmodified train.py: scikit-learn's handwritten digits.

    python benchmarks/digits.py prepare --out /tmp/digits
    python benchmarks/digits.py train --train-py /path/to/timm/train.py --data-dir /tmp/digits \\
        --model smpconv_t --model-kwargs 'depths=(1,1,2,1)' 'dims=(32,64,128,256)' 'kernel_sizes=(13,13,11,5)' \\
        --experiment smpconv_small
    python benchmarks/digits.py report --runs /tmp/digits_runs

``prepare`` writes ``sklearn.datasets.load_digits()`` (1,797 real 8x8 scans, 10 classes, shipped with
scikit-learn, no download) as an ImageFolder: ``train/`` and ``val/``, one folder per class, a stratified
80 / 20 split with a fixed seed, each scan upsampled to 32x32 and saved as an RGB PNG, so train.py's
normal loader reads it.

``train`` runs train.py (a subprocess, nothing patched) with ``benchmarks/digits_train.yaml``, the recipe
every model shares; ``--set key=value`` changes one recipe key (e.g. ``model_ema_warmup=false``), written
to the run's own ``digits_config.yaml``. The run's output folder gets train.py's usual files plus
``train.log`` (its console output).

``report`` reads each run's ``summary.csv`` (with ``--model-ema`` train.py writes only the EMA metrics
there) and the raw model's metrics from the ``Test:`` lines of ``train.log``; it writes a markdown top-1
table and one learning-curve PNG.
"""
import argparse
import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / 'digits_train.yaml'
TEST_LINE = re.compile(r'(Test(?: \(EMA\))?): \[\s*(\d+)/(\d+)\].*?Acc@1:\s+[\d.]+\s+\(\s*([\d.]+)\)')
PARAM_LINE = re.compile(r'created, param count:\s*(\d+)')


def load_digits_split(val_fraction: float = 0.2, seed: int = 0):
    """(train images, train labels, val images, val labels): uint8 8x8 images in 0..255, stratified split."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255. / 16.)).astype(np.uint8)  # scans hold 0..16
    x_train, x_val, y_train, y_val = train_test_split(
        images, digits.target, test_size=val_fraction, stratify=digits.target, random_state=seed)
    return x_train, y_train, x_val, y_val


def prepare(out: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Dict[str, int]:
    from PIL import Image

    x_train, y_train, x_val, y_val = load_digits_split(val_fraction, seed)
    counts = {}
    for split, xs, ys in (('train', x_train, y_train), ('val', x_val, y_val)):
        for c in range(10):
            os.makedirs(os.path.join(out, split, str(c)), exist_ok=True)
        for i, (x, y) in enumerate(zip(xs, ys)):
            img = Image.fromarray(x, mode='L').resize((size, size), Image.BILINEAR).convert('RGB')
            img.save(os.path.join(out, split, str(int(y)), f'{split}_{i:04d}.png'))
        counts[split] = len(xs)
    return counts


def _parse_set(items: List[str]) -> Dict:
    overrides = {}
    for item in items:
        key, _, value = item.partition('=')
        if not _:
            raise SystemExit(f'--set takes key=value, got {item!r}')
        overrides[key.replace('-', '_')] = yaml.safe_load(value)
    return overrides


def train(args) -> int:
    run_dir = Path(args.output) / args.experiment
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    cfg.update(_parse_set(args.set))
    config_path = run_dir / 'digits_config.yaml'
    with open(config_path, 'w') as f:
        f.write(f'# {DEFAULT_CONFIG.name if args.config == str(DEFAULT_CONFIG) else args.config}'
                f' with --set {" ".join(args.set) or "(none)"}\n')
        yaml.safe_dump(cfg, f, sort_keys=False)
    cmd = [
        sys.executable, args.train_py, '-c', str(config_path), '--data-dir', args.data_dir, '--model', args.model,
        '--output', args.output, '--experiment', args.experiment, '--device', args.device,
    ]
    if args.model_kwargs:
        cmd += ['--model-kwargs', *args.model_kwargs]
    env = dict(os.environ)
    # train.py imports smpconv_timm (device_modules); make the source tree importable without an install
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(HERE.parent), env.get('PYTHONPATH')) if p)
    env['PYTHONUNBUFFERED'] = '1'
    print(' '.join(shlex.quote(c) for c in cmd), flush=True)
    with open(run_dir / 'train.log', 'w') as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if not args.quiet:
                sys.stdout.write(line)
        return proc.wait()


def read_run(run_dir: Path) -> Optional[Dict]:
    """Per-epoch raw and EMA top-1 of one train.py run, its settings and parameter count."""
    summary = run_dir / 'summary.csv'
    if not summary.exists():
        return None
    with open(summary) as f:
        rows = list(csv.DictReader(f))
    with open(run_dir / 'args.yaml') as f:
        run_args = yaml.safe_load(f)
    raw, ema, params = [], [], None
    log = run_dir / 'train.log'
    if log.exists():
        for line in log.read_text().splitlines():
            m = TEST_LINE.search(line)
            if m and m.group(2) == m.group(3):  # the last batch: running average over the whole split
                (ema if 'EMA' in m.group(1) else raw).append(float(m.group(4)))
            m = PARAM_LINE.search(line)
            if m:
                params = int(m.group(1))
    summary_top1 = [float(r['eval_top1']) for r in rows]
    has_ema = bool(run_args.get('model_ema'))
    if not has_ema:
        raw = summary_top1
    elif ema and [round(v, 3) for v in ema] != [round(v, 3) for v in summary_top1]:
        raise ValueError(f'{run_dir}: EMA top-1 in train.log and summary.csv disagree')
    return dict(
        name=run_dir.name, model=run_args['model'], model_kwargs=run_args.get('model_kwargs') or {},
        ema=has_ema, ema_warmup=bool(run_args.get('model_ema_warmup')), ema_decay=run_args.get('model_ema_decay'),
        epochs=[int(r['epoch']) for r in rows], raw=raw[:len(rows)], ema_top1=summary_top1 if has_ema else [],
        params=params,
    )


def _label(run: Dict) -> str:
    if run['model_kwargs']:
        return run['model'] + ' (small)'
    return run['model']


def write_table(runs: List[Dict]) -> str:
    lines = [
        '| run | model | params | epochs | EMA | raw top-1 | EMA top-1 | model_best (picked by) |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in runs:
        picked = r['ema_top1'] if r['ema'] else r['raw']
        best = max(range(len(picked)), key=lambda i: picked[i])  # train.py keeps the first best
        ema_desc = (f"{r['ema_decay']}, " + ('warmup' if r['ema_warmup'] else 'no warmup')) if r['ema'] else 'off'
        lines.append(
            f"| {r['name']} | {_label(r)} | {r['params']:,} | {len(r['epochs'])} | {ema_desc} | "
            f"{r['raw'][-1]:.2f} | {(format(r['ema_top1'][-1], '.2f') if r['ema'] else '-')} | "
            f"epoch {r['epochs'][best]}: {picked[best]:.2f} ({'EMA' if r['ema'] else 'raw'}) |")
    return '\n'.join(lines) + '\n'


def plot(runs: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = {}
    palette = ['tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple']
    for r in runs:
        color = colors.setdefault(_label(r), palette[len(colors) % len(palette)])
        epochs = [e + 1 for e in r['epochs']]
        if r['ema'] and r['ema_warmup']:
            ax.plot(epochs, r['ema_top1'], '-o', color=color, ms=4, lw=2, label=f'{_label(r)}, EMA (warmup)')
            if r['model_kwargs']:
                ax.plot(epochs, r['raw'], '--', color=color, lw=1.5, label=f'{_label(r)}, raw')
        elif r['ema']:
            ax.plot(epochs, r['ema_top1'], ':s', color=color, ms=4, lw=2, label=f'{_label(r)}, EMA (no warmup)')
        else:
            ax.plot(epochs, r['raw'], '-o', color=color, ms=4, lw=2, label=f'{_label(r)}, raw')
    ax.set_xlabel('epoch')
    ax.set_ylabel('val top-1 (%)')
    ax.set_ylim(0, 100)
    ax.set_xticks(range(1, max(len(r['epochs']) for r in runs) + 1))
    ax.grid(alpha=0.3)
    ax.set_title("Handwritten digits (360 val images), timm train.py from scratch")
    ax.legend(loc='center right', fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(args) -> None:
    runs = [r for r in (read_run(Path(d)) for d in sorted(Path(args.runs).iterdir()) if d.is_dir()) if r]
    if not runs:
        raise SystemExit(f'no train.py runs (summary.csv) under {args.runs}')
    table = write_table(runs)
    print(table)
    if args.md:
        with open(args.md, 'w') as f:
            f.write(table)
    plot(runs, args.png)
    print(f'wrote {args.png}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('prepare', help='write the digits as an ImageFolder')
    p.add_argument('--out', default='/tmp/digits')
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--val-fraction', type=float, default=0.2)
    p.add_argument('--seed', type=int, default=0)
    p = sub.add_parser('train', help="run timm's train.py on the prepared digits")
    p.add_argument('--train-py', required=True, help="timm's train.py (from the timm repository)")
    p.add_argument('--data-dir', default='/tmp/digits')
    p.add_argument('--model', required=True)
    p.add_argument('--model-kwargs', nargs='*', default=[], help="train.py's key=value syntax")
    p.add_argument('--experiment', required=True, help='run name (folder under --output)')
    p.add_argument('--output', default='/tmp/digits_runs')
    p.add_argument('--config', default=str(DEFAULT_CONFIG))
    p.add_argument('--set', nargs='*', default=[], help='recipe overrides, key=value (YAML values)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--quiet', action='store_true', help='only write train.log')
    p = sub.add_parser('report', help='top-1 table and learning curves of the runs')
    p.add_argument('--runs', default='/tmp/digits_runs')
    p.add_argument('--md', default='', help='also write the table to this markdown file')
    p.add_argument('--png', default=str(HERE / 'figures' / 'digits_curves.png'))
    args = parser.parse_args()
    if args.cmd == 'prepare':
        counts = prepare(args.out, args.size, args.val_fraction, args.seed)
        print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")
    elif args.cmd == 'train':
        sys.exit(train(args))
    else:
        report(args)


if __name__ == '__main__':
    main()
