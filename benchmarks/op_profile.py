"""Where an eval forward's time goes, by kind of op: smpconv_t / smpconv_b against the ConvNeXt of the same size.

    OMP_NUM_THREADS=1 python benchmarks/op_profile.py                     # .to(bfloat16), deploy form, bs 1
    python benchmarks/op_profile.py --models smpconv_b --dtype float32 --batch 16

torch.profiler's self CPU time per op, summed per forward and grouped: convs by kernel (depthwise k x k, 1x1,
other), matmuls, everything else by op name. One thread gives figures that repeat from run to run; on a shared
machine the multi-threaded ones move with the host.
"""
import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import BASELINES, build  # benchmarks/bench.py, beside this file
from common import machine_line, table

_MATMULS = {'aten::addmm', 'aten::mm', 'aten::bmm', 'aten::linear', 'aten::matmul'}


def op_group(name: str, shapes) -> str:
    # (input, weight, bias, ...), or (input, residual, weight, ...) for a conv with a fused add
    four_d = [s for s in shapes[1:3] if len(s) == 4]
    weight = four_d[-1] if four_d else []
    if 'conv' in name and len(weight) == 4:
        k = weight[-1]
        if weight[1] == 1 and k > 1:
            return f'depthwise conv {k}x{k}'
        return '1x1 conv' if k == 1 else f'conv {k}x{k}'
    return 'matmul (nn.Linear)' if name in _MATMULS else name


def profile_forward(model: torch.nn.Module, x: torch.Tensor, reps: int) -> tuple:
    """(wall ms per forward, {group: self CPU ms per forward})."""
    with torch.no_grad():
        for _ in range(5):
            model(x)
        start = time.perf_counter()
        for _ in range(reps):
            model(x)
        wall = 1000 * (time.perf_counter() - start) / reps
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(reps):
                model(x)
    groups = collections.Counter()
    for e in prof.key_averages(group_by_input_shape=True):
        groups[op_group(e.key, e.input_shapes)] += e.self_cpu_time_total / 1000 / reps
    return wall, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['smpconv_t'], choices=list(BASELINES))
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--form', default='deploy', choices=['deploy', 'train form'])
    parser.add_argument('--reps', type=int, default=10)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f'{machine_line()}\n# {args.dtype}, bs {args.batch}, {args.form}\n')
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224).to(dtype).contiguous(memory_format=torch.channels_last)
    for name in args.models:
        results = {}
        for model_name, form in ((name, args.form), (BASELINES[name], 'train form')):
            model = build(model_name, form, 'cpu').eval().to(dtype)  # channels-last, as bench.py times them
            results[model_name] = profile_forward(model, x, args.reps)
        (wall_a, ga), (wall_b, gb) = results[name], results[BASELINES[name]]
        rows = [['op', f'{name} ms', f'{BASELINES[name]} ms']]
        for group in sorted(set(ga) | set(gb), key=lambda g: -(ga[g] + gb[g])):
            if ga[group] + gb[group] >= 0.05:
                rows.append([group, f'{ga[group]:.2f}' if group in ga else '-', f'{gb[group]:.2f}' if group in gb else '-'])
        rows.append(['all ops (profiled)', f'{sum(ga.values()):.2f}', f'{sum(gb.values()):.2f}'])
        rows.append(['wall, unprofiled', f'{wall_a:.2f}', f'{wall_b:.2f}'])
        print(table(rows) + '\n')


if __name__ == '__main__':
    main()
