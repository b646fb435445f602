"""Bad recipes, checkpoints and output locations through the CLI.

Every refusal must: exit 2 (1 for failures during the write), print one ``error:`` line naming
the culprit and no traceback, leave both input folders byte-identical, and leave no output folder
that looks complete. Also ``--allow-pickle``: pickle checkpoints converted and merged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shardmerge import cli, pipeline
from shardmerge.shardio import file_digest
from tests.conftest import shard_filename, write_checkpoint

INDEX = "model.safetensors.index.json"
SHARD1 = shard_filename(1, 2)
SHARD2 = shard_filename(2, 2)


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(32, 8, generator=g)}
    for i in range(3):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
        t[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(16, 8, generator=g)
    t["model.norm.weight"] = torch.randn(8, generator=g)
    t["lm_head.weight"] = torch.randn(32, 8, generator=g)
    return t


# Model A's first shard: the embeddings and layer 0 (two 8x8-sized q_proj/up_proj pairs follow).
_SHARD1_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
]
CONFIG = {"model_type": "llama", "tie_word_embeddings": False}


@dataclass
class Setup:
    root: Path
    a: Path
    b: Path
    recipe: Path
    out: Path

    def write_recipe(self, text: str) -> Path:
        self.recipe.write_text(text.format(a=self.a, b=self.b, out=self.out))
        return self.recipe


def _build(root: Path, a: dict | None = None, b: dict | None = None) -> Setup:
    a = _tensors(0) if a is None else a
    b = _tensors(1) if b is None else b
    shard2 = [n for n in a if n not in _SHARD1_NAMES]
    write_checkpoint(root / "a", a, [_SHARD1_NAMES, shard2], CONFIG, {"tokenizer.json": '{"a": 1}'})
    write_checkpoint(root / "b", b, None, CONFIG)
    setup = Setup(root, root / "a", root / "b", root / "recipe.yaml", root / "out")
    setup.write_recipe(
        "models: {{a: {a}, b: {b}}}\nt: 0.5\noutput: {{dir: {out}, shard_size: 1KB}}\n"
    )
    return setup


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return _build(tmp_path)


def _tree_digest(*folders: Path) -> dict[str, str]:
    """sha256 of every file under ``folders`` (links: their target), by path."""
    digest = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in sorted(dirs + files):
                path = Path(root) / name
                if path.is_symlink():
                    digest[str(path)] = "link:" + os.readlink(path)
                elif path.is_file():
                    digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def _main(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _subprocess(*argv: object, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "shardmerge.cli", *(str(a) for a in argv)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _assert_one_error_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def _assert_no_complete_output(out: Path) -> None:
    assert not out.exists() or not (out / INDEX).exists()
    partial = out.parent / f".{out.name}.shardmerge-partial"
    assert not (partial / INDEX).exists()


def _refused(
    capsys: pytest.CaptureFixture[str],
    setup: Setup,
    *needles: str,
    argv: tuple[object, ...] = (),
    code: int = 2,
) -> str:
    """Run ``run RECIPE --quiet *argv`` in-process; assert a clean refusal; return stderr."""
    before = _tree_digest(setup.a, setup.b)
    rc, _, err = _main(capsys, "run", setup.recipe, "--quiet", *argv)
    assert rc == code, err
    _assert_one_error_line(err, *needles)
    assert _tree_digest(setup.a, setup.b) == before
    _assert_no_complete_output(setup.out)
    return err


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        pytest.param(
            "models: {{a: {a}, b: {b}}}\nt: 0.5\noutput: [dir: {out}\n",
            ["YAML syntax error", "line 4"],
            id="yaml-syntax",
        ),
        pytest.param(
            "models: {{a: {a}, b: {b}}}\nt: 0.5\noutputs: {{dir: {out}}}\n",
            ["outputs: unknown key", "did you mean 'output'"],
            id="unknown-key",
        ),
        pytest.param(
            "models: {{a: {a}, b: {b}}}\nt: 0.5\noutput: {{dir: {out}, shard_size: [1]}}\n",
            ["output.shard_size", "got a list"],
            id="wrong-type",
        ),
        pytest.param(
            "models: {{a: {a}, b: {b}}}\nt: 1.5\noutput: {{dir: {out}}}\n",
            ["t: 1.5 is outside [0, 1]"],
            id="t-out-of-range",
        ),
        pytest.param(
            "models: {{a: {a}, b: {b}}}\nt: .nan\noutput: {{dir: {out}}}\n",
            ["t:", "finite", "nan"],
            id="t-nan",
        ),
        pytest.param(
            "models: {{a: {a}/nope, b: {b}}}\nt: 0.5\noutput: {{dir: {out}}}\n",
            ["models.a", "/nope", "not a folder and not a Hub repo id"],
            id="missing-model",
        ),
        pytest.param(
            "merge_method: slerp\nbase_model: {a}\nmodels: [{{model: {b}}}]\n"
            "parameters: {{t: 0.5}}\nchat_template: vicuna\n",
            ["chat_template", "expected chatml, auto or a Jinja template"],
            id="mergekit-chat-template",
        ),
        pytest.param(
            "merge_method: tiess\nbase_model: {a}\nmodels: [{{model: {b}}}]\n"
            "parameters: {{t: 0.5}}\n",
            ["merge_method", "unknown merge method 'tiess'", "supported methods: arcee_fusion"],
            id="mergekit-method",
        ),
        pytest.param(
            "models: {{a: {a}, b: {b}}}\noutput: {{dir: {out}}}\n"
            "t: {{default: 0.5, rules: [{{match: '*self_attn*', value: 0.3}}]}}\n",
            ["t.rules[0]", "'*self_attn*' matches no tensor", "globs are not", "'self_attn'"],
            id="rule-glob-matches-nothing",
        ),
        pytest.param(
            "models: {{a: {a}, b: {b}}}\noutput: {{dir: {out}}}\n"
            "t: {{default: 0.5, rules: [{{regex: 'mlp\\.gate', value: 0.3}}]}}\n",
            ["t.rules[0]", "matches no tensor", "model.layers.0."],
            id="rule-regex-matches-nothing",
        ),
        pytest.param(
            "models: {{a: {a}, b: {b}}}\noutput: {{dir: {out}}}\n"
            "t: {{default: 0.5, non_layer: 0.5, rules: [{{match: mlp, layers: {{7: 0.5}}}}]}}\n",
            ["t.rules[0].layers", "layer 7", "3 layers (0-2)"],
            id="layer-map-beyond-depth",
        ),
        pytest.param(
            "merge_method: slerp\nbase_model: {a}\nmodels: [{{model: {b}}}]\n"
            "parameters: {{t: [{{filter: self_atn, value: 0.3}}, {{value: 0.5}}]}}\n",
            ["parameters.t[0]", "'self_atn' matches no tensor"],
            id="mergekit-filter-matches-nothing",
        ),
        pytest.param(
            "merge_method: ties\nmodels: [{{model: {b}, parameters: {{weight: 1}}}}]\n",
            ["base_model: missing; ties needs a base_model"],
            id="mergekit-ties-without-base",
        ),
        pytest.param(
            "merge_method: ties\nbase_model: {a}\n"
            "models: [{{model: {b}, parameters: {{weight: 1, density: 1.5}}}}]\n",
            ["models[0].parameters.density: 1.5", "outside [0, 1]"],
            id="mergekit-density-out-of-range",
        ),
        pytest.param(
            "merge_method: ties\nbase_model: {a}\nmodels: [{{model: {b}}}]\n",
            ["models[0].parameters.weight: missing; ties needs a weight"],
            id="mergekit-ties-without-weight",
        ),
        pytest.param(
            "merge_method: dare_ties\nbase_model: {a}\n"
            "models: [{{model: {b}, parameters: {{weight: 1, densty: 0.5}}}}]\n",
            ["models[0].parameters.densty: unknown parameter for dare_ties", "'density'"],
            id="mergekit-misspelt-parameter",
        ),
        pytest.param(
            "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 0}}}},"
            " {{model: {b}, parameters: {{weight: 0}}}}]\n",
            ["models: the weights sum to 0 and normalize divides by their sum"],
            id="mergekit-linear-zero-weights",
        ),
    ],
)
def test_bad_recipe(capsys, setup, text, needles):
    setup.write_recipe(text)
    err = _refused(capsys, setup, *needles, argv=("--out", setup.out))
    assert str(setup.recipe) in err or "models.a" in err or "error: models: " in err
    assert not setup.out.exists()


def test_bad_recipe_in_a_subprocess(setup):
    setup.write_recipe("models: {{a: {a}, b: {b}}}\nt:\n  default: 0.5\n bad: [\n")
    rc, out, err = _subprocess("run", setup.recipe, "--quiet")
    assert rc == 2 and out == ""
    _assert_one_error_line(err, str(setup.recipe), "YAML syntax error", "line 4")


def test_same_model_twice_is_a_warning(capsys, setup):
    setup.write_recipe("models: {{a: {a}, b: {a}}}\nt: 0.5\noutput: {{dir: {out}}}\n")
    rc, out, err = _main(capsys, "run", setup.recipe, "--quiet")
    assert rc == 0, err
    assert "warning: models.a and models.b are the same model" in err
    assert "Traceback" not in err and "error" not in err
    assert (setup.out / INDEX).is_file()


# --------------------------------------------------------------------------- checkpoints


def _edit_index(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / INDEX
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def _edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a shard's JSON header, keeping its data bytes."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def _set(name: str, **fields: object) -> Callable[[dict], None]:
    return lambda header: header[name].update(fields)


Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


def _entry(path: Path, name: str) -> dict:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])[name]


def _missing_shard(s: Setup) -> None:
    (s.a / SHARD2).unlink()


def _relative_escape(s: Setup) -> None:
    _edit_index(s.a, lambda i: i["weight_map"].update({"lm_head.weight": "../x.safetensors"}))


def _absolute_escape(s: Setup) -> None:
    target = str(s.b / "model.safetensors")
    _edit_index(s.a, lambda i: i["weight_map"].update({"lm_head.weight": target}))


def _symlink_escape(s: Setup) -> None:
    outside = s.root / "elsewhere.safetensors"
    shutil.move(s.a / SHARD2, outside)
    (s.a / SHARD2).symlink_to(outside)


def _truncated(s: Setup) -> None:
    path = s.a / SHARD2
    path.write_bytes(path.read_bytes()[:-100])


def _header_too_long(s: Setup) -> None:
    path = s.a / SHARD1
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data)) + data[8:])


def _header_not_json(s: Setup) -> None:
    path = s.a / SHARD1
    data = bytearray(path.read_bytes())
    data[8] = ord("[")  # the header's opening brace
    path.write_bytes(bytes(data))


def _out_of_bounds(s: Setup) -> None:
    _edit_header(s.a / SHARD1, _set(Q0, data_offsets=[1 << 40, (1 << 40) + 256]))


def _overlapping(s: Setup) -> None:
    # q_proj of layers 0 and 1 are both 8x8 float32: give layer 1 the bytes of layer 0.
    offsets = _entry(s.a / SHARD1, Q0)["data_offsets"]
    _edit_header(s.a / SHARD1, _set(Q1, data_offsets=offsets))


def _size_mismatch(s: Setup) -> None:
    _edit_header(s.a / SHARD1, _set(Q0, shape=[8, 9]))


def _unknown_dtype(s: Setup) -> None:
    _edit_header(s.a / SHARD1, _set(Q0, dtype="F17"))


def _empty_folder(s: Setup) -> None:
    for path in s.a.iterdir():
        path.unlink()


@pytest.mark.parametrize(
    ("break_it", "needles"),
    [
        pytest.param(_missing_shard, [SHARD2, "is missing"], id="index-names-missing-shard"),
        pytest.param(_relative_escape, ["'../x.safetensors'", "escapes"], id="escape-dotdot"),
        pytest.param(_absolute_escape, ["must be relative"], id="escape-absolute"),
        pytest.param(_symlink_escape, [SHARD2, "points outside"], id="escape-symlink"),
        pytest.param(_truncated, [SHARD2, "truncated"], id="truncated-shard"),
        pytest.param(_header_too_long, [SHARD1, "header length"], id="header-longer-than-file"),
        pytest.param(_header_not_json, [SHARD1, "not valid JSON"], id="header-invalid-json"),
        pytest.param(_out_of_bounds, [SHARD1, Q0, "data_offsets end at"], id="offsets-oob"),
        pytest.param(_overlapping, [SHARD1, Q0, Q1, "overlap"], id="offsets-overlap"),
        pytest.param(_size_mismatch, [SHARD1, Q0, "shape [8, 9] x F32"], id="offsets-vs-shape"),
        pytest.param(_unknown_dtype, [SHARD1, Q0, "unknown dtype 'F17'"], id="unknown-dtype"),
        pytest.param(_empty_folder, ["model A", "empty or not a model folder"], id="empty-folder"),
    ],
)
def test_bad_checkpoint(capsys, setup, break_it, needles):
    break_it(setup)
    _refused(capsys, setup, "model A", *needles)
    assert not setup.out.exists()


def test_truncated_shard_in_a_subprocess(setup):
    _truncated(setup)
    before = _tree_digest(setup.a, setup.b)
    rc, _, err = _subprocess("run", setup.recipe, "--quiet")
    assert rc == 2
    _assert_one_error_line(err, "model A", SHARD2, "truncated")
    assert _tree_digest(setup.a, setup.b) == before
    assert not setup.out.exists()


def _differing(tmp_path: Path, change: Callable[[dict], None]) -> Setup:
    b = _tensors(1)
    change(b)
    return _build(tmp_path, b=b)


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        pytest.param(
            lambda b: b.pop("model.norm.weight"),
            ["'model.norm.weight' is in model A", "but not in model B"],
            id="names-differ",
        ),
        pytest.param(
            lambda b: b.update({Q1: torch.zeros(8, 4)}),
            [Q1, "shape [8, 8] in model A", "vs [8, 4] in model B"],
            id="shapes-differ",
        ),
        pytest.param(
            lambda b: b.update({Q1: torch.zeros(8, 8, dtype=torch.int32)}),
            [Q1, "F32 in model A", "I32 in model B", "float tensor with an integer"],
            id="float-vs-int",
        ),
        pytest.param(
            lambda b: b.update({Q1: torch.zeros(8, 8).to(torch.float8_e4m3fn)}),
            ["model B", "F8_E4M3", "not supported"],
            id="fp8",
        ),
    ],
)
def test_mismatched_models(capsys, tmp_path, change, needles):
    setup = _differing(tmp_path, change)
    _refused(capsys, setup, *needles)
    assert not setup.out.exists()


# --------------------------------------------------------------------------- pickle weights


def _save_pickle_model(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    folder.mkdir(parents=True)
    names = list(tensors)
    if shards == 1:
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        weight_map = {}
        for i in range(shards):
            file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            part = names[i::shards]
            torch.save({n: tensors[n] for n in part}, folder / file)
            weight_map.update(dict.fromkeys(part, file))
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer.json").write_text('{"pickled": true}')
    return folder


def _pickle_setup(root: Path) -> Setup:
    a = _tensors(0)
    a["model.layers.0.self_attn.q_proj.weight"] = a[Q0].t()  # non-contiguous: copied on save
    _save_pickle_model(root / "a", {k: v.bfloat16() for k, v in a.items()})
    _save_pickle_model(root / "b", {k: v.bfloat16() for k, v in _tensors(1).items()}, shards=2)
    setup = Setup(root, root / "a", root / "b", root / "recipe.yaml", root / "out")
    setup.write_recipe("models: {{a: {a}, b: {b}}}\nt: 0.3\noutput: {{dir: {out}}}\n")
    return setup


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX).read_text())
    out = {}
    for name, file in index["weight_map"].items():
        with safe_open(folder / file, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def test_pickle_only_folder_is_refused_by_default(capsys, tmp_path):
    setup = _pickle_setup(tmp_path)
    _refused(
        capsys,
        setup,
        "model A",
        "pytorch_model.bin",
        "can run code",
        "save_pretrained(safe_serialization=True)",
        "--allow-pickle",
    )


def test_allow_pickle_merges_like_safetensors(capsys, monkeypatch, tmp_path):
    setup = _pickle_setup(tmp_path / "pickle")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    before = _tree_digest(setup.a, setup.b)
    rc, _, err = _main(capsys, "run", setup.recipe, "--quiet", "--allow-pickle")
    assert rc == 0, err
    assert _tree_digest(setup.a, setup.b) == before
    assert len(calls) == 3  # one single-file model, one model in two files
    assert all(c.get("weights_only") is True and c.get("mmap") is True for c in calls)

    # The same tensors as safetensors checkpoints give the same merge.
    ref = tmp_path / "ref"
    for side in ("a", "b"):
        tensors = {}
        for file in sorted((setup.root / side).glob("*.bin")):
            tensors.update(real_load(file, weights_only=True))
        write_checkpoint(ref / side, tensors, None, CONFIG)
    text = f"models: {{a: {ref / 'a'}, b: {ref / 'b'}}}\nt: 0.3\noutput: {{dir: {ref / 'out'}}}\n"
    (ref / "recipe.yaml").write_text(text)
    assert _main(capsys, "run", ref / "recipe.yaml", "--quiet")[0] == 0
    merged, expected = _read_tensors(setup.out), _read_tensors(ref / "out")
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(merged[name], value), name
    assert (setup.out / "tokenizer.json").read_text() == '{"pickled": true}'
    assert json.loads((setup.out / "config.json").read_text())["model_type"] == "llama"


def test_allow_pickle_in_a_subprocess_cleans_its_scratch(tmp_path):
    setup = _pickle_setup(tmp_path / "m")
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    rc, out, err = _subprocess("validate", setup.recipe, "--allow-pickle", env=env)
    assert rc == 0, err
    assert "merges 9 tensors" in out
    assert list(scratch.iterdir()) == []  # the converted copies go at exit


def test_allow_pickle_still_refuses_code(capsys, tmp_path):
    setup = _pickle_setup(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model.norm.weight": Payload()}, setup.a / "pytorch_model.bin")
    _refused(
        capsys,
        setup,
        "model A",
        "pytorch_model.bin",
        "weights_only=True) refused it",
        "could run code",
        argv=("--allow-pickle",),
    )
    assert not marker.exists()


def test_allow_pickle_corrupt_file(capsys, tmp_path):
    setup = _pickle_setup(tmp_path)
    path = setup.a / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:300])
    _refused(
        capsys, setup, "model A", "pytorch_model.bin", "cannot be loaded", argv=("--allow-pickle",)
    )


def test_allow_pickle_output_inside_the_pickle_folder(capsys, tmp_path):
    setup = _pickle_setup(tmp_path)
    setup.out = setup.a / "merged"
    setup.write_recipe("models: {{a: {a}, b: {b}}}\nt: 0.3\noutput: {{dir: {out}}}\n")
    _refused(capsys, setup, "is inside input folder", str(setup.a), argv=("--allow-pickle",))
    assert not setup.out.exists()


# --------------------------------------------------------------------------- output location


def test_output_inside_an_input_folder(capsys, setup):
    setup.out = setup.b / "merged"
    setup.write_recipe("models: {{a: {a}, b: {b}}}\nt: 0.5\noutput: {{dir: {out}}}\n")
    _refused(capsys, setup, str(setup.out), "inside input folder", str(setup.b))
    assert not setup.out.exists()


def test_existing_non_empty_output(capsys, setup):
    setup.out.mkdir()
    (setup.out / "keep.txt").write_text("mine")
    _refused(capsys, setup, str(setup.out), "not empty", "--overwrite")
    assert [p.name for p in setup.out.iterdir()] == ["keep.txt"]
    assert (setup.out / "keep.txt").read_text() == "mine"


def test_output_not_writable(setup):
    parent = setup.root / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    setup.out = parent / "out"
    setup.write_recipe("models: {{a: {a}, b: {b}}}\nt: 0.5\noutput: {{dir: {out}}}\n")
    prefix: list[str] = []
    if os.geteuid() == 0:
        # root writes through 0o555; without CAP_DAC_OVERRIDE it is refused like anyone.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root (chmod does not stop writes) and setpriv is missing")
        prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]
    before = _tree_digest(setup.a, setup.b)
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "shardmerge.cli", "run", str(setup.recipe), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    _assert_one_error_line(proc.stderr, str(parent), "not writable")
    assert _tree_digest(setup.a, setup.b) == before
    assert list(parent.iterdir()) == []


def test_not_enough_free_space(capsys, monkeypatch, setup):
    usage = shutil.disk_usage(setup.root)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1000))
    _refused(capsys, setup, "not enough free space", str(setup.out))
    assert not setup.out.exists()


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_disk_full_mid_write_then_resume(capsys, monkeypatch, setup):
    ref = setup.root / "ref"
    # Titled as the resumed output will be (the card's title is the output folder's name).
    assert _main(capsys, "run", setup.recipe, "--quiet", "--out", ref, "--name", "out")[0] == 0
    shards = len(list(ref.glob("model-*.safetensors")))
    assert shards >= 4

    real_pwrite = os.pwrite
    calls = []

    def pwrite(fd: int, data: object, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    err = _refused(capsys, setup, str(setup.out), "No space left on device", "--resume", code=1)
    assert "rerun the same command with --resume" in err
    assert not setup.out.exists()
    partial = setup.root / ".out.shardmerge-partial"
    record = json.loads((partial / ".shardmerge-progress.json").read_text())
    kept = record["shards"]
    assert 1 <= len(kept) < shards
    for name, entry in kept.items():  # finished shards are kept, whole
        assert file_digest(partial / name) == entry["digest"]

    monkeypatch.setattr(os, "pwrite", real_pwrite)
    results = []
    real_run = pipeline.run_merge
    monkeypatch.setattr(
        pipeline, "run_merge", lambda *a, **k: results.append(real_run(*a, **k)) or results[-1]
    )
    rc, _, err = _main(capsys, "run", setup.recipe, "--quiet", "--resume")
    assert rc == 0, err
    assert results[0].skipped_shards == len(kept)
    assert _folder_bytes(setup.out) == _folder_bytes(ref)
    assert not partial.exists()


# --------------------------------------------------------------------------- errors in threads


def test_input_changed_during_the_run(capsys, monkeypatch, setup):
    """The reader thread finds a shard truncated after planning: a clean exit 2."""
    real_prepare = pipeline.prepare

    def prepare_then_truncate(*args, **kwargs):
        prepared = real_prepare(*args, **kwargs)
        _truncated(setup)
        return prepared

    monkeypatch.setattr(pipeline, "prepare", prepare_then_truncate)
    rc, _, err = _main(capsys, "run", setup.recipe, "--quiet")
    assert rc == 2
    _assert_one_error_line(err, "model A", SHARD2, "truncated")
    _assert_no_complete_output(setup.out)
    assert not setup.out.exists()


def test_nan_in_an_input_is_bad_input_naming_the_model(capsys, tmp_path):
    b = _tensors(1)
    b[Q1][3, 3] = float("nan")
    setup = _build(tmp_path, b=b)
    _refused(capsys, setup, Q1, f"model B ({setup.b})", "NaN or Inf", code=2)
    assert not setup.out.exists()


def test_read_error_names_the_input(capsys, monkeypatch, setup):
    """An I/O error in the reader thread names the input, not the output."""

    def preadv(*args: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", preadv)
    err = _refused(capsys, setup, "model A", "reading", "Input/output error", code=1)
    assert "writing" not in err
    assert not setup.out.exists()


# --------------------------------------------------------------------------- options, checked first


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        pytest.param(("--device", "gpu"), ["--device 'gpu'", "cuda:N"], id="device-gpu"),
        pytest.param(("--device", "mps"), ["--device 'mps'", "cuda:N"], id="device-mps"),
        pytest.param(
            ("--push-to-hub", "notvalid", "--dry-run"),
            ["--push-to-hub 'notvalid'", "org/name"],
            id="push-repo-id",
        ),
        pytest.param(
            ("--push-to-hub", "me/a--b"), ["--push-to-hub 'me/a--b'"], id="push-repo-id-dashes"
        ),
        pytest.param(("--dry-run",), ["--dry-run needs --push-to-hub"], id="dry-run-alone"),
    ],
)
def test_bad_option_is_refused_before_anything_is_written(capsys, setup, argv, needles):
    before = _listing(setup.root)
    _refused(capsys, setup, *needles, argv=argv)
    assert _listing(setup.root) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_in_the_recipe_writes_nothing(capsys, setup):
    setup.write_recipe("models: {{a: {a}, b: {b}}}\nt: 0.5\noutput: {{dir: {out}}}\ndevice: cuda\n")
    before = _listing(setup.root)
    _refused(capsys, setup, "'cuda'", "CUDA is not available")
    assert _listing(setup.root) == before  # no working folder with README, config, tokenizer
    rc, _, err = _main(capsys, "validate", setup.recipe)
    assert rc == 2 and "CUDA is not available" in err


def _shardmerge_output(setup: Setup, capsys: pytest.CaptureFixture[str], out: Path) -> None:
    rc, _, err = _main(capsys, "run", setup.recipe, "--quiet", "--out", out)
    assert rc == 0, err


def test_overwrite_refuses_a_folder_shardmerge_did_not_write(capsys, setup):
    sandbox = setup.root / "sandbox"
    sandbox.mkdir()
    (sandbox / "important.txt").write_text("precious")
    setup.out = sandbox
    _refused(
        capsys,
        setup,
        str(sandbox),
        "not written by shardmerge",
        argv=("--out", sandbox, "--overwrite"),
    )
    assert (sandbox / "important.txt").read_text() == "precious"


def test_overwrite_never_replaces_the_current_directory_or_its_parents(capsys, monkeypatch, setup):
    out = setup.root / "merged"
    _shardmerge_output(setup, capsys, out)  # ours: --overwrite could replace it from elsewhere
    (out / "sub").mkdir()
    before = _listing(setup.root)
    for cwd, target, what in [
        (out, ".", "the current directory"),
        (out / "sub", "..", "a parent of the current directory"),
    ]:
        monkeypatch.chdir(cwd)
        rc, _, err = _main(capsys, "run", setup.recipe, "--quiet", "--out", target, "--overwrite")
        assert rc == 2, err
        _assert_one_error_line(err, str(out), what)
    monkeypatch.chdir(setup.root)
    monkeypatch.setenv("HOME", str(out))
    rc, _, err = _main(capsys, "run", setup.recipe, "--quiet", "--out", out, "--overwrite")
    assert rc == 2
    _assert_one_error_line(err, "your home folder")
    assert _listing(setup.root) == before


def test_overwrite_refuses_a_folder_holding_an_input(capsys, setup):
    setup.out = setup.root
    _refused(capsys, setup, "contains input folder", argv=("--out", setup.root, "--overwrite"))


def test_overwrite_through_a_symlink_replaces_its_target_and_leaves_nothing(capsys, setup):
    target = setup.root / "target"
    _shardmerge_output(setup, capsys, target)
    link = setup.root / "link"
    link.symlink_to(target)
    rc, _, err = _main(capsys, "run", setup.recipe, "--quiet", "--out", link, "--overwrite")
    assert rc == 0, err
    assert link.is_symlink() and link.resolve() == target
    assert (target / INDEX).is_file()
    assert sorted(p.name for p in setup.root.iterdir()) == [
        "a", "b", "link", "recipe.yaml", "target"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("prepare", "needles"),
    [
        pytest.param("inside-input", ["inside input folder"], id="inside-input"),
        pytest.param("non-empty", ["not empty", "--overwrite"], id="non-empty"),
        pytest.param("locked", ["being written by another shardmerge run", "pid"], id="locked"),
    ],
)
def test_validate_refuses_what_run_refuses(capsys, setup, prepare, needles):
    from shardmerge.output import output_lock

    if prepare == "inside-input":
        setup.out = setup.a / "merged"
    elif prepare == "non-empty":
        setup.out.mkdir()
        (setup.out / "keep.txt").write_text("mine")
    before = _listing(setup.root)
    with output_lock(setup.out) if prepare == "locked" else _nothing():
        for command in ("validate", "run"):
            rc, out, err = _main(capsys, command, setup.recipe, "--out", setup.out, "--quiet")
            assert rc == 2, (command, err)
            _assert_one_error_line(err, *needles)
    assert _listing(setup.root) == before
    rc, out, err = _main(capsys, "validate", setup.recipe, "--out", setup.root / "fresh")
    assert rc == 0, err
    assert out.startswith(f"ok: {setup.recipe} merges 9 tensors") and "into" in out


def _nothing():  # type: ignore[no-untyped-def]
    import contextlib

    return contextlib.nullcontext()
