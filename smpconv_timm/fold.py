"""BatchNorm folding: the maths of structural reparameterization and of the inference fast path.

Every fold is exact in real arithmetic; in float it is computed in float32 at least and rounded once to the
parameters' dtype (folds computed in bf16 lose several bits).
"""
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['bn_scale_shift', 'fuse_bn', 'fold_pre_bn', 'low_precision', 'conv_like', 'set_folded', 'has_bn', 'to_eval']


def bn_scale_shift(bn: nn.BatchNorm2d, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BatchNorm, bn(x) = scale * x + shift, in float32 at least (and in
    ``dtype`` where that is wider): folds in bf16 / fp16 lose several bits."""
    hi = torch.promote_types(torch.promote_types(dtype, bn.weight.dtype), torch.float32)
    scale = bn.weight.to(hi) / torch.sqrt(bn.running_var.to(hi) + bn.eps)
    return scale, bn.bias.to(hi) - bn.running_mean.to(hi) * scale


def fuse_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of bn(conv(x)) as a single conv, computed in float32 at least."""
    scale, shift = bn_scale_shift(bn, weight.dtype)
    weight = weight.to(scale.dtype)
    bias = shift if bias is None else shift + bias.to(scale.dtype) * scale
    return weight * scale.reshape(-1, 1, 1, 1), bias


def low_precision(dtype: torch.dtype) -> bool:
    """bf16 / fp16: folds are computed in float32 and rounded once to these."""
    return dtype in (torch.float16, torch.bfloat16)


def conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A conv with ``conv``'s geometry holding ``weight`` and ``bias``."""
    out = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, bias=True, device=weight.device, dtype=weight.dtype)
    out.weight.copy_(weight)
    out.bias.copy_(bias)
    return out


def fold_pre_bn(weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv(bn(x)) for a 1x1 conv: exact, as a 1x1 conv has no padding for the shift to leak into."""
    if weight.shape[-2:] != (1, 1):
        raise ValueError('a BatchNorm before a conv folds exactly only into a 1x1 conv')
    scale, shift = bn_scale_shift(bn, weight.dtype)
    weight, bias = weight.to(scale.dtype), bias.to(scale.dtype)
    return weight * scale.reshape(1, -1, 1, 1), bias + (weight[:, :, 0, 0] * shift).sum(1)  # no autocast matmul


def set_folded(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """A conv + BN module (``.conv``, ``.bn``) becomes the conv with folded weights and bias, and no BN."""
    module.conv = conv_like(module.conv, weight, bias)
    module.bn = nn.Identity()
    module.eval()


def has_bn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def to_eval(module: nn.Module) -> None:
    """Folding uses running statistics: switch a module in training mode to eval, with a warning."""
    if module.training:
        warnings.warn(
            'reparameterizing a model in training mode: BatchNorm running statistics are folded and the '
            'reparameterized modules are switched to eval mode', stacklevel=3)
        module.eval()
