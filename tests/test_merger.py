"""SLERPModelMerger: the nn.Module API over shardmerge.slerp."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from torch import nn

from shardmerge import SLERPModelMerger
from shardmerge.slerp import slerp

M = TypeVar("M", bound=nn.Module)


def seeded(factory: Callable[[], M], seed: int) -> M:
    torch.manual_seed(seed)
    return factory()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert state[name].dtype == value.dtype, name
        assert torch.equal(state[name], value), name


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def trained_cnn(seed: int, steps: int) -> SmallCNN:
    """A channels_last CNN whose BatchNorm has seen ``steps`` batches (running stats, counter)."""
    model = seeded(SmallCNN, seed).to(memory_format=torch.channels_last)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last))
    return model.eval()


class Block(nn.Module):
    """A module whose constructor needs arguments (type(model)() would fail)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.register_buffer("scale", torch.full((dim,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) * self.scale


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


class Holder(nn.Module):
    """Tensors by name and shape, for mismatch tests."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape)))


def test_cnn_with_batchnorm_and_channels_last() -> None:
    model1, model2 = trained_cnn(0, steps=3), trained_cnn(1, steps=6)
    assert model1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    t = 0.3
    merged = SLERPModelMerger(model1, model2, t).merge()
    assert isinstance(merged, SmallCNN) and merged is not model1

    state, state1, state2 = merged.state_dict(), model1.state_dict(), model2.state_dict()
    assert state.keys() == state1.keys()
    for name, value in state.items():
        assert torch.equal(value, slerp(state1[name], state2[name], t)), name
        assert torch.isfinite(value.double()).all(), name
    # int64 counter by rounded lerp: round(0.7*3 + 0.3*6) = round(3.9) = 4.
    assert merged.bn.num_batches_tracked.dtype == torch.int64
    assert int(merged.bn.num_batches_tracked) == 4
    # Running stats are merged, not just copied from model1.
    assert not torch.equal(merged.bn.running_mean, model1.bn.running_mean)
    assert merged.conv.weight.is_contiguous(memory_format=torch.channels_last)

    output = merged(torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last))
    assert output.shape == (2, 4) and torch.isfinite(output).all()


def test_module_with_required_constructor_args() -> None:
    model1, model2 = seeded(lambda: Block(5, 7), 2), seeded(lambda: Block(5, 7), 3)
    model2.scale.fill_(4.0)
    merged = SLERPModelMerger(model1, model2, 0.5).merge()
    assert isinstance(merged, Block)
    assert merged.up.weight.shape == (7, 5)
    torch.testing.assert_close(merged.scale, torch.full((5,), 3.0))  # buffers merged too
    assert merged(torch.randn(3, 5)).shape == (3, 5)


def test_bf16_model_stays_bf16() -> None:
    model1 = seeded(lambda: Block(8, 16), 4).to(torch.bfloat16)
    model2 = seeded(lambda: Block(8, 16), 5).to(torch.bfloat16)
    merged = SLERPModelMerger(model1, model2, 0.4).merge()
    for name, value in merged.state_dict().items():
        assert value.dtype == torch.bfloat16, name
        expected = slerp(model1.state_dict()[name], model2.state_dict()[name], 0.4)
        assert torch.equal(value, expected), name
    assert merged(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("t", [0.5, 0.3])
def test_identical_models_give_the_model(t: float) -> None:
    model = trained_cnn(6, steps=2)
    merged = SLERPModelMerger(model, copy.deepcopy(model), t).merge()
    for name, value in merged.state_dict().items():
        expected = model.state_dict()[name]
        assert not value.is_floating_point() or torch.isfinite(value).all(), name
        if t == 0.5:
            assert torch.equal(value, expected), name  # 0.5*a + 0.5*a is exact
        else:
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)


def test_inputs_are_not_modified() -> None:
    model1, model2 = trained_cnn(7, steps=2), trained_cnn(8, steps=5)
    model1.conv.bias.requires_grad_(False)
    before1, before2 = snapshot(model1), snapshot(model2)
    SLERPModelMerger(model1, model2, 0.6).merge()
    assert_state_equal(model1, before1)
    assert_state_equal(model2, before2)
    assert not model1.conv.bias.requires_grad and model1.conv.weight.requires_grad
    assert model1.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_result_is_independent_of_inputs() -> None:
    model1, model2 = trained_cnn(9, steps=1), trained_cnn(10, steps=1)
    before1, before2 = snapshot(model1), snapshot(model2)
    for t in (0, 0.5, 1):  # the ends too: a copy, never the input's own tensors
        merged = SLERPModelMerger(model1, model2, t).merge()
        input_storages = {
            v.untyped_storage().data_ptr()
            for m in (model1, model2)
            for v in m.state_dict().values()
        }
        for name, value in merged.state_dict().items():
            assert value.untyped_storage().data_ptr() not in input_storages, name
        with torch.no_grad():
            for value in merged.state_dict().values():
                value.fill_(7)
        assert_state_equal(model1, before1)
        assert_state_equal(model2, before2)


def test_merger_does_not_own_the_inputs() -> None:
    model1, model2 = seeded(lambda: Block(4, 4), 11), seeded(lambda: Block(4, 4), 12)
    merger = SLERPModelMerger(model1, model2)
    assert merger.model1 is model1 and merger.model2 is model2 and merger.t == 0.5
    assert list(merger.parameters()) == []
    assert list(merger.children()) == []
    assert merger.state_dict() == {}
    merger.half()
    merger.to(torch.float64)
    assert all(p.dtype == torch.float32 for m in (model1, model2) for p in m.parameters())
    # Reassigning an input must not register it either.
    merger.model2 = seeded(lambda: Block(4, 4), 13)
    assert list(merger.parameters()) == []
    merger.half()
    assert merger.model2.up.weight.dtype == torch.float32


def test_mismatch_lists_every_offending_tensor_with_both_shapes() -> None:
    model1 = Holder({"same": (2, 2), "wrong": (3, 4), "only_in_1": (5,), "also_wrong": (7,)})
    model2 = Holder({"same": (2, 2), "wrong": (4, 3), "only_in_2": (6, 1), "also_wrong": (8,)})
    with pytest.raises(ValueError) as excinfo:
        SLERPModelMerger(model1, model2).merge()
    message = str(excinfo.value)
    assert "4 tensors differ" in message
    assert "wrong: model1 (3, 4) vs model2 (4, 3)" in message
    assert "also_wrong: model1 (7,) vs model2 (8,)" in message
    assert "only_in_1: model1 (5,) vs model2 missing" in message
    assert "only_in_2: model1 missing vs model2 (6, 1)" in message
    assert "same" not in message


def test_mismatch_in_float_and_integer_kind_is_reported() -> None:
    model1, model2 = seeded(lambda: Block(3, 3), 14), seeded(lambda: Block(3, 3), 15)
    model2.scale = torch.ones(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"scale: model1 torch.float32 vs model2 torch.int64"):
        SLERPModelMerger(model1, model2).merge()


@pytest.mark.parametrize(
    "args",
    [
        ("not a model", nn.Linear(2, 2)),
        (nn.Linear(2, 2), {"weight": torch.zeros(2, 2)}),
        (nn.Linear(2, 2), nn.Linear(2, 2), "0.5"),
        (nn.Linear(2, 2), nn.Linear(2, 2), True),
        (nn.Linear(2, 2), nn.Linear(2, 2), torch.tensor(0.5)),
    ],
)
def test_constructor_rejects_wrong_types(args: tuple[object, ...]) -> None:
    with pytest.raises(TypeError, match="SLERPModelMerger.__init__"):
        SLERPModelMerger(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("t", [-0.1, 1.5, math.nan, math.inf])
def test_constructor_rejects_t_outside_unit_interval(t: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SLERPModelMerger(nn.Linear(2, 2), nn.Linear(2, 2), t)


def test_static_helpers_check_types() -> None:
    weight = torch.randn(3, 3)
    with pytest.raises(TypeError, match="'w1' must be Tensor"):
        SLERPModelMerger._slerp([1.0, 2.0], weight, 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'w2' must be Tensor"):
        SLERPModelMerger._slerp(weight, 2.0, 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'t' must be int or float"):
        SLERPModelMerger._slerp(weight, weight, "0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SLERPModelMerger._slerp(weight, weight, 1.5)
    with pytest.raises(TypeError, match="'model' must be Module"):
        SLERPModelMerger._copy_model_structure(42)  # type: ignore[arg-type]
    other = torch.randn(3, 3)
    assert torch.equal(SLERPModelMerger._slerp(weight, other, 0.25), slerp(weight, other, 0.25))


def test_copy_model_structure_is_a_deep_copy() -> None:
    model = seeded(lambda: Block(3, 5), 16)
    copied = SLERPModelMerger._copy_model_structure(model)
    assert isinstance(copied, Block) and copied is not model
    assert_state_equal(copied, snapshot(model))
    assert copied.up.weight.data_ptr() != model.up.weight.data_ptr()


@pytest.mark.parametrize("t", [0, 1])
def test_ends_give_each_model_exactly(t: int) -> None:
    model1, model2 = trained_cnn(17, steps=2), trained_cnn(18, steps=5)
    merged = SLERPModelMerger(model1, model2, t).merge()
    assert_state_equal(merged, snapshot(model1 if t == 0 else model2))


def test_requires_grad_follows_model1() -> None:
    model1, model2 = seeded(lambda: Block(3, 4), 19), seeded(lambda: Block(3, 4), 20)
    model1.up.requires_grad_(False)
    model2.down.requires_grad_(False)
    merged = SLERPModelMerger(model1, model2, 0.5).merge()
    assert not merged.up.weight.requires_grad and not merged.up.bias.requires_grad
    assert merged.down.weight.requires_grad and merged.down.bias.requires_grad
    assert all(p.grad is None and p.is_leaf for p in merged.parameters())


def test_tied_weights_stay_tied() -> None:
    model1, model2 = seeded(TiedLM, 21), seeded(TiedLM, 22)
    merged = SLERPModelMerger(model1, model2, 0.5).merge()
    assert merged.head.weight is merged.embed.weight
    assert torch.equal(merged.embed.weight, slerp(model1.embed.weight, model2.embed.weight, 0.5))
    assert merged(torch.tensor([[1, 2, 3]])).shape == (1, 3, 11)

    # An untied model2 holding equal values for both names merges the same way.
    untied = seeded(TiedLM, 22)
    untied.head.weight = nn.Parameter(untied.embed.weight.detach().clone())
    again = SLERPModelMerger(model1, untied, 0.5).merge()
    assert again.head.weight is again.embed.weight
    assert torch.equal(again.embed.weight, merged.embed.weight)

    # Different values cannot become one tied tensor: refuse rather than pick one.
    with torch.no_grad():
        untied.head.weight.add_(1.0)
    with pytest.raises(ValueError, match="head.weight: tied to embed.weight in model1"):
        SLERPModelMerger(model1, untied, 0.5).merge()


def test_repr_shows_t_not_the_models() -> None:
    merger = SLERPModelMerger(nn.Linear(2, 2), nn.Linear(2, 2), 0.25)
    assert repr(merger) == "SLERPModelMerger(t=0.25)"


def test_numpy_scalars_are_accepted_for_t():
    import numpy as np

    model1, model2 = nn.Linear(3, 3), nn.Linear(3, 3)
    expected = SLERPModelMerger(model1, model2, t=0.25).merge().state_dict()
    for t in (np.float32(0.25), np.float64(0.25), np.float16(0.25)):
        merger = SLERPModelMerger(model1, model2, t=t)
        assert type(merger.t) is float
        merged = merger.merge().state_dict()
        assert all(torch.equal(merged[k], expected[k]) for k in expected)
    weight, other = torch.randn(3, 3), torch.randn(3, 3)
    assert torch.equal(
        SLERPModelMerger._slerp(weight, other, np.float32(0.25)), slerp(weight, other, 0.25)
    )
