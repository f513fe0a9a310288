"""Prompt blending between timed prompts, against a plain re-implementation, through the section loop."""

import pytest
import torch

from framepack_core.packing import make_schedule
from framepack_core.pipeline import Prompt, SamplingSettings, TimedPrompt, generate
from framepack_core.prompts import blend_prompts
from framepack_core.synthetic import TINY

WINDOW = 2  # 8 pixel frames per section: at 30 fps video section v starts at (8v + 1) / 30 s


def prompt(seed, tokens, valid=None):
    g = torch.Generator().manual_seed(seed)
    mask = None if valid is None else torch.arange(tokens)[None] < valid
    return Prompt(torch.randn(1, tokens, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g), mask)


def plain_blend(a, b, w):
    """Pad both to the longer with zeros (zeros outside each mask too), interpolate, union of masks."""
    n = max(a.text.shape[1], b.text.shape[1])
    texts, masks = [], []
    for p in (a, b):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[: p.text.shape[1]] = True if p.mask is None else p.mask[0]
        text = torch.zeros(n, TINY.text_dim)
        text[: p.text.shape[1]] = p.text[0]
        texts.append(text * mask[:, None])
        masks.append(mask)
    return ((1 - w) * texts[0] + w * texts[1], (1 - w) * a.pooled[0] + w * b.pooled[0], masks[0] | masks[1])


def sections_seen(mode, timed, main, n=6):
    """The positive text inputs each video section got, in temporal order."""
    seen = {}
    schedule = make_schedule(mode, n, window=WINDOW)

    def record(noise, positive, negative, on_step, interrupt):
        seen[len(seen)] = positive
        return torch.zeros_like(noise)

    generate(None, schedule, torch.zeros(1, 16, 1, 4, 4), torch.zeros(1, 3, TINY.image_dim), main, None,
             SamplingSettings(), timed_prompts=timed, sample_section=record)
    order = [s.video_index for s in schedule]
    return [seen[order.index(v)] for v in range(n)]


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_blended_sections_match_a_plain_reimplementation(mode):
    main, a, b = prompt(1, 7, valid=5), prompt(2, 4), prompt(3, 9, valid=6)
    # section start times: 0.033, 0.3, 0.567, 0.833, 1.1, 1.367 s
    timed = [TimedPrompt(a, 0.2, 0.7, blend_sections=2), TimedPrompt(b, 0.7, 5.0, blend_sections=3)]
    # targets: main, a, a, b, b, b. Into a over 2 sections (1/3, 2/3), into b over 3 (1/4, 2/4, 3/4).
    expected = [None, (main, a, 1 / 3), (main, a, 2 / 3), (a, b, 1 / 4), (a, b, 2 / 4), (a, b, 3 / 4)]
    for v, (got, want) in enumerate(zip(sections_seen(mode, timed, main), expected)):
        if want is None:
            assert torch.equal(got["encoder_hidden_states"], main.text)
            continue
        text, pooled, mask = plain_blend(*want)
        assert torch.allclose(got["encoder_hidden_states"][0], text, atol=1e-6), v
        assert torch.allclose(got["pooled_projections"][0], pooled, atol=1e-6), v
        assert torch.equal(got["encoder_attention_mask"][0], mask), v


def test_back_to_the_main_prompt_uses_the_outgoing_blend_and_none_means_abrupt():
    main, a = prompt(1, 5), prompt(2, 5)
    seen = sections_seen("forward", [TimedPrompt(a, 0.2, 0.7, blend_sections=1)], main)
    text, _, _ = plain_blend(a, main, 0.5)  # sections 3: half way back to main; 4: main
    assert torch.allclose(seen[3]["encoder_hidden_states"][0], text, atol=1e-6)
    assert torch.equal(seen[4]["encoder_hidden_states"], main.text)
    abrupt = sections_seen("forward", [TimedPrompt(a, 0.2, 0.7)], main)
    assert [torch.equal(s["encoder_hidden_states"], a.text) for s in abrupt] == [False, True, True, False, False, False]
    assert all(s["encoder_attention_mask"] is None for s in abrupt)  # no blend: the prompts go in untouched


def test_blend_weights_at_the_ends_return_the_prompts_themselves():
    a, b = prompt(1, 3), prompt(2, 6, valid=4)
    assert blend_prompts(a, b, 0.0) is a and blend_prompts(a, b, 1.0) is b
    half = blend_prompts(a, b, 0.5)
    assert half.text.shape == (1, 6, TINY.text_dim) and half.mask.tolist() == [[True] * 4 + [False] * 2]
    assert torch.equal(half.text[0, 4:], torch.zeros(2, TINY.text_dim))  # b's padding never leaks in


def test_bad_blend_is_named():
    with pytest.raises(ValueError, match="blend_sections"):
        sections_seen("forward", [TimedPrompt(prompt(2, 3), 0.2, 0.7, blend_sections=-1)], prompt(1, 3))
