"""The download guard: clear errors for pretrained weights fetched from the Hugging Face Hub, damaged files refused.

``hub_errors`` wraps the pretrained load of ``_create_smpconv``; ``guard_hf_hub_configs`` wraps the ``config.json``
download timm makes for ``create_model('hf-hub:<namespace>/smpconv_...')`` before any model code runs.

- Where no server answers at the endpoint (connection refused, a name that does not resolve, no route, a
  timeout) and the file is not cached, one request finds that out and the load fails at once: huggingface_hub
  would retry for about 25 s per file, and timm tries two files. Where a server answers, timm and
  huggingface_hub do exactly what they do on their own (their retries included), plus that one request.
- Failures (missing repo, revision or file, an HTTP error, offline mode without a cached copy, an incomplete
  download) become a ``PretrainedWeightsError`` naming what happened, the repo, revision, endpoint and files
  tried, and how to load a local file instead.
- A cached file whose content does not hash to the ETag the Hub announced (sha256 for LFS files) is removed from
  the cache and refused; so are partial downloads (``blobs/*.incomplete``) that huggingface_hub 1.0 - 1.19 leave
  behind when a transfer is cut, unless another process is still writing them.

The endpoint, cache and offline mode are huggingface_hub's (``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ``HF_HUB_ETAG_TIMEOUT``); the namespace is ``variants.HF_HUB_NAMESPACE`` (env
``SMPCONV_HF_NAMESPACE``). Nothing here uploads: publishing is ``hub/publish.py`` in the repository.
"""
import contextlib
import functools
import os
import re
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple, Union

from .checkpoint import CheckpointError

__all__ = ['PretrainedWeightsError', 'WEIGHTS_FILE', 'hub_errors', 'guard_hf_hub_configs', 'sha256_file']

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


def _http_status(chain: List[BaseException]) -> Optional[Tuple[int, str, Any]]:
    """(status, reason, headers) of the first HTTP response in the chain: the server answered. None: it did not."""
    for x in chain:
        response = getattr(x, 'response', None)
        status = getattr(response, 'status_code', None)
        if isinstance(status, int):
            reason = getattr(response, 'reason_phrase', None) or getattr(response, 'reason', None) or ''
            return status, str(reason), getattr(response, 'headers', {}) or {}
    return None


# the HTTP clients huggingface_hub has used: requests (< 1.0), httpx (1.x), httpx2 (2.x)
_HTTP_CLIENTS = ('requests', 'urllib3', 'httpx', 'httpcore', 'httpx2', 'httpcore2', 'h11')


def _network_failure(chain: List[BaseException]) -> Optional[str]:
    """``'<type>: <message>'`` of the root cause when the chain is a failure to reach a server (no HTTP answer)."""
    from huggingface_hub.utils import OfflineModeIsEnabled
    if _http_status(chain) is not None or any(isinstance(x, OfflineModeIsEnabled) for x in chain):
        return None
    if not any(isinstance(x, OSError) or type(x).__module__.split('.')[0] in _HTTP_CLIENTS for x in chain):
        return None
    root = chain[-1]
    return f'{type(root).__name__}: {root}'


def _download_problem(e: BaseException, revision: Optional[str], endpoint: str) -> Optional[str]:
    """What went wrong in a failed download, in a few words; None for a failure that is no download problem."""
    from huggingface_hub.utils import (
        EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
        RevisionNotFoundError)
    from ._compat import is_offline_mode
    chain = _exception_chain(e)
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
        if isinstance(x, EntryNotFoundError) and not isinstance(x, LocalEntryNotFoundError):
            return 'the repository holds none of these files'
    answer = _http_status(chain)
    if answer is not None:
        status, reason, headers = answer
        hub = any(h in headers for h in ('X-Error-Code', 'X-Repo-Commit', 'x-error-code', 'x-repo-commit'))
        hint = '' if hub or status >= 500 else ' (with none of the Hub\'s headers: is HF_ENDPOINT a Hugging Face Hub?)'
        return f'the server at {endpoint} answered HTTP {status}{" " + reason if reason else ""}{hint}'
    if any(isinstance(x, OSError) and 'Consistency check failed' in str(x) for x in chain):
        return ('the download was incomplete (fewer bytes than the Hub announced: a truncated transfer); '
                'nothing was cached, try again')
    failure = _network_failure(chain)
    if failure is not None:
        return f'the connection to {endpoint} failed ({failure}) and the file is not in the local cache'
    local = next((x for x in chain if isinstance(x, LocalEntryNotFoundError)), None)
    if local is not None:
        return f'the file could not be fetched and is not in the local cache ({str(local).splitlines()[0]})'
    return None


def _no_server_answers(repo_id: str, revision: Optional[str], files: List[str], cache: str) -> Optional[str]:
    """Where the load would download (no file cached, not offline): ask the endpoint once, without retries.

    None when a server answers (whatever it answers) or nothing needs downloading; else the cause.
    """
    from huggingface_hub import constants, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import http_backoff
    from ._compat import http_no_redirects, is_offline_mode
    if is_offline_mode() or any(
            isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache, revision=revision), str) for f in files):
        return None
    timeout = getattr(constants, 'HF_HUB_ETAG_TIMEOUT', None) or getattr(constants, 'DEFAULT_ETAG_TIMEOUT', 10)
    try:  # huggingface_hub's own HTTP client (its proxies, its offline switch), one request, no retry
        http_backoff('HEAD', hf_hub_url(repo_id, files[0], revision=revision), max_retries=0, retry_on_exceptions=(),
                     retry_on_status_codes=(), timeout=timeout, **http_no_redirects())
    except Exception as e:  # noqa: BLE001  (an answer, or an error that is not ours to judge here: the load decides)
        return _network_failure(_exception_chain(e))
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


def _remove_partial_downloads(repo_id: str, cache: str) -> None:
    """Remove the repo's ``blobs/*.incomplete`` that no process is writing (huggingface_hub holds
    ``.locks/<repo folder>/<etag>.lock`` while it writes one)."""
    try:
        from filelock import FileLock, Timeout  # huggingface_hub's own lock (one of its dependencies)
    except ImportError:
        return
    folder = 'models--' + repo_id.replace('/', '--')  # the cache's repo folder
    for partial in Path(cache, folder, 'blobs').glob('*.incomplete'):
        lock = Path(cache, '.locks', folder, partial.name[:-len('.incomplete')] + '.lock')
        with contextlib.suppress(Timeout, OSError):
            lock.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(lock), timeout=0):
                partial.unlink()


def _not_published_note(repo_id: str) -> List[str]:
    from .variants import AUTHORS_RELEASE_URL, HUB_REPOS_PUBLISHED, PUBLISHED_NAMESPACE
    if HUB_REPOS_PUBLISHED or repo_id.split('/')[0] != PUBLISHED_NAMESPACE:
        return []
    return [f"  the {PUBLISHED_NAMESPACE} repos on the Hub have not been published yet; the authors' release "
            f"checkpoints (.pth, Google Drive) are linked from {AUTHORS_RELEASE_URL}"]


@contextlib.contextmanager
def _guard(what: str, arch: str, repo_id: str, revision: Optional[str], files: List[str], checked: List[str],
           cache_dir: Optional[Union[str, os.PathLike]]) -> Iterator[None]:
    """Errors that say what happened for a download of ``files`` (tried in this order) from ``repo_id``; the
    cached copies of ``checked`` are verified afterwards."""
    from huggingface_hub import constants
    cache = str(cache_dir) if cache_dir else constants.HF_HUB_CACHE
    endpoint = constants.ENDPOINT

    def error(problem: str) -> PretrainedWeightsError:
        return PretrainedWeightsError('\n'.join([
            f'cannot load {what}: {problem}.',
            f'  tried: repo {repo_id!r} (revision {revision or "main"!r}) at {endpoint}, '
            f'file {" then ".join(repr(f) for f in files)}',
            f'  local cache: {cache}',
            *_not_published_note(repo_id),
            f'  to load a local copy instead (the repo\'s model.safetensors, or the authors\' release .pth):',
            f'    timm.create_model({arch!r}, pretrained=True, '
            f'pretrained_cfg_overlay=dict(file=\'/path/to/model.safetensors\'))',
            f'  a mirror of the weights: set SMPCONV_HF_NAMESPACE=<namespace>, or HF_ENDPOINT for a Hub mirror']))

    failure = _no_server_answers(repo_id, revision, files, cache)
    if failure is not None:
        raise error(f'no Hub server answered at {endpoint} ({failure}) and the file is not in the local cache')
    try:
        yield
    except PretrainedWeightsError:
        raise
    except Exception as e:
        _remove_partial_downloads(repo_id, cache)
        damaged = _check_cache(repo_id, revision, checked, cache)
        if damaged:
            raise error(damaged) from e
        if isinstance(e, CheckpointError):  # checkpoint_filter_fn's findings: the download itself was fine
            raise CheckpointError(f'{e} (weights from {endpoint}/{repo_id})') from e
        problem = _download_problem(e, revision, endpoint)
        if problem is None:
            raise
        raise error(problem) from e
    damaged = _check_cache(repo_id, revision, checked, cache)
    if damaged:
        raise error(damaged)


@contextlib.contextmanager
def hub_errors(pretrained_cfg: Any, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Iterator[None]:
    """Wrap a timm pretrained load: clear errors for Hub downloads, damaged cached files refused and evicted.

    ``pretrained_cfg`` is the resolved pretrained config (``PretrainedCfg`` or dict) or None; only loads that
    timm sends to the Hugging Face Hub are affected. Raises ``PretrainedWeightsError`` (an OSError) naming what
    happened, the repo, revision, endpoint, files tried and cache, and how to load a local file instead; adds the
    repo to a CheckpointError raised by the checkpoint filter (e.g. weights of another architecture).
    """
    location = _hub_location(pretrained_cfg)
    if location is None:
        yield
        return
    repo_id, revision, files = location
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, 'to_dict') else dict(pretrained_cfg)
    arch = cfg.get('architecture') or 'the model'
    weight_files = [f for f in files if f != 'config.json']
    with _guard(f'the pretrained weights of {arch}', arch, repo_id, revision, weight_files, files, cache_dir):
        yield


def _smpconv_repo(repo_id: str) -> Optional[str]:
    """The architecture a Hub repo of smpconv weights holds (``<namespace>/smpconv_t.in1k`` -> ``smpconv_t``)."""
    from .variants import MODEL_NAMES
    arch = repo_id.rsplit('/', 1)[-1].split('.', 1)[0]
    return arch if arch in MODEL_NAMES else None


def guard_hf_hub_configs() -> None:
    """Route timm's ``config.json`` download for ``create_model('hf-hub:<namespace>/smpconv_...')`` through the
    guard; other repos load exactly as before. Idempotent."""
    from ._compat import hf_split, timm_factory
    load = getattr(timm_factory, 'load_model_config_from_hf', None)
    if load is None or getattr(load, '_smpconv_guard', False):
        return

    @functools.wraps(load)
    def load_model_config_from_hf(model_id: str, *args, **kwargs):
        repo_id, revision = hf_split(model_id)
        arch = _smpconv_repo(repo_id)
        if arch is None:
            return load(model_id, *args, **kwargs)
        with _guard(f'hf-hub:{model_id}', arch, repo_id, revision, ['config.json'], ['config.json'],
                    kwargs.get('cache_dir')):
            return load(model_id, *args, **kwargs)

    load_model_config_from_hf._smpconv_guard = True
    timm_factory.load_model_config_from_hf = load_model_config_from_hf
