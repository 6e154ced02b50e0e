"""``smpconv_timm.viz`` and the ``show`` / ``erf`` commands: SMP points in kernel pixels, effective receptive fields."""
import importlib.util
import re
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from smpconv_timm import SMPConv2d
from smpconv_timm.cli import main
from smpconv_timm.viz import erf, erf_map, load_model, mass_fractions, show, smp_points

Image = pytest.importorskip('PIL.Image')
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec('matplotlib') is None, reason='matplotlib not installed')

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), kernel_sizes=(7, 7, 5, 3), num_classes=10)


def tiny_model(seed: int) -> nn.Module:
    """A tiny smpconv_t whose points sit at seeded, non-default places with non-default radii and weights."""
    torch.manual_seed(seed)
    model = timm.create_model('smpconv_t', **TINY).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SMPConv2d):
                m.weight_coord.copy_(torch.rand(m.weight_coord.shape, generator=g) * 1.8 - 0.9)
                m.radius.copy_(torch.rand(m.radius.shape, generator=g) * 0.7 + 0.2)
                m.weights.copy_(torch.randn(m.weights.shape, generator=g))
    return model


def to_release_layout(state_dict, model):
    """timm key names -> the authors' (transitions, prelkb_bn / preffn_bn, norm, head, kernel_coord buffers)."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r'^stages\.(\d+)\.downsample\.', lambda m: f'transitions.{int(m.group(1)) - 1}.', k)
        m = re.match(r'^(stages\.\d+\.blocks\.(\d+))\.norm\.(.*)$', k)
        if m:
            k = f'{m.group(1)}.{"prelkb_bn" if int(m.group(2)) % 2 == 0 else "preffn_bn"}.{m.group(3)}'
        k = re.sub(r'^head\.norm\.', 'norm.', k)
        k = re.sub(r'^head\.fc\.', 'head.', k)
        out[k] = v
    for name, m in model.named_modules():
        if isinstance(m, SMPConv2d):
            u = torch.linspace(-1., 1., m.kernel_size)
            out[f'{name}.kernel_coord'] = torch.stack(torch.meshgrid(u, u, indexing='ij'))[None]
    return out


def expected_points(state_dict, name, k):
    """Kernel-pixel positions / radii from the checkpoint's tensors: x right, y up, [-1, 1] over k - 1 pixels."""
    coord = state_dict[f'{name}.weight_coord'][0].double()
    s = (k - 1) / 2
    return (coord[:, 0] + 1) * s, (1 - coord[:, 1]) * s, state_dict[f'{name}.radius'].reshape(-1).double() * s


def check_png(path, min_w=300, min_h=200):
    with Image.open(path) as im:
        assert im.format == 'PNG'
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert min_w <= w <= 6000 and min_h <= h <= 6000
        return w, h


@pytest.fixture(scope='module')
def tiny_checkpoints(tmp_path_factory):
    """Release-layout and train.py-layout checkpoints of tiny models: EMA weights differ from the raw ones."""
    ema, raw = tiny_model(1), tiny_model(2)
    folder = tmp_path_factory.mktemp('viz_ckpt')
    release, train = folder / 'release.pth', folder / 'model_best.pth.tar'
    torch.save({'model': to_release_layout(raw.state_dict(), raw),
                'model_ema': to_release_layout(ema.state_dict(), ema), 'epoch': 299}, release)
    torch.save({'state_dict': {f'module.{k}': v for k, v in raw.state_dict().items()},
                'state_dict_ema': ema.state_dict(), 'epoch': 7, 'arch': 'smpconv_t'}, train)
    return dict(release=release, train=train, ema=ema.state_dict(), raw=raw.state_dict())


# ---------------------------------------------------------------------------------------------------------
# SMP points

def test_pixel_conversion_follows_make_kernel():
    """Points on grid nodes: the kernel peaks where the returned (row, column) say, with the returned radius."""
    k = 9
    layer = SMPConv2d(2, k, n_points=3)
    cols, rows = torch.tensor([1., 6., 4.]), torch.tensor([2., 3., 7.])
    r_px = torch.tensor([0.5, 0.5, 2.])
    with torch.no_grad():
        s = (k - 1) / 2
        layer.weight_coord.copy_(torch.stack([cols / s - 1, 1 - rows / s], -1)[None])
        layer.radius.copy_((r_px / s).reshape(1, -1, 1, 1))
        layer.weights.copy_(torch.tensor([[[1., 2., 3.], [-1., -2., -3.]]]))
    (d,) = smp_points(layer, channels=2)
    torch.testing.assert_close(torch.from_numpy(d.cols), cols.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.from_numpy(d.rows), rows.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.from_numpy(d.radii), r_px.double(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(d.magnitude, [1., 2., 3.], rtol=1e-6)
    kernel = layer.make_kernel()[0, 0].detach()
    for c, r, w in zip(cols.long().tolist(), rows.long().tolist(), (1., 2., 3.)):
        assert kernel[r, c] == pytest.approx(w, rel=1e-5)
    # the 2-pixel point: tent 1 - L1 / 2 around (7, 4): half at 1 px, zero at L1 = 2 (diagonal too)
    assert kernel[6, 4] == pytest.approx(1.5, rel=1e-5) and kernel[7, 3] == pytest.approx(1.5, rel=1e-5)
    assert abs(kernel[6, 3]) < 1e-5 and abs(kernel[5, 4]) < 1e-5
    assert sorted(d.channels) == [0, 1]
    np.testing.assert_allclose(d.kernels[d.channels.index(0)], kernel.numpy(), rtol=1e-6)


def test_kernels_match_the_release(golden):
    """The dense kernels returned are the authors' (golden fp64 kernel of a k = 31 layer, 8 channels)."""
    layer = SMPConv2d(8, 31)
    with torch.no_grad():
        for p in ('weight_coord', 'radius', 'weights'):
            getattr(layer, p).copy_(torch.from_numpy(golden[f'layer_k31_{p}']))
    (d,) = smp_points(layer, channels=8)
    ref = golden['layer_k31_kernel_fp64']
    norms = np.linalg.norm(ref.reshape(8, -1), axis=1)
    assert d.channels == list(np.argsort(-norms, kind='stable'))
    np.testing.assert_allclose(d.kernels, ref[d.channels], atol=1e-6)


def test_layer_selection():
    model = tiny_model(0)
    names = [d.name for d in smp_points(model, channels=1)]
    assert names == [f'stages.{s}.blocks.0.large_kernel.smp.conv' for s in range(4)]
    picked = smp_points(model, layers=['stages.2.blocks.0', '-1', 0], channels=0)
    assert [d.name for d in picked] == [names[2], names[3], names[0]]
    assert [d.kernel_size for d in picked] == [5, 3, 7] and picked[0].kernels.shape == (0, 5, 5)
    with pytest.raises(ValueError, match='stages.9'):
        smp_points(model, layers=['stages.9'])
    with pytest.raises(ValueError, match='out of range'):
        smp_points(model, layers=[4])
    with pytest.raises(ValueError, match='deploy form'):
        smp_points(timm.create_model('smpconv_t', deploy=True, **dict(TINY, kernel_sizes=(7, 7, 5, 5))))


@needs_matplotlib
@pytest.mark.parametrize('layout', ['release', 'train'])
def test_show_plots_the_checkpoint_points(tiny_checkpoints, tmp_path, layout):
    out = tmp_path / 'points.png'
    data = show(tiny_checkpoints[layout], out, channels=3, model_name='smpconv_t', **TINY)
    check_png(out, min_w=4 * 250, min_h=4 * 200)  # 4 layers x (points + 3 kernels)
    ema, raw = tiny_checkpoints['ema'], tiny_checkpoints['raw']
    assert len(data) == 4
    for d in data:
        cols, rows, radii = expected_points(ema, d.name, d.kernel_size)
        np.testing.assert_allclose(d.cols, cols.numpy(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(d.rows, rows.numpy(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(d.radii, radii.numpy(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(d.magnitude, ema[f'{d.name}.weights'][0].double().abs().mean(0).numpy())
        assert d.kernels.shape == (3, d.kernel_size, d.kernel_size)
        raw_cols = expected_points(raw, d.name, d.kernel_size)[0].numpy()
        assert np.abs(d.cols - raw_cols).max() > 0.1  # the EMA weights, not the raw ones


def test_load_model_sources(tiny_checkpoints):
    rand = load_model('smpconv_t', **TINY)
    assert not rand.training and torch.equal(  # seeded random init, whatever the global RNG
        rand.state_dict()['stem.0.conv.weight'], load_model('smpconv_t', **TINY).state_dict()['stem.0.conv.weight'])
    with pytest.raises(ValueError, match='not recognised'):  # a tiny checkpoint without its architecture
        load_model(tiny_checkpoints['train'])
    with pytest.raises(FileNotFoundError):
        load_model('missing_file.pth')


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(ImportError, match=re.escape('pip install "smpconv-timm[viz]"')):
        show(tiny_model(0), tmp_path / 'x.png')
    with pytest.raises(ImportError, match=re.escape('smpconv-timm[viz]')):
        erf([nn.Conv2d(3, 3, 3)], tmp_path, tmp_path / 'y.png')
    assert main(['show', 'smpconv_t', '-o', str(tmp_path / 'z.png')]) == 2
    assert 'smpconv-timm[viz]' in capsys.readouterr().err
    assert not list(tmp_path.glob('*.png'))


@needs_matplotlib
def test_cli_show_release_checkpoint(release_checkpoint, tmp_path, capsys):
    """The authors' smpconv_t release file, variant recognised from its keys, EMA weights."""
    path, out = release_checkpoint('t'), tmp_path / 'show.png'
    assert main(['show', str(path), '-o', str(out), '--layers', '0', 'stages.3.blocks.2', '--channels', '2']) == 0
    check_png(out)
    text = capsys.readouterr().out
    assert f'wrote {out}' in text
    ema = torch.load(path, weights_only=True)['model_ema']
    for name, k in (('stages.0.blocks.0.large_kernel.smp.conv', 31), ('stages.3.blocks.2.large_kernel.smp.conv', 13)):
        radii = ema[f'{name}.radius'].double() * (k - 1) / 2
        line = next(ln for ln in text.splitlines() if ln.startswith(name))
        expect = f'{radii.min():.3f} / {radii.mean():.3f} / {radii.max():.3f}'
        assert f'{k}x{k}  {ema[name + ".weight_coord"].shape[1]}  {expect}' in line


# ---------------------------------------------------------------------------------------------------------
# Effective receptive fields

@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """A few real images (scikit-learn's 8x8 digits) when installed, else seeded random ones."""
    folder = tmp_path_factory.mktemp('images')
    try:
        from sklearn.datasets import load_digits
        arrays = [(d / 16. * 255).astype(np.uint8) for d in load_digits().images[:3]]
    except ImportError:
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f'img{i}.png')
    (folder / 'notes.txt').write_text('not an image')
    return folder


def test_mass_fractions_by_hand():
    m = np.zeros((10, 10))
    m[4:7, 4:7] = 1.  # 9 equal pixels around (5, 5)
    f = mass_fractions(m)
    assert f == pytest.approx(dict(pixels_50=5 / 100, pixels_90=9 / 100, square_50=9 / 100, square_90=9 / 100))
    m = np.zeros((10, 10))
    m[0, 0], m[0, 1] = 3., 1.  # off-centre: the square is centred on the mass, clipped at the border
    f = mass_fractions(m)
    assert f['pixels_50'] == f['square_50'] == 1 / 100
    assert f['pixels_90'] == 2 / 100 and f['square_90'] == 4 / 100  # 3x3 around (0, 0), clipped to 2x2
    with pytest.raises(ValueError, match='zero everywhere'):
        mass_fractions(np.zeros((4, 4)))


@needs_matplotlib
def test_erf_is_zero_outside_the_theoretical_receptive_field(images, tmp_path):
    """3x3 conv, then 3x3 stride-2 conv: output (8, 8) of a 32x32 input sees input rows / columns 14..18."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, stride=2, padding=1))
    result = erf({'two convs': net}, images, tmp_path / 'erf.png', size=32)
    check_png(tmp_path / 'erf.png')
    (m,) = result.maps
    inside = np.zeros_like(m, dtype=bool)
    inside[14:19, 14:19] = True
    assert (m[inside] > 0).all() and (m[~inside] == 0).all()
    assert result.fractions[0]['pixels_90'] <= 25 / 32 ** 2 and result.fractions[0]['square_90'] <= 25 / 32 ** 2
    # the same map by hand: |d(sum of centre channels) / d input| summed over RGB, mean over the 3 images
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    net(x)[:, :, 8, 8].sum().backward()
    np.testing.assert_allclose(erf_map(net, x.detach()), x.grad.abs().sum(1).mean(0).numpy(), rtol=1e-5, atol=1e-8)


@needs_matplotlib
def test_erf_compares_models_on_one_scale(images, tmp_path):
    smp = tiny_model(0)
    result = erf({'tiny smpconv': smp, 'resnet10t': 'resnet10t'}, images, tmp_path / 'erf.png', size=64)
    w, _ = check_png(tmp_path / 'erf.png')
    assert result.labels == ['tiny smpconv', 'resnet10t (random init)'] and result.n_images == 3
    assert w >= 600
    assert len(result.clims) == 2 and result.clims[0] == result.clims[1] == (1e-3, 1.)
    for m, n, f in zip(result.maps, result.normalized, result.fractions):
        assert m.shape == n.shape == (64, 64)
        assert n.max() == 1. and n.min() >= 0 and np.allclose(n, m / m.max())
        assert all(0 < v <= 1 for v in f.values())
        assert f['pixels_50'] <= f['pixels_90'] and f['square_50'] <= f['square_90']
        assert f['pixels_90'] <= f['square_90']  # no set of that area holds more than the top pixels


@needs_matplotlib
def test_cli_erf(images, tmp_path, capsys):
    out = tmp_path / 'erf.png'
    assert main(['erf', 'resnet10t', 'convnext_atto', '--images', str(images), '-o', str(out),
                 '--img-size', '64']) == 0
    check_png(out)
    text = capsys.readouterr().out
    assert f'wrote {out} (3 images, 64x64)' in text
    from smpconv_timm.viz import _normalize, load_images
    model = load_model('resnet10t')
    expect = mass_fractions(erf_map(model, _normalize(load_images(images, 64), model)))
    line = next(ln for ln in text.splitlines() if ln.startswith('resnet10t (random init):'))
    printed = [float(v) for v in re.findall(r'\d\.\d+', line)]
    assert printed == pytest.approx(
        [expect['pixels_50'], expect['pixels_90'], expect['square_50'], expect['square_90']], abs=1e-4)
    assert any(ln.startswith('convnext_atto (random init):') for ln in text.splitlines())

