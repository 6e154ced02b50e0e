"""SMPConv: a depthwise convolution whose kernel is a function of self-moving points.

Paper: "SMPConv: Self-moving Point Representations for Continuous Convolution", Kim & Park, CVPR 2023.

A layer with ``C`` channels and kernel size ``k`` owns ``P = k * k // 4`` points. Point ``p`` has a
position ``X[p] = (x, y)`` in [-1, 1]^2, a radius ``R[p]`` and one weight per channel ``W[c, p]``. With
``u = linspace(-1, 1, k)`` the dense depthwise kernel is

    K[c, i, j] = sum_p W[c, p] * max(0, 1 - (|X[p, 0] - u[j]| + |X[p, 1] - u[k - 1 - i]|) / R[p])

and is applied as an ordinary cross-correlation with ``padding = k // 2``. ``x`` runs along the columns
(left to right), ``y`` upward (row ``i`` sits at height ``u[k - 1 - i]``, i.e. ``-u[i]`` up to float32
rounding of ``linspace``). As in the authors' release there is no 1 / |N| normalisation.

Radii live in [1e-3, 1]. After every ``torch.optim.Optimizer.step()`` that updates a radius, the radius is
clamped in place, under any training loop (timm's train.py, Lightning, a hand-written loop), without the
loop calling anything.

Radius learning rate, the one rule: the paper trains radii at 0.1x the learning rate. timm's
``create_optimizer_v2`` (what train.py calls) has no per-parameter learning rate and puts radii in groups
with other parameters, so in a param group that holds radii AND other parameters, each radius moves by
``RADIUS_LR_SCALE`` (0.1) times the step its optimizer computed (global optimizer step hooks; for optimizers
whose update is linear in the learning rate, such as SGD, Adam and AdamW without weight decay on radii, this
is exactly a 0.1x learning rate). A param group that holds radii alone was built for them by the user (as
the authors' code does, at 0.1x the lr): it keeps exactly the lr it was given, with no second scaling. A
group's ``'radius_lr_scale'`` entry overrides both (1.0 turns the scaling off).
"""
import weakref
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from timm.layers import register_notrace_module, trunc_normal_

from .kernels import TransientCaches, autocast_dtype, dwconv, fold_mode, is_fx_tracing, is_tracing

__all__ = ['SMPConv2d', 'smp_kernel', 'RADIUS_MIN', 'RADIUS_MAX', 'RADIUS_LR_SCALE']

RADIUS_MIN = 1e-3
RADIUS_MAX = 1.0
RADIUS_LR_SCALE = 0.1


def smp_kernel(weight_coord: torch.Tensor, radius: torch.Tensor, weights: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Dense depthwise kernel (C, 1, k, k) from points: positions (1, P, 2), radii (1, P, 1, 1), weights (1, C, P)."""
    coord = weight_coord[0]
    # The release samples a float32 linspace buffer and flips rows; -u[i] is u[k-1-i] only up to rounding
    # (float32 linspace is not exactly symmetric), so build the grid the same way to be bit-exact.
    # (built on the CPU and moved with .to(coord): traced by torch.fx as a constant, which torch 2.4 needs)
    u = torch.linspace(-1., 1., kernel_size, dtype=torch.float32).to(coord)
    dist_x = (coord[:, 0:1] - u).abs()  # (P, k) along columns j
    dist_y = (coord[:, 1:2] - u.flip(0)).abs()  # (P, k) along rows i, y measured upward
    dist = dist_y[:, :, None] + dist_x[:, None, :]  # (P, k, k) L1 distance of point p to tap (i, j)
    interp = F.relu(1. - dist / radius.reshape(-1, 1, 1))
    kernel = weights[0] @ interp.reshape(interp.shape[0], -1)  # (C, k * k)
    return kernel.reshape(weights.shape[1], 1, kernel_size, kernel_size)


@register_notrace_module  # a leaf for torch.fx: the kernel cache below is eager-only logic
class SMPConv2d(TransientCaches, nn.Module):
    """Depthwise conv with a continuous kernel of self-moving points; a drop-in for a depthwise nn.Conv2d.

    Args:
        channels: Input = output channels (depthwise).
        kernel_size: Size of the kernel grid the points are sampled on.
        n_points: Number of points, ``kernel_size ** 2 // 4`` by default.
        stride: Conv stride.
        padding: Conv padding, ``dilation * (kernel_size // 2)`` by default (the output keeps the input's size).
        dilation: Conv dilation: the kernel's taps ``dilation`` pixels apart (the points and the kernel grid are
            the same; only where the taps land changes).
        bias: Add a learnable per-channel bias.
    """

    def __init__(
            self,
            channels: int,
            kernel_size: int,
            n_points: Optional[int] = None,
            stride: int = 1,
            padding: Optional[int] = None,
            bias: bool = False,
            dilation: int = 1,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if kernel_size < 1 or channels < 1 or dilation < 1:
            raise ValueError(f'SMPConv2d needs channels >= 1, kernel_size >= 1 and dilation >= 1, got {channels}, '
                             f'{kernel_size}, {dilation}')
        self.channels = self.in_channels = self.out_channels = self.groups = channels
        self.kernel_size = kernel_size
        self.n_points = n_points or max(1, kernel_size * kernel_size // 4)
        self.stride = stride
        self.dilation = dilation
        self.padding = dilation * (kernel_size // 2) if padding is None else padding
        self.weight_coord = nn.Parameter(torch.empty(1, self.n_points, 2, **dd))
        self.radius = nn.Parameter(torch.empty(1, self.n_points, 1, 1, **dd))
        self.weights = nn.Parameter(torch.empty(1, channels, self.n_points, **dd))
        self.bias = nn.Parameter(torch.zeros(channels, **dd)) if bias else None
        self.reset_parameters()
        _LIVE_LAYERS.add(self)

    _kernel_cache: Optional[Tuple[tuple, torch.Tensor]] = None  # inference only; never copied, pickled or saved

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight_coord, std=0.2, a=-1., b=1.)
        nn.init.constant_(self.radius, 4. / self.kernel_size)
        trunc_normal_(self.weights, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault('dilation', 1)  # pickled before dilation existed
        _LIVE_LAYERS.add(self)  # copies (deepcopy, pickle) are trained too, e.g. after reparameterize_model

    def train(self, mode: bool = True):
        self._kernel_cache = None  # also drops a kernel cached from params edited through `.data`
        return super().train(mode)

    def make_kernel(self, kernel_size: Optional[int] = None) -> torch.Tensor:
        """The dense kernel (C, 1, k, k); ``kernel_size`` samples the same continuous function on another grid.

        Always in the parameters' dtype: under autocast, the conv that uses it casts it.
        """
        k = kernel_size or self.kernel_size
        if is_tracing() or autocast_dtype(self.weights.device.type) is None:  # traced graphs: the plain computation
            return smp_kernel(self.weight_coord, self.radius, self.weights, k)
        with torch.autocast(self.weights.device.type, enabled=False):
            return smp_kernel(self.weight_coord, self.radius, self.weights, k)

    def _kernel(self) -> torch.Tensor:
        params = (self.weight_coord, self.radius, self.weights)
        if (
                self.training
                or is_tracing()
                or (torch.is_grad_enabled() and any(p.requires_grad for p in params))
        ):
            return self.make_kernel()
        # inference: reuse the kernel until a parameter changes (in-place update, load_state_dict, .to())
        try:
            key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        except RuntimeError:  # inference tensors (made under torch.inference_mode) have no version to check
            key = None
        if self._kernel_cache is None or key is None or self._kernel_cache[0] != key:
            with fold_mode(self):  # a normal tensor, also when built under inference_mode or autocast
                self._kernel_cache = (key, self.make_kernel())
        return self._kernel_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_fx_tracing():
            if x.ndim != 4 or x.shape[1] != self.channels:
                raise ValueError(
                    f'SMPConv2d({self.channels}) expects (N, {self.channels}, H, W) input, got {tuple(x.shape)}')
            if not x.is_floating_point():
                raise TypeError(f'SMPConv2d expects a floating-point input, got dtype {x.dtype}')
        return dwconv.depthwise_conv2d(x, self._kernel(), self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        s = f'{self.channels}, kernel_size={self.kernel_size}, n_points={self.n_points}, stride={self.stride}'
        s += f', padding={self.padding}'
        if self.dilation != 1:
            s += f', dilation={self.dilation}'
        return s + (', bias=True' if self.bias is not None else '')


# ---------------------------------------------------------------------------------------------------------
# Radius clamp and radius learning-rate ratio, for every torch optimizer.
# Global step hooks see every torch.optim.Optimizer (timm's, torch's, Lightning's wrapped ones).

_LIVE_LAYERS: 'weakref.WeakSet[SMPConv2d]' = weakref.WeakSet()
_SNAPSHOTS: 'weakref.WeakKeyDictionary[torch.optim.Optimizer, List]' = weakref.WeakKeyDictionary()


def _radii_in(optimizer: torch.optim.Optimizer) -> Iterator[Tuple[torch.Tensor, float]]:
    radii = {id(m.radius): m.radius for m in list(_LIVE_LAYERS)}
    if not radii:
        return
    for group in optimizer.param_groups:
        scale = group.get('radius_lr_scale')
        if scale is None:  # the rule of the module docstring: radii alone keep the group's lr as given
            scale = 1. if all(id(p) in radii for p in group['params']) else RADIUS_LR_SCALE
        scale = float(scale)
        for p in group['params']:
            if id(p) in radii:
                yield p, scale


def _before_step(optimizer, args, kwargs) -> None:
    _SNAPSHOTS.pop(optimizer, None)  # left over from a step that raised
    # a wrapper optimizer (e.g. Lookahead) steps its inner one: the outermost step owns each radius
    busy = {id(p) for snap in _SNAPSHOTS.values() for p, _, _ in snap}
    with torch.no_grad():
        snap = [(p, s, p.detach().clone() if s != 1. else None) for p, s in _radii_in(optimizer) if id(p) not in busy]
    if snap:
        _SNAPSHOTS[optimizer] = snap


def _after_step(optimizer, args, kwargs) -> None:
    snap = _SNAPSHOTS.pop(optimizer, None)
    if not snap:
        return
    with torch.no_grad():
        for p, scale, before in snap:
            if before is not None:
                p.lerp_(before, 1. - scale)  # before + scale * (after - before)
            p.clamp_(RADIUS_MIN, RADIUS_MAX)


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)


@torch.no_grad()
def clamp_radii_(module: nn.Module) -> None:
    """Clamp every SMP radius in ``module`` to [RADIUS_MIN, RADIUS_MAX] (the optimizer hooks do this already)."""
    layers = [m for m in module.modules() if isinstance(m, SMPConv2d)]
    if not layers:
        raise RuntimeError(
            f'{type(module).__name__} holds no SMPConv2d layer and so no radii: a deploy-form (reparameterized) '
            f'model has dense kernels only')
    for m in layers:
        m.radius.clamp_(RADIUS_MIN, RADIUS_MAX)
