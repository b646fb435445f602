"""One recipe across many processes: output shards split across ranks, balanced by bytes.

Started under ``torchrun`` or ``accelerate launch`` (WORLD_SIZE > 1), ``shardmerge run`` joins
the process group through accelerate's PartialState (gloo on CPU, NCCL with GPUs), merges only
its own shards (so it reads only the input tensors those need) and reports to rank 0, which
writes the index, config, tokenizer files and card after every rank succeeded. A plain launch
never imports any of this machinery.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from shardmerge.errors import ShardmergeError
from shardmerge.plan import MergePlan


def active() -> bool:
    """Whether this process was launched as one of several (torchrun / accelerate launch)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def split_shards(plan: MergePlan, num_processes: int) -> list[list[int]]:
    """Shard indices per rank: largest first onto the least-loaded rank (deterministic)."""
    loads = [0] * num_processes
    assigned: list[list[int]] = [[] for _ in range(num_processes)]
    order = sorted(range(len(plan.shards)), key=lambda i: (-plan.shards[i].file_bytes, i))
    for index in order:
        rank = min(range(num_processes), key=lambda r: (loads[r], r))
        assigned[rank].append(index)
        loads[rank] += plan.shards[index].file_bytes
    return [sorted(a) for a in assigned]


def run_distributed(prepared: Any, **options: Any) -> Any:
    """This rank's part of ``pipeline.run_merge``; rank 0 finalises after all succeeded."""
    import torch
    from accelerate import PartialState

    from shardmerge import pipeline

    state = PartialState()
    rank, world = state.process_index, state.num_processes
    out = Path(options["out"]).expanduser().absolute()
    try:
        device = _device_for(options.get("device", "auto"), state.local_process_index)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
        mine = frozenset(split_shards(prepared.plan, world)[rank])
        if state.is_main_process:
            pipeline.prepare_output(
                prepared, out, overwrite=options["overwrite"], resume=options["resume"]
            )
    except BaseException as exc:  # noqa: BLE001 - reported through the gather below
        failure: str | None = f"rank {rank}: {exc}"
        mine = frozenset()
    else:
        failure = None
    state.wait_for_everyone()
    statuses = _gather(failure)
    if not any(statuses):
        try:
            merged = pipeline.merge_shards(
                prepared,
                out,
                device=device,
                quiet=options["quiet"] or rank != 0,
                resume=options["resume"],
                stream=options["stream"],
                only_shards=mine,
                rank=rank,
            )
            print(f"rank {rank}: read {merged.bytes_read} input bytes", file=sys.stderr)
        except BaseException as exc:  # noqa: BLE001
            names = ", ".join(prepared.plan.shards[i].filename for i in sorted(mine))
            failure = f"rank {rank} failed on shard(s) {names}: {exc}"
        statuses = _gather(failure)
    problems = [s for s in statuses if s]
    if problems:
        raise ShardmergeError("; ".join(problems) + "; the output was not finalised")
    if state.is_main_process:
        result = pipeline.finish_output(prepared, out)
    state.wait_for_everyone()
    return result if state.is_main_process else None


def _device_for(requested: str, local_rank: int) -> str:
    import torch

    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return "cpu" if requested == "auto" else requested


def _gather(status: str | None) -> list[str | None]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, status)
    return gathered
