"""The command line: commands, exit codes, output streams, start-up cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardmerge import __version__
from shardmerge.cli import main
from tests.conftest import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _pair(tmp_path: Path, shape_b: tuple[int, int] = (8, 4)) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    a = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(8, 4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g),
    }
    b = dict(a)
    b["model.layers.1.mlp.up_proj.weight"] = torch.randn(*shape_b, generator=g)
    write_checkpoint(tmp_path / "a", a, [list(a)[:1], list(a)[1:]], {"model_type": "llama"})
    write_checkpoint(tmp_path / "b", b, None, {"model_type": "llama"})
    return tmp_path / "a", tmp_path / "b"


def _recipe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    return path


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out
    assert main([]) == 2  # no command: usage, bad-usage exit code


def test_validate_and_plan(tmp_path, capsys):
    a, b = _pair(tmp_path)
    recipe = _recipe(tmp_path, f"models: {{a: {a}, b: {b}}}\nt: 0.3\n")
    assert main(["validate", str(recipe)]) == 0
    assert "3 tensors" in capsys.readouterr().out
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "model-00001-of-00001.safetensors" in out and "0.3" in out
    assert "estimated peak memory" in out


def test_run_mergekit_config_needs_out(tmp_path, capsys):
    a, b = _pair(tmp_path)
    config = (
        f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
        "parameters:\n  t:\n    - filter: mlp\n      value: [0, 1]\n    - value: 0.5\n"
        "dtype: float32\n"
    )
    recipe = _recipe(tmp_path, config)
    assert main(["run", str(recipe), "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 3


def test_bad_recipe_exit_2_and_no_output(tmp_path, capsys):
    a, b = _pair(tmp_path)
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, f"models: {{a: {a}, b: {b}}}\nt: 1.5\nouptut: {{dir: {out}}}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'output'" in err and "1.5" in err and "Traceback" not in err
    assert not out.exists()


def test_shape_mismatch_reported_before_any_write(tmp_path, capsys):
    a, b = _pair(tmp_path, shape_b=(4, 8))
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, f"models: {{a: {a}, b: {b}}}\nt: 0.5\noutput: {{dir: {out}}}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "[8, 4]" in err and "[4, 8]" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_output_refusals(tmp_path, capsys):
    a, b = _pair(tmp_path)
    recipe = _recipe(tmp_path, f"models: {{a: {a}, b: {b}}}\nt: 0.5\n")
    assert main(["run", str(recipe), "--out", str(a / "merged")]) == 2
    assert "inside input folder" in capsys.readouterr().err
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what shardmerge wrote.
    assert main(["run", str(recipe), "--out", str(out), "--quiet", "--overwrite"]) == 2
    assert "not written by shardmerge" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0  # empty: fine
    recipe.write_text(f"models: {{a: {a}, b: {b}}}\nt: 0.25\n")
    assert main(["run", str(recipe), "--out", str(out), "--quiet", "--overwrite"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "t: 0.25" in (out / "README.md").read_text() and index["metadata"]["shardmerge"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_help_and_validate_do_not_import_torch(tmp_path):
    a, b = _pair(tmp_path)
    recipe = _recipe(tmp_path, f"models: {{a: {a}, b: {b}}}\nt: 0.5\n")
    code = (
        "import sys; from shardmerge.cli import main\n"
        "try: rc = main(sys.argv[1:])\n"
        "except SystemExit as exc: rc = exc.code\n"  # --help
        "print(sorted(m for m in ('torch', 'huggingface_hub') if m in sys.modules)); sys.exit(rc)"
    )
    for args in (["validate", str(recipe)], ["plan", str(recipe)], ["--help"], ["compare", "-h"]):
        done = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env()
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("[]"), args


def test_command_exit_after_torch_keeps_code_output_and_exit_handlers(tmp_path):
    """The console script skips the interpreter's teardown once torch is loaded: the exit code,
    buffered output on pipes and atexit handlers must survive that."""
    g = torch.Generator().manual_seed(1)
    a = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g)}
    b = {"model.layers.0.mlp.up_proj.weight": torch.full((8, 4), float("nan"))}
    write_checkpoint(tmp_path / "a", a, [list(a)], {"model_type": "llama"})
    write_checkpoint(tmp_path / "b", b, [list(b)], {"model_type": "llama"})
    recipe = _recipe(tmp_path, f"models: {{a: {tmp_path / 'a'}, b: {tmp_path / 'b'}}}\nt: 0.5\n")
    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, pathlib, sys; from shardmerge.cli import entry; "
        f"atexit.register(pathlib.Path({str(marker)!r}).touch); sys.argv[1:] = {{args}}; entry()"
    )
    runs = {
        "fails": ["run", str(recipe), "--out", str(tmp_path / "bad"), "--quiet"],
        "works": ["plan", str(recipe)],
    }
    for name, args in runs.items():
        marker.unlink(missing_ok=True)
        done = subprocess.run(
            [sys.executable, "-c", code.format(args=args)],
            capture_output=True, text=True, env=_env(),
        )  # fmt: skip
        if name == "fails":  # torch was loaded: the fast exit
            assert done.returncode == 2, done.stderr  # bad input
            assert done.stderr.strip() == (
                f"error: tensor 'model.layers.0.mlp.up_proj.weight' in model B ({tmp_path / 'b'}) "
                "contains NaN or Inf values"
            )
            assert not (tmp_path / "bad").exists()
        else:  # no torch: the ordinary exit
            assert done.returncode == 0, done.stderr
            assert "input bytes read: 256" in done.stdout
        assert marker.exists(), name


def test_torch_is_imported_without_garbage_collections():
    """import_torch pauses the cyclic collector (full collections cost 0.1 s of the import),
    freezes what the import made (or the next full collection walks it all again) and leaves the
    collector as it found it; a plain import collects many times."""
    code = (
        "import gc, sys\n"
        "runs = []\n"
        "gc.callbacks.append(lambda phase, info: runs.append(phase) if phase == 'start' else None)\n"
        "from shardmerge import import_torch\n"
        "runs.clear()\n"
        "if sys.argv[1] == 'ours':\n"
        "    torch = import_torch()\n"
        "else:\n"
        "    import torch\n"
        "print(len(runs), gc.isenabled(), 'torch' in sys.modules, gc.get_freeze_count())\n"
    )
    counts = {}
    for mode in ("ours", "plain"):
        done = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, env=_env()
        )
        assert done.returncode == 0, done.stderr
        runs, enabled, loaded, frozen = done.stdout.split()
        assert (enabled, loaded) == ("True", "True")
        counts[mode] = (int(runs), int(frozen))
    # No collection during our import, and torch's objects frozen out of later ones.
    assert counts["ours"][0] == 0 and counts["ours"][1] > 100_000
    assert counts["plain"][0] > 0 and counts["plain"][1] == 0


def test_demo_command_from_readme(tmp_path):
    """The README's second set-up command, run as a user would (console script, repo root)."""
    exe = Path(sys.executable).with_name("shardmerge")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "shardmerge.cli"]
    out = tmp_path / "merged-demo"
    done = subprocess.run(
        [*cmd, "run", "recipes/demo.yaml", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "merged 39 tensors" in done.stdout
    assert "merging" in done.stderr  # the progress bar goes to stderr
    assert {"config.json", "tokenizer.json", "README.md", "model.safetensors.index.json"} <= {
        p.name for p in out.iterdir()
    }


def test_relative_paths_in_our_recipes_are_from_the_recipe_folder(tmp_path, monkeypatch, capsys):
    a, b = _pair(tmp_path / "models")
    sub = tmp_path / "recipes"
    sub.mkdir()
    recipe = sub / "r.yaml"
    recipe.write_text("models: {a: ../models/a, b: ../models/b}\nt: 0.5\noutput: {dir: out}\n")
    for cwd in (tmp_path, sub, a):  # the same meaning from anywhere
        monkeypatch.chdir(cwd)
        assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err
    assert main(["run", str(recipe), "--quiet"]) == 0, capsys.readouterr().err
    assert (sub / "out" / "model.safetensors.index.json").is_file()  # output.dir too
    # Written from the current directory's point of view: the error says where each is.
    monkeypatch.chdir(tmp_path)
    recipe.write_text("models: {a: models/a, b: ../models/b}\nt: 0.5\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: models.a: 'models/a' is not a folder here ({sub / 'models/a'}): relative paths "
        f"in a shardmerge recipe start from the recipe's folder ({sub}); it is a folder from the "
        f"current directory ({Path('models/a').absolute()}): write that path instead\n"
    )


def test_relative_paths_in_mergekit_configs_are_from_the_current_directory(
    tmp_path, monkeypatch, capsys
):
    _pair(tmp_path / "models")
    config = tmp_path / "models" / "config.yaml"
    config.write_text(
        "merge_method: slerp\nbase_model: a\nmodels: [{model: b}]\nparameters: {t: 0.5}\n"
    )
    monkeypatch.chdir(tmp_path / "models")
    assert main(["validate", str(config)]) == 0, capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # as mergekit would, a and b are looked for here
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "models.a: 'a' is not a folder here" in err
    assert "a mergekit config start from the current directory, as in mergekit" in err
    assert f"it is a folder from the recipe's folder {tmp_path / 'models'}" in err


def test_demo_validates_from_the_recipes_folder():
    for cwd, recipe in ((ROOT, "recipes/demo.yaml"), (ROOT / "recipes", "demo.yaml")):
        done = subprocess.run(
            [sys.executable, "-m", "shardmerge", "validate", recipe],
            cwd=cwd, capture_output=True, text=True, env=_env(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"into {ROOT / 'merged-demo'}" in done.stdout


def test_wall_time_estimate_adds_a_disks_reads_and_writes_and_takes_the_slowest_disk():
    from shardmerge.diskrate import DiskRates, estimate_seconds

    rates = {"d1": DiskRates(1e9, 0.5e9, "x"), "d2": DiskRates(2e9, None, "x")}
    assert estimate_seconds({"d1": 2_000_000_000}, {"d1": 1_000_000_000}, rates) == 4.0
    assert estimate_seconds({"d2": 10_000_000_000}, {"d1": 1_000_000_000}, rates) == 5.0
    assert estimate_seconds({"d1": 1}, {"d2": 1}, rates) is None  # d2's write rate unknown
    assert estimate_seconds({"d3": 1}, {}, rates) is None


def test_plan_estimates_wall_time_only_from_measured_rates(tmp_path, capsys):
    from shardmerge import diskrate

    g = torch.Generator().manual_seed(0)
    for name in "ab":  # 256 KiB per model: enough to time a read
        tensors = {"model.layers.0.mlp.up_proj.weight": torch.randn(256, 256, generator=g)}
        write_checkpoint(tmp_path / name, tensors, None, {"model_type": "llama"})
    recipe = _recipe(tmp_path, "models: {a: a, b: b}\nt: 0.3\n")
    out = tmp_path / "merged"
    assert main(["plan", str(recipe), "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    device = diskrate.device_key(tmp_path)
    assert line == (
        f"estimated wall time: unknown (no measured rate for {device}: run `shardmerge plan "
        "--measure-disk` once (a few seconds))"
    )
    assert not diskrate.cache_file().exists()  # a plain plan measures nothing

    assert main(["plan", str(recipe), "--out", str(out), "--measure-disk"]) == 0
    measured = capsys.readouterr().out.splitlines()[-1]
    rates = diskrate.load_rates()[device]
    assert rates.read_bytes_per_s and rates.write_bytes_per_s
    assert measured.startswith("estimated wall time: ") and "unknown" not in measured
    assert f"reads 524kB from {device}; writes 262kB to {device}" in measured
    assert not out.exists() and not list(tmp_path.glob(".shardmerge-disk-rate-*"))
    # Later plans use the cached rates: the same line, without measuring.
    assert main(["plan", str(recipe), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == measured
    assert main(["plan", str(recipe)]) == 0  # no output folder: its disk is unknown
    assert "pass --out" in capsys.readouterr().out.splitlines()[-1]
