"""Large-kernel depthwise convolution used by SMPConv2d and its deploy form."""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['depthwise_conv2d']


def _crop(k: int, pad: int, size: int):
    """Rows [lo, hi) of a k-tap kernel that can touch a `size`-long input at stride 1, and the padding left."""
    out = size + 2 * pad - k + 1
    lo = max(0, pad - out + 1)
    hi = min(k, pad + size)
    return lo, hi, pad - lo


def depthwise_conv2d(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        stride: int = 1,
        padding: int = 0,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, groups=C)``, skipping taps that only ever see zero padding.

    On maps smaller than the kernel (stage 4 of a 31x31 net at low resolution) most taps fall in the
    padding; dropping them gives the same result for less work.
    """
    kh, kw = weight.shape[-2:]
    if stride == 1 and (kh > 2 * x.shape[-2] - 1 or kw > 2 * x.shape[-1] - 1):
        r0, r1, ph = _crop(kh, padding, x.shape[-2])
        c0, c1, pw = _crop(kw, padding, x.shape[-1])
        return F.conv2d(x, weight[:, :, r0:r1, c0:c1], bias, 1, (ph, pw), 1, x.shape[1])
    return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])
