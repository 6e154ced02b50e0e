"""Golden-data fixtures: the authors' golden data (vendored in tests/data/golden/) and release-format checkpoints.

Imported by ``tests/conftest.py`` and ``hub/tests/conftest.py``; test modules import its helpers from here.

The golden logits were computed by the authors' code on deterministic weights and input; ``golden_weights`` (this
project's own generator, checked bit for bit against the authors' in ``test_vendored_data.py``) rebuilds them.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

import golden_weights
import smpconv_timm  # noqa: F401  (registers the models)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / 'tests' / 'data' / 'golden'


@pytest.fixture(scope='session')
def golden_dir() -> Path:
    """The vendored golden data: the release's manifests and the reference outputs."""
    return GOLDEN


@pytest.fixture(scope='session')
def make_weights():
    """The weight and input generator of the golden data (``make_state_dict``, ``make_input``)."""
    return golden_weights


@pytest.fixture(scope='session')
def golden(golden_dir):
    with np.load(golden_dir / 'reference_outputs.npz') as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope='session')
def golden_input(make_weights) -> torch.Tensor:
    return torch.from_numpy(make_weights.make_input(2, 224))


def release_state_dict(make_weights, golden_dir, variant: str, salt: str = ''):
    manifest = golden_dir / f'reference_smpconv_{variant}_manifest.json'
    return {k: torch.from_numpy(v) for k, v in make_weights.make_state_dict(str(manifest), salt).items()}


#: release checkpoints built in this run: tests/ and hub/tests/ each register the fixtures of this module, and pytest
#: runs a session fixture once per registration; the files are the same, so both share them
_RELEASE_PATHS = {}


@pytest.fixture(scope='session')
def release_checkpoint(make_weights, golden_dir, tmp_path_factory):
    """Path of a release-format checkpoint ({'model', 'model_ema', 'epoch'}) for 't' or 'b', built once."""
    paths = _RELEASE_PATHS

    def get(variant: str) -> Path:
        if variant not in paths:
            ckpt = {
                'model': release_state_dict(make_weights, golden_dir, variant, 'model'),
                'model_ema': release_state_dict(make_weights, golden_dir, variant, ''),
                'epoch': 299,
            }
            paths[variant] = tmp_path_factory.mktemp('release') / f'smpconv_{variant}_release.pth'
            torch.save(ckpt, paths[variant])
        return paths[variant]
    return get


def golden_tolerance(ref: np.ndarray) -> float:
    """The golden README's bound for a correct rebuild."""
    return 1e-4 * max(1., float(np.abs(ref).max()))
