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


ARENAS_SCRIPT = """
import ctypes, os, sys, threading
import torch  # as in a merge: torch's threads already started
from shardmerge import heap

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]


def arenas():
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    libc.malloc_stats()  # one "Arena N:" block per arena, on stderr
    os.dup2(saved, 2)
    os.close(w)
    return os.read(r, 1 << 16).decode().count("Arena ")


before = arenas()
if sys.argv[1] == "apply":
    heap.keep_temporaries()
together = threading.Barrier(3)


def work():
    block = libc.malloc(1 << 20)
    together.wait()  # all three threads hold a block at once
    libc.free(block)


threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(before, arenas())
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
@pytest.mark.parametrize("apply", [False, True])
def test_threads_share_one_arena_once_applied(tmp_path, apply):
    """Applied after torch's import (as the pass engine does), threads that allocate at once
    get no arena of their own (each would keep its own freed memory); without it they do."""
    import subprocess
    import sys

    script = tmp_path / "arenas.py"
    script.write_text(ARENAS_SCRIPT)
    arg = "apply" if apply else "leave"
    out = subprocess.run(
        [sys.executable, str(script), arg], capture_output=True, text=True, check=True
    ).stdout
    before, after = map(int, out.split())
    assert after == before if apply else after > before


def test_outside_heap_gives_zeroed_elements_of_the_dtype():
    import torch

    for count, dtype in ((0, torch.float64), (5, torch.int32), (1 << 16, torch.int16)):
        t = heap.outside_heap(count, dtype, torch.device("cpu"))
        assert t.dtype == dtype and t.numel() == count
        assert int(t.count_nonzero()) == 0
        t[:] = 1  # writable
