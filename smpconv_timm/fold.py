"""BatchNorm folding: the maths of structural reparameterization and of the inference fast path.

Every fold is exact in real arithmetic; in float it is computed in float32 at least and rounded once to the
parameters' dtype (folds computed in bf16 lose several bits). ``folds`` makes the deploy form the same whatever
context the caller folds in (autocast, inference mode, autograd on or off).
"""
import functools
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .kernels import fold_mode

__all__ = [
    'bn_scale_shift', 'fuse_bn', 'fold_pre_bn', 'low_precision', 'conv_like', 'set_folded', 'has_bn', 'to_eval',
    'folds',
]


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


def _never_saw_data(bn: nn.BatchNorm2d) -> bool:
    """Running statistics at their initial values (mean 0, variance 1): no batch and no checkpoint set them."""
    mean, var = bn.running_mean, bn.running_var
    return mean is not None and var is not None and not mean.any() and bool((var == 1).all())


def to_eval(module: nn.Module) -> None:
    """Folding uses running statistics: switch a module in training mode to eval. A trained model (timm's
    validate.py reparameterizes before ``.eval()``) switches silently; a warning where a BatchNorm never saw data,
    as its folded statistics are then the initial ones, not what the training-mode forward normalises with."""
    if not module.training:
        return
    if any(_never_saw_data(m) for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        warnings.warn(
            'reparameterizing a model in training mode whose BatchNorm layers never saw data: their initial running '
            'statistics (mean 0, variance 1) are folded, not batch statistics, and the reparameterized modules are '
            'switched to eval mode', stacklevel=4)
    module.eval()


def _drop_inference_tensors(module: nn.Module) -> None:
    """Normal copies in place of the inference tensors among ``module``'s parameters and buffers (a ``deepcopy``
    under ``torch.inference_mode``, as ``reparameterize_model`` makes, creates them); call in ``fold_mode``."""
    for m in module.modules():
        for tensors in (m._parameters, m._buffers):
            for name, t in list(tensors.items()):
                if t is not None and t.is_inference():
                    copy = t.clone()
                    tensors[name] = nn.Parameter(copy, t.requires_grad) if isinstance(t, nn.Parameter) else copy


def folds(method):
    """Decorator for the methods that fold a module into its deploy form (``reparameterize``, ``fuse``): they run in
    ``fold_mode`` (no autocast, no autograd, no inference mode), and the deploy form holds no inference tensors, so
    that it is the same model, runnable in every context, whatever context it was made in."""
    @functools.wraps(method)
    def wrapper(module: nn.Module, *args, **kwargs):
        with fold_mode(module):
            _drop_inference_tensors(module)
            return method(module, *args, **kwargs)
    return wrapper
