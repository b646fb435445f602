"""CPU cost per element of a method's passes, without I/O: one tensor through reduce and combine.

    .venv/bin/python benchmarks/method_cost.py --methods ties,dare_ties,task_arithmetic --threads 1

A base and two fine-tunes (bf16, the fine-tunes 0.02 from the base), ``--chunks`` chunks of the
engine's size, weight 0.5 and density 0.5 each; every pass and the combine are timed as the
engine runs them (chunk by chunk, in flat order), best of ``--repeats``. Prints CPU and wall
nanoseconds per element for each pass: compare two checkouts with the same arguments, side by
side, to see what a change to a method's arithmetic costs.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from shardmerge import heap
from shardmerge.methods import TensorJob, get_method
from shardmerge.passes import CHUNK_NUMEL


def time_method(
    method: str, inputs: list[torch.Tensor], chunk: int
) -> dict[str, tuple[float, float]]:
    """(CPU s, wall s) per pass ("pass0", ...) and for "combine"."""
    numel = inputs[0].numel()
    spec = get_method(method)
    # Each parameter's default, then weight and density 0.5 (a required one without a default:
    # 0.5 too) and DARE's rescale.
    params = {p.name: p.default for p in spec.params if p.per_model and p.default is not None}
    params |= {"weight": 0.5, "density": 0.5}
    base = spec.base != "none"
    shared = {p.name: p.default for p in spec.params if not p.per_model}
    shared = {k: 0.5 if v is None else v for k, v in shared.items()}
    shared |= {"rescale": method.startswith("dare"), "normalize": True, "lambda": 1.0}
    job = TensorJob(
        name="model.layers.0.mlp.up_proj.weight",
        numel=numel,
        dtype=inputs[0].dtype,
        model_params=(params,) * (len(inputs) - base),
        shared={"int8_mask": False, "filter_wise": False, **shared},
        seed=0,
        row_len=2048,
    )
    merge = get_method(method).start(job)
    spans = [(s, min(s + chunk, numel)) for s in range(0, numel, chunk)]
    times: dict[str, tuple[float, float]] = {}
    for p in range(merge.passes):
        cpu, wall = time.process_time(), time.perf_counter()
        for s, e in spans:
            merge.reduce(p, [x[s:e] for x in inputs], s)
        merge.end_pass(p)
        times[f"pass{p}"] = (time.process_time() - cpu, time.perf_counter() - wall)
    cpu, wall = time.process_time(), time.perf_counter()
    for s, e in spans:
        merge.combine([x[s:e] for x in inputs], s)
    times["combine"] = (time.process_time() - cpu, time.perf_counter() - wall)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="ties,dare_ties,task_arithmetic")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    heap.keep_temporaries()  # malloc's settings as the pass engine applies them
    g = torch.Generator().manual_seed(0)
    numel = CHUNK_NUMEL * args.chunks
    base = torch.randn(numel, generator=g).to(torch.bfloat16)
    tunes = [(base.float() + 0.02 * torch.randn(numel, generator=g)).to(torch.bfloat16)]
    tunes.append((base.float() + 0.02 * torch.randn(numel, generator=g)).to(torch.bfloat16))
    inputs = [base, *tunes]
    for method in args.methods.split(","):
        # Methods without a base (linear, karcher) take the two fine-tunes only.
        used = tunes if get_method(method).base == "none" else inputs
        time_method(method, used, CHUNK_NUMEL)  # warm-up
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            for stage, (cpu, wall) in time_method(method, used, CHUNK_NUMEL).items():
                old = best.get(stage)
                best[stage] = (cpu, wall) if old is None else (min(old[0], cpu), min(old[1], wall))
        cells = [
            f"{stage} {cpu / numel * 1e9:.1f} CPU-ns/el ({wall / numel * 1e9:.1f} wall)"
            for stage, (cpu, wall) in best.items()
        ]
        print(f"{method}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
