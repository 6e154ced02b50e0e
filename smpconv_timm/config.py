"""smpconv_timm's switches, in one place (in the style of ``timm.layers.config``).

Each switch is read once from its environment variable when ``smpconv_timm`` is imported and can be changed at
run time. A ``set_*`` call changes it at once; used as a context manager it restores the previous setting on exit:

    from smpconv_timm import config
    with config.set_inference_fast_path(False):
        logits = model(images)          # eval through the plain modules, op for op the authors' code

=========================== ========================================= =========================================
switch                      environment                               default
=========================== ========================================= =========================================
inference fast path         ``SMPCONV_FASTPATH=0`` turns it off       on: eval runs folded, fused convs
                                                                      (``kernels/fastpath.py``)
training recomputation      ``SMPCONV_RECOMPUTE=0`` turns it off      on: the FFN's wide BN / GELU outputs are
                                                                      recomputed in backward (``kernels/recompute.py``)
large depthwise conv        ``SMPCONV_DWCONV=forward=direct,...``     ``auto`` for each stage: the fastest
algorithms                  (stages ``forward``, ``input_grad``,       candidate of ``kernels/dwconv.py`` per shape,
                            ``weight_grad``, and ``pointwise`` for    measured on the running machine
                            the 1x1 convs in training;
                            ``toeplitz:<tile>`` fixes a tile too)
eval cache budget           ``SMPCONV_EVAL_CACHE_MB=<MB>``            256: the weights the fast path has prepacked
                                                                      for input sizes other than the last one, in
                                                                      all models of the process together
Hub namespace of the        ``SMPCONV_HF_NAMESPACE=<namespace>``      ``smpconv-timm``; read at import only (the
pretrained weights                                                    default cfgs are built then)
registration when timm is   ``SMPCONV_AUTOLOAD=0`` turns it off       on: ``import timm`` imports smpconv_timm,
imported                    (read by the installed hook, not here,    which registers the models
                            when timm is imported)                    (``_autoload/``)
=========================== ========================================= =========================================

With the fast path and the recomputation off and ``set_dwconv_algorithms(forward='direct', input_grad='native',
weight_grad='native', pointwise='conv')``, a model runs op for op what the authors' code runs.
"""
import os
from typing import Any, Dict

__all__ = [
    'use_inference_fast_path', 'set_inference_fast_path', 'use_training_recompute', 'set_training_recompute',
    'dwconv_algorithms', 'set_dwconv_algorithms', 'DWCONV_ALGORITHMS', 'POINTWISE_ALGORITHMS', 'eval_cache_mb',
    'set_eval_cache_mb', 'HF_HUB_NAMESPACE',
]

#: The candidates of each stage of the large depthwise conv (implemented in ``kernels/dwconv.py``).
DWCONV_ALGORITHMS: Dict[str, tuple] = {
    'forward': ('direct', 'fft', 'toeplitz', 'direct_fp32'),
    'input_grad': ('direct', 'fft', 'toeplitz', 'direct_fp32', 'native', 'native_fp32', 'transposed', 'transposed_fp32'),
    'weight_grad': ('native', 'fft', 'toeplitz', 'rows', 'native_fp32'),
}

#: The candidates of the 1x1 convs in training (``kernels/pointwise.py``), fixed by the same switch as stage
#: ``pointwise``.
POINTWISE_ALGORITHMS = ('conv', 'linear')

_CONV_STAGES: Dict[str, tuple] = {**DWCONV_ALGORITHMS, 'pointwise': POINTWISE_ALGORITHMS}


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, '').strip().lower()
    if not value:
        return default
    if value in ('0', 'false', 'no', 'off'):
        return False
    if value in ('1', 'true', 'yes', 'on'):
        return True
    raise ValueError(f'{name}={value!r}: expected 0 or 1')


def _env_megabytes(name: str, default: float) -> float:
    value = os.environ.get(name, '').strip()
    try:
        return _check_megabytes(float(value)) if value else default
    except ValueError:
        raise ValueError(f'{name}={value!r}: expected a number of megabytes >= 0') from None


def _check_megabytes(mb: float) -> float:
    mb = float(mb)
    if not mb >= 0:  # also NaN
        raise ValueError(f'a cache budget must be >= 0 MB, got {mb}')
    return mb


def _check_dwconv(choice: Dict[str, str]) -> Dict[str, str]:
    for stage, algo in choice.items():
        if stage not in _CONV_STAGES:
            raise ValueError(f'unknown stage {stage!r}; stages: {", ".join(_CONV_STAGES)}')
        name, _, tile = str(algo).partition(':')
        known = algo == 'auto' or (algo in _CONV_STAGES[stage] if not tile else
                                   name == 'toeplitz' and name in _CONV_STAGES[stage] and tile.isdigit())
        if not known:
            raise ValueError(
                f'unknown {stage} algorithm {algo!r}; choose auto, {", ".join(_CONV_STAGES[stage])} '
                f'(toeplitz:<tile> fixes its tile too)')
    return choice


def _env_dwconv() -> Dict[str, str]:
    spec = os.environ.get('SMPCONV_DWCONV', '').strip()
    choice = {stage: 'auto' for stage in _CONV_STAGES}
    if spec:
        try:
            pairs = dict(item.strip().split('=', 1) for item in spec.split(','))
        except ValueError:
            raise ValueError(f'SMPCONV_DWCONV={spec!r}: expected stage=algorithm[,stage=algorithm...]') from None
        choice.update(_check_dwconv(pairs))
    return choice


_INFERENCE_FAST_PATH = _env_flag('SMPCONV_FASTPATH', True)
_TRAINING_RECOMPUTE = _env_flag('SMPCONV_RECOMPUTE', True)
_DWCONV: Dict[str, str] = _env_dwconv()
_EVAL_CACHE_MB = _env_megabytes('SMPCONV_EVAL_CACHE_MB', 256.)

#: Hugging Face Hub namespace (user or organisation) that serves the pretrained weights, ``<namespace>/smpconv_t.in1k``.
HF_HUB_NAMESPACE: str = os.environ.get('SMPCONV_HF_NAMESPACE', '').strip() or 'smpconv-timm'


class _Switch:
    """Sets a module-level setting when constructed; as a context manager, restores the previous one on exit."""
    _name = ''

    def __init__(self, value: Any) -> None:
        self.prev = globals()[self._name]
        globals()[self._name] = self._convert(value)

    def _convert(self, value: Any) -> Any:
        return bool(value)

    def __enter__(self) -> '_Switch':
        return self

    def __exit__(self, *exc: Any) -> bool:
        globals()[self._name] = self.prev
        return False


def use_inference_fast_path() -> bool:
    return _INFERENCE_FAST_PATH


class set_inference_fast_path(_Switch):
    """Eval with every BatchNorm folded and activations / residual adds fused into the convs (on by default)."""
    _name = '_INFERENCE_FAST_PATH'


def use_training_recompute() -> bool:
    return _TRAINING_RECOMPUTE


class set_training_recompute(_Switch):
    """Training recomputes the FFN's 4x-wide BatchNorm / GELU outputs in backward (on by default)."""
    _name = '_TRAINING_RECOMPUTE'


def dwconv_algorithms() -> Dict[str, str]:
    """The algorithm of each stage of the large depthwise conv: a candidate's name, or ``'auto'``."""
    return dict(_DWCONV)


class set_dwconv_algorithms(_Switch):
    """Fix the algorithm of ``forward``, ``input_grad`` or ``weight_grad``, or ``pointwise`` (``conv`` or ``linear``
    for the 1x1 convs in training); ``'auto'``: the fastest per shape.

    Stages not named keep their setting; as a context manager, all are restored on exit.
    """
    _name = '_DWCONV'

    def __init__(self, **choice: str) -> None:
        super().__init__(choice)

    def _convert(self, choice: Dict[str, str]) -> Dict[str, str]:
        return {**_DWCONV, **_check_dwconv(choice)}


def eval_cache_mb() -> float:
    """Budget (MB) of the inference fast path's prepacked weights kept for input geometries other than each
    conv's most recent one, across all models in the process (least recently used dropped first)."""
    return _EVAL_CACHE_MB


class set_eval_cache_mb(_Switch):
    """Set the eval cache budget in MB (0: keep only the most recent geometry of each conv)."""
    _name = '_EVAL_CACHE_MB'

    def _convert(self, mb: float) -> float:
        return _check_megabytes(mb)
