"""Inference fast path: folded weights run as fused convolutions.

In eval mode without autograd, each block of an SMPConv model runs its convolutions with every BatchNorm
folded in (the deploy-form weights, in the train form too), the following GELU or the residual add fused
into the conv, and on CPU with weights prepacked once into oneDNN's blocked layout (the plain layout is
re-blocked on every call otherwise). ReLU runs in place after the conv: oneDNN's fused ReLU turns NaN into
0, PyTorch's keeps it. Results equal the plain modules' up to float rounding, NaN and inf included;
``tests/test_fastpath.py`` holds them to it.

Where oneDNN's fused ops are unavailable (other devices, dtypes or PyTorch builds) the same plan runs
as plain ``conv2d`` + activation + add.

``smpconv_timm.config.set_inference_fast_path(False)`` (or ``SMPCONV_FASTPATH=0``) turns it off: eval then runs the plain
modules, op for op what the authors' code runs. (The training recomputation has its own switch, in
``recompute.py``.)
"""
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config
from .dwconv import crop_kernel, depthwise_conv2d
from .runtime import autocast_dtype, fold_mode, is_tracing

__all__ = ['FusedConv', 'act_name', 'inference_path', 'cached_plan', 'drop_plan']


def _onednn_fusion_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, '_convolution_pointwise')
                and hasattr(torch.ops.mkldnn, '_reorder_convolution_weight'))
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_fusion_available()
_ACTS = {'none': lambda x: x, 'relu': F.relu, 'gelu': F.gelu}


def inference_path(module: nn.Module, x: torch.Tensor) -> bool:
    """True where the fast path applies: eval mode, no autograd, eager execution (autocast included: the
    fused convs then run in the autocast dtype, as ``conv2d`` does under autocast)."""
    if not config.use_inference_fast_path() or module.training or torch.is_grad_enabled() or is_tracing():
        return False
    return x.device.type != 'meta'  # no data to fold on the meta device


def _version_key(module: nn.Module) -> Optional[tuple]:
    """Version, storage and dtype of every parameter and buffer of ``module`` and its children; None where one
    is an inference tensor (made under ``torch.inference_mode``: no version counter). Checked on every eval call,
    so it walks ``_modules`` directly: ``named_modules`` costs 4x as much (0.6 ms per smpconv_t forward)."""
    key, stack = [], [module]
    try:
        while stack:
            mod = stack.pop()
            for tensors in (mod._parameters, mod._buffers):
                for t in tensors.values():
                    if t is not None:
                        key.append((t._version, t.data_ptr(), t.dtype))
            for child in mod._modules.values():
                if child is not None:
                    stack.append(child)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None
    return tuple(key)


def cached_plan(module: nn.Module, build):
    """``build()`` once per parameter / buffer state of ``module`` (every call where that state has no version),
    in ``fold_mode``; dropped by ``module.train()``."""
    key = _version_key(module)
    cache = module.__dict__.get('_fast_plan')
    if cache is None or key is None or cache[0] != key:
        with fold_mode(module):
            cache = (key, build())
        module.__dict__['_fast_plan'] = cache
    return cache[1]


def drop_plan(module: nn.Module) -> None:
    module.__dict__.pop('_fast_plan', None)


class FusedConv:
    """``act(conv2d(x) + bias)`` or ``conv2d(x) + bias + residual`` for inference, from folded weights.

    Under autocast the conv runs in the autocast dtype (weights cast once and kept), as autocast runs
    ``conv2d``. oneDNN-packed weights are kept per input geometry (shape, dtype), the last
    ``MAX_GEOMETRIES`` of them.
    """
    MAX_GEOMETRIES = 4

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int = 1, padding: int = 0,
                 groups: int = 1, act: str = 'none'):
        self.weight, self.bias = weight.detach(), bias.detach()
        self.stride, self.padding, self.groups, self.act = stride, padding, groups, act
        self.depthwise = groups > 1 and groups == weight.shape[0] and weight.shape[1] == 1
        self._packed: 'OrderedDict[tuple, Tuple[torch.Tensor, Tuple[int, int]]]' = OrderedDict()
        self._cast: Dict[torch.dtype, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self):
        # oneDNN-packed weights are opaque tensors that cannot be copied or pickled: repacked on demand
        return dict(self.__dict__, _packed=OrderedDict(), _cast={})

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        device = x.device.type
        dtype = autocast_dtype(device)
        if dtype is not None and x.is_floating_point():
            with torch.autocast(device, enabled=False):
                return self._run(x.to(dtype), residual, *self._params(dtype))
        return self._run(x, residual, self.weight, self.bias)

    def _params(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        if dtype == self.weight.dtype:
            return self.weight, self.bias
        if dtype not in self._cast:
            self._cast[dtype] = (self.weight.to(dtype), self.bias.to(dtype))
        return self._cast[dtype]

    def _run(self, x, residual, weight, bias) -> torch.Tensor:
        if residual is not None and residual.dtype != x.dtype:
            return self._run(x, None, weight, bias) + residual  # type promotion as the plain add has it
        onednn_dtype = x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
        if _ONEDNN and x.device.type == 'cpu' and onednn_dtype:
            return self._onednn(x, residual, weight, bias)
        if self.depthwise:
            y = depthwise_conv2d(x, weight, bias, self.stride, self.padding)
        else:
            y = F.conv2d(x, weight, bias, self.stride, self.padding, 1, self.groups)
        y = _ACTS[self.act](y)
        return y if residual is None else y + residual

    def _weight_for(self, x: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """The oneDNN-packed weight for this input geometry (taps that only see padding cropped, as in
        ``depthwise_conv2d``); oneDNN picks the blocked layout by input shape."""
        key = (tuple(x.shape), x.dtype, x.is_contiguous())
        packed = self._packed.get(key)
        if packed is not None:
            self._packed.move_to_end(key)
            return packed
        padding = (self.padding, self.padding)
        if self.depthwise and self.stride == 1:
            weight, padding = crop_kernel(weight, self.padding, x.shape[-2:])
            weight = weight.contiguous()
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, list(padding), [self.stride] * 2, [1, 1], self.groups, list(x.shape))
        self._packed[key] = (packed, padding)
        while len(self._packed) > self.MAX_GEOMETRIES:
            self._packed.popitem(last=False)
        return self._packed[key]

    def _onednn(self, x, residual, weight, bias) -> torch.Tensor:
        weight, padding = self._weight_for(x, weight)
        geometry = (list(padding), [self.stride] * 2, [1, 1], self.groups)
        if residual is None:
            if self.act == 'relu':  # oneDNN's fused ReLU maps NaN to 0 where PyTorch's keeps it: ReLU after the conv
                return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, 'none', [], '').relu_()
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, *geometry, self.act, [], 'none' if self.act == 'gelu' else '')
        assert self.act == 'none', 'a fused residual add takes no activation'
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, weight, bias, *geometry, 'add', None, None, [], None)


def act_name(act: nn.Module) -> str:
    """The name ``FusedConv`` takes for an activation module (ReLU, exact GELU, Identity)."""
    names = {nn.ReLU: 'relu', nn.GELU: 'gelu', nn.Identity: 'none'}
    if type(act) not in names or getattr(act, 'approximate', 'none') != 'none':
        raise ValueError(f'no fused form for activation {act}')
    return names[type(act)]
