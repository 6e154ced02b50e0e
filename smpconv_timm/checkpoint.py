"""Reading checkpoint files: the authors' release layouts and timm's, with errors that name the problem."""
import os
import pickle
from typing import Any, Dict, Optional, Union

import torch
from timm.models import load_state_dict

__all__ = ['HF_HUB_NAMESPACE', 'CheckpointError', 'load_checkpoint_file', 'select_state_dict']

#: Hugging Face Hub namespace (user or organisation) that serves the pretrained weights:
#: ``<namespace>/smpconv_t.in1k``. Forks and mirrors override it with the ``SMPCONV_HF_NAMESPACE``
#: environment variable, read when ``smpconv_timm`` is imported.
HF_HUB_NAMESPACE = os.environ.get('SMPCONV_HF_NAMESPACE', 'smpconv-timm')


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
    except pickle.UnpicklingError as e:
        raise CheckpointError(f'cannot read checkpoint {path}: {e}') from e
    except Exception as e:  # zip / pickle / safetensors readers raise many types for a damaged file
        raise CheckpointError(
            f'cannot read checkpoint {path}: the file is truncated, corrupt or not a PyTorch / safetensors '
            f'checkpoint ({type(e).__name__}: {e})') from e
    if not use_ema and any(k in state_dict for k in _EMA_KEYS):
        raise CheckpointError(f'checkpoint {path} holds only EMA weights, no raw ones (state_dict / model)')
    return state_dict
