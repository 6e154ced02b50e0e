"""Deterministic stand-in weights and input for the golden checks (not a test module).

The golden logits in ``tests/data/golden/reference_outputs.npz`` were computed by the authors' code on weights and
an input that are fully determined by the tensor names: this module rebuilds them, bit for bit, from the algorithm
``reference/golden/README.md`` documents. Per tensor: a splitmix64 hash of ``crc32(salt + name)`` plus a counter
gives ``n`` uint64 values; the top 53 bits of each make a float64 in [-1, 1); a rule picked by the name's suffix
scales it (BN statistics, SMP point coordinates, radii, ...), then it is stored as float32. Integer arithmetic and
float64 ops only, so every platform gets the same bytes. ``tests/test_vendored_data.py`` checks the output against
recorded digests of the authors' generator and, where ``../shared`` is present, against that generator directly.
"""
import hashlib
import json
import math
import zlib
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import numpy as np

__all__ = ['make_state_dict', 'make_input', 'make_tensor', 'uniform_from_name', 'arrays_sha256']

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment
_SEED_MULT = 0x100000001B3  # spreads crc32 seeds across the 64-bit counter space
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64 finaliser constants


def uniform_from_name(name: str, n: int, salt: str = '') -> np.ndarray:
    """``n`` float64 values in [-1, 1) from a splitmix64 counter hash of ``crc32(salt + name)``."""
    start = (zlib.crc32((salt + name).encode()) * _SEED_MULT + _GOLDEN_GAMMA) & _MASK64
    z = np.arange(n, dtype=np.uint64)
    with np.errstate(over='ignore'):
        z += np.uint64(start)  # wraps modulo 2**64
        for shift, mult in ((30, _MIX1), (27, _MIX2)):
            z ^= z >> np.uint64(shift)
            z *= np.uint64(mult)
        z ^= z >> np.uint64(31)
    top53 = (z >> np.uint64(11)).astype(np.float64)
    return 2.0 * (top53 * 2.0 ** -53) - 1.0


def _kernel_coord(shape: Sequence[int]) -> np.ndarray:
    """The SMP layer's fixed sampling grid, (1, 2, k, k): row then column coordinate, each linspace(-1, 1, k)."""
    k = shape[-1]
    rows, cols = np.indices((k, k))
    t = np.linspace(-1., 1., k)
    return np.stack([t[rows], t[cols]])[None].astype(np.float32)


def _fan_in_scaled(u: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    fan_in = 1
    for d in shape[1:]:
        fan_in *= int(d)
    return math.sqrt(3. / fan_in) * u


# (name suffix, values from u in [-1, 1)), first match wins; checked before the shape-based fallbacks below
_SUFFIX_RULES: List[Tuple[str, Callable[[np.ndarray], np.ndarray]]] = [
    ('running_var', lambda u: 1. + 0.5 * u * u),  # in [1, 1.5]: positive
    ('running_mean', lambda u: 0.1 * u),
    ('weight_coord', lambda u: 0.6 * u),  # SMP point positions in [-0.6, 0.6)
    ('radius', lambda u: 0.05 + 0.1 * (u + 1.)),  # SMP radii in [0.05, 0.25)
    ('.weights', lambda u: 0.05 * u),  # SMP point weights
    ('.bias', lambda u: 0.02 * u),
]


def make_tensor(name: str, shape: Sequence[int], salt: str = '') -> np.ndarray:
    """The tensor ``name`` of ``shape``: float32, except ``num_batches_tracked`` (int64 zeros)."""
    shape = tuple(int(d) for d in shape)
    if name.endswith('num_batches_tracked'):
        return np.zeros(shape, dtype=np.int64)
    if name.endswith('kernel_coord'):
        return _kernel_coord(shape)
    n = 1
    for d in shape:
        n *= d
    u = uniform_from_name(name, n, salt)
    rule = next((fn for suffix, fn in _SUFFIX_RULES if name.endswith(suffix)), None)
    if rule is not None:
        values = rule(u)
    elif len(shape) == 1:  # norm scale
        values = 1. + 0.1 * u
    else:  # conv / linear weight: uniform with variance 1 / fan_in
        values = _fan_in_scaled(u, shape)
    return values.reshape(shape).astype(np.float32)


def make_state_dict(manifest_path, salt: str = '') -> Dict[str, np.ndarray]:
    """``{name: numpy array}`` for every ``[name, shape]`` of a manifest json's ``state_dict``, in its order."""
    with open(manifest_path) as f:
        entries = json.load(f)['state_dict']
    return {name: make_tensor(name, shape, salt) for name, shape in entries}


def make_input(batch: int = 2, size: int = 224) -> np.ndarray:
    """A (batch, 3, size, size) float32 image batch of sinusoids; each sample has its own frequencies."""
    b, c, h, w = np.indices((batch, 3, size, size))
    waves = np.sin((0.05 + 0.03 * b) * h + 0.3 * c + b) * np.cos((0.07 - 0.02 * b) * w - 0.2 * c)
    ripple = 0.3 * np.sin(0.011 * h * w / (1. + b))
    return (waves + ripple).astype(np.float32)


def arrays_sha256(named: Iterable[Tuple[str, np.ndarray]]) -> str:
    """sha256 over (name, dtype, shape, little-endian C-order bytes) of each array, in the given order."""
    digest = hashlib.sha256()
    for name, a in named:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder('<'))
        header = f'{name}\0{a.dtype.str}\0{",".join(map(str, a.shape))}\0'
        digest.update(header.encode())
        digest.update(a.tobytes())
    return digest.hexdigest()
