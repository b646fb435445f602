"""What ``run`` learns about each tensor while merging it, and the card's per-layer view of it.

The engines compute these numbers anyway: SLERP's a.b, |a|^2 and |b|^2 (the angle between the
models), a task-vector method's masks and its sign election. A :class:`Recorder` is handed to the
engine; the compute thread puts one small record per tensor into it, the pipeline takes each
finished shard's records and stores them with that shard's resume record (so they survive
``--resume`` and come from every rank), and the card is made from all of them at the end.

Records are plain JSON dicts (they live in the progress files):

* SLERP: ``{"numel", "t", "dot", "sq_a", "sq_b"}``; a tensor copied from one end (t = 0 or 1)
  has ``numel`` and ``t`` only (nothing was computed).
* task-vector methods: ``{"numel", "weights": [per model], "kept": [per model, non-zero
  elements of its sparsified task vector, or None when the method keeps it whole]}``, and for
  sign-electing methods (TIES and its relatives) ``"agree"``/``"nonzero"``: how many of the
  models' non-zero weighted task-vector elements have the elected sign, of how many.

This module is pure (no torch, no files) apart from :func:`render_table`'s text.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardmerge.schedule import find_layer, module_type

__all__ = ["LayerStats", "Recorder", "effective_t", "render_table", "summarize"]

# Mirrors slerp.DOT_THRESHOLD / NORM_EPS (kept torch-free here): above it SLERP interpolates
# linearly.
_DOT_THRESHOLD = 0.9995
_NORM_EPS = 1e-8


class Recorder:
    """Per-tensor records put by the compute thread(s), taken by shard as shards finish."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def put(self, name: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._records[name] = record

    def take(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The records of ``names`` that are in (removed from the recorder)."""
        with self._lock:
            return {n: self._records.pop(n) for n in names if n in self._records}


def slerp_record(numel: int, t: float, dot: float, sq_a: float, sq_b: float) -> dict[str, Any]:
    return {"numel": numel, "t": t, "dot": dot, "sq_a": sq_a, "sq_b": sq_b}


def cosine(dot: float, sq_a: float, sq_b: float) -> float | None:
    if sq_a <= 0 or sq_b <= 0:
        return None
    return max(-1.0, min(1.0, dot / math.sqrt(sq_a * sq_b)))


def effective_t(t: float, cos: float | None) -> float:
    """The share of B in SLERP's result, s1 / (s0 + s1): the t a linear merge would need for
    the same mix. It equals t where SLERP interpolates linearly; between orthogonal tensors
    t = 0.3 mixes in 0.34 of B."""
    if cos is None or abs(cos) > _DOT_THRESHOLD or t in (0.0, 1.0):
        return t
    theta = math.acos(cos)
    s0 = math.sin((1.0 - t) * theta)
    s1 = math.sin(t * theta)
    return s1 / (s0 + s1) if s0 + s1 != 0 else t


@dataclass
class LayerStats:
    """One layer's records added up (or the tensors outside every layer: ``index`` None)."""

    label: str
    index: int | None
    tensors: int = 0
    numel: int = 0
    # SLERP
    dot: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    compared: int = 0  # tensors with sums (not copied from one end)
    t_min: float | None = None
    t_max: float | None = None
    t_weighted: float = 0.0  # sum of t x numel
    eff_weighted: float = 0.0  # sum of effective t x numel
    t_by_type: dict[str, list[float]] = field(default_factory=dict)  # type: [t x numel, numel]
    # task vectors
    weights: list[float] = field(default_factory=list)  # sum of weight x numel, per model
    weighted: bool = False  # some tensor had weights (model_stock, karcher... have none)
    kept: list[int | None] = field(default_factory=list)
    agree: int = 0
    nonzero: int = 0
    elected: bool = False

    @property
    def cosine(self) -> float | None:
        return cosine(self.dot, self.sq_a, self.sq_b) if self.compared else None

    @property
    def angle(self) -> float | None:
        cos = self.cosine
        return None if cos is None else math.degrees(math.acos(cos))

    @property
    def t(self) -> float | None:
        return self.t_weighted / self.numel if self.numel and self.t_min is not None else None

    @property
    def eff_t(self) -> float | None:
        return self.eff_weighted / self.numel if self.numel and self.t_min is not None else None

    def type_t(self, kind: str) -> float | None:
        """The numel-weighted t of the layer's tensors of one module type (attention, ...)."""
        found = self.t_by_type.get(kind)
        return found[0] / found[1] if found and found[1] else None

    def weight(self, model: int) -> float | None:
        return self.weights[model] / self.numel if self.numel else None

    def kept_fraction(self, model: int) -> float | None:
        kept = self.kept[model]
        return None if kept is None or not self.numel else kept / self.numel

    @property
    def sign_agreement(self) -> float | None:
        return self.agree / self.nonzero if self.elected and self.nonzero else None

    def add(self, record: Mapping[str, Any], kind: str = "other") -> None:
        numel = int(record.get("numel", 0))
        self.tensors += 1
        self.numel += numel
        if "t" in record:
            t = float(record["t"])
            self.t_min = t if self.t_min is None else min(self.t_min, t)
            self.t_max = t if self.t_max is None else max(self.t_max, t)
            self.t_weighted += t * numel
            by_type = self.t_by_type.setdefault(kind, [0.0, 0])
            by_type[0] += t * numel
            by_type[1] += numel
            cos = None
            if "dot" in record:
                self.compared += 1
                self.dot += float(record["dot"])
                self.sq_a += float(record["sq_a"])
                self.sq_b += float(record["sq_b"])
                cos = _tensor_cosine(record)
            self.eff_weighted += effective_t(t, cos) * numel
        weights = record.get("weights")
        if isinstance(weights, list):
            kept = record.get("kept") or [None] * len(weights)
            while len(self.weights) < len(weights):
                self.weights.append(0.0)
                self.kept.append(0)
            self.weighted = self.weighted or any(w is not None for w in weights)
            for i, (w, k) in enumerate(zip(weights, kept, strict=False)):
                self.weights[i] += float(w if w is not None else 0.0) * numel
                current = self.kept[i]
                # A model kept whole (linear, task arithmetic) reports None: every element.
                self.kept[i] = None if k is None or current is None else current + int(k)
        if "agree" in record:
            self.elected = True
            self.agree += int(record["agree"])
            self.nonzero += int(record["nonzero"])


def _tensor_cosine(record: Mapping[str, Any]) -> float | None:
    """The normalised dot SLERP uses (slerp.coefficients: a near-zero tensor is not scaled)."""
    na, nb = math.sqrt(record["sq_a"]), math.sqrt(record["sq_b"])
    scale = (na if na > _NORM_EPS else 1.0) * (nb if nb > _NORM_EPS else 1.0)
    dot = float(record["dot"]) / scale
    return dot if abs(dot) <= 1.0 else math.copysign(1.0, dot)


def summarize(records: Mapping[str, Mapping[str, Any]]) -> list[LayerStats]:
    """Records grouped by layer, in layer order; the tensors outside every layer come last
    (one row, when there are any)."""
    layers: dict[int, LayerStats] = {}
    outside = LayerStats("outside layers", None)
    for name in sorted(records):
        found = find_layer(name)
        if found is None:
            outside.add(records[name], module_type(name))
            continue
        index = found[1]
        row = layers.get(index)
        if row is None:
            row = layers[index] = LayerStats(str(index), index)
        row.add(records[name], module_type(name))
    rows = [layers[i] for i in sorted(layers)]
    return rows + ([outside] if outside.tensors else [])


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def render_table(method: str, rows: Sequence[LayerStats], model_names: Sequence[str]) -> str:
    """A Markdown table, one row per layer (``model_names``: the merged models, base excluded)."""
    if method == "slerp":
        lines = [
            "| layer | tensors | cos(A, B) | angle | t | effective t |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            t = _cell(r.t, ".3f")
            if r.t_min is not None and r.t_max is not None and r.t_max - r.t_min > 1e-9:
                t = f"{t} ({r.t_min:.3f}-{r.t_max:.3f})"
            angle = "-" if r.angle is None else f"{r.angle:.2f}°"
            lines.append(
                f"| {r.label} | {r.tensors} | {_cell(r.cosine, '.5f')} | {angle} | {t} "
                f"| {_cell(r.eff_t, '.3f')} |"
            )
        return "\n".join(lines)
    names = list(model_names)
    # Methods without per-model weights (model_stock, karcher, arcee_fusion...) get no weight
    # columns rather than columns of zeros.
    weighted = any(r.weighted for r in rows)
    head = ["layer", "tensors"]
    head += [f"weight {n}" for n in names] if weighted else []
    head += [f"kept {n}" for n in names]
    elected = any(r.elected for r in rows)
    if elected:
        head.append("sign agreement")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r.label, str(r.tensors)]
        count = len(names)
        if weighted:
            cells += [
                _cell(r.weight(i) if i < len(r.weights) else None, ".3g") for i in range(count)
            ]
        for i in range(count):
            if i >= len(r.kept):
                cells.append("-")
            elif r.kept[i] is None:
                cells.append("all")
            else:
                cells.append(_cell(r.kept_fraction(i), ".1%"))
        if elected:
            cells.append(_cell(r.sign_agreement, ".1%"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# plan --similarity: cosines below this are "nearly orthogonal" (two fine-tunes of one base sit
# above 0.9; unrelated models near 0), and t strictly inside these bounds is "far from the ends".
ORTHOGONAL_COS = 0.3
T_NEAR_END = 0.1
# Task vectors whose cosine is at or below this pull the layer in opposite directions (two
# independent fine-tunes sit near 0, with a sign agreement near one half).
OPPOSED_COS = -0.3


def slerp_hints(
    tasks: Iterable[tuple[str, float, int | None]], cosines: Mapping[str, float]
) -> list[str]:
    """One hint per layer where t is far from 0 and 1 on tensors whose models are nearly
    orthogonal. ``tasks``: (tensor, t, layer index or None); ``cosines``: cos(A, B) by tensor."""
    flagged: dict[int | None, list[tuple[str, float, float]]] = {}
    for name, t, layer in tasks:
        cos = cosines.get(name)
        if cos is None or not T_NEAR_END < t < 1 - T_NEAR_END or abs(cos) >= ORTHOGONAL_COS:
            continue
        flagged.setdefault(layer, []).append((name, t, cos))
    hints = []
    for layer in sorted(flagged, key=lambda k: (k is None, k or 0)):
        found = flagged[layer]
        where = "outside the layers" if layer is None else f"layer {layer}"
        ts = sorted({round(t, 3) for _, t, _ in found})
        t_text = f"{ts[0]:g}" if len(ts) == 1 else f"{ts[0]:g}-{ts[-1]:g}"
        worst = min(found, key=lambda f: abs(f[2]))
        hints.append(
            f"{where}: t = {t_text} on {len(found)} tensor(s) where the models are nearly "
            f"orthogonal (cos(A, B) down to {worst[2]:.3f}, {worst[0]}): they do not share "
            "these weights' origin, and a t between the ends gives weights neither model was "
            "trained with; consider t near 0 or 1 there, and check the result with eval"
        )
    return hints


def conflict_hints(method: str, layers: Iterable[tuple[str, float | None]]) -> list[str]:
    """Hints for a method that does not elect signs, per layer where the first two task vectors
    point in opposite directions. ``layers``: (layer label, cosine of the task vectors)."""
    if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
        return []  # the sign election keeps one direction per element
    return [
        f"layer {label}: the first two task vectors point in opposite directions (cosine "
        f"{cos:.2f}): `{method}` adds updates that cancel there; a sign-electing method "
        "(ties, dare_ties) keeps the majority's, or give one model the layer"
        for label, cos in layers
        if cos is not None and cos <= OPPOSED_COS
    ]
