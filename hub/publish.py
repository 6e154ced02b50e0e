"""Publishing: the authors' checkpoints in, a verified timm Hugging Face Hub repo out, uploaded.

* ``build_hub_folder``: an authors' release checkpoint (.pth, any layout ``checkpoint_filter_fn`` reads) -> a
  folder exactly as timm's ``push_to_hf_hub`` uploads one, written with timm's own ``save_for_hf`` and
  ``generate_readme``: ``model.safetensors`` (fp32, the model's own key names, EMA weights by default),
  ``config.json`` (architecture, num_classes, model_args, pretrained_cfg, ImageNet label names; loadable by
  transformers' ``AutoModelForImageClassification`` too, ``smpconv_timm.hf``) and a
  ``README.md`` model card whose numbers (params, fvcore GMACs, activations) are measured while it is built.
  Everything is checked before the folder appears, under a temporary name renamed into place at the end: the
  architecture read off the keys, every tensor finite and float32, the written weights bit-equal to the loaded
  ones, the folder's config parsed back by timm, and the converted model's output equal (to 1e-5 x max|logit|;
  bit-equal in practice) to the output of the release checkpoint loaded the user's way
  (``pretrained_cfg_overlay=dict(file=...)``).
* ``publish_folder`` / ``publish``: create the repo, optionally a branch, and upload the folder with
  ``huggingface_hub.HfApi`` (token: ``--token``, else ``HF_TOKEN`` or the ``hf auth login`` file). ``dry_run``
  lists what would be uploaded and contacts nothing.
* ``main``: the command line, run from a clone of the repository with smpconv-timm installed:
  ``python hub/publish.py convert RELEASE.pth`` and ``python hub/publish.py publish FOLDER_OR_PTH`` (see
  ``hub/README.md``). Nothing in the installed ``smpconv_timm`` package can upload.

The Hub namespace is ``smpconv_timm.variants.HF_HUB_NAMESPACE`` (env ``SMPCONV_HF_NAMESPACE``); the endpoint and
token are huggingface_hub's (``HF_ENDPOINT``, ``HF_TOKEN``).
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from smpconv_timm import MODEL_NAMES, VARIANTS, __version__
from smpconv_timm.checkpoint import is_ema_key, load_checkpoint_file, recognise_variant, weights_key
from smpconv_timm.cli import run_command
from smpconv_timm.download import WEIGHTS_FILE, sha256_file
from smpconv_timm.variants import HF_HUB_NAMESPACE, PRETRAINED_TAG

__all__ = ['HUB_FILES', 'HubFolder', 'build_hub_folder', 'model_card', 'default_repo_id', 'publish_folder', 'publish',
           'main']

#: the files of a Hub model repo, as timm's ``push_to_hf_hub`` writes them (safetensors only: no pickle)
HUB_FILES = ('README.md', 'config.json', WEIGHTS_FILE)

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
def _weight_set(path: Path, use_ema: bool) -> str:
    """'EMA' or 'raw': which weights of a training checkpoint ``load_checkpoint_file`` picks."""
    if path.suffix == '.safetensors':
        return 'as stored'
    from smpconv_timm._compat import torch_load as _torch_load
    try:
        ckpt = _torch_load(str(path), map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # mmap needs the zip format; the file itself was already read once successfully
        ckpt = _torch_load(str(path), map_location='cpu', weights_only=True)
    key = weights_key(ckpt, use_ema) if isinstance(ckpt, dict) else None
    if key is None:
        return 'as stored'
    return 'EMA' if is_ema_key(key) else 'raw'

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
    from smpconv_timm.hf import save_for_hf
    from smpconv_timm._compat import generate_readme, load_model_config_from_path
    from smpconv_timm.flops import model_complexity

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
            model_config=dict(label_names=info.label_names(), label_descriptions=info.label_descriptions(as_dict=True)),
            # newer timm records these itself; older releases write only the model_args they are given (num_classes
            # stays out of model_args: transformers' TimmWrapper passes it itself, see smpconv_timm.hf)
            model_args=dict(in_chans=reference.in_chans, global_pool=reference.head.global_pool.pool_type))
        card = model_card(reference, complexity, source=checkpoint.name, source_sha256=sha256_file(checkpoint),
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
    usage = f"""The model code is not part of timm: `pip install smpconv-timm`, and every program that imports timm finds
the models (no `import smpconv_timm` needed).

### Image Classification
```python
from urllib.request import urlopen
from PIL import Image
import timm
import torch

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

### With transformers
The same repo loads in transformers (4.47 or newer: its `TimmWrapper` runs the timm model), for its pipelines and
its `Trainer`; the logits are timm's.
```python
from urllib.request import urlopen
from PIL import Image
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

img = Image.open(urlopen(
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
))

classifier = pipeline('image-classification', model='{HF_HUB_NAMESPACE}/{name}')
print(classifier(img))  # labels: the ImageNet class ids of config.json's label_names

processor = AutoImageProcessor.from_pretrained('{HF_HUB_NAMESPACE}/{name}')
model = AutoModelForImageClassification.from_pretrained('{HF_HUB_NAMESPACE}/{name}').eval()
with torch.no_grad():
    logits = model(**processor(img, return_tensors='pt')).logits

# fine-tuning on 10 classes: a new head, and a loss when labels are given
model = AutoModelForImageClassification.from_pretrained(
    '{HF_HUB_NAMESPACE}/{name}', num_labels=10, ignore_mismatched_sizes=True)
loss = model(**processor(img, return_tensors='pt'), labels=torch.tensor([3])).loss
```
A fine-tuned model saved with `smpconv_timm.save_for_hf(model, folder)` (timm's `save_for_hf`, with a config.json
transformers also reads) loads in both the same way.

The weights come from the Hub repo `{HF_HUB_NAMESPACE}/{name}` by default; a mirror or fork is used with
`SMPCONV_HF_NAMESPACE=<namespace>` or `timm.create_model('hf-hub:<namespace>/{name}', pretrained=True)`."""
    top1 = VARIANTS[variant].paper_top1 if variant in VARIANTS else None
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
        raise ValueError(f'{folder} is not a Hub folder built by `python hub/publish.py convert`: it lacks {", ".join(missing)}')
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
            log(f'  {f.name:<20} {f.stat().st_size:>12,d} bytes  sha256 {sha256_file(f)}')
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python hub/publish.py', description="Convert the authors' SMPConv checkpoints into Hugging Face Hub "
                                                 "model repos as timm writes them, and upload them.")
    subparsers = parser.add_subparsers(dest='command', required=True)
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
    p.add_argument('source', help="a folder built by `convert`, or the authors' checkpoint (.pth)")
    p.add_argument('--repo-id', help='target repo <namespace>/<name> (default: the one pretrained=True reads)')
    p.add_argument('--model', choices=MODEL_NAMES, help='expected architecture of a .pth source')
    p.add_argument('--raw', action='store_true', help='a .pth source: publish its raw weights instead of EMA')
    p.add_argument('--private', action='store_true', help='create the repo private (a new repo only)')
    p.add_argument('--revision', help='branch to commit to (created if missing; default main)')
    p.add_argument('--commit-message', help='commit message')
    p.add_argument('--token', help='Hub token (default: HF_TOKEN or the `hf auth login` token)')
    p.add_argument('--dry-run', action='store_true', help='list what would be uploaded, contact nothing')
    p.set_defaults(func=_publish_cmd)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(build_parser().parse_args(argv), 'publish.py')


if __name__ == '__main__':
    sys.exit(main())
