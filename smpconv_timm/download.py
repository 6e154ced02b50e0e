"""The download guard: clear errors for pretrained weights fetched from the Hugging Face Hub, damaged files refused.

``hub_errors`` wraps the pretrained load of ``_create_smpconv``. Download failures (missing repo or file,
unreachable endpoint, offline mode without a cached copy, incomplete download) become a
``PretrainedWeightsError`` naming the repo, revision, endpoint and files tried and how to load a local file
instead; a cached weight file whose content does not hash to the ETag the Hub announced (sha256 for LFS files) is
removed from the cache and refused. Nothing here uploads: publishing is ``hub/publish.py`` in the repository.

The endpoint, cache and offline mode are huggingface_hub's (``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``); the namespace is ``variants.HF_HUB_NAMESPACE`` (env ``SMPCONV_HF_NAMESPACE``).
"""
import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple, Union

from .checkpoint import CheckpointError

__all__ = ['PretrainedWeightsError', 'WEIGHTS_FILE', 'hub_errors', 'sha256_file']

WEIGHTS_FILE = 'model.safetensors'  # timm's HF_SAFE_WEIGHTS_NAME: what timm's hub loader looks for first


class PretrainedWeightsError(OSError):
    """Pretrained weights could not be fetched from the Hub (or the copy fetched was damaged)."""


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file (the Hub's ETag of an LFS file)."""
    from ._compat import sha_fileobj
    with open(path, 'rb') as f:
        return sha_fileobj(f).hex()


def _hub_location(pretrained_cfg: Any) -> Optional[Tuple[str, Optional[str], List[str]]]:
    """(repo_id, revision, files in the order timm's loader tries them) when the load goes to the Hub, else None."""
    if pretrained_cfg is None:
        return None
    from ._compat import _get_safe_alternatives, _resolve_pretrained_source, hf_split
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
    from huggingface_hub.utils import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
        RepositoryNotFoundError, RevisionNotFoundError)
    from ._compat import is_offline_mode
    chain = _exception_chain(e)
    root = chain[-1]
    if any(isinstance(x, OfflineModeIsEnabled) for x in chain) or (
            is_offline_mode() and any(isinstance(x, LocalEntryNotFoundError) for x in chain)):
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
        got = sha256_file(blob)
    elif re.fullmatch(r'[0-9a-f]{40}', etag):
        from ._compat import git_hash
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
