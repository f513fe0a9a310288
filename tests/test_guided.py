"""Guided video-to-video: sections start from their slice of a guide video, re-noised by `denoise`."""

import pytest
import torch

from framepack_core.packing import make_schedule
from framepack_core.pipeline import DefaultSectionSampler, SamplingSettings, generate
from framepack_core.sampling import noise_to_sigma, sigma_schedule, truncate_sigmas
from test_pipeline import H, W, inputs, model  # noqa: F401  (the section-loop tests' tiny model and inputs)

N, WINDOW = 2, 3
FRAMES = 1 + N * WINDOW


@pytest.fixture(scope="module")
def guided(inputs):  # noqa: F811
    start, embeds, prompt, _ = inputs
    guide = torch.randn(1, 16, FRAMES + 2, H, W, generator=torch.Generator().manual_seed(4))  # the tail is unused
    guide[:, :, :1] = start
    return start, embeds, prompt, guide


def run(model, guided, mode, guide=None, **settings):
    start, embeds, prompt, _ = guided
    settings = SamplingSettings(**{"steps": 4, "seed": 9, **settings})
    with torch.no_grad():
        return generate(model, make_schedule(mode, N, window=WINDOW), start, embeds, prompt, None, settings,
                        guide_latents=guide).latents


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_denoise_one_is_ordinary_generation(model, guided, mode):
    assert torch.equal(run(model, guided, mode, guided[3], denoise=1.0), run(model, guided, mode))


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_each_section_gets_its_own_slice_of_the_guide(guided, mode):
    start, embeds, prompt, guide = guided
    given = []

    def echo(noise, positive, negative, on_step, interrupt, guide):
        given.append(guide)
        return guide  # a "sampler" that returns its start: the video must then be the guide

    video = generate(None, make_schedule(mode, N, window=WINDOW), start, embeds, prompt, None,
                     SamplingSettings(denoise=0.5), guide_latents=guide, sample_section=echo).latents
    assert torch.equal(video, guide[:, :, :FRAMES])
    # inverted samples the temporally last section first
    first = guide[:, :, 1 + (N - 1) * WINDOW:] if mode == "inverted" else guide[:, :, 1:1 + WINDOW]
    assert torch.equal(given[0], first[:, :, :WINDOW])


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_denoise_near_zero_reproduces_the_guide(model, guided, mode):
    guide = guided[3]
    steps = 100
    video = run(model, guided, mode, guide, denoise=0.01, steps=steps)  # one step, at the last sigma
    sigma = sigma_schedule(steps, token_count=WINDOW * H * W // 4)[-2].item()
    error = (video - guide[:, :, :FRAMES]).abs().max().item()
    assert sigma < 0.02 and error < 10 * sigma
    assert error < (run(model, guided, mode, guide, denoise=0.5) - guide[:, :, :FRAMES]).abs().max()  # 2 of 4 steps
    assert torch.equal(run(model, guided, mode, guide, denoise=0.0), guide[:, :, :FRAMES])  # 0 steps: the guide


def test_truncation_keeps_the_tail_of_the_schedule():
    sigmas = sigma_schedule(10, token_count=4096)
    assert torch.equal(truncate_sigmas(sigmas, 1.0), sigmas)
    assert torch.equal(truncate_sigmas(sigmas, 0.3), sigmas[7:])
    assert torch.equal(truncate_sigmas(sigmas, 0.04), sigmas[10:])
    with pytest.raises(ValueError, match="denoise"):
        truncate_sigmas(sigmas, 1.5)


def test_the_sampler_runs_the_remaining_sigmas_from_the_renoised_guide(model, guided):
    """The model sees exactly the tail of the section's schedule, starting at (1-s)*guide + s*noise."""
    _, _, _, guide = guided
    calls = []

    def recording(**kwargs):
        calls.append((kwargs["hidden_states"].clone(), kwargs["timestep"].clone()))
        return model(**kwargs)

    settings = SamplingSettings(steps=10, denoise=0.6, sampler="euler")
    noise = torch.randn(1, 16, WINDOW, H, W, generator=torch.Generator().manual_seed(1))
    part = guide[:, :, 1:1 + WINDOW]
    embeds, prompt = guided[1], guided[2]
    context = make_schedule("forward", 1, window=WINDOW)[0].gather(guided[0], torch.zeros(1, 16, 20, H, W))
    kwargs = dict(encoder_hidden_states=prompt.text, encoder_attention_mask=None, pooled_projections=prompt.pooled,
                  image_embeddings=embeds, guidance=torch.tensor([10000.0]), **context)
    with torch.no_grad():
        DefaultSectionSampler(recording, settings)(noise, kwargs, None, None, None, guide=part)
    expected = sigma_schedule(10, token_count=WINDOW * H * W // 4)[4:]
    assert len(calls) == 6
    assert torch.equal(torch.stack([t for _, t in calls]).flatten(), expected[:-1] * 1000)
    assert torch.equal(calls[0][0], noise_to_sigma(part, noise, expected[0]))


def test_bad_guides_are_named(model, guided):
    start, embeds, prompt, guide = guided
    schedule = make_schedule("inverted", N, window=WINDOW)
    with pytest.raises(ValueError, match="needs 7"):
        generate(model, schedule, start, embeds, prompt, guide_latents=guide[:, :, :5])
    with pytest.raises(ValueError, match="same resolution"):
        generate(model, schedule, start, embeds, prompt, guide_latents=torch.zeros(1, 16, FRAMES, H, W + 2))
    with pytest.raises(ValueError, match="needs guide latents"):
        generate(model, schedule, start, embeds, prompt, settings=SamplingSettings(denoise=0.5))
    with pytest.raises(ValueError, match="cannot be combined"):
        generate(model, schedule, None, embeds, prompt, guide_latents=guide, extend_latents=guide[:, :, :3])
