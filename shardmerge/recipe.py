"""Recipe loading and validation: YAML text in, a frozen :class:`Recipe` out.

Two formats are read; a ``merge_method`` key means mergekit's, anything else is ours.

**shardmerge's own format** (every key but ``models`` and ``t`` is optional)::

    models:
      a: meta-llama/Llama-3.2-1B@main    # the t = 0 end: "ref" or "ref@revision"
      b: {path: ./my-finetune}           # the t = 1 end: or {path: ..., revision: ..., name: ...}
    t:
      default: 0.5             # a number, or {gradient: [...]}; for tensors no rule matches
      non_layer: 0.5           # embeddings, final norm, lm_head (they have no layer position)
      rules:                   # tried in order, first match wins
        - match: self_attn                 # a substring of the tensor name (or regex: ...)
          gradient: [0, 0.5, 0.3, 0.7, 1]  # anchors spread evenly from first to last layer
        - regex: 'mlp\\.(gate|up)_proj'     # re.search on the tensor name
          value: 0.3
        - match: mlp
          layers: {0: 0.1, 1: 0.2, "2-5": 0.9}  # "a-b" is inclusive; other layers fall through
    output:
      dir: ./merged            # relative paths start from the recipe file's folder
      name: my-merge           # the model card's title (default: the output folder's name)
      dtype: bfloat16          # default: the first model's dtype
      shard_size: 5GB          # 5GB = 5e9 bytes, 2GiB = 2 * 1024**3 bytes, or a plain int
    device: auto               # auto | cpu | cuda | cuda:N
    tokenizer_from: a          # a | b | union
    hub:
      push_to: me/merged
      private: true            # default false (public), as in huggingface_hub
      stream: false            # download input shards just in time

With this recipe ``model.layers.8.self_attn.q_proj.weight`` of a 32-layer model gets
t = 0.4935 (8/31 of the way along the gradient), ``model.layers.3.mlp.down_proj.weight`` gets
0.9, ``model.layers.9.mlp.down_proj.weight`` falls through to the default 0.5, and
``lm_head.weight`` gets non_layer = 0.5. ``t: 0.5`` alone means 0.5 everywhere.
``non_layer`` is required whenever the default is a gradient or missing, or a rule uses
``gradient`` or ``layers``: mergekit silently gives such tensors a gradient's first anchor.
A ``{path: ...}`` model is taken as written (no ``@`` split), for local paths containing ``@``.

**mergekit configs** with ``merge_method: slerp`` are read unchanged: ``base_model`` is the
t = 0 end; ``models:`` or ``slices:`` (see :mod:`shardmerge.recipe_slices`) name the other
model; ``parameters.t`` (slice-level first) is a number, a gradient list or a list of
``{filter, value}`` conditions; ``dtype``, ``out_dtype``, ``tokenizer_source`` (``base``,
``union`` or a model), the ``tokenizer:`` block (``source``, ``tokens``, ``pad_to_multiple_of``)
and ``chat_template`` are kept (:mod:`shardmerge.vocab`). Features shardmerge does not implement
(methods it lacks, ``modules``, LoRA ``model+lora`` references) are errors rather than silently
ignored, and so is a ``t`` under one model's parameters, which mergekit ignores.

Every problem is collected with its location (``t.rules[1].gradient[2]: ...``) and raised as
one :class:`~shardmerge.errors.RecipeError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import yaml

from shardmerge.errors import RecipeError
from shardmerge.schedule import Gradient, LayerMap, Rule, Schedule, TValue
from shardmerge.slices import Slice
from shardmerge.vocab import TokenOverride, VocabSpec

__all__ = [
    "DEFAULT_SHARD_SIZE_BYTES",
    "ModelRef",
    "Recipe",
    "is_device",
    "is_repo_id",
    "load_recipe",
    "normalize_dtype",
    "parse_recipe",
    "parse_size",
]

DEFAULT_SHARD_SIZE_BYTES = 5_000_000_000
# A guard against typos such as "0-1000000000" expanding into a huge layer map.
_MAX_LAYER_INDEX = 100_000


@dataclass(frozen=True)
class ModelRef:
    """A Hub id ("org/name") or local path, as written, and its revision."""

    ref: str
    revision: str | None
    name: str | None = field(default=None, compare=False)  # how the model card names it


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; see the module docstring for both formats."""

    # SLERP: (t = 0 end, t = 1 end); a method with a base: (base, model 1, ...); else the models.
    models: tuple[ModelRef, ...]
    schedule: Schedule  # SLERP's t (other methods: model_params and shared_params)
    input_dtype: str | None  # mergekit `dtype`: inputs are cast to it before merging
    out_dtype: str | None  # None => input_dtype, else the first model's stored dtype
    output_dir: str | None
    shard_size_bytes: int
    device: str  # "auto" | "cpu" | "cuda" | "cuda:N"
    tokenizer_source: Literal["a", "b"]
    layer_range: tuple[int, int] | None  # mergekit slice layer_range, half-open
    push_to_hub: str | None
    private: bool
    stream: bool
    format: Literal["mergekit", "shardmerge"]
    text: str
    source: str
    warnings: tuple[str, ...]
    # Where relative model paths and output.dir resolve: the recipe file's folder for our
    # format (as compose files and package manifests do), "" (the current directory) for
    # mergekit configs, as mergekit itself does, and for recipes given as text.
    base_dir: str = ""
    name: str | None = None  # output.name: the model card's title (default: the folder's name)
    method: str = "slerp"
    model_keys: tuple[str, ...] = ("a", "b")  # how messages and records name each model
    # Other methods: per merged model (the base excluded), parameter -> schedule; and the
    # shared parameters (booleans as given, numbers as schedules).
    model_params: tuple[Mapping[str, Schedule], ...] = ()
    shared_params: Mapping[str, Schedule | bool] = field(default_factory=dict)
    random_seed: int | None = None  # random masks (DARE); None: 0, recorded in the card
    # A new layer stack (mergekit slices:, our layers:); () merges whole models layer by layer.
    slices: tuple[Slice, ...] = ()
    # tokenizer_source / tokenizer: / chat_template; None: the first model's tokenizer, and
    # the vocabularies must match.
    vocab: VocabSpec | None = None

    @property
    def model_a(self) -> ModelRef:
        return self.models[0]

    @property
    def model_b(self) -> ModelRef:
        return self.models[1]

    @property
    def first_merged(self) -> int:
        """Index in ``models`` of the first merged model (1 when models[0] is a base)."""
        return len(self.models) - len(self.model_params) if self.model_params else 0


# --------------------------------------------------------------------------- public helpers


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate the recipe file at ``path``.

    Raises:
        RecipeError: the file cannot be read, or lists every problem in it.
    """
    source = os.fspath(path)
    try:
        # utf-8-sig: editors on Windows may prepend a byte-order mark.
        with open(source, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise RecipeError(["recipe file not found"], source) from None
    except IsADirectoryError:
        raise RecipeError(["is a directory, not a recipe file"], source) from None
    except UnicodeDecodeError as exc:
        raise RecipeError([f"not UTF-8 text ({exc.reason} at byte {exc.start})"], source) from None
    except OSError as exc:
        raise RecipeError([f"cannot read the recipe: {exc.strerror or exc}"], source) from None
    recipe = parse_recipe(text, source)
    if recipe.format == "mergekit":
        return recipe
    return dataclasses.replace(recipe, base_dir=os.path.dirname(os.path.abspath(source)))


def parse_recipe(text: str, source: str = "<string>") -> Recipe:
    """Validate recipe ``text``; ``source`` names it in messages.

    Raises:
        RecipeError: listing every problem found, each with its location.
    """
    data, problems = _load_yaml(text, source)
    if data is None:
        raise RecipeError(["the recipe is empty; it needs at least models and t"], source)
    if not isinstance(data, dict):
        raise RecipeError(
            [f"the top level must be a mapping (models:, t:, ...), got {_describe(data)}"],
            source,
        )
    check = _Check(problems)
    if "merge_method" in data:
        recipe = _parse_mergekit(data, check, text, source)
    else:
        recipe = _parse_shardmerge(data, check, text, source)
    if check.problems:
        raise RecipeError(check.problems, source)
    return recipe


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


def _load_yaml(text: str, source: str) -> tuple[Any, list[str]]:
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


def _describe(value: Any) -> str:
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


def _at(path: str, key: object) -> str:
    """The location of ``key`` inside ``path``: "t.rules" + 1 -> "t.rules[1]"."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class _Check:
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
        return any(_at(path, key) in self.suggested for key in keys)

    def mapping(self, value: Any, path: str, what: str = "a mapping") -> dict[Any, Any] | None:
        if isinstance(value, dict):
            return value
        self.add(path, f"expected {what}, got {_describe(value)}")
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
                self.add(_at(path, name), unsupported[name])
                continue
            if hint and name in hint:
                self.add(_at(path, name), f"unknown key; {hint[name]}")
                continue
            close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
            if close:
                self.suggested.add(_at(path, close[0]))
                self.add(_at(path, name), f"unknown key; did you mean {close[0]!r}?")
            else:
                self.add(_at(path, name), "unknown key; expected one of " + ", ".join(allowed))

    def string(self, value: Any, path: str, what: str = "a string") -> str | None:
        if isinstance(value, str) and value.strip():
            return value
        got = "an empty string" if isinstance(value, str) else _describe(value)
        self.add(path, f"expected {what}, got {got}")
        return None

    def boolean(self, value: Any, path: str) -> bool | None:
        if isinstance(value, bool):
            return value
        self.add(path, f"expected true or false, got {_describe(value)}")
        return None

    def t(self, value: Any, path: str, bounded: bool = True) -> float | None:
        """A t value: a finite number in [0, 1] (bools are not numbers here); ``bounded``
        False: any finite number (weights, lambda; ranges are checked per method)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            wanted = "a number between 0 and 1" if bounded else "a number"
            self.add(path, f"expected {wanted}, got {_describe(value)}")
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
            self.add(path, f"expected a list of numbers (gradient anchors), got {_describe(value)}")
            return None
        if not value:
            self.add(path, "a gradient needs at least one anchor")
            return None
        anchors = [self.t(v, _at(path, i), bounded) for i, v in enumerate(value)]
        if any(a is None for a in anchors):
            return None
        return Gradient(tuple(a for a in anchors if a is not None))

    def dtype(self, value: Any, path: str) -> str | None:
        if not isinstance(value, str):
            self.add(path, f"expected a dtype name such as bfloat16, got {_describe(value)}")
            return None
        try:
            return normalize_dtype(value)
        except ValueError as exc:
            self.add(path, str(exc))
            return None


_PLACEHOLDER = ModelRef("", None)  # stands in for a model that failed validation


def _split_revision(text: str, path: str, check: _Check) -> ModelRef | None:
    """Split "org/name@rev" into ModelRef("org/name", "rev").

    The last "@" splits: Hub revisions (e.g. refs/pr/1) never contain one.
    """
    ref, at, revision = text.rpartition("@")
    if not at:
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


# --------------------------------------------------------------------------- our format

_TOP_KEYS = ("method", "models", "t", "layers", "output", "device", "tokenizer_from", "hub")
# Our format with a method other than slerp (models with parameters, a base, shared parameters).
_METHOD_TOP_KEYS = (
    "method", "base", "models", "parameters", "layers", "random_seed", "output", "device", "hub",
    "tokenizer_from",
)  # fmt: skip
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
_MERGEKIT_HINT = {
    key: "it is a mergekit key, and mergekit configs need `merge_method: slerp`"
    for key in _MERGEKIT_ONLY
}
_MERGEKIT_HINT["dtype"] = _MERGEKIT_HINT["out_dtype"] = (
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


def _parse_shardmerge(data: dict[Any, Any], check: _Check, text: str, source: str) -> Recipe:
    method = data.get("method", "slerp")
    if method != "slerp":
        return _parse_ours_method(data, check, text, source, method)
    check.keys(data, "", _TOP_KEYS, hint=_MERGEKIT_HINT)
    model_a, model_b = _our_models(data, check)
    schedule = _our_schedule(data, check)

    output_dir: str | None = None
    name: str | None = None
    out_dtype: str | None = None
    shard_size = DEFAULT_SHARD_SIZE_BYTES
    output = check.mapping(data["output"], "output") if "output" in data else None
    if output is not None:
        check.keys(output, "output", ("dir", "name", "dtype", "shard_size"))
        if "dir" in output:
            output_dir = check.string(output["dir"], "output.dir", "a folder path")
        if "name" in output:
            name = check.string(output["name"], "output.name", "a model name")
        if "dtype" in output:
            out_dtype = check.dtype(output["dtype"], "output.dtype")
        if "shard_size" in output:
            shard_size = _shard_size(output["shard_size"], "output.shard_size", check)

    device = "auto"
    if "device" in data:
        value = data["device"]
        if is_device(value):
            device = value
        else:
            check.add("device", f"expected auto, cpu, cuda or cuda:N, got {_describe(value)}")

    tokenizer: Literal["a", "b"] = "a"
    vocab: VocabSpec | None = None
    if "tokenizer_from" in data:
        value = data["tokenizer_from"]
        if value in ("a", "b"):
            tokenizer = "b" if value == "b" else "a"
            vocab = VocabSpec(source=1 if value == "b" else 0)
        elif value == "union":
            vocab = VocabSpec(source="union")
        else:
            check.add("tokenizer_from", f"expected a, b or union, got {_describe(value)}")

    push_to: str | None = None
    private = False
    stream = False
    hub = check.mapping(data["hub"], "hub") if "hub" in data else None
    if hub is not None:
        check.keys(hub, "hub", ("push_to", "private", "stream"))
        if "push_to" in hub:
            value = hub["push_to"]
            if is_repo_id(value):
                push_to = value
            else:
                check.add(
                    "hub.push_to", f"expected a Hub repo id 'org/name', got {_describe(value)}"
                )
        if "private" in hub:
            private = bool(check.boolean(hub["private"], "hub.private"))
            if "push_to" not in hub:
                check.warnings.append("hub.private has no effect without hub.push_to")
        if "stream" in hub:
            stream = bool(check.boolean(hub["stream"], "hub.stream"))

    slices: tuple[Slice, ...] = ()
    if "layers" in data:
        from shardmerge.recipe_slices import our_layers

        slices = tuple(our_layers(data["layers"], check, ("a", "b"), "slerp", True) or ())
    elif model_a == model_b and model_a != _PLACEHOLDER:
        shown = model_a.ref + (f"@{model_a.revision}" if model_a.revision else "")
        check.warnings.append(
            f"models.a and models.b are the same model ({shown}); the merge reproduces it"
        )

    return Recipe(
        models=(model_a, model_b),
        schedule=schedule,
        input_dtype=None,
        out_dtype=out_dtype,
        output_dir=output_dir,
        shard_size_bytes=shard_size,
        device=device,
        tokenizer_source=tokenizer,
        vocab=vocab,
        layer_range=None,
        push_to_hub=push_to,
        private=private,
        stream=stream,
        format="shardmerge",
        text=text,
        source=source,
        warnings=tuple(check.warnings),
        name=name,
        slices=slices,
    )


def _shard_size(value: Any, path: str, check: _Check) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # "shard_size: 5e9" reads as a float
    if isinstance(value, (str, int)):
        try:
            return parse_size(value)
        except ValueError as exc:
            check.add(path, str(exc))
    else:
        check.add(path, f"expected a size such as 5GB or a number of bytes, got {_describe(value)}")
    return DEFAULT_SHARD_SIZE_BYTES


def _our_models(data: dict[Any, Any], check: _Check) -> tuple[ModelRef, ModelRef]:
    if "models" not in data:
        check.add("models", "missing; give models.a (the t = 0 end) and models.b (the t = 1 end)")
        return _PLACEHOLDER, _PLACEHOLDER
    models = check.mapping(data["models"], "models", "a mapping with keys a and b")
    if models is None:
        return _PLACEHOLDER, _PLACEHOLDER
    check.keys(models, "models", ("a", "b"))
    refs = []
    for key, end in (("a", "t = 0"), ("b", "t = 1")):
        path = f"models.{key}"
        if key not in models:
            check.add(path, f"missing; the model at the {end} end")
            refs.append(_PLACEHOLDER)
        else:
            refs.append(_our_model(models[key], path, check) or _PLACEHOLDER)
    return refs[0], refs[1]


def _our_model(value: Any, path: str, check: _Check) -> ModelRef | None:
    """A model given as "ref", "ref@revision" or {path: ..., revision: ..., name: ...}."""
    if isinstance(value, dict):
        check.keys(value, path, ("path", "revision", "name"))
        name = check.string(value["name"], _at(path, "name")) if "name" in value else None
        if "path" not in value:
            check.add(_at(path, "path"), "missing; a Hub id (org/name) or a local folder")
            return None
        ref = check.string(value["path"], _at(path, "path"), "a Hub id or a local folder")
        revision = None
        if "revision" in value:
            revision = check.string(
                value["revision"],
                _at(path, "revision"),
                "a string (quote revisions that look like numbers)",
            )
            if revision is None:
                return None
        return ModelRef(ref, revision, name) if ref is not None else None
    if isinstance(value, str) and value.strip():
        return _split_revision(value, path, check)
    check.add(
        path,
        "expected a Hub id or local path ('ref' or 'ref@revision') or {path: ..., revision: ...}, "
        f"got {_describe(value)}",
    )
    return None


def _our_schedule(data: dict[Any, Any], check: _Check) -> Schedule:
    fallback = Schedule(rules=(), default=0.5, non_layer=0.5, style="shardmerge")
    if "t" not in data:
        check.add("t", "missing; e.g. `t: 0.5`, or a mapping with default, non_layer and rules")
        return fallback
    return _our_scheduled(data["t"], "t", check) or fallback


def _our_scheduled(raw: Any, path: str, check: _Check, bounded: bool = True) -> Schedule | None:
    """A scheduled value (t, or any method parameter): a number, or a mapping with default,
    non_layer and rules; ``bounded``: every number in [0, 1]."""
    if isinstance(raw, list):
        check.add(
            path,
            f"a bare list is not a {path} here; for a gradient write "
            f"`{path}: {{default: {{gradient: [...]}}, non_layer: ...}}`",
        )
        return None
    if not isinstance(raw, dict):
        value = check.t(raw, path, bounded)
        return Schedule(rules=(), default=value, non_layer=value, style="shardmerge")

    check.keys(raw, path, ("default", "non_layer", "rules"))
    default: TValue | None = None
    if "default" in raw:
        default = _our_value(raw["default"], f"{path}.default", check, bounded)
    non_layer = (
        check.t(raw["non_layer"], f"{path}.non_layer", bounded) if "non_layer" in raw else None
    )

    rules: list[Rule] = []
    needs_non_layer: list[str] = []  # why tensors outside the stacks need an explicit t
    if "rules" in raw:
        items = raw["rules"]
        if not isinstance(items, list):
            check.add(f"{path}.rules", f"expected a list of rules, got {_describe(items)}")
            items = []
        for i, item in enumerate(items):
            rule = _our_rule(item, f"{path}.rules[{i}]", check, bounded)
            if rule is None:
                continue
            rules.append(rule)
            if not isinstance(rule.value, float):
                kind = "gradient" if isinstance(rule.value, Gradient) else "layers"
                needs_non_layer.append(f"{path}.rules[{i}] uses {kind}")

    if "default" not in raw and "rules" not in raw:
        check.add(path, "give a default, rules, or both")
    if "default" not in raw:
        needs_non_layer.insert(0, "there is no default")
    elif isinstance(default, Gradient):
        needs_non_layer.insert(0, "the default is a gradient")
    if "non_layer" not in raw:
        if needs_non_layer:
            check.add(
                f"{path}.non_layer",
                f"missing; it is required because {needs_non_layer[0]}: tensors outside the "
                "layer stacks (embeddings, final norm, lm_head) have no layer position, so give "
                "them an explicit value (mergekit would silently use a gradient's first anchor)",
            )
        elif isinstance(default, float):
            non_layer = default
    return Schedule(rules=tuple(rules), default=default, non_layer=non_layer, style="shardmerge")


def _our_value(
    value: Any, path: str, check: _Check, bounded: bool = True
) -> float | Gradient | None:
    """A number or {gradient: [...]}."""
    if isinstance(value, dict):
        check.keys(value, path, ("gradient",))
        if "gradient" not in value:
            check.add(path, "expected a number or {gradient: [...]}")
            return None
        return check.gradient(value["gradient"], _at(path, "gradient"), bounded)
    if isinstance(value, list):
        check.add(path, "a bare list is not a t here; write {gradient: [...]}")
        return None
    return check.t(value, path, bounded)


def _our_rule(item: Any, path: str, check: _Check, bounded: bool = True) -> Rule | None:
    rule = check.mapping(
        item, path, "a rule mapping (match or regex, and value, gradient or layers)"
    )
    if rule is None:
        return None
    check.keys(rule, path, ("match", "regex", "value", "gradient", "layers"))

    pattern: str | None = None
    kind: Literal["substring", "regex"] = "substring"
    patterns = [k for k in ("match", "regex") if k in rule]
    if not patterns:
        if not check.any_suggested(path, ("match", "regex")):
            check.add(path, "give `match:` (a substring of the tensor name) or `regex:`")
    elif len(patterns) == 2:
        check.add(path, "give only one of match and regex")
    elif patterns[0] == "match":
        pattern = check.string(rule["match"], _at(path, "match"), "a substring of tensor names")
    else:
        kind = "regex"
        pattern = check.string(rule["regex"], _at(path, "regex"), "a regular expression")
        if pattern is not None:
            try:
                re.compile(pattern)
            # OverflowError: a{99999999999}; RecursionError: parentheses nested thousands deep.
            except (re.error, OverflowError, RecursionError) as exc:
                reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
                check.add(_at(path, "regex"), f"invalid regular expression: {reason}")
                pattern = None

    value: TValue | None = None
    values = [k for k in ("value", "gradient", "layers") if k in rule]
    if not values:
        if not check.any_suggested(path, ("value", "gradient", "layers")):
            check.add(path, "give one of value (a number), gradient (a list) or layers (a mapping)")
    elif len(values) > 1:
        check.add(path, f"give only one of value, gradient and layers (got {' and '.join(values)})")
    elif values[0] == "value":
        value = check.t(rule["value"], _at(path, "value"), bounded)
    elif values[0] == "gradient":
        value = check.gradient(rule["gradient"], _at(path, "gradient"), bounded)
    else:
        value = _layer_map(rule["layers"], _at(path, "layers"), check, bounded)

    if pattern is None or value is None:
        return None
    label = pattern if kind == "substring" else f"re:{pattern}"
    return Rule(pattern=pattern, kind=kind, value=value, label=label, where=path)


# Bounded digits: int() refuses strings of thousands of digits (and no model has 10**12 layers).
_RANGE_RE = re.compile(r"([0-9]{1,12})(?:\s*-\s*([0-9]{1,12}))?")


def _layer_map(value: Any, path: str, check: _Check, bounded: bool = True) -> LayerMap | None:
    """{index: t, "a-b": t} (inclusive ranges) -> LayerMap; overlapping keys are errors."""
    mapping = check.mapping(value, path, "a mapping of layer indices or 'a-b' ranges to t")
    if mapping is None:
        return None
    if not mapping:
        check.add(path, "needs at least one layer")
        return None
    spans: list[tuple[int, int, str, float]] = []
    ok = True
    for key, raw_t in mapping.items():
        where = f"{path}.{key}"
        span = _layer_span(key)
        problem = None
        if span is None:
            problem = "a key must be a layer index (0, 1, ...) or an inclusive range 'a-b'"
        elif span[0] > span[1]:
            problem = f"the range is backwards; write '{span[1]}-{span[0]}'"
        elif span[1] > _MAX_LAYER_INDEX:
            problem = f"layer {span[1]} is implausibly large (limit {_MAX_LAYER_INDEX})"
        if problem is not None:
            check.add(where, problem)
            ok = False
        t = check.t(raw_t, where, bounded)
        ok = ok and t is not None
        if problem is None and span is not None:
            spans.append((span[0], span[1], str(key), t or 0.0))
    spans.sort()
    reach, reach_key = -1, ""  # the furthest layer covered so far, and by which key
    for start, end, key, _ in spans:
        if start <= reach:
            check.add(path, f"keys {reach_key!r} and {key!r} both give layer {start} a t")
            ok = False
        if end > reach:
            reach, reach_key = end, key
    if not ok:
        return None
    values = [(i, t) for start, end, _, t in spans for i in range(start, end + 1)]
    return LayerMap(tuple(values))


def _layer_span(key: Any) -> tuple[int, int] | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return (key, key) if key >= 0 else None
    if isinstance(key, str):
        match = _RANGE_RE.fullmatch(key.strip())
        if match:
            start = int(match.group(1))
            return start, int(match.group(2)) if match.group(2) else start
    return None


# --------------------------------------------------------------------------- mergekit

_MK_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
_MK_UNSUPPORTED = {
    "modules": "multi-module (modules:) configs are not supported; use models: or one slices: "
    "entry",
}
_T_UNDER_MODEL = (
    "slerp's t is a global parameter, which mergekit silently ignores here; move it to the "
    "top-level parameters (or the slice's parameters)"
)


def _parse_mergekit(data: dict[Any, Any], check: _Check, text: str, source: str) -> Recipe:
    check.keys(data, "", _MK_KEYS, unsupported=_MK_UNSUPPORTED)
    method = data["merge_method"]
    if not isinstance(method, str):
        check.add("merge_method", f"expected a method name such as slerp, got {_describe(method)}")
    elif method != "slerp":
        return _parse_mergekit_method(data, check, text, source, method)

    base: ModelRef | None = None
    base_text = ""
    if "base_model" not in data:
        check.add("base_model", "missing; slerp needs a base_model (the t = 0 end)")
    else:
        base = _mk_ref(data["base_model"], "base_model", check)
        base_text = data["base_model"] if base is not None else ""

    other: tuple[ModelRef, str] | None = None
    layer_range: tuple[int, int] | None = None
    slices: tuple[Slice, ...] = ()
    if "models" in data and "slices" in data:
        check.add("models", "give only one of models and slices")
    elif "models" in data:
        other = _mk_models(data["models"], base, base_text, check)
    elif "slices" not in data:
        check.add("models", "missing; give models: (a list of {model: ...}) or slices:")

    # mergekit looks t up in the slice's parameters first, then the top level; a condition
    # list without a fallback hands unmatched tensors on to the next level.
    rules: list[Rule] = []
    default: TValue | None = None
    top_t = _mk_parameters(data, check)
    if "slices" in data and "models" not in data:
        from shardmerge.recipe_slices import mk_slices

        has_top_t = top_t is not None
        found = mk_slices(
            data["slices"], check, method="slerp", spec=None, base=base,
            top_t=top_t, has_top_t=has_top_t,
        )  # fmt: skip
        if found is not None and base is not None:
            other = (found.models[1], str(data["slices"]))
            slices = tuple(found.slices)
            first = slices[0]
            if len(slices) == 1 and first.schedule is not None:
                rules, default = list(first.schedule.rules), first.schedule.default
                ranges = {(s.start, s.end) for s in first.sources}
                layer_range = next(iter(ranges)) if len(ranges) == 1 else None
            elif has_top_t:
                rules, default = _mk_t(top_t, "parameters.t", check)
    elif top_t is not None:
        rules, default = _mk_t(top_t, "parameters.t", check)
    else:
        check.add("parameters.t", "missing; slerp needs t (e.g. parameters: {t: 0.5})")

    input_dtype = check.dtype(data["dtype"], "dtype") if "dtype" in data else None
    out_dtype = check.dtype(data["out_dtype"], "out_dtype") if "out_dtype" in data else None
    tokenizer, vocab = _mk_tokenizer(data, base, base_text, other, check)

    return Recipe(
        models=(base or _PLACEHOLDER, other[0] if other is not None else _PLACEHOLDER),
        schedule=Schedule(rules=tuple(rules), default=default, non_layer=None, style="mergekit"),
        input_dtype=input_dtype,
        out_dtype=out_dtype,
        output_dir=None,
        shard_size_bytes=DEFAULT_SHARD_SIZE_BYTES,
        device="auto",
        tokenizer_source=tokenizer,
        vocab=vocab,
        layer_range=layer_range,
        push_to_hub=None,
        private=False,
        stream=False,
        format="mergekit",
        text=text,
        source=source,
        warnings=tuple(check.warnings),
        slices=slices,
    )


def _mk_ref(value: Any, path: str, check: _Check) -> ModelRef | None:
    """A mergekit model reference: "org/name", a path, or either with "@revision"."""
    text = check.string(value, path, "a model reference (org/name or a local path)")
    if text is None:
        return None
    if "+" in text:
        check.add(
            path,
            f"{text!r} is a LoRA reference (model+lora), which is not supported; merge the "
            "adapter into its base first (e.g. peft's merge_and_unload) and reference the result",
        )
        return None
    return _split_revision(text, path, check)


def _mk_model_parameters(value: Any, path: str, check: _Check) -> None:
    """Per-model parameters: slerp has none, and a t here is the classic silent mistake."""
    params = check.mapping(value, path)
    if params is None:
        return
    for key in params:
        if key == "t":
            check.add(_at(path, "t"), _T_UNDER_MODEL)
        elif key in _MK_KNOWN_PARAMS:  # e.g. a weight left in a config made from a template
            check.warnings.append(
                f"{_at(path, key)}: ignored; slerp takes no per-model parameters (mergekit "
                "ignores it too)"
            )
        else:
            check.add(_at(path, key), "slerp takes no per-model parameters (only a global t)")


def _mk_models(
    value: Any, base: ModelRef | None, base_text: str, check: _Check
) -> tuple[ModelRef, str] | None:
    """The non-base model of `models:`; the base is added when not listed, as mergekit does."""
    if not isinstance(value, list) or not value:
        check.add("models", f"expected a non-empty list of {{model: ...}}, got {_describe(value)}")
        return None
    listed: list[tuple[ModelRef, str]] = []
    ok = True
    for i, entry in enumerate(value):
        path = f"models[{i}]"
        item = check.mapping(entry, path, "a mapping {model: ...}")
        if item is None:
            ok = False
            continue
        check.keys(item, path, ("model", "parameters"))
        if "parameters" in item:
            _mk_model_parameters(item["parameters"], _at(path, "parameters"), check)
        if "model" not in item:
            check.add(_at(path, "model"), "missing; the model reference")
            ok = False
            continue
        ref = _mk_ref(item["model"], _at(path, "model"), check)
        if ref is None:
            ok = False
        else:
            listed.append((ref, item["model"]))
    if not ok or base is None:
        return None
    return _the_other(base, base_text, listed, "models", check)


def _the_other(
    base: ModelRef, base_text: str, listed: list[tuple[ModelRef, str]], path: str, check: _Check
) -> tuple[ModelRef, str] | None:
    """The one model besides the base; slerp takes exactly two."""
    distinct: list[tuple[ModelRef, str]] = [(base, base_text)]
    for ref, text in listed:
        if all(ref != seen for seen, _ in distinct):
            distinct.append((ref, text))
    if len(distinct) != 2:
        names = ", ".join(text for _, text in distinct)
        check.add(
            path,
            f"slerp merges exactly two models; base_model and {path} name {len(distinct)} "
            f"distinct ones ({names})",
        )
        return None
    return distinct[1]


def _layer_range(value: Any, path: str, check: _Check) -> tuple[int, int] | None:
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        check.add(path, f"expected [start, end] (two integers), got {_describe(value)}")
        return None
    start, end = value
    if not 0 <= start < end:
        check.add(path, f"[{start}, {end}] is empty or negative; it is half-open: [start, end)")
        return None
    return start, end


def _mk_parameters(data: dict[Any, Any], check: _Check) -> Any:
    """The top-level parameters.t, or None when absent (checked for type and keys)."""
    if "parameters" not in data:
        return None
    params = check.mapping(data["parameters"], "parameters")
    if params is None:
        return None
    check.keys(params, "parameters", ("t",))
    return params.get("t")


def _mk_t(
    value: Any, path: str, check: _Check, bounded: bool = True
) -> tuple[list[Rule], TValue | None]:
    """(rules, fallback) of a mergekit parameter value: number, gradient or conditions."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return _mk_conditions(value, path, check, bounded)
    if isinstance(value, list):
        if any(isinstance(v, dict) for v in value):
            check.add(path, "mixes numbers (a gradient) with {filter, value} conditions")
            return [], None
        return [], check.gradient(value, path, bounded)
    if isinstance(value, dict):
        check.add(
            path,
            "expected a number, a list of numbers (gradient) or a list of {filter, value} "
            "conditions, got a mapping",
        )
        return [], None
    return [], check.t(value, path, bounded)


def _mk_conditions(
    items: list[dict[Any, Any]], path: str, check: _Check, bounded: bool = True
) -> tuple[list[Rule], TValue | None]:
    rules: list[Rule] = []
    default: TValue | None = None
    fallback_at: str | None = None
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        check.keys(item, where, ("filter", "value"))
        if "value" not in item:
            check.add(_at(where, "value"), "missing; a number or a list of numbers (gradient)")
            continue
        raw = item["value"]
        value: float | Gradient | None
        if isinstance(raw, list):
            value = check.gradient(raw, _at(where, "value"), bounded)
        else:
            value = check.t(raw, _at(where, "value"), bounded)
        pattern = item.get("filter")
        is_fallback = pattern is None or pattern == "*"
        if not is_fallback:
            pattern = check.string(pattern, _at(where, "filter"), "a substring of tensor names")
        if fallback_at is not None:
            # mergekit tries conditions in order, so nothing after a fallback is ever reached.
            check.warnings.append(
                f"{where} is never used: the fallback at {fallback_at} matches every tensor first"
            )
            continue
        if value is None:
            continue
        if is_fallback:
            fallback_at = where
            default = value
        elif isinstance(pattern, str):
            rule = Rule(pattern=pattern, kind="substring", value=value, label=pattern, where=where)
            rules.append(rule)
    return rules, default


def _mk_tokenizer(
    data: dict[Any, Any],
    base: ModelRef | None,
    base_text: str,
    other: tuple[ModelRef, str] | None,
    check: _Check,
) -> tuple[Literal["a", "b"], VocabSpec | None]:
    """SLERP's tokenizer choices: ("a" or "b" for the files copied, the vocabulary spec)."""
    refs = (base or _PLACEHOLDER, other[0] if other is not None else _PLACEHOLDER)
    spec = _mk_vocab(data, refs, check, known=base is not None and other is not None)
    return ("b" if spec is not None and spec.source == 1 else "a"), spec


def _mk_vocab(
    data: dict[Any, Any], refs: tuple[ModelRef, ...], check: _Check, known: bool = True
) -> VocabSpec | None:
    """tokenizer_source, or mergekit's `tokenizer:` block, and chat_template -> a VocabSpec
    (None: neither given; the base's, or first model's, tokenizer, vocabularies must match).
    ``known``: every model reference parsed (else unknown names are not reported)."""
    if "tokenizer_source" in data and "tokenizer" in data:
        check.add("tokenizer", "give only one of tokenizer_source and tokenizer")
        return None
    template = None
    if "chat_template" in data:
        template = _mk_chat_template(data["chat_template"], check)
    if "tokenizer_source" in data:
        source = _mk_vocab_source(data["tokenizer_source"], "tokenizer_source", refs, check, known)
        return VocabSpec(source=source, chat_template=template)
    if "tokenizer" not in data:
        return VocabSpec(source=0, chat_template=template) if template is not None else None
    block = check.mapping(data["tokenizer"], "tokenizer")
    if block is None:
        return None
    check.keys(block, "tokenizer", ("source", "tokens", "pad_to_multiple_of"))
    # mergekit's default source in the block is union.
    source = _mk_vocab_source(block.get("source", "union"), "tokenizer.source", refs, check, known)
    pad = None
    if "pad_to_multiple_of" in block:
        value = block["pad_to_multiple_of"]
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20:
            pad = value
        else:
            check.add(
                "tokenizer.pad_to_multiple_of",
                f"expected a positive whole number, got {_describe(value)}",
            )
    overrides: list[TokenOverride] = []
    tokens = check.mapping(block["tokens"], "tokenizer.tokens") if "tokens" in block else None
    for token, entry in (tokens or {}).items():
        where = f"tokenizer.tokens[{token!r}]"
        item = check.mapping(entry, where, "a mapping {source: ..., force: ...}")
        if item is None:
            continue
        if not isinstance(token, str) or not token:
            check.add(where, "a token must be a non-empty string")
            continue
        check.keys(item, where, ("source", "force"))
        force = bool(check.boolean(item["force"], f"{where}.force")) if "force" in item else False
        raw = item.get("source")
        model: int | None = None
        source_token: str | None = None
        source_id: int | None = None
        if isinstance(raw, dict):
            kind = raw.get("kind")
            check.keys(raw, f"{where}.source", ("kind", "model", "token", "token_id"))
            if kind == "zero":
                overrides.append(TokenOverride(token, None, force=force, where=where))
                continue
            if kind != "model_token":
                check.add(
                    f"{where}.source.kind", f"expected zero or model_token, got {_describe(kind)}"
                )
                continue
            if ("token" in raw) == ("token_id" in raw):
                check.add(f"{where}.source", "give exactly one of token and token_id")
                continue
            if "token" in raw:
                source_token = check.string(raw["token"], f"{where}.source.token")
            elif isinstance(raw["token_id"], int) and raw["token_id"] >= 0:
                source_id = raw["token_id"]
            else:
                check.add(
                    f"{where}.source.token_id",
                    f"expected a token id, got {_describe(raw['token_id'])}",
                )
                continue
            raw = raw.get("model")
        found = _mk_model_index(raw, f"{where}.source", refs, check, known)
        if found is None:
            continue
        model = found
        overrides.append(TokenOverride(token, model, source_token, source_id, force, where))
    return VocabSpec(source, tuple(overrides), pad, template)


def _mk_vocab_source(
    value: Any, path: str, refs: tuple[ModelRef, ...], check: _Check, known: bool
) -> Literal["union"] | int:
    if value == "union":
        return "union"
    if value == "base":
        return 0
    return _mk_model_index(value, path, refs, check, known) or 0


def _mk_model_index(
    value: Any, path: str, refs: tuple[ModelRef, ...], check: _Check, known: bool
) -> int | None:
    """The index in ``refs`` of a model named "base", "org/name@rev" or "org/name"."""
    if value == "base":
        return 0
    if not isinstance(value, str):
        check.add(path, f"expected base, union or a model reference, got {_describe(value)}")
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


_CHAT_TEMPLATE_NAMES = ("chatml", "auto")


def _mk_chat_template(value: Any, check: _Check) -> str | None:
    """A built-in name (chatml), auto (the inputs' most common) or a Jinja string."""
    if isinstance(value, str) and (
        value in _CHAT_TEMPLATE_NAMES or ("{" in value and len(value) >= 20)
    ):
        return value
    hint = ""
    if value in ("alpaca", "llama3", "mistral", "exaone"):
        hint = f" (mergekit's built-in {value} template is not shipped: paste it as a string)"
    check.add(
        "chat_template",
        f"expected chatml, auto or a Jinja template (at least 20 characters with a '{{'), got "
        f"{_describe(value)}{hint}",
    )
    return None


# Parameter names mergekit methods take: under a method that does not use one, mergekit ignores
# it (configs made from templates carry them), so shardmerge warns instead of refusing.
_MK_KNOWN_PARAMS = (
    "t", "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask",
    "filter_wise", "nuslerp_flatten", "nuslerp_row_wise", "nuslerp_weight", "select_topk",
    "max_iter", "tol", "eps", "scale", "consensus_method",
)  # fmt: skip


def _parse_mergekit_method(
    data: dict[Any, Any], check: _Check, text: str, source: str, name: str
) -> Recipe:
    """A mergekit config of a method other than slerp: base_model, models: with any number of
    entries and their parameters, top-level parameters (per-model ones there are every model's
    fallback, as in mergekit's lookup)."""
    from shardmerge.methods import METHODS, MethodSpec, unknown_method_message

    spec: MethodSpec | None = METHODS.get(name)
    if spec is None:
        check.add("merge_method", unknown_method_message(name))
        return _placeholder(text, source, check)
    base: ModelRef | None = None
    if "base_model" in data:
        base = _mk_ref(data["base_model"], "base_model", check)
    elif spec.base == "required":
        check.add(
            "base_model",
            f"missing; {name} needs a base_model (the model task vectors are taken from)",
        )
    top_model, shared = _mk_method_params(
        data.get("parameters", {}), "parameters", spec, check, top=True
    )
    merged: list[tuple[ModelRef, str, dict[str, Schedule]]] = []
    slices: tuple[Slice, ...] = ()
    if "slices" in data:
        if "models" in data:
            check.add("models", "give only one of models and slices")
        found = _method_slices(data, check, name, spec, base, top_model, shared)
        if found is not None:
            slices, merged = found
    elif "models" not in data:
        check.add("models", "missing; give models: (a list of {model: ..., parameters: ...})")
    elif not isinstance(data["models"], list) or not data["models"]:
        check.add(
            "models",
            f"expected a non-empty list of {{model: ...}}, got {_describe(data['models'])}",
        )
    else:
        for i, entry in enumerate(data["models"]):
            path = f"models[{i}]"
            item = check.mapping(entry, path, "a mapping {model: ..., parameters: ...}")
            if item is None:
                continue
            check.keys(item, path, ("model", "parameters"))
            if "model" not in item:
                check.add(_at(path, "model"), "missing; the model reference")
                continue
            ref = _mk_ref(item["model"], _at(path, "model"), check)
            own, _ = _mk_method_params(
                item.get("parameters", {}), _at(path, "parameters"), spec, check, top=False
            )
            if ref is None:
                continue
            if spec.base != "none" and ref == base:
                if own:
                    check.warnings.append(
                        f"{path}.parameters: ignored; the base_model takes no parameters in {name}"
                    )
                continue
            if any(ref == seen for seen, _, _ in merged):
                check.add(_at(path, "model"), f"{item['model']!r} is listed twice")
                continue
            merged.append((ref, path, own))
    if (
        not slices
        and base is not None
        and spec.base == "none"
        and all(ref != base for ref, _, _ in merged)
    ):
        merged.append((base, "base_model", {}))  # mergekit appends an unlisted base as a model
    if "models" in data:
        problem = _model_count_problem(spec, len(merged), base is not None)
        if problem is not None:
            check.add("models", problem)
    if name == "passthrough" and not slices and len(merged) > 1:
        check.add("models", "passthrough copies one model; use slices: to stack layers of several")
    model_params = tuple(_with_fallback(own, top_model) for _, _, own in merged)
    checked: list[tuple[tuple[ModelRef, str, Any], Mapping[str, Schedule]]] = list(
        zip(merged, model_params, strict=True)
    )
    if slices:  # the parameters live in each slice
        model_params = tuple({} for _ in merged)
        checked = [
            ((_PLACEHOLDER, key, {}), params)
            for piece in slices
            for key, params in zip(
                piece.keys[len(piece.keys) - len(piece.model_params or ()) :],
                piece.model_params or (),
                strict=True,
            )
        ]
    for (_, path, _), params in checked:
        for param in spec.per_model:
            if param.default is None and param.name not in params:
                check.add(
                    f"{path}.parameters.{param.name}",
                    f"missing; {name} needs a {param.name} for every model (here or in the "
                    "top-level parameters)",
                )
    refs = tuple(ref for ref, _, _ in merged)
    keys = tuple(path for _, path, _ in merged)
    if spec.base == "required" or (spec.base == "optional" and base is not None):
        refs = (base or _PLACEHOLDER, *refs)
        keys = ("base_model", *keys)
    vocab = _mk_vocab(data, refs, check, known=all(r != _PLACEHOLDER for r in refs))
    input_dtype = check.dtype(data["dtype"], "dtype") if "dtype" in data else None
    out_dtype = check.dtype(data["out_dtype"], "out_dtype") if "out_dtype" in data else None
    return Recipe(
        models=refs,
        schedule=_NO_SCHEDULE,
        input_dtype=input_dtype,
        out_dtype=out_dtype,
        output_dir=None,
        shard_size_bytes=DEFAULT_SHARD_SIZE_BYTES,
        device="auto",
        tokenizer_source="a",
        layer_range=None,
        push_to_hub=None,
        private=False,
        stream=False,
        format="mergekit",
        text=text,
        source=source,
        warnings=tuple(check.warnings),
        vocab=vocab,
        method=name,
        model_keys=keys,
        model_params=model_params,
        shared_params=shared,
        slices=slices,
    )


def _method_slices(
    data: dict[Any, Any],
    check: _Check,
    name: str,
    spec: Any,
    base: ModelRef | None,
    top_model: dict[str, Schedule],
    shared: dict[str, Schedule | bool],
) -> tuple[tuple[Slice, ...], list[tuple[ModelRef, str, dict[str, Schedule]]]] | None:
    """A method's slices: and the models they name (besides a required base), each with no
    parameters of its own at the recipe level (they live in each slice)."""
    from shardmerge.recipe_slices import mk_slices

    found = mk_slices(
        data["slices"], check, method=name, spec=spec, base=base,
        top_model=top_model, top_shared=shared,
    )  # fmt: skip
    if found is None:
        return None
    named = list(zip(found.models, found.keys, strict=True))
    if spec.base == "required" and base is not None:
        named = named[1:]
    return tuple(found.slices), [(ref, key, {}) for ref, key in named]


_NO_SCHEDULE = Schedule(rules=(), default=None, non_layer=None, style="mergekit")


def _model_count_problem(spec: Any, count: int, has_base: bool) -> str | None:
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


def _placeholder(text: str, source: str, check: _Check) -> Recipe:
    """Stands in for a recipe whose problems are being reported (never returned to callers)."""
    return Recipe(
        models=(_PLACEHOLDER, _PLACEHOLDER),
        schedule=_NO_SCHEDULE,
        input_dtype=None,
        out_dtype=None,
        output_dir=None,
        shard_size_bytes=DEFAULT_SHARD_SIZE_BYTES,
        device="auto",
        tokenizer_source="a",
        layer_range=None,
        push_to_hub=None,
        private=False,
        stream=False,
        format="mergekit",
        text=text,
        source=source,
        warnings=tuple(check.warnings),
    )


def _mk_method_params(
    value: Any, path: str, spec: Any, check: _Check, *, top: bool
) -> tuple[dict[str, Schedule], dict[str, Schedule | bool]]:
    """(per-model parameters, shared parameters) of one parameters: block."""
    per_model: dict[str, Schedule] = {}
    shared: dict[str, Schedule | bool] = {}
    params = check.mapping(value, path)
    if params is None:
        return per_model, shared
    names = [p.name for p in spec.params]
    for key, raw in params.items():
        where = _at(path, key)
        param = spec.param(str(key))
        if param is None:
            if key in _MK_KNOWN_PARAMS:
                check.warnings.append(f"{where}: ignored; {spec.name} does not use {key}")
            else:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else "expected one of " + ", ".join(names)
                )
                check.add(where, f"unknown parameter for {spec.name}; {hint}")
            continue
        if not param.per_model and not top:
            check.warnings.append(
                f"{where}: ignored; {key} is shared by all models in {spec.name} (mergekit "
                "ignores it here): put it under the top-level parameters"
            )
            continue
        if param.kind == "bool":
            flag = check.boolean(raw, where)
            if flag is not None:
                shared[param.name] = flag
            continue
        rules, default = _mk_t(raw, where, check, bounded=False)
        schedule = Schedule(rules=tuple(rules), default=default, non_layer=None, style="mergekit")
        _check_param_range(param, schedule, where, check)
        if param.per_model:
            per_model[param.name] = schedule
        else:
            shared[param.name] = schedule
    return per_model, shared


def _with_fallback(own: dict[str, Schedule], top: dict[str, Schedule]) -> dict[str, Schedule]:
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


def _check_param_range(param: Any, schedule: Schedule, where: str, check: _Check) -> None:
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


def _parse_ours_method(
    data: dict[Any, Any], check: _Check, text: str, source: str, name: Any
) -> Recipe:
    """Our format for any method but slerp::

        method: ties
        base: ./base                      # the model task vectors are taken from
        models:                           # name -> "ref" or {path, revision, parameters...}
          chat: {path: ./chat, weight: 0.6, density: 0.5}
          code: {path: org/code@v2, weight: {default: 0.4, non_layer: 0.3}}
        parameters: {normalize: true, density: 0.7}   # shared ones, and per-model defaults
        random_seed: 1

    Every number may be scheduled per layer exactly like ``t``.
    """
    from shardmerge.methods import METHODS, unknown_method_message

    if not isinstance(name, str):
        check.add("method", f"expected a method name such as ties, got {_describe(name)}")
        return _placeholder(text, source, check)
    spec = METHODS.get(name)
    if spec is None:
        check.add("method", unknown_method_message(name))
        return _placeholder(text, source, check)
    check.keys(data, "", _METHOD_TOP_KEYS, hint=_MERGEKIT_HINT)
    per_model_names = [p.name for p in spec.per_model]

    def scheduled(raw: Any, path: str, param: Any) -> Schedule | bool | None:
        if param.kind == "bool":
            return check.boolean(raw, path)
        schedule = _our_scheduled(raw, path, check, bounded=False)
        if schedule is not None:
            _check_param_range(param, schedule, path, check)
        return schedule

    top_model: dict[str, Schedule] = {}
    shared: dict[str, Schedule | bool] = {}
    params = check.mapping(data["parameters"], "parameters") if "parameters" in data else None
    if params is not None:
        check.keys(params, "parameters", [p.name for p in spec.params])
        for key, raw in params.items():
            param = spec.param(str(key))
            if param is None:
                continue
            value = scheduled(raw, f"parameters.{key}", param)
            if isinstance(value, Schedule) and param.per_model:
                top_model[param.name] = value
            elif value is not None:
                shared[param.name] = value

    base: ModelRef | None = None
    if "base" in data:
        base = _our_model(data["base"], "base", check)
        if spec.base == "none":
            check.add("base", f"{name} takes no base model; list every model under models")
    elif spec.base == "required":
        check.add("base", f"missing; {name} needs a base (the model task vectors are taken from)")

    entries: list[tuple[str, Any]] = []
    raw_models = data.get("models")
    if raw_models is None:
        check.add("models", f"missing; the models {name} merges, each with its parameters")
    elif isinstance(raw_models, dict) and raw_models:
        entries = [(f"models.{key}", value) for key, value in raw_models.items()]
    elif isinstance(raw_models, list) and raw_models:
        entries = [(f"models[{i}]", value) for i, value in enumerate(raw_models)]
    else:
        check.add("models", f"expected a mapping or list of models, got {_describe(raw_models)}")
    refs: list[ModelRef] = []
    keys: list[str] = []
    model_params: list[dict[str, Schedule]] = []
    for path, value in entries:
        own: dict[str, Schedule] = {}
        ref: ModelRef | None
        if isinstance(value, dict):
            check.keys(value, path, ("path", "revision", *per_model_names))
            location = {k: v for k, v in value.items() if k in ("path", "revision")}
            ref = _our_model(location, path, check)
            for key in per_model_names:
                if key in value:
                    param = spec.param(key)
                    got = scheduled(value[key], f"{path}.{key}", param)
                    if isinstance(got, Schedule):
                        own[key] = got
        else:
            ref = _our_model(value, path, check)
        merged = dict(top_model)
        merged.update(own)
        for param in spec.per_model:
            if param.default is None and param.name not in merged:
                check.add(
                    f"{path}.{param.name}",
                    f"missing; {name} needs a {param.name} for every model (here or in parameters)",
                )
        refs.append(ref or _PLACEHOLDER)
        keys.append(path)
        model_params.append(merged)
    if entries:
        problem = _model_count_problem(spec, len(entries), base is not None)
        if problem is not None:
            check.add("models", problem)
    if spec.base == "required" or (spec.base == "optional" and base is not None):
        refs.insert(0, base or _PLACEHOLDER)
        keys.insert(0, "base")

    seed: int | None = None
    if "random_seed" in data:
        raw_seed = data["random_seed"]
        if isinstance(raw_seed, int) and not isinstance(raw_seed, bool) and raw_seed >= 0:
            seed = raw_seed
        else:
            check.add("random_seed", f"expected a non-negative integer, got {_describe(raw_seed)}")
    slices: tuple[Slice, ...] = ()
    if "layers" in data:
        from shardmerge.recipe_slices import our_layers

        if isinstance(raw_models, list):
            check.add("layers", "name the models (models: as a mapping) to give their layers")
        else:
            names = tuple(key.split(".", 1)[1] for key in keys if key != "base")
            if spec.base == "required":
                names = ("base", *names)
            found = our_layers(
                data["layers"], check, names, name, spec.base == "required",
                model_params, shared,
            )  # fmt: skip
            slices = tuple(found or ())
    elif name == "passthrough" and len(refs) > 1:
        check.add("models", "passthrough copies one model; give layers: to stack several")
    vocab: VocabSpec | None = None
    if "tokenizer_from" in data:
        # base, union, a model's name under models:, or its reference.
        value = data["tokenizer_from"]
        named = {key.removeprefix("models."): i for i, key in enumerate(keys)}
        if value == "union":
            vocab = VocabSpec("union")
        elif isinstance(value, str) and value in named:
            vocab = VocabSpec(named[value])
        else:
            known = all(r != _PLACEHOLDER for r in refs)
            index = _mk_model_index(value, "tokenizer_from", tuple(refs), check, known)
            vocab = VocabSpec(index) if index is not None else None
    slerp_like = _parse_shardmerge(
        {"models": {"a": "x", "b": "y"}, "t": 0.5, **_common(data)}, check, text, source
    )
    return dataclasses.replace(
        slerp_like,
        vocab=vocab,
        models=tuple(refs),
        schedule=_NO_SCHEDULE,
        warnings=tuple(check.warnings),
        method=name,
        model_keys=tuple(keys),
        model_params=tuple(model_params),
        shared_params=shared,
        random_seed=seed,
        slices=slices,
    )


def _common(data: dict[Any, Any]) -> dict[Any, Any]:
    """The keys our format reads the same way for every method (output, device, hub)."""
    return {k: data[k] for k in ("output", "device", "hub") if k in data}
