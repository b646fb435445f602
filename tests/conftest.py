"""Shared fixtures and helpers: Hub isolation, the loopback fake Hub, tiny checkpoints.

Helpers are plain functions; import them in a test module with
``from tests.conftest import write_checkpoint, folder_files, make_hf_cache_repo``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehub import FakeHub, etag_of

# Points any Hub call a test forgot to aim at the fake server at a closed local port,
# so no test can ever reach the real Hub.
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"


def pytest_configure(config: pytest.Config) -> None:
    # huggingface_hub's LFS upload passes bytes as `data=`, which httpx2 deprecates: not ours.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:Use 'content=<...>' to upload raw bytes/text content.:DeprecationWarning",
    )


def _patch_hf_constants(monkeypatch: pytest.MonkeyPatch, **values: object) -> None:
    """Set huggingface_hub.constants in this process: they are read once at import time."""
    from huggingface_hub import constants

    for name, value in values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    if "ENDPOINT" in values:
        template = f"{values['ENDPOINT']}/{{repo_id}}/resolve/{{revision}}/{{filename}}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


@pytest.fixture(autouse=True)
def isolated_hf_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Give every test its own empty HF_HOME / HF_HUB_CACHE, no token, no telemetry, no Hub.

    Applies to ``os.environ`` (for subprocesses) and to the already-imported
    ``huggingface_hub.constants`` (for in-process calls). Returns HF_HOME.
    """
    home = tmp_path_factory.mktemp("hf-home")
    env = {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_ENDPOINT": UNREACHABLE_ENDPOINT,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "XDG_CACHE_HOME": str(home / "xdg-cache"),  # plan's cached disk rates: not the user's
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    _patch_hf_constants(
        monkeypatch,
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HF_XET_CACHE=str(home / "xet"),
        HF_TOKEN_PATH=str(home / "token"),
        HF_STORED_TOKENS_PATH=str(home / "stored_tokens"),
        AGENT_HARNESSES_PATH=str(home / ".agent_harnesses.json"),
        ENDPOINT=UNREACHABLE_ENDPOINT,
        HF_HUB_OFFLINE=False,
        HF_HUB_DISABLE_TELEMETRY=True,
        HF_HUB_DISABLE_PROGRESS_BARS=True,
    )
    tqdm_module = sys.modules.get("huggingface_hub.utils.tqdm")
    if tqdm_module is not None:  # imported before this test: it copied the flag at import
        monkeypatch.setattr(tqdm_module, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    return home


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A started FakeHub; this process's huggingface_hub and os.environ point at it.

    Also sets ``HF_TOKEN=hf_fake`` (the token the fake accepts) and ``HF_HUB_DISABLE_XET=1``
    (the git-LFS upload path, so the server receives the real bytes).
    """
    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    _patch_hf_constants(monkeypatch, ENDPOINT=hub.url, HF_HUB_DISABLE_XET=True)
    yield hub
    hub.stop()


@pytest.fixture
def hub_env(fake_hub: FakeHub) -> dict[str, str]:
    """A complete environment for ``subprocess.run(..., env=hub_env)`` aimed at ``fake_hub``.

    Same HF_HOME / HF_HUB_CACHE as the test process, HF_TOKEN=hf_fake, no Xet, no telemetry,
    no progress bars. Add ``HF_HUB_OFFLINE=1`` yourself for offline runs.
    """
    return dict(os.environ)


def shard_filename(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_checkpoint(
    folder: Path,
    tensors: dict,
    shard_names: list[list[str]] | None = None,
    config: dict | None = None,
    extra_files: dict[str, bytes | str] | None = None,
) -> Path:
    """Write a tiny Hugging Face style checkpoint into ``folder`` (created if needed).

    Args:
        folder: destination folder.
        tensors: tensor name -> torch.Tensor.
        shard_names: tensor names per shard, e.g. ``[["a", "b"], ["c"]]`` writes
            ``model-00001-of-00002.safetensors`` and ``model-00002-of-00002.safetensors`` plus
            ``model.safetensors.index.json``; every tensor must appear exactly once.
            ``None`` writes a single ``model.safetensors`` and no index.
        config: written as ``config.json`` when given.
        extra_files: relative path -> content (bytes, or str written as UTF-8), e.g. tokenizer files.

    Returns:
        ``folder``.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # Own, contiguous copies: safetensors refuses shared or strided storage.
    owned = {name: t.detach().clone().contiguous() for name, t in tensors.items()}
    if shard_names is None:
        save_file(owned, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        listed = [name for names in shard_names for name in names]
        if sorted(listed) != sorted(owned):
            raise ValueError(f"shard_names must list every tensor once: {listed} vs {list(owned)}")
        weight_map = {}
        for i, names in enumerate(shard_names, start=1):
            filename = shard_filename(i, len(shard_names))
            shard = {name: owned[name] for name in names}
            save_file(shard, str(folder / filename), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, filename))
        total = sum(t.numel() * t.element_size() for t in owned.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    for rel, content in (extra_files or {}).items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        path.write_bytes(data)
    return folder


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` as {posix relative path: bytes}: seeds a FakeHub repo."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def make_hf_cache_repo(
    cache_dir: Path, repo_id: str, files: dict[str, bytes], sha: str, ref: str | None = "main"
) -> Path:
    """Build the standard HF cache layout for one commit by hand; returns the snapshot folder.

    ``models--{org}--{name}/blobs/<etag>`` holds the bytes, ``snapshots/<sha>/<path>`` are
    relative symlinks to them and ``refs/<ref>`` holds the sha with no trailing newline (a newline
    breaks resolution). Call it again with another sha/ref to add commits.
    """
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    if ref is not None:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(sha)
    snapshot = repo_dir / "snapshots" / sha
    for rel, data in files.items():
        blob = repo_dir / "blobs" / etag_of(rel, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


# mergekit 0.1.5, installed by benchmarks/setup_mergekit.sh (git-ignored): the agreement tests
# run its CLI on the same config and skip where it is absent.
MERGEKIT_YAML = Path(__file__).resolve().parent.parent / "benchmarks" / ".venv-mergekit" / "bin"
MERGEKIT_YAML = MERGEKIT_YAML / "mergekit-yaml"
needs_mergekit = pytest.mark.skipif(
    not MERGEKIT_YAML.exists(), reason="mergekit not installed (benchmarks/setup_mergekit.sh)"
)


def run_mergekit(config: Path, out: Path) -> Path:
    """mergekit's output of ``config`` in ``out``, on the CPU, offline."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        [str(MERGEKIT_YAML), str(config), str(out)],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    return out
