"""Plan a merge from two header inventories: compatibility, t per tensor, output shard layout.

Pure: no files, no torch. The engine executes a :class:`MergePlan` and nothing else.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from shardmerge.errors import CheckpointError
from shardmerge.inventory import (
    CODES_BY_TORCH_NAME,
    DTYPE_SIZES,
    ModelInventory,
    TensorInfo,
)
from shardmerge.matching import cap_problems, mismatches, tensor_sources, ties_embeddings
from shardmerge.methods import MethodSpec, Param, get_method
from shardmerge.recipe import Recipe
from shardmerge.schedule import (
    LayerPos,
    Schedule,
    ScheduleError,
    idle_rules,
    layer_positions,
    resolve_t,
    t_table,
)
from shardmerge.vocab import GatheredTensor, VocabPlan, gather_tensors

INDEX_NAME = "model.safetensors.index.json"
# Engine working set: elements per chunk, and the memory for chunk buffers in flight. Kept here
# so `plan` can estimate memory without importing torch.
CHUNK_NUMEL = 1 << 22
SLOT_BUDGET_BYTES = 192 * 1024 * 1024
MIN_SLOTS = 4
# Tensors up to this many elements (at most MIN_SLOTS chunks) keep their raw chunks in their slots
# between their sums and their output, saving a second read; larger ones (embeddings) are read
# twice.
RESIDENT_NUMEL = MIN_SLOTS * CHUNK_NUMEL
# The pass engine (every method but SLERP): elements per chunk and chunk slots (one chunk of
# every input each); see shardmerge.passes.
PASS_CHUNK_NUMEL = 1 << 20
PASS_SLOTS = 6
# Compute threads of the pass engine on a CPU (shardmerge.passes.CPU_WORKERS).
PASS_COMPUTE_THREADS = 2
# Where each output shard's data section starts: a whole number of disk blocks.
DATA_ALIGN = 4096


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: its sources, its parameters, and where it goes in the output shard.

    ``inputs`` are in the method's order: SLERP's (t = 0 end, t = 1 end); a method with a base
    (base, model 1, ...); otherwise (model 1, ...). ``model_params`` and ``shared`` are the
    method's parameters resolved for this tensor (SLERP's t is ``t``).
    """

    name: str
    t: float
    inputs: tuple[TensorInfo, ...]
    out_dtype: str
    shape: tuple[int, ...]
    out_begin: int
    layer: LayerPos | None
    input_dtype: str | None = None  # mergekit `dtype`: inputs are cast to it before the math
    model_params: tuple[Mapping[str, float], ...] = ()
    shared: Mapping[str, float | bool] = field(default_factory=dict)
    # Which of the recipe's models each input comes from (a sliced stack); () means input i
    # comes from model i.
    models: tuple[int, ...] = ()

    def model_of(self, i: int) -> int:
        """The index in ``recipe.models`` of input ``i``."""
        return self.models[i] if self.models else i

    @property
    def a(self) -> TensorInfo:
        return self.inputs[0]

    @property
    def b(self) -> TensorInfo:
        return self.inputs[1]

    @property
    def merge_dtype(self) -> str:
        """The dtype the math runs in: mergekit's ``dtype``, else the first input's."""
        return self.input_dtype or self.inputs[0].dtype

    @property
    def out_nbytes(self) -> int:
        n = DTYPE_SIZES[self.out_dtype]
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.a.is_float


@dataclass(frozen=True)
class OutputShard:
    """One output file; ``header`` is the complete prefix (length + JSON), fixed up front."""

    filename: str
    tasks: tuple[TensorTask, ...]
    header: bytes

    @cached_property
    def data_bytes(self) -> int:
        # Cached: writers compare against it after every chunk (a sum over the shard's tasks).
        return sum(t.out_nbytes for t in self.tasks)

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes


@dataclass(frozen=True)
class MergePlan:
    shards: tuple[OutputShard, ...]
    tied_embeddings: bool
    warnings: tuple[str, ...]
    t_table: str  # SLERP's t table, or every scheduled parameter's table
    method: str = "slerp"
    random_seed: int = 0
    restacked: bool = False  # a new layer stack from slices: renumbered, config rewritten

    @property
    def tasks(self) -> tuple[TensorTask, ...]:
        return tuple(task for shard in self.shards for task in shard.tasks)

    @property
    def total_size(self) -> int:
        """Tensor bytes, as ``total_size`` in the index."""
        return sum(s.data_bytes for s in self.shards)

    @property
    def input_bytes(self) -> int:
        return sum(info.nbytes for t in self.tasks for info in t.inputs)

    def index_json(self, extra_metadata: Mapping[str, object] | None = None) -> str:
        weight_map = {t.name: s.filename for s in self.shards for t in s.tasks}
        metadata = {"total_size": self.total_size, **(extra_metadata or {})}
        body = {"metadata": metadata, "weight_map": weight_map}
        return json.dumps(body, indent=2) + "\n"


# Resident size of Python with torch imported, measured (~220 MB) and rounded up.
RUNTIME_BYTES = 250_000_000
# Resident size of a run that never imports torch (a stack of copies), measured (~26 MB for
# `shardmerge validate`) and rounded up; and an output shard's O_DIRECT staging buffer.
PLAIN_RUNTIME_BYTES = 30_000_000
STAGE_BYTES = 8 << 20
# The byte copier's pool (shardmerge.bytecopy): slots of this many bytes.
COPY_SLOT_BYTES = 8 << 20
COPY_SLOTS = 4


@dataclass(frozen=True)
class ChunkBuffers:
    """The engine's fixed buffers for a plan: per chunk slot, raw bytes of both inputs and of
    the output; ``slots`` of them are in flight (read ahead, held by a resident tensor between
    its sums and its output, computing, written behind)."""

    in_itemsize: int  # the widest input dtype, bytes per element
    out_itemsize: int
    slots: int

    @property
    def slot_bytes(self) -> int:
        return CHUNK_NUMEL * (2 * self.in_itemsize + self.out_itemsize)

    @property
    def total_bytes(self) -> int:
        return self.slots * self.slot_bytes


def chunk_buffers(plan: MergePlan) -> ChunkBuffers:
    tasks = plan.tasks
    in_itemsize = max((max(DTYPE_SIZES[i.dtype] for i in t.inputs) for t in tasks), default=4)
    out_itemsize = max((DTYPE_SIZES[t.out_dtype] for t in tasks), default=4)
    slot_bytes = CHUNK_NUMEL * (2 * in_itemsize + out_itemsize)
    # More slots smooth out a slow write or read; as many as fit the budget, 4 (a resident
    # tensor's chunks) to 8.
    slots = min(8, max(MIN_SLOTS, SLOT_BUDGET_BYTES // slot_bytes))
    return ChunkBuffers(in_itemsize, out_itemsize, slots)


def estimate_peak_bytes(plan: MergePlan) -> int:
    """The engine's working set: the chunk slots and the runtime (the float32 scratch pairs are
    4 MiB per compute thread). Independent of the model's size."""
    if plan.method != "slerp":
        if copies_only(plan):  # no torch: the copier's slots, one staging buffer, Python
            return COPY_SLOTS * COPY_SLOT_BYTES + STAGE_BYTES + PLAIN_RUNTIME_BYTES
        # The pass engine: its slots (one chunk of every input each) and, per compute thread
        # (two on a CPU), a combine's temporaries (about eight K-input float32-sized copies of
        # one chunk, measured). Measured peaks, bf16: 0.47-0.50 GB with 3 inputs (estimate
        # 0.49 GB), 0.55 GB with 4 inputs and a 1 GB embedding (estimate 0.57 GB).
        inputs = max((len(t.inputs) for t in plan.tasks), default=2)
        width = max((DTYPE_SIZES[i.dtype] for t in plan.tasks for i in t.inputs), default=4)
        slots = PASS_SLOTS * PASS_CHUNK_NUMEL * inputs * width
        temporaries = PASS_COMPUTE_THREADS * 8 * inputs * 4 * PASS_CHUNK_NUMEL
        return slots + temporaries + RUNTIME_BYTES
    buffers = chunk_buffers(plan)
    return buffers.total_bytes + RUNTIME_BYTES


def copies(task: TensorTask, method: MethodSpec) -> bool:
    """A one-input float tensor the method leaves as it is (passthrough): its bytes are copied."""
    return (
        method.copies is not None
        and len(task.inputs) == 1
        and task.input_dtype in (None, task.inputs[0].dtype)
        and method.copies(task.model_params[0])
    )


def copies_only(plan: MergePlan, skip_shards: frozenset[int] = frozenset()) -> bool:
    """Whether every tensor the run writes is an input's stored bytes, unconverted: then it
    needs no torch (:func:`shardmerge.bytecopy.execute_copies`). Integer tensors are always copies; float ones when
    the method copies them; none may change dtype or come from a re-indexed vocabulary."""
    if plan.method == "slerp":  # its engine copies the t = 0 / 1 ends itself
        return False
    method = get_method(plan.method)
    for index, shard in enumerate(plan.shards):
        if index in skip_shards:
            continue
        for task in shard.tasks:
            first = task.inputs[0] if task.inputs else None
            if first is None or isinstance(first, GatheredTensor):
                return False
            if first.dtype != task.out_dtype or (task.is_float and not copies(task, method)):
                return False
    return True


def plan_merge(
    recipe: Recipe,
    *models: ModelInventory,
    shard_size_bytes: int | None = None,
    vocab: VocabPlan | None = None,
) -> MergePlan:
    """Check whole models against each other and the recipe; lay out the output.

    For a recipe without slices (:func:`shardmerge.plan_stack.plan_recipe` plans any recipe and
    calls this one). ``models`` are in the recipe's order (``recipe.models``). ``vocab``: the output vocabulary
    (tokenizer_source); vocabulary-indexed tensors are re-indexed to it before anything else.

    Raises:
        CheckpointError: listing every mismatch and every tensor without a parameter, at once.
    """
    if recipe.slices:
        raise ValueError("a recipe with slices is planned by plan_stack.plan_recipe")
    limit = shard_size_bytes if shard_size_bytes is not None else recipe.shard_size_bytes
    warnings: list[str] = []
    first = models[0]
    tied = ties_embeddings(first)
    sources = [tensor_sources(model, tied, warnings) for model in models]
    if vocab is not None:
        warnings += vocab.warnings
        if not vocab.identity:
            sources, _ = gather_tensors(vocab, sources)

    problems: list[str] = []
    for model, other in zip(models[1:], sources[1:], strict=True):
        problems += mismatches(first.label, sources[0], model.label, other)
    positions = layer_positions(sources[0])
    spec = None if recipe.method == "slerp" else get_method(recipe.method)
    if spec is None:
        # A rule of the t schedule that matches no tensor is a mistake (a glob, a layer past
        # the depth), not something to drop silently.
        common = [n for n in sources[0] if all(n in other for other in sources[1:])]
        idle = idle_rules(recipe.schedule, common)
        problems += [f"{recipe.source}: {problem}" for problem in idle]

    tasks: list[TensorTask] = []
    for name, a in sources[0].items():
        inputs = tuple(s.get(name) for s in sources)
        if any(info is None for info in inputs):
            continue
        pos = positions.get(name)
        t = 0.0
        model_params: tuple[dict[str, float], ...] = ()
        shared: dict[str, float | bool] = {}
        try:
            if spec is None:
                t = resolve_t(recipe.schedule, name, pos)
            else:
                model_params, shared = resolve_params(recipe, spec, name, pos)
        except ScheduleError as exc:
            problems.append(str(exc))
            continue
        tasks.append(
            TensorTask(
                name=name,
                t=t,
                inputs=tuple(i for i in inputs if i is not None),
                out_dtype=output_dtype(recipe, a),
                shape=a.shape,
                out_begin=0,
                layer=pos,
                input_dtype=input_dtype(recipe, a),
                model_params=model_params,
                shared=shared,
            )
        )
    if problems:
        raise CheckpointError(cap_problems(list(dict.fromkeys(problems))))
    names = [t.name for t in tasks]
    return MergePlan(
        shards=layout_shards(tasks, limit),
        tied_embeddings=tied,
        warnings=tuple(warnings),
        t_table=t_table(recipe.schedule, names) if spec is None else params_table(recipe, names),
        method=recipe.method,
        random_seed=recipe.random_seed or 0,
    )


def resolve_params(
    recipe: Recipe, spec: MethodSpec, name: str, pos: LayerPos | None
) -> tuple[tuple[dict[str, float], ...], dict[str, float | bool]]:
    """A tensor's per-model and shared parameter values (defaults where not given).

    Raises:
        ScheduleError: a required parameter is missing or a value is out of range.
    """
    per_model = []
    for i, given in enumerate(recipe.model_params):
        values: dict[str, float] = {}
        for param in spec.per_model:
            where = f"{recipe.model_keys[recipe.first_merged + i]}.parameters.{param.name}"
            schedule = given.get(param.name)
            if schedule is None:
                if param.default is None:
                    raise ScheduleError(
                        f"{where}: missing; {spec.name} needs a {param.name} for every model"
                    )
                values[param.name] = float(param.default)
                continue
            value = resolve_t(_as_schedule(schedule), name, pos)
            _check_range(param, value, where, name)
            values[param.name] = value
        problem = spec.check(values) if spec.check is not None else None
        if problem is not None:
            key = recipe.model_keys[recipe.first_merged + i]
            raise ScheduleError(f"{key}.parameters: {problem}")
        per_model.append(values)
    shared: dict[str, float | bool] = {}
    for param in spec.shared:
        given_shared = recipe.shared_params.get(param.name)
        if given_shared is None:
            if param.default is None:
                raise ScheduleError(f"parameters.{param.name}: missing; {spec.name} needs it")
            shared[param.name] = param.default
        elif isinstance(given_shared, bool):
            shared[param.name] = given_shared
        else:
            value = resolve_t(given_shared, name, pos)
            _check_range(param, value, f"parameters.{param.name}", name)
            shared[param.name] = value
    if (
        spec.name == "linear"
        and shared.get("normalize")
        and sum(m["weight"] for m in per_model) == 0
    ):
        raise ScheduleError(
            "models: the weights sum to 0 and normalize divides by their sum (mergekit would "
            "write NaN); change a weight or set normalize: false"
        )
    return tuple(per_model), shared


def _as_schedule(value: Schedule | bool) -> Schedule:
    assert isinstance(value, Schedule)
    return value


def _check_range(param: Param, value: float, where: str, name: str) -> None:
    problem = param.out_of_range(value)
    if problem is not None:
        raise ScheduleError(f"{where}: {problem}")


def params_table(recipe: Recipe, names: Sequence[str]) -> str:
    """Every scheduled parameter's per-layer table (markdown), for ``plan`` and the card."""
    parts = []
    for i, given in enumerate(recipe.model_params):
        key = recipe.model_keys[recipe.first_merged + i]
        for param_name, schedule in given.items():
            if isinstance(schedule, Schedule):
                parts.append(f"{param_name} of {key}:\n\n" + t_table(schedule, names))
    for param_name, value in recipe.shared_params.items():
        if isinstance(value, Schedule):
            parts.append(f"{param_name}:\n\n" + t_table(value, names))
        else:
            parts.append(f"{param_name}: {str(value).lower()}\n")
    return "\n".join(parts)


def layout_shards(tasks: list[TensorTask], shard_size_bytes: int) -> tuple[OutputShard, ...]:
    """Split tasks, in order, into shards of at most ``shard_size_bytes`` tensor bytes; a tensor
    larger than the limit gets a shard of its own."""
    groups: list[list[TensorTask]] = []
    size = 0
    for task in tasks:
        if not groups or (size + task.out_nbytes > shard_size_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(task)
        size += task.out_nbytes
    count = len(groups)
    shards = []
    for i, group in enumerate(groups, start=1):
        placed, header = _place(group)
        shards.append(OutputShard(f"model-{i:05d}-of-{count:05d}.safetensors", placed, header))
    return tuple(shards)


def split_shards(plan: MergePlan, num_processes: int) -> list[list[int]]:
    """Output shard indices per rank: contiguous runs, balanced by bytes.

    Contiguous, so neighbouring output shards (which read the same input files) stay together;
    the largest per-rank total is the smallest any contiguous split reaches, and every rank gets
    a shard while there are enough. Deterministic: every rank computes the same split.
    """
    return _balanced_runs([shard.file_bytes for shard in plan.shards], num_processes)


def _balanced_runs(sizes: Sequence[int], num_processes: int) -> list[list[int]]:
    """Contiguous groups of indices, one per rank, minimising the largest sum."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    # The smallest cap that greedy packing fits into num_processes groups is the optimum.
    low, high = max(sizes, default=0), sum(sizes)
    while low < high:
        mid = (low + high) // 2
        if len(_pack(sizes, mid)) <= num_processes:
            high = mid
        else:
            low = mid + 1
    groups = _pack(sizes, low, spread_over=num_processes)
    return groups + [[] for _ in range(num_processes - len(groups))]


def _pack(sizes: Sequence[int], cap: int, spread_over: int = 0) -> list[list[int]]:
    """Indices in order, a new group whenever ``cap`` would be passed; also, once the indices
    left are no more than the groups still empty out of ``spread_over``, one per group."""
    groups: list[list[int]] = []
    load = 0
    for i, size in enumerate(sizes):
        if not groups or load + size > cap or len(sizes) - i <= spread_over - len(groups):
            groups.append([])
            load = 0
        groups[-1].append(i)
        load += size
    return groups


def _place(group: list[TensorTask]) -> tuple[tuple[TensorTask, ...], bytes]:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    placed = []
    offset = 0
    for task in group:
        end = offset + task.out_nbytes
        entries[task.name] = {
            "dtype": task.out_dtype,
            "shape": list(task.shape),
            "data_offsets": [offset, end],
        }
        placed.append(_replace_begin(task, offset))
        offset = end
    raw = json.dumps(entries, separators=(",", ":")).encode()
    # Padded (JSON allows trailing spaces) so the data section starts on a 4 KiB boundary: chunks
    # then go to the disk straight from memory with O_DIRECT (safetensors itself aligns to 8).
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)
    return tuple(placed), struct.pack("<Q", len(raw)) + raw


def _replace_begin(task: TensorTask, begin: int) -> TensorTask:
    return replace(task, out_begin=begin)


def output_dtype(recipe: Recipe, a: TensorInfo) -> str:
    if not a.is_float:
        return a.dtype
    name = recipe.out_dtype or recipe.input_dtype
    return CODES_BY_TORCH_NAME[name] if name else a.dtype


def input_dtype(recipe: Recipe, a: TensorInfo) -> str | None:
    if not a.is_float or recipe.input_dtype is None:
        return None
    return CODES_BY_TORCH_NAME[recipe.input_dtype]
