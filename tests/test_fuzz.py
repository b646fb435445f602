"""Property-based fuzzing of everything shardmerge parses from untrusted input.

Safetensors headers and shard files, index files and recipes may only fail with the library's own
error (CheckpointError / RecipeError): never another exception, never a hang, and never an
allocation sized by what a file *claims* rather than what it holds.

The in-suite run is bounded (200 examples per property, a few seconds in all). For a longer run,
raise the example count with an environment variable, e.g.::

    SHARDMERGE_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/test_fuzz.py

and add ``--hypothesis-seed=N`` to replay a run, or ``--hypothesis-show-statistics`` to see where
the time goes. No example database is written (``database=None``), so runs leave no files behind;
a failure prints the minimal input and the ``@reproduce_failure`` line to paste in.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shardmerge.errors import CheckpointError, RecipeError
from shardmerge.inventory import DTYPE_SIZES, UNSUPPORTED_DTYPES, read_header, read_local_model
from shardmerge.recipe import parse_recipe
from tests.conftest import write_checkpoint

EXAMPLES = int(os.environ.get("SHARDMERGE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# One parse of a small input takes milliseconds; this is generous for a loaded CI machine.
MAX_SECONDS = 5.0
INDEX = "model.safetensors.index.json"


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang(f"no answer within {MAX_SECONDS} s")


def _only(expected: type[Exception], call: Callable[[], object]) -> None:
    """``call()`` returns or raises ``expected``, within MAX_SECONDS (a hang fails the test)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, MAX_SECONDS)
    try:
        call()
    except expected as exc:
        assert str(exc), "errors must carry a message"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def real_shard(workdir: Path) -> bytes:
    """A genuine safetensors file with a few tensors of several dtypes."""
    folder = write_checkpoint(
        workdir / "real",
        {
            "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "h": torch.ones(5, dtype=torch.bfloat16),
            "n": torch.tensor(7, dtype=torch.int64),
            "e": torch.zeros(0, 3),
        },
    )
    return (folder / "model.safetensors").read_bytes()


def _shard_bytes(header: Any, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _write(workdir: Path, name: str, data: bytes) -> Path:
    path = workdir / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- (a) headers

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
dtypes = st.sampled_from(sorted(DTYPE_SIZES) + sorted(UNSUPPORTED_DTYPES)) | st.text(max_size=6)
counts = (
    st.integers(min_value=0, max_value=64)
    | st.integers(min_value=-5, max_value=2**64)
    | json_values
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": dtypes | json_values,
        "shape": st.lists(counts, max_size=4) | json_values,
        "data_offsets": st.lists(counts, min_size=0, max_size=3) | json_values,
    },
)
headers = st.dictionaries(
    st.text(max_size=10) | st.just("__metadata__"), entries | json_values, max_size=5
)


@FUZZ
@given(data=st.binary(max_size=256))
@example(data=b"")
@example(data=struct.pack("<Q", 2**60))  # a header claiming an exabyte
@example(data=struct.pack("<Q", 2) + b"[]")
@example(data=struct.pack("<Q", 6) + b"\xff\xfe{}\x00\x00")  # undecodable
def test_random_bytes(workdir, data):
    path = _write(workdir, "random.safetensors", data)
    _only(CheckpointError, lambda: read_header(path, path.name))


@FUZZ
@given(header=headers, data=st.binary(max_size=64))
@example(header={"x": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, data=b"")
@example(header={"x": {"dtype": "F32", "shape": [1] * 100_000, "data_offsets": [0, 4]}}, data=b"")
@example(header={"x": {"dtype": "F32", "shape": [], "data_offsets": [2**60, 2**60 + 4]}}, data=b"")
def test_random_json_headers(workdir, header, data):
    path = _write(workdir, "json.safetensors", _shard_bytes(header, data))
    _only(CheckpointError, lambda: read_header(path, path.name))


@FUZZ
@given(
    raw=st.binary(max_size=64)
    | st.sampled_from(
        [
            b"[" * 50_000,  # nesting deep enough to exhaust the JSON decoder's recursion
            b"9" * 5_000,  # beyond Python's integer digit limit
            b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5_000 + b'], "data_offsets": [0, 4]}}',
            b"\xef\xbb\xbf{}",
        ]
    )
)
def test_undecodable_header_text(workdir, raw):
    path = _write(workdir, "text.safetensors", _shard_bytes(raw, b""))
    _only(CheckpointError, lambda: read_header(path, path.name))


def _mutate(data: bytes, draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "length", "splice"]))
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=64))
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    i = draw(st.integers(0, len(data)))
    return data[:i] + draw(st.binary(max_size=16)) + data[i + draw(st.integers(0, 16)) :]


@FUZZ
@given(draw=st.data())
def test_mutated_real_shards(workdir, real_shard, draw):
    data = _mutate(real_shard, draw.draw)
    folder = workdir / "mutated"
    folder.mkdir(exist_ok=True)
    path = _write(folder, "model.safetensors", data)
    tracemalloc.start()
    try:
        _only(CheckpointError, lambda: read_header(path, path.name))
        _only(CheckpointError, lambda: read_local_model(folder, "model A"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Parsing costs a small multiple of the bytes actually there, whatever the file claims.
    assert peak < 1_000_000 + 200 * len(data)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("<Q", 2**60) + b"{}",
        struct.pack("<Q", 99_999_999) + b"{}",
        _shard_bytes({"x": {"dtype": "U8", "shape": [2**60], "data_offsets": [0, 2**60]}}, b"x"),
    ],
    ids=["length-2**60", "length-just-under-the-cap", "tensor-2**60"],
)
def test_claimed_sizes_are_not_allocated(workdir, data):
    path = _write(workdir, "claims.safetensors", data)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match="larger than the file|holds only"):
            read_header(path, path.name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------- (b) indexes

file_names = st.sampled_from(
    [
        "model.safetensors",
        "missing.safetensors",
        "../model.safetensors",
        "/etc/passwd",
        "a\x00b",
        "",
        ".",
        "sub/../model.safetensors",
        "x" * 300,
    ]
) | st.text(max_size=20)
weight_maps = st.dictionaries(st.text(max_size=8), file_names, max_size=6)
indexes = (
    st.fixed_dictionaries({"weight_map": weight_maps}, optional={"metadata": json_values})
    | st.fixed_dictionaries({"weight_map": json_values})
    | json_values
)


@FUZZ
@given(index=indexes)
@example(index={"weight_map": {"w": "model.safetensors", "h": "model.safetensors"}})
@example(index={"weight_map": {}})
def test_random_indexes(workdir, real_shard, index):
    folder = workdir / "indexed"
    folder.mkdir(exist_ok=True)
    _write(folder, "model.safetensors", real_shard)
    _write(folder, INDEX, json.dumps(index).encode())
    _only(CheckpointError, lambda: read_local_model(folder, "model A"))


@FUZZ
@given(raw=st.binary(max_size=64) | st.sampled_from([b"[" * 50_000, b"1" * 5_000]))
def test_undecodable_index_and_config(workdir, real_shard, raw):
    for name in (INDEX, "config.json"):
        folder = workdir / f"raw-{name}"
        folder.mkdir(exist_ok=True)
        _write(folder, "model.safetensors", real_shard)
        _write(folder, name, raw)
        _only(CheckpointError, lambda: read_local_model(folder, "model A"))  # noqa: B023


# --------------------------------------------------------------------------- (c) recipes

RECIPE_KEYS = [
    "models", "a", "b", "t", "default", "non_layer", "rules", "match", "regex", "value",
    "gradient", "layers", "output", "dir", "dtype", "shard_size", "device", "tokenizer_from",
    "hub", "push_to", "private", "stream", "path", "revision", "merge_method", "base_model",
    "slices", "sources", "layer_range", "model", "parameters", "filter", "out_dtype",
    "tokenizer_source", "tokenizer", "source", "chat_template", "modules",
]  # fmt: skip
yaml_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()
    | st.sampled_from(["slerp", "org/name", "0-3", "5GB", "bfloat16", "cuda:0", "*", "a@b", ""])
    # Regexes that re.compile rejects in unusual ways (OverflowError, RecursionError).
    | st.sampled_from(["(", "a{99999999999}", "(" * 5_000 + ")" * 5_000, "[z-a]", "(?P<n>"])
    | st.text(max_size=10)
)
yaml_keys = (
    st.sampled_from(RECIPE_KEYS)
    | st.integers(-3, 100)
    | st.from_regex(r"[0-9]{1,14}( ?- ?[0-9]{1,14})?", fullmatch=True)  # layer ranges
    | st.text(max_size=6)
)
recipe_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(yaml_keys, inner, max_size=5),
    max_leaves=30,
)
recipes = st.dictionaries(
    st.sampled_from(RECIPE_KEYS) | st.text(max_size=6), recipe_values, max_size=7
)
# Fragments that exercise YAML's corners: anchors, tags, flow collections, odd scalars.
yaml_tokens = st.sampled_from(
    [
        "\n", "  ", ": ", "- ", "[", "]", "{", "}", ", ", "&x ", "*x", "!!python/object:os.system",
        "!!binary ", "!!set ", "? ", "<<: ", "'", '"', "#", "|", ">", "%YAML 1.1\n", "---\n",
        "2001-13-45", "0x1F", "0o17", "1e400", ".nan", ".inf", "~", "9" * 4_400, "@",
        *RECIPE_KEYS,
    ]
)  # fmt: skip


@FUZZ
@given(text=st.text(max_size=200))
def test_random_recipe_text(text):
    _only(RecipeError, lambda: parse_recipe(text))


@FUZZ
@given(tokens=st.lists(yaml_tokens | st.text(max_size=4), max_size=40))
@example(tokens=["[" * 5_000])
@example(tokens=["t: ", "9" * 5_000])
@example(tokens=["t: ", "2001-13-45"])
@example(tokens=["t: ", "1" + "0" * 400])
def test_yaml_shaped_recipe_text(tokens):
    _only(RecipeError, lambda: parse_recipe("".join(tokens)))


@FUZZ
@given(data=recipes | recipe_values)
@example(data={"models": {"a": "x", "b": "y"}, "t": 10**400})
@example(data={"merge_method": "slerp", "base_model": "a", "parameters": {"t": [10**400]}})
@example(
    data={
        "models": {"a": "x", "b": "y"},
        "t": {"non_layer": 0.5, "rules": [{"match": "x", "layers": {"9" * 5_000: 0.5}}]},
    }
)
@example(data={"models": {"a": "x", "b": "y"}, "t": {"rules": [{"regex": "a{99999999999}"}]}})
def test_random_recipe_structures(data):
    text = yaml.safe_dump(data, allow_unicode=True)
    _only(RecipeError, lambda: parse_recipe(text))
