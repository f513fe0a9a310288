"""Step caches: TeaCache's original decisions, MagCache's rule and calibration, per-stream state."""

import json

import pytest
import torch

from framepack_core.cache import (FRAMEPACK_MAG_RATIOS, TEACACHE_POLY, MagCache, MagCacheCalibration, TeaCache,
                                  load_calibration, polyval, rescale_ratios, save_calibration)
from framepack_core.loading import load_transformer
from framepack_core.packing import make_schedule
from framepack_core.pipeline import Prompt, SamplingSettings, generate, step_cache
from framepack_core.synthetic import TINY, section_inputs

STEPS = 12


def decisions(state, changes):
    """Feed inputs whose relative L1 change per step is given; return the compute(1)/skip(0) pattern."""
    x = torch.ones(4)
    pattern = []
    for change in [0.0] + list(changes):
        x = x * (1 + change)
        skip = state.can_skip(x)
        if not skip:
            state.store(torch.zeros(4))
        pattern.append(0 if skip else 1)
    return pattern


# ---------------------------------------------------------------------------------------------
# TeaCache


def test_polynomial_is_the_hunyuan_fit():
    assert polyval(TEACACHE_POLY, 0.0) == pytest.approx(0.0961237896)
    assert polyval(TEACACHE_POLY, 0.1) == pytest.approx(7.33226126e-2 - 4.01131952e-1 + 6.75869174e-1 - 0.314987800 + 0.0961237896)


def test_unchanged_input_alternates_at_default_threshold():
    # poly(0) ~ 0.096: one step accumulates below 0.15, two cross it; the last step always computes
    assert decisions(TeaCache(0.15).start(6), [0.0] * 5) == [1, 0, 1, 0, 1, 1]


def test_threshold_below_one_increment_never_skips():
    assert decisions(TeaCache(0.05).start(6), [0.0] * 5) == [1, 1, 1, 1, 1, 1]


def test_large_threshold_skips_all_but_first_and_last():
    assert decisions(TeaCache(100.0).start(6), [0.0] * 5) == [1, 0, 0, 0, 0, 1]


def test_big_change_forces_compute():
    # a 10% change maps to poly(0.1) ~ 0.129; with 0.096 already accumulated the total crosses 0.15
    assert decisions(TeaCache(0.15).start(5), [0.0, 0.1, 0.0, 0.0]) == [1, 0, 1, 0, 1]


def test_every_run_and_stream_starts_fresh_and_totals_add_up():
    cache = TeaCache(100.0)
    positive, negative = cache.start(3, "positive"), cache.start(3, "negative")
    assert decisions(positive, [0.0, 0.0]) == [1, 0, 1]
    assert negative.residual is None and negative.step == 0  # untouched by the positive stream
    assert decisions(negative, [0.0, 0.0]) == [1, 0, 1]
    assert (cache.steps, cache.skipped) == (6, 2)
    with pytest.raises(RuntimeError, match="start\\(\\) a fresh state"):
        positive.can_skip(torch.ones(4))


def test_validation():
    with pytest.raises(ValueError, match="num_steps >= 1"):
        TeaCache().start(0)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        TeaCache(-1)
    with pytest.raises(ValueError, match="max_skips"):
        MagCache(max_skips=0)
    with pytest.raises(ValueError, match="retention"):
        MagCache(retention=1.5)
    with pytest.raises(ValueError, match="finite positive"):
        MagCache(ratios=[1.0, float("nan")])
    with pytest.raises(ValueError, match="give one of them"):
        step_cache(SamplingSettings(teacache_threshold=0.15, cache=MagCache()))
    assert step_cache(SamplingSettings(teacache_threshold=0.1)).threshold == 0.1


def test_model_reuses_the_residual_when_skipping(tiny_file):
    model = load_transformer(tiny_file, compute_dtype=torch.float32)
    kwargs = section_inputs(TINY)
    cache = TeaCache(threshold=100.0)
    state = cache.start(3)
    with torch.no_grad():
        plain = model(**kwargs)
        first = model(**kwargs, cache=state)  # computes, stores the residual
        moved = model(**{**kwargs, "hidden_states": kwargs["hidden_states"] + 0.5}, cache=state)  # skipped
        last = model(**kwargs, cache=state)  # last step computes
        again = model(**kwargs, cache=cache.start(3))
    assert cache.skipped == 1
    assert torch.equal(first, plain) and torch.equal(last, plain) and torch.equal(again, plain)
    # skipped: the blocks did not run, so the shifted input only passes through the embedding + residual
    assert not torch.allclose(moved, plain)


def test_batch_samples_keep_their_own_decision(tiny_file):
    """In one batch, a sample whose state skips reuses its residual while the other computes."""
    model = load_transformer(tiny_file, compute_dtype=torch.float32)
    kwargs = section_inputs(TINY, batch=2, text_lengths=[7, 4])
    one = [{k: v[i : i + 1] if isinstance(v, torch.Tensor) and not k.endswith("_indices") else v
            for k, v in kwargs.items()} for i in range(2)]
    one[1]["encoder_hidden_states"] = one[1]["encoder_hidden_states"][:, :4]
    one[1]["encoder_attention_mask"] = one[1]["encoder_attention_mask"][:, :4]
    moved = {"hidden_states": kwargs["hidden_states"] + 0.5}
    with torch.no_grad():
        states = [TeaCache(100.0).start(3), TeaCache(0.0).start(3)]  # sample 0 skips step 2, sample 1 never
        model(**kwargs, cache=states)
        batched = model(**{**kwargs, **moved}, cache=states)
        alone = []
        for i, threshold in enumerate((100.0, 0.0)):
            state = TeaCache(threshold).start(3)
            model(**one[i], cache=state)
            alone.append(model(**{**one[i], "hidden_states": moved["hidden_states"][i : i + 1]}, cache=state))
    assert [s.owner.skipped for s in states] == [1, 0]
    assert torch.allclose(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# MagCache


def test_magcache_rule_retention_threshold_and_max_skips():
    ratios = [1.0] + [1.01] * 9  # each skipped step adds |1 - 1.01^k|: 0.01, then 0.0201 (total 0.0301), ...
    pattern = lambda cache: decisions(cache.start(10), [0.0] * 9)  # noqa: E731
    # retention 0.2 keeps steps 0-1; with K=2 at most two skips in a row, then a compute resets the error
    assert pattern(MagCache(1.0, max_skips=2, retention=0.2, ratios=ratios)) == [1, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    # threshold 0.025: one skip (0.01) fits, a second (0.0301) does not
    assert pattern(MagCache(0.025, max_skips=5, retention=0.2, ratios=ratios)) == [1, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert pattern(MagCache(0.0, ratios=ratios)) == [1] * 10


def test_rescaling_a_calibration_for_another_step_count():
    ratios = tuple(range(25))
    assert rescale_ratios(ratios, 25) == ratios
    assert rescale_ratios(ratios, 13) == tuple(range(0, 25, 2))  # every other step
    # half-way indices round to even (numpy's rule, which the reference implementations use)
    assert rescale_ratios(ratios, 49)[:6] == (0, 0, 1, 2, 2, 2) and rescale_ratios(ratios, 49)[-1] == 24
    assert rescale_ratios(ratios, 1) == (24,)
    assert len(MagCache().start(50).ratios) == 50  # the built-in 25-step ratios serve any step count


def test_builtin_ratios_are_framepack_studios_figures():
    for ratios in FRAMEPACK_MAG_RATIOS.values():
        assert len(ratios) == 25 and ratios[0] == 1.0
    assert FRAMEPACK_MAG_RATIOS["inverted"][1] == 1.30469 and FRAMEPACK_MAG_RATIOS["inverted"][-1] == 0.78516
    assert FRAMEPACK_MAG_RATIOS["forward"][1] == 1.27344 and FRAMEPACK_MAG_RATIOS["forward"][-1] == 0.77734


@pytest.fixture(scope="module")
def tiny(tiny_file):
    model = load_transformer(tiny_file, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    start = torch.randn(1, 16, 1, 8, 8, generator=g)
    embeds = torch.randn(1, 9, TINY.image_dim, generator=g)
    positive = Prompt(torch.randn(1, 6, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g))
    negative = Prompt(torch.randn(1, 4, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g))
    return model, start, embeds, positive, negative


def generate_tiny(tiny, settings):
    model, start, embeds, positive, negative = tiny
    with torch.no_grad():
        return generate(model, make_schedule("inverted", 2, window=3), start, embeds, positive, negative,
                        settings).latents


def settings(**kw):
    return SamplingSettings(**{"steps": STEPS, "seed": 2, **kw})


@pytest.fixture(scope="module")
def calibrated(tiny):
    calibration = MagCacheCalibration()
    plain = generate_tiny(tiny, settings(cache=calibration))
    return plain, calibration.ratios()


def test_calibration_is_reproducible_and_does_not_change_the_result(tiny, calibrated):
    plain, ratios = calibrated
    again = MagCacheCalibration()
    assert torch.equal(generate_tiny(tiny, settings(cache=again)), plain)
    assert torch.equal(generate_tiny(tiny, settings()), plain)  # recording never skips
    assert again.ratios() == ratios and len(ratios) == STEPS and ratios[0] == 1.0
    assert len(again.rows) == 2 and again.skipped == 0  # one row per section, averaged


def test_calibration_file_round_trip_and_bad_files(tmp_path, calibrated):
    _, ratios = calibrated
    path = save_calibration(tmp_path / "tiny.json", ratios, model="tiny")
    assert load_calibration(path) == ratios
    assert json.loads(path.read_text())["steps"] == STEPS
    (tmp_path / "bad.json").write_text(json.dumps({"ratios": [1.0, 1.1]}))
    with pytest.raises(ValueError, match="not a FramePack MagCache calibration"):
        load_calibration(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="Cannot read MagCache calibration"):
        load_calibration(tmp_path / "broken.json")


def test_threshold_zero_is_exactly_uncached(tiny, calibrated):
    plain, ratios = calibrated
    cache = MagCache(0.0, ratios=ratios)
    assert torch.equal(generate_tiny(tiny, settings(cache=cache)), plain)
    assert cache.skipped == 0 and cache.steps == 2 * STEPS


def test_positive_threshold_skips_within_a_stated_error(tiny, calibrated):
    """On the tiny random model, 12 steps, threshold 0.05 skips 2 of 24 steps at a relative error of 2.7%
    (stated bound: 5%). Its random weights make it far more sensitive than a trained model."""
    plain, ratios = calibrated
    cache = MagCache(0.05, ratios=ratios)
    cached = generate_tiny(tiny, settings(cache=cache))
    error = ((cached - plain).norm() / plain.norm()).item()
    assert cache.skipped > 0
    assert error < 0.05


def test_cfg_streams_keep_separate_state(tiny, calibrated):
    """With real CFG each stream runs its own MagCache state: twice the steps, and the result equals a run
    in which each stream's skips were decided alone (the sequential path)."""
    _, ratios = calibrated
    results = {}
    for batched in (False, True):
        cache = MagCache(0.1, ratios=ratios)
        results[batched] = generate_tiny(tiny, settings(cache=cache, cfg=3.0, cfg_batch=batched))
        assert cache.steps == 2 * 2 * STEPS and cache.skipped % 2 == 0  # same ratios: both streams skip alike
    assert torch.allclose(results[True], results[False], atol=1e-4, rtol=1e-4)


def test_calibration_command_writes_the_same_file_twice(tiny_file, tmp_path):
    from framepack_core.magcache_calibrate import main

    files = [tmp_path / f"run{i}.json" for i in range(2)]
    for path in files:
        main([str(tiny_file), "--out", str(path), "--steps", "4", "--size", "8", "8", "--window", "3",
              "--dtype", "float32", "--device", "cpu"])
    assert files[0].read_text() == files[1].read_text()
    ratios = load_calibration(files[0])
    assert len(ratios) == 4 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    assert len(MagCache(0.1, ratios=ratios).start(25).ratios) == 25  # usable for another step count
