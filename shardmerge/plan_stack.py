"""Plan a merge that builds a new layer stack from slices (see :mod:`shardmerge.slices`).

Pure, like :mod:`shardmerge.plan`, whose helpers it uses; :func:`plan_recipe` is the entry for
every recipe (a stack here, whole models by :func:`shardmerge.plan.plan_merge`). Output tensors
are, in order, as mergekit lays them out: the tensors before the stack (embeddings) from the
first slice's sources, every output layer from its slice's sources (renumbered), the tensors
after the stack (final norm, lm_head) from the last slice's sources. Each slice's parameters
are resolved along its own depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from shardmerge.errors import CheckpointError
from shardmerge.inventory import ModelInventory, TensorInfo
from shardmerge.matching import EMBED_SUFFIXES, cap_problems, tensor_sources, ties_embeddings
from shardmerge.methods import get_method
from shardmerge.plan import (
    MergePlan,
    TensorTask,
    input_dtype,
    layout_shards,
    output_dtype,
    plan_merge,
    resolve_params,
)
from shardmerge.recipe import Recipe
from shardmerge.schedule import LayerPos, ScheduleError, find_layer, layer_positions, resolve_t
from shardmerge.slices import (
    PER_LAYER_KEYS,
    Slice,
    StackLayer,
    check_stack,
    renumber,
    rewrite_config,
    stack_layers,
    stack_table,
)
from shardmerge.vocab import VocabPlan


def _is_before_stack(name: str) -> bool:
    """Embeddings come before the layers; every other non-layer tensor (final norm, lm_head)
    after them, as in mergekit's architecture definitions."""
    return name.endswith(EMBED_SUFFIXES) or "embed" in name.rsplit(".", 2)[0]


def is_whole_models(recipe: Recipe, models: Sequence[ModelInventory]) -> bool:
    """Whether the stack is every model's whole stack, layer for layer (a mergekit config that
    writes ``models:`` as one slice): then the plain merge plan is the same merge."""
    if len(recipe.slices) != 1:
        return False
    piece = recipe.slices[0]
    if piece.models != tuple(range(len(models))):
        return False
    for src, model in zip(piece.sources, models, strict=True):
        depths = {pos.num_layers for pos in layer_positions(model.tensors).values()}
        if src.start != 0 or depths != {src.end}:
            return False
    return True


def as_whole_models(recipe: Recipe) -> Recipe:
    """A one-slice recipe of whole models as a plain one, the slice's parameters its own."""
    piece = recipe.slices[0]
    if recipe.method == "slerp":
        return dataclasses.replace(recipe, schedule=piece.schedule or recipe.schedule, slices=())
    return dataclasses.replace(_slice_view(recipe, piece), slices=())


def plan_recipe(
    recipe: Recipe,
    *models: ModelInventory,
    shard_size_bytes: int | None = None,
    vocab: VocabPlan | None = None,
) -> MergePlan:
    """The plan of any recipe, ``models`` in ``recipe.models`` order: a new layer stack when
    its slices build one, else :func:`~shardmerge.plan.plan_merge` (a single slice of every
    model's whole stack is the plain merge).

    Raises:
        CheckpointError: listing every problem at once.
    """
    if recipe.slices:
        if not is_whole_models(recipe, models):
            limit = shard_size_bytes if shard_size_bytes is not None else recipe.shard_size_bytes
            return plan_stack(recipe, models, limit)
        recipe = as_whole_models(recipe)
    return plan_merge(recipe, *models, shard_size_bytes=shard_size_bytes, vocab=vocab)


def plan_stack(
    recipe: Recipe, models: Sequence[ModelInventory], shard_size_bytes: int
) -> MergePlan:
    """The plan of a sliced recipe; ``models`` in ``recipe.models`` order.

    Raises:
        CheckpointError: every problem (a range past a model's depth, a missing tensor, a shape
        mismatch, a parameter without a value) at once.
    """
    warnings: list[str] = []
    # The output's config and tie_word_embeddings are the first model's (the base, else the
    # first source named), as mergekit takes its config from the base model.
    tied = ties_embeddings(models[0])
    sources = [tensor_sources(model, tied, warnings) for model in models]
    labels = [m.label for m in models]
    problems: list[str] = []

    layer_names: list[dict[int, list[str]]] = []
    stacks: list[str | None] = []
    for m, tensors in enumerate(sources):
        by_stack: dict[str, dict[int, list[str]]] = {}
        for name in tensors:
            found = find_layer(name)
            if found is not None:
                by_stack.setdefault(found[0], {}).setdefault(found[1], []).append(name)
        if len(by_stack) > 1:
            names = ", ".join(sorted(by_stack))
            problems.append(
                f"{labels[m]} has several layer stacks ({names}); slices apply to a model with one"
            )
        stack = max(by_stack, key=lambda s: len(by_stack[s]), default=None)
        stacks.append(stack)
        layer_names.append(by_stack.get(stack, {}) if stack is not None else {})
    depths = [max(names) + 1 if names else None for names in layer_names]
    problems += check_stack(recipe.slices, depths, labels)
    if problems:
        raise CheckpointError(cap_problems(problems))

    spec = None if recipe.method == "slerp" else get_method(recipe.method)
    tasks: list[TensorTask] = []

    def add(out_name: str, piece: Slice, inputs: list[tuple[int, str]], pos: LayerPos | None):
        infos: list[TensorInfo] = []
        for model, name in inputs:
            info = sources[model].get(name)
            if info is None:
                problems.append(f"{piece.where}: tensor {name!r} is not in {labels[model]}")
                return
            infos.append(info)
        first = infos[0]
        for (model, name), info in zip(inputs[1:], infos[1:], strict=True):
            if info.shape != first.shape:
                problems.append(
                    f"{piece.where}: tensor {name!r} of {labels[model]} has shape "
                    f"{list(info.shape)}, but {inputs[0][1]!r} of {labels[inputs[0][0]]} has "
                    f"{list(first.shape)}"
                )
                return
            if info.is_float != first.is_float:
                problems.append(
                    f"{piece.where}: tensor {name!r} is {info.dtype} in {labels[model]} but "
                    f"{inputs[0][1]!r} is {first.dtype} (cannot merge a float tensor with an "
                    "integer one)"
                )
                return
        t = 0.0
        model_params: tuple[dict[str, float], ...] = ()
        shared: dict[str, float | bool] = {}
        try:
            if spec is None:
                t = resolve_t(piece.schedule or recipe.schedule, out_name, pos)
            else:
                model_params, shared = resolve_params(
                    _slice_view(recipe, piece), spec, out_name, pos
                )
        except ScheduleError as exc:
            problems.append(str(exc))
            return
        tasks.append(
            TensorTask(
                name=out_name,
                t=t,
                inputs=tuple(infos),
                out_dtype=output_dtype(recipe, first),
                shape=first.shape,
                out_begin=0,
                layer=pos,
                input_dtype=input_dtype(recipe, first),
                model_params=model_params,
                shared=shared,
                models=tuple(model for model, _ in inputs),
            )
        )

    first_slice, last_slice = recipe.slices[0], recipe.slices[-1]
    outside = [n for n in sources[first_slice.sources[0].model] if find_layer(n) is None]
    for name in outside:
        if _is_before_stack(name):
            add(name, first_slice, [(m, name) for m in first_slice.models], None)
    layers = stack_layers(recipe.slices)
    stack = stacks[first_slice.sources[0].model] or ""
    for layer in layers:
        piece = recipe.slices[layer.slice_index]
        model0, layer0 = layer.inputs[0]
        pos = LayerPos(stack, layer.pos.index, layer.pos.num_layers)
        for name in layer_names[model0].get(layer0, []):
            inputs = [(m, renumber(name, i)) for m, i in layer.inputs]
            add(renumber(name, layer.index), piece, inputs, pos)
    for name in outside:
        if not _is_before_stack(name):
            add(name, last_slice, [(m, name) for m in last_slice.models], None)
    if problems:
        raise CheckpointError(cap_problems(list(dict.fromkeys(problems))))
    configs = [m.config for m in models]
    if models[0].config is not None:
        rewritten = rewrite_config(models[0].config, recipe.slices, configs)
        for key in PER_LAYER_KEYS:
            if key in models[0].config and key not in rewritten:
                warnings.append(
                    f"config.json: {key} is left out: a model the stack takes layers from has "
                    "no such list for them"
                )
    return MergePlan(
        shards=layout_shards(tasks, shard_size_bytes),
        tied_embeddings=tied,
        warnings=tuple(warnings),
        # "model A (./path)" -> "model A": the plan lists the models above the table.
        t_table=_table(recipe, layers, tasks, [label.split(" (", 1)[0] for label in labels]),
        method=recipe.method,
        random_seed=recipe.random_seed or 0,
        restacked=True,
    )


def _slice_view(recipe: Recipe, piece: Slice) -> Recipe:
    """The recipe as one slice sees it: its sources as the models, its parameters."""
    return dataclasses.replace(
        recipe,
        models=tuple(recipe.models[m] for m in piece.models),
        model_keys=piece.keys,
        model_params=tuple(piece.model_params or ()),
        shared_params=dict(piece.shared_params or {}),
    )


def _table(
    recipe: Recipe, layers: Sequence[StackLayer], tasks: Sequence[TensorTask], labels: Sequence[str]
) -> str:
    """The new stack, one row per output layer: where it comes from and its parameters (values
    that differ between the layer's tensors joined with "/")."""
    shown: dict[int, dict[str, dict[str, None]]] = {}
    for task in tasks:
        if task.layer is None:
            continue
        found = find_layer(task.name)
        assert found is not None
        cells = shown.setdefault(found[1], {})
        for label, value in _values(recipe, task, labels):
            cells.setdefault(label, {})[f"{value:.4g}"] = None
    values = [
        ", ".join(f"{label} {'/'.join(seen)}" for label, seen in shown.get(layer.index, {}).items())
        or "copy"  # passthrough without a scale
        for layer in layers
    ]
    return stack_table(layers, labels, values)


def _values(recipe: Recipe, task: TensorTask, labels: Sequence[str]) -> list[tuple[str, float]]:
    if recipe.method == "slerp":
        return [("t", task.t)]
    out: list[tuple[str, float]] = []
    skip = len(task.models) - len(task.model_params)
    for model, params in zip(task.models[skip:], task.model_params, strict=True):
        for name, value in params.items():
            if recipe.method == "passthrough" and value == 1.0:
                continue  # scale 1: a copy
            out.append((f"{name} of {labels[model]}", value))
    for name, value in task.shared.items():
        if not isinstance(value, bool):
            out.append((name, value))
    return out
