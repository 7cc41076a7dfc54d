"""A local stand-in for the Hugging Face Hub's HTTP API, on loopback, for the upload tests.

The public Hub is not reachable from this machine (and tests must not touch it), so this server
answers the endpoints that the real ``huggingface_hub`` client calls to upload a repo, and the real
client code runs against it (``HfApi(endpoint=hub.endpoint)``):

- ``GET  /api/whoami-v2``                                   token check
- ``POST /api/repos/create``                                create (409 when it exists)
- ``GET  /api/{type}s/{repo}[/revision/{rev}]``             repo info
- ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]``          file listing (with LFS sha256)
- ``POST /api/validate-yaml``                               README metadata check
- ``POST /api/{type}s/{repo}/preupload/{rev}``              regular vs LFS upload mode, remote oid
- ``POST /[{type}s/]{repo}.git/info/lfs/objects/batch``     LFS batch API (basic transfer + verify)
- ``PUT  /lfs-upload/{oid}`` and ``POST /lfs-verify``       the LFS object store
- ``POST /api/{type}s/{repo}/commit/{rev}``                 ndjson commit (file, lfsFile, deletions)

Not emulated: the Xet storage protocol (hf_xet's CAS). Tests set ``HF_HUB_DISABLE_XET`` so that the
client uses the LFS protocol, which the Hub also accepts. Anything else is answered 404 and listed
in ``unhandled`` so a test notices when the client starts calling something new.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml


def git_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    """Regular files: path -> content."""
    lfs: dict[str, str] = field(default_factory=dict)
    """LFS files: path -> sha256 (content in FakeHub.objects)."""
    commits: list[dict] = field(default_factory=list)

    def sha(self) -> str:
        return hashlib.sha1(f"{self.repo_id}:{len(self.commits)}".encode()).hexdigest()


class FakeHub:
    """The server's state, and start/stop. ``with FakeHub(token=...) as hub:`` gives ``hub.endpoint``."""

    def __init__(self, token: str, *, user: str = "tester", role: str = "write",
                 namespaces: tuple[str, ...] = ("tester", "posttrain-org")):
        self.token, self.user, self.role, self.namespaces = token, user, role, set(namespaces)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.auth_seen: list[str] = []
        self.refuse_commit_prefix: str | None = None
        """Commits that touch a path under this prefix are refused (403), like a quota or a lock."""
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- views for tests --------------------------------------------------------------------------
    def repo(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def file_bytes(self, repo_type: str, repo_id: str) -> dict[str, bytes]:
        """Every file of a repo with its content (LFS files resolved from the object store)."""
        repo = self.repos[(repo_type, repo_id)]
        out = dict(repo.files)
        out.update({p: self.objects[sha] for p, sha in repo.lfs.items()})
        return out

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(pattern, p))


_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO = r"(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+?)"


class _Handler(BaseHTTPRequestHandler):
    state: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # -- plumbing ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code} if code else None)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        self.state.auth_seen.append(auth)
        if auth != f"Bearer {self.state.token}":
            self._error(401, "Invalid credentials in Authorization header")
            return False
        return True

    def _repo(self, m) -> Repo | None:
        repo = self.state.repos.get((_TYPES[m["kind"]], unquote(m["repo"])))
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    def _route(self, method: str) -> None:
        url = urlparse(self.path)
        path = url.path
        body = self._body() if method in ("POST", "PUT") else b""
        with self.state._lock:
            self.state.requests.append((method, path))
            for pattern, handler in _ROUTES.get(method, []):
                m = re.fullmatch(pattern, path)
                if m:
                    return handler(self, m, body, parse_qs(url.query))
            self.state.unhandled.append((method, path))
            self._error(404, f"fake hub: no route for {method} {path}")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    # -- endpoints --------------------------------------------------------------------------------
    def whoami(self, m, body, query) -> None:
        if self._authorized():
            s = self.state
            self._send(200, {"type": "user", "name": s.user, "orgs": [{"name": n} for n in s.namespaces - {s.user}],
                             "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": s.role}}})

    def create_repo(self, m, body, query) -> None:
        if not self._authorized():
            return
        req = json.loads(body)
        ns, name, kind = req.get("organization") or self.state.user, req["name"], req.get("type") or "model"
        if ns not in self.state.namespaces:
            return self._error(403, f"You don't have the rights to create a {kind} under the namespace \"{ns}\"")
        key, url = (kind, f"{ns}/{name}"), f"{self.state.endpoint}/{'' if kind == 'model' else kind + 's/'}{ns}/{name}"
        if key in self.state.repos:
            return self._send(409, {"error": "You already created this repo", "url": url})
        private = req.get("private", req.get("visibility") == "private")
        self.state.repos[key] = Repo(repo_type=kind, repo_id=key[1], private=bool(private))
        self._send(200, {"url": url, "name": key[1]})

    def repo_info(self, m, body, query) -> None:
        if self._authorized() and (repo := self._repo(m)):
            self._send(200, {"id": repo.repo_id, "sha": repo.sha(), "private": repo.private,
                             "siblings": [{"rfilename": p} for p in sorted({*repo.files, *repo.lfs})]})

    def tree(self, m, body, query) -> None:
        if not (self._authorized() and (repo := self._repo(m))):
            return
        prefix = unquote(m["path"] or "").strip("/")
        entries = []
        for p, data in repo.files.items():
            entries.append({"type": "file", "path": p, "oid": git_hash(data), "size": len(data)})
        for p, sha in repo.lfs.items():
            size = len(self.state.objects[sha])
            pointer = lfs_pointer(sha, size)
            entries.append({"type": "file", "path": p, "oid": git_hash(pointer), "size": size,
                            "lfs": {"oid": sha, "size": size, "pointerSize": len(pointer)}})
        if prefix:
            entries = [e for e in entries if e["path"].startswith(prefix + "/")]
        if query.get("recursive", ["False"])[0].lower() != "true":
            depth = prefix.count("/") + 1 if prefix else 0
            entries = [e for e in entries if e["path"].count("/") == depth]
        self._send(200, sorted(entries, key=lambda e: e["path"]))

    def validate_yaml(self, m, body, query) -> None:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as exc:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []})
        if not isinstance(meta, dict):
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, m, body, query) -> None:
        if not (self._authorized() and (repo := self._repo(m))):
            return
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            # like the Hub: binary content and data/weight files go to LFS
            lfs = b"\0" in sample or f["path"].endswith((".parquet", ".safetensors", ".bin", ".arrow"))
            oid = repo.lfs.get(f["path"]) if lfs else (git_hash(repo.files[f["path"]]) if f["path"] in repo.files
                                                      else None)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._send(200, {"files": files, "commitOid": repo.sha()})

    def lfs_batch(self, m, body, query) -> None:
        if not self._authorized():
            return
        if self.state.repos.get((_TYPES.get(m["kind"] or "models"), unquote(m["repo"]))) is None:
            return self._error(404, "Repository not found", "RepoNotFound")
        req = json.loads(body)
        objects = []
        for obj in req["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.objects:
                entry["actions"] = {"upload": {"href": f"{self.state.endpoint}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{self.state.endpoint}/lfs-verify"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, m, body, query) -> None:
        oid = m["oid"]
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "content does not match the announced sha256")
        self.state.objects[oid] = body
        self._send(200, {})

    def lfs_verify(self, m, body, query) -> None:
        req = json.loads(body)
        ok = req["oid"] in self.state.objects and len(self.state.objects[req["oid"]]) == req["size"]
        self._send(200, {}) if ok else self._error(404, "object not found")

    def commit(self, m, body, query) -> None:
        if not (self._authorized() and (repo := self._repo(m))):
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        ops = [item for item in lines if item["key"] != "header"]
        prefix = self.state.refuse_commit_prefix
        if prefix and any(op["value"]["path"].startswith(prefix) for op in ops):
            return self._error(403, f"commit refused: writes under {prefix} are not allowed right now")
        for op in ops:
            value = op["value"]
            if op["key"] == "lfsFile" and value["oid"] not in self.state.objects:
                return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
        for op in ops:
            value, path = op["value"], op["value"]["path"]
            if op["key"] == "file":
                repo.lfs.pop(path, None)
                repo.files[path] = base64.b64decode(value["content"])
            elif op["key"] == "lfsFile":
                repo.files.pop(path, None)
                repo.lfs[path] = value["oid"]
            elif op["key"] == "deletedFile":
                repo.files.pop(path, None)
                repo.lfs.pop(path, None)
            elif op["key"] == "deletedFolder":
                for store in (repo.files, repo.lfs):
                    for p in [p for p in store if p.startswith(path.rstrip("/") + "/")]:
                        del store[p]
        repo.commits.append({"summary": header["summary"], "ops": [(op["key"], op["value"]["path"]) for op in ops]})
        kind = "" if repo.repo_type == "model" else repo.repo_type + "s/"
        self._send(200, {"success": True, "commitOid": repo.sha(), "pullRequestUrl": None,
                         "commitUrl": f"{self.state.endpoint}/{kind}{repo.repo_id}/commit/{repo.sha()}"})


_ROUTES = {
    "GET": [
        (r"/api/whoami-v2", _Handler.whoami),
        (rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?P<path>/.*)?", _Handler.tree),
        (rf"/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?", _Handler.repo_info),
    ],
    "POST": [
        (r"/api/repos/create", _Handler.create_repo),
        (r"/api/validate-yaml", _Handler.validate_yaml),
        (rf"/api/{_REPO}/preupload/(?P<rev>[^/]+)", _Handler.preupload),
        (rf"/api/{_REPO}/commit/(?P<rev>[^/]+)", _Handler.commit),
        (r"/(?:(?P<kind>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+?)\.git/info/lfs/objects/batch", _Handler.lfs_batch),
        (r"/lfs-verify", _Handler.lfs_verify),
    ],
    "PUT": [(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", _Handler.lfs_upload)],
}
