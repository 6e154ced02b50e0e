"""The models as backbones of segmentation_models_pytorch (every architecture, ``tu-smpconv_t`` / ``tu-smpconv_b``)
and of torchvision's Faster R-CNN (the lines of docs/dense-prediction.md, run as written)."""
import re
from pathlib import Path

import pytest
import timm
import torch

from smpconv_timm import config
from client_libs import client

pytestmark = pytest.mark.clients

DOC = Path(__file__).resolve().parents[1] / 'docs' / 'dense-prediction.md'
ARCHITECTURES = ['Unet', 'UnetPlusPlus', 'FPN', 'PSPNet', 'PAN', 'Linknet', 'MAnet', 'DeepLabV3', 'DeepLabV3Plus',
                 'UPerNet', 'Segformer']
#: the encoder's output stride each architecture asks for (smp's defaults)
STRIDES = {'DeepLabV3': 8, 'DeepLabV3Plus': 16, 'PAN': 16}


@pytest.mark.parametrize('encoder', ['tu-smpconv_t', 'tu-smpconv_b'])
@pytest.mark.parametrize('arch', ARCHITECTURES)
def test_every_smp_architecture_trains_and_evaluates(arch, encoder, release_checkpoint):
    smp = client('segmentation_models_pytorch')
    variant = encoder[-1]
    model = getattr(smp, arch)(encoder_name=encoder, encoder_weights='imagenet', classes=3,
                               pretrained_cfg_overlay=dict(file=str(release_checkpoint(variant))))
    stride = STRIDES.get(arch, 32)
    stages = len(model.encoder.model.feature_info.reduction())  # PSPNet uses the first two stages only
    reductions = [min(r, stride) for r in (4, 8, 16, 32)][:stages]
    assert model.encoder.model.feature_info.reduction() == reductions
    # the release weights reached the encoder: its stages' outputs are timm's features_only model's
    timm_features = timm.create_model(f'smpconv_{variant}', features_only=True, output_stride=stride, pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(release_checkpoint(variant)))).eval()
    size = 128 if arch == 'PAN' else 64  # PAN's pyramid pooling needs 128 x 128 with any encoder
    torch.manual_seed(0)
    x, target = torch.randn(2, 3, size, size), torch.randint(0, 3, (2, size, size))
    with torch.no_grad():
        model.eval()
        got = [f for f in model.encoder(x) if f.shape[1] > 3]  # less the input and smp's empty stride-2 map
        ref = timm_features(x)[:stages]
        assert len(got) == len(ref)
        for f, r in zip(got, ref):
            torch.testing.assert_close(f, r)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(x)
    assert out.shape == (2, 3, size, size)
    loss = torch.nn.functional.cross_entropy(out, target)
    loss.backward()
    smp_conv = getattr(model.encoder.model, f'stages_{stages - 1}').blocks[0].large_kernel.smp.conv
    assert smp_conv.dilation == 4 * 2 ** (stages - 1) // reductions[-1] and smp_conv.weight_coord.grad.abs().sum() > 0
    optimizer.step()

    model.eval()
    with torch.no_grad():
        fast = model(x)
        with config.set_inference_fast_path(False):
            plain = model(x)
    assert torch.isfinite(fast).all() and (fast - plain).abs().max() <= 1e-4 * plain.abs().max()


def _doc_blocks():
    return re.findall(r'```python\n(.*?)```', DOC.read_text(), re.S)


def test_faster_rcnn_over_the_documented_fpn_trains_a_step():
    client('torchvision')
    from torchvision.models.detection import FasterRCNN
    scope = {}
    block = next(b for b in _doc_blocks() if 'class TimmFPN' in b)
    exec(compile(block, str(DOC), 'exec'), scope)
    assert any('FasterRCNN(TimmFPN(' in b for b in _doc_blocks())
    torch.manual_seed(0)
    model = FasterRCNN(scope['TimmFPN']('smpconv_t'), num_classes=3, min_size=128, max_size=128).train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 112, 128)]
    targets = [dict(boxes=torch.tensor([[10., 20., 60., 90.]]), labels=torch.tensor([1])),
               dict(boxes=torch.tensor([[5., 5., 40., 50.], [50., 30., 120., 100.]]), labels=torch.tensor([2, 1]))]
    losses = model(images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    sum(losses.values()).backward()
    smp_conv = model.backbone.body.stages_0.blocks[0].large_kernel.smp.conv
    assert smp_conv.weight_coord.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and all(d['boxes'].shape[-1] == 4 for d in detections)
