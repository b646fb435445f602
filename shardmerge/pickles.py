"""Pickle checkpoints (``pytorch_model*.bin``) -> safetensors shards in a scratch folder.

Used only with ``--allow-pickle``. ``torch.load(weights_only=True)`` unpickles tensors and plain
containers only, so a hostile file cannot run code; ``mmap=True`` leaves tensor bytes in the file,
and each tensor is written out before the next is touched, so a shard is never held in memory
beyond the pages the kernel maps in.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch

from shardmerge.engine import TORCH_DTYPES, bytes_view
from shardmerge.errors import CheckpointError
from shardmerge.inventory import INDEX_NAME, SINGLE_NAME, safe_member
from shardmerge.output import copy_files, local_small_files, write_json

__all__ = ["PICKLE_INDEX_NAME", "PICKLE_SINGLE_NAME", "convert_pickle_model", "pickle_files"]

PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"
_CODES = {dtype: code for code, dtype in TORCH_DTYPES.items()}


def pickle_files(folder: Path, label: str) -> tuple[list[str], dict[str, str] | None]:
    """The pickle weight files of ``folder`` and, when sharded, the index's weight_map.

    Raises:
        CheckpointError: no pickle weights, or an index that is invalid or points outside.
    """
    index_path = folder / PICKLE_INDEX_NAME
    if index_path.is_file():
        try:
            data = json.loads(index_path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            raise CheckpointError(
                f"{label}: {PICKLE_INDEX_NAME} is not valid JSON ({exc})"
            ) from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
        ):
            raise CheckpointError(
                f"{label}: {PICKLE_INDEX_NAME}: 'weight_map' must map tensor names to file names"
            )
        files = list(dict.fromkeys(weight_map.values()))
        for file in files:
            if not safe_member(folder, file, f"{label}: {PICKLE_INDEX_NAME}").is_file():
                raise CheckpointError(f"{label}: {file} named in {PICKLE_INDEX_NAME} is missing")
        return files, weight_map
    if (folder / PICKLE_SINGLE_NAME).is_file():
        return [PICKLE_SINGLE_NAME], None
    found = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if found:
        raise CheckpointError(
            f"{label}: {folder} has {found[0]} but no {PICKLE_INDEX_NAME} saying which tensors "
            "each file holds"
        )
    raise CheckpointError(f"{label}: {folder} has no safetensors and no pickle weights")


def convert_pickle_model(folder: Path, dest: Path, label: str) -> list[str]:
    """Write ``folder``'s pickle weights into ``dest`` as safetensors, plus its small files.

    One ``.bin`` becomes one ``.safetensors`` (``pytorch_model-00001-of-00002.bin`` ->
    ``model-00001-of-00002.safetensors``); a sharded model also gets a
    ``model.safetensors.index.json``. Config, tokenizer and other small files are copied.

    Returns:
        The pickle files read (relative to ``folder``), to fingerprint the original.

    Raises:
        CheckpointError: a file torch refuses to load safely, or holding something other than a
            flat mapping of tensors of a supported dtype.
    """
    files, weight_map = pickle_files(folder, label)
    dest.mkdir(parents=True, exist_ok=True)
    renamed = {}
    for file in files:
        target = _safetensors_name(file) if weight_map is not None else SINGLE_NAME
        _convert_file(folder / file, dest / target, f"{label}: {file}")
        renamed[file] = target
    if weight_map is not None:
        new_map = {name: renamed[file] for name, file in weight_map.items()}
        write_json(dest / INDEX_NAME, {"metadata": {}, "weight_map": new_map})
    copy_files(folder, local_small_files(folder), dest)
    return files


def _safetensors_name(file: str) -> str:
    name = Path(file).name.removesuffix(".bin")
    if name.startswith("pytorch_model"):
        name = "model" + name.removeprefix("pytorch_model")
    return name + ".safetensors"


def _convert_file(src: Path, dst: Path, where: str) -> None:
    try:
        state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a page of advice; keep the line saying what was refused.
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. |\n|$)", str(exc))
        detail = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{where}: torch.load(weights_only=True) refused it{detail}: it holds more than "
            "plain tensors, and loading it fully could run code; convert it with transformers "
            "only if you trust its source"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        lines = str(exc).strip().splitlines()
        reason = re.sub(r"\x1b\[[0-9;]*m", "", lines[0] if lines else type(exc).__name__)
        raise CheckpointError(
            f"{where}: cannot be loaded with torch.load(weights_only=True, mmap=True) "
            f"({reason[:300]})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{where}: expected a flat state dict of named tensors")
    header, entries = _header(state, where)
    with dst.open("wb") as fh:
        fh.write(header)
        for name, _ in entries:
            _write_tensor(fh, state[name])
    del state  # unmaps the file


def _header(state: dict[str, torch.Tensor], where: str) -> tuple[bytes, list[tuple[str, int]]]:
    """The safetensors prefix (length + JSON, 8-byte aligned) and (name, nbytes) in file order."""
    body: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    entries = []
    offset = 0
    for name, tensor in state.items():
        code = _CODES.get(tensor.dtype)
        if code is None:
            raise CheckpointError(
                f"{where}: tensor {name!r} has dtype {tensor.dtype}, which shardmerge cannot merge"
            )
        nbytes = tensor.numel() * tensor.element_size()
        body[name] = {
            "dtype": code,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        entries.append((name, nbytes))
        offset += nbytes
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, entries


def _write_tensor(fh: Any, tensor: torch.Tensor) -> None:
    # reshape(-1) first: a 0-dim tensor cannot be viewed as bytes. A contiguous tensor is not
    # copied, so its bytes go straight from the mapped file to the output.
    flat = tensor.contiguous().reshape(-1).view(torch.uint8)  # kept alive while it is written
    fh.write(bytes_view(flat))
