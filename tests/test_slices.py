"""Layer stacks from slices: mergekit's ``slices:`` and our ``layers:`` (passthrough, merges of
differing layer ranges), renumbering, config.json, the plan's stack table, errors, verify and
resume, and (where benchmarks/.venv-mergekit exists) agreement with mergekit 0.1.5."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from shardmerge import cli
from shardmerge.errors import RecipeError
from shardmerge.pipeline import prepare, run_merge
from shardmerge.recipe import parse_recipe
from shardmerge.schedule import find_layer
from shardmerge.slices import (
    Slice,
    SliceSource,
    parse_span,
    renumber,
    rewrite_config,
    stack_layers,
)
from tests.conftest import folder_files, needs_mergekit, write_checkpoint
from tests.test_distributed import _launch, needs_gloo
from tests.test_methods import LAYERS, _family, _max_steps, _read, dense_linear, ours_and_mergekits
from tests.test_resume import _run_subprocess
from tests.test_slerp import reference_slerp

# --------------------------------------------------------------------------- the stack, pure


def test_stack_layers_number_on_and_slice_depths_are_their_own() -> None:
    stack = [
        Slice((SliceSource(0, 0, 3),), "slices[0]"),
        Slice((SliceSource(1, 2, 4), SliceSource(0, 5, 7)), "slices[1]"),
    ]
    layers = stack_layers(stack)
    assert [layer.index for layer in layers] == [0, 1, 2, 3, 4]
    assert [layer.inputs for layer in layers] == [
        ((0, 0),),
        ((0, 1),),
        ((0, 2),),
        ((1, 2), (0, 5)),
        ((1, 3), (0, 6)),
    ]
    # Gradients run along each slice: the second slice starts again at position 0 of 2.
    assert [(layer.pos.index, layer.pos.num_layers) for layer in layers] == [
        (0, 3),
        (1, 3),
        (2, 3),
        (0, 2),
        (1, 2),
    ]


def test_renumber_replaces_only_the_layer_index() -> None:
    assert renumber("model.layers.12.mlp.up_proj.weight", 3) == "model.layers.3.mlp.up_proj.weight"
    assert renumber("transformer.h.0.attn.c_attn.bias", 40) == "transformer.h.40.attn.c_attn.bias"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0-23", (0, 24)), (" 8 - 31 ", (8, 32)), ("5", (5, 6)), (7, (7, 8))],
)
def test_parse_span_is_inclusive(text: object, expected: tuple[int, int]) -> None:
    assert parse_span(text) == expected


@pytest.mark.parametrize(("text", "words"), [("9-3", "backwards"), ("a-b", "such as"), (-1, "")])
def test_parse_span_refuses(text: object, words: str) -> None:
    message = parse_span(text)
    assert isinstance(message, str) and words in message


def test_rewrite_config_sets_the_depth_and_rebuilds_per_layer_lists() -> None:
    a = {"num_hidden_layers": 4, "layer_types": ["s0", "f1", "s2", "f3"], "hidden_size": 8}
    b = {"num_hidden_layers": 3, "layer_types": ["B0", "B1", "B2"]}
    stack = [
        Slice((SliceSource(0, 1, 4),), "slices[0]"),
        Slice((SliceSource(1, 0, 2),), "slices[1]"),
    ]
    out = rewrite_config(a, stack, [a, b])
    assert out["num_hidden_layers"] == 5
    assert out["layer_types"] == ["f1", "s2", "f3", "B0", "B1"]
    assert out["hidden_size"] == 8
    assert a["layer_types"] == ["s0", "f1", "s2", "f3"]  # the input is not changed
    # A source without the list: nothing sound to rebuild it from, so it is left out.
    assert "layer_types" not in rewrite_config(a, stack, [a, {}])


def test_rewrite_config_writes_out_a_sliding_window_pattern() -> None:
    """Gemma 3 configs give only ``sliding_window_pattern`` (every 6th layer global); a stack
    of shifted layers keeps each layer's own attention type in an explicit layer_types."""
    gemma3 = {
        "model_type": "gemma3_text",
        "num_hidden_layers": 12,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
    }
    stack = [Slice((SliceSource(0, 0, 9),), "slices[0]"), Slice((SliceSource(0, 3, 12),), "s1")]
    out = rewrite_config(gemma3, stack, [gemma3])
    full = [i for i, kind in enumerate(out["layer_types"]) if kind == "full_attention"]
    # Source layers 5 and 11 attend globally: output 5 (first slice), then 11 and 17 (source 5
    # and 11 again in the second slice, which starts at output 9 with source layer 3).
    assert full == [5, 11, 17] and len(out["layer_types"]) == 18
    assert set(out["layer_types"]) == {"full_attention", "sliding_attention"}
    # Gemma 2 has no key: its fixed alternation (odd layers global) is written out the same way.
    gemma2 = {"model_type": "gemma2", "num_hidden_layers": 4, "sliding_window": 4096}
    out2 = rewrite_config(gemma2, [Slice((SliceSource(0, 1, 4),), "s")], [gemma2])
    assert out2["layer_types"] == ["full_attention", "sliding_attention", "full_attention"]
    # No sliding window, or an architecture without a pattern: nothing is invented.
    off = {**gemma3, "sliding_window": None}
    assert "layer_types" not in rewrite_config(off, stack, [off])
    llama = {"model_type": "llama", "num_hidden_layers": 12}
    assert "layer_types" not in rewrite_config(llama, stack, [llama])


def test_written_layer_types_match_what_transformers_expands_per_source() -> None:
    transformers = pytest.importorskip("transformers")
    config = {"model_type": "gemma3_text", "num_hidden_layers": 12, "sliding_window": 512}
    config["sliding_window_pattern"] = 6
    source = transformers.Gemma3TextConfig(**config).layer_types
    stack = [Slice((SliceSource(0, 0, 9),), "slices[0]"), Slice((SliceSource(0, 3, 12),), "s1")]
    out = rewrite_config(config, stack, [config])
    assert out["layer_types"] == source[0:9] + source[3:12]
    assert transformers.Gemma3TextConfig(**out).layer_types == out["layer_types"]


# --------------------------------------------------------------------------- recipes

MK_LINEAR = """
merge_method: linear
slices:
  - sources:
      - {model: a, layer_range: [0, 4], parameters: {weight: 0.3}}
      - {model: b, layer_range: [2, 6]}
    parameters: {weight: 0.7}
  - sources:
      - {model: b, layer_range: [6, 8]}
      - {model: a, layer_range: [4, 6]}
parameters: {weight: 1.0, normalize: false}
"""


def test_mergekit_slices_parameters_fall_back_source_slice_top() -> None:
    recipe = parse_recipe(MK_LINEAR)
    assert [m.ref for m in recipe.models] == ["a", "b"]
    first, second = recipe.slices
    assert [(s.model, s.start, s.end) for s in first.sources] == [(0, 0, 4), (1, 2, 6)]
    assert [(s.model, s.start, s.end) for s in second.sources] == [(1, 6, 8), (0, 4, 6)]
    assert first.model_params is not None and second.model_params is not None
    weights = [p["weight"].default for p in first.model_params + second.model_params]
    assert weights == [0.3, 0.7, 1.0, 1.0]
    assert first.shared_params == {"normalize": False}


def test_mergekit_slerp_slices_put_the_base_first_and_keep_each_slices_t() -> None:
    recipe = parse_recipe(
        """
merge_method: slerp
base_model: a
slices:
  - sources:
      - {model: b, layer_range: [2, 6]}
      - {model: a, layer_range: [0, 4]}
    parameters: {t: [0, 1]}
  - sources:
      - {model: a, layer_range: [4, 6]}
      - {model: b, layer_range: [6, 8]}
parameters: {t: 0.25}
"""
    )
    first, second = recipe.slices
    assert first.models == (0, 1) and second.models == (0, 1)
    assert first.sources[1].start == 2
    assert first.schedule is not None and second.schedule is not None
    assert first.schedule.default != 0.25 and second.schedule.default == 0.25


def test_our_layers_name_models_by_key() -> None:
    recipe = parse_recipe(
        'method: passthrough\nmodels: {a: ./A, b: ./B}\nlayers:\n  - a: "0-23"\n  - b: 8-31\n'
    )
    assert [(s.sources[0].model, s.sources[0].start, s.sources[0].end) for s in recipe.slices] == [
        (0, 0, 24),
        (1, 8, 32),
    ]


@pytest.mark.parametrize("method", ["multislerp", "nuslerp"])
def test_a_base_that_an_optional_base_method_uses_comes_first_in_slices(method) -> None:
    """nuslerp and multislerp use a base_model when given: in every slice it is the base (the
    first input, without parameters), as in mergekit, and the models after it keep their
    places in the recipe's list (not shifted by a second copy of the base)."""
    mergekit = parse_recipe(
        f"merge_method: {method}\nbase_model: ./B\nslices:\n"
        "  - sources:\n"
        "      - {model: ./X, layer_range: [0, 2], parameters: {weight: 0.3}}\n"
        "      - {model: ./B, layer_range: [2, 4]}\n"
        "      - {model: ./Y, layer_range: [1, 3], parameters: {weight: 0.7}}\n"
    )
    ours = parse_recipe(
        f"method: {method}\nbase: ./B\nmodels: {{x: {{path: ./X, weight: 0.3}}, "
        "y: {path: ./Y, weight: 0.7}}\nlayers:\n  - {x: 0-1, base: 2-3, y: 1-2}\n"
    )
    for recipe in (mergekit, ours):
        assert [m.ref for m in recipe.models] == ["./B", "./X", "./Y"], recipe.models
        (piece,) = recipe.slices
        assert [(s.model, s.start) for s in piece.sources] == [(0, 2), (1, 0), (2, 1)]
        assert piece.model_params is not None
        assert [p["weight"].default for p in piece.model_params] == [0.3, 0.7]


def _problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    return info.value.problems


def test_bad_slices_are_all_reported_with_their_keys() -> None:
    problems = _problems(
        """
merge_method: passthrough
slices:
  - sources:
      - {model: a, layer_range: [0, 2]}
      - {model: b, layer_range: [0, 2]}
  - sources:
      - {model: a, layer_range: [4, 2]}
  - sources:
      - {model: a}
"""
    )
    assert len(problems) == 3
    assert problems[0].startswith("slices[0].sources: passthrough copies one source per slice")
    assert problems[1].startswith("slices[1].sources[0].layer_range: [4, 2] is empty")
    assert problems[2].startswith("slices[2].sources[0].layer_range: missing")


def test_sources_of_different_lengths_are_refused() -> None:
    (problem,) = _problems(
        "merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\nslices:\n  - sources:\n"
        "      - {model: a, layer_range: [0, 4]}\n      - {model: b, layer_range: [0, 6]}\n"
    )
    assert problem.startswith("slices[0].sources: the layer ranges have different lengths")


def test_slerp_slice_needs_t_somewhere() -> None:
    (problem,) = _problems(
        "merge_method: slerp\nbase_model: a\nslices:\n  - sources:\n"
        "      - {model: a, layer_range: [0, 4]}\n      - {model: b, layer_range: [0, 4]}\n"
    )
    assert problem.startswith("slices[0].parameters.t: missing")


def test_our_layers_errors() -> None:
    problems = _problems(
        "models: {a: ./A, b: ./B}\nt: 0.5\nlayers:\n  - {a: 0-3}\n  - {a: 0-3, c: 1}\n"
        "  - {a: 0-3, b: 2-3}\n"
    )
    assert problems == [
        "layers[0]: slerp merges two models: give the layers of both a and b",
        "layers[1].c: not a model of this recipe; expected one of a, b",
        "layers[2]: the layer ranges have different lengths (a: 4, b: 2 layers)",
    ]


def test_our_layers_entry_parameters_and_their_precedence() -> None:
    recipe = parse_recipe(
        """
method: ties
base: ./base
models:
  x: {path: ./X, weight: 0.9}
  y: ./Y
parameters: {weight: 0.5, density: 0.7, normalize: true}
layers:
  - base: 0-3
    x: {layers: 0-3, weight: 0.2}
    y: 4-7
    parameters: {weight: 0.4, density: 0.3, normalize: false}
  - {base: 4-5, x: 4-5, y: 0-1}
"""
    )
    first, second = recipe.slices
    assert first.model_params is not None and second.model_params is not None
    # x: its own in the entry; y: the entry's; the second entry: models:, then parameters:.
    assert [p["weight"].default for p in first.model_params] == [0.2, 0.4]
    assert [p["density"].default for p in first.model_params] == [0.3, 0.3]
    assert [p["weight"].default for p in second.model_params] == [0.9, 0.5]
    assert [p["density"].default for p in second.model_params] == [0.7, 0.7]
    assert first.shared_params is not None and second.shared_params is not None
    assert first.shared_params["normalize"] is False
    assert second.shared_params["normalize"] is True


def test_our_layers_entry_parameter_errors() -> None:
    problems = _problems(
        """
method: linear
models: {x: ./X, y: ./Y}
parameters: {weight: 0.5}
layers:
  - {x: {weight: 0.3}, y: 0-1}
  - {x: {layers: 0-1, normalize: true}, y: 0-1}
  - {x: 0-1, y: 0-1, parameters: {weight: 2x, colour: red}}
"""
    )
    assert problems == [
        'layers[0].x.layers: missing; the model\'s layers, e.g. "0-23"',
        "layers[1].x.normalize: unknown key; expected one of weight",
        "layers[2].parameters.colour: unknown key; expected one of weight, normalize",
        "layers[2].parameters.weight: expected a number, got a string ('2x')",
    ]
    slerp = _problems(
        "models: {a: ./A, b: ./B}\nt: 0.5\nlayers:\n  - {a: {layers: 0-1, t: 0.2}, b: 0-1}\n"
        "  - {a: 0-1, b: 0-1, parameters: {t: 1.5, weight: 1}}\n"
    )
    assert slerp[0] == (
        'layers[0].a: expected a layer range such as "0-23"; slerp takes no per-model '
        "parameters (slerp's t goes under layers[0].parameters)"
    )
    assert slerp[1].startswith("layers[1].parameters.weight: unknown key")
    assert slerp[2].startswith("layers[1].parameters.t: ")
    (named,) = _problems(
        "method: passthrough\nmodels: {parameters: ./A}\nlayers:\n  - {parameters: 0-1}\n"
    )
    assert named.startswith("layers: a model named 'parameters' cannot be used here")


def test_passthrough_of_several_whole_models_is_refused() -> None:
    (problem,) = _problems("merge_method: passthrough\nmodels:\n  - model: a\n  - model: b\n")
    assert problem.startswith("models: passthrough copies one model")


# --------------------------------------------------------------------------- merges


def _write(tmp_path: Path, text: str, folders: list[Path]) -> Path:
    recipe = tmp_path / "merge.yml"
    recipe.write_text(text.format(**{f"m{j}": f for j, f in enumerate(folders)}))
    return recipe


PASSTHROUGH = """
merge_method: passthrough
slices:
  - sources:
      - {{model: {m1}, layer_range: [0, 2]}}
  - sources:
      - {{model: {m2}, layer_range: [1, 3]}}
  - sources:
      - {{model: {m1}, layer_range: [1, 2]}}
"""


def _with_layer_types(folders: list[Path]) -> None:
    for j, folder in enumerate(folders):
        config = json.loads((folder / "config.json").read_text())
        config["layer_types"] = [f"m{j}-{i}" for i in range(LAYERS)]
        (folder / "config.json").write_text(json.dumps(config))


def test_passthrough_stacks_layers_byte_for_byte(tmp_path, capsys):
    folders, states = _family(tmp_path, llama=True)
    _with_layer_types(folders)
    recipe = _write(tmp_path, PASSTHROUGH, folders)
    prepared = prepare(parse_recipe(recipe.read_text(), str(recipe)))
    result = run_merge(prepared, out=tmp_path / "out", quiet=True)
    got = _read(tmp_path / "out")
    # Output layer -> (state, input layer): 0-1 of m1, 1-2 of m2, 1 of m1 again.
    sources = [(1, 0), (1, 1), (2, 1), (2, 2), (1, 1)]
    expected = {}
    for name, tensor in states[1].items():
        if find_layer(name) is None:
            # The first and the last slice are both of m1 (see the next test for two models).
            expected[name] = tensor
    for out_index, (state, layer) in enumerate(sources):
        for name, tensor in states[state].items():
            found = find_layer(name)
            if found is not None and found[1] == layer:
                expected[renumber(name, out_index)] = tensor
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    # A plain copy: every input byte read once, nothing more.
    assert result.bytes_read == prepared.plan.input_bytes == prepared.plan.total_size
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert config["layer_types"] == ["m1-0", "m1-1", "m2-1", "m2-2", "m1-1"]


def test_passthrough_takes_the_last_slices_final_norm(tmp_path):
    folders, states = _family(tmp_path, llama=True)
    recipe = _write(
        tmp_path,
        "merge_method: passthrough\nslices:\n"
        "  - sources:\n      - {{model: {m1}, layer_range: [0, 2]}}\n"
        "  - sources:\n      - {{model: {m2}, layer_range: [2, 3]}}\n",
        folders,
    )
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    got = _read(tmp_path / "out")
    assert torch.equal(got["model.embed_tokens.weight"], states[1]["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], states[2]["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], states[2]["lm_head.weight"])
    assert torch.equal(
        got["model.layers.2.mlp.up_proj.weight"], states[2]["model.layers.2.mlp.up_proj.weight"]
    )


SLERP = """
merge_method: slerp
base_model: {m0}
slices:
  - sources:
      - {{model: {m1}, layer_range: [1, 3]}}
      - {{model: {m0}, layer_range: [0, 2]}}
    parameters:
      t: [0.1, 0.9]
  - sources:
      - {{model: {m0}, layer_range: [0, 3]}}
      - {{model: {m1}, layer_range: [0, 3]}}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - value: 0.3
"""


def test_sliced_slerp_matches_a_dense_reference(tmp_path):
    folders, states = _family(tmp_path, llama=True)
    recipe = _write(tmp_path, SLERP, folders)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    got = _read(tmp_path / "out")
    # Output layer -> (layer of m0, layer of m1, t of self_attn, t of the rest).
    stack = [(0, 1, 0.1, 0.1), (1, 2, 0.9, 0.9), (0, 0, 0.0, 0.3), (1, 1, 0.5, 0.3)]
    stack.append((2, 2, 1.0, 0.3))
    checked = 0
    for out_index, (la, lb, t_attn, t_rest) in enumerate(stack):
        for name in states[0]:
            found = find_layer(name)
            if found is None or found[1] != 0:
                continue
            t = t_attn if "self_attn" in name else t_rest
            a, b = states[0][renumber(name, la)], states[1][renumber(name, lb)]
            want = reference_slerp(a, b, t).to(torch.bfloat16)
            assert _max_steps(got[renumber(name, out_index)], want) <= 1, (out_index, name)
            checked += 1
    # Embeddings: the first slice's t at position 0 (its gradient's first anchor, 0.1); the
    # final norm and lm_head: the last slice's (which has none of its own: the top level's 0.3).
    for name, t in (("model.embed_tokens.weight", 0.1), ("model.norm.weight", 0.3)):
        want = reference_slerp(states[0][name], states[1][name], t).to(torch.bfloat16)
        assert _max_steps(got[name], want) <= 1, name
    assert checked == 5 * 9
    assert len(got) == 5 * 9 + 3  # and lm_head


LINEAR = """
merge_method: linear
slices:
  - sources:
      - {{model: {m0}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}
      - {{model: {m1}, layer_range: [1, 3]}}
    parameters: {{weight: [0.2, 0.8]}}
  - sources:
      - {{model: {m2}, layer_range: [2, 3]}}
      - {{model: {m1}, layer_range: [0, 1]}}
parameters: {{weight: 1.0}}
"""


def test_sliced_linear_matches_a_dense_reference(tmp_path, capsys):
    folders, states = _family(tmp_path, llama=True)
    recipe = _write(tmp_path, LINEAR, folders)
    assert cli.main(["plan", str(recipe)]) == 0
    table = capsys.readouterr().out
    assert (
        "| 0 | model 1 layer 0 + model 2 layer 1 | weight of model 1 0.3, weight of model 2 0.2 |"
        in table
    )
    assert (
        "| 2 | model 3 layer 2 + model 2 layer 0 | weight of model 3 1, weight of model 2 1 |"
        in table
    )
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    got = _read(tmp_path / "out")
    stack = [((0, 0), (1, 1), [0.3, 0.2]), ((0, 1), (1, 2), [0.3, 0.8]), ((2, 2), (1, 0), [1, 1])]
    for out_index, (x, y, weights) in enumerate(stack):
        for name in states[0]:
            found = find_layer(name)
            if found is None or found[1] != 0:
                continue
            inputs = [states[x[0]][renumber(name, x[1])], states[y[0]][renumber(name, y[1])]]
            want = dense_linear(inputs, weights)
            assert torch.equal(got[renumber(name, out_index)], want), (out_index, name)
    # The embeddings with the first slice's weights at position 0, the norm with the last's.
    embed = "model.embed_tokens.weight"
    assert torch.equal(got[embed], dense_linear([states[0][embed], states[1][embed]], [0.3, 0.2]))
    norm = "model.norm.weight"
    assert torch.equal(got[norm], dense_linear([states[2][norm], states[1][norm]], [1, 1]))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def test_our_format_stack_runs(tmp_path):
    folders, states = _family(tmp_path, llama=True)
    recipe = tmp_path / "ours.yaml"
    recipe.write_text(
        f"method: passthrough\nmodels:\n  a: {folders[1]}\n  b: {folders[2]}\n"
        'layers:\n  - a: 0-1\n  - b: "1-2"\n'
    )
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    got = _read(tmp_path / "out")
    name = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(got[name.format(2)], states[2][name.format(1)])
    assert torch.equal(got[name.format(1)], states[1][name.format(1)])


OURS_LINEAR = """
method: linear
models:
  m0: {m0}
  m1: {m1}
  m2: {m2}
parameters: {{weight: 1.0}}
layers:
  - m0: {{layers: 0-1, weight: 0.3}}
    m1: 1-2
    parameters: {{weight: {{default: {{gradient: [0.2, 0.8]}}, non_layer: 0.2}}}}
  - {{m2: 2, m1: 0}}
"""

MK_SLERP_PER_SLICE = """
merge_method: slerp
base_model: {m0}
slices:
  - sources:
      - {{model: {m0}, layer_range: [0, 2]}}
      - {{model: {m1}, layer_range: [1, 3]}}
    parameters: {{t: [0.1, 0.9]}}
  - sources:
      - {{model: {m0}, layer_range: [0, 3]}}
      - {{model: {m1}, layer_range: [0, 3]}}
parameters: {{t: 0.3}}
"""

OURS_SLERP_PER_ENTRY = """
models: {{a: {m0}, b: {m1}}}
t: 0.3
layers:
  - a: 0-1
    b: 1-2
    parameters: {{t: {{default: {{gradient: [0.1, 0.9]}}, non_layer: 0.1}}}}
  - {{a: 0-2, b: 0-2}}
"""


@pytest.mark.parametrize(
    ("ours", "mergekit"), [(OURS_LINEAR, LINEAR), (OURS_SLERP_PER_ENTRY, MK_SLERP_PER_SLICE)]
)
def test_our_entry_parameters_merge_as_mergekits_slice_parameters(tmp_path, ours, mergekit):
    """The same stack and parameters written both ways gives the same bytes (mergekit's form
    is checked against dense references above)."""
    folders, _ = _family(tmp_path, llama=True)
    outs = []
    for text, name in ((ours, "ours"), (mergekit, "mergekit")):
        recipe = tmp_path / f"{name}.yml"
        recipe.write_text(text.format(**{f"m{j}": f for j, f in enumerate(folders[:3])}))
        out = tmp_path / f"out-{name}"
        assert cli.main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
        outs.append(_read(out))
    assert outs[0].keys() == outs[1].keys()
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name]), name


def test_out_of_range_layer_range_is_one_line_and_writes_nothing(tmp_path, capsys):
    folders, _ = _family(tmp_path, llama=True)
    recipe = _write(
        tmp_path,
        "merge_method: passthrough\nslices:\n  - sources:\n"
        "      - {{model: {m1}, layer_range: [1, 4]}}\n",
        folders,
    )
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: slices[0].sources[0]: layer range [1, 4] is out of range")
    assert "has 3 layers" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def _ours_sliced(tmp_path: Path, folders: list[Path]) -> Path:
    """Our format: a linear merge of shifted layer ranges in small shards."""
    recipe = tmp_path / "ours.yaml"
    recipe.write_text(
        f"method: linear\nmodels:\n  x: {{path: {folders[0]}, weight: 0.3}}\n"
        f"  y: {{path: {folders[1]}, weight: 0.7}}\n  z: {{path: {folders[2]}, weight: 1}}\n"
        "layers:\n  - {x: 0-1, y: 1-2}\n  - {z: 2, y: 0}\n"
        "output: {shard_size: 8KB}\n"  # several shards (for resume and ranks)
    )
    return recipe


def test_verify_recomputes_the_renumbered_stack(tmp_path, capsys):
    folders, _ = _family(tmp_path, llama=True)
    recipe = _write(tmp_path, LINEAR, folders)
    out = tmp_path / "out"
    assert cli.main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    assert cli.main(["verify", str(out), "--recipe", str(recipe), "--full"]) == 0
    assert "30 recomputed" in capsys.readouterr().out
    # Output layer 2 is model 3's layer 2 with model 2's layer 0: change one element of it
    # (and fix up nothing else): verify recomputes it from those layers and finds it.
    name = "model.layers.2.mlp.up_proj.weight"
    tensors = _read(out)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    from safetensors.torch import save_file

    (shard,) = out.glob("*.safetensors")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert cli.main(["verify", str(out), "--recipe", str(recipe), "--full"]) != 0
    assert f"tensor {name!r} differs from what the recipe makes" in capsys.readouterr().out


def test_kill_then_resume_a_renumbered_stack(tmp_path):
    folders, _ = _family(tmp_path, llama=True)
    recipe = _ours_sliced(tmp_path, folders)
    reference = tmp_path / "ref" / "out"
    assert cli.main(["run", str(recipe), "--out", str(reference), "--quiet"]) == 0
    out = tmp_path / "run" / "out"
    out.parent.mkdir()
    proc = _run_subprocess(recipe, out, kill_at="shard-done:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert cli.main(["run", str(recipe), "--out", str(out), "--quiet", "--resume"]) == 0
    assert folder_files(out) == folder_files(reference)


# --------------------------------------------------------------------------- mergekit


# mergekit 0.1.5 as installed SLERPs each row of a matrix on its own, shardmerge the whole
# tensor (as mergekit's docs and earlier releases): the two agree where the rows' angles are
# alike, as between the same layer of a base and its fine-tune, not between unrelated layers.
# So the slices here pair equal layers; the dense reference above covers shifted ranges.
SLERP_ALIGNED = """
merge_method: slerp
base_model: {m0}
slices:
  - sources:
      - {{model: {m0}, layer_range: [0, 2]}}
      - {{model: {m1}, layer_range: [0, 2]}}
    parameters:
      t: [0.1, 0.9]
  - sources:
      - {{model: {m1}, layer_range: [1, 3]}}
      - {{model: {m0}, layer_range: [1, 3]}}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - value: 0.3
dtype: float32
out_dtype: bfloat16
"""


@needs_mergekit
@pytest.mark.parametrize(
    "config", [PASSTHROUGH, SLERP_ALIGNED, LINEAR], ids=["passthrough", "slerp", "linear"]
)
def test_agrees_with_mergekit(tmp_path, capsys, config):
    folders, _ = _family(tmp_path, llama=True)
    recipe = _write(tmp_path, config, folders)
    ours, theirs = ours_and_mergekits(tmp_path, recipe)
    for name, mine in ours.items():
        assert _max_steps(mine, theirs[name].to(mine.dtype)) <= (0 if config is PASSTHROUGH else 1)
    mine_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    their_config = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert mine_config["num_hidden_layers"] == their_config["num_hidden_layers"]
    capsys.readouterr()


@needs_gloo
@pytest.mark.slow
def test_ranks_split_a_renumbered_stack_and_match_one_process(tmp_path):
    folders, _ = _family(tmp_path, llama=True)
    recipe = _ours_sliced(tmp_path, folders)
    one = tmp_path / "one" / "out"  # the same folder name: the card's title is the name
    assert cli.main(["run", str(recipe), "--out", str(one), "--quiet"]) == 0
    assert len(list(one.glob("*.safetensors"))) > 2
    (tmp_path / "two").mkdir()
    out = tmp_path / "two" / "out"
    proc = _launch("env", 2, recipe, out)
    assert proc.returncode == 0, proc.stderr
    assert folder_files(out) == folder_files(one)


def test_an_unused_base_gives_the_config_and_nothing_is_read_from_it(tmp_path):
    folders, states = _family(tmp_path, llama=True)
    config = json.loads((folders[0] / "config.json").read_text())
    (folders[0] / "config.json").write_text(json.dumps({**config, "marker": "base"}))
    text = "merge_method: passthrough\nbase_model: {m0}\n" + PASSTHROUGH.split("\n", 2)[2]
    recipe = _write(tmp_path, text, folders)
    prepared = prepare(parse_recipe(recipe.read_text(), str(recipe)))
    assert prepared.models[0].ref.ref == str(folders[0])
    result = run_merge(prepared, out=tmp_path / "out", quiet=True)
    assert result.bytes_read == prepared.plan.total_size
    assert all(task.models and 0 not in task.models for task in prepared.plan.tasks)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["marker"] == "base" and written["num_hidden_layers"] == 5
    got = _read(tmp_path / "out")
    assert torch.equal(got["model.norm.weight"], states[1]["model.norm.weight"])


def test_mismatched_shapes_between_sources_name_the_slice(tmp_path, capsys):
    folders, states = _family(tmp_path, llama=True)
    odd = dict(states[2])
    odd["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(8, 16, dtype=torch.bfloat16)
    config = json.loads((folders[2] / "config.json").read_text())
    folders[2] = write_checkpoint(tmp_path / "odd", odd, config=config)
    recipe = _write(tmp_path, LINEAR, folders)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: slices[1]: tensor 'model.layers.0.self_attn.q_proj.weight'")
    assert "'model.layers.2.self_attn.q_proj.weight' of model 3" in err
    assert err.rstrip().endswith("has [8, 16]") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["multislerp", "karcher"])
def test_a_combine_that_returns_its_input_writes_that_inputs_bytes(tmp_path, capsys, method):
    """One model merged by itself comes out as it is (mergekit returns the tensor). That
    result is the input chunk's own memory, which goes back to the reader once merged: the
    engine writes a copy, not whatever the reader puts there next (found by
    benchmarks/differential.py: a stack of layers 2 then 0 of one model came out scrambled)."""
    folders, states = _family(tmp_path, llama=True)
    params = "parameters: {weight: 0.65}\n" if method == "multislerp" else ""
    recipe = tmp_path / "merge.yml"
    recipe.write_text(
        f"merge_method: {method}\n{params}slices:\n"
        f"  - sources: [{{model: {folders[2]}, layer_range: [2, 3]}}]\n"
        f"  - sources: [{{model: {folders[2]}, layer_range: [0, 1]}}]\n"
        "dtype: bfloat16\n"
    )
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    got = _read(tmp_path / "out")
    source = states[2]
    for name, tensor in got.items():
        layer = find_layer(name)
        want = source[name if layer is None else renumber(name, {0: 2, 1: 0}[layer[1]])]
        assert torch.equal(tensor, want), name
    capsys.readouterr()
