"""What every benchmark script here shares: the machine it ran on, timing, interleaved ratios, markdown tables.

A speed number means little without its machine: ``machine_line()`` names the CPU, the matrix / bf16 units it has
(AMX, AVX512-BF16: they decide how bf16 runs), PyTorch's BLAS and oneDNN, the thread count and the GPU if any.
Every script prints it first.
"""
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

#: CPU flags (as /proc/cpuinfo names them) that decide where bf16 / int8 matrix work can run
MATRIX_FLAGS = ('amx_bf16', 'amx_fp16', 'amx_int8', 'avx512_bf16', 'avx512_fp16', 'avx512_vnni', 'avx512f', 'avx2')


def cpu_info() -> Dict[str, object]:
    """CPU model name, vendor, CPUID family and model, and the ``MATRIX_FLAGS`` it has (from /proc/cpuinfo where there
    is one)."""
    model, vendor, flags, cpuid = platform.processor() or platform.machine(), '', set(), None
    try:
        with open('/proc/cpuinfo') as f:
            text = f.read()
        model = re.search(r'^model name\s*:\s*(.+)$', text, re.M).group(1).strip()
        vendor = re.search(r'^vendor_id\s*:\s*(.+)$', text, re.M).group(1).strip()
        flags = set(re.search(r'^flags\s*:\s*(.+)$', text, re.M).group(1).split())
        cpuid = (int(re.search(r'^cpu family\s*:\s*(\d+)$', text, re.M).group(1)),
                 int(re.search(r'^model\s*:\s*(\d+)$', text, re.M).group(1)))
    except (OSError, AttributeError):
        pass
    return dict(model=model, vendor=vendor, flags=[f for f in MATRIX_FLAGS if f in flags], cpuid=cpuid)


#: AMD's CPUID families with AVX512-BF16 (family 25 also holds Zen 3, which has no AVX-512)
AMD_GENERATIONS = {25: 'Zen 4', 26: 'Zen 5'}


def cpu_family(info: Dict[str, object]) -> str:
    """The CPU family the README's speed tables are split by."""
    if 'amx_bf16' in info['flags']:
        return 'Intel Xeon with AMX' if info['vendor'] == 'GenuineIntel' else 'CPU with AMX'
    if 'avx512_bf16' in info['flags']:
        if info['vendor'] == 'AuthenticAMD' and info['cpuid']:
            return f'AMD {AMD_GENERATIONS.get(info["cpuid"][0], "")}'.rstrip()
        return 'CPU with AVX512-BF16, no AMX'
    if info['vendor'] == 'AuthenticAMD' and info['cpuid'] and info['cpuid'][0] == 25 and 'avx512f' not in info['flags']:
        return 'AMD Zen 3, no bf16 matrix instructions'
    if info['vendor'] == 'GenuineIntel' and 'avx512f' in info['flags']:
        return 'Intel Xeon with AVX-512, no bf16 matrix instructions'
    return 'CPU without bf16 matrix instructions'


def torch_build() -> str:
    """PyTorch's BLAS and oneDNN versions, from its build configuration."""
    config = torch.__config__.show()
    blas = re.search(r'BLAS_INFO=(\w+)', config)
    onednn = re.search(r'MKL-DNN v([\d.]+)', config)
    return f'BLAS {blas.group(1) if blas else "?"}, oneDNN {onednn.group(1) if onednn else "-"}'


def machine_line(device: str = 'cpu') -> str:
    info = cpu_info()
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA')
    cpuid = f'CPUID family {info["cpuid"][0]} model {info["cpuid"][1]}; ' if info['cpuid'] else ''
    parts = [f'{info["model"]} ({cpu_family(info)}; {cpuid}{", ".join(info["flags"]) or "no AVX2"})',
             f'{torch.get_num_threads()} threads', torch_build(), f'PyTorch CPU kernels {torch.backends.cpu.get_cpu_capability()}']
    if isa:
        parts.append(f'ONEDNN_MAX_CPU_ISA={isa}')
    if device == 'cuda' and torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name())
    import timm
    parts.append(f'torch {torch.__version__}, timm {timm.__version__}, {time.strftime("%Y-%m-%d")}')
    return '# ' + ', '.join(parts)


def golden_model(variant: str) -> Tuple[torch.nn.Module, torch.Tensor, np.ndarray]:
    """SMPConv-T / -B (``variant`` 't' / 'b') with the golden weights, loaded from a release-format checkpoint the way a
    user loads the authors' file, in eval mode; with the golden input (2 images) and the authors' fp64 logits."""
    import timm
    import smpconv_timm  # noqa: F401  (registers the models)
    sys.path.insert(0, str(ROOT / 'tests'))
    import golden_weights  # the tests' generator of the golden weights and input
    golden_dir = ROOT / 'tests' / 'data' / 'golden'
    manifest = str(golden_dir / f'reference_smpconv_{variant}_manifest.json')
    state = lambda salt: {k: torch.from_numpy(v) for k, v in golden_weights.make_state_dict(manifest, salt).items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f'smpconv_{variant}_release.pth'
        torch.save({'model': state('model'), 'model_ema': state(''), 'epoch': 299}, path)
        model = timm.create_model(f'smpconv_{variant}', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with np.load(golden_dir / 'reference_outputs.npz') as f:
        ref = f[f'smpconv_{variant}_ema_logits_fp64']
    return model.eval(), torch.from_numpy(golden_weights.make_input(2, 224)), ref


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def interleaved(fa: Callable[[], object], fb: Callable[[], object], device: str, reps: int,
                warmup: int = 2) -> Tuple[float, float, float, float, float]:
    """A and B run alternately (A, B, A, B, ...): median ms of each, and the median, min and max of the per-round
    ratios A / B. Alternating keeps a machine's slow and fast stretches out of the ratio."""
    for _ in range(warmup):
        fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for fn, times in ((fa, ta), (fb, tb)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(1000 * (time.perf_counter() - start))
    ratios = sorted(a / b for a, b in zip(ta, tb))
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios), ratios[0], ratios[-1]


def table(rows: Sequence[Sequence[str]]) -> str:
    """A markdown table; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: '| ' + ' | '.join(c.ljust(w) for c, w in zip(r, widths)) + ' |'
    return '\n'.join([fmt(rows[0]), '|' + '|'.join('-' * (w + 2) for w in widths) + '|'] + [fmt(r) for r in rows[1:]])


def ratio_cell(ratio: float, lo: float, hi: float) -> str:
    return f'{ratio:.2f} ({lo:.2f}-{hi:.2f})'


__all__: List[str] = ['MATRIX_FLAGS', 'cpu_info', 'cpu_family', 'torch_build', 'machine_line', 'golden_model', 'sync', 'median_ms',
                      'interleaved', 'table', 'ratio_cell']
