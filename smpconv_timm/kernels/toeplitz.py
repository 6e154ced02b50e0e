"""The large depthwise conv as matrix products: each kernel row a banded (Toeplitz) matrix.

Kernel row ``a`` of channel ``c`` acts on an image row as a banded matrix: output column ``j`` reads input column
``v`` through tap ``v - j + shift`` (zero outside the kernel). The input is cut into column tiles of ``tile``
outputs, each reading ``tile + kw - 1`` input columns (zero padding included). With each channel's tile columns laid
out as channels, ``(N * tiles, C * cols, H, 1)``, the conv is one grouped conv over H: ``C`` groups of ``cols``
input and ``tile`` output channels, the ``kh`` band matrices as its taps. That is an implicit GEMM of depth
``cols * kh`` per output that oneDNN / cuDNN run on the matrix units (AMX, tensor cores), at ``cols / kw`` times the
multiply-adds of the direct conv. The band is the same for every tile, so it does not depend on the image width.
``tile=0`` takes whole rows instead, the horizontal zero padding folded into the band (``shift``): no padded copy,
but a band per image width.

Backward is the same grouped conv's: the input gradient is the forward with the flipped kernel, the kernel gradient
the band gradient summed along its diagonals. ``weight_grad_rows`` gets the whole-row band gradients from batched
matmuls instead: for kernel row ``a``, the output gradient's rows against the input rows ``a`` further down, all
channels in one ``bmm`` (on small maps its GEMMs are larger than the grouped conv's, per channel instead of per
tile column), and all their diagonal sums as one more matmul.
"""
import functools
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

__all__ = ['Tiling', 'tiling', 'band_weight', 'input_rows', 'output_rows', 'from_rows', 'conv', 'weight_grad',
           'weight_grad_rows']


class Tiling(NamedTuple):
    out_width: int  # output columns of the conv
    tile: int  # output columns per tile
    tiles: int  # tiles per image row
    cols: int  # input columns each tile reads
    left: int  # zero columns added left and right of the input
    right: int
    shift: int  # input column v feeds output column j through tap v - j + shift


def tiling(width: int, kw: int, pad: int, tile: int) -> Tiling:
    """How an input ``width`` wide with horizontal padding ``pad`` is cut for a kernel ``kw`` wide; ``tile`` output
    columns per tile, or 0 (or at least the output width) for whole rows."""
    out_width = width + 2 * pad - kw + 1
    if tile <= 0 or tile >= out_width:
        return Tiling(out_width, out_width, 1, width, 0, 0, pad)
    tiles = -(-out_width // tile)
    return Tiling(out_width, tile, tiles, tile + kw - 1, pad, tiles * tile + kw - 1 - width - pad, 0)


def band_weight(weight: torch.Tensor, t: Tiling) -> torch.Tensor:
    """A depthwise kernel (C, 1, kh, kw) as the grouped-conv weight (C * tile, cols, kh, 1), channels-last.

    Band row ``j`` of kernel row ``a`` is the kernel row shifted right by ``j``: a window of ``cols`` taps of the
    zero-padded kernel row, starting ``j`` taps further left for each next ``j``. One indexed copy of the windows
    (a view) writes the band in the grouped conv's channels-last order, (C, tile, kh, cols)."""
    c, _, kh, kw = weight.shape
    left, right = max(0, t.tile - 1 - t.shift), max(0, t.cols + t.shift - kw)
    windows = F.pad(weight[:, 0], (left, right)).unfold(2, t.cols, 1)  # (C, kh, windows, cols)
    start = torch.arange(t.shift + left, t.shift + left - t.tile, -1, device=weight.device)  # band row j's window
    band = windows.permute(0, 2, 1, 3)[:, start]  # (C, tile, kh, cols)
    return band.reshape(c * t.tile, kh, 1, t.cols).permute(0, 3, 1, 2)


def _rows(x: torch.Tensor, cols: int, step: int, left: int, right: int) -> torch.Tensor:
    """(N, C, H, W) -> (N * tiles, C * cols, H, 1), channels-last: windows of ``cols`` columns every ``step`` of the
    input padded by ``left`` / ``right`` zero columns, each channel's window columns as channels (one copy)."""
    if left or right:
        x = F.pad(x, (left, right))
    windows = x.unfold(3, cols, step)  # (N, C, H, tiles, cols), a view
    n, c, h, tiles, _ = windows.shape
    rows = torch.empty((n * tiles, c * cols, h, 1), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    rows.permute(0, 2, 3, 1).view(n, tiles, h, c, cols).copy_(windows.permute(0, 3, 2, 1, 4))
    return rows


def input_rows(x: torch.Tensor, t: Tiling) -> torch.Tensor:
    return _rows(x, t.cols, t.tile, t.left, t.right)


def output_rows(y: torch.Tensor, t: Tiling) -> torch.Tensor:
    """A tensor shaped like the conv's output (a gradient) in the grouped conv's output layout."""
    return _rows(y, t.tile, t.tile, 0, t.tiles * t.tile - t.out_width)


def from_rows(y: torch.Tensor, t: Tiling, layout: torch.memory_format) -> torch.Tensor:
    """The grouped conv's output (N * tiles, C * tile, H, 1) as (N, C, H, W_out) in ``layout``."""
    nt, ct, h, _ = y.shape
    n, c = nt // t.tiles, ct // t.tile
    out = y.permute(0, 2, 3, 1).reshape(n, t.tiles, h, c, t.tile).permute(0, 3, 2, 1, 4)
    return out.reshape(n, c, h, t.tiles * t.tile)[..., :t.out_width].contiguous(memory_format=layout)


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def conv(x: torch.Tensor, weight: torch.Tensor, padding: Tuple[int, int], tile: int) -> torch.Tensor:
    """``F.conv2d(x, weight, None, 1, padding, 1, C)`` as matrix products, in ``x``'s layout."""
    t = tiling(x.shape[-1], weight.shape[-1], padding[1], tile)
    out = F.conv2d(input_rows(x, t), band_weight(weight, t), None, 1, (padding[0], 0), 1, x.shape[1])
    return from_rows(out, t, _layout(x))


@functools.lru_cache(maxsize=32)
def _diagonals(out_w: int, w: int, kw: int, pw: int, device: torch.device) -> torch.Tensor:
    """(out_w * w, kw) float32, 1 where entry (j, v) of an (out_w, w) matrix lies on the diagonal of tap
    b = v - j + pw, else 0: a flattened matrix times this sums its diagonals (tiny: 0.4 MB for a 56-wide map)."""
    tap = (torch.arange(w, device=device) - torch.arange(out_w, device=device)[:, None] + pw).flatten()
    on_kernel = (tap >= 0) & (tap < kw)
    return F.one_hot(tap.where(on_kernel, kw), kw + 1)[:, :kw].float()


def weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel: Tuple[int, int], padding: Tuple[int, int],
                tile: int) -> torch.Tensor:
    """The kernel gradient (C, 1, kh, kw) of ``conv``, in float32 at least."""
    c = x.shape[1]
    kh, kw = kernel
    t = tiling(x.shape[-1], kw, padding[1], tile)
    band_like = torch.empty((c * t.tile, t.cols, kh, 1), dtype=grad.dtype, device=grad.device,
                            memory_format=torch.channels_last)
    band_grad = torch.ops.aten.convolution_backward(
        output_rows(grad, t), input_rows(x, t), band_like, None, [1, 1], [padding[0], 0], [1, 1], False, [0, 0], c,
        [False, True, False])[1]
    # the band's diagonals: column v of band row j holds tap v - j + shift
    grad_band = band_grad.reshape(c, t.tile, t.cols, kh).permute(0, 3, 1, 2)  # (C, kh, tile, cols)
    grad_band = grad_band.to(torch.promote_types(grad_band.dtype, torch.float32), memory_format=torch.contiguous_format)
    grad_band = grad_band.reshape(c * kh, t.tile * t.cols)  # one copy in all: the dtype and the layout together
    taps = grad_band @ _diagonals(t.tile, t.cols, kw, t.shift, grad_band.device).to(grad_band.dtype)
    return taps.view(c, 1, kh, kw)


def weight_grad_rows(x: torch.Tensor, grad: torch.Tensor, kernel: Tuple[int, int],
                     padding: Tuple[int, int]) -> torch.Tensor:
    """The kernel gradient (C, 1, kh, kw) of ``F.conv2d(x, weight, None, 1, padding, 1, C)``, in float32 at least.

    ``band[a, c, j, v]`` sums ``grad[n, c, i, j] * x[n, c, i + a - ph, v]`` over images and output rows: with the rows
    of every image side by side, ``(C, H + 2 ph, N, W)``, the input rows ``a`` below the output rows are one slice,
    so each kernel row is one batched matmul over the channels. Tap ``b`` of kernel row ``a`` is the diagonal
    ``v - j = b - pw`` of ``band[a]``, summed for every row, channel and tap at once by one matmul (``_diagonals``).
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    ph, pw = padding
    out_h, out_w = grad.shape[-2:]
    rows = x.new_empty((c, h + 2 * ph, n, w))
    rows[:, :ph].zero_()
    rows[:, ph + h:].zero_()
    rows[:, ph:ph + h].copy_(x.permute(1, 2, 0, 3))
    grad_rows = grad.permute(1, 3, 2, 0).reshape(c, out_w, out_h * n)  # (C, W_out, H_out * N), one copy
    band = grad.new_empty((kh, c, out_w, w))
    for a in range(kh):
        torch.bmm(grad_rows, rows[:, a:a + out_h].reshape(c, out_h * n, w), out=band[a])
    band = band.to(torch.promote_types(band.dtype, torch.float32)).view(kh * c, out_w * w)
    taps = band @ _diagonals(out_w, w, kw, pw, band.device).to(band.dtype)  # (kh * C, kw)
    return taps.view(kh, c, kw).transpose(0, 1).unsqueeze(1)
