"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1 for offline tests.

It implements what huggingface_hub's client really sends (see HUB-NOTES.md): file resolve
(HEAD/GET with Range), repo info and tree, repo creation, and the git-LFS upload protocol used
with ``HF_HUB_DISABLE_XET=1`` (preupload, LFS batch + PUT + verify, ndjson commit). Repos live in
memory; every request is logged so tests can count what was downloaded or written.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import hashlib
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

TOKEN = "hf_fake"
READ_TOKEN = "hf_fake_read"  # a valid token with the "read" role: writes answer 403
USER = "tester"
ORGS = ("me",)  # namespaces USER may write to besides their own
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


# Memoised: the fake answers every HEAD and Range read with the file's ETag, and hashing a
# 100 MB shard each time made the server, not the client, the bottleneck of the benchmarks
# (bytes objects cache their own hash, so a lookup costs nothing after the first).
@functools.cache
def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@functools.cache
def etag_of(path: str, data: bytes) -> str:
    """The Hub's ETag: sha256 for LFS files, the git blob sha1 otherwise."""
    return hashlib.sha256(data).hexdigest() if is_lfs(path) else git_blob_sha1(data)


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> full file set
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    private: bool = False
    gated: bool = False  # file downloads answer 403 GatedRepo, repo info stays readable
    prs: int = 0  # pull requests opened (refs/pr/N)


@dataclass
class Fault:
    status: int
    error_code: str | None
    repo: str | None
    path: str | None  # fnmatch pattern on the URL path, e.g. "*/resolve/*/model-00002*"
    method: str | None
    times: int | None  # None = forever


@dataclass
class LoggedRequest:
    method: str
    path: str  # URL path, unquoted, without the query
    range: str | None
    status: int
    sent: int  # body bytes sent back
    json: Any = None  # parsed JSON request body, when there was one


class FakeHub:
    """In-memory Hub. Seed with ``add_repo``/``add_commit``; start with ``start()`` or ``with``."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.tokens = {token: "write", READ_TOKEN: "read"}  # token -> role, as whoami reports it
        self.user, self.orgs = USER, list(ORGS)
        self.corrupt: dict[tuple[str, str], int] = {}  # (repo, path) -> GET bodies to corrupt
        self.deleted: list[str] = []  # repos deleted through DELETE /api/repos/delete
        self.repos: dict[str, FakeRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes, shared like the real LFS store
        self.log: list[LoggedRequest] = []
        self.created: list[dict] = []  # bodies of POST /api/repos/create
        # One per commit received: {"repo", "branch", "sha", "summary", "description", "paths"}
        self.commits: list[dict] = []
        self.faults: list[Fault] = []
        # Slow LFS bodies (full GETs), like the real Hub's per-stream rate: each takes
        # body_seconds plus its size / body_bytes_per_second, sent in pieces.
        self.body_seconds = 0.0
        self.body_bytes_per_second: float | None = None
        self.on_body_piece: Callable[[str], None] | None = None  # called with the path, per piece
        # Full LFS GETs as (monotonic time, "start" | "end", "org/name/path"); in_flight_peak: the most
        # bodies being sent at once.
        self.transfers: list[tuple[float, str, str]] = []
        self.in_flight_peak = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None

    # -- seeding -------------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        sha: str | None = None,
        tags: tuple[str, ...] = (),
        private: bool = False,
        gated: bool = False,
    ) -> str:
        """Create ``repo_id`` with one commit on ``main`` holding ``files``; returns its sha."""
        self.repos[repo_id] = FakeRepo(private=private, gated=gated)
        return self.add_commit(repo_id, files, sha=sha, tags=tags)

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        branch: str = "main",
        sha: str | None = None,
        tags: tuple[str, ...] = (),
    ) -> str:
        """Add a commit whose tree is exactly ``files``, move ``branch`` (and ``tags``) to it."""
        repo = self.repos[repo_id]
        sha = sha or hashlib.sha1(f"{repo_id}:{next(self._counter)}".encode()).hexdigest()
        repo.commits[sha] = dict(files)
        for ref in (branch, *tags):
            repo.refs[ref] = sha
        return sha

    def fail(
        self,
        status: int,
        *,
        error_code: str | None = None,
        repo: str | None = None,
        path: str | None = None,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer matching requests with ``status`` (and ``X-Error-Code``), ``times`` times."""
        self.faults.append(Fault(status, error_code, repo, path, method, times))

    def corrupt_downloads(self, repo_id: str, path: str, *, times: int = 1) -> None:
        """Flip one byte of the next ``times`` full GET bodies of ``path`` (not Range reads);
        the ETag and the tree listing keep the true sha256, as when bytes break in transit."""
        self.corrupt[(repo_id, path)] = times

    # -- inspection ----------------------------------------------------------------------------
    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs.get(rev, rev)]

    def requests(self, method: str | None = None, path: str = "*") -> list[LoggedRequest]:
        return [
            r
            for r in self.log
            if (method is None or r.method == method) and fnmatch.fnmatch(r.path, path)
        ]

    def bytes_sent(self, path: str = "*") -> int:
        """Body bytes sent for GET requests whose path matches the fnmatch pattern."""
        return sum(r.sent for r in self.requests("GET", path))

    # -- server lifecycle ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        serve = self._server.serve_forever
        # A short poll interval keeps stop() (and so each test's teardown) fast.
        threading.Thread(target=serve, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take_fault(self, method: str, path: str, repo_id: str | None) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if (
                    (fault.method is None or fault.method == method)
                    and (fault.repo is None or fault.repo == repo_id)
                    and (fault.path is None or fnmatch.fnmatch(path, fault.path))
                    and fault.times != 0
                ):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every answer has Content-Length
    # Headers and body go out in two writes: with Nagle's algorithm the body waited for the
    # client's delayed ACK, 40 ms per request on loopback.
    disable_nagle_algorithm = True
    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        method = self.command
        url = urlsplit(self.path)
        self.segments = [unquote(s) for s in url.path.strip("/").split("/")]
        self.body = self._read_body()
        self.entry = LoggedRequest(method, unquote(url.path), self.headers.get("Range"), 0, 0)
        if self.body and method != "PUT":
            try:
                self.entry.json = json.loads(self.body)
            except ValueError:
                self.entry.json = None
        with self.hub._lock:
            self.hub.log.append(self.entry)
        repo_id = self._repo_id()
        try:
            fault = self.hub._take_fault(method, self.entry.path, repo_id)
            if fault is not None:
                raise HubError(fault.status, fault.error_code, f"injected {fault.status}")
            self._route(method)
        except HubError as err:
            headers = {"X-Error-Message": str(err)}
            if err.code:
                headers["X-Error-Code"] = err.code
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
            self._send(err.status, {"error": str(err), "url": f"{self.hub.url}/{repo_id}"}, headers)
        except Exception as exc:  # a bug in the fake: answer it rather than drop the connection
            self._send(500, {"error": f"fakehub: {exc!r}"})

    do_HEAD = do_GET = do_POST = do_PUT = do_DELETE = _dispatch

    def _repo_id(self) -> str | None:
        s = self.segments
        if s[:2] == ["api", "models"] and len(s) >= 4:
            return f"{s[2]}/{s[3]}"
        if len(s) >= 3 and s[2] == "resolve":
            return f"{s[0]}/{s[1]}"
        if len(s) >= 2 and s[1].endswith(".git"):
            return f"{s[0]}/{s[1][:-4]}"
        return None

    def _send(self, status: int, body: Any = b"", headers: dict[str, str] | None = None) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.entry.sent = len(body)
        self.entry.status = status

    def _role(self) -> str | None:
        """The role of the request's token ("write", "read"), None without a valid one."""
        auth = self.headers.get("Authorization") or ""
        return self.hub.tokens.get(auth.removeprefix("Bearer "))

    def _authorised(self) -> bool:
        return self._role() is not None

    def _check_write(self, repo_id: str) -> None:
        """Like the Hub: 401 without a valid token, 403 for a read token or another namespace."""
        if not self._authorised():
            raise HubError(401, None, "Invalid username or password.")
        if self._role() != "write" or repo_id.split("/")[0] not in (self.hub.user, *self.hub.orgs):
            raise HubError(403, None, f"You don't have the rights to write to {repo_id}")

    def _repo(self, repo_id: str, *, write: bool = False) -> FakeRepo:
        repo = self.hub.repos.get(repo_id)
        if (write or (repo is not None and repo.private)) and not self._authorised():
            raise HubError(401, "RepoNotFound", "Invalid username or password.")
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        if write:
            self._check_write(repo_id)
        return repo

    def _commit(self, repo: FakeRepo, rev: str) -> str:
        sha = repo.refs.get(rev, rev)
        if sha not in repo.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    # -- routes --------------------------------------------------------------------------------
    def _route(self, method: str) -> None:
        s = self.segments
        if s[:2] == ["api", "whoami-v2"]:
            if not self._authorised():
                raise HubError(401, None, "Invalid credentials in Authorization header")
            token = {"displayName": "test", "role": self._role()}
            orgs = [{"name": org, "type": "org"} for org in self.hub.orgs]
            user = {"type": "user", "name": self.hub.user, "orgs": orgs}
            return self._send(200, {**user, "auth": {"type": "access_token", "accessToken": token}})
        if s[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if s[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if s[:2] == ["api", "validate-yaml"]:
            return self._send(200, {"errors": [], "warnings": []})
        if s[0] == "lfs-upload" and method == "PUT":
            return self._lfs_put(s[1])
        if s[0] == "lfs-verify":
            found = s[1] in self.hub.lfs_objects
            return self._send(200 if found else 404, {"ok": found})
        repo_id = self._repo_id()
        if repo_id is None:
            raise HubError(404, None, f"no route for {self.path}")
        repo = self._repo(repo_id, write=method in ("POST", "PUT"))
        if s[:2] == ["api", "models"]:
            action, rev, rest = (s[4], s[5], s[6:]) if len(s) > 5 else ("revision", "main", [])
            if action == "branch" and method == "POST":
                return self._create_branch(repo, rev)
            sha = self._commit(repo, rev)
            if action == "revision":
                return self._repo_info(repo_id, repo, sha)
            if action == "tree":
                return self._tree(repo, sha, "/".join(rest))
            if action == "preupload":
                return self._preupload(repo, sha)
            if action == "commit":
                return self._apply_commit(repo_id, repo, rev)
        if len(s) >= 3 and s[2] == "resolve" and method in ("HEAD", "GET"):
            return self._resolve(repo, s[3], "/".join(s[4:]))
        if s[1].endswith(".git") and s[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch()
        raise HubError(404, None, f"no route for {self.path}")

    def _repo_info(self, repo_id: str, repo: FakeRepo, sha: str) -> None:
        files = repo.commits[sha]
        siblings = [{"rfilename": p, "size": len(d)} for p, d in sorted(files.items())]
        info = {"id": repo_id, "sha": sha, "private": repo.private, "gated": repo.gated}
        self._send(200, {**info, "siblings": siblings, "tags": []})

    def _tree(self, repo: FakeRepo, sha: str, prefix: str) -> None:
        entries: dict[str, dict] = {}
        for path, data in sorted(repo.commits[sha].items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            parts = path.split("/")
            for i in range(1, len(parts)):  # parent folders, listed once
                folder = "/".join(parts[:i])
                entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "path": folder})
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if is_lfs(path):
                entry["lfs"] = {"oid": etag_of(path, data), "size": len(data), "pointerSize": 130}
            entries[path] = entry
        self._send(200, list(entries.values()))

    def _resolve(self, repo: FakeRepo, rev: str, path: str) -> None:
        sha = self._commit(repo, rev)
        data = repo.commits[sha].get(path)
        if data is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist", commit=sha)
        if repo.gated:
            raise HubError(403, "GatedRepo", "Access to this model is restricted.")
        headers = {"ETag": f'"{etag_of(path, data)}"', "X-Repo-Commit": sha}
        headers["Accept-Ranges"] = "bytes"
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if match is None:
            repo_id = self._repo_id() or ""
            with self.hub._lock:
                left = self.hub.corrupt.get((repo_id, path), 0)
                if left and self.command == "GET":
                    self.hub.corrupt[(repo_id, path)] = left - 1
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])  # same size, one byte flipped
            if self.command == "GET" and is_lfs(path):
                return self._send_body_slowly(f"{repo_id}/{path}", data, headers)
            return self._send(200, data, headers)
        first, last = match.groups()
        if not first:  # suffix range: the last N bytes
            start, stop = max(0, len(data) - int(last)), len(data)
        else:
            start, stop = int(first), min(len(data), int(last) + 1 if last else len(data))
        if start >= len(data):
            return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        self._send(206, data[start:stop], headers)

    def _send_body_slowly(self, path: str, data: bytes, headers: dict[str, str]) -> None:
        hub = self.hub
        seconds = hub.body_seconds
        if hub.body_bytes_per_second:
            seconds += len(data) / hub.body_bytes_per_second
        with hub._lock:
            hub._in_flight += 1
            hub.in_flight_peak = max(hub.in_flight_peak, hub._in_flight)
            hub.transfers.append((time.monotonic(), "start", path))
        try:
            self.send_response(200)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            pieces = 16 if seconds else 1
            step = -(-len(data) // pieces) or 1
            started = time.monotonic()
            for i, offset in enumerate(range(0, len(data), step)):
                # Each piece leaves at its time: the last one at `seconds`, then the end.
                time.sleep(max(0.0, started + seconds * (i + 1) / pieces - time.monotonic()))
                self.wfile.write(data[offset : offset + step])
                self.wfile.flush()
                if hub.on_body_piece is not None:
                    hub.on_body_piece(path)
            self.entry.sent, self.entry.status = len(data), 200
        finally:
            with hub._lock:
                hub._in_flight -= 1
                hub.transfers.append((time.monotonic(), "end", path))

    # -- writes --------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        body = self.entry.json
        repo_id = f"{body.get('organization') or self.hub.user}/{body['name']}"
        self._check_write(repo_id)
        self.hub.created.append(body)
        url = {"url": f"{self.hub.url}/{repo_id}"}
        if repo_id in self.hub.repos:  # the client reads "url" even from the 409
            return self._send(409, {**url, "error": "You already created this model repo"})
        private = body.get("visibility") == "private" or body.get("private") is True
        self.hub.repos[repo_id] = FakeRepo(private=private)
        self.hub.add_commit(repo_id, {})
        self._send(200, url)

    def _delete_repo(self) -> None:
        body = self.entry.json
        repo_id = f"{body.get('organization') or self.hub.user}/{body['name']}"
        self._check_write(repo_id)
        if self.hub.repos.pop(repo_id, None) is None:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        self.hub.deleted.append(repo_id)
        self._send(200, {})

    def _create_branch(self, repo: FakeRepo, branch: str) -> None:
        if branch in repo.refs:
            raise HubError(409, None, f"Reference refs/heads/{branch} already exists")
        start = (self.entry.json or {}).get("startingPoint") or "main"
        repo.refs[branch] = self._commit(repo, start)
        self._send(200, {})

    def _preupload(self, repo: FakeRepo, sha: str) -> None:
        current = repo.commits[sha]
        answer = []
        for f in self.entry.json["files"]:
            lfs = is_lfs(f["path"]) or f["size"] > 10_000_000
            remote = current.get(f["path"])
            oid = None if remote is None else etag_of(f["path"], remote)
            mode = "lfs" if lfs else "regular"
            answer.append(
                {"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid}
            )
        self._send(200, {"files": answer, "commitOid": sha})

    def _lfs_batch(self) -> None:
        objects = []
        for obj in self.entry.json["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs_objects:  # no "actions" = already stored
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{obj['oid']}"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, None, "sha256 of the uploaded bytes does not match the oid")
        self.hub.lfs_objects[oid] = self.body
        self._send(200, {})

    def _apply_commit(self, repo_id: str, repo: FakeRepo, branch: str) -> None:
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = dict(repo.commits[self._commit(repo, branch)])
        pr_url = None
        if "create_pr=1" in urlsplit(self.path).query:  # the PR branches off `branch`
            repo.prs += 1
            branch = f"refs/pr/{repo.prs}"
            pr_url = f"{self.hub.url}/{repo_id}/discussions/{repo.prs}"
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    raise HubError(400, None, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.hub.lfs_objects[value["oid"]]
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
            elif line["key"] == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
        sha = self.hub.add_commit(repo_id, files, branch=branch)
        summary, description = header.get("summary"), header.get("description")
        record = {"repo": repo_id, "branch": branch, "sha": sha, "summary": summary}
        paths = sorted(line["value"]["path"] for line in lines if line["key"] != "header")
        self.hub.commits.append({**record, "description": description, "paths": paths})
        url = f"{self.hub.url}/{repo_id}/commit/{sha}"
        self._send(200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": pr_url})
