"""The t schedule: layer detection, mergekit's gradient formula, rule order and fallbacks."""

from __future__ import annotations

from typing import Literal

import pytest

from shardmerge.schedule import (
    Gradient,
    LayerMap,
    LayerPos,
    Rule,
    Schedule,
    ScheduleError,
    find_layer,
    layer_positions,
    resolve_t,
    t_table,
)

ANCHORS = (0.0, 0.5, 0.3, 0.7, 1.0)
MIRROR = (1.0, 0.5, 0.7, 0.3, 0.0)


def sub(pattern: str, value: float | Gradient | LayerMap) -> Rule:
    return Rule(pattern=pattern, kind="substring", value=value, label=pattern)


def gradient_slerp(
    style: Literal["mergekit", "shardmerge"] = "mergekit", non_layer: float | None = None
) -> Schedule:
    """mergekit's canonical gradient-slerp example."""
    return Schedule(
        rules=(sub("self_attn", Gradient(ANCHORS)), sub("mlp", Gradient(MIRROR))),
        default=0.5,
        non_layer=non_layer,
        style=style,
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.7.self_attn.q_proj.weight", ("model.layers", 7)),
        ("transformer.h.7.attn.c_attn.weight", ("transformer.h", 7)),
        ("encoder.layer.7.attention.self.query.weight", ("encoder.layer", 7)),
        ("blocks.7.x", ("blocks", 7)),
        (
            "model.vision_tower.encoder.layers.3.mlp.fc1.weight",
            ("model.vision_tower.encoder.layers", 3),
        ),
        ("gpt_neox.layers.12.attention.dense.weight", ("gpt_neox.layers", 12)),
        ("model.layers.10.mlp.experts.3.w1.weight", ("model.layers", 10)),
        # Nested stacks: the outermost one counts (T5's block.N.layer.M).
        ("encoder.block.3.layer.1.DenseReluDense.wi.weight", ("encoder.block", 3)),
        ("decoder.block.0.layer.2.layer_norm.weight", ("decoder.block", 0)),
    ],
)
def test_find_layer_in_stacks(name: str, expected: tuple[str, int]) -> None:
    assert find_layer(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "transformer.wte.weight",
        "model.sublayers.3.weight",  # "layers" must be a whole dotted part
        "model.layers.norm.weight",  # no index after the stack word
        "model.layers.7",  # an index must be followed by a further part
        "h.x.3.weight",
    ],
)
def test_find_layer_outside_stacks(name: str) -> None:
    assert find_layer(name) is None


def test_layer_positions_counts_each_stack_separately() -> None:
    names = [
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)),
        *(f"model.vision_tower.encoder.layers.{i}.mlp.fc1.weight" for i in range(2)),
        "model.norm.weight",
    ]
    positions = layer_positions(names)
    assert "model.embed_tokens.weight" not in positions
    assert "model.norm.weight" not in positions
    assert positions["model.layers.2.mlp.up_proj.weight"] == LayerPos("model.layers", 2, 4)
    assert positions["model.vision_tower.encoder.layers.1.mlp.fc1.weight"] == LayerPos(
        "model.vision_tower.encoder.layers", 1, 2
    )


@pytest.mark.parametrize(
    ("layer", "expected"),
    [(0, 0.0), (8, 0.4935), (16, 0.3258), (24, 0.729), (31, 1.0)],
)
def test_gradient_matches_mergekit_for_32_layers(layer: int, expected: float) -> None:
    schedule = Schedule(rules=(), default=Gradient(ANCHORS), non_layer=None, style="mergekit")
    t = resolve_t(schedule, "model.layers.x.weight", LayerPos("model.layers", layer, 32))
    assert t == pytest.approx(expected, abs=1e-4)


def test_gradient_edge_cases() -> None:
    one_anchor = Schedule(rules=(), default=Gradient((0.3,)), non_layer=None, style="mergekit")
    assert resolve_t(one_anchor, "w", LayerPos("layers", 5, 10)) == pytest.approx(0.3)
    two = Schedule(rules=(), default=Gradient((0.0, 1.0)), non_layer=None, style="mergekit")
    # A one-layer stack sits at position 1 (mergekit), i.e. on the last anchor.
    assert resolve_t(two, "w", LayerPos("layers", 0, 1)) == 1.0
    assert resolve_t(two, "w", LayerPos("layers", 1, 5)) == pytest.approx(0.25)


def test_first_matching_rule_wins() -> None:
    schedule = Schedule(
        rules=(sub("mlp.up", 0.1), sub("mlp", 0.2), sub("up", 0.3)),
        default=0.9,
        non_layer=None,
        style="mergekit",
    )
    pos = LayerPos("model.layers", 0, 2)
    assert resolve_t(schedule, "model.layers.0.mlp.up_proj.weight", pos) == 0.1
    assert resolve_t(schedule, "model.layers.0.mlp.down_proj.weight", pos) == 0.2
    assert resolve_t(schedule, "model.layers.0.self_attn.q_proj.weight", pos) == 0.9


def test_regex_rules_use_search() -> None:
    rule = Rule(pattern=r"mlp\.(gate|up)_proj", kind="regex", value=0.3, label="re:mlp")
    schedule = Schedule(rules=(rule,), default=0.5, non_layer=None, style="mergekit")
    pos = LayerPos("model.layers", 1, 2)
    assert resolve_t(schedule, "model.layers.1.mlp.gate_proj.weight", pos) == 0.3
    assert resolve_t(schedule, "model.layers.1.mlp.down_proj.weight", pos) == 0.5
    # As a substring the same pattern would match nothing.
    literal = Schedule(
        rules=(sub(r"mlp\.(gate|up)_proj", 0.3),), default=0.5, non_layer=None, style="mergekit"
    )
    assert resolve_t(literal, "model.layers.1.mlp.gate_proj.weight", pos) == 0.5


def test_layer_map_unlisted_layers_fall_through() -> None:
    schedule = Schedule(
        rules=(sub("mlp", LayerMap(((0, 0.1), (2, 0.9)))), sub("layers", 0.7)),
        default=0.5,
        non_layer=0.4,
        style="shardmerge",
    )
    name = "model.layers.{}.mlp.down_proj.weight"
    assert resolve_t(schedule, name.format(0), LayerPos("model.layers", 0, 4)) == 0.1
    assert resolve_t(schedule, name.format(2), LayerPos("model.layers", 2, 4)) == 0.9
    assert resolve_t(schedule, name.format(1), LayerPos("model.layers", 1, 4)) == 0.7
    alone = Schedule(rules=schedule.rules[:1], default=0.5, non_layer=0.4, style="shardmerge")
    assert resolve_t(alone, name.format(3), LayerPos("model.layers", 3, 4)) == 0.5
    # Outside the stacks a layer map never matches.
    assert resolve_t(alone, "mlp_head.weight", None) == 0.4


def test_mergekit_non_layer_tensors_sit_at_position_zero() -> None:
    schedule = gradient_slerp("mergekit")
    # embed_tokens / lm_head match neither rule: the scalar fallback.
    assert resolve_t(schedule, "lm_head.weight", None) == 0.5
    # A bare gradient gives them its first anchor (mergekit's documented quirk) ...
    bare = Schedule(rules=(), default=Gradient(ANCHORS), non_layer=None, style="mergekit")
    assert resolve_t(bare, "lm_head.weight", None) == 0.0
    assert resolve_t(bare, "model.embed_tokens.weight", None) == 0.0
    # ... and so does a matching gradient rule, even one that ends at 0.
    assert resolve_t(schedule, "vision.mlp_projector.weight", None) == 1.0


def test_shardmerge_non_layer_tensors_use_non_layer() -> None:
    schedule = Schedule(
        rules=(sub("self_attn", Gradient(ANCHORS)), sub("embed", 0.2)),
        default=Gradient(MIRROR),
        non_layer=0.6,
        style="shardmerge",
    )
    assert resolve_t(schedule, "lm_head.weight", None) == 0.6  # default is a gradient
    assert resolve_t(schedule, "model.embed_tokens.weight", None) == 0.2  # scalar rule
    assert resolve_t(schedule, "model.self_attn_pool.weight", None) == 0.6  # gradient rule
    # Inside the stacks the gradient default still applies.
    pos = LayerPos("model.layers", 31, 32)
    assert resolve_t(schedule, "model.layers.31.mlp.up_proj.weight", pos) == 0.0


def test_shardmerge_non_layer_missing_is_an_error() -> None:
    schedule = Schedule(rules=(), default=0.5, non_layer=None, style="shardmerge")
    with pytest.raises(ScheduleError, match=r"'model\.norm\.weight' is outside the layer stacks"):
        resolve_t(schedule, "model.norm.weight", None)


def test_no_rule_and_no_default_names_the_tensor() -> None:
    schedule = Schedule(rules=(sub("mlp", 0.3),), default=None, non_layer=None, style="mergekit")
    with pytest.raises(ScheduleError) as excinfo:
        resolve_t(schedule, "lm_head.weight", None)
    assert str(excinfo.value) == (
        "no t rule matches tensor 'lm_head.weight' and there is no default"
    )
    assert isinstance(excinfo.value, ValueError)


def test_position_outside_its_stack_is_an_error() -> None:
    schedule = Schedule(rules=(), default=Gradient(ANCHORS), non_layer=None, style="mergekit")
    with pytest.raises(ScheduleError, match="outside its 4-layer stack"):
        resolve_t(schedule, "model.layers.4.x", LayerPos("model.layers", 4, 4))


def test_t_table_for_a_tiny_model() -> None:
    names = [
        "model.embed_tokens.weight",
        *(
            f"model.layers.{i}.{part}.weight"
            for i in range(3)
            for part in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm")
        ),
        "model.norm.weight",
        "lm_head.weight",
    ]
    table = t_table(gradient_slerp("shardmerge", non_layer=0.5), names)
    assert table.splitlines() == [
        "| tensors | `self_attn` | `mlp` | other |",
        "| --- | --- | --- | --- |",
        "| `model.layers.0` | 0 | 1 | 0.5 |",
        "| `model.layers.1` | 0.3 | 0.7 | 0.5 |",
        "| `model.layers.2` | 1 | 0 | 0.5 |",
        "| `lm_head.weight` | - | - | 0.5 |",
        "| `model.embed_tokens.weight` | - | - | 0.5 |",
        "| `model.norm.weight` | - | - | 0.5 |",
    ]
    # Deterministic: input order does not matter.
    assert t_table(gradient_slerp("shardmerge", non_layer=0.5), names[::-1]) == table


def test_t_table_columns_only_for_rules_in_use_and_escapes_pipes() -> None:
    schedule = Schedule(
        rules=(
            Rule(pattern=r"mlp\.(gate|up)", kind="regex", value=0.3, label=r"re:mlp\.(gate|up)"),
            sub("never_matches", 0.9),
            sub("mlp", LayerMap(((0, 0.1),))),
        ),
        default=0.5,
        non_layer=0.5,
        style="shardmerge",
    )
    names = [f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("up", "down")]
    lines = t_table(schedule, names).splitlines()
    # As code, so the backslash survives markdown; "\|" is GFM's pipe escape, also in code.
    assert lines[0] == r"| tensors | `re:mlp\.(gate\|up)` | `mlp` | other |"
    assert lines[2] == "| `model.layers.0` | 0.3 | 0.1 | - |"
    assert lines[3] == "| `model.layers.1` | 0.3 | - | 0.5 |"


def test_t_table_joins_distinct_values_in_one_cell() -> None:
    # Two rules with one label share a column; their values in one layer are joined.
    schedule = Schedule(
        rules=(
            Rule(pattern="up_proj", kind="substring", value=0.25, label="mlp"),
            Rule(pattern="down_proj", kind="substring", value=0.125, label="mlp"),
        ),
        default=None,
        non_layer=None,
        style="mergekit",
    )
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    assert t_table(schedule, names).splitlines() == [
        "| tensors | `mlp` |",
        "| --- | --- |",
        "| `model.layers.0` | 0.125/0.25 |",
    ]


def test_t_table_keeps_stacks_apart() -> None:
    schedule = Schedule(rules=(), default=Gradient((0.0, 1.0)), non_layer=None, style="mergekit")
    names = ["a.layers.0.w", "a.layers.1.w", "a.layers.2.w", "b.blocks.0.w", "b.blocks.1.w"]
    lines = t_table(schedule, names).splitlines()
    # Each stack has its own depth: layer 1 is the middle of "a" but the end of "b".
    assert lines[2:] == [
        "| `a.layers.0` | 0 |",
        "| `a.layers.1` | 0.5 |",
        "| `a.layers.2` | 1 |",
        "| `b.blocks.0` | 0 |",
        "| `b.blocks.1` | 1 |",
    ]


def test_t_table_raises_for_a_tensor_without_t() -> None:
    schedule = Schedule(rules=(sub("mlp", 0.3),), default=None, non_layer=None, style="mergekit")
    with pytest.raises(ScheduleError, match="lm_head"):
        t_table(schedule, ["model.layers.0.mlp.w", "lm_head.weight"])


def test_t_table_shows_values_too_small_for_four_decimals() -> None:
    """RAM's epsilon (1e-5) is not shown as 0; four decimals stay the rule elsewhere."""
    schedule = Schedule(
        rules=(sub("mlp", 0.123456),), default=1e-5, non_layer=0.0, style="shardmerge"
    )
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    lines = t_table(schedule, [*names, "model.norm.weight"]).splitlines()
    assert lines[2] == "| `model.layers.0` | 0.1235 | 1e-05 |"
    assert lines[3] == "| `model.norm.weight` | - | 0 |"
