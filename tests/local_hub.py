"""A Hugging Face Hub on 127.0.0.1, for tests: the part of the Hub HTTP protocol huggingface_hub speaks.

Two real HTTP servers (standard library only): the Hub itself, and a "CDN" on another port, addressed as
``localhost`` (the Hub as ``127.0.0.1``), that serves and stores LFS blobs, as the real Hub redirects large files
to a storage host.

Downloads (``hf_hub_download``)
    ``HEAD/GET /{repo}/resolve/{revision}/{path}``: regular files answer 200 with ``ETag`` (git blob sha1),
    ``X-Repo-Commit`` and ``Content-Length``; LFS files answer 302 to the CDN with ``X-Linked-Etag`` (the
    sha256), ``X-Linked-Size`` and ``X-Repo-Commit``. Errors carry ``X-Error-Code`` (``RepoNotFound``,
    ``RevisionNotFound``, ``EntryNotFound``) the way the Hub sends them.
Repo info (``HfApi.model_info``, which some clients ask before an upload)
    ``GET /api/models/{repo}[/revision/{revision}]``: id, commit sha, privacy, ``xetEnabled: false``, file names.
Uploads (``HfApi.create_repo`` / ``create_branch`` / ``upload_folder``)
    ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``, ``POST /api/validate-yaml``,
    ``POST /api/models/{repo}/preupload/{revision}``, ``POST /{repo}.git/info/lfs/objects/batch`` (basic
    transfer: the client PUTs each blob to the CDN, which checks its sha256 and size), and
    ``POST /api/models/{repo}/commit/{revision}`` (ndjson: header, base64 files, LFS pointers). Writes need
    ``Authorization: Bearer <token>``; private repos need it for reads too.

Faults for tests: ``cdn_fault = ('truncate', n_bytes)`` serves LFS blobs cut to ``n_bytes`` (the HEAD still
announces the full size), ``('corrupt', offset)`` flips one byte at ``offset`` (same size, wrong content).
``hub_status = code`` answers every request to the Hub with that HTTP status and none of the Hub's headers, as a
server that is no Hub (or a Hub that is down) does.
``requests`` records (server, method, path, authorization header) of every request.

Not covered: Xet storage (tests set ``HF_HUB_DISABLE_XET``: the client then uses the LFS protocol, as any
client without ``hf_xet`` does), multipart LFS uploads, pull requests, tree / file listing APIs.
"""
import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = ('.safetensors', '.bin', '.pth', '.pt', '.ckpt', '.npz', '.onnx')
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class _File:
    def __init__(self, data: Optional[bytes] = None, lfs_oid: Optional[str] = None, size: int = 0):
        self.data, self.lfs_oid, self.size = data, lfs_oid, size


class _Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id, self.private = repo_id, private
        self.commits: Dict[str, dict] = {}
        self.branches: Dict[str, str] = {}
        gitattributes = b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n'
        self.branches['main'] = self.commit(None, 'initial commit', {'.gitattributes': _File(gitattributes)})

    def commit(self, parent: Optional[str], summary: str, files: Dict[str, _File]) -> str:
        sha = hashlib.sha1(f'{self.repo_id}:{parent}:{summary}:{time.time_ns()}:{len(self.commits)}'.encode()).hexdigest()
        self.commits[sha] = dict(parent=parent, summary=summary, files=files)
        return sha

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class LocalHub:
    """Start with ``with LocalHub(token) as hub:``; ``hub.endpoint`` is the value for ``HF_ENDPOINT``."""

    def __init__(self, token: str = 'hf_local_write_token'):
        self.token = token
        self.repos: Dict[str, _Repo] = {}
        self.lfs: Dict[str, bytes] = {}
        self.requests: List[Tuple[str, str, str, Optional[str]]] = []
        self.cdn_fault: Optional[Tuple[str, int]] = None
        self.hub_status: Optional[int] = None
        self._pending: Dict[str, int] = {}  # LFS uploads announced by a batch call: oid -> size
        self.lock = threading.Lock()
        self._hub = ThreadingHTTPServer(('127.0.0.1', 0), self._handler('hub'))
        self._cdn = ThreadingHTTPServer(('127.0.0.1', 0), self._handler('cdn'))
        self._threads = []

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self._hub.server_address[1]}'

    @property
    def cdn(self) -> str:
        # another host name than the Hub's, as the real storage host has: clients follow redirects within the Hub
        # and stop at the storage host, where the file's metadata is on the redirect itself
        return f'http://localhost:{self._cdn.server_address[1]}'

    def __enter__(self) -> 'LocalHub':
        for server in (self._hub, self._cdn):
            t = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    # ---- state seen by tests ----------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        repo = self.repos[repo_id]
        files = repo.commits[repo.resolve(revision)]['files']
        return {p: f.data if f.lfs_oid is None else self.lfs[f.lfs_oid] for p, f in files.items()}

    def add_repo(self, repo_id: str, files: Optional[Dict[str, bytes]] = None, private: bool = False) -> None:
        """Put a repo on the server directly (for download tests that need a repo in some odd state)."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, _Repo(repo_id, private))
            entries = dict(repo.commits[repo.branches['main']]['files'])
            for path, data in (files or {}).items():
                entries[path] = self._store(path, data)
            repo.branches['main'] = repo.commit(repo.branches['main'], 'add files', entries)

    def count(self, server: str = 'hub') -> int:
        return sum(1 for r in self.requests if r[0] == server)

    def _store(self, path: str, data: bytes) -> _File:
        if path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE:
            oid = hashlib.sha256(data).hexdigest()
            self.lfs[oid] = data
            return _File(lfs_oid=oid, size=len(data))
        return _File(data=data, size=len(data))

    # ---- HTTP -------------------------------------------------------------------------------------------

    def _handler(self, server_name: str):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):  # quiet
                pass

            def _route(self, method: str) -> None:
                auth = self.headers.get('Authorization')
                path = urlsplit(self.path).path
                hub.requests.append((server_name, method, path, auth))
                try:
                    body = self._read_body() if method in ('POST', 'PUT') else b''
                    if server_name == 'cdn':
                        hub._cdn_route(self, method, path, body)
                    else:
                        hub._hub_route(self, method, path, body, auth)
                except Exception as e:  # a server bug must show up as a 500, not as a hung client
                    self.reply(500, json.dumps({'error': f'{type(e).__name__}: {e}'}).encode())

            def do_HEAD(self):
                self._route('HEAD')

            def do_GET(self):
                self._route('GET')

            def do_POST(self):
                self._route('POST')

            def do_PUT(self):
                self._route('PUT')

            def _read_body(self) -> bytes:
                if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b';')[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get('Content-Length') or 0))

            def reply(self, status: int, body: bytes = b'', headers: Optional[dict] = None,
                      length: Optional[int] = None) -> None:
                self.send_response(status)
                headers = dict(headers or {})
                headers.setdefault('Content-Type', 'application/json' if body[:1] in (b'{', b'[') else 'application/octet-stream')
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.send_header('Content-Length', str(len(body) if length is None else length))
                self.end_headers()
                if self.command != 'HEAD':
                    self.wfile.write(body)

            def error(self, status: int, code: Optional[str], message: str, headers: Optional[dict] = None) -> None:
                headers = dict(headers or {})
                if code:
                    headers['X-Error-Code'] = code
                headers['X-Error-Message'] = message
                self.reply(status, json.dumps({'error': message}).encode(), headers)

        return Handler

    def _authorized(self, auth: Optional[str]) -> bool:
        return auth == f'Bearer {self.token}'

    def _cdn_route(self, h, method: str, path: str, body: bytes) -> None:
        m = re.fullmatch(r'/lfs/([0-9a-f]{64})', path)
        if not m:
            return h.error(404, None, 'not found')
        oid = m.group(1)
        if method == 'PUT':  # basic LFS transfer: the storage checks what it receives
            size = self._pending.get(oid)
            if size is None:
                return h.error(403, None, 'no upload was announced for this object')
            if hashlib.sha256(body).hexdigest() != oid or len(body) != size:
                return h.error(400, None, 'uploaded content does not match its oid / size')
            with self.lock:
                self.lfs[oid] = body
            return h.reply(200)
        if method in ('GET', 'HEAD'):
            data = self.lfs.get(oid)
            if data is None:
                return h.error(404, None, 'no such object')
            if self.cdn_fault is not None:
                kind, arg = self.cdn_fault
                if kind == 'truncate':
                    data = data[:arg]
                elif kind == 'corrupt':
                    data = data[:arg] + bytes([data[arg] ^ 0xFF]) + data[arg + 1:]
            return h.reply(200, data, {'ETag': f'"{oid}"'})
        return h.error(405, None, 'method not allowed')

    def _hub_route(self, h, method: str, path: str, body: bytes, auth: Optional[str]) -> None:
        if self.hub_status is not None:
            return h.reply(self.hub_status, b'', {'Content-Type': 'text/plain'})
        m = re.fullmatch(r'/([^/]+/[^/]+)/resolve/([^/]+)/(.+)', path)
        if m and method in ('GET', 'HEAD'):
            return self._resolve(h, unquote(m.group(1)), unquote(m.group(2)), unquote(m.group(3)), auth)
        m = re.fullmatch(r'/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?', path)
        if m and method == 'GET':
            return self._model_info(h, unquote(m.group(1)), unquote(m.group(2) or 'main'), auth)
        if method != 'POST':
            return h.error(405, None, 'method not allowed')
        payload = body
        if path == '/api/validate-yaml':
            return h.reply(200, json.dumps({'errors': [], 'warnings': []}).encode())
        if not self._authorized(auth):
            return h.error(401, None, 'Invalid credentials in Authorization header')
        if path == '/api/repos/create':
            req = json.loads(payload)
            if req.get('type', 'model') != 'model':
                return h.error(400, None, 'only model repos here')
            repo_id = f"{req['organization']}/{req['name']}" if req.get('organization') else req['name']
            if '/' not in repo_id:
                return h.error(400, None, 'give a namespace (user or organisation) in the repo id')
            with self.lock:
                if repo_id in self.repos:
                    return h.error(409, None, 'You already created this model repo')
                self.repos[repo_id] = _Repo(repo_id, private=req.get('visibility') == 'private' or bool(req.get('private')))
            return h.reply(200, json.dumps({'url': f'{self.endpoint}/{repo_id}', 'name': repo_id}).encode())
        m = re.fullmatch(r'/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)', path)
        if m:
            repo = self.repos.get(m.group(1))
            if repo is None:
                return h.error(404, 'RepoNotFound', 'Repository not found')
            kind, revision = m.group(2), unquote(m.group(3))
            if kind == 'branch':
                if revision in repo.branches:
                    return h.error(409, None, 'Reference already exists')
                req = json.loads(payload or b'{}')
                start = repo.resolve(req.get('startingPoint') or 'main')
                repo.branches[revision] = start
                return h.reply(200, b'{}')
            head = repo.resolve(revision)
            if head is None:
                return h.error(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
            if kind == 'preupload':
                files = repo.commits[head]['files']
                out = []
                for f in json.loads(payload)['files']:
                    lfs = f['path'].endswith(LFS_SUFFIXES) or f['size'] >= LFS_MIN_SIZE
                    existing = files.get(f['path'])
                    oid = None if existing is None else (existing.lfs_oid or git_blob_sha1(existing.data))
                    out.append(dict(path=f['path'], uploadMode='lfs' if lfs else 'regular', shouldIgnore=False, oid=oid))
                return h.reply(200, json.dumps({'files': out}).encode())
            return self._commit(h, repo, revision, head, payload)
        m = re.fullmatch(r'/([^/]+/[^/]+)\.git/info/lfs/objects/batch', path)
        if m:
            if m.group(1) not in self.repos:
                return h.error(404, 'RepoNotFound', 'Repository not found')
            req = json.loads(payload)
            objects = []
            for obj in req['objects']:
                entry = dict(oid=obj['oid'], size=obj['size'], authenticated=True)
                if obj['oid'] not in self.lfs:  # already stored: no action, the client skips the upload
                    self._pending[obj['oid']] = obj['size']
                    entry['actions'] = {'upload': {'href': f"{self.cdn}/lfs/{obj['oid']}", 'header': {}}}
                objects.append(entry)
            return h.reply(200, json.dumps({'transfer': 'basic', 'objects': objects}).encode())
        return h.error(404, None, f'no route {path}')

    def _commit(self, h, repo: _Repo, revision: str, head: str, payload: bytes) -> None:
        files = dict(repo.commits[head]['files'])
        summary = ''
        for line in payload.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item['key'], item['value']
            if key == 'header':
                summary = value['summary']
            elif key == 'file':
                data = base64.b64decode(value['content'])
                files[value['path']] = _File(data=data, size=len(data))
            elif key == 'lfsFile':
                oid = value['oid']
                if oid not in self.lfs or (value.get('size') is not None and value['size'] != len(self.lfs[oid])):
                    return h.error(422, None, f"LFS object {oid} for {value['path']} was never uploaded")
                files[value['path']] = _File(lfs_oid=oid, size=len(self.lfs[oid]))
            elif key == 'deletedFile':
                files.pop(value['path'], None)
            else:
                return h.error(400, None, f'unsupported commit operation {key}')
        with self.lock:
            sha = repo.commit(head, summary, files)
            if revision in repo.branches:
                repo.branches[revision] = sha
        return h.reply(200, json.dumps({
            'commitUrl': f'{self.endpoint}/{repo.repo_id}/commit/{sha}', 'commitOid': sha, 'success': True}).encode())

    def _readable(self, h, repo_id: str, revision: str, auth: Optional[str]) -> Optional[Tuple[_Repo, str]]:
        """(repo, commit) of a revision the request may read; else the Hub's error is sent and None returned."""
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized(auth)):
            h.error(404 if repo is None else 401, 'RepoNotFound', 'Repository not found')
            return None
        commit = repo.resolve(revision)
        if commit is None:
            h.error(404, 'RevisionNotFound', 'Invalid rev id')
            return None
        return repo, commit

    def _model_info(self, h, repo_id: str, revision: str, auth: Optional[str]) -> None:
        found = self._readable(h, repo_id, revision, auth)
        if found is None:
            return
        repo, commit = found
        return h.reply(200, json.dumps(dict(
            id=repo_id, modelId=repo_id, sha=commit, private=repo.private, xetEnabled=False,
            siblings=[dict(rfilename=p) for p in sorted(repo.commits[commit]['files'])])).encode())

    def _resolve(self, h, repo_id: str, revision: str, path: str, auth: Optional[str]) -> None:
        found = self._readable(h, repo_id, revision, auth)
        if found is None:
            return
        repo, commit = found
        f = repo.commits[commit]['files'].get(path)
        if f is None:
            return h.error(404, 'EntryNotFound', 'Entry not found', {'X-Repo-Commit': commit})
        if f.lfs_oid is None:
            return h.reply(200, f.data, {'ETag': f'"{git_blob_sha1(f.data)}"', 'X-Repo-Commit': commit})
        pointer = f'version https://git-lfs.github.com/spec/v1\noid sha256:{f.lfs_oid}\nsize {f.size}\n'.encode()
        return h.reply(302, b'', {
            'Location': f'{self.cdn}/lfs/{f.lfs_oid}',
            'X-Linked-Etag': f'"{f.lfs_oid}"', 'X-Linked-Size': f.size,
            'ETag': f'"{git_blob_sha1(pointer)}"', 'X-Repo-Commit': commit})
