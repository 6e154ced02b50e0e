"""Every candidate of the large depthwise conv (``smpconv_timm.kernels.dwconv``), per stage of SMPConv-T, timed
against oneDNN's (or cuDNN's) direct depthwise conv in the same dtype.

    python benchmarks/dwconv_bench.py                          # CPU: fp32 and bf16, eval bs 1 / 16, train bs 8
    python benchmarks/dwconv_bench.py --device cuda            # GPU: fp32, bf16 and fp16
    python benchmarks/dwconv_bench.py --stages 0 --dtypes bfloat16 --batches 1 16

Rows, each as ms and as a ratio to ``F.conv2d`` (the direct depthwise conv PyTorch runs for it, in the same dtype
and layout, channels-last):

- ``eval``: the eval path a model takes, ``FusedConv`` with its weights prepacked for the geometry (CPU), with each
  fusable algorithm forced, and ``auto``, the one the per-shape tuning picks here;
- ``forward`` / ``input_grad`` / ``weight_grad``: each candidate of ``depthwise_conv2d``'s autograd stages.

Candidates are checked against float64 ``F.conv2d`` before they are timed (max error relative to the largest value).
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine_line, median_ms, table  # noqa: E402  (benchmarks/common.py, beside this file)

#: SMPConv-T's large-kernel stages at 224x224: channels, map size, kernel size
STAGES = ((96, 56, 31), (192, 28, 29), (384, 14, 27), (768, 7, 13))


def _check(got: torch.Tensor, exact: torch.Tensor) -> str:
    return f'{(got.double() - exact).abs().max().item() / exact.abs().max().item():.0e}'


def eval_rows(c: int, h: int, k: int, batch: int, dtype: torch.dtype, device: str, reps: int) -> List[List[str]]:
    from smpconv_timm import config
    from smpconv_timm.kernels import FusedConv, dwconv
    torch.manual_seed(0)
    x = torch.randn(batch, c, h, h, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(c, 1, k, k, device=device) / k).to(dtype), torch.randn(c, device=device).to(dtype)
    exact = F.relu(F.conv2d(x.double(), w.double(), b.double(), 1, k // 2, 1, c))
    with torch.no_grad():
        base = median_ms(lambda: F.relu(F.conv2d(x, w, b, 1, k // 2, 1, c)), device, 2, reps)
        rows = [[f'{c}x{h}x{h} k{k}', str(batch), 'eval', 'F.conv2d + relu', f'{base:.3f}', '1.00', '']]
        for algo in ('direct', 'fft', 'toeplitz', 'direct_fp32', 'auto'):
            if algo != 'auto' and algo not in {v.partition(':')[0] for v in dwconv.candidates('forward', dtype)}:
                continue
            with config.set_dwconv_algorithms(forward=algo):
                fused = FusedConv(w, b, padding=k // 2, groups=c, act='relu')
                out = fused(x)
                ms = median_ms(lambda: fused(x), device, 2, reps)
            if fused._packed:  # CPU: the plan FusedConv packed
                picked = next(iter(fused._packed.values())).algo
            else:  # elsewhere FusedConv runs depthwise_conv2d, which tuned its forward
                key = ('forward', device, dtype, tuple(x.shape), dwconv.layout(x), tuple(w.shape), (k // 2, k // 2))
                picked = dwconv._tuned.get(key, algo)
            name = f'FusedConv {algo}' + (f' ({picked})' if algo == 'auto' else '')
            rows.append(['', '', '', name, f'{ms:.3f}', f'{base / ms:.2f}', _check(out, exact)])
    return rows


def train_rows(c: int, h: int, k: int, batch: int, dtype: torch.dtype, device: str, reps: int) -> List[List[str]]:
    from smpconv_timm.kernels import dwconv
    torch.manual_seed(0)
    x = torch.randn(batch, c, h, h, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c, 1, k, k, device=device) / k).to(dtype)
    grad = torch.randn_like(x)
    p = (k // 2, k // 2)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    exact = dict(zip(('input_grad', 'weight_grad'), torch.autograd.grad(
        F.conv2d(xd, wd, None, 1, p, 1, c), (xd, wd), grad.double())))
    exact['forward'] = F.conv2d(x.double(), w.double(), None, 1, p, 1, c)
    native = {
        'forward': lambda: F.conv2d(x, w, None, 1, p, 1, c),
        'input_grad': lambda: torch.ops.aten.convolution_backward(
            grad, x, w, None, [1, 1], list(p), [1, 1], False, [0, 0], c, [True, False, False])[0],
        'weight_grad': lambda: torch.ops.aten.convolution_backward(
            grad, x, w, None, [1, 1], list(p), [1, 1], False, [0, 0], c, [False, True, False])[1],
    }
    run = {
        'forward': lambda a: dwconv._forward(a, x, w, p),
        'input_grad': lambda a: dwconv._input_grad(a, grad, w, p, x),
        'weight_grad': lambda a: dwconv._weight_grad(a, x, grad, w, p),
    }
    rows = []
    for stage in ('forward', 'input_grad', 'weight_grad'):
        base = median_ms(native[stage], device, 1, reps)
        rows.append([f'{c}x{h}x{h} k{k}', str(batch), stage, 'PyTorch (oneDNN / cuDNN)', f'{base:.3f}', '1.00', ''])
        for algo in dwconv.candidates(stage, dtype):
            out = run[stage](algo)
            ms = median_ms(lambda: run[stage](algo), device, 1, reps)
            rows.append(['', '', '', algo, f'{ms:.3f}', f'{base / ms:.2f}', _check(out, exact[stage])])
    return rows


def run(device: str, dtypes: List[torch.dtype], stages: List[int], eval_batches: List[int], train_batch: int,
        reps: int) -> Dict[str, str]:
    """{title: markdown table} per dtype."""
    tables = {}
    header = ['stage (C x H x W, kernel)', 'batch', 'pass', 'algorithm', 'ms', 'speed-up', 'max rel. error']
    for dtype in dtypes:
        rows = [header]
        for i in stages:
            for bs in eval_batches:
                rows += eval_rows(*STAGES[i], bs, dtype, device, reps)
            if train_batch:
                rows += train_rows(*STAGES[i], train_batch, dtype, device, max(2, reps // 2))
            print(f'  stage {i} {dtype} done', file=sys.stderr, flush=True)
        tables[f'{str(dtype).replace("torch.", "")}, {device}'] = table(rows)
    return tables


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtypes', nargs='+', default=None, help='default: float32 bfloat16 (+ float16 on CUDA)')
    parser.add_argument('--stages', type=int, nargs='+', default=[0, 1, 2, 3])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 16], help='eval batch sizes')
    parser.add_argument('--train-batch', type=int, default=8, help='batch of the autograd rows (0: none)')
    parser.add_argument('--reps', type=int, default=10)
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda needs a GPU')
    names = args.dtypes or ['float32', 'bfloat16'] + (['float16'] if args.device == 'cuda' else [])
    print(machine_line(args.device) + '\n')
    for title, text in run(args.device, [getattr(torch, n) for n in names], args.stages, args.batches,
                           args.train_batch, args.reps).items():
        print(f'## {title}\n\n{text}\n', flush=True)


if __name__ == '__main__':
    main()
