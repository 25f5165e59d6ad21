"""A Hugging Face Hub look-alike on loopback, for tests (standard library only).

:class:`FakeHub` serves, in memory, the part of the Hub HTTP API that ``huggingface_hub`` 2.4
uses to create a repo, upload a folder and download a snapshot, so that publishing and
loading checkpoints can be tested offline against the real client code:

=========================================================  ========================================
request                                                     used by
=========================================================  ========================================
``POST /api/repos/create``                                  ``HfApi.create_repo``
``POST /api/validate-yaml``                                 ``create_commit`` (when README.md is in it)
``POST /api/models/{repo}/preupload/{rev}``                 ``create_commit`` (answers ``regular``)
``POST /api/models/{repo}/commit/{rev}``                    ``create_commit`` (ndjson, base64 files)
``POST /api/models/{repo}/branch/{branch}``                 ``HfApi.create_branch``
``GET  /api/models/{repo}[/revision/{rev}]``                ``repo_info`` / ``model_info``
``GET  /api/models/{repo}/tree/{rev}[/{path}]``             ``list_repo_tree`` (``snapshot_download``)
``HEAD|GET /{repo}/resolve/{rev}/{path}``                   ``hf_hub_download``
=========================================================  ========================================

Every file is answered as a ``regular`` (git) file: no LFS, no Xet. Downloads carry the headers
the client checks: ``X-Repo-Commit``, ``ETag`` (the git blob id, quoted), ``Content-Length``.
Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) as the
Hub does, so the client raises its usual exceptions.

Authentication: ``FakeHub(tokens={"hf_x"})`` accepts those bearer tokens. Writes then need one
(401 otherwise); a private repo answers 401 ``RepoNotFound`` to a reader without one, like the
Hub. With ``tokens=None`` (the default) writes are open and only private repos need a token
(which then no token satisfies).

Example:

```python
>>> from huggingface_hub import HfApi
>>> from hub_server import FakeHub
>>> with FakeHub() as hub:                         # serves on 127.0.0.1:<free port>
...     api = HfApi(endpoint=hub.url, token=False)
...     url = api.create_repo("org/demo")
...     _ = api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="org/demo")
...     sorted(hub.files("org/demo").items())[1]
('a.txt', b'hi')

```

The module is importable as ``hub_server`` from tests in ``tests/`` (pytest puts that folder on
``sys.path``); ``tests/test_hub.py`` has the ``fake_hub`` fixture built on it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
)

_REPO = r"(?P<repo>[\w.\-]+(?:/[\w.\-]+)?)"
_KIND = r"(?P<kind>models|datasets|spaces)"


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob (what the Hub returns as a regular file's ETag and ``oid``).

    >>> git_blob_id(b"")
    'e69de29bb2d1d6434b8b29ae775ad8c2e48c5391'
    """
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    """One commit: the full file tree (path -> bytes) after it."""

    oid: str
    message: str
    files: dict[str, bytes]
    parent: str | None = None


@dataclass
class Repo:
    """An in-memory repository: commits by id and branches pointing at them."""

    repo_id: str
    repo_type: str = "model"
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name, full commit id or unique id prefix (>= 7 chars) names."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if len(revision) >= 7:
            hits = [c for oid, c in self.commits.items() if oid.startswith(revision)]
            if len(hits) == 1:
                return hits[0]
        return None


@dataclass
class LoggedRequest:
    """What the server received (for assertions and for discovering the client's protocol)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int = 0


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra or {}


class FakeHub:
    """An in-memory Hub served over HTTP on ``127.0.0.1`` in a background thread.

    Args:
        tokens: Bearer tokens the server accepts. ``None``: writes need no token.
        host: Interface to bind (loopback by default).
        port: Port; ``0`` picks a free one.

    Attributes:
        url: ``http://127.0.0.1:<port>``, the endpoint to give to ``huggingface_hub``.
        repos: ``repo_id -> Repo`` (models only are exercised, other types are accepted).
        requests: Every request received, in order (:class:`LoggedRequest`).
    """

    def __init__(self, tokens: set[str] | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.tokens = set(tokens) if tokens is not None else None
        self.repos: dict[str, Repo] = {}
        self.requests: list[LoggedRequest] = []
        self._lock = threading.RLock()
        self._counter = 0
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        """Serve in a daemon thread; returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state helpers for tests ----------------------------------------------------------------

    def create_repo(self, repo_id: str, private: bool = False, repo_type: str = "model") -> Repo:
        """Create a repo directly (initial commit holds ``.gitattributes``, as on the Hub)."""
        with self._lock:
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
            self.repos[repo_id] = repo
            self._commit(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES}, replace=True)
            return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (path -> content)."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            if commit is None:
                raise KeyError(revision)
            return dict(sorted(commit.files.items()))

    def requests_to(self, fragment: str, method: str | None = None) -> list[LoggedRequest]:
        """Logged requests whose path contains ``fragment`` (and with ``method``, if given)."""
        return [r for r in self.requests if fragment in r.path and (method is None or r.method == method)]

    def _commit(
        self, repo: Repo, branch: str, message: str, changes: dict[str, bytes | None], replace: bool = False
    ) -> Commit:
        parent_oid = repo.branches.get(branch)
        files = {} if replace or parent_oid is None else dict(repo.commits[parent_oid].files)
        for path, content in changes.items():
            if content is None:
                files.pop(path, None)
            else:
                files[path] = content
        self._counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}\0{self._counter}\0{time.time_ns()}\0{message}".encode()).hexdigest()
        commit = Commit(oid=oid, message=message, files=files, parent=parent_oid)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    # -- request handling (called from the handler threads) ------------------------------------

    def _token(self, headers: dict[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _authorized(self, headers: dict[str, str]) -> bool:
        token = self._token(headers)
        return self.tokens is not None and token in self.tokens

    def _check_write(self, headers: dict[str, str]) -> None:
        if self.tokens is not None and not self._authorized(headers):
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, headers: dict[str, str]) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized(headers)):
            # the Hub does not tell "missing" from "private and you may not see it"
            # (401 for a private repo, 404 for a missing one: both are RepoNotFound to the client)
            raise _HubError(401 if repo is not None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Answer one request: ``(status, headers, body)``."""
        split = urlsplit(raw_path)
        path = unquote(split.path)
        query = parse_qs(split.query)
        entry = LoggedRequest(method, path, query, headers, body)
        with self._lock:
            self.requests.append(entry)
        try:
            with self._lock:
                status, out_headers, out_body = self._route(method, path, query, headers, body)
        except _HubError as err:
            status = err.status
            out_headers = {"Content-Type": "application/json", "X-Error-Message": err.message, **err.extra}
            if err.code:
                out_headers["X-Error-Code"] = err.code
            out_body = json.dumps({"error": err.message}).encode()
        entry.status = status
        logger.debug("%s %s -> %d", method, raw_path, status)
        return status, out_headers, out_body

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        def js(obj: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
            return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()

        if method == "POST" and path == "/api/repos/create":
            return js(*self._create(json.loads(body or b"{}"), headers))
        if method == "POST" and path == "/api/validate-yaml":
            return js(self._validate_yaml(json.loads(body or b"{}")))

        m = re.fullmatch(rf"/api/{_KIND}/{_REPO}/preupload/(?P<rev>.+)", path)
        if m and method == "POST":
            self._check_write(headers)
            repo = self._repo(m["repo"], headers)
            commit = self._commit_of(repo, m["rev"])
            files = json.loads(body)["files"]
            return js({
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_id(commit.files[f["path"]]) if f["path"] in commit.files else None,
                    }
                    for f in files
                ],
                "commitOid": commit.oid,
            })

        m = re.fullmatch(rf"/api/{_KIND}/{_REPO}/commit/(?P<rev>.+)", path)
        if m and method == "POST":
            self._check_write(headers)
            repo = self._repo(m["repo"], headers)
            return js(self._apply_commit(repo, m["rev"], body))

        m = re.fullmatch(rf"/api/{_KIND}/{_REPO}/branch/(?P<branch>.+)", path)
        if m and method == "POST":
            self._check_write(headers)
            repo = self._repo(m["repo"], headers)
            if m["branch"] in repo.branches:
                raise _HubError(409, "Reference already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            repo.branches[m["branch"]] = self._commit_of(repo, start).oid
            return js({})

        m = re.fullmatch(rf"/api/{_KIND}/{_REPO}/tree/(?P<rest>.+)", path)
        if m and method == "GET":
            repo = self._repo(m["repo"], headers)
            rev, _, sub = self._split_rev(repo, m["rest"])
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return js(self._tree(self._commit_of(repo, rev), sub, recursive))

        m = re.fullmatch(rf"/api/{_KIND}/{_REPO}(?:/revision/(?P<rev>.+))?", path)
        if m and method == "GET":
            repo = self._repo(m["repo"], headers)
            commit = self._commit_of(repo, m["rev"] or "main")
            return js({
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
                "sha": commit.oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            })

        m = re.fullmatch(rf"/(?:(?P<kind>datasets|spaces)/)?{_REPO}/resolve/(?P<rest>.+)", path)
        if m and method in ("GET", "HEAD"):
            return self._resolve(method, m["repo"], m["rest"], headers)

        raise _HubError(404, f"no route for {method} {path}")

    def _split_rev(self, repo: Repo, rest: str) -> tuple[str, str, str]:
        """Split ``{rev}/{path}`` where the revision may itself contain slashes (``refs/pr/1``)."""
        parts = rest.split("/")
        for i in range(len(parts), 0, -1):
            rev = "/".join(parts[:i])
            if repo.resolve(rev) is not None:
                return rev, "/", "/".join(parts[i:])
        return parts[0], "/", "/".join(parts[1:])

    def _create(self, payload: dict[str, Any], headers: dict[str, str]) -> tuple[dict[str, Any], int]:
        self._check_write(headers)
        name, org = payload.get("name"), payload.get("organization")
        if not name:
            raise _HubError(400, "name is required")
        repo_id = f"{org}/{name}" if org else name
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return {"error": "You already created this model repo", "url": url}, 409
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.create_repo(repo_id, private=private, repo_type=payload.get("type") or "model")
        return {"url": url, "name": repo_id, "id": repo_id}, 200

    def _validate_yaml(self, payload: dict[str, Any]) -> dict[str, Any]:
        import yaml

        content = payload.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, flags=re.S)
        if m is None:
            return {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            meta = yaml.safe_load(m.group(1))
        except yaml.YAMLError as err:
            raise _HubError(400, f"Invalid YAML: {err}") from None
        if not isinstance(meta, dict):
            raise _HubError(400, "YAML metadata must be a mapping")
        return {"errors": [], "warnings": []}

    def _apply_commit(self, repo: Repo, revision: str, body: bytes) -> dict[str, Any]:
        if revision not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        changes: dict[str, bytes | None] = {}
        current = repo.commits[repo.branches[revision]].files
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"unsupported encoding {value.get('encoding')}")
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in current:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                changes[value["path"]] = None
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                changes.update({p: None for p in current if p.startswith(prefix)})
            elif key in ("lfsFile", "copyFile"):
                raise _HubError(400, f"{key} is not supported by this test server (files are 'regular')")
        if header.get("parentCommit") and header["parentCommit"] != repo.branches[revision]:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = self._commit(repo, revision, header.get("summary", ""), changes)
        return {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.url}/{repo.repo_id}/commit/{commit.oid}",
            "pullRequestUrl": None,
        }

    def _tree(self, commit: Commit, sub: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, content in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):].split("/")
            depth = len(rel) if recursive else 1
            for i in range(1, min(depth, len(rel) - 1) + 1):   # folders on the way
                folder = prefix + "/".join(rel[:i])
                entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                            "size": 0, "path": folder})
            if recursive or len(rel) == 1:
                entries[path] = {"type": "file", "oid": git_blob_id(content), "size": len(content), "path": path}
        return list(entries.values())

    def _resolve(self, method: str, repo_id: str, rest: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id, headers)
        rev, _, filename = self._split_rev(repo, rest)
        commit = self._commit_of(repo, rev)
        if filename not in commit.files:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = commit.files[filename]
        out = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_id(content)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status = 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("range", ""))
        if rng and method == "GET":
            start = int(rng[1])
            end = int(rng[2]) if rng[2] else len(content) - 1
            out["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        return status, out, content


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("fake hub: " + format, *args)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self, method: str) -> None:
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, out_headers, out_body = self.hub.handle(method, self.path, headers, body)
        self.send_response(status)
        for key, value in out_headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(out_body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(out_body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._serve("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")


# --------------------------------------------------------------------------------------------
# pytest fixtures shared by the Hub tests (import them by name into a test module)
# --------------------------------------------------------------------------------------------
import pytest as _pytest


@_pytest.fixture(autouse=True)
def hub_env(monkeypatch: "_pytest.MonkeyPatch") -> None:
    """No ambient token, endpoint or offline flag from the machine running the tests."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@_pytest.fixture
def fake_hub():
    """An empty Hub look-alike; ``fake_hub.url`` is its endpoint."""
    with FakeHub() as hub:
        yield hub
