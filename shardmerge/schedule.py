"""The t schedule: which interpolation factor each tensor gets (0 = first model, 1 = second).

Pure logic over tensor names: no torch, no files. A :class:`Schedule` is an ordered list of
:class:`Rule` s (first match wins) plus a fallback. A rule's value is a scalar, a
:class:`Gradient` (anchors spread evenly from the first to the last layer of a stack, exactly as
mergekit interpolates them) or a :class:`LayerMap` (explicit t per layer index).

Layer stacks are found from names alone, so any architecture works: a stack is the dotted
prefix ending in ``layers``, ``h``, ``layer``, ``blocks`` or ``block`` that is followed by
``.<int>.``. When stacks nest (T5's ``encoder.block.3.layer.1...``) the first, outermost one
counts, because that is the one whose depth a gradient is meant to span.

Tensors outside every stack (embeddings, final norm, ``lm_head``) have no layer position.
mergekit evaluates their value at position 0, so a gradient silently gives them its first
anchor; ``style="mergekit"`` reproduces that, ``style="shardmerge"`` gives them the explicit
``Schedule.non_layer`` unless a scalar rule matches them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Gradient",
    "LayerMap",
    "LayerPos",
    "MODULE_TYPES",
    "Rule",
    "Schedule",
    "ScheduleError",
    "TValue",
    "find_layer",
    "idle_rules",
    "layer_positions",
    "module_type",
    "resolve_t",
    "t_table",
]

STACK_WORDS = ("layers", "h", "layer", "blocks", "block")
# Leftmost match = outermost stack; the leading (^|\.) keeps "sublayers.3." from matching.
_LAYER_RE = re.compile(r"(?:^|\.)(?:" + "|".join(STACK_WORDS) + r")\.([0-9]+)\.")


class ScheduleError(ValueError):
    """A tensor for which the schedule gives no t."""


@dataclass(frozen=True)
class Gradient:
    """Anchors spread evenly from the first to the last layer of a stack, linearly interpolated."""

    anchors: tuple[float, ...]


@dataclass(frozen=True)
class LayerMap:
    """Explicit t per layer index; tensors in layers not listed do not match the rule."""

    values: tuple[tuple[int, float], ...]  # sorted by layer index

    def get(self, index: int) -> float | None:
        """The t for layer ``index``, or None when it is not listed."""
        for layer, t in self.values:
            if layer == index:
                return t
        return None


TValue = float | Gradient | LayerMap


@dataclass(frozen=True)
class Rule:
    """Tensors whose name matches ``pattern`` get ``value``."""

    pattern: str
    kind: Literal["substring", "regex"]  # regex uses re.search
    value: TValue
    label: str  # column title in the t table, e.g. "self_attn" or "re:mlp\\.(gate|up)"
    where: str = field(default="", compare=False)  # its place in the recipe, e.g. "t.rules[1]"

    def matches(self, name: str) -> bool:
        """Whether the pattern matches ``name`` (the layer check of a LayerMap is separate)."""
        if self.kind == "regex":
            return re.search(self.pattern, name) is not None
        return self.pattern in name


@dataclass(frozen=True)
class Schedule:
    """Ordered rules (first match wins) and the fallbacks."""

    rules: tuple[Rule, ...]
    default: TValue | None  # when no rule matches; None => ScheduleError
    non_layer: float | None  # tensors outside any stack ("shardmerge" style only)
    style: Literal["mergekit", "shardmerge"]


@dataclass(frozen=True)
class LayerPos:
    """Where a tensor sits: layer ``index`` of the ``num_layers``-deep ``stack``."""

    stack: str  # e.g. "model.layers" or "vision_tower.encoder.layers"
    index: int
    num_layers: int


def find_layer(name: str) -> tuple[str, int] | None:
    """The (stack, layer index) of a tensor name, or None outside every stack.

    ``"model.layers.7.self_attn.q_proj.weight"`` -> ``("model.layers", 7)``. Nested stacks
    resolve to the outermost one.
    """
    match = _LAYER_RE.search(name)
    if match is None:
        return None
    return name[: match.start(1) - 1], int(match.group(1))


def layer_positions(names: Iterable[str]) -> dict[str, LayerPos]:
    """LayerPos for every name inside a stack; each stack's depth is its highest index + 1."""
    found: dict[str, tuple[str, int]] = {}
    depth: dict[str, int] = {}
    for name in names:
        layer = find_layer(name)
        if layer is None:
            continue
        stack, index = layer
        found[name] = layer
        depth[stack] = max(depth.get(stack, 0), index + 1)
    return {
        name: LayerPos(stack=stack, index=index, num_layers=depth[stack])
        for name, (stack, index) in found.items()
    }


def resolve_t(schedule: Schedule, name: str, pos: LayerPos | None) -> float:
    """The t for tensor ``name`` at layer position ``pos`` (None outside every stack).

    Raises:
        ScheduleError: no rule matches and there is no usable fallback.
    """
    return _resolve(schedule, name, pos)[0]


def _resolve(schedule: Schedule, name: str, pos: LayerPos | None) -> tuple[float, int | None]:
    """(t, index of the rule that gave it, or None for the default / non_layer fallback)."""
    if pos is not None and not 0 <= pos.index < pos.num_layers:
        raise ScheduleError(
            f"tensor {name!r}: layer {pos.index} is outside its {pos.num_layers}-layer stack"
        )
    shardmerge_non_layer = pos is None and schedule.style == "shardmerge"
    for k, rule in enumerate(schedule.rules):
        if not rule.matches(name):
            continue
        if isinstance(rule.value, LayerMap):
            t = rule.value.get(pos.index) if pos is not None else None
            if t is None:
                continue  # unlisted layer: the next rule gets a chance
            return t, k
        if shardmerge_non_layer and isinstance(rule.value, Gradient):
            # A gradient has no meaning without a layer; use the explicit non_layer t.
            return _non_layer(schedule, name, f"rule {rule.label!r} is a gradient"), None
        return _evaluate(rule.value, pos), k

    if shardmerge_non_layer:
        return _non_layer(schedule, name, "no scalar rule matches it"), None
    default = schedule.default
    if default is None:
        raise ScheduleError(f"no t rule matches tensor {name!r} and there is no default")
    if isinstance(default, LayerMap):
        t = default.get(pos.index) if pos is not None else None
        if t is None:
            where = f"layer {pos.index}" if pos is not None else "outside the layer stacks"
            raise ScheduleError(
                f"no t rule matches tensor {name!r} ({where}) and the default lists no t for it"
            )
        return t, None
    return _evaluate(default, pos), None


def _non_layer(schedule: Schedule, name: str, why: str) -> float:
    if schedule.non_layer is None:
        raise ScheduleError(
            f"tensor {name!r} is outside the layer stacks and {why}, but the schedule sets "
            "no non_layer t"
        )
    return schedule.non_layer


def _evaluate(value: float | Gradient, pos: LayerPos | None) -> float:
    """A scalar as is; a gradient at the layer's relative depth (position 0 without a layer)."""
    if not isinstance(value, Gradient):
        return float(value)
    if pos is None:
        p = 0.0  # mergekit's position for tensors before/after the layer stack
    elif pos.num_layers == 1:
        p = 1.0  # mergekit: a one-layer slice sits at the end of the gradient
    else:
        p = pos.index / (pos.num_layers - 1)
    anchors = value.anchors
    last = len(anchors) - 1
    s = p * last
    i0 = min(math.floor(s), last)
    f = s - i0
    return (1 - f) * anchors[i0] + f * anchors[min(i0 + 1, last)]


_GLOB_CHARS = "*?["


def idle_rules(schedule: Schedule, names: Sequence[str]) -> list[str]:
    """A problem for each rule that no tensor of ``names`` matches, and for each layer a rule's
    layer map lists beyond the depth of the stacks it matches (a silent no-op otherwise).

    Returns:
        Messages naming the rule's place in the recipe, with a hint.
    """
    positions = layer_positions(names)
    problems = []
    for k, rule in enumerate(schedule.rules):
        where = rule.where or f"rule {k} ({rule.label!r})"
        hits = [name for name in names if rule.matches(name)]
        if not hits:
            what = "regex" if rule.kind == "regex" else "substring"
            hint = f"tensor names look like {_example(names)!r}"
            if rule.kind == "substring" and any(c in rule.pattern for c in _GLOB_CHARS):
                bare = rule.pattern.strip(_GLOB_CHARS) or rule.pattern
                hint = f"globs are not patterns here: it is a plain substring (e.g. {bare!r})"
            problems.append(f"{where}: {what} {rule.pattern!r} matches no tensor; {hint}")
            continue
        if not isinstance(rule.value, LayerMap):
            continue
        depth = max((positions[n].num_layers for n in hits if n in positions), default=0)
        beyond = [layer for layer, _ in rule.value.values if layer >= depth]
        if beyond:
            have = f"{depth} layers (0-{depth - 1})" if depth else "no layers"
            listed = ", ".join(str(layer) for layer in beyond[:5])
            problems.append(
                f"{where}.layers: layer {listed} is beyond the model's depth: the tensors "
                f"{rule.pattern!r} matches have {have}"
            )
    return problems


def _example(names: Sequence[str]) -> str:
    """A tensor name inside a stack if there is one (the kind a rule usually targets)."""
    inside = [name for name in names if find_layer(name) is not None]
    return min(inside or names, default="")


def t_table(schedule: Schedule, names: Sequence[str]) -> str:
    """A markdown table of the t each tensor gets, for the model card.

    One row per layer (stacks by name, layers by index), then one row per tensor outside the
    stacks (by name). One column per rule label that decides at least one tensor, in rule
    order, plus "other" for the default / non_layer fallback when it is used. A cell holding
    several distinct values joins them with "/"; "-" means no tensor of that row falls in that
    column. Values are rounded to four decimals.

    Raises:
        ScheduleError: a tensor has no t.
    """
    positions = layer_positions(names)
    # row -> column label -> the t values seen; rules sharing a label share a column.
    layer_rows: dict[tuple[str, int], dict[str | None, set[float]]] = {}
    other_rows: dict[str, dict[str | None, set[float]]] = {}
    used: set[str | None] = set()
    for name in names:
        pos = positions.get(name)
        t, k = _resolve(schedule, name, pos)
        column = None if k is None else schedule.rules[k].label  # None: the fallback
        if pos is None:
            cells = other_rows.setdefault(name, {})
        else:
            cells = layer_rows.setdefault((pos.stack, pos.index), {})
        cells.setdefault(column, set()).add(t)
        used.add(column)

    labels = dict.fromkeys(rule.label for rule in schedule.rules)
    columns: list[str | None] = [label for label in labels if label in used]
    if None in used:
        columns.append(None)
    # Rule labels as code: markdown would drop a regex's backslashes ("re:mlp\\.x" -> "mlp.x").
    lines = [
        _row(["tensors", *("other" if c is None else f"`{c}`" for c in columns)]),
        _row(["---"] * (1 + len(columns))),
    ]
    for stack, index in sorted(layer_rows):
        cells = layer_rows[(stack, index)]
        lines.append(_row([f"`{stack}.{index}`", *(_cell(cells.get(c)) for c in columns)]))
    for name in sorted(other_rows):
        cells = other_rows[name]
        lines.append(_row([f"`{name}`", *(_cell(cells.get(c)) for c in columns)]))
    return "\n".join(lines) + "\n"


def _row(cells: list[str]) -> str:
    # A bare "|" inside a cell (regex labels) would split it; GFM accepts "\|" even in code.
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _cell(values: set[float] | None) -> str:
    if not values:
        return "-"
    shown: list[str] = []
    for t in sorted(values):
        text = _format_t(t)
        if text not in shown:
            shown.append(text)
    return "/".join(shown)


def _format_t(t: float) -> str:
    """Four decimals without trailing zeros: 0.4935, 0.5, 1; a non-zero value that four
    decimals would show as 0 (RAM's epsilon 1e-5) in four significant digits: 1e-05."""
    text = f"{t:.4f}".rstrip("0").rstrip(".")
    if text in ("0", "-0", ""):
        return f"{t:.4g}" if t else "0"
    return text


# Module types, for statistics grouped by what a tensor is (compare, the card).
MODULE_TYPES = ("attention", "mlp", "norms", "embeddings", "other")
# Matched in this order: "post_attention_layernorm" and "self_attn.q_norm" are norms.
_TYPE_WORDS = (
    ("norms", ("norm", "ln_", "ln_f")),
    ("embeddings", ("embed", "wte", "wpe", "lm_head")),
    ("attention", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")),
    ("mlp", ("mlp", "feed_forward", "ffn", "fc1", "fc2", "gate_proj", "up_proj", "down_proj")),
)


def module_type(name: str) -> str:
    """attention / mlp / norms / embeddings / other, from the tensor's name alone."""
    lowered = name.lower()
    for kind, words in _TYPE_WORDS:
        if any(word in lowered for word in words):
            return kind
    return "other"
