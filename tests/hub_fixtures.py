"""The local Hub for the download and publishing tests: a Hub-protocol server on 127.0.0.1 (``local_hub.py``), the
authors' golden T weights converted and published to it by ``hub/publish.py``'s two commands, and huggingface_hub
pointed at it. Nothing else is reached.

huggingface_hub reads its settings at import: in this process they are patched on ``huggingface_hub.constants``
and its modules' copies (``point_hf_at``, ``set_offline``); tests that need the real environment variables run
fresh processes.
"""
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import utils as hf_utils

import smpconv_timm
from publish import build_hub_folder, main as publish_main

from golden_fixtures import golden_tolerance
from local_hub import LocalHub

__all__ = ['TOKEN', 'T_REPO', 'point_hf_at', 'set_offline', 'repo_cache', 'logits', 'assert_golden_t', 'free_port',
           'local_hub', 'published', 'folder_b', 'fresh_cache']

TOKEN = 'hf_local_test_write_token'
T_REPO = f'{smpconv_timm.HF_HUB_NAMESPACE}/smpconv_t.in1k'  # the repo timm.create_model('smpconv_t', pretrained=True) reads


def point_hf_at(mp, endpoint, cache, offline=False, token=None):
    """What HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_TOKEN set at import, for this process.

    huggingface_hub < 0.25 copies its constants into its modules at import (``from .constants import ENDPOINT``):
    every loaded huggingface_hub module that holds one is patched.
    """
    cache = Path(cache)
    _patch_hf(mp, ENDPOINT=endpoint, HUGGINGFACE_CO_URL_TEMPLATE=endpoint + '/{repo_id}/resolve/{revision}/{filename}',
              HF_HUB_CACHE=str(cache), HUGGINGFACE_HUB_CACHE=str(cache),
              # not the user's token files
              **{name: str(cache.parent / f'.hf-{name.lower()}')
                 for name in ('HF_TOKEN_PATH', 'HF_STORED_TOKENS_PATH', 'AGENT_HARNESSES_PATH')})
    set_offline(mp, offline)
    # uploads through the LFS protocol (as without hf_xet); raising=False: names newer huggingface_hub versions add
    mp.setattr(hf_constants, 'HF_HUB_DISABLE_XET', True, raising=False)
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        mp.delenv(var, raising=False)
    if token:
        mp.setenv('HF_TOKEN', token)


def set_offline(mp, offline):
    """What HF_HUB_OFFLINE set at import, for this process."""
    _patch_hf(mp, HF_HUB_OFFLINE=offline)
    if hasattr(hf_utils, 'reset_sessions'):  # < 1.0: a session mounts its offline adapter when it is created
        hf_utils.reset_sessions()


def _patch_hf(mp, **values):
    modules = [m for n, m in list(sys.modules.items()) if m is not None and n.split('.')[0] == 'huggingface_hub']
    for name, value in values.items():
        mp.setattr(hf_constants, name, value, raising=False)
        for module in modules:
            if module is not hf_constants and name in vars(module):
                mp.setattr(module, name, value)


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


_FOLDER_B = []  # built once per run although tests/ and hub/tests/ each register this fixture (files only, no Hub)


@pytest.fixture(scope='session')
def folder_b(release_checkpoint, tmp_path_factory):
    if not _FOLDER_B:
        _FOLDER_B.append(build_hub_folder(
            release_checkpoint('b'), tmp_path_factory.mktemp('hub_b') / 'smpconv_b.in1k', log=print))
    return _FOLDER_B[0]


@pytest.fixture
def fresh_cache(local_hub, tmp_path, monkeypatch):
    """A fresh HF cache pointed at the local Hub, no token."""
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'hf-cache')
    return tmp_path / 'hf-cache'
