"""The large-kernel depthwise conv: every algorithm equals F.conv2d and its gradients."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from smpconv_timm import config
from smpconv_timm.kernels import dwconv

SHAPES = [  # N, C, H, W, k, padding
    (2, 3, 11, 9, 5, 2),
    (2, 4, 7, 7, 13, 6),  # map smaller than the kernel: cropped taps
    (1, 2, 3, 5, 7, 3),
    (2, 3, 10, 10, 6, 3),  # even kernel
    (1, 2, 9, 9, 3, 0),
    (2, 5, 20, 16, 31, 15),
]


@pytest.fixture(autouse=True)
def restore_algorithms():
    with config.set_dwconv_algorithms():
        yield


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('channels_last', [False, True])
def test_every_algorithm_matches_conv2d(shape, channels_last):
    n, c, h, w, k, p = shape
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, requires_grad=True)
    weight = torch.randn(c, 1, k, k, requires_grad=True)
    bias = torch.randn(c, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    ref = F.conv2d(xin, weight, bias, 1, p, 1, c)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, weight, bias), grad)
    for algos in itertools.product(*dwconv.ALGORITHMS.values()):
        config.set_dwconv_algorithms(**dict(zip(dwconv.ALGORITHMS, algos)))
        out = dwconv.depthwise_conv2d(xin, weight, bias, 1, p)
        grads = torch.autograd.grad(out, (x, weight, bias), grad)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=str(algos))
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max().item(), msg=str(algos))
        if channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last), algos


@pytest.mark.parametrize('algos', list(itertools.product(*dwconv.ALGORITHMS.values())))
def test_gradcheck_float64(algos):
    config.set_dwconv_algorithms(**dict(zip(dwconv.ALGORITHMS, algos)))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: dwconv.depthwise_conv2d(*a, 1, 2), (x, weight, bias))


def test_auto_choice_is_measured_per_shape_and_overridable(monkeypatch):
    config.set_dwconv_algorithms(forward='auto', input_grad='auto', weight_grad='auto')
    monkeypatch.setattr(dwconv, '_tuned', {})
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    weight = torch.randn(4, 1, 9, 9, requires_grad=True)
    dwconv.depthwise_conv2d(x, weight, None, 1, 4).sum().backward()
    stages = sorted(key[0] for key in dwconv._tuned)
    assert stages == ['forward', 'input_grad', 'weight_grad']
    assert all(algo in dwconv.ALGORITHMS[key[0]] for key, algo in dwconv._tuned.items())
    with pytest.raises(ValueError, match="unknown weight_grad algorithm 'winograd'"):
        config.set_dwconv_algorithms(weight_grad='winograd')
    with pytest.raises(ValueError, match="unknown stage 'backward'"):
        config.set_dwconv_algorithms(backward='fft')


def test_environment_override(monkeypatch):
    monkeypatch.setenv('SMPCONV_DWCONV', 'weight_grad=fft,forward=direct')
    assert config._env_dwconv() == {'forward': 'direct', 'input_grad': 'auto', 'weight_grad': 'fft'}
    for bad in ('weight_grad', 'weight_grad=winograd', 'backward=fft'):
        monkeypatch.setenv('SMPCONV_DWCONV', bad)
        with pytest.raises(ValueError, match='SMPCONV_DWCONV|unknown'):
            config._env_dwconv()


def test_switches_restore_as_context_managers(monkeypatch):
    before = config.dwconv_algorithms()
    with config.set_dwconv_algorithms(forward='fft'):
        assert config.dwconv_algorithms() == dict(before, forward='fft')
        config.set_dwconv_algorithms(weight_grad='native')  # a plain call inside: undone on exit too
    assert config.dwconv_algorithms() == before
    with config.set_inference_fast_path(False), config.set_training_recompute(False):
        assert not config.use_inference_fast_path() and not config.use_training_recompute()
    assert config.use_inference_fast_path() and config.use_training_recompute()
    monkeypatch.setenv('SMPCONV_FASTPATH', 'off')
    assert config._env_flag('SMPCONV_FASTPATH', True) is False
    monkeypatch.setenv('SMPCONV_FASTPATH', 'maybe')
    with pytest.raises(ValueError, match='SMPCONV_FASTPATH'):
        config._env_flag('SMPCONV_FASTPATH', True)


def test_fft_lengths_are_smooth():
    for n in (1, 7, 43, 71, 86, 97, 130):
        m = dwconv._fft_len(n)
        assert m >= n and m < 2 * n
        for f in (2, 3, 5):
            while m % f == 0:
                m //= f
        assert m == 1
    assert dwconv._fft_len(86) == 90 and dwconv._fft_len(71) == 72
