"""The merged model's README.md: huggingface_hub's ModelCardData front matter and our body."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shardmerge import __version__


@dataclass(frozen=True)
class CardModel:
    """One input as the card names it."""

    ref: str  # Hub id, or a local folder's name (or the name the recipe gives it): no machine path
    hub_id: str | None  # set for Hub models: goes into base_model
    pin: str  # commit sha (Hub) or header fingerprint (local folder)
    role: str  # "t = 0 end (base)" / "t = 1 end"
    license: str | None = None  # from its own card's front matter, None when it names none


def render_card(
    models: Sequence[CardModel],
    recipe_text: str,
    t_table: str,
    *,
    title: str,
    out_dtype: str,
    total_bytes: int,
    num_shards: int,
    method: str = "slerp",
    random_seed: int | None = None,
    statistics: str | None = None,
) -> str:
    """Front matter (base_model, license, tags, library_name) and a body with method, models,
    license, t table, the merge's statistics (:func:`statistics_section`), recipe and version.
    Links follow ``HF_ENDPOINT``."""
    # ModelCardData alone: importing ModelCard (to wrap a string we already have) cost 0.27 s,
    # paid during the merge.
    from huggingface_hub import ModelCardData, constants

    base_models = [m.hub_id for m in models if m.hub_id]
    licenses = [m.license for m in models]
    # Carried only when every parent's card names the same one: a merge is bound by all.
    shared = licenses[0] if licenses[0] is not None and len(set(licenses)) == 1 else None
    data = ModelCardData(
        base_model=base_models or None,
        license=shared,
        tags=["merge", "mergekit", method, "shardmerge", "mergekit-compatible"],
        library_name="transformers",
    )
    sizes = f"Output dtype: `{out_dtype}`, {num_shards} shard(s), {total_bytes:,} bytes of tensors."
    if method == "slerp":
        lines = [
            f"# {title}",
            "",
            f"This model is a SLERP merge of two checkpoints, made with shardmerge {__version__}.",
            "",
            "## Method",
            "",
            "Spherical linear interpolation of each pair of tensors, each tensor taken as one "
            "vector (mergekit's `slerp` semantics): t = 0 gives the first model, t = 1 the "
            "second; nearly (anti)parallel tensors are interpolated linearly. Integer buffers "
            f"take the rounded linear interpolation. {sizes}",
            "",
            "## Models",
            "",
        ]
    else:
        from shardmerge.methods import get_method

        seed = "" if random_seed is None else f" Random masks: seed {random_seed}."
        lines = [
            f"# {title}",
            "",
            f"This model is a `{method}` merge of {len(models)} checkpoints, made with "
            f"shardmerge {__version__}.",
            "",
            "## Method",
            "",
            f"`{method}` ({get_method(method).summary}), with mergekit's semantics.{seed} {sizes}",
            "",
            "## Models",
            "",
        ]
    for m in models:
        name = f"[{m.hub_id}]({constants.ENDPOINT}/{m.hub_id})" if m.hub_id else f"`{m.ref}`"
        kind = "revision" if m.hub_id else "header fingerprint"
        lines.append(f"- {name} ({m.role}), {kind} `{m.pin}`")
    lines += ["", "## License", ""]
    if shared is not None:
        every = "both" if len(models) == 2 else "all the"
        lines.append(f"`{shared}`, the license {every} parents' model cards name.")
    else:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        named = ", ".join(
            f"model {letters[i % 26]}: `{lic}`" if lic else f"model {letters[i % 26]}: none"
            for i, lic in enumerate(licenses)
        )
        lines.append(
            f"Not set: the parents' model cards do not name one same license ({named}). "
            "Check every parent's terms before publishing."
        )
    lines += [
        "",
        "## Per-layer t" if method == "slerp" else "## Per-layer parameters",
        "",
        t_table.rstrip(),
        "",
        *([statistics.rstrip(), ""] if statistics else []),
        "## Recipe",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
        f"Made with shardmerge {__version__}.",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


IMAGE_NAME = "merge.png"


def statistics_section(
    method: str,
    table: str | None,
    *,
    image: str | None,
    recorded: int,
    tensors: int,
    image_hint: bool = True,
) -> str:
    """The card's "What the merge saw" section: ``table`` (mergestats.render_table; None when
    nothing was recorded), the picture ``image`` (a file beside the card) or how to get one, and
    how many of the ``tensors`` float tensors have statistics; ``image_hint`` False: no
    picture was asked for (``run --no-card-image``), so none is offered either."""
    if method == "slerp":
        about = (
            "Per layer, as the merge computed them: the cosine between the two models' tensors "
            "(all the layer's tensors taken as one vector) and the angle SLERP turns through, "
            "the scheduled t (numel-weighted mean; the range when the layer's tensors differ) "
            "and the effective t, the share of the second model in the result, s1 / (s0 + s1). "
            "Tensors copied from one end (t = 0 or 1) have no cosine: nothing was computed."
        )
    else:
        weights = (
            "each model's weight (numel-weighted mean), " if "| weight " in (table or "") else ""
        )
        about = (
            f"Per layer, as the merge computed them: {weights}the fraction of each model's task "
            "vector kept by the sparsification (non-zero after the mask; `all`: the method keeps "
            "it whole)"
        )
        about += (
            ", and the sign agreement: the share of the models' non-zero weighted task-vector "
            "elements that have the elected sign (1 = no conflicts)."
            if "sign agreement" in (table or "")
            else "."
        )
    lines = ["## What the merge saw", "", about, ""]
    if table is None:
        lines += ["No statistics were recorded for this merge.", ""]
        return "\n".join(lines)
    if image is not None:
        lines += [f"![per-layer schedule and similarity]({image})", ""]
    elif image_hint:
        lines += [
            "(A picture of the schedule over the similarity curve is drawn here when "
            'matplotlib is installed: `pip install "shardmerge[plot]"`.)',
            "",
        ]
    lines += [table.rstrip(), ""]
    if recorded < tensors:
        lines += [
            f"Statistics of {recorded} of {tensors} float tensors: the others were merged by an "
            "earlier run that did not record them.",
            "",
        ]
    return "\n".join(lines)
