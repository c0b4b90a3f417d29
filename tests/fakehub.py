"""A local stand-in for the Hugging Face Hub on 127.0.0.1, for ``HF_ENDPOINT``.

It answers the requests ``huggingface_hub`` makes for ``model_info`` (``/api/models/<repo>``
and ``/revision/<rev>``, with ``?blobs=true`` sizes and LFS sha256), ``list_repo_tree``
(``/api/models/<repo>/tree/<rev>``) and file downloads (``HEAD``/``GET``
``/<repo>/resolve/<rev>/<file>`` with ``ETag``, ``X-Repo-Commit``, ``Content-Length`` and
``Range``), and can misbehave per repo: gated (401 without the right token), a connection
dropped halfway through a file's first download, or bytes that do not match their checksum.
Every request is recorded in ``hub.requests``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_MIN = 1024  # files at least this large are "LFS" (sha256 listed), like weights on the Hub


@dataclass
class Repo:
    files: dict[str, bytes]
    gated_token: str | None = None  # gated: only this bearer token may download
    drop_first: set[str] = field(default_factory=set)  # files whose first GET is cut halfway
    corrupt: set[str] = field(default_factory=set)  # files served with one byte flipped

    @property
    def commit(self) -> str:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + hashlib.sha256(self.files[name]).digest())
        return h.hexdigest()


def blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def entry(name: str, data: bytes, tree: bool) -> dict:
    """A file as model_info (siblings) or list_repo_tree lists it."""
    lfs = len(data) >= LFS_MIN
    sha = hashlib.sha256(data).hexdigest()
    if tree:
        out = {"type": "file", "path": name, "size": len(data), "oid": blob_id(data)}
        if lfs:
            out["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 130}
        return out
    out = {"rfilename": name, "size": len(data), "blobId": blob_id(data)}
    if lfs:
        out["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 130}
    return out


class FakeHub:
    """``with FakeHub() as hub: hub.add("org/name", {...}); hub.url``"""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._dropped: set[tuple[str, str]] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes | str | Path], **behaviour) -> Repo:
        data = {}
        for name, value in files.items():
            if isinstance(value, Path):
                value = value.read_bytes()
            data[name] = value.encode() if isinstance(value, str) else value
        self.repos[repo_id] = Repo(data, **behaviour)
        return self.repos[repo_id]

    def add_dir(self, repo_id: str, folder: Path, **behaviour) -> Repo:
        return self.add(repo_id, {p.name: p for p in sorted(folder.iterdir()) if p.is_file()},
                        **behaviour)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self, filename: str) -> list[dict[str, str]]:
        """Headers of every GET of ``filename``."""
        return [h for m, p, h in self.requests if m == "GET" and p.endswith("/" + filename)]

    # -- request handling --------------------------------------------------------------------
    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(req.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.requests.append(("HEAD" if head else "GET", path, dict(req.headers)))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?", path)
        if m:
            return self._info(req, m.group(1), query)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if m:
            return self._tree(req, m.group(1))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._file(req, m.group(1), m.group(3), head)
        self._send(req, 404, b'{"error": "not found"}', {"X-Error-Code": "EntryNotFound"})

    def _repo(self, req, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(req, 404, b'{"error": "Repository not found"}',
                       {"X-Error-Code": "RepoNotFound",
                        "X-Error-Message": "Repository not found"})
        return repo

    def _info(self, req, repo_id: str, query: dict) -> None:
        repo = self._repo(req, repo_id)
        if repo is None:
            return
        body = {"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": repo.commit,
                "private": False, "gated": "manual" if repo.gated_token else False,
                "disabled": False, "tags": [], "downloads": 0, "likes": 0,
                "siblings": [entry(n, d, tree=False) if query.get("blobs") else
                             {"rfilename": n} for n, d in sorted(repo.files.items())]}
        self._send(req, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _tree(self, req, repo_id: str) -> None:
        repo = self._repo(req, repo_id)
        if repo is None:
            return
        body = [entry(n, d, tree=True) for n, d in sorted(repo.files.items())]
        self._send(req, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _file(self, req, repo_id: str, name: str, head: bool) -> None:
        repo = self._repo(req, repo_id)
        if repo is None:
            return
        if repo.gated_token and req.headers.get("authorization") != f"Bearer {repo.gated_token}":
            return self._send(req, 401, b'{"error": "gated"}', {
                "X-Error-Code": "GatedRepo",
                "X-Error-Message": f"Access to model {repo_id} is restricted."})
        data = repo.files.get(name)
        if data is None:
            return self._send(req, 404, b'{"error": "entry not found"}',
                              {"X-Error-Code": "EntryNotFound"})
        listed = data
        if name in repo.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        etag = hashlib.sha256(listed).hexdigest() if len(listed) >= LFS_MIN else blob_id(listed)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start, status = 0, 200
        rng = re.fullmatch(r"bytes=(\d+)-", req.headers.get("range", "") or "")
        if rng and not head:
            start, status = int(rng.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        key = (repo_id, name)
        if not head and name in repo.drop_first and key not in self._dropped:
            # Promise the whole file, send half, close: the client sees a dropped connection.
            self._dropped.add(key)
            req.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                req.send_header(k, v)
            req.end_headers()
            req.wfile.write(body[: len(body) // 2])
            req.wfile.flush()
            req.close_connection = True
            return
        self._send(req, status, b"" if head else body, headers, length=len(body))

    @staticmethod
    def _send(req, status: int, body: bytes, headers: dict[str, str],
              length: int | None = None) -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body) if length is None else length))
        req.end_headers()
        if body and req.command != "HEAD":
            req.wfile.write(body)
