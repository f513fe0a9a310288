"""The per-block hook a host passes in transformer_options (ComfyUI's Dynamic VRAM prefetch uses it)."""

import pytest
import torch

from framepack_core.cache import TeaCache
from framepack_core.loading import load_transformer
from framepack_core.model import BLOCK_HOOK
from framepack_core.synthetic import TINY, section_inputs


@pytest.fixture(scope="module")
def model(tiny_file):
    return load_transformer(tiny_file, compute_dtype=torch.float32)


class Recorder:
    """A block hook that notes what the transformer tells it: the blocks it will run, then each block."""

    def __init__(self):
        self.planned, self.seen = [], []

    def __call__(self, blocks):
        self.planned.append(list(blocks))
        return self.seen.append


def blocks_in_order(model):
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def test_hook_sees_every_block_once_in_order_and_changes_nothing(model):
    kwargs = section_inputs(TINY, height=8, width=8)
    recorder = Recorder()
    with torch.no_grad():
        plain = model(**kwargs)
        hooked = model(**kwargs, transformer_options={BLOCK_HOOK: recorder})
    assert torch.equal(hooked, plain)
    assert len(recorder.planned) == 1, "one plan per transformer call"
    assert [id(b) for b in recorder.planned[0]] == [id(b) for b in blocks_in_order(model)]
    assert [id(b) for b in recorder.seen] == [id(b) for b in blocks_in_order(model)] + [id(None)]


def test_hook_sees_a_replaced_block_before_its_replacement_runs(model):
    kwargs = section_inputs(TINY, height=8, width=8)
    recorder = Recorder()
    target = model.single_transformer_blocks[0]
    seen_before_replacement = []

    def replace(args, extra):
        seen_before_replacement.append(recorder.seen[-1] is target)
        return extra["original_block"](args)

    options = {BLOCK_HOOK: recorder, "patches_replace": {"dit": {("single_block", 0): replace}}}
    with torch.no_grad():
        assert torch.equal(model(**kwargs, transformer_options=options), model(**kwargs))
    assert seen_before_replacement == [True]
    assert len(recorder.seen) == len(blocks_in_order(model)) + 1


def test_a_step_the_cache_skips_never_calls_the_hook(model):
    kwargs = section_inputs(TINY, height=8, width=8)
    recorder = Recorder()
    state = TeaCache(threshold=1e9).start(3)  # step 0 and the last compute, step 1 reuses the residual
    with torch.no_grad():
        for step in range(3):
            model(**kwargs, cache=state, transformer_options={BLOCK_HOOK: recorder})
            assert len(recorder.planned) == (1 if step < 2 else 2), f"step {step}"
    assert state.owner.skipped == 1
