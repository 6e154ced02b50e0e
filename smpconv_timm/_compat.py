"""Every private timm / torch name this package relies on, and stand-ins for helpers older releases lack.

Checked against the declared minimums (pyproject.toml: timm 1.0.26, torch 2.4, huggingface_hub 0.20) and the
newest tested releases (timm 1.0.31, torch 2.14, huggingface_hub 2.4); ``.ci/floors.sh`` tests the minimums.
Everything else is imported from the public API (``timm.models``, ``timm.utils``, ``huggingface_hub``).
"""
import argparse
import hashlib
from typing import BinaryIO, Union

import torch

# timm.models._features: no public export of the forward_intermediates index helper (timm 1.0.20 - 1.0.31)
from timm.models._features import feature_take_indices
# timm.models._builder: where create_model(pretrained=True) loads from ('hf-hub', 'url', 'file', ...) and the repo /
# file name; only the builder resolves it (timm 1.0.20 - 1.0.31)
from timm.models._builder import _resolve_pretrained_source
# timm.models._hub: the model card writer and config reader behind push_to_hf_hub / hf-hub: models, the
# 'repo@revision' split and the .bin -> .safetensors alternatives timm's Hub loader tries (timm 1.0.20 - 1.0.31)
from timm.models._hub import _get_safe_alternatives, generate_readme, hf_split, load_model_config_from_path
# timm.models._factory: create_model('hf-hub:...') fetches the repo's config.json through this module's
# load_model_config_from_hf, before any model code runs; download.guard_hf_hub_configs wraps it (timm 1.0.21 - 1.0.31)
from timm.models import _factory as timm_factory

try:
    # torch.fx: no public "is symbolic tracing" query; named is_fx_symbolic_tracing since torch 2.5
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing
except ImportError:  # torch 2.4
    from torch.fx._symbolic_trace import is_fx_tracing as is_fx_symbolic_tracing

__all__ = [
    'feature_take_indices', '_resolve_pretrained_source', '_get_safe_alternatives', 'generate_readme', 'hf_split',
    'load_model_config_from_path', 'timm_factory', 'is_fx_symbolic_tracing', 'torch_load', 'sha_fileobj', 'git_hash',
    'is_offline_mode', 'http_no_redirects',
]


def torch_load(
        path: str,
        map_location: Union[str, torch.device] = 'cpu',
        weights_only: bool = True,
        mmap: bool = False,
):
    """``torch.load`` that accepts ``argparse.Namespace`` (training args) under ``weights_only``.

    Public-API replacement for timm's private ``timm.models._helpers._torch_load`` (only in timm >= 1.0.26).
    """
    kwargs = dict(map_location=map_location, weights_only=weights_only)
    if mmap:
        kwargs['mmap'] = True
    if weights_only and hasattr(torch.serialization, 'safe_globals'):  # torch >= 2.5
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, **kwargs)
    return torch.load(path, **kwargs)


def sha_fileobj(fileobj: BinaryIO, chunk_size: int = 1 << 20) -> bytes:
    """SHA-256 digest of a binary file object, read in chunks (the Hub's ETag of an LFS file)."""
    sha = hashlib.sha256()
    for chunk in iter(lambda: fileobj.read(chunk_size), b''):
        sha.update(chunk)
    return sha.digest()


def git_hash(data: bytes) -> str:
    """Git blob SHA-1 (hex) of ``data``, the Hub's ETag of a non-LFS file.

    Stands in for ``huggingface_hub.utils.sha.git_hash`` (not in huggingface_hub 0.20).
    """
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def http_no_redirects() -> dict:
    """The keyword that keeps huggingface_hub's HTTP client from following redirects: requests (< 1.0) or httpx."""
    from huggingface_hub.utils import get_session
    return {'allow_redirects': False} if type(get_session()).__module__.startswith('requests') else \
        {'follow_redirects': False}


def is_offline_mode() -> bool:
    """huggingface_hub's offline switch (``HF_HUB_OFFLINE``): a function since 1.x, a constant before."""
    from huggingface_hub import constants
    if hasattr(constants, 'is_offline_mode'):
        return bool(constants.is_offline_mode())
    return bool(constants.HF_HUB_OFFLINE)
