"""shardmerge.methods.bits: every int16 mask equals the float comparison it replaces, for all
65536 bit patterns of bf16 and f16 (zeros of both signs, subnormals, infinities, NaNs)."""

from __future__ import annotations

import pytest
import torch

from shardmerge.methods import bits, rng


def _every_pattern(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    assert mask.dtype == torch.int16
    assert bool(((mask == 0) | (mask == -1)).all()), "a mask is -1 or 0"
    return mask != 0


@pytest.mark.parametrize("dtype", bits.SIXTEEN_BIT)
def test_masks_equal_the_float_comparisons(dtype):
    x = _every_pattern(dtype)
    assert torch.equal(_as_bool(bits.nonzero(x)), x != 0)
    nonzero, not_positive = bits.nonzero_and_not_positive(x)
    assert torch.equal(_as_bool(nonzero), x != 0)
    assert torch.equal(_as_bool(not_positive) & (x != 0), (x < 0) | torch.isnan(x))
    for p in (torch.zeros_like(nonzero), torch.full_like(nonzero, -1)):  # TIES' agreement
        agree = not_positive.clone().bitwise_xor_(p).bitwise_and_(nonzero)
        assert torch.equal(_as_bool(agree), ((x > 0) == (p != 0)) & (x != 0))
    assert torch.equal(_as_bool(bits.is_nonneg(x)), x >= 0)
    assert torch.isnan(x).sum() > 0 and torch.isinf(x).sum() == 2  # the patterns cover them


@pytest.mark.parametrize("dtype", bits.SIXTEEN_BIT)
def test_greater_orders_like_the_magnitude(dtype):
    x = _every_pattern(dtype)
    keys = bits.magnitudes(x)
    for t in (-1, 0, 1, 0x3F80, 0x7C00, 0x7F80, 0x7FFE, 0x7FFF, 0x7FFFFFFF):
        want = keys.to(torch.int64) > t
        assert torch.equal(_as_bool(bits.greater(keys, t)), want), t


@pytest.mark.parametrize("dtype", bits.SIXTEEN_BIT)
def test_ones_where_and_products_match_bool_conversion(dtype):
    x = _every_pattern(dtype)
    keep = torch.arange(x.numel()) % 3 == 0
    ones = bits.ones_where(bits.from_bool(keep), dtype)
    assert torch.equal(ones.view(torch.int16), keep.to(dtype).view(torch.int16))
    # x * mask keeps NaN * 0 = NaN and the sign of a dropped zero, as the bool version does.
    assert torch.equal((x * ones).view(torch.int16), (x * keep.to(dtype)).view(torch.int16))
    assert int(bits.count(bits.from_bool(keep))) == int(keep.sum())


@pytest.mark.parametrize("dtype", bits.SIXTEEN_BIT)
def test_where_zero_one_is_masked_fill_of_zeros(dtype):
    x = _every_pattern(dtype)
    want = x.clone().masked_fill_(x == 0, 1)
    got = bits.where_zero_one(x.clone())
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_rank_selector_int16_masks_equal_the_bool_masks_for_any_chunking():
    from shardmerge.methods.select import RankSelector, key_space, magnitude_keys

    g = torch.Generator().manual_seed(5)
    # Few distinct magnitudes: many ties at the threshold, so the boundary chunk is exercised.
    x = (torch.randint(-40, 40, (5000,), generator=g).float() / 8).to(torch.bfloat16)
    for counts in ((2500,), (1, 4999), (4000, 300)):
        for chunk in (7, 333, 5000):
            ref = RankSelector(x.numel(), counts, key_space(torch.bfloat16))
            fast = RankSelector(x.numel(), counts, key_space(torch.bfloat16))
            for sel, keys in ((ref, magnitude_keys(x)), (fast, bits.magnitudes(x))):
                for s in range(0, x.numel(), chunk):
                    sel.add(keys[s : s + chunk])
                sel.end_pass()
            for i in range(len(counts)):
                want = torch.cat(
                    [
                        ref.mask(magnitude_keys(x[s : s + chunk]), i)
                        for s in range(0, x.numel(), chunk)
                    ]
                )
                got = torch.cat(
                    [
                        fast.mask_bits(bits.magnitudes(x[s : s + chunk]), i)
                        for s in range(0, x.numel(), chunk)
                    ]
                )
                assert torch.equal(_as_bool(got), want), (counts, chunk, i)
                assert int(want.sum()) == counts[i]
                ref.restart()
                fast.restart()


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1024, 1021, 5 * 16 + 3, 65536 + 7])
def test_pack_then_unpack_gives_the_mask_back(n):
    g = torch.Generator().manual_seed(n)
    mask = bits.from_bool(torch.rand(n, generator=g) < 0.5)
    mask[-1] = -1  # the last element's bit is set: padding must not hide or add one
    words = bits.pack(mask)
    assert words.dtype == torch.int16 and words.numel() == -(-n // 16)
    assert torch.equal(bits.unpack(words, n), mask)


@pytest.mark.parametrize("n", [0, 1, bits.COUNT_ROW - 1, bits.COUNT_ROW, 4 * bits.COUNT_ROW + 5])
def test_count_is_the_number_of_set_elements(n):
    g = torch.Generator().manual_seed(n)
    full = torch.full((n,), -1, dtype=torch.int16)  # every int16 row sum at its most negative
    some = bits.from_bool(torch.rand(n, generator=g) < 0.3)
    for mask in (full, some, torch.zeros(n, dtype=torch.int16), some.view(1, -1)):
        assert bits.count(mask).dtype == torch.int64
        assert int(bits.count(mask)) == int((mask != 0).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rank_selector_with_chunk_tie_counts_makes_masks_in_any_order(dtype):
    """With room for the last pass's counts per chunk, counted in any order, the masks of
    chunks taken in reverse order are those of a walk in flat order; with too little room it
    says so (any_order False) and masks go in flat order."""
    from shardmerge.methods.select import RankSelector, key_space, magnitude_keys

    g = torch.Generator().manual_seed(9)
    x = (torch.randint(-40, 40, (5000,), generator=g).float() / 8).to(dtype)
    # Small magnitudes first, large ones after: the first chunks hold none of the keys tied at
    # a high threshold (a chunk's kept counters then lack its digit).
    low, high = torch.randint(0, 10, (2600,), generator=g), torch.randint(20, 40, (2400,))
    split = (torch.cat([low, high]).float() / 8).to(dtype)
    chunk = 333
    starts = list(range(0, x.numel(), chunk))
    cases = [(x, c) for c in ((2500,), (1, 4999), (4000, 300))] + [(split, (1000, 2300))]
    for x, counts in cases:
        keys = bits.magnitudes(x) if dtype == torch.bfloat16 else magnitude_keys(x)
        walk = RankSelector(x.numel(), counts, key_space(dtype))
        free = RankSelector(x.numel(), counts, key_space(dtype), count_budget=1 << 30)
        for _ in range(walk.passes):
            for s in starts:
                walk.add(keys[s : s + chunk])
            for s in reversed(starts):
                free.add(keys[s : s + chunk], s)
            walk.end_pass()
            free.end_pass()
        assert free.any_order and not walk.any_order
        for i in range(len(counts)):
            want = [walk.mask(keys[s : s + chunk], i) for s in starts]
            got = {s: free.mask(keys[s : s + chunk], i, s) for s in reversed(starts)}
            assert torch.equal(torch.cat([got[s] for s in starts]), torch.cat(want)), counts
            assert int(torch.cat(want).sum()) == counts[i]
            walk.restart()
    small = RankSelector(x.numel(), (2500,), key_space(dtype), count_budget=4)
    for _ in range(small.passes):
        for s in starts:
            small.add(keys[s : s + chunk], s)
        small.end_pass()
    assert not small.any_order


def _lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 finaliser on a Python int (the reference of rng's tensor ops)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@pytest.mark.parametrize("start", [0, 12_345, rng.MAX_NUMEL - 3 * rng.CPU_PIECE])
def test_draws_are_the_documented_hash_in_every_piece(start):
    """The draw for position j is the top UNIT_BITS bits of lowbias32(key + j * 0x9E3779B9),
    whether it falls in the first, a middle or the last cache-sized piece of a call."""
    key = rng.stream_key(7, "model.layers.0.mlp.up_proj.weight", 1)
    count = 2 * rng.CPU_PIECE + 1000
    draws = rng.uniform_bits(key, start, count, torch.device("cpu"))
    keep = rng.keep_bits(key, start, count, 0.3, torch.device("cpu"))
    threshold = round(0.3 * (1 << rng.UNIT_BITS))
    g = torch.Generator().manual_seed(start)
    edges = [0, rng.CPU_PIECE - 1, rng.CPU_PIECE, 2 * rng.CPU_PIECE, count - 1]
    for i in edges + torch.randint(0, count, (200,), generator=g).tolist():
        j = start + i
        want = _lowbias32((key + j * 0x9E3779B9) & 0xFFFFFFFF) >> (32 - rng.UNIT_BITS)
        assert int(draws[i]) == want, i
        assert int(keep[i]) == (-1 if want < threshold else 0), i
    assert torch.equal(keep.bool(), rng.keep_mask(key, start, count, 0.3, torch.device("cpu")))
