"""Single frame, guided video-to-video and prompt blending through the real nodes in a real ComfyUI (CPU)."""

import sys

import pytest
import torch

from test_end_to_end import (H, LATENT_FRAMES, PIXEL_FRAMES, STEPS, W, checkpoint, load_model,  # noqa: F401
                             conditioning, node_defaults, pack, run, sample, start_latent, vae, vision_output)


@pytest.fixture(scope="module")
def model(pack, checkpoint):  # noqa: F811
    return load_model(pack, checkpoint)


def encode(comfy, vae, frames, seed):  # noqa: F811
    pixels = torch.rand(frames, 8 * H, 8 * W, 3, generator=torch.Generator().manual_seed(seed))
    return run(comfy.nodes.NODE_CLASS_MAPPINGS["VAEEncode"], pixels=pixels, vae=vae)[0]


def single_frame(pack, model, **overrides):  # noqa: F811
    cls = pack["FramePackSingleFrame"]
    inputs = {**node_defaults(cls), "model": model, "positive": conditioning(), "negative": conditioning(1),
              "image_embeds": vision_output(), "start_latent": start_latent(), "steps": STEPS, "seed": 3, **overrides}
    return run(cls, **inputs)[0]


def test_single_frame_node_gives_a_latent_that_vae_decode_turns_into_an_image(comfy, pack, model, vae):  # noqa: F811
    reference = encode(comfy, vae, 1, seed=5)
    mask = torch.zeros(1, 8 * H, 8 * W)  # a ComfyUI MASK at pixel size, e.g. from LoadImageMask
    mask[:, :, : 4 * W] = 1
    kwargs = dict(target_index=1, use_post=False, use_2x=False, use_4x=False, reference_latent=reference,
                  reference_index=10, reference_mask=mask, start_mask=1 - mask)
    latent = single_frame(pack, model, **kwargs)
    assert latent["samples"].shape == (1, 16, 1, H, W) and torch.isfinite(latent["samples"]).all()
    assert torch.equal(single_frame(pack, model, **kwargs)["samples"], latent["samples"])

    # the node is the engine's generate_one_frame on model-space latents
    engine = sys.modules[pack["FramePackSingleFrame"].__module__]
    transformer, scale = model.model.diffusion_model, model.model.latent_format.scale_factor
    settings = engine.SamplingSettings(steps=STEPS, seed=3)
    expected = engine.generate_one_frame(
        transformer, start_latent()["samples"] * scale, vision_output()["last_hidden_state"],
        engine.prompt_from_conditioning(conditioning(), "positive", transformer.config), None, settings,
        references=[engine.Reference(reference["samples"].float() * scale, 10, mask[0])], start_mask=1 - mask[0],
        target_index=1, post=False, use_2x=False, use_4x=False)
    torch.testing.assert_close(latent["samples"], expected / scale, rtol=0, atol=0)
    assert not torch.equal(single_frame(pack, model, target_index=5)["samples"], latent["samples"])

    image = run(comfy.nodes.NODE_CLASS_MAPPINGS["VAEDecode"], samples=latent, vae=vae)[0]
    assert image.shape == (1, 8 * H, 8 * W, 3) and image.min() >= 0 and image.max() <= 1

    with pytest.raises(ValueError, match="reference_mask is connected but reference_latent is not"):
        single_frame(pack, model, reference_mask=mask)
    with pytest.raises(ValueError, match="reference_latent has 2 latent frames"):
        single_frame(pack, model, reference_latent={"samples": torch.zeros(1, 16, 2, H, W)})
    with pytest.raises(ValueError, match="holds 2 masks"):
        single_frame(pack, model, start_mask=mask.repeat(2, 1, 1))


def test_sampler_follows_a_guide_video(comfy, pack, model, vae):  # noqa: F811
    guide = encode(comfy, vae, PIXEL_FRAMES, seed=6)
    assert guide["samples"].shape == (1, 16, LATENT_FRAMES, H, W)
    plain = sample(pack, model)["samples"]
    assert torch.equal(sample(pack, model, guide_latent=guide, denoise=1.0)["samples"], plain)
    kept = sample(pack, model, guide_latent=guide, denoise=0.0)["samples"]  # no steps left: the guide itself
    torch.testing.assert_close(kept[:, :, 1:], guide["samples"][:, :, 1:].float())
    half = sample(pack, model, guide_latent=guide, denoise=0.5)["samples"]
    assert torch.isfinite(half).all() and not torch.allclose(half, plain) and not torch.allclose(half, kept)

    with pytest.raises(ValueError, match="needs guide latents to follow"):
        sample(pack, model, denoise=0.5)
    with pytest.raises(ValueError, match="load a longer guide video"):
        sample(pack, model, guide_latent={"samples": guide["samples"][:, :, :3]}, denoise=0.5)


def test_timed_prompt_blend_reaches_the_sampler(pack, model):  # noqa: F811
    cls = pack["FramePackTimedPrompt"]
    timed = run(cls, conditioning=conditioning(4), start_seconds=0.2, end_seconds=10.0)[0]
    blended = run(cls, conditioning=conditioning(4), start_seconds=0.2, end_seconds=10.0, blend_sections=1)[0]
    assert blended[0][3] == 1
    abrupt = sample(pack, model, timed_prompts=timed)["samples"]
    smooth = sample(pack, model, timed_prompts=blended)["samples"]
    assert torch.isfinite(smooth).all() and not torch.allclose(smooth, abrupt)
