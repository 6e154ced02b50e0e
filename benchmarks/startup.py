"""What the autoload hook costs: interpreter start, ``import torch`` and ``import timm`` with and without it.

Two bare venvs are made in a temporary folder, both seeing this checkout's smpconv_timm and this interpreter's
packages through path entries (so ``import torch`` works in both); only the second has the hook in its site-packages, exactly as a wheel installs it
(``smpconv_timm_autoload.pth`` and ``_smpconv_timm_autoload.py`` from ``smpconv_timm/_autoload/``). Each program is
run in fresh processes, alternating between the two venvs; the table gives the median wall time of each, its
spread (min - max) and the ratio hooked / plain of the medians. ``-X importtime`` gives the hook module's own import
time at start, and what smpconv_timm's import adds to ``import timm``. Run it from the repository, with the project's
venv:

    .venv/bin/python benchmarks/startup.py                # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/startup.py --runs 400 100 20
"""
import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / 'smpconv_timm' / '_autoload'
HOOK_FILES = ('smpconv_timm_autoload.pth', '_smpconv_timm_autoload.py')
HOOK_MODULE = '_smpconv_timm_autoload'
PROGRAMS = {
    'start (python -c pass)': 'pass',
    'import torch (never timm)': 'import torch',
    'import timm': 'import timm',
}


def make_venv(path: Path, hook: bool) -> Path:
    venv.EnvBuilder(with_pip=False, symlinks=os.name != 'nt').create(path)
    python = path / ('Scripts/python.exe' if os.name == 'nt' else 'bin/python')
    purelib = Path(subprocess.check_output(
        [str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], text=True).strip())
    # this checkout's smpconv_timm and this interpreter's packages (torch, timm), as path entries (the .pth files
    # among them are not run: an installed hook there stays out of both venvs)
    (purelib / 'parent_packages.pth').write_text(f'{ROOT}\n{sysconfig.get_paths()["purelib"]}\n')
    if hook:
        for name in HOOK_FILES:
            shutil.copy(HOOK / name, purelib / name)
    return python


def wall(python: Path, code: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([str(python), '-c', code], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def import_us(python: Path, env: dict, code: str, module: str, column: int, runs: int) -> float:
    """``module``'s import time in ``python -X importtime -c code`` (column 0: self, 1: cumulative), in
    microseconds, median of ``runs``."""
    times = []
    for _ in range(runs):
        err = subprocess.run([str(python), '-X', 'importtime', '-c', code], env=env, capture_output=True,
                             text=True, check=True).stderr
        lines = [line for line in err.splitlines() if line.split('|')[-1].strip() == module]
        if not lines:
            raise RuntimeError(f'{module} was not imported by {code!r}:\n{err}')
        times.append(int(lines[0].split(':', 1)[1].split('|')[column]))
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--runs', type=int, nargs=3, default=(200, 20, 10), metavar=('START', 'TORCH', 'TIMM'),
                        help='runs per venv of each program (default 200 20 10)')
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTHON', 'SMPCONV_'))}
    env['OMP_NUM_THREADS'] = env.get('OMP_NUM_THREADS', '1')

    import torch
    import timm
    print(f'CPU: {cpu_name()} ({os.cpu_count()} logical cores); Python {platform.python_version()}, '
          f'torch {torch.__version__}, timm {timm.__version__}')
    with tempfile.TemporaryDirectory() as tmp:
        plain, hooked = make_venv(Path(tmp, 'plain'), False), make_venv(Path(tmp, 'hooked'), True)
        check = 'import sys, timm; print(timm.is_model("smpconv_t"), "smpconv_timm" in sys.modules)'
        for python, expect in ((plain, 'False False'), (hooked, 'True True')):
            got = subprocess.check_output([str(python), '-c', check], env=env, text=True).strip()
            if got != expect:
                raise RuntimeError(f'{python}: registered / imported = {got}, expected {expect}')
        untouched = subprocess.check_output(
            [str(hooked), '-c', 'import sys; print(sorted({"torch", "timm", "smpconv_timm"} & set(sys.modules)))'],
            env=env, text=True).strip()
        print(f'hooked venv at start: {HOOK_MODULE} imported in {import_us(hooked, env, "pass", HOOK_MODULE, 0, 20):.0f} '
              f'us (-X importtime, self, median of 20 starts); torch / timm / smpconv_timm imported: {untouched}')
        print(f'hooked venv, `import timm`: smpconv_timm imported in '
              f'{import_us(hooked, env, "import timm", "smpconv_timm", 1, 5) / 1e3:.0f} ms (-X importtime, '
              f'cumulative, median of 5), after timm')
        print()
        print(f'| program | runs | plain | hooked | hooked / plain |')
        print(f'|---|---|---|---|---|')
        for (label, code), runs in zip(PROGRAMS.items(), args.runs):
            times = {plain: [], hooked: []}
            wall(plain, code, env), wall(hooked, code, env)  # warm the file cache
            for i in range(runs):
                for python in ((plain, hooked) if i % 2 == 0 else (hooked, plain)):
                    times[python].append(wall(python, code, env))
            med = {p: statistics.median(t) for p, t in times.items()}
            cells = [f'{med[p] * 1e3:.1f} ms ({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f})' for p, t in times.items()]
            print(f'| {label} | {runs} | {cells[0]} | {cells[1]} | {med[hooked] / med[plain]:.3f}x |')
    print()
    print('plain: no hook; hooked: the hook as a wheel installs it (`import timm` then also imports smpconv_timm '
          'and registers the models); median wall time per process, min-max in brackets')
    return 0


if __name__ == '__main__':
    sys.exit(main())
