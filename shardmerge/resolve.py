"""Model references -> header inventories and shard sources (local folders or the Hub)."""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from shardmerge.errors import CheckpointError, InputError
from shardmerge.inventory import (
    INDEX_NAME,
    SINGLE_NAME,
    ModelInventory,
    assemble_inventory,
    parse_header_dict,
    read_local_model,
)
from shardmerge.output import is_small_file, local_small_files
from shardmerge.recipe import ModelRef

if TYPE_CHECKING:
    from shardmerge.hub import HubModel, StreamAhead
    from shardmerge.shardio import ShardSource


@dataclass(frozen=True)
class ResolvedModel:
    """A model pinned to exact content: a local folder, or a Hub repo at one commit."""

    key: str  # "a" or "b"
    ref: ModelRef
    label: str  # "model A (org/name)", used in every message
    local_dir: Path | None
    hub: HubModel | None
    inventory: ModelInventory
    small_files: tuple[str, ...]  # config, tokenizer and other non-weight files
    pin: str  # Hub commit sha, or a fingerprint of the local headers, sizes and mtimes
    origin_dir: Path | None = None  # the folder named in the recipe, when local_dir is a
    # safetensors copy of its pickle weights (--allow-pickle)

    @property
    def hub_id(self) -> str | None:
        return self.hub.repo_id if self.hub else None

    @property
    def input_dirs(self) -> tuple[Path, ...]:
        """Local folders this model is read from: an output must stay out of all of them."""
        return tuple(d for d in (self.local_dir, self.origin_dir) if d is not None)


def resolve_model(
    ref: ModelRef,
    key: str,
    *,
    allow_pickle: bool = False,
    base_dir: str = "",
    other_base: str | None = None,
) -> ResolvedModel:
    """Find ``ref`` locally or on the Hub and read its headers (no tensor bytes).

    Args:
        allow_pickle: convert a local folder holding only ``pytorch_model*.bin`` files into
            safetensors in a scratch folder (removed at exit) instead of refusing it.
        base_dir: the folder a relative path is resolved from ("" = the current directory).
        other_base: the folder the other convention would use, named in the error when the
            model is found there instead.
    """
    label = f"model {key.upper()} ({ref.ref}{'@' + ref.revision if ref.revision else ''})"
    written = Path(ref.ref).expanduser()
    path = Path(base_dir) / written  # an absolute path stays as it is
    elsewhere = Path(other_base) / written if other_base is not None else None
    if not path.is_dir() and elsewhere is not None and elsewhere.is_dir():
        # Taken as a Hub id or refused otherwise: say where the folder is.
        raise InputError(
            f"models.{key}: {ref.ref!r} is not a folder here ({path.absolute()}): relative "
            f"paths in {_convention(base_dir)}; it is a folder from "
            f"{_place(other_base or '')} ({elsewhere.absolute()}): write that path instead"
        )
    if path.is_dir():
        if ref.revision:
            raise InputError(f"models.{key}: a revision was given for local folder {ref.ref!r}")
        if allow_pickle and _pickle_only(path):
            return _resolve_pickle_model(ref, key, label, path)
        inventory = read_local_model(path, label)
        return ResolvedModel(
            key=key,
            ref=ref,
            label=label,
            local_dir=path,
            hub=None,
            inventory=inventory,
            small_files=tuple(local_small_files(path)),
            pin=_local_fingerprint(path, inventory.files, inventory),
        )
    from shardmerge import hub

    if not hub.looks_like_repo_id(ref.ref):
        # A hint (a URL, a single-name id) says what was meant; else the folder looked for.
        hint = hub.repo_id_hint(ref.ref)
        if hint is not None:
            looked = f" ({hint})"
        elif path != written:
            looked = f" (looked for the folder {path.absolute()})"
        else:
            looked = ""
        raise InputError(f"models.{key}: {ref.ref!r} is not a folder and not a Hub repo id{looked}")
    model = hub.resolve_hub_model(ref.ref, ref.revision)
    listing = hub.fetch_listing(model)
    # Every download is checked against these; streaming budgets the disk by the sizes.
    model = replace(model, sha256=listing.sha256, sizes=listing.files)
    headers = {
        file: parse_header_dict(raw, file, None, f"{label}: {file}")
        for file, raw in listing.headers.items()
    }
    weight_map = None
    if listing.index is not None:
        weight_map = listing.index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{label}: model.safetensors.index.json has no weight_map")
    inventory = assemble_inventory(label, headers, weight_map, listing.config)
    small = tuple(f for f, size in sorted(listing.files.items()) if is_small_file(f, size))
    return ResolvedModel(
        key=key,
        ref=ref,
        label=f"model {key.upper()} ({model.repo_id}@{model.sha[:12]})",
        local_dir=None,
        hub=model,
        inventory=inventory,
        small_files=small,
        pin=model.sha,
    )


def _convention(base_dir: str) -> str:
    if base_dir:
        return f"a shardmerge recipe start from the recipe's folder ({base_dir})"
    return "a mergekit config start from the current directory, as in mergekit"


def _place(folder: str) -> str:
    return f"the recipe's folder {folder}" if folder else "the current directory"


def open_source(
    model: ResolvedModel,
    *,
    stream: bool,
    workdir: Path,
    files: Sequence[str | None] | None = None,
    progress: bool = False,
) -> ShardSource:
    """A shard source for the engine.

    Hub models are downloaded (only ``files``, default all shards) unless ``stream``, where each
    shard arrives just in time and is deleted after use. ``files`` lists each tensor's file in
    reading order (repeats allowed; None: another model's read): streaming deletes a shard as
    soon as reading moves past it.
    ``progress`` shows a download bar (not streaming).
    """
    from shardmerge.shardio import LocalSource

    if model.local_dir is not None:
        return LocalSource(model.local_dir, model.label)
    from shardmerge import hub

    assert model.hub is not None
    if stream:
        return hub.StreamingHubSource(model.hub, workdir / f"stream-{model.key}", files or ())
    needed = list(model.inventory.files) if files is None else [f for f in files if f]
    return LocalSource(hub.download_files(model.hub, needed, progress=progress), model.label)


def open_sources(
    models: Sequence[ResolvedModel],
    *,
    stream: bool,
    workdir: Path,
    files: Sequence[Sequence[str | None]],
    progress: bool = False,
    stream_budget: int | None = None,
) -> tuple[list[ShardSource], StreamAhead | None]:
    """``open_source`` for each model; when streaming, the Hub models download ahead of the
    merge together, within ``stream_budget`` bytes on disk (None: ``default_stream_budget``).
    The second value, when streaming, must be closed (``close``) when the merge ends."""
    hub_models = [m for m in models if m.hub is not None]
    if not stream or not hub_models:
        return [
            open_source(m, stream=stream, workdir=workdir, files=f, progress=progress)
            for m, f in zip(models, files, strict=True)
        ], None
    from shardmerge import hub

    if stream_budget is None:
        stream_budget = default_stream_budget(models, files)
    ahead = hub.StreamAhead(stream_budget)
    streamed = {
        m.key: hub.StreamingHubSource(m.hub, workdir / f"stream-{m.key}", f, ahead)
        for m, f in zip(models, files, strict=True)
        if m.hub is not None
    }
    ahead.start()  # before the engine's import (torch: seconds), which LocalSource needs
    from shardmerge.shardio import LocalSource

    sources: list[ShardSource] = []
    for m in models:
        if m.key not in streamed:
            assert m.local_dir is not None
        sources.append(streamed.get(m.key) or LocalSource(m.local_dir, m.label))  # type: ignore[arg-type]
    return sources, ahead


def default_stream_budget(
    models: Sequence[ResolvedModel], files: Sequence[Sequence[str | None]]
) -> int:
    """Three times ``stream_disk_needed``: while the merge reads a shard of each input, two more
    per input download (a stream per file: the Hub caps each); never more than all the files."""
    total = sum(
        sum(m.hub.sizes.get(f, 0) for f in set(uses) if f is not None)
        for m, uses in zip(models, files, strict=True)
        if m.hub is not None
    )
    return min(3 * stream_disk_needed(models, files), total)


def stream_disk_needed(
    models: Sequence[ResolvedModel], files: Sequence[Sequence[str | None]]
) -> int:
    """The fewest input bytes that streaming ``models`` must hold on disk at once: the most, at
    any task, of the Hub files already read from and still to be read (all models together).

    ``files[i]`` is model i's file for each read, in reading order (None: another model's
    read; positions are shared by all models). Local models cost nothing.
    """
    events: dict[int, int] = {}
    for model, uses in zip(models, files, strict=True):
        sizes = model.hub.sizes if model.hub is not None else {}
        spans: dict[str, list[int]] = {}
        for position, name in enumerate(uses):
            if name is None:
                continue
            spans.setdefault(name, [position, position])[1] = position
        for name, (first, last) in spans.items():
            size = sizes.get(name, 0)
            events[first] = events.get(first, 0) + size
            events[last + 1] = events.get(last + 1, 0) - size
    live = peak = 0
    for position in sorted(events):
        live += events[position]
        peak = max(peak, live)
    return peak


def small_files_folder(model: ResolvedModel, files: Iterable[str] | None = None) -> Path:
    """The folder holding the model's config, tokenizer and other small files (for a Hub
    model: those of ``files`` it has, default all, downloaded)."""
    if model.local_dir is not None:
        return model.local_dir
    from shardmerge import hub

    assert model.hub is not None
    wanted = model.small_files if files is None else [f for f in files if f in model.small_files]
    return hub.download_files(model.hub, list(wanted))


def _pickle_only(folder: Path) -> bool:
    has_safetensors = (folder / INDEX_NAME).is_file() or (folder / SINGLE_NAME).is_file()
    return not has_safetensors and any(folder.glob("pytorch_model*.bin"))


def _resolve_pickle_model(ref: ModelRef, key: str, label: str, folder: Path) -> ResolvedModel:
    """Convert ``folder``'s pickle weights to safetensors in a scratch folder and inventory it."""
    from shardmerge.pickles import convert_pickle_model

    scratch = Path(tempfile.mkdtemp(prefix=f"shardmerge-pickle-{key}-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    converted = scratch / "model"
    pickles = convert_pickle_model(folder, converted, label)
    inventory = read_local_model(converted, label)
    return ResolvedModel(
        key=key,
        ref=ref,
        label=label,
        local_dir=converted,
        hub=None,
        inventory=inventory,
        small_files=tuple(local_small_files(converted)),
        # Of the original files: each conversion writes new mtimes, and --resume must still match.
        pin=_local_fingerprint(folder, pickles, inventory),
        origin_dir=folder,
    )


def _local_fingerprint(folder: Path, files: Iterable[str], inventory: ModelInventory) -> str:
    """Cheap identity of a local model: its headers plus each weight file's size and mtime."""
    digest = hashlib.sha256()
    layout = [
        (t.name, t.dtype, list(t.shape), t.file, t.begin, t.end) for t in inventory.tensors.values()
    ]
    digest.update(json.dumps(layout).encode())
    for file in files:
        stat = (folder / file).stat()
        digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "sha256:" + digest.hexdigest()[:16]
