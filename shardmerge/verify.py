"""``shardmerge verify``: is an output folder whole, finite and (optionally) what the recipe makes?"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shardmerge.errors import CheckpointError, InputError
from shardmerge.inventory import FLOAT_DTYPES, INDEX_NAME, TensorInfo, read_header, safe_member

if TYPE_CHECKING:
    from shardmerge.pipeline import PreparedMerge

_CHUNK_BYTES = 1 << 24
_SAMPLE = 8  # tensors recomputed without --full


@dataclass
class VerifyReport:
    output: Path
    problems: list[str] = field(default_factory=list)
    tensors: int = 0
    total_size: int = 0
    recomputed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (
            f"{'ok' if self.ok else 'FAILED'}: {self.output}: {self.tensors} tensors, "
            f"{self.total_size:,} bytes"
        )
        if self.recomputed:
            head += f", {self.recomputed} recomputed from the inputs"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


def verify_output(
    output: Path, *, prepared: PreparedMerge | None = None, full: bool = False
) -> VerifyReport:
    """Index vs shards, header bounds, NaN/Inf, total size; with a plan, recompute tensors.

    Raises:
        InputError: ``full`` without ``prepared`` (nothing to recompute from).
    """
    if full and prepared is None:
        raise InputError("--full recomputes tensors from the inputs: it needs --recipe")
    report = VerifyReport(output)
    if not output.is_dir():
        report.problems.append(f"{output} is not a folder")
        return report
    tensors = _check_structure(output, report)
    if tensors is None:
        return report
    for info, data_start in tensors.values():
        if info.dtype in FLOAT_DTYPES and not _all_finite(output / info.file, data_start, info):
            report.problems.append(f"{info.file}: tensor {info.name!r} contains NaN or Inf")
    if prepared is not None and not report.problems:
        _recompute(output, prepared, tensors, full, report)
    return report


def _check_structure(
    output: Path, report: VerifyReport
) -> dict[str, tuple[TensorInfo, int]] | None:
    index_path = output / INDEX_NAME
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
    if not isinstance(total_size, int):
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

    from shardmerge.engine import LocalSource
    from shardmerge.passes import execute
    from shardmerge.plan import layout_shards

    tasks = list(prepared.plan.tasks)
    missing = [t.name for t in tasks if t.name not in tensors]
    if missing:
        report.problems.append(
            f"the recipe makes {len(missing)} tensors the output lacks: {missing[0]!r}"
        )
        return
    chosen = tasks if full else random.Random(0).sample(tasks, min(_SAMPLE, len(tasks)))
    models = prepared.models
    if any(m.local_dir is None for m in models):
        report.problems.append("--recipe recomputation needs local input folders")
        return
    with tempfile.TemporaryDirectory(prefix="shardmerge-verify-") as scratch:
        for task in chosen:
            sub = replace(prepared.plan, shards=layout_shards([task], 1 << 62), warnings=())
            sources = [LocalSource(m.local_dir, m.label) for m in models]  # type: ignore[arg-type]
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
