"""Large-kernel depthwise convolution for SMPConv2d and its deploy form: fast forward and backward.

``depthwise_conv2d(x, weight, bias, stride, padding)`` equals ``F.conv2d(..., groups=C)``. For stride 1 it
runs a custom autograd function whose three stages each have candidates, all plain PyTorch ops:

- forward: ``direct``, oneDNN's direct depthwise conv (very fast on channels-last CPU tensors); ``fft``, an FFT
  conv; ``toeplitz``, the conv as matrix products (below); ``direct_fp32``, for bf16 / fp16 inputs, the direct
  conv run in float32 and rounded back (no depthwise conv reaches a CPU's matrix units, and oneDNN's float32
  kernel is faster than its bf16 one on some CPUs);
- input gradient: the forward conv with the flipped kernel by any forward candidate, or ``native``, PyTorch's
  own depthwise backward (up to 2x slower on channels-last CPU tensors), and ``native_fp32`` for bf16 / fp16;
  ``transposed``, the transposed conv of the output gradient (it needs no input tensor: for bf16 / fp16 a strided
  conv's ``transposed_fp32`` converts the small gradient only, where ``native_fp32`` converts the input too);
- weight gradient: ``native``, PyTorch's own ``convolution_backward`` (on CPU up to 30x the forward time for
  31x31 kernels); ``fft``, the cross-correlation of input and output gradient by FFT; ``toeplitz``; ``rows``, the
  whole-row band gradients as one batched matmul over channels per kernel row (``toeplitz.weight_grad_rows``); and
  ``native_fp32`` for bf16 / fp16 inputs.

``toeplitz`` (``toeplitz.py``): each kernel row a banded matrix, the conv one grouped conv whose implicit GEMMs run
on a CPU's or GPU's matrix units (AMX, tensor cores); its variants ``toeplitz:16``, ``toeplitz:32`` (output columns
per tile) and ``toeplitz:0`` (whole rows) are tuned like the algorithms.

Each stage picks an algorithm per shape: ``'auto'`` (the default) times the candidates once per
(device, dtype, shape) on the running machine and keeps the winner; a fixed ``toeplitz`` still tunes its tiles. Override with
``smpconv_timm.config.set_dwconv_algorithms(forward=..., input_grad=..., weight_grad=...)`` or the ``SMPCONV_DWCONV``
environment variable (e.g. ``SMPCONV_DWCONV=weight_grad=fft,forward=direct``). Taps that only ever see zero padding
(maps smaller than the kernel) are skipped first.

All candidates give ``F.conv2d``'s result up to float rounding for finite inputs. ``fft`` and ``toeplitz`` would
carry a NaN or inf further than the kernel's window (the whole map, or whole rows), so their forward (and the input
gradient, a forward of the output gradient) takes the direct conv for the images that are not finite, leaving the
others' results bitwise as in a finite batch (``images_apart``); where their weight gradient (or that of ``rows``)
comes out non-finite, PyTorch's own is returned instead: a non-finite value reaches the outputs and gradients it
reaches in PyTorch's own conv, and no others.
"""
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import config
from . import toeplitz
from .runtime import all_finite, autocast_dtype, is_tracing, onednn_bf16_available

__all__ = ['depthwise_conv2d', 'layout', 'variants', 'candidates', 'pick', 'tile_of', 'crop_kernel', 'crop_taps',
           'fft_kernel', 'conv_fft', 'images_apart', 'FftKernel', 'ALGORITHMS', 'STRIDED', 'TOEPLITZ_TILES']

ALGORITHMS = config.DWCONV_ALGORITHMS
_tuned: Dict[tuple, str] = {}


# ---------------------------------------------------------------------------------------------------------
# the algorithms; all for stride 1, padding (ph, pw), weight (C, 1, kh, kw)

def _fft_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: FFT lengths with large prime factors are several times slower."""
    best = 1 << (n - 1).bit_length()
    f5 = 1
    while f5 < best:
        f3 = f5
        while f3 < best:
            f2 = f3
            while f2 < n:
                f2 *= 2
            best = min(best, f2)
            f3 *= 3
        f5 *= 5
    return best


def _correlation_size(a_hw, b_hw, lo: Tuple[int, int], count: Tuple[int, int]) -> Tuple[int, int]:
    """FFT size for the lags u in [lo, lo + count) of a against b (below) without wrap-around."""
    return tuple(_fft_len(max(a_hw[i], b_hw[i], b_hw[i] - lo[i], lo[i] + count[i] - 1 + a_hw[i])) for i in (0, 1))


def _spectrum(t: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    dtype = torch.promote_types(t.dtype, torch.float32)  # FFTs in float32 at least (no half on CPU)
    return torch.fft.rfft2(t.to(dtype).contiguous(), s=size)


def _correlation_spectrum(a: torch.Tensor, b: torch.Tensor, lo: Tuple[int, int], count: Tuple[int, int]):
    """Spectrum of c[.., u, v] = sum_{t, s} a[.., t, s] * b[.., t + u, s + v], at a length without wrap-around
    for the lags u in [lo[0], lo[0] + count[0]) (v likewise)."""
    size = _correlation_size(a.shape[-2:], b.shape[-2:], lo, count)
    return _spectrum(b, size) * _spectrum(a, size).conj(), size


def _lag_window(spec: torch.Tensor, size, lo: Tuple[int, int], count: Tuple[int, int]) -> torch.Tensor:
    full = torch.fft.irfft2(spec, s=size)
    rows = torch.arange(lo[0], lo[0] + count[0], device=full.device) % size[0]
    cols = torch.arange(lo[1], lo[1] + count[1], device=full.device) % size[1]
    return full.index_select(-2, rows).index_select(-1, cols)


class FftKernel(NamedTuple):
    """A depthwise kernel ready for ``conv_fft`` on maps of one size: the conjugate spectrum (1, C, size[0],
    size[1] // 2 + 1) of the kernel shifted by the output's first lag, the FFT size, and the output size."""
    spectrum: torch.Tensor
    size: Tuple[int, int]
    out: Tuple[int, int]


def fft_kernel(weight: torch.Tensor, map_hw: Tuple[int, int], padding: Tuple[int, int]) -> FftKernel:
    """The kernel of ``conv_fft`` for (H, W) maps: computed once where one weight sees many inputs (eval)."""
    # y[n, c, i, j] = sum_{a, b} K[c, a, b] x[n, c, i + a - ph, j + b - pw]: lags i - ph of K against x. The kernel
    # rolled by the first lag (circularly, at the FFT size) puts lag -ph + i at index i: the output is a plain slice
    kh, kw = weight.shape[-2:]
    out = (map_hw[0] + 2 * padding[0] - kh + 1, map_hw[1] + 2 * padding[1] - kw + 1)
    lo = (-padding[0], -padding[1])
    size = _correlation_size((kh, kw), map_hw, lo, out)
    shifted = torch.roll(F.pad(weight.transpose(0, 1), (0, size[1] - kw, 0, size[0] - kh)), lo, dims=(-2, -1))
    return FftKernel(_spectrum(shifted, size).conj(), size, out)


def conv_fft(x: torch.Tensor, kernel: FftKernel) -> torch.Tensor:
    """The stride-1 depthwise conv of x by an ``fft_kernel``: NCHW (a view of the inverse FFT), in float32 at least."""
    full = torch.fft.irfft2(_spectrum(x, kernel.size) * kernel.spectrum, s=kernel.size)
    return full[..., :kernel.out[0], :kernel.out[1]]


def _conv_fft(x, weight, padding: Tuple[int, int]) -> torch.Tensor:
    return conv_fft(x, fft_kernel(weight, x.shape[-2:], padding)).to(x.dtype)


def _weight_grad_fft(x, grad, kernel: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    # dK[c, a, b] = sum_{n, h, w} grad[n, c, h, w] x[n, c, h + a - ph, w + b - pw]: lags a - ph of grad against x
    lo = (-padding[0], -padding[1])
    spec, size = _correlation_spectrum(grad, x, lo, kernel)
    return _lag_window(spec.sum(0), size, lo, kernel).unsqueeze(1)


_HALF = (torch.bfloat16, torch.float16)


def _conv_direct(x, weight, padding, stride=1):
    return F.conv2d(x, weight, None, stride, padding, 1, x.shape[1])


def tile_of(algo: str) -> int:
    """The tile of a ``toeplitz:<tile>`` variant (``toeplitz`` alone: whole rows)."""
    return int(algo.partition(':')[2] or 0)


def matrix_form_applies(*tensors: torch.Tensor) -> bool:
    """The matrix form multiplies every input of a tile by the band's zeros too, and the FFT mixes a whole map: a
    NaN or inf would reach outputs the direct conv never lets it reach, so non-finite tensors take the direct conv
    instead."""
    return all(all_finite(t) for t in tensors)


def images_apart(x: torch.Tensor, spread: Callable, local: Callable) -> torch.Tensor:
    """``spread(x)`` (the FFT or the matrix form) where ``x`` is finite. Where an image holds a NaN or inf, the
    other images' results are bitwise those of a finite batch, ``spread`` of the batch with that image zeroed, and
    that image's is ``local(x)``'s (the direct conv), non-finite where PyTorch's conv is."""
    if matrix_form_applies(x):
        return spread(x)
    bad = ~x.isfinite().flatten(1).all(1)
    zeroed = x.clone()  # laid out as x (masked_fill would not keep channels-last)
    zeroed[bad] = 0
    out = spread(zeroed)
    out[bad] = local(x)[bad]
    return out


def _forward(algo, x, weight, padding, stride=1):
    if algo == 'fft':
        return images_apart(x, lambda t: _conv_fft(t, weight, padding).contiguous(memory_format=layout(t)),
                            lambda t: _conv_direct(t, weight, padding))
    if algo.startswith('toeplitz'):
        return images_apart(x, lambda t: toeplitz.conv(t, weight, padding, tile_of(algo)),
                            lambda t: _conv_direct(t, weight, padding))
    if algo == 'direct_fp32' and x.dtype in _HALF:
        return _conv_direct(x.float(), weight.float(), padding, stride).to(x.dtype)
    return _conv_direct(x, weight, padding, stride)


def _native(grad, x, weight, padding, stride, which: int, fp32: bool):
    """PyTorch's own backward of the conv: the input (``which`` 0) or weight (1) gradient, computed in float32 for
    bf16 / fp16 tensors where ``fp32``."""
    dtype = (x, weight)[which].dtype
    if fp32 and x.dtype in _HALF:
        grad, x, weight = grad.float(), x.float(), weight.float()
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, [stride] * 2, list(padding), [1, 1], False, [0, 0], x.shape[1],
        [which == 0, which == 1, False])[which].to(dtype)


def _transposed(grad, weight, padding, stride, size, fp32: bool):
    """The input gradient of the conv as ``F.conv_transpose2d`` of ``grad`` back to the input's spatial ``size``."""
    dtype = grad.dtype
    if fp32 and dtype in _HALF:
        grad, weight = grad.float(), weight.float()
    kh, kw = weight.shape[-2:]
    extra = tuple(n - ((m - 1) * stride - 2 * p + k) for n, m, p, k in zip(size, grad.shape[-2:], padding, (kh, kw)))
    return F.conv_transpose2d(grad, weight, None, stride, padding, extra, grad.shape[1]).to(dtype)


def _input_grad(algo, grad, weight, padding, x, stride=1):
    if algo in ('native', 'native_fp32'):
        return _native(grad, x, weight, padding, stride, 0, algo == 'native_fp32')
    if algo in ('transposed', 'transposed_fp32'):
        return _transposed(grad, weight, padding, stride, x.shape[-2:], algo == 'transposed_fp32')
    kh, kw = weight.shape[-2:]
    return _forward(algo, grad, weight.flip(-2, -1), (kh - 1 - padding[0], kw - 1 - padding[1]))


def _weight_grad(algo, x, grad, weight, padding, stride=1):
    kernel = tuple(weight.shape[-2:])
    out = None
    if algo == 'fft':
        out = _weight_grad_fft(x, grad, kernel, padding)
    elif algo == 'rows':
        out = toeplitz.weight_grad_rows(x, grad, kernel, padding)
    elif algo.startswith('toeplitz'):
        out = toeplitz.weight_grad(x, grad, kernel, padding, tile_of(algo))
    # finite inputs give a matrix form or the FFT a finite result; a NaN or inf in them (or padding zeros times an inf)
    # leaves a non-finite tap, and then PyTorch's own backward decides which taps are (one check of the small result)
    if out is not None and all_finite(out):
        return out.to(weight.dtype)
    return _native(grad, x, weight, padding, stride, 1, algo == 'native_fp32')


def layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


#: the tiles ``toeplitz`` is tuned over: output columns per tile, 0 for whole rows
TOEPLITZ_TILES = (16, 32, 0)


def variants(algo: str) -> Tuple[str, ...]:
    """What an algorithm name runs as: ``toeplitz`` as its tiles, any other name as itself."""
    return tuple(f'toeplitz:{t}' for t in TOEPLITZ_TILES) if algo == 'toeplitz' else (algo,)


#: the algorithms of each stage of a strided depthwise conv (the others need stride 1)
STRIDED = {'forward': ('direct', 'direct_fp32'),
           'input_grad': ('native', 'native_fp32', 'transposed', 'transposed_fp32'),
           'weight_grad': ('native', 'native_fp32')}


def _rounds_in_bf16(stage: str, algo: str, dtype: torch.dtype, device: str) -> bool:
    """PyTorch's own bf16 input-gradient kernels on a CPU without oneDNN bf16 (AVX2-only CPUs) accumulate in bf16:
    about 2 % of the largest value off the exact gradient, where every other candidate stays within rounding."""
    return (stage == 'input_grad' and algo in ('native', 'transposed') and dtype == torch.bfloat16
            and device == 'cpu' and not onednn_bf16_available())


def candidates(stage: str, dtype: torch.dtype, stride: int = 1, device: str = 'cpu') -> Tuple[str, ...]:
    """What ``'auto'`` chooses from for this stage, input dtype, stride and device (the ``_fp32`` ones for bf16 /
    fp16; not PyTorch's own bf16 input gradient where it rounds in bf16)."""
    return tuple(v for a in ALGORITHMS[stage] if (not a.endswith('_fp32') or dtype in _HALF)
                 and (stride == 1 or a in STRIDED[stage]) and not _rounds_in_bf16(stage, a, dtype, device)
                 for v in variants(a))


def pick(stage: str, key: tuple, run: Callable[[str], torch.Tensor], names: Optional[Tuple[str, ...]] = None) -> str:
    """The algorithm for this stage and shape: the fastest measured here among ``names`` (default: ``candidates``),
    or among the variants of the algorithm the user fixed.

    ``key`` starts with (device type, dtype) and ends with the stride (a fixed algorithm that needs stride 1 does not
    apply to a strided conv). Each candidate runs once to warm up (plans, packing), then its best
    of two timed runs counts; the winner is kept per key and candidate set.
    """
    names = names or candidates(stage, key[1], key[-1], key[0])
    fixed = config.dwconv_algorithms()[stage]
    if fixed != 'auto' and (key[-1] == 1 or fixed in STRIDED[stage]):
        names = tuple(n for n in names if n == fixed or n.partition(':')[0] == fixed) or variants(fixed)
    if len(names) == 1:
        return names[0]
    key = (stage,) + key + (names,)
    if key not in _tuned:
        sync = torch.cuda.synchronize if key[1] == 'cuda' else (lambda: None)
        timings = {}
        for candidate in names:
            run(candidate)
            best = float('inf')
            for _ in range(2):
                sync()
                start = time.perf_counter()
                run(candidate)
                sync()
                best = min(best, time.perf_counter() - start)
            timings[candidate] = best
        _tuned[key] = min(timings, key=timings.get)
    return _tuned[key]


class _DepthwiseConv2d(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, padding, stride):
        key = (x.device.type, x.dtype, tuple(x.shape), layout(x), tuple(weight.shape), padding, stride)
        algo = pick('forward', key, lambda a: _forward(a, x, weight, padding, stride))
        out = _forward(algo, x, weight, padding, stride)
        if bias is not None:
            out = out + bias.reshape(1, -1, 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.stride, ctx.key = padding, stride, key
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        padding, stride = ctx.padding, ctx.stride
        key = ctx.key[:-1] + (layout(grad), stride)
        if ctx.needs_input_grad[0]:
            algo = pick('input_grad', key, lambda a: _input_grad(a, grad, weight, padding, x, stride))
            grad_x = _input_grad(algo, grad, weight, padding, x, stride)
        if ctx.needs_input_grad[1]:
            algo = pick('weight_grad', key, lambda a: _weight_grad(a, x, grad, weight, padding, stride))
            grad_w = _weight_grad(algo, x, grad, weight, padding, stride)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def crop_taps(k: int, pad: int, size: int) -> Tuple[int, int, int]:
    """Rows [lo, hi) of a k-tap kernel that can touch a `size`-long input at stride 1, and the padding left."""
    out = size + 2 * pad - k + 1
    lo = max(0, pad - out + 1)
    hi = min(k, pad + size)
    return lo, hi, pad - lo


def crop_kernel(weight: torch.Tensor, padding: int, size: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(weight, (pad_h, pad_w)) for a stride-1 conv on an input of spatial ``size``: the taps that only ever see
    zero padding cropped away where the map is smaller than the kernel's reach (same result), else as given."""
    kh, kw = weight.shape[-2:]
    if kh <= 2 * size[0] - 1 and kw <= 2 * size[1] - 1:
        return weight, (padding, padding)
    r0, r1, ph = crop_taps(kh, padding, size[0])
    c0, c1, pw = crop_taps(kw, padding, size[1])
    return weight[:, :, r0:r1, c0:c1], (ph, pw)


@torch.fx.wrap  # a leaf for torch.fx: callers reach it as dwconv.depthwise_conv2d, which tracing patches
def depthwise_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` with the fastest algorithms of this device (a
    strided conv chooses among ``STRIDED``: the direct conv and PyTorch's backward, in the input's dtype or in
    float32). A dilated conv (the later stages of a model built with ``output_stride`` 8 or 16) is PyTorch's own
    ``F.conv2d``, forward and backward, whatever algorithm is fixed.

    On maps smaller than the kernel, taps that only ever see zero padding are skipped (same result, less
    work). Traced and compiled graphs (jit.trace, torch.compile, torch.export, ONNX export) see plain
    ``F.conv2d``, valid at every input size; with ``config.set_dwconv_algorithms(forward='toeplitz')`` they record
    the matrix form instead (whole rows, or the tile of ``toeplitz:<tile>``), valid at the traced input width
    (torch.fx keeps this function as a leaf).
    """
    if x.device.type == 'meta' or dilation != 1:
        return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])
    if is_tracing():  # graphs record plain ops: F.conv2d, or the matrix form where it is forced (e.g. for ONNX)
        fixed = config.dwconv_algorithms()['forward']
        if stride != 1 or not fixed.startswith('toeplitz'):
            return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])
        out = toeplitz.conv(x, weight, (padding, padding), tile_of(fixed))
        return out if bias is None else out + bias.reshape(1, -1, 1, 1)
    if x.numel() == 0:  # an empty batch: nothing to tune on (FFTs refuse empty tensors)
        return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:  # conv2d runs in the autocast dtype: cast once, as autocast would
        with torch.autocast(x.device.type, enabled=False):
            return depthwise_conv2d(
                x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding)
    if stride == 1:
        weight, pads = crop_kernel(weight, padding, x.shape[-2:])
    else:
        pads = (padding, padding)
    return _DepthwiseConv2d.apply(x, weight, bias, pads, stride)
