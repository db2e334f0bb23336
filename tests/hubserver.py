"""A tiny stand-in for the Hugging Face Hub, for tests: it serves repos under the URL layout that the real
`huggingface_hub` client (2.x) requests, on 127.0.0.1, and can misbehave on purpose.

Two HTTP servers run in threads, each on its own random free port:

* the hub (point HF_ENDPOINT at `HubServer.endpoint`):
  - `GET /api/models/{repo}` and `GET /api/models/{repo}/revision/{rev}` -> model info JSON
    (`id`, `sha`, `siblings[].rfilename`; with `?blobs=1` also `size`, `blobId`, `lfs`).
  - `HEAD|GET /{repo}/resolve/{rev}/{file}`:
    - an LFS file (the default for binary files): 302 to the CDN with `Location`, `X-Repo-Commit`,
      `X-Linked-Etag: "<sha256>"`, `X-Linked-Size`, and `ETag` (the git oid of the LFS pointer), as the
      real hub does. The client does not follow a redirect to another origin on its HEAD: the metadata
      comes from this response, and the GET goes straight to `Location`.
    - a regular file: 200 with the bytes, `ETag: "<git blob sha1>"`, `Content-Length`, `X-Repo-Commit`.
    - errors as the hub sends them: unknown repo 401 + `X-Error-Code: RepoNotFound`, unknown revision
      404 + `RevisionNotFound`, missing file 404 + `EntryNotFound` (with `X-Repo-Commit`).
* the CDN: `HEAD|GET /cdn/{sha256}` serves the blob, honouring `Range: bytes=N-` with 206 and
  `Content-Range`.

Faults, set per file on `RepoFile`: `served` (bytes actually sent instead of the true ones, while the
headers keep describing the true ones), `cut_after` (send the full Content-Length, then only this many
bytes, then drop the connection) for the next `cut_times` body requests (None: all of them), and
`fail_status` (answer the next `fail_times` body requests with that status, e.g. 503).

Every request is recorded in `HubServer.requests` as (port kind, method, path, headers).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


@dataclass
class RepoFile:
    data: bytes
    lfs: bool = True
    served: bytes | None = None  # bytes the server really sends (a corrupting CDN); headers describe `data`
    cut_after: int | None = None  # drop the connection after this many body bytes ...
    cut_times: int | None = 1  # ... for this many body requests (None: always)
    fail_status: int | None = None  # answer body requests with this HTTP status ...
    fail_times: int | None = 1  # ... this many times (None: always)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def body(self) -> bytes:
        return self.data if self.served is None else self.served


@dataclass
class Repo:
    commits: dict[str, dict[str, RepoFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.commits:
            return rev
        return self.refs.get(rev)


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)??)(?:/revision/(?P<rev>[^/]+))?$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._commit_counter = 0
        handler = _make_handler(self)
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        for srv in (self._hub, self._cdn):
            srv.daemon_threads = True
        self._threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
            for s in (self._hub, self._cdn)
        ]

    # -- setup --------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_port}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_port}"

    def add_commit(self, repo_id: str, files: dict[str, bytes | RepoFile], ref: str | None = "main") -> str:
        """Add a commit holding `files` (only those) to `repo_id`; point `ref` at it; return its sha."""
        with self._lock:
            self._commit_counter += 1
            sha = hashlib.sha1(f"{repo_id}:{self._commit_counter}".encode()).hexdigest()
            repo = self.repos.setdefault(repo_id, Repo())
            repo.commits[sha] = {
                name: f if isinstance(f, RepoFile) else RepoFile(f, lfs=not _is_text(name))
                for name, f in files.items()
            }
            if ref is not None:
                repo.refs[ref] = sha
            return sha

    def file(self, repo_id: str, filename: str, rev: str = "main") -> RepoFile:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)][filename]

    def count(self, method: str | None = None, path_contains: str = "", kind: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for k, m, p, _ in self.requests
                if (method is None or m == method) and path_contains in p and (kind is None or k == kind)
            )

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        for srv in (self._hub, self._cdn):
            srv.shutdown()
            srv.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lookups for the handler --------------------------------------------------------------
    def _blob(self, sha: str) -> RepoFile | None:
        for repo in self.repos.values():
            for files in repo.commits.values():
                for f in files.values():
                    if f.lfs and f.sha256 == sha:
                        return f
        return None


def _is_text(name: str) -> bool:
    return name.endswith((".json", ".md", ".txt", ".gitattributes"))


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so no pooled connection outlives a test's server and a dropped
        # connection never poisons the next request.
        protocol_version = "HTTP/1.0"

        def log_message(self, format, *args):  # silence the default stderr log
            pass

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_GET(self):
            self._dispatch("GET")

        # -- routing ----------------------------------------------------------------------------
        def _dispatch(self, method: str) -> None:
            kind = "cdn" if self.server is hub._cdn else "hub"
            url = urlsplit(self.path)
            path = unquote(url.path)
            with hub._lock:
                hub.requests.append((kind, method, self.path, dict(self.headers.items())))
            if kind == "cdn":
                m = _CDN.match(path)
                blob = hub._blob(m["sha"]) if m else None
                if blob is None:
                    return self._error(404, "EntryNotFound", "blob not found")
                return self._send_body(method, blob, {"ETag": f'"{blob.sha256}"'})
            m = _API.match(path)
            if m and method == "GET":
                return self._api(m["repo"], m["rev"] or "main", "blobs" in parse_qs(url.query))
            m = _RESOLVE.match(path)
            if m:
                return self._resolve(method, m["repo"], m["rev"], m["file"])
            self._error(404, None, "no such route")

        def _lookup(self, repo_id: str, rev: str):
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            commit = repo.resolve(rev)
            if commit is None:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
                return None
            return commit, repo.commits[commit]

        def _api(self, repo_id: str, rev: str, blobs: bool) -> None:
            found = self._lookup(repo_id, rev)
            if found is None:
                return
            commit, files = found
            siblings = []
            for name, f in sorted(files.items()):
                s: dict = {"rfilename": name}
                if blobs:
                    s["size"] = len(f.data)
                    s["blobId"] = git_blob_oid(lfs_pointer(f.data) if f.lfs else f.data)
                    if f.lfs:
                        s["lfs"] = {
                            "sha256": f.sha256,
                            "size": len(f.data),
                            "pointerSize": len(lfs_pointer(f.data)),
                        }
                siblings.append(s)
            body = json.dumps(
                {"id": repo_id, "modelId": repo_id, "sha": commit, "siblings": siblings}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _resolve(self, method: str, repo_id: str, rev: str, filename: str) -> None:
            found = self._lookup(repo_id, rev)
            if found is None:
                return
            commit, files = found
            f = files.get(filename)
            if f is None:
                return self._error(404, "EntryNotFound", f"{filename} does not exist on {rev}", commit=commit)
            if f.lfs:
                self.send_response(302)
                self.send_header("Location", f"{hub.cdn}/cdn/{f.sha256}")
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{git_blob_oid(lfs_pointer(f.data))}"')
                self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                self.send_header("X-Linked-Size", str(len(f.data)))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send_body(method, f, {"ETag": f'"{git_blob_oid(f.data)}"', "X-Repo-Commit": commit})

        # -- responses --------------------------------------------------------------------------
        def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _send_body(self, method: str, f: RepoFile, headers: dict[str, str]) -> None:
            with hub._lock:
                status = f.fail_status if f.fail_times is None or f.fail_times > 0 else None
                if status is not None and f.fail_times is not None:
                    f.fail_times -= 1
            if status is not None:
                return self._error(status, None, "injected failure")
            data = f.body()
            start = 0
            rng = self.headers.get("Range")
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            status = 200
            if m:
                start = int(m[1])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            chunk = data[start:]
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(chunk)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if method == "HEAD":
                return
            cut = None
            with hub._lock:
                if f.cut_after is not None and (f.cut_times is None or f.cut_times > 0):
                    cut = f.cut_after
                    if f.cut_times is not None:
                        f.cut_times -= 1
            if cut is None:
                self.wfile.write(chunk)
                return
            self.wfile.write(chunk[:cut])
            self.wfile.flush()
            self.close_connection = True
            # Drop the connection hard so the client sees a short body.
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    return Handler
