"""Finite or fail: NaN/inf inputs, weights and predictions stop generate() with a message saying where, why and
the fix; inputs that do not fit the loaded model are named before any compute."""

import pytest
import torch

from framepack_core.checks import NonFiniteError, StepCheck, diagnose
from framepack_core.loading import load_transformer
from framepack_core.packing import make_schedule
from framepack_core.pipeline import Prompt, SamplingSettings, TimedPrompt, generate
from framepack_core.synthetic import TINY, random_state_dict, save_single_file

H = W = 4
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_transformer(save_single_file(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors",
                                             random_state_dict(TINY, seed=5)))


@pytest.fixture(scope="module")
def nan_weight_model(tmp_path_factory):
    state = random_state_dict(TINY, seed=5)
    state["single_transformer_blocks.1.proj_out.weight"][3, 7] = NAN  # one weight of a corrupt download
    return load_transformer(save_single_file(tmp_path_factory.mktemp("ckpt") / "corrupt.safetensors", state))


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(start_latent=torch.randn(1, 16, 1, H, W, generator=g),
                image_embeddings=torch.randn(1, 9, TINY.image_dim, generator=g),
                prompt=Prompt(torch.randn(1, 5, TINY.text_dim, generator=g), torch.randn(1, TINY.pooled_dim, generator=g)))


def run(model, settings=None, sections=2, mode="inverted", **overrides):
    kwargs = {**inputs(), **overrides}
    settings = SamplingSettings(**{"steps": 3, **(settings or {})})
    with torch.no_grad():
        return generate(model, make_schedule(mode, sections, window=2), settings=settings, **kwargs)


def with_nan(t, value=NAN):
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


def test_clean_inputs_give_a_finite_video(model):
    assert torch.isfinite(run(model).latents).all()


def test_nan_weight_names_section_step_weight_and_fix(nan_weight_model):
    with pytest.raises(NonFiniteError) as error:
        run(nan_weight_model)
    message = str(error.value)
    assert "section 1 of 2 (video section 1), step 1 of 3" in message
    assert "single_transformer_blocks.1.proj_out.weight contains NaN or inf" in message
    assert "corrupt" in message and "Download it again" in message
    assert isinstance(error.value, FloatingPointError) and isinstance(error.value, ValueError)


@pytest.mark.parametrize("name, overrides, message", [
    ("nan_conditioning", lambda i: dict(prompt=Prompt(with_nan(i["prompt"].text), i["prompt"].pooled)),
     r"prompt \(text hidden states\) contains NaN or inf \(1 of 160 values\)"),
    ("inf_pooled", lambda i: dict(prompt=Prompt(i["prompt"].text, with_nan(i["prompt"].pooled, INF))),
     r"prompt \(pooled vector\) contains NaN or inf"),
    ("nan_start_latent", lambda i: dict(start_latent=with_nan(i["start_latent"])), "start_latent contains NaN"),
    ("inf_image_embeddings", lambda i: dict(image_embeddings=with_nan(i["image_embeddings"], -INF)),
     "image_embeddings contains NaN or inf"),
    ("nan_end_latent", lambda i: dict(end_latent=with_nan(i["start_latent"])), "end_latent contains NaN"),
    ("nan_keyframe", lambda i: dict(keyframes={0: with_nan(i["start_latent"])}), "keyframe 0 contains NaN"),
    ("nan_extend", lambda i: dict(start_latent=None, extend_latents=with_nan(i["start_latent"].repeat(1, 1, 3, 1, 1))),
     "extend_latents contains NaN"),
    ("nan_timed_prompt", lambda i: dict(timed_prompts=[TimedPrompt(Prompt(with_nan(i["prompt"].text),
                                                                          i["prompt"].pooled), 0, 1)]),
     r"timed prompt \[0, 1\) \(text hidden states\) contains NaN"),
], ids=lambda v: v if isinstance(v, str) and " " not in v and "(" not in v else "")
def test_non_finite_inputs_are_named_with_the_fix(model, name, overrides, message):
    with pytest.raises(NonFiniteError, match=message) as error:
        run(model, **overrides(inputs()))
    assert "bf16 or fp32" in str(error.value) and "download its weights again" in str(error.value)


@pytest.mark.parametrize("field, value", [("distilled_guidance", NAN), ("cfg", INF), ("cfg_rescale", NAN),
                                          ("shift", NAN), ("teacache_threshold", NAN)])
def test_non_finite_guidance_values(model, field, value):
    negative = inputs()["prompt"]
    with pytest.raises(NonFiniteError, match=f"SamplingSettings.{field} is {value}; it must be a finite number"):
        run(model, settings={field: value}, negative=negative)


def test_nan_in_the_negative_prompt_with_real_cfg(model):
    i = inputs()
    negative = Prompt(i["prompt"].text, with_nan(i["prompt"].pooled))
    with pytest.raises(NonFiniteError, match=r"negative \(pooled vector\)"):
        run(model, settings={"cfg": 3.0}, negative=negative)
    run(model, negative=negative)  # cfg 1: the negative is never used, so never checked


def test_the_step_where_it_happened_is_reported(model):
    """A plug sampler whose prediction turns NaN at step 2 of section 2: the error says exactly that."""
    calls = []

    def sample_section(noise, positive, negative, on_step, interrupt):
        calls.append(len(calls))
        for step in range(4):
            bad = len(calls) == 2 and step >= 1
            on_step(step, 4, noise, noise * NAN if bad else noise)
        return noise

    with pytest.raises(NonFiniteError, match=r"section 2 of 3 \(video section 1\), step 2 of 4") as error:
        run(model, sections=3, sample_section=sample_section)
    assert "fp16 overflow" in str(error.value) and "corrupt checkpoint" in str(error.value)
    assert len(calls) == 2, "it stops in the section where it happened"


def test_a_non_finite_section_output_is_caught_without_step_callbacks(model):
    with pytest.raises(NonFiniteError, match="sampled latents of section 1 of 2"):
        run(model, sample_section=lambda noise, *_: noise * INF)


def test_step_check_reads_each_flag_one_step_late():
    check = StepCheck("section 1 of 1")
    check(0, 3, torch.ones(2))
    check(1, 3, torch.tensor([1.0, NAN]))  # queued: not read yet
    with pytest.raises(NonFiniteError, match="step 2 of 3"):
        check(2, 3, torch.ones(2))
    late = StepCheck("section 1 of 1")
    late(0, 1, torch.tensor([INF]))
    with pytest.raises(NonFiniteError, match="step 1 of 1"):
        late.finish()


def test_diagnosis_names_fp16_when_the_weights_are_finite(model):
    assert "runs in fp16" in diagnose(model, torch.float16)
    assert "fp16 overflow" in diagnose(model, torch.bfloat16)


def test_fp8_weights_are_diagnosed(tmp_path):
    state = {k: v.to(torch.float8_e4m3fn) if v.ndim >= 2 else v for k, v in random_state_dict(TINY).items()}
    state["transformer_blocks.0.attn.to_q.weight"][0, 0] = NAN
    fp8 = load_transformer(save_single_file(tmp_path / "fp8.safetensors", state))
    assert "transformer_blocks.0.attn.to_q.weight contains NaN" in diagnose(fp8, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# inputs that do not fit the loaded model, named before any compute


@pytest.mark.parametrize("overrides, message", [
    (lambda i: dict(start_latent=torch.zeros(1, 4, 1, H, W)), "start_latent has 4 channels but this model takes 16"),
    (lambda i: dict(start_latent=torch.zeros(2, 16, 1, H, W)), "start_latent holds a batch of 2"),
    (lambda i: dict(image_embeddings=torch.zeros(1, 9, 1152)),
     f"image_embeddings are 1152 wide but the model expects {TINY.image_dim}"),
    (lambda i: dict(image_embeddings=torch.zeros(2, 9, TINY.image_dim)), "image_embeddings hold 2 images"),
    (lambda i: dict(prompt=Prompt(torch.zeros(1, 5, 4096), i["prompt"].pooled)),
     f"prompt is not HunyuanVideo text.*{TINY.text_dim}-wide states and {TINY.pooled_dim}-wide pooled"),
    (lambda i: dict(prompt=Prompt(i["prompt"].text, torch.zeros(1, 768))), "prompt is not HunyuanVideo text"),
    (lambda i: dict(prompt=Prompt(i["prompt"].text.repeat(2, 1, 1), i["prompt"].pooled.repeat(2, 1))),
     "prompt holds a batch of 2 prompts"),
    (lambda i: dict(prompt=Prompt(i["prompt"].text, i["prompt"].pooled, torch.ones(1, 7, dtype=torch.bool))),
     r"prompt's attention mask is \(1, 7\) but its text is \(1, 5\)"),
    (lambda i: dict(start_latent=None, extend_latents=torch.zeros(1, 8, 3, H, W)), "extend_latents has 8 channels"),
])
def test_inputs_are_checked_against_the_model(model, overrides, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        run(model, sample_section=lambda *a: calls.append(a), **overrides(inputs()))
    assert not calls, "nothing is computed before the inputs are checked"


def test_forward_extension_of_another_size_than_the_start_is_named_before_any_compute(model):
    calls = []
    video = torch.zeros(1, 16, 3, H, W + 2)
    with pytest.raises(ValueError, match=r"extend_latents \(the video to extend\) is 4x6 latent \(32x48 pixels\) but "
                       r"start_latent is 4x4 \(32x32 pixels\).*scale it to width 48, height 32 before VAEEncode\), "
                       "or leave start_latent unconnected"):
        run(model, mode="forward", sample_section=lambda *a: calls.append(a), extend_latents=video)
    assert not calls
    same_size = run(model, mode="forward", extend_latents=torch.zeros(1, 16, 3, H, W))
    assert torch.isfinite(same_size.latents).all()


def test_real_cfg_without_a_negative_prompt(model):
    with pytest.raises(ValueError, match="cfg=3.0 needs a negative prompt"):
        run(model, settings={"cfg": 3.0})
