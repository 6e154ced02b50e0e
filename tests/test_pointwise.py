"""1x1 convs in training: both forms equal F.conv2d, forward and gradients; the choice is measured per shape."""
import pytest
import torch
import torch.nn.functional as F

from smpconv_timm.kernels import dwconv, pointwise


def grads(fn, x, weight, bias, grad):
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    out = fn(x, weight, bias)
    return (out, *torch.autograd.grad(out, (x, weight, bias), grad))


@pytest.mark.parametrize('algo', pointwise.ALGORITHMS)
def test_each_form_equals_conv2d_in_float64(algo):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(9, 6, 1, 1, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    grad = torch.randn(2, 9, 5, 7, dtype=torch.float64)
    got = grads(lambda *a: pointwise._run(algo, *a), x, weight, bias, grad)
    ref = grads(F.conv2d, x, weight, bias, grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_the_choice_is_timed_once_per_shape_and_nchw_or_eval_take_the_conv(monkeypatch):
    monkeypatch.setattr(dwconv, '_tuned', {})
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    weight, bias, grad = torch.randn(9, 6, 1, 1), torch.randn(9), torch.randn(2, 9, 5, 7)
    for _ in range(2):
        got = grads(pointwise.pointwise_conv2d, x, weight, bias, grad)
    keys = [k for k in dwconv._tuned if k[0] == 'pointwise']
    assert len(keys) == 1 and dwconv._tuned[keys[0]] in pointwise.ALGORITHMS
    for g, r in zip(got, grads(F.conv2d, x, weight, bias, grad)):
        torch.testing.assert_close(g, r)
    with torch.autocast('cpu', torch.bfloat16):  # tuned apart, in the autocast dtype
        out = grads(pointwise.pointwise_conv2d, x, weight, bias, grad)[0]
    assert out.dtype == torch.bfloat16 and len([k for k in dwconv._tuned if k[0] == 'pointwise']) == 2
    pointwise.pointwise_conv2d(x.contiguous(), weight, bias)  # NCHW
    with torch.no_grad():
        pointwise.pointwise_conv2d(x, weight, bias)
    assert len([k for k in dwconv._tuned if k[0] == 'pointwise']) == 2


@pytest.mark.parametrize('fixed', pointwise.ALGORITHMS)
def test_a_fixed_form_runs_untimed(monkeypatch, fixed):
    from smpconv_timm import config
    monkeypatch.setattr(dwconv, '_tuned', {})
    ran = []
    run = pointwise._run
    monkeypatch.setattr(pointwise, '_run', lambda algo, *a: ran.append(algo) or run(algo, *a))
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    with config.set_dwconv_algorithms(pointwise=fixed):
        pointwise.pointwise_conv2d(x, torch.randn(9, 6, 1, 1), None).sum().backward()
    assert ran == [fixed] and not dwconv._tuned
