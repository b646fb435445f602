"""Recipe loading and validation: YAML text in, a frozen :class:`Recipe` out.

Two formats are read; a ``merge_method`` key means mergekit's, anything else is ours.

**shardmerge's own format** (every key but ``models`` and ``t`` is optional)::

    models:
      a: meta-llama/Llama-3.2-1B@main    # the t = 0 end: "ref" or "ref@revision"
      b: {path: ./my-finetune}           # the t = 1 end: or {path: ..., revision: ..., name: ...}
    t:
      default: 0.5             # a number, or {gradient: [...]}; for tensors no rule matches
      non_layer: 0.5           # embeddings, final norm, lm_head (they have no layer position)
      rules:                   # tried in order, first match wins
        - match: self_attn                 # a substring of the tensor name (or regex: ...)
          gradient: [0, 0.5, 0.3, 0.7, 1]  # anchors spread evenly from first to last layer
        - regex: 'mlp\\.(gate|up)_proj'     # re.search on the tensor name
          value: 0.3
        - match: mlp
          layers: {0: 0.1, 1: 0.2, "2-5": 0.9}  # "a-b" is inclusive; other layers fall through
    output:
      dir: ./merged            # relative paths start from the recipe file's folder
      name: my-merge           # the model card's title (default: the output folder's name)
      dtype: bfloat16          # default: the first model's dtype
      shard_size: 5GB          # 5GB = 5e9 bytes, 2GiB = 2 * 1024**3 bytes, or a plain int
    device: auto               # auto | cpu | cuda | cuda:N
    tokenizer_from: a          # a | b | union
    hub:
      push_to: me/merged
      private: true            # default false (public), as in huggingface_hub
      stream: false            # download input shards just in time

With this recipe ``model.layers.8.self_attn.q_proj.weight`` of a 32-layer model gets
t = 0.4935 (8/31 of the way along the gradient), ``model.layers.3.mlp.down_proj.weight`` gets
0.9, ``model.layers.9.mlp.down_proj.weight`` falls through to the default 0.5, and
``lm_head.weight`` gets non_layer = 0.5. ``t: 0.5`` alone means 0.5 everywhere.
``non_layer`` is required whenever the default is a gradient or missing, or a rule uses
``gradient`` or ``layers``: mergekit silently gives such tensors a gradient's first anchor.
A ``{path: ...}`` model is taken as written (no ``@`` split), for local paths containing ``@``.

**mergekit configs** with ``merge_method: slerp`` are read unchanged: ``base_model`` is the
t = 0 end; ``models:`` or ``slices:`` (see :mod:`shardmerge.recipe.stack`) name the other
model; ``parameters.t`` (slice-level first) is a number, a gradient list or a list of
``{filter, value}`` conditions; ``dtype``, ``out_dtype``, ``tokenizer_source`` (``base``,
``union`` or a model), the ``tokenizer:`` block (``source``, ``tokens``, ``pad_to_multiple_of``)
and ``chat_template`` are kept (:mod:`shardmerge.vocab`). Features shardmerge does not implement
(methods it lacks, ``modules``, LoRA ``model+lora`` references) are errors rather than silently
ignored, and so is a ``t`` under one model's parameters, which mergekit ignores.

Every problem is collected with its location (``t.rules[1].gradient[2]: ...``) and raised as
one :class:`~shardmerge.errors.RecipeError`.

The package, in reading order (each module imports only the ones above it):

- :mod:`~shardmerge.recipe.model`: the frozen :class:`Recipe` and :class:`ModelRef`;
- :mod:`~shardmerge.recipe.checks`: the problem collector, YAML loading, and the values both
  formats share (sizes, dtypes, devices, Hub ids, method parameter ranges);
- :mod:`~shardmerge.recipe.mergekit_values`: mergekit's per-model values (references,
  ``t`` and parameter lists with filters), shared by ``models:`` and ``slices:``;
- :mod:`~shardmerge.recipe.stack`: layer stacks (mergekit's ``slices:``, our ``layers:``);
- :mod:`~shardmerge.recipe.ours` and :mod:`~shardmerge.recipe.mergekit`: the two formats;
- this module: :func:`load_recipe` and :func:`parse_recipe`, which pick the format.
"""

from __future__ import annotations

import dataclasses
import os

from shardmerge.errors import RecipeError
from shardmerge.recipe.checks import (
    Check,
    describe,
    is_device,
    is_repo_id,
    load_yaml,
    normalize_dtype,
    parse_size,
    repo_id_hint,
)
from shardmerge.recipe.mergekit import parse_mergekit
from shardmerge.recipe.model import DEFAULT_SHARD_SIZE_BYTES, ModelRef, Recipe
from shardmerge.recipe.ours import parse_ours

__all__ = [
    "DEFAULT_SHARD_SIZE_BYTES",
    "ModelRef",
    "Recipe",
    "is_device",
    "is_repo_id",
    "load_recipe",
    "normalize_dtype",
    "parse_recipe",
    "parse_size",
    "repo_id_hint",
]


# --------------------------------------------------------------------------- public helpers


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate the recipe file at ``path``.

    Raises:
        RecipeError: the file cannot be read, or lists every problem in it.
    """
    source = os.fspath(path)
    try:
        # utf-8-sig: editors on Windows may prepend a byte-order mark.
        with open(source, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise RecipeError(["recipe file not found"], source) from None
    except IsADirectoryError:
        raise RecipeError(["is a directory, not a recipe file"], source) from None
    except UnicodeDecodeError as exc:
        raise RecipeError([f"not UTF-8 text ({exc.reason} at byte {exc.start})"], source) from None
    except OSError as exc:
        raise RecipeError([f"cannot read the recipe: {exc.strerror or exc}"], source) from None
    recipe = parse_recipe(text, source)
    if recipe.format == "mergekit":
        return recipe
    return dataclasses.replace(recipe, base_dir=os.path.dirname(os.path.abspath(source)))


def parse_recipe(text: str, source: str = "<string>") -> Recipe:
    """Validate recipe ``text``; ``source`` names it in messages.

    Raises:
        RecipeError: listing every problem found, each with its location.
    """
    data, problems = load_yaml(text, source)
    if data is None:
        raise RecipeError(["the recipe is empty; it needs at least models and t"], source)
    if not isinstance(data, dict):
        raise RecipeError(
            [f"the top level must be a mapping (models:, t:, ...), got {describe(data)}"],
            source,
        )
    check = Check(problems)
    if "merge_method" in data:
        recipe = parse_mergekit(data, check, text, source)
    else:
        recipe = parse_ours(data, check, text, source)
    if check.problems:
        raise RecipeError(check.problems, source)
    return recipe
