"""CUDA check: golden-weight logits and gradients on the GPU against the CPU, and GPU speed against ConvNeXt.

    python benchmarks/gpu_check.py                   # smpconv_t against convnext_tiny
    python benchmarks/gpu_check.py --variant b       # smpconv_b against convnext_base

1. Correctness: the release checkpoint built from the golden generator (as ``tests/conftest.py`` does), its
   fp32 logits on CPU and CUDA (train form and deploy form) against the golden fp64 logits, and the gradients
   of one training forward / backward on CPU and CUDA against each other (TF32 off).
2. The large depthwise conv: every candidate of ``kernels/dwconv.py`` per stage of SMPConv-T (eval bs 1 / 64,
   forward and both gradients at bs 32), fp32, bf16 and fp16, against cuDNN's depthwise conv
   (``benchmarks/dwconv_bench.py``), each checked against float64 first.
3. Speed: eval latency (bs 1, 64) and one train step (forward + backward + AdamW, bs 32), fp32 and AMP fp16 /
   bf16, channels-last, as a ratio to ConvNeXt of the same size timed in the same process, interleaved.

Prints markdown tables headed by the GPU's name; exits with a message (status 0) where no CUDA device exists.
Meant to finish well within 8 minutes on one data-centre GPU; ``--skip-dwconv`` / ``--skip-speed`` shorten it.
"""
import argparse
import contextlib
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import golden_model, interleaved, machine_line, table  # benchmarks/common.py, beside this file

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {'t': 'convnext_tiny', 'b': 'convnext_base'}


def check_correctness(variant: str, device: str) -> list:
    from timm.utils import reparameterize_model
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    model, x, ref = golden_model(variant)
    scale = float(np.abs(ref).max())
    forms = {'train form': model, 'deploy': reparameterize_model(model)}
    for form, m in forms.items():
        for dev in dict.fromkeys(('cpu', device)):
            with torch.no_grad():
                out = copy.deepcopy(m).to(dev)(x.to(dev)).double().cpu().numpy()
            rows.append([f'{form} logits, {dev}', f'{np.abs(out - ref).max() / scale:.1e}', 'fp64 golden'])
    grads = {}
    for dev in ('cpu', device):
        torch.manual_seed(0)
        m = copy.deepcopy(model).to(dev).train()
        y = torch.arange(2, device=dev)
        F.cross_entropy(m(x.to(dev)), y).backward()
        grads[dev] = {n: p.grad.double().cpu() for n, p in m.named_parameters()}
    scale = max(g.abs().max().item() for g in grads['cpu'].values())  # some true gradients are ~0 (BN-cancelled)
    worst = max((grads[device][n] - g).abs().max().item() for n, g in grads['cpu'].items()) / scale
    rows.append([f'train-step gradients, {device} vs cpu', f'{worst:.1e}', 'cpu gradients (largest over all params)'])
    return rows


def check_speed(variant: str, device: str, reps: int) -> list:
    import timm
    from timm.utils import reparameterize_model
    cl = torch.channels_last
    base = timm.create_model(BASELINES[variant]).to(device, memory_format=cl)
    ours = timm.create_model(f'smpconv_{variant}').to(device, memory_format=cl)
    deploy = reparameterize_model(ours.eval())
    rows = []
    precisions = {'fp32': None, 'amp fp16': torch.float16, 'amp bf16': torch.bfloat16}
    for prec, dtype in precisions.items():
        amp = (lambda: torch.autocast(device, dtype)) if dtype else contextlib.nullcontext
        for bs in (1, 64):
            x = torch.randn(bs, 3, 224, 224, device=device).contiguous(memory_format=cl)
            for form, m in (('train form', ours), ('deploy', deploy)):
                def run(model):
                    with torch.no_grad(), amp():
                        model.eval()(x)
                a, b, r, lo, hi = interleaved(lambda: run(m), lambda: run(base), device, reps, warmup=3)
                rows.append([f'eval {form}', prec, str(bs), f'{a:.1f}', f'{b:.1f}', f'{r:.2f} ({lo:.2f}-{hi:.2f})'])
        bs = 32
        x = torch.randn(bs, 3, 224, 224, device=device).contiguous(memory_format=cl)
        y = torch.randint(0, 1000, (bs,), device=device)
        steps = {}
        for name, m in (('ours', ours), ('base', base)):
            opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
            scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)

            def step(m=m, opt=opt, scaler=scaler):
                m.train()
                opt.zero_grad(set_to_none=True)
                with amp():
                    loss = F.cross_entropy(m(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            steps[name] = step
        a, b, r, lo, hi = interleaved(steps['ours'], steps['base'], device, max(3, reps // 2), warmup=3)
        rows.append(['train step', prec, str(bs), f'{a:.1f}', f'{b:.1f}', f'{r:.2f} ({lo:.2f}-{hi:.2f})'])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variant', default='t', choices=list(BASELINES))
    parser.add_argument('--reps', type=int, default=10, help='timed rounds per eval row (train: half)')
    parser.add_argument('--skip-speed', action='store_true')
    parser.add_argument('--skip-dwconv', action='store_true', help='skip the per-stage large-kernel candidates')
    parser.add_argument('--device', default='cuda', help=argparse.SUPPRESS)  # 'cpu' runs the CPU-only parts
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import smpconv_timm  # noqa: F401
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('gpu_check: no CUDA device found (torch.cuda.is_available() is False); nothing to check.')
        return 0
    print(f'{machine_line(args.device)}\n\n# smpconv_{args.variant}\n')
    rows = [['check', 'max abs error / max abs ref', 'against']] + check_correctness(args.variant, args.device)
    print('## Correctness (fp32, TF32 off)\n\n' + table(rows) + '\n', flush=True)
    if not args.skip_dwconv and args.device == 'cuda':
        import dwconv_bench
        tables = dwconv_bench.run(args.device, [torch.float32, torch.bfloat16, torch.float16], [0, 1, 2, 3], [1, 64],
                                  32, args.reps)
        for title, text in tables.items():
            print(f'## Large depthwise conv candidates, {title} (speed-up over cuDNN)\n\n{text}\n', flush=True)
    if not args.skip_speed and args.device == 'cuda':
        rows = [['row', 'precision', 'batch', 'ms ours', f'ms {BASELINES[args.variant]}', 'ratio (min-max)']]
        rows += check_speed(args.variant, args.device, args.reps)
        print(f'## Speed vs {BASELINES[args.variant]} (channels-last, interleaved, median of rounds)\n\n'
              + table(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
