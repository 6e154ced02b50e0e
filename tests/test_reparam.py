"""Deploy form: timm's reparameterize_model, exactness (golden weights, every context), checkpoints and export."""
import copy
import itertools
import warnings

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d
from timm.utils import reparameterize_model

from smpconv_timm import clamp_radii_
from smpconv_timm.smpconv import SmpClassifierHead

from test_fastpath import randomise_bn

TINY = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), kernel_sizes=(9, 7, 7, 5))
DEPLOY_LEAVES = (nn.Conv2d, nn.Linear, nn.ReLU, nn.GELU, nn.Identity, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout)
CONTEXTS = {
    'no_grad': torch.no_grad,
    'grad': torch.enable_grad,
    'inference_mode': torch.inference_mode,
    'autocast_bf16': lambda: torch.autocast('cpu', torch.bfloat16),
    'autocast_fp16': lambda: torch.autocast('cpu', torch.float16),
}


def golden_model(release_checkpoint, variant, **kwargs):
    return timm.create_model(f'smpconv_{variant}', pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(release_checkpoint(variant))), **kwargs).eval()


def max_err(a, b):
    return (a - b).abs().max().item(), 1e-5 * max(1., a.abs().max().item())


def test_timm_reparameterize_model_leaves_only_convs(release_checkpoint):
    model = golden_model(release_checkpoint, 't')
    deploy = reparameterize_model(model)
    assert deploy is not model and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    leaves = [m for m in deploy.modules() if not list(m.children())]
    assert all(isinstance(m, DEPLOY_LEAVES) for m in leaves), {type(m).__name__ for m in leaves}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    for stage, k in zip(deploy.stages, (31, 29, 27, 13)):
        for block in stage.blocks[::2]:
            conv = block.large_kernel
            assert isinstance(conv, nn.Conv2d) and set(conv.state_dict()) == {'weight', 'bias'}
            assert conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size == (k, k)
    assert isinstance(deploy.head.norm, nn.Identity) and isinstance(deploy.head.global_pool, SelectAdaptivePool2d)
    assert deploy.is_deploy and not model.is_deploy


# smpconv_b in the slow step: the same code at other widths and depths
T_AND_B = ['t', pytest.param('b', marks=pytest.mark.slow)]


@pytest.mark.parametrize('variant', T_AND_B)
@pytest.mark.parametrize('size', [224, 160, 288])
def test_exact_in_float32(release_checkpoint, variant, size):
    model = golden_model(release_checkpoint, variant)
    deploy = reparameterize_model(model)
    x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        err, bound = max_err(model(x), deploy(x))
    assert err < bound


@pytest.mark.parametrize('variant', T_AND_B)
def test_exact_in_float64(release_checkpoint, variant):
    model = golden_model(release_checkpoint, variant).double()
    deploy = reparameterize_model(model)  # folded in float64
    x = torch.randn(1, 3, 160, 160, dtype=torch.float64)
    with torch.no_grad():
        err, bound = max_err(model(x), deploy(x))
    assert err < 1e-4 * bound  # float64: exact up to rounding, far inside the float32 bound


def test_exact_for_features_only(release_checkpoint):
    model = golden_model(release_checkpoint, 't', features_only=True)
    deploy = reparameterize_model(model)
    x = torch.randn(1, 3, 192, 160).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for a, b in zip(model(x), deploy(x)):
            err, bound = max_err(a, b)
            assert err < bound


@pytest.mark.slow  # the tiny-model test below checks every context in the default run
def test_golden_deploy_folded_under_autocast_is_exact_in_float32(release_checkpoint):
    model = golden_model(release_checkpoint, 't')
    with torch.autocast('cpu', torch.bfloat16):
        deploy = reparameterize_model(model)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        err, bound = max_err(model(x), deploy(x))
    assert err < bound


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_head_fold_is_rounded_once(dtype):
    torch.manual_seed(0)
    head = randomise_bn(SmpClassifierHead(64, 10)).eval().to(dtype)
    exact = copy.deepcopy(head).double()  # the same low-precision values, folded in float64
    exact.reparameterize()
    head.reparameterize()
    assert torch.equal(head.fc.weight, exact.fc.weight.to(dtype))
    assert torch.equal(head.fc.bias, exact.fc.bias.to(dtype))


def deploy_forms(model, checkpoint):
    """The deploy model made each way a user makes it: timm's reparameterize_model, .reparameterize(), deploy=True
    (a train-form checkpoint folded on load)."""
    inplace = copy.deepcopy(model)
    inplace.reparameterize()
    created = timm.create_model('smpconv_t', deploy=True, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(checkpoint)), **TINY)
    return {'reparameterize_model': reparameterize_model(model), '.reparameterize()': inplace, 'deploy=True': created}


@pytest.mark.parametrize('made_in', list(CONTEXTS) + ['train_mode'])
def test_the_same_deploy_model_whatever_context_it_is_made_in(made_in, tmp_path):
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('smpconv_t', **TINY)).eval()
    torch.save(model.state_dict(), tmp_path / 'train_form.pth')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)  # the train form, float32
    expected = reparameterize_model(model)  # made outside any context
    if made_in == 'train_mode':  # as validate.py does it (trained BatchNorm statistics: no warning)
        model.train()
    with CONTEXTS.get(made_in, torch.enable_grad)(), warnings.catch_warnings():
        warnings.simplefilter('error')
        forms = deploy_forms(model, tmp_path / 'train_form.pth')
    expected_state = expected.state_dict()
    for how, deploy in forms.items():
        tensors = dict(itertools.chain(deploy.named_parameters(), deploy.named_buffers()))
        assert not [n for n, t in tensors.items() if t.is_inference()], how
        assert all(torch.equal(v, expected_state[k]) for k, v in deploy.state_dict().items()), how
        for run_in, context in CONTEXTS.items():  # and it runs in every context
            with context():
                out = deploy(x)
            if out.dtype == torch.float32:
                err, bound = max_err(out, ref)
                assert err < bound, (how, run_in)
            else:
                with context():
                    torch.testing.assert_close(out, expected(x), rtol=0, atol=0, msg=(how, run_in))
        deploy(x).sum().backward()  # autograd through the deploy weights (fine-tuning a deploy model)
        assert all(p.grad is not None for p in deploy.parameters()), how


def test_train_mode_warns_only_where_batchnorm_never_saw_data():
    torch.manual_seed(0)
    model = timm.create_model('smpconv_t', drop_path_rate=0.2, **TINY)  # train mode, as validate.py leaves it
    model.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
    model.train()
    with pytest.warns(UserWarning, match='training mode whose BatchNorm layers never saw data'):
        deploy = reparameterize_model(model)
    assert deploy.training  # timm's walker never sees the root; what depends on the mode is switched
    assert not any(m.training for m in deploy.modules() if isinstance(m, (nn.Dropout, nn.BatchNorm2d)))
    assert not any(type(m).__name__ == 'DropPath' for m in deploy.modules())
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), ref, rtol=1e-5, atol=1e-5)
    state = {k: v.clone() for k, v in deploy.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        again = reparameterize_model(deploy, inplace=True)
        again.reparameterize()
    assert again is deploy and state.keys() == deploy.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in deploy.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(deploy.eval()(x), ref, rtol=1e-5, atol=1e-5)
    model(x)  # one training batch: every BatchNorm has seen data, the train-mode model folds silently
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        reparameterize_model(model)


def test_deploy_form_refuses_training_only_operations():
    deploy = reparameterize_model(timm.create_model('smpconv_t', **TINY).eval())
    with pytest.raises(RuntimeError, match='deploy form'):
        deploy.smp_layers()
    with pytest.raises(RuntimeError, match='no SMPConv2d layer and so no radii'):
        clamp_radii_(deploy)
    with pytest.raises(AttributeError, match="'radius' does not exist in deploy form"):
        deploy.stages[0].blocks[0].large_kernel.radius
    with pytest.raises(AttributeError, match="'smp' does not exist in deploy form"):
        deploy.stages[0].blocks[0].large_kernel.smp
    assert deploy.no_weight_decay() == set()


def test_deploy_checkpoints_save_and_load(release_checkpoint, make_weights, golden_dir, tmp_path):
    model = golden_model(release_checkpoint, 't')
    deploy = reparameterize_model(model)
    path = tmp_path / 'deploy.pth'
    torch.save(deploy.state_dict(), path)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        ref = deploy(x)
        for source in (path, release_checkpoint('t')):  # a deploy checkpoint, or a release one folded on load
            again = timm.create_model('smpconv_t', deploy=True, pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(source))).eval()
            assert again.is_deploy
            err, bound = max_err(ref, again(x))
            assert err < bound, source
    with pytest.raises(ValueError, match='checkpoint is in deploy form .* create the model with deploy=True'):
        timm.create_model('smpconv_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_export_paths():
    torch.manual_seed(0)
    deploy = timm.create_model('smpconv_t', deploy=True, **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = deploy(x)
        traced = torch.jit.trace(deploy, torch.randn(1, 3, 16, 16))  # traced small, valid at every size
        torch.testing.assert_close(traced(x), ref)
        exported = torch.export.export(deploy, (x,))
        torch.testing.assert_close(exported.module()(x), ref)


def test_onnx_export(tmp_path):
    pytest.importorskip('onnx')
    pytest.importorskip('onnxscript')
    torch.manual_seed(0)
    deploy = timm.create_model('smpconv_t', deploy=True, **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / 'smpconv.onnx'
    torch.onnx.export(deploy, (x,), str(path), dynamo=True)
    import onnx
    from onnx.reference import ReferenceEvaluator
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    out = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), deploy(x), rtol=1e-4, atol=1e-4)


def test_continuous_kernel_at_another_deploy_size(release_checkpoint):
    model = golden_model(release_checkpoint, 't')
    default = copy.deepcopy(model)
    default.reparameterize()
    wide = copy.deepcopy(model)
    wide.reparameterize(kernel_sizes=(51, 29, 27, 13))
    w31, w51 = default.stages[0].blocks[0].large_kernel.weight, wide.stages[0].blocks[0].large_kernel.weight
    assert w31.shape[-1] == 31 and w51.shape[-1] == 51
    # the same continuous function: linspace(-1, 1, 31)[::3] == linspace(-1, 1, 51)[::5], an 11 x 11 grid
    # (the 5x5 branch sits on the shared centre tap in both)
    torch.testing.assert_close(w31[:, 0, ::3, ::3], w51[:, 0, ::5, ::5], rtol=0, atol=1e-5)
    assert w51[:, 0, ::5, ::5].abs().max() > 0.05 and not torch.allclose(w51[:, 0, 1::5, 1::5], torch.zeros(()))
    # the other stages keep their trained sizes and results
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        out = wide(x)
        assert out.shape == (1, 1000)
        torch.testing.assert_close(wide.stages[1].blocks[0].large_kernel.weight,
                                   default.stages[1].blocks[0].large_kernel.weight)
    created = timm.create_model('smpconv_t', deploy=True, deploy_kernel_sizes=(51, 29, 27, 13), pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(release_checkpoint('t')))).eval()
    torch.testing.assert_close(created.stages[0].blocks[0].large_kernel.weight, w51)
