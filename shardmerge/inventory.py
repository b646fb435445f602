"""Safetensors headers and model folders -> typed tensor inventories (no torch, no tensor bytes).

Everything here reads only the small JSON headers, so it is used for planning, ``validate`` and
pre-flight checks. Every malformed header is reported as a CheckpointError naming the file, and
a claimed size is checked against the real file size before anything is allocated for it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardmerge.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors itself refuses headers above 100 MB; a larger claim is corrupt or hostile.
MAX_HEADER_BYTES = 100_000_000
# torch's own limit on tensor rank; a longer shape is corrupt (and would make huge messages).
MAX_RANK = 64
_MAX_LISTED = 20

# safetensors dtype code -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
    "F16": 2, "BF16": 2, "F32": 4, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# Known to safetensors but not mergeable by SLERP without dequantisation.
UNSUPPORTED_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"})
TORCH_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
CODES_BY_TORCH_NAME = {v: k for k, v in TORCH_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``begin``/``end`` are byte offsets from the shard's data start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class ModelInventory:
    """All tensors of one model, from headers alone."""

    label: str
    tensors: Mapping[str, TensorInfo]
    files: tuple[str, ...]
    config: Mapping[str, Any] | None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def parse_header(
    raw: bytes, file: str, data_size: int | None, where: str | None = None
) -> dict[str, TensorInfo]:
    """Validate one decoded safetensors header and return its tensors.

    Args:
        raw: the JSON header bytes.
        file: the shard's name, for messages and for TensorInfo.file.
        data_size: bytes after the header, to bounds-check offsets (None: unknown, e.g. Hub).
        where: how messages name the shard (default ``file``), e.g. "model A: shard.safetensors".
    """
    where = where or file
    header = _decode_json(raw, f"{where}: header")
    return parse_header_dict(header, file, data_size, where)


def _decode_json(raw: bytes, what: str) -> Any:
    """``json.loads`` that reports every way hostile bytes can fail as a CheckpointError."""
    try:
        return json.loads(raw)
    # ValueError: JSONDecodeError, undecodable bytes, integers beyond Python's digit limit;
    # RecursionError: arrays nested thousands deep.
    except (ValueError, RecursionError) as exc:
        reason = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise CheckpointError(f"{what} is not valid JSON ({reason[:200]})") from None


def parse_header_dict(
    header: Any, file: str, data_size: int | None, where: str | None = None
) -> dict[str, TensorInfo]:
    """Validate an already decoded header (see :func:`parse_header`)."""
    where = where or file
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise CheckpointError(f"{where}: __metadata__ is not a JSON object")
            continue
        tensors[name] = _parse_entry(name, entry, file, data_size, where)
    _check_no_overlap(tensors, where)
    return tensors


def _parse_entry(name: str, entry: Any, file: str, data_size: int | None, shard: str) -> TensorInfo:
    where = f"{shard}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: missing or invalid dtype")
    if dtype in UNSUPPORTED_DTYPES:
        raise CheckpointError(
            f"{where}: dtype {dtype} (fp8/quantised) is not supported; SLERP needs "
            "unquantised weights: merge the original float checkpoints instead"
        )
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise CheckpointError(f"{where}: shape has {len(shape)} dimensions (at most {MAX_RANK})")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    needed = _nbytes(shape, DTYPE_SIZES[dtype], limit=1 << 64)
    if needed != end - begin:
        shown = "more than 2**64" if needed is None else str(needed)
        raise CheckpointError(
            f"{where}: data_offsets span {end - begin} bytes but shape {shape} x {dtype} "
            f"needs {shown}"
        )
    if data_size is not None and end > data_size:
        raise CheckpointError(
            f"{where}: data_offsets end at {end} but the file holds only {data_size} data "
            "bytes (truncated shard?)"
        )
    return TensorInfo(name, dtype, tuple(shape), file, begin, end)


def _nbytes(shape: list[int], item_size: int, limit: int) -> int | None:
    """Bytes of ``shape``, or None once they exceed ``limit`` (hostile shapes can claim
    products with thousands of digits)."""
    if 0 in shape:
        return 0
    n = item_size
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(tensors: Mapping[str, TensorInfo], file: str) -> None:
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:], strict=False):
        if begin1 < end0:
            raise CheckpointError(f"{file}: tensors {name0!r} and {name1!r} overlap")


def read_header(
    path: Path, file: str, where: str | None = None
) -> tuple[int, dict[str, TensorInfo]]:
    """Read and validate a shard's header. Returns (data start offset, tensors)."""
    where = where or file
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{where}: too short to be a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise CheckpointError(
                    f"{where}: header length {header_len} is larger than the file "
                    f"({size} bytes) allows (truncated or not a safetensors file)"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read ({exc.strerror or exc})") from None
    data_start = 8 + header_len
    return data_start, parse_header(raw, file, size - data_start, where)


def safe_member(folder: Path, relative: str, what: str) -> Path:
    """``folder/relative`` if it stays inside ``folder`` (no absolute paths, ``..`` or links out)."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        raise CheckpointError(f"{what}: path {relative!r} must be relative to the model folder")
    if ".." in Path(relative).parts:
        raise CheckpointError(f"{what}: path {relative!r} escapes the model folder")
    path = folder / relative
    try:
        root = folder.resolve()
        real = path.resolve()
    # ValueError: an embedded NUL; RuntimeError: a symlink loop (Python < 3.13).
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{what}: path {relative!r} cannot be used ({exc})") from None
    if real != root and root not in real.parents:
        # Hub cache snapshots link into the repo's own blobs/ folder: allow that, nothing else.
        blobs = root.parent.parent / "blobs"
        if not (root.parent.name == "snapshots" and blobs in real.parents):
            raise CheckpointError(f"{what}: {relative!r} points outside the model folder")
    return path


def read_local_model(folder: Path, label: str) -> ModelInventory:
    """Inventory a local model folder (index + shards, or a single model.safetensors)."""
    if not folder.is_dir():
        raise CheckpointError(f"{label}: {folder} is not a folder")
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_index(index_path, label)
        files = tuple(dict.fromkeys(weight_map.values()))
    elif (folder / SINGLE_NAME).is_file():
        weight_map = None
        files = (SINGLE_NAME,)
    else:
        pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
        if pickles:
            raise CheckpointError(
                f"{label}: {folder} holds only pickle weights ({pickles[0]}); pickle files can "
                "run code when loaded, so shardmerge reads safetensors by default. Convert them "
                "(load with transformers and save_pretrained(safe_serialization=True)), or pass "
                "--allow-pickle to convert them on the fly with torch.load(weights_only=True)"
            )
        raise CheckpointError(
            f"{label}: {folder} has no {SINGLE_NAME} or {INDEX_NAME} (empty or not a model folder)"
        )
    headers: dict[str, dict[str, TensorInfo]] = {}
    for file in files:
        path = safe_member(folder, file, f"{label}: {INDEX_NAME}")
        if not _is_file(path):
            raise CheckpointError(f"{label}: shard {file} named in {INDEX_NAME} is missing")
        _, headers[file] = read_header(path, file, f"{label}: {file}")
    config = _read_json_file(folder / "config.json", label)
    inventory = assemble_inventory(label, headers, weight_map, config)
    if not inventory.tensors:
        raise CheckpointError(f"{label}: {folder} holds no tensors")
    return inventory


def _is_file(path: Path) -> bool:
    # Path.is_file raises for some errors (a name too long); to us they all mean "not there".
    try:
        return path.is_file()
    except OSError:
        return False


def assemble_inventory(
    label: str,
    headers: Mapping[str, Mapping[str, TensorInfo]],
    weight_map: Mapping[str, str] | None,
    config: Mapping[str, Any] | None,
) -> ModelInventory:
    """Join per-shard headers through the index's weight_map into one inventory."""
    tensors: dict[str, TensorInfo] = {}
    if weight_map is None:
        for shard in headers.values():
            tensors.update(shard)
    else:
        problems = []
        for name, file in weight_map.items():
            info = headers.get(file, {}).get(name)
            if info is None:
                problems.append(f"{label}: {INDEX_NAME} puts {name!r} in {file}, which lacks it")
            else:
                tensors[name] = info
        if len(problems) > _MAX_LISTED:
            more = len(problems) - _MAX_LISTED
            problems = problems[:_MAX_LISTED] + [f"... and {more} more tensors missing"]
        if problems:
            raise CheckpointError(problems)
    ordered = sorted(tensors.values(), key=lambda t: (t.file, t.begin))
    return ModelInventory(
        label=label,
        tensors={t.name: t for t in ordered},
        files=tuple(headers),
        config=config,
    )


def _read_index(path: Path, label: str) -> dict[str, str]:
    data = _read_json_file(path, label)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    what = f"{label}: {path.name}"
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{what}: 'weight_map' must map tensor names to shard file names")
    if not weight_map:
        raise CheckpointError(f"{what}: 'weight_map' lists no tensors")
    return weight_map


def _read_json_file(path: Path, what: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_HEADER_BYTES:
            raise CheckpointError(f"{what}: {path.name} is implausibly large")
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{what}: cannot read {path.name} ({exc.strerror or exc})") from None
    data = _decode_json(raw, f"{what}: {path.name}")
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path.name} is not a JSON object")
    return data
