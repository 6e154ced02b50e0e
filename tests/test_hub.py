"""Pretrained weights through a real Hub protocol server on 127.0.0.1 (``local_hub.py``), nothing else reached.

The chain: release-format checkpoint (golden weights) -> ``smpconv-timm convert`` -> ``smpconv-timm publish``
(real ``HfApi`` uploads: create repo, preupload, LFS batch + PUT, commit) -> fresh cache ->
``timm.create_model(..., pretrained=True)`` -> the authors' golden logits; then ``HF_HUB_OFFLINE`` from the
cache. huggingface_hub reads its settings at import: in this process they are patched on
``huggingface_hub.constants``; one test runs fresh processes with the real environment variables.
"""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file

import smpconv_timm
from smpconv_timm import checkpoint_filter_fn
from smpconv_timm.cli import main as cli_main
from smpconv_timm.flops import model_complexity
from smpconv_timm.hub import HUB_FILES, PretrainedWeightsError, build_hub_folder, publish_folder

from conftest import golden_tolerance, release_state_dict
from local_hub import LocalHub

# huggingface_hub's own LFS upload call (httpx2 prefers content= for raw bytes)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

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


@pytest.fixture(scope='module')
def local_hub():
    with LocalHub(TOKEN) as hub:
        yield hub


@pytest.fixture(scope='module')
def published(local_hub, release_checkpoint, tmp_path_factory):
    """SMPConv-T converted and published to the local Hub by the two CLI commands."""
    root = tmp_path_factory.mktemp('hub')
    folder = root / 'smpconv_t.in1k'
    assert cli_main(['convert', str(release_checkpoint('t')), '-o', str(folder)]) == 0
    with pytest.MonkeyPatch.context() as mp:
        point_hf_at(mp, local_hub.endpoint, root / 'publish-cache', token=TOKEN)
        assert cli_main(['publish', str(folder)]) == 0
    return folder


@pytest.fixture(scope='module')
def folder_b(release_checkpoint, tmp_path_factory):
    return build_hub_folder(release_checkpoint('b'), tmp_path_factory.mktemp('hub_b') / 'smpconv_b.in1k', log=print)


@pytest.fixture
def fresh_cache(local_hub, tmp_path, monkeypatch):
    """A fresh HF cache pointed at the local Hub, no token."""
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'hf-cache')
    return tmp_path / 'hf-cache'


# ---------------------------------------------------------------------------------------------------------
# The Hub folder

def test_converted_folder_is_a_timm_hub_repo(published, release_checkpoint, make_weights, golden_dir):
    assert sorted(p.name for p in published.iterdir()) == sorted(HUB_FILES)

    # model.safetensors: the model's own keys, fp32, EMA weights, bit-equal to the release's after key mapping
    weights = load_file(str(published / 'model.safetensors'))
    model = timm.create_model('smpconv_t')
    expect = checkpoint_filter_fn(release_state_dict(make_weights, golden_dir, 't', ''), model)
    assert weights.keys() == model.state_dict().keys() == expect.keys()
    for k, v in weights.items():
        assert v.dtype == (torch.float32 if expect[k].is_floating_point() else expect[k].dtype), k
        assert torch.equal(v, expect[k].to(v.dtype)), k

    config = json.loads((published / 'config.json').read_text())
    assert config['architecture'] == 'smpconv_t' and config['num_classes'] == 1000
    assert config['model_args'] == {'in_chans': 3, 'num_classes': 1000, 'global_pool': 'avg'}
    cfg = config['pretrained_cfg']
    assert cfg['tag'] == 'in1k' and cfg['input_size'] == [3, 224, 224] and cfg['license'] == 'mit'
    assert cfg['first_conv'] == 'stem.0.conv' and cfg['classifier'] == 'head.fc'
    assert not {'file', 'hf_hub_id', 'source', 'state_dict'} & cfg.keys()
    assert len(config['label_names']) == 1000 and config['label_names'][0] == 'n01440764'

    # README.md: timm's model card, numbers measured (the release's parameter count, fvcore's MACs)
    card = (published / 'README.md').read_text()
    front = card.split('---\n')[1]
    assert {'license: mit', 'library_name: timm', 'pipeline_tag: image-classification', '- imagenet-1k'} <= set(
        front.splitlines())
    manifest = json.loads((golden_dir / 'reference_smpconv_t_manifest.json').read_text())
    measured = model_complexity('smpconv_t')
    assert f'Params (M): {manifest["num_params"] / 1e6:.1f}' in card and manifest['num_params'] == measured.params
    assert f'GMACs: {measured.flops / 1e9:.2f}' in card and '6.28' in card  # the authors' fvcore count: 6.283 G
    assert f'Activations (M): {measured.activations / 1e6:.1f}' in card and 'Image size: 224 x 224' in card
    assert 'https://arxiv.org/abs/2304.02330' in card and 'https://github.com/sangnekim/SMPConv' in card
    assert re.search(r'as reported in the paper.*\| smpconv_t\.in1k \| 82\.5 \|', card, re.S)
    sha = hashlib.sha256(Path(release_checkpoint('t')).read_bytes()).hexdigest()
    assert 'EMA weights' in card and sha in card
    assert '@inproceedings{kim2023smpconv' in card
    blocks = re.findall(r'```python\n(.*?)```', card, re.S)
    assert len(blocks) == 3 and all("create_model('smpconv_t.in1k', pretrained=True" in b for b in blocks)
    for b in blocks:
        compile(b, 'model card', 'exec')
    assert 'features_only=True' in blocks[1] and '(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)' in blocks[1]
    assert 'num_classes=0' in blocks[2] and '(1, 768, 7, 7)' in blocks[2]


def test_smpconv_b_converts_to_the_golden_logits(folder_b, golden, golden_input):
    config = json.loads((folder_b.path / 'config.json').read_text())
    assert config['architecture'] == 'smpconv_b' and folder_b.weights == 'EMA' and folder_b.max_abs_diff == 0
    card = (folder_b.path / 'README.md').read_text()
    assert 'Params (M): 79.5' in card and 'GMACs: 18.22' in card and '| smpconv_b.in1k | 83.8 |' in card
    model = timm.create_model(
        'smpconv_b', pretrained=True, pretrained_cfg_overlay=dict(file=str(folder_b.path / 'model.safetensors')))
    ref = golden['smpconv_b_ema_logits_fp64']
    assert np.abs(logits(model, golden_input) - ref).max() < golden_tolerance(ref)


# ---------------------------------------------------------------------------------------------------------
# Publish -> download -> golden logits -> offline

def test_full_chain_download_then_offline(published, local_hub, fresh_cache, monkeypatch, golden, golden_input):
    files = local_hub.files(T_REPO)
    assert {f: files[f] for f in HUB_FILES} == {f: (published / f).read_bytes() for f in HUB_FILES}
    oid = hashlib.sha256(files['model.safetensors']).hexdigest()

    cdn_before = local_hub.count('cdn')
    for name in ('smpconv_t', 'smpconv_t.in1k', f'hf-hub:{T_REPO}'):
        assert_golden_t(logits(timm.create_model(name, pretrained=True), golden_input), golden)
    assert local_hub.count('cdn') - cdn_before == 1  # downloaded once, then read from the cache
    assert (repo_cache(fresh_cache, T_REPO) / 'blobs' / oid).is_file()

    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    before = len(local_hub.requests)
    for name in ('smpconv_t', 'smpconv_t.in1k', f'hf-hub:{T_REPO}'):
        assert_golden_t(logits(timm.create_model(name, pretrained=True), golden_input), golden)
    assert len(local_hub.requests) == before


def test_environment_variables_and_namespace_override(published, local_hub, golden, golden_dir, tmp_path,
                                                      monkeypatch):
    """A fork's namespace, HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE: fresh processes, as a user runs them."""
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'publish-cache', token=TOKEN)
    publish_folder(published, 'myfork/smpconv_t.in1k', log=lambda s: None)
    script = textwrap.dedent('''
        import importlib.util, sys
        import numpy as np, timm, torch
        import smpconv_timm
        spec = importlib.util.spec_from_file_location('make_weights', sys.argv[1])
        make_weights = importlib.util.module_from_spec(spec); spec.loader.exec_module(make_weights)
        x = torch.from_numpy(make_weights.make_input(2, 224))
        for i, name in enumerate(sys.argv[3:]):
            with torch.no_grad():
                np.save(f'{sys.argv[2]}/{i}.npy', timm.create_model(name, pretrained=True).eval()(x).double().numpy())
    ''')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING'))}
    env.update(HF_ENDPOINT=local_hub.endpoint, HF_HOME=str(tmp_path / 'hf-home'), SMPCONV_HF_NAMESPACE='myfork',
               HF_HUB_DISABLE_TELEMETRY='1', PYTHONWARNINGS='ignore')

    def run(out, names, **extra):
        out.mkdir()
        subprocess.run([sys.executable, '-c', script, str(golden_dir / 'make_weights.py'), str(out), *names],
                       env=dict(env, **extra), check=True, timeout=300)
        return [np.load(out / f'{i}.npy') for i in range(len(names))]

    for out in run(tmp_path / 'online', ['smpconv_t', 'hf-hub:myfork/smpconv_t.in1k']):
        assert_golden_t(out, golden)
    fetched = {r[2] for r in local_hub.requests if r[0] == 'hub' and '/resolve/' in r[2]}
    assert '/myfork/smpconv_t.in1k/resolve/main/model.safetensors' in fetched
    assert (tmp_path / 'hf-home' / 'hub' / 'models--myfork--smpconv_t.in1k').is_dir()

    before = len(local_hub.requests)
    for out in run(tmp_path / 'offline', ['smpconv_t.in1k', 'hf-hub:myfork/smpconv_t.in1k'], HF_HUB_OFFLINE='1'):
        assert_golden_t(out, golden)
    assert len(local_hub.requests) == before


def test_publish_options_token_and_private_download(published, local_hub, tmp_path, monkeypatch):
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'c1', token=TOKEN)  # token from HF_TOKEN
    repo_id, branch, message = 'tester/smpconv_t.in1k', 'v1.0', 'SMPConv-T, authors\' EMA weights'
    start = len(local_hub.requests)
    assert cli_main(['publish', str(published), '--repo-id', repo_id, '--private', '--revision', branch,
                     '--commit-message', message]) == 0
    repo = local_hub.repos[repo_id]
    assert repo.private and repo.commits[repo.branches[branch]]['summary'] == message
    files = local_hub.files(repo_id, branch)
    assert {f: files[f] for f in HUB_FILES} == {f: (published / f).read_bytes() for f in HUB_FILES}
    assert set(local_hub.files(repo_id, 'main')) == {'.gitattributes'}  # committed to the branch only
    writes = [r for r in local_hub.requests[start:] if r[1] in ('POST', 'PUT')]
    assert any(r[2] == '/api/models/tester/smpconv_t.in1k/commit/v1.0' for r in writes)
    assert all(r[3] == f'Bearer {TOKEN}' for r in writes if r[0] == 'hub')
    # the Hub already stores that blob (from the first publish): the batch call asks for no second upload
    assert any(r[2] == '/tester/smpconv_t.in1k.git/info/lfs/objects/batch' for r in writes)
    assert not [r for r in writes if r[0] == 'cdn']
    puts = [r for r in local_hub.requests if r[0] == 'cdn' and r[1] == 'PUT']
    assert puts and all(r[3] is None for r in puts)  # LFS uploads went to storage, without the Hub token

    # a private repo: refused without a token, downloaded with one
    overlay = dict(hf_hub_id=f'{repo_id}@{branch}')
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'c2')
    with pytest.raises(PretrainedWeightsError, match=r"(?s)does not exist.*private.*'tester/smpconv_t\.in1k'.*'v1\.0'"):
        timm.create_model('smpconv_t', pretrained=True, pretrained_cfg_overlay=overlay)
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'c3', token=TOKEN)
    model = timm.create_model('smpconv_t', pretrained=True, pretrained_cfg_overlay=overlay)
    weights = load_file(str(published / 'model.safetensors'))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_dry_run_lists_the_upload_and_contacts_nothing(published, local_hub, tmp_path, monkeypatch, capsys):
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'c')  # no token needed
    before = len(local_hub.requests)
    assert cli_main(['publish', str(published), '--dry-run', '--revision', 'v2', '--private']) == 0
    out = capsys.readouterr().out
    assert len(local_hub.requests) == before
    assert f'{local_hub.endpoint}/{T_REPO} (revision v2, private)' in out and 'nothing uploaded' in out
    for f in HUB_FILES:
        data = (published / f).read_bytes()
        assert re.search(rf'{re.escape(f)}\s+{len(data):,d} bytes\s+sha256 {hashlib.sha256(data).hexdigest()}', out)


def test_publish_without_a_token_is_refused(published, local_hub, tmp_path, monkeypatch, capsys):
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'c')
    before = len(local_hub.requests)
    assert cli_main(['publish', str(published), '--repo-id', 'someone/x']) == 2
    err = capsys.readouterr().err
    assert 'hf auth login' in err and 'HF_TOKEN' in err and '--token' in err
    assert len(local_hub.requests) == before


def test_raw_weights_stay_out_of_the_default_repo(make_weights, golden_dir, tmp_path, capsys):
    assert cli_main(['publish', 'whatever.pth', '--raw', '--dry-run']) == 2
    assert 'need an explicit repo id (--repo-id)' in capsys.readouterr().err
    torch.save({'model': release_state_dict(make_weights, golden_dir, 't', 'model')}, tmp_path / 'raw_only.pth')
    assert cli_main(['publish', str(tmp_path / 'raw_only.pth'), '--dry-run']) == 2  # EMA asked for, none there
    captured = capsys.readouterr()
    assert 'raw weights' in captured.out and 'holds no EMA weights' in captured.err
    assert _nothing_written(tmp_path, 'raw_only.pth')


# ---------------------------------------------------------------------------------------------------------
# Bad input at download time

def _assert_says_what_was_tried(err, repo_id, endpoint):
    text = str(err)
    assert f"repo '{repo_id}'" in text and "revision 'main'" in text and endpoint in text
    assert "'model.safetensors' then 'pytorch_model.bin'" in text
    assert "pretrained_cfg_overlay=dict(file=" in text


@pytest.mark.parametrize('case', ['missing repo', 'missing file', 'unreachable', 'offline, not cached'])
def test_download_errors_name_repo_file_and_the_local_route(case, published, local_hub, tmp_path, monkeypatch):
    endpoint, kwargs, repo_id = local_hub.endpoint, {}, T_REPO
    if case == 'missing repo':
        repo_id = 'nobody/smpconv_t.in1k'
        reason = 'the repository does not exist at this endpoint'
    elif case == 'missing file':
        repo_id = 'empty/smpconv_t.in1k'
        local_hub.add_repo(repo_id, {'config.json': b'{}'})
        reason = 'the repository holds none of these files'
    elif case == 'unreachable':
        endpoint = f'http://127.0.0.1:{free_port()}'  # nothing listens there
        reason = 'the endpoint could not be reached .*Connect'
        sleeps = []
        monkeypatch.setattr('time.sleep', sleeps.append)  # huggingface_hub's retry back-off, recorded not slept
    else:
        reason = r'offline mode is on \(HF_HUB_OFFLINE=1\) and the file is not in the local cache'
    point_hf_at(monkeypatch, endpoint, tmp_path / 'c', offline=case.startswith('offline'))
    if repo_id != T_REPO:
        kwargs['pretrained_cfg_overlay'] = dict(hf_hub_id=repo_id)
    with pytest.raises(PretrainedWeightsError, match=f'(?s)smpconv_t: {reason}') as e:
        timm.create_model('smpconv_t', pretrained=True, **kwargs)
    _assert_says_what_was_tried(e.value, repo_id, endpoint)
    if case == 'unreachable':
        assert sleeps  # it did retry before giving up
    # ... and the suggested route works: the published file, read locally
    local = timm.create_model('smpconv_t', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(published / 'model.safetensors')))
    weights = load_file(str(published / 'model.safetensors'))
    assert all(torch.equal(v, weights[k]) for k, v in local.state_dict().items())


@pytest.fixture
def cdn_fault(local_hub):
    yield lambda fault: setattr(local_hub, 'cdn_fault', fault)
    local_hub.cdn_fault = None


@pytest.mark.parametrize('fault', ['truncated', 'corrupt header', 'corrupt tensor data'])
def test_damaged_download_is_refused_and_not_cached(fault, published, local_hub, fresh_cache, monkeypatch,
                                                    cdn_fault):
    size = (published / 'model.safetensors').stat().st_size
    cdn_fault({'truncated': ('truncate', size // 2), 'corrupt header': ('corrupt', 20),
               'corrupt tensor data': ('corrupt', size - 4096)}[fault])
    reason = 'download was incomplete' if fault == 'truncated' else r'downloaded model\.safetensors is damaged'
    with pytest.raises(PretrainedWeightsError, match=reason) as e:
        timm.create_model('smpconv_t', pretrained=True)
    _assert_says_what_was_tried(e.value, T_REPO, local_hub.endpoint)
    cached = repo_cache(fresh_cache, T_REPO)
    assert not list((cached / 'blobs').glob('*')) and not list((cached / 'snapshots').rglob('model.safetensors'))

    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)  # nothing usable was cached
    with pytest.raises(PretrainedWeightsError, match='offline mode is on'):
        timm.create_model('smpconv_t', pretrained=True)

    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    cdn_fault(None)
    model = timm.create_model('smpconv_t', pretrained=True)
    weights = load_file(str(published / 'model.safetensors'))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_damaged_cache_is_refused_offline(published, local_hub, fresh_cache, monkeypatch):
    timm.create_model('smpconv_t', pretrained=True)
    blob = next((repo_cache(fresh_cache, T_REPO) / 'blobs').glob('[0-9a-f]' * 64))
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0x01  # one bit flipped on disk
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(PretrainedWeightsError, match='damaged'):
        timm.create_model('smpconv_t', pretrained=True)
    assert not blob.exists()


# ---------------------------------------------------------------------------------------------------------
# Wrong architecture, and conversion that must leave nothing behind

def test_weights_of_another_architecture_are_named(folder_b, local_hub, fresh_cache, release_checkpoint, tmp_path,
                                                   capsys):
    # at download: SMPConv-B weights in a repo smpconv_t reads
    local_hub.add_repo('mixup/smpconv_t.in1k', {
        'model.safetensors': (folder_b.path / 'model.safetensors').read_bytes()})
    with pytest.raises(smpconv_timm.CheckpointError, match=r'(?s)another architecture.*smpconv_b.*the model smpconv_t.*mixup/smpconv_t'):
        timm.create_model('smpconv_t', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='mixup/smpconv_t.in1k'))

    # at conversion: B asked to be T, refused before anything is written
    out = tmp_path / 'out'
    assert cli_main(['convert', str(release_checkpoint('b')), '--model', 'smpconv_t', '-o', str(out)]) == 2
    assert re.search(r'the checkpoint is smpconv_b \(depths \(2, 2, 20, 2\).*not smpconv_t', capsys.readouterr().err)
    assert not [p.name for p in tmp_path.iterdir() if 'out' in p.name]


def test_unrecognised_checkpoints_are_refused(make_weights, golden_dir, tmp_path):
    sd = release_state_dict(make_weights, golden_dir, 't', '')
    # stage 3 with 6 units instead of 8: no registered variant
    short = {k: v for k, v in sd.items() if not re.match(r'stages\.2\.blocks\.(1[2-5])\.', k)}
    torch.save({'model': short}, tmp_path / 'short.pth')
    torch.save({'model': {'conv1.weight': torch.zeros(64, 3, 7, 7), 'fc.weight': torch.zeros(1000, 2048)}},
               tmp_path / 'resnet.pth')
    with pytest.raises(ValueError, match=r'not recognised: depths \(2, 2, 6, 2\).*smpconv_t: depths \(2, 2, 8, 2\)'):
        build_hub_folder(tmp_path / 'short.pth', tmp_path / 'out')
    with pytest.raises(ValueError, match='not an SMPConv checkpoint.*conv1.weight'):
        build_hub_folder(tmp_path / 'resnet.pth', tmp_path / 'out')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['resnet.pth', 'short.pth']


def _nothing_written(tmp_path, *inputs):
    return sorted(p.name for p in tmp_path.iterdir()) == sorted(inputs)


def test_bad_checkpoints_write_nothing(make_weights, golden_dir, release_checkpoint, tmp_path):
    sd = release_state_dict(make_weights, golden_dir, 't', '')
    sd['stages.2.blocks.3.pw1.conv.weight'][0, 0] = float('nan')
    torch.save({'model_ema': sd, 'model': sd}, tmp_path / 'nan.pth')
    with pytest.raises(ValueError, match=r'non-finite.*stages\.2\.blocks\.3\.pw1\.conv\.weight'):
        build_hub_folder(tmp_path / 'nan.pth', tmp_path / 'out')
    data = Path(release_checkpoint('t')).read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='truncated, corrupt'):
        build_hub_folder(tmp_path / 'cut.pth', tmp_path / 'out')
    assert _nothing_written(tmp_path, 'nan.pth', 'cut.pth')


def test_failures_while_writing_leave_no_partial_output(release_checkpoint, tmp_path, monkeypatch):
    import safetensors.torch
    save_file = safetensors.torch.save_file

    def disk_full(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        with open(filename, 'r+b') as f:
            f.truncate(1000)
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(safetensors.torch, 'save_file', disk_full)
    with pytest.raises(OSError, match='No space left'):
        build_hub_folder(release_checkpoint('t'), tmp_path / 'out')
    assert _nothing_written(tmp_path)


def test_conversion_compares_outputs_before_writing(release_checkpoint, tmp_path, monkeypatch):
    """A config.json that would not rebuild the same model (max pooling here) is caught by the output check."""
    from timm.models import _hub as timm_hub
    save_config = timm_hub.save_config_for_hf

    def wrong_pool(model, config_path, model_config=None, model_args=None, data_config=None):
        save_config(model, config_path, model_config=model_config, model_args=model_args, data_config=data_config)
        config = json.loads(Path(config_path).read_text())
        config['model_args']['global_pool'] = 'max'
        Path(config_path).write_text(json.dumps(config))

    monkeypatch.setattr(timm_hub, 'save_config_for_hf', wrong_pool)
    with pytest.raises(ValueError, match='disagrees with the release checkpoint'):
        build_hub_folder(release_checkpoint('t'), tmp_path / 'out')
    assert _nothing_written(tmp_path)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    from smpconv_timm.hub import _move_into_place
    out, new = tmp_path / 'out', tmp_path / 'new'
    out.mkdir()
    (out / 'mine.txt').write_text('keep')
    new.mkdir()
    (new / 'model.safetensors').write_text('new')
    with pytest.raises(FileExistsError, match='--overwrite'):
        _move_into_place(new, out, overwrite=False)
    assert (out / 'mine.txt').read_text() == 'keep' and new.is_dir()
    _move_into_place(new, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ['model.safetensors'] and _nothing_written(tmp_path, 'out')


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning from the published weights

def test_fine_tuning_from_pretrained_keeps_every_tensor_that_fits(published, local_hub, fresh_cache):
    weights = load_file(str(published / 'model.safetensors'))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    model = timm.create_model('smpconv_t', pretrained=True, num_classes=10)
    for k, v in model.state_dict().items():
        if k.startswith('head.fc.'):
            assert v.shape[0] == 10
        else:
            assert torch.equal(v, weights[k]), k

    gray = timm.create_model('smpconv_t', pretrained=True, in_chans=1)
    for k, v in gray.state_dict().items():
        expect = weights[k].sum(dim=1, keepdim=True) if k == 'stem.0.conv.weight' else weights[k]
        assert torch.allclose(v, expect) if k == 'stem.0.conv.weight' else torch.equal(v, expect), k
    assert gray.eval()(x[:, :1]).shape == (2, 1000)

    full = timm.create_model('smpconv_t', pretrained=True).eval()
    feats = timm.create_model('smpconv_t', pretrained=True, features_only=True).eval()
    sd = feats.state_dict()
    # FeatureListNet flattens 'stem.0' / 'stages.0' into 'stem_0' / 'stages_0'
    assert sd and all(torch.equal(v, weights[re.sub(r'^(stem|stages)_(\d+)', r'\1.\2', k)]) for k, v in sd.items())
    assert len(sd) == len([k for k in weights if not k.startswith('head.')])
    assert feats.feature_info.channels() == [96, 192, 384, 768]
    with torch.no_grad():
        for got, expect in zip(feats(x), full.forward_intermediates(x, intermediates_only=True)):
            assert torch.allclose(got, expect, atol=1e-5)

    big = timm.create_model('smpconv_t', pretrained=True, img_size=256).eval()
    assert all(torch.equal(v, weights[k]) for k, v in big.state_dict().items())
    with torch.no_grad():
        assert torch.allclose(big(torch.randn(1, 3, 256, 256)).softmax(-1).sum(), torch.tensor(1.))

    # the README's fine-tune recipe, three steps on one batch: the loss goes down, the backbone is trained too
    from timm.optim import create_optimizer_v2
    torch.manual_seed(0)
    model.reset_classifier(10)
    model.train()
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    y = torch.tensor([3, 7])
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model.state_dict()['stages.0.blocks.0.pw1.conv.weight'],
                           weights['stages.0.blocks.0.pw1.conv.weight'])


def test_local_dir_folder_loads(published, golden, golden_input):
    assert_golden_t(logits(timm.create_model(f'local-dir:{published}', pretrained=True), golden_input), golden)
