"""What the running code may rely on: tracing / compiling, autocast, and eager-only caches.

One predicate, ``is_tracing()``, decides where eager-only logic (kernel caches, fused inference calls, the
training recomputation, per-shape algorithm choices) steps aside so that a traced or compiled graph records the
plain computation. ``fold_mode`` is where folds and cached tensors are computed, the same in every caller's
context. ``TransientCaches`` keeps those caches out of copies, pickles and state dicts.
"""
import contextlib
import ctypes
import ctypes.util
import functools
import itertools
from typing import Any, Callable, Dict, Iterator, Optional

import torch
import torch.nn as nn

from .._compat import is_fx_symbolic_tracing as _is_fx_tracing

__all__ = ['is_tracing', 'is_fx_tracing', 'autocast_dtype', 'all_finite', 'onednn_bf16_available', 'fold_mode',
           'release_free_memory', 'TransientCaches', 'CACHE_ATTRS']


def is_fx_tracing() -> bool:
    """True inside ``torch.fx`` symbolic tracing, where tensors are Proxies without values or shapes."""
    return _is_fx_tracing()


def is_tracing() -> bool:
    """True under ``torch.jit.trace``, ``torch.compile`` / ``torch.export`` (dynamo) or ``torch.fx`` tracing."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or _is_fx_tracing()


def autocast_dtype(device_type: str):
    """The autocast dtype where autocast is on for ``device_type``, else None (also for devices without autocast,
    such as ``meta``)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:  # no autocast for this device type
        return None


def all_finite(t: torch.Tensor) -> bool:
    """True where ``t`` holds no NaN or inf, or possibly False where it does not but its sum overflows (callers take
    their safe path then). One reduction: ``t.isfinite().all()`` makes three passes and two masks, 5x to 30x slower on
    activations. A NaN or inf term makes the sum NaN or inf; float16 sums in float32, where its sums do not overflow."""
    total = t.sum(dtype=torch.float32) if t.dtype == torch.float16 else t.sum()
    return bool(total.isfinite())


@contextlib.contextmanager
def fold_mode(module: nn.Module) -> Iterator[None]:
    """Folds, deploy weights and inference caches of ``module`` are computed here, whatever the caller runs under:
    no autograd, no autocast (folds in the parameters' precision) and no inference mode (its tensors can neither be
    saved for backward nor versioned, so a result kept from there breaks later calls outside it)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    device = 'cpu' if tensor is None else tensor.device.type
    autocast_off = torch.autocast(device, enabled=False) if autocast_dtype(device) else contextlib.nullcontext()
    with torch.inference_mode(False), torch.no_grad(), autocast_off:  # inference_mode(False) turns autograd on
        yield


@functools.lru_cache(maxsize=None)
def onednn_bf16_available() -> bool:
    """oneDNN's bf16 convs need AVX512-BF16-class CPUs (or AVX-NE-CONVERT) in PyTorch; elsewhere (AVX2-only
    CPUs, or ``ONEDNN_MAX_CPU_ISA`` below them) PyTorch runs bf16 convs by its own CPU fallback."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        return libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    Large tensors freed by PyTorch stay in the process's heap, in holes between long-lived allocations such as
    prepacked weights; after a new input geometry has packed weights, this keeps the resident memory to what is
    in use.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


#: Instance attributes that hold eager inference caches (tensors derived from parameters, oneDNN-packed weights).
CACHE_ATTRS = ('_kernel_cache', '_fast_plan', '_finite_weights', '_activation_sizes')


class TransientCaches:
    """Mixin for ``nn.Module``s with eager caches in ``CACHE_ATTRS``: ``copy.deepcopy``, ``pickle`` / ``torch.save``
    never see them (a copy rebuilds its own on first use), and they are never in a state dict (plain attributes)."""

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(super().__getstate__())
        for name in CACHE_ATTRS:
            state.pop(name, None)
        return state
