"""The output folder: location checks, its lock, atomic finalisation, config/tokenizer files."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from shardmerge.errors import OutputError

INDEX_NAME = "model.safetensors.index.json"
# Weight files never copied from an input (the merged shards replace them).
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx",
    ".pkl", ".npz", ".tflite", ".ot", ".mlmodel",
)  # fmt: skip
SKIP_NAMES = {"README.md", INDEX_NAME, "pytorch_model.bin.index.json", ".gitattributes"}
# Config, tokenizer and the like are kilobytes to a few MB; anything bigger is not metadata.
MAX_SMALL_FILE_BYTES = 64 * 1024 * 1024
_TOKENIZER_HINTS = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "spiece",
                    "sentencepiece", "chat_template", "bpe", "preprocessor_config",
                    "processor_config")  # fmt: skip
PARTIAL_SUFFIX = ".shardmerge-partial"
LOCK_SUFFIX = ".shardmerge-lock"
# Scratch folders (streamed input shards) live in the working folder, so a killed run's are
# removed by the next run on that output rather than left beside it.
SCRATCH_PREFIX = ".shardmerge-scratch-"


def is_small_file(relative: str, size: int) -> bool:
    """Whether a model-folder file is metadata to carry into the output."""
    parts = Path(relative).parts
    if any(p.startswith(".") for p in parts) or relative in SKIP_NAMES:
        return False
    return not relative.endswith(WEIGHT_SUFFIXES) and size <= MAX_SMALL_FILE_BYTES


def is_tokenizer_file(relative: str) -> bool:
    return any(h in Path(relative).name for h in _TOKENIZER_HINTS)


def local_small_files(folder: Path) -> list[str]:
    """Small non-weight files of a local model folder (sub-folders such as 1_Pooling/ too)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and is_small_file(rel, path.stat().st_size):
                found.append(rel)
    return found


def output_path(out: Path) -> Path:
    """The absolute output path; a symlink means its target (replaced in place, link kept)."""
    out = out.expanduser().absolute()
    return out.resolve() if out.is_symlink() else out


def partial_dir(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{PARTIAL_SUFFIX}"


def lock_file(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{LOCK_SUFFIX}"


def written_by_shardmerge(folder: Path) -> bool:
    """Whether ``folder`` holds an index with shardmerge's metadata (our marker)."""
    try:
        index = json.loads((folder / INDEX_NAME).read_text())
        return isinstance(index["metadata"]["shardmerge"], dict)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_output_location(
    dest: Path, inputs: Iterable[Path], *, overwrite: bool, needed_bytes: int
) -> None:
    """Refuse outputs that could damage an input, clobber data, or cannot fit.

    ``overwrite`` replaces only an empty folder or one shardmerge wrote, and never the current
    directory, one of its parents, the home folder or ``/``.
    """
    dest = dest.expanduser().resolve()
    for folder in inputs:
        src = folder.resolve()
        if dest == src or src in dest.parents:
            raise OutputError(f"output folder {dest} is inside input folder {src}")
        if dest in src.parents:
            raise OutputError(f"output folder {dest} contains input folder {src}")
    if dest.exists():
        if not dest.is_dir():
            raise OutputError(f"output {dest} exists and is not a folder")
        cwd = Path.cwd().resolve()
        if dest == cwd or dest in cwd.parents or dest == Path.home().resolve():
            what = "the current directory" if dest == cwd else "a parent of the current directory"
            what = "your home folder" if dest == Path.home().resolve() else what
            raise OutputError(f"output folder {dest} is {what}: it is never replaced; choose --out")
        if any(dest.iterdir()):
            if not overwrite:
                raise OutputError(
                    f"output folder {dest} is not empty; pass --overwrite to replace it"
                )
            if not written_by_shardmerge(dest):
                raise OutputError(
                    f"output folder {dest} is not empty and was not written by shardmerge (no "
                    f"{INDEX_NAME} with shardmerge metadata): --overwrite replaces only empty "
                    "folders and earlier shardmerge outputs; move it away or choose another --out"
                )
    parent = _existing_parent(dest)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output location {parent} is not writable")
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise OutputError(
            f"not enough free space for {dest}: the merge writes {needed_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free on that filesystem"
        )


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def lock_holder(dest: Path) -> str | None:
    """Who holds ``dest``'s lock ("pid N on HOST"), or None when no run does (reads only)."""
    try:
        fd = os.open(lock_file(dest), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _holder_text(fd: int) -> str:
    for _ in range(20):  # the holder writes its name just after locking
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "pid unknown"


def busy_error(dest: Path, holder: str) -> OutputError:
    return OutputError(
        f"output {dest} is being written by another shardmerge run ({holder}); wait for it, "
        "or stop it and rerun with --resume"
    )


@contextlib.contextmanager
def output_lock(dest: Path) -> Iterator[None]:
    """Hold ``dest``'s lock (an flock on a hidden file beside it) while the block runs.

    The kernel drops the lock when its holder dies, so a killed run never blocks the next one;
    the file itself is removed when the block ends.

    Raises:
        OutputError: another process holds the lock (naming its pid and host).
    """
    path = lock_file(dest)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise busy_error(dest, holder) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # a finishing holder removed the file we opened: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        # Removed while still locked, so a waiting run never locks an orphaned file.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def prepare_partial(dest: Path, *, keep: bool) -> Path:
    """The hidden working folder beside ``dest``; emptied unless ``keep`` (resume), which still
    removes a killed run's scratch folders."""
    work = partial_dir(dest)
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for scratch in work.glob(SCRATCH_PREFIX + "*"):
        shutil.rmtree(scratch, ignore_errors=True)
    return work


def sync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then each folder, so their data and names are on
    the disk before the folder is renamed into place (a power cut cannot then leave a folder
    that looks complete with data missing)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for root, _, _ in os.walk(folder, topdown=False):
        sync_dir(Path(root))


def sync_dir(folder: Path) -> None:
    """fsync a folder: its entries (creations, renames) become durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize(work: Path, dest: Path) -> None:
    """Move the complete output into place; an existing ``dest`` (--overwrite) goes only after.

    The caller has synced ``work``; the rename itself is synced here (the parent folder).
    """
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
    work.rename(dest)
    sync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def write_config(work: Path, config: dict[str, Any] | None, torch_dtype: str | None) -> None:
    """The first model's config.json with the output dtype recorded."""
    if config is None:
        return
    config = dict(config)
    if torch_dtype is not None:
        if "dtype" in config:  # transformers >= 5 name
            config["dtype"] = torch_dtype
        if "torch_dtype" in config or "dtype" not in config:
            config["torch_dtype"] = torch_dtype
    write_json(work / "config.json", config)


def copy_files(src: Path, names: Iterable[str], work: Path) -> list[str]:
    copied = []
    for rel in names:
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)  # follows Hub-cache symlinks to the blob
        copied.append(rel)
    return copied
