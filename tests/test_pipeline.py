"""The section loop: the original's latents, seeding, per-section settings, callbacks and bad input."""

import pytest
import torch

from framepack_core.decode import decode_sections
from framepack_core.demo import preview_decode
from framepack_core.model import FramePackTransformer
from framepack_core.packing import make_schedule
from framepack_core.pipeline import Prompt, SamplingSettings, TimedPrompt, generate
from framepack_core.synthetic import TINY, random_state_dict

H = W = 8


@pytest.fixture(scope="module")
def model():
    m = FramePackTransformer(TINY).eval().requires_grad_(False)
    m.load_state_dict(random_state_dict(TINY, seed=11))
    return m


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    start = torch.randn(1, 16, 1, H, W, generator=g)
    embeds = torch.randn(1, 9, TINY.image_dim, generator=g)
    positive = Prompt(torch.randn(1, 6, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g))
    negative = Prompt(torch.randn(1, 4, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g))
    return start, embeds, positive, negative


def run(model, inputs, mode="inverted", n=2, window=3, **kw):
    start, embeds, positive, negative = inputs
    settings = SamplingSettings(**{"steps": 3, **kw.pop("settings", {})})
    with torch.no_grad():
        return generate(model, make_schedule(mode, n, window=window), start, embeds, positive, negative, settings, **kw)


# Values taken by running the original FramePack (its model class, sampler and demo section loop) beside
# this project on the same random weights and inputs: abs-sum of the latents and 8 evenly spaced values.
ORIGINAL = [
    (dict(n=5, settings=dict(steps=3, seed=3)),
     16619.916, [-0.076644, -1.1947, -3.073755, 0.255731, -1.436246, -0.128855, -2.05112, -0.69806]),
    (dict(n=2, settings=dict(steps=4, seed=5, cfg=3.0, cfg_rescale=0.7, shift=3.0)),
     7425.082, [-0.076644, 2.29797, -0.390653, -1.432524, -1.631518, 1.991187, -1.171925, -2.110141]),
    (dict(n=2, mode="forward", settings=dict(steps=12, seed=8, teacache_threshold=0.15)),
     6874.6089, [-0.076644, -1.268708, -1.274778, 0.923521, -1.631518, -0.51625, 0.388662, 1.581167]),
]


@pytest.mark.parametrize("kwargs, abs_sum, values", ORIGINAL, ids=["inverted-5", "cfg-rescale-shift", "f1-teacache"])
def test_matches_values_from_the_original(model, inputs, kwargs, abs_sum, values):
    latents = run(model, inputs, **kwargs).latents
    flat = latents.flatten()
    picked = flat[torch.linspace(0, flat.numel() - 1, 8).long()]
    assert latents.abs().sum().item() == pytest.approx(abs_sum, rel=1e-4)
    assert torch.allclose(picked, torch.tensor(values), rtol=1e-4, atol=1e-5)


def test_same_seed_same_video_and_sections(model, inputs):
    a, b = run(model, inputs, n=3), run(model, inputs, n=3)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, run(model, inputs, n=3, settings=dict(seed=1)).latents)
    assert a.sections == [(0, 4), (4, 7), (7, 10)] and a.latents.shape == (1, 16, 10, H, W)
    assert torch.equal(a.latents[:, :, :1], inputs[0])  # the video starts on the start image


class Recorder:
    """A sample_section plug that records what each section was given and returns its noise."""

    def __init__(self):
        self.calls = []

    def __call__(self, noise, positive, negative, on_step, interrupt):
        self.calls.append(dict(noise=noise, positive=positive, negative=negative))
        on_step(0, 1, noise, noise)
        return noise


def test_noise_comes_from_one_generator_in_sampling_order(model, inputs):
    rec = Recorder()
    run(model, inputs, n=3, settings=dict(seed=42), sample_section=rec)
    g = torch.Generator().manual_seed(42)
    for call in rec.calls:
        assert torch.equal(call["noise"], torch.randn(1, 16, 3, H, W, generator=g))


def test_timed_prompts_pick_by_section_start(model, inputs):
    rec = Recorder()
    other = Prompt(torch.ones(1, 3, TINY.text_dim), torch.ones(1, TINY.pooled_dim))
    # window 3 at 30 fps: sections start at pixel frames 1, 13, 25 -> 0.033 s, 0.433 s, 0.833 s
    run(model, inputs, n=3, sample_section=rec, timed_prompts=[TimedPrompt(other, 0.4, 0.5)])
    used = [c["positive"]["encoder_hidden_states"].shape[1] for c in rec.calls]  # sampling order: last first
    assert used == [6, 3, 6]


def test_negative_prompt_only_with_real_cfg(model, inputs):
    rec = Recorder()
    run(model, inputs, sample_section=rec)
    assert all(c["negative"] is None for c in rec.calls)
    run(model, inputs, sample_section=rec, settings=dict(cfg=2.0))
    assert rec.calls[-1]["negative"]["encoder_hidden_states"].shape[1] == 4


def test_end_frame_and_keyframes_guide_the_frame_after_the_window(model, inputs):
    rec = Recorder()
    end, key = torch.full((1, 16, 1, H, W), 7.0), torch.full((1, 16, 1, H, W), -5.0)
    run(model, inputs, n=3, sample_section=rec, end_latent=end, keyframes={1: key})
    clean = [c["positive"]["clean_latents"] for c in rec.calls]  # [start, frame after the window]
    assert torch.equal(clean[0][:, :, 1:], end)  # sampled first = temporally last section
    assert torch.equal(clean[1][:, :, 1:], key)  # video section 1
    assert not torch.equal(clean[2][:, :, 1:], key) and torch.equal(clean[2][:, :, :1], inputs[0])


def test_image_embeddings_move_from_start_to_end(model, inputs):
    rec = Recorder()
    end_embeds = torch.zeros_like(inputs[1])
    run(model, inputs, n=3, sample_section=rec, end_image_embeddings=end_embeds)
    got = [c["positive"]["image_embeddings"] for c in rec.calls]  # sampling order: video sections 2, 1, 0
    assert torch.allclose(got[2], inputs[1]) and torch.allclose(got[0], end_embeds)
    assert torch.allclose(got[1], inputs[1] * 0.5)


def test_progress_callbacks_and_interrupt(model, inputs):
    steps, sections = [], []
    run(model, inputs, n=2, on_step=lambda *a: steps.append(a[:4]),
        on_section=lambda s, v: sections.append((s.video_index, v.shape[2])))
    assert steps == [(0, 2, 0, 3), (0, 2, 1, 3), (0, 2, 2, 3), (1, 2, 0, 3), (1, 2, 1, 3), (1, 2, 2, 3)]
    assert sections == [(1, 3), (0, 7)]

    class Stop(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        run(model, inputs, n=2, interrupt=interrupt)


def test_extending_a_video(model, inputs):
    video = torch.randn(1, 16, 5, H, W)
    fwd = run(model, inputs[:0] + (None,) + inputs[1:], mode="forward", n=2, extend_latents=video)
    assert torch.equal(fwd.latents[:, :, :5], video) and fwd.latents.shape[2] == 11
    assert fwd.sections == [(1, 5), (5, 8), (8, 11)]
    inv = run(model, (None,) + inputs[1:], n=2, extend_latents=video)
    assert torch.equal(inv.latents[:, :, :5], video) and inv.latents.shape[2] == 11  # new part starts on its last frame
    assert inv.sections == [(0, 5), (5, 8), (8, 11)]  # the input and the new start frame decode together
    for result in (fwd, inv):  # the decode plan fits the decoder's rules
        frames = decode_sections(result.latents, result.mode, result.window, result.sections, preview_decode)
        assert frames.shape[0] == 4 * 11 - 3


def test_inverted_extension_resolves_its_own_start(model, inputs, caplog):
    """generate() owns the rule: an inverted extension starts from the video's last frame, so a start latent
    passed as well (a node always has one) changes nothing and is reported."""
    video = torch.randn(1, 16, 5, H, W)
    alone = run(model, (None,) + inputs[1:], n=2, extend_latents=video)
    with caplog.at_level("WARNING", logger="framepack_core.pipeline"):
        both = run(model, inputs, n=2, extend_latents=video)
    assert torch.equal(both.latents, alone.latents)
    assert "start latent given as well is not used" in caplog.text
    forward = run(model, inputs, mode="forward", n=2, extend_latents=video)  # forward keeps the given start
    assert torch.equal(forward.latents[:, :, :5], video)


def test_the_negative_prompt_is_dropped_in_one_place(model, inputs):
    """With cfg 1 the negative is never run or checked (even a malformed one); above 1 it is required."""
    start, embeds, positive, _ = inputs
    broken = Prompt(torch.zeros(1, 3, 7), torch.zeros(1, 5))
    plain = run(model, (start, embeds, positive, None))
    assert torch.equal(run(model, (start, embeds, positive, broken)).latents, plain.latents)
    with pytest.raises(ValueError, match="cfg=2.0 needs a negative prompt"):
        run(model, (start, embeds, positive, None), settings=dict(cfg=2.0))
    with pytest.raises(ValueError, match="negative"):
        run(model, (start, embeds, positive, broken), settings=dict(cfg=2.0))


def test_the_model_sets_the_compute_dtype(model, inputs):
    """SamplingSettings has no dtype: the transformer's compute_dtype decides (else its weights' dtype)."""
    from framepack_core.pipeline import compute_dtype

    class Bf16Model(torch.nn.Module):  # a bf16 model, run here in fp32 so the test needs no bf16 kernels
        compute_dtype, config, seen = torch.bfloat16, model.config, []

        def forward(self, **kwargs):
            self.seen += [kwargs["hidden_states"].dtype, kwargs["timestep"].dtype, kwargs["guidance"].dtype]
            return model(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                            for k, v in kwargs.items()})

    assert compute_dtype(model) == torch.float32 and compute_dtype(torch.nn.Linear(2, 2).half()) == torch.float16
    assert compute_dtype(lambda **kw: None) == torch.float32
    bf16 = Bf16Model()
    run(bf16, inputs, n=1)
    assert set(bf16.seen) == {torch.bfloat16}


@pytest.mark.parametrize("kwargs, message", [
    (dict(end_latent=torch.zeros(1, 16, 1, 4, 4)), "encode both images at the same resolution"),
    (dict(keyframes={5: torch.zeros(1, 16, 1, H, W)}), "Keyframe section 5 is out of range"),
    (dict(mode="forward", end_latent=torch.zeros(1, 16, 1, H, W)), "need the inverted"),
    (dict(timed_prompts=[TimedPrompt(None, 0, 2), TimedPrompt(None, 1, 3)]), "ranges overlap"),
    (dict(timed_prompts=[TimedPrompt(None, 2, 1)]), "0 <= start < end"),
    (dict(end_image_embeddings=torch.zeros(1, 4, 12)), "end_image_embeddings is"),
    (dict(end_latent=torch.full((1, 16, 1, H, W), float("nan"))), "NaN"),
    (dict(keyframes={1: torch.zeros(1, 16, 1, H, W)}, end_latent=torch.zeros(1, 16, 1, H, W)), "Both an end latent"),
])
def test_bad_input_is_named(model, inputs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(model, inputs, **kwargs)


def test_bad_start_inputs(model, inputs):
    start, embeds, positive, negative = inputs
    with pytest.raises(ValueError, match="NaN"):
        run(model, (start * float("nan"), embeds, positive, negative))
    with pytest.raises(ValueError, match="shaped \\(1, channels, frames, height, width\\)"):
        run(model, (start[0], embeds, positive, negative))
    with pytest.raises(ValueError, match="last_hidden_state"):
        run(model, (start, embeds[0], positive, negative))
    with pytest.raises(ValueError, match="fps must be > 0"):
        run(model, inputs, fps=0)
