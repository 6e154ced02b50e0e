"""Checkpoints: the authors' release layouts and timm's, the key remapping, the EMA rule, and validation.

Everything that reads a checkpoint goes through here: ``load_checkpoint_file`` (files), ``weights_key`` /
``select_state_dict`` (which weights a training checkpoint holds: EMA first, the one rule), ``to_timm_keys`` (the
authors' key names -> this package's), ``describe_arch`` / ``recognise_variant`` (which variant a checkpoint is),
and the checks ``checkpoint_filter_fn`` runs before anything is loaded (``check_architecture``, ``check_grids``,
``check_fits``). Every problem is a ``CheckpointError`` (a ValueError) that names it.
"""
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from timm.models import clean_state_dict, load_state_dict

from .variants import VARIANTS

__all__ = [
    'CheckpointError', 'load_checkpoint_file', 'weights_key', 'select_state_dict', 'remap_release_key', 'to_timm_keys',
    'describe_arch', 'recognise_variant', 'check_architecture', 'check_grids', 'check_fits',
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; raised before anything is loaded."""


_EMA_KEYS = ('state_dict_ema', 'model_ema')
_RAW_KEYS = ('state_dict', 'model')


def weights_key(checkpoint: Dict[str, Any], use_ema: bool = True) -> Optional[str]:
    """The entry of a training checkpoint that holds its weights: an EMA one when present and ``use_ema``,
    else the raw one; None when the dict holds none of ``state_dict_ema``, ``model_ema``, ``state_dict``,
    ``model`` (it is already a state dict).
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'a checkpoint must be a dict of tensors, got {type(checkpoint).__name__}')
    wrappers = [k for k in _EMA_KEYS + _RAW_KEYS if isinstance(checkpoint.get(k), dict)]
    if not wrappers:
        return None
    for key in (_EMA_KEYS if use_ema else ()) + _RAW_KEYS:
        if key in wrappers:
            return key
    raise CheckpointError(
        f'the checkpoint holds only EMA weights ({", ".join(wrappers)}), no raw ones (state_dict / model)')


def is_ema_key(key: Optional[str]) -> bool:
    return key in _EMA_KEYS


def select_state_dict(checkpoint: Dict[str, Any], use_ema: bool = True) -> Dict[str, Any]:
    """The weights inside a training checkpoint (see ``weights_key``); a plain state dict is returned as is."""
    key = weights_key(checkpoint, use_ema)
    return checkpoint if key is None else checkpoint[key]


def load_checkpoint_file(path: Union[str, os.PathLike], use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """State dict from a .pth / .pt / .bin (``torch.load(weights_only=True)``) or .safetensors file.

    Training checkpoints are unwrapped (EMA weights unless ``use_ema=False``) and DDP prefixes removed.
    Nothing pickled is executed: files that need arbitrary globals are refused.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    try:
        # timm's loader: weights_only torch.load or safetensors, picks EMA / raw, strips `module.`
        state_dict = load_state_dict(path, use_ema=use_ema)
    except Exception as e:  # zip / pickle / safetensors readers raise many types for a damaged file
        raise _read_error(path, e) from e
    if not use_ema and any(k in state_dict for k in _EMA_KEYS):
        raise CheckpointError(f'checkpoint {path} holds only EMA weights, no raw ones (state_dict / model)')
    return state_dict


def _read_error(path: str, error: Exception) -> CheckpointError:
    """What went wrong reading ``path``: pickled objects refused by weights-only loading (torch's unpickler names
    each GLOBAL it refuses), else a damaged or foreign file, with the reader's own error (timm and torch wrap it)."""
    chain = [error]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    # torch < 2.5 qualifies builtins ('builtins.exec'), later releases do not ('exec'): named the same either way
    refused = list(dict.fromkeys(name.removeprefix('builtins.') for e in chain
                                 for name in re.findall(r'\bGLOBAL ([\w.]+)', str(e))))
    if refused:
        return CheckpointError(
            f'cannot read checkpoint {path}: the file holds pickled objects that weights-only loading refuses (it may '
            f'run code): {", ".join(refused)}. Nothing in it was run; load it with torch.load(weights_only=False) only '
            f'if you trust its source')
    return CheckpointError(
        f'cannot read checkpoint {path}: the file is truncated, corrupt or not a PyTorch / safetensors checkpoint '
        f'({type(chain[-1]).__name__}: {chain[-1]})')


# ---------------------------------------------------------------------------------------------------------
# The authors' key names, and which variant a checkpoint holds

def remap_release_key(k: str) -> str:
    """An authors' release key -> this package's (``transitions.{s}`` -> ``stages.{s+1}.downsample``,
    ``prelkb_bn`` / ``preffn_bn`` -> ``norm``, ``norm`` -> ``head.norm``, ``head`` -> ``head.fc``)."""
    k = re.sub(r'^transitions\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) + 1}.downsample.', k)
    k = re.sub(r'\.(prelkb_bn|preffn_bn)\.', '.norm.', k)
    k = re.sub(r'^norm\.', 'head.norm.', k)
    k = re.sub(r'^head\.(weight|bias)$', r'head.fc.\1', k)
    return k


def to_timm_keys(checkpoint: Dict[str, Any], use_ema: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(state dict in this package's key names, the release's ``kernel_coord`` sampling grids by key).

    The weights are picked by ``select_state_dict`` and DDP ``module.`` prefixes removed; the grids are computed by
    the layer, so they are returned apart, only to be checked (``check_grids``).
    """
    state_dict = clean_state_dict(select_state_dict(checkpoint, use_ema))
    out, grids = {}, {}
    for k, v in state_dict.items():
        if not torch.is_tensor(v):
            raise CheckpointError(f'checkpoint entry {k!r} is a {type(v).__name__}, not a tensor')
        k = remap_release_key(k)
        (grids if k.endswith('.kernel_coord') else out)[k] = v
    return out, grids


def describe_arch(state_dict: Dict[str, torch.Tensor]) -> Optional[Tuple[tuple, tuple]]:
    """(depths, dims) read off the block keys of a state dict in this package's names, train or deploy form."""
    blocks: Dict[int, int] = {}
    dims: Dict[int, int] = {}
    for k, v in state_dict.items():
        m = re.match(r'^stages\.(\d+)\.blocks\.(\d+)\.pw2\.conv\.weight$', k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            blocks[s] = max(blocks.get(s, 0), b + 1)
            dims[s] = v.shape[0]
    if not blocks:
        return None
    stages = range(max(blocks) + 1)
    return tuple(blocks.get(s, 0) // 2 for s in stages), tuple(dims.get(s, 0) for s in stages)


def _variant_of(arch: Tuple[tuple, tuple]) -> Optional[str]:
    return next((v.name for v in VARIANTS.values() if (v.depths, v.dims) == arch), None)


def recognise_variant(checkpoint: Dict[str, Any], expected: Optional[str] = None) -> str:
    """The registered variant (``smpconv_t`` / ``smpconv_b``) whose depths and widths the checkpoint's keys show.

    Raises ValueError for a checkpoint with no SMPConv blocks, for an architecture that is not registered, and
    when ``expected`` is given and the checkpoint is another variant (both named).
    """
    tensors = {remap_release_key(k): v for k, v in clean_state_dict(checkpoint).items() if torch.is_tensor(v)}
    arch = describe_arch(tensors)
    if arch is None:
        sample = ', '.join(list(checkpoint)[:4])
        raise ValueError(
            f'not an SMPConv checkpoint: none of its {len(checkpoint)} entries is a block weight '
            f'(stages.<s>.blocks.<b>.pw2.conv.weight); it starts with {sample}')
    found = _variant_of(arch)
    if found is None:
        known = '; '.join(f'{v.name}: depths {v.depths}, dims {v.dims}' for v in VARIANTS.values())
        raise ValueError(f'checkpoint architecture not recognised: depths {arch[0]}, dims {arch[1]}; known: {known}')
    if expected is not None and expected != found:
        raise ValueError(
            f'the checkpoint is {found} (depths {arch[0]}, dims {arch[1]}), not {expected} '
            f'(depths {VARIANTS[expected].depths}, dims {VARIANTS[expected].dims})' if expected in VARIANTS else
            f'unknown model {expected!r}; the checkpoint is {found}')
    return found


# ---------------------------------------------------------------------------------------------------------
# Checks run before anything is loaded

def check_architecture(state_dict: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], name: str) -> None:
    """The checkpoint's depths and widths are the model's (``own``: the model's state dict)."""
    ckpt_arch, model_arch = describe_arch(state_dict), describe_arch(own)
    if ckpt_arch is not None and ckpt_arch != model_arch:
        raise CheckpointError(
            f'checkpoint is for another architecture: depths {ckpt_arch[0]}, dims {ckpt_arch[1]} '
            f'({_variant_of(ckpt_arch) or "not a registered smpconv variant"}); the model {name} has depths '
            f'{model_arch[0]}, dims {model_arch[1]}')


def check_grids(grids: Dict[str, torch.Tensor], kernel_sizes: Dict[str, int]) -> None:
    """Each release ``kernel_coord`` is the linspace grid of its layer's kernel size (``kernel_sizes``: SMP layer
    name -> k)."""
    for key, grid in grids.items():
        k = kernel_sizes.get(key[:-len('.kernel_coord')])
        if k is None:
            continue  # reported as an unexpected layer by check_fits
        if grid.shape != (1, 2, k, k):
            raise CheckpointError(
                f'{key}: the checkpoint samples a {tuple(grid.shape[-2:])} kernel, the model a {k}x{k} one')
        u = torch.linspace(-1., 1., k)
        expect = torch.stack(torch.meshgrid(u, u, indexing='ij'))[None]
        if not torch.allclose(grid.float(), expect, atol=1e-6):
            raise CheckpointError(f'{key}: the checkpoint grid is not linspace(-1, 1, {k}); this model cannot load it')


def check_fits(
        state_dict: Dict[str, torch.Tensor],
        own: Dict[str, torch.Tensor],
        name: str,
        adaptable: Sequence[str] = (),
) -> None:
    """Every key of the model present, no other, shapes equal (except ``adaptable`` keys, which the loader adapts
    or drops: classifier keys may also be absent from the model), every float finite."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own and k not in adaptable]
    shapes = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
        for k in own if k in state_dict and k not in adaptable and state_dict[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f'missing keys: {", ".join(missing)}')
    if unexpected:
        problems.append(f'unexpected keys: {", ".join(unexpected)}')
    if shapes:
        problems.append(f'shape mismatch: {"; ".join(shapes)}')
    if problems:
        raise CheckpointError(f'checkpoint does not fit {name}: ' + ' | '.join(problems))
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f'checkpoint holds non-finite values (NaN/Inf) in: {", ".join(bad)}')
