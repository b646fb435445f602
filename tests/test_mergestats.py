"""Statistics ``run`` records while merging, and the card's table and picture made from them."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardmerge import cli, engine, mergestats, passes
from shardmerge.pipeline import prepare
from shardmerge.recipe import parse_recipe
from shardmerge.shardio import LocalSource
from tests.conftest import write_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = 3


def _pair(root: Path, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Path, dict, dict]:
    g = torch.Generator().manual_seed(5)
    a: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(300, 40, generator=g)}
    for i in range(LAYERS):
        a[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(40, 40, generator=g)
        a[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(64, 40, generator=g)
        a[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(40, generator=g)
    a["model.norm.weight"] = torch.randn(40, generator=g)
    a["lm_head.weight"] = torch.randn(300, 40, generator=g)
    # B: A rotated further away in the later layers (cos falls with depth), plus noise.
    b = {}
    for name, x in a.items():
        depth = int(name.split(".")[2]) + 1 if ".layers." in name else 1
        noise = torch.randn(x.shape, generator=g) * x.std()
        b[name] = (x + 0.4 * depth * noise).to(dtype)
        a[name] = x.to(dtype)
    a["model.num_batches_tracked"] = torch.tensor(3)
    b["model.num_batches_tracked"] = torch.tensor(4)
    config = {"model_type": "llama", "tie_word_embeddings": False}
    names = list(a)
    write_checkpoint(root / "a", a, [names[:4], names[4:]], config, {"tokenizer.json": "{}"})
    write_checkpoint(root / "b", b, None, config)
    return root / "a", root / "b", a, b


SLERP_RECIPE = """\
models: {{a: {a}, b: {b}}}
t:
  default: 0.3
  non_layer: 0.5
  rules:
    - match: self_attn
      gradient: [0, 0.5, 1]
output: {{shard_size: 20KB}}
"""


def _dense_cos(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return float(x @ y / (x.norm() * y.norm()))


def test_slerp_statistics_match_a_dense_computation(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_NUMEL", 4096)  # the embedding takes 3 chunks
    path_a, path_b, a, b = _pair(tmp_path)
    prepared = prepare(parse_recipe(SLERP_RECIPE.format(a=path_a, b=path_b)))
    recorder = mergestats.Recorder()
    (tmp_path / "o").mkdir()
    sources = (LocalSource(path_a, "a"), LocalSource(path_b, "b"))
    engine.execute_plan(prepared.plan, *sources, tmp_path / "o", recorder=recorder)
    records = recorder.take(a)
    assert "model.num_batches_tracked" not in records  # integer buffers: nothing to say
    floats = [n for n in a if a[n].is_floating_point()]
    assert set(records) == set(floats)
    for name in floats:
        record = records[name]
        x, y = a[name].double().flatten(), b[name].double().flatten()
        assert record["numel"] == x.numel()
        if name.startswith(("model.layers.0.self_attn", "model.layers.2.self_attn")):
            # t = 0 or 1: copied from one end, nothing computed
            assert record == {"numel": x.numel(), "t": 0.0 if ".0." in name else 1.0}
            continue
        assert record["dot"] == pytest.approx(float(x @ y), rel=1e-6)
        assert record["sq_a"] == pytest.approx(float(x @ x), rel=1e-6)
        assert record["sq_b"] == pytest.approx(float(y @ y), rel=1e-6)
    # Per layer: the layer's computed tensors taken as one vector.
    rows = {r.label: r for r in mergestats.summarize(records)}
    assert list(rows) == ["0", "1", "2", "outside layers"]
    computed = [n for n in floats if n.startswith("model.layers.2.") and "self_attn" not in n]
    x = torch.cat([a[n].flatten() for n in computed])
    y = torch.cat([b[n].flatten() for n in computed])
    assert rows["2"].cosine == pytest.approx(_dense_cos(x, y), rel=1e-6)
    assert rows["2"].angle == pytest.approx(math.degrees(math.acos(_dense_cos(x, y))), rel=1e-6)
    assert rows["0"].cosine > rows["1"].cosine > rows["2"].cosine  # B drifts with depth
    # t: numel-weighted over the layer's tensors, copied ones included (q_proj: t = 1).
    numels = {n: a[n].numel() for n in floats if n.startswith("model.layers.2.")}
    t = sum((1.0 if "self_attn" in n else 0.3) * k for n, k in numels.items()) / sum(
        numels.values()
    )
    assert rows["2"].t == pytest.approx(t) and (rows["2"].t_min, rows["2"].t_max) == (0.3, 1.0)


def test_effective_t_is_the_share_of_b_in_slerp():
    # Orthogonal unit vectors: SLERP at t gives sin((1-t)pi/2) a + sin(t pi/2) b.
    s0, s1 = math.sin(0.7 * math.pi / 2), math.sin(0.3 * math.pi / 2)
    assert mergestats.effective_t(0.3, 0.0) == pytest.approx(s1 / (s0 + s1))
    assert mergestats.effective_t(0.3, 0.0) == pytest.approx(0.33754, abs=1e-5)
    assert mergestats.effective_t(0.3, 0.9999) == 0.3  # nearly parallel: linear, as SLERP
    assert mergestats.effective_t(0.5, 0.2) == pytest.approx(0.5)  # symmetric


def _family(root: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(8)
    base = {"model.embed_tokens.weight": torch.randn(200, 16, generator=g)}
    for i in range(LAYERS):
        base[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(32, 16, generator=g)
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(16, generator=g)
    states = [base]
    for _ in range(2):
        states.append({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    folders = [
        write_checkpoint(root / f"m{j}", s, None, {"model_type": "llama"})
        for j, s in enumerate(states)
    ]
    return folders, states


TIES = (
    "merge_method: ties\nbase_model: {m0}\nmodels:\n"
    "  - model: {m1}\n    parameters: {{density: 0.4, weight: 0.7}}\n"
    "  - model: {m2}\n    parameters: {{density: 0.6, weight: [0.2, 0.9]}}\n"
)


def test_ties_statistics_match_a_dense_computation(tmp_path, monkeypatch):
    monkeypatch.setattr(passes, "CHUNK_NUMEL", 1024)  # the embedding takes 4 chunks
    folders, states = _family(tmp_path)
    text = TIES.format(**{f"m{j}": f for j, f in enumerate(folders)})
    prepared = prepare(parse_recipe(text))
    recorder = mergestats.Recorder()
    (tmp_path / "o").mkdir()
    sources = [LocalSource(f, f.name) for f in folders]
    passes.execute_passes(prepared.plan, sources, tmp_path / "o", recorder=recorder)
    records = recorder.take(states[0])
    assert set(records) == set(states[0])
    for task in prepared.plan.tasks:
        record = records[task.name]
        base = states[0][task.name].flatten()
        weighted = []
        kept = []
        for i, params in enumerate(task.model_params):
            delta = states[i + 1][task.name].flatten() - base
            k = max(1, int(params["density"] * delta.numel()))
            keep = torch.zeros_like(delta, dtype=torch.bool)
            keep[delta.abs().topk(k).indices] = True
            kept.append(int(keep.sum()))
            weighted.append(delta * keep * params["weight"])
        positive = torch.stack(weighted).sum(0) >= 0
        nonzero = sum(int((d != 0).sum()) for d in weighted)
        agree = sum(int(((d > 0) == positive).logical_and(d != 0).sum()) for d in weighted)
        weights = [p["weight"] for p in task.model_params]
        expected = {"numel": base.numel(), "weights": weights, "kept": kept}
        assert record == expected | {"agree": agree, "nonzero": nonzero}, task.name
        assert 0.5 < agree / nonzero < 1
    rows = mergestats.summarize(records)
    assert rows[0].kept_fraction(0) == pytest.approx(0.4, abs=0.01)
    table = mergestats.render_table("ties", rows, ["m1", "m2"])
    assert (
        "| layer | tensors | weight m1 | weight m2 | kept m1 | kept m2 | sign agreement |" in table
    )
    # m2's weight gradient from 0.2 to 0.9; the layer norms keep int(density x 16) of 16.
    assert "\n| 0 | 2 | 0.7 | 0.2 | 39.8% | 59.8% | " in table
    assert "\n| 2 | 2 | 0.7 | 0.9 | 39.8% | 59.8% | " in table


def test_linear_records_weights_and_keeps_everything(tmp_path):
    folders, states = _family(tmp_path)
    text = (
        "merge_method: linear\nmodels:\n"
        f"  - model: {folders[1]}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {folders[2]}\n    parameters: {{weight: 0.75}}\n"
    )
    prepared = prepare(parse_recipe(text))
    recorder = mergestats.Recorder()
    (tmp_path / "o").mkdir()
    sources = [LocalSource(f, f.name) for f in folders[1:]]
    passes.execute_passes(prepared.plan, sources, tmp_path / "o", recorder=recorder)
    record = recorder.take(["model.norm.weight", "model.layers.0.mlp.up_proj.weight"])
    assert record == {"model.layers.0.mlp.up_proj.weight": {"numel": 512, "weights": [0.25, 0.75]}}
    table = mergestats.render_table("linear", mergestats.summarize(record), ["m1", "m2"])
    assert "| 0 | 1 | 0.25 | 0.75 | all | all |" in table and "sign" not in table


def test_methods_without_weights_get_no_weight_columns():
    """model_stock, karcher, arcee_fusion... record no per-model weight: no column of zeros."""
    records = {
        "model.layers.0.mlp.up_proj.weight": {"numel": 512, "weights": [None, None]},
        "model.layers.1.mlp.up_proj.weight": {"numel": 512, "weights": [None, None]},
    }
    table = mergestats.render_table("model_stock", mergestats.summarize(records), ["m1", "m2"])
    assert table.splitlines()[0] == "| layer | tensors | kept m1 | kept m2 |"
    assert "| 0 | 1 | all | all |" in table


def _card_section(card: str) -> str:
    return card[card.index("## What the merge saw") : card.index("## Recipe")]


def test_card_has_the_table_and_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path_a, path_b, _, _ = _pair(tmp_path)
    recipe = tmp_path / "r.yml"
    recipe.write_text(SLERP_RECIPE.format(a=path_a, b=path_b))
    out = tmp_path / "out"
    assert cli.main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0, capsys.readouterr()
    section = _card_section((out / "README.md").read_text())
    assert "![per-layer schedule and similarity](merge.png)" in section
    assert "| layer | tensors | cos(A, B) | angle | t | effective t |" in section
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "1", "2", "outside layers"]
    assert "Statistics of" not in section  # every tensor has them
    image = (out / "merge.png").read_bytes()
    assert image.startswith(PNG_MAGIC)
    from matplotlib.image import imread

    pixels = imread(out / "merge.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert float(pixels[..., :3].std()) > 0.05  # something is drawn, not a blank canvas


def test_card_without_matplotlib_has_the_table_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    folders, _ = _family(tmp_path)
    recipe = tmp_path / "r.yml"
    recipe.write_text(TIES.format(**{f"m{j}": f for j, f in enumerate(folders)}))
    out = tmp_path / "out"
    assert cli.main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0, capsys.readouterr()
    section = _card_section((out / "README.md").read_text())
    assert 'pip install "shardmerge[plot]"' in section and "merge.png" not in section
    assert "| layer | tensors | weight m1 | weight m2 | kept m1 | kept m2 | sign agreement |" in (
        section
    )
    assert not (out / "merge.png").exists()


def test_no_card_image_draws_nothing_and_offers_nothing(tmp_path):
    """run --no-card-image (merge(card_image=False) in Python): the table, no picture, no line
    about installing matplotlib, and matplotlib is never imported (its cost is the point)."""
    pytest.importorskip("matplotlib")
    folders, _ = _family(tmp_path)
    recipe = tmp_path / "r.yml"
    recipe.write_text(TIES.format(**{f"m{j}": f for j, f in enumerate(folders)}))
    out = tmp_path / "out"
    code = (
        "import sys; from shardmerge.cli import main; "
        f"code = main(['run', {str(recipe)!r}, '--out', {str(out)!r}, '--quiet', "
        "'--no-card-image']); print(code, 'matplotlib' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["0", "False"]
    section = _card_section((out / "README.md").read_text())
    assert "| layer | tensors | weight m1 | weight m2 |" in section
    assert "merge.png" not in section and "matplotlib" not in section
    assert not (out / "merge.png").exists()
    # The Python API, the same way; with the picture by default.
    import shardmerge

    assert shardmerge.merge(str(recipe), out=tmp_path / "api", card_image=False, quiet=True)
    assert not (tmp_path / "api" / "merge.png").exists()
    assert shardmerge.merge(str(recipe), out=tmp_path / "api2", quiet=True)
    assert (tmp_path / "api2" / "merge.png").read_bytes().startswith(PNG_MAGIC)


# Runs the CLI with a small engine chunk and small shards, in a process that can be killed.
LAUNCHER = (
    "import sys; from shardmerge import engine; engine.CHUNK_NUMEL = 4096; "
    "from shardmerge.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_resume_keeps_the_statistics_of_shards_done_before_the_kill(tmp_path, monkeypatch):
    path_a, path_b, _, _ = _pair(tmp_path)
    recipe = tmp_path / "r.yml"
    recipe.write_text(SLERP_RECIPE.format(a=path_a, b=path_b))
    argv = [sys.executable, "-c", LAUNCHER, "run", str(recipe), "--quiet", "--device", "cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    whole = subprocess.run([*argv, "--out", str(tmp_path / "whole")], env=env, timeout=120)
    assert whole.returncode == 0
    out = tmp_path / "out"
    env["SHARDMERGE_KILL_AT"] = "shard-done:2"
    killed = subprocess.run([*argv, "--out", str(out)], env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    partial = tmp_path / ".out.shardmerge-partial"
    record = json.loads((partial / ".shardmerge-progress.json").read_text())
    assert len(record["shards"]) == 2
    kept = {n for entry in record["shards"].values() for n in entry["stats"]}
    assert kept  # the finished shards' tensors, with their statistics
    # Resumed in-process, where the engine could not see the first two shards' tensors again.
    monkeypatch.setattr(engine, "CHUNK_NUMEL", 4096)
    seen: list[str] = []
    real = mergestats.Recorder.put

    def spy(self, name, stats):  # type: ignore[no-untyped-def]
        seen.append(name)
        real(self, name, stats)

    monkeypatch.setattr(mergestats.Recorder, "put", spy)
    rc = cli.main(["run", str(recipe), "--out", str(out), "--quiet", "--resume"])
    assert rc == 0
    assert not kept & set(seen)  # not merged again...
    card = (out / "README.md").read_text()
    assert _card_section(card) == _card_section((tmp_path / "whole" / "README.md").read_text())
    assert (out / "merge.png").read_bytes() == (tmp_path / "whole" / "merge.png").read_bytes()


def test_a_shard_without_statistics_is_said_so(tmp_path, capsys):
    path_a, path_b, _, _ = _pair(tmp_path)
    recipe = tmp_path / "r.yml"
    recipe.write_text(SLERP_RECIPE.format(a=path_a, b=path_b))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", SHARDMERGE_KILL_AT="shard-done:1")
    argv = [sys.executable, "-c", LAUNCHER, "run", str(recipe), "--quiet", "--out", str(out)]
    assert subprocess.run(argv, env=env, timeout=120).returncode == -signal.SIGKILL
    progress = tmp_path / ".out.shardmerge-partial" / ".shardmerge-progress.json"
    record = json.loads(progress.read_text())
    (entry,) = record["shards"].values()
    lost = len(entry.pop("stats"))  # as written by a version that recorded none
    progress.write_text(json.dumps(record))
    assert cli.main(["run", str(recipe), "--out", str(out), "--quiet", "--resume"]) == 0
    floats = 3 * LAYERS + 3  # embedding, norm and lm_head outside the layers
    section = _card_section((out / "README.md").read_text())
    assert f"Statistics of {floats - lost} of {floats} float tensors" in section
    capsys.readouterr()


def test_plan_similarity_hints_where_t_mixes_nearly_orthogonal_tensors(tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    a = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(32, 16, generator=g) for i in range(3)}
    b = {n: x + 0.1 * torch.randn(x.shape, generator=g) for n, x in a.items()}
    b["model.layers.1.mlp.up_proj.weight"] = torch.randn(32, 16, generator=g)  # unrelated
    write_checkpoint(tmp_path / "a", a, None, {"model_type": "llama"})
    write_checkpoint(tmp_path / "b", b, None, {"model_type": "llama"})
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"models: {{a: {tmp_path / 'a'}, b: {tmp_path / 'b'}}}\nt: 0.5\n")
    assert cli.main(["plan", str(recipe)]) == 0
    assert "every tensor read" not in capsys.readouterr().out  # headers only unless asked
    assert cli.main(["plan", str(recipe), "--similarity"]) == 0
    hints = [line for line in capsys.readouterr().out.splitlines() if "hint:" in line]
    assert len(hints) == 1 and "layer 1: t = 0.5 on 1 tensor(s)" in hints[0]
    recipe.write_text(f"models: {{a: {tmp_path / 'a'}, b: {tmp_path / 'b'}}}\nt: 0.95\n")
    assert cli.main(["plan", str(recipe), "--similarity"]) == 0
    assert "no hint" in capsys.readouterr().out  # t near an end: nothing is mixed


def test_plan_similarity_hints_at_conflicting_task_vectors(tmp_path, capsys):
    folders, states = _family(tmp_path)
    # The second fine-tune undoes the first in layer 2: its task vector is the opposite.
    flipped = dict(states[2])
    for name in states[0]:
        if name.startswith("model.layers.2."):
            flipped[name] = 2 * states[0][name] - states[1][name]
    write_checkpoint(tmp_path / "m2", flipped, None, {"model_type": "llama"})
    models = {f"m{j}": f for j, f in enumerate(folders)}
    recipe = tmp_path / "r.yml"
    linear = (
        "merge_method: task_arithmetic\nbase_model: {m0}\nmodels:\n"
        "  - model: {m1}\n    parameters: {{weight: 0.5}}\n"
        "  - model: {m2}\n    parameters: {{weight: 0.5}}\n"
    )
    recipe.write_text(linear.format(**models))
    assert cli.main(["plan", str(recipe), "--similarity"]) == 0
    hints = [line for line in capsys.readouterr().out.splitlines() if "hint:" in line]
    assert len(hints) == 1 and "layer 2: " in hints[0] and "(cosine -1.00)" in hints[0]
    recipe.write_text(TIES.format(**models))
    assert cli.main(["plan", str(recipe), "--similarity"]) == 0
    assert "no hint" in capsys.readouterr().out  # TIES elects signs


def test_a_picture_that_fails_is_a_warning_not_a_failed_merge(tmp_path, monkeypatch, capsys):
    from shardmerge import plot

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plot, "write_merge_plot", broken)
    path_a, path_b, _, _ = _pair(tmp_path)
    recipe = tmp_path / "r.yml"
    recipe.write_text(SLERP_RECIPE.format(a=path_a, b=path_b))
    out = tmp_path / "out"
    assert cli.main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    assert "warning: the card's picture was not drawn (no fonts)" in capsys.readouterr().err
    section = _card_section((out / "README.md").read_text())
    assert "| layer | tensors | cos(A, B) |" in section and "](merge.png)" not in section
    assert not (out / "merge.png").exists()
