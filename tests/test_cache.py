"""TeaCache: the original's skip decisions, residual reuse, per-section reset."""

import pytest
import torch

from framepack_core.cache import TEACACHE_POLY, TeaCache, polyval
from framepack_core.loading import load_transformer
from framepack_core.synthetic import TINY, section_inputs


def decisions(cache, changes, stream="positive"):
    """Feed inputs whose relative L1 change per step is given; return the compute(1)/skip(0) pattern."""
    x = torch.ones(4)
    pattern = []
    for i, change in enumerate([0.0] + list(changes)):
        x = x * (1 + change)
        skip = cache.can_skip(stream, x)
        if not skip:
            cache.store(stream, torch.zeros(4))
        pattern.append(0 if skip else 1)
    return pattern


def test_polynomial_is_the_hunyuan_fit():
    assert polyval(TEACACHE_POLY, 0.0) == pytest.approx(0.0961237896)
    assert polyval(TEACACHE_POLY, 0.1) == pytest.approx(7.33226126e-2 - 4.01131952e-1 + 6.75869174e-1 - 0.314987800 + 0.0961237896)


def test_unchanged_input_alternates_at_default_threshold():
    # poly(0) ~ 0.096: one step accumulates below 0.15, two cross it; the last step always computes
    assert decisions(TeaCache(6, 0.15), [0.0] * 5) == [1, 0, 1, 0, 1, 1]


def test_threshold_below_one_increment_never_skips():
    assert decisions(TeaCache(6, 0.05), [0.0] * 5) == [1, 1, 1, 1, 1, 1]


def test_large_threshold_skips_all_but_first_and_last():
    assert decisions(TeaCache(6, 100.0), [0.0] * 5) == [1, 0, 0, 0, 0, 1]


def test_big_change_forces_compute():
    # a 10% change maps to poly(0.1) ~ 0.129; with 0.096 already accumulated the total crosses 0.15
    assert decisions(TeaCache(5, 0.15), [0.0, 0.1, 0.0, 0.0]) == [1, 0, 1, 0, 1]


def test_counter_wraps_for_the_next_run_and_streams_are_separate():
    cache = TeaCache(3, 100.0)
    assert decisions(cache, [0.0, 0.0]) == [1, 0, 1]
    assert decisions(cache, [0.0, 0.0]) == [1, 0, 1]
    assert decisions(cache, [0.0, 0.0], stream="negative") == [1, 0, 1]


def test_validation():
    with pytest.raises(ValueError, match="num_steps >= 1"):
        TeaCache(0)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        TeaCache(5, -1)


def test_model_reuses_the_residual_when_skipping(tiny_file):
    model = load_transformer(tiny_file, compute_dtype=torch.float32)
    kwargs = section_inputs(TINY)
    with torch.no_grad():
        plain = model(**kwargs)
        model.cache = TeaCache(num_steps=3, threshold=100.0)
        first = model(**kwargs)  # computes, stores the residual
        moved = model(**{**kwargs, "hidden_states": kwargs["hidden_states"] + 0.5})  # skipped
        last = model(**kwargs)  # last step computes
    assert model.cache.skipped == 1
    assert torch.equal(first, plain) and torch.equal(last, plain)
    # skipped: the blocks did not run, so the shifted input only passes through the embedding + residual
    assert not torch.allclose(moved, plain)
    model.cache.reset()
    with torch.no_grad():
        assert torch.equal(model(**kwargs), plain)
