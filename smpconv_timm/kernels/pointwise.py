"""1x1 convs in training: oneDNN's conv, or the same matmul as ``F.linear`` on the rows of a channels-last map.

A 1x1 conv over a channels-last ``(N, C, H, W)`` map is the matmul of its ``(N * H * W, C)`` rows with the
``(O, C)`` weight, and ``x.permute(0, 2, 3, 1)`` is those rows without a copy. PyTorch sends the two forms to
different libraries: on an Intel CPU with AMX the bf16 matmul (forward and backward) runs up to 2x faster as
``F.linear`` than as a conv, while on an AMD CPU MKL's fp32 ``F.linear`` is slower than oneDNN's conv. So
``pointwise_conv2d`` times both, forward and backward, once per (device, dtype, shape) and keeps the faster, as
``dwconv`` does for the large kernels. It applies where autograd records a channels-last CPU or CUDA input; eval
(the fused fast path), NCHW maps and traced graphs run ``F.conv2d``.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .. import config
from . import dwconv
from .runtime import autocast_dtype, is_tracing

__all__ = ['pointwise_conv2d', 'ALGORITHMS']

#: what ``pointwise_conv2d`` chooses from (``config.set_dwconv_algorithms(pointwise=...)`` fixes one)
ALGORITHMS = config.POINTWISE_ALGORITHMS


def _run(algo: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if algo == 'linear':
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias)


def _applies(x: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() and x.dim() == 4 and x.numel() > 0 and x.device.type in ('cpu', 'cuda')
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


@torch.fx.wrap  # a leaf for torch.fx, as dwconv.depthwise_conv2d
def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 weight (stride 1, no padding, one group), channels-last out where the
    input is."""
    if is_tracing() or not _applies(x):
        return F.conv2d(x, weight, bias)
    dtype = autocast_dtype(x.device.type) or x.dtype
    key = (x.device.type, dtype, tuple(x.shape), tuple(weight.shape), bias is not None, 1)  # ends with the stride

    def fwd_bwd(algo: str) -> torch.Tensor:
        xx, ww = x.detach().requires_grad_(), weight.detach().requires_grad_()
        out = _run(algo, xx, ww, None if bias is None else bias.detach())
        out.backward(torch.ones_like(out))
        return out

    return _run(dwconv.pick('pointwise', key, fwd_bwd, ALGORITHMS), x, weight, bias)
