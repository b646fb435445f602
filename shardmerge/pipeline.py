"""recipe -> plan -> read/merge/write -> card -> publish, as two library calls.

``prepare`` reads headers only (used by ``validate``, ``plan`` and as the first step of ``run``);
``run_merge`` executes, writes the folder atomically, and pushes if asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
import threading
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shardmerge import __version__, faults, import_torch, readahead
from shardmerge.bytecopy import execute_copies
from shardmerge.card import IMAGE_NAME
from shardmerge.errors import (
    CheckpointError,
    InputError,
    NonFiniteInputError,
    OutputError,
    ShardmergeError,
)
from shardmerge.inventory import TORCH_NAMES
from shardmerge.methods import get_method
from shardmerge.output import (
    INDEX_NAME,
    SCRATCH_PREFIX,
    busy_error,
    check_output_location,
    copy_files,
    finalize,
    is_tokenizer_file,
    lock_holder,
    output_lock,
    output_path,
    partial_dir,
    prepare_partial,
    sync_dir,
    sync_tree,
    write_config,
    write_json,
)
from shardmerge.plan import (
    MergePlan,
    chunk_buffers,
    copies_only,
    estimate_peak_bytes,
    split_shards,
)
from shardmerge.plan_stack import plan_recipe
from shardmerge.recipe import Recipe
from shardmerge.resolve import (
    ResolvedModel,
    open_sources,
    resolve_model,
    small_files_folder,
    stream_disk_needed,
)
from shardmerge.tokenizer_files import (
    VOCAB_FILES,
    prepare_vocab,
    resolve_chat_template,
    set_chat_template,
    vocab_config,
    write_tokenizer,
)
from shardmerge.vocab import VocabPlan

if TYPE_CHECKING:
    from shardmerge.hub import PushResult, PushTarget

PROGRESS_NAME = ".shardmerge-progress.json"


@dataclass(frozen=True)
class PreparedMerge:
    recipe: Recipe
    models: tuple[ResolvedModel, ...]  # in the recipe's order (recipe.models)
    plan: MergePlan
    vocab: VocabPlan | None = None  # the output vocabulary, when embeddings are re-indexed

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
        if self.vocab is not None:  # which rows go where, not only the shapes
            digest.update(repr(sorted(self.vocab.new_ids.items())).encode())
            digest.update(repr(sorted(self.vocab.fill.items())).encode())
            for table in self.vocab.own:
                digest.update(bytes(memoryview(table)) if isinstance(table, array) else b"")
        return digest.hexdigest()


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    plan: MergePlan
    skipped_shards: int
    bytes_read: int
    peak_input_bytes_on_disk: int | None = None
    already_complete: bool = False  # --resume found the finished output of the same merge


def prepare(
    recipe: Recipe, *, shard_size_bytes: int | None = None, allow_pickle: bool = False
) -> PreparedMerge:
    """Resolve every model and plan the merge from headers alone (no tensor bytes read)."""
    base, other = recipe.base_dir, _other_base(recipe)
    models = tuple(
        resolve_model(ref, key, allow_pickle=allow_pickle, base_dir=base, other_base=other)
        for ref, key in zip(recipe.models, _resolve_keys(recipe), strict=True)
    )
    # Tokenizer files first (for a Hub model, before any weights): a vocabulary problem is
    # found before anything big is read.
    vocab = prepare_vocab(recipe, models)
    plan = plan_recipe(
        recipe, *(m.inventory for m in models), shard_size_bytes=shard_size_bytes, vocab=vocab
    )
    return PreparedMerge(recipe, models, plan, vocab)


def _resolve_keys(recipe: Recipe) -> tuple[str, ...]:
    """Short names of the models for labels and records: a, b (SLERP); base, 1, 2, ..."""
    if recipe.method == "slerp":
        return ("a", "b")
    first = recipe.first_merged
    return ("base",) * first + tuple(str(i + 1) for i in range(len(recipe.models) - first))


def pin_recorded_revisions(recipe: Recipe, output: Path) -> Recipe:
    """The recipe with each Hub model pinned to the commit ``output``'s index records for it
    (what made the output, even if a branch has moved since); local models are unchanged.

    Raises:
        InputError: the output was made from another Hub repo than the recipe names.
    """
    try:
        index = json.loads((output / INDEX_NAME).read_text())
        recorded = index["metadata"]["shardmerge"]["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return recipe  # not our output, or no record: verify reports what it finds
    refs = list(recipe.models)
    for index, (key, ref) in enumerate(zip(_resolve_keys(recipe), recipe.models, strict=True)):
        entry = recorded.get(key) if isinstance(recorded, dict) else None
        if Path(ref.ref).is_dir() or not isinstance(entry, str) or "@" not in entry:
            continue
        repo, sha = entry.rsplit("@", 1)
        if repo.lower() != ref.ref.lower():
            raise InputError(
                f"models.{key}: the recipe names {ref.ref}, but {output} was made from {repo}"
            )
        refs[index] = replace(ref, revision=sha)
    return replace(recipe, models=tuple(refs))


def _other_base(recipe: Recipe) -> str | None:
    """Where the other convention would resolve relative paths (for a hint in errors)."""
    if recipe.base_dir:
        return ""  # ours: the current directory
    if recipe.format == "mergekit" and os.path.isfile(recipe.source):
        return os.path.dirname(os.path.abspath(recipe.source))
    return None


def describe_plan(
    prepared: PreparedMerge,
    num_processes: int = 1,
    *,
    out: Path | None = None,
    measure_disk: bool = False,
) -> str:
    """Human-readable plan: models, t table, shard layout, totals, memory and time estimates.

    The time estimate uses disk rates cached per device (``diskrate``); ``measure_disk``
    measures the devices of the inputs and of ``out`` first (a few seconds) and caches them.
    """
    plan = prepared.plan
    if plan.method == "slerp":
        lines = [
            f"model A (t=0): {prepared.model_a.label}  [{prepared.model_a.pin}]",
            f"model B (t=1): {prepared.model_b.label}  [{prepared.model_b.pin}]",
        ]
    else:
        seed = f"  (random seed {plan.random_seed})" if get_method(plan.method).uses_seed else ""
        lines = [f"method: {plan.method}{seed}"]
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
    if copies_only(plan):
        lines.append("every tensor is copied as stored: no arithmetic, torch is not loaded")
    lines.append(
        f"estimated peak memory: {estimate_peak_bytes(plan) / 1e6:,.0f} MB (any model size)"
    )
    lines.append(estimate_wall_time(prepared, out, measure_disk=measure_disk))
    if num_processes > 1:
        lines.append(f"split across {num_processes} processes (balanced by bytes):")
        for rank, shard_ids in enumerate(split_shards(plan, num_processes)):
            size = sum(plan.shards[i].file_bytes for i in shard_ids)
            names = ", ".join(plan.shards[i].filename for i in shard_ids) or "(none)"
            lines.append(f"  rank {rank}: {size:,} bytes: {names}")
    if prepared.vocab is not None:
        lines += prepared.vocab.report
    for warning in plan.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def estimate_wall_time(prepared: PreparedMerge, out: Path | None, *, measure_disk: bool) -> str:
    """One line: the merge's wall time from its bytes per device and the devices' rates (see
    ``diskrate``), or "unknown" with what is missing: never a guessed rate."""
    from shardmerge import diskrate

    plan = prepared.plan
    reads: dict[str, int] = {}
    files: dict[str, Path] = {}  # a large input file per device, to measure it
    download = 0
    for i, model in enumerate(prepared.models):
        nbytes = sum(
            info.nbytes
            for t in plan.tasks
            for j, info in enumerate(t.inputs)
            if t.model_of(j) == i  # a stack's task reads some models only
        )
        folder = model.local_dir or _cached_snapshot(model)
        if folder is None:
            download += nbytes
            continue
        key = diskrate.device_key(folder)
        reads[key] = reads.get(key, 0) + nbytes
        largest = max(model.inventory.files, key=lambda f: (folder / f).stat().st_size)
        files.setdefault(key, (folder / largest).resolve())
    writes = {diskrate.device_key(out): plan.total_size} if out is not None else {}
    if measure_disk:
        for key in set(reads) | set(writes):
            write_dir = out if out is not None and key in writes else None
            diskrate.save_rates(key, diskrate.measure(files.get(key), write_dir))
    rates = diskrate.load_rates()
    amounts = [f"reads {format_bytes(n)} from {key}" for key, n in reads.items()]
    amounts += [f"writes {format_bytes(n)} to {key}" for key, n in writes.items()]
    missing = [
        key
        for key in set(reads) | set(writes)
        if key not in rates
        or (key in reads and not rates[key].read_bytes_per_s)
        or (key in writes and not rates[key].write_bytes_per_s)
    ]
    why = []
    if download:
        why.append(f"{format_bytes(download)} to download from the Hub at an unknown rate")
    if missing and measure_disk:  # too little to time: the inputs' largest file under 64 kB
        why.append(f"could not measure {', '.join(sorted(missing))} (inputs too small to time)")
    elif missing:
        why.append(
            f"no measured rate for {', '.join(sorted(missing))}: run `shardmerge plan "
            "--measure-disk` once (a few seconds)"
        )
    if out is None:
        why.append("the output's disk is unknown: pass --out")
    seconds = None if why else diskrate.estimate_seconds(reads, writes, rates)
    if seconds is None:
        return f"estimated wall time: unknown ({'; '.join(why)})"
    used = sorted(set(reads) | set(writes))
    shown = ", ".join(
        f"{key}: read {_rate(rates[key].read_bytes_per_s)}, write "
        f"{_rate(rates[key].write_bytes_per_s)}, measured {rates[key].measured}"
        for key in used
    )
    shown_s = f"{seconds:.1f}" if seconds < 10 else f"{seconds:,.0f}"
    return f"estimated wall time: {shown_s} s ({'; '.join(amounts)}; disk rates {shown})"


def _rate(per_s: float | None) -> str:
    return f"{format_bytes(per_s)}/s" if per_s else "unknown"


def _cached_snapshot(model: ResolvedModel) -> Path | None:
    """A Hub model's snapshot folder in the HF cache when it holds every shard, else None."""
    if model.hub is None:
        return None
    from shardmerge.hub import snapshot_dir

    folder = snapshot_dir(model.hub.repo_id, model.hub.sha)
    return folder if all((folder / f).is_file() for f in model.inventory.files) else None


def resolve_device(requested: str) -> str:
    torch = import_torch()

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {requested!r} was asked for but CUDA is not available")
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise InputError(
            f"device {requested!r} was asked for but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return requested


def check_device(requested: str) -> None:
    """Refuse a device that is not there; torch is imported only for a CUDA device."""
    if requested.startswith("cuda"):
        resolve_device(requested)


# What a run will do with its output: merge from scratch, resume an interrupted run, or
# nothing (--resume found the same merge finished).
OutputState = Literal["new", "resume", "complete"]


def check_run(
    prepared: PreparedMerge, out: Path, *, overwrite: bool, resume: bool, device: str
) -> OutputState:
    """Every check ``run`` makes before it writes anything (``validate`` makes them too):
    the device, another run on the same output, the output's location and state.

    Raises:
        InputError: naming the problem.
    """
    check_device(device)
    out = output_path(out)
    holder = lock_holder(out)
    if holder is not None:
        raise busy_error(out, holder)
    return output_state(prepared, out, overwrite=overwrite, resume=resume)


def output_state(
    prepared: PreparedMerge, out: Path, *, overwrite: bool, resume: bool
) -> OutputState:
    """Check the output location and what an earlier run left there (reads only)."""
    work = partial_dir(out)
    finished_here = None if work.exists() else written_by_this_merge(out, prepared)
    if resume and finished_here is not None:
        if finished_here:
            return "complete"
        if not overwrite:
            raise OutputError(
                f"{out} holds a finished merge of another recipe or other inputs; --resume "
                "continues only the same merge: pass --overwrite to replace it"
            )
    inputs = [d for m in prepared.models for d in m.input_dirs]
    needed = sum(s.file_bytes for s in prepared.plan.shards)
    check_output_location(out, inputs, overwrite=overwrite, needed_bytes=needed)
    finished = _interrupted_shards(work, prepared, resume=resume)
    if resume:
        return "resume"
    if finished and not overwrite:
        raise OutputError(
            f"an interrupted run of this recipe left {finished} of {len(prepared.plan.shards)} "
            f"shard(s) finished in {work}: rerun with --resume to keep them, or with "
            "--overwrite to start over"
        )
    return "new"


def written_by_this_merge(out: Path, prepared: PreparedMerge) -> bool | None:
    """None: ``out`` is not a finished shardmerge output; else whether it is this merge's,
    whole (same fingerprint, every shard there at its planned size)."""
    try:
        index = json.loads((out / INDEX_NAME).read_text())
        fingerprint = index["metadata"]["shardmerge"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if fingerprint != prepared.fingerprint:
        return False
    return all(_size(out / s.filename) == s.file_bytes for s in prepared.plan.shards)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _interrupted_shards(work: Path, prepared: PreparedMerge, *, resume: bool) -> int:
    """How many shards an interrupted run of this same merge recorded in ``work``.

    Raises:
        OutputError: ``resume`` and the records are of another recipe or other inputs.
    """
    finished: set[str] = set()
    for path in sorted(work.glob(PROGRESS_NAME + "*")):
        try:
            record = json.loads(path.read_text())
            shards, fingerprint = record["shards"], record["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record cut short by the crash
        if fingerprint != prepared.fingerprint:
            if resume:
                raise _changed_since(work)
            return 0  # another merge's leftovers: a new run replaces them
        if isinstance(shards, dict):
            finished.update(shards)
    return len(finished & {s.filename for s in prepared.plan.shards})


def _changed_since(work: Path) -> OutputError:
    return OutputError(
        f"cannot resume into {work}: the recipe or the inputs changed since the "
        "interrupted run; run again without --resume to start over"
    )


def run_merge(
    prepared: PreparedMerge,
    *,
    out: Path,
    overwrite: bool = False,
    device: str = "auto",
    quiet: bool = False,
    resume: bool = False,
    stream: bool = False,
    stream_budget: int | None = None,
) -> RunResult:
    """Execute a prepared merge into ``out``, atomically: the folder appears only when complete.

    Every check comes before anything is written; the output is locked for the whole run.
    ``stream_budget``: with ``stream``, the most input bytes on disk at once.
    """
    out = output_path(out)
    check_run(prepared, out, overwrite=overwrite, resume=resume, device=device)
    check_stream_budget(prepared, stream_budget)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        if prepare_output(prepared, out, overwrite=overwrite, resume=resume) == "complete":
            shards = len(prepared.plan.shards)
            return RunResult(out, prepared.plan, shards, 0, None, already_complete=True)
        work = partial_dir(out)
        # Config, tokenizer files and card need no tensor: written while the shards merge.
        merged = merge_shards(
            prepared,
            out,
            device=device,
            quiet=quiet,
            resume=resume,
            stream=stream,
            stream_budget=stream_budget,
            alongside=lambda: _side_files_and_warm_up(prepared, work, out.name),
        )
        finish_output(prepared, out, side_files_written=True)
    return RunResult(
        out,
        prepared.plan,
        merged.skipped_shards,
        merged.bytes_read,
        merged.peak_input_bytes_on_disk,
    )


def check_stream_budget(prepared: PreparedMerge, stream_budget: int | None) -> None:
    """Refuse a streaming disk budget too small for the input shards the merge reads together.

    Raises:
        InputError: ``stream_budget`` is below what streaming this merge needs on disk at once.
    """
    if stream_budget is None:
        return
    needed = stream_disk_needed(
        prepared.models, _input_files(prepared.plan, frozenset(), len(prepared.models))
    )
    if stream_budget < needed:
        raise InputError(
            f"--stream-budget {format_bytes(stream_budget)} is below the "
            f"{format_bytes(needed)} of input shards this merge reads together (the largest "
            f"shards of each input, where they overlap): use at least {format_bytes(needed, up=True)}"
        )


def format_bytes(n: float, *, up: bool = False) -> str:
    """``n`` bytes in decimal units with 3 significant digits, as ``--stream-budget`` takes
    them (1.5GB, 800MB); ``up``: rounded up (a minimum to ask for)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1.0)):
        if n >= size or unit == "B":
            scale = 10 ** max(0, 3 - len(str(int(n / size))))
            value = (math.ceil if up else round)(n / size * scale) / scale
            return f"{value:g}{unit}"
    raise AssertionError("unreachable")


def prepare_output(
    prepared: PreparedMerge, out: Path, *, overwrite: bool, resume: bool
) -> OutputState:
    """Check the output (again: the caller holds its lock now) and create (or, to resume,
    keep) the hidden working folder, unless the same merge is already complete there."""
    state = output_state(prepared, out, overwrite=overwrite, resume=resume)
    if state != "complete":
        prepare_partial(out, keep=resume)
    return state


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
    stream_budget: int | None = None,
    only_shards: frozenset[int] | None = None,
    rank: int = 0,
    alongside: Callable[[], None] | None = None,
) -> MergedShards:
    """Write the plan's shards (or ``only_shards``) into the working folder, recording each
    finished shard with its digest so ``--resume`` can skip it. ``alongside`` runs on a thread
    meanwhile; it is waited for, also when the merge fails, and what it raises is raised."""
    plan = prepared.plan
    # SLERP's chunk slots' memory is faulted in by the kernel while torch imports (on a GPU,
    # the engine then registers it with CUDA as pinned memory).
    slots_bytes = early_slots_bytes(plan)
    slots_memory = _fault_in(slots_bytes) if slots_bytes else None
    # From a cold disk the first chunks of local inputs load while torch imports.
    readahead.hint_start(_first_reads(prepared, only_shards))
    work = partial_dir(out)
    wanted = set(range(len(plan.shards))) if only_shards is None else set(only_shards)
    done = _resumable_shards(work, prepared, wanted) if resume else {}
    skip = frozenset(i for i, s in enumerate(plan.shards) if i not in wanted or s.filename in done)
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(
            tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=work, ignore_cleanup_errors=True)
        )
        # Streamed Hub inputs start downloading now, while torch imports.
        sources, ahead = open_sources(
            prepared.models,
            stream=stream,
            workdir=Path(scratch),
            files=_input_files(plan, skip, len(prepared.models)),
            progress=not quiet,
            stream_budget=stream_budget,
        )
        if ahead is not None:  # stops the downloads however the merge ends (Ctrl-C too)
            stack.callback(ahead.close)
        from shardmerge.mergestats import Recorder

        # A plan of byte copies (a passthrough stack) needs no arithmetic, so no torch: its
        # import is most of such a run's CPU time past the disk's.
        copying = copies_only(plan, skip)
        if not copying:
            torch = import_torch()
        # Started now rather than before: it and torch's import are both Python code (they
        # would share the GIL), and torch's import waited for modules they both import.
        stack.enter_context(_in_background(alongside, "shardmerge-meta"))
        if copying:
            check_device(device)  # nothing to compute; a device asked for must still exist
            dev = "cpu"
        else:
            dev = resolve_device(device)
            if dev == "cpu" and only_shards is None:
                torch.set_num_threads(os.cpu_count() or 1)
        host_memory = slots_memory() if slots_memory is not None else None
        record_path = work / (PROGRESS_NAME if rank == 0 else f"{PROGRESS_NAME}.rank{rank}")
        record: dict[str, Any] = {
            "fingerprint": prepared.fingerprint,
            "inputs": {m.key: m.pin for m in prepared.models},
            "shards": {},
        }
        record["shards"].update({k: v for k, v in done.items()})
        write_json(record_path, record)

        # Each tensor's statistics (for the card) go into its shard's record: they survive
        # --resume with the shard, and rank 0 finds every rank's in their records.
        recorder = Recorder()

        def shard_done(index: int, result: Any) -> None:
            stats = recorder.take(t.name for t in plan.shards[index].tasks)
            record["shards"][result.filename] = {
                "digest": result.digest,
                "size": result.size,
                "stats": stats,
            }
            write_json(record_path, record)

        todo = sum(s.data_bytes for i, s in enumerate(plan.shards) if i not in skip)
        bar = _progress_bar(todo, quiet)
        try:
            common: dict[str, Any] = dict(
                labels=[m.label for m in prepared.models],
                skip_shards=skip,
                on_progress=bar.update if bar else None,
                on_shard_done=shard_done,
            )
            if copying:
                result = execute_copies(plan, sources, work, **common)
            else:
                from shardmerge.passes import execute

                result = execute(
                    plan,
                    sources,
                    work,
                    device=dev,
                    host_memory=host_memory,
                    recorder=recorder,
                    **common,
                )
        except NonFiniteInputError as exc:  # bad input: named by its repo or folder
            model = next(m for m in prepared.models if m.key == exc.model_key)
            raise CheckpointError(
                f"tensor {exc.tensor!r} in {model.label} contains NaN or Inf values"
            ) from None
        except OSError as exc:
            raise ShardmergeError(
                f"writing {out} failed ({exc.strerror or exc}); the finished shards are kept: "
                "rerun the same command with --resume"
            ) from None
        finally:
            if bar:
                bar.close()
        peak = ahead.peak_bytes_on_disk if ahead is not None else None
    skipped = sum(1 for i in range(len(plan.shards)) if i in wanted and i in skip)
    return MergedShards(skipped, result.bytes_read, peak)


def finish_output(
    prepared: PreparedMerge, out: Path, *, side_files_written: bool = False
) -> RunResult:
    """Metadata files (unless already written) and the index last, then move into place."""
    work = partial_dir(out)
    if not side_files_written:
        write_side_files(prepared, work, out.name)
    records = sorted(work.glob(PROGRESS_NAME + "*"))
    # The card again, now with what every shard's merge recorded (and its picture).
    write_card(prepared, work, out.name, _recorded_statistics(records))
    faults.reached("before-index")
    # The run's record: which exact inputs (Hub commit or local fingerprint) made this output.
    inputs = {m.key: f"{shown_name(m)}@{m.pin}" for m in prepared.models}
    metadata = {
        "version": __version__,
        "inputs": inputs,
        "fingerprint": prepared.fingerprint,  # --resume on a finished output compares it
        "shard_digests": _shard_digests(prepared, work, records),  # checked by verify
    }
    for scratch in work.glob(SCRATCH_PREFIX + "*"):  # a killed rank's, never part of the output
        shutil.rmtree(scratch, ignore_errors=True)
    # Durable before it looks complete: the shards and side files, then the index, then the
    # folder's rename. A crash before the rename leaves the records for --resume.
    sync_tree(work)
    index = work / INDEX_NAME
    index.write_text(prepared.plan.index_json({"shardmerge": metadata}))
    with open(index, "rb") as fh:
        os.fsync(fh.fileno())
    for record in records:
        record.unlink()
    sync_dir(work)
    finalize(work, out)
    return RunResult(out, prepared.plan, 0, 0, None)


def _recorded_statistics(records: list[Path]) -> dict[str, dict[str, Any]]:
    """Every tensor's statistics, from the progress records of the runs and ranks that wrote
    the shards (a shard merged before statistics were recorded has none)."""
    found: dict[str, dict[str, Any]] = {}
    for path in records:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            for entry in json.loads(path.read_text())["shards"].values():
                stats = entry.get("stats") if isinstance(entry, dict) else None
                if isinstance(stats, dict):
                    found.update((k, v) for k, v in stats.items() if isinstance(v, dict))
    return found


def _shard_digests(prepared: PreparedMerge, work: Path, records: list[Path]) -> dict[str, str]:
    """Each shard's digest, as the runs that wrote it recorded it (hashed again if not)."""
    from shardmerge.shardio import file_digest

    recorded: dict[str, Any] = {}
    for path in records:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            recorded.update(json.loads(path.read_text())["shards"])
    digests = {}
    for shard in prepared.plan.shards:
        entry = recorded.get(shard.filename)
        digest = entry.get("digest") if isinstance(entry, dict) else None
        digests[shard.filename] = (
            digest if isinstance(digest, str) else file_digest(work / shard.filename)
        )
    return digests


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


def early_slots_bytes(plan: MergePlan) -> int:
    """How much of SLERP's chunk-slot memory to fault in before the merge starts: all of it
    for a SLERP merge at least as large as the slots, else none (a small merge never touches
    most slots; the other methods' engine has pools of its own, :mod:`shardmerge.passes`, and
    mapping SLERP's for them cost 192 MB of RSS for nothing)."""
    slots_bytes = chunk_buffers(plan).total_bytes
    if plan.method != "slerp" or plan.input_bytes < slots_bytes:
        return 0
    return slots_bytes


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


def _first_reads(
    prepared: PreparedMerge, only_shards: frozenset[int] | None
) -> Iterator[readahead.Span]:
    """The local input ranges the merge reads first, roughly in the engine's order (a hint)."""
    slerp = prepared.plan.method == "slerp"
    for index, shard in enumerate(prepared.plan.shards):
        if only_shards is not None and index not in only_shards:
            continue
        for task in shard.tasks:
            for i, info in enumerate(task.inputs):
                model = prepared.models[task.model_of(i)]
                # SLERP's t = 0 reads nothing of B, t = 1 nothing of A.
                unused = slerp and task.t == (1.0 if i == 0 else 0.0)
                if model.local_dir is not None and not unused:
                    yield readahead.Span(str(model.local_dir / info.file), info.begin, info.nbytes)


def _input_files(plan: MergePlan, skip: frozenset[int], count: int) -> list[list[str | None]]:
    """Per model (``count`` of them), the file of each read in the engine's reading order (every
    input of every task, in turn), None where the read is another model's. Positions are shared
    by all models: streaming frees a file once the reader is past its last read, and a stack's
    models are read at different times (a model no task reads, an unused base, reads nothing)."""
    tasks = [t for i, s in enumerate(plan.shards) if i not in skip for t in s.tasks]
    return [
        [
            info.file if t.model_of(i) == m else None
            for t in tasks
            for i, info in enumerate(t.inputs)
        ]
        for m in range(count)
    ]


def check_push_target(
    recipe: Recipe,
    repo_id: str,
    *,
    private: bool,
    revision: str | None = None,
    create_pr: bool = False,
) -> PushTarget:
    """Everything a push needs, checked before any download or merge (see hub.check_push_target):
    the inputs are the recipe's models that are not local folders."""
    from shardmerge import hub

    inputs = [m.ref for m in recipe.models if not Path(m.ref).is_dir()]
    return hub.check_push_target(
        repo_id, inputs=inputs, private=private, revision=revision, create_pr=create_pr
    )


def replaced_by_push(path: str) -> bool:
    """Whether a file already in the target repo belongs to the model a push replaces: weights,
    their indexes and tokenizer files (the push brings its own; any left would mix models)."""
    name = path.rsplit("/", 1)[-1]
    weights = name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf"))
    picture = path == IMAGE_NAME  # an earlier merge's card picture
    return weights or picture or name.endswith(".index.json") or is_tokenizer_file(path)


def push_output(
    out: Path,
    repo_id: str,
    *,
    private: bool,
    prepared: PreparedMerge,
    dry_run: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> PushResult:
    """Verify the finished folder, then upload it in one commit that also removes the replaced
    model's files (or, dry run, say what that commit would do)."""
    from shardmerge import hub
    from shardmerge.verify import verify_output

    report = verify_output(out)
    if not report.ok:
        raise ShardmergeError(f"not pushing {out}: verification failed: {report.problems[0]}")
    names = " and ".join(shown_name(m) for m in prepared.models)
    method = "SLERP" if prepared.plan.method == "slerp" else prepared.plan.method
    message = commit_message or f"{method} merge of {names} (shardmerge)"
    return hub.push_folder(
        out,
        repo_id,
        private=private,
        commit_message=message,
        dry_run=dry_run,
        revision=revision,
        create_pr=create_pr,
        replaces=replaced_by_push,
    )


def shown_name(model: ResolvedModel) -> str:
    """How the card, the index and a push name a model: its Hub id, the name the recipe gives
    it, or its folder's name, never a path of the machine that merged."""
    if model.hub_id:
        return model.hub_id
    if model.ref.name:
        return model.ref.name
    folder = model.origin_dir or model.local_dir
    return Path(model.ref.ref).name or (folder.resolve().name if folder else model.ref.ref)


def _card_recipe_text(prepared: PreparedMerge) -> str:
    """The recipe for the card, its absolute local paths replaced by the names shown."""
    recipe = prepared.recipe
    text = recipe.text
    for model in prepared.models:
        written = model.ref.ref
        if not model.hub_id and (os.path.isabs(written) or written.startswith("~")):
            text = text.replace(written, shown_name(model))
    if recipe.output_dir and os.path.isabs(recipe.output_dir):
        text = text.replace(recipe.output_dir, Path(recipe.output_dir).name)
    return text


def _side_files_and_warm_up(prepared: PreparedMerge, work: Path, out_name: str) -> None:
    from shardmerge import plot

    write_side_files(prepared, work, out_name)
    # A stack of copies records nothing to draw.
    if prepared.recipe.card_image and not copies_only(prepared.plan):
        plot.warm_up()  # the card's picture is drawn after the merge: matplotlib is ready by then


def write_side_files(prepared: PreparedMerge, work: Path, out_name: str) -> None:
    """config, tokenizer and other small files, and the card without statistics (everything
    but shards and index; :func:`finish_output` writes the card again with them)."""
    plan = prepared.plan
    recipe = prepared.recipe
    a, vocab, spec = prepared.model_a, prepared.vocab, recipe.vocab
    # The model the tokenizer comes from (the first model's config and other files either way).
    if vocab is not None:
        tok = prepared.models[vocab.source]
    elif spec is not None and isinstance(spec.source, int):
        tok = prepared.models[spec.source]
    else:
        tok = prepared.models[1 if recipe.tokenizer_source == "b" else 0]
    own_tokenizer = tok is a and (vocab is None or vocab.identity)
    files_a = [f for f in a.small_files if own_tokenizer or not is_tokenizer_file(f)]
    folder_a = small_files_folder(a, files_a)
    copy_files(folder_a, [f for f in files_a if f != "config.json"], work)
    if vocab is not None and not vocab.identity:
        write_tokenizer(work, small_files_folder(tok, VOCAB_FILES), vocab)
    elif tok is not a:
        files_tok = [f for f in tok.small_files if is_tokenizer_file(f)]
        copy_files(small_files_folder(tok, files_tok), files_tok, work)
    if spec is not None and spec.chat_template is not None:
        folders = [small_files_folder(m, VOCAB_FILES) for m in prepared.models]
        template = resolve_chat_template(spec.chat_template, folders)
        if template is not None:
            set_chat_template(work, template)
    out_dtype = _dominant_out_dtype(plan)
    config = dict(a.inventory.config) if a.inventory.config is not None else None
    if config is not None and (vocab is not None or tok is not a):
        source_config = dict(tok.inventory.config) if tok.inventory.config is not None else None
        config = vocab_config(config, vocab, source_config if tok is not a else None)
    if config is not None and prepared.recipe.slices and plan.restacked:
        from shardmerge.slices import rewrite_config

        configs = [m.inventory.config for m in prepared.models]
        config = rewrite_config(config, prepared.recipe.slices, configs)
    write_config(work, config, out_dtype)
    write_card(prepared, work, out_name, None)


def write_card(
    prepared: PreparedMerge,
    work: Path,
    out_name: str,
    statistics: dict[str, dict[str, Any]] | None,
) -> None:
    """README.md: the card, titled by the recipe's name, else ``out_name``; with
    ``statistics`` (per tensor, see mergestats) its per-layer table and, when matplotlib is
    installed, the picture beside it (``merge.png``)."""
    from shardmerge.card import CardModel, render_card

    plan = prepared.plan
    out_dtype = _dominant_out_dtype(plan)
    section = None
    if statistics is not None:
        section = _statistics_section(prepared, work, statistics)
    if plan.method == "slerp":
        roles = ["t = 0 end", "t = 1 end"]
    else:
        first = prepared.recipe.first_merged
        roles = ["base"] * first + [f"model {i + 1}" for i in range(len(prepared.models) - first)]
    uses_seed = plan.method != "slerp" and get_method(plan.method).uses_seed
    card = render_card(
        [
            CardModel(shown_name(m), m.hub_id, m.pin, role, _card_license(m))
            for m, role in zip(prepared.models, roles, strict=True)
        ],
        _card_recipe_text(prepared),
        plan.t_table,
        title=prepared.recipe.name or out_name,
        out_dtype=out_dtype or "as stored",
        total_bytes=plan.total_size,
        num_shards=len(plan.shards),
        method=plan.method,
        random_seed=plan.random_seed if uses_seed else None,
        statistics=section,
    )
    vocab = prepared.vocab
    if vocab is not None and vocab.new_tokens:
        labels = [shown_name(m) for m in prepared.models]
        card += "\n## Added tokens\n\n| token | id | from |\n|---|---|---|\n" + "".join(
            f"| `{_cell(t.content)}` | {vocab.new_ids[t.content]} | {_cell(labels[m])} |\n"
            for t, m in vocab.new_tokens
        )
    (work / "README.md").write_text(card)


def _merged_names(prepared: PreparedMerge) -> list[str]:
    """The merged models as the statistics table names them (the base excluded)."""
    if prepared.plan.method == "slerp":
        return ["A", "B"]
    first = prepared.recipe.first_merged
    return [shown_name(m) for m in prepared.models[first:]]


def _statistics_section(
    prepared: PreparedMerge, work: Path, statistics: dict[str, dict[str, Any]]
) -> str:
    from shardmerge import plot
    from shardmerge.card import IMAGE_NAME, statistics_section
    from shardmerge.mergestats import render_table, summarize

    plan = prepared.plan
    names = _merged_names(prepared)
    rows = summarize(statistics)
    image_path = work / IMAGE_NAME
    image_path.unlink(missing_ok=True)  # an interrupted try's: drawn again from all records
    image = None
    if rows and prepared.recipe.card_image and plot.has_matplotlib():
        # Titled by the method, not the output's name: the same merge draws the same file.
        if plan.method == "slerp":
            title = "SLERP: t per layer over the similarity of the models"
        else:
            title = f"{plan.method}: weights and kept fractions per layer"
        try:
            plot.write_merge_plot(plan.method, rows, names, image_path, title)
            image = IMAGE_NAME
        except Exception as exc:  # noqa: BLE001 - a picture never fails a finished merge
            print(f"warning: the card's picture was not drawn ({exc})", file=sys.stderr)
    floats = sum(1 for t in plan.tasks if t.is_float)
    return statistics_section(
        plan.method,
        render_table(plan.method, rows, names) if rows else None,
        image=image,
        image_hint=prepared.recipe.card_image,
        recorded=sum(1 for t in plan.tasks if t.is_float and t.name in statistics),
        tensors=floats,
    )


# Licenses found, by (Hub id or folder, pin): the card is written twice per run (before and
# after the merge) and should not ask the Hub twice.
_LICENSES: dict[tuple[str, str], str | None] = {}


def _cell(text: str) -> str:
    """``text`` for a markdown table cell (a "|" would end the cell, even in code)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _card_license(model: ResolvedModel) -> str | None:
    """The ``license`` in the front matter of the model's own README.md, if it names one."""
    folder = model.origin_dir or model.local_dir
    key = (model.hub_id or str(folder), model.pin)
    if key not in _LICENSES:
        _LICENSES[key] = _read_license(model)
    return _LICENSES[key]


def _read_license(model: ResolvedModel) -> str | None:
    import yaml

    folder = model.origin_dir or model.local_dir
    try:
        if folder is None:  # a Hub model: its card is a few KB, read through the HF cache
            from shardmerge import hub

            assert model.hub is not None
            folder = hub.download_files(model.hub, ["README.md"])
        text = (folder / "README.md").read_text(encoding="utf-8")
        front = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else None
    except (ShardmergeError, OSError, UnicodeDecodeError, IndexError, yaml.YAMLError):
        return None  # no card, not cached offline, or unreadable: no license is carried
    value = front.get("license") if isinstance(front, dict) else None
    return str(value) if isinstance(value, str) and value.strip() else None


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
    from shardmerge.shardio import file_digest

    recorded: dict[str, Any] = {}
    for path in sorted(work.glob(PROGRESS_NAME + "*")):
        try:
            record = json.loads(path.read_text())
            shards, fingerprint = record["shards"], record["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record cut short by the crash: its shards are redone
        if fingerprint != prepared.fingerprint:
            raise _changed_since(work)
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
