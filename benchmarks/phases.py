"""Time the phases of one merge in-process: import torch, prepare (headers), merge, finish.

    python benchmarks/phases.py benchmarks/.data/medium/slerp.yml --out /tmp/phases-out
    py-spy record -r 100 --threads --idle -o prof.txt -f raw -- \\
        python benchmarks/phases.py benchmarks/.data/medium/slerp.yml --out /tmp/phases-out

The second form is how the profile in the notes was taken (py-spy: `pip install py-spy`).
The output folder is deleted first, so every run writes a fresh output.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)

    t0 = time.perf_counter()
    from shardmerge import import_torch

    import_torch()  # as the CLI does it (collector paused); timed on purpose: it is a phase

    t1 = time.perf_counter()
    from shardmerge import pipeline
    from shardmerge.recipe import load_recipe

    prepared = pipeline.prepare(load_recipe(args.recipe))
    t2 = time.perf_counter()
    pipeline.prepare_output(prepared, args.out.absolute(), overwrite=True, resume=False)
    merged = pipeline.merge_shards(
        prepared, args.out.absolute(), device=args.device, quiet=True, resume=False, stream=False
    )
    t3 = time.perf_counter()
    pipeline.finish_output(prepared, args.out.absolute())
    t4 = time.perf_counter()
    print(
        f"import torch {t1 - t0:.2f} s, prepare {t2 - t1:.2f} s, merge {t3 - t2:.2f} s "
        f"({merged.bytes_read / 1e9:.2f} GB read), finish {t4 - t3:.2f} s"
    )


if __name__ == "__main__":
    main()
