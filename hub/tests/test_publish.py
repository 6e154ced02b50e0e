"""hub/publish.py: the authors' checkpoints -> verified timm Hub repo folders -> uploads to a real Hub protocol
server on 127.0.0.1 (real ``HfApi`` uploads: create repo, preupload, LFS batch + PUT, commit); nothing else reached.
"""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from smpconv_timm import VARIANTS, checkpoint_filter_fn
from smpconv_timm.download import PretrainedWeightsError
from smpconv_timm.flops import model_complexity

from publish import HUB_FILES, build_hub_folder, main as publish_main

from golden_fixtures import golden_tolerance, release_state_dict
from hub_fixtures import *  # noqa: F401,F403  (fixtures and helpers of the local Hub)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


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
    # num_classes not in model_args (transformers' TimmWrapper passes it itself), model_type as transformers writes it
    assert config['model_args'] == {'in_chans': 3, 'global_pool': 'avg'} and config['model_type'] == 'timm_wrapper'
    assert config['pretrained_cfg']['num_classes'] == 1000
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
    assert len(blocks) == 4 and all("create_model('smpconv_t.in1k', pretrained=True" in b for b in blocks[:3])
    assert blocks[3].count(f"'{T_REPO}'") == 4 and f"pipeline('image-classification', model='{T_REPO}')" in blocks[3]
    for b in blocks:
        compile(b, 'model card', 'exec')
    assert 'features_only=True' in blocks[1] and '(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)' in blocks[1]
    assert 'num_classes=0' in blocks[2] and '(1, 768, 7, 7)' in blocks[2]


@pytest.mark.slow  # SMPConv-B's release checkpoint converted (~25 s on 2 cores); smpconv_t's runs by default
def test_smpconv_b_converts_to_the_golden_logits(folder_b, golden, golden_input):
    config = json.loads((folder_b.path / 'config.json').read_text())
    assert config['architecture'] == 'smpconv_b' and folder_b.weights == 'EMA' and folder_b.max_abs_diff == 0
    card = (folder_b.path / 'README.md').read_text()
    assert 'Params (M): 79.5' in card and 'GMACs: 18.22' in card and f'| smpconv_b.in1k | {VARIANTS["smpconv_b"].paper_top1} |' in card
    model = timm.create_model(
        'smpconv_b', pretrained=True, pretrained_cfg_overlay=dict(file=str(folder_b.path / 'model.safetensors')))
    ref = golden['smpconv_b_ema_logits_fp64']
    assert np.abs(logits(model, golden_input) - ref).max() < golden_tolerance(ref)


def test_publish_options_token_and_private_download(published, local_hub, tmp_path, monkeypatch):
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'c1', token=TOKEN)  # token from HF_TOKEN
    repo_id, branch, message = 'tester/smpconv_t.in1k', 'v1.0', 'SMPConv-T, authors\' EMA weights'
    start = len(local_hub.requests)
    assert publish_main(['publish', str(published), '--repo-id', repo_id, '--private', '--revision', branch,
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
    assert publish_main(['publish', str(published), '--dry-run', '--revision', 'v2', '--private']) == 0
    out = capsys.readouterr().out
    assert len(local_hub.requests) == before
    assert f'{local_hub.endpoint}/{T_REPO} (revision v2, private)' in out and 'nothing uploaded' in out
    for f in HUB_FILES:
        data = (published / f).read_bytes()
        assert re.search(rf'{re.escape(f)}\s+{len(data):,d} bytes\s+sha256 {hashlib.sha256(data).hexdigest()}', out)


def test_publish_without_a_token_is_refused(published, local_hub, tmp_path, monkeypatch, capsys):
    point_hf_at(monkeypatch, local_hub.endpoint, tmp_path / 'c')
    before = len(local_hub.requests)
    assert publish_main(['publish', str(published), '--repo-id', 'someone/x']) == 2
    err = capsys.readouterr().err
    assert 'hf auth login' in err and 'HF_TOKEN' in err and '--token' in err
    assert len(local_hub.requests) == before


def test_raw_weights_stay_out_of_the_default_repo(make_weights, golden_dir, tmp_path, capsys):
    assert publish_main(['publish', 'whatever.pth', '--raw', '--dry-run']) == 2
    assert 'need an explicit repo id (--repo-id)' in capsys.readouterr().err
    torch.save({'model': release_state_dict(make_weights, golden_dir, 't', 'model')}, tmp_path / 'raw_only.pth')
    assert publish_main(['publish', str(tmp_path / 'raw_only.pth'), '--dry-run']) == 2  # EMA asked for, none there
    captured = capsys.readouterr()
    assert 'raw weights' in captured.out and 'holds no EMA weights' in captured.err
    assert _nothing_written(tmp_path, 'raw_only.pth')


@pytest.mark.slow  # builds SMPConv-B's release checkpoint
def test_checkpoint_of_another_variant_is_refused_before_writing(release_checkpoint, tmp_path, capsys):
    out = tmp_path / 'out'
    assert publish_main(['convert', str(release_checkpoint('b')), '--model', 'smpconv_t', '-o', str(out)]) == 2
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

    def wrong_pool(model, config_path, *args, **kwargs):
        save_config(model, config_path, *args, **kwargs)
        config = json.loads(Path(config_path).read_text())
        config['model_args']['global_pool'] = 'max'
        Path(config_path).write_text(json.dumps(config))

    monkeypatch.setattr(timm_hub, 'save_config_for_hf', wrong_pool)
    with pytest.raises(ValueError, match='disagrees with the release checkpoint'):
        build_hub_folder(release_checkpoint('t'), tmp_path / 'out')
    assert _nothing_written(tmp_path)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    from publish import _move_into_place
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
