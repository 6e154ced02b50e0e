"""Pretrained weights downloaded through a real Hub protocol server on 127.0.0.1, nothing else reached.

The chain: the golden T weights published to the local Hub (``hub_fixtures.published``) -> fresh cache ->
``timm.create_model(..., pretrained=True)`` -> the authors' golden logits; then ``HF_HUB_OFFLINE`` from the cache;
download failures and damaged files give errors that name what was tried (``smpconv_timm.download``).
"""
import hashlib
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import load_state_dict_from_hf

import smpconv_timm
from smpconv_timm.download import PretrainedWeightsError
from smpconv_timm.variants import AUTHORS_RELEASE_URL, PUBLISHED_NAMESPACE
from publish import HUB_FILES, publish_folder  # hub/publish.py: puts the weights on the local Hub

from hub_fixtures import *  # noqa: F401,F403  (fixtures and helpers of the local Hub)
from local_hub import LocalHub
from test_autoload import AUTOLOAD

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def test_full_chain_download_then_offline(published, local_hub, fresh_cache, monkeypatch, golden, golden_input):
    files = local_hub.files(T_REPO)
    assert {f: files[f] for f in HUB_FILES} == {f: (published / f).read_bytes() for f in HUB_FILES}
    oid = hashlib.sha256(files['model.safetensors']).hexdigest()

    cdn_before = local_hub.count('cdn')
    for name in ('smpconv_t', 'smpconv_t.in1k', f'hf-hub:{T_REPO}'):
        assert_golden_t(logits(timm.create_model(name, pretrained=True), golden_input), golden)
    assert local_hub.count('cdn') - cdn_before == 1  # downloaded once, then read from the cache
    assert (repo_cache(fresh_cache, T_REPO) / 'blobs' / oid).is_file()

    set_offline(monkeypatch, True)
    before = len(local_hub.requests)
    for name in ('smpconv_t', 'smpconv_t.in1k', f'hf-hub:{T_REPO}'):
        assert_golden_t(logits(timm.create_model(name, pretrained=True), golden_input), golden)
    assert len(local_hub.requests) == before


@pytest.mark.slow  # two fresh interpreters, ~15 s on 2 cores
def test_environment_variables_and_namespace_override(published, local_hub, golden, make_weights, tmp_path,
                                                      monkeypatch):
    """A fork's namespace, HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE: fresh processes, as a user runs them, with the
    installed package's autoload hook and no ``import smpconv_timm``."""
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'publish-cache', token=TOKEN)
    publish_folder(published, 'myfork/smpconv_t.in1k', log=lambda s: None)
    script = textwrap.dedent(f'''
        import importlib.util, site, sys
        site.addsitedir({str(AUTOLOAD)!r})  # as site-packages is read at start
        import numpy as np, timm, torch
        spec = importlib.util.spec_from_file_location('golden_weights', sys.argv[1])
        make_weights = importlib.util.module_from_spec(spec); spec.loader.exec_module(make_weights)
        x = torch.from_numpy(make_weights.make_input(2, 224))
        for i, name in enumerate(sys.argv[3:]):
            with torch.no_grad():
                np.save(f'{{sys.argv[2]}}/{{i}}.npy', timm.create_model(name, pretrained=True).eval()(x).double().numpy())
    ''')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING'))}
    env.update(HF_ENDPOINT=local_hub.endpoint, HF_HOME=str(tmp_path / 'hf-home'), SMPCONV_HF_NAMESPACE='myfork',
               HF_HUB_DISABLE_TELEMETRY='1', PYTHONWARNINGS='ignore')

    def run(out, names, **extra):
        out.mkdir()
        subprocess.run([sys.executable, '-c', script, str(Path(make_weights.__file__)), str(out), *names],
                       env=dict(env, **extra), check=True, timeout=300)
        return [np.load(out / f'{i}.npy') for i in range(len(names))]

    for out in run(tmp_path / 'online', ['smpconv_t', 'hf-hub:myfork/smpconv_t.in1k', f'local-dir:{published}']):
        assert_golden_t(out, golden)
    fetched = {r[2] for r in local_hub.requests if r[0] == 'hub' and '/resolve/' in r[2]}
    assert '/myfork/smpconv_t.in1k/resolve/main/model.safetensors' in fetched
    assert (tmp_path / 'hf-home' / 'hub' / 'models--myfork--smpconv_t.in1k').is_dir()

    before = len(local_hub.requests)
    for out in run(tmp_path / 'offline', ['smpconv_t.in1k', 'hf-hub:myfork/smpconv_t.in1k'], HF_HUB_OFFLINE='1'):
        assert_golden_t(out, golden)
    assert len(local_hub.requests) == before


def _assert_says_what_was_tried(err, repo_id, endpoint):
    text = str(err)
    assert f"repo '{repo_id}'" in text and "revision 'main'" in text and endpoint in text
    assert "'model.safetensors' then 'pytorch_model.bin'" in text
    assert "pretrained_cfg_overlay=dict(file=" in text


@pytest.mark.parametrize('case', ['missing repo', 'missing file', 'nothing listens', 'offline, not cached'])
def test_download_errors_name_repo_file_and_the_local_route(case, published, local_hub, tmp_path, monkeypatch):
    endpoint, kwargs, repo_id = local_hub.endpoint, {}, T_REPO
    if case == 'missing repo':
        repo_id = 'nobody/smpconv_t.in1k'
        reason = 'the repository does not exist at this endpoint'
    elif case == 'missing file':
        repo_id = 'empty/smpconv_t.in1k'
        local_hub.add_repo(repo_id, {'config.json': b'{}'})
        reason = 'the repository holds none of these files'
    elif case == 'nothing listens':
        endpoint = f'http://127.0.0.1:{free_port()}'
        reason = 'no Hub server answered .*Connection refused'
    else:
        reason = r'offline mode is on \(HF_HUB_OFFLINE=1\) and the file is not in the local cache'
    point_hf_at(monkeypatch, endpoint, tmp_path / 'c', offline=case.startswith('offline'))
    if repo_id != T_REPO:
        kwargs['pretrained_cfg_overlay'] = dict(hf_hub_id=repo_id)
    with pytest.raises(PretrainedWeightsError, match=f'(?s)smpconv_t: {reason}') as e:
        timm.create_model('smpconv_t', pretrained=True, **kwargs)
    _assert_says_what_was_tried(e.value, repo_id, endpoint)
    # ... and the suggested route works: the published file, read locally
    local = timm.create_model('smpconv_t', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(published / 'model.safetensors')))
    weights = load_file(str(published / 'model.safetensors'))
    assert all(torch.equal(v, weights[k]) for k, v in local.state_dict().items())


@pytest.fixture
def no_dns(monkeypatch):
    """Host names ending in .invalid do not resolve, as without a network (no resolver is asked)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, (str, bytes)) and (host.decode() if isinstance(host, bytes) else host).endswith('.invalid'):
            raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, 'getaddrinfo', getaddrinfo)


@pytest.mark.parametrize('route', ['smpconv_t', f'hf-hub:{T_REPO}'])
@pytest.mark.parametrize('network', ['connection refused', 'name does not resolve'])
def test_nothing_listening_fails_fast_and_says_so(route, network, tmp_path, monkeypatch, no_dns):
    """No retries where no server answers: one try, one error naming the cause (huggingface_hub alone retries
    for about 25 s per file, and timm tries two weight files)."""
    if network == 'connection refused':
        endpoint, cause = f'http://127.0.0.1:{free_port()}', 'Connection refused'
    else:
        endpoint, cause = 'http://hub.smpconv-test.invalid', 'Name or service not known'
    point_hf_at(monkeypatch, endpoint, tmp_path / 'c')
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError) as e:
        timm.create_model(route, pretrained=True)
    assert time.monotonic() - start < 20
    text = str(e.value)
    assert f'no Hub server answered at {endpoint}' in text and cause in text, text
    assert "file 'config.json'" in text if route.startswith('hf-hub:') else "'model.safetensors' then" in text


@pytest.mark.parametrize('status', [404, 503])
def test_a_server_that_answers_is_named_and_keeps_its_retries(status, local_hub, fresh_cache, tmp_path, monkeypatch):
    """A server that is no Hub (404) or a Hub that is down (503): the error gives its answer, and the download
    makes exactly the requests and back-off sleeps timm and huggingface_hub make on their own, plus one."""
    sleeps = []
    monkeypatch.setattr('time.sleep', sleeps.append)  # huggingface_hub's back-off, recorded not slept

    def downloads():
        return sum(1 for r in local_hub.requests if r[0] == 'hub' and '/resolve/' in r[2])
    local_hub.hub_status = status
    try:
        before = downloads()
        with pytest.raises(Exception):
            load_state_dict_from_hf(T_REPO, cache_dir=tmp_path / 'plain')  # timm's builder's call for smpconv_t.in1k
        plain = (downloads() - before, len(sleeps))
        before, sleeps[:] = downloads(), []
        with pytest.raises(PretrainedWeightsError, match=f'the server at {local_hub.endpoint} answered HTTP {status}') as e:
            timm.create_model('smpconv_t', pretrained=True)
        guarded = (downloads() - before, len(sleeps))
    finally:
        local_hub.hub_status = None
    assert 'no Hub server answered' not in str(e.value) and 'could not be reached' not in str(e.value)
    assert guarded == (plain[0] + 1, plain[1])  # + the one request that checks that a server answers


def test_unpublished_repos_are_said_once_with_where_the_authors_files_are(tmp_path, monkeypatch):
    with LocalHub() as empty:  # a Hub without the smpconv-timm repos
        point_hf_at(monkeypatch, empty.endpoint, tmp_path / 'c')
        for repo_id, note in ((f'{PUBLISHED_NAMESPACE}/smpconv_t.in1k', True), ('someone/smpconv_t.in1k', False)):
            with pytest.raises(PretrainedWeightsError) as e:
                timm.create_model('smpconv_t', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=repo_id))
            text = str(e.value)
            assert text.count('not been published') == int(note) and (AUTHORS_RELEASE_URL in text) == note, text


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

    set_offline(monkeypatch, True)  # nothing usable was cached
    with pytest.raises(PretrainedWeightsError, match='offline mode is on'):
        timm.create_model('smpconv_t', pretrained=True)

    set_offline(monkeypatch, False)
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
    set_offline(monkeypatch, True)
    with pytest.raises(PretrainedWeightsError, match='damaged'):
        timm.create_model('smpconv_t', pretrained=True)
    assert not blob.exists()


@pytest.mark.slow  # builds the SMPConv-B hub folder (~20 s on 2 cores); smpconv_t's own checks run by default
def test_weights_of_another_architecture_are_named(folder_b, local_hub, fresh_cache):
    # SMPConv-B weights in a repo smpconv_t reads
    local_hub.add_repo('mixup/smpconv_t.in1k', {
        'model.safetensors': (folder_b.path / 'model.safetensors').read_bytes()})
    with pytest.raises(smpconv_timm.CheckpointError, match=r'(?s)another architecture.*smpconv_b.*the model smpconv_t.*mixup/smpconv_t'):
        timm.create_model('smpconv_t', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='mixup/smpconv_t.in1k'))


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
