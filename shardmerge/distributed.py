"""One recipe across many processes: the output shards split across ranks, balanced by bytes.

Started under ``torchrun`` or ``accelerate launch`` (WORLD_SIZE > 1), ``shardmerge run`` joins
the process group, merges only its own output shards (so it reads only the input tensors those
need) on its own device, and rank 0 writes the index, config, tokenizer files and card once every
rank has reported success. The group is gloo whatever the device: ranks exchange a few status
messages, never tensors. A plain launch never imports torch.distributed.

The ranks move through four steps together; after each one every rank learns how the others
fared, so one failure stops them all, and each error names the rank, its host and its shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from shardmerge import pipeline
from shardmerge.errors import InputError, ShardmergeError
from shardmerge.output import output_lock, output_path, partial_dir
from shardmerge.pipeline import PROGRESS_NAME
from shardmerge.plan import split_shards

if TYPE_CHECKING:
    from shardmerge.pipeline import PreparedMerge, RunResult

__all__ = ["active", "is_main_process", "run_distributed", "split_shards"]

# Ranks that finish early wait for the slowest in a collective, which gloo fails after this
# long: it bounds a whole merge, not failure detection (a rank that dies closes its sockets,
# which fails the others' collective at once).
WAIT_LIMIT = timedelta(days=1)
# How long a rank looks for rank 0's marker in the working folder: a shared filesystem may
# show a new file on other machines a little late.
MARKER_WAIT_S = 30.0
# Variables a process group needs besides WORLD_SIZE (torchrun and accelerate launch set them).
_GROUP_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")
_COMPLETE = "complete"  # rank 0's answer to "preparing the output" when nothing is left to do

T = TypeVar("T")


def active() -> bool:
    """Whether this process was started as one of several (WORLD_SIZE > 1).

    Raises:
        InputError: WORLD_SIZE is set but is not a number.
    """
    value = os.environ.get("WORLD_SIZE", "").strip()
    if not value:
        return False
    try:
        return int(value) > 1
    except ValueError:
        raise InputError(f"WORLD_SIZE={value!r} is not a number of processes") from None


def is_main_process() -> bool:
    """Rank 0, or a plain launch: the process that reports, finalises and pushes."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def run_distributed(
    prepared: PreparedMerge,
    *,
    out: Path,
    overwrite: bool = False,
    device: str = "auto",
    quiet: bool = False,
    resume: bool = False,
    stream: bool = False,
    stream_budget: int | None = None,
) -> RunResult | None:
    """This process's part of ``pipeline.run_merge``, when started as one of several.

    Returns:
        On rank 0, the result with the skipped shards and bytes read of all ranks; elsewhere None.

    Raises:
        InputError: the process group variables are missing or wrong.
        ShardmergeError: any rank failed (raised on every rank); nothing is finalised.
    """
    from shardmerge import import_torch

    import_torch()  # this rank's first torch import
    import torch.distributed as dist

    rank, local_rank, local_world = _join()
    run = None
    try:
        run = _Run(prepared, output_path(Path(out)), rank)
        # torchrun stops the other ranks with SIGTERM when one fails: unwind (scratch folders
        # go, the error is reported) instead of vanishing. After a failure the handler stays,
        # ignoring SIGTERM, so that this rank's report is printed before it exits.
        previous = signal.signal(signal.SIGTERM, run.on_sigterm)
        result = run.execute(
            overwrite=overwrite,
            device=_device_for(device, local_rank),
            threads=max(1, _cpu_count() // local_world),
            quiet=quiet,
            resume=resume,
            stream=stream,
            stream_budget=stream_budget,
        )
        signal.signal(signal.SIGTERM, previous)
        return result
    finally:
        if run is not None:
            run.lock.close()  # rank 0's lock on the output
        dist.destroy_process_group()


class _Run:
    """The four steps of one rank, each followed by an exchange of outcomes."""

    def __init__(self, prepared: PreparedMerge, out: Path, rank: int) -> None:
        import torch.distributed as dist

        self.prepared = prepared
        self.out = out
        self.work = partial_dir(out)
        self.rank = rank
        self.world = dist.get_world_size()
        # Ranks that finish early wait for the slowest, so this group waits up to WAIT_LIMIT.
        self.group = dist.new_group(backend="gloo", timeout=WAIT_LIMIT)
        self.who = f"rank {rank} on {socket.gethostname()}"
        self.mine = split_shards(prepared.plan, self.world)[rank]
        self.lock = contextlib.ExitStack()  # rank 0 holds the output's lock in it
        self.terminated = False  # SIGTERM arrived
        self.quiet_signals = False  # in a collective, or reporting a failure: do not raise

    def on_sigterm(self, signum: int, frame: object) -> None:
        self.terminated = True
        if not self.quiet_signals:
            self.quiet_signals = True  # one error; later signals wait for it to be reported
            raise ShardmergeError(self._stopped())

    def _stopped(self) -> str:
        return (
            f"{self.who} was stopped (SIGTERM; when one rank fails torchrun stops the others, "
            "and its report names the rank that failed first)"
        )

    def execute(
        self,
        *,
        overwrite: bool,
        device: str,
        threads: int,
        quiet: bool,
        resume: bool,
        stream: bool,
        stream_budget: int | None = None,
    ) -> RunResult | None:
        kept = f"{self.out} was not written; the finished shards are kept: rerun with --resume"
        tokens = self._together(
            "preparing the output",
            lambda: self._start(overwrite=overwrite, resume=resume),
            f"{self.who} could not prepare {self.out}",
            "nothing was merged",
        )
        if tokens[0] == _COMPLETE:  # --resume found this merge finished: nothing to do
            plan = self.prepared.plan
            done = pipeline.RunResult(self.out, plan, len(plan.shards), 0, already_complete=True)
            return done if self.rank == 0 else None
        self._together(
            "checking the output folder",
            lambda: self._check_marker(tokens[0]),
            f"{self.who} cannot use {self.work}",
            "nothing was merged",
        )
        merged = self._together(
            "merging",
            lambda: self._merge(
                device, threads, quiet=quiet, resume=resume, stream=stream, budget=stream_budget
            ),
            f"{self.who} failed merging {self._shard_names()}",
            kept,
        )
        self._together(
            "finishing",
            self._finish,
            f"{self.who} could not finish {self.out}",
            kept,
        )
        if self.rank != 0:
            return None
        skipped = sum(s for s, _ in merged)
        return pipeline.RunResult(self.out, self.prepared.plan, skipped, sum(b for _, b in merged))

    def _start(self, *, overwrite: bool, resume: bool) -> str | None:
        """Rank 0: check the output location, create the working folder and mark it."""
        if self.rank != 0:
            return None
        pipeline.check_run(
            self.prepared, self.out, overwrite=overwrite, resume=resume, device="cpu"
        )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.lock.enter_context(output_lock(self.out))
        state = pipeline.prepare_output(self.prepared, self.out, overwrite=overwrite, resume=resume)
        if state == "complete":
            return _COMPLETE
        token = uuid.uuid4().hex
        # Shaped as an empty progress record, so finish_output clears any left by a crash.
        record = {"fingerprint": self.prepared.fingerprint, "shards": {}, "run": token}
        _marker(self.work).write_text(json.dumps(record))
        return token

    def _check_marker(self, token: str | None) -> None:
        """Every rank must see rank 0's working folder: several machines need shared storage."""
        deadline = time.monotonic() + MARKER_WAIT_S
        while _read_marker(self.work) != token:
            if time.monotonic() > deadline:
                raise ShardmergeError(
                    f"the working folder that rank 0 created is not visible here (waited "
                    f"{MARKER_WAIT_S:.0f} s): with several machines, --out must be on a "
                    "filesystem they all share"
                )
            time.sleep(0.5)

    def _merge(
        self,
        device: str,
        threads: int,
        *,
        quiet: bool,
        resume: bool,
        stream: bool,
        budget: int | None = None,
    ) -> tuple[int, int]:
        """This rank's shards; returns (shards skipped by --resume, input bytes read)."""
        import torch

        if self.rank == 0:
            _marker(self.work).unlink(missing_ok=True)  # every rank has seen it
        plan = self.prepared.plan
        size = sum(plan.shards[i].file_bytes for i in self.mine)
        _report(
            f"rank {self.rank}: merging {len(self.mine)} of {len(plan.shards)} shard(s), "
            f"{size:,} bytes, on {device}: {self._shard_names()}"
        )
        if device == "cpu":
            torch.set_num_threads(threads)  # the machine's cores shared among its ranks
        merged = pipeline.merge_shards(
            self.prepared,
            self.out,
            device=device,
            quiet=quiet or self.rank != 0,
            resume=resume,
            stream=stream,
            stream_budget=budget,
            only_shards=frozenset(self.mine),
            rank=self.rank,
        )
        _report(f"rank {self.rank}: read {merged.bytes_read} input bytes")
        return merged.skipped_shards, merged.bytes_read

    def _finish(self) -> None:
        """Rank 0: every shard in place, then metadata, index and the move into place."""
        if self.rank != 0:
            return
        wrong = [
            s.filename
            for s in self.prepared.plan.shards
            if _size(self.work / s.filename) != s.file_bytes
        ]
        if wrong:
            raise ShardmergeError(
                f"{len(wrong)} shard(s) missing or incomplete in {self.work} as rank 0 sees it "
                f"({', '.join(wrong[:3])}): with several machines, --out must be on a "
                "filesystem they all share"
            )
        pipeline.finish_output(self.prepared, self.out)

    def _together(
        self, doing: str, step: Callable[[], T], failed: str, consequence: str
    ) -> list[T]:
        """Run ``step`` here, then learn every rank's outcome; raise on every rank if any failed.

        Returns:
            Each rank's value, by rank.
        """
        try:
            outcome: tuple[Any, tuple[str, int] | None] = (step(), None)
        except ShardmergeError as exc:
            outcome = (None, (f"{failed}: {exc}", exc.exit_code))
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            outcome = (None, (f"{failed}: {type(exc).__name__}: {exc}", 1))
        outcomes = self._gather(outcome, doing, consequence)
        failures = {r: f for r, (_, f) in enumerate(outcomes) if f is not None}
        if not failures:
            if self.terminated:
                raise ShardmergeError(f"{self._stopped()}; {consequence}")
            self.quiet_signals = False
            return [value for value, _ in outcomes]
        if self.rank == 0:
            message = "; ".join(text for text, _ in failures.values())
        elif self.rank in failures:
            message = failures[self.rank][0]
        else:
            ranks = ", ".join(str(r) for r in failures)
            message = f"rank {self.rank}: stopped because rank {ranks} failed (rank 0 reports why)"
        error = ShardmergeError(f"{message}; {consequence}")
        # Bad input everywhere (e.g. an output folder in the way) keeps its exit code 2.
        error.exit_code = max(code for _, code in failures.values())
        raise error

    def _gather(self, outcome: Any, doing: str, consequence: str) -> list[Any]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        self.quiet_signals = True  # a SIGTERM now is handled once every outcome is known
        try:
            dist.all_gather_object(gathered, outcome, group=self.group)
        except RuntimeError as exc:  # a peer's sockets closed: it died without reporting
            # gloo's "[.../pair.cc:537] Read error [host]:port: Connection reset by peer. ..."
            cause = re.sub(r"^\[[^\]]*\]\s*", "", str(exc)).split(". ")[0] or repr(exc)
            raise ShardmergeError(
                f"{self.who}: lost contact with the other ranks while {doing} ({cause}): one "
                f"of them stopped without reporting (killed, out of memory or crashed; the "
                f"launcher's report names it); {consequence}"
            ) from None
        return gathered

    def _shard_names(self) -> str:
        """This rank's shards, a contiguous run: "first to last (n shards)"."""
        names = [self.prepared.plan.shards[i].filename for i in self.mine]
        if len(names) < 3:
            return " and ".join(names) or "no shards"
        return f"{names[0]} to {names[-1]} ({len(names)} shards)"


def _join() -> tuple[int, int, int]:
    """Join the process group torchrun / accelerate launch described in the environment.

    Returns:
        (rank, local rank, processes on this machine).
    """
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    missing = [name for name in _GROUP_ENV if not os.environ.get(name, "").strip()]
    if missing:
        raise InputError(
            f"WORLD_SIZE={world} makes this process one of {world}, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start shardmerge under torchrun "
            "or accelerate launch (they set them), set RANK, MASTER_ADDR and MASTER_PORT "
            "yourself, or unset WORLD_SIZE to merge in one process"
        )
    rank = _env_int("RANK", 0)
    if not 0 <= rank < world:
        raise InputError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = max(1, _env_int("LOCAL_WORLD_SIZE", 1))
    if not dist.is_available():
        raise ShardmergeError("this torch build has no torch.distributed: run in one process")
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend="gloo")
    except (RuntimeError, ValueError) as exc:
        raise ShardmergeError(
            f"rank {rank} could not join the other {world - 1} process(es) through {address} "
            f"(MASTER_ADDR:MASTER_PORT): {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from None
    return rank, local_rank, local_world


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name}={value!r} is not a number") from None


def _device_for(requested: str, local_rank: int) -> str:
    """``auto`` and ``cuda`` mean this machine's GPU number LOCAL_RANK (shared round-robin)."""
    import torch

    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu" if requested == "auto" else requested  # "cuda" without CUDA fails later


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))  # the cores this process may use (cgroups, taskset)
    return os.cpu_count() or 1


def _marker(work: Path) -> Path:
    return work / f"{PROGRESS_NAME}.run"


def _read_marker(work: Path) -> str | None:
    try:
        value = json.loads(_marker(work).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _size(path: Path) -> int | None:
    try:
        # open + fstat, not stat: NFS revalidates a file's attributes on open.
        with path.open("rb") as fh:
            return os.fstat(fh.fileno()).st_size
    except OSError:
        return None


def _report(line: str) -> None:
    """One line to stderr in a single write: the ranks share it, and print()'s separate write of
    the newline let two ranks' lines run together ("...bytesrank 1: ...")."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
