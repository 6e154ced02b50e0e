"""SMPConv image models for timm.

"SMPConv: Self-moving Point Representations for Continuous Convolution", Kim & Park, CVPR 2023
(https://arxiv.org/abs/2304.02330, original code https://github.com/sangnekim/SMPConv, MIT license).

A RepLKNet layout whose large depthwise kernels are SMP kernels (see ``layers.py``): each unit is a
large-kernel block (BN -> 1x1 -> SMP k x k + 5x5 -> ReLU -> 1x1) followed by a ConvFFN block
(BN -> 1x1 -> GELU -> 1x1), both residual.

Module names follow timm; ``checkpoint_filter_fn`` maps the authors' checkpoints onto them
(``transitions.{s}`` -> ``stages.{s+1}.downsample``, ``prelkb_bn`` / ``preffn_bn`` -> ``norm``,
``norm`` -> ``head.norm``, ``head`` -> ``head.fc``, ``kernel_coord`` buffers dropped).
"""
import itertools
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, calculate_drop_path_rates, create_act_layer, to_ntuple, trunc_normal_
from timm.models import (
    build_model_with_cfg, checkpoint_seq, generate_default_cfgs, named_apply, register_model, resolve_pretrained_cfg)
from timm.utils import reparameterize_model

from ._compat import feature_take_indices
from .checkpoint import CheckpointError, check_architecture, check_fits, check_grids, load_checkpoint_file, \
    to_timm_keys
from .download import hub_errors
from .fold import bn_scale_shift, conv_like, fold_pre_bn, folds, fuse_bn, has_bn, low_precision, set_folded, to_eval
from .kernels import FusedConv, TransientCaches, act_name, batch_split, begin_forward, bn_gelu_conv, cached_plan, \
    compiled_eval, compiled_eval_applies, drop_plan, dwconv, end_forward, inference_path, pointwise, recompute_applies
from .layers import SMPConv2d, smp_kernel
from .variants import VARIANTS

__all__ = ['SMPConvNet', 'checkpoint_filter_fn']


class _PlanCache(TransientCaches):
    """Drops the cached inference plan (see ``fastpath``) when the module switches between train and eval; copies
    and pickles never hold it."""

    def train(self, mode: bool = True):
        drop_plan(self)
        return super().train(mode)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` run by ``dwconv.depthwise_conv2d``, the tuned algorithms of the large kernels (for
    the 5x5 branch and the stem's and downsamplings' 3x3s: on CPU their bf16 backward is several times faster than
    PyTorch's own). Same parameters, state dict and values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dwconv.depthwise_conv2d(x, self.weight, self.bias, self.stride[0], self.padding[0], self.dilation[0])


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` run by ``pointwise.pointwise_conv2d``: in training, as oneDNN's conv or as the same matmul
    by ``F.linear``, whichever is faster on this machine. Same parameters, state dict and values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise.pointwise_conv2d(x, self.weight, self.bias)


class ConvNormAct(_PlanCache, nn.Module):
    """Bias-free conv + BatchNorm (+ ReLU); ``reparameterize()`` folds the BN into the conv."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int = 1,
            groups: int = 1,
            act_layer: Optional[type] = None,
            dilation: int = 1,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if 1 < groups == in_chs == out_chs:
            conv_layer = DepthwiseConv2d
        else:
            conv_layer = PointwiseConv2d if kernel_size == 1 and stride == 1 and groups == 1 else nn.Conv2d
        self.conv = conv_layer(in_chs, out_chs, kernel_size, stride, dilation * (kernel_size // 2), dilation,
                               groups=groups, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        # in place, as timm's ConvNormAct: BatchNorm's backward needs its input, not its output, and at the stem's
        # 112x112 a training step allocates three 4.8 MB-per-image tensors fewer
        self.act = create_act_layer(act_layer, inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inference_path(self, x):
            return cached_plan(self, self._fused_conv)(x)
        return self.act(self.bn(self.conv(x)))

    def _fused_conv(self) -> FusedConv:
        conv = self.conv
        return FusedConv(*self.folded(), conv.stride[0], conv.padding[0], conv.groups, act_name(self.act),
                         conv.dilation[0])

    def folded(self, pre_norm: Optional[nn.Module] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) with the BN folded in, and ``pre_norm``, a BatchNorm right before this 1x1 conv."""
        weight, bias = self.conv.weight, self.conv.bias
        dtype = weight.dtype  # folded in float32 at least, rounded once to the conv's dtype
        if isinstance(self.bn, nn.BatchNorm2d):
            weight, bias = fuse_bn(weight, bias, self.bn)
        elif bias is None:
            bias = weight.new_zeros(weight.shape[0])
        if isinstance(pre_norm, nn.BatchNorm2d):
            weight, bias = fold_pre_bn(weight, bias, pre_norm)
        return weight.to(dtype), bias.to(dtype)

    @folds
    def reparameterize(self, pre_norm: Optional[nn.Module] = None) -> None:
        if isinstance(self.bn, nn.BatchNorm2d) or isinstance(pre_norm, nn.BatchNorm2d):
            to_eval(self)
            self.conv = conv_like(self.conv, *self.folded(pre_norm))
            self.bn = nn.Identity()
            self.eval()


class SmpLargeKernel(nn.Module):
    """SMP k x k depthwise conv + BN, plus a small dense depthwise conv + BN, summed."""

    def __init__(
            self,
            dim: int,
            kernel_size: int,
            small_kernel: int = 5,
            n_points: Optional[int] = None,
            dilation: int = 1,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.smp = nn.Sequential(OrderedDict(
            conv=SMPConv2d(dim, kernel_size, n_points=n_points, dilation=dilation, **dd),
            bn=nn.BatchNorm2d(dim, **dd),
        ))
        self.small_conv = ConvNormAct(dim, dim, small_kernel, groups=dim, dilation=dilation, **dd) \
            if small_kernel else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.smp(x)
        if self.small_conv is not None:
            out = out + self.small_conv(x)
        return out

    def folded(self, kernel_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of one dense depthwise conv equal to both branches and their BNs (eval statistics), at the
        branches' common dilation.

        ``kernel_size`` samples the continuous SMP kernel on a larger or smaller grid than it was trained on.
        """
        smp_conv, smp_bn = self.smp.conv, self.smp.bn
        k = kernel_size or smp_conv.kernel_size
        dtype = smp_conv.weights.dtype
        if low_precision(dtype):  # sample the kernel and fold in float32, round once to the params' dtype
            with torch.autocast(smp_conv.weights.device.type, enabled=False):
                params = (smp_conv.weight_coord, smp_conv.radius, smp_conv.weights)
                kernel = smp_kernel(*(p.float() for p in params), k)
        else:
            kernel = smp_conv.make_kernel(k)
        weight, bias = fuse_bn(kernel, smp_conv.bias, smp_bn)
        if self.small_conv is not None:
            w_small, b_small = self.small_conv.folded()
            ks = w_small.shape[-1]
            if ks > k:
                raise ValueError(f'deploy kernel size {k} is smaller than the {ks}x{ks} branch it must absorb')
            pad = (k - ks) // 2
            weight = weight + F.pad(w_small, [pad, k - ks - pad] * 2)
            bias = bias + b_small
        return weight.to(dtype), bias.to(dtype)

    @folds
    def fuse(self, kernel_size: Optional[int] = None) -> 'DeployLargeKernelConv':
        """The deploy form: one ``DeployLargeKernelConv`` (timm's ``reparameterize_model`` calls this)."""
        to_eval(self)
        return DeployLargeKernelConv.from_folded(*self.folded(kernel_size), dilation=self.smp.conv.dilation)


class DeployLargeKernelConv(DepthwiseConv2d):
    """Deploy form of ``SmpLargeKernel``: one dense depthwise conv with bias."""

    def __init__(self, dim: int, kernel_size: int, dilation: int = 1, device=None, dtype=None):
        super().__init__(dim, dim, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation, groups=dim,
                         bias=True, device=device, dtype=dtype)

    @classmethod
    def from_folded(cls, weight: torch.Tensor, bias: torch.Tensor, dilation: int = 1) -> 'DeployLargeKernelConv':
        conv = cls(weight.shape[0], weight.shape[-1], dilation, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        return conv.eval()

    def folded(self, kernel_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        if kernel_size not in (None, self.kernel_size[0]):
            raise ValueError('a deploy-form kernel is dense: it cannot be resampled; reparameterize the train form')
        return self.weight, self.bias

    def __getattr__(self, name: str):
        if name in ('smp', 'small_conv', 'weight_coord', 'radius', 'weights'):
            raise AttributeError(
                f"'{name}' does not exist in deploy form: this large kernel was reparameterized into one dense "
                f"depthwise conv. SMP points, radii and the 5x5 branch exist only in the train-form model.")
        return super().__getattr__(name)


class SmpBlock(_PlanCache, nn.Module):
    """Large-kernel block: x + drop_path(pw2(relu(large_kernel(pw1(norm(x))))))."""

    def __init__(
            self,
            dim: int,
            kernel_size: int,
            small_kernel: int = 5,
            n_points: Optional[int] = None,
            drop_path: float = 0.,
            dilation: int = 1,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm = nn.BatchNorm2d(dim, **dd)
        self.pw1 = ConvNormAct(dim, dim, 1, act_layer=nn.ReLU, **dd)
        self.large_kernel = SmpLargeKernel(dim, kernel_size, small_kernel, n_points, dilation, **dd)
        self.act = nn.ReLU()
        self.pw2 = ConvNormAct(dim, dim, 1, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inference_path(self, x):
            pw1, large_kernel, pw2 = cached_plan(self, self._fused_convs)
            return pw2(large_kernel(pw1(x)), residual=x)
        return x + self.drop_path(self.pw2(self.act(self.large_kernel(self.pw1(self.norm(x))))))

    @property
    def dilation(self) -> int:
        """The large kernel's dilation: 1, or more in the stages that ``output_stride`` 8 or 16 keeps at resolution."""
        lk = self.large_kernel
        return lk.dilation[0] if isinstance(lk, nn.Conv2d) else lk.smp.conv.dilation

    def folded_weights(self, kernel_size: Optional[int] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of pw1 (with ``norm``), the large kernel and pw2, every BN folded."""
        return [self.pw1.folded(pre_norm=self.norm), self.large_kernel.folded(kernel_size), self.pw2.folded()]

    def _fused_convs(self) -> Tuple[FusedConv, FusedConv, FusedConv]:
        (w1, b1), (wk, bk), (w2, b2) = self.folded_weights()
        d = self.dilation
        lk = FusedConv(wk, bk, padding=d * (wk.shape[-1] // 2), groups=wk.shape[0], act='relu', dilation=d)
        return FusedConv(w1, b1, act='relu'), lk, FusedConv(w2, b2)

    @folds
    def reparameterize(self, kernel_size: Optional[int] = None) -> None:
        """Deploy form in place: norm folded into pw1, the large kernel one dense conv, drop path removed."""
        if isinstance(self.large_kernel, SmpLargeKernel) or has_bn(self):
            to_eval(self)
            (w1, b1), (wk, bk), (w2, b2) = self.folded_weights(kernel_size)
            set_folded(self.pw1, w1, b1)
            self.large_kernel = DeployLargeKernelConv.from_folded(wk, bk, self.dilation)
            set_folded(self.pw2, w2, b2)
            self.norm = nn.Identity()
        self.drop_path = nn.Identity()
        self.eval()


class ConvFfnBlock(_PlanCache, nn.Module):
    """ConvFFN block: x + drop_path(pw2(gelu(pw1(norm(x)))))."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.BatchNorm2d(dim, **dd)
        self.pw1 = ConvNormAct(dim, hidden, 1, **dd)
        self.act = nn.GELU()
        self.pw2 = ConvNormAct(hidden, dim, 1, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inference_path(self, x):
            pw1, pw2 = cached_plan(self, self._fused_convs)
            return pw2(pw1(x), residual=x)
        hidden = self.pw1.conv(self.norm(x))
        if recompute_applies(self.pw1.bn, hidden) and isinstance(self.act, nn.GELU) and self.act.approximate == 'none':
            # same values and gradients; the 4x-wide BN and GELU outputs are recomputed in backward
            out = self.pw2.bn(bn_gelu_conv(hidden, self.pw1.bn, self.pw2.conv))
        else:
            out = self.pw2(self.act(self.pw1.act(self.pw1.bn(hidden))))
        return x + self.drop_path(out)

    def folded_weights(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of pw1 (with ``norm``) and pw2, every BN folded."""
        return [self.pw1.folded(pre_norm=self.norm), self.pw2.folded()]

    def _fused_convs(self) -> Tuple[FusedConv, FusedConv]:
        (w1, b1), (w2, b2) = self.folded_weights()
        return FusedConv(w1, b1, act='gelu'), FusedConv(w2, b2)

    @folds
    def reparameterize(self) -> None:
        """Deploy form in place: norm folded into pw1, both BNs folded, drop path removed."""
        if has_bn(self):
            to_eval(self)
            (w1, b1), (w2, b2) = self.folded_weights()
            set_folded(self.pw1, w1, b1)
            set_folded(self.pw2, w2, b2)
            self.norm = nn.Identity()
        self.drop_path = nn.Identity()
        self.eval()


class SmpConvStage(nn.Module):
    """Optional downsample (1x1 conv + 3x3 depthwise conv, stride ``stride``), then ``depth`` (SmpBlock,
    ConvFfnBlock) units.

    A stage that keeps its input's resolution (``output_stride``) has stride 1: its downsample's 3x3 conv takes
    ``first_dilation`` (the previous stage's dilation), its blocks ``dilation``.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            kernel_size: int,
            downsample: bool = True,
            small_kernel: int = 5,
            n_points: Optional[int] = None,
            mlp_ratio: float = 4.,
            drop_path_rates: Sequence[float] = (),
            stride: int = 2,
            dilation: int = 1,
            first_dilation: int = 1,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(
                ConvNormAct(in_chs, out_chs, 1, act_layer=nn.ReLU, **dd),
                ConvNormAct(out_chs, out_chs, 3, stride=stride, groups=out_chs, act_layer=nn.ReLU,
                            dilation=first_dilation, **dd),
            )
        else:
            self.downsample = nn.Identity()
        dpr = list(drop_path_rates) or [0.] * depth
        blocks = []
        for i in range(depth):
            # the large-kernel block and the FFN block of one unit share its drop-path rate
            blocks.append(SmpBlock(out_chs, kernel_size, small_kernel, n_points, dpr[i], dilation, **dd))
            blocks.append(ConvFfnBlock(out_chs, mlp_ratio, dpr[i], **dd))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class SmpClassifierHead(ClassifierHead):
    """BatchNorm -> global pool -> dropout -> fc. ``reparameterize()`` folds the norm into ``fc``."""

    def __init__(self, in_features: int, num_classes: int, pool_type: str = 'avg', drop_rate: float = 0.,
                 device=None, dtype=None):
        super().__init__(in_features, num_classes, pool_type=pool_type, drop_rate=drop_rate, device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(in_features, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return super().forward(self.norm(x), pre_logits=pre_logits)

    @folds
    def reparameterize(self) -> None:
        if not isinstance(self.norm, nn.BatchNorm2d):
            return
        to_eval(self)
        dtype = self.norm.weight.dtype
        scale, shift = bn_scale_shift(self.norm)  # float32 at least, rounded once by the copies below
        if isinstance(self.fc, nn.Linear) and self.global_pool.pool_type == 'avg':
            # a per-channel affine map commutes with average pooling: fc(s * x + t) = (W s) x + (W t + b)
            weight = self.fc.weight.to(scale.dtype)
            self.fc.bias.copy_(self.fc.bias.to(scale.dtype) + weight @ shift)
            self.fc.weight.copy_(weight * scale)
            self.norm = nn.Identity()
        else:
            # nothing to fold into: keep the exact affine map as a 1x1 depthwise conv
            conv = nn.Conv2d(len(scale), len(scale), 1, groups=len(scale), device=scale.device, dtype=dtype)
            conv.weight.copy_(scale.reshape(-1, 1, 1, 1))
            conv.bias.copy_(shift)
            self.norm = conv
        self.eval()


class SMPConvNet(TransientCaches, nn.Module):
    """SMPConv: RepLKNet-style network with self-moving-point large kernels.

    Args:
        in_chans: Number of input image channels.
        num_classes: Number of classes for the classifier, 0 for none.
        global_pool: Global pooling type.
        depths: Units (large-kernel block + FFN block) per stage.
        dims: Channels per stage.
        kernel_sizes: SMP kernel size per stage (int for all).
        small_kernel: Size of the parallel dense depthwise kernel (0 for none).
        n_points: Points per SMP layer, ``k * k // 4`` if None.
        mlp_ratio: FFN expansion.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth rate, linear over units.
        output_stride: 32, or 16 / 8 for dense prediction: the stages past that stride keep their resolution, their
            downsampling convs at stride 1 and their large kernels, 5x5 branches and 3x3s dilated (the same
            weights; each tap lands ``dilation`` pixels apart).
        img_size: Accepted for timm API parity; the network is fully convolutional.
        deploy: Build the deploy form directly (see ``reparameterize``), e.g. to load a deploy checkpoint.
        deploy_kernel_sizes: Deploy kernel size per stage when ``deploy`` (default: the train sizes).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Sequence[int] = (2, 2, 8, 2),
            dims: Sequence[int] = (96, 192, 384, 768),
            kernel_sizes: Union[int, Sequence[int]] = (31, 29, 27, 13),
            small_kernel: int = 5,
            n_points: Optional[int] = None,
            mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            output_stride: int = 32,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            deploy: bool = False,
            deploy_kernel_sizes: Optional[Union[int, Sequence[int]]] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        kernel_sizes = to_ntuple(num_stages)(kernel_sizes)
        if not (len(dims) == len(kernel_sizes) == num_stages) or num_stages < 1:
            raise ValueError(
                f'depths, dims and kernel_sizes need one entry per stage, got {tuple(depths)}, {tuple(dims)}, '
                f'{tuple(kernel_sizes)}')
        if output_stride not in (8, 16, 32):
            raise ValueError(f'output_stride must be 8, 16 or 32 (as in timm\'s ConvNeXt), got {output_stride!r}')
        self.arch_args = dict(
            depths=tuple(depths), dims=tuple(dims), kernel_sizes=tuple(kernel_sizes),
            small_kernel=small_kernel, n_points=n_points, mlp_ratio=mlp_ratio)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        self.stem = nn.Sequential(
            ConvNormAct(in_chans, dims[0], 3, stride=2, act_layer=nn.ReLU, **dd),
            ConvNormAct(dims[0], dims[0], 3, groups=dims[0], act_layer=nn.ReLU, **dd),
            ConvNormAct(dims[0], dims[0], 1, act_layer=nn.ReLU, **dd),
            ConvNormAct(dims[0], dims[0], 3, stride=2, groups=dims[0], act_layer=nn.ReLU, **dd),
        )
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)  # linear over units, per stage
        stages = []
        self.feature_info = []
        prev_chs = dims[0]
        reduction, dilation = 4, 1  # after the stem
        for i in range(num_stages):
            stride, first_dilation = (2 if i > 0 else 1), dilation
            if stride > 1 and reduction >= output_stride:  # past output_stride: dilate instead of downsampling
                dilation *= stride
                stride = 1
            reduction *= stride
            stages.append(SmpConvStage(
                prev_chs, dims[i], depths[i], kernel_sizes[i], downsample=i > 0, small_kernel=small_kernel,
                n_points=n_points, mlp_ratio=mlp_ratio, drop_path_rates=dpr[i], stride=stride, dilation=dilation,
                first_dilation=first_dilation, **dd))
            prev_chs = dims[i]
            self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev_chs
        self.head = SmpClassifierHead(prev_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        named_apply(_init_weights, self)
        if deploy:
            self.eval().reparameterize(deploy_kernel_sizes)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^head\.norm', (99999,)),
            ]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Point positions and radii take no weight decay (1-D params are excluded by timm already)."""
        return {n for n, _ in self.named_parameters() if n.endswith(('.weight_coord', '.radius'))}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    @property
    def is_deploy(self) -> bool:
        """True once the large kernels are reparameterized into dense convs (see ``reparameterize``)."""
        return not any(isinstance(m, SMPConv2d) for m in self.modules())

    def smp_layers(self) -> List[SMPConv2d]:
        """The SMP conv layers (points, radii, weights) of a train-form model."""
        if self.is_deploy:
            raise RuntimeError(
                'this model is in deploy form (reparameterized): its large kernels are dense convs and the SMP '
                'points, radii and weights no longer exist; create the model again to train it')
        return [m for m in self.modules() if isinstance(m, SMPConv2d)]

    @folds
    def reparameterize(self, kernel_sizes: Optional[Union[int, Sequence[int]]] = None) -> None:
        """Deploy form in place: one dense depthwise conv per large-kernel block, every BN folded.

        Same result as ``timm.utils.reparameterize_model(model, inplace=True)``, plus ``kernel_sizes``: the SMP
        kernels are continuous, so the deploy convs can be sampled on another grid per stage (e.g. 51 for
        stage 1). A larger grid stretches the learned function over more pixels: it is a different model,
        not the trained one seen at higher resolution, so expect to re-validate or fine-tune it.
        """
        kernel_sizes = to_ntuple(len(self.stages))(kernel_sizes)
        for stage, k in zip(self.stages, kernel_sizes):
            for block in stage.blocks:
                if isinstance(block, SmpBlock):
                    block.reparameterize(k)
        reparameterize_model(self, inplace=True)  # the rest: stem, downsamples, FFN blocks, head

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates.

        Args:
            x: Input image tensor.
            indices: Take last n stages if int, all if None, select matching indices if sequence.
            norm: Apply the head's norm to the last-stage intermediate.
            stop_early: Stop iterating over stages when last desired intermediate hit.
            output_fmt: Shape of intermediate feature outputs (NCHW only).
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1

        started = begin_forward(self, x)
        try:
            x = self.stem(_channels_last_on_cpu(x))
            if torch.jit.is_scripting() or not stop_early:
                stages = self.stages
            else:
                stages = self.stages[:max_index + 1]
            for feat_idx, stage in enumerate(stages):
                x = stage(x)
                if feat_idx in take_indices:
                    intermediates.append(self.head.norm(x) if norm and feat_idx == last_idx else x)
        finally:
            end_forward(started)

        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Prune stages and head not required for the requested intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.head = SmpClassifierHead(self.num_features, 0, pool_type='', **_dd(self))
        if prune_norm:
            self.head.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def features_shape(self, shape: Sequence[int]) -> Tuple[int, int, int, int]:
        """The shape ``forward_features`` returns for an input of ``shape`` (N, C, H, W)."""
        n, _, h, w = shape
        for m in itertools.chain(self.stem.modules(), self.stages.modules()):
            if isinstance(m, nn.Conv2d):  # the SMP convs keep the size (odd kernels, stride 1, 'same' padding)
                h, w = _conv_out_size(m, h, w)
        return n, self.num_features, h, w

    def _largest_activations(self, h: int, w: int) -> List[int]:
        """Per part of the feature extractor (stem, each stage), the elements of its largest conv output for one
        image of ``h`` x ``w`` (the FFN's 4x wide hidden tensor in a stage), kept per input size."""
        key = (h, w, len(self.stages))
        cache = self.__dict__.setdefault('_activation_sizes', {})
        if key not in cache:
            sizes = []
            for part in (self.stem, *self.stages):
                largest = 0
                for m in part.modules():
                    if isinstance(m, nn.Conv2d):
                        h, w = _conv_out_size(m, h, w)
                        largest = max(largest, m.out_channels * h * w)
                sizes.append(largest)
            cache[key] = sizes
        return cache[key]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_input(x, self.in_chans)
        if compiled_eval_applies(self, x):  # torch.compile: the eager fast path as one op of the graph
            return compiled_eval(self, x)
        started = begin_forward(self, x)  # ReLU fusion for finite input; memory freed after packing a new size
        try:
            x = _channels_last_on_cpu(x)
            parts, chunks = batch_split(self, x, self._largest_activations(*x.shape[-2:])) \
                if inference_path(self, x) else (0, 1)
            if chunks > 1:  # CPU eval: the stem (and stage 1) on slices of a large batch, see ``batch_split``
                split = parts - 1  # stages after the stem that run on slices
                x = torch.cat([self.stages[:split](self.stem(piece)) for piece in x.tensor_split(chunks)])
                x = self.stages[split:](x)
            else:
                x = self.stem(x)
                x = self.stages(x)
        finally:
            end_forward(started)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _conv_out_size(m: nn.Conv2d, h: int, w: int) -> Tuple[int, int]:
    return tuple((size + 2 * m.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1
                 for i, size in enumerate((h, w)))


@torch.fx.wrap
def _channels_last_on_cpu(x: torch.Tensor) -> torch.Tensor:
    """NCHW images on CPU run channels-last inside the model (converted once here): oneDNN's large depthwise
    convs are many times faster that way. Same values; other devices and layouts are left as they are."""
    if x.device.type != 'cpu' or x.ndim != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=torch.channels_last)


@torch.fx.wrap
def _check_input(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    if torch.jit.is_tracing():
        return x
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f'the model was built for {in_chans}-channel images (in_chans={in_chans}), got a tensor of shape '
            f'{tuple(x.shape)}; expected (N, {in_chans}, H, W)')
    if not x.is_floating_point():
        raise TypeError(
            f'the model takes floating-point images, got dtype {x.dtype}: convert and normalise first, e.g. '
            f'x.float().div(255) followed by the model\'s mean / std (timm.data.resolve_data_config)')
    return x


def _dd(module: nn.Module) -> dict:
    p = next(module.parameters())
    return {'device': p.device, 'dtype': p.dtype}


def _init_weights(module: nn.Module, name: Optional[str] = None) -> None:
    if isinstance(module, nn.Conv2d):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints

def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: 'SMPConvNet',
        use_ema: bool = True,
) -> Dict[str, torch.Tensor]:
    """Authors' release / timm checkpoint -> this model's state dict, validated before anything is loaded.

    Accepts every layout ``checkpoint.to_timm_keys`` reads (the authors' trainer, timm's CheckpointSaver, plain
    state dicts, DDP prefixes); EMA weights are picked when present unless ``use_ema=False``. A train-form
    checkpoint given to a deploy-form model is reparameterized on the way. Raises CheckpointError (a ValueError)
    naming the offending keys for another architecture, missing, unexpected or mis-shaped tensors, and non-finite
    values.
    """
    out, grids = to_timm_keys(state_dict, use_ema)
    own = model.state_dict()
    name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
    check_architecture(out, own, name)
    check_grids(grids, {n: m.kernel_size for n, m in model.named_modules() if isinstance(m, SMPConv2d)})
    ckpt_deploy = any(k.endswith('.large_kernel.weight') for k in out)
    if model.is_deploy and not ckpt_deploy:
        out = _train_to_deploy_state_dict(out, model)
    elif ckpt_deploy and not model.is_deploy:
        raise CheckpointError(
            f'checkpoint is in deploy form (reparameterized, no SMP points): create the model with '
            f'deploy=True to load it; a train-form {name} cannot be recovered from it')
    # timm adapts the stem to in_chans and drops a mismatched classifier after the filter
    check_fits(out, own, name, adaptable=('stem.0.conv.weight', 'head.fc.weight', 'head.fc.bias'))
    return out


def _train_to_deploy_state_dict(state_dict: Dict[str, torch.Tensor], model: 'SMPConvNet') -> Dict[str, torch.Tensor]:
    """Load a train-form state dict into a train-form twin of ``model``; return the twin's deploy-form state dict.

    The twin takes the checkpoint's stem channels and classes, so that timm can still adapt them afterwards.
    """
    kernel_sizes = [stage.blocks[0].large_kernel.kernel_size[0] for stage in model.stages]
    fc = state_dict.get('head.fc.weight')
    twin = SMPConvNet(
        in_chans=state_dict['stem.0.conv.weight'].shape[1],
        num_classes=fc.shape[0] if fc is not None else 0,
        **model.arch_args,
    )
    twin.load_state_dict(state_dict)
    twin.eval().reparameterize(kernel_sizes)
    return twin.state_dict()


# ---------------------------------------------------------------------------------------------------------
# Model registration

def _create_smpconv(variant: str, pretrained: bool = False, **kwargs) -> SMPConvNet:
    pretrained_ema = kwargs.pop('pretrained_ema', True)
    from_file = False
    cfg = None
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        if cfg.file and not cfg.state_dict and cfg.source not in ('hf-hub', 'local-dir'):
            # read a local checkpoint file here: clear errors for missing / corrupt files, EMA or raw weights
            from_file = True
            overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
            overlay['state_dict'] = load_checkpoint_file(cfg.file, use_ema=pretrained_ema)
            kwargs['pretrained_cfg_overlay'] = overlay
        elif not pretrained_ema:
            raise ValueError(
                'pretrained_ema=False needs a release-format checkpoint file (pretrained_cfg_overlay=dict(file=...)): '
                'published weights hold only the EMA weights')
    with hub_errors(cfg, cache_dir=kwargs.get('cache_dir')):  # Hub downloads: errors that say what was tried
        model = build_model_with_cfg(
            SMPConvNet,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
            **kwargs,
        )
    if from_file:
        for m in (model, getattr(model, 'model', None)):
            if isinstance(getattr(m, 'pretrained_cfg', None), dict):
                m.pretrained_cfg.pop('state_dict', None)  # don't keep a second copy of the weights alive
    return model


def _cfg(url: str = '', **kwargs):
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0.conv', 'classifier': 'head.fc',
        'license': 'mit', 'paper_ids': 'arXiv:2304.02330',
        'paper_name': 'SMPConv: Self-moving Point Representations for Continuous Convolution',
        'origin_url': 'https://github.com/sangnekim/SMPConv',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({v.pretrained_name: _cfg(hf_hub_id=v.hf_hub_id) for v in VARIANTS.values()})


@register_model
def smpconv_t(pretrained: bool = False, **kwargs) -> SMPConvNet:
    """SMPConv-T (``variants.VARIANTS['smpconv_t']``); the release trained it with drop_path_rate 0.1."""
    return _create_smpconv('smpconv_t', pretrained=pretrained, **dict(VARIANTS['smpconv_t'].arch_args, **kwargs))


@register_model
def smpconv_b(pretrained: bool = False, **kwargs) -> SMPConvNet:
    """SMPConv-B (``variants.VARIANTS['smpconv_b']``); the release trained it with drop_path_rate 0.5."""
    return _create_smpconv('smpconv_b', pretrained=pretrained, **dict(VARIANTS['smpconv_b'].arch_args, **kwargs))
