"""Fidelity: ``generate()`` reproduces diffusers' ``HunyuanVideoFramepackPipeline`` where the two coincide.

Both run the same tiny random transformer (ours through the real loader from a saved .safetensors file,
diffusers' ``HunyuanVideoFramepackTransformer3DModel`` from the same state dict) in fp32 on CPU, from the
same start latent, SigLIP image embeddings, precomputed text embeddings and seed. Compared: the latents
after every section (diffusers' ``output_type="latent"`` returns, per section, the real history so far:
``history_latents[:, :, :total]`` when inverted, ``[..., -total:]`` when vanilla; the last entry is our
``GenerationResult.latents``, temporal order, frame 0 = the start latent).

Covered: inverted anti-drifting (diffusers ``"inverted_anti_drifting"``) and F1 (``"vanilla"``, our
"forward" schedule) with 1, 2 and 5 sections (5 exercises the [3, 2, 2, 1, 0] paddings), window 3,
Euler sampling (diffusers' ``FlowMatchEulerDiscreteScheduler``), the token-count sigma shift and an
explicit shift, true CFG with a negative prompt, and an end frame (inverted). Pieces checked on their own:
the sigma schedules (with the ln 7 cap) and the per-section noise draws.

How the oracle is driven (diffusers needs more than the transformer):
- scheduler: ``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)``; its defaults already are
  base/max_image_seq_len 256/4096 and base/max_shift 0.5/1.15, which the pipeline reads for mu.
- ``encode_image`` always runs: a tiny random ``transformers.SiglipVisionModel`` (hidden size = our
  image_dim) and a ``SiglipImageProcessor`` for its image size. We feed ``generate()`` the embeddings
  ``pipe.encode_image`` computes from the same preprocessed image.
- ``vae``: a tiny random ``AutoencoderKLHunyuanVideo``; it is never run (``output_type="latent"`` and the
  start latent is passed as ``image_latents``), but ``__call__`` reads ``self.vae.dtype``.
- ``check_inputs`` forbids ``image`` together with ``image_latents``, yet ``encode_image`` needs the image;
  the only other way in is VAE-encoding the image, which draws from the seeded generator before the first
  section's noise. We wrap ``check_inputs`` to validate as if ``image`` were absent; nothing else changes.
- end frame: ``last_image_latents`` is accepted but never used by ``__call__`` (the last image is always
  VAE-encoded, again drawing from the generator), so for that test ``prepare_image_latents`` returns the
  given end latent instead of encoding.
- weights: random, but with norm scales near 1 (see the ``state`` fixture), so that RoPE positions and
  hence the packing layout visibly matter; negative controls check that a wrong padding schedule, a
  dropped negative prompt or a dropped end frame each move the result far outside the tolerance.

Differences from diffusers 0.42.1 found while writing this (not tested, by design):
1. Section count: diffusers ``max(1, ceil(num_frames / ((window - 1) * 4 + 1)))`` from a frame count;
   ours (the original's) ``max(round(seconds * 30 / (window * 4)), 1)`` (e.g. window 9, 5 s: 4 sections
   for us, 5 for diffusers with num_frames=150).
2. Sigma shift: diffusers computes mu from the token count (capped at ln 7) but the scheduler applies it
   only with ``use_dynamic_shifting=True``; otherwise mu is silently ignored and the static ``shift``
   config is used (default 1.0: no shift at all). A static shift s equals our explicit ``shift=s``.
3. Euler step: diffusers ``x + (s_next - s) * v``; ours ``x + (s_next - s) * (x - x0) / s`` with
   ``x0 = x - v * s``: algebraically the same, rounding differs (~1e-7 relative).
4. Sigmas: diffusers takes ``np.linspace`` in float64 then float32; ours (the original's) ``torch.linspace``
   in float32: equal to within 1 ulp, not always bit-identical (3 steps: 0.66666669 vs 0.66666663), which
   moves the 3-step results by ~3e-6 relative (4 steps: ~1e-7).
5. End image: diffusers 0.42.1 computes ``last_image_embeds = (image_embeds + last_image_embeds) / 2`` but
   never uses it (a diffusers bug; the transformer always gets the start image's embeddings). Ours
   interpolates per section with ``end_image_embeddings`` (start -> end) and uses the start's without
   it, which is what diffusers does in effect; the test passes no end embeddings. The end latent's
   placement (the 1x slot after the window of the first sampled section) coincides.
6. True CFG: diffusers only when ``true_cfg_scale > 1`` and a negative prompt is given (otherwise silently
   off); ours whenever ``cfg != 1`` (cfg < 1 too) and a missing negative raises; ours also has
   ``cfg_rescale``. The combination ``neg + cfg * (pos - neg)`` is the same.
7. Text: ours crops text embeddings to 512 tokens; diffusers passes them as given.
8. Distilled guidance default: diffusers 6.0, ours 10.0 (the original's); the tests pass it explicitly.
9. Inputs: diffusers' ``image_latents`` cannot replace ``image`` (``check_inputs`` rejects both together,
   ``encode_image`` needs the image) and ``last_image_latents`` is ignored (see above).
10. Seeds: diffusers VAE-encodes ``image``/``last_image`` with ``latent_dist.sample(generator)`` from the
   same generator as the section noise, so with images (not latents) the same seed gives different noise
   than ours.
11. Sampler: diffusers has only Euler; ours defaults to UniPC (the original's), compared elsewhere.
"""

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline
from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_video_framepack as diffusers_framepack
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from oracle import diffusers_reference, relative_error
from framepack_core.loading import load_transformer
from framepack_core.packing import make_schedule
from framepack_core.pipeline import DefaultSectionSampler, Prompt, SamplingSettings, generate
from framepack_core.sampling import sigma_schedule
from framepack_core.synthetic import TINY, random_state_dict, save_single_file

TOLERANCE = 1e-4
FAR = 10 * TOLERANCE  # negative controls must land at least this far off
WINDOW = 3
SIZE = 64  # pixels -> 8x8 latent
LATENT = SIZE // 8
GUIDANCE = 10.0
SEED = 1234
MODES = {"inverted": "inverted_anti_drifting", "forward": "vanilla"}


# ---------------------------------------------------------------------------------------------
# the oracle


def _image_encoder():
    config = SiglipVisionConfig(hidden_size=TINY.image_dim, intermediate_size=24, num_hidden_layers=1,
                                num_attention_heads=2, image_size=24, patch_size=8)
    torch.manual_seed(0)
    encoder = SiglipVisionModel(config).eval().requires_grad_(False)
    return encoder, SiglipImageProcessor(size={"height": 24, "width": 24})


def _tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo(block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=2,
                                     mid_block_add_attention=False).eval().requires_grad_(False)


def _pipeline(transformer, scheduler, image_encoder, feature_extractor, vae):
    pipe = HunyuanVideoFramepackPipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
        vae=vae, scheduler=scheduler, image_encoder=image_encoder, feature_extractor=feature_extractor)
    pipe.set_progress_bar_config(disable=True)
    original = pipe.check_inputs
    signature = inspect.signature(original)

    def check_inputs(*args, **kwargs):  # image + image_latents: validate as if only the latents were given
        bound = signature.bind(*args, **kwargs)
        bound.arguments["image"] = None
        return original(*bound.args, **bound.kwargs)

    pipe.check_inputs = check_inputs
    return pipe


@pytest.fixture(scope="module")
def state():
    """The tiny random weights, with norm scales near 1 as in trained checkpoints.

    With every weight at scale 0.1 the RMS norms shrink q and k tenfold each, attention is nearly uniform and
    RoPE positions hardly matter: a wrong padding schedule moves the result by < 1e-4. Norm scales near 1
    make the comparison sensitive to the layout (see the negative control at the end).
    """
    state = random_state_dict(TINY, seed=1)
    gen = torch.Generator().manual_seed(5)
    for key, value in state.items():
        if value.ndim == 1 and "norm" in key and key.endswith("weight"):
            state[key] = 1.0 + 0.1 * torch.randn(value.shape, generator=gen)
    return state


@pytest.fixture(scope="module")
def oracle(state):
    reference = diffusers_reference(TINY, state)
    encoder, processor = _image_encoder()
    vae = _tiny_vae()

    def build(scheduler=None):
        scheduler = scheduler or FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        return _pipeline(reference, scheduler, encoder, processor, vae)

    return build


@pytest.fixture(scope="module")
def ours(state, tmp_path_factory):
    path = save_single_file(tmp_path_factory.mktemp("ckpt") / "framepack_tiny.safetensors", state)
    return load_transformer(path, compute_dtype=torch.float32)


def _random_image(seed):
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(SIZE, SIZE, 3, generator=gen) * 255).to(torch.uint8).numpy())


def _prompt(gen, tokens, valid):
    mask = torch.arange(tokens)[None] < valid
    text = torch.randn(1, tokens, TINY.text_dim, generator=gen) * mask[..., None]
    return Prompt(text, torch.randn(1, TINY.pooled_dim, generator=gen), mask)


@pytest.fixture(scope="module")
def inputs(oracle):
    pipe = oracle()
    gen = torch.Generator().manual_seed(7)
    image, end_image = _random_image(1), _random_image(2)  # the end image only feeds diffusers' unused mean

    def embed(img):  # what __call__ computes: preprocess to [-1, 1], then encode_image
        return pipe.encode_image(pipe.video_processor.preprocess(img, SIZE, SIZE), device=torch.device("cpu"))

    return dict(
        image=image, embeds=embed(image), start=torch.randn(1, 16, 1, LATENT, LATENT, generator=gen),
        end_image=end_image, end=torch.randn(1, 16, 1, LATENT, LATENT, generator=gen),
        prompt=_prompt(gen, 12, 7), negative=_prompt(gen, 9, 4),
    )


def run_diffusers(pipe, inputs, mode, sections, steps, cfg=1.0, end_frame=False):
    """diffusers' latents after every section (each: the real history so far, temporal order)."""
    prompt, negative = inputs["prompt"], inputs["negative"]
    kwargs = {}
    if cfg != 1.0:
        kwargs = dict(true_cfg_scale=cfg, negative_prompt_embeds=negative.text,
                      negative_pooled_prompt_embeds=negative.pooled,
                      negative_prompt_attention_mask=negative.mask)
    if end_frame:
        kwargs["last_image"] = inputs["end_image"]
        encode = pipe.prepare_image_latents

        def prepare_image_latents(image, dtype=None, device=None, generator=None, latents=None):
            # the end latent stands in for the unused `last_image_latents` (no VAE, no generator draw)
            return encode(image, dtype=dtype, device=device, generator=generator,
                          latents=inputs["end"] if latents is None else latents)

        pipe.prepare_image_latents = prepare_image_latents
    frames_per_section = (WINDOW - 1) * 4 + 1
    (history,) = pipe(
        image=inputs["image"], image_latents=inputs["start"], prompt_embeds=prompt.text,
        pooled_prompt_embeds=prompt.pooled, prompt_attention_mask=prompt.mask, height=SIZE, width=SIZE,
        num_frames=sections * frames_per_section, latent_window_size=WINDOW, num_inference_steps=steps,
        guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent",
        return_dict=False, sampling_type=MODES[mode], **kwargs)
    assert len(history) == sections
    return history


def run_ours(model, inputs, mode, sections, steps, cfg=1.0, shift=None, end_frame=False, **schedule_kwargs):
    """Our final latents and the video latents after every section."""
    snapshots = []
    # with an end frame diffusers still conditions every section on the start image's embeddings (it
    # computes the start/end mean but never uses it), which is ours without end_image_embeddings
    extra = {"end_latent": inputs["end"]} if end_frame else {}
    settings = SamplingSettings(steps=steps, seed=SEED, distilled_guidance=GUIDANCE, cfg=cfg, shift=shift,
                                sampler="euler")
    result = generate(model, make_schedule(mode, sections, window=WINDOW, **schedule_kwargs), inputs["start"],
                      inputs["embeds"], inputs["prompt"], inputs["negative"] if cfg != 1.0 else None, settings,
                      on_section=lambda section, video: snapshots.append(video.clone()), **extra)
    return result, snapshots


def _compare(result, snapshots, history):
    """Final latents and the video after every section, within TOLERANCE (relative L2)."""
    assert len(snapshots) == len(history)
    for i, (ours, theirs) in enumerate(zip(snapshots, history)):
        assert ours.shape == theirs.shape, (i, ours.shape, theirs.shape)
    assert result.latents.shape == history[-1].shape
    errors = [relative_error(ours, theirs) for ours, theirs in zip(snapshots, history)]
    final = relative_error(result.latents, history[-1])
    assert final <= TOLERANCE and max(errors) <= TOLERANCE, (final, errors)


# ---------------------------------------------------------------------------------------------
# the pieces


@pytest.mark.parametrize("steps", [1, 3, 4, 25])
def test_sigma_schedule_matches_scheduler(steps):
    """Our sigmas are the scheduler's for the pipeline's mu (token-count shift capped at ln 7) and for a
    static shift, to within 1 ulp (diffusers' linspace is float64 rounded to float32, ours float32)."""
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    config = scheduler.config
    assert (config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift) == \
        (256, 4096, 0.5, 1.15)
    base = np.linspace(1.0, 0.0, steps + 1)[:-1]  # as __call__ builds them
    for tokens in (48, 256, 1000, 4096, 8798, 8799, 20000, 10**6):  # the ln 7 cap starts near 8799 tokens
        mu = diffusers_framepack.calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len,
                                                 config.base_shift, config.max_shift)
        scheduler.set_timesteps(steps, sigmas=base, mu=min(mu, math.log(7.0)))
        torch.testing.assert_close(sigma_schedule(steps, token_count=tokens), scheduler.sigmas, rtol=0, atol=2.5e-7)
    for shift in (1.0, 3.0, 7.0):
        static = FlowMatchEulerDiscreteScheduler(shift=shift)
        static.set_timesteps(steps, sigmas=base, mu=0.5)  # mu is ignored without dynamic shifting
        torch.testing.assert_close(sigma_schedule(steps, shift=shift), static.sigmas, rtol=0, atol=2.5e-7)


@pytest.mark.parametrize("mode", list(MODES))
def test_section_noise_matches_prepare_latents(oracle, ours, inputs, mode):
    """Each section's noise is the pipeline's prepare_latents draw from the same seeded CPU generator."""
    pipe, sections = oracle(), 3
    drawn = []
    settings = SamplingSettings(steps=1, seed=SEED, sampler="euler")
    sampler = DefaultSectionSampler(ours, settings)

    def sample_section(noise, *args):
        drawn.append(noise.clone())
        return sampler(noise, *args)

    generate(ours, make_schedule(mode, sections, window=WINDOW), inputs["start"], inputs["embeds"],
             inputs["prompt"], settings=settings, sample_section=sample_section)
    generator = torch.Generator("cpu").manual_seed(SEED)
    expected = [pipe.prepare_latents(1, 16, SIZE, SIZE, (WINDOW - 1) * 4 + 1, dtype=torch.float32,
                                     device=torch.device("cpu"), generator=generator) for _ in range(sections)]
    assert len(drawn) == sections
    for ours_noise, theirs in zip(drawn, expected):
        assert torch.equal(ours_noise, theirs)
    # and randn_tensor is a plain torch.randn from the generator
    generator = torch.Generator("cpu").manual_seed(SEED)
    assert torch.equal(randn_tensor((1, 16, WINDOW, LATENT, LATENT), generator=generator, device=torch.device("cpu"),
                                    dtype=torch.float32), drawn[0])


# ---------------------------------------------------------------------------------------------
# whole generations


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("sections,steps", [(1, 4), (2, 3), (5, 4)])
def test_generate_matches_diffusers(oracle, ours, inputs, mode, sections, steps):
    history = run_diffusers(oracle(), inputs, mode, sections, steps)
    result, snapshots = run_ours(ours, inputs, mode, sections, steps)
    assert result.latents.shape == (1, 16, 1 + sections * WINDOW, LATENT, LATENT)
    assert torch.equal(result.latents[:, :, :1], inputs["start"])
    _compare(result, snapshots, history)


@pytest.mark.parametrize("mode", list(MODES))
def test_true_cfg_matches_diffusers(oracle, ours, inputs, mode):
    history = run_diffusers(oracle(), inputs, mode, 2, 3, cfg=3.0)
    result, snapshots = run_ours(ours, inputs, mode, 2, 3, cfg=3.0)
    _compare(result, snapshots, history)
    # the negative prompt really took part: without CFG the result is far away
    assert relative_error(run_ours(ours, inputs, mode, 2, 3)[0].latents, history[-1]) > FAR


@pytest.mark.parametrize("mode", list(MODES))
def test_explicit_shift_matches_static_scheduler_shift(oracle, ours, inputs, mode):
    """Our ``shift=s`` is the scheduler's static shift (use_dynamic_shifting=False ignores the pipeline's mu)."""
    pipe = oracle(FlowMatchEulerDiscreteScheduler(shift=3.0))
    history = run_diffusers(pipe, inputs, mode, 2, 3)
    result, snapshots = run_ours(ours, inputs, mode, 2, 3, shift=3.0)
    _compare(result, snapshots, history)


@pytest.mark.parametrize("sections", [2, 5])
def test_end_frame_matches_diffusers_last_image(oracle, ours, inputs, sections):
    history = run_diffusers(oracle(), inputs, "inverted", sections, 3, end_frame=True)
    result, snapshots = run_ours(ours, inputs, "inverted", sections, 3, end_frame=True)
    _compare(result, snapshots, history)
    # the end latent really took part: without it the result is far away
    assert relative_error(run_ours(ours, inputs, "inverted", sections, 3)[0].latents, history[-1]) > FAR


def test_comparison_is_sensitive_to_the_padding_schedule(oracle, ours, inputs):
    """Negative control: with plain paddings [4, 3, 2, 1, 0] instead of [3, 2, 2, 1, 0] the 5-section
    inverted run lands > 10x the tolerance off (measured ~1.2e-2), so the matches above do pin the layout."""
    history = run_diffusers(oracle(), inputs, "inverted", 5, 4)
    result, _ = run_ours(ours, inputs, "inverted", 5, 4, anti_drift_padding=False)
    assert relative_error(result.latents, history[-1]) > FAR
