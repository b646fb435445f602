"""shardmerge.heap: glibc's malloc thresholds for the pass engine's chunk temporaries."""

from __future__ import annotations

import platform

import pytest

from shardmerge import heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_glibc_takes_the_settings():
    assert heap.keep_temporaries() is True
    assert heap.keep_temporaries() is True  # once per process: the cached answer


def test_a_refusal_is_read_not_assumed(monkeypatch):
    class Libc:
        def __init__(self, answer: int) -> None:
            self.mallopt = lambda param, value: answer

    monkeypatch.setattr(heap.sys, "platform", "linux")
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: Libc(0))
    assert heap._mallopt(heap._M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD_BYTES) is False
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: Libc(1))
    assert heap._mallopt(heap._M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD_BYTES) is True
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap._mallopt(heap._M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD_BYTES) is False


def test_the_pass_engine_applies_them(tmp_path, monkeypatch):
    from shardmerge import cli, passes
    from tests.test_methods import CONFIGS, _family

    calls = []
    monkeypatch.setattr(passes.heap, "keep_temporaries", lambda: calls.append(1) or True)
    folders, _ = _family(tmp_path)
    recipe = tmp_path / "merge.yml"
    text = CONFIGS["task_arithmetic"].format(**{f"m{j}": f for j, f in enumerate(folders)})
    recipe.write_text(text)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert calls == [1]
