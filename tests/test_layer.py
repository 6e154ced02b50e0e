"""SMPConv2d: the kernel formula, drop-in conv behaviour, the inference cache and radius handling."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from smpconv_timm import RADIUS_MAX, RADIUS_MIN, SMPConv2d, smp_kernel


def loop_kernel(coord, radius, weights, k):
    """The reference text's formula, one point and one tap at a time (float64)."""
    u = np.linspace(-1., 1., k)
    c = coord[0].double().numpy()
    r = radius.reshape(-1).double().numpy()
    w = weights[0].double().numpy()
    out = np.zeros((w.shape[0], k, k))
    for p in range(len(c)):
        for i in range(k):
            for j in range(k):
                a = max(0., 1. - (abs(c[p, 0] - u[j]) + abs(c[p, 1] + u[i])) / r[p])
                out[:, i, j] += w[:, p] * a
    return out


@pytest.mark.parametrize('k', [31, 13, 5])
def test_kernel_matches_golden_bit_for_bit(golden, k):
    params = [torch.from_numpy(golden[f'layer_k{k}_{n}']).double() for n in ('weight_coord', 'radius', 'weights')]
    kernel = smp_kernel(*params, k)
    assert kernel.shape == (8, 1, k, k)
    np.testing.assert_allclose(kernel[:, 0].numpy(), golden[f'layer_k{k}_kernel_fp64'], rtol=0, atol=1e-12)


@pytest.mark.parametrize('k', [31, 13])
def test_kernel_matches_golden_through_the_layer_in_float32(golden, k):
    layer = SMPConv2d(8, k)
    layer.load_state_dict({
        n: torch.from_numpy(golden[f'layer_k{k}_{n}']) for n in ('weight_coord', 'radius', 'weights')})
    np.testing.assert_allclose(
        layer.make_kernel()[:, 0].detach().double().numpy(), golden[f'layer_k{k}_kernel_fp64'], rtol=0, atol=2e-7)


@pytest.mark.parametrize('k,n_points', [(7, 12), (6, 9), (1, 1)])
def test_kernel_matches_plain_loop_formula(k, n_points):
    torch.manual_seed(k)
    layer = SMPConv2d(3, k, n_points=n_points).double()
    with torch.no_grad():
        layer.weight_coord.uniform_(-1, 1)
        layer.radius.uniform_(0.1, 0.8)
        layer.weights.normal_()
    ref = loop_kernel(layer.weight_coord.detach(), layer.radius.detach(), layer.weights.detach(), k)
    np.testing.assert_allclose(layer.make_kernel()[:, 0].detach().numpy(), ref, atol=1e-6)


def test_defaults_follow_the_release():
    layer = SMPConv2d(16, 31)
    assert layer.n_points == 31 * 31 // 4 == 240
    assert layer.weight_coord.shape == (1, 240, 2) and layer.radius.shape == (1, 240, 1, 1)
    assert layer.weights.shape == (1, 16, 240)
    assert torch.all(layer.radius == 4 / 31)
    assert layer.weight_coord.abs().max() <= 1.
    assert 0.1 < layer.weight_coord.std() < 0.3 and 0.01 < layer.weights.std() < 0.03
    # the sampling grid is computed, never stored
    assert set(layer.state_dict()) == {'weight_coord', 'radius', 'weights'}


@pytest.mark.parametrize('size', [(40, 33), (13, 13), (7, 9), (3, 3), (1, 1), (2, 30)])
@pytest.mark.parametrize('k', [13, 8])
def test_drop_in_for_a_depthwise_conv(size, k):
    torch.manual_seed(0)
    layer = SMPConv2d(6, k, bias=True)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 6, *size)
    ref = F.conv2d(x, layer.make_kernel(), layer.bias, padding=k // 2, groups=6)
    out = layer(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dense = torch.nn.Conv2d(6, 6, k, padding=k // 2, groups=6)
    assert out.shape == dense(x).shape


def test_stride_and_padding_like_conv2d():
    layer = SMPConv2d(4, 9, stride=2, padding=1)
    x = torch.randn(1, 4, 21, 17)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.make_kernel(), stride=2, padding=1, groups=4))


def test_channels_last_stays_channels_last():
    layer = SMPConv2d(8, 13)
    x = torch.randn(2, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    out = layer(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, layer(x.contiguous()))


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r'SMPConv2d\(8\) expects \(N, 8, H, W\)'):
        SMPConv2d(8, 5)(torch.randn(1, 3, 10, 10))


def test_gradients_are_exact():
    torch.manual_seed(0)
    layer = SMPConv2d(3, 7, n_points=10).double()
    with torch.no_grad():
        layer.radius.uniform_(0.3, 0.9)
    x = torch.randn(1, 3, 6, 5, dtype=torch.float64, requires_grad=True)

    def fn(x, coord, radius, weights):
        return F.conv2d(x, smp_kernel(coord, radius, weights, 7), padding=3, groups=3)
    assert torch.autograd.gradcheck(fn, (x, layer.weight_coord, layer.radius, layer.weights))
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


def test_inference_kernel_cache_never_goes_stale():
    torch.manual_seed(0)
    layer = SMPConv2d(4, 9).eval()
    x = torch.randn(1, 4, 12, 12)

    def fresh(m, x):
        return F.conv2d(x, m.make_kernel().detach(), padding=4, groups=4)
    with torch.no_grad():
        first = layer(x)
        assert layer._kernel_cache is not None
        assert layer(x).data_ptr() != first.data_ptr()  # output recomputed, kernel reused
        cached = layer._kernel_cache[1]
        layer(x)
        assert layer._kernel_cache[1] is cached
    # an optimizer step
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.weights.grad = torch.ones_like(layer.weights)
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fresh(layer, x))
    # load_state_dict
    other = SMPConv2d(4, 9)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fresh(other, x))
    # .to(dtype)
    layer.double()
    with torch.no_grad():
        out = layer(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, fresh(layer, x.double()))
    # with grad enabled the kernel is part of the graph, not the cache
    layer.float()
    layer(x).sum().backward()
    assert layer.weights.grad is not None and layer.weights.grad.abs().sum() > 0


def _radius_out_of_range_step(opt_cls, **kw):
    layer = SMPConv2d(2, 5)
    opt = opt_cls(layer.parameters(), **kw)
    with torch.no_grad():
        layer.radius[0, 0] = 0.999
        layer.radius[0, 1] = 0.002
    layer.radius.grad = torch.zeros_like(layer.radius)
    layer.radius.grad[0, 0] = -1e4  # pushes radius 0 far above RADIUS_MAX
    layer.radius.grad[0, 1] = 1e4  # pushes radius 1 far below RADIUS_MIN
    opt.step()
    return layer


@pytest.mark.parametrize('opt_cls,kw', [
    (torch.optim.SGD, dict(lr=1.0, momentum=0.9)),
    (torch.optim.AdamW, dict(lr=10.0)),
    (torch.optim.Adam, dict(lr=10.0, foreach=False)),
])
def test_radius_clamped_after_any_optimizer_step(opt_cls, kw):
    layer = _radius_out_of_range_step(opt_cls, **kw)
    assert layer.radius.max() <= RADIUS_MAX and layer.radius.min() >= RADIUS_MIN
    assert layer.radius[0, 0].item() == RADIUS_MAX and layer.radius[0, 1].item() == pytest.approx(RADIUS_MIN)


def test_radius_gradient_is_not_clamped_in_the_graph():
    layer = SMPConv2d(2, 5)
    with torch.no_grad():
        layer.radius.fill_(RADIUS_MAX)  # at the bound: a clamp in the graph would zero this gradient
        layer.weights.fill_(1.)
    layer.make_kernel().sum().backward()
    assert (layer.radius.grad != 0).any()


def test_radius_moves_at_a_tenth_of_the_learning_rate():
    torch.manual_seed(0)
    layer = SMPConv2d(3, 7)
    twin = copy.deepcopy(layer)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.)
    # the reference: the authors' own param groups, the radii alone at 0.1x lr (kept as given, no second scaling)
    ref = torch.optim.AdamW([
        {'params': [twin.weight_coord, twin.weights]},
        {'params': [twin.radius], 'lr': 1e-4},
    ], lr=1e-3, weight_decay=0.)
    # and an optimizer the hooks cannot know: a plain tensor with the radius' values and gradients, at 1e-4
    plain = nn.Parameter(twin.radius.detach().clone())
    ref_plain = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.)
    x = torch.randn(2, 3, 9, 9)
    for _ in range(3):
        for m, o in ((layer, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
        plain.grad = twin.radius.grad.clone()
        ref_plain.step()
    before = SMPConv2d(3, 7).radius  # fresh init value 4 / 7
    assert not torch.allclose(layer.radius, before)
    torch.testing.assert_close(twin.radius, plain, rtol=0, atol=1e-7)
    torch.testing.assert_close(layer.radius, twin.radius, rtol=0, atol=1e-7)
    torch.testing.assert_close(layer.weights, twin.weights)


def test_radius_lr_scale_entry_overrides_the_rule():
    layer = SMPConv2d(3, 7)
    start = layer.radius.detach().clone()
    layer.radius.grad = torch.ones_like(layer.radius)
    torch.optim.SGD([{'params': [layer.radius], 'radius_lr_scale': 0.5}], lr=0.01).step()
    torch.testing.assert_close(layer.radius, start - 0.005)
    layer.radius.grad = torch.ones_like(layer.radius)
    layer.weights.grad = torch.zeros_like(layer.weights)
    torch.optim.SGD([layer.radius, layer.weights], lr=0.01).step()  # mixed group: 0.1x
    torch.testing.assert_close(layer.radius, start - 0.005 - 0.001)


def test_deepcopied_layers_are_clamped_too():
    layer = copy.deepcopy(SMPConv2d(2, 5))
    opt = torch.optim.SGD(layer.parameters(), lr=1.)
    layer.radius.grad = torch.full_like(layer.radius, -100.)
    opt.step()
    assert layer.radius.max() <= RADIUS_MAX


def test_autocast_forward_backward_and_cache():
    torch.manual_seed(0)
    layer = SMPConv2d(8, 9)
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
        ref = F.conv2d(x, layer.make_kernel(), padding=4, groups=8)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    out.float().sum().backward()
    assert layer.weights.grad.dtype == torch.float32 and torch.isfinite(layer.weights.grad).all()
    layer.eval()
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            layer(x)
        assert layer(x).dtype == torch.float32  # the cached kernel did not keep autocast's dtype
