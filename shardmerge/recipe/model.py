"""The validated recipe: a frozen :class:`Recipe` and the :class:`ModelRef` it names.

Both formats (:mod:`shardmerge.recipe.ours`, :mod:`shardmerge.recipe.mergekit`) build one;
everything after parsing (plan, pipeline, card, resume fingerprint) reads only these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from shardmerge.schedule import Schedule
from shardmerge.slices import Slice
from shardmerge.vocab import VocabSpec

DEFAULT_SHARD_SIZE_BYTES = 5_000_000_000


@dataclass(frozen=True)
class ModelRef:
    """A Hub id ("org/name") or local path, as written, and its revision."""

    ref: str
    revision: str | None
    name: str | None = field(default=None, compare=False)  # how the model card names it


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; :mod:`shardmerge.recipe` describes both formats."""

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
    # The card's picture (merge.png, with matplotlib); run --no-card-image turns it off.
    card_image: bool = True
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


PLACEHOLDER = ModelRef("", None)  # stands in for a model that failed validation
