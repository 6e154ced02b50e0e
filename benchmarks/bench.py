"""Speed and memory of smpconv_t / smpconv_b against timm's ConvNeXt, measured in one run.

    python benchmarks/bench.py                      # T against convnext_tiny, B against convnext_base
    python benchmarks/bench.py --models smpconv_t   # T only
    python benchmarks/bench.py --device cuda        # on a GPU

Rows per model:
- ``release``: the authors' model as it runs without their hand-compiled CUDA extension: plain PyTorch
  ops (``F.conv2d`` for the large kernel and PyTorch's own backward, BatchNorm modules), NCHW. Same
  weights and outputs as ours. ``release-cl`` is the same in channels-last.
- ``train form``: ours as created by ``timm.create_model``, channels-last (eval uses the fused
  inference path; training the FFT weight gradient and the FFN recomputation).
- ``deploy``: ours after ``timm.utils.reparameterize_model`` (eval only).

Precisions and modes (``--modes-only`` for just these): bf16 eval under ``torch.autocast`` and after
``.to(torch.bfloat16)`` (deploy and train form, bs 1 and 16), the fp32 train step with NCHW model and input,
the bf16-autocast train step, deploy eval at 224 after a first call at 160, and ``torch.compile``d eval
(both models compiled); each timed alternately with the baseline in one process, median ratio of the rounds
with its min-max spread.

Eval: latency per batch (bs 1, 16, 224x224, median of repeats) and throughput. Train: one step of
forward + backward + AdamW step (bs 8, 32), each model in a fresh process so that its peak memory is its
own: peak resident memory (CPU) or peak allocated memory (CUDA) during the steps, minus what the process
held before the first step, and on CPU the pages faulted in per step (``docs/switches.md``). Ratios are to
the baseline ConvNeXt of the same size measured in this run.
The large-kernel table gives the achieved GFLOP/s of the stage-wise 31/29/27/13 depthwise convs
against a 2048^3 matmul in the same process, the machine's practical limit, and one matmul shape timed as
ConvNeXt runs it (``nn.Linear``) and as our blocks do (a 1x1 conv): which library PyTorch picks for each moves
the ratios to ConvNeXt from one CPU to another.
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from common import interleaved, machine_line, median_ms, table  # benchmarks/common.py, beside this file

BASELINES = {'smpconv_t': 'convnext_tiny', 'smpconv_b': 'convnext_base'}


_OWN_STEM_LAYOUT = None


def configure(form: str) -> None:
    """Switch smpconv_timm between its own paths and plain PyTorch ops (for ``release``, also without the NCHW to
    channels-last conversion at the stem: the authors' model runs NCHW input as NCHW)."""
    global _OWN_STEM_LAYOUT
    from smpconv_timm import smpconv
    from smpconv_timm import config
    if _OWN_STEM_LAYOUT is None:
        _OWN_STEM_LAYOUT = smpconv._channels_last_on_cpu
    plain = form.startswith('release')
    smpconv._channels_last_on_cpu = (lambda x: x) if plain else _OWN_STEM_LAYOUT
    config.set_inference_fast_path(not plain)
    config.set_training_recompute(not plain)
    if plain:
        config.set_dwconv_algorithms(forward='direct', input_grad='native', weight_grad='native', pointwise='conv')
    else:
        config.set_dwconv_algorithms(forward='auto', input_grad='auto', weight_grad='auto', pointwise='auto')


def build(name: str, form: str, device: str):
    import timm
    import smpconv_timm  # noqa: F401
    from timm.utils import reparameterize_model
    configure(form)
    model = timm.create_model(name).to(device)
    if form != 'release':
        model = model.to(memory_format=torch.channels_last)
    if form == 'deploy':
        model = reparameterize_model(model.eval())
    return model


def _input(batch: int, form: str, device: str, size: int = 224) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, device=device)
    return x if form == 'release' else x.contiguous(memory_format=torch.channels_last)


def eval_latency(name: str, form: str, batch: int, device: str, reps: int) -> float:
    model = build(name, form, device).eval()
    x = _input(batch, form, device)
    with torch.no_grad():
        return median_ms(lambda: model(x), device, warmup=2, reps=reps)


def train_step_worker(name: str, form: str, batch: int, device: str, reps: int) -> Dict[str, float]:
    """One model's training steps; run in a fresh process by ``train_step``."""
    torch.manual_seed(0)
    model = build(name, form, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = _input(batch, form, device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    step()  # warm-up
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ms = median_ms(step, device, warmup=0, reps=reps)
    # pages the process faulted in per timed step (CPU): glibc maps every allocation above 32 MB afresh
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / reps
    peak = torch.cuda.max_memory_allocated() if device == 'cuda' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {'ms': ms, 'peak_mb': (peak - before) / 2 ** 20, 'page_faults': None if device == 'cuda' else faults}


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def train_step(name: str, form: str, batch: int, device: str, reps: int) -> Dict[str, float]:
    code = (f'import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import bench; '
            f'print(json.dumps(bench.train_step_worker({name!r}, {form!r}, {batch}, {device!r}, {reps})))')
    out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def large_kernel_gflops(device: str, batch: int = 16) -> List[Dict[str, float]]:
    """Achieved GFLOP/s of the large depthwise convs (forward, and forward + backward) vs a matmul."""
    from smpconv_timm.kernels import dwconv
    configure('train form')
    a = torch.randn(2048, 2048, device=device)
    matmul = 2 * 2048 ** 3 / median_ms(lambda: a @ a, device, 2, 5) / 1e6
    rows = []
    for c, h, k in ((96, 56, 31), (192, 28, 29), (384, 14, 27), (768, 7, 13)):
        x = torch.randn(batch, c, h, h, device=device).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, 1, k, k, device=device)
        flops = 2 * batch * c * h * h * k * k
        fwd = median_ms(lambda: dwconv.depthwise_conv2d(x, w, None, 1, k // 2), device, 2, 5)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        both = median_ms(lambda: torch.autograd.grad(
            dwconv.depthwise_conv2d(xg, wg, None, 1, k // 2).sum(), (xg, wg)), device, 2, 3)
        torch_both = median_ms(lambda: torch.autograd.grad(
            F.conv2d(xg, wg, None, 1, k // 2, 1, c).sum(), (xg, wg)), device, 1, 1)
        rows.append(dict(shape=f'{c}x{h}x{h} k{k}', fwd_gflops=flops / fwd / 1e6,
                         train_gflops=3 * flops / both / 1e6, torch_train_gflops=3 * flops / torch_both / 1e6,
                         matmul_gflops=matmul))
    return rows


def linear_vs_conv1x1(device: str, reps: int = 20) -> List[Dict[str, float]]:
    """The same matmul as ConvNeXt runs it (``nn.Linear`` on NHWC rows) and as our blocks run it (a 1x1 conv on a
    channels-last map): ConvNeXt-T's stage-3 MLP shapes, bs 1, fp32 and bf16. Which BLAS PyTorch picks for each
    differs by dtype and CPU, and it moves the ratios to ConvNeXt in the tables above."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for cin, cout in ((384, 1536), (1536, 384)):
            x = torch.randn(1, cin, 14, 14, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(cout, cin, 1, 1, device=device, dtype=dtype)
            rows_nhwc, w2 = x.permute(0, 2, 3, 1).reshape(-1, cin), w[:, :, 0, 0]
            with torch.no_grad():
                lin = median_ms(lambda: F.linear(rows_nhwc, w2), device, 3, reps)
                conv = median_ms(lambda: F.conv2d(x, w), device, 3, reps)
            rows.append(dict(shape=f'196x{cin} @ {cin}x{cout}', dtype=str(dtype).replace('torch.', ''),
                             linear_ms=lin, conv1x1_ms=conv))
    return rows


def mode_rows(name: str, device: str, reps: int, compile_eval: bool = True) -> List[Dict]:
    """Precisions and modes people use, each against the baseline under the same settings, in this process:
    bf16 (autocast and ``.to(bfloat16)``) eval, NCHW and AMP train steps, input-size order, compiled eval."""
    import timm
    from timm.utils import reparameterize_model
    configure('train form')
    cl = torch.channels_last
    torch.manual_seed(0)
    # both models channels-last, as the input (a baseline with NCHW weights re-lays some of them out on every call);
    # the NCHW train-step row converts its copies back
    base = timm.create_model(BASELINES[name]).to(device, memory_format=cl).eval()
    ours = timm.create_model(name).to(device, memory_format=cl).eval()
    deploy = reparameterize_model(ours)
    bf16 = torch.bfloat16
    rows = []

    def add(row, batch, fa, fb, n=reps):
        a, b, r, lo, hi = interleaved(fa, fb, device, n)
        rows.append(dict(row=row, batch=batch, ms=a, baseline_ms=b, ratio=r, ratio_min=lo, ratio_max=hi))
        print(f'  {row}, bs {batch}: {r:.2f}x ({lo:.2f}-{hi:.2f})', file=sys.stderr, flush=True)

    def infer(model, x, autocast=False):
        def fn():
            with torch.no_grad(), torch.autocast(device, bf16, enabled=autocast):
                model(x)
        return fn

    for bs in (1, 16):
        x = torch.randn(bs, 3, 224, 224, device=device).contiguous(memory_format=cl)
        for form, m in (('deploy', deploy), ('train form', ours)):
            add(f'eval bf16 autocast, {form}', bs, infer(m, x, True), infer(base, x, True), max(2, reps // (bs // 8 + 1)))
        b16, xb = copy.deepcopy(base).to(bf16), x.to(bf16)
        for form, m in (('deploy', deploy), ('train form', ours)):
            add(f'eval .to(bf16), {form}', bs, infer(copy.deepcopy(m).to(bf16), xb), infer(b16, xb),
                max(2, reps // (bs // 8 + 1)))

    def train_step(model, x, y, autocast=False):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def fn():
            model.train()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, bf16, enabled=autocast):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return fn

    x, y = torch.randn(8, 3, 224, 224, device=device), torch.randint(0, 1000, (8,), device=device)
    t_ours, t_base = (copy.deepcopy(m).to(memory_format=torch.contiguous_format) for m in (ours, base))
    add('train step fp32, NCHW (model and input)', 8, train_step(t_ours, x, y), train_step(t_base, x, y), max(2, reps // 2))
    xc = x.contiguous(memory_format=cl)
    t_ours, t_base = t_ours.to(memory_format=cl), t_base.to(memory_format=cl)
    add('train step bf16 autocast, channels-last', 8, train_step(t_ours, xc, y, True), train_step(t_base, xc, y, True),
        max(2, reps // 2))
    del t_ours, t_base

    x224 = torch.randn(4, 3, 224, 224, device=device).contiguous(memory_format=cl)
    x160 = torch.randn(4, 3, 160, 160, device=device).contiguous(memory_format=cl)
    shifted = reparameterize_model(ours)
    with torch.no_grad():
        shifted(x160)  # a first call at another size: 224 must not run with weights packed for 160
    add('eval fp32 deploy at 224 after a call at 160', 4, infer(shifted, x224), infer(base, x224))
    fresh = reparameterize_model(ours)  # the same weights, never run at 160: the ratio should be 1
    add('eval fp32 deploy at 224 after 160, vs a model only ever at 224', 4, infer(shifted, x224), infer(fresh, x224))

    if compile_eval:
        x = torch.randn(16, 3, 224, 224, device=device).contiguous(memory_format=cl)
        cbase = torch.compile(copy.deepcopy(base).to(memory_format=cl))
        for form, m in (('deploy', deploy), ('train form', ours)):
            cm = torch.compile(copy.deepcopy(m).to(memory_format=cl))
            add(f'eval fp32 torch.compile, {form}', 16, infer(cm, x), infer(cbase, x), max(2, reps // 2))
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['smpconv_t', 'smpconv_b'], choices=list(BASELINES))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--eval-batches', type=int, nargs='*', default=[1, 16], help='none: no eval rows')
    parser.add_argument('--train-batches', type=int, nargs='*', default=[8, 32], help='none: no train rows')
    parser.add_argument('--reps', type=int, default=5, help='timed repeats for bs <= 8; fewer for larger batches')
    parser.add_argument('--skip-release-train', action='store_true', help='skip the slow release-form train steps')
    parser.add_argument('--skip-modes', action='store_true', help='skip the bf16 / NCHW / AMP / shape / compile rows')
    parser.add_argument('--skip-compile', action='store_true', help='skip the torch.compile rows (slow to compile)')
    parser.add_argument('--modes-only', action='store_true', help='only the bf16 / NCHW / AMP / shape / compile rows')
    parser.add_argument('--json', help='also write the results here')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda needs a GPU')

    print(machine_line(args.device) + '\n')
    results = {'eval': [], 'train': [], 'large_kernel': [], 'linear_vs_conv1x1': []}
    if args.modes_only:
        args.eval_batches, args.train_batches = [], []
    reps = lambda bs: args.reps if bs <= 8 else max(2, args.reps // 2)

    rows = [['model', 'form', 'batch', 'ms / batch', 'img/s', 'x baseline']]
    for name in args.models:
        base = BASELINES[name]
        for bs in args.eval_batches:
            base_ms = eval_latency(base, 'train form', bs, args.device, reps(bs))
            rows.append([base, 'baseline', str(bs), f'{base_ms:.1f}', f'{1000 * bs / base_ms:.1f}', '1.00'])
            for form in ('release', 'release-cl', 'train form', 'deploy'):
                ms = eval_latency(name, form, bs, args.device, reps(bs))
                rows.append([name, form, str(bs), f'{ms:.1f}', f'{1000 * bs / ms:.1f}', f'{ms / base_ms:.2f}'])
                results['eval'].append(dict(model=name, form=form, batch=bs, ms=ms, baseline_ms=base_ms))
    if len(rows) > 1:
        print('## Eval (224x224)\n\n' + table(rows) + '\n')

    rows = [['model', 'form', 'batch', 'ms / step', 'x baseline', 'step memory MB', 'x baseline', 'page faults / step']]
    faults = lambda r: '-' if r['page_faults'] is None else f'{r["page_faults"]:.0f}'
    for name in args.models:
        base = BASELINES[name]
        for bs in args.train_batches:
            b = train_step(base, 'train form', bs, args.device, reps(bs))
            rows.append([base, 'baseline', str(bs), f'{b["ms"]:.0f}', '1.00', f'{b["peak_mb"]:.0f}', '1.00', faults(b)])
            forms = ('train form',) if args.skip_release_train else ('release', 'release-cl', 'train form')
            for form in forms:
                r = train_step(name, form, bs, args.device, min(reps(bs), 3) if form.startswith('release') else reps(bs))
                rows.append([name, form, str(bs), f'{r["ms"]:.0f}', f'{r["ms"] / b["ms"]:.2f}', f'{r["peak_mb"]:.0f}',
                             f'{r["peak_mb"] / b["peak_mb"]:.2f}', faults(r)])
                results['train'].append(dict(model=name, form=form, batch=bs, **r, baseline=b))
    if len(rows) > 1:
        print('## Train step (forward + backward + AdamW, 224x224)\n\n' + table(rows) + '\n')

    rows = [['large kernel (bs 16)', 'forward GFLOP/s', 'fwd+bwd GFLOP/s', 'PyTorch fwd+bwd GFLOP/s', 'matmul GFLOP/s']]
    for r in ([] if args.modes_only else large_kernel_gflops(args.device)):
        rows.append([r['shape'], f'{r["fwd_gflops"]:.0f}', f'{r["train_gflops"]:.0f}', f'{r["torch_train_gflops"]:.0f}',
                     f'{r["matmul_gflops"]:.0f}'])
        results['large_kernel'].append(r)
    if len(rows) > 1:
        print('## Large-kernel depthwise conv vs matmul\n\n' + table(rows) + '\n')
        rows = [['matmul (bs 1)', 'dtype', 'nn.Linear on NHWC ms (ConvNeXt)', '1x1 conv channels-last ms (ours)']]
        for r in linear_vs_conv1x1(args.device):
            rows.append([r['shape'], r['dtype'], f'{r["linear_ms"]:.3f}', f'{r["conv1x1_ms"]:.3f}'])
            results['linear_vs_conv1x1'].append(r)
        print('## The same matmul as nn.Linear and as a 1x1 conv\n\n' + table(rows) + '\n')

    if not args.skip_modes:
        results['modes'] = []
        rows = [['model', 'row', 'batch', 'ms', 'baseline ms', 'x baseline (min-max)']]
        for name in args.models:
            for r in mode_rows(name, args.device, args.reps, not args.skip_compile):
                rows.append([name, r['row'], str(r['batch']), f'{r["ms"]:.1f}', f'{r["baseline_ms"]:.1f}',
                             f'{r["ratio"]:.2f} ({r["ratio_min"]:.2f}-{r["ratio_max"]:.2f})'])
                results['modes'].append(dict(model=name, **r))
        print('## Precisions and modes (interleaved with the baseline in one process, median ratio of rounds)\n\n'
              + table(rows))

    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
