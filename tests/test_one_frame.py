"""Single-frame inference: the layout documented by musubi-tuner (docs/framepack_1f.md), masks, tokens, sampling."""

import pytest
import torch

from framepack_core.model import FramePackTransformer
from framepack_core.one_frame import Reference, generate_one_frame, one_frame_context, one_frame_layout
from framepack_core.packing import make_schedule
from framepack_core.pipeline import DefaultSectionSampler, Prompt, SamplingSettings, model_inputs
from framepack_core.synthetic import TINY, random_state_dict

H, W = 8, 12


@pytest.fixture(scope="module")
def model():
    m = FramePackTransformer(TINY).eval().requires_grad_(False)
    m.load_state_dict(random_state_dict(TINY, seed=5))
    return m


def latent(seed):
    return torch.randn(1, 16, 1, H, W, generator=torch.Generator().manual_seed(seed))


def test_default_layout_is_the_documented_one():
    # documented defaults: target = latent_window_size, post (zeros) at window + 1, 2x / 4x zeros after it
    layout = one_frame_layout()
    assert layout.target_index == 9
    assert layout.clean_indices == (0, 10)
    assert layout.indices_2x == (11, 12)
    assert layout.indices_4x == tuple(range(13, 29))


def test_default_layout_is_the_first_inverted_section_cut_to_its_last_frame():
    section = make_schedule("inverted", 1, window=9)[0]
    layout = one_frame_layout()
    assert layout.target_index == section.noisy_indices[-1]
    assert layout.clean_indices == section.clean.indices
    assert layout.indices_2x == section.history_2x.indices
    assert layout.indices_4x == section.history_4x.indices


def test_kisekaeichi_layout():
    # the documented kisekaeichi example: target_index=1, control_index=0;10, no_post, no_2x, no_4x
    layout = one_frame_layout([10], target_index=1, post=False, use_2x=False, use_4x=False)
    assert (layout.target_index, layout.clean_indices, layout.indices_2x, layout.indices_4x) == (1, (0, 10), (), ())
    # 1f-mc: target 9, controls 0;1, no_2x, no_4x (post stays, after the controls)
    layout = one_frame_layout([1], target_index=9, use_2x=False, use_4x=False)
    assert layout.clean_indices == (0, 1, 10)


def test_context_places_latents_and_applies_masks():
    start, ref = latent(1), latent(2)
    start_mask = torch.zeros(H, W)
    start_mask[:, : W // 2] = 1
    ref_mask = torch.rand(H * 8, W * 8, generator=torch.Generator().manual_seed(3))  # pixel-sized: area-resized
    layout = one_frame_layout([10], target_index=5)
    ctx = one_frame_context(layout, start, [Reference(ref, 10, ref_mask)], start_mask)
    assert ctx["latent_indices"].tolist() == [5]
    assert ctx["clean_latent_indices"].tolist() == [0, 10, 10]
    clean = ctx["clean_latents"]
    assert clean.shape == (1, 16, 3, H, W)
    assert torch.equal(clean[:, :, 0], start[:, :, 0] * start_mask)
    assert torch.equal(clean[:, :, 0, :, W // 2:], torch.zeros(1, 16, H, W - W // 2))  # masked out: zeros
    pooled = ref_mask.reshape(H, 8, W, 8).mean(dim=(1, 3))  # area resize = mean over each 8x8 block
    assert torch.allclose(clean[:, :, 1], ref[:, :, 0] * pooled, atol=1e-6)
    assert torch.equal(clean[:, :, 2], torch.zeros(1, 16, H, W))  # post
    assert ctx["clean_latents_2x"].shape == (1, 16, 2, H, W) and not ctx["clean_latents_2x"].any()
    assert ctx["clean_latents_4x"].shape == (1, 16, 16, H, W) and not ctx["clean_latents_4x"].any()
    assert ctx["clean_latent_4x_indices"].tolist() == list(range(13, 29))
    off = one_frame_context(one_frame_layout(post=False, use_2x=False, use_4x=False), start)
    assert torch.equal(off["clean_latents"], start)
    assert off["clean_latents_2x"] is None and off["clean_latent_4x_indices"] is None


@pytest.mark.parametrize("levels", [(True, True, True), (False, False, False), (True, False, True)])
def test_token_count_matches_the_packed_sequence(model, levels):
    post, use_2x, use_4x = levels
    layout = one_frame_layout([10], target_index=3, post=post, use_2x=use_2x, use_4x=use_4x)
    ctx = one_frame_context(layout, latent(1), [Reference(latent(2), 10)])
    noisy = torch.zeros(1, 16, 1, H, W)
    context = [(1, ctx["clean_latents"], ctx["clean_latent_indices"]),
               (2, ctx["clean_latents_2x"], ctx["clean_latent_2x_indices"]),
               (4, ctx["clean_latents_4x"], ctx["clean_latent_4x_indices"])]
    tokens, _ = model.pack_tokens(noisy, ctx["latent_indices"], context, torch.float32)
    counts = layout.tokens(H, W)
    assert tokens.shape[1] == sum(counts)
    # 1x: (2 or 3 frames) * 4*6; 2x: 1 * 2*3; 4x: 4 * 1*2 (replicate-padded); noisy: 4*6
    assert counts == ((2 + post) * 24, 6 * use_2x, 8 * use_4x, 24)


def test_generate_one_frame_samples_the_layout(model):
    g = torch.Generator().manual_seed(4)
    embeds = torch.randn(1, 9, TINY.image_dim, generator=g)
    prompt = Prompt(torch.randn(1, 5, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g))
    settings = SamplingSettings(steps=4, seed=7)
    start, ref, mask = latent(1), latent(2), (torch.rand(H, W, generator=g) > 0.5).float()
    kwargs = dict(references=[Reference(ref, 10, mask)], target_index=2, post=False, use_2x=False)
    with torch.no_grad():
        frame = generate_one_frame(model, start, embeds, prompt, None, settings, **kwargs)
        again = generate_one_frame(model, start, embeds, prompt, None, settings, **kwargs)
        # the same by hand: the documented context and one section of the original's sampler on it
        ctx = one_frame_context(one_frame_layout([10], 2, post=False, use_2x=False), start, kwargs["references"])
        noise = torch.randn(1, 16, 1, H, W, generator=torch.Generator().manual_seed(7))
        expected = DefaultSectionSampler(model, settings)(
            noise, model_inputs(prompt, embeds, ctx, settings, torch.float32, torch.device("cpu")), None, None, None)
    assert frame.shape == (1, 16, 1, H, W) and torch.isfinite(frame).all()
    assert torch.equal(frame, again)
    assert torch.equal(frame, expected)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="target_index"):
        one_frame_layout(target_index=-1)
    with pytest.raises(ValueError, match="reference"):
        one_frame_context(one_frame_layout(), latent(1), [Reference(latent(2), 10)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        one_frame_context(one_frame_layout(), latent(1), start_mask=torch.full((H, W), 2.0))
    with pytest.raises(ValueError, match="same resolution"):
        one_frame_context(one_frame_layout([10]), latent(1), [Reference(torch.zeros(1, 16, 1, H, H), 10)])


def test_a_nan_prediction_stops_the_single_frame(model):
    """A corrupt weight makes the prediction NaN: the frame is not returned black, the error names the weight."""
    from framepack_core.checks import NonFiniteError

    g = torch.Generator().manual_seed(4)
    embeds = torch.randn(1, 9, TINY.image_dim, generator=g)
    prompt = Prompt(torch.randn(1, 5, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g))
    corrupt = FramePackTransformer(TINY).eval().requires_grad_(False)
    state = random_state_dict(TINY, seed=5)
    state["proj_out.weight"][0, 0] = float("nan")
    corrupt.load_state_dict(state)
    with torch.no_grad(), pytest.raises(NonFiniteError, match=r"single frame.*step 1 of 2.*proj_out.weight"):
        generate_one_frame(corrupt, latent(1), embeds, prompt, None, SamplingSettings(steps=2))


def test_host_hooks_route_every_call(model):
    """model_call and transformer_options reach every transformer call, as in generate()."""
    g = torch.Generator().manual_seed(4)
    embeds = torch.randn(1, 9, TINY.image_dim, generator=g)
    prompt = Prompt(torch.randn(1, 5, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g))
    settings, seen = SamplingSettings(steps=3), []

    def call(transformer_options, **kwargs):
        seen.append((transformer_options["tag"], transformer_options["sigmas"].item()))
        return model(transformer_options=transformer_options, **kwargs)

    with torch.no_grad():
        plain = generate_one_frame(model, latent(1), embeds, prompt, None, settings)
        hooked = generate_one_frame(model, latent(1), embeds, prompt, None, settings, model_call=call,
                                    transformer_options={"tag": "x"})
    assert torch.equal(plain, hooked) and [t for t, _ in seen] == ["x"] * 3
    assert [s for _, s in seen] == sorted((s for _, s in seen), reverse=True)


def test_a_level_the_weights_lack_is_named_before_sampling(model):
    """Weights without a 4x embedder: the default layout is refused up front, naming the switch; no_4x runs."""
    import dataclasses

    no_4x = dataclasses.replace(TINY, clean_kernels=(1, 2))
    with pytest.raises(ValueError, match="no 4x clean-latent embedder; switch use_4x off"):
        one_frame_layout().check_weights(no_4x)
    one_frame_layout(use_4x=False).check_weights(no_4x)
    one_frame_layout().check_weights(TINY)
