"""The output folder: location checks, atomic finalisation, config/tokenizer files, the index."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
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


def partial_dir(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{PARTIAL_SUFFIX}"


def check_output_location(
    dest: Path, inputs: Iterable[Path], *, overwrite: bool, needed_bytes: int
) -> None:
    """Refuse outputs that could damage an input, clobber data, or cannot fit."""
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
        if any(dest.iterdir()) and not overwrite:
            raise OutputError(f"output folder {dest} is not empty; pass --overwrite to replace it")
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


def prepare_partial(dest: Path, *, keep: bool) -> Path:
    """The hidden working folder beside ``dest``; emptied unless ``keep`` (resume)."""
    work = partial_dir(dest)
    if work.exists() and not keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def finalize(work: Path, dest: Path) -> None:
    """Move the complete output into place; an existing ``dest`` (--overwrite) goes only after."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
    work.rename(dest)
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
