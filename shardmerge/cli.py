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
import traceback
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
        description="Streaming, bounded-memory merges of sharded safetensors checkpoints "
        "(mergekit's methods: SLERP, linear, task arithmetic, TIES, DARE, breadcrumbs, DELLA, "
        "Model Stock, NuSLERP, Multi-SLERP, Karcher, NearSwap, SCE, Arcee Fusion, RAM; layer "
        "stacks).",
    )
    parser.add_argument("--version", action="version", version=f"shardmerge {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show tracebacks for errors (same exit codes)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="merge the models of a recipe")
    run.add_argument("recipe", type=Path, help="recipe YAML (shardmerge or mergekit format)")
    _add_run_options(run)
    _add_allow_pickle(run)

    plan = sub.add_parser("plan", help="show the t table and output layout (headers only)")
    plan.add_argument("recipe", type=Path)
    _add_allow_pickle(plan)
    plan.add_argument(
        "--num-processes", type=int, default=1, help="also show the split across N processes"
    )
    plan.add_argument(
        "--similarity",
        action="store_true",
        help="also read every tensor (like compare) and hint where the schedule and the "
        "models' similarity suggest a problem",
    )
    plan.add_argument(
        "--out", type=Path, help="where the output would go (its disk, for the time estimate)"
    )
    plan.add_argument(
        "--measure-disk",
        action="store_true",
        help="measure the disks' read and write rates first (a few seconds; cached per device)",
    )

    validate = sub.add_parser(
        "validate", help="check a recipe, its models (headers only) and run's options"
    )
    validate.add_argument("recipe", type=Path)
    _add_run_options(validate)
    _add_allow_pickle(validate)

    compare = sub.add_parser(
        "compare", help="per-layer similarity of two models (and of their task vectors)"
    )
    compare.add_argument("model_a", metavar="A", help="Hub id[@revision] or local folder")
    compare.add_argument("model_b", metavar="B", help="Hub id[@revision] or local folder")
    compare.add_argument("--base", help="common base model: also compare the task vectors")
    compare.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    compare.add_argument("--json", action="store_true", help="print JSON (per tensor too)")
    compare.add_argument(
        "--plot", type=Path, metavar="FILE", help="write a picture (.png/.svg/.pdf)"
    )
    compare.add_argument(
        "--stream",
        action="store_true",
        help="Hub inputs: download each shard just before use and delete it after",
    )

    evaluate = sub.add_parser(
        "eval", help="perplexity and KL of a merged model vs its parents (transformers extra)"
    )
    evaluate.add_argument("output", type=Path, help="the merged model's folder")
    evaluate.add_argument(
        "--against", nargs=2, type=Path, required=True, metavar=("A", "B"), help="parent folders"
    )
    evaluate.add_argument(
        "--text", type=Path, metavar="FILE", help="UTF-8 text file (default: a built-in sample)"
    )
    evaluate.add_argument(
        "--max-tokens", type=int, default=1024, metavar="N", help="tokens scored (default 1024)"
    )
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    evaluate.add_argument(
        "--update-card",
        action="store_true",
        help="add the table to OUTPUT's README.md (a later run replaces it)",
    )

    verify = sub.add_parser("verify", help="check a merged output folder")
    verify.add_argument("output", type=Path)
    verify.add_argument("--recipe", type=Path, help="recompute tensors from the recipe's inputs")
    verify.add_argument("--full", action="store_true", help="with --recipe: recompute every tensor")
    verify.add_argument(
        "--fast", action="store_true", help="skip the shard digests (headers and NaN/Inf only)"
    )
    return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """``run``'s options; ``validate`` takes them too and makes the same checks."""
    parser.add_argument("--out", type=Path, help="output folder (required for mergekit configs)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides the recipe)")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (nor huggingface_hub's own output)"
    )
    parser.add_argument(
        "--name", help="the model card's title (overrides output.name; default: --out's name)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier shardmerge output folder"
    )
    parser.add_argument(
        "--no-card-image",
        action="store_true",
        help="no picture in the model card (matplotlib's import and drawing: about half a "
        "second of CPU; the card keeps its table)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the verified shards of an interrupted run (a finished output: nothing to do)",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="Hub inputs: download the input shards ahead of the merge, each deleted after use",
    )
    parser.add_argument(
        "--stream-budget",
        type=_byte_size,
        metavar="SIZE",
        help="with --stream: the most input bytes on disk at once, e.g. 20GB (default: three "
        "times what the shards read together need)",
    )
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the result to this repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --push-to-hub: check the target, merge, then say what the push would do",
    )
    parser.add_argument(
        "--revision", metavar="BRANCH", help="with --push-to-hub: push to this branch (made if new)"
    )
    parser.add_argument(
        "--create-pr", action="store_true", help="with --push-to-hub: open a pull request instead"
    )
    parser.add_argument("--commit-message", help="with --push-to-hub: the commit's title")
    parser.add_argument(
        "--random-seed",
        type=int,
        metavar="N",
        help="seed of random masks (DARE, DELLA); overrides the recipe's; default 0",
    )


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def _byte_size(text: str) -> int:
    """A size such as ``20GB``, ``1.5GiB``, ``800MB`` or ``123456`` (bytes), for argparse."""
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number) :].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a size such as 20GB, 1.5GiB or 800MB"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size above 0")
    return int(value)


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
    except BrokenPipeError:  # stdout closed early (`| head`): the reader wants no more
        _silence_stdout()
        return 1
    except ShardmergeError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code  # -v shows more, never changes the exit code
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clean line instead of a traceback
        if args.verbose:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc} (run with -v for details)", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null: flushing what is buffered for a closed pipe would fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    with_fd = getattr(sys.stdout, "fileno", None)
    try:
        os.dup2(devnull, with_fd() if with_fd else 1)
    except (OSError, ValueError):  # a stdout without a descriptor (captured): nothing to do
        pass
    finally:
        os.close(devnull)


def _dispatch(args: argparse.Namespace) -> int:
    from shardmerge.recipe import load_recipe

    if args.command == "verify":
        return _verify(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "eval":
        return _eval(args)
    recipe = load_recipe(args.recipe)
    for warning in recipe.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    from shardmerge import pipeline

    if args.command == "plan":
        if args.num_processes < 1:
            raise InputError("--num-processes must be at least 1")
        prepared = pipeline.prepare(recipe, allow_pickle=args.allow_pickle)
        out = args.out
        if out is None and recipe.output_dir:
            out = Path(os.path.normpath(Path(recipe.base_dir) / recipe.output_dir))
        print(
            pipeline.describe_plan(
                prepared, args.num_processes, out=out, measure_disk=args.measure_disk
            )
        )
        if args.similarity:
            _similarity_hints(prepared)
        return 0
    # Every option is checked before a header is fetched or anything is written.
    out, device, push = _checked_options(args, recipe)
    if args.name is not None:
        recipe = dataclasses.replace(recipe, name=args.name)
    if getattr(args, "no_card_image", False):
        recipe = dataclasses.replace(recipe, card_image=False)
    if args.random_seed is not None:
        recipe = dataclasses.replace(recipe, random_seed=args.random_seed)
    if args.command == "validate":
        return _validate(args, recipe, pipeline, out, device, push)
    return _run(args, recipe, pipeline, out, device, push)


def _checked_options(
    args: argparse.Namespace, recipe: Recipe
) -> tuple[Path | None, str, str | None]:
    """(output folder, device, push target) from the flags and the recipe, each checked."""
    from shardmerge.recipe import is_device, is_repo_id, repo_id_hint

    problems = []
    # output.dir, like the models' paths, is relative to the recipe's folder (base_dir).
    out = args.out
    if out is None and recipe.output_dir:
        out = Path(os.path.normpath(Path(recipe.base_dir) / recipe.output_dir))
    if out is None and args.command == "run":
        problems.append(
            f"{args.recipe}: no output folder: pass --out DIR"
            + ("" if recipe.format == "mergekit" else " or set output.dir in the recipe")
        )
    device = args.device or recipe.device
    if args.device is not None and not is_device(args.device):
        problems.append(
            f"--device {args.device!r}: expected auto, cpu, cuda or cuda:N (shardmerge merges "
            "on the CPU or a CUDA GPU)"
        )
    if args.push_to_hub is not None and not is_repo_id(args.push_to_hub):
        hint = repo_id_hint(args.push_to_hub) or "expected org/name"
        problems.append(f"--push-to-hub {args.push_to_hub!r}: not a Hugging Face repo id ({hint})")
    push = args.push_to_hub or recipe.push_to_hub
    if args.stream_budget is not None and not (args.stream or recipe.stream):
        problems.append("--stream-budget needs --stream (or hub.stream in the recipe)")
    for flag in ("dry_run", "private", "revision", "create_pr", "commit_message"):
        if getattr(args, flag) and not push:
            name = "--" + flag.replace("_", "-")
            problems.append(f"{name} needs --push-to-hub (or hub.push_to in the recipe)")
    if problems:
        raise InputError("; ".join(problems))
    return out, device, push


def _validate(
    args: argparse.Namespace,
    recipe: Recipe,
    pipeline: ModuleType,
    out: Path | None,
    device: str,
    push: str | None,
) -> int:
    if push:
        _check_push(args, recipe, pipeline, push)
    prepared = pipeline.prepare(recipe, allow_pickle=args.allow_pickle)
    _print_warnings(prepared.plan.warnings)
    pipeline.check_stream_budget(prepared, args.stream_budget)
    for line in prepared.vocab.report if prepared.vocab is not None else ():
        print(line)
    if out is None:
        pipeline.check_device(device)
        where = "(no output folder given: pass --out to check it too)"
    else:
        state = pipeline.check_run(
            prepared, out, overwrite=args.overwrite, resume=args.resume, device=device
        )
        where = {
            "new": f"into {out}",
            "resume": f"into {out}, resuming",
            "complete": f"into {out}, already complete",
        }[state]
    print(
        f"ok: {args.recipe} merges {len(prepared.plan.tasks)} tensors "
        f"({prepared.plan.total_size:,} bytes) {where}"
    )
    return 0


def _run(
    args: argparse.Namespace,
    recipe: Recipe,
    pipeline: ModuleType,
    out: Path | None,
    device: str,
    push: str | None,
) -> int:
    from shardmerge import distributed

    hub_used = push or not all(Path(m.ref).is_dir() for m in recipe.models)
    if args.quiet and hub_used:
        from shardmerge import hub

        hub.quiet_client()
    if push:
        # Before any download or merge: a refused push must not cost the merge first. Every
        # rank checks, so that all of them stop alike rather than wait for rank 0.
        _check_push(args, recipe, pipeline, push, report=distributed.is_main_process())
    prepared = pipeline.prepare(recipe, allow_pickle=args.allow_pickle)
    _print_warnings(prepared.plan.warnings)
    assert out is not None  # _checked_options requires it for run
    pipeline.check_device(device)  # on every rank, before any of them writes
    pipeline.check_stream_budget(prepared, args.stream_budget)
    options: dict[str, Any] = dict(
        out=out,
        overwrite=args.overwrite,
        device=device,
        quiet=args.quiet,
        resume=args.resume,
        stream=args.stream or recipe.stream,
        stream_budget=args.stream_budget,
    )
    if distributed.active():
        result = distributed.run_distributed(prepared, **options)
        if result is None:  # not rank 0: rank 0 reports (and pushes)
            return 0
    else:
        result = pipeline.run_merge(prepared, **options)
    if result.already_complete:
        print(f"{result.output_dir} is already complete (same recipe and inputs): nothing to do")
    else:
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
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
        )
        branch = f" (branch {pushed.revision})" if pushed.revision else ""
        if pushed.dry_run:
            visibility = "private" if pushed.private else "public"
            target = (
                f"a new {visibility} repo {pushed.url}"
                if pushed.created
                else f"{pushed.url} ({visibility})"
            )
            how = "as a pull request" if args.create_pr else "in one commit"
            print(
                f"would push {len(pushed.files)} files, {pushed.total_bytes:,} bytes "
                f"{how} to {target}{branch}:"
            )
            for path, size in pushed.files:
                print(f"  {path}  {size:,} bytes")
            for path in pushed.deleted:
                print(f"  {path}  deleted (replaced by this merge)")
        elif pushed.pr_url:
            print(f"opened {pushed.pr_url} on {pushed.url} (commit {pushed.commit_sha})")
        else:
            print(f"pushed to {pushed.url}{branch} (commit {pushed.commit_sha})")
        if pushed.deleted and not pushed.dry_run:
            print(
                f"removed {len(pushed.deleted)} file(s) of the model it replaced", file=sys.stderr
            )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from shardmerge.verify import verify_output

    prepared = None
    if args.recipe is not None:
        from shardmerge import pipeline
        from shardmerge.recipe import load_recipe

        recipe = pipeline.pin_recorded_revisions(load_recipe(args.recipe), args.output)
        prepared = pipeline.prepare(recipe)
    report = verify_output(args.output, prepared=prepared, full=args.full, fast=args.fast)
    print(report.summary())
    return 0 if report.ok else 1


def _check_push(
    args: argparse.Namespace, recipe: Recipe, pipeline: ModuleType, push: str, report: bool = True
) -> None:
    """Everything a push needs, checked before any download or merge (pipeline.check_push_target:
    repo id, not an input, online, token and its rights, visibility)."""
    target = pipeline.check_push_target(
        recipe,
        push,
        private=args.private or recipe.private,
        revision=args.revision,
        create_pr=args.create_pr,
    )
    if report:
        state = "existing" if target.exists else "new"
        visibility = "private" if target.private else "public"
        print(
            f"push target {target.url}: {state} {visibility} repo, writable by {target.user}",
            file=sys.stderr,
        )


def _compare(args: argparse.Namespace) -> int:
    import json

    from shardmerge.compare import compare_models

    if args.plot is not None:  # before any work: a missing extra or folder is reported at once
        from shardmerge.plot import check_plot_path, require_matplotlib

        require_matplotlib()
        check_plot_path(args.plot)
    refs = [args.model_a, args.model_b] + ([args.base] if args.base else [])
    comparison, warnings = compare_models(refs, device=args.device, stream=args.stream)
    _print_warnings(warnings)
    from shardmerge import similarity

    if args.json:
        print(json.dumps(similarity.to_json(comparison), indent=2))
    else:
        print(similarity.render_table(comparison))
    if args.plot is not None:
        from shardmerge.plot import write_plot

        write_plot(comparison, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _similarity_hints(prepared: Any) -> None:
    """plan --similarity: compare the models (every tensor read) and print the hints."""
    from shardmerge import mergestats
    from shardmerge.compare import compare_models

    def ref(model: Any) -> str:
        return str(model.local_dir) if model.local_dir else f"{model.hub_id}@{model.pin}"

    plan = prepared.plan
    models = prepared.models
    if plan.method == "slerp":
        comparison, _ = compare_models([ref(models[0]), ref(models[1])])
        cosines = {t.name: t.sums.cosine for t in comparison.tensors if t.sums.cosine is not None}
        tasks = [(t.name, t.t, t.layer.index if t.layer else None) for t in plan.tasks]
        hints = mergestats.slerp_hints(tasks, cosines)
        what = "cos(A, B) of every tensor"
    else:
        first = prepared.recipe.first_merged
        if first == 0 or len(models) - first < 2:
            raise InputError(
                "plan --similarity: needs SLERP, or a base and at least two merged models"
            )
        refs = [ref(models[first]), ref(models[first + 1]), ref(models[0])]
        comparison, _ = compare_models(refs)
        layers = [(str(ly.index), ly.total.task_cosine) for ly in comparison.layers]
        hints = mergestats.conflict_hints(plan.method, layers)
        what = "the cosine of the first two task vectors, per layer"
    print(f"\nsimilarity ({what}, every tensor read):")
    for hint in hints:
        print(f"  hint: {hint}")
    if not hints:
        print("  no hint: the schedule and the models' similarity raise no flag")


def _eval(args: argparse.Namespace) -> int:
    from shardmerge.evaluate import check_card, evaluate_merge, update_card

    card = check_card(args.output) if args.update_card else None
    report = evaluate_merge(
        args.output,
        tuple(args.against),
        text_path=args.text,
        max_tokens=args.max_tokens,
        device=args.device,
    )
    print(report.summary())
    if card is not None:
        update_card(card, report)
        print(f"added the table to {card}", file=sys.stderr)
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
