"""``shardmerge verify``: is an output folder whole, finite and (optionally) what the recipe makes?

A folder shardmerge wrote records each shard's digest in its index (``metadata.shardmerge.
shard_digests``); verify checks them unless ``fast``, so flipped bytes anywhere are found without
the inputs. A single-file ``model.safetensors`` folder (no index) is checked from its header.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shardmerge.errors import CheckpointError, InputError
from shardmerge.inventory import (
    FLOAT_DTYPES,
    INDEX_NAME,
    SINGLE_NAME,
    TensorInfo,
    read_header,
    safe_member,
)

if TYPE_CHECKING:
    from shardmerge.pipeline import PreparedMerge

_CHUNK_BYTES = 1 << 24
_SAMPLE = 8  # tensors recomputed without --full
_NO_INDEX = object()  # a single-file folder's total_size: nothing to compare


@dataclass
class VerifyReport:
    output: Path
    problems: list[str] = field(default_factory=list)
    tensors: int = 0
    total_size: int = 0
    recomputed: int = 0
    digests_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (
            f"{'ok' if self.ok else 'FAILED'}: {self.output}: {self.tensors} tensors, "
            f"{self.total_size:,} bytes"
        )
        if self.digests_checked:
            head += f", {self.digests_checked} shard digest(s) checked"
        if self.recomputed:
            head += f", {self.recomputed} recomputed from the inputs"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


def verify_output(
    output: Path,
    *,
    prepared: PreparedMerge | None = None,
    full: bool = False,
    fast: bool = False,
) -> VerifyReport:
    """Index vs shards, recorded shard digests (unless ``fast``), header bounds, NaN/Inf, total
    size; with a plan, recompute tensors.

    Raises:
        InputError: ``full`` without ``prepared`` (nothing to recompute from), or ``output`` is
            not a folder.
    """
    if full and prepared is None:
        raise InputError("--full recomputes tensors from the inputs: it needs --recipe")
    if not output.is_dir():
        raise InputError(f"{output}: {'is not a folder' if output.exists() else 'no such folder'}")
    report = VerifyReport(output)
    tensors = _check_structure(output, report)
    if tensors is None:
        return report
    for info, data_start in tensors.values():
        if info.dtype in FLOAT_DTYPES and not _all_finite(output / info.file, data_start, info):
            report.problems.append(f"{info.file}: tensor {info.name!r} contains NaN or Inf")
    readable = not report.problems
    if not fast:
        _check_digests(output, report)
    # A digest names only the shard; recomputation can still name the tensor that changed.
    if prepared is not None and readable:
        _recompute(output, prepared, tensors, full, report)
    return report


def _check_structure(
    output: Path, report: VerifyReport
) -> dict[str, tuple[TensorInfo, int]] | None:
    index_path = output / INDEX_NAME
    total_size: object = _NO_INDEX
    if not index_path.exists() and (output / SINGLE_NAME).is_file():
        # One file, no index: the header alone says what the folder holds.
        try:
            weight_map = dict.fromkeys(
                read_header(output / SINGLE_NAME, SINGLE_NAME)[1], SINGLE_NAME
            )
        except CheckpointError as exc:
            report.problems.append(str(exc))
            return None
    else:
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            total_size = index["metadata"]["total_size"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            report.problems.append(f"{INDEX_NAME}: missing or invalid ({exc})")
            return None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        report.problems.append(f"{INDEX_NAME}: weight_map must map tensor names to shard files")
        return None
    if total_size is not _NO_INDEX and not isinstance(total_size, int):
        report.problems.append(f"{INDEX_NAME}: total_size {total_size!r} is not an integer")
    found: dict[str, tuple[TensorInfo, int]] = {}
    unreadable: set[str] = set()
    for file in sorted(set(weight_map.values())):
        try:
            path = safe_member(output, file, INDEX_NAME)
            if not path.is_file():
                raise CheckpointError(f"{file}: missing (the index names it)")
            start, header = read_header(path, file)
        except CheckpointError as exc:
            report.problems.append(str(exc))
            unreadable.add(file)
            continue
        for name, info in header.items():
            if weight_map.get(name) != file:
                report.problems.append(f"{file}: tensor {name!r} is not in the index")
            found[name] = (info, start)
    for name, file in weight_map.items():
        if name not in found and file not in unreadable:
            report.problems.append(f"{INDEX_NAME}: {name!r} is not in {file}")
    actual = sum(info.nbytes for info, _ in found.values())
    # With a shard unreadable the sum is unknown: its problem is already reported.
    if isinstance(total_size, int) and actual != total_size and not unreadable:
        report.problems.append(f"{INDEX_NAME}: total_size {total_size} but tensors hold {actual}")
    report.tensors = len(found)
    report.total_size = actual
    return found


def _check_digests(output: Path, report: VerifyReport) -> None:
    """Each shard against the digest its index records (folders shardmerge wrote)."""
    from shardmerge.shardio import file_digest

    try:
        recorded = json.loads((output / INDEX_NAME).read_text())["metadata"]["shardmerge"]
        digests = recorded["shard_digests"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not written by shardmerge (or by an older version): nothing recorded
    if not isinstance(digests, dict):
        report.problems.append(f"{INDEX_NAME}: shard_digests must map shard files to digests")
        return
    for file, digest in sorted(digests.items()):
        try:
            path = safe_member(output, file, f"{INDEX_NAME}: shard_digests")
        except CheckpointError as exc:
            report.problems.append(str(exc))
            continue
        if not path.is_file():
            continue  # reported by the structure check when the index names it
        report.digests_checked += 1
        if file_digest(path) != digest:
            report.problems.append(
                f"{file}: its bytes differ from the digest recorded in {INDEX_NAME} "
                "(damaged or changed since the merge)"
            )


def _read(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _all_finite(path: Path, data_start: int, info: TensorInfo) -> bool:
    import torch

    from shardmerge.engine import TORCH_DTYPES

    dtype = TORCH_DTYPES[info.dtype]
    step = _CHUNK_BYTES - _CHUNK_BYTES % 8
    for pos in range(0, info.nbytes, step):
        raw = bytearray(_read(path, data_start + info.begin + pos, min(step, info.nbytes - pos)))
        if raw and not bool(torch.isfinite(torch.frombuffer(raw, dtype=dtype)).all()):
            return False
    return True


def _recompute(
    output: Path,
    prepared: PreparedMerge,
    tensors: dict[str, tuple[TensorInfo, int]],
    full: bool,
    report: VerifyReport,
) -> None:
    from dataclasses import replace

    from shardmerge.passes import execute
    from shardmerge.plan import layout_shards
    from shardmerge.resolve import open_source

    tasks = list(prepared.plan.tasks)
    missing = [t.name for t in tasks if t.name not in tensors]
    if missing:
        report.problems.append(
            f"the recipe makes {len(missing)} tensors the output lacks: {missing[0]!r}"
        )
        return
    chosen = tasks if full else random.Random(0).sample(tasks, min(_SAMPLE, len(tasks)))
    models = prepared.models
    with tempfile.TemporaryDirectory(prefix="shardmerge-verify-") as scratch:
        # Hub inputs: only the shards the chosen tensors live in are downloaded (HF cache).
        sources = [
            open_source(m, stream=False, workdir=Path(scratch), files=files)
            for m, files in zip(
                models,
                (
                    [
                        info.file
                        for t in chosen
                        for i, info in enumerate(t.inputs)
                        if t.model_of(i) == k
                    ]
                    for k in range(len(models))
                ),
                strict=True,
            )
        ]
        for task in chosen:
            sub = replace(prepared.plan, shards=layout_shards([task], 1 << 62), warnings=())
            execute(sub, sources, Path(scratch))
            shard = sub.shards[0]
            expected_path = Path(scratch) / shard.filename
            info, start = tensors[task.name]
            if (info.dtype, info.shape) != (task.out_dtype, task.shape) or not _same_bytes(
                expected_path,
                len(shard.header),
                output / info.file,
                start + info.begin,
                info.nbytes,
            ):
                report.problems.append(f"tensor {task.name!r} differs from what the recipe makes")
            expected_path.unlink()
            report.recomputed += 1


def _same_bytes(a: Path, a_off: int, b: Path, b_off: int, size: int) -> bool:
    for pos in range(0, size, _CHUNK_BYTES):
        n = min(_CHUNK_BYTES, size - pos)
        if _read(a, a_off + pos, n) != _read(b, b_off + pos, n):
            return False
    return True
