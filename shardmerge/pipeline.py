"""recipe -> plan -> read/merge/write -> card -> publish, as two library calls.

``prepare`` reads headers only (used by ``validate``, ``plan`` and as the first step of ``run``);
``run_merge`` executes, writes the folder atomically, and pushes if asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardmerge import __version__, faults, import_torch
from shardmerge.errors import InputError, OutputError, ShardmergeError
from shardmerge.inventory import TORCH_NAMES
from shardmerge.methods import get_method
from shardmerge.output import (
    INDEX_NAME,
    check_output_location,
    copy_files,
    finalize,
    is_tokenizer_file,
    partial_dir,
    prepare_partial,
    write_config,
    write_json,
)
from shardmerge.plan import MergePlan, chunk_buffers, estimate_peak_bytes, plan_merge
from shardmerge.recipe import Recipe
from shardmerge.resolve import ResolvedModel, open_source, resolve_model, small_files_folder

if TYPE_CHECKING:
    from shardmerge.hub import PushResult

PROGRESS_NAME = ".shardmerge-progress.json"


@dataclass(frozen=True)
class PreparedMerge:
    recipe: Recipe
    models: tuple[ResolvedModel, ...]  # in the recipe's order (recipe.models)
    plan: MergePlan

    @property
    def model_a(self) -> ResolvedModel:
        return self.models[0]

    @property
    def model_b(self) -> ResolvedModel:
        return self.models[1]

    @property
    def fingerprint(self) -> str:
        """Identity of what the run will produce: recipe, seed, pinned inputs, output layout."""
        digest = hashlib.sha256()
        digest.update(self.recipe.text.encode())
        digest.update(b"\0".join(m.pin.encode() for m in self.models))
        if self.plan.method != "slerp":
            digest.update(f"\0{self.plan.method}\0seed={self.plan.random_seed}".encode())
        for shard in self.plan.shards:
            digest.update(shard.filename.encode() + shard.header)
        return digest.hexdigest()


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    plan: MergePlan
    skipped_shards: int
    bytes_read: int
    peak_input_bytes_on_disk: int | None = None


def prepare(
    recipe: Recipe, *, shard_size_bytes: int | None = None, allow_pickle: bool = False
) -> PreparedMerge:
    """Resolve every model and plan the merge from headers alone (no tensor bytes read)."""
    models = tuple(
        resolve_model(ref, key, allow_pickle=allow_pickle)
        for ref, key in zip(recipe.models, _resolve_keys(recipe), strict=True)
    )
    plan = plan_merge(recipe, *(m.inventory for m in models), shard_size_bytes=shard_size_bytes)
    return PreparedMerge(recipe, models, plan)


def _resolve_keys(recipe: Recipe) -> tuple[str, ...]:
    """Short names of the models for labels and records: a, b (SLERP); base, 1, 2, ..."""
    if recipe.method == "slerp":
        return ("a", "b")
    first = recipe.first_merged
    return ("base",) * first + tuple(str(i + 1) for i in range(len(recipe.models) - first))


def describe_plan(prepared: PreparedMerge, num_processes: int = 1) -> str:
    """Human-readable plan: models, t table, shard layout, totals, memory estimate."""
    plan = prepared.plan
    if plan.method == "slerp":
        lines = [
            f"model A (t=0): {prepared.model_a.label}  [{prepared.model_a.pin}]",
            f"model B (t=1): {prepared.model_b.label}  [{prepared.model_b.pin}]",
        ]
    else:
        lines = [f"method: {plan.method}  (random seed {plan.random_seed})"]
        lines += [f"{m.label}  [{m.pin}]" for m in prepared.models]
    lines += [
        "",
        plan.t_table.rstrip(),
        "",
        f"output: {len(plan.shards)} shard(s), {plan.total_size:,} bytes of tensors, "
        f"{len(plan.tasks)} tensors",
    ]
    for shard in plan.shards:
        lines.append(f"  {shard.filename}  {shard.file_bytes:,} bytes  {len(shard.tasks)} tensors")
    lines.append(f"input bytes read: {plan.input_bytes:,}")
    lines.append(
        f"estimated peak memory: {estimate_peak_bytes(plan) / 1e6:,.0f} MB (any model size)"
    )
    if num_processes > 1:
        from shardmerge.distributed import split_shards

        lines.append(f"split across {num_processes} processes (balanced by bytes):")
        for rank, shard_ids in enumerate(split_shards(plan, num_processes)):
            size = sum(plan.shards[i].file_bytes for i in shard_ids)
            names = ", ".join(plan.shards[i].filename for i in shard_ids) or "(none)"
            lines.append(f"  rank {rank}: {size:,} bytes: {names}")
    for warning in plan.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def resolve_device(requested: str) -> str:
    torch = import_torch()

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {requested!r} was asked for but CUDA is not available")
    return requested


def run_merge(
    prepared: PreparedMerge,
    *,
    out: Path,
    overwrite: bool = False,
    device: str = "auto",
    quiet: bool = False,
    resume: bool = False,
    stream: bool = False,
) -> RunResult:
    """Execute a prepared merge into ``out``, atomically: the folder appears only when complete."""
    out = out.expanduser().absolute()
    work = prepare_output(prepared, out, overwrite=overwrite, resume=resume)
    # Config, tokenizer files and card need no tensor: they are written while the shards merge.
    merged = merge_shards(
        prepared,
        out,
        device=device,
        quiet=quiet,
        resume=resume,
        stream=stream,
        alongside=lambda: write_side_files(prepared, work),
    )
    finish_output(prepared, out, side_files_written=True)
    return RunResult(
        out,
        prepared.plan,
        merged.skipped_shards,
        merged.bytes_read,
        merged.peak_input_bytes_on_disk,
    )


def prepare_output(prepared: PreparedMerge, out: Path, *, overwrite: bool, resume: bool) -> Path:
    """Check the output location and create (or, to resume, keep) the hidden working folder."""
    inputs = [d for m in prepared.models for d in m.input_dirs]
    needed = sum(s.file_bytes for s in prepared.plan.shards)
    check_output_location(out, inputs, overwrite=overwrite, needed_bytes=needed)
    return prepare_partial(out, keep=resume)


@dataclass(frozen=True)
class MergedShards:
    skipped_shards: int
    bytes_read: int
    peak_input_bytes_on_disk: int | None  # streaming from the Hub: both models' peak


def merge_shards(
    prepared: PreparedMerge,
    out: Path,
    *,
    device: str,
    quiet: bool,
    resume: bool,
    stream: bool,
    only_shards: frozenset[int] | None = None,
    rank: int = 0,
    alongside: Callable[[], None] | None = None,
) -> MergedShards:
    """Write the plan's shards (or ``only_shards``) into the working folder, recording each
    finished shard with its digest so ``--resume`` can skip it. ``alongside`` runs on a thread
    meanwhile; it is waited for, also when the merge fails, and what it raises is raised."""
    plan = prepared.plan
    # The chunk slots' memory is faulted in by the kernel while torch imports (a CPU merge's
    # slots are plain memory; CUDA ones are pinned by torch instead).
    slots_bytes = chunk_buffers(plan).total_bytes
    # Small merges never touch most of the slots: leave their pages to be faulted in on use.
    wanted_early = not device.startswith("cuda") and plan.input_bytes >= slots_bytes
    slots_memory = _fault_in(slots_bytes) if wanted_early else None
    torch = import_torch()
    from shardmerge.passes import execute

    # Started now rather than before: it and torch's import are both Python code (they would
    # share the GIL), and torch's import waited for modules they both import (filelock).
    with _in_background(alongside, "shardmerge-meta"):
        work = partial_dir(out)
        dev = resolve_device(device)
        host_memory = slots_memory() if slots_memory is not None else None
        if host_memory is not None and dev != "cpu":  # "auto" found a GPU: pinned slots instead
            host_memory.close()
            host_memory = None
        if dev == "cpu" and only_shards is None:
            torch.set_num_threads(os.cpu_count() or 1)
        wanted = set(range(len(plan.shards))) if only_shards is None else set(only_shards)
        done = _resumable_shards(work, prepared, wanted) if resume else {}
        skip = frozenset(
            i for i, s in enumerate(plan.shards) if i not in wanted or s.filename in done
        )
        record_path = work / (PROGRESS_NAME if rank == 0 else f"{PROGRESS_NAME}.rank{rank}")
        record: dict[str, Any] = {
            "fingerprint": prepared.fingerprint,
            "inputs": {m.key: m.pin for m in prepared.models},
            "shards": {},
        }
        record["shards"].update({k: v for k, v in done.items()})
        write_json(record_path, record)

        def shard_done(_: int, result: Any) -> None:
            record["shards"][result.filename] = {"digest": result.digest, "size": result.size}
            write_json(record_path, record)

        needed = _input_files(plan, skip)
        with tempfile.TemporaryDirectory(prefix=".shardmerge-", dir=out.parent) as scratch:
            sources = [
                open_source(m, stream=stream, workdir=Path(scratch), files=files)
                for m, files in zip(prepared.models, needed, strict=True)
            ]
            todo = sum(s.data_bytes for i, s in enumerate(plan.shards) if i not in skip)
            bar = _progress_bar(todo, quiet)
            try:
                result = execute(
                    plan,
                    sources,
                    work,
                    labels=[m.label for m in prepared.models],
                    device=dev,
                    skip_shards=skip,
                    on_progress=bar.update if bar else None,
                    on_shard_done=shard_done,
                    host_memory=host_memory,
                )
            except OSError as exc:
                raise ShardmergeError(
                    f"writing {out} failed ({exc.strerror or exc}); the finished shards are kept: "
                    "rerun the same command with --resume"
                ) from None
            finally:
                if bar:
                    bar.close()
            peaks = [getattr(src, "peak_bytes_on_disk", None) for src in sources]
    skipped = sum(1 for i in range(len(plan.shards)) if i in wanted and i in skip)
    streamed = [p for p in peaks if p is not None]
    return MergedShards(skipped, result.bytes_read, sum(streamed) if streamed else None)


def finish_output(
    prepared: PreparedMerge, out: Path, *, side_files_written: bool = False
) -> RunResult:
    """Metadata files (unless already written) and the index last, then move into place."""
    work = partial_dir(out)
    if not side_files_written:
        write_side_files(prepared, work)
    faults.reached("before-index")
    # The run's record: which exact inputs (Hub commit or local fingerprint) made this output.
    inputs = {m.key: f"{m.hub_id or m.ref.ref}@{m.pin}" for m in prepared.models}
    (work / INDEX_NAME).write_text(
        prepared.plan.index_json({"shardmerge": {"version": __version__, "inputs": inputs}})
    )
    for record in work.glob(PROGRESS_NAME + "*"):
        record.unlink()
    finalize(work, out)
    return RunResult(out, prepared.plan, 0, 0, None)


@contextlib.contextmanager
def _in_background(task: Callable[[], None] | None, name: str) -> Iterator[None]:
    """Run ``task`` on a thread while the block runs; leaving the block waits for it (it may
    write where the block does), then raises its error, unless the block raised its own."""
    if task is None:
        yield
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix=name)
    future = pool.submit(task)
    pool.shutdown(wait=False)  # its thread ends with the task
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            future.result()
        raise
    future.result()


# Linux >= 5.14: fault a range of pages in now, as writes would (older kernels: EINVAL, no harm).
_MADV_POPULATE_WRITE = 23


def _fault_in(nbytes: int) -> Callable[[], mmap.mmap | None]:
    """Map ``nbytes`` of memory and fault its pages in on a thread; the returned call waits.

    First-touch faults on the 192 MB of chunk slots cost ~0.05-0.1 s, otherwise paid as the
    merge starts. The faulting is ``madvise(MADV_POPULATE_WRITE)`` called through ctypes, which
    releases the GIL (Python's mmap with MAP_POPULATE holds it throughout: that stalled torch's
    import by 0.07 s).
    """
    try:
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # nothing touched yet
    except OSError:  # no memory now: the engine allocates later
        return lambda: None
    if sys.platform != "linux":
        return lambda: memory  # faulted in on first use
    import ctypes

    anchor = ctypes.c_char.from_buffer(memory)
    address = ctypes.addressof(anchor)
    del anchor  # holds an export of the mmap, which would keep it from closing
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (AttributeError, OSError):  # an unusual libc: faulted in on first use
        return lambda: memory
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    args = (address, nbytes, _MADV_POPULATE_WRITE)
    thread = threading.Thread(target=madvise, args=args, name="shardmerge-prefault", daemon=True)
    thread.start()

    def result() -> mmap.mmap:
        thread.join()
        return memory

    return result


def _input_files(plan: MergePlan, skip: frozenset[int]) -> list[list[str]]:
    """Each task's input file per model, in the engine's reading order (streaming frees by it)."""
    tasks = [t for i, s in enumerate(plan.shards) if i not in skip for t in s.tasks]
    count = len(tasks[0].inputs) if tasks else len(plan.tasks[0].inputs) if plan.tasks else 2
    return [[t.inputs[i].file for t in tasks] for i in range(count)]


def push_output(
    out: Path, repo_id: str, *, private: bool, prepared: PreparedMerge, dry_run: bool = False
) -> PushResult:
    """Verify the finished folder, then upload it in one commit (or, dry run, list it)."""
    from shardmerge import hub
    from shardmerge.verify import verify_output

    report = verify_output(out)
    if not report.ok:
        raise ShardmergeError(f"not pushing {out}: verification failed: {report.problems[0]}")
    names = " and ".join(m.hub_id or m.ref.ref for m in prepared.models)
    method = "SLERP" if prepared.plan.method == "slerp" else prepared.plan.method
    message = f"{method} merge of {names} (shardmerge)"
    return hub.push_folder(out, repo_id, private=private, commit_message=message, dry_run=dry_run)


def write_side_files(prepared: PreparedMerge, work: Path) -> None:
    """config, tokenizer and other small files, and the card (everything but shards and index)."""
    from shardmerge.card import CardModel, render_card

    plan = prepared.plan
    a, b = prepared.model_a, prepared.model_b
    folder_a, folder_b = small_files_folder(a), small_files_folder(b)
    tok_from_b = prepared.recipe.tokenizer_source == "b"
    copy_files(
        folder_a,
        [
            f
            for f in a.small_files
            if f != "config.json" and not (tok_from_b and is_tokenizer_file(f))
        ],
        work,
    )
    if tok_from_b:
        copy_files(folder_b, [f for f in b.small_files if is_tokenizer_file(f)], work)
    out_dtype = _dominant_out_dtype(plan)
    config = dict(a.inventory.config) if a.inventory.config is not None else None
    write_config(work, config, out_dtype)
    if plan.method == "slerp":
        roles = ["t = 0 end", "t = 1 end"]
    else:
        first = prepared.recipe.first_merged
        roles = ["base"] * first + [f"model {i + 1}" for i in range(len(prepared.models) - first)]
    uses_seed = plan.method != "slerp" and get_method(plan.method).uses_seed
    card = render_card(
        [
            CardModel(m.ref.ref, m.hub_id, m.pin, role)
            for m, role in zip(prepared.models, roles, strict=True)
        ],
        prepared.recipe.text,
        plan.t_table,
        out_dtype=out_dtype or "as stored",
        total_bytes=plan.total_size,
        num_shards=len(plan.shards),
        method=plan.method,
        random_seed=plan.random_seed if uses_seed else None,
    )
    (work / "README.md").write_text(card)


def _dominant_out_dtype(plan: MergePlan) -> str | None:
    sizes: dict[str, int] = {}
    for task in plan.tasks:
        if task.is_float:
            sizes[task.out_dtype] = sizes.get(task.out_dtype, 0) + task.out_nbytes
    if not sizes:
        return None
    return TORCH_NAMES[max(sizes, key=lambda k: sizes[k])]


def _disk_needed(plan: MergePlan) -> int:
    return sum(s.file_bytes for s in plan.shards)


def _resumable_shards(
    work: Path, prepared: PreparedMerge, wanted: set[int]
) -> dict[str, dict[str, Any]]:
    """Shards (of ``wanted``) an interrupted run completed, still unchanged (by digest)."""
    from shardmerge.engine import file_digest

    recorded: dict[str, Any] = {}
    for path in sorted(work.glob(PROGRESS_NAME + "*")):
        try:
            record = json.loads(path.read_text())
            shards, fingerprint = record["shards"], record["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record cut short by the crash: its shards are redone
        if fingerprint != prepared.fingerprint:
            raise OutputError(
                f"cannot resume into {work}: the recipe or the inputs changed since the "
                "interrupted run; run again without --resume to start over"
            )
        if isinstance(shards, dict):
            recorded.update(shards)
    valid = {}
    for index, shard in enumerate(prepared.plan.shards):
        if index not in wanted:
            continue  # another rank's shard: that rank checks it
        entry = recorded.get(shard.filename)
        file = work / shard.filename
        if (
            isinstance(entry, dict)
            and file.is_file()
            and file.stat().st_size == entry.get("size")
            and file_digest(file) == entry.get("digest")
        ):
            valid[shard.filename] = entry
    return valid


class _Bar:
    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total, unit="B", unit_scale=True, desc="merging", file=sys.stderr, leave=True
        )

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _progress_bar(total: int, quiet: bool) -> _Bar | None:
    return None if quiet else _Bar(total)
