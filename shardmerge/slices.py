"""Layer stacks built from slices of models: mergekit's ``slices:`` and our ``layers:``.

A stack is a list of slices; each slice lists its sources (a model and a half-open layer range,
all of one length) and yields that many output layers, numbered on from the previous slice. One
source per slice copies layers (passthrough: depth up-scaling, "frankenmerges"); several are
merged layer by layer (layer ``start + i`` of every source makes output layer ``i``).

Pure: no files, no torch. The planner asks this module which input tensors make each output
tensor and under which name; the pipeline asks it for the output ``config.json``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shardmerge.schedule import LayerPos, Schedule, find_layer

__all__ = [
    "Slice",
    "SliceSource",
    "StackLayer",
    "check_stack",
    "parse_span",
    "renumber",
    "rewrite_config",
    "stack_layers",
]

NUM_LAYERS_KEY = "num_hidden_layers"
# config.json lists with one entry per layer, rebuilt for the new stack from the configs of the
# models each output layer comes from (mergekit 0.1.5 only rewrites num_hidden_layers, which
# leaves e.g. Gemma 3's or Qwen 3's layer_types the old length: transformers then refuses it).
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
# Configs that give their attention layout as a repeating pattern instead of a layer_types list
# (Gemma 3's ``sliding_window_pattern: 6``: every 6th layer attends globally). transformers
# expands the pattern by output position, which a new stack breaks (layer 8 of the source, a
# sliding-window layer, may land at position 11), so the output gets the explicit list.
# Defaults of the architectures whose configs may omit the key (transformers' own).
PATTERN_KEY = "sliding_window_pattern"
_DEFAULT_PATTERNS = {"gemma2": 2, "gemma3": 6, "gemma3_text": 6, "cohere2": 4}


@dataclass(frozen=True)
class SliceSource:
    """Layers ``[start, end)`` of ``recipe.models[model]``."""

    model: int
    start: int
    end: int

    @property
    def num_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Slice:
    """One entry of the stack: its sources in the method's input order and its own parameters.

    ``schedule`` is SLERP's t here (None: the recipe's); ``model_params`` (one per source that
    is not the base) and ``shared_params`` are the other methods' (empty: the recipe's).
    """

    sources: tuple[SliceSource, ...]
    where: str  # how messages name it: "slices[1]" or "layers[1]"
    keys: tuple[str, ...] = ()  # how messages name each source
    schedule: Schedule | None = None
    model_params: tuple[Mapping[str, Schedule], ...] | None = None
    shared_params: Mapping[str, Schedule | bool] | None = None

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers

    @property
    def models(self) -> tuple[int, ...]:
        return tuple(s.model for s in self.sources)


@dataclass(frozen=True)
class StackLayer:
    """Output layer ``index``: layer ``offset`` of slice ``slice_index``, made of
    ``(model, layer)`` for each source of the slice."""

    index: int
    slice_index: int
    offset: int
    inputs: tuple[tuple[int, int], ...]
    slice_depth: int

    @property
    def pos(self) -> LayerPos:
        """Where parameter gradients evaluate: along the slice's own depth, as in mergekit."""
        return LayerPos(stack="", index=self.offset, num_layers=self.slice_depth)


def stack_layers(slices: Sequence[Slice]) -> list[StackLayer]:
    """Every output layer of the stack, in order."""
    layers: list[StackLayer] = []
    for k, piece in enumerate(slices):
        for offset in range(piece.num_layers):
            inputs = tuple((s.model, s.start + offset) for s in piece.sources)
            layers.append(StackLayer(len(layers), k, offset, inputs, piece.num_layers))
    return layers


def check_stack(
    slices: Sequence[Slice], depths: Sequence[int | None], labels: Sequence[str]
) -> list[str]:
    """Every layer range past its model's depth, each naming its key (``depths[m]`` is model
    m's number of layers; None: it has no layer stack)."""
    problems: list[str] = []
    for piece in slices:
        for i, src in enumerate(piece.sources):
            key = piece.keys[i] if i < len(piece.keys) else f"{piece.where}.sources[{i}]"
            depth = depths[src.model]
            if depth is None:
                problems.append(f"{key}: {labels[src.model]} has no layer stack to slice")
            elif src.end > depth:
                problems.append(
                    f"{key}: layer range [{src.start}, {src.end}] is out of range: "
                    f"{labels[src.model]} has {depth} layers (0 to {depth - 1})"
                )
    return problems


_SPAN_RE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def parse_span(value: Any) -> tuple[int, int] | str:
    """Our format's inclusive ``"a-b"`` (or one layer ``a``) as half-open ``(a, b + 1)``; a
    message when it is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value + 1) if value >= 0 else f"{value} is negative"
    if not isinstance(value, str):
        return f'expected an inclusive layer range such as "0-23", got {type(value).__name__}'
    match = _SPAN_RE.fullmatch(value)
    if match is None:
        return f'expected an inclusive layer range such as "0-23", got {value!r}'
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first:
        return f"{value!r} runs backwards; write the lower layer first"
    return first, last + 1


def renumber(name: str, index: int) -> str:
    """``name`` with its (outermost) layer index replaced by ``index``."""
    found = find_layer(name)
    assert found is not None, name
    stack, _ = found
    rest = name[len(stack) + 1 :]
    return f"{stack}.{index}{rest[rest.index('.') :] if '.' in rest else ''}"


def rewrite_config(
    config: Mapping[str, Any], slices: Sequence[Slice], configs: Sequence[Mapping[str, Any] | None]
) -> dict[str, Any]:
    """The output's config.json: ``config`` (the base's or first model's) with the new depth,
    and its per-layer lists rebuilt from the config of each output layer's first source
    (``layer_types`` also where the configs give only a ``sliding_window_pattern``)."""
    out = dict(config)
    layers = stack_layers(slices)
    out[NUM_LAYERS_KEY] = len(layers)
    # A pattern-only config (Gemma 3) gets its layer_types written out, per source model.
    expanded = [_with_layer_types(c) for c in configs]
    own = _with_layer_types(config) or config
    for key in PER_LAYER_KEYS:
        if not isinstance(own.get(key), list):
            continue
        values: list[Any] = []
        for layer in layers:
            model, source_layer = layer.inputs[0]
            entries = (expanded[model] or {}).get(key)
            if not isinstance(entries, list) or source_layer >= len(entries):
                break
            values.append(entries[source_layer])
        if len(values) == len(layers):
            out[key] = values
        else:
            # A source without the list (or a shorter one): nothing sound to rebuild from.
            del out[key]
    return out


def stack_table(layers: Sequence[StackLayer], labels: Sequence[str], values: Sequence[str]) -> str:
    """A markdown table: output layer, where it comes from, and its parameters."""
    lines = ["| layer | from | parameters |", "| --- | --- | --- |"]
    for layer, shown in zip(layers, values, strict=True):
        sources = " + ".join(f"{labels[m]} layer {i}" for m, i in layer.inputs)
        lines.append(f"| {layer.index} | {sources} | {shown} |")
    return "\n".join(lines) + "\n"


def _with_layer_types(config: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """``config`` with its attention pattern written out as ``layer_types`` (every n-th layer
    full attention, the others sliding-window, transformers' rule) when it gives only the
    pattern, or nothing where its architecture has a default one."""
    if config is None or isinstance(config.get("layer_types"), list):
        return config
    if "sliding_window" in config and config["sliding_window"] is None:
        return config  # no sliding-window attention at all
    depth = config.get(NUM_LAYERS_KEY)
    pattern = config.get(PATTERN_KEY, _DEFAULT_PATTERNS.get(str(config.get("model_type"))))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (depth, pattern)):
        return config
    assert isinstance(depth, int) and isinstance(pattern, int)
    if depth < 0 or pattern < 1:
        return config
    types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
             for i in range(depth)]  # fmt: skip
    return {**config, "layer_types": types}
