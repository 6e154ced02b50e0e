"""Looking inside SMPConv models: the points of SMP layers (``show``) and effective receptive fields (``erf``).

Both draw with matplotlib, an optional dependency (``pip install "smpconv-timm[viz]"``), imported only when a
picture is drawn. ``smp_points`` and ``erf_map`` return the numbers alone.

Point coordinates are converted to kernel pixels with the axis convention of ``SMPConv2d.make_kernel``: with
``s = (k - 1) / 2``, a point at ``(x, y)`` in [-1, 1]^2 sits at column ``(x + 1) * s`` and row ``(1 - y) * s``
(``y`` points up, row 0 is the top row), and its radius ``r`` is ``r * s`` pixels. A point spreads its weights
as ``max(0, 1 - (|dx| + |dy|) / r)``: its support is an L1 ball, a diamond of half-diagonal ``r``.
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .layers import SMPConv2d

__all__ = [
    'SmpLayerPoints', 'ErfResult', 'load_model', 'smp_points', 'show', 'load_images', 'erf_map', 'erf_centre',
    'mass_fractions', 'erf',
]

_EXTRA_HINT = 'pip install "smpconv-timm[viz]"'
_CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.bin', '.tar', '.safetensors', '.ckpt')
_IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
MASS_LEVELS = (0.5, 0.9)


def _matplotlib():
    """matplotlib's Figure and colors, without pyplot (no global backend state); a clear error when missing."""
    try:
        import matplotlib
        import matplotlib.colors as colors
        from matplotlib.collections import PatchCollection
        from matplotlib.figure import Figure
        from matplotlib.patches import Polygon, Rectangle
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError(f'drawing needs matplotlib, which is not installed: {_EXTRA_HINT}') from e
    return dict(colormaps=matplotlib.colormaps, Figure=Figure, colors=colors, MaxNLocator=MaxNLocator,
                PatchCollection=PatchCollection, Polygon=Polygon, Rectangle=Rectangle)


# ---------------------------------------------------------------------------------------------------------
# Models from checkpoints, Hub ids and names

def _is_checkpoint(source: str) -> bool:
    return os.path.isfile(source) or source.lower().endswith(_CHECKPOINT_SUFFIXES)


def _num_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    for key in ('head.fc.weight', 'head.weight'):  # timm layout, release layout
        if key in state_dict and torch.is_tensor(state_dict[key]) and state_dict[key].ndim == 2:
            return int(state_dict[key].shape[0])
    return None


def _pretrained(name: str, pretrained: Optional[bool]) -> bool:
    return (name.startswith('hf-hub:') or '.' in name) if pretrained is None else pretrained


def load_model(
        source: Union[str, os.PathLike, nn.Module],
        pretrained: Optional[bool] = None,
        model_name: Optional[str] = None,
        seed: int = 0,
        **kwargs,
) -> nn.Module:
    """An eval-mode model from a module, a checkpoint file, a Hub id or a timm model name.

    Args:
        source: A module (returned as is, in eval mode); an SMPConv checkpoint file (the authors' release or a
            timm train.py checkpoint, EMA weights picked), loaded with ``timm.create_model(name, pretrained=True,
            pretrained_cfg_overlay=dict(file=path))``, ``name`` recognised from its keys; ``hf-hub:...``; a timm
            model name (``smpconv_t``, ``smpconv_t.in1k``, ``resnet50``).
        pretrained: For names: load pretrained weights. None: only for ``hf-hub:`` ids and names with a
            pretrained tag (``smpconv_t.in1k``); a bare name gives a random init.
        model_name: For checkpoints: the model to build, checked against the checkpoint's architecture unless
            ``kwargs`` override the architecture (``depths``, ``dims``, ...).
        seed: Seed of a random init (taken in a forked RNG: the global RNG is left as it was).
        **kwargs: Passed to ``timm.create_model``.
    """
    import timm
    from . import smpconv  # noqa: F401  (registers the models)
    if isinstance(source, nn.Module):
        return source.eval()
    source = os.fspath(source)
    if _is_checkpoint(source):
        from .checkpoint import load_checkpoint_file
        from .checkpoint import recognise_variant
        state_dict = load_checkpoint_file(source)
        try:
            name = recognise_variant(state_dict, expected=model_name)
        except ValueError:
            if not (model_name and kwargs):
                raise
            name = model_name  # an architecture given by kwargs; create_model checks that the checkpoint fits
        num_classes = _num_classes(state_dict)
        if num_classes is not None:
            kwargs.setdefault('num_classes', num_classes)
        del state_dict
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=source), **kwargs)
        return model.eval()
    if _pretrained(source, pretrained):
        return timm.create_model(source, pretrained=True, **kwargs).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(source, pretrained=False, **kwargs).eval()


# ---------------------------------------------------------------------------------------------------------
# SMP points

@dataclass
class SmpLayerPoints:
    """One SMP layer's points in kernel pixels (see the module docstring for the conversion)."""
    name: str
    kernel_size: int
    cols: np.ndarray  # (P,) column of each point, 0 = left kernel column
    rows: np.ndarray  # (P,) row of each point, 0 = top kernel row
    radii: np.ndarray  # (P,) radius in pixels: half-diagonal of the point's diamond-shaped support
    magnitude: np.ndarray  # (P,) mean |weight| of each point over the layer's channels
    channels: List[int]  # channels whose dense kernels are in ``kernels``: the largest L2 norms, descending
    kernels: np.ndarray  # (len(channels), k, k) dense kernels from ``make_kernel``

    @property
    def n_points(self) -> int:
        return len(self.cols)


def _smp_layers(model_or_layer: nn.Module) -> List[Tuple[str, SMPConv2d]]:
    if isinstance(model_or_layer, SMPConv2d):
        return [('layer', model_or_layer)]
    found = [(n, m) for n, m in model_or_layer.named_modules() if isinstance(m, SMPConv2d)]
    if not found:
        raise ValueError(
            f'{type(model_or_layer).__name__} has no SMP layers (SMPConv2d): not an SMPConv model, or one in '
            f'deploy form (reparameterized), whose points no longer exist')
    return found


def _select(found: List[Tuple[str, SMPConv2d]], layers: Optional[Sequence[Union[int, str]]]):
    if layers is None:  # the first SMP layer of each stage; all of them when there are no stages
        seen, chosen = set(), []
        for name, layer in found:
            m = re.match(r'^(stages\.\d+)\.', name)
            if m is None or m.group(1) not in seen:
                chosen.append((name, layer))
            if m is not None:
                seen.add(m.group(1))
        return chosen
    chosen = []
    for item in layers:
        if isinstance(item, str) and re.fullmatch(r'-?\d+', item.strip()):
            item = int(item)
        if isinstance(item, int):
            if not -len(found) <= item < len(found):
                raise ValueError(f'layer index {item} out of range: the model has {len(found)} SMP layers')
            matches = [found[item]]
        else:
            item = item.strip().rstrip('.')
            matches = [(n, m) for n, m in found if n == item or n.startswith(item + '.')]
            if not matches:
                names = ', '.join(n for n, _ in found[:4]) + (', ...' if len(found) > 4 else '')
                raise ValueError(f'no SMP layer named {item!r} or inside it; the SMP layers are {names}')
        chosen += [x for x in matches if all(x[0] != c[0] for c in chosen)]
    return chosen


@torch.no_grad()
def _layer_points(name: str, layer: SMPConv2d, channels: int) -> SmpLayerPoints:
    k = layer.kernel_size
    scale = (k - 1) / 2
    coord = layer.weight_coord.detach()[0].double().cpu()
    kernel = layer.make_kernel().detach()[:, 0].double().cpu()  # (C, k, k)
    norms = kernel.flatten(1).norm(dim=1)
    top = torch.argsort(norms, descending=True, stable=True)[:max(0, channels)].tolist()
    return SmpLayerPoints(
        name=name,
        kernel_size=k,
        cols=((coord[:, 0] + 1) * scale).numpy(),
        rows=((1 - coord[:, 1]) * scale).numpy(),
        radii=(layer.radius.detach().reshape(-1).double().cpu() * scale).numpy(),
        magnitude=layer.weights.detach()[0].double().abs().mean(0).cpu().numpy(),
        channels=top,
        kernels=kernel[top].numpy(),
    )


def smp_points(
        model_or_layer: nn.Module,
        layers: Optional[Sequence[Union[int, str]]] = None,
        channels: int = 4,
) -> List[SmpLayerPoints]:
    """Points, radii and dense kernels of the chosen SMP layers, in kernel pixels.

    Args:
        model_or_layer: An SMPConv model (train form) or one ``SMPConv2d``.
        layers: SMP layers by index (in module order, negative from the end) or by module name, e.g.
            ``stages.0.blocks.0`` (every SMP layer inside it) or ``stages.0.blocks.0.large_kernel.smp.conv``.
            Default: the first SMP layer of each stage.
        channels: Number of dense kernels per layer, those of the channels with the largest kernel L2 norm.
    """
    return [_layer_points(n, m, channels) for n, m in _select(_smp_layers(model_or_layer), layers)]


def _diamond(col: float, row: float, r: float) -> np.ndarray:
    return np.array([[col - r, row], [col, row - r], [col + r, row], [col, row + r]])


def show(
        source: Union[str, os.PathLike, nn.Module],
        out_png: Union[str, os.PathLike],
        layers: Optional[Sequence[Union[int, str]]] = None,
        channels: int = 4,
        dpi: int = 100,
        **kwargs,
) -> List[SmpLayerPoints]:
    """One PNG: per chosen SMP layer, its points over the kernel grid next to the dense kernels of a few channels.

    Each point is drawn as its support, a diamond of half-diagonal = radius (in pixels, to scale), with a dot at
    its centre; both are coloured by the point's mean |weight| over channels, the dot sized by it too.
    ``source``: a model or anything ``load_model`` takes (``kwargs`` go to it). Returns the plotted data.
    """
    mpl = _matplotlib()
    model = load_model(source, **kwargs)
    data = smp_points(model, layers, channels)
    n_cols = 1 + max(1, max(len(d.channels) for d in data))
    fig = mpl['Figure'](figsize=(3.6 * n_cols, 3.5 * len(data) + 0.9), dpi=dpi, layout='constrained')
    axes = fig.subplots(len(data), n_cols, squeeze=False)
    if isinstance(source, nn.Module):
        label = type(source).__name__
    elif _is_checkpoint(os.fspath(source)):
        label = os.path.basename(os.fspath(source))
    else:
        label = source if _pretrained(source, kwargs.get('pretrained')) else f'{source} (random init)'
    fig.suptitle(
        f'SMP points and kernels: {label}\n'
        'left: each point\'s support |dx| + |dy| < radius (diamond, to scale), colour = mean |w| over channels;  '
        'right: dense kernels (make_kernel) of the channels with the largest L2 norm',
        fontsize=9)
    for d, row in zip(data, axes):
        k = d.kernel_size
        ax = row[0]
        low = float(d.magnitude.min())
        norm = mpl['colors'].Normalize(vmin=low, vmax=max(float(d.magnitude.max()), low + 1e-12))
        patches = [mpl['Polygon'](_diamond(c, r_, rad), closed=True) for c, r_, rad in zip(d.cols, d.rows, d.radii)]
        coll = mpl['PatchCollection'](patches, cmap='viridis', norm=norm, facecolors='none', linewidths=0.8, alpha=0.8)
        coll.set_array(d.magnitude)
        coll.set_facecolor('none')
        ax.add_collection(coll)
        sizes = 6 + 30 * norm(d.magnitude).filled(1.)
        sc = ax.scatter(d.cols, d.rows, c=d.magnitude, s=sizes, cmap='viridis', norm=norm, zorder=3,
                        edgecolors='k', linewidths=0.3)
        ax.add_patch(mpl['Rectangle']((-0.5, -0.5), k, k, fill=False, edgecolor='0.3', linewidth=1.2))
        lo = min(-0.5, float((d.cols - d.radii).min()), float((d.rows - d.radii).min())) - 0.5
        hi = max(k - 0.5, float((d.cols + d.radii).max()), float((d.rows + d.radii).max())) + 0.5
        ax.set_xlim(lo, hi)
        ax.set_ylim(hi, lo)  # row 0 at the top, as in the kernel images
        ax.set_aspect('equal')
        ax.set_xticks(np.arange(-0.5, k, 1.), minor=True)
        ax.set_yticks(np.arange(-0.5, k, 1.), minor=True)
        ax.grid(which='minor', color='0.85', linewidth=0.4)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(mpl['MaxNLocator'](integer=True))
        ax.set_xlabel('kernel column (px)')
        ax.set_ylabel('kernel row (px)')
        ax.set_title(f'{d.name}\n{k}x{k} kernel, {d.n_points} points, radius {d.radii.min():.2f}-'
                     f'{d.radii.max():.2f} px', fontsize=8)
        fig.colorbar(sc, ax=ax, shrink=0.8, label='mean |w| over channels')
        vmax = float(np.abs(d.kernels).max()) if d.kernels.size else 1.
        im = None
        for j, ax in enumerate(row[1:]):
            if j >= len(d.channels):
                ax.axis('off')
                continue
            im = ax.imshow(d.kernels[j], cmap='RdBu_r', vmin=-vmax or -1., vmax=vmax or 1.,
                           extent=(-0.5, k - 0.5, k - 0.5, -0.5), interpolation='nearest')
            ax.set_title(f'channel {d.channels[j]}', fontsize=8)
            ax.set_xlabel('kernel column (px)')
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(mpl['MaxNLocator'](integer=True))
        if im is not None:
            fig.colorbar(im, ax=list(row[1:1 + len(d.channels)]), shrink=0.8, label='kernel value')
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return data


# ---------------------------------------------------------------------------------------------------------
# Effective receptive fields

def load_images(images_dir: Union[str, os.PathLike], size: int = 224, max_images: Optional[int] = None) -> np.ndarray:
    """RGB images of a folder (PNG / JPEG, sorted by name) resized to size x size, as float32 (N, H, W, 3) in [0, 1]."""
    from PIL import Image
    folder = Path(images_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f'image folder not found: {folder}')
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:max_images]
    if not files:
        raise ValueError(f'no PNG or JPEG images in {folder}')
    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert('RGB').resize((size, size), Image.Resampling.BICUBIC)
            out.append(np.asarray(im, dtype=np.float32) / 255.)
    return np.stack(out)


def _normalize(images: np.ndarray, model: nn.Module) -> torch.Tensor:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean = np.asarray(cfg.get('mean', IMAGENET_DEFAULT_MEAN), dtype=np.float32)
    std = np.asarray(cfg.get('std', IMAGENET_DEFAULT_STD), dtype=np.float32)
    x = torch.from_numpy((images - mean) / std).permute(0, 3, 1, 2).contiguous()
    in_chans = getattr(model, 'in_chans', 3)
    if isinstance(in_chans, int) and in_chans != 3:  # e.g. in_chans=1: the mean over RGB, repeated
        x = x.mean(1, keepdim=True).expand(-1, in_chans, -1, -1).contiguous()
    return x


def _feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map, NCHW: ``forward_intermediates`` (NCHW by default), else ``forward_features``,
    else the module's output."""
    feat = None
    if hasattr(model, 'forward_intermediates'):
        try:
            feat = model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
        except (NotImplementedError, TypeError, AssertionError):
            feat = None
    if feat is None:
        feat = model.forward_features(x) if hasattr(model, 'forward_features') else model(x)
        num_features = getattr(model, 'num_features', None)
        if feat.ndim == 4 and num_features and feat.shape[1] != num_features and feat.shape[-1] == num_features:
            feat = feat.permute(0, 3, 1, 2)  # NHWC (e.g. Swin)
    if feat.ndim != 4:
        raise ValueError(
            f'{type(model).__name__}: the ERF needs an NCHW feature map, got a {tuple(feat.shape)} output')
    return feat


def erf_map(model: nn.Module, x: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Effective receptive field (H, W) of the centre pixel of the model's last feature map.

    For each image, the channels of the feature map's pixel (h // 2, w // 2) are summed and differentiated
    with respect to the input; the map is |gradient| summed over input channels, averaged over images.
    """
    model.eval()
    total = torch.zeros(x.shape[-2:], dtype=torch.float64)
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:  # only the input gradient is needed: no weight gradients computed
            p.requires_grad_(False)
        for chunk in x.split(batch_size):
            chunk = chunk.clone().requires_grad_(True)
            feat = _feature_map(model, chunk)
            h, w = feat.shape[-2:]
            (grad,) = torch.autograd.grad(feat[:, :, h // 2, w // 2].sum(), chunk)  # images independent in eval
            total += grad.abs().sum(1).sum(0).double()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return (total / x.shape[0]).numpy()


def erf_centre(erf: np.ndarray) -> Tuple[int, int]:
    """(row, column) of an ERF's centre of mass, rounded to the nearest pixel."""
    erf = np.asarray(erf, dtype=np.float64)
    total = erf.sum()
    return (int(np.rint((erf.sum(1) * np.arange(erf.shape[0])).sum() / total)),
            int(np.rint((erf.sum(0) * np.arange(erf.shape[1])).sum() / total)))


def _square(erf: np.ndarray, level: float) -> Tuple[int, int, int, int]:
    h, w = erf.shape
    cy, cx = erf_centre(erf)
    sat = np.pad(erf.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    total = sat[-1, -1]
    for r in range(max(h, w)):
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
        mass = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
        if mass >= level * total * (1 - 1e-12):
            return y0, y1, x0, x1
    return 0, h, 0, w


def mass_fractions(erf: np.ndarray, levels: Sequence[float] = MASS_LEVELS) -> Dict[str, float]:
    """Fractions of the input area that hold a share of an ERF's mass, for each level p (e.g. 0.5, 0.9).

    ``pixels_<p>``: the fewest pixels holding at least p of the total (the largest pixels first), over H * W.
    ``square_<p>``: the smallest square of odd side centred on the ERF's centre of mass (``erf_centre``), clipped
    to the image, holding at least p of the total, its area over H * W. Both lie in (0, 1]; smaller means a more
    concentrated ERF.
    """
    erf = np.asarray(erf, dtype=np.float64)
    total = erf.sum()
    if not total > 0:
        raise ValueError('the ERF is zero everywhere: the output does not depend on the input')
    cum = np.cumsum(np.sort(erf, axis=None)[::-1])
    out = {}
    for p in levels:
        count = int(np.searchsorted(cum, p * total * (1 - 1e-12))) + 1
        out[f'pixels_{round(p * 100)}'] = min(count, erf.size) / erf.size
    for p in levels:
        y0, y1, x0, x1 = _square(erf, p)
        out[f'square_{round(p * 100)}'] = (y1 - y0) * (x1 - x0) / erf.size
    return out


@dataclass
class ErfResult:
    """ERFs of several models on the same images."""
    labels: List[str]
    maps: List[np.ndarray]  # (H, W) each: mean |input gradient| (see erf_map), as computed
    normalized: List[np.ndarray]  # each map divided by its max: what is drawn
    fractions: List[Dict[str, float]]  # mass_fractions of each map
    clims: List[Tuple[float, float]]  # colour limits of each drawn panel (normalized values, log scale)
    n_images: int


def erf(
        models: Union[Sequence[Union[str, nn.Module]], Dict[str, Union[str, nn.Module]]],
        images_dir: Union[str, os.PathLike],
        out_png: Union[str, os.PathLike],
        size: int = 224,
        pretrained: bool = False,
        max_images: Optional[int] = None,
        log_floor: float = 1e-3,
        batch_size: int = 8,
        dpi: int = 100,
) -> ErfResult:
    """Effective receptive fields of several models side by side in one PNG, with their mass fractions.

    Each map is divided by its own maximum and drawn on one shared log colour scale [log_floor, 1] (values
    below the floor, zeros included, take the lowest colour). The dashed square is the smallest square around
    the ERF's centre of mass holding 90% of the mass (``square_90``).

    Args:
        models: timm model names, SMPConv checkpoint files, ``hf-hub:`` ids or modules; a dict gives labels.
        images_dir: Folder of PNG / JPEG images, resized to size x size and normalized with each model's
            ``pretrained_cfg`` mean / std.
        pretrained: Load pretrained weights for every model name; without it, only ``hf-hub:`` ids and names
            with a pretrained tag (``convnext_tiny.fb_in1k``) get them, bare names are a (labelled) random init.
    """
    mpl = _matplotlib()
    items = list(models.items()) if isinstance(models, dict) else [
        (m if isinstance(m, str) else type(m).__name__, m) for m in models]
    if not items:
        raise ValueError('no models given')
    images = load_images(images_dir, size, max_images)
    labels, maps = [], []
    for label, source in items:
        model = load_model(source, pretrained=pretrained or None)
        maps.append(erf_map(model, _normalize(images, model), batch_size))
        if isinstance(source, str) and _is_checkpoint(source):
            label = os.path.basename(label) if label == source else label
        elif isinstance(source, str) and not _pretrained(source, pretrained or None):
            label = f'{label} (random init)'
        labels.append(str(label))
        del model
    fractions = [mass_fractions(m) for m in maps]
    normalized = [m / m.max() for m in maps]
    clim = (log_floor, 1.)

    n = len(maps)
    fig = mpl['Figure'](figsize=(3.6 * n + 1.2, 4.3), dpi=dpi, layout='constrained')
    axes = fig.subplots(1, n, squeeze=False)[0]
    norm = mpl['colors'].LogNorm(vmin=clim[0], vmax=clim[1], clip=True)
    cmap = mpl['colormaps']['magma'].with_extremes(under='black', bad='black')
    im = None
    for ax, label, m, fr in zip(axes, labels, normalized, fractions):
        im = ax.imshow(np.maximum(m, clim[0] * 0.5), cmap=cmap, norm=norm, interpolation='nearest')
        y0, y1, x0, x1 = _square(m, 0.9)
        ax.add_patch(mpl['Rectangle'](
            (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor='cyan', linestyle='--', linewidth=0.9))
        ax.set_title(f'{label}\n50% / 90% of mass in {100 * fr["pixels_50"]:.1f}% / {100 * fr["pixels_90"]:.1f}% '
                     f'of pixels\nsquare holding 90%: {100 * fr["square_90"]:.1f}% of area', fontsize=8)
        ax.set_xlabel('input column (px)')
        ax.set_ylabel('input row (px)')
    fig.colorbar(im, ax=list(axes), shrink=0.85, label='|d centre output / d input|, / max (log)')
    fig.suptitle(f'Effective receptive field of the centre output pixel, {len(images)} images at {size}x{size}',
                 fontsize=9)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    clims = [tuple(float(v) for v in a.images[0].get_clim()) for a in axes]
    return ErfResult(labels, maps, normalized, fractions, clims, len(images))
