"""transformers' TimmWrapper on our Hub folders: what ``hub/publish.py convert`` writes and what
``smpconv_timm.save_for_hf`` writes for a fine-tuned model load with ``AutoConfig``, ``AutoImageProcessor``,
``AutoModelForImageClassification`` and ``pipeline``, with timm's logits, and fine-tune (labels -> loss -> gradients
of the SMP points). Real images: the photographs scikit-learn ships.
"""
import json

import numpy as np
import pytest
import timm
import torch

import smpconv_timm
from client_libs import client
from hub_fixtures import *  # noqa: F401,F403  (the published folder)

pytestmark = pytest.mark.clients


@pytest.fixture(scope='module')
def transformers():
    return client('transformers')


@pytest.fixture(scope='module')
def photos():
    from PIL import Image
    from sklearn.datasets import load_sample_image
    return [Image.fromarray(load_sample_image(name)) for name in ('china.jpg', 'flower.jpg')]


def _timm_logits(folder, pixels):
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with torch.no_grad():
        return model(pixels)


def test_hub_folder_loads_with_timms_logits(transformers, published, photos):
    config = transformers.AutoConfig.from_pretrained(published)
    assert type(config).__name__ == 'TimmWrapperConfig' and config.architecture == 'smpconv_t'
    names = json.loads((published / 'config.json').read_text())['label_names']
    assert config.num_labels == 1000 and [config.id2label[i] for i in range(1000)] == names

    processor = transformers.AutoImageProcessor.from_pretrained(published)
    pixels = processor(photos, return_tensors='pt')['pixel_values']
    # the processor is timm's eval transform of the folder's pretrained_cfg
    cfg = timm.data.resolve_data_config({}, model=timm.create_model(f'local-dir:{published}'))
    expect = torch.stack([timm.data.create_transform(**cfg)(p) for p in photos])
    assert pixels.shape == (2, 3, 224, 224) and torch.allclose(pixels, expect, atol=1e-6)

    model = transformers.AutoModelForImageClassification.from_pretrained(published).eval()
    assert isinstance(model.timm_model, smpconv_timm.SMPConvNet)
    with torch.no_grad():
        got = model(pixel_values=pixels).logits
    ref = _timm_logits(published, pixels)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6 * ref.abs().max())

    # AutoModel: the backbone without a head (pooled features), as timm's num_classes=0
    backbone = transformers.AutoModel.from_pretrained(published).eval()
    with torch.no_grad():
        pooled = backbone(pixel_values=pixels).pooler_output
    embed = timm.create_model(f'local-dir:{published}', pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        assert torch.allclose(pooled, embed(pixels), atol=1e-5)


def test_pipeline_names_the_imagenet_classes(transformers, published, photos):
    classifier = transformers.pipeline('image-classification', model=str(published), top_k=3)
    processor = transformers.AutoImageProcessor.from_pretrained(published)
    ref = _timm_logits(published, processor(photos, return_tensors='pt')['pixel_values'])
    names = json.loads((published / 'config.json').read_text())['label_names']
    for photo, row in zip(photos, ref):
        out = classifier(photo)
        top = row.softmax(-1).topk(3)
        assert [o['label'] for o in out] == [names[i] for i in top.indices.tolist()]
        assert np.allclose([o['score'] for o in out], top.values.numpy(), atol=1e-5)


def test_fine_tuning_a_new_head_through_transformers(transformers, published, photos):
    model = transformers.AutoModelForImageClassification.from_pretrained(
        published, num_labels=10, ignore_mismatched_sizes=True).train()
    assert model.timm_model.get_classifier().out_features == 10
    pretrained = timm.create_model(f'local-dir:{published}', pretrained=True)
    assert torch.equal(model.timm_model.stages[0].blocks[0].large_kernel.smp.conv.weight_coord,
                       pretrained.stages[0].blocks[0].large_kernel.smp.conv.weight_coord)
    pixels = transformers.AutoImageProcessor.from_pretrained(published)(photos, return_tensors='pt')['pixel_values']
    labels = torch.tensor([3, 7])
    out = model(pixel_values=pixels, labels=labels)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    out.loss.backward()
    smp = model.timm_model.smp_layers()[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (smp.weight_coord, smp.radius, smp.weights))


def test_save_for_hf_of_a_fine_tuned_model_loads_in_both(transformers, published, photos, tmp_path):
    tuned = timm.create_model(f'local-dir:{published}', pretrained=True, num_classes=10).eval()
    folder = tmp_path / 'tuned'
    smpconv_timm.save_for_hf(tuned, folder, safe_serialization=True)
    config = json.loads((folder / 'config.json').read_text())
    assert config['num_classes'] == 10 and 'num_classes' not in config.get('model_args', {})

    pixels = transformers.AutoImageProcessor.from_pretrained(folder)(photos, return_tensors='pt')['pixel_values']
    with torch.no_grad():
        expect = tuned(pixels)
        got = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()(pixel_values=pixels).logits
        again = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()(pixels)
    assert got.shape == (2, 10) and torch.allclose(got, expect, atol=1e-6) and torch.equal(again, expect)
