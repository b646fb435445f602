"""``shardmerge.merge``: run a recipe from Python (a notebook), with the CLI's pipeline."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def merge(
    recipe: str | os.PathLike[str] | Mapping[str, Any],
    *,
    out: str | os.PathLike[str] | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    device: str | None = None,
    random_seed: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
    card_image: bool = True,
) -> Path:
    """Run a recipe given as a dict, as YAML text, or as a path to a YAML file.

    Either format (ours, or a mergekit config) and every method the CLI runs; the output folder
    is ``out`` or the recipe's ``output.dir``. Returns the output folder.

    Raises:
        shardmerge.errors.ShardmergeError: bad recipe or inputs (``InputError``), or a failure.
    """
    import yaml

    from shardmerge import pipeline
    from shardmerge.errors import InputError
    from shardmerge.recipe import load_recipe, parse_recipe

    if isinstance(recipe, Mapping):
        parsed = parse_recipe(yaml.safe_dump(dict(recipe), sort_keys=False), "<dict>")
    elif isinstance(recipe, str) and "\n" in recipe:
        parsed = parse_recipe(recipe, "<string>")
    else:
        parsed = load_recipe(recipe)
    if random_seed is not None:
        parsed = dataclasses.replace(parsed, random_seed=random_seed)
    if not card_image:  # no merge.png beside the card (see run --no-card-image)
        parsed = dataclasses.replace(parsed, card_image=False)
    target = out if out is not None else parsed.output_dir
    if target is None:
        raise InputError("no output folder: pass out=... or set output.dir in the recipe")
    prepared = pipeline.prepare(parsed)
    result = pipeline.run_merge(
        prepared,
        out=Path(target),
        overwrite=overwrite,
        device=device or parsed.device,
        quiet=quiet,
        resume=resume,
        stream=parsed.stream,
    )
    repo = push_to_hub or parsed.push_to_hub
    if repo:
        pipeline.push_output(
            result.output_dir, repo, private=private or parsed.private, prepared=prepared
        )
    return result.output_dir
