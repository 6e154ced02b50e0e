"""tests/data/: the vendored golden data and train.py interface, and the project's golden weight generator.

Always checked: each vendored file against its recorded sha256 (``tests/data/SHA256SUMS``), and what
``golden_weights`` generates against the recorded digests of what the authors' ``make_weights.py`` generates
(``tests/data/golden/GENERATED_SHA256SUMS``). Where the authors' reference folder is present (``../shared`` beside
the repository or ``$SMPCONV_SHARED``) also directly: every vendored file against its
original byte for byte, every generated array against the authors' generator bit for bit, and the recorded digests
against a fresh computation.
"""
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import golden_weights

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / 'tests' / 'data'
SHARED = Path(os.environ.get('SMPCONV_SHARED', ROOT.parent / 'shared'))


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


regen_digests = _load('regen_digests', DATA / 'regen_digests.py')
regen_train_args = _load('regen_train_args', DATA / 'regen_train_args.py')
FILE_SUMS = regen_digests.read_sums(DATA / regen_digests.FILE_SUMS)
GENERATED_SUMS = regen_digests.read_sums(DATA / regen_digests.GENERATED_SUMS)


@pytest.fixture(scope='module')
def shared():
    """The folder holding the authors' ``reference/``, or None where it is absent (then the recorded digests are
    the reference: every test still runs)."""
    if (SHARED / 'reference' / 'golden' / 'make_weights.py').is_file():
        return SHARED
    return None


@pytest.fixture(scope='module')
def authors(shared):
    """The authors' make_weights module, or None without the reference folder."""
    return regen_digests.load_authors_generator(shared) if shared else None


def bit_mismatches(expected: dict, actual: dict) -> list:
    """Names whose arrays differ in dtype, shape or any byte."""
    return [k for k in expected if expected[k].dtype != actual[k].dtype or expected[k].shape != actual[k].shape
            or expected[k].tobytes() != actual[k].tobytes()]


def test_digest_files_cover_all_vendored_data():
    skip = {'SHA256SUMS', 'GENERATED_SHA256SUMS'}
    on_disk = {p.relative_to(DATA).as_posix() for p in DATA.rglob('*')
               if p.is_file() and p.suffix not in ('.py', '.pyc') and p.name not in skip}
    assert set(FILE_SUMS) == set(regen_digests.VENDORED) == on_disk
    labels = {regen_digests.state_dict_label(v, s) for v, s in regen_digests.STATE_DICT_CASES}
    assert set(GENERATED_SUMS) == labels | {regen_digests.input_label(*regen_digests.INPUT_CASE)}
    assert all(re.fullmatch('[0-9a-f]{64}', d) for d in [*FILE_SUMS.values(), *GENERATED_SUMS.values()])


@pytest.mark.parametrize('rel', regen_digests.VENDORED)
def test_vendored_file(rel, shared):
    data = (DATA / rel).read_bytes()
    assert regen_digests.file_sha256(DATA / rel) == FILE_SUMS[rel]
    if shared:
        assert data == (shared / 'reference' / rel).read_bytes()


@pytest.mark.parametrize('variant,salt', regen_digests.STATE_DICT_CASES)
def test_state_dict_generator(variant, salt, authors):
    manifest = DATA / 'golden' / regen_digests.manifest_name(variant)
    sd = golden_weights.make_state_dict(manifest, salt)
    entries = json.loads(manifest.read_text())['state_dict']
    assert [(k, v.shape) for k, v in sd.items()] == [(k, tuple(s)) for k, s in entries]
    assert golden_weights.arrays_sha256(sd.items()) == GENERATED_SUMS[regen_digests.state_dict_label(variant, salt)]
    if authors:
        expected = authors.make_state_dict(str(manifest), salt)
        assert list(expected) == list(sd)
        assert bit_mismatches(expected, sd) == []


def test_input_generator(authors):
    x = golden_weights.make_input(*regen_digests.INPUT_CASE)
    assert x.dtype == np.float32 and x.shape == (2, 3, 224, 224)
    assert golden_weights.arrays_sha256([('input', x)]) == GENERATED_SUMS[regen_digests.input_label(2, 224)]
    if authors:
        assert bit_mismatches({'x': authors.make_input(2, 224)}, {'x': x}) == []
    small = golden_weights.make_input(1, 16)  # a pixel's value depends on its indices only
    np.testing.assert_allclose(small, x[:1, :, :16, :16], rtol=0, atol=1e-6)


def test_generated_values_follow_the_documented_ranges():
    """The ranges reference/golden/README.md states, fan-in scaled weights, a salt that changes every learnt tensor."""
    manifest = DATA / 'golden' / regen_digests.manifest_name('t')
    ema, raw = golden_weights.make_state_dict(manifest, ''), golden_weights.make_state_dict(manifest, 'model')
    groups = {}
    for name, v in ema.items():
        suffix = name.rsplit('.', 1)[-1]
        groups.setdefault(suffix, []).append(v)
        if suffix == 'num_batches_tracked':
            assert v.dtype == np.int64 and not v.any()
        elif suffix == 'kernel_coord':
            k = v.shape[-1]
            t = np.linspace(-1, 1, k, dtype=np.float32)
            np.testing.assert_array_equal(v, np.stack(np.meshgrid(t, t, indexing='ij'))[None])
            np.testing.assert_array_equal(v, raw[name])
        else:
            assert v.dtype == np.float32 and not np.array_equal(v, raw[name]), name
        if suffix == 'weight' and v.ndim > 1:  # conv / linear: uniform, variance 1 / fan_in
            bound = np.sqrt(3 / np.prod(v.shape[1:]))
            assert 0.9 * bound < np.abs(v).max() <= bound * (1 + 1e-6), name
        elif suffix == 'weight':  # norm scale
            assert np.abs(v - 1).max() <= 0.1 + 1e-6, name
    cat = {k: np.concatenate([v.ravel() for v in vs]) for k, vs in groups.items()}
    assert cat['running_var'].min() >= 1 and cat['running_var'].max() <= 1.5
    assert cat['radius'].min() >= 0.05 and cat['radius'].max() <= 0.25
    assert np.abs(cat['weight_coord']).max() <= 0.6 and np.abs(cat['weight_coord']).max() > 0.59


@pytest.mark.slow  # the maintainers' script over every vendored file, ~10 s on 2 cores
def test_regen_digests_reproduces_the_recorded_files(shared, tmp_path):
    """The script on a reference folder rebuilt from the vendored files (and on the authors' one where present)."""
    stand_in = tmp_path / 'shared'
    data_dir = tmp_path / 'data'
    for rel in regen_digests.VENDORED:
        for dst in (stand_in / 'reference' / rel, data_dir / rel):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(DATA / rel, dst)
    shutil.copyfile(golden_weights.__file__, stand_in / 'reference' / 'golden' / 'make_weights.py')
    assert regen_digests.main(['--shared', str(stand_in), '--data-dir', str(data_dir), '--check']) == 1  # none yet
    assert regen_digests.main(['--shared', str(stand_in), '--data-dir', str(data_dir)]) == 0
    for rel in (regen_digests.FILE_SUMS, regen_digests.GENERATED_SUMS):
        assert (data_dir / rel).read_bytes() == (DATA / rel).read_bytes()

    (data_dir / 'timm_train_args.json').write_text('{}')  # a vendored copy that no longer equals the original
    with pytest.raises(SystemExit, match='timm_train_args.json'):
        regen_digests.compute(stand_in, data_dir)
    if shared:
        assert regen_digests.main(['--shared', str(shared), '--data-dir', str(DATA), '--check']) == 0


STAND_IN_TRAIN_PY = '''
import sys
sys.path.insert(0, {tests!r})
from train_replica import build_parsers

config_parser, parser = build_parsers({interface!r})
'''


def test_regen_train_args_round_trip(tmp_path):
    """train.py parsers rebuilt from the vendored interface, read back by the script: the same file, byte for byte."""
    vendored = DATA / 'timm_train_args.json'
    version = re.search(r'version (\S+) tree', json.loads(vendored.read_text())['source']).group(1)
    checkout = tmp_path / 'pytorch-image-models'
    (checkout / 'timm').mkdir(parents=True)
    (checkout / 'timm' / 'version.py').write_text(f"__version__ = '{version}'\n")
    (checkout / 'train.py').write_text(STAND_IN_TRAIN_PY.format(tests=str(ROOT / 'tests'), interface=str(vendored)))
    out = tmp_path / 'timm_train_args.json'
    assert regen_train_args.main([str(checkout / 'train.py'), '-o', str(out)]) == 0
    assert out.read_bytes() == vendored.read_bytes()

    # a changed default shows up in the regenerated file
    (checkout / 'train.py').write_text((checkout / 'train.py').read_text() + 'parser.set_defaults(lr=0.5)\n')
    assert regen_train_args.main([str(checkout / 'train.py'), '-o', str(out), '--timm-version', 'x']) == 0
    regenerated = json.loads(out.read_text())
    assert regenerated['args']['lr']['default'] == 0.5 and 'version x tree' in regenerated['source']
