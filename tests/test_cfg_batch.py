"""Batched CFG: positive and negative as one batch of 2, equal to the sequential path in fp32."""

import pytest
import torch

from framepack_core.cache import MagCache, TeaCache
from framepack_core.sampling import batch_conditions, condition_of_batch
from framepack_core.synthetic import TINY, section_inputs
from test_cache import generate_tiny, settings, tiny  # noqa: F401  (tiny is a fixture)


@pytest.mark.parametrize("make_cache", [lambda: None, lambda: TeaCache(0.15), lambda: MagCache(0.1)],
                         ids=["uncached", "teacache", "magcache"])
def test_batched_matches_sequential(tiny, make_cache):  # noqa: F811
    model = tiny[0]
    batches = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: batches.append(kw["hidden_states"].shape[0]),
                                           with_kwargs=True)
    try:
        caches = {b: make_cache() for b in (False, True)}
        out = {b: generate_tiny(tiny, settings(cfg=3.0, cfg_rescale=0.5, cfg_batch=b, cache=caches[b]))
               for b in (False, True)}
    finally:
        hook.remove()
    calls = len(batches) // 3  # sequential: 2 calls of batch 1 per step; batched: 1 call of batch 2
    assert batches == [1] * (2 * calls) + [2] * calls
    assert torch.allclose(out[True], out[False], atol=1e-5, rtol=1e-5)
    if caches[True] is not None:  # each stream decided alone, and alike on both paths
        assert (caches[True].steps, caches[True].skipped) == (caches[False].steps, caches[False].skipped)
        assert caches[True].skipped > 0


def test_batch_conditions_pads_text_and_checks_shared_inputs():
    text = lambda n: torch.ones(1, n, 3)  # noqa: E731
    positive = {"encoder_hidden_states": text(5), "encoder_attention_mask": None, "guidance": torch.tensor([1.0]),
                "latent_indices": torch.arange(3), "cache": "p"}
    negative = {**positive, "encoder_hidden_states": text(2), "encoder_attention_mask": torch.ones(1, 2, dtype=torch.bool),
                "cache": "n"}
    both = batch_conditions(positive, negative)
    assert both["encoder_hidden_states"].shape == (2, 5, 3) and both["encoder_hidden_states"][1, 2:].abs().sum() == 0
    assert both["encoder_attention_mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert both["guidance"].shape == (2,) and torch.equal(both["latent_indices"], torch.arange(3))
    assert both["cache"] == ["p", "n"]
    with pytest.raises(ValueError, match="same latent_indices"):
        batch_conditions(positive, {**negative, "latent_indices": torch.arange(1, 4)})
    with pytest.raises(ValueError, match="Only one of the positive and negative"):
        batch_conditions(positive, {**negative, "cache": None})


def test_each_half_of_a_batch_computes_what_its_condition_alone_computes(tiny):  # noqa: F811
    model = tiny[0]
    positive = section_inputs(TINY, text_lengths=[6], seed=1)
    negative = {**positive, **{k: v for k, v in section_inputs(TINY, text_lengths=[3], seed=2).items()
                               if k in ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections")}}
    x, t = positive.pop("hidden_states"), positive.pop("timestep")
    negative = {k: v for k, v in negative.items() if k not in ("hidden_states", "timestep")}
    caches = [TeaCache(0.15).start(2) for _ in range(4)]
    both = batch_conditions({**positive, "cache": caches[0]}, {**negative, "cache": caches[1]})
    with torch.no_grad():
        for index, (condition, cache) in enumerate([(positive, caches[2]), (negative, caches[3])]):
            half = condition_of_batch(both, index)
            assert half["cache"] == [caches[index]] and torch.equal(half["latent_indices"], both["latent_indices"])
            alone = model(hidden_states=x, timestep=t, **condition, cache=cache)
            assert torch.equal(model(hidden_states=x, timestep=t, **half), alone)
