"""The ``shardmerge`` command: a thin adapter over the library (parse, call, print).

Exit codes: 0 success, 2 bad recipe / usage / input, 1 runtime failure. Data goes to stdout,
progress and warnings to stderr. Heavy imports (torch, huggingface_hub) happen only in the
commands that need them.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from shardmerge import __version__
from shardmerge.errors import InputError, ShardmergeError

if TYPE_CHECKING:
    from shardmerge.recipe import Recipe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardmerge",
        description="Streaming, bounded-memory merges (SLERP, linear, task arithmetic, TIES, "
        "DARE, breadcrumbs, DELLA) of sharded safetensors checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"shardmerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="merge the models of a recipe")
    run.add_argument("recipe", type=Path, help="recipe YAML (shardmerge or mergekit format)")
    run.add_argument("--out", type=Path, help="output folder (required for mergekit configs)")
    run.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides the recipe)")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--resume", action="store_true", help="reuse the verified shards of an interrupted run"
    )
    run.add_argument(
        "--stream",
        action="store_true",
        help="Hub inputs: download each input shard just before use and delete it after",
    )
    run.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the result to this repo")
    run.add_argument("--private", action="store_true", help="create the Hub repo as private")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="with --push-to-hub: merge, then list what would be uploaded without uploading",
    )
    run.add_argument(
        "--random-seed",
        type=int,
        metavar="N",
        help="seed of random masks (DARE, DELLA); overrides the recipe's; default 0",
    )
    _add_allow_pickle(run)

    plan = sub.add_parser("plan", help="show the t table and output layout (headers only)")
    plan.add_argument("recipe", type=Path)
    _add_allow_pickle(plan)
    plan.add_argument(
        "--num-processes", type=int, default=1, help="also show the split across N processes"
    )

    validate = sub.add_parser("validate", help="check a recipe and its models (headers only)")
    validate.add_argument("recipe", type=Path)
    _add_allow_pickle(validate)

    verify = sub.add_parser("verify", help="check a merged output folder")
    verify.add_argument("output", type=Path)
    verify.add_argument("--recipe", type=Path, help="recompute tensors from the recipe's inputs")
    verify.add_argument("--full", action="store_true", help="with --recipe: recompute every tensor")
    return parser


def _add_allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="convert pytorch_model*.bin inputs to safetensors (torch.load weights_only=True)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _dispatch(args)
    except ShardmergeError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clean line instead of a traceback
        if args.verbose:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with -v for details)", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from shardmerge.recipe import load_recipe

    if args.command == "verify":
        return _verify(args)
    recipe = load_recipe(args.recipe)
    for warning in recipe.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    from shardmerge import pipeline

    if args.command == "validate":
        prepared = pipeline.prepare(recipe, allow_pickle=args.allow_pickle)
        _print_warnings(prepared.plan.warnings)
        print(
            f"ok: {args.recipe} merges {len(prepared.plan.tasks)} tensors "
            f"({prepared.plan.total_size:,} bytes)"
        )
        return 0
    if args.command == "plan":
        if args.num_processes < 1:
            raise InputError("--num-processes must be at least 1")
        prepared = pipeline.prepare(recipe, allow_pickle=args.allow_pickle)
        print(pipeline.describe_plan(prepared, args.num_processes))
        return 0
    return _run(args, recipe, pipeline)


def _run(args: argparse.Namespace, recipe: Recipe, pipeline: ModuleType) -> int:
    out = args.out or (Path(recipe.output_dir) if recipe.output_dir else None)
    if out is None:
        raise InputError(
            f"{args.recipe}: no output folder: pass --out DIR"
            + ("" if recipe.format == "mergekit" else " or set output.dir in the recipe")
        )
    push = args.push_to_hub or recipe.push_to_hub
    if args.dry_run and not push:
        raise InputError("--dry-run needs --push-to-hub (or hub.push_to in the recipe)")
    from shardmerge import distributed

    if args.random_seed is not None:
        recipe = dataclasses.replace(recipe, random_seed=args.random_seed)
    prepared = pipeline.prepare(recipe, allow_pickle=args.allow_pickle)
    _print_warnings(prepared.plan.warnings)
    options: dict[str, Any] = dict(
        out=out,
        overwrite=args.overwrite,
        device=args.device or recipe.device,
        quiet=args.quiet,
        resume=args.resume,
        stream=args.stream or recipe.stream,
    )
    if distributed.active():
        result = distributed.run_distributed(prepared, **options)
        if result is None:  # not rank 0: rank 0 reports (and pushes)
            return 0
    else:
        result = pipeline.run_merge(prepared, **options)
    print(f"merged {len(result.plan.tasks)} tensors into {result.output_dir}")
    if result.skipped_shards:
        print(f"resumed: {result.skipped_shards} verified shard(s) kept", file=sys.stderr)
    if result.peak_input_bytes_on_disk is not None:
        print(
            f"streamed inputs: at most {result.peak_input_bytes_on_disk:,} input bytes on disk",
            file=sys.stderr,
        )
    if push:
        pushed = pipeline.push_output(
            result.output_dir,
            push,
            private=args.private or recipe.private,
            prepared=prepared,
            dry_run=args.dry_run,
        )
        if pushed.dry_run:
            visibility = "private" if pushed.private else "public"
            print(
                f"would push {len(pushed.files)} files, {pushed.total_bytes:,} bytes "
                f"in one commit to {pushed.url} ({visibility}):"
            )
            for path, size in pushed.files:
                print(f"  {path}  {size:,} bytes")
        else:
            print(f"pushed to {pushed.url} (commit {pushed.commit_sha})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from shardmerge.verify import verify_output

    prepared = None
    if args.recipe is not None:
        from shardmerge import pipeline
        from shardmerge.recipe import load_recipe

        prepared = pipeline.prepare(load_recipe(args.recipe))
    report = verify_output(args.output, prepared=prepared, full=args.full)
    print(report.summary())
    return 0 if report.ok else 1


def _print_warnings(warnings: Sequence[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def entry() -> None:
    """The ``shardmerge`` command: :func:`main`, then exit.

    Once torch is loaded, the exit skips the interpreter's teardown of its modules, which took
    0.45 s here (a sixth of a 1.3 GB merge). The atexit handlers still run first (ours remove
    ``--allow-pickle``'s converted copies), every file of ours is closed by then and every thread
    joined; only the standard streams need flushing.
    """
    code = main()
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if "torch" not in sys.modules or run_exit_handlers is None:
        sys.exit(code)
    run_exit_handlers()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # e.g. a closed pipe: let the normal exit deal with it
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    entry()
