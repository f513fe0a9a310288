"""Training on the procedural world: the examples are generation's own inputs, and training learns."""

import pytest
import torch
from safetensors import safe_open

from framepack_core import train, world
from framepack_core.loading import load_transformer
from framepack_core.model import FramePackConfig
from framepack_core.packing import make_schedule
from framepack_core.pipeline import SamplingSettings, generate

# smaller than the trained model, so a few optimiser steps take a second
SMALL = FramePackConfig(num_heads=1, head_dim=32, num_layers=1, num_single_layers=1, num_refiner_layers=1,
                        text_dim=world.TEXT_DIM, pooled_dim=world.POOLED_DIM, image_dim=world.IMAGE_DIM,
                        rope_axes=(4, 14, 14))


@pytest.mark.parametrize("mode, sections", [("inverted", 6), ("inverted", 3), ("forward", 5)])
def test_training_inputs_are_the_inputs_generation_passes(mode, sections):
    # generate() with a sampler that returns each section's true frames: the model inputs it passes at every
    # section are exactly those of the training example for that section
    clip = world.held_out_clip(3)
    schedule = make_schedule(mode, sections, window=train.WINDOW)
    truth = clip.frames(range(1 + sections * train.WINDOW))
    passed, order = [], iter(schedule)

    def true_section(noise, positive, negative, on_step, interrupt):
        passed.append(positive)
        first = next(order).first_video_frame
        return truth[:, :, first:first + train.WINDOW]

    result = generate(None, schedule, *clip.conditioning(), settings=train.SETTINGS, sample_section=true_section)
    assert torch.equal(result.latents, truth)  # the world's frames land where generation puts its sections
    for position, inputs in enumerate(passed):
        example, target = train.example_inputs(clip, mode, sections, position, clip.direction)
        assert example.keys() == inputs.keys()
        for key, value in inputs.items():
            assert (value is None and example[key] is None) or torch.equal(example[key], value), (position, key)
        first = schedule[position].first_video_frame
        assert torch.equal(target, truth[:, :, first:first + train.WINDOW])


def test_inverted_examples_hold_the_later_sections_and_the_paddings():
    clip = world.held_out_clip(4)
    inputs, _ = train.example_inputs(clip, "inverted", 6, 2, clip.direction)  # video section 3, padding 2
    truth = clip.frames(range(1 + 6 * train.WINDOW))
    after = 1 + 4 * train.WINDOW  # the frame right after video section 3
    assert torch.equal(inputs["clean_latents"][:, :, 1], truth[:, :, after])
    assert torch.equal(inputs["clean_latents_2x"], truth[:, :, after + 1:after + 3])
    assert torch.equal(inputs["clean_latents_4x"][:, :, :7], truth[:, :, after + 3:])  # the 7 later frames left
    assert inputs["clean_latents_4x"][:, :, 7:].abs().sum() == 0  # and the history's zero padding
    assert inputs["latent_indices"].tolist() == list(range(1 + 2 * train.WINDOW, 1 + 3 * train.WINDOW))


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    inputs, target = train.random_batch(torch.Generator().manual_seed(0), 2)
    model = train.new_model(SMALL, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss():
        return train.flow_loss(model, inputs, target, torch.Generator().manual_seed(1))

    before = loss().item()
    for _ in range(12):
        train.optimize(model, optimizer, loss())
    assert loss().item() < 0.85 * before


def test_training_is_reproducible_from_its_seed():
    runs = [train.train(seed=5, steps=2, batch_size=2, config=SMALL, out=lambda line: None) for _ in range(2)]
    for (a, curve_a), (b, curve_b) in zip(runs, runs[1:]):
        assert curve_a == curve_b
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name


def test_committed_weights_name_their_command_and_load_through_the_loader():
    path = train.WEIGHTS
    assert path.stat().st_size <= 5 * 2**20
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["command"].startswith("python -m framepack_core.train") and "--seed" in metadata["command"]
    assert metadata["seed"] == metadata["command"].split("--seed")[1].split()[0]
    model = load_transformer(path, compute_dtype=torch.float32)
    assert model.config == train.CONFIG


def test_the_trained_model_makes_frames_of_the_world():
    # one forward section from a held-out start: the trained model's frames are the world's shapes on its
    # background, far closer to frames the world can show than what the same model untrained makes
    clip = world.held_out_clip(5)
    schedule = make_schedule("forward", 1, window=train.WINDOW)
    trained = load_transformer(train.WEIGHTS, compute_dtype=torch.float32)
    errors = []
    for model in (trained, train.new_model()):
        with torch.inference_mode():
            video = generate(model.eval(), schedule, *clip.conditioning(), settings=SamplingSettings(steps=8)).latents
        errors.append(world.world_error(video, clip)[1:].mean())
    assert errors[0] < 0.1 < errors[1]


def test_the_trained_model_moves_the_shapes_where_the_prompt_says():
    # the first forward section sees only the start frame: the direction comes from the prompt alone, so the
    # clip's own prompt must land far closer to the true frames than the opposite direction's
    clip = world.held_out_clip(6)
    opposite = world.DIRECTIONS[(world.DIRECTIONS.index(clip.direction) + 4) % len(world.DIRECTIONS)]
    model = load_transformer(train.WEIGHTS, compute_dtype=torch.float32)
    truth = clip.frames(range(1 + train.WINDOW))
    start, image, _ = clip.conditioning()
    errors = {}
    for direction in (clip.direction, opposite):
        with torch.inference_mode():
            video = generate(model, make_schedule("forward", 1, window=train.WINDOW), start, image,
                             world.prompt(direction), settings=SamplingSettings(steps=8)).latents
        errors[direction] = world.truth_error(video, truth)[1:].mean()
    assert errors[clip.direction] < 0.5 * errors[opposite]


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps: must be 1 or more, got 0"),
                                           (["--batch", "-2"], "--batch: must be 1 or more, got -2"),
                                           (["--lr", "0"], "--lr: must be above 0, got 0"),
                                           (["--lr", "nan"], "--lr: must be above 0, got nan")])
def test_training_command_rejects_bad_counts_and_rates(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
