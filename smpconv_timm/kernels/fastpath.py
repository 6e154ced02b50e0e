"""Inference fast path: folded weights run as fused convolutions.

In eval mode without autograd, each block of an SMPConv model runs its convolutions with every BatchNorm
folded in (the deploy-form weights, in the train form too), the following GELU or the residual add fused
into the conv, and on CPU with weights prepacked once into oneDNN's blocked layout (the plain layout is
re-blocked on every call otherwise). oneDNN's fused ReLU turns NaN into 0 where PyTorch's keeps it, so ReLU is
fused only between ``begin_forward`` and ``end_forward``, which the model calls around its forward,
and only where its parameters and buffers (checked once per state) and the batch of images (checked on every
forward, far cheaper than the separate ReLU passes it saves) hold no NaN or inf; otherwise it runs in place after
the conv. Results equal the plain modules' up to float rounding, NaN and inf included;
``tests/test_fastpath.py`` and ``tests/test_edge_inputs.py`` hold them to it.

Batches: on CPU, the first parts of the model (the stem, stage 1) make the largest activations; where one of them
would exceed ``SPLIT_BYTES`` those parts run on slices of the batch (``batch_split``), the rest on the whole batch.

Memory: prepacked weights are kept per input geometry (oneDNN's blocked layout can depend on it), each conv's
most recent geometry always, older ones while they fit ``config.eval_cache_mb()`` (all models of the process
together, least recently used dropped first). After a forward that packed weights, ``SMPConvNet`` returns the
memory freed meanwhile to the operating system (``runtime.release_free_memory``), so that running many input sizes
does not ratchet the process's resident memory up.

Where oneDNN's fused ops are unavailable (other devices, dtypes or PyTorch builds) the same plan runs
as plain ``conv2d`` + activation + add.

Under ``torch.compile`` the model's eval forward is one opaque op (``compiled_eval_applies``, ``compiled_eval``) that
runs this fast path, as Inductor's own graph of the plain modules runs the convs unfused and their weights unpacked
on every call (slower than eager). ``torch.export``, ONNX export, ``jit.trace`` and ``torch.fx`` record the plain
modules.

``smpconv_timm.config.set_inference_fast_path(False)`` (or ``SMPCONV_FASTPATH=0``) turns it off: eval then runs the plain
modules, op for op what the authors' code runs. (The training recomputation has its own switch, in
``recompute.py``.)
"""
import itertools
import threading
import weakref
from collections import OrderedDict
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config
from . import dwconv, toeplitz
from .dwconv import crop_kernel, depthwise_conv2d
from .runtime import all_finite, autocast_dtype, fold_mode, is_fx_tracing, is_tracing, onednn_bf16_available, \
    release_free_memory

__all__ = ['FusedConv', 'act_name', 'inference_path', 'cached_plan', 'drop_plan', 'begin_forward', 'end_forward',
           'compiled_eval_applies', 'compiled_eval', 'batch_split', 'SPLIT_BYTES']


def _onednn_fusion_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, '_convolution_pointwise')
                and hasattr(torch.ops.mkldnn, '_reorder_convolution_weight'))
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_fusion_available()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if _ONEDNN and onednn_bf16_available() else (torch.float32,)
_ACTS = {'none': lambda x: x, 'relu': F.relu, 'gelu': F.gelu}


def _inference(module: nn.Module, x: torch.Tensor) -> bool:
    """Eval mode and no autograd, with the fast path switched on and data to fold (not the meta device)."""
    return (config.use_inference_fast_path() and not module.training and not torch.is_grad_enabled()
            and x.device.type != 'meta')


def inference_path(module: nn.Module, x: torch.Tensor) -> bool:
    """True where the fast path applies: eval mode, no autograd, eager execution (autocast included: the
    fused convs then run in the autocast dtype, as ``conv2d`` does under autocast)."""
    return not is_tracing() and _inference(module, x)


# ---------------------------------------------------------------------------------------------------------
# torch.compile: the eval fast path as one op of the compiled graph

_COMPILED_MODELS: 'weakref.WeakValueDictionary[int, nn.Module]' = weakref.WeakValueDictionary()


def compiled_eval_applies(model: nn.Module, x: torch.Tensor) -> bool:
    """True while ``torch.compile`` traces an eval forward that the fast path would run eagerly on CPU (no autograd,
    no autocast, floating input of the model's dtype). ``torch.export`` (hence ONNX export) records the plain modules;
    so does ``torch.compile`` on PyTorch releases without ``torch.compiler.is_exporting`` (before 2.5)."""
    if not (torch.compiler.is_compiling() and hasattr(torch.compiler, 'is_exporting')):
        return False
    if torch.compiler.is_exporting() or torch.jit.is_tracing() or is_fx_tracing():
        return False
    weight = next(model.parameters(), None)
    return (_ONEDNN and _inference(model, x) and x.device.type == 'cpu' and autocast_dtype('cpu') is None
            and weight is not None and x.dtype == weight.dtype and x.is_floating_point())


@torch.compiler.assume_constant_result
def _register(model: nn.Module) -> int:
    """A key for ``model`` that the compiled graph holds as a constant (run while tracing, not by the graph)."""
    _COMPILED_MODELS[id(model)] = model
    return id(model)


def _model_of(key: int, anchor: torch.Tensor) -> nn.Module:
    """The registered model whose first parameter is ``anchor``: a graph traced for one model and reused for
    another of the same structure passes the other's parameter."""
    def holds_anchor(m: Optional[nn.Module]) -> bool:
        return m is not None and next(m.parameters()).data_ptr() == anchor.data_ptr()

    model = _COMPILED_MODELS.get(key)
    if not holds_anchor(model):
        model = next((m for m in list(_COMPILED_MODELS.values()) if holds_anchor(m)), None)
    if model is None:
        raise RuntimeError('smpconv_timm: the compiled graph runs a model that no longer exists; compile it again')
    return model


def _features_like(shape, x: torch.Tensor) -> torch.Tensor:
    """An empty tensor of the layout the op returns (channels-last), for its fake and its real result."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@torch.library.custom_op('smpconv_timm::eval_features', mutates_args=())
def _eval_features(x: torch.Tensor, anchor: torch.Tensor, key: int) -> torch.Tensor:
    model = _model_of(key, anchor)
    with torch.no_grad():
        out = model.forward_features(x)
    layout = _features_like(out.shape, x)  # the strides the graph was compiled for (maps of 1 pixel included)
    return out if out.stride() == layout.stride() else layout.copy_(out)


@_eval_features.register_fake
def _eval_features_fake(x: torch.Tensor, anchor: torch.Tensor, key: int) -> torch.Tensor:
    return _features_like(_COMPILED_MODELS[key].features_shape(x.shape), x)  # tracing: the model just registered


def compiled_eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model.forward_features(x)`` as one op of a ``torch.compile`` graph (where ``compiled_eval_applies``): the
    op runs the eager fast path (fused convs, packed weights, the per-shape algorithm choice) when the graph runs;
    the rest of the model (the head) is compiled as usual."""
    return _eval_features(x, next(model.parameters()), _register(model))


#: The most bytes one activation of a CPU eval forward may take before the batch is split (``batch_split``). glibc's
#: malloc serves each allocation above 32 MB with freshly mapped pages and unmaps them when it is freed, so such an
#: activation pays its page faults on every forward (the stem's, at bs 16, took about as long to fault in as the
#: conv that wrote it); below that, freed memory is reused.
SPLIT_BYTES = 24 * 2 ** 20


def batch_split(module: nn.Module, x: torch.Tensor, largest: Sequence[int]) -> Tuple[int, int]:
    """``(parts, chunks)``: run the first ``parts`` parts of the model in ``chunks`` slices of the batch ``x`` so that
    none of their activations exceeds ``SPLIT_BYTES``; ``largest`` holds, per part in order, the elements of its
    largest activation for one image. ``(0, 1)`` (the whole batch) outside the CPU eval fast path.

    An eval forward treats each image on its own, so the result is the same up to float rounding (the kernels may
    block a slice differently); ``largest`` only decides the speed."""
    if not (inference_path(module, x) and x.device.type == 'cpu' and x.dim() == 4):
        return 0, 1
    dtype = autocast_dtype('cpu') if x.is_floating_point() and autocast_dtype('cpu') is not None else x.dtype
    size, batch = dtype.itemsize, x.shape[0]
    parts = 0
    while parts < len(largest) and largest[parts] * size * batch > SPLIT_BYTES:
        parts += 1
    if parts == 0:
        return 0, 1
    per_slice = max(1, SPLIT_BYTES // (max(largest[:parts]) * size))
    return parts, -(-batch // per_slice)


_STATE = threading.local()  # per thread: models shared by threads each see their own batch


def begin_forward(module: nn.Module, x: torch.Tensor) -> Optional[Tuple[int, bool]]:
    """Start a forward of ``module`` (the model) on ``x`` (its input); ``end_forward`` with what this returns ends it
    (None while tracing: graphs never see this state, and plain functions rather than a context manager keep
    torch.export working on every release).

    Until then, ``FusedConv`` fuses ReLU into the conv where the fast path applies and neither ``x`` nor the model's
    parameters and buffers hold a NaN or inf (the weights checked once per parameter state, the input on every
    call); otherwise ReLU runs after each conv, as PyTorch's does. The model's parameter state, found unchanged
    here, also stands for its blocks' (``cached_plan``): they do not check their own again.
    """
    if is_tracing():
        return None
    previous = getattr(_STATE, 'finite', False), getattr(_STATE, 'state', None)
    _STATE.state = None
    _STATE.finite = bool(inference_path(module, x) and x.is_floating_point() and _finite_weights(module)
                         and all_finite(x))
    return (_CACHE.packs_built,) + previous


def end_forward(started: Optional[Tuple[int, bool, Optional[object]]]) -> None:
    """End what ``begin_forward`` started: the ReLU fusion state as before it, and, if the forward packed weights
    (a new input size), the memory freed meanwhile returned to the OS."""
    if started is None:
        return
    mark, _STATE.finite, _STATE.state = started
    if mark != _CACHE.packs_built:
        release_free_memory()


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


def _finite_weights(module: nn.Module) -> bool:
    """Whether the parameters and buffers of ``module`` (the model) are all finite, checked once per state; sets
    ``_STATE.state`` to a token of that state (a new object whenever it changes, None where it has no version)."""
    key = _version_key(module)
    cache = module.__dict__.get('_finite_weights')
    if cache is None or key is None or cache[0] != key:
        tensors = [t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()]
        cache = (key, all(bool(t.isfinite().all()) for t in tensors), object())
        module.__dict__['_finite_weights'] = cache
    _STATE.state = cache[2] if key is not None else None
    return cache[1]


def cached_plan(module: nn.Module, build):
    """``build()`` once per parameter / buffer state of ``module`` (every call where that state has no version),
    in ``fold_mode``; dropped by ``module.train()``.

    A plan checked during a model forward (``begin_forward``) is tagged with the token of the model's state: while
    the model's forward finds that state unchanged (every tensor of the model, the block's included, at the same
    version, storage and dtype), the plan is used without walking the block's tensors again."""
    state = getattr(_STATE, 'state', None)
    cache = module.__dict__.get('_fast_plan')
    if state is not None and cache is not None and cache[2] is state:
        return cache[1]
    key = _version_key(module)
    if key is None:
        state = None
    if cache is None or key is None or cache[0] != key:
        with fold_mode(module):
            cache = (key, build(), state)
        module.__dict__['_fast_plan'] = cache
    elif cache[2] is not state:
        cache = module.__dict__['_fast_plan'] = (key, cache[1], state)
    return cache[1]


def drop_plan(module: nn.Module) -> None:
    module.__dict__.pop('_fast_plan', None)


class _PackedCache:
    """The prepacked plans of every ``FusedConv`` by recency. Each conv keeps its most recent geometry; the older
    ones stay while their bytes fit ``config.eval_cache_mb()``, least recently used dropped first."""

    def __init__(self):
        self._lru: 'OrderedDict[Tuple[int, tuple], Tuple[weakref.ref, int]]' = OrderedDict()
        self.packs_built = 0

    def used(self, conv: 'FusedConv', key: tuple) -> None:
        self._lru.move_to_end((id(conv), key))

    def added(self, conv: 'FusedConv', key: tuple, nbytes: int) -> None:
        self._lru[(id(conv), key)] = (weakref.ref(conv), nbytes)
        self.packs_built += 1
        older, total = [], 0
        for entry, (ref, size) in list(self._lru.items()):
            owner = ref()
            if owner is None or entry[1] not in owner._packed:  # a conv collected, or its cache cleared
                del self._lru[entry]
            elif next(reversed(owner._packed)) != entry[1]:  # not its most recent geometry
                older.append((entry, owner, size))
                total += size
        budget = config.eval_cache_mb() * 2 ** 20
        for entry, owner, size in older:
            if total <= budget:
                break
            del owner._packed[entry[1]], self._lru[entry]
            total -= size

    def nbytes(self) -> int:
        return sum(size for ref, size in self._lru.values() if ref() is not None)


_CACHE = _PackedCache()


class FusedConv:
    """``act(conv2d(x) + bias)`` or ``conv2d(x) + bias + residual`` for inference, from folded weights.

    Under autocast the conv runs in the autocast dtype (weights cast once and kept), as autocast runs
    ``conv2d``. On CPU the weights are prepacked into oneDNN's blocked layout per input geometry (shape, dtype),
    kept within the process's eval cache budget (``_PackedCache``). A large depthwise kernel (stride 1) also picks its algorithm per geometry
    among ``dwconv``'s forward candidates: ``direct``, ``toeplitz`` (its band matrices prepacked), ``fft`` (the
    kernel's spectrum computed once; bias, activation and residual add after the inverse FFT) and, for bf16 / fp16
    inputs, ``direct_fp32`` (``config.set_dwconv_algorithms(forward=...)`` fixes it, as for training); a dilated
    one runs oneDNN's direct conv.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int = 1, padding: int = 0,
                 groups: int = 1, act: str = 'none', dilation: int = 1):
        self.weight, self.bias = weight.detach(), bias.detach()
        self.stride, self.padding, self.groups, self.act, self.dilation = stride, padding, groups, act, dilation
        self.depthwise = groups > 1 and groups == weight.shape[0] and weight.shape[1] == 1
        self.large_kernel = self.depthwise and stride == dilation == 1 and weight.shape[-1] > 3
        self._packed: 'OrderedDict[tuple, _Plan]' = OrderedDict()
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
        onednn_dtype = x.dtype == weight.dtype and x.dtype in _ONEDNN_DTYPES
        if _ONEDNN and x.device.type == 'cpu' and onednn_dtype:
            plan = self._plan(x, weight, bias)
            # the matrix form and the FFT only on finite images (dwconv.images_apart): known for the model's own input
            if not plan.spreads or getattr(_STATE, 'finite', False):
                return self._apply(x, residual, plan)
            return dwconv.images_apart(x, lambda t: self._apply(t, residual, plan),
                                       lambda t: self._unfused(t, residual, weight, bias, plain=True))
        return self._unfused(x, residual, weight, bias)

    def _unfused(self, x, residual, weight, bias, plain: bool = False) -> torch.Tensor:
        """The same by separate ops: the conv by ``depthwise_conv2d`` where depthwise, else (or where ``plain``) by
        ``F.conv2d``."""
        if self.depthwise and not plain:
            y = depthwise_conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        else:
            y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        y = _ACTS[self.act](y)
        return y if residual is None else y + residual

    def _plan(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> '_Plan':
        """The algorithm and oneDNN-packed weights for this input geometry (taps that only see padding cropped, as
        in ``depthwise_conv2d``); oneDNN picks the blocked layout by input shape."""
        key = (tuple(x.shape), x.dtype, x.is_contiguous())
        plan = self._packed.get(key)
        if plan is not None:
            self._packed.move_to_end(key)
            _CACHE.used(self, key)
            return plan
        padding = (self.padding, self.padding)
        if self.depthwise and self.stride == self.dilation == 1:
            weight, padding = crop_kernel(weight, self.padding, x.shape[-2:])
            weight = weight.contiguous()
        if self.large_kernel and x.numel() > 0:  # (an empty batch: nothing to time, and FFTs refuse empty tensors)
            built: Dict[str, _Plan] = {}

            def run(algo: str) -> torch.Tensor:
                if algo not in built:
                    built[algo] = self._pack(algo, x, weight, bias, padding)
                return self._apply(x, None, built[algo])

            algo = dwconv.pick('forward', (x.device.type, x.dtype, tuple(x.shape), x.is_contiguous(),
                                           tuple(weight.shape), padding, 'fused', 1), run)
            plan = built.get(algo) or self._pack(algo, x, weight, bias, padding)
        else:
            plan = self._pack('direct', x, weight, bias, padding)
        self._packed[key] = plan
        _CACHE.added(self, key, plan.nbytes())
        return plan

    def _pack(self, algo: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding) -> '_Plan':
        shape, tiles = list(x.shape), None
        if algo == 'fft':
            return _Plan(algo, dwconv.fft_kernel(weight, x.shape[-2:], padding), bias, padding)
        if algo.startswith('toeplitz'):
            tiles = toeplitz.tiling(x.shape[-1], weight.shape[-1], padding[1], dwconv.tile_of(algo))
            weight = toeplitz.band_weight(weight, tiles)
            bias = bias.repeat_interleave(tiles.tile)
            shape = [shape[0] * tiles.tiles, self.groups * tiles.cols, shape[2], 1]
            padding = (padding[0], 0)
        elif algo == 'direct_fp32':
            weight, bias = weight.float(), bias.float()
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, list(padding), [self.stride] * 2, [self.dilation] * 2, self.groups, shape)
        return _Plan(algo, packed, bias, padding, tiles)

    def _apply(self, x: torch.Tensor, residual: Optional[torch.Tensor], plan: '_Plan') -> torch.Tensor:
        if plan.algo == 'fft':
            return self._fft(x, residual, plan.weight, plan.bias)
        geometry = (list(plan.padding), [self.stride] * 2, [self.dilation] * 2, self.groups)
        if residual is not None:
            assert self.act == 'none', 'a fused residual add takes no activation'
            if plan.tiles is not None:  # the matrix form's output is rows, not the residual's shape: added after
                return self._apply(x, None, plan).add_(residual)
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, plan.weight, plan.bias, *geometry, 'add', None, None, [], None)
        relu_after = self.act == 'relu' and not getattr(_STATE, 'finite', False)
        act = 'none' if relu_after else self.act  # oneDNN's fused ReLU maps NaN to 0: then ReLU after the conv
        post_op = (act, [], 'none' if act == 'gelu' else '')
        if plan.tiles is not None:
            rows = toeplitz.input_rows(x, plan.tiles)
            out = torch.ops.mkldnn._convolution_pointwise(rows, plan.weight, plan.bias, *geometry, *post_op)
            out = toeplitz.from_rows(out, plan.tiles, dwconv.layout(x))
        elif plan.algo == 'direct_fp32':
            out = torch.ops.mkldnn._convolution_pointwise(x.float(), plan.weight, plan.bias, *geometry, *post_op)
            out = out.to(x.dtype)
        else:
            out = torch.ops.mkldnn._convolution_pointwise(x, plan.weight, plan.bias, *geometry, *post_op)
        return out.relu_() if relu_after else out

    def _fft(self, x: torch.Tensor, residual: Optional[torch.Tensor], kernel: dwconv.FftKernel,
             bias: torch.Tensor) -> torch.Tensor:
        window = dwconv.conv_fft(x, kernel)
        out = torch.empty(window.shape, dtype=x.dtype, device=x.device, memory_format=dwconv.layout(x))
        torch.add(window, bias.view(1, -1, 1, 1), out=out)  # the bias, rounded once and laid out as x
        out = out.relu_() if self.act == 'relu' else _ACTS[self.act](out)
        return out if residual is None else out.add_(residual)


class _Plan(NamedTuple):
    """How a ``FusedConv`` runs one input geometry: the algorithm, its weight (oneDNN-packed, or for ``fft`` the
    kernel's spectrum), bias and padding, and for ``toeplitz`` the tiling of the input."""
    algo: str
    weight: Union[torch.Tensor, dwconv.FftKernel]
    bias: torch.Tensor
    padding: Tuple[int, int]
    tiles: Optional[toeplitz.Tiling] = None

    @property
    def spreads(self) -> bool:
        """Whether a non-finite input reaches further than the kernel's window (the matrix form, the FFT)."""
        return self.tiles is not None or self.algo == 'fft'

    def nbytes(self) -> int:
        weight = self.weight.spectrum if isinstance(self.weight, dwconv.FftKernel) else self.weight
        return sum(t.numel() * t.element_size() for t in (weight, self.bias))


def act_name(act: nn.Module) -> str:
    """The name ``FusedConv`` takes for an activation module (ReLU, exact GELU, Identity)."""
    names = {nn.ReLU: 'relu', nn.GELU: 'gelu', nn.Identity: 'none'}
    if type(act) not in names or getattr(act, 'approximate', 'none') != 'none':
        raise ValueError(f'no fused form for activation {act}')
    return names[type(act)]
