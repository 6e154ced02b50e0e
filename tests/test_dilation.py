"""output_stride 8 / 16: dilated later stages, as timm's ConvNeXt has them, for dense prediction."""
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.utils import reparameterize_model

from smpconv_timm import SMPConv2d, config

from golden_fixtures import release_state_dict


def test_dilated_smp_conv_is_the_conv_of_each_polyphase_grid():
    """An independent statement of dilation: with rate 2, each of the four interleaved sub-grids of the map is
    convolved on its own by the undilated kernel (what lets a dilated stage stand in for a downsampled one)."""
    torch.manual_seed(0)
    dense = SMPConv2d(6, 7, bias=True)
    dilated = SMPConv2d(6, 7, bias=True, dilation=2)
    dilated.load_state_dict(dense.state_dict())
    assert dilated.padding == 6
    x = torch.randn(2, 6, 18, 14, dtype=torch.float64)
    dense, dilated = dense.double(), dilated.double()
    for mode in ('train', 'eval'):
        getattr(dense, mode)(), getattr(dilated, mode)()
        out = dilated(x)
        expect = torch.empty_like(out)
        for i in range(2):
            for j in range(2):
                expect[..., i::2, j::2] = dense(x[..., i::2, j::2])
        torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('output_stride, reductions, dilations', [
    (32, [4, 8, 16, 32], [1, 1, 1, 1]),
    (16, [4, 8, 16, 16], [1, 1, 1, 2]),
    (8, [4, 8, 8, 8], [1, 1, 2, 4]),
])
def test_output_stride_keeps_the_weights_and_reports_the_reductions(
        release_checkpoint, output_stride, reductions, dilations):
    path = str(release_checkpoint('t'))
    model = timm.create_model('smpconv_t', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              output_stride=output_stride).eval()
    assert [f['reduction'] for f in model.feature_info] == reductions
    assert [s.blocks[0].dilation for s in model.stages] == dilations
    assert [s.blocks[0].large_kernel.smp.conv.dilation for s in model.stages] == dilations
    # the same tensors as the release (dilation is no parameter)
    ref = timm.create_model('smpconv_t', pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))

    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        ref_feats = ref.forward_intermediates(x, intermediates_only=True)
        assert [f.shape[-1] for f in feats] == [96 // r for r in reductions]
        for f, r, red, ref_red in zip(feats, ref_feats, reductions, [4, 8, 16, 32]):
            if red == ref_red:  # the stages before the first dilated one are the same
                torch.testing.assert_close(f, r)
        # eval fast path, plain modules, deploy form: the same function
        out = model(x)
        with config.set_inference_fast_path(False):
            plain = model(x)
        deploy = reparameterize_model(model)
        folded = deploy(x)
    bound = 1e-5 * out.abs().max()
    assert (out - plain).abs().max() <= bound and (out - folded).abs().max() <= bound
    large = [m for m in deploy.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 5]
    assert sorted({m.dilation[0] for m in large}) == sorted(set(dilations))

    features = timm.create_model('smpconv_t', features_only=True, output_stride=output_stride,
                                 pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert features.feature_info.reduction() == reductions
    assert [f.shape[-1] for f in features(x)] == [96 // r for r in reductions]


def test_deploy_form_and_training_step_at_output_stride_8(release_checkpoint):
    path = str(release_checkpoint('t'))
    kw = dict(pretrained=True, pretrained_cfg_overlay=dict(file=path), output_stride=8)
    deploy = timm.create_model('smpconv_t', deploy=True, **kw).eval()
    train_form = timm.create_model('smpconv_t', **kw).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = deploy(x), train_form(x)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()

    model = timm.create_model('smpconv_t', num_classes=5, output_stride=8).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 4]))
    loss.backward()
    smp = model.stages[3].blocks[0].large_kernel.smp.conv
    assert smp.dilation == 4 and all(p.grad.abs().sum() > 0 for p in (smp.weight_coord, smp.radius, smp.weights))


@pytest.mark.parametrize('output_stride', [4, 12, 64, '16'])
def test_other_output_strides_are_refused(output_stride):
    with pytest.raises(ValueError, match=r'output_stride must be 8, 16 or 32'):
        timm.create_model('smpconv_t', output_stride=output_stride)
