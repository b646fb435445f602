"""shardmerge.hub against the loopback fake Hub, and offline against a hand-built HF cache."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from shardmerge import hub
from shardmerge.errors import InputError, ShardmergeError
from tests.conftest import folder_files, make_hf_cache_repo, shard_filename, write_checkpoint
from tests.fakehub import FakeHub

SHARD_1, SHARD_2, SHARD_3 = (shard_filename(i, 3) for i in (1, 2, 3))


def tiny_model(folder: Path, shards: int = 3, rows: int = 64) -> Path:
    """``shards`` shards of one (rows x 64) float32 tensor each, plus config and tokenizer."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(rows, 64, generator=gen) for i in range(shards)}
    return write_checkpoint(
        folder,
        tensors,
        [[name] for name in tensors],
        config={"model_type": "llama", "num_hidden_layers": shards},
        extra_files={"tokenizer.json": '{"version": "1.0"}'},
    )


def raw_header(path: Path) -> dict:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def folder_state(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (folders as None) with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def seeded(fake_hub: FakeHub, tmp_path: Path) -> tuple[FakeHub, Path, dict[str, str]]:
    """acme/tiny: commit v1 (tag v1), then main one commit later with a changed config."""
    local = tiny_model(tmp_path / "tiny")
    first = folder_files(local)
    sha_v1 = fake_hub.add_repo("acme/tiny", first, tags=("v1",))
    sha_main = fake_hub.add_commit("acme/tiny", {**first, "config.json": b'{"model_type": "x"}'})
    fake_hub.log.clear()
    return fake_hub, local, {"v1": sha_v1, "main": sha_main}


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("acme/tiny", True),
        ("meta-llama/Llama-3.1-8B", True),
        ("Org_1/model.v2", True),
        ("tiny", False),
        ("./acme/tiny", False),
        ("/abs/path", False),
        ("acme/tiny/extra", False),
        ("acme/-tiny", False),
        ("acme/ti--ny", False),
        ("acme/ti..ny", False),
        ("acme/" + "x" * 92, False),
    ],
)
def test_looks_like_repo_id(ref: str, expected: bool) -> None:
    assert hub.looks_like_repo_id(ref) is expected


def test_resolve_branch_tag_and_sha(seeded, isolated_hf_home: Path) -> None:
    fake, _, shas = seeded
    assert hub.resolve_hub_model("acme/tiny", None).sha == shas["main"]
    assert hub.resolve_hub_model("acme/tiny", "main").sha == shas["main"]
    tagged = hub.resolve_hub_model("acme/tiny", "v1")
    assert tagged == hub.HubModel("acme/tiny", "v1", shas["v1"])
    assert hub.resolve_hub_model("acme/tiny", shas["v1"]).sha == shas["v1"]
    # Branch names are recorded in the cache so a later offline run resolves them too.
    refs = isolated_hf_home / "hub" / "models--acme--tiny" / "refs"
    assert (refs / "main").read_text() == shas["main"]
    assert (refs / "v1").read_text() == shas["v1"]


def test_fetch_listing_reads_headers_without_shard_bodies(seeded) -> None:
    fake, local, shas = seeded
    model = hub.resolve_hub_model("acme/tiny", "v1")
    fake.log.clear()

    listing = hub.fetch_listing(model)

    assert listing.files == {name: len(data) for name, data in folder_files(local).items()}
    assert listing.index == json.loads((local / "model.safetensors.index.json").read_text())
    assert listing.config == {"model_type": "llama", "num_hidden_layers": 3}
    assert listing.headers == {s: raw_header(local / s) for s in (SHARD_1, SHARD_2, SHARD_3)}
    for shard in (SHARD_1, SHARD_2, SHARD_3):
        header_end = 8 + struct.unpack("<Q", (local / shard).read_bytes()[:8])[0]
        requests = fake.requests(path=f"*/resolve/{shas['v1']}/{shard}")
        assert requests and all(r.method == "GET" and r.status == 206 for r in requests)
        assert all(int(r.range.split("-")[1]) < header_end for r in requests)
        assert sum(r.sent for r in requests) == header_end  # not one byte of tensor data
        assert header_end < (local / shard).stat().st_size // 10
    assert not fake.requests(path="*/tokenizer.json")


def test_fetch_listing_single_file_and_not_a_checkpoint(fake_hub: FakeHub, tmp_path: Path) -> None:
    single = write_checkpoint(tmp_path / "single", {"w": torch.ones(8, 8)}, config={"a": 1})
    fake_hub.add_repo("acme/single", folder_files(single))
    fake_hub.add_repo("acme/empty", {"README.md": b"# nothing here"})

    listing = hub.fetch_listing(hub.resolve_hub_model("acme/single", None))
    assert listing.index is None
    assert listing.headers == {"model.safetensors": raw_header(single / "model.safetensors")}

    with pytest.raises(InputError, match="no model.safetensors.index.json or model.safetensors"):
        hub.fetch_listing(hub.resolve_hub_model("acme/empty", None))


def test_download_files_fetches_only_the_named_files(seeded) -> None:
    fake, local, _ = seeded
    model = hub.resolve_hub_model("acme/tiny", None)
    fake.log.clear()

    snapshot = hub.download_files(model, ["config.json", SHARD_2, SHARD_2])

    assert snapshot.name == model.sha
    assert (snapshot / SHARD_2).read_bytes() == (local / SHARD_2).read_bytes()
    assert not (snapshot / SHARD_1).exists() and not (snapshot / SHARD_3).exists()
    got = sorted(r.path.rsplit("/", 1)[1] for r in fake.requests("GET"))
    assert got == ["config.json", SHARD_2]
    # Pinned by sha and already cached: a second call makes no request at all.
    fake.log.clear()
    assert hub.download_files(model, [SHARD_2]) == snapshot
    assert fake.log == []


def test_streaming_source_keeps_one_shard_on_disk(
    fake_hub: FakeHub, tmp_path: Path, isolated_hf_home: Path
) -> None:
    local = tiny_model(tmp_path / "big", shards=4, rows=256)  # 64 KiB of tensor data per shard
    fake_hub.add_repo("acme/big", folder_files(local))
    model = hub.resolve_hub_model("acme/big", None)
    source = hub.StreamingHubSource(model, tmp_path / "work")
    shards = [shard_filename(i, 4) for i in range(1, 5)]

    for shard in shards:
        path = source.fetch(shard)
        assert path.read_bytes() == (local / shard).read_bytes()
        assert not path.is_symlink()
        source.release(shard)
        assert not path.exists()
        assert not any(p.suffix == ".safetensors" for p in (tmp_path / "work").rglob("*"))

    shard_size = (local / shards[0]).stat().st_size
    assert shard_size <= source.peak_bytes_on_disk < shard_size + 8192
    assert not list((isolated_hf_home / "hub").rglob("*.safetensors"))  # cache untouched

    # Concurrent fetches of one shard download it once.
    fake_hub.log.clear()
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda: paths.append(source.fetch(shards[0]))) for _ in "1234"
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 1 and len(fake_hub.requests("GET", f"*/{shards[0]}")) == 1
    source.close()
    assert not source.folder.exists()

    # A shard already in the HF cache is used in place and never deleted.
    snapshot = hub.download_files(model, [shards[1]])
    cached = hub.StreamingHubSource(model, tmp_path / "work2")
    assert cached.fetch(shards[1]) == snapshot / shards[1]
    cached.release(shards[1])
    assert (snapshot / shards[1]).read_bytes() == (local / shards[1]).read_bytes()


def merged_output(tmp_path: Path) -> Path:
    front = {"base_model": ["acme/a", "acme/b"], "tags": ["merge", "shardmerge"]}
    readme = f"---\n{yaml.safe_dump(front)}---\n\n# merged\n"
    return write_checkpoint(
        tmp_path / "out",
        {"w": torch.arange(600, dtype=torch.float32).reshape(20, 30), "b": torch.zeros(30)},
        [["w"], ["b"]],
        config={"model_type": "llama"},
        extra_files={"README.md": readme},
    )


def test_push_folder_uploads_identical_files_in_one_commit(fake_hub: FakeHub, tmp_path: Path):
    out = merged_output(tmp_path)

    result = hub.push_folder(out, "tester/merged", private=True, commit_message="SLERP merge")

    assert result.url == f"{fake_hub.url}/tester/merged" and not result.dry_run
    assert fake_hub.files("tester/merged") == folder_files(out)
    assert fake_hub.created == [
        {"name": "merged", "organization": "tester", "visibility": "private"}
    ]
    assert fake_hub.repos["tester/merged"].private
    [commit] = fake_hub.commits
    assert commit["summary"] == "SLERP merge" and commit["sha"] == result.commit_sha
    assert result.files == tuple((p, len(d)) for p, d in folder_files(out).items())
    assert result.total_bytes == sum(len(d) for d in folder_files(out).values())
    readme = fake_hub.files("tester/merged")["README.md"].decode()
    front = yaml.safe_load(readme.split("---\n")[1])
    assert front["base_model"] == ["acme/a", "acme/b"]
    validated = fake_hub.requests("POST", "/api/validate-yaml")
    assert validated and validated[0].json["content"] == readme

    # Pushing again reuses the repo (no create) and re-uploads no LFS bytes.
    fake_hub.log.clear()
    hub.push_folder(out, "tester/merged", private=True, commit_message="again")
    assert not fake_hub.requests("POST", "/api/repos/create")
    assert not fake_hub.requests("PUT")


def test_push_dry_run_sends_nothing(fake_hub: FakeHub, tmp_path: Path) -> None:
    out = merged_output(tmp_path)
    result = hub.push_folder(out, "tester/merged", private=False, commit_message="m", dry_run=True)
    assert result.dry_run and result.commit_sha is None
    assert [path for path, _ in result.files] == sorted(folder_files(out))
    assert result.url == f"{fake_hub.url}/tester/merged" and result.created
    assert {r.method for r in fake_hub.log} <= {"GET", "HEAD"}  # reads the target only
    assert "tester/merged" not in fake_hub.repos


def test_failed_push_leaves_the_folder_alone_and_says_how_to_retry(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    out = merged_output(tmp_path)
    before = folder_state(out)
    fake_hub.fail(500, path="/api/models/tester/merged/commit/*")  # the commit is not retried

    with pytest.raises(ShardmergeError) as caught:
        hub.push_folder(out, "tester/merged", private=False, commit_message="m")

    assert caught.value.exit_code == 1
    message = str(caught.value)
    assert "tester/merged" in message and "retry" in message and str(out) in message
    assert "\n" not in message
    assert folder_state(out) == before


def test_push_without_permission_never_shows_the_token(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_wrong_token")
    with pytest.raises(InputError) as caught:
        hub.push_folder(merged_output(tmp_path), "tester/merged", private=True, commit_message="m")
    assert "401" in str(caught.value) and "HF_TOKEN" in str(caught.value)
    assert "hf_secret" not in str(caught.value)


def test_private_push_into_an_existing_public_repo_is_refused(fake_hub: FakeHub, tmp_path: Path):
    fake_hub.add_repo("tester/public", {"README.md": b"hi"})
    with pytest.raises(InputError, match="already exists and is public"):
        hub.push_folder(merged_output(tmp_path), "tester/public", private=True, commit_message="m")
    assert fake_hub.commits == []


def test_hub_errors_become_one_line_messages(
    seeded, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake, local, _ = seeded
    fake.add_repo("acme/private", folder_files(local), private=True)
    fake.add_repo("acme/gated", folder_files(local), gated=True)
    model = hub.resolve_hub_model("acme/tiny", None)

    def error(call, *args) -> ShardmergeError:
        with pytest.raises(ShardmergeError) as caught:
            call(*args)
        assert "\n" not in str(caught.value)
        return caught.value

    missing_repo = error(hub.resolve_hub_model, "acme/nope", None)
    assert isinstance(missing_repo, InputError) and "acme/nope: repository not found" in str(
        missing_repo
    )
    assert "revision not found" in str(error(hub.resolve_hub_model, "acme/tiny", "v9"))
    assert "revision not found" in str(error(hub.resolve_hub_model, "acme/tiny", "ab" * 20))
    missing_file = error(hub.download_files, model, ["tokenizer.model"])
    assert isinstance(missing_file, InputError)
    assert "file not found in the repo: tokenizer.model" in str(missing_file)

    gated = error(hub.fetch_listing, hub.resolve_hub_model("acme/gated", None))
    assert isinstance(gated, InputError)
    assert f"request access on {fake.url}/acme/gated" in str(gated)

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    unauthorised = error(hub.resolve_hub_model, "acme/private", None)
    assert isinstance(unauthorised, InputError) and "not authorised (401)" in str(unauthorised)
    assert "hf auth login" in str(unauthorised) and "hf_wrong" not in str(unauthorised)


def test_server_and_network_failures_are_retryable(seeded, monkeypatch: pytest.MonkeyPatch):
    fake, _, shas = seeded
    started = time.monotonic()
    fake.fail(500, path="/api/models/*", times=2)
    for revision in ("main", shas["v1"]):  # resolve_revision and model_info paths
        failure = hub_failure(hub.resolve_hub_model, "acme/tiny", revision)
        assert type(failure) is ShardmergeError and "answered 500; retry" in str(failure)

    model = hub.resolve_hub_model("acme/tiny", "v1")
    fake.fail(500, path="*/resolve/*/config.json", method="GET")  # HEAD is retried for ~20 s
    failure = hub_failure(hub.download_files, model, ["config.json"])
    assert type(failure) is ShardmergeError and "500" in str(failure)

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    failure = hub_failure(hub.resolve_hub_model, "acme/tiny", shas["v1"])
    assert type(failure) is ShardmergeError and "cannot reach the Hub" in str(failure)
    assert time.monotonic() - started < 10


def hub_failure(call, *args) -> ShardmergeError:
    with pytest.raises(ShardmergeError) as caught:
        call(*args)
    return caught.value


def test_subprocess_run_online_then_rerun_offline(seeded, hub_env: dict[str, str]) -> None:
    """hub_env drives a separate process; what it cached lets an offline rerun resolve `main`."""
    fake, _, shas = seeded
    script = (
        "from shardmerge import hub\n"
        "model = hub.resolve_hub_model('acme/tiny', 'main')\n"
        "listing = hub.fetch_listing(model)\n"
        "hub.download_files(model, sorted(listing.headers))\n"
        "print(model.sha, sorted(listing.headers) == sorted(listing.index['weight_map'].values()))"
    )

    def run(env: dict[str, str]) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run(hub_env) == f"{shas['main']} True"
    assert fake.requests("GET", f"*/resolve/{shas['main']}/{SHARD_3}")
    fake.stop()  # offline means no server either
    assert run({**hub_env, "HF_HUB_OFFLINE": "1"}) == f"{shas['main']} True"


def test_offline_resolves_pinned_refs_from_a_hand_built_cache(
    tmp_path: Path, isolated_hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no server is running at all
    local = tiny_model(tmp_path / "tiny")
    sha = "0123456789abcdef0123456789abcdef01234567"
    cache = isolated_hf_home / "hub"
    snapshot = make_hf_cache_repo(cache, "acme/tiny", folder_files(local), sha, ref="main")
    partial = {k: v for k, v in folder_files(local).items() if k != SHARD_3}
    make_hf_cache_repo(cache, "acme/partial", partial, sha, ref="main")

    assert hub.resolve_hub_model("acme/tiny", None).sha == sha
    assert hub.resolve_hub_model("acme/tiny", "main").sha == sha
    model = hub.resolve_hub_model("acme/tiny", sha)  # a full sha needs no refs/
    for ref in ("v2", sha[:7]):  # an uncached branch; short shas never resolve offline
        with pytest.raises(InputError, match="HF_HUB_OFFLINE=1"):
            hub.resolve_hub_model("acme/tiny", ref)
    with pytest.raises(InputError, match="HF_HUB_OFFLINE=1"):
        hub.resolve_hub_model("acme/uncached", None)

    listing = hub.fetch_listing(model)
    assert listing.headers == {s: raw_header(local / s) for s in (SHARD_1, SHARD_2, SHARD_3)}
    assert listing.config == {"model_type": "llama", "num_hidden_layers": 3}
    assert hub.download_files(model, [SHARD_1, "config.json"]) == snapshot
    with pytest.raises(InputError, match="missing.bin, other.bin: not in the local"):
        hub.download_files(model, [SHARD_1, "missing.bin", "other.bin"])
    with pytest.raises(InputError, match=SHARD_3):
        hub.fetch_listing(hub.resolve_hub_model("acme/partial", "main"))

    source = hub.StreamingHubSource(model, tmp_path / "work")
    assert source.fetch(SHARD_2) == snapshot / SHARD_2
    source.release(SHARD_2)  # the user's cache is an input: never deleted
    assert (snapshot / SHARD_2).read_bytes() == (local / SHARD_2).read_bytes()
    with pytest.raises(InputError, match="missing.bin"):
        source.fetch("missing.bin")


def test_offline_a_corrupted_cached_shard_is_removed_and_reported(
    tmp_path: Path, isolated_hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    local = tiny_model(tmp_path / "tiny")
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = make_hf_cache_repo(isolated_hf_home / "hub", "acme/tiny", folder_files(local), sha)
    blob = (snapshot / SHARD_2).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # damaged on disk: the blob keeps its sha256 name
    blob.write_bytes(bytes(data))
    model = hub.resolve_hub_model("acme/tiny", None)
    model = type(model)(model.repo_id, model.revision, model.sha, hub.fetch_listing(model).sha256)

    assert hub.download_files(model, [SHARD_1]) == snapshot  # an intact shard passes
    with pytest.raises(ShardmergeError) as caught:
        hub.download_files(model, [SHARD_1, SHARD_2])

    assert type(caught.value) is ShardmergeError and caught.value.exit_code == 1
    assert str(caught.value).startswith(f"cannot download from acme/tiny: {SHARD_2}: the cached")
    assert "\n" not in str(caught.value)
    assert not blob.exists() and not (snapshot / SHARD_2).is_symlink()
    assert (snapshot / SHARD_1).read_bytes() == (local / SHARD_1).read_bytes()


def test_stream_disk_needed_is_the_most_bytes_read_from_and_still_needed_at_once() -> None:
    from types import SimpleNamespace

    from shardmerge.resolve import default_stream_budget, stream_disk_needed

    def hub_model(**sizes: int) -> Any:
        return SimpleNamespace(hub=SimpleNamespace(sizes=sizes))

    a = hub_model(a1=10, a2=20, a3=30)
    b = hub_model(b1=100, b2=200)
    uses = [["a1", "a1", "a2", "a2", "a3"], ["b1", "b1", "b1", "b2", "b2"]]
    assert stream_disk_needed([a, b], uses) == 230  # a3 + b2, the last task
    assert default_stream_budget([a, b], uses) == 360  # 3 x 230, capped at all the files
    # A file read again later stays needed in between; a local model costs nothing.
    mixed = hub_model(x=5, y=7)
    local = SimpleNamespace(hub=None)
    assert stream_disk_needed([mixed, local], [["x", "y", "x"], ["l", "l", "l"]]) == 12
    big = hub_model(**{f"s{i}": 100 for i in range(10)})
    assert default_stream_budget([big], [[f"s{i}" for i in range(10)]]) == 300
    # A layer stack reads one model, then the other: positions are shared (None: the other
    # model's read), so their files are never needed at once.
    stacked = [["a1", "a2", None, None], [None, None, "b1", "b2"]]
    assert stream_disk_needed([a, b], stacked) == 200  # b2 alone
    assert default_stream_budget([a, b], stacked) == 330  # all the files: less than 3 x 200
