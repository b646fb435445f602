"""``compare --plot`` (a heatmap of layers x module types and the per-layer curves) and the
merge card's picture (the t or weight schedule per layer over the similarity curve), drawn with
matplotlib.

matplotlib is an optional extra (``pip install "shardmerge[plot]"``); :func:`require_matplotlib`
says so in one line before any work is done. Figures are drawn on matplotlib's object API (no
pyplot state) and written atomically: temp file, then rename.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardmerge.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from shardmerge.mergestats import LayerStats
    from shardmerge.similarity import Comparison

# Cells are labelled with their value up to this many layers (beyond, the text is unreadable).
_ANNOTATE_LAYERS = 48


def require_matplotlib() -> None:
    """Raise InputError (exit 2) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(
            '--plot needs matplotlib: pip install "shardmerge[plot]" (or pip install matplotlib)'
        ) from None


def check_plot_path(path: Path) -> None:
    """A plot file must go into an existing folder, in a format matplotlib writes."""
    if not path.parent.is_dir():
        raise InputError(f"--plot {path}: folder {path.parent} does not exist")
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise InputError(f"--plot {path}: use a .png, .svg or .pdf file name")


def write_plot(comparison: Comparison, path: Path) -> None:
    """Draw ``comparison`` into ``path`` (PNG, SVG or PDF by its suffix)."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = comparison.layers
    kinds = [k for k in comparison.module_types if any(k in ly.by_type for ly in layers)]
    panels = 3 if comparison.with_base else 2
    height = min(14.0, max(4.0, 0.22 * len(layers) + 1.8))
    fig = Figure(figsize=(5.2 * panels, height), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    title = f"A: {comparison.labels['a']}   B: {comparison.labels['b']}"
    if comparison.with_base:
        title += f"   base: {comparison.labels['base']}"
    fig.suptitle(title, fontsize=9)
    if not layers:
        for ax in axes:
            ax.text(0.5, 0.5, "no layer stack found", ha="center", va="center")
            ax.set_axis_off()
    else:
        _heatmap(fig, axes[0], comparison, kinds)
        _curves(axes[1], comparison, kinds)
        if comparison.with_base:
            _task_curves(axes[2], comparison)
        for ax in axes[1:]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)


def has_matplotlib() -> bool:
    """Whether matplotlib can be imported (the card then gets its picture)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def warm_up() -> None:
    """Import matplotlib and draw a throwaway figure (fonts, the Agg canvas): ``run`` does this
    on its side thread while the shards merge, so the card's picture costs little at the end
    (here 1.2 s of import and 0.5 s of first drawing, 0.25 s for a later figure)."""
    if not has_matplotlib():
        return
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], marker="o", label="x")
    ax.twinx().set_ylabel("y")
    ax.legend(fontsize=8)
    fig.savefig(io.BytesIO(), dpi=30, format="png")


def write_merge_plot(
    method: str, rows: Sequence[LayerStats], model_names: Sequence[str], path: Path, title: str
) -> None:
    """The card's picture: per layer, SLERP's t (and effective t) over cos(A, B), or each
    model's weight and kept fraction over the sign agreement. ``rows``: the layers (the
    tensors outside every layer are left out: they have no place on the layer axis)."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = [r for r in rows if r.index is not None]
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    fig.suptitle(title, fontsize=10)
    xs = [r.index for r in layers if r.index is not None]
    if method == "slerp":
        from shardmerge.schedule import MODULE_TYPES

        kinds = [k for k in MODULE_TYPES if any(k in r.t_by_type for r in layers)]
        for kind in kinds:
            ys = [_value(r.type_t(kind)) for r in layers]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"t {kind}")
        effective = [_value(r.eff_t) for r in layers]
        mean = [_value(r.t) for r in layers]
        if any(abs(e - m) > 0.01 for e, m in zip(effective, mean, strict=True)):
            ax.plot(
                xs,
                effective,
                color="grey",
                linestyle="--",
                label="effective t (share of B, layer mean)",
            )
        ax.set_ylabel("t  (0 = A, 1 = B)")
        ax.set_ylim(-0.03, 1.03)
        right = [_value(r.cosine) for r in layers]
        right_label = "cos(A, B)"
    else:
        weighted = any(r.weighted for r in layers)
        for i, name in enumerate(model_names):
            if weighted:
                weights = [_value(r.weight(i) if i < len(r.weights) else None) for r in layers]
                ax.plot(xs, weights, marker="o", markersize=3, label=f"weight {name}")
            kept = [_value(r.kept_fraction(i) if i < len(r.kept) else None) for r in layers]
            if any(not math.isnan(k) for k in kept):
                ax.plot(xs, kept, marker="s", markersize=3, linestyle="--", label=f"kept {name}")
        ax.set_ylabel("weight, kept fraction" if weighted else "kept fraction")
        right = [_value(r.sign_agreement) for r in layers]
        right_label = "sign agreement"
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    twin = ax.twinx()
    if any(not math.isnan(v) for v in right):
        twin.plot(xs, right, color="black", linewidth=2, label=right_label)
        finite = [v for v in right if not math.isnan(v)]
        low, high = min(finite), max(finite)
        pad = max(1e-4, (high - low) * 0.1)
        twin.set_ylim(low - pad, high + pad)
    twin.set_ylabel(f"{right_label} (black)")
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    if handles or more:
        ax.legend(
            handles + more,
            labels + more_labels,
            fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.14),
            ncol=min(len(handles) + len(more), 4),
        )
    if not layers:
        ax.text(0.5, 0.5, "no layer stack found", ha="center", va="center")
    _save(fig, path)


def _heatmap(fig: Any, ax: Any, comparison: Comparison, kinds: list[str]) -> None:
    values = [
        [_value(layer.by_type[k].cosine if k in layer.by_type else None) for k in kinds]
        for layer in comparison.layers
    ]
    finite = [v for row in values for v in row if not math.isnan(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if high - low < 1e-6:  # one colour for all: keep the scale readable
        low, high = low - 1e-3, high + 1e-3
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=low, vmax=high)
    ax.set_xticks(range(len(kinds)), kinds)
    labels = comparison.layer_labels
    step = max(1, len(labels) // 32)
    ax.set_yticks(range(0, len(labels), step), labels[::step])
    ax.set_ylabel("layer")
    ax.set_title("cosine(A, B) per layer and module type", fontsize=10)
    if len(labels) <= _ANNOTATE_LAYERS:
        middle = (low + high) / 2
        for y, row in enumerate(values):
            for x, v in enumerate(row):
                if not math.isnan(v):
                    colour = "black" if v > middle else "white"
                    ax.text(x, y, f"{v:.4f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, shrink=0.8)


def _curves(ax: Any, comparison: Comparison, kinds: list[str]) -> None:
    xs = [layer.index for layer in comparison.layers]
    for kind in kinds:
        ys = [
            _value(ly.by_type[kind].cosine if kind in ly.by_type else None)
            for ly in comparison.layers
        ]
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=kind)
    ax.plot(
        xs,
        [_value(ly.total.cosine) for ly in comparison.layers],
        color="black",
        linewidth=2,
        label="layer",
    )
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine(A, B)")
    ax.set_title("cosine per layer (1 = identical directions)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(ax, len(kinds) + 1)
    twin = ax.twinx()
    twin.plot(
        xs,
        [_value(ly.total.rel_l2) for ly in comparison.layers],
        color="tab:red",
        linestyle="--",
        linewidth=1,
    )
    distances = [_value(ly.total.rel_l2) for ly in comparison.layers]
    top = max((d for d in distances if not math.isnan(d)), default=0.0)
    twin.set_ylim(0, top * 1.15 or 1.0)  # from 0: autoscaling blew up differences of 1e-3
    twin.set_ylabel("rel. L2 |A - B| / |A| (dashed)", color="tab:red")
    twin.tick_params(axis="y", colors="tab:red")


def _task_curves(ax: Any, comparison: Comparison) -> None:
    xs = [layer.index for layer in comparison.layers]
    ax.plot(
        xs,
        [_value(ly.total.task_cosine) for ly in comparison.layers],
        marker="o",
        markersize=3,
        label="task-vector cosine",
    )
    ax.plot(
        xs,
        [_value(ly.total.sign_agreement) for ly in comparison.layers],
        marker="s",
        markersize=3,
        label="sign agreement",
    )
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("layer")
    ax.set_title("task vectors A - base, B - base", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(ax, 2)


def _legend_below(ax: Any, entries: int) -> None:
    # Below the axes: inside, it would hide a curve (the twin axis' curve is not avoided).
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(entries, 5))


def _value(value: float | None) -> float:
    return math.nan if value is None else value


def _save(fig: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".").lower())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
