"""The local Hub for the download and publishing tests: a Hub-protocol server on 127.0.0.1 (``local_hub.py``), the
authors' golden T weights converted and published to it by ``hub/publish.py``'s two commands, and huggingface_hub
pointed at it. Nothing else is reached.

huggingface_hub reads its settings at import: in this process they are patched on ``huggingface_hub.constants``
(``point_hf_at``); tests that need the real environment variables run fresh processes.
"""
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants

import smpconv_timm
from publish import build_hub_folder, main as publish_main

from golden_fixtures import golden_tolerance
from local_hub import LocalHub

__all__ = ['TOKEN', 'T_REPO', 'point_hf_at', 'repo_cache', 'logits', 'assert_golden_t', 'free_port', 'local_hub',
           'published', 'folder_b', 'fresh_cache']

TOKEN = 'hf_local_test_write_token'
T_REPO = f'{smpconv_timm.HF_HUB_NAMESPACE}/smpconv_t.in1k'  # the repo timm.create_model('smpconv_t', pretrained=True) reads


def point_hf_at(mp, endpoint, cache, offline=False, token=None):
    """What HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_TOKEN set at import, for this process."""
    cache = Path(cache)
    mp.setattr(hf_constants, 'ENDPOINT', endpoint)
    mp.setattr(hf_constants, 'HUGGINGFACE_CO_URL_TEMPLATE', endpoint + '/{repo_id}/resolve/{revision}/{filename}')
    mp.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
    mp.setattr(hf_constants, 'HF_HUB_OFFLINE', offline)
    # uploads through the LFS protocol (as without hf_xet); raising=False: names newer huggingface_hub versions add
    mp.setattr(hf_constants, 'HF_HUB_DISABLE_XET', True, raising=False)
    for name in ('HF_TOKEN_PATH', 'HF_STORED_TOKENS_PATH', 'AGENT_HARNESSES_PATH'):
        mp.setattr(hf_constants, name, str(cache.parent / f'.hf-{name.lower()}'), raising=False)  # not the user's
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        mp.delenv(var, raising=False)
    if token:
        mp.setenv('HF_TOKEN', token)


def repo_cache(cache, repo_id):
    return Path(cache) / ('models--' + repo_id.replace('/', '--'))


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x).double().numpy()


def assert_golden_t(out, golden):
    ref = golden['smpconv_t_ema_logits_fp64']
    assert np.abs(out - ref).max() < golden_tolerance(ref)
    assert np.abs(out - golden['smpconv_t_model_logits_fp64']).max() > 100 * golden_tolerance(ref)  # EMA, not raw


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

@pytest.fixture(scope='session')
def local_hub():
    with LocalHub(TOKEN) as hub:
        yield hub


@pytest.fixture(scope='session')
def published(local_hub, release_checkpoint, tmp_path_factory):
    """SMPConv-T converted and published to the local Hub by the two CLI commands."""
    root = tmp_path_factory.mktemp('hub')
    folder = root / 'smpconv_t.in1k'
    assert publish_main(['convert', str(release_checkpoint('t')), '-o', str(folder)]) == 0
    with pytest.MonkeyPatch.context() as mp:
        point_hf_at(mp, local_hub.endpoint, root / 'publish-cache', token=TOKEN)
        assert publish_main(['publish', str(folder)]) == 0
    return folder


@pytest.fixture(scope='session')
def folder_b(release_checkpoint, tmp_path_factory):
    return build_hub_folder(release_checkpoint('b'), tmp_path_factory.mktemp('hub_b') / 'smpconv_b.in1k', log=print)


@pytest.fixture
def fresh_cache(local_hub, tmp_path, monkeypatch):
    """A fresh HF cache pointed at the local Hub, no token."""
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'hf-cache')
    return tmp_path / 'hf-cache'
