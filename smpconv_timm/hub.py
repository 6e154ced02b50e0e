"""Pretrained weights on the Hugging Face Hub: the authors' checkpoints in, a timm Hub repo out, and back down.

* ``build_hub_folder``: an authors' release checkpoint (.pth, any layout ``checkpoint_filter_fn`` reads) -> a
  folder exactly as timm's ``push_to_hf_hub`` uploads one, written with timm's own ``save_for_hf`` and
  ``generate_readme``: ``model.safetensors`` (fp32, the model's own key names, EMA weights by default),
  ``config.json`` (architecture, num_classes, model_args, pretrained_cfg, ImageNet label names) and a
  ``README.md`` model card whose numbers (params, fvcore GMACs, activations) are measured while it is built.
  Everything is checked before the folder appears, under a temporary name renamed into place at the end: the
  architecture read off the keys, every tensor finite and float32, the written weights bit-equal to the loaded
  ones, the folder's config parsed back by timm, and the converted model's output equal (to 1e-5 x max|logit|;
  bit-equal in practice) to the output of the release checkpoint loaded the user's way
  (``pretrained_cfg_overlay=dict(file=...)``).
* ``publish_folder`` / ``publish``: create the repo, optionally a branch, and upload the folder with
  ``huggingface_hub.HfApi`` (token: ``--token``, else ``HF_TOKEN`` or the ``hf auth login`` file). ``dry_run``
  lists what would be uploaded and contacts nothing.
* ``hub_errors``: wraps the pretrained load of ``_create_smpconv``. Download failures (missing repo or file,
  unreachable endpoint, offline mode without a cached copy, incomplete download) become a
  ``PretrainedWeightsError`` naming the repo, revision, endpoint and files tried and how to load a local file
  instead; a cached weight file whose content does not hash to the ETag the Hub announced (sha256 for LFS
  files) is removed from the cache and refused.
* ``add_subcommands``: the ``smpconv-timm convert`` and ``smpconv-timm publish`` commands.

The Hub namespace is ``checkpoint.HF_HUB_NAMESPACE`` (env ``SMPCONV_HF_NAMESPACE``); the endpoint, cache and
offline mode are huggingface_hub's (``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``).
"""
import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import HF_HUB_NAMESPACE, CheckpointError, is_ema_key, load_checkpoint_file, weights_key

__all__ = [
    'HUB_FILES', 'PAPER_TOP1', 'PretrainedWeightsError', 'HubFolder', 'recognise_variant', 'build_hub_folder',
    'model_card', 'default_repo_id', 'publish_folder', 'publish', 'hub_errors', 'add_subcommands',
]

WEIGHTS_FILE = 'model.safetensors'  # timm's HF_SAFE_WEIGHTS_NAME: what timm's hub loader looks for first
#: the files of a Hub model repo, as timm's ``push_to_hf_hub`` writes them (safetensors only: no pickle)
HUB_FILES = ('README.md', 'config.json', WEIGHTS_FILE)
PRETRAINED_TAG = 'in1k'

#: ImageNet-1k val top-1 (%) as reported in the paper (Kim & Park, CVPR 2023, arXiv:2304.02330), cited in the
#: model card as the paper's number: this project does not re-measure it.
PAPER_TOP1 = {'smpconv_t': 82.5, 'smpconv_b': 83.8}

_CITATION = """@inproceedings{kim2023smpconv,
  title={SMPConv: Self-moving Point Representations for Continuous Convolution},
  author={Kim, Sanghyeon and Park, Eunbyung},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2023}
}"""
_TIMM_CITATION = """@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}"""


class PretrainedWeightsError(OSError):
    """Pretrained weights could not be fetched from the Hub (or the copy fetched was damaged)."""


@dataclasses.dataclass
class HubFolder:
    path: Path
    model_name: str  # e.g. 'smpconv_t.in1k'
    weights: str  # 'EMA' or 'raw'
    num_tensors: int
    params: int
    macs: int
    activations: int
    max_abs_diff: float  # converted vs release-format output, on the check input


# ---------------------------------------------------------------------------------------------------------
# Conversion

def recognise_variant(state_dict: Dict[str, Any], expected: Optional[str] = None) -> str:
    """The registered variant (``smpconv_t`` / ``smpconv_b``) whose depths and widths the checkpoint's keys show.

    Raises ValueError for a checkpoint with no SMPConv blocks, for an architecture that is not registered, and
    when ``expected`` is given and the checkpoint is another variant (both named).
    """
    from timm.models._helpers import clean_state_dict
    from .smpconv import _ARCHS, _describe_arch, _remap_release_key
    tensors = {_remap_release_key(k): v for k, v in clean_state_dict(state_dict).items() if torch.is_tensor(v)}
    arch = _describe_arch(tensors)
    known = {name: (tuple(a['depths']), tuple(a['dims'])) for name, a in _ARCHS.items()}
    known_text = '; '.join(f'{n}: depths {d}, dims {w}' for n, (d, w) in known.items())
    if arch is None:
        sample = ', '.join(list(state_dict)[:4])
        raise ValueError(
            f'not an SMPConv checkpoint: none of its {len(state_dict)} entries is a block weight '
            f'(stages.<s>.blocks.<b>.pw2.conv.weight); it starts with {sample}')
    found = [name for name, a in known.items() if a == arch]
    if not found:
        raise ValueError(
            f'checkpoint architecture not recognised: depths {arch[0]}, dims {arch[1]}; known: {known_text}')
    if expected is not None and expected != found[0]:
        raise ValueError(
            f'the checkpoint is {found[0]} (depths {arch[0]}, dims {arch[1]}), not {expected} '
            f'(depths {known[expected][0]}, dims {known[expected][1]})' if expected in known else
            f'unknown model {expected!r}; the checkpoint is {found[0]}')
    return found[0]


def _weight_set(path: Path, use_ema: bool) -> str:
    """'EMA' or 'raw': which weights of a training checkpoint ``load_checkpoint_file`` picks."""
    if path.suffix == '.safetensors':
        return 'as stored'
    from timm.models._helpers import _torch_load
    try:
        ckpt = _torch_load(str(path), map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # mmap needs the zip format; the file itself was already read once successfully
        ckpt = _torch_load(str(path), map_location='cpu', weights_only=True)
    key = weights_key(ckpt, use_ema) if isinstance(ckpt, dict) else None
    if key is None:
        return 'as stored'
    return 'EMA' if is_ema_key(key) else 'raw'


def _sha256(path: Path) -> str:
    from huggingface_hub.utils.sha import sha_fileobj
    with open(path, 'rb') as f:
        return sha_fileobj(f).hex()


def _check_input(input_size: Sequence[int], batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_size, generator=g)


def _create(name: str, **kwargs) -> torch.nn.Module:
    import timm
    model = timm.create_model(name, **kwargs).eval()
    # pretrained_ema / pretrained_cfg_overlay say how these weights were read, they are no model argument:
    # keep them out of the exported config.json's model_args
    getattr(model, '_model_args', {}).pop('pretrained_ema', None)
    return model


def build_hub_folder(
        checkpoint: Union[str, os.PathLike],
        output: Optional[Union[str, os.PathLike]] = None,
        model_name: Optional[str] = None,
        use_ema: bool = True,
        overwrite: bool = False,
        log: Callable[[str], None] = print,
) -> HubFolder:
    """Convert an authors' checkpoint into a Hub model repo folder (default ``./<model>.in1k``), verified.

    Nothing is written at ``output`` unless every check passes: the folder is built under a temporary name
    beside it and renamed into place. An existing ``output`` is replaced only with ``overwrite``.
    """
    from timm.models import save_for_hf
    from timm.models._hub import generate_readme, load_model_config_from_path
    from .flops import model_complexity

    checkpoint = Path(checkpoint)
    state_dict = load_checkpoint_file(checkpoint, use_ema=use_ema)
    variant = recognise_variant(state_dict, expected=model_name)
    del state_dict
    name = f'{variant}.{PRETRAINED_TAG}'
    output = Path(output) if output is not None else Path(name)
    if output.exists() and not overwrite:
        raise FileExistsError(f'{output} exists; pass overwrite=True (--overwrite) to replace it')
    weights = _weight_set(checkpoint, use_ema)

    # the reference: the release checkpoint loaded the way a user loads it (checkpoint_filter_fn validates it)
    reference = _create(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)), pretrained_ema=use_ema)
    cfg = reference.pretrained_cfg
    complexity = model_complexity(reference, img_size=tuple(cfg['input_size'][1:]))
    x = _check_input(cfg['input_size'])
    with torch.no_grad():
        expect = reference(x)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{output.name}.', suffix='.partial', dir=output.parent))
    try:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        save_for_hf(
            reference, tmp, safe_serialization=True,
            model_config=dict(label_names=info.label_names(), label_descriptions=info.label_descriptions(as_dict=True)))
        card = model_card(reference, complexity, source=checkpoint.name, source_sha256=_sha256(checkpoint),
                          weights=weights)
        (tmp / 'README.md').write_text(generate_readme(card, name), encoding='utf-8')

        # verify what was written, read back the way the Hub copy will be read
        written = sorted(p.name for p in tmp.iterdir())
        if written != sorted(HUB_FILES):
            raise RuntimeError(f'the Hub folder holds {written}, expected {sorted(HUB_FILES)}')
        pretrained_cfg, arch, model_args = load_model_config_from_path(tmp)
        if arch != variant or pretrained_cfg.get('num_classes') != reference.num_classes:
            raise RuntimeError(f'config.json describes {arch} with {pretrained_cfg.get("num_classes")} classes, '
                               f'not {variant} with {reference.num_classes}')
        num_tensors = _check_weights(tmp / WEIGHTS_FILE, reference.state_dict())
        # the folder's own pretrained_cfg and model_args, the weights read from its file (not as a local-dir source)
        pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k not in ('file', 'source')}
        converted = _create(
            arch, pretrained=True, pretrained_cfg=pretrained_cfg,
            pretrained_cfg_overlay=dict(file=str(tmp / WEIGHTS_FILE)), **model_args)
        with torch.no_grad():
            got = converted(x)
        diff = (got - expect).abs().max().item()
        bound = 1e-5 * max(1., expect.abs().max().item())
        if not diff <= bound:
            raise ValueError(
                f'the converted model disagrees with the release checkpoint: max |logit difference| {diff:.3g} '
                f'> {bound:.3g}; nothing was written')
        _move_into_place(tmp, output, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    log(f'{checkpoint} -> {output}/ ({name}, {weights} weights, {num_tensors} tensors, '
        f'{complexity.params / 1e6:.1f}M params, {complexity.flops / 1e9:.2f} GMACs; '
        f'converted vs release-format output: max |diff| {diff:.2g})')
    return HubFolder(output, name, weights, num_tensors, complexity.params, complexity.flops,
                     complexity.activations, diff)


def _check_weights(path: Path, expect: Dict[str, torch.Tensor]) -> int:
    """The written safetensors holds exactly the model's tensors, bit for bit, float32 and finite."""
    from safetensors.torch import load_file
    got = load_file(str(path))
    if got.keys() != expect.keys():
        missing, extra = sorted(expect.keys() - got.keys()), sorted(got.keys() - expect.keys())
        raise RuntimeError(f'{path.name}: missing {missing}, unexpected {extra}')
    for k, v in got.items():
        if v.is_floating_point() and v.dtype != torch.float32:
            raise RuntimeError(f'{path.name}: {k} is {v.dtype}, not float32')
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f'{path.name}: {k} holds non-finite values')
        if v.dtype != expect[k].dtype or v.shape != expect[k].shape or not torch.equal(v, expect[k].cpu()):
            raise RuntimeError(f'{path.name}: {k} differs from the loaded weights')
    return len(got)


def _move_into_place(tmp: Path, output: Path, overwrite: bool) -> None:
    if not output.exists():
        os.replace(tmp, output)
        return
    if not overwrite:
        raise FileExistsError(f'{output} exists; pass overwrite=True (--overwrite) to replace it')
    old = output.with_name(f'.{output.name}.old-{uuid.uuid4().hex[:8]}')
    os.replace(output, old)
    try:
        os.replace(tmp, output)
    except BaseException:
        os.replace(old, output)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def model_card(
        model: torch.nn.Module,
        complexity: Any,
        source: str,
        source_sha256: str,
        weights: str = 'EMA',
) -> Dict[str, Any]:
    """timm ``generate_readme`` model card fields; every number is read off ``model`` / ``complexity``."""
    cfg = model.pretrained_cfg
    variant, tag = cfg['architecture'], cfg['tag']
    name = f'{variant}.{tag}'
    h, w = cfg['input_size'][1:]
    paper_url = 'https://arxiv.org/abs/' + cfg['paper_ids'].split(':', 1)[-1]
    feature_shapes = ', '.join(
        f'({f["num_chs"]}, {h // f["reduction"]}, {w // f["reduction"]})' for f in model.feature_info)
    last = model.feature_info[-1]
    pool_shape = f'(1, {last["num_chs"]}, {h // last["reduction"]}, {w // last["reduction"]})'
    weights_text = {
        'EMA': 'the EMA weights (the ones the paper evaluates)',
        'raw': 'the raw (non-EMA) weights',
    }.get(weights, 'the weights')
    usage = f"""The model code is not part of timm: install the `smpconv-timm` package; `import smpconv_timm` registers
the models with timm.

### Image Classification
```python
from urllib.request import urlopen
from PIL import Image
import timm
import torch
import smpconv_timm  # registers the SMPConv models with timm

img = Image.open(urlopen(
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
))

model = timm.create_model('{name}', pretrained=True)
model = model.eval()

# get model specific transforms (normalization, resize)
data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1

top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k=5)
```

### Feature Map Extraction
```python
from urllib.request import urlopen
from PIL import Image
import timm
import smpconv_timm  # registers the SMPConv models with timm

img = Image.open(urlopen(
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
))

model = timm.create_model('{name}', pretrained=True, features_only=True)
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

output = model(transforms(img).unsqueeze(0))

for o in output:
    # print shape of each feature map in output
    # (C, H, W) per stage at {h}x{w}: {feature_shapes}
    print(o.shape)
```

### Image Embeddings
```python
from urllib.request import urlopen
from PIL import Image
import timm
import smpconv_timm  # registers the SMPConv models with timm

img = Image.open(urlopen(
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
))

model = timm.create_model('{name}', pretrained=True, num_classes=0)  # remove classifier nn.Linear
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

output = model(transforms(img).unsqueeze(0))  # output is (batch_size, num_features) shaped tensor: (1, {model.num_features})

# or equivalently (without needing to set num_classes=0)
output = model.forward_features(transforms(img).unsqueeze(0))
# output is unpooled, a {pool_shape} shaped tensor
output = model.forward_head(output, pre_logits=True)
# output is a (1, num_features) shaped tensor
```

The weights come from the Hub repo `{HF_HUB_NAMESPACE}/{name}` by default; a mirror or fork is used with
`SMPCONV_HF_NAMESPACE=<namespace>` or `timm.create_model('hf-hub:<namespace>/{name}', pretrained=True)`."""
    top1 = PAPER_TOP1.get(variant)
    comparison = (
        f'ImageNet-1k validation top-1 **as reported in the paper** ({cfg["paper_name"]}, CVPR 2023); '
        f'it was not re-measured for this upload. Params, GMACs (fvcore, one multiply-add counted once) and '
        f'activations were measured on this model at {h}x{w} when the repo was built.\n\n'
        f'| model | top-1 (paper) | params (M) | GMACs | activations (M) | image size |\n'
        f'|---|---|---|---|---|---|\n'
        f'| {name} | {top1 if top1 is not None else "-"} | {complexity.params / 1e6:.1f} | '
        f'{complexity.flops / 1e9:.2f} | {complexity.activations / 1e6:.1f} | {h} |')
    return {
        'tags': ['image-classification', 'timm'],
        'license': cfg.get('license', 'mit'),
        'description': (
            f'An SMPConv image classification model ({variant}) trained on ImageNet-1k by the paper authors. '
            f'These are {weights_text} of the authors\' released checkpoint, converted to timm\'s format by '
            f'smpconv-timm, the package that holds the model code.'),
        'details': {
            'Model Type': 'Image classification / feature backbone',
            'Model Stats': {
                'Params (M)': f'{complexity.params / 1e6:.1f}',
                'GMACs': f'{complexity.flops / 1e9:.2f}',
                'Activations (M)': f'{complexity.activations / 1e6:.1f}',
                'Image size': f'{h} x {w}',
            },
            'Papers': {cfg['paper_name']: paper_url},
            'Original': cfg['origin_url'],
            'Dataset': 'ImageNet-1k',
            'Weights': f'{weights_text} of `{source}` (sha256 `{source_sha256}`)',
        },
        'usage': usage,
        'comparison': comparison,
        'citation': [_CITATION, _TIMM_CITATION],
    }


# ---------------------------------------------------------------------------------------------------------
# Publishing

def default_repo_id(architecture: str, tag: str = PRETRAINED_TAG) -> str:
    """The repo ``timm.create_model(architecture, pretrained=True)`` downloads from: ``<namespace>/<name>.<tag>``."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(f'{architecture}.{tag}')
    return cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else f'{HF_HUB_NAMESPACE}/{architecture}.{tag}'


def _read_folder(folder: Path) -> Tuple[Dict[str, Any], List[Path]]:
    if not folder.is_dir():
        raise FileNotFoundError(f'not a folder: {folder}')
    missing = [f for f in HUB_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f'{folder} is not a Hub folder built by `smpconv-timm convert`: it lacks {", ".join(missing)}')
    config = json.loads((folder / 'config.json').read_text())
    return config, [folder / f for f in HUB_FILES]


def publish_folder(
        folder: Union[str, os.PathLike],
        repo_id: Optional[str] = None,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        token: Optional[str] = None,
        dry_run: bool = False,
        api: Optional[Any] = None,
        log: Callable[[str], None] = print,
):
    """Upload a folder built by ``build_hub_folder`` to ``repo_id`` (default: the repo ``pretrained=True`` reads).

    Creates the repo if needed (``private`` applies to a new repo), the branch ``revision`` if it does not
    exist, and uploads ``README.md``, ``config.json`` and ``model.safetensors`` in one commit. The token is
    ``token``, else huggingface_hub's (``HF_TOKEN``, then the ``hf auth login`` file). ``dry_run`` prints the
    plan and contacts nothing. Returns huggingface_hub's ``CommitInfo`` (None for a dry run).
    """
    from huggingface_hub import HfApi, constants, get_token
    import timm
    from . import __version__
    folder = Path(folder)
    config, files = _read_folder(folder)
    arch, tag = config['architecture'], config.get('pretrained_cfg', {}).get('tag') or PRETRAINED_TAG
    repo_id = repo_id or default_repo_id(arch, tag)
    commit_message = commit_message or f'Add {arch}.{tag} weights (smpconv-timm {__version__})'
    where = f'{constants.ENDPOINT}/{repo_id} (revision {revision or "main"}, {"private" if private else "public"})'
    if dry_run:
        log(f'dry run, nothing uploaded: would upload {len(files)} files to {where}, '
            f'commit message {commit_message!r}:')
        for f in files:
            log(f'  {f.name:<20} {f.stat().st_size:>12,d} bytes  sha256 {_sha256(f)}')
        return None
    if api is None:
        if not (token or get_token()):
            raise ValueError(
                'publishing needs a Hugging Face token with write access to the namespace: run `hf auth login`, '
                'set HF_TOKEN, or pass --token')
        api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
    log(f'uploading {", ".join(f.name for f in files)} to {where}')
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo_url, 'repo_id', None) or repo_id
    if revision and revision != 'main':
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message,
        allow_patterns=list(HUB_FILES))
    log(f'published: {getattr(info, "commit_url", info)}')
    return info


def publish(
        source: Union[str, os.PathLike],
        repo_id: Optional[str] = None,
        *,
        model_name: Optional[str] = None,
        use_ema: bool = True,
        log: Callable[[str], None] = print,
        **kwargs,
):
    """``publish_folder`` for a folder, or for an authors' checkpoint converted (and verified) on the way."""
    source = Path(source)
    if source.is_dir():
        return publish_folder(source, repo_id, log=log, **kwargs)
    raw_refused = ('raw (non-EMA) weights need an explicit repo id (--repo-id): the default repo serves the EMA '
                   'weights, the ones the paper evaluates')
    if not use_ema and repo_id is None:
        raise ValueError(raw_refused)
    with tempfile.TemporaryDirectory(prefix='smpconv-hub-') as tmp:
        built = build_hub_folder(source, Path(tmp) / 'repo', model_name=model_name, use_ema=use_ema, log=log)
        if built.weights == 'raw' and repo_id is None:
            raise ValueError(f'{source} holds no EMA weights; {raw_refused}')
        return publish_folder(built.path, repo_id, log=log, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Downloading: clear errors, damaged files refused

def _hub_location(pretrained_cfg: Any) -> Optional[Tuple[str, Optional[str], List[str]]]:
    """(repo_id, revision, files in the order timm's loader tries them) when the load goes to the Hub, else None."""
    if pretrained_cfg is None:
        return None
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import _get_safe_alternatives, hf_split
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, 'to_dict') else dict(pretrained_cfg)
    load_from, loc = _resolve_pretrained_source(cfg)
    if load_from != 'hf-hub':
        return None
    if isinstance(loc, (list, tuple)):
        hub_id, filename = loc
        files = [filename] if filename.endswith('.safetensors') else list(_get_safe_alternatives(filename)) + [filename]
    else:
        hub_id, files = loc, [WEIGHTS_FILE, 'pytorch_model.bin']  # load_state_dict_from_hf's default order
    repo_id, revision = hf_split(hub_id)
    if cfg.get('source') == 'hf-hub':
        files = files + ['config.json']  # create_model('hf-hub:...') fetched it first
    return repo_id, revision, files


def _exception_chain(e: BaseException) -> List[BaseException]:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _download_problem(e: BaseException, revision: Optional[str]) -> Optional[str]:
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RepositoryNotFoundError, RevisionNotFoundError)
    chain = _exception_chain(e)
    root = chain[-1]
    if any(isinstance(x, OfflineModeIsEnabled) for x in chain) or (
            constants.is_offline_mode() and any(isinstance(x, LocalEntryNotFoundError) for x in chain)):
        return 'offline mode is on (HF_HUB_OFFLINE=1) and the file is not in the local cache'
    for x in chain:
        if isinstance(x, GatedRepoError):
            return 'the repository is gated: accept its conditions on the Hub and log in (`hf auth login` or HF_TOKEN)'
        if isinstance(x, RepositoryNotFoundError):
            return ('the repository does not exist at this endpoint (or it is private and no token with access '
                    'was found: `hf auth login` or HF_TOKEN)')
        if isinstance(x, RevisionNotFoundError):
            return f'the repository has no revision {revision!r}'
        if isinstance(x, LocalEntryNotFoundError):
            cause = '' if root is x else f' ({type(root).__name__}: {root})'
            return f'the endpoint could not be reached{cause} and the file is not in the local cache'
        if isinstance(x, EntryNotFoundError):
            return 'the repository holds none of these files'
        if isinstance(x, HfHubHTTPError):
            status = getattr(getattr(x, 'response', None), 'status_code', '?')
            return f'the server answered HTTP {status}: {str(x).splitlines()[0]}'
        if isinstance(x, OSError) and 'Consistency check failed' in str(x):
            return ('the download was incomplete (fewer bytes than the Hub announced: a truncated transfer); '
                    'nothing was cached, try again')
        if type(x).__module__.split('.')[0] in ('httpx', 'httpx2', 'httpcore', 'httpcore2', 'requests', 'urllib3'):
            return f'network error: {type(x).__name__}: {x}'
    return None


def _verify_cached(path: str) -> Optional[str]:
    """None if a cached file's content hashes to its blob name (the ETag: sha256 for LFS, git sha1 otherwise)."""
    blob = os.path.realpath(path)
    etag = os.path.basename(blob)
    if re.fullmatch(r'[0-9a-f]{64}', etag):
        got = _sha256(Path(blob))
    elif re.fullmatch(r'[0-9a-f]{40}', etag):
        from huggingface_hub.utils.sha import git_hash
        got = git_hash(Path(blob).read_bytes())
    else:
        return None  # no symlinked blob store (e.g. Windows without symlinks): nothing to check against
    if got == etag:
        return None
    return f'its content hashes to {got}, the Hub announced {etag}'


def _check_cache(repo_id: str, revision: Optional[str], files: List[str], cache_dir: Optional[str]) -> Optional[str]:
    """Verify the cached copies of ``files``; remove a damaged one from the cache and describe it."""
    from huggingface_hub import try_to_load_from_cache
    for name in files:
        path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        if not isinstance(path, str):
            continue
        problem = _verify_cached(path)
        if problem:
            blob = os.path.realpath(path)
            for p in {path, blob}:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
            return f'the downloaded {name} is damaged ({problem}); it was removed from the cache, try again'
    return None


@contextlib.contextmanager
def hub_errors(pretrained_cfg: Any, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Iterator[None]:
    """Wrap a timm pretrained load: clear errors for Hub downloads, damaged cached files refused and evicted.

    ``pretrained_cfg`` is the resolved pretrained config (``PretrainedCfg`` or dict) or None; only loads that
    timm sends to the Hugging Face Hub are affected. Raises ``PretrainedWeightsError`` (an OSError) naming the
    repo, revision, endpoint, files tried and cache, and how to load a local file instead; adds the repo to a
    CheckpointError raised by the checkpoint filter (e.g. weights of another architecture).
    """
    location = _hub_location(pretrained_cfg)
    if location is None:
        yield
        return
    from huggingface_hub import constants
    repo_id, revision, files = location
    cache = str(cache_dir) if cache_dir else constants.HF_HUB_CACHE
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, 'to_dict') else dict(pretrained_cfg)
    arch = cfg.get('architecture') or 'the model'
    weight_files = [f for f in files if f != 'config.json']

    def error(problem: str) -> PretrainedWeightsError:
        return PretrainedWeightsError(
            f'cannot load the pretrained weights of {arch}: {problem}.\n'
            f'  tried: repo {repo_id!r} (revision {revision or "main"!r}) at {constants.ENDPOINT}, '
            f'file {" then ".join(repr(f) for f in weight_files)}\n'
            f'  local cache: {cache}\n'
            f'  to load a local copy instead (the repo\'s model.safetensors, or the authors\' release .pth):\n'
            f'    timm.create_model({arch!r}, pretrained=True, '
            f'pretrained_cfg_overlay=dict(file=\'/path/to/model.safetensors\'))\n'
            f'  a mirror of the weights: set SMPCONV_HF_NAMESPACE=<namespace>, or HF_ENDPOINT for a Hub mirror')

    try:
        yield
    except PretrainedWeightsError:
        raise
    except Exception as e:
        damaged = _check_cache(repo_id, revision, files, cache)
        if damaged:
            raise error(damaged) from e
        if isinstance(e, CheckpointError):  # checkpoint_filter_fn's findings: the download itself was fine
            raise CheckpointError(f'{e} (weights from {constants.ENDPOINT}/{repo_id})') from e
        problem = _download_problem(e, revision)
        if problem is None:
            raise
        raise error(problem) from e
    damaged = _check_cache(repo_id, revision, files, cache)
    if damaged:
        raise error(damaged)


# ---------------------------------------------------------------------------------------------------------
# Command line

def _convert_cmd(args: argparse.Namespace) -> int:
    try:
        build_hub_folder(args.checkpoint, args.output, model_name=args.model, use_ema=not args.raw,
                         overwrite=args.overwrite)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise RuntimeError(f'{type(e).__name__}: {e}') from e  # e.g. the output exists, the disk is full
    return 0


def _publish_cmd(args: argparse.Namespace) -> int:
    from huggingface_hub.utils import HfHubHTTPError
    try:
        publish(args.source, args.repo_id, model_name=args.model, use_ema=not args.raw, private=args.private,
                revision=args.revision, commit_message=args.commit_message, token=args.token, dry_run=args.dry_run)
    except HfHubHTTPError as e:
        raise RuntimeError(f'the Hub refused the upload: {e}') from e
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise RuntimeError(f'{type(e).__name__}: {e}') from e
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert`` and ``publish`` on the ``smpconv-timm`` command line."""
    from . import MODEL_NAMES
    p = subparsers.add_parser(
        'convert', help="an authors' checkpoint -> a Hub model repo folder (safetensors, config.json, model card)",
        description="Convert an authors' SMPConv checkpoint (.pth, any release layout) into a Hugging Face Hub "
                    "model repo folder as timm writes one, verified before anything is written.")
    p.add_argument('checkpoint', help="the authors' checkpoint (.pth)")
    p.add_argument('-o', '--output', help='output folder (default: ./<model>.in1k)')
    p.add_argument('--model', choices=MODEL_NAMES, help='expected architecture (default: read off the keys)')
    p.add_argument('--raw', action='store_true', help='convert the raw weights instead of the EMA ones')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    p.set_defaults(func=_convert_cmd)

    p = subparsers.add_parser(
        'publish', help="upload a converted folder (or convert an authors' .pth and upload it) to the Hub",
        description='Upload a Hub folder built by `convert`, or an authors\' checkpoint converted on the way, to '
                    f'the Hugging Face Hub (default repo: {HF_HUB_NAMESPACE}/<model>.in1k, the one pretrained=True '
                    'reads; namespace from SMPCONV_HF_NAMESPACE). Token: --token, HF_TOKEN or `hf auth login`.')
    p.add_argument('source', help="a folder built by `smpconv-timm convert`, or the authors' checkpoint (.pth)")
    p.add_argument('--repo-id', help='target repo <namespace>/<name> (default: the one pretrained=True reads)')
    p.add_argument('--model', choices=MODEL_NAMES, help='expected architecture of a .pth source')
    p.add_argument('--raw', action='store_true', help='a .pth source: publish its raw weights instead of EMA')
    p.add_argument('--private', action='store_true', help='create the repo private (a new repo only)')
    p.add_argument('--revision', help='branch to commit to (created if missing; default main)')
    p.add_argument('--commit-message', help='commit message')
    p.add_argument('--token', help='Hub token (default: HF_TOKEN or the `hf auth login` token)')
    p.add_argument('--dry-run', action='store_true', help='list what would be uploaded, contact nothing')
    p.set_defaults(func=_publish_cmd)
