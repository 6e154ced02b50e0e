"""Memory-lean training: recompute cheap element-wise results in backward instead of storing them.

The ConvFFN block's hidden tensors are 4x wider than the block. Plain autograd keeps three of them per
block for backward: the 1x1 conv output (BatchNorm's input), the BatchNorm output (GELU's input) and the
GELU output (the next 1x1 conv's input). ``bn_gelu_conv`` keeps only the first, with the BatchNorm's batch
statistics, and recomputes the other two (one normalisation and one GELU) during backward. Every step
runs PyTorch's own kernels (``native_batch_norm``, ``gelu``, ``convolution_backward``,
``native_batch_norm_backward``), so values and gradients are those of the plain modules up to float
rounding, and running statistics are updated exactly as ``nn.BatchNorm2d`` does.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config
from .runtime import autocast_dtype, is_tracing

__all__ = ['bn_gelu_conv', 'recompute_applies']


def recompute_applies(bn: nn.Module, x: torch.Tensor) -> bool:
    """Plain ``nn.BatchNorm2d`` in training with autograd on, eager, no autocast, a non-empty batch (SyncBatchNorm,
    AMP and empty batches take the plain modules)."""
    if is_tracing():  # traced graphs record the plain modules (x may be an fx Proxy here)
        return False
    return (
        config.use_training_recompute() and type(bn) is nn.BatchNorm2d and bn.training and bn.track_running_stats and bn.affine
        and torch.is_grad_enabled() and autocast_dtype(x.device.type) is None and x.numel() > 0
    )


def bn_gelu_conv(x: torch.Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(gelu(bn(x)))`` for a training-mode BatchNorm and a bias-free 1x1 conv."""
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1. / float(bn.num_batches_tracked)
    return _BnGeluConv.apply(x, bn.weight, bn.bias, conv.weight, bn.running_mean, bn.running_var, momentum, bn.eps)


class _BnGeluConv(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, conv_weight, running_mean, running_var, momentum, eps):
        normed, mean, invstd = torch.ops.aten.native_batch_norm(
            x, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps)
        # GELU in place: the normalised tensor is needed only as its input, and a 4x-wide tensor not allocated
        # is one whose fresh pages are not faulted in (glibc maps each allocation above 32 MB anew)
        out = F.conv2d(torch.ops.aten.gelu_(normed), conv_weight)
        ctx.save_for_backward(x, bn_weight, bn_bias, conv_weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, bn_weight, bn_bias, conv_weight, mean, invstd = ctx.saved_tensors
        # x * scale + shift in one pass, the form PyTorch's batch-norm forward computes on CPU
        scale = invstd * bn_weight
        shift = bn_bias - mean * scale
        normed = torch.addcmul(shift.reshape(1, -1, 1, 1), x, scale.reshape(1, -1, 1, 1))
        hidden = F.gelu(normed)
        grad_hidden, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
            grad, hidden, conv_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
        grad_normed = torch.ops.aten.gelu_backward.grad_input(grad_hidden, normed, grad_input=hidden)
        del normed, grad_hidden
        grad_x, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_normed, x, bn_weight, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        return grad_x, grad_bn_weight, grad_bn_bias, grad_conv_weight, None, None, None, None
