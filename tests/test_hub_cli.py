"""The real ``shardmerge`` CLI, run as a subprocess, against the loopback fake Hub.

Every run gets ``env=hub_env`` (or an offline variant of it): HF_ENDPOINT at the fake server,
HF_TOKEN=hf_fake, no Xet, no telemetry, an isolated HF_HOME. No test can reach the real Hub.
The reference for "the same merge" is one CLI run on local copies of the two models.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import folder_files, make_hf_cache_repo, write_checkpoint
from tests.fakehub import TOKEN, FakeHub

INDEX = "model.safetensors.index.json"
LAYERS = 4
HIDDEN = 128
CONFIG = {"model_type": "llama", "num_hidden_layers": LAYERS, "hidden_size": HIDDEN}
EXTRA = {"tokenizer.json": '{"version": "1.0", "model": {}}', "generation_config.json": "{}"}
T = "t:\n  default: 0.5\n  non_layer: 0.3\n  rules:\n    - match: self_attn\n      gradient: [0, 1]\n"
SHARD_SIZE = "output: {shard_size: 200000}\n"  # several output shards


def tensor_names() -> list[str]:
    """State-dict order of a tiny llama: embeddings, layers, norm, head."""
    names = ["model.embed_tokens.weight"]
    for i in range(LAYERS):
        names += [
            f"model.layers.{i}.self_attn.q_proj.weight",
            f"model.layers.{i}.mlp.up_proj.weight",
        ]
    return [*names, "model.norm.weight", "lm_head.weight"]


def tiny_llama(
    folder: Path, seed: int, shards: list[int] | int, **changes: torch.Tensor | None
) -> Path:
    """A tiny float32 llama; ``changes`` replace tensors (None drops one).

    ``shards`` lists how many consecutive tensors each shard holds, or is a number of shards to
    deal the tensors into round-robin (each then needed from the first tensor to the last).
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(*shape_of(name), generator=gen) for name in tensor_names()}
    tensors.update({k: v for k, v in changes.items() if v is not None})
    names = [name for name in tensors if changes.get(name, tensors[name]) is not None]
    if isinstance(shards, int):
        groups = [names[i::shards] for i in range(shards)]
    else:
        ends = list(itertools.accumulate(shards))
        assert ends[-1] == len(names), "shards must cover every tensor"
        groups = [names[end - count : end] for count, end in zip(shards, ends, strict=True)]
    return write_checkpoint(folder, {n: tensors[n] for n in names}, groups, CONFIG, EXTRA)


def shape_of(name: str) -> tuple[int, ...]:
    if "norm" in name:
        return (HIDDEN,)
    return (2 * HIDDEN if "embed" in name or "head" in name else HIDDEN, HIDDEN)


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def folder_state(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (folders as None) with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:80]
    return yaml.safe_load(card.split("---\n", 2)[1])


@dataclass(frozen=True)
class Locals:
    a: Path  # 5 shards
    b: Path  # 3 shards, boundaries unlike a's
    recipe: Path  # the same merge of the local copies
    merged: Path  # its CLI output: the reference every Hub merge must match


def run_cli(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "shardmerge.cli", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def write_recipe(path: Path, a: str, b: str, extra: str = "") -> Path:
    path.write_text(f"models:\n  a: {a}\n  b: {b}\n{T}{SHARD_SIZE}{extra}")
    return path


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Locals:
    root = tmp_path_factory.mktemp("locals")
    a = tiny_llama(root / "a", seed=1, shards=[1, 3, 2, 2, 3])
    b = tiny_llama(root / "b", seed=2, shards=[4, 4, 3])
    recipe = write_recipe(root / "recipe.yaml", str(a), str(b))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(root / "hf-home"), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    done = run_cli("run", recipe, "--out", root / "merged", "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    return Locals(a, b, recipe, root / "merged")


@dataclass(frozen=True)
class Seeded:
    hub: FakeHub
    env: dict[str, str]
    sha_a: str
    sha_b: str  # the commit of branch "dev" of org/b; main holds different weights


@pytest.fixture
def seeded(fake_hub: FakeHub, hub_env: dict[str, str], local: Locals, tmp_path: Path) -> Seeded:
    sha_a = fake_hub.add_repo("org/a", folder_files(local.a))
    decoy = tiny_llama(tmp_path / "decoy", seed=3, shards=[11])  # what a wrong ref would merge
    fake_hub.add_repo("org/b", folder_files(decoy))
    sha_b = fake_hub.add_commit("org/b", folder_files(local.b), branch="dev", tags=("v1",))
    return Seeded(fake_hub, hub_env, sha_a, sha_b)


def assert_same_merge(out: Path, reference: Path) -> None:
    """Every file byte for byte, except what names the inputs: the card and the index's
    record of the run (whose weight map and total size must still agree)."""
    got, want = folder_files(out), folder_files(reference)
    assert sorted(got) == sorted(want)
    assert len([f for f in got if f.endswith(".safetensors")]) >= 3
    for name in want:
        if name == "model.safetensors.index.json":
            got_index, want_index = json.loads(got[name]), json.loads(want[name])
            assert got_index["weight_map"] == want_index["weight_map"]
            assert got_index["metadata"]["total_size"] == want_index["metadata"]["total_size"]
        elif name != "README.md":
            assert got[name] == want[name], name


def assert_no_shard_body_sent(hub: FakeHub) -> None:
    """Only Range reads inside safetensors headers; whole bodies only for small json files."""
    for request in hub.requests("GET"):
        if request.path.endswith(".safetensors"):
            _, org, name, _, revision, filename = request.path.split("/", 5)
            data = hub.files(f"{org}/{name}", revision)[filename]
            assert request.range is not None, request
            last = int(request.range.split("-")[1])
            assert last < header_end(data) and request.sent <= header_end(data), request
        elif "/resolve/" in request.path:
            assert request.path.endswith(".json") and request.sent < 10_000, request


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    return errors[0]


# -- 1. a Hub merge is the local merge ---------------------------------------------------------


def test_hub_merge_equals_local_merge_and_card_pins_commits(
    seeded: Seeded, local: Locals, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "out"

    done = run_cli("run", recipe, "--out", out, "--quiet", env=seeded.env)

    assert done.returncode == 0, done.stderr
    assert f"into {out}" in done.stdout
    assert_same_merge(out, local.merged)
    card = (out / "README.md").read_text()
    assert front_matter(card)["base_model"] == ["org/a", "org/b"]
    for repo, sha in (("org/a", seeded.sha_a), ("org/b", seeded.sha_b)):
        assert f"[{repo}]({seeded.hub.url}/{repo})" in card  # links follow HF_ENDPOINT
        assert f"`{sha}`" in card
    # Pinned: after resolving "dev" once, every file request names the commit sha.
    files = seeded.hub.requests(path="*/resolve/*")
    assert files and all(
        f"/resolve/{seeded.sha_a}/" in r.path or f"/resolve/{seeded.sha_b}/" in r.path
        for r in files
    )
    # Each input shard body crossed the wire exactly once; the decoy main never did.
    for repo, folder in (("org/a", local.a), ("org/b", local.b)):
        for shard in shard_files(folder):
            bodies = [
                r for r in seeded.hub.requests("GET", f"/{repo}/*/{shard.name}") if not r.range
            ]
            assert [r.sent for r in bodies] == [shard.stat().st_size]


# -- 2. pre-flight: headers only ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "shards", "expected"),
    [
        ({"model.layers.2.mlp.up_proj.weight": torch.ones(HIDDEN, 64)}, [4, 4, 3], "shape"),
        (
            {"model.layers.1.self_attn.q_proj.weight": None},
            [4, 4, 2],
            "is in model A (org/a) but not in model B (org/bad)",
        ),
    ],
    ids=["shape-mismatch", "missing-tensor"],
)
def test_preflight_rejects_incompatible_models_without_downloading_weights(
    seeded: Seeded,
    tmp_path: Path,
    change: dict[str, torch.Tensor | None],
    shards: list[int],
    expected: str,
) -> None:
    bad = tiny_llama(tmp_path / "bad", seed=2, shards=shards, **change)
    seeded.hub.add_repo("org/bad", folder_files(bad))
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/bad")
    out = tmp_path / "out"

    done = run_cli("run", recipe, "--out", out, "--quiet", env=seeded.env)

    assert done.returncode == 2, done.stderr
    [tensor] = change
    assert tensor in one_line_error(done) and expected in done.stderr
    assert_no_shard_body_sent(seeded.hub)
    assert seeded.hub.requests("GET", "*.safetensors")  # the headers were read
    assert not out.exists() and list(tmp_path.glob(".*")) == []


def test_typo_in_repo_id_fails_before_any_download(seeded: Seeded, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/bb@dev")
    out = tmp_path / "out"

    done = run_cli("run", recipe, "--out", out, "--quiet", env=seeded.env)

    assert done.returncode == 2
    assert one_line_error(done) == (
        "error: cannot resolve revision 'dev' of org/bb: repository not found "
        "(if it is private, set HF_TOKEN or run `hf auth login`)"
    )
    assert_no_shard_body_sent(seeded.hub)
    assert [r.path for r in seeded.hub.requests(path="*org/bb*")] == [
        "/api/models/org/bb/revision/dev"
    ]
    assert not out.exists()


# -- 3. streaming ------------------------------------------------------------------------------


def scratch_files(parent: Path) -> dict[str, int]:
    """The streamed input files under ``parent`` now, with their sizes (partial downloads,
    named by huggingface_hub's ``.incomplete`` files, included)."""
    files = {}
    for path in parent.glob(".*shardmerge-partial/.shardmerge-scratch-*/stream-*/**/*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file():
                files[path.relative_to(parent).as_posix()] = path.stat().st_size
    return files


def test_stream_budget_is_refused_below_the_minimum_and_never_exceeded(
    seeded: Seeded, local: Locals, tmp_path: Path, isolated_hf_home: Path
) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", f"org/b@{seeded.sha_b}")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()

    refused = run_cli("run", recipe, "--out", out, "--stream", "--stream-budget", "1kB",
                      "--quiet", env=seeded.env)  # fmt: skip

    assert refused.returncode == 2, refused.stderr
    line = one_line_error(refused)
    match = re.search(r"--stream-budget 1kB is below .* use at least (\d+)kB$", line)
    assert match, line
    minimum = int(match.group(1)) * 1000
    sizes_a = [p.stat().st_size for p in shard_files(local.a)]
    sizes_b = [p.stat().st_size for p in shard_files(local.b)]
    assert max(sizes_a) <= minimum <= max(sizes_a) + max(sizes_b) + 1000
    assert list(out.parent.iterdir()) == []
    assert seeded.hub.transfers == []  # refused before any shard body

    # At that minimum: measured on the server's side at every piece of every shard sent.
    seen: list[tuple[str, dict[str, int]]] = []  # (file being sent, streamed files on disk)
    seeded.hub.body_seconds = 0.05
    seeded.hub.on_body_piece = lambda path: seen.append((path, scratch_files(out.parent)))
    done = run_cli("run", recipe, "--out", out, "--stream", "--stream-budget", f"{minimum}B",
                   "--quiet", env=seeded.env)  # fmt: skip

    assert done.returncode == 0, done.stderr
    found = re.search(r"streamed inputs: at most ([\d,]+) input bytes on disk", done.stderr)
    assert found, done.stderr
    peak = int(found.group(1).replace(",", ""))
    server_max = max(sum(files.values()) for _, files in seen)
    print(f"minimum {minimum:,} B, peak {peak:,} B, server-side max {server_max:,} B")
    assert max(sizes_a) <= peak <= minimum
    assert server_max <= minimum
    # The shards did not all fit: the merge read and freed A's first shard while later shards
    # were still arriving (the last one's pieces never see it).
    assert minimum < sum(sizes_a) + sum(sizes_b)
    first_a = shard_files(local.a)[0].name
    assert any(first_a in name for _, files in seen for name in files)
    last_sent = seen[-1][0]
    assert not any(first_a in name for path, files in seen if path == last_sent for name in files)
    assert_same_merge(out, local.merged)
    # The scratch downloads are gone, and the user's HF cache never held a shard.
    assert [p.name for p in out.parent.iterdir()] == ["out"]
    shard_digests = {
        hashlib.sha256(p.read_bytes()).digest() for p in shard_files(local.a) + shard_files(local.b)
    }
    cached = [p for p in (isolated_hf_home / "hub").rglob("*") if p.is_file()]
    assert cached  # config and index files were read through the cache
    assert not [p for p in cached if hashlib.sha256(p.read_bytes()).digest() in shard_digests]
    for shard in shard_files(local.a):  # downloaded once each
        assert (
            len([r for r in seeded.hub.requests("GET", f"/org/a/*/{shard.name}") if not r.range])
            == 1
        )


def test_stream_downloads_run_ahead_in_parallel_in_reading_order(
    seeded: Seeded, local: Locals, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    seeded.hub.body_seconds = 1.0  # every shard takes a second to send

    done = run_cli("run", recipe, "--out", out, "--stream", "--stream-budget", "100MB",
                   "--quiet", env=seeded.env)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert_same_merge(out, local.merged)
    starts = [path.rsplit("/", 1)[1] for _, kind, path in seeded.hub.transfers if kind == "start"]
    names_a = [p.name for p in shard_files(local.a)]
    names_b = [p.name for p in shard_files(local.b)]
    assert sorted(starts) == sorted(names_a + names_b)  # each once
    # Several shards of one input at once, and both inputs at once: A's first two shards and
    # B's first start together (the first shards the merge reads), each taking a second.
    print(f"server: at most {seeded.hub.in_flight_peak} shard bodies at once; order {starts}")
    assert seeded.hub.in_flight_peak >= 3
    for names in (names_a, names_b):
        # In the order the merge reads them (file order here), two at a time per input: a shard
        # may overtake the one admitted just before it, never one admitted earlier.
        order = [n for n in starts if n in names]
        assert all(abs(order.index(n) - i) <= 1 for i, n in enumerate(names)), order
        in_flight = peak = 0
        for _, kind, path in seeded.hub.transfers:
            if path.rsplit("/", 1)[1] in names:
                in_flight += 1 if kind == "start" else -1
                peak = max(peak, in_flight)
        assert peak <= 2


@pytest.mark.parametrize("stream", [False, True], ids=["cache", "stream"])
def test_a_download_failing_mid_stream_gives_the_same_error(
    seeded: Seeded, tmp_path: Path, local: Locals, stream: bool
) -> None:
    last = shard_files(local.b)[-1].name
    seeded.hub.fail(404, error_code="EntryNotFound", method="HEAD", path=f"/org/b/*/{last}")
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()

    done = run_cli(
        "run", recipe, "--out", out, "--quiet", *(["--stream"] if stream else []), env=seeded.env
    )

    assert done.returncode == 2, done.stderr
    assert one_line_error(done) == (
        f"error: cannot download from org/b: file not found in the repo: {last}"
    )
    assert not out.exists()
    assert not list(out.parent.glob(".*/.shardmerge-scratch-*"))


def test_ctrl_c_stops_the_streamed_downloads(seeded: Seeded, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    seeded.hub.body_seconds = 10.0
    command = [sys.executable, "-m", "shardmerge.cli", "run", str(recipe), "--out", str(out)]
    command += ["--stream", "--stream-budget", "100MB", "--quiet"]
    process = subprocess.Popen(command, env=seeded.env, stderr=subprocess.PIPE, text=True)
    record = out.parent / ".out.shardmerge-partial" / ".shardmerge-progress.json"
    try:
        # Once the merge runs (its record is written after torch's import: a Ctrl-C in the
        # middle of an import can land in a finalizer, where Python drops it).
        deadline = time.monotonic() + 60
        while not (seeded.hub.transfers and record.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seeded.hub.transfers and record.exists(), "the merge did not start"
        assert list(out.parent.glob(".*/.shardmerge-scratch-*/stream-*"))  # downloading there
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    started = [t for t in seeded.hub.transfers if t[1] == "start"]
    assert len(started) < 8  # the downloads stopped: 8 shards in all, at most 4 at a time
    assert not list(out.parent.glob(".*/.shardmerge-scratch-*"))  # nothing of them left


def test_a_killed_streamed_merge_resumes(seeded: Seeded, local: Locals, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "out"
    killed = run_cli("run", recipe, "--out", out, "--stream", "--quiet",
                     env={**seeded.env, "SHARDMERGE_KILL_AT": "shard-done:2"})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    seeded.hub.log.clear()

    done = run_cli("run", recipe, "--out", out, "--stream", "--resume", "--quiet",
                   env=seeded.env)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "resumed: 2 verified shard(s) kept" in done.stderr
    assert_same_merge(out, local.merged)
    first_a = shard_files(local.a)[0].name  # only in the finished shards: not needed again
    assert not [r for r in seeded.hub.requests("GET", f"/org/a/*/{first_a}") if not r.range]


def test_stream_keeps_a_shard_until_its_last_tensor_is_read(
    seeded: Seeded, local: Locals, tmp_path: Path
) -> None:
    """Shards of b interleaved: every one is needed to the end, so none may go early."""
    mixed = tiny_llama(tmp_path / "mixed", seed=2, shards=3)
    seeded.hub.add_repo("org/mixed", folder_files(mixed))
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/mixed")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()

    done = run_cli("run", recipe, "--out", out, "--stream", "--quiet", env=seeded.env)

    assert done.returncode == 0, done.stderr
    assert_same_merge(out, local.merged)  # the same tensors, however b is sharded
    for shard in shard_files(mixed):
        bodies = [
            r for r in seeded.hub.requests("GET", f"/org/mixed/*/{shard.name}") if not r.range
        ]
        assert len(bodies) == 1, shard.name
    assert [p.name for p in out.parent.iterdir()] == ["out"]


# -- 4. push -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flags", "recipe"])
def test_push_uploads_the_output_in_one_private_commit(
    seeded: Seeded, tmp_path: Path, how: str
) -> None:
    hub_keys = "hub: {push_to: me/merged, private: true}\n" if how == "recipe" else ""
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@v1", hub_keys)
    out = tmp_path / "out"
    flags = ["--push-to-hub", "me/merged", "--private"] if how == "flags" else []

    done = run_cli("run", recipe, "--out", out, "--quiet", *flags, env=seeded.env)

    assert done.returncode == 0, done.stderr
    hub = seeded.hub
    assert hub.files("me/merged") == folder_files(out)
    assert {"config.json", "tokenizer.json", INDEX, "README.md"} <= set(folder_files(out))
    assert hub.created == [{"name": "merged", "organization": "me", "visibility": "private"}]
    assert hub.repos["me/merged"].private
    [commit] = hub.commits
    assert commit["summary"] == "SLERP merge of org/a and org/b (shardmerge)"
    assert commit["paths"] == sorted(folder_files(out))
    assert f"pushed to {hub.url}/me/merged (commit {commit['sha']})" in done.stdout
    assert TOKEN not in done.stdout + done.stderr
    front = front_matter(hub.files("me/merged")["README.md"].decode())
    assert front["base_model"] == ["org/a", "org/b"]
    assert "merge" in front["tags"] and front["library_name"] == "transformers"


def test_push_dry_run_lists_the_upload_and_writes_nothing(seeded: Seeded, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "out"

    done = run_cli(
        "run",
        recipe,
        "--out",
        out,
        "--quiet",
        "--push-to-hub",
        "me/merged",
        "--dry-run",
        env=seeded.env,
    )

    assert done.returncode == 0, done.stderr
    files = folder_files(out)
    for name, data in files.items():
        assert re.search(rf"^\s*{re.escape(name)}\s+{len(data):,} bytes$", done.stdout, re.M), name
    total = sum(len(data) for data in files.values())
    assert (
        f"would push {len(files)} files, {total:,} bytes in one commit to a new public repo "
        f"{seeded.hub.url}/me/merged:"
    ) in done.stdout
    assert {r.method for r in seeded.hub.log} <= {"GET", "HEAD"}
    assert "me/merged" not in seeded.hub.repos


# -- 5. Hub failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "b_ref", "expected"),
    [
        (
            {"status": 401, "repo": "org/a", "path": "/org/a/resolve/*"},
            "org/b@dev",
            "error: cannot read org/a: not authorised (401): the token is missing or invalid, "
            "or cannot access this repo; set HF_TOKEN or run `hf auth login`",
        ),
        (
            {"status": 403, "error_code": "GatedRepo", "repo": "org/b", "path": "/org/b/resolve/*"},
            "org/b@dev",
            "error: cannot read org/b: the model is gated: request access on {url}/org/b, "
            "then retry with that account's token (set HF_TOKEN or run `hf auth login`)",
        ),
        (
            {"status": 404, "error_code": "RepoNotFound", "repo": "org/b"},
            "org/b@dev",
            "error: cannot resolve revision 'dev' of org/b: repository not found "
            "(if it is private, set HF_TOKEN or run `hf auth login`)",
        ),
        (
            None,
            "org/b@no-such-branch",
            "error: cannot resolve revision 'no-such-branch' of org/b: revision not found "
            "(use a branch, tag or full sha)",
        ),
    ],
    ids=["401", "gated", "repo-not-found", "revision-not-found"],
)
def test_input_errors_exit_2_with_one_line_and_no_output(
    seeded: Seeded, tmp_path: Path, fault: dict | None, b_ref: str, expected: str
) -> None:
    if fault is not None:
        seeded.hub.fail(**fault)
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", b_ref)
    out = tmp_path / "out"

    done = run_cli("run", recipe, "--out", out, "--quiet", env=seeded.env)

    assert done.returncode == 2, done.stderr
    assert one_line_error(done) == expected.format(url=seeded.hub.url)
    assert not out.exists() and list(tmp_path.glob(".*")) == []
    assert_no_shard_body_sent(seeded.hub)


@pytest.mark.parametrize(
    ("fault", "code", "expected"),
    [
        ({"status": 401, "path": "/api/repos/create"}, 2, "not authorised (401)"),
        ({"status": 403, "path": "/api/models/me/merged/commit/*"}, 2, "forbidden (403)"),
        ({"status": 500, "path": "/api/models/me/merged/commit/*"}, 1, "answered 500; retry later"),
    ],
    ids=["401-create", "403-commit", "500-commit"],
)
def test_failed_push_keeps_the_output_and_says_how_to_retry(
    fake_hub: FakeHub,
    hub_env: dict[str, str],
    local: Locals,
    tmp_path: Path,
    fault: dict,
    code: int,
    expected: str,
) -> None:
    fake_hub.fail(**fault)
    out = tmp_path / "out"

    done = run_cli(
        "run", local.recipe, "--out", out, "--quiet", "--push-to-hub", "me/merged",
        "--name", local.merged.name, env=hub_env,
    )  # fmt: skip

    assert done.returncode == code, done.stderr
    line = one_line_error(done)
    assert "cannot push to me/merged" in line and expected in line
    message = f"SLERP merge of {local.a.name} and {local.b.name} (shardmerge)"  # no machine path
    upload = ["hf", "upload", "me/merged", str(out), ".", "--commit-message", message]
    retry = f"the local output is complete at {out}; to retry, upload it with: "
    assert line.endswith(f"({retry}{shlex.join(upload)})")
    # The folder is exactly what the same run without --push-to-hub writes.
    assert folder_state(out) == folder_state(local.merged)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert not fake_hub.commits
    assert "me/merged" not in fake_hub.repos  # a repo the push created is deleted again
    if code == 1:  # the Hub is back: the suggested command uploads the finished folder
        fake_hub.faults.clear()
        hf = Path(sys.executable).with_name("hf")
        retried = subprocess.run(
            [str(hf), *upload[1:]], env=hub_env, capture_output=True, text=True, timeout=60
        )
        assert retried.returncode == 0, retried.stderr
        assert fake_hub.files("me/merged") == folder_files(out)
        assert [c["summary"] for c in fake_hub.commits] == [message]


# -- 6. offline --------------------------------------------------------------------------------


def test_offline_run_from_a_hand_built_cache(
    local: Locals, tmp_path: Path, isolated_hf_home: Path
) -> None:
    """No server at all: a branch via refs/ and a full sha resolve from the cache."""
    cache = isolated_hf_home / "hub"
    sha_a, sha_b = "a1" * 20, "b2" * 20
    make_hf_cache_repo(cache, "org/a", folder_files(local.a), sha_a, ref="release")
    make_hf_cache_repo(cache, "org/b", folder_files(local.b), sha_b, ref=None)
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a@release", f"org/b@{sha_b}")
    out = tmp_path / "out"
    before = folder_state(cache)

    done = run_cli(
        "run", recipe, "--out", out, "--quiet", env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )

    assert done.returncode == 0, done.stderr
    assert_same_merge(out, local.merged)
    card = (out / "README.md").read_text()
    assert f"`{sha_a}`" in card and f"`{sha_b}`" in card
    assert folder_state(cache) == before  # the cache is an input: read, never changed


# -- 7. the push target is checked before any download or merge (issue 18) ---------------------


def no_file_requested(hub: FakeHub) -> bool:
    """Nothing of any input was downloaded or read: no resolve request at all."""
    return not hub.requests(path="*/resolve/*")


def no_write_sent(hub: FakeHub) -> bool:
    return {r.method for r in hub.log} <= {"GET", "HEAD"}


@pytest.mark.parametrize(
    ("target", "flags", "env_change", "expected"),
    [
        ("org/b", [], {}, "cannot push to org/b: it is one of the merge's inputs"),
        ("ORG/A", [], {}, "cannot push to ORG/A: it is one of the merge's inputs"),
        ("merged", [], {}, "'merged': not a Hugging Face repo id (Hub repo ids are org/name; "),
        (
            "https://huggingface.co/me/merged",
            [],
            {},
            "(it is a URL: write 'me/merged')",
        ),
        ("me/merged", [], {"HF_TOKEN": None}, "pushing needs a write token and none is set"),
        ("me/merged", ["--dry-run"], {"HF_TOKEN": None}, "pushing needs a write token"),
        ("me/merged", [], {"HF_TOKEN": "hf_wrong"}, "the token is invalid or expired"),
        ("me/merged", [], {"HF_TOKEN": "hf_fake_read"}, "the token of tester is read-only"),
        ("other/merged", [], {}, "the token of tester cannot write to 'other'"),
        ("me/public", ["--private"], {}, "it already exists and is public, so --private"),
        ("me/public", ["--dry-run", "--private"], {}, "already exists and is public"),
        ("me/merged", ["--create-pr", "--revision", "v2"], {}, "--create-pr opens a pull request"),
    ],
    ids=[
        "input",
        "input-other-case",
        "no-org",
        "url",
        "no-token",
        "dry-run-no-token",
        "bad-token",
        "read-token",
        "other-namespace",
        "private-into-public",
        "dry-run-private-into-public",
        "pr-and-branch",
    ],
)
def test_push_target_is_refused_before_any_download(
    seeded: Seeded,
    tmp_path: Path,
    target: str,
    flags: list[str],
    env_change: dict[str, str | None],
    expected: str,
) -> None:
    seeded.hub.add_repo("me/public", {"README.md": b"public"})
    seeded.hub.log.clear()
    env = {k: v for k, v in seeded.env.items() if env_change.get(k, "") is not None}
    env.update({k: v for k, v in env_change.items() if v is not None})
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "out"

    done = run_cli("run", recipe, "--out", out, "--quiet", "--push-to-hub", target, *flags, env=env)

    assert done.returncode == 2, done.stderr
    line = one_line_error(done)
    assert expected in line and "hf upload" not in line
    assert no_file_requested(seeded.hub) and no_write_sent(seeded.hub)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "decoy",
        "recipe.yaml",
    ]
    assert not seeded.hub.repos["me/public"].private
    assert seeded.hub.files("me/public") == {"README.md": b"public"}


def test_push_offline_is_refused_before_the_merge(local: Locals, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN}
    out = tmp_path / "out"

    done = run_cli("run", local.recipe, "--out", out, "--push-to-hub", "me/merged", env=env)

    assert done.returncode == 2, done.stderr
    assert "pushing needs the network, and HF_HUB_OFFLINE=1 is set" in one_line_error(done)
    assert not out.exists()


# -- 8. a push replaces the model in one commit -------------------------------------------------


def test_push_replaces_the_earlier_model_in_one_commit(
    seeded: Seeded, local: Locals, tmp_path: Path
) -> None:
    old = tiny_llama(tmp_path / "old", seed=5, shards=[1] * 11)
    earlier = {
        **folder_files(old),
        "tokenizer.model": b"old sentencepiece",
        "notes.md": b"kept: not part of a model",
    }
    seeded.hub.add_repo("me/merged", earlier)
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "out"
    flags = ["--push-to-hub", "me/merged", "--commit-message", "v2 of the merge"]

    dry = run_cli(
        "run", recipe, "--out", tmp_path / "dry", "--quiet", *flags, "--dry-run", env=seeded.env
    )
    done = run_cli("run", recipe, "--out", out, "--quiet", *flags, env=seeded.env)

    stale = sorted(set(earlier) - set(folder_files(out)) - {"notes.md"})
    assert "model-00011-of-00011.safetensors" in stale and "tokenizer.model" in stale
    assert dry.returncode == 0, dry.stderr
    assert f"to {seeded.hub.url}/me/merged (public):" in dry.stdout
    for name in stale:
        assert f"  {name}  deleted (replaced by this merge)" in dry.stdout
    assert done.returncode == 0, done.stderr
    assert seeded.hub.files("me/merged") == {**folder_files(out), "notes.md": earlier["notes.md"]}
    [commit] = seeded.hub.commits  # the dry run committed nothing
    assert commit["summary"] == "v2 of the merge"
    # Files equal to the repo's (config, tokenizer.json) are left out of a commit by the client.
    assert set(stale) | set(shard_files_of(out)) <= set(commit["paths"])
    assert set(commit["paths"]) <= set(folder_files(out)) | set(stale)
    assert not seeded.hub.created  # the repo existed


def shard_files_of(folder: Path) -> list[str]:
    return [p.name for p in shard_files(folder)] + [INDEX]


def test_push_to_a_branch_or_as_a_pull_request_leaves_main_alone(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    write_checkpoint(out, {"w": torch.ones(4, 4)}, [["w"]], {"model_type": "llama"})
    main = {"README.md": b"main", "model.safetensors": b"old weights"}
    fake_hub.add_repo("me/merged", main)
    from shardmerge import hub, pipeline

    def push(**options: object) -> object:
        return hub.push_folder(
            out,
            "me/merged",
            private=False,
            commit_message="m",
            replaces=pipeline.replaced_by_push,
            **options,  # type: ignore[arg-type]
        )

    branch = push(revision="merge-v2")
    opened = push(create_pr=True)

    assert fake_hub.files("me/merged") == main
    for rev in ("merge-v2", "refs/pr/1"):
        assert fake_hub.files("me/merged", rev) == {"README.md": b"main", **folder_files(out)}
    assert [c["branch"] for c in fake_hub.commits] == ["merge-v2", "refs/pr/1"]
    assert opened.pr_url == f"{fake_hub.url}/me/merged/discussions/1"  # type: ignore[attr-defined]
    assert branch.deleted == ("model.safetensors",)  # type: ignore[attr-defined]


# -- 9. every downloaded shard matches the sha256 the Hub publishes -----------------------------


def cached_blobs(home: Path, repo: str) -> dict[str, bytes]:
    blobs = home / "hub" / f"models--{repo.replace('/', '--')}" / "blobs"
    return {p.name: p.read_bytes() for p in blobs.iterdir()} if blobs.is_dir() else {}


@pytest.mark.parametrize("stream", [False, True], ids=["cache", "stream"])
def test_a_shard_corrupted_once_is_downloaded_again(
    seeded: Seeded, local: Locals, tmp_path: Path, isolated_hf_home: Path, stream: bool
) -> None:
    shard = shard_files(local.a)[2].name
    seeded.hub.corrupt_downloads("org/a", shard, times=1)
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()

    done = run_cli(
        "run", recipe, "--out", out, "--quiet", *(["--stream"] if stream else []), env=seeded.env
    )

    assert done.returncode == 0, done.stderr
    assert_same_merge(out, local.merged)
    bodies = [r for r in seeded.hub.requests("GET", f"/org/a/*/{shard}") if not r.range]
    assert len(bodies) == 2
    blobs = cached_blobs(isolated_hf_home, "org/a")
    assert_blobs_intact(blobs)
    good = hashlib.sha256((local.a / shard).read_bytes()).hexdigest()
    assert (good in blobs) is not stream  # streaming downloads never enter the HF cache


def assert_blobs_intact(blobs: dict[str, bytes]) -> None:
    """Every LFS blob (named by its sha256) holds the bytes of that name."""
    for name, data in blobs.items():
        if len(name) == 64:
            assert hashlib.sha256(data).hexdigest() == name


@pytest.mark.parametrize("stream", [False, True], ids=["cache", "stream"])
def test_a_shard_corrupted_twice_fails_and_leaves_no_bad_blob(
    seeded: Seeded, local: Locals, tmp_path: Path, isolated_hf_home: Path, stream: bool
) -> None:
    shard = shard_files(local.b)[1]
    seeded.hub.corrupt_downloads("org/b", shard.name, times=2)
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()

    done = run_cli(
        "run", recipe, "--out", out, "--quiet", *(["--stream"] if stream else []), env=seeded.env
    )

    assert done.returncode == 1, done.stderr
    line = one_line_error(done)
    assert f"cannot download from org/b: {shard.name}: the download does not match" in line
    assert "twice" in line
    # Only the hidden working folder a runtime failure keeps for --resume; no scratch shards.
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] in ([], [".out.shardmerge-partial"])
    good = hashlib.sha256(shard.read_bytes()).hexdigest()
    blobs = cached_blobs(isolated_hf_home, "org/b")
    assert_blobs_intact(blobs)
    assert good not in blobs
    snapshot = isolated_hf_home / "hub" / "models--org--b" / "snapshots" / seeded.sha_b
    assert not (snapshot / shard.name).exists()


def test_a_corrupted_blob_in_the_cache_is_replaced_on_the_next_run(
    seeded: Seeded, local: Locals, tmp_path: Path, isolated_hf_home: Path
) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    first = run_cli("run", recipe, "--out", tmp_path / "one", "--quiet", env=seeded.env)
    assert first.returncode == 0, first.stderr
    shard = shard_files(local.a)[0]
    blob = isolated_hf_home / "hub" / "models--org--a" / "blobs"
    blob = blob / hashlib.sha256(shard.read_bytes()).hexdigest()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # a disk error, or a copy damaged by an earlier unchecked run
    blob.write_bytes(bytes(data))
    seeded.hub.log.clear()

    done = run_cli("run", recipe, "--out", tmp_path / "two", "--quiet", env=seeded.env)

    assert done.returncode == 0, done.stderr
    assert_same_merge(tmp_path / "two", local.merged)
    assert blob.read_bytes() == shard.read_bytes()
    assert (
        len([r for r in seeded.hub.requests("GET", f"/org/a/*/{shard.name}") if not r.range]) == 1
    )


# -- 10. progress, quiet, verbose, NaN, closed pipes --------------------------------------------


def test_downloads_show_a_progress_bar_unless_quiet(
    seeded: Seeded, local: Locals, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")

    shown = run_cli("run", recipe, "--out", tmp_path / "one", env=seeded.env)
    quiet = run_cli("run", recipe, "--out", tmp_path / "two", "--quiet", env=seeded.env)

    assert shown.returncode == 0 and quiet.returncode == 0, shown.stderr + quiet.stderr
    bar = re.search(r"downloading org/a: 100%\|[^|]*\| ([\d.]+)k/([\d.]+)k \[.*B/s\]", shown.stderr)
    assert bar, shown.stderr
    total_a = sum(p.stat().st_size for p in shard_files(local.a))  # what the bar counts
    assert float(bar.group(2)) == pytest.approx(total_a / 1e3, rel=0.01)
    assert "downloading org/b: 100%" in shown.stderr
    assert "downloading" not in quiet.stderr and "merging" not in quiet.stderr


def test_a_failed_push_into_an_existing_repo_keeps_it(
    fake_hub: FakeHub, hub_env: dict[str, str], local: Locals, tmp_path: Path
) -> None:
    fake_hub.add_repo("me/merged", {"README.md": b"mine"})
    fake_hub.fail(403, path="/api/models/me/merged/commit/*")

    done = run_cli(
        "run", local.recipe, "--out", tmp_path / "out", "--quiet", "--push-to-hub", "me/merged",
        env=hub_env,
    )  # fmt: skip

    assert done.returncode == 2, done.stderr
    assert fake_hub.files("me/merged") == {"README.md": b"mine"} and not fake_hub.deleted


def test_quiet_silences_the_hub_client_too(seeded: Seeded, tmp_path: Path) -> None:
    """One retried 503 makes huggingface_hub log a retry line: --quiet leaves stderr to us."""
    env = {k: v for k, v in seeded.env.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    runs = {}
    for name, quiet in (("loud", []), ("quiet", ["--quiet"])):
        seeded.hub.fail(503, path="/api/models/me/merged/preupload/*", times=1)
        runs[name] = run_cli(
            "run", recipe, "--out", tmp_path / name, *quiet, "--push-to-hub", "me/merged",
            env=env,
        )  # fmt: skip
        assert runs[name].returncode == 0, runs[name].stderr

    assert "Retry" in runs["loud"].stderr
    assert runs["quiet"].stderr.splitlines() == [
        f"push target {seeded.hub.url}/me/merged: existing public repo, writable by tester",
    ]


def test_verbose_shows_the_traceback_and_keeps_the_exit_code(seeded: Seeded, tmp_path: Path):
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/nope")

    done = run_cli("-v", "run", recipe, "--out", tmp_path / "out", "--quiet", env=seeded.env)

    assert done.returncode == 2, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("error: cannot resolve revision")


def test_nan_in_a_hub_input_is_bad_input_naming_the_repo(seeded: Seeded, tmp_path: Path) -> None:
    nan = torch.full((HIDDEN,), float("nan"))
    bad = tiny_llama(tmp_path / "nan", seed=2, shards=[4, 4, 3], **{"model.norm.weight": nan})
    sha = seeded.hub.add_repo("org/nan", folder_files(bad))
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/nan")
    out = tmp_path / "out"

    done = run_cli("run", recipe, "--out", out, "--quiet", env=seeded.env)

    assert done.returncode == 2, done.stderr
    assert one_line_error(done) == (
        f"error: tensor 'model.norm.weight' in model B (org/nan@{sha[:12]}) contains NaN or Inf "
        "values"
    )
    assert not out.exists()


def test_a_closed_stdout_ends_quietly(local: Locals) -> None:
    read, write = os.pipe()
    os.close(read)  # like `| head` that has exited: every write gets EPIPE
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "shardmerge.cli", "plan", str(local.recipe)],
            stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == 1
    assert done.stderr == ""


# -- 11. verify --recipe with Hub inputs ---------------------------------------------------------


def test_verify_recipe_recomputes_hub_inputs_at_the_recorded_commits(
    seeded: Seeded, local: Locals, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "out"
    assert run_cli("run", recipe, "--out", out, "--quiet", env=seeded.env).returncode == 0
    # dev moves on: verify must still read the commit that made the output.
    decoy = tiny_llama(tmp_path / "later", seed=9, shards=[4, 4, 3])
    seeded.hub.add_commit("org/b", folder_files(decoy), branch="dev")
    seeded.hub.log.clear()

    done = run_cli("verify", out, "--recipe", recipe, "--full", env=seeded.env)

    assert done.returncode == 0, done.stdout + done.stderr
    tensors = len(tensor_names())
    assert f"{tensors} tensors" in done.stdout and f"{tensors} recomputed" in done.stdout
    shard_reads = seeded.hub.requests(path="/org/b/resolve/*")
    assert shard_reads and all(f"/resolve/{seeded.sha_b}/" in r.path for r in shard_reads)

    shard = shard_files(out)[1]
    data = bytearray(shard.read_bytes())
    data[header_end(bytes(data)) + 1] ^= 0x01  # one merged value changed
    shard.write_bytes(bytes(data))
    failed = run_cli("verify", out, "--recipe", recipe, "--full", env=seeded.env)
    assert failed.returncode == 1 and "differs from what the recipe makes" in failed.stdout


# -- 12. smaller: 404s, tokenizer files, flags, ids, the card ----------------------------------


def test_a_plain_404_on_a_shard_is_a_missing_file(
    seeded: Seeded, local: Locals, tmp_path: Path
) -> None:
    shard = shard_files(local.a)[1].name  # org/a's main is local.a
    seeded.hub.fail(404, repo="org/a", path=f"*/resolve/*/{shard}")
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")

    done = run_cli("validate", recipe, env=seeded.env)

    assert done.returncode == 2, done.stderr
    assert one_line_error(done) == f"error: cannot read org/a: file not found in the repo: {shard}"


def test_only_the_tokenizer_the_output_takes_is_downloaded(seeded: Seeded, tmp_path: Path) -> None:
    for source, unread in (("a", "org/b"), ("b", "org/a")):
        seeded.hub.log.clear()
        recipe = write_recipe(
            tmp_path / "recipe.yaml", "org/a", "org/b@dev", f"tokenizer_from: {source}\n"
        )
        done = run_cli("run", recipe, "--out", tmp_path / source, "--quiet", env=seeded.env)
        assert done.returncode == 0, done.stderr
        assert not seeded.hub.requests(path=f"/{unread}/resolve/*/tokenizer.json"), source
        used = "org/a" if source == "a" else "org/b"
        assert seeded.hub.requests(path=f"/{used}/resolve/*/tokenizer.json"), source
    assert not seeded.hub.requests(path="/org/b/resolve/*/generation_config.json")


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--private", None), ("--revision", "dev"), ("--create-pr", None), ("--commit-message", "m")],
)
def test_push_options_without_a_push_are_refused(
    local: Locals, tmp_path: Path, flag: str, value: str | None
) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    args = [flag] if value is None else [flag, value]

    done = run_cli("run", local.recipe, "--out", out, *args, env=env)

    assert done.returncode == 2
    assert one_line_error(done) == (
        f"error: {flag} needs --push-to-hub (or hub.push_to in the recipe)"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("gpt2", "'gpt2' is not a folder and not a Hub repo id (Hub repo ids are org/name; "),
        (
            "https://huggingface.co/org/a/tree/v1",
            "is not a folder and not a Hub repo id (it is a URL: write 'org/a@v1')",
        ),
        ("org/m@v1@x", "'org/m@v1@x' has more than one '@'"),
    ],
    ids=["single-name", "url", "two-at"],
)
def test_mistyped_model_refs_get_a_hint(tmp_path: Path, ref: str, expected: str) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", f"'{ref}'", "org/b")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    done = run_cli("validate", recipe, env=env)

    assert done.returncode == 2
    assert expected in one_line_error(done)


@pytest.mark.parametrize(
    ("license_a", "license_b", "expected"),
    [("apache-2.0", "apache-2.0", "apache-2.0"), ("apache-2.0", "mit", None)],
)
def test_card_carries_the_parents_license_when_they_agree(
    seeded: Seeded,
    local: Locals,
    tmp_path: Path,
    license_a: str,
    license_b: str,
    expected: str | None,
) -> None:
    for repo, folder, license, branch in (
        ("org/a", local.a, license_a, "main"),
        ("org/b", local.b, license_b, "dev"),
    ):
        card = f"---\nlicense: {license}\ntags: [x]\n---\n# parent\n".encode()
        seeded.hub.add_commit(repo, {**folder_files(folder), "README.md": card}, branch=branch)
    recipe = write_recipe(tmp_path / "recipe.yaml", "org/a", "org/b@dev")
    out = tmp_path / "out"

    done = run_cli("run", recipe, "--out", out, "--quiet", env=seeded.env)

    assert done.returncode == 0, done.stderr
    card = (out / "README.md").read_text()
    front = front_matter(card)
    assert front.get("license") == expected
    assert {"merge", "mergekit", "shardmerge"} <= set(front["tags"])
    if expected is None:
        assert "(model A: `apache-2.0`, model B: `mit`)" in card
    else:
        assert "`apache-2.0`, the license both parents' model cards name." in card


@pytest.mark.parametrize(
    ("token", "args", "expected"),
    [
        (None, ["--push-to-hub", "tester/public", "--private"], "already exists and is public"),
        ("hf_wrong", ["--push-to-hub", "me/merged"], "the token is invalid or expired"),
        ("hf_wrong", ["--push-to-hub", "me/merged", "--dry-run"], "the token is invalid"),
    ],
    ids=["private-into-public", "bad-token", "dry-run-bad-token"],
)
def test_validate_and_run_check_the_push_target_alike(
    fake_hub: FakeHub,
    hub_env: dict[str, str],
    local: Locals,
    tmp_path: Path,
    token: str | None,
    args: list[str],
    expected: str | None,
) -> None:
    fake_hub.add_repo("tester/public", {"README.md": b"hi"})
    env = dict(hub_env, **({"HF_TOKEN": token} if token else {}))
    out = tmp_path / "out"
    for command in ("validate", "run"):
        done = run_cli(command, local.recipe, "--out", out, "--quiet", *args, env=env)
        if expected is None:
            assert done.returncode == 0, done.stderr
            continue
        assert done.returncode == 2, done.stderr
        assert expected in one_line_error(done)
        assert not out.exists() and list(tmp_path.glob(".*")) == []  # nothing merged
    assert not fake_hub.requests("POST") and not fake_hub.requests("PUT")


def test_a_streamed_stack_of_copies_needs_no_torch(
    seeded: Seeded, local: Locals, tmp_path: Path
) -> None:
    """A passthrough stack of Hub models, streamed shard by shard: the torch-free copier gives
    the local stack's files and reads each shard body at most once. (Pushing it would load
    torch: the push first checks every float of the output is finite.)"""
    stack = "method: passthrough\nmodels:\n  a: {a}\n  b: {b}\nlayers:\n  - {{a: 0-2}}\n  - {{b: 1-3}}\n"
    stack += SHARD_SIZE.replace("{", "{{").replace("}", "}}")
    reference = tmp_path / "ref" / "out"
    offline = dict(seeded.env, HF_HUB_OFFLINE="1")
    recipe = tmp_path / "local.yaml"
    recipe.write_text(stack.format(a=local.a, b=local.b))
    done = run_cli("run", recipe, "--out", reference, "--quiet", env=offline)
    assert done.returncode == 0, done.stderr
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(stack.format(a="org/a", b="org/b@dev"))
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    argv = ["run", str(recipe), "--out", str(out), "--stream", "--quiet"]
    code = (
        f"import sys; from shardmerge.cli import main; code = main({argv!r}); "
        "print('torch loaded:', 'torch' in sys.modules); sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=seeded.env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "torch loaded: False" in done.stdout
    assert_same_merge(out, reference)
    # The stack reads a's embeddings and layers 0-2, b's layers 1-3, final norm and head.
    read = {
        "org/a": lambda name: "embed" in name or any(f"layers.{i}." in name for i in (0, 1, 2)),
        "org/b": lambda name: "layers.0." not in name and "embed" not in name,
    }
    for repo, folder in (("org/a", local.a), ("org/b", local.b)):
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        for shard in shard_files(folder):
            bodies = [
                r for r in seeded.hub.requests("GET", f"/{repo}/*/{shard.name}") if not r.range
            ]
            used = any(read[repo](n) for n, f in weight_map.items() if f == shard.name)
            # Once each (before the reader's positions were shared by all models, b's first
            # shards were freed while a was read, and downloaded again).
            assert len(bodies) == int(used), (repo, shard.name)
    assert [p.name for p in out.parent.iterdir()] == ["out"]
