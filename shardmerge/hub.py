"""Hugging Face Hub I/O: pin a revision, read headers, download or stream shards, push a folder.

The only shardmerge module that imports huggingface_hub; it is imported only when a Hub ref is
used. The token comes from ``HF_TOKEN`` or the saved login (huggingface_hub's default chain) and is
never passed around, printed or logged. ``HF_HUB_OFFLINE=1`` makes every function read the local
HF cache only. Every huggingface_hub error leaves this module as a one-line ``ShardmergeError``
(exit 1: worth retrying) or ``InputError`` (exit 2: fix the ref, the token or the environment).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_token,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.hf_api import RepoFile

# huggingface_hub's HTTP client: httpx2 from its 2.x releases, httpx in 1.x (the GPU machine's).
# Only its error classes are used here, to tell a transport failure from an HTTP answer.
try:
    import httpx2 as http_client
except ImportError:  # huggingface_hub 1.x
    import httpx as http_client  # type: ignore[no-redef]
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from shardmerge.errors import CheckpointError, InputError, ShardmergeError
from shardmerge.recipe import is_repo_id, repo_id_hint

__all__ = [
    "HubListing",
    "HubModel",
    "PushResult",
    "PushTarget",
    "StreamingHubSource",
    "check_push_target",
    "download_files",
    "fetch_listing",
    "hub_error",
    "looks_like_repo_id",
    "push_folder",
    "quiet_client",
    "repo_id_hint",
    "repo_id_problem",
    "resolve_hub_model",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
DOWNLOAD_WORKERS = 8  # parallel downloads / header reads, like snapshot_download's default

_FULL_SHA_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_HASH_BLOCK_BYTES = 1 << 24

# What huggingface_hub raises for network, HTTP, cache and validation problems.
_HUB_ERRORS = (
    OSError,
    http_client.HTTPError,
    EntryNotFoundError,
    RevisionResolutionError,
    HFValidationError,
)


def looks_like_repo_id(ref: str) -> bool:
    """Whether ``ref`` is shaped like a Hub repo id ``org/name`` (no network, no disk)."""
    return is_repo_id(ref)  # the recipe's check: one set of rules


def repo_id_problem(ref: str) -> str:
    """Why ``ref`` is not a Hub repo id, with the likely fix: one line (no network)."""
    return f"not a Hugging Face repo id: {ref!r} ({repo_id_hint(ref) or 'expected org/name'})"


def quiet_client() -> None:
    """Silence huggingface_hub's own progress bars and log lines (retries, warnings)."""
    from huggingface_hub.utils import disable_progress_bars, logging

    disable_progress_bars()
    logging.set_verbosity_error()


@dataclass(frozen=True)
class HubModel:
    """A Hub model pinned to one commit."""

    repo_id: str
    revision: str | None  # as requested (None = main)
    sha: str  # full 40-hex commit sha, resolved once; every later call uses it
    # LFS file path -> the sha256 the Hub publishes for it (its LFS oid): downloads must match
    sha256: Mapping[str, str] = field(default_factory=dict, compare=False)
    sizes: Mapping[str, int] = field(default_factory=dict, compare=False)  # file path -> bytes

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.sha[:12]}"


@dataclass(frozen=True)
class HubListing:
    """Everything the planner needs from a Hub model, read without any shard body."""

    files: dict[str, int]  # every repo file path -> size in bytes
    index: dict | None  # parsed model.safetensors.index.json, None for a single model.safetensors
    headers: dict[str, dict]  # shard filename -> raw safetensors header dict
    config: dict | None  # parsed config.json, None when the repo has none
    sha256: dict[str, str] = field(default_factory=dict)  # LFS files: path -> published sha256


@dataclass(frozen=True)
class PushTarget:
    """A push target that passed the checks made before any download or merge."""

    repo_id: str
    url: str
    user: str  # the token's account
    exists: bool
    private: bool  # its visibility after the push (an existing repo keeps its own)


@dataclass(frozen=True)
class PushResult:
    """What was (or, with dry_run, would be) pushed."""

    url: str
    repo_id: str
    files: tuple[tuple[str, int], ...]  # (path in repo, size in bytes), sorted by path
    total_bytes: int
    private: bool
    dry_run: bool
    commit_sha: str | None = None  # the new commit; None for a dry run
    created: bool = False  # the repo is (dry run: would be) created by this push
    deleted: tuple[str, ...] = ()  # files of the target branch the commit removes
    revision: str | None = None  # the target branch (None = main)
    pr_url: str | None = None  # with create_pr: the pull request opened


def resolve_hub_model(repo_id: str, revision: str | None) -> HubModel:
    """Pin ``repo_id`` at ``revision`` (branch, tag or full sha; None = main) to a commit sha.

    Online, a branch or tag is also recorded under ``refs/`` in the HF cache, so a later run with
    ``HF_HUB_OFFLINE=1`` resolves it the same way. Offline, only the cache is read.

    Raises:
        InputError: bad repo id, repo or revision not found, no access, offline and not cached.
        ShardmergeError: the Hub is unreachable or failing (retry).
    """
    if not looks_like_repo_id(repo_id):
        raise InputError(repo_id_problem(repo_id))
    wanted = revision or constants.DEFAULT_REVISION
    try:
        api = HfApi()
        if constants.is_offline_mode():
            sha = api.resolve_revision(repo_id, revision=revision, local_files_only=True).resolved
            if not snapshot_dir(repo_id, sha).is_dir():
                raise InputError(f"{repo_id}@{wanted}: {_OFFLINE_HINT}")
        elif _FULL_SHA_RE.fullmatch(wanted):
            # A sha needs no resolving, but asking checks it exists and is readable.
            sha = api.model_info(repo_id, revision=wanted).sha or ""
        else:
            sha = api.resolve_revision(repo_id, revision=revision).resolved
    except _HUB_ERRORS as exc:
        raise hub_error(exc, repo_id, action=f"resolve revision {wanted!r} of") from exc
    if not _FULL_SHA_RE.fullmatch(sha):
        raise ShardmergeError(f"{repo_id}@{wanted}: the Hub returned no commit sha ({sha!r})")
    return HubModel(repo_id=repo_id, revision=revision, sha=sha)


def fetch_listing(model: HubModel) -> HubListing:
    """Read the file list, config.json, the index and every shard's header: no shard body.

    Headers are read with two small Range requests per shard (the 8-byte length, then the
    JSON). Offline, everything is read from the HF cache.

    Raises:
        CheckpointError: not a safetensors checkpoint, index naming absent shards, bad header.
        InputError / ShardmergeError: as ``hub_error``.
    """
    offline = constants.is_offline_mode()
    try:
        files, sha256 = _list_cached_files(model) if offline else _list_remote_files(model)
        config = _read_json(model, CONFIG_FILE) if CONFIG_FILE in files else None
        if INDEX_FILE in files:
            index: dict | None = _read_json(model, INDEX_FILE)
            weight_map = (index or {}).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{model.label}: {INDEX_FILE} has no weight_map")
            shards = sorted(set(weight_map.values()))
        elif SINGLE_FILE in files:
            index, shards = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{model.label}: no {INDEX_FILE} or {SINGLE_FILE} in the repo")
        absent = [shard for shard in shards if shard not in files]
        if absent:
            raise CheckpointError(
                f"{model.label}: {INDEX_FILE} names shards that are not in the repo: "
                + ", ".join(absent)
            )
        if offline:
            _require_cached(model, shards)

        def read(shard: str) -> dict:
            if offline:
                return _read_cached_header(model, shard)
            return _read_remote_header(model, shard, files[shard])

        with ThreadPoolExecutor(max_workers=min(DOWNLOAD_WORKERS, len(shards))) as pool:
            headers = dict(zip(shards, pool.map(read, shards), strict=True))
    except _HUB_ERRORS as exc:
        raise hub_error(exc, model.repo_id, action="read") from exc
    return HubListing(files=files, index=index, headers=headers, config=config, sha256=sha256)


def download_files(model: HubModel, filenames: list[str], *, progress: bool = False) -> Path:
    """Download exactly ``filenames`` at ``model.sha`` into the HF cache; return the snapshot.

    Files already cached cost no download. Offline, all of them must already be cached. Every
    file with a published sha256 (``model.sha256``) is checked against it, cached or not: a
    mismatch is removed from the cache and downloaded once more. ``progress`` shows one bar
    (bytes, rate, ETA) for all of this model's downloads on stderr.

    Raises:
        ShardmergeError: a file still does not match its sha256 after one re-download.
    """
    names = list(dict.fromkeys(filenames))
    snapshot = snapshot_dir(model.repo_id, model.sha)
    bar = _DownloadBar(f"downloading {model.repo_id}") if progress else None
    offline = constants.is_offline_mode()
    bar_class = bar.file_bar_class() if bar else None

    def fetch(name: str) -> None:
        # Hashed as soon as it is on disk, while the other workers still download.
        path = snapshot / name if offline else Path(_download(model, name, tqdm_class=bar_class))
        _checked(model, name, path)

    try:
        if offline:
            _require_cached(model, names)
        with ThreadPoolExecutor(max_workers=max(1, min(DOWNLOAD_WORKERS, len(names)))) as pool:
            list(pool.map(fetch, names))
    except _HUB_ERRORS as exc:
        raise hub_error(exc, model.repo_id, action="download from") from exc
    finally:
        if bar:
            bar.close()
    return snapshot


STREAM_WORKERS_PER_INPUT = 2  # files of one input downloading at once (the Hub caps a stream)


class _Aborted(Exception):
    """Raised inside a background download once the merge has stopped (it ends the transfer)."""


@dataclass
class _Entry:
    """One file of a streamed input, in the merge's reading order."""

    source: StreamingHubSource
    filename: str
    first: int  # the first and last task positions that read it
    last: int
    size: int  # bytes it takes on disk (0: used in place from the HF cache)
    state: str = "queued"  # queued -> downloading -> ready -> freed; or skipped / failed
    path: Path | None = None


class StreamAhead:
    """Downloads of all streamed inputs, run ahead of the merge within one disk budget.

    Each input gets ``STREAM_WORKERS_PER_INPUT`` threads. Files are admitted in the order the
    merge first reads them (all inputs together), each once the bytes on disk plus its size
    fit in ``budget_bytes``; a file may overtake files of other inputs only where the budget
    also holds all of those. So the file the merge needs next is never stuck behind one it
    needs later, and a budget of at least ``resolve.stream_disk_needed`` lets the merge go on. Only the merge's reader frees files (``advance``, ``release``): a downloader never
    deletes what the reader may still read. The first download error stops all downloads and
    is raised by the reader's next ``fetch``; ``close`` stops them too (an abort).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.peak_bytes_on_disk = 0  # measured: the work folders' bytes, partial files included
        self._cond = threading.Condition()
        self._free = budget_bytes
        self._queue: list[_Entry] = []  # not yet admitted, in reading order
        self._entries: list[_Entry] = []
        self._sources: list[StreamingHubSource] = []
        self._position = 0  # the merge has read every task before this one
        self._error: BaseException | None = None
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    def add(self, source: StreamingHubSource, entries: list[_Entry]) -> None:
        """Register a source's files (before ``start``)."""
        self._sources.append(source)
        self._entries += entries

    def start(self) -> None:
        order = {id(s): i for i, s in enumerate(self._sources)}
        self._queue = sorted(self._entries, key=lambda e: (e.first, order[id(e.source)]))
        for source in self._sources:
            for n in range(STREAM_WORKERS_PER_INPUT):
                name = f"shardmerge-download-{source.model.repo_id}-{n}"
                thread = threading.Thread(target=self._work, args=(source,), name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def close(self) -> None:
        """Stop every download (a running one ends at its next block) and wait for them."""
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def wait(self, entry: _Entry) -> Path | None:
        """The reader's wait for ``entry``: its path, or None if it will not be downloaded."""
        with self._cond:
            while entry.state in ("queued", "downloading") and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            return entry.path if entry.state == "ready" else None

    def advance(self, position: int) -> None:
        """The reader reached task ``position``: free every file whose last use is before it."""
        with self._cond:
            if position <= self._position:
                return
            self._position = position
            done = [e for e in self._entries if e.state == "ready" and e.last < position]
        self._free_entries(done)

    def release(self, entry: _Entry) -> None:
        with self._cond:
            done = [entry] if entry.state == "ready" else []
        self._free_entries(done)

    def _free_entries(self, entries: list[_Entry]) -> None:
        if not entries:
            return
        self._measure()  # the peak comes just before a delete
        for entry in entries:
            entry.source._truncate_and_delete(entry.filename, entry.path)
        with self._cond:
            for entry in entries:
                entry.state = "freed"
                self._free += entry.size
            self._cond.notify_all()

    def _take(self, source: StreamingHubSource) -> _Entry | None:
        """The next file for one of ``source``'s threads, with its bytes reserved (blocks)."""
        with self._cond:
            while True:
                if self._stopped.is_set() or self._error is not None:
                    return None
                # Files the merge has read past (never read: SLERP's t = 0 skips B) are skipped.
                while self._queue and self._queue[0].last < self._position:
                    self._queue.pop(0).state = "skipped"
                    self._cond.notify_all()
                # This source's next file; files of other sources needed before it go first,
                # unless the budget holds them all besides it (then no input waits for
                # another's busy threads, and every file before it still fits).
                before = 0
                for index, entry in enumerate(self._queue):  # noqa: B007 - used after the loop
                    if entry.source is source:
                        break
                    before += entry.size
                else:
                    return None  # nothing left for this source
                if before + entry.size <= self._free:
                    del self._queue[index]
                    self._free -= entry.size
                    entry.state = "downloading"
                    self._cond.notify_all()
                    return entry
                self._cond.wait()

    def _work(self, source: StreamingHubSource) -> None:
        while (entry := self._take(source)) is not None:
            try:
                path = source._download(entry.filename, self._stopped)
            except _Aborted:
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                with self._cond:
                    entry.state = "failed"
                    self._free += entry.size
                    if self._error is None:
                        self._error = exc
                    self._cond.notify_all()
                return
            self._measure()
            with self._cond:
                entry.path, entry.state = path, "ready"
                # Read past while it downloaded: never read (the reader waits for what it reads),
                # so freeing it here cannot pull a file from under the reader.
                unread = entry.last < self._position
                self._cond.notify_all()
            if unread:
                self.release(entry)

    def _measure(self) -> None:
        total = sum(source._bytes_on_disk() for source in self._sources)
        with self._cond:
            self.peak_bytes_on_disk = max(self.peak_bytes_on_disk, total)


class StreamingHubSource:
    """Input shards fetched just in time into a work folder and deleted once finished with.

    Downloads go to ``workdir/<org>--<name>--<sha12>/`` as plain files
    (``hf_hub_download(local_dir=...)``), never into the shared HF cache, so deleting one frees
    its bytes and cannot break another repo's blobs. A file that is already in the HF cache at
    this sha is used in place and never deleted. Offline, every file must already be cached.

    ``uses`` is the file of each tensor in the order the engine reads them (repeats allowed;
    None: another model's read at that position, so positions are the same for all inputs).
    With ``ahead`` (shared by the merge's streamed inputs), the files are downloaded in that
    order in the background, within its disk budget (see ``StreamAhead``). Without it, each
    file downloads when fetched, and fetching a file first deletes every downloaded file whose
    last use comes before that file's first use.
    """

    def __init__(
        self,
        model: HubModel,
        workdir: Path,
        uses: Sequence[str | None] = (),
        ahead: StreamAhead | None = None,
    ) -> None:
        self.model = model
        self.folder = Path(workdir) / f"{model.repo_id.replace('/', '--')}--{model.sha[:12]}"
        self.peak_bytes_on_disk = 0  # max bytes of this source's downloads on disk at once
        self._owned: dict[str, Path] = {}  # downloaded by this source: deleted on release
        self._lock = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}
        self._first_use: dict[str, int] = {}
        self._last_use: dict[str, int] = {}
        for position, filename in enumerate(uses):
            if filename is None:  # a read of another model at this position
                continue
            self._first_use.setdefault(filename, position)
            self._last_use[filename] = position
        self._ahead = ahead
        self._entries: dict[str, _Entry] = {}
        if ahead is not None:
            for name, first in self._first_use.items():
                cached = try_to_load_from_cache(model.repo_id, name, revision=model.sha)
                size = 0 if isinstance(cached, str) else model.sizes.get(name, 0)
                self._entries[name] = _Entry(self, name, first, self._last_use[name], size)
            ahead.add(self, list(self._entries.values()))

    def fetch(self, filename: str) -> Path:
        """Make sure ``filename`` is on disk (downloading it at model.sha); return its path."""
        entry = self._entries.get(filename)
        if entry is not None and self._ahead is not None:
            self._ahead.advance(entry.first)
            path = self._ahead.wait(entry)
            if path is not None:
                return path
        with self._file_lock(filename):
            with self._lock:
                if filename in self._owned:
                    return self._owned[filename]
            if entry is None:
                self._free_finished(before=filename)
            path = self._download(filename, None)
            with self._lock:
                if not self._is_cached(filename, path):
                    self._owned[filename] = path
                self.peak_bytes_on_disk = max(self.peak_bytes_on_disk, self._bytes_on_disk())
            return path

    def release(self, filename: str) -> None:
        """No remaining tensor needs ``filename``: delete it if this source downloaded it."""
        entry = self._entries.get(filename)
        if entry is not None and self._ahead is not None:
            self._ahead.release(entry)
        with self._file_lock(filename):
            with self._lock:
                path = self._owned.pop(filename, None)
            if path is not None:
                self._delete(filename, path)

    def close(self) -> None:
        """Delete everything this source downloaded (call it when the merge ends or fails)."""
        if self._ahead is not None:
            self._ahead.close()
        with self._lock:
            self._owned.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _download(self, filename: str, stop: threading.Event | None) -> Path:
        """The file, checked: in place from the HF cache, else downloaded into the folder.
        ``stop`` set: the transfer ends with ``_Aborted`` at its next block."""
        bar = _abortable_bar(stop) if stop is not None else None
        cached = try_to_load_from_cache(self.model.repo_id, filename, revision=self.model.sha)
        try:
            if isinstance(cached, str):  # a bad cached copy is replaced in the cache
                return _checked(self.model, filename, Path(cached), tqdm_class=bar)
            if constants.is_offline_mode():
                _require_cached(self.model, [filename])
            path = Path(_download(self.model, filename, local_dir=self.folder, tqdm_class=bar))
            return _checked(self.model, filename, path, local_dir=self.folder, tqdm_class=bar)
        except _HUB_ERRORS as exc:
            if stop is not None and stop.is_set():
                raise _Aborted from exc
            raise hub_error(exc, self.model.repo_id, action="download from") from exc

    def _is_cached(self, filename: str, path: Path) -> bool:
        return not path.is_relative_to(self.folder)

    def _free_finished(self, *, before: str) -> None:
        """Delete the downloads whose last use precedes the first use of ``before``."""
        first = self._first_use.get(before)
        if first is None:
            return
        with self._lock:
            done = [f for f in self._owned if self._last_use.get(f, first) < first]
            paths = [(f, self._owned.pop(f)) for f in done]
        for filename, path in paths:
            self._truncate_and_delete(filename, path)

    def _truncate_and_delete(self, filename: str, path: Path | None) -> None:
        if path is None or self._is_cached(filename, path):  # the user's cache: an input
            return
        # The engine may still hold the file open (it releases after computing its last
        # chunk): truncating frees the blocks now, where unlinking alone would not.
        with contextlib.suppress(FileNotFoundError):
            os.truncate(path, 0)
        self._delete(filename, path)

    def _delete(self, filename: str, path: Path) -> None:
        path.unlink(missing_ok=True)
        # huggingface_hub's bookkeeping for local_dir downloads.
        meta = self.folder / ".cache" / "huggingface" / "download" / f"{filename}.metadata"
        meta.unlink(missing_ok=True)
        meta.with_suffix(".lock").unlink(missing_ok=True)

    def _file_lock(self, filename: str) -> threading.Lock:
        with self._lock:
            return self._file_locks.setdefault(filename, threading.Lock())

    def _bytes_on_disk(self) -> int:
        """Bytes under the work folder now, partial downloads of other threads included."""
        total = 0
        with contextlib.suppress(FileNotFoundError):  # a folder removed while walked
            for path in self.folder.rglob("*"):
                with contextlib.suppress(FileNotFoundError):  # renamed or released meanwhile
                    total += path.stat().st_size if path.is_file() else 0
        return total


def check_push_target(
    repo_id: str,
    *,
    inputs: Sequence[str],
    private: bool,
    revision: str | None = None,
    create_pr: bool = False,
) -> PushTarget:
    """Check a push target before any download or merge; send nothing that writes.

    The repo id must be valid and none of ``inputs`` (Hub ids of the merge's inputs, whatever
    their revision); a token must be present, valid and allowed to write in the repo's
    namespace (``whoami``); an existing repo must be public only if ``private`` is not asked.

    Raises:
        InputError: any of these fails, or offline (pushing needs the network).
        ShardmergeError: the Hub is unreachable or failing (retry).
    """
    where = f"cannot push to {repo_id}"
    if not looks_like_repo_id(repo_id):
        raise InputError(f"{where}: {repo_id_problem(repo_id)}")
    if repo_id.lower() in {ref.lower() for ref in inputs}:
        raise InputError(
            f"{where}: it is one of the merge's inputs, and the push would replace that model "
            "with the merge: push to another repo"
        )
    if create_pr and revision is not None:
        raise InputError(f"{where}: --create-pr opens a pull request on main: drop --revision")
    if constants.is_offline_mode():
        raise InputError(f"{where}: pushing needs the network, and HF_HUB_OFFLINE=1 is set")
    login = "set HF_TOKEN or run `hf auth login`"
    if get_token() is None:
        raise InputError(f"{where}: pushing needs a write token and none is set; {login}")
    api = HfApi()
    try:
        me = api.whoami()
    except _HUB_ERRORS as exc:
        error = hub_error(exc, repo_id, action="push to")
        if isinstance(error, InputError):  # 401 here: the token itself is wrong
            raise InputError(f"{where}: the token is invalid or expired; {login}") from exc
        raise error from exc
    user = str(me.get("name") or "")
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise InputError(f"{where}: the token of {user} is read-only; pushing needs a write token")
    namespaces = [user, *(str(org.get("name")) for org in me.get("orgs") or [])]
    namespace = repo_id.split("/")[0]
    if namespace.lower() not in {n.lower() for n in namespaces}:
        raise InputError(
            f"{where}: the token of {user} cannot write to {namespace!r} (it can write to: "
            f"{', '.join(namespaces)})"
        )
    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError:
        return PushTarget(repo_id, f"{constants.ENDPOINT}/{repo_id}", user, False, private)
    except _HUB_ERRORS as exc:
        raise hub_error(exc, repo_id, action="push to") from exc
    if private and not info.private:
        raise InputError(
            f"{where}: it already exists and is public, so --private cannot apply: choose "
            f"another name, or make it private on {constants.ENDPOINT}/{repo_id} first"
        )
    return PushTarget(repo_id, f"{constants.ENDPOINT}/{repo_id}", user, True, bool(info.private))


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool,
    commit_message: str,
    dry_run: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    replaces: Callable[[str], bool] = lambda path: False,
) -> PushResult:
    """Upload every file of ``folder`` to ``repo_id`` in one commit, creating the repo if needed.

    The same commit deletes the files of the target branch that ``folder`` lacks and that
    ``replaces`` says belong to the model being replaced (an earlier push's shards and index),
    so the branch never holds two models. ``revision`` is the branch (created from main if
    missing); ``create_pr`` opens a pull request instead. ``dry_run`` reads the target and
    sends nothing that writes. A repo this call created is deleted again if the commit fails.
    A failure never touches ``folder``; its message says the local output is complete and how
    to retry.

    Raises:
        InputError: bad repo id, empty folder, no permission, existing public repo with private.
        ShardmergeError: the Hub is unreachable or failing (retry).
    """
    folder = Path(folder)
    if not looks_like_repo_id(repo_id):
        raise InputError(f"cannot push to {repo_id}: {repo_id_problem(repo_id)}")
    files = tuple(
        (path.relative_to(folder).as_posix(), path.stat().st_size)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not {".git", ".cache"} & set(path.relative_to(folder).parts)
    )
    if not files:
        raise InputError(f"nothing to push: {folder} holds no files")
    result = PushResult(
        url=f"{constants.ENDPOINT}/{repo_id}",
        repo_id=repo_id,
        files=files,
        total_bytes=sum(size for _, size in files),
        private=private,
        dry_run=dry_run,
        revision=revision,
    )
    api = HfApi()
    created = False
    retry = ""
    try:
        try:
            exists = api.repo_info(repo_id)
        except RepositoryNotFoundError:
            exists = None
        if exists is not None and private and not exists.private:
            raise InputError(
                f"{repo_id} already exists and is public, so --private cannot apply and nothing "
                f"was uploaded: choose another name, or make it private on {result.url}"
            )
        base = None if create_pr else revision
        remote = _remote_paths(api, repo_id, base) if exists is not None else set()
        local = {path for path, _ in files}
        deleted = tuple(sorted(p for p in remote - local if replaces(p)))
        result = replace(
            result,
            private=bool(exists.private) if exists is not None else private,
            created=exists is None,
            deleted=deleted,
        )
        if dry_run:
            return result
        # Rerunning `shardmerge run` would refuse the now non-empty output folder: say how to
        # upload the finished folder alone instead (it does not delete stale files).
        upload = ["hf", "upload", repo_id, str(folder), "."]
        upload += ["--private"] if private and exists is None else []
        upload += ["--revision", revision] if revision else []
        upload += ["--create-pr"] if create_pr else []
        upload += ["--commit-message", commit_message]
        retry = f"the local output is complete at {folder}; to retry, upload it with: "
        retry += shlex.join(upload)
        if exists is None:
            try:
                api.create_repo(repo_id, private=private)
                created = True
            except HfHubHTTPError as exc:
                if exc.response.status_code != 409:  # 409: created meanwhile: not ours
                    raise
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path))
            for path, _ in files
        ]
        operations += [CommitOperationDelete(path_in_repo=path) for path in deleted]
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
    except (*_HUB_ERRORS, RuntimeError, ShardmergeError) as exc:  # LFS failures: RuntimeError
        if created:  # leave no empty repo behind
            with contextlib.suppress(*_HUB_ERRORS):
                api.delete_repo(repo_id)
        error = hub_error(exc, repo_id, action="push to")
        raise type(error)(f"{error} ({retry})" if retry else str(error)) from exc
    return replace(result, commit_sha=info.oid, pr_url=info.pr_url)


def hub_error(exc: BaseException, repo_id: str, *, action: str) -> ShardmergeError:
    """Turn a huggingface_hub / network error into one line naming the repo.

    ``action`` completes "cannot {action} {repo_id}", e.g. ``"read"``, ``"push to"``.
    Input-side problems (no access, not found, offline) give ``InputError`` (exit 2);
    an unreachable or failing Hub gives ``ShardmergeError`` (exit 1: retry).
    """
    if isinstance(exc, ShardmergeError):
        return exc
    where = f"cannot {action} {repo_id}"
    login = "set HF_TOKEN or run `hf auth login`"
    for err in _causes(exc):  # the HTTP or network error that started it decides
        if isinstance(err, GatedRepoError):
            return InputError(
                f"{where}: the model is gated: request access on {constants.ENDPOINT}/{repo_id}, "
                f"then retry with that account's token ({login})"
            )
        if isinstance(err, HfHubHTTPError):
            status = err.response.status_code
            if status == 401:
                return InputError(
                    f"{where}: not authorised (401): the token is missing or invalid, or cannot "
                    f"access this repo; {login}"
                )
            if isinstance(err, RevisionNotFoundError):
                return InputError(f"{where}: revision not found (use a branch, tag or full sha)")
            if isinstance(err, RemoteEntryNotFoundError) or (
                status == 404
                and not isinstance(err, RepositoryNotFoundError)
                and "/resolve/" in str(err.response.url)
            ):
                return InputError(f"{where}: file not found in the repo: {_url_filename(err)}")
            if isinstance(err, RepositoryNotFoundError) or status == 404:
                return InputError(f"{where}: repository not found (if it is private, {login})")
            if status == 403:
                return InputError(
                    f"{where}: forbidden (403): this token lacks permission (pushing needs a "
                    f"write token); {login}"
                )
            if status == 429 or status >= 500:
                return ShardmergeError(f"{where}: the Hub answered {status}; retry later")
            detail = _first_line(err.server_message or str(err))
            return InputError(f"{where}: the Hub refused the request ({status}): {detail}")
        if isinstance(err, OfflineModeIsEnabled):
            return InputError(f"{where}: {_OFFLINE_HINT}")
        if isinstance(err, (http_client.TransportError, ConnectionError, TimeoutError)):
            return ShardmergeError(
                f"{where}: cannot reach the Hub at {constants.ENDPOINT} "
                f"({type(err).__name__}); check the network and retry"
            )
    if isinstance(exc, (EntryNotFoundError, RevisionResolutionError)):  # local cache only
        return InputError(f"{where}: {_OFFLINE_HINT}")
    if isinstance(exc, HFValidationError):
        return InputError(f"{where}: {_first_line(str(exc))}")
    return ShardmergeError(f"{where}: {type(exc).__name__}: {_first_line(str(exc))}")


# -- helpers ------------------------------------------------------------------------------------

_OFFLINE_HINT = (
    "not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1); "
    "run once online or unset HF_HUB_OFFLINE"
)


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def _url_filename(err: HfHubHTTPError) -> str:
    url = str(err.response.url)
    path = url.split("/resolve/", 1)[-1].split("?", 1)[0]
    return unquote(path.split("/", 1)[-1]) if "/resolve/" in url else url


def snapshot_dir(repo_id: str, sha: str) -> Path:
    """Where the HF cache keeps this commit's files (huggingface_hub's documented layout)."""
    return (
        Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha
    )


def _require_cached(model: HubModel, filenames: list[str]) -> None:
    snapshot = snapshot_dir(model.repo_id, model.sha)
    missing = [name for name in filenames if not (snapshot / name).is_file()]
    if missing:
        raise InputError(f"{model.label}: {', '.join(missing)}: {_OFFLINE_HINT}")


def _download(
    model: HubModel, filename: str, local_dir: Path | None = None, tqdm_class: Any = None
) -> str:
    return hf_hub_download(
        model.repo_id, filename, revision=model.sha, local_dir=local_dir, tqdm_class=tqdm_class
    )


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    block = bytearray(_HASH_BLOCK_BYTES)
    view = memoryview(block)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(block):
            digest.update(view[:n])  # hashlib releases the GIL on large buffers
    return digest.hexdigest()


def _checked(
    model: HubModel,
    filename: str,
    path: Path,
    local_dir: Path | None = None,
    tqdm_class: Any = None,
) -> Path:
    """``path`` if it matches the sha256 the Hub publishes for ``filename`` (or none is
    published); otherwise remove it, download it once more and check again.

    Raises:
        ShardmergeError: still no match (nothing bad is left on disk), or offline.
    """
    expected = model.sha256.get(filename)
    if expected is None or _sha256_of(path) == expected:
        return path
    _discard(path)
    where = f"cannot download from {model.repo_id}: {filename}"
    if constants.is_offline_mode():
        raise ShardmergeError(
            f"{where}: the cached copy does not match its sha256 {expected[:12]}… and was removed "
            "from the cache; run once online (without HF_HUB_OFFLINE) to download it again"
        )
    path = Path(_download(model, filename, local_dir=local_dir, tqdm_class=tqdm_class))
    if _sha256_of(path) == expected:
        return path
    _discard(path)
    raise ShardmergeError(
        f"{where}: the download does not match its published sha256 {expected[:12]}…, twice "
        "(corrupted in transit); the bad copy was removed from the cache; retry later"
    )


def _discard(path: Path) -> None:
    """Remove a downloaded file: the cache's snapshot link, the repo's blob it points to and,
    where that is a link into a shared store (Xet downloads), the stored file too."""
    chain = [path]
    while chain[-1].is_symlink() and len(chain) < 4:
        chain.append(chain[-1].parent / os.readlink(chain[-1]))
    for link in chain:
        link.unlink(missing_ok=True)


class _DownloadBar:
    """One tqdm bar over many concurrent ``hf_hub_download`` calls (bytes, rate, ETA).

    huggingface_hub makes one progress object per file through ``tqdm_class``; these add their
    sizes and bytes into this bar. It appears with the first download: cached files show none.
    """

    def __init__(self, desc: str) -> None:
        self._desc = desc
        self._bar: Any = None
        self._lock = threading.Lock()

    def add(self, total: int | None, done: int) -> None:
        with self._lock:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=0, unit="B", unit_scale=True, desc=self._desc, file=sys.stderr
                )
            self._bar.total += total or 0
            self._bar.update(done)

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def file_bar_class(self) -> type:
        outer = self

        class _FileBar:
            def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **_: Any):
                outer.add(total, initial)

            def __enter__(self) -> _FileBar:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def update(self, n: int | float | None = 1) -> None:
                outer.update(int(n or 0))

            def close(self) -> None:
                pass

        return _FileBar


def _abortable_bar(stop: threading.Event) -> type:
    """A silent progress class for ``hf_hub_download`` that ends the transfer (``_Aborted``)
    at its next block once ``stop`` is set: the client offers no other way to cancel."""

    class _Bar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int | float | None = 1) -> None:
            if stop.is_set():
                raise _Aborted

        def close(self) -> None:
            pass

    return _Bar


def _remote_paths(api: HfApi, repo_id: str, revision: str | None) -> set[str]:
    """Every file path on ``revision`` (None = main; a branch not created yet: main's)."""
    try:
        tree = api.list_repo_tree(repo_id, revision=revision, recursive=True)
        return {entry.path for entry in tree if isinstance(entry, RepoFile)}
    except RevisionNotFoundError:
        return _remote_paths(api, repo_id, None) if revision else set()


def _list_remote_files(model: HubModel) -> tuple[dict[str, int], dict[str, str]]:
    """Every file's size, and the published sha256 of each LFS file (its LFS oid)."""
    tree = HfApi().list_repo_tree(model.repo_id, revision=model.sha, recursive=True)
    files = [entry for entry in tree if isinstance(entry, RepoFile)]
    sha256 = {entry.path: entry.lfs.sha256 for entry in files if entry.lfs is not None}
    return {entry.path: entry.size for entry in files}, sha256


def _list_cached_files(model: HubModel) -> tuple[dict[str, int], dict[str, str]]:
    """Offline file list: the cached snapshot's files (sizes of the blobs they point to), and
    the sha256 of those whose blob is named by one (the cache names LFS blobs so)."""
    snapshot = snapshot_dir(model.repo_id, model.sha)
    paths = [path for path in sorted(snapshot.rglob("*")) if path.is_file()]
    files = {path.relative_to(snapshot).as_posix(): path.stat().st_size for path in paths}
    sha256 = {}
    for path in paths:
        # The repo's own blob name (its ETag), not a shared store's name it may link on to.
        blob = os.path.basename(os.readlink(path)) if path.is_symlink() else ""
        if _SHA256_RE.fullmatch(blob):
            sha256[path.relative_to(snapshot).as_posix()] = blob
    return files, sha256


def _read_json(model: HubModel, filename: str) -> dict:
    path = _download(model, filename)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{model.label}: {filename} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{model.label}: {filename} is not a JSON object")
    return data


def _read_remote_header(model: HubModel, filename: str, size: int) -> dict:
    url = hf_hub_url(model.repo_id, filename, revision=model.sha)
    (length,) = struct.unpack("<Q", _read_range(url, 0, 8))
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{model.label}: {filename}: not a safetensors file (bad header)")
    return _parse_header(model, filename, _read_range(url, 8, length))


def _read_range(url: str, start: int, length: int) -> bytes:
    """GET bytes [start, start+length) of a Hub file; refuse to read a whole body instead."""
    headers = {**build_hf_headers(), "Range": f"bytes={start}-{start + length - 1}"}
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
    with get_session().stream("GET", url, headers=headers, timeout=timeout) as response:
        if response.status_code >= 400:
            response.read()  # the error message lives in the body
            hf_raise_for_status(response)
        if response.status_code != 206:  # a server ignoring Range would send the whole shard
            raise ShardmergeError(f"the Hub ignored a Range request for {url}; retry later")
        data = response.read()
    if len(data) != length:
        raise ShardmergeError(f"short read of {url} ({len(data)} of {length} bytes); retry")
    return data


def _read_cached_header(model: HubModel, filename: str) -> dict:
    path = snapshot_dir(model.repo_id, model.sha) / filename
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            raise CheckpointError(f"{model.label}: {filename}: not a safetensors file (bad header)")
        return _parse_header(model, filename, f.read(length))


def _parse_header(model: HubModel, filename: str, raw: bytes) -> dict:
    try:
        header: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{model.label}: {filename}: safetensors header is not JSON") from exc
    bad = [
        name
        for name, info in (header.items() if isinstance(header, dict) else [("", None)])
        if name != "__metadata__"
        and not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys())
    ]
    if bad:
        raise CheckpointError(f"{model.label}: {filename}: malformed header entries: {bad[:5]}")
    return dict(header)
