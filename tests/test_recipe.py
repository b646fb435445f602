"""Recipe parsing: both formats, and every problem reported with its location, all at once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from shardmerge.errors import InputError, RecipeError
from shardmerge.recipe import (
    DEFAULT_SHARD_SIZE_BYTES,
    ModelRef,
    Recipe,
    load_recipe,
    normalize_dtype,
    parse_recipe,
    parse_size,
)
from shardmerge.schedule import Gradient, LayerMap, LayerPos, Rule, Schedule, resolve_t
from shardmerge.vocab import VocabSpec

ORCA = "psmathur/orca_mini_v3_13b"
PLATYPUS = "garage-bAInd/Platypus2-13B"
SELF_ATTN = (0.0, 0.5, 0.3, 0.7, 1.0)
MLP = (1.0, 0.5, 0.7, 0.3, 0.0)

GRADIENT_T = """
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
"""

MERGEKIT_SLICES = f"""
slices:
  - sources:
      - model: {ORCA}
        layer_range: [0, 40]
      - model: {PLATYPUS}
        layer_range: [0, 40]
merge_method: slerp
base_model: {ORCA}
{GRADIENT_T}"""

MERGEKIT_MODELS = f"""
models:
  - model: {ORCA}
  - model: {PLATYPUS}
merge_method: slerp
base_model: {ORCA}
{GRADIENT_T}"""

OURS = r"""
models:
  a: meta-llama/Llama-3.2-1B@main        # t = 0 end
  b: {path: ./my-finetune}               # t = 1 end
t:
  default: 0.5
  non_layer: 0.4
  rules:
    - match: self_attn
      gradient: [0, 0.5, 0.3, 0.7, 1]
    - regex: 'mlp\.(gate|up)_proj'
      value: 0.3
    - match: mlp
      layers: {0: 0.1, 1: 0.2, "2-5": 0.9}
output:
  dir: ./merged
  dtype: bf16
  shard_size: 2GiB
device: cuda:1
tokenizer_from: b
hub:
  push_to: me/merged
  private: true
  stream: true
"""

MINIMAL = """
models: {a: org/a, b: org/b}
t: 0.5
"""


def problems_of(text: str) -> list[str]:
    """The problems parse_recipe reports for ``text`` (failing the test if it accepts it)."""
    with pytest.raises(RecipeError) as excinfo:
        parse_recipe(textwrap.dedent(text))
    return excinfo.value.problems


def the_problem(text: str) -> str:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------- mergekit


def expected_gradient_schedule() -> Schedule:
    return Schedule(
        rules=(
            Rule("self_attn", "substring", Gradient(SELF_ATTN), "self_attn"),
            Rule("mlp", "substring", Gradient(MLP), "mlp"),
        ),
        default=0.5,
        non_layer=None,
        style="mergekit",
    )


@pytest.mark.parametrize(
    ("text", "layer_range"), [(MERGEKIT_SLICES, (0, 40)), (MERGEKIT_MODELS, None)]
)
def test_canonical_mergekit_gradient_slerp(text: str, layer_range: tuple[int, int] | None) -> None:
    recipe = parse_recipe(text)
    assert recipe.format == "mergekit"
    assert recipe.model_a == ModelRef(ORCA, None)  # base_model is the t = 0 end
    assert recipe.model_b == ModelRef(PLATYPUS, None)
    assert recipe.schedule == expected_gradient_schedule()
    assert recipe.input_dtype == "float16"
    assert recipe.out_dtype is None
    assert recipe.layer_range == layer_range
    assert recipe.output_dir is None
    assert recipe.shard_size_bytes == DEFAULT_SHARD_SIZE_BYTES == 5_000_000_000
    assert recipe.device == "auto"
    assert recipe.tokenizer_source == "a"
    assert recipe.push_to_hub is None
    assert recipe.stream is False
    assert recipe.warnings == ()
    assert recipe.text == text
    assert recipe.source == "<string>"
    # End to end with the schedule: layer 8 of 40 and the fallback for lm_head.
    pos = LayerPos("model.layers", 8, 40)
    assert resolve_t(recipe.schedule, "model.layers.8.self_attn.o_proj.weight", pos) == (
        pytest.approx(0.5 * (8 / 39 * 4))  # between anchors 0 and 0.5
    )
    assert resolve_t(recipe.schedule, "lm_head.weight", None) == 0.5


def test_mergekit_base_model_is_added_when_not_listed() -> None:
    recipe = parse_recipe(
        f"merge_method: slerp\nbase_model: {ORCA}@v2\nmodels: [{{model: {PLATYPUS}@refs/pr/1}}]\n"
        "parameters: {t: 0.25}\n"
    )
    assert recipe.model_a == ModelRef(ORCA, "v2")
    assert recipe.model_b == ModelRef(PLATYPUS, "refs/pr/1")
    assert recipe.schedule == Schedule((), 0.25, None, "mergekit")


def test_mergekit_scalar_and_gradient_t() -> None:
    base = f"merge_method: slerp\nbase_model: {ORCA}\nmodels: [{{model: {PLATYPUS}}}]\n"
    assert parse_recipe(base + "parameters: {t: [0, 1]}").schedule.default == Gradient((0.0, 1.0))
    assert parse_recipe(base + "parameters: {t: 1}").schedule.default == 1.0


def test_mergekit_dtypes_and_tokenizer_source() -> None:
    base = (
        f"merge_method: slerp\nbase_model: {ORCA}\nmodels: [{{model: {PLATYPUS}@main}}]\n"
        "parameters: {t: 0.5}\ndtype: bf16\nout_dtype: half\n"
    )
    recipe = parse_recipe(base + f"tokenizer_source: {PLATYPUS}@main\n")
    assert (recipe.input_dtype, recipe.out_dtype) == ("bfloat16", "float16")
    assert recipe.tokenizer_source == "b"
    assert parse_recipe(base + f"tokenizer_source: {PLATYPUS}\n").tokenizer_source == "b"
    assert parse_recipe(base + "tokenizer_source: base\n").tokenizer_source == "a"
    assert parse_recipe(base + f"tokenizer_source: {ORCA}\n").tokenizer_source == "a"
    assert parse_recipe(base + "tokenizer: {source: base}\n").tokenizer_source == "a"
    assert parse_recipe(base + f"tokenizer: {{source: {PLATYPUS}}}\n").tokenizer_source == "b"
    problem = the_problem(base + "tokenizer_source: someone/else\n")
    assert problem.startswith("tokenizer_source: 'someone/else' is not base, union or one of")


def test_mergekit_slice_t_takes_precedence_and_falls_through() -> None:
    slices = MERGEKIT_SLICES.replace(
        "        layer_range: [0, 40]\nmerge_method",
        "        layer_range: [0, 40]\n    parameters:\n      t: 0.9\nmerge_method",
    )
    assert parse_recipe(slices).schedule == Schedule((), 0.9, None, "mergekit")
    # A slice-level condition list without a fallback hands the rest to the top level.
    partial = slices.replace("t: 0.9", "t: [{filter: lm_head, value: 0.1}]")
    schedule = parse_recipe(partial).schedule
    assert [r.label for r in schedule.rules] == ["lm_head", "self_attn", "mlp"]
    assert schedule.default == 0.5
    # Only a slice-level t is fine too.
    no_top = slices.replace(GRADIENT_T.split("dtype")[0], "\n")
    assert parse_recipe(no_top).schedule.default == 0.9


def test_mergekit_conditions_after_the_fallback_warn() -> None:
    recipe = parse_recipe(
        f"merge_method: slerp\nbase_model: {ORCA}\nmodels: [{{model: {PLATYPUS}}}]\n"
        "parameters:\n  t:\n    - value: 0.5\n    - filter: mlp\n      value: 0.1\n"
    )
    # mergekit tries conditions in order: the mlp condition is unreachable.
    assert recipe.schedule.rules == ()
    assert recipe.schedule.default == 0.5
    assert recipe.warnings == (
        "parameters.t[1] is never used: the fallback at parameters.t[0] matches every tensor first",
    )


def test_mergekit_star_filter_is_the_fallback() -> None:
    recipe = parse_recipe(
        f"merge_method: slerp\nbase_model: {ORCA}\nmodels: [{{model: {PLATYPUS}}}]\n"
        "parameters: {t: [{filter: mlp, value: 0.1}, {filter: '*', value: [0, 1]}]}\n"
    )
    assert recipe.schedule.default == Gradient((0.0, 1.0))
    assert [r.pattern for r in recipe.schedule.rules] == ["mlp"]


def test_mergekit_slerp_slice_needs_two_sources() -> None:
    second = "  - sources:\n      - model: a\n        layer_range: [0, 1]\nmerge_method"
    text = MERGEKIT_SLICES.replace("merge_method", second, 1)
    problem = the_problem(text)
    assert problem == "slices[1].sources: slerp needs exactly two sources, got 1"


def test_mergekit_unsupported_methods_are_rejected_with_the_supported_list(monkeypatch) -> None:
    import shardmerge.methods

    supported = (
        "supported methods: arcee_fusion, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, "
        "della, della_linear, karcher, linear, model_stock, multislerp, nearswap, nuslerp, "
        "passthrough, ram, ramplus_tl, sce, slerp, task_arithmetic, ties"
    )
    # Every mergekit 0.1.5 method is implemented; one it adds later is named as not supported.
    monkeypatch.setattr(shardmerge.methods, "NOT_IMPLEMENTED", ("future_method",))
    unsupported = MERGEKIT_MODELS.replace("merge_method: slerp", "merge_method: future_method")
    problem = the_problem(unsupported)
    assert problem == (
        f"merge_method: 'future_method' is not supported by shardmerge yet; {supported}"
    )
    problem = the_problem(MERGEKIT_MODELS.replace("merge_method: slerp", "merge_method: tie"))
    assert problem == f"merge_method: unknown merge method 'tie'; {supported}"


def test_mergekit_union_tokenizer_block_and_chat_template() -> None:
    assert parse_recipe(MERGEKIT_MODELS + "tokenizer_source: union\n").vocab == VocabSpec("union")
    # mergekit's block defaults its source to union.
    block = parse_recipe(
        MERGEKIT_MODELS + "tokenizer:\n  pad_to_multiple_of: 64\n  tokens:\n"
        f"    <x>: {{source: {PLATYPUS}, force: true}}\n    <y>: {{source: {{kind: zero}}}}\n"
        f"    <z>: {{source: {{kind: model_token, model: base, token: '<s>'}}}}\n"
        "chat_template: chatml\n"
    ).vocab
    assert block is not None
    assert (block.source, block.pad_to_multiple_of, block.chat_template) == ("union", 64, "chatml")
    assert [(o.token, o.model, o.source_token, o.force) for o in block.overrides] == [
        ("<x>", 1, None, True), ("<y>", None, None, False), ("<z>", 0, "<s>", False),
    ]  # fmt: skip
    problems = "\n".join(
        problems_of(
            MERGEKIT_MODELS + "tokenizer:\n  pad_to_multiple_of: 0\n  tokens:\n"
            "    <x>: {source: nobody/there}\nchat_template: vicuna\n"
        )
    )
    assert "tokenizer.pad_to_multiple_of: expected a positive whole number" in problems
    assert "tokenizer.tokens['<x>'].source: 'nobody/there' is not base, union or one" in problems
    assert "chat_template: expected chatml, auto or a Jinja template" in problems


def test_mergekit_t_under_a_model_is_an_error() -> None:
    text = MERGEKIT_MODELS.replace(
        f"  - model: {PLATYPUS}\n", f"  - model: {PLATYPUS}\n    parameters:\n      t: 0.3\n"
    )
    problem = the_problem(text)
    assert problem.startswith("models[1].parameters.t: slerp's t is a global parameter")
    assert "silently ignores" in problem and "top-level parameters" in problem
    in_source = MERGEKIT_SLICES.replace(
        "layer_range: [0, 40]\n", "layer_range: [0, 40]\n        parameters: {t: 0.3}\n", 1
    )
    assert the_problem(in_source).startswith("slices[0].sources[0].parameters.t: slerp's t")


def test_mergekit_lora_reference_is_rejected() -> None:
    problem = the_problem(MERGEKIT_MODELS.replace(f"model: {PLATYPUS}", "model: org/base+org/lora"))
    assert problem.startswith("models[1].model: 'org/base+org/lora' is a LoRA reference")
    assert "merge_and_unload" in problem


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("modules: {}", "modules: multi-module (modules:) configs are not supported"),
        ("paramters: {t: 0.5}", "paramters: unknown key; did you mean 'parameters'?"),
    ],
)
def test_mergekit_unsupported_and_unknown_keys(key: str, expected: str) -> None:
    assert the_problem(MERGEKIT_MODELS + key + "\n").startswith(expected)


def test_mergekit_needs_exactly_two_models_and_a_t() -> None:
    three = MERGEKIT_MODELS.replace("merge_method", "  - model: org/third\nmerge_method")
    assert the_problem(three).startswith(
        "models: slerp merges exactly two models; base_model and models name 3 distinct ones"
    )
    one = f"merge_method: slerp\nbase_model: {ORCA}\nmodels: [{{model: {ORCA}}}]\nparameters: {{t: 1}}"
    assert "name 1 distinct ones" in the_problem(one)
    no_t = f"merge_method: slerp\nbase_model: {ORCA}\nmodels: [{{model: {PLATYPUS}}}]\n"
    assert the_problem(no_t) == "parameters.t: missing; slerp needs t (e.g. parameters: {t: 0.5})"
    no_base = f"merge_method: slerp\nmodels: [{{model: {PLATYPUS}}}]\nparameters: {{t: 1}}"
    assert the_problem(no_base).startswith("base_model: missing")


def test_mergekit_slice_sources_checked() -> None:
    uneven = MERGEKIT_SLICES.replace("layer_range: [0, 40]", "layer_range: [0, 32]", 1)
    assert the_problem(uneven).startswith(
        "slices[0].sources: the layer ranges have different lengths ([0, 32], [0, 40])"
    )
    backwards = MERGEKIT_SLICES.replace("[0, 40]", "[40, 0]")
    problems = problems_of(backwards)
    assert problems[0].startswith("slices[0].sources[0].layer_range: [40, 0] is empty")
    assert len(problems) == 2
    foreign = MERGEKIT_SLICES.replace(f"base_model: {ORCA}", "base_model: org/other")
    assert the_problem(foreign).startswith(
        "slices[0].sources: base_model must be one of the sources"
    )


# --------------------------------------------------------------------------- our format


def test_our_format_full_example() -> None:
    recipe = parse_recipe(OURS, "ours.yaml")
    assert recipe.format == "shardmerge"
    assert recipe.model_a == ModelRef("meta-llama/Llama-3.2-1B", "main")
    assert recipe.model_b == ModelRef("./my-finetune", None)
    assert recipe.schedule == Schedule(
        rules=(
            Rule("self_attn", "substring", Gradient(SELF_ATTN), "self_attn"),
            Rule(r"mlp\.(gate|up)_proj", "regex", 0.3, r"re:mlp\.(gate|up)_proj"),
            Rule(
                "mlp",
                "substring",
                LayerMap(((0, 0.1), (1, 0.2), (2, 0.9), (3, 0.9), (4, 0.9), (5, 0.9))),
                "mlp",
            ),
        ),
        default=0.5,
        non_layer=0.4,
        style="shardmerge",
    )
    assert recipe.input_dtype is None
    assert recipe.out_dtype == "bfloat16"
    assert recipe.output_dir == "./merged"
    assert recipe.shard_size_bytes == 2 * 1024**3
    assert recipe.device == "cuda:1"
    assert recipe.tokenizer_source == "b"
    assert recipe.layer_range is None
    assert (recipe.push_to_hub, recipe.private, recipe.stream) == ("me/merged", True, True)
    assert recipe.source == "ours.yaml"
    assert recipe.warnings == ()


def test_our_format_defaults() -> None:
    recipe = parse_recipe(MINIMAL)
    assert recipe.schedule == Schedule((), 0.5, 0.5, "shardmerge")
    assert recipe.output_dir is None
    assert recipe.out_dtype is None
    assert recipe.shard_size_bytes == 5_000_000_000
    assert recipe.device == "auto"
    assert recipe.tokenizer_source == "a"
    assert recipe.push_to_hub is None
    assert recipe.private is False  # as huggingface_hub's create_repo and the --private flag
    assert recipe.stream is False


def test_non_layer_follows_a_scalar_default() -> None:
    recipe = parse_recipe(
        "models: {a: x, b: y}\nt: {default: 0.3, rules: [{match: mlp, value: 1}]}"
    )
    assert recipe.schedule.non_layer == 0.3
    explicit = parse_recipe("models: {a: x, b: y}\nt: {default: 0.3, non_layer: 0.7}")
    assert explicit.schedule.non_layer == 0.7
    assert resolve_t(explicit.schedule, "lm_head.weight", None) == 0.7


@pytest.mark.parametrize(
    ("t", "reason"),
    [
        ("{default: {gradient: [0, 1]}}", "the default is a gradient"),
        ("{rules: [{match: mlp, value: 0.5}]}", "there is no default"),
        ("{default: 0.5, rules: [{match: mlp, gradient: [0, 1]}]}", "t.rules[0] uses gradient"),
        ("{default: 0.5, rules: [{match: mlp, layers: {0: 1}}]}", "t.rules[0] uses layers"),
    ],
)
def test_non_layer_is_required_with_gradients(t: str, reason: str) -> None:
    problem = the_problem(f"models: {{a: x, b: y}}\nt: {t}\n")
    assert problem.startswith(f"t.non_layer: missing; it is required because {reason}")
    assert "lm_head" in problem


def test_model_references() -> None:
    recipe = parse_recipe(
        "models:\n  a: {path: /data/ckpt@2024, revision: v1}\n  b: {path: /data/x@y}\nt: 0.5\n"
    )
    # The mapping form is taken as written: local paths may contain "@".
    assert recipe.model_a == ModelRef("/data/ckpt@2024", "v1")
    assert recipe.model_b == ModelRef("/data/x@y", None)
    split = parse_recipe("models: {a: org/name@refs/pr/1, b: org/name}\nt: 0.5")
    assert split.model_a == ModelRef("org/name", "refs/pr/1")
    problems = problems_of("models: {a: 'org/name@', b: {path: x, revision: 123}}\nt: 0.5")
    assert problems == [
        "models.a: 'org/name@' should be 'ref@revision' with both parts non-empty",
        "models.b.revision: expected a string (quote revisions that look like numbers), "
        "got a number (123)",
    ]
    assert the_problem("models: {a: '', b: x}\nt: 0.5").startswith("models.a: expected a Hub id")


def test_same_model_twice_is_a_warning() -> None:
    recipe = parse_recipe("models: {a: org/m@main, b: {path: org/m, revision: main}}\nt: 0.5")
    assert recipe.warnings == (
        "models.a and models.b are the same model (org/m@main); the merge reproduces it",
    )
    assert parse_recipe("models: {a: org/m@main, b: org/m}\nt: 0.5").warnings == ()


def test_layer_map_keys() -> None:
    ok = parse_recipe(
        "models: {a: x, b: y}\nt:\n  default: 0.5\n  non_layer: 0.5\n  rules:\n"
        "    - {match: mlp, layers: {'7': 0.7, 3 - 4: 0.3, 0: 0}}\n"
    )
    assert ok.schedule.rules[0].value == LayerMap(((0, 0.0), (3, 0.3), (4, 0.3), (7, 0.7)))
    base = "models: {a: x, b: y}\nt:\n  non_layer: 0.5\n  rules:\n    - match: mlp\n      layers: "
    assert problems_of(base + "{0-3: 0.1, 5: 0.2, 3: 0.3, 2-9: 0.1}") == [
        "t.rules[0].layers: keys '0-3' and '2-9' both give layer 2 a t",
        "t.rules[0].layers: keys '2-9' and '3' both give layer 3 a t",
        "t.rules[0].layers: keys '2-9' and '5' both give layer 5 a t",
    ]
    assert problems_of(base + "{5-2: 0.1, -1: 0.2, x: 0.3, 1: 2}") == [
        "t.rules[0].layers.5-2: the range is backwards; write '2-5'",
        "t.rules[0].layers.-1: a key must be a layer index (0, 1, ...) or an inclusive range 'a-b'",
        "t.rules[0].layers.x: a key must be a layer index (0, 1, ...) or an inclusive range 'a-b'",
        "t.rules[0].layers.1: 2 is outside [0, 1]",
    ]
    assert the_problem(base + "{}") == "t.rules[0].layers: needs at least one layer"


def test_rule_shape_problems() -> None:
    base = "models: {a: x, b: y}\nt:\n  non_layer: 0.5\n  rules:\n"
    assert problems_of(
        base
        + "    - {match: a, regex: b, value: 0.1}\n"
        + "    - {value: 0.1, gradient: [0]}\n"
        + "    - {regex: 'mlp(', value: 0.1}\n"
        + "    - {match: mlp, gradient: []}\n"
        + "    - {match: mlp}\n"
        + "    - mlp\n"
    ) == [
        "t.rules[0]: give only one of match and regex",
        "t.rules[1]: give `match:` (a substring of the tensor name) or `regex:`",
        "t.rules[1]: give only one of value, gradient and layers (got value and gradient)",
        "t.rules[2].regex: invalid regular expression: missing ), unterminated subpattern "
        "at position 3",
        "t.rules[3].gradient: a gradient needs at least one anchor",
        "t.rules[4]: give one of value (a number), gradient (a list) or layers (a mapping)",
        "t.rules[5]: expected a rule mapping (match or regex, and value, gradient or layers), "
        "got a string ('mlp')",
    ]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("modles: {a: x, b: y}\nt: 0.5", "modles: unknown key; did you mean 'models'?"),
        ("models: {a: x, b: y, c: z}\nt: 0.5", "models.c: unknown key; expected one of a, b"),
        (
            "models: {a: x, b: y}\nt: {non_layer: 0, rules: [{match: m, gradeint: [0]}]}",
            "t.rules[0].gradeint: unknown key; did you mean 'gradient'?",
        ),
        (
            "models: {a: x, b: y}\nt: 0.5\noutput: {shard-size: 5GB}",
            "output.shard-size: unknown key; did you mean 'shard_size'?",
        ),
        (
            "models: {a: x, b: y}\nt: 0.5\nhub: {privat: true}",
            "hub.privat: unknown key; did you mean 'private'?",
        ),
    ],
)
def test_unknown_keys_say_did_you_mean(text: str, expected: str) -> None:
    # Only the misspelling is reported, not also the key it was meant to be as missing.
    assert the_problem(text) == expected


def test_did_you_mean_in_mergekit_configs() -> None:
    text = MERGEKIT_MODELS.replace("parameters:\n  t:", "parameters:\n  tt:")
    assert the_problem(text) == "parameters.tt: unknown key; did you mean 't'?"
    typo = MERGEKIT_MODELS.replace(f"- model: {PLATYPUS}", f"- modle: {PLATYPUS}")
    assert the_problem(typo) == "models[1].modle: unknown key; did you mean 'model'?"


def test_mergekit_keys_without_merge_method_get_a_hint() -> None:
    problems = problems_of(f"base_model: {ORCA}\nmodels: {{a: x, b: y}}\nt: 0.5")
    assert problems == [
        "base_model: unknown key; it is a mergekit key, and mergekit configs need "
        "`merge_method: slerp`"
    ]
    assert the_problem("models: {a: x, b: y}\nt: 0.5\ndtype: bf16").startswith(
        "dtype: unknown key; the output dtype goes under output.dtype"
    )


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        ("1.5", "t: 1.5 is outside [0, 1]"),
        ("-0.1", "t: -0.1 is outside [0, 1]"),
        (".nan", "t: t must be a finite number between 0 and 1, got nan"),
        (".inf", "t: t must be a finite number between 0 and 1, got inf"),
        ("true", "t: expected a number between 0 and 1, got a boolean (true)"),
        ("half", "t: expected a number between 0 and 1, got a string ('half')"),
        ("", "t: expected a number between 0 and 1, got nothing (an empty value)"),
        ("[0, 1]", "t: a bare list is not a t here; for a gradient write "),
        ("{default: [0, 1], non_layer: 0}", "t.default: a bare list is not a t here"),
        ("{non_layer: 0.5}", "t: give a default, rules, or both"),
    ],
)
def test_bad_t_values(t: str, expected: str) -> None:
    assert the_problem(f"models: {{a: x, b: y}}\nt: {t}\n").startswith(expected)


def test_gradient_anchor_out_of_range_names_its_index() -> None:
    text = """
        models: {a: x, b: y}
        t:
          non_layer: 0.5
          rules:
            - {match: self_attn, value: 0.1}
            - {match: mlp, gradient: [0, 1, 1.5, .nan, no]}
    """
    assert problems_of(text) == [
        "t.rules[1].gradient[2]: 1.5 is outside [0, 1]",
        "t.rules[1].gradient[3]: t must be a finite number between 0 and 1, got nan",
        "t.rules[1].gradient[4]: expected a number between 0 and 1, got a boolean (false)",
    ]


def test_missing_models_and_t() -> None:
    assert problems_of("device: cpu") == [
        "models: missing; give models.a (the t = 0 end) and models.b (the t = 1 end)",
        "t: missing; e.g. `t: 0.5`, or a mapping with default, non_layer and rules",
    ]
    assert the_problem("models: {a: x}\nt: 0.5") == "models.b: missing; the model at the t = 1 end"
    assert the_problem("models: [x, y]\nt: 0.5") == (
        "models: expected a mapping with keys a and b, got a list"
    )


def test_wrong_types_elsewhere() -> None:
    text = """
        models: {a: 3, b: y}
        t: 0.5
        output: {dir: 7, dtype: fp8, shard_size: [1]}
        device: gpu
        tokenizer_from: c
        hub: {push_to: not a repo, private: 1, stream: 'no'}
    """
    assert problems_of(text) == [
        "models.a: expected a Hub id or local path ('ref' or 'ref@revision') or "
        "{path: ..., revision: ...}, got a number (3)",
        "output.dir: expected a folder path, got a number (7)",
        "output.dtype: unknown dtype 'fp8'; expected bfloat16 (bf16), float16 (fp16, half) "
        "or float32 (fp32, float)",
        "output.shard_size: expected a size such as 5GB or a number of bytes, got a list",
        "device: expected auto, cpu, cuda or cuda:N, got a string ('gpu')",
        "tokenizer_from: expected a, b or union, got a string ('c')",
        "hub.push_to: expected a Hub repo id 'org/name', got a string ('not a repo')",
        "hub.private: expected true or false, got a number (1)",
        "hub.stream: expected true or false, got a string ('no')",
    ]


def test_three_mistakes_give_one_error_listing_all_three() -> None:
    text = """
        models: {a: org/a, b: org/b}
        t:
          default: 0.5
          non_layer: 0.5
          rules:
            - match: mlp
              gradient: [0, 0.5, 2]
        output: {shard_size: 5XB}
        devise: cpu
    """
    with pytest.raises(RecipeError) as excinfo:
        parse_recipe(textwrap.dedent(text), "three.yaml")
    error = excinfo.value
    assert isinstance(error, InputError) and error.exit_code == 2
    assert error.source == "three.yaml"
    assert error.problems == [
        "devise: unknown key; did you mean 'device'?",
        "t.rules[0].gradient[2]: 2 is outside [0, 1]",
        "output.shard_size: '5XB' is not a size; write e.g. 5GB, 500MB, 2GiB or a number of "
        "bytes (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)",
    ]
    message = str(error)
    assert message.startswith("three.yaml: 3 problems in the recipe:")
    for problem in error.problems:
        assert f"  - {problem}" in message


def test_yaml_syntax_error_reports_the_line() -> None:
    text = "models:\n  a: x\n  b: y\nt: [0.5\noutput: {dir: ./out}\n"
    problem = the_problem(text)
    assert problem.startswith("YAML syntax error at line 5, column 7:")
    tab = the_problem("models:\n\ta: x\n")
    assert tab.startswith("YAML syntax error at line 2")


def test_duplicate_keys_are_reported() -> None:
    problem = the_problem("models: {a: x, b: y}\nt: 0.5\nt: 0.7\n")
    assert problem == "line 3: duplicate key 't' (YAML would silently keep only the last one)"


def test_empty_and_non_mapping_recipes() -> None:
    assert problems_of("") == ["the recipe is empty; it needs at least models and t"]
    assert problems_of("# only a comment\n") == [
        "the recipe is empty; it needs at least models and t"
    ]
    assert problems_of("- models\n- t\n") == [
        "the top level must be a mapping (models:, t:, ...), got a list"
    ]


def test_yaml_12_style_floats_are_numbers() -> None:
    recipe = parse_recipe(
        "models: {a: x, b: y}\nt: {default: 5e-1, non_layer: 1e-3}\noutput: {shard_size: 5e9}"
    )
    assert recipe.schedule.default == 0.5
    assert recipe.schedule.non_layer == 0.001
    assert recipe.shard_size_bytes == 5_000_000_000


# --------------------------------------------------------------------------- files


def test_load_recipe_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.source == str(path)
    assert recipe.text == MINIMAL


def test_load_recipe_names_the_file_it_cannot_read(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(missing)
    assert str(excinfo.value) == f"{missing}: recipe file not found"
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00models")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(binary)


def test_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models: {a: x, b: y}\nt: 2\n", encoding="utf-8")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(str(path))
    assert str(excinfo.value) == f"{path}: t: 2 is outside [0, 1]"


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5GB", 5_000_000_000),
        ("500MB", 500_000_000),
        ("2GiB", 2 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("1.1GB", 1_100_000_000),
        ("64 kib", 65_536),
        ("123", 123),
        ("10B", 10),
        (123, 123),
    ],
)
def test_parse_size(value: str | int, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "GB", "5 XB", "5G", "-1GB", "0", 0, -5, "1.5B", True, "1e9"])
def test_parse_size_rejects(value: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bf16", "bfloat16"),
        ("bfloat16", "bfloat16"),
        ("BF16", "bfloat16"),
        ("torch.bfloat16", "bfloat16"),
        ("fp16", "float16"),
        ("float16", "float16"),
        ("half", "float16"),
        ("fp32", "float32"),
        ("float32", "float32"),
        ("float", "float32"),
    ],
)
def test_normalize_dtype(name: str, expected: str) -> None:
    assert normalize_dtype(name) == expected


@pytest.mark.parametrize("name", ["fp8", "int8", "float64", "", "bfloat"])
def test_normalize_dtype_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        normalize_dtype(name)


def test_recipe_is_frozen() -> None:
    recipe = parse_recipe(MINIMAL)
    with pytest.raises(AttributeError):
        recipe.device = "cpu"  # type: ignore[misc]


def test_output_name_and_model_names() -> None:
    recipe = parse_recipe(
        "models: {a: org/a, b: {path: /data/ft, name: my-finetune}}\nt: 0.5\n"
        "output: {dir: out, name: Acme SLERP}\n"
    )
    assert recipe.name == "Acme SLERP"
    assert recipe.model_b.name == "my-finetune" and recipe.model_b.ref == "/data/ft"
    with pytest.raises(RecipeError, match=r"models.b.name: expected a string"):
        parse_recipe("models: {a: org/a, b: {path: /data/ft, name: [x]}}\nt: 0.5\n")


def test_mergekit_slerp_ignores_template_parameters_with_a_warning() -> None:
    text = MERGEKIT_MODELS.replace(
        f"  - model: {PLATYPUS}\n", f"  - model: {PLATYPUS}\n    parameters:\n      weight: 0.3\n"
    )
    recipe = parse_recipe(text)
    assert recipe.model_b == ModelRef(PLATYPUS, None)
    assert any(
        w.startswith("models[1].parameters.weight: ignored; slerp takes no per-model")
        for w in recipe.warnings
    )
    bad = text.replace("weight: 0.3", "wieght: 0.3")
    assert the_problem(bad).startswith("models[1].parameters.wieght: slerp takes no per-model")
