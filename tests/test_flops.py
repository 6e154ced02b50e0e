"""fvcore params / FLOPs, the CLI that reports them, and the paper's point-fitting sanity check."""
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn

from smpconv_timm import MODEL_NAMES
from smpconv_timm.flops import model_complexity


def large_kernel_macs(model, img_size):
    """Multiply-adds of the SMP depthwise convs and of their point-to-kernel matmuls, computed by hand."""
    conv = interp = 0
    for i, stage in enumerate(model.stages):
        side = img_size // (4 * 2 ** i)
        for block in stage.blocks[::2]:
            smp = block.large_kernel.smp.conv
            conv += side * side * smp.channels * smp.kernel_size ** 2
            interp += smp.channels * smp.n_points * smp.kernel_size ** 2
    return conv, interp


@pytest.mark.parametrize('name,gflops,params', [('smpconv_t', 6.283, 26_705_248), ('smpconv_b', 18.220, 79_546_520)])
def test_release_flops_and_params(name, gflops, params):
    r = model_complexity(name)
    assert r.params == params
    assert abs(r.flops / 1e9 - gflops) / gflops < 0.005
    assert sum(r.stage_flops.values()) == r.flops
    assert list(r.stage_flops) == ['stem', 'stages.0', 'stages.1', 'stages.2', 'stages.3', 'head']


def dense_conv_macs(model, img_size):
    """Multiply-adds of every ordinary nn.Conv2d, from the output shapes of one forward pass."""
    total = []
    hooks = [m.register_forward_hook(lambda m, i, o: total.append(o.numel() * m.weight[0].numel()))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.enable_grad():  # the plain modules (inference without autograd runs a fused plan instead)
        model.eval()(torch.zeros(1, 3, img_size, img_size))
    for h in hooks:
        h.remove()
    return sum(total)


@pytest.mark.parametrize('img_size', [224, 160])
def test_large_kernel_and_interpolation_are_counted(img_size):
    model = timm.create_model('smpconv_t')
    r = model_complexity(model, img_size=img_size)
    conv, interp = large_kernel_macs(model, img_size)
    assert r.by_operator['matmul'] == interp  # the only matmuls: 14 point-to-kernel interpolations
    assert r.by_operator['conv'] == conv + dense_conv_macs(model, img_size)


def test_cli_reports_both_models_per_stage():
    out = subprocess.run([sys.executable, '-m', 'smpconv_timm', 'flops', '--img-size', '128'],
                         capture_output=True, text=True, check=True).stdout
    lines = [l for l in out.splitlines() if l.startswith('smpconv_')]
    assert [l.split()[0] for l in lines] == list(MODEL_NAMES)
    assert '1x3x128x128' in lines[0] and '26,705,248' in lines[0] and '79,546,520' in lines[1]
    assert 'stages.3' in out


def test_cli_unknown_model():
    p = subprocess.run([sys.executable, '-m', 'smpconv_timm', 'flops', 'smpconv_s'], capture_output=True, text=True)
    assert p.returncode == 2
    assert "unknown model 'smpconv_s'; smpconv models: smpconv_b, smpconv_t" in p.stderr


def test_moving_points_fit_better_than_fixed_points():
    from smpconv_timm.examples.sinusoid_fit import compare
    r = compare(steps=500)
    assert r['moving'] < 0.75 * r['fixed'], r
