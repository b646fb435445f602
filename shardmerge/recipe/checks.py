"""What both recipe formats share: the problem collector and the values they both accept.

:class:`Check` gathers every problem with its location (``t.rules[1].gradient[2]: ...``) so
that one :class:`~shardmerge.errors.RecipeError` lists them all; the rest are pure parsers of
one value each (sizes, dtypes, devices, Hub ids and revisions, a method's parameter ranges and
model counts) and the YAML loader that refuses duplicate keys.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Hashable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml

from shardmerge.errors import RecipeError
from shardmerge.recipe.model import DEFAULT_SHARD_SIZE_BYTES, PLACEHOLDER, ModelRef, Recipe
from shardmerge.schedule import Gradient, LayerMap, Schedule

_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: str | int) -> int:
    """A size in bytes: an int, or a string such as "5GB" (10**9) or "2GiB" (2**30).

    Raises:
        ValueError: not a size, not a whole number of bytes, or not positive.
    """
    if isinstance(value, bool):  # bool is an int subclass; True is not a size
        raise ValueError(f"expected a size such as 5GB, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip().lower())
        if match is None or match.group(2) not in _SIZE_UNITS:
            raise ValueError(
                f"{value!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes"
                " (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        try:
            # Decimal so that "1.1GB" is exactly 1_100_000_000 bytes.
            exact = Decimal(match.group(1)) * _SIZE_UNITS[match.group(2)]
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a size") from None
        if exact != exact.to_integral_value():
            raise ValueError(f"{value!r} is not a whole number of bytes")
        size = int(exact)
    else:
        raise ValueError(f"expected a size such as 5GB, got {value!r}")
    if size <= 0:
        raise ValueError(f"the size must be positive, got {value!r}")
    return size


_DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


def normalize_dtype(name: str) -> str:
    """The canonical name ("bfloat16", "float16" or "float32") of a dtype spelling.

    Raises:
        ValueError: not one of those three.
    """
    key = name.strip().lower().removeprefix("torch.") if isinstance(name, str) else ""
    if key not in _DTYPES:
        raise ValueError(
            f"unknown dtype {name!r}; expected bfloat16 (bf16), float16 (fp16, half) "
            "or float32 (fp32, float)"
        )
    return _DTYPES[key]


# --------------------------------------------------------------------------- YAML


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate keys (plain YAML keeps the last one silently)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                self.duplicates.append(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key_node.value!r} "
                    "(YAML would silently keep only the last one)"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 1e-3 and 5e9 as strings (it wants a dot and a signed exponent); read them
# as numbers, as YAML 1.2 and every other tool does.
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str, source: str) -> tuple[Any, list[str]]:
    """The parsed document and the duplicate-key problems; raises RecipeError on bad YAML."""
    try:
        loader = _RecipeLoader(text)  # the reader rejects control characters up front
    except yaml.YAMLError as exc:
        raise RecipeError([f"YAML syntax error: {' '.join(str(exc).split())}"], source) from None
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "invalid YAML"
        raise RecipeError([f"YAML syntax error{where}: {what}"], source) from None
    except yaml.YAMLError as exc:
        raise RecipeError([f"YAML syntax error: {' '.join(str(exc).split())}"], source) from None
    except RecursionError:
        raise RecipeError(["YAML nested too deeply to read"], source) from None
    except ValueError as exc:
        # PyYAML builds scalars with int() and date(): 5000-digit integers, month 13.
        raise RecipeError([f"YAML value cannot be read: {exc}"], source) from None
    finally:
        loader.dispose()
    return data, loader.duplicates


# --------------------------------------------------------------------------- checking


def describe(value: Any) -> str:
    """A YAML-flavoured description of a value's type, for messages."""
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def at(path: str, key: object) -> str:
    """The location of ``key`` inside ``path``: "t.rules" + 1 -> "t.rules[1]"."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class Check:
    """Collects problems as "location: message" and offers the common checks."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        self.warnings: list[str] = []
        # Locations a misspelt key was matched to: "modles" already says "did you mean
        # 'models'?", so "models: missing" would only repeat it.
        self.suggested: set[str] = set()

    def add(self, path: str, message: str) -> None:
        if message.startswith("missing") and path in self.suggested:
            return
        self.problems.append(f"{path}: {message}" if path else message)

    def any_suggested(self, path: str, keys: Sequence[str]) -> bool:
        return any(at(path, key) in self.suggested for key in keys)

    def mapping(self, value: Any, path: str, what: str = "a mapping") -> dict[Any, Any] | None:
        if isinstance(value, dict):
            return value
        self.add(path, f"expected {what}, got {describe(value)}")
        return None

    def keys(
        self,
        mapping: Mapping[Any, Any],
        path: str,
        allowed: Sequence[str],
        unsupported: Mapping[str, str] | None = None,
        hint: Mapping[str, str] | None = None,
    ) -> None:
        """Every key not in ``allowed`` is a problem: a reason, a hint or a did-you-mean."""
        for key in mapping:
            name = str(key)
            if name in allowed:
                continue
            if unsupported and name in unsupported:
                self.add(at(path, name), unsupported[name])
                continue
            if hint and name in hint:
                self.add(at(path, name), f"unknown key; {hint[name]}")
                continue
            close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
            if close:
                self.suggested.add(at(path, close[0]))
                self.add(at(path, name), f"unknown key; did you mean {close[0]!r}?")
            else:
                self.add(at(path, name), "unknown key; expected one of " + ", ".join(allowed))

    def string(self, value: Any, path: str, what: str = "a string") -> str | None:
        if isinstance(value, str) and value.strip():
            return value
        got = "an empty string" if isinstance(value, str) else describe(value)
        self.add(path, f"expected {what}, got {got}")
        return None

    def boolean(self, value: Any, path: str) -> bool | None:
        if isinstance(value, bool):
            return value
        self.add(path, f"expected true or false, got {describe(value)}")
        return None

    def t(self, value: Any, path: str, bounded: bool = True) -> float | None:
        """A t value: a finite number in [0, 1] (bools are not numbers here); ``bounded``
        False: any finite number (weights, lambda; ranges are checked per method)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            wanted = "a number between 0 and 1" if bounded else "a number"
            self.add(path, f"expected {wanted}, got {describe(value)}")
            return None
        if isinstance(value, float) and not math.isfinite(value):  # huge ints overflow isfinite
            what = "t must be a finite number between 0 and 1" if bounded else "not finite"
            self.add(path, f"{what}, got {value}")
            return None
        if bounded and not 0 <= value <= 1:
            self.add(path, f"{value} is outside [0, 1]")
            return None
        return float(value)

    def gradient(self, value: Any, path: str, bounded: bool = True) -> Gradient | None:
        """A list of at least one t anchor."""
        if not isinstance(value, list):
            self.add(path, f"expected a list of numbers (gradient anchors), got {describe(value)}")
            return None
        if not value:
            self.add(path, "a gradient needs at least one anchor")
            return None
        anchors = [self.t(v, at(path, i), bounded) for i, v in enumerate(value)]
        if any(a is None for a in anchors):
            return None
        return Gradient(tuple(a for a in anchors if a is not None))

    def dtype(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str):
            self.add(path, f"expected a dtype name such as bfloat16, got {describe(value)}")
            return None
        try:
            return normalize_dtype(value)
        except ValueError as exc:
            self.add(path, str(exc))
            return None


def split_revision(text: str, path: str, check: Check) -> ModelRef | None:
    """Split "org/name@rev" into ModelRef("org/name", "rev").

    The last "@" splits: Hub revisions (e.g. refs/pr/1) never contain one.
    """
    ref, sep, revision = text.rpartition("@")
    if not sep:
        return ModelRef(text, None)
    if not ref.strip() or not revision.strip():
        check.add(path, f"{text!r} should be 'ref@revision' with both parts non-empty")
        return None
    if "@" in ref:  # "org/m@v1@x": neither part would be what was meant
        check.add(
            path,
            f"{text!r} has more than one '@': write 'ref@revision' (for a local path with '@', "
            "use {path: ...})",
        )
        return None
    return ModelRef(ref, revision)


_MERGEKIT_ONLY = (
    "base_model",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "modules",
)
MERGEKIT_HINT = {
    key: "it is a mergekit key, and mergekit configs need `merge_method: slerp`"
    for key in _MERGEKIT_ONLY
}
MERGEKIT_HINT["dtype"] = MERGEKIT_HINT["out_dtype"] = (
    "the output dtype goes under output.dtype (mergekit configs need `merge_method: slerp`)"
)
_DEVICE_RE = re.compile(r"auto|cpu|cuda(?::[0-9]+)?")
# The Hub's rules (as hub.looks_like_repo_id, without importing huggingface_hub): two parts of
# [A-Za-z0-9_.-] neither starting nor ending with "-" or ".", no "--" or "..", 96 characters.
# One part of a Hub repo id (org, or name).
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(rf"{_REPO_PART}/{_REPO_PART}")


def is_device(value: object) -> bool:
    """Whether ``value`` names a device shardmerge runs on: auto, cpu, cuda or cuda:N."""
    return isinstance(value, str) and _DEVICE_RE.fullmatch(value) is not None


_HUB_URL_RE = re.compile(
    r"https?://[^/]+/(?:models/)?([^/?#@]+/[^/?#@]+)(?:/(?:tree|blob|resolve)/([^/?#]+))?"
)


def repo_id_hint(ref: str) -> str | None:
    """For a ``ref`` that is not a repo id, the likely fix when there is one (no network)."""
    url = _HUB_URL_RE.match(ref)
    if url is not None:
        repo, revision = url.groups()
        return f"it is a URL: write {repo + ('@' + revision if revision else '')!r}"
    if re.fullmatch(_REPO_PART, ref) and "--" not in ref and ".." not in ref:
        return (
            "Hub repo ids are org/name; the Hub's old single-name models now live under an "
            "organisation, e.g. gpt2 is openai-community/gpt2"
        )
    return None


def is_repo_id(value: object) -> bool:
    """Whether ``value`` is a valid Hub repo id "org/name" (no network)."""
    return (
        isinstance(value, str)
        and len(value) <= 96
        and "--" not in value
        and ".." not in value
        and _REPO_ID_RE.fullmatch(value) is not None
    )


def parse_shard_size(value: Any, path: str, check: Check) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # "shard_size: 5e9" reads as a float
    if isinstance(value, (str, int)):
        try:
            return parse_size(value)
        except ValueError as exc:
            check.add(path, str(exc))
    else:
        check.add(path, f"expected a size such as 5GB or a number of bytes, got {describe(value)}")
    return DEFAULT_SHARD_SIZE_BYTES


def model_index(
    value: Any, path: str, refs: tuple[ModelRef, ...], check: Check, known: bool
) -> int | None:
    """The index in ``refs`` of a model named "base", "org/name@rev" or "org/name"."""
    if value == "base":
        return 0
    if not isinstance(value, str):
        check.add(path, f"expected base, union or a model reference, got {describe(value)}")
        return None
    # "org/name@rev" first, then the bare "org/name" (ambiguous only when two models are
    # revisions of one repo; the first wins then).
    for i, ref in enumerate(refs):
        if ref.revision is not None and value == f"{ref.ref}@{ref.revision}":
            return i
    for i, ref in enumerate(refs):
        if value == ref.ref:
            return i
    if known:
        names = ", ".join(r.ref for r in refs)
        check.add(path, f"{value!r} is not base, union or one of the models ({names})")
    return None


NO_SCHEDULE = Schedule(rules=(), default=None, non_layer=None, style="mergekit")


def model_count_problem(spec: Any, count: int, has_base: bool) -> str | None:
    """Why ``count`` merged models (the base excluded) do not suit ``spec``, or None."""
    low, high = max(1, spec.min_models), spec.max_models
    if low <= count and (high is None or count <= high):
        return None
    besides = " besides the base model" if has_base or spec.base == "required" else ""
    if high == low:
        wanted = f"exactly {low}"
    elif high is None:
        wanted = f"at least {low}"
    else:
        wanted = f"{low} to {high}"
    noun = "model" if wanted.endswith(" 1") else "models"
    return f"{spec.name} needs {wanted} {noun}{besides}, got {count}"


def mergekit_recipe(check: Check, text: str, source: str, **fields: Any) -> Recipe:
    """A :class:`Recipe` of mergekit's format: ``fields`` over the defaults of what a mergekit
    config does not set (the output and the device come from the command line, no Hub push)."""
    defaults: dict[str, Any] = {
        "schedule": NO_SCHEDULE,
        "input_dtype": None,
        "out_dtype": None,
        "output_dir": None,
        "shard_size_bytes": DEFAULT_SHARD_SIZE_BYTES,
        "device": "auto",
        "tokenizer_source": "a",
        "layer_range": None,
        "push_to_hub": None,
        "private": False,
        "stream": False,
        "format": "mergekit",
    }
    return Recipe(text=text, source=source, warnings=tuple(check.warnings), **defaults | fields)


def placeholder(text: str, source: str, check: Check) -> Recipe:
    """Stands in for a recipe whose problems are being reported (never returned to callers)."""
    return mergekit_recipe(check, text, source, models=(PLACEHOLDER, PLACEHOLDER))


def with_fallback(own: dict[str, Schedule], top: dict[str, Schedule]) -> dict[str, Schedule]:
    """A model's parameters, falling back to the top-level ones (mergekit's lookup order: a
    condition list without a fallback hands unmatched tensors on to the next level)."""
    merged = dict(top)
    for key, schedule in own.items():
        below = top.get(key)
        if below is not None and schedule.default is None:
            schedule = Schedule(
                rules=schedule.rules + below.rules,
                default=below.default,
                non_layer=None,
                style="mergekit",
            )
        merged[key] = schedule
    return merged


def check_param_range(param: Any, schedule: Schedule, where: str, check: Check) -> None:
    """Every number a schedule can give must be in the parameter's range (density in [0, 1])."""
    if param.low is None and param.high is None:
        return
    values: list[float] = []
    for value in [rule.value for rule in schedule.rules] + [schedule.default]:
        if isinstance(value, Gradient):
            values += value.anchors
        elif isinstance(value, LayerMap):
            values += [v for _, v in value.values]
        elif value is not None:
            values.append(value)
    for value in values:
        problem = param.out_of_range(value)
        if problem is not None:
            check.add(where, problem)
            return
