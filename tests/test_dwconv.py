"""The large-kernel depthwise conv: every algorithm equals F.conv2d and its gradients."""
import pytest
import torch
import torch.nn.functional as F

from smpconv_timm import config
from smpconv_timm.kernels import dwconv, toeplitz

SHAPES = [  # N, C, H, W, k, padding
    (2, 3, 11, 9, 5, 2),
    (2, 4, 7, 7, 13, 6),  # map smaller than the kernel: cropped taps
    (1, 2, 3, 5, 7, 3),
    (2, 3, 10, 10, 6, 3),  # even kernel
    (1, 2, 9, 9, 3, 0),
    (2, 3, 8, 7, 5, 4),  # padding wider than the kernel's half: output larger than the input
    (2, 5, 20, 16, 31, 15),
]

#: every (stage, candidate) pair, each tile of toeplitz apart; the other two stages stay at PyTorch's own algorithms
STAGE_CANDIDATES = [(stage, v) for stage, algos in dwconv.ALGORITHMS.items() for a in algos for v in dwconv.variants(a)]
PLAIN = dict(forward='direct', input_grad='native', weight_grad='native')
#: the same for bf16 / fp16 inputs, each conv run in float32 and rounded: the other stages' error stays at rounding
PLAIN_HALF = dict(forward='direct_fp32', input_grad='native_fp32', weight_grad='native_fp32')


@pytest.fixture(autouse=True)
def restore_algorithms():
    with config.set_dwconv_algorithms():
        yield


def conv_and_grads(x, weight, bias, padding, grad, conv):
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    out = conv(x, weight, bias, padding)
    return (out, *torch.autograd.grad(out, (x, weight, bias), grad))


@pytest.mark.parametrize('stage, algo', STAGE_CANDIDATES)
@pytest.mark.parametrize('channels_last', [False, True])
def test_every_candidate_equals_conv2d_in_float64(stage, algo, channels_last):
    """Forward, input and weight gradient of each candidate against F.conv2d's, float64, odd and even sizes and
    kernels, maps smaller than the kernel, any padding."""
    config.set_dwconv_algorithms(**dict(PLAIN, **{stage: algo}))
    for n, c, h, w, k, p in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(n, c, h, w, dtype=torch.float64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c, 1, k, k, dtype=torch.float64)
        bias = torch.randn(c, dtype=torch.float64)
        grad = torch.randn(n, c, h + 2 * p - k + 1, w + 2 * p - k + 1, dtype=torch.float64)
        ref = conv_and_grads(x, weight, bias, p, grad, lambda x, w, b, pad: F.conv2d(x, w, b, 1, pad, 1, c))
        got = conv_and_grads(x, weight, bias, p, grad, lambda x, w, b, pad: dwconv.depthwise_conv2d(x, w, b, 1, pad))
        for name, g, r in zip(('output', 'input grad', 'weight grad', 'bias grad'), got, ref):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10 * r.abs().max().item(),
                                       msg=lambda m: f'{stage}={algo} {name} {(n, c, h, w, k, p)}: {m}')
        if channels_last:
            assert got[0].is_contiguous(memory_format=torch.channels_last), algo


@pytest.mark.parametrize('stage, algo', [(s, a) for s, algos in dwconv.STRIDED.items() for a in algos])
@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_strided_candidates_equal_conv2d(stage, algo, dtype):
    """Stride 2 (the stem's and the downsampling 3x3s): the candidates that apply, forward and both gradients."""
    config.set_dwconv_algorithms(**dict(PLAIN, **{stage: algo}))
    for n, c, h, w, k, p in ((2, 3, 11, 9, 3, 1), (2, 4, 16, 16, 5, 2), (1, 2, 7, 8, 3, 0)):
        torch.manual_seed(0)
        x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
        weight, bias = torch.randn(c, 1, k, k).to(dtype), torch.randn(c).to(dtype)
        grad = torch.randn(n, c, (h + 2 * p - k) // 2 + 1, (w + 2 * p - k) // 2 + 1).to(dtype)
        exact = conv_and_grads(*(t.double() for t in (x, weight, bias)), p, grad.double(),
                               lambda x, w, b, pad: F.conv2d(x, w, b, 2, pad, 1, c))
        got = conv_and_grads(x, weight, bias, p, grad, lambda x, w, b, pad: dwconv.depthwise_conv2d(x, w, b, 2, pad))
        tol = 1e-10 if dtype == torch.float64 else 1e-2
        for name, g, r in zip(('output', 'input grad', 'weight grad', 'bias grad'), got, exact):
            assert g.dtype == dtype and g.shape == r.shape, name
            torch.testing.assert_close(g.double(), r, rtol=0, atol=tol * r.abs().max().item(), msg=f'{algo} {name}')


@pytest.mark.parametrize('stage, algo', STAGE_CANDIDATES)
def test_dilated_convs_equal_conv2d_whatever_algorithm_is_fixed(stage, algo):
    """Dilation (the stages ``output_stride`` 8 / 16 keeps at resolution) runs PyTorch's own conv: forward and both
    gradients equal F.conv2d's in float64 with every candidate fixed, maps smaller than the dilated kernel too."""
    config.set_dwconv_algorithms(**dict(PLAIN, **{stage: algo}))
    for n, c, h, w, k, d, s in ((2, 3, 11, 9, 5, 2, 1), (2, 4, 16, 16, 13, 2, 1), (1, 2, 7, 8, 7, 4, 1),
                                (2, 3, 12, 12, 3, 2, 2)):
        torch.manual_seed(0)
        p = d * (k // 2)
        x = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        weight, bias = torch.randn(c, 1, k, k, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
        grad = torch.randn(n, c, (h - 1) // s + 1, (w - 1) // s + 1, dtype=torch.float64)
        ref = conv_and_grads(x, weight, bias, p, grad, lambda x, w, b, pad: F.conv2d(x, w, b, s, pad, d, c))
        got = conv_and_grads(x, weight, bias, p, grad,
                             lambda x, w, b, pad: dwconv.depthwise_conv2d(x, w, b, s, pad, d))
        for name, g, r in zip(('output', 'input grad', 'weight grad', 'bias grad'), got, ref):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10 * r.abs().max().item(),
                                       msg=lambda m: f'{stage}={algo} {name} {(n, c, h, w, k, d, s)}: {m}')


@pytest.mark.parametrize('stage, algo', STAGE_CANDIDATES)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_every_candidate_in_half_precision(stage, algo, dtype):
    """bf16 / fp16 inputs: each candidate within half-precision rounding of the exact result (float64 of the same
    rounded inputs), in the input's dtype."""
    if algo not in dwconv.candidates(stage, dtype):
        pytest.skip(f'PyTorch\'s own {dtype} kernel rounds in {dtype} on this CPU (no oneDNN bf16): auto leaves it out')
    config.set_dwconv_algorithms(**dict(PLAIN_HALF, **{stage: algo}))
    n, c, h, w, k, p = 2, 8, 20, 18, 13, 6
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = (torch.randn(c, 1, k, k) / k).to(dtype), torch.randn(c).to(dtype)
    grad = torch.randn(n, c, h, w).to(dtype)
    exact = conv_and_grads(*(t.double() for t in (x, weight, bias)), p, grad.double(),
                           lambda x, w, b, pad: F.conv2d(x, w, b, 1, pad, 1, c))
    got = conv_and_grads(x, weight, bias, p, grad, lambda x, w, b, pad: dwconv.depthwise_conv2d(x, w, b, 1, pad))
    for name, g, r in zip(('output', 'input grad', 'weight grad', 'bias grad'), got, exact):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-2 * r.abs().max().item(), msg=f'{algo} {name}')


@pytest.mark.parametrize('stage, algo', STAGE_CANDIDATES)
def test_gradcheck_float64(stage, algo):
    config.set_dwconv_algorithms(**{stage: algo})
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: dwconv.depthwise_conv2d(*a, 1, 2), (x, weight, bias))


@pytest.mark.parametrize('pad', [0, 2, 4])
@pytest.mark.parametrize('tile', [0, 2, 3])
def test_band_weight_is_the_kernel_as_banded_matrices(tile, pad):
    """Row a of the band of channel c maps the input columns of one tile (or a whole row) to the row convolved with
    kernel row a."""
    torch.manual_seed(0)
    c, k, width = 3, 5, 9
    weight = torch.randn(c, 1, k, k, dtype=torch.float64)
    t = toeplitz.tiling(width, k, pad, tile)
    band = toeplitz.band_weight(weight, t)
    assert band.shape == (c * t.tile, t.cols, k, 1) and band.is_contiguous(memory_format=torch.channels_last)
    band = band.reshape(c, t.tile, t.cols, k)  # (C, tile, cols, kh)
    row = torch.randn(width, dtype=torch.float64)
    padded = F.pad(row, (t.left, t.right))
    for ch in range(c):
        for a in range(k):
            ref = F.conv1d(row[None, None], weight[ch, :, a][None], padding=pad)[0, 0]
            got = torch.cat([band[ch, :, :, a] @ padded[i * t.tile:i * t.tile + t.cols] for i in range(t.tiles)])
            torch.testing.assert_close(got[:t.out_width], ref)


@pytest.mark.parametrize('algo', [v for a in ('fft', 'toeplitz') for v in dwconv.variants(a)])
def test_fft_and_matrix_forms_keep_non_finite_values_where_pytorch_has_them(algo):
    """A NaN or inf in the input (forward) or in the output gradient (input gradient) reaches the outputs it reaches
    in F.conv2d, no further: the FFT and the matrix form mix whole maps or rows. The other image's result is bitwise
    what it is in a finite batch, as in F.conv2d."""
    config.set_dwconv_algorithms(**dict(PLAIN, forward=algo, input_grad=algo))
    n, c, h, w, k, p = 3, 3, 9, 8, 5, 2

    def conv(x, w, b, pad):
        return dwconv.depthwise_conv2d(x, w, b, 1, pad)
    for where, value in (('x', float('nan')), ('x', float('inf')), ('grad', float('nan')), ('grad', -float('inf'))):
        for channels_last in (False, True):
            torch.manual_seed(0)
            x, grad = torch.randn(n, c, h, w), torch.randn(n, c, h, w)
            if channels_last:
                x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
            weight = torch.randn(c, 1, k, k)
            finite = conv_and_grads(x, weight, torch.zeros(c), p, grad, conv)
            (x if where == 'x' else grad)[1, 2, 4, 3] = value
            got = conv_and_grads(x, weight, torch.zeros(c), p, grad, conv)
            ref = conv_and_grads(x, weight, torch.zeros(c), p, grad, lambda x, w, b, pad: F.conv2d(x, w, b, 1, pad, 1, c))
            index = 0 if where == 'x' else 1
            assert not ref[index].isfinite().all() and ref[index][1, 2].isfinite().any(), where
            msg = f'{algo} {where}={value} channels_last={channels_last}'
            torch.testing.assert_close(got[index], ref[index], equal_nan=True, msg=lambda m: f'{msg}: {m}')
            assert torch.equal(got[index][[0, 2]], finite[index][[0, 2]]), msg
            assert dwconv.layout(got[index]) == dwconv.layout(finite[index]), msg


@pytest.mark.parametrize('algo', [v for a in ('fft', 'toeplitz', 'rows') for v in dwconv.variants(a)])
def test_fft_and_matrix_weight_grads_leave_non_finite_inputs_to_pytorch(algo):
    """A NaN in the input, or an inf in the output gradient next to the zero padding (inf * 0 in a matrix form):
    the kernel gradient is PyTorch's own, non-finite taps and all."""
    config.set_dwconv_algorithms(**dict(PLAIN, weight_grad=algo))
    n, c, h, w, k, p = 2, 3, 9, 8, 5, 2
    for where, value in (('x', float('nan')), ('grad', float('inf')), ('grad', -float('inf'))):
        torch.manual_seed(0)
        x, grad = torch.randn(n, c, h, w), torch.randn(n, c, h, w)
        (x if where == 'x' else grad)[1, 2, 0, 3] = value
        weight = torch.randn(c, 1, k, k)
        got = conv_and_grads(x, weight, torch.zeros(c), p, grad, lambda x, w, b, pad: dwconv.depthwise_conv2d(x, w, b, 1, pad))[2]
        ref = conv_and_grads(x, weight, torch.zeros(c), p, grad, lambda x, w, b, pad: F.conv2d(x, w, b, 1, pad, 1, c))[2]
        assert not ref[2].isfinite().all() and ref[:2].isfinite().all(), where
        torch.testing.assert_close(got, ref, equal_nan=True, msg=lambda m: f'{algo} {where}={value}: {m}')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    """The one-reduction check behind the matrix form's guard: False for any NaN / inf (a single one, or +inf and
    -inf together), True for finite tensors, float16 ones whose sum overflows float16 included."""
    from smpconv_timm.kernels.runtime import all_finite
    torch.manual_seed(0)
    big = torch.finfo(torch.float16).max / 2
    x, m = torch.randn(2, 3, 7, 9).to(dtype), torch.randn(5, 6).mul(100).to(dtype)
    finite = [x, x.contiguous(memory_format=torch.channels_last), m, m.t(), torch.full((4096,), big).to(dtype),
              torch.zeros(0, dtype=dtype)]
    for t in finite:
        assert t.isfinite().all() and all_finite(t)
    for values in ([float('nan')], [float('inf')], [-float('inf')], [float('inf'), -float('inf')]):
        for _ in range(5):
            t = torch.randn(2, 3, 7, 9).to(dtype)
            for v in values:
                t.view(-1)[torch.randint(t.numel(), ())] = v
            assert not t.isfinite().all() and not all_finite(t), values


def test_auto_choice_is_measured_per_shape_and_overridable(monkeypatch):
    config.set_dwconv_algorithms(forward='auto', input_grad='auto', weight_grad='auto')
    monkeypatch.setattr(dwconv, '_tuned', {})
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    weight = torch.randn(4, 1, 9, 9, requires_grad=True)
    dwconv.depthwise_conv2d(x, weight, None, 1, 4).sum().backward()
    stages = sorted(key[0] for key in dwconv._tuned)
    assert stages == ['forward', 'input_grad', 'weight_grad']
    # the winner is one of the candidates timed, which are those of the stage and dtype (toeplitz as its tiles)
    assert all(algo in key[-1] and key[-1] == dwconv.candidates(key[0], torch.float32) for key, algo in dwconv._tuned.items())
    with pytest.raises(ValueError, match="unknown weight_grad algorithm 'winograd'"):
        config.set_dwconv_algorithms(weight_grad='winograd')
    with pytest.raises(ValueError, match="unknown stage 'backward'"):
        config.set_dwconv_algorithms(backward='fft')


def test_environment_override(monkeypatch):
    monkeypatch.setenv('SMPCONV_DWCONV', 'weight_grad=fft,forward=direct')
    assert config._env_dwconv() == {'forward': 'direct', 'input_grad': 'auto', 'weight_grad': 'fft', 'pointwise': 'auto'}
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
