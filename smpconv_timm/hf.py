"""Hub folders that both timm and transformers load.

timm's ``save_for_hf`` writes ``config.json`` with the model's reconstruction arguments under ``model_args``; from
timm 1.0.31 on these include ``num_classes``. transformers' ``TimmWrapper`` passes ``num_classes`` to
``timm.create_model`` itself (0 for ``AutoModel``, ``num_labels`` for ``AutoModelForImageClassification``) *and*
every ``model_args`` entry, so such a folder fails there with "got multiple values for keyword argument
'num_classes'", for any timm model. ``save_for_hf`` below writes timm's folder and leaves ``num_classes`` out of
``model_args``: timm still reads it from the config's root and its ``pretrained_cfg``, transformers from the root.
It also writes ``"model_type": "timm_wrapper"``, what transformers infers for a timm config and writes itself: a
transformers release without TimmWrapper (before 4.47) then says that it does not know the model type and may be
out of date, instead of asking for a ``model_type`` key.
"""
import json
import os
from pathlib import Path
from typing import Union

import torch.nn as nn

__all__ = ['save_for_hf', 'transformers_compatible']

#: model_args entries that transformers' TimmWrapper passes to timm.create_model itself
_WRAPPER_ARGS = ('num_classes',)


def transformers_compatible(config: dict) -> dict:
    """``config`` (a timm ``config.json`` as a dict) without the ``model_args`` entries that transformers'
    TimmWrapper passes itself, with transformers' ``model_type``; a new dict, the rest unchanged."""
    config = dict(config)
    config.setdefault('model_type', 'timm_wrapper')
    args = {k: v for k, v in config.get('model_args', {}).items() if k not in _WRAPPER_ARGS}
    if args:
        config['model_args'] = args
    else:
        config.pop('model_args', None)
    return config


def save_for_hf(model: nn.Module, save_directory: Union[str, os.PathLike], **kwargs) -> None:
    """timm's ``save_for_hf(model, save_directory, **kwargs)`` (weights, ``config.json``), with a ``config.json`` that
    transformers' ``AutoModelForImageClassification`` / ``AutoModel`` / ``pipeline`` also load
    (``transformers_compatible``). ``kwargs`` go to timm's function unchanged (e.g. ``safe_serialization=True``,
    ``model_config=dict(label_names=...)``)."""
    from timm.models import save_for_hf as timm_save_for_hf
    timm_save_for_hf(model, save_directory, **kwargs)
    path = Path(save_directory) / 'config.json'
    config = json.loads(path.read_text(encoding='utf-8'))
    path.write_text(json.dumps(transformers_compatible(config), indent=2) + '\n', encoding='utf-8')
