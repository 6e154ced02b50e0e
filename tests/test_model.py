"""SMPConv-T / -B as timm models: the authors' release reproduced, and timm's model API."""
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

from smpconv_timm import VARIANTS, SMPConv2d, checkpoint_filter_fn, config
from smpconv_timm.flops import resolve_model_name
from smpconv_timm.kernels import FusedConv

from golden_fixtures import golden_tolerance, release_state_dict

TINY = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), kernel_sizes=(9, 7, 7, 5))


def load_release(path, variant, **kwargs):
    """The path a user takes with a downloaded release file."""
    return timm.create_model(
        f'smpconv_{variant}', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


@pytest.mark.parametrize('variant', ['t', pytest.param('b', marks=pytest.mark.slow)])  # b: its release file, ~15 s
@pytest.mark.parametrize('ema', [True, False])
def test_golden_logits_through_the_user_path(release_checkpoint, golden, golden_input, variant, ema):
    model = load_release(release_checkpoint(variant), variant, **({} if ema else dict(pretrained_ema=False)))
    ref = golden[f'smpconv_{variant}_{"ema" if ema else "model"}_logits_fp64']
    with torch.no_grad():
        out = model(golden_input).double().numpy()
    assert np.abs(out - ref).max() < golden_tolerance(ref)
    other = golden[f'smpconv_{variant}_{"model" if ema else "ema"}_logits_fp64']
    assert np.abs(out - other).max() > 100 * golden_tolerance(ref)  # really the requested weight set


@pytest.mark.parametrize('algo', config.DWCONV_ALGORITHMS['forward'])
def test_golden_logits_with_each_large_kernel_algorithm_forced(release_checkpoint, golden, golden_input, algo):
    """Each forward candidate of the large depthwise conv, in the fused eval path and through the plain modules."""
    model = load_release(release_checkpoint('t'), 't')
    ref = golden['smpconv_t_ema_logits_fp64']
    x = golden_input.contiguous(memory_format=torch.channels_last)
    for fast_path in (True, False):
        with config.set_dwconv_algorithms(forward=algo), config.set_inference_fast_path(fast_path), torch.no_grad():
            out = model(x).double().numpy()
        assert np.abs(out - ref).max() < golden_tolerance(ref), fast_path
    plans = [p for m in model.modules() for f in _fused(m) if f.large_kernel for p in f._packed.values()]
    assert plans and all(p.algo.partition(':')[0] == algo for p in plans)  # the fused path ran the forced algorithm


def _fused(module):
    plan = module.__dict__.get('_fast_plan')
    return [] if plan is None else [f for f in (plan[1] if isinstance(plan[1], tuple) else (plan[1],))
                                    if isinstance(f, FusedConv)]


@pytest.mark.slow  # float64 convs at 224: ~1 min on 2 cores
def test_golden_logits_float64_channels_last(release_checkpoint, golden, golden_input):
    model = load_release(release_checkpoint('t'), 't').double()
    x = golden_input.double().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x).numpy()
    # fp64 differs from the release only by its checkpoint's kernel_coord grid (built with numpy,
    # 1e-7 off torch.linspace); far inside the bound, and far below what any real difference gives
    assert np.abs(out - golden['smpconv_t_ema_logits_fp64']).max() < 1e-5


@pytest.mark.parametrize('variant,params', [('t', 26_705_248), ('b', 79_546_520)])
def test_param_counts_match_the_release(golden_dir, variant, params):
    import json
    manifest = json.loads((golden_dir / f'reference_smpconv_{variant}_manifest.json').read_text())
    model = timm.create_model(f'smpconv_{variant}')
    assert sum(p.numel() for p in model.parameters()) == params == manifest['num_params']


def test_every_release_layout_loads_the_same_weights(make_weights, golden_dir):
    model = timm.create_model('smpconv_t', **VARIANTS['smpconv_t'].arch_args)
    ema = release_state_dict(make_weights, golden_dir, 't', '')
    raw = release_state_dict(make_weights, golden_dir, 't', 'model')
    expect_ema = checkpoint_filter_fn(ema, model)
    expect_raw = checkpoint_filter_fn(raw, model)
    assert expect_ema.keys() == model.state_dict().keys()
    ddp = {f'module.{k}': v for k, v in ema.items()}
    layouts = {
        'raw': (ema, expect_ema),
        'ddp': (ddp, expect_ema),
        'model/model_ema': ({'model': raw, 'model_ema': ema, 'epoch': 3}, expect_ema),
        'state_dict/state_dict_ema': ({'state_dict': raw, 'state_dict_ema': ddp}, expect_ema),
        'model only': ({'model': raw, 'optimizer': {}}, expect_raw),
    }
    for name, (ckpt, expect) in layouts.items():
        got = checkpoint_filter_fn(ckpt, model)
        assert got.keys() == expect.keys(), name
        assert all(torch.equal(got[k], expect[k]) for k in got), name
    got = checkpoint_filter_fn({'model': raw, 'model_ema': ema}, model, use_ema=False)
    assert all(torch.equal(got[k], expect_raw[k]) for k in got)
    with pytest.raises(ValueError, match='only EMA weights'):
        checkpoint_filter_fn({'model_ema': ema}, model, use_ema=False)


def test_timm_checkpoint_saver_layout_loads_through_create_model(release_checkpoint, tmp_path, golden, golden_input):
    release = torch.load(release_checkpoint('t'), weights_only=True)
    path = tmp_path / 'timm_saver.pth.tar'
    torch.save({'state_dict': {f'module.{k}': v for k, v in release['model'].items()},
                'state_dict_ema': release['model_ema'], 'epoch': 10}, path)
    with torch.no_grad():
        out = load_release(path, 't')(golden_input).numpy()
    ref = golden['smpconv_t_ema_logits_fp64']
    assert np.abs(out - ref).max() < golden_tolerance(ref)


# ---------------------------------------------------------------------------------------------------------
# bad checkpoints: refused with the problem named, before anything is loaded

@pytest.fixture(scope='module')
def t_release(make_weights, golden_dir):
    return release_state_dict(make_weights, golden_dir, 't', '')


@pytest.fixture(scope='module')
def t_model():
    return timm.create_model('smpconv_t')


def test_missing_and_extra_keys_are_named(t_release, t_model):
    sd = dict(t_release)
    del sd['stages.1.blocks.2.large_kernel.smp.conv.radius']
    sd['stages.0.blocks.0.bogus.weight'] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        checkpoint_filter_fn(sd, t_model)
    assert 'missing keys: stages.1.blocks.2.large_kernel.smp.conv.radius' in str(e.value)
    assert 'unexpected keys: stages.0.blocks.0.bogus.weight' in str(e.value)


def test_wrong_shapes_are_named(t_release, t_model):
    sd = dict(t_release)
    sd['stages.2.blocks.4.pw1.conv.weight'] = torch.zeros(384, 384, 3, 3)
    with pytest.raises(ValueError, match=re.escape(
            'stages.2.blocks.4.pw1.conv.weight: checkpoint (384, 384, 3, 3) vs model (384, 384, 1, 1)')):
        checkpoint_filter_fn(sd, t_model)


def test_wrong_kernel_grid_is_named(t_release, t_model):
    sd = dict(t_release)
    sd['stages.0.blocks.2.large_kernel.smp.conv.kernel_coord'] = torch.zeros(1, 2, 27, 27)
    with pytest.raises(ValueError, match=r'stages\.0\.blocks\.2\.large_kernel\.smp\.conv\.kernel_coord: .*\(27, 27\)'):
        checkpoint_filter_fn(sd, t_model)


def test_t_checkpoint_into_b_says_so(release_checkpoint):
    with pytest.raises(ValueError, match=r'depths \(2, 2, 8, 2\), dims \(96, 192, 384, 768\) \(smpconv_t\); '
                                         r'the model smpconv_b has depths \(2, 2, 20, 2\)'):
        load_release(release_checkpoint('t'), 'b')


def test_non_finite_values_are_refused(t_release, t_model):
    sd = dict(t_release)
    sd['stages.3.blocks.1.pw2.bn.running_var'] = sd['stages.3.blocks.1.pw2.bn.running_var'].clone()
    sd['stages.3.blocks.1.pw2.bn.running_var'][3] = float('nan')
    sd['head.weight'] = torch.full_like(sd['head.weight'], float('inf'))
    with pytest.raises(ValueError, match=r'non-finite .*stages\.3\.blocks\.1\.pw2\.bn\.running_var, head\.fc\.weight'):
        checkpoint_filter_fn(sd, t_model)


def test_nothing_is_half_loaded(t_release):
    model = timm.create_model('smpconv_t')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(t_release)
    sd['stages.3.blocks.1.pw2.conv.weight'] = torch.zeros(1)
    with pytest.raises(ValueError):
        model.load_state_dict(checkpoint_filter_fn(sd, model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_truncated_and_missing_files(release_checkpoint, tmp_path):
    data = release_checkpoint('t').read_bytes()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r'cannot read checkpoint .*cut\.pth: the file is truncated, corrupt'):
        load_release(cut, 't')
    with pytest.raises(FileNotFoundError, match=r'checkpoint file not found: .*nope\.pth'):
        load_release(tmp_path / 'nope.pth', 't')


def test_pickled_code_is_never_executed_and_named_as_such(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))
    path = tmp_path / 'evil.pth'
    torch.save({'model': Evil()}, path)
    with pytest.raises(ValueError, match=r'cannot read checkpoint .*evil\.pth: the file holds pickled objects that '
                                         r'weights-only loading refuses \(it may run code\): exec\.') as info:
        load_release(path, 't')
    assert 'truncated' not in str(info.value)
    path.write_bytes(bytes(range(256)) * 8)  # not a pickle at all: damaged, not refused
    with pytest.raises(ValueError, match=r'evil\.pth: the file is truncated, corrupt or not a PyTorch'):
        load_release(path, 't')


def test_wrong_input_channels_is_a_clear_error():
    model = timm.create_model('smpconv_t', **TINY)
    with pytest.raises(ValueError, match=r'built for 3-channel images .*shape \(1, 4, 32, 32\)'):
        model(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize('dtype', [torch.uint8, torch.int64, torch.bool, torch.complex64])
def test_non_float_input_is_a_type_error_naming_the_dtype(dtype):
    x = torch.zeros(1, 3, 32, 32, dtype=dtype)
    model = timm.create_model('smpconv_t', **TINY)
    for mode in (model.train, model.eval):
        mode()
        with pytest.raises(TypeError, match=f'floating-point images, got dtype {dtype}'):
            model(x)
    with pytest.raises(TypeError, match=f'floating-point input, got dtype {dtype}'):
        SMPConv2d(3, 5)(x)


def test_unknown_model_names_list_the_smpconv_models():
    with pytest.raises(ValueError, match=r"unknown model 'smpconv_s'; smpconv models: smpconv_b, smpconv_t"):
        resolve_model_name('smpconv_s')
    assert resolve_model_name('smpconv_t.in1k') == 'smpconv_t.in1k'


# ---------------------------------------------------------------------------------------------------------
# timm API

def test_pretrained_cfg():
    cfg = timm.get_pretrained_cfg('smpconv_t.in1k').to_dict()
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg['license'] == 'mit' and cfg['paper_ids'] == 'arXiv:2304.02330'
    assert cfg['hf_hub_id'].endswith('/smpconv_t.in1k')
    model = timm.create_model('smpconv_b')
    assert isinstance(model.get_submodule(cfg['first_conv']), nn.Conv2d)
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()
    assert timm.list_models('smpconv*') == ['smpconv_b', 'smpconv_t']
    assert timm.list_pretrained('smpconv*') == ['smpconv_b.in1k', 'smpconv_t.in1k']


@pytest.mark.parametrize('in_chans', [1, 4])
def test_pretrained_into_other_stems_and_heads(release_checkpoint, t_release, in_chans):
    model = load_release(release_checkpoint('t'), 't', in_chans=in_chans, num_classes=10)
    assert model(torch.randn(1, in_chans, 64, 64)).shape == (1, 10)
    stem = model.stem[0].conv.weight
    src = t_release['stem.0.conv.weight']
    assert stem.shape == (96, in_chans, 3, 3)
    if in_chans == 1:  # timm's adapt_input_conv sums the RGB filters
        torch.testing.assert_close(stem[:, 0], src.sum(1))
    else:  # and tiles them (scaled) for more channels
        torch.testing.assert_close(stem[:, 3], src[:, 0] * 3 / 4)
    torch.testing.assert_close(model.stages[2].blocks[4].large_kernel.smp.conv.radius,
                               t_release['stages.2.blocks.4.large_kernel.smp.conv.radius'])


def test_num_classes_zero_and_pre_logits(release_checkpoint):
    model = load_release(release_checkpoint('t'), 't', num_classes=0)
    full = load_release(release_checkpoint('t'), 't')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        emb = model(x)
        assert emb.shape == (2, 768)
        torch.testing.assert_close(emb, full.forward_head(full.forward_features(x), pre_logits=True))
    assert isinstance(model.get_classifier(), nn.Identity)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5


def test_features_only_and_forward_intermediates(release_checkpoint):
    feats = timm.create_model('smpconv_t', pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(file=str(release_checkpoint('t')))).eval()
    model = load_release(release_checkpoint('t'), 't')
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    assert feats.feature_info.channels() == [96, 192, 384, 768]
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        outs = feats(x)
        final, inter = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True, stop_early=True)
    assert [o.shape[-2:] for o in outs] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    for a, b in zip(outs, inter):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(only[0], outs[1])
    torch.testing.assert_close(final, model.forward_features(x))
    two = timm.create_model('smpconv_t', features_only=True, out_indices=(0, 2), **TINY)
    assert [o.shape[1] for o in two(x)] == [16, 32]


def test_prune_intermediate_layers():
    model = timm.create_model('smpconv_t', **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 1])
        got = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert kept == [0, 1] and len(model.stages) == 2 and model.num_features == 24
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)


def test_architecture_and_regularisation_kwargs():
    model = timm.create_model('smpconv_b', drop_path_rate=0.3, drop_rate=0.2, global_pool='max', **TINY)
    assert [len(s.blocks) for s in model.stages] == [2, 2, 4, 2]
    assert [s.blocks[0].large_kernel.smp.conv.kernel_size for s in model.stages] == [9, 7, 7, 5]
    assert [s.blocks[0].large_kernel.smp.conv.n_points for s in model.stages] == [20, 12, 12, 6]
    rates = [_drop_rate(b) for s in model.stages for b in s.blocks]
    assert rates[0] == rates[1] == 0. and rates[-1] == rates[-2] == pytest.approx(0.3)
    assert rates[2] == rates[3] == pytest.approx(0.3 / 4)  # one rate per unit, shared by its two blocks
    assert model.head.global_pool.pool_type == 'max' and model.head.drop.p == 0.2
    # timm convention: no stochastic depth unless asked for (train_configs/ set the release's 0.1 / 0.5)
    assert _drop_rate(timm.create_model('smpconv_t').stages[3].blocks[-1]) == 0.
    assert _drop_rate(timm.create_model('smpconv_t', drop_path_rate=0.1).stages[3].blocks[-1]) == pytest.approx(0.1)


def _drop_rate(block):
    return getattr(block.drop_path, 'drop_prob', 0.)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('smpconv_t', **TINY)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)
        model(x).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_layer_decay_groups_and_no_weight_decay():
    model = timm.create_model('smpconv_t', **TINY)
    nwd = model.no_weight_decay()
    assert nwd == {n for n, _ in model.named_parameters() if n.endswith(('weight_coord', 'radius'))} and len(nwd) == 10
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    scales = {}
    for g in opt.param_groups:
        for p in g['params']:
            scales[p] = (g['lr_scale'], g['weight_decay'])
    named = dict(model.named_parameters())
    stem, first, last, fc = (scales[named[n]][0] for n in (
        'stem.0.conv.weight', 'stages.0.blocks.0.pw1.conv.weight', 'stages.3.blocks.1.pw2.conv.weight', 'head.fc.weight'))
    assert stem < first < last < fc == 1.
    assert scales[named['stages.1.blocks.0.large_kernel.smp.conv.weight_coord']][1] == 0.
    assert scales[named['stages.1.blocks.0.large_kernel.smp.conv.weights']][1] == 0.05


def test_fx_trace_and_torch_compile():
    model = timm.create_model('smpconv_t', **TINY).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), ref)
        small = torch.randn(1, 3, 20, 20)  # another size: shape-dependent dispatch is decided at run time
        torch.testing.assert_close(traced(small), model(small))
        fe = timm.models.create_feature_extractor(model, return_nodes=['stages.1', 'stages.3'])
        assert fe(x)['stages.3'].shape == (1, 40, 2, 2)
        compiled = torch.compile(model, backend='aot_eager')
        torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-5)
